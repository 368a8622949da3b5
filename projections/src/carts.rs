//! The carts read model: each user's cart lines (variant and quantity);
//! prices and availability are joined from the catalog when it is read.

use domain::cart::{Cart, CartEvent};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::{Projection, ProjectionError};
use crate::stored_event::StoredEvent;

pub const NAME: &str = "carts";

pub struct CartsProjection;

#[async_trait::async_trait]
impl Projection for CartsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, aggregate_type: &str) -> bool {
        aggregate_type == <Cart as cqrs_es::Aggregate>::TYPE
    }

    fn tables(&self) -> &'static [&'static str] {
        &["carts", "cart_lines"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        let user_id: Uuid = event.aggregate_id.parse().map_err(|_| {
            ProjectionError::Other(format!("cart id {:?} is not a UUID", event.aggregate_id))
        })?;
        // The cart's version guards every change: a replayed event is skipped.
        let fresh: Option<i32> = sqlx::query_scalar(
            "INSERT INTO carts (user_id, version, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at \
             WHERE carts.version < EXCLUDED.version RETURNING 1",
        )
        .bind(user_id)
        .bind(event.sequence)
        .bind(event.recorded_at)
        .fetch_optional(&mut *tx)
        .await?;
        if fresh.is_none() {
            return Ok(());
        }
        match event
            .decode::<CartEvent>()
            .map_err(|e| ProjectionError::decode(event, e))?
        {
            CartEvent::CartItemAdded {
                variant_id,
                quantity,
                ..
            }
            | CartEvent::CartItemQuantitySet {
                variant_id,
                quantity,
            } => {
                sqlx::query(
                    "INSERT INTO cart_lines (user_id, variant_id, quantity) VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id, variant_id) DO UPDATE SET quantity = EXCLUDED.quantity",
                )
                .bind(user_id)
                .bind(variant_id)
                .bind(i64::from(quantity))
                .execute(&mut *tx)
                .await?;
            }
            CartEvent::CartItemRemoved { variant_id } => {
                sqlx::query("DELETE FROM cart_lines WHERE user_id = $1 AND variant_id = $2")
                    .bind(user_id)
                    .bind(variant_id)
                    .execute(&mut *tx)
                    .await?;
            }
            CartEvent::CartCleared {} | CartEvent::CartCheckedOut { .. } => {
                sqlx::query("DELETE FROM cart_lines WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE carts, cart_lines")
            .execute(tx)
            .await?;
        Ok(())
    }
}
