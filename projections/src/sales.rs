//! The sales read model: revenue, orders, units and flash-sale holds by UTC
//! hour, and units and revenue by product and hour, folded from `Order`
//! events (never read from the write side).
//!
//! Each figure lands in the hour of the time written inside its event:
//! revenue, units and `orders_paid` at `paid_at`, cancellations at
//! `cancelled_at`, refunds at `refunded_at`. The hold figures are a cohort
//! instead: `holds_converted` and `holds_expired` are counted in the hour
//! the hold was placed, so that for any range `holds_converted /
//! holds_placed` is the share of that range's holds that were paid in time.
//! Revenue is net: a refund of a paid order takes its amount off, in the
//! hour of the refund (spread over the order's products in proportion to
//! their line totals); a refund of a payment that was never accepted (it came
//! after the order ended) takes nothing off, as it never counted.
//!
//! An OrderPaid carries neither the lines nor the placement time. The
//! placement time, the units and what was paid are kept per order
//! (`sales_orders`), with the order's sequence, which guards every event:
//! a replayed event is skipped before any counter moves. The lines are
//! read from the order's `OrderPlaced` in the store when a payment or a
//! refund needs them, rather than copied for every order placed (a flash
//! sale places thousands a second and pays for them later).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveTime, Timelike, Utc};
use domain::order::{CancelReason, Order, OrderEvent, OrderLine};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::{Projection, ProjectionError};
use crate::stored_event::StoredEvent;

mod batch;

pub const NAME: &str = "sales";

pub struct SalesProjection;

/// The start of the UTC hour `at` falls in.
pub fn hour_start(at: DateTime<Utc>) -> DateTime<Utc> {
    let time = NaiveTime::from_hms_opt(at.hour(), 0, 0).unwrap_or(NaiveTime::MIN);
    at.date_naive().and_time(time).and_utc()
}

/// The start of the UTC day `at` falls in.
pub fn day_start(at: DateTime<Utc>) -> DateTime<Utc> {
    at.date_naive().and_time(NaiveTime::MIN).and_utc()
}

/// What one event adds to one hour's row (negative for refunds).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct HourDelta {
    revenue_cents: i64,
    orders_paid: i64,
    units_sold: i64,
    orders_cancelled: i64,
    orders_expired: i64,
    orders_refunded: i64,
    refunded_cents: i64,
    holds_placed: i64,
    holds_converted: i64,
    holds_expired: i64,
}

impl HourDelta {
    fn add(&mut self, other: &Self) {
        self.revenue_cents += other.revenue_cents;
        self.orders_paid += other.orders_paid;
        self.units_sold += other.units_sold;
        self.orders_cancelled += other.orders_cancelled;
        self.orders_expired += other.orders_expired;
        self.orders_refunded += other.orders_refunded;
        self.refunded_cents += other.refunded_cents;
        self.holds_placed += other.holds_placed;
        self.holds_converted += other.holds_converted;
        self.holds_expired += other.holds_expired;
    }
}

/// What the projection remembers of an order.
#[derive(Debug, sqlx::FromRow)]
struct OrderFacts {
    currency: String,
    placed_at: DateTime<Utc>,
    units: i64,
    paid_cents: i64,
}

#[async_trait::async_trait]
impl Projection for SalesProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, aggregate_type: &str) -> bool {
        aggregate_type == <Order as cqrs_es::Aggregate>::TYPE
    }

    fn tables(&self) -> &'static [&'static str] {
        &["sales_hourly", "sales_product_hourly", "sales_orders"]
    }

    fn mirrors_rows(&self) -> bool {
        false
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        let order_id: Uuid = event.aggregate_uuid()?;
        let payload: OrderEvent = event.payload_as()?;
        if let OrderEvent::OrderPlaced {
            lines,
            currency,
            placed_at,
            ..
        } = payload
        {
            return place(
                tx,
                order_id,
                event.sequence,
                &lines,
                currency.as_str(),
                placed_at,
            )
            .await;
        }
        // A payment's amount is recorded with the version, in one statement.
        let paid_cents = match &payload {
            OrderEvent::OrderPaid { amount_cents, .. } => *amount_cents,
            _ => 0,
        };
        let Some(order) = advance(tx, order_id, event.sequence, paid_cents).await? else {
            return Ok(());
        };
        match payload {
            OrderEvent::OrderPlaced { .. }
            | OrderEvent::PaymentStarted { .. }
            | OrderEvent::RefundDecided { .. } => {}
            OrderEvent::OrderPaid {
                amount_cents,
                late,
                paid_at,
                ..
            } => paid(tx, order_id, &order, amount_cents, late, paid_at).await?,
            OrderEvent::OrderCancelled {
                reason,
                cancelled_at,
            } => {
                let expired = reason == CancelReason::Expired;
                let at_cancellation = HourDelta {
                    orders_cancelled: i64::from(!expired),
                    orders_expired: i64::from(expired),
                    ..HourDelta::default()
                };
                let cohort = HourDelta {
                    holds_expired: i64::from(expired),
                    ..HourDelta::default()
                };
                add_to_hours(
                    tx,
                    &order.currency,
                    &[(cancelled_at, at_cancellation), (order.placed_at, cohort)],
                )
                .await?;
            }
            OrderEvent::OrderRefunded {
                amount_cents,
                refunded_at,
                ..
            } => refunded(tx, order_id, &order, amount_cents, refunded_at).await?,
        }
        Ok(())
    }

    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        batch::apply_batch(tx, events).await
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE sales_hourly, sales_product_hourly, sales_orders")
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// Remembers a new order and counts its hold; nothing when already seen.
async fn place(
    tx: &mut PgConnection,
    order_id: Uuid,
    sequence: i64,
    lines: &[OrderLine],
    currency: &str,
    placed_at: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    let units: i64 = lines.iter().map(|line| i64::from(line.quantity)).sum();
    let fresh: Option<i32> = sqlx::query_scalar(
        "INSERT INTO sales_orders (order_id, currency, placed_at, units, version) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING RETURNING 1",
    )
    .bind(order_id)
    .bind(currency)
    .bind(placed_at)
    .bind(units)
    .bind(sequence)
    .fetch_optional(&mut *tx)
    .await?;
    if fresh.is_none() {
        return Ok(());
    }
    let hold = HourDelta {
        holds_placed: 1,
        ..HourDelta::default()
    };
    add_to_hours(tx, currency, &[(placed_at, hold)]).await
}

/// Moves the order's version to `sequence`, adds `paid_cents` to what was
/// paid for it, and returns what is known of it; `None` for an event
/// already applied (or an order never placed).
async fn advance(
    tx: &mut PgConnection,
    order_id: Uuid,
    sequence: i64,
    paid_cents: i64,
) -> Result<Option<OrderFacts>, ProjectionError> {
    let facts: Option<OrderFacts> = sqlx::query_as(
        "UPDATE sales_orders SET version = $2, paid_cents = paid_cents + $3 \
         WHERE order_id = $1 AND version < $2 \
         RETURNING currency, placed_at, units, paid_cents",
    )
    .bind(order_id)
    .bind(sequence)
    .bind(paid_cents)
    .fetch_optional(&mut *tx)
    .await?;
    if facts.is_none() {
        tracing::debug!(%order_id, sequence, "sales: event already applied, or order unknown");
    }
    Ok(facts)
}

/// Counts a payment (already added to the order's `paid_cents`).
async fn paid(
    tx: &mut PgConnection,
    order_id: Uuid,
    order: &OrderFacts,
    amount_cents: i64,
    late: bool,
    paid_at: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    let sale = HourDelta {
        revenue_cents: amount_cents,
        orders_paid: 1,
        units_sold: order.units,
        ..HourDelta::default()
    };
    // A late payment was for a hold that had already expired: the hold
    // itself did not convert.
    let cohort = HourDelta {
        holds_converted: i64::from(!late),
        ..HourDelta::default()
    };
    add_to_hours(
        tx,
        &order.currency,
        &[(paid_at, sale), (order.placed_at, cohort)],
    )
    .await?;
    let products = order_products(tx, order_id).await?;
    sqlx::query(
        "INSERT INTO sales_product_hourly (currency, bucket_start, product_id, name, units_sold, \
                                           revenue_cents) \
         SELECT $1, $2, v.product_id, v.name, v.units, v.revenue \
         FROM UNNEST($3::uuid[], $4::text[], $5::bigint[], $6::bigint[]) \
              AS v(product_id, name, units, revenue) \
         ON CONFLICT (currency, bucket_start, product_id) DO UPDATE SET name = EXCLUDED.name, \
             units_sold = sales_product_hourly.units_sold + EXCLUDED.units_sold, \
             revenue_cents = sales_product_hourly.revenue_cents + EXCLUDED.revenue_cents",
    )
    .bind(&order.currency)
    .bind(hour_start(paid_at))
    .bind(products.iter().map(|p| p.product_id).collect::<Vec<_>>())
    .bind(products.iter().map(|p| p.name.as_str()).collect::<Vec<_>>())
    .bind(products.iter().map(|p| p.units).collect::<Vec<_>>())
    .bind(products.iter().map(|p| p.revenue_cents).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The lines of each of these orders, from its `OrderPlaced` in the store
/// (an order never placed has none).
pub(super) async fn placed_lines(
    tx: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<(Uuid, Vec<OrderLine>)>, ProjectionError> {
    let ids: Vec<String> = order_ids.iter().map(Uuid::to_string).collect();
    let events: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {} FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND event_type = 'OrderPlaced'",
        crate::stored_event::STORED_EVENT_COLUMNS
    ))
    .bind(<Order as cqrs_es::Aggregate>::TYPE)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut placed = Vec::with_capacity(events.len());
    for event in &events {
        if let OrderEvent::OrderPlaced { lines, .. } = event.payload_as()? {
            placed.push((event.aggregate_uuid()?, lines));
        }
    }
    Ok(placed)
}

/// The order's lines summed per product.
async fn order_products(
    tx: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<batch::ProductTotal>, ProjectionError> {
    let Some((_, lines)) = placed_lines(tx, &[order_id]).await?.into_iter().next() else {
        return Ok(Vec::new());
    };
    batch::product_totals(tx, &batch::stored_lines(&lines)).await
}

async fn refunded(
    tx: &mut PgConnection,
    order_id: Uuid,
    order: &OrderFacts,
    amount_cents: i64,
    refunded_at: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    // Only money that was counted as revenue can be taken off it.
    let taken_off = amount_cents.clamp(0, order.paid_cents);
    if taken_off == 0 {
        return Ok(());
    }
    sqlx::query("UPDATE sales_orders SET paid_cents = paid_cents - $2 WHERE order_id = $1")
        .bind(order_id)
        .bind(taken_off)
        .execute(&mut *tx)
        .await?;
    let refund = HourDelta {
        revenue_cents: -taken_off,
        orders_refunded: 1,
        refunded_cents: taken_off,
        ..HourDelta::default()
    };
    add_to_hours(tx, &order.currency, &[(refunded_at, refund)]).await?;

    let products = order_products(tx, order_id).await?;
    let shares = split_in_proportion(
        taken_off,
        &products
            .iter()
            .map(|product| (product.product_id, product.revenue_cents))
            .collect::<Vec<_>>(),
    );
    let names: BTreeMap<Uuid, &str> = products
        .iter()
        .map(|product| (product.product_id, product.name.as_str()))
        .collect();
    let product_ids: Vec<Uuid> = shares.iter().map(|(id, _)| *id).collect();
    let product_names: Vec<&str> = product_ids
        .iter()
        .map(|id| names.get(id).copied().unwrap_or_default())
        .collect();
    let revenue: Vec<i64> = shares.iter().map(|(_, share)| -share).collect();
    sqlx::query(
        "INSERT INTO sales_product_hourly (currency, bucket_start, product_id, name, units_sold, \
                                           revenue_cents) \
         SELECT $1, $2, v.product_id, v.name, 0, v.revenue \
         FROM UNNEST($3::uuid[], $4::text[], $5::bigint[]) AS v(product_id, name, revenue) \
         ON CONFLICT (currency, bucket_start, product_id) DO UPDATE SET name = EXCLUDED.name, \
             revenue_cents = sales_product_hourly.revenue_cents + EXCLUDED.revenue_cents",
    )
    .bind(&order.currency)
    .bind(hour_start(refunded_at))
    .bind(&product_ids)
    .bind(&product_names)
    .bind(&revenue)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Splits `amount` over `parts` in proportion to their weights, in whole
/// cents that add up to `amount` exactly: each part gets the floor of its
/// share, and the cents left over go one each to the largest parts (then by
/// id), so the split is the same on every replay.
fn split_in_proportion(amount: i64, parts: &[(Uuid, i64)]) -> Vec<(Uuid, i64)> {
    let total: i128 = parts.iter().map(|(_, weight)| i128::from(*weight)).sum();
    if total <= 0 {
        return Vec::new();
    }
    let mut shares: Vec<(Uuid, i64, i64)> = parts
        .iter()
        .map(|(id, weight)| {
            let share = i128::from(amount) * i128::from(*weight) / total;
            (*id, *weight, i64::try_from(share).unwrap_or(0))
        })
        .collect();
    let mut left = amount - shares.iter().map(|(_, _, share)| share).sum::<i64>();
    shares.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (_, _, share) in shares.iter_mut() {
        if left <= 0 {
            break;
        }
        *share += 1;
        left -= 1;
    }
    shares
        .into_iter()
        .map(|(id, _, share)| (id, share))
        .collect()
}

/// Adds each delta to the row of the hour its instant falls in, in one
/// statement (deltas of the same hour are summed first: one statement may
/// not update a row twice).
async fn add_to_hours(
    tx: &mut PgConnection,
    currency: &str,
    deltas: &[(DateTime<Utc>, HourDelta)],
) -> Result<(), ProjectionError> {
    let mut by_hour: BTreeMap<(String, DateTime<Utc>), HourDelta> = BTreeMap::new();
    for (at, delta) in deltas {
        if *delta != HourDelta::default() {
            by_hour
                .entry((currency.to_owned(), hour_start(*at)))
                .or_default()
                .add(delta);
        }
    }
    batch::write_hours(tx, &by_hour).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("a valid test time")
            .with_timezone(&Utc)
    }

    #[test]
    fn an_instant_belongs_to_the_utc_hour_and_day_it_falls_in() {
        assert_eq!(
            hour_start(at("2024-03-10T10:59:59.999Z")),
            at("2024-03-10T10:00:00Z")
        );
        assert_eq!(
            hour_start(at("2024-03-10T11:00:00Z")),
            at("2024-03-10T11:00:00Z")
        );
        // An offset is only another way to write the same instant.
        assert_eq!(
            hour_start(at("2024-03-10T01:30:00+05:30")),
            at("2024-03-09T20:00:00Z")
        );
        assert_eq!(
            day_start(at("2024-03-10T23:59:59.999Z")),
            at("2024-03-10T00:00:00Z")
        );
        assert_eq!(
            day_start(at("2024-03-11T00:00:00Z")),
            Utc.with_ymd_and_hms(2024, 3, 11, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn a_refund_is_split_over_products_in_whole_cents_that_add_up() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let split = split_in_proportion(1000, &[(a, 1), (b, 1), (c, 1)]);
        let total: i64 = split.iter().map(|(_, share)| share).sum();
        assert_eq!(total, 1000);
        assert_eq!(split, vec![(a, 334), (b, 333), (c, 333)]);

        let whole = split_in_proportion(4500, &[(a, 2000), (b, 2500)]);
        assert_eq!(whole, vec![(b, 2500), (a, 2000)]);
        assert!(split_in_proportion(100, &[]).is_empty());
    }
}
