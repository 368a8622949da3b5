//! Appends and reads events in Postgres.
//!
//! An append is one `INSERT .. SELECT FROM UNNEST(..)` statement, so a batch
//! of events for any number of aggregates commits atomically in a single
//! round trip. Optimistic concurrency is the primary key: a writer that
//! decided against an old version tries to store a sequence that exists.

use std::sync::Arc;

use projections::{GlobalPosition, StoredEvent};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
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
    /// The event as JSON text, serialized once, straight from its type.
    pub payload: Box<RawValue>,
    /// Shared by every event one command caused.
    pub metadata: Arc<RawValue>,
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

/// Events laid out as one array per column, so that any number of them is
/// stored by one `INSERT .. SELECT FROM UNNEST` ([`EventColumns::INSERT`]).
pub struct EventColumns<'a> {
    aggregate_types: Vec<&'a str>,
    aggregate_ids: Vec<&'a str>,
    sequences: Vec<i64>,
    event_types: Vec<&'a str>,
    event_versions: Vec<&'a str>,
    payloads: Vec<&'a str>,
    metadata: Vec<&'a str>,
}

impl<'a> EventColumns<'a> {
    /// Inserts the events bound as `$1..$7`, returning each one's
    /// `txid, position`. Usable as a data-modifying `WITH` query.
    pub const INSERT: &'static str =
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                             event_version, payload, metadata) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], \
                              $5::text[], $6::text[]::json[], $7::text[]::json[]) \
         RETURNING txid, position";

    pub fn new(events: &'a [NewEvent]) -> Self {
        Self {
            aggregate_types: events.iter().map(|e| e.aggregate_type).collect(),
            aggregate_ids: events.iter().map(|e| e.aggregate_id.as_str()).collect(),
            sequences: events.iter().map(|e| e.sequence).collect(),
            event_types: events.iter().map(|e| e.event_type.as_str()).collect(),
            event_versions: events.iter().map(|e| e.event_version.as_str()).collect(),
            payloads: events.iter().map(|e| e.payload.get()).collect(),
            metadata: events.iter().map(|e| e.metadata.get()).collect(),
        }
    }

    /// Binds the columns as the query's first seven parameters.
    pub fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.aggregate_types)
            .bind(&self.aggregate_ids)
            .bind(&self.sequences)
            .bind(&self.event_types)
            .bind(&self.event_versions)
            .bind(&self.payloads)
            .bind(&self.metadata)
    }
}

/// What an insert of `count` events came to: the position of the last, or
/// a conflict when another writer stored one of the sequences first.
pub fn appended(
    result: Result<(i64, i64), sqlx::Error>,
    count: usize,
) -> Result<Option<GlobalPosition>, AppendError> {
    match result {
        Ok((txid, position)) => {
            metrics::counter!("events_appended_total").increment(count as u64);
            Ok(Some(GlobalPosition { txid, position }))
        }
        Err(sqlx::Error::Database(db)) if db.constraint() == Some(EVENTS_PRIMARY_KEY) => {
            metrics::counter!("event_append_conflicts_total").increment(1);
            Err(AppendError::Conflict)
        }
        Err(other) => Err(AppendError::Database(other)),
    }
}

async fn insert_events(
    connection: &mut PgConnection,
    events: &[NewEvent],
) -> Result<Option<GlobalPosition>, AppendError> {
    if events.is_empty() {
        return Ok(None);
    }
    let columns = EventColumns::new(events);
    let sql = format!(
        "WITH appended AS ({}) SELECT max(txid), max(position) FROM appended",
        EventColumns::INSERT
    );
    let result = columns
        .bind(sqlx::query_as(&sql))
        .fetch_one(connection)
        .await;
    appended(result, events.len())
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
