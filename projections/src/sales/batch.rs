//! The sales projection's batch path: a batch's events are folded per order
//! in memory, with the same guards and the same arithmetic as `apply`, and
//! every counter row is written once per batch with the sum of what the
//! batch adds to it, instead of once or twice per event.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::order::{CancelReason, OrderEvent, OrderLine};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{hour_start, split_in_proportion, HourDelta};
use crate::order_batch::{self, DecodedOrderEvent};
use crate::runner::ProjectionError;
use crate::stored_event::StoredEvent;

/// What the projection keeps of an order, as the batch moves it.
#[derive(Debug)]
struct SalesOrder {
    currency: String,
    placed_at: DateTime<Utc>,
    units: i64,
    paid_cents: i64,
    version: i64,
    /// Its lines summed per product, from its `OrderPlaced` (loaded only
    /// for a payment or a refund).
    products: Vec<ProductTotal>,
    /// Placed in this batch and not found by `stored_orders`: either it
    /// has no row yet, or only its placement is in the batch and was not
    /// read for (its insert then skips the row, and counts nothing).
    new: bool,
    /// The row existed before the batch and the batch changed it.
    changed: bool,
}

#[derive(Debug, Clone)]
pub(super) struct ProductTotal {
    pub(super) product_id: Uuid,
    pub(super) name: String,
    pub(super) units: i64,
    pub(super) revenue_cents: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct StoredOrder {
    order_id: Uuid,
    currency: String,
    placed_at: DateTime<Utc>,
    units: i64,
    paid_cents: i64,
    version: i64,
}

/// What the batch adds to one product's hour.
#[derive(Debug, Default)]
struct ProductDelta {
    /// The name the last event touching the row wrote.
    name: String,
    units: i64,
    revenue_cents: i64,
}

#[derive(Default)]
struct Sums {
    hours: BTreeMap<(String, DateTime<Utc>), HourDelta>,
    products: BTreeMap<(String, DateTime<Utc>, Uuid), ProductDelta>,
}

impl Sums {
    /// As `add_to_hours`: a delta of nothing touches no row.
    fn add_hour(&mut self, currency: &str, at: DateTime<Utc>, delta: HourDelta) {
        if delta != HourDelta::default() {
            self.hours
                .entry((currency.to_owned(), hour_start(at)))
                .or_default()
                .add(&delta);
        }
    }

    fn add_product(
        &mut self,
        currency: &str,
        at: DateTime<Utc>,
        product_id: Uuid,
        name: &str,
        units: i64,
        revenue_cents: i64,
    ) {
        let row = self
            .products
            .entry((currency.to_owned(), hour_start(at), product_id))
            .or_default();
        name.clone_into(&mut row.name);
        row.units += units;
        row.revenue_cents += revenue_cents;
    }
}

pub(super) async fn apply_batch(
    tx: &mut PgConnection,
    events: &[StoredEvent],
) -> Result<(), ProjectionError> {
    let decoded = order_batch::decode(events)?;
    // Only a payment or a refund reads an order's lines.
    let needs_lines: HashSet<Uuid> = decoded
        .iter()
        .filter(|(_, _, payload)| {
            matches!(
                payload,
                OrderEvent::OrderPaid { .. } | OrderEvent::OrderRefunded { .. }
            )
        })
        .map(|(order_id, _, _)| *order_id)
        .collect();
    let mut orders = stored_orders(tx, &decoded, &needs_lines).await?;
    let mut sums = Sums::default();
    let mut placed_order: Vec<Uuid> = Vec::new();
    for (order_id, event, payload) in decoded {
        // An order only placed in this batch was not read: its insert finds
        // out whether it is new, and its hold is counted then.
        if let OrderEvent::OrderPlaced {
            lines,
            currency,
            placed_at,
            ..
        } = payload
        {
            if orders.contains_key(&order_id) {
                continue;
            }
            orders.insert(
                order_id,
                SalesOrder {
                    currency: currency.as_str().to_owned(),
                    placed_at,
                    units: lines.iter().map(|line| i64::from(line.quantity)).sum(),
                    paid_cents: 0,
                    version: event.sequence,
                    products: if needs_lines.contains(&order_id) {
                        product_totals(tx, &stored_lines(&lines)).await?
                    } else {
                        Vec::new()
                    },
                    new: true,
                    changed: false,
                },
            );
            placed_order.push(order_id);
            continue;
        }
        let Some(order) = orders
            .get_mut(&order_id)
            .filter(|order| order.version < event.sequence)
        else {
            continue;
        };
        order.version = event.sequence;
        order.changed = true;
        match payload {
            OrderEvent::OrderPlaced { .. }
            | OrderEvent::PaymentStarted { .. }
            | OrderEvent::RefundDecided { .. } => {}
            OrderEvent::OrderPaid {
                amount_cents,
                late,
                paid_at,
                ..
            } => {
                order.paid_cents += amount_cents;
                sums.add_hour(
                    &order.currency,
                    paid_at,
                    HourDelta {
                        revenue_cents: amount_cents,
                        orders_paid: 1,
                        units_sold: order.units,
                        ..HourDelta::default()
                    },
                );
                sums.add_hour(
                    &order.currency,
                    order.placed_at,
                    HourDelta {
                        holds_converted: i64::from(!late),
                        ..HourDelta::default()
                    },
                );
                for product in &order.products {
                    sums.add_product(
                        &order.currency,
                        paid_at,
                        product.product_id,
                        &product.name,
                        product.units,
                        product.revenue_cents,
                    );
                }
            }
            OrderEvent::OrderCancelled {
                reason,
                cancelled_at,
            } => {
                let expired = reason == CancelReason::Expired;
                sums.add_hour(
                    &order.currency,
                    cancelled_at,
                    HourDelta {
                        orders_cancelled: i64::from(!expired),
                        orders_expired: i64::from(expired),
                        ..HourDelta::default()
                    },
                );
                sums.add_hour(
                    &order.currency,
                    order.placed_at,
                    HourDelta {
                        holds_expired: i64::from(expired),
                        ..HourDelta::default()
                    },
                );
            }
            OrderEvent::OrderRefunded {
                amount_cents,
                refunded_at,
                ..
            } => {
                let taken_off = amount_cents.clamp(0, order.paid_cents);
                if taken_off == 0 {
                    continue;
                }
                order.paid_cents -= taken_off;
                sums.add_hour(
                    &order.currency,
                    refunded_at,
                    HourDelta {
                        revenue_cents: -taken_off,
                        orders_refunded: 1,
                        refunded_cents: taken_off,
                        ..HourDelta::default()
                    },
                );
                let weights: Vec<(Uuid, i64)> = order
                    .products
                    .iter()
                    .map(|product| (product.product_id, product.revenue_cents))
                    .collect();
                for (product_id, share) in split_in_proportion(taken_off, &weights) {
                    let name = order
                        .products
                        .iter()
                        .find(|product| product.product_id == product_id)
                        .map(|product| product.name.as_str())
                        .unwrap_or_default();
                    sums.add_product(&order.currency, refunded_at, product_id, name, 0, -share);
                }
            }
        }
    }
    for order_id in insert_placed(tx, &placed_order, &orders).await? {
        if let Some(order) = orders.get(&order_id) {
            sums.add_hour(
                &order.currency,
                order.placed_at,
                HourDelta {
                    holds_placed: 1,
                    ..HourDelta::default()
                },
            );
        }
    }
    update_changed(tx, &orders).await?;
    write_hours(tx, &sums.hours).await?;
    write_products(tx, &sums.products).await
}

/// The rows that the batch's orders with events after their placement
/// already have, with their lines per product. Orders the batch only places
/// are left to `insert_placed`: a flash sale's batches are nearly all
/// placements, and reading their rows first cost an index probe each.
async fn stored_orders(
    tx: &mut PgConnection,
    decoded: &[DecodedOrderEvent<'_>],
    needs_lines: &HashSet<Uuid>,
) -> Result<HashMap<Uuid, SalesOrder>, ProjectionError> {
    let order_ids = order_batch::changed_after_placement(decoded);
    if order_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<StoredOrder> = sqlx::query_as(
        "SELECT order_id, currency, placed_at, units, paid_cents, version FROM sales_orders \
         WHERE order_id = ANY($1)",
    )
    .bind(&order_ids)
    .fetch_all(&mut *tx)
    .await?;
    let with_lines: Vec<Uuid> = rows
        .iter()
        .map(|row| row.order_id)
        .filter(|order_id| needs_lines.contains(order_id))
        .collect();
    let mut products: HashMap<Uuid, Vec<ProductTotal>> = HashMap::new();
    if !with_lines.is_empty() {
        for (order_id, lines) in super::placed_lines(tx, &with_lines).await? {
            products.insert(order_id, product_totals(tx, &stored_lines(&lines)).await?);
        }
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let order = SalesOrder {
                currency: row.currency,
                placed_at: row.placed_at,
                units: row.units,
                paid_cents: row.paid_cents,
                version: row.version,
                products: products.remove(&row.order_id).unwrap_or_default(),
                new: false,
                changed: false,
            };
            (row.order_id, order)
        })
        .collect())
}

/// The lines a placement counts: the first of each variant (orders have
/// one line per variant; this keeps what a table keyed by order and
/// variant kept before the lines were read from the store).
pub(super) fn stored_lines(lines: &[OrderLine]) -> Vec<&OrderLine> {
    let mut variants = HashSet::new();
    lines
        .iter()
        .filter(|line| variants.insert(line.variant_id))
        .collect()
}

/// `lines` summed per product, as `paid` and `refunded` read them back.
pub(super) async fn product_totals(
    tx: &mut PgConnection,
    lines: &[&OrderLine],
) -> Result<Vec<ProductTotal>, ProjectionError> {
    let mut totals: BTreeMap<Uuid, (Vec<&str>, i64, i64)> = BTreeMap::new();
    for line in lines {
        let total = totals.entry(line.product_id).or_default();
        total.0.push(line.product_name.as_str());
        total.1 += i64::from(line.quantity);
        total.2 += line.line_total_cents;
    }
    let mut products = Vec::with_capacity(totals.len());
    for (product_id, (names, units, revenue_cents)) in totals {
        products.push(ProductTotal {
            product_id,
            name: least_name(tx, &names).await?,
            units,
            revenue_cents,
        });
    }
    Ok(products)
}

/// `min(product_name)` as Postgres orders text (by the database's
/// collation, not by bytes); asks Postgres only when the names differ.
async fn least_name(tx: &mut PgConnection, names: &[&str]) -> Result<String, ProjectionError> {
    let Some(first) = names.first() else {
        return Ok(String::new());
    };
    if names.iter().all(|name| name == first) {
        return Ok((*first).to_owned());
    }
    let least: Option<String> =
        sqlx::query_scalar("SELECT min(name) FROM UNNEST($1::text[]) AS name")
            .bind(names)
            .fetch_one(&mut *tx)
            .await?;
    Ok(least.unwrap_or_default())
}

/// The orders placed in the batch, as the batch left them; returns those
/// that had no row yet (a replayed placement of an order already counted
/// inserts nothing).
async fn insert_placed(
    tx: &mut PgConnection,
    placed_order: &[Uuid],
    orders: &HashMap<Uuid, SalesOrder>,
) -> Result<Vec<Uuid>, ProjectionError> {
    let placed: Vec<(Uuid, &SalesOrder)> = placed_order
        .iter()
        .filter_map(|id| Some((*id, orders.get(id)?)))
        .collect();
    if placed.is_empty() {
        return Ok(Vec::new());
    }
    let inserted = sqlx::query_scalar(
        "INSERT INTO sales_orders (order_id, currency, placed_at, units, paid_cents, version) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::bigint[], \
                              $5::bigint[], $6::bigint[]) \
         ON CONFLICT (order_id) DO NOTHING \
         RETURNING order_id",
    )
    .bind(placed.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(
        placed
            .iter()
            .map(|(_, o)| o.currency.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(placed.iter().map(|(_, o)| o.placed_at).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, o)| o.units).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, o)| o.paid_cents).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, o)| o.version).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    Ok(inserted)
}

/// The orders that existed before the batch and that it moved on.
async fn update_changed(
    tx: &mut PgConnection,
    orders: &HashMap<Uuid, SalesOrder>,
) -> Result<(), ProjectionError> {
    let changed: Vec<(Uuid, &SalesOrder)> = orders
        .iter()
        .filter(|(_, order)| order.changed && !order.new)
        .map(|(id, order)| (*id, order))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE sales_orders o SET version = v.version, paid_cents = v.paid_cents \
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS v(order_id, version, paid_cents) \
         WHERE o.order_id = v.order_id AND o.version < v.version",
    )
    .bind(changed.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(changed.iter().map(|(_, o)| o.version).collect::<Vec<_>>())
    .bind(
        changed
            .iter()
            .map(|(_, o)| o.paid_cents)
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// One upsert for every hour the batch touched, adding its sums.
pub(super) async fn write_hours(
    tx: &mut PgConnection,
    hours: &BTreeMap<(String, DateTime<Utc>), HourDelta>,
) -> Result<(), ProjectionError> {
    if hours.is_empty() {
        return Ok(());
    }
    let column = |field: fn(&HourDelta) -> i64| hours.values().map(field).collect::<Vec<i64>>();
    sqlx::query(
        "INSERT INTO sales_hourly (currency, bucket_start, revenue_cents, orders_paid, units_sold, \
             orders_cancelled, orders_expired, orders_refunded, refunded_cents, holds_placed, \
             holds_converted, holds_expired) \
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[], \
             $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], \
             $11::bigint[], $12::bigint[]) \
         ON CONFLICT (currency, bucket_start) DO UPDATE SET \
             revenue_cents = sales_hourly.revenue_cents + EXCLUDED.revenue_cents, \
             orders_paid = sales_hourly.orders_paid + EXCLUDED.orders_paid, \
             units_sold = sales_hourly.units_sold + EXCLUDED.units_sold, \
             orders_cancelled = sales_hourly.orders_cancelled + EXCLUDED.orders_cancelled, \
             orders_expired = sales_hourly.orders_expired + EXCLUDED.orders_expired, \
             orders_refunded = sales_hourly.orders_refunded + EXCLUDED.orders_refunded, \
             refunded_cents = sales_hourly.refunded_cents + EXCLUDED.refunded_cents, \
             holds_placed = sales_hourly.holds_placed + EXCLUDED.holds_placed, \
             holds_converted = sales_hourly.holds_converted + EXCLUDED.holds_converted, \
             holds_expired = sales_hourly.holds_expired + EXCLUDED.holds_expired",
    )
    .bind(hours.keys().map(|(currency, _)| currency.as_str()).collect::<Vec<_>>())
    .bind(hours.keys().map(|(_, hour)| *hour).collect::<Vec<_>>())
    .bind(column(|d| d.revenue_cents))
    .bind(column(|d| d.orders_paid))
    .bind(column(|d| d.units_sold))
    .bind(column(|d| d.orders_cancelled))
    .bind(column(|d| d.orders_expired))
    .bind(column(|d| d.orders_refunded))
    .bind(column(|d| d.refunded_cents))
    .bind(column(|d| d.holds_placed))
    .bind(column(|d| d.holds_converted))
    .bind(column(|d| d.holds_expired))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// One upsert for every product hour the batch touched.
async fn write_products(
    tx: &mut PgConnection,
    products: &BTreeMap<(String, DateTime<Utc>, Uuid), ProductDelta>,
) -> Result<(), ProjectionError> {
    if products.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO sales_product_hourly (currency, bucket_start, product_id, name, units_sold, \
                                           revenue_cents) \
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[], $5::bigint[], \
                              $6::bigint[]) \
         ON CONFLICT (currency, bucket_start, product_id) DO UPDATE SET name = EXCLUDED.name, \
             units_sold = sales_product_hourly.units_sold + EXCLUDED.units_sold, \
             revenue_cents = sales_product_hourly.revenue_cents + EXCLUDED.revenue_cents",
    )
    .bind(
        products
            .keys()
            .map(|(currency, _, _)| currency.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        products
            .keys()
            .map(|(_, hour, _)| *hour)
            .collect::<Vec<_>>(),
    )
    .bind(products.keys().map(|(_, _, id)| *id).collect::<Vec<_>>())
    .bind(
        products
            .values()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(products.values().map(|d| d.units).collect::<Vec<_>>())
    .bind(
        products
            .values()
            .map(|d| d.revenue_cents)
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}
