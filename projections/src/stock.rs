//! The stock read model: `on_hand` and `reserved` of every variant, folded
//! from `InventoryItem` events into `stock_levels`, and mirrored into the
//! versioned Redis cache after each batch commits.
//!
//! The events carry `on_hand` and `reserved` as they are after the event, so
//! the projection only writes them, guarded by the item's sequence. In a
//! flash sale one item gets hundreds of events per step; a batch folds them
//! in memory and writes each item's row once.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

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
        let (variant_id, change) = StockChange::of(event)?;
        let (on_hand, reserved) = match change {
            StockChange::Registered { sku, on_hand } => {
                sqlx::query(
                    "INSERT INTO stock_levels (variant_id, sku, on_hand, reserved, version, updated_at) \
                     VALUES ($1, $2, $3, 0, $4, $5) \
                     ON CONFLICT (variant_id) DO UPDATE SET sku = EXCLUDED.sku, \
                         on_hand = EXCLUDED.on_hand, reserved = 0, version = EXCLUDED.version, \
                         updated_at = EXCLUDED.updated_at \
                     WHERE stock_levels.version < EXCLUDED.version",
                )
                .bind(variant_id)
                .bind(sku)
                .bind(on_hand)
                .bind(event.sequence)
                .bind(event.recorded_at)
                .execute(tx)
                .await?;
                return Ok(());
            }
            StockChange::Levels { on_hand, reserved } => (on_hand, reserved),
        };
        sqlx::query(
            "UPDATE stock_levels SET on_hand = $3, reserved = $4, version = $2, updated_at = $5 \
             WHERE variant_id = $1 AND version < $2",
        )
        .bind(variant_id)
        .bind(event.sequence)
        .bind(on_hand)
        .bind(reserved)
        .bind(event.recorded_at)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Reads the rows of the items the batch touches, folds the events
    /// into them in memory exactly as `apply` would (same guards), and
    /// writes each changed row once.
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let changes = events
            .iter()
            .map(|event| StockChange::of(event).map(|(id, change)| (id, event, change)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        let variant_ids: Vec<Uuid> = changes
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| seen.insert(*id))
            .collect();
        // Locked, as `sync-reserved-stock` locks a row before repairing it.
        let mut rows: HashMap<Uuid, StockRow> = sqlx::query_as::<_, StockRow>(
            "SELECT variant_id, sku, on_hand, reserved, version, updated_at FROM stock_levels \
             WHERE variant_id = ANY($1) ORDER BY variant_id FOR UPDATE",
        )
        .bind(&variant_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| (row.variant_id, row))
        .collect();
        let mut changed = HashSet::new();
        for (variant_id, event, change) in changes {
            let row = rows.get_mut(&variant_id);
            let fresh = row.as_ref().is_none_or(|row| row.version < event.sequence);
            match (change, row) {
                (StockChange::Registered { sku, on_hand }, None) => {
                    rows.insert(
                        variant_id,
                        StockRow {
                            variant_id,
                            sku,
                            on_hand,
                            reserved: 0,
                            version: event.sequence,
                            updated_at: event.recorded_at,
                        },
                    );
                }
                (StockChange::Registered { sku, on_hand }, Some(row)) if fresh => {
                    row.sku = sku;
                    row.set(on_hand, 0, event);
                }
                (StockChange::Levels { on_hand, reserved }, Some(row)) if fresh => {
                    row.set(on_hand, reserved, event);
                }
                // Already applied, or an item never registered: `apply`'s
                // guarded statements change nothing either.
                _ => continue,
            }
            changed.insert(variant_id);
        }
        let written: Vec<&StockRow> = variant_ids
            .iter()
            .filter(|id| changed.contains(*id))
            .filter_map(|id| rows.get(id))
            .collect();
        if written.is_empty() {
            return Ok(());
        }
        let column = |field: fn(&StockRow) -> i64| {
            written.iter().map(|row| field(row)).collect::<Vec<i64>>()
        };
        sqlx::query(
            "INSERT INTO stock_levels (variant_id, sku, on_hand, reserved, version, updated_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
                                  $6::timestamptz[]) \
             ON CONFLICT (variant_id) DO UPDATE SET sku = EXCLUDED.sku, on_hand = EXCLUDED.on_hand, \
                 reserved = EXCLUDED.reserved, version = EXCLUDED.version, \
                 updated_at = EXCLUDED.updated_at \
             WHERE stock_levels.version < EXCLUDED.version",
        )
        .bind(written.iter().map(|row| row.variant_id).collect::<Vec<_>>())
        .bind(written.iter().map(|row| row.sku.as_str()).collect::<Vec<_>>())
        .bind(column(|row| row.on_hand))
        .bind(column(|row| row.reserved))
        .bind(column(|row| row.version))
        .bind(written.iter().map(|row| row.updated_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE stock_levels").execute(tx).await?;
        Ok(())
    }

    async fn after_commit(&self, events: &[StoredEvent]) {
        self.mirror(events, CacheWrite::Refresh).await;
    }

    async fn after_rebuild(&self, latest: &[StoredEvent]) {
        self.mirror(latest, CacheWrite::Replace).await;
    }
}

/// How the cache takes a row the projection just wrote.
#[derive(Debug, Clone, Copy)]
enum CacheWrite {
    /// Over older versions only.
    Refresh,
    /// Over the same version too (after a rebuild, which keeps versions).
    Replace,
}

impl StockProjection {
    /// Copies the rows of the items `events` touched into the cache.
    async fn mirror(&self, events: &[StoredEvent], write: CacheWrite) {
        let mut seen = HashSet::new();
        let touched: Vec<Uuid> = events
            .iter()
            .filter_map(|event| event.aggregate_id.parse().ok())
            .filter(|id| seen.insert(*id))
            .collect();
        match stock_entries(&self.pool, &touched).await {
            Ok(rows) => {
                for (variant_id, version, entry) in rows {
                    let key = keys::stock(variant_id);
                    match write {
                        CacheWrite::Refresh => self.cache.refresh(&key, version, &entry).await,
                        CacheWrite::Replace => self.cache.replace(&key, version, &entry).await,
                    }
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

/// What an inventory event does to its item's row.
enum StockChange {
    /// The item is tracked from now on, with nothing reserved.
    Registered { sku: String, on_hand: i64 },
    /// The item's levels after the event.
    Levels { on_hand: i64, reserved: i64 },
}

impl StockChange {
    /// The item an event belongs to and what it changes.
    fn of(event: &StoredEvent) -> Result<(Uuid, Self), ProjectionError> {
        let variant_id: Uuid = event.aggregate_uuid()?;
        let payload: InventoryEvent = event.payload_as()?;
        let change = match payload {
            InventoryEvent::ItemRegistered { sku, on_hand, .. } => Self::Registered {
                sku: sku.as_str().to_owned(),
                on_hand: i64::from(on_hand),
            },
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
            }
            | InventoryEvent::CommittedReturned {
                on_hand, reserved, ..
            } => Self::Levels {
                on_hand: i64::from(on_hand),
                reserved: i64::from(reserved),
            },
        };
        Ok((variant_id, change))
    }
}

/// A row of `stock_levels`, as a batch folds events into it.
#[derive(Debug, sqlx::FromRow)]
struct StockRow {
    variant_id: Uuid,
    sku: String,
    on_hand: i64,
    reserved: i64,
    version: i64,
    updated_at: DateTime<Utc>,
}

impl StockRow {
    fn set(&mut self, on_hand: i64, reserved: i64, event: &StoredEvent) {
        self.on_hand = on_hand;
        self.reserved = reserved;
        self.version = event.sequence;
        self.updated_at = event.recorded_at;
    }
}
