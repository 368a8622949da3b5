//! Our event store behind cqrs-es's `PersistedEventRepository`, so that the
//! library's `CqrsFramework` (and anything else built on its traits) can run
//! on the same tables as our own executor.
//!
//! Only the plain event-store mode is supported: cqrs-es 0.5.0's snapshot and
//! aggregate stores apply new events twice (see DEPENDENCIES.md), so a
//! snapshot update is refused rather than stored wrong.

use cqrs_es::persist::{PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent};
use cqrs_es::Aggregate;
use projections::StoredEvent;

use super::repository::{AppendError, EventStore, NewEvent};

fn to_serialized(event: StoredEvent) -> Result<SerializedEvent, PersistenceError> {
    Ok(SerializedEvent {
        payload: serde_json::from_str(event.payload.get()).map_err(unknown)?,
        metadata: serde_json::from_str(event.metadata.get()).map_err(unknown)?,
        aggregate_id: event.aggregate_id,
        sequence: usize::try_from(event.sequence).unwrap_or(usize::MAX),
        aggregate_type: event.aggregate_type,
        event_type: event.event_type,
        event_version: event.event_version,
    })
}

fn unknown(error: impl std::error::Error + Send + Sync + 'static) -> PersistenceError {
    PersistenceError::UnknownError(Box::new(error))
}

#[derive(Debug, thiserror::Error)]
#[error("snapshots are not supported: cqrs-es 0.5.0 snapshots double-apply events")]
struct SnapshotsUnsupported;

impl EventStore {
    async fn serialized_after<A: Aggregate>(
        &self,
        aggregate_id: &str,
        after: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let after = i64::try_from(after).map_err(unknown)?;
        let events = self
            .load_after(A::TYPE, aggregate_id, after)
            .await
            .map_err(|e| PersistenceError::ConnectionError(Box::new(e)))?;
        events.into_iter().map(to_serialized).collect()
    }

    fn replay(events: Vec<SerializedEvent>) -> ReplayStream {
        let (mut feed, stream) = ReplayStream::new(events.len().max(1));
        tokio::spawn(async move {
            for event in events {
                if feed.push(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        stream
    }
}

impl PersistedEventRepository for EventStore {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.serialized_after::<A>(aggregate_id, 0).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.serialized_after::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        _aggregate_id: &str,
    ) -> Result<Option<cqrs_es::persist::SerializedSnapshot>, PersistenceError> {
        Ok(None)
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, serde_json::Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() {
            return Err(unknown(SnapshotsUnsupported));
        }
        let new_events = events
            .iter()
            .map(|event| {
                Ok(NewEvent {
                    aggregate_type: A::TYPE,
                    aggregate_id: event.aggregate_id.clone(),
                    sequence: i64::try_from(event.sequence).map_err(unknown)?,
                    event_type: event.event_type.clone(),
                    event_version: event.event_version.clone(),
                    payload: serde_json::value::to_raw_value(&event.payload).map_err(unknown)?,
                    metadata: serde_json::value::to_raw_value(&event.metadata)
                        .map_err(unknown)?
                        .into(),
                })
            })
            .collect::<Result<Vec<_>, PersistenceError>>()?;
        match self.append(&new_events).await {
            Ok(_) => Ok(()),
            Err(AppendError::Conflict) => Err(PersistenceError::OptimisticLockError),
            Err(AppendError::Database(error)) => {
                Err(PersistenceError::ConnectionError(Box::new(error)))
            }
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        Ok(Self::replay(
            self.serialized_after::<A>(aggregate_id, 0).await?,
        ))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let events: Vec<StoredEvent> = sqlx::query_as(&format!(
            "SELECT {} FROM events WHERE aggregate_type = $1 ORDER BY txid, position",
            projections::stored_event::STORED_EVENT_COLUMNS
        ))
        .bind(A::TYPE)
        .fetch_all(self.pool())
        .await
        .map_err(|e| PersistenceError::ConnectionError(Box::new(e)))?;
        let events = events
            .into_iter()
            .map(to_serialized)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::replay(events))
    }
}
