//! Appends and reads events in Postgres.
//!
//! An append is one `INSERT .. SELECT FROM UNNEST(..)` statement, so a batch
//! of events for any number of aggregates commits atomically in a single
//! round trip. Optimistic concurrency is the primary key: a writer that
//! decided against an old version tries to store a sequence that exists.

use projections::{GlobalPosition, StoredEvent};
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

/// An event ready to be stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer stored one of these sequences first.
    #[error("optimistic concurrency conflict")]
    Conflict,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    appended: watch::Sender<u64>,
}

const EVENTS_PRIMARY_KEY: &str = "events_pkey";

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            appended: watch::channel(0).0,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Changes after every append by this process; projection runners wait on it.
    pub fn appended_signal(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Tells local projection runners that events may have arrived from elsewhere.
    pub fn signal_appended(&self) {
        self.appended
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Stores the events atomically; returns the global position of the last.
    pub async fn append(&self, events: &[NewEvent]) -> Result<Option<GlobalPosition>, AppendError> {
        let mut connection = self.pool.acquire().await?;
        let appended = insert_events(&mut connection, events).await?;
        if appended.is_some() {
            self.signal_appended();
        }
        Ok(appended)
    }

    /// Stores the events inside the caller's transaction, which decides when
    /// (and whether) they commit. Call [`EventStore::signal_appended`] after
    /// the commit so that local projections look at once.
    pub async fn append_within(
        &self,
        transaction: &mut PgConnection,
        events: &[NewEvent],
    ) -> Result<Option<GlobalPosition>, AppendError> {
        insert_events(transaction, events).await
    }

    /// The events of one aggregate after `after_sequence`, in order.
    pub async fn load_after(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        sqlx::query_as::<_, StoredEvent>(&format!(
            "SELECT {} FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
             ORDER BY sequence",
            projections::stored_event::STORED_EVENT_COLUMNS
        ))
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(after_sequence)
        .fetch_all(&self.pool)
        .await
    }

    /// Where the last event of an aggregate stands in the global order;
    /// `None` when it has none. Wait on it to read everything it stored.
    pub async fn last_position(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<GlobalPosition>, sqlx::Error> {
        let last: Option<(i64, i64)> = sqlx::query_as(
            "SELECT txid, position FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
             ORDER BY sequence DESC LIMIT 1",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(last.map(|(txid, position)| GlobalPosition { txid, position }))
    }

    /// Folds an aggregate's stored events into `state`, returning the new version.
    pub async fn catch_up<A>(
        &self,
        aggregate_id: &str,
        state: &mut A,
        version: i64,
    ) -> Result<i64, LoadError>
    where
        A: cqrs_es::Aggregate,
        A::Event: DeserializeOwned,
    {
        let events = self.load_after(A::TYPE, aggregate_id, version).await?;
        let mut version = version;
        for stored in events {
            let event: A::Event = stored.decode().map_err(|source| LoadError::Decode {
                aggregate_id: aggregate_id.to_owned(),
                sequence: stored.sequence,
                source,
            })?;
            state.apply(event);
            version = stored.sequence;
        }
        Ok(version)
    }
}

/// One `INSERT .. SELECT FROM UNNEST` for the whole batch.
async fn insert_events(
    connection: &mut PgConnection,
    events: &[NewEvent],
) -> Result<Option<GlobalPosition>, AppendError> {
    if events.is_empty() {
        return Ok(None);
    }
    let mut aggregate_types = Vec::with_capacity(events.len());
    let mut aggregate_ids = Vec::with_capacity(events.len());
    let mut sequences = Vec::with_capacity(events.len());
    let mut event_types = Vec::with_capacity(events.len());
    let mut event_versions = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut metadata = Vec::with_capacity(events.len());
    for event in events {
        aggregate_types.push(event.aggregate_type);
        aggregate_ids.push(event.aggregate_id.as_str());
        sequences.push(event.sequence);
        event_types.push(event.event_type.as_str());
        event_versions.push(event.event_version.as_str());
        payloads.push(&event.payload);
        metadata.push(&event.metadata);
    }
    let result: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
        "WITH appended AS ( \
             INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                                 event_version, payload, metadata) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], \
                                  $5::text[], $6::jsonb[], $7::jsonb[]) \
             RETURNING txid, position) \
         SELECT max(txid), max(position) FROM appended",
    )
    .bind(&aggregate_types)
    .bind(&aggregate_ids)
    .bind(&sequences)
    .bind(&event_types)
    .bind(&event_versions)
    .bind(&payloads)
    .bind(&metadata)
    .fetch_one(connection)
    .await;
    match result {
        Ok((txid, position)) => {
            metrics::counter!("events_appended_total").increment(events.len() as u64);
            Ok(Some(GlobalPosition { txid, position }))
        }
        Err(sqlx::Error::Database(db)) if db.constraint() == Some(EVENTS_PRIMARY_KEY) => {
            metrics::counter!("event_append_conflicts_total").increment(1);
            Err(AppendError::Conflict)
        }
        Err(other) => Err(AppendError::Database(other)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("event {sequence} of {aggregate_id} could not be decoded: {source}")]
    Decode {
        aggregate_id: String,
        sequence: i64,
        #[source]
        source: serde_json::Error,
    },
}
