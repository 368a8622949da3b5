//! The orders read model: one row per order with its lines, for the
//! customer's order list and order page.

use domain::order::{Order, OrderEvent};
use sqlx::PgConnection;
use uuid::Uuid;

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
        &["orders", "order_lines"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        let order_id: Uuid = event.aggregate_id.parse().map_err(|_| {
            ProjectionError::Other(format!("order id {:?} is not a UUID", event.aggregate_id))
        })?;
        let payload: OrderEvent = event
            .decode()
            .map_err(|e| ProjectionError::decode(event, e))?;
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
                let inserted = sqlx::query(
                    "INSERT INTO orders (id, user_id, status, total_cents, currency, expires_at, \
                                         created_at, updated_at, version) \
                     VALUES ($1, $2, 'created', $3, $4, $5, $6, $6, $7) ON CONFLICT (id) DO NOTHING",
                )
                .bind(order_id)
                .bind(user_id)
                .bind(total_cents)
                .bind(currency.as_str())
                .bind(expires_at)
                .bind(placed_at)
                .bind(event.sequence)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Ok(());
                }
                for line in lines {
                    sqlx::query(
                        "INSERT INTO order_lines (order_id, variant_id, sku, product_id, product_name, \
                                                  unit_price_cents, quantity, line_total_cents) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                    )
                    .bind(order_id)
                    .bind(line.variant_id)
                    .bind(line.sku.as_str())
                    .bind(line.product_id)
                    .bind(line.product_name.as_str())
                    .bind(line.unit_price_cents)
                    .bind(i64::from(line.quantity))
                    .bind(line.line_total_cents)
                    .execute(&mut *tx)
                    .await?;
                }
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

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE orders, order_lines")
            .execute(tx)
            .await?;
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
