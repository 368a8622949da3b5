//! An event as the store holds it, and its place in the global order.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::runner::ProjectionError;

/// A point in the store's global order: events are totally ordered by
/// `(txid, position)`. Ordering by `position` alone is not gap-safe (a
/// transaction may take a position and commit after a larger one), while
/// every transaction below the oldest running `txid` is final.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct GlobalPosition {
    pub txid: i64,
    pub position: i64,
}

impl GlobalPosition {
    pub const START: Self = Self {
        txid: 0,
        position: 0,
    };
}

/// One row of the `events` table.
///
/// Payload and metadata stay JSON text until something reads them, and are
/// then decoded straight into the type that does: a flash sale's events
/// used to be built into `serde_json::Value` trees first, maps and all.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    pub position: i64,
    pub txid: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    #[sqlx(json)]
    pub payload: Box<RawValue>,
    /// `actor` (user id or `system`), `correlation_id`, `idempotency_key`.
    #[sqlx(json)]
    pub metadata: Box<RawValue>,
    pub recorded_at: DateTime<Utc>,
}

impl StoredEvent {
    pub fn global_position(&self) -> GlobalPosition {
        GlobalPosition {
            txid: self.txid,
            position: self.position,
        }
    }

    /// The payload as the aggregate's event type.
    pub fn decode<E: DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        serde_json::from_str(self.payload.get())
    }

    /// The payload as a projection reads it: an event it cannot decode
    /// fails the step, naming the event.
    pub fn payload_as<E: DeserializeOwned>(&self) -> Result<E, ProjectionError> {
        self.decode().map_err(|e| ProjectionError::decode(self, e))
    }

    /// The aggregate's id as a UUID, which every aggregate here uses.
    pub fn aggregate_uuid(&self) -> Result<Uuid, ProjectionError> {
        self.aggregate_id.parse().map_err(|_| {
            ProjectionError::Other(format!(
                "{} id {:?} is not a UUID",
                self.aggregate_type, self.aggregate_id
            ))
        })
    }

    /// A metadata field as text (`actor`, `correlation_id`, `idempotency_key`).
    pub fn metadata_str(&self, key: &str) -> Option<String> {
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(self.metadata.get()).ok()?;
        fields.get(key)?.as_str().map(str::to_owned)
    }
}

/// The columns of `StoredEvent`, for queries that select whole events.
pub const STORED_EVENT_COLUMNS: &str = "position, txid, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, payload, metadata, recorded_at";
