//! The orders read model: one row per order with its lines, for the
//! customer's order list and order page.
//!
//! The lines are a JSON column of the order's row: they are only ever read
//! with their order, and a row of their own cost a row and an index entry
//! more for every order placed. A batch (a flash sale's checkouts) folds its
//! events per order in memory and writes all new orders in one statement,
//! and all changed orders in another.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::order::{Order, OrderEvent, OrderLine};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::order_batch;
use crate::runner::{Projection, ProjectionError};
use crate::stored_event::StoredEvent;

pub const NAME: &str = "orders";

pub struct OrdersProjection;

/// An enum's serde name (`payment_pending`, `expired`): the read model
/// stores the same words the API shows.
fn wire_name(value: &impl serde::Serialize) -> Result<String, ProjectionError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => Ok(text),
        _ => Err(ProjectionError::Other(
            "status did not serialise to a string".into(),
        )),
    }
}

#[async_trait::async_trait]
impl Projection for OrdersProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, aggregate_type: &str) -> bool {
        aggregate_type == <Order as cqrs_es::Aggregate>::TYPE
    }

    fn tables(&self) -> &'static [&'static str] {
        &["orders"]
    }

    fn mirrors_rows(&self) -> bool {
        false
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        let order_id = event.aggregate_uuid()?;
        let payload: OrderEvent = event.payload_as()?;
        let at = event.recorded_at;
        match payload {
            OrderEvent::OrderPlaced {
                user_id,
                lines,
                currency,
                total_cents,
                placed_at,
                expires_at,
                ..
            } => {
                sqlx::query(
                    "INSERT INTO orders (id, user_id, status, total_cents, currency, expires_at, \
                                         created_at, updated_at, version, lines) \
                     VALUES ($1, $2, 'created', $3, $4, $5, $6, $6, $7, $8::jsonb) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(order_id)
                .bind(user_id)
                .bind(total_cents)
                .bind(currency.as_str())
                .bind(expires_at)
                .bind(placed_at)
                .bind(event.sequence)
                .bind(lines_json(&lines)?)
                .execute(&mut *tx)
                .await?;
            }
            OrderEvent::PaymentStarted {
                payment_intent_id, ..
            } => {
                update(
                    tx,
                    order_id,
                    event.sequence,
                    at,
                    Some("payment_pending"),
                    None,
                    Some(&payment_intent_id),
                )
                .await?;
            }
            OrderEvent::OrderPaid {
                payment_intent_id, ..
            } => {
                // A late payment that was honoured also clears the reason.
                sqlx::query(
                    "UPDATE orders SET status = 'paid', cancel_reason = NULL, payment_intent_id = $4, \
                                       updated_at = $3, version = $2 \
                     WHERE id = $1 AND version < $2",
                )
                .bind(order_id)
                .bind(event.sequence)
                .bind(at)
                .bind(&payment_intent_id)
                .execute(&mut *tx)
                .await?;
            }
            OrderEvent::OrderCancelled { reason, .. } => {
                let reason = wire_name(&reason)?;
                update(
                    tx,
                    order_id,
                    event.sequence,
                    at,
                    Some("cancelled"),
                    Some(&reason),
                    None,
                )
                .await?;
            }
            // Nothing a reader sees: the order keeps its status until the
            // refund is made.
            OrderEvent::RefundDecided { .. } => {}
            OrderEvent::OrderRefunded {
                payment_intent_id, ..
            } => {
                update(
                    tx,
                    order_id,
                    event.sequence,
                    at,
                    Some("refunded"),
                    None,
                    Some(&payment_intent_id),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Folds the batch per order exactly as `apply` would: a placement
    /// counts only where no row exists, a change only when newer than the
    /// row. Rows of orders changed (not only placed) in the batch are read
    /// first; placements alone need no read, their insert skips existing
    /// orders as `apply`'s does.
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let decoded = order_batch::decode(events)?;
        let changed_ids = order_batch::changed_after_placement(&decoded);
        let mut orders: HashMap<Uuid, OrderRow> = HashMap::new();
        if !changed_ids.is_empty() {
            let existing: Vec<OrderRow> = sqlx::query_as(
                "SELECT id, status, cancel_reason, payment_intent_id, updated_at, version \
                 FROM orders WHERE id = ANY($1)",
            )
            .bind(&changed_ids)
            .fetch_all(&mut *tx)
            .await?;
            orders.extend(existing.into_iter().map(|row| (row.id, row)));
        }
        let mut placed: Vec<Placement> = Vec::new();
        let mut updated: Vec<Uuid> = Vec::new();
        for (order_id, event, payload) in decoded {
            let (status, cancel_reason, payment_intent_id) = match payload {
                OrderEvent::OrderPlaced {
                    user_id,
                    lines,
                    currency,
                    total_cents,
                    placed_at,
                    expires_at,
                    ..
                } => {
                    if let Entry::Vacant(slot) = orders.entry(order_id) {
                        slot.insert(OrderRow {
                            id: order_id,
                            status: "created".to_owned(),
                            cancel_reason: None,
                            payment_intent_id: None,
                            updated_at: placed_at,
                            version: event.sequence,
                        });
                        placed.push(Placement {
                            order_id,
                            user_id,
                            total_cents,
                            currency: currency.as_str().to_owned(),
                            expires_at,
                            placed_at,
                            lines,
                        });
                    }
                    continue;
                }
                OrderEvent::PaymentStarted {
                    payment_intent_id, ..
                } => ("payment_pending", Keep, Set(payment_intent_id)),
                OrderEvent::OrderPaid {
                    payment_intent_id, ..
                } => ("paid", Clear, Set(payment_intent_id)),
                OrderEvent::OrderCancelled { reason, .. } => {
                    ("cancelled", Set(wire_name(&reason)?), Keep)
                }
                OrderEvent::OrderRefunded {
                    payment_intent_id, ..
                } => ("refunded", Keep, Set(payment_intent_id)),
                OrderEvent::RefundDecided { .. } => continue,
            };
            let Some(row) = orders
                .get_mut(&order_id)
                .filter(|row| row.version < event.sequence)
            else {
                continue;
            };
            row.status = status.to_owned();
            cancel_reason.apply_to(&mut row.cancel_reason);
            payment_intent_id.apply_to(&mut row.payment_intent_id);
            row.updated_at = event.recorded_at;
            row.version = event.sequence;
            updated.push(order_id);
        }
        insert_placed(tx, &placed, &orders).await?;
        let placed_ids: HashSet<Uuid> = placed.iter().map(|p| p.order_id).collect();
        let mut seen = HashSet::new();
        let changed: Vec<&OrderRow> = updated
            .iter()
            .filter(|id| !placed_ids.contains(*id) && seen.insert(**id))
            .filter_map(|id| orders.get(id))
            .collect();
        update_changed(tx, &changed).await
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE orders").execute(tx).await?;
        Ok(())
    }
}

async fn update(
    tx: &mut PgConnection,
    order_id: Uuid,
    sequence: i64,
    at: chrono::DateTime<chrono::Utc>,
    status: Option<&str>,
    cancel_reason: Option<&str>,
    payment_intent_id: Option<&str>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE orders SET status = coalesce($4, status), cancel_reason = coalesce($5, cancel_reason), \
                           payment_intent_id = coalesce($6, payment_intent_id), \
                           updated_at = $3, version = $2 \
         WHERE id = $1 AND version < $2",
    )
    .bind(order_id)
    .bind(sequence)
    .bind(at)
    .bind(status)
    .bind(cancel_reason)
    .bind(payment_intent_id)
    .execute(tx)
    .await?;
    Ok(())
}

/// The columns of `orders` that events after the placement change.
#[derive(Debug, sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    status: String,
    cancel_reason: Option<String>,
    payment_intent_id: Option<String>,
    updated_at: DateTime<Utc>,
    version: i64,
}

/// An order placed in the batch, as its placement wrote it.
struct Placement {
    order_id: Uuid,
    user_id: Uuid,
    total_cents: i64,
    currency: String,
    expires_at: DateTime<Utc>,
    placed_at: DateTime<Utc>,
    lines: Vec<OrderLine>,
}

/// What an event does to a nullable column.
enum ColumnChange {
    Keep,
    Clear,
    Set(String),
}

use ColumnChange::{Clear, Keep, Set};

impl ColumnChange {
    fn apply_to(self, column: &mut Option<String>) {
        match self {
            Keep => {}
            Clear => *column = None,
            Set(value) => *column = Some(value),
        }
    }
}

/// Inserts the orders placed in the batch, as the batch left them, with
/// their lines, in one statement.
async fn insert_placed(
    tx: &mut PgConnection,
    placed: &[Placement],
    orders: &HashMap<Uuid, OrderRow>,
) -> Result<(), ProjectionError> {
    if placed.is_empty() {
        return Ok(());
    }
    let mut rows = PlacedColumns::default();
    for placement in placed {
        let Some(order) = orders.get(&placement.order_id) else {
            continue;
        };
        rows.ids.push(placement.order_id);
        rows.user_ids.push(placement.user_id);
        rows.statuses.push(order.status.clone());
        rows.cancel_reasons.push(order.cancel_reason.clone());
        rows.totals.push(placement.total_cents);
        rows.currencies.push(placement.currency.clone());
        rows.payment_intent_ids
            .push(order.payment_intent_id.clone());
        rows.expires_at.push(placement.expires_at);
        rows.created_at.push(placement.placed_at);
        rows.updated_at.push(order.updated_at);
        rows.versions.push(order.version);
        rows.lines.push(lines_json(&placement.lines)?);
    }
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, cancel_reason, total_cents, currency, \
                             payment_intent_id, expires_at, created_at, updated_at, version, lines) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], \
                              $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[], \
                              $10::timestamptz[], $11::bigint[], $12::text[]::jsonb[]) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&rows.ids)
    .bind(&rows.user_ids)
    .bind(&rows.statuses)
    .bind(&rows.cancel_reasons)
    .bind(&rows.totals)
    .bind(&rows.currencies)
    .bind(&rows.payment_intent_ids)
    .bind(&rows.expires_at)
    .bind(&rows.created_at)
    .bind(&rows.updated_at)
    .bind(&rows.versions)
    .bind(&rows.lines)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// An order's lines as its row keeps them: one per variant (the first, as
/// a replayed or duplicated line must not count twice), sorted by variant.
fn lines_json(lines: &[OrderLine]) -> Result<String, ProjectionError> {
    let mut variants = HashSet::new();
    let mut kept: Vec<&OrderLine> = lines
        .iter()
        .filter(|line| variants.insert(line.variant_id))
        .collect();
    kept.sort_by_key(|line| line.variant_id);
    serde_json::to_string(&kept)
        .map_err(|error| ProjectionError::Other(format!("order lines did not serialise: {error}")))
}

/// Writes the orders that existed before the batch and that it changed.
async fn update_changed(
    tx: &mut PgConnection,
    changed: &[&OrderRow],
) -> Result<(), ProjectionError> {
    if changed.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE orders o SET status = v.status, cancel_reason = v.cancel_reason, \
             payment_intent_id = v.payment_intent_id, updated_at = v.updated_at, version = v.version \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::bigint[]) \
              AS v(id, status, cancel_reason, payment_intent_id, updated_at, version) \
         WHERE o.id = v.id AND o.version < v.version",
    )
    .bind(changed.iter().map(|row| row.id).collect::<Vec<_>>())
    .bind(changed.iter().map(|row| row.status.as_str()).collect::<Vec<_>>())
    .bind(changed.iter().map(|row| row.cancel_reason.as_deref()).collect::<Vec<_>>())
    .bind(changed.iter().map(|row| row.payment_intent_id.as_deref()).collect::<Vec<_>>())
    .bind(changed.iter().map(|row| row.updated_at).collect::<Vec<_>>())
    .bind(changed.iter().map(|row| row.version).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[derive(Default)]
struct PlacedColumns {
    ids: Vec<Uuid>,
    user_ids: Vec<Uuid>,
    statuses: Vec<String>,
    cancel_reasons: Vec<Option<String>>,
    totals: Vec<i64>,
    currencies: Vec<String>,
    payment_intent_ids: Vec<Option<String>>,
    expires_at: Vec<DateTime<Utc>>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    versions: Vec<i64>,
    /// JSON text (see `lines_json`).
    lines: Vec<String>,
}
