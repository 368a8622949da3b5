//! Tails the event store for one projection, exactly once per event.
//!
//! Each step runs in one transaction: take the projection's advisory lock
//! (so that any number of server instances can run the same runner and only
//! one applies a batch), read the events after the checkpoint that lie below
//! the visibility horizon, apply them, move the checkpoint, commit. The
//! horizon is the oldest transaction still running: everything below it is
//! final, so a transaction that commits late with a smaller position is read
//! when it commits, never skipped. Transaction ids belong to the whole
//! Postgres cluster, so any transaction that has written, in any database,
//! holds every projection back while it runs: keep writing transactions
//! short, here and everywhere else.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::sync::{watch, Notify};

use crate::feed::EventFeed;
use crate::stored_event::{GlobalPosition, StoredEvent};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("event {position} ({event_type}) could not be decoded: {source}")]
    Decode {
        position: i64,
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl ProjectionError {
    pub fn decode(event: &StoredEvent, source: serde_json::Error) -> Self {
        Self::Decode {
            position: event.position,
            event_type: event.event_type.clone(),
            source,
        }
    }
}

/// A read model built from events.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name: the checkpoint's key and the advisory lock's seed.
    fn name(&self) -> &'static str;

    /// Whether events of this aggregate type concern this projection. Others
    /// are passed over but still move the checkpoint.
    fn handles(&self, aggregate_type: &str) -> bool;

    /// The read-model tables this projection writes, and no others, by
    /// unqualified name. A rebuild copies exactly these into a scratch
    /// schema, replays the store into the copies, and swaps them in; so
    /// `apply` and `reset` must name tables unqualified (the rebuild points
    /// `search_path` at the copies) and must not write tables left out here.
    fn tables(&self) -> &'static [&'static str];

    /// Folds one event into the read model, inside the step's transaction.
    /// Must be harmless to call again for an event it has already seen
    /// (replays after a rebuild are not deduplicated by the runner).
    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError>;

    /// Folds a batch of events this projection handles, in the store's
    /// order, inside one transaction. Must leave exactly the rows that
    /// `apply` on each event in turn leaves; projections that see many
    /// events per step override it to write each row once per batch instead
    /// of once per event.
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            self.apply(tx, event).await?;
        }
        Ok(())
    }

    /// Empties the read model, inside a transaction, before a rebuild.
    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError>;

    /// Runs after a batch committed, for side effects outside Postgres such
    /// as dropping cache entries. Failures are logged, never retried: caches
    /// carry versions and expire, so a missed invalidation heals itself.
    async fn after_commit(&self, _events: &[StoredEvent]) {}

    /// Runs after a rebuild swapped the read model in, with the latest event
    /// of every aggregate it holds. A rebuild reproduces the versions cache
    /// entries carry, so a cached copy of a row the rebuild repaired is as
    /// new as the repaired row: entries of the same version must be replaced
    /// or dropped, not only older ones. The default hands the events to
    /// `after_commit`, which is right when that drops entries (a tombstone
    /// replaces an entry of its own version).
    async fn after_rebuild(&self, latest: &[StoredEvent]) {
        self.after_commit(latest).await;
    }

    /// Whether `after_commit` and `after_rebuild` mirror rows anywhere
    /// outside Postgres. A rebuild hands every aggregate to those that do,
    /// a walk over the whole store that it spares the others.
    fn mirrors_rows(&self) -> bool {
        true
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// Applied this many events (the checkpoint moved past them).
    Applied(usize),
    /// Nothing new below the horizon.
    Idle,
    /// Another runner (another instance) holds the projection right now.
    Busy,
}

/// How long a caught-up runner lets new events gather before its next
/// step, unless someone waits for them. Every step is a transaction of six
/// or more statements whatever it applies; during a flash sale, stepping on
/// every commit made projections the larger part of the database's work.
const PACE: Duration = Duration::from_millis(50);

/// How often a runner of an instance that does not lead the projections
/// steps on its own. The leader applies everything; this only bounds how
/// long a stalled leader (alive, holding its lock, not stepping) can hold
/// the read models back.
const FOLLOWER_PACE: Duration = Duration::from_secs(1);

pub struct ProjectionRunner {
    pool: PgPool,
    projection: Arc<dyn Projection>,
    batch_size: i64,
    checkpoint: watch::Sender<GlobalPosition>,
    unhandled: UnhandledTypes,
    /// Rung by a reader waiting for a write (read-your-writes): the next
    /// step comes now rather than after the pace.
    hurry: Notify,
    /// Shared with the instance's other runners, when it has any.
    feed: Option<Arc<EventFeed>>,
}

impl ProjectionRunner {
    pub fn new(pool: PgPool, projection: Arc<dyn Projection>) -> Self {
        Self {
            pool,
            projection,
            batch_size: 500,
            checkpoint: watch::channel(GlobalPosition::START).0,
            unhandled: UnhandledTypes::default(),
            hurry: Notify::new(),
            feed: None,
        }
    }

    /// Takes events from `feed`, shared with other runners, where it can.
    pub(crate) fn with_feed(mut self, feed: Arc<EventFeed>) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Asks the running loop to step now, for a reader waiting on it.
    pub fn hurry(&self) {
        self.hurry.notify_one();
    }

    pub fn with_batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Follows the checkpoint this runner has committed.
    pub fn subscribe(&self) -> watch::Receiver<GlobalPosition> {
        self.checkpoint.subscribe()
    }

    /// Makes sure the checkpoint row exists. Done once, outside the steps,
    /// because an insert would give the step's transaction an id and hold
    /// back the horizon it reads below.
    pub async fn register(&self) -> Result<GlobalPosition, ProjectionError> {
        sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(self.name())
            .execute(&self.pool)
            .await?;
        let position = read_checkpoint(&self.pool, self.name()).await?;
        self.checkpoint.send_replace(position);
        Ok(position)
    }

    /// Applies at most one batch.
    pub async fn try_step(&self) -> Result<StepOutcome, ProjectionError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(lock_key(self.name()))
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(StepOutcome::Busy);
        }
        let after: GlobalPosition = sqlx::query_as::<_, (i64, i64)>(
            "SELECT last_txid, last_position FROM projection_checkpoints WHERE name = $1",
        )
        .bind(self.name())
        .fetch_optional(&mut *tx)
        .await?
        .map(|(txid, position)| GlobalPosition { txid, position })
        .ok_or_else(|| ProjectionError::Other(format!("{} is not registered", self.name())))?;

        let events = self.events_after(&mut tx, after).await?;
        let Some(last) = events.last().map(|event| event.global_position()) else {
            self.checkpoint
                .send_if_modified(|current| replace_if_newer(current, after));
            return Ok(StepOutcome::Idle);
        };
        let read = events.len();
        let relevant: Vec<StoredEvent> = events
            .into_iter()
            .filter(|e| self.projection.handles(&e.aggregate_type))
            .map(|e| Arc::try_unwrap(e).unwrap_or_else(|shared| StoredEvent::clone(&shared)))
            .collect();
        if !relevant.is_empty() {
            self.projection.apply_batch(&mut tx, &relevant).await?;
        }
        sqlx::query(
            "UPDATE projection_checkpoints SET last_txid = $2, last_position = $3, updated_at = now() \
             WHERE name = $1",
        )
        .bind(self.name())
        .bind(last.txid)
        .bind(last.position)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        // Side effects first, then the local checkpoint: whoever waits on
        // this runner for a write (read-your-writes) then also finds the
        // caches already refreshed or dropped.
        if !relevant.is_empty() {
            self.projection.after_commit(&relevant).await;
        }
        self.checkpoint
            .send_if_modified(|current| replace_if_newer(current, last));
        metrics::counter!("projection_events_applied_total", "projection" => self.name())
            .increment(read as u64);
        Ok(StepOutcome::Applied(read))
    }

    /// The next batch after `after`: from the shared feed when it has them,
    /// else from the store, leaving out the payloads of events this
    /// projection has said it does not handle.
    async fn events_after(
        &self,
        tx: &mut PgConnection,
        after: GlobalPosition,
    ) -> Result<Vec<Arc<StoredEvent>>, ProjectionError> {
        let limit = usize::try_from(self.batch_size).unwrap_or(usize::MAX);
        if let Some(feed) = &self.feed {
            if let Some(events) = feed.events_after(after, limit).await? {
                return Ok(events);
            }
        }
        let events = read_events(tx, after, None, self.batch_size, &self.unhandled.known()).await?;
        self.unhandled.learn(self.projection.as_ref(), &events);
        Ok(events.into_iter().map(Arc::new).collect())
    }

    /// Steps until the projection has applied every event committed before
    /// the call (this runner or another), and returns how many events this
    /// runner stepped past; for tests, seeding and rebuilds. Nothing left
    /// below the horizon is not enough: the horizon is the oldest
    /// transaction running anywhere in the cluster, so an unrelated long
    /// transaction can hold committed events above it for a while.
    pub async fn catch_up(&self) -> Result<usize, ProjectionError> {
        let newest: Option<(i64, i64)> = sqlx::query_as(
            "SELECT txid, position FROM events ORDER BY txid DESC, position DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        let target = newest.map_or(GlobalPosition::START, |(txid, position)| GlobalPosition {
            txid,
            position,
        });
        let mut applied = 0;
        loop {
            match self.try_step().await? {
                StepOutcome::Applied(n) => applied += n,
                StepOutcome::Idle if *self.checkpoint.borrow() >= target => return Ok(applied),
                StepOutcome::Idle | StepOutcome::Busy => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// Runs until `shutdown` turns true. `wake` changes whenever events were
    /// appended (by this instance, or by another one through NOTIFY).
    /// `leading` tells whether this instance leads the projections: one
    /// that does not steps only for a reader waiting here on a write, and
    /// now and then in case the leader has stalled.
    pub async fn run(
        self: Arc<Self>,
        mut wake: watch::Receiver<u64>,
        mut leading: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        if let Err(error) = self.register().await {
            tracing::error!(projection = self.name(), %error, "projection could not register");
        }
        let mut failures: u32 = 0;
        let mut idle_rounds: u32 = 0;
        while !*shutdown.borrow() {
            if !*leading.borrow_and_update() {
                tokio::select! {
                    _ = self.hurry.notified() => {}
                    _ = tokio::time::sleep(FOLLOWER_PACE) => {}
                    changed = leading.changed() => {
                        if changed.is_err() { return; }
                        continue;
                    }
                    changed = shutdown.changed() => {
                        if changed.is_err() { return; }
                        continue;
                    }
                }
            }
            let outcome = self.try_step().await;
            let pause = match &outcome {
                // A full batch: more are waiting.
                Ok(StepOutcome::Applied(read)) if *read as i64 >= self.batch_size => {
                    failures = 0;
                    idle_rounds = 0;
                    continue;
                }
                Ok(StepOutcome::Applied(_)) => {
                    failures = 0;
                    idle_rounds = 0;
                    tokio::select! {
                        _ = self.hurry.notified() => {}
                        _ = tokio::time::sleep(PACE) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
                // Right after a wake-up the new events may still sit behind an
                // older running transaction: look again soon, then slow down.
                Ok(StepOutcome::Idle) => {
                    idle_rounds = idle_rounds.saturating_add(1);
                    if idle_rounds <= 5 {
                        Duration::from_millis(2u64 << idle_rounds)
                    } else {
                        Duration::from_millis(500)
                    }
                }
                Ok(StepOutcome::Busy) => Duration::from_millis(100),
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::error!(projection = self.name(), %error, failures, "projection step failed");
                    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)))
                }
            };
            // After `Busy` another instance is applying, and it applies what
            // is appended meanwhile too: appends do not cut this pause
            // short. With several instances, every runner trying again on
            // every append cost a transaction each time, for nothing.
            let wake_on_appends = !matches!(outcome, Ok(StepOutcome::Busy));
            tokio::select! {
                changed = wake.changed(), if wake_on_appends => {
                    if changed.is_err() { return; }
                    idle_rounds = 0;
                }
                _ = self.hurry.notified() => idle_rounds = 0,
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Empties the read model and its checkpoint in one transaction, under
    /// the projection's lock; the runner then replays the whole store.
    pub async fn reset(&self) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key(self.name()))
            .execute(&mut *tx)
            .await?;
        self.projection.reset(&mut tx).await?;
        sqlx::query(
            "UPDATE projection_checkpoints SET last_txid = 0, last_position = 0, updated_at = now() \
             WHERE name = $1",
        )
        .bind(self.name())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.checkpoint.send_replace(GlobalPosition::START);
        Ok(())
    }
}

fn replace_if_newer(current: &mut GlobalPosition, candidate: GlobalPosition) -> bool {
    if candidate > *current {
        *current = candidate;
        true
    } else {
        false
    }
}

/// The checkpoint as committed, whichever instance moved it.
pub async fn read_checkpoint(pool: &PgPool, name: &str) -> Result<GlobalPosition, ProjectionError> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT last_txid, last_position FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    Ok(row
        .map(|(txid, position)| GlobalPosition { txid, position })
        .unwrap_or_default())
}

/// Events after `after` in global order, up to the visibility horizon.
pub async fn read_events_after(
    conn: &mut PgConnection,
    after: GlobalPosition,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    read_events(conn, after, None, limit, &[]).await
}

/// Events after `after` (and up to `until`) in global order, up to the
/// visibility horizon. Events of the `unhandled` aggregate types come
/// without payload and metadata (both JSON `null`): a projection only
/// needs to see that they are there, to move its checkpoint past them,
/// and in a flash sale most events belong to other projections.
pub(crate) async fn read_events(
    conn: &mut PgConnection,
    after: GlobalPosition,
    until: Option<GlobalPosition>,
    limit: i64,
    unhandled: &[String],
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let until = until.unwrap_or(GlobalPosition {
        txid: i64::MAX,
        position: i64::MAX,
    });
    sqlx::query_as::<_, StoredEvent>(
        "SELECT position, txid, aggregate_type, aggregate_id, sequence, event_type, event_version, \
                CASE WHEN aggregate_type = ANY($6) THEN 'null'::json ELSE payload END AS payload, \
                CASE WHEN aggregate_type = ANY($6) THEN 'null'::json ELSE metadata END AS metadata, \
                recorded_at \
         FROM events \
         WHERE (txid, position) > ($1, $2) AND (txid, position) <= ($3, $4) \
           AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
         ORDER BY txid, position LIMIT $5",
    )
    .bind(after.txid)
    .bind(after.position)
    .bind(until.txid)
    .bind(until.position)
    .bind(limit)
    .bind(unhandled)
    .fetch_all(conn)
    .await
}

/// The aggregate types a projection has said it does not handle, learnt
/// from the events it was shown. Only types `handles` has refused are ever
/// listed, so a type it handles is always read in full, new ones included.
#[derive(Default)]
pub(crate) struct UnhandledTypes(Mutex<Vec<String>>);

impl UnhandledTypes {
    pub(crate) fn known(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn learn(&self, projection: &dyn Projection, events: &[StoredEvent]) {
        let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for event in events {
            if !known.contains(&event.aggregate_type) && !projection.handles(&event.aggregate_type)
            {
                known.push(event.aggregate_type.clone());
            }
        }
    }
}

/// A stable 64-bit advisory-lock key for a projection name (FNV-1a), so the
/// key does not depend on Rust's randomly seeded hasher. Whoever holds it
/// (a runner's step, a rebuild's swap) is the only writer of the
/// projection's tables and checkpoint.
pub(crate) fn lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"projection:".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}
