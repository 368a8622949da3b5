//! The stock read model: `on_hand` and `reserved` of every variant, folded
//! from `InventoryItem` events into `stock_levels`, and mirrored into the
//! versioned Redis cache after each batch commits.
//!
//! The events carry `on_hand` and `reserved` as they are after the event, so
//! the projection only writes them, guarded by the item's sequence.

use std::collections::HashSet;

use cqrs_es::Aggregate;
use domain::inventory::{InventoryEvent, InventoryItem};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::cache::{keys, VersionedCache};
use crate::runner::{Projection, ProjectionError};
use crate::stored_event::StoredEvent;

pub const NAME: &str = "stock";

/// A variant's stock as the read model (and its cache entry) holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct StockEntry {
    pub sku: String,
    pub on_hand: i64,
    pub reserved: i64,
}

impl StockEntry {
    /// Units that new orders may take; never negative.
    pub fn available(&self) -> i64 {
        (self.on_hand - self.reserved).max(0)
    }
}

pub struct StockProjection {
    pool: PgPool,
    cache: VersionedCache,
}

impl StockProjection {
    /// `pool` is read after each commit to refresh the cache entries of the
    /// variants the batch touched.
    pub fn new(pool: PgPool, cache: VersionedCache) -> Self {
        Self { pool, cache }
    }
}

/// The stock levels of `variant_ids` with their versions.
pub async fn stock_entries(
    pool: &PgPool,
    variant_ids: &[Uuid],
) -> Result<Vec<(Uuid, i64, StockEntry)>, sqlx::Error> {
    let rows: Vec<(Uuid, i64, String, i64, i64)> = sqlx::query_as(
        "SELECT variant_id, version, sku, on_hand, reserved FROM stock_levels \
         WHERE variant_id = ANY($1)",
    )
    .bind(variant_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, version, sku, on_hand, reserved)| {
            (
                id,
                version,
                StockEntry {
                    sku,
                    on_hand,
                    reserved,
                },
            )
        })
        .collect())
}

#[async_trait::async_trait]
impl Projection for StockProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, aggregate_type: &str) -> bool {
        aggregate_type == InventoryItem::TYPE
    }

    fn tables(&self) -> &'static [&'static str] {
        &["stock_levels"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        let variant_id: Uuid = event.aggregate_id.parse().map_err(|_| {
            ProjectionError::Other(format!(
                "inventory item id {:?} is not a UUID",
                event.aggregate_id
            ))
        })?;
        let payload: InventoryEvent = event
            .decode()
            .map_err(|e| ProjectionError::decode(event, e))?;
        let (on_hand, reserved) = match payload {
            InventoryEvent::ItemRegistered { sku, on_hand, .. } => {
                sqlx::query(
                    "INSERT INTO stock_levels (variant_id, sku, on_hand, reserved, version, updated_at) \
                     VALUES ($1, $2, $3, 0, $4, $5) \
                     ON CONFLICT (variant_id) DO UPDATE SET sku = EXCLUDED.sku, \
                         on_hand = EXCLUDED.on_hand, reserved = 0, version = EXCLUDED.version, \
                         updated_at = EXCLUDED.updated_at \
                     WHERE stock_levels.version < EXCLUDED.version",
                )
                .bind(variant_id)
                .bind(sku.as_str())
                .bind(i64::from(on_hand))
                .bind(event.sequence)
                .bind(event.recorded_at)
                .execute(tx)
                .await?;
                return Ok(());
            }
            InventoryEvent::StockAdded {
                on_hand, reserved, ..
            }
            | InventoryEvent::OnHandSet {
                on_hand, reserved, ..
            }
            | InventoryEvent::StockReserved {
                on_hand, reserved, ..
            }
            | InventoryEvent::ReservationReleased {
                on_hand, reserved, ..
            }
            | InventoryEvent::ReservationCommitted {
                on_hand, reserved, ..
            } => (on_hand, reserved),
        };
        sqlx::query(
            "UPDATE stock_levels SET on_hand = $3, reserved = $4, version = $2, updated_at = $5 \
             WHERE variant_id = $1 AND version < $2",
        )
        .bind(variant_id)
        .bind(event.sequence)
        .bind(i64::from(on_hand))
        .bind(i64::from(reserved))
        .bind(event.recorded_at)
        .execute(tx)
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE stock_levels").execute(tx).await?;
        Ok(())
    }

    async fn after_commit(&self, events: &[StoredEvent]) {
        let mut seen = HashSet::new();
        let touched: Vec<Uuid> = events
            .iter()
            .filter_map(|event| event.aggregate_id.parse().ok())
            .filter(|id| seen.insert(*id))
            .collect();
        match stock_entries(&self.pool, &touched).await {
            Ok(rows) => {
                for (variant_id, version, entry) in rows {
                    self.cache
                        .refresh(&keys::stock(variant_id), version, &entry)
                        .await;
                }
            }
            Err(error) => {
                // Without the rows, make sure no older value is served.
                tracing::debug!(%error, "stock cache refresh could not read stock_levels");
                for event in events {
                    if let Ok(id) = event.aggregate_id.parse::<Uuid>() {
                        self.cache
                            .invalidate(&keys::stock(id), event.sequence)
                            .await;
                    }
                }
            }
        }
    }
}
