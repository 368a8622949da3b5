//! Rebuilding read models from the event store while the server keeps
//! running: build a projection's tables afresh beside the live ones, then
//! either swap them in (`rebuild`) or compare them with the live ones
//! (`verify`).
//!
//! The copies live in a scratch schema made for one run. Every projection
//! names its tables unqualified, so replaying the store with `search_path`
//! set to `<scratch>, <live>` inside each transaction writes the copies and
//! nothing else (the `events` table has no copy and is still read from the
//! live schema). The live runner keeps applying new events meanwhile; only
//! the last moment needs its advisory lock: to catch the copy up to the
//! live head and swap it in with the checkpoint in one transaction, or to
//! fix the point at which both sides are compared.
//!
//! The swap takes the live tables one after another, and a reader's query
//! takes the tables it joins one after another too, in its own order. So a
//! swap holding one table while it waits for another can deadlock with a
//! reader waiting the other way round, and when the reader's deadlock check
//! fires first the reader's request fails. The swap therefore waits only
//! briefly for each table, well under the server's `deadlock_timeout`:
//! on a timeout it lets go of everything (the live runner's lock too),
//! catches the copy up again beside, and tries once more, so neither the
//! readers nor the requests waiting for the live projection wait long. It
//! writes nothing before it holds every lock, so its waits never hold back
//! the horizon the runners read below.
//!
//! What this asks of a projection's tables: named in `Projection::tables`,
//! written by unqualified name only, no foreign keys or views pointing at
//! them, and no column defaults drawn from a sequence the table owns
//! (`serial`): a copy would share the live table's sequence, which dies
//! with it. Identity columns are fine (the copy gets its own).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};

use crate::runner::{
    lock_key, read_events, Projection, ProjectionError, ProjectionRunner, UnhandledTypes,
};
use crate::stored_event::{GlobalPosition, StoredEvent, STORED_EVENT_COLUMNS};

/// Events replayed per transaction while building.
const BATCH_SIZE: i64 = 1_000;
/// How long a swap waits for the live runner to finish the step it is in.
const SWAP_RUNNER_WAIT: Duration = Duration::from_secs(2);
/// The longest a swap waits for readers to let go of one live table before
/// it lets go of everything and tries again; shorter when the server's
/// `deadlock_timeout` is short (see `table_lock_wait`).
const SWAP_TABLE_WAIT: Duration = Duration::from_millis(100);
/// How long a rebuild keeps trying to swap before it gives up (the copy is
/// then dropped and the live read model stays as it was).
const SWAP_PATIENCE: Duration = Duration::from_secs(120);
/// Pause between swap attempts: doubles from the first up to the last.
const SWAP_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const SWAP_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Rows of each differing table shown in a report.
const SAMPLE_ROWS: i64 = 5;
/// Latest events per aggregate handed to `after_commit` at a time.
const ANNOUNCE_BATCH: i64 = 500;

/// Columns that may differ between a live table and a fresh rebuild
/// without the read model being wrong: `sync-reserved-stock` repairs a
/// stock row outside the projection and stamps it with the repair's time.
const UNCOMPARED_COLUMNS: &[(&str, &str)] = &[("stock_levels", "updated_at")];

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub projection: &'static str,
    /// Every event read from the store (those of other aggregate types too).
    pub events_read: u64,
    /// The events this projection handles, applied to the copy.
    pub events_applied: u64,
    pub elapsed: Duration,
    /// The checkpoint the swapped-in tables stand at.
    pub position: GlobalPosition,
}

impl RebuildReport {
    pub fn events_per_second(&self) -> f64 {
        per_second(self.events_read, self.elapsed)
    }
}

/// Rows of one table that are in one side and not in the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDifference {
    pub table: String,
    /// Rows of the live table that a fresh rebuild does not have.
    pub only_live: i64,
    /// Rows of the fresh rebuild that the live table does not have.
    pub only_rebuilt: i64,
    /// A few of each, as JSON.
    pub live_samples: Vec<String>,
    pub rebuilt_samples: Vec<String>,
}

/// What a verification found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub projection: &'static str,
    pub events_read: u64,
    pub elapsed: Duration,
    /// The checkpoint both sides were compared at.
    pub position: GlobalPosition,
    /// Empty when the live read model equals a fresh rebuild.
    pub differences: Vec<TableDifference>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Rebuilds every projection in turn (each swap is its own transaction).
pub async fn rebuild_all(
    pool: &PgPool,
    projections: &[Arc<dyn Projection>],
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let mut reports = Vec::with_capacity(projections.len());
    for projection in projections {
        reports.push(rebuild(pool, projection.clone()).await?);
    }
    Ok(reports)
}

/// Verifies every projection in turn.
pub async fn verify_all(
    pool: &PgPool,
    projections: &[Arc<dyn Projection>],
) -> Result<Vec<VerifyReport>, ProjectionError> {
    let mut reports = Vec::with_capacity(projections.len());
    for projection in projections {
        reports.push(verify(pool, projection.clone()).await?);
    }
    Ok(reports)
}

/// Replays the whole store into fresh copies of the projection's tables and
/// swaps them in for the live ones, with the checkpoint, in one transaction.
pub async fn rebuild(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let scratch = Scratch::create(pool, projection.as_ref()).await?;
    let outcome = build_and_swap(pool, projection.as_ref(), &scratch).await;
    scratch.drop_quietly(pool).await;
    let progress = outcome?;
    if projection.mirrors_rows() {
        announce_aggregates(pool, projection.as_ref(), progress.position).await?;
    }
    let report = RebuildReport {
        projection: projection.name(),
        events_read: progress.read,
        events_applied: progress.applied,
        elapsed: started.elapsed(),
        position: progress.position,
    };
    tracing::info!(
        projection = report.projection,
        events = report.events_read,
        applied = report.events_applied,
        seconds = report.elapsed.as_secs_f64(),
        events_per_second = report.events_per_second(),
        "projection rebuilt and swapped in"
    );
    Ok(report)
}

/// Replays the whole store into scratch copies of the projection's tables
/// and compares them, row for row, with the live tables at one checkpoint.
/// Changes nothing live, except that the live projection is first caught up
/// (as its runner would do) so that both sides can stand at one point.
pub async fn verify(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
) -> Result<VerifyReport, ProjectionError> {
    let started = Instant::now();
    let scratch = Scratch::create(pool, projection.as_ref()).await?;
    let outcome = build_and_compare(pool, projection.clone(), &scratch).await;
    scratch.drop_quietly(pool).await;
    let (progress, differences) = outcome?;
    Ok(VerifyReport {
        projection: projection.name(),
        events_read: progress.read,
        elapsed: started.elapsed(),
        position: progress.position,
        differences,
    })
}

/// Events read and applied, and where the copy stands after them.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    read: u64,
    applied: u64,
    position: GlobalPosition,
}

async fn build_and_swap(
    pool: &PgPool,
    projection: &dyn Projection,
    scratch: &Scratch,
) -> Result<Progress, ProjectionError> {
    let mut progress = build(pool, projection, scratch, GlobalPosition::START).await?;
    // Fresh statistics, so the first queries on the swapped-in tables are
    // planned for their real size.
    for table in &scratch.tables {
        sqlx::raw_sql(&format!("ANALYZE {}", scratch.qualified(table)))
            .execute(pool)
            .await?;
    }
    let table_wait = table_lock_wait(pool, scratch.tables.len()).await?;
    let give_up_at = Instant::now() + SWAP_PATIENCE;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match swap(pool, projection, scratch, progress, table_wait).await {
            Ok(swapped) => {
                if attempt > 1 {
                    tracing::info!(
                        projection = projection.name(),
                        attempts = attempt,
                        "swap done after readers held the live tables"
                    );
                }
                return Ok(swapped);
            }
            Err(error) if is_lock_conflict(&error) && Instant::now() < give_up_at => {
                tracing::debug!(
                    projection = projection.name(),
                    attempt,
                    %error,
                    "swap could not take the live tables at once; retrying"
                );
                // The failed swap released the live runner and the tables
                // having written nothing: the copy still stands at `progress`.
                tokio::time::sleep(swap_backoff(attempt)).await;
                let caught_up = build(pool, projection, scratch, progress.position).await?;
                progress = Progress {
                    read: progress.read + caught_up.read,
                    applied: progress.applied + caught_up.applied,
                    position: caught_up.position,
                };
            }
            Err(error) => {
                if is_lock_conflict(&error) {
                    tracing::warn!(
                        projection = projection.name(),
                        attempts = attempt,
                        %error,
                        "swap gave up: readers never let go of the live tables"
                    );
                }
                return Err(error);
            }
        }
    }
}

/// How long the swap may wait for any one live table. A reader blocked
/// behind a table the swap already holds must not wait as long as
/// `deadlock_timeout`, or its deadlock check may find the swap waiting for
/// a table the reader holds and fail the reader's query; so every wait of
/// the swap together stays within half of it.
async fn table_lock_wait(pool: &PgPool, tables: usize) -> Result<Duration, ProjectionError> {
    let deadlock_timeout_ms: Option<String> =
        sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = 'deadlock_timeout'")
            .fetch_optional(pool)
            .await?;
    let deadlock_timeout = deadlock_timeout_ms
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis);
    let waits = u32::try_from(tables.max(1) * 2).unwrap_or(u32::MAX);
    Ok((deadlock_timeout / waits).clamp(Duration::from_millis(5), SWAP_TABLE_WAIT))
}

/// Exponential, with jitter so that two rebuilds (or a rebuild and a
/// periodic reader) do not keep meeting at the same moment.
fn swap_backoff(attempt: u32) -> Duration {
    let doubled = SWAP_BACKOFF_FIRST.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    let ceiling = doubled.min(SWAP_BACKOFF_MAX);
    // Any random bits will do; a v4 UUID is random and already at hand.
    let fraction = f64::from(uuid::Uuid::new_v4().as_u128() as u16) / f64::from(u16::MAX);
    ceiling.mul_f64(0.5 + fraction / 2.0)
}

/// Takes the projection's lock and its live tables, catches the copy up to
/// the live head, and swaps it in. Returns the final progress. Fails with a
/// lock timeout, having changed nothing, when it cannot take the live
/// runner's lock or a live table within its short waits.
///
/// The locks come before the catch-up because a transaction that has
/// written holds back the visibility horizon of every projection of the
/// cluster (see `runner`): the swap writes only once it has everything it
/// waits for, so its waits never delay anyone's read-your-writes.
async fn swap(
    pool: &PgPool,
    projection: &dyn Projection,
    scratch: &Scratch,
    progress: Progress,
    table_wait: Duration,
) -> Result<Progress, ProjectionError> {
    let mut tx = pool.begin().await?;
    scratch.use_in(&mut tx).await?;
    set_lock_timeout(&mut tx, SWAP_RUNNER_WAIT).await?;
    // The live runner (of every instance) now waits: nothing moves the live
    // tables or the checkpoint until this transaction ends.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(projection.name()))
        .execute(&mut *tx)
        .await?;
    set_lock_timeout(&mut tx, table_wait).await?;
    let live_tables = scratch
        .tables
        .iter()
        .map(|table| scratch.live_qualified(table))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::raw_sql(&format!(
        "LOCK TABLE {live_tables} IN ACCESS EXCLUSIVE MODE"
    ))
    .execute(&mut *tx)
    .await?;
    // Readers of the live tables wait from here on: the tail is what
    // arrived since the last catch-up beside, a moment ago.
    let tail = replay(&mut tx, projection, scratch, progress.position, None).await?;
    for table in &scratch.tables {
        // Index names were made equal to the live ones when the copy was
        // created; they are free again once the live table is dropped.
        sqlx::raw_sql(&format!(
            "DROP TABLE {live}; ALTER TABLE {copy} SET SCHEMA {schema}",
            live = scratch.live_qualified(table),
            copy = scratch.qualified(table),
            schema = quote_ident(&scratch.live_schema),
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, last_txid, last_position, updated_at) \
         VALUES ($1, $2, $3, now()) \
         ON CONFLICT (name) DO UPDATE SET last_txid = EXCLUDED.last_txid, \
             last_position = EXCLUDED.last_position, updated_at = now()",
    )
    .bind(projection.name())
    .bind(tail.position.txid)
    .bind(tail.position.position)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Progress {
        read: progress.read + tail.read,
        applied: progress.applied + tail.applied,
        position: tail.position,
    })
}

/// Bounds every lock wait of the rest of the transaction.
async fn set_lock_timeout(tx: &mut PgConnection, wait: Duration) -> Result<(), ProjectionError> {
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", wait.as_millis().max(1)))
        .execute(tx)
        .await?;
    Ok(())
}

async fn build_and_compare(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    scratch: &Scratch,
) -> Result<(Progress, Vec<TableDifference>), ProjectionError> {
    let built = build(pool, projection.as_ref(), scratch, GlobalPosition::START).await?;

    // Bring the live side at least as far as the copy, the way its runner
    // would (caches included), so both can be compared at the live point.
    let runner = ProjectionRunner::new(pool.clone(), projection.clone());
    runner.register().await?;
    runner.catch_up().await?;

    // Hold the live side still just long enough to fix the point of
    // comparison: catch the copy up to exactly the live checkpoint, and
    // take a snapshot that a second transaction compares in while the live
    // projection carries on.
    let mut holder = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(projection.name()))
        .execute(&mut *holder)
        .await?;
    let live_at = read_checkpoint_in(&mut holder, projection.name()).await?;
    if live_at < built.position {
        return Err(ProjectionError::Other(format!(
            "the live {} projection stands before the rebuild after catching up",
            projection.name()
        )));
    }
    let mut tail_tx = pool.begin().await?;
    scratch.use_in(&mut tail_tx).await?;
    let tail = replay(
        &mut tail_tx,
        projection.as_ref(),
        scratch,
        built.position,
        Some(live_at),
    )
    .await?;
    tail_tx.commit().await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *holder)
        .await?;
    if !snapshot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(ProjectionError::Other(format!(
            "unexpected snapshot id {snapshot:?}"
        )));
    }
    let mut reader = pool.begin().await?;
    sqlx::raw_sql(&format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
         SET TRANSACTION SNAPSHOT '{snapshot}'"
    ))
    .execute(&mut *reader)
    .await?;
    holder.commit().await?;

    let mut differences = Vec::new();
    for table in &scratch.tables {
        if let Some(difference) = compare_table(&mut reader, scratch, table).await? {
            differences.push(difference);
        }
    }
    reader.commit().await?;
    let progress = Progress {
        read: built.read + tail.read,
        applied: built.applied + tail.applied,
        position: live_at,
    };
    Ok((progress, differences))
}

/// Replays everything after `after` and below the visibility horizon into
/// the copy, one committed batch at a time, without any lock: the live
/// runner carries on meanwhile.
async fn build(
    pool: &PgPool,
    projection: &dyn Projection,
    scratch: &Scratch,
    after: GlobalPosition,
) -> Result<Progress, ProjectionError> {
    let mut total = Progress {
        position: after,
        ..Progress::default()
    };
    loop {
        let mut tx = pool.begin().await?;
        scratch.use_in(&mut tx).await?;
        let batch = replay_batch(
            &mut tx,
            projection,
            total.position,
            None,
            &scratch.unhandled,
        )
        .await?;
        tx.commit().await?;
        if batch.read == 0 {
            return Ok(total);
        }
        total.read += batch.read;
        total.applied += batch.applied;
        total.position = batch.position;
    }
}

/// Replays batches in one transaction until nothing is left below the
/// horizon (or below `until`).
async fn replay(
    tx: &mut PgConnection,
    projection: &dyn Projection,
    scratch: &Scratch,
    after: GlobalPosition,
    until: Option<GlobalPosition>,
) -> Result<Progress, ProjectionError> {
    let mut total = Progress {
        position: after,
        ..Progress::default()
    };
    loop {
        let batch = replay_batch(tx, projection, total.position, until, &scratch.unhandled).await?;
        if batch.read == 0 {
            return Ok(total);
        }
        total.read += batch.read;
        total.applied += batch.applied;
        total.position = batch.position;
    }
}

async fn replay_batch(
    tx: &mut PgConnection,
    projection: &dyn Projection,
    after: GlobalPosition,
    until: Option<GlobalPosition>,
    unhandled: &UnhandledTypes,
) -> Result<Progress, ProjectionError> {
    let events = read_events(tx, after, until, BATCH_SIZE, &unhandled.known()).await?;
    unhandled.learn(projection, &events);
    let Some(last) = events.last().map(StoredEvent::global_position) else {
        return Ok(Progress {
            position: after,
            ..Progress::default()
        });
    };
    let read = events.len() as u64;
    let relevant: Vec<StoredEvent> = events
        .into_iter()
        .filter(|event| projection.handles(&event.aggregate_type))
        .collect();
    if !relevant.is_empty() {
        projection.apply_batch(tx, &relevant).await?;
    }
    Ok(Progress {
        read,
        applied: relevant.len() as u64,
        position: last,
    })
}

/// Hands the latest event of every aggregate the projection handles (up to
/// `until`) to its `after_commit`, as if each had just changed.
///
/// Caches are versioned by aggregate sequence, and a rebuild reproduces the
/// same versions: when the old tables were right, their cached copies are
/// right too. But a rebuild is how a wrong read model is repaired, and a
/// cached copy of a wrong row carries the same version as the repaired row,
/// so nothing would ever replace it before it expires. Announcing every
/// aggregate makes each projection replace or drop its entries.
async fn announce_aggregates(
    pool: &PgPool,
    projection: &dyn Projection,
    until: GlobalPosition,
) -> Result<(), ProjectionError> {
    // The distinct aggregate types, one index probe each (a loose index
    // scan) instead of reading every event.
    let types: Vec<String> = sqlx::query_scalar(
        "WITH RECURSIVE found(aggregate_type) AS ( \
             SELECT min(aggregate_type) FROM events \
             UNION ALL \
             SELECT (SELECT min(aggregate_type) FROM events WHERE aggregate_type > found.aggregate_type) \
             FROM found WHERE found.aggregate_type IS NOT NULL) \
         SELECT aggregate_type FROM found WHERE aggregate_type IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    for aggregate_type in types.iter().filter(|t| projection.handles(t)) {
        // Pages walk the primary key backwards, newest sequence first, so
        // that each page is read straight off the index.
        let mut before_id: Option<String> = None;
        loop {
            // Without a bound on the first page: `$2 IS NULL OR ...` would
            // keep a generic plan from using the index for the bound.
            let bound = if before_id.is_some() {
                "AND aggregate_id < $5"
            } else {
                ""
            };
            let sql = format!(
                "SELECT DISTINCT ON (aggregate_id) {STORED_EVENT_COLUMNS} FROM events \
                 WHERE aggregate_type = $1 {bound} AND (txid, position) <= ($2, $3) \
                 ORDER BY aggregate_id DESC, sequence DESC LIMIT $4"
            );
            let mut query = sqlx::query_as::<_, StoredEvent>(&sql)
                .bind(aggregate_type)
                .bind(until.txid)
                .bind(until.position)
                .bind(ANNOUNCE_BATCH);
            if let Some(before_id) = &before_id {
                query = query.bind(before_id);
            }
            let latest = query.fetch_all(pool).await?;
            let Some(last) = latest.last() else {
                break;
            };
            before_id = Some(last.aggregate_id.clone());
            projection.after_rebuild(&latest).await;
        }
    }
    Ok(())
}

/// Rows in one side and not the other, both ways, over the columns that
/// must agree.
async fn compare_table(
    conn: &mut PgConnection,
    scratch: &Scratch,
    table: &str,
) -> Result<Option<TableDifference>, ProjectionError> {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = $2 AND is_generated = 'NEVER' \
         ORDER BY ordinal_position",
    )
    .bind(&scratch.live_schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let compared: Vec<String> = columns
        .iter()
        .filter(|column| !UNCOMPARED_COLUMNS.contains(&(table, column.as_str())))
        .map(|column| quote_ident(column))
        .collect();
    if compared.is_empty() {
        return Err(ProjectionError::Other(format!(
            "table {table} has no columns to compare"
        )));
    }
    let select = compared.join(", ");
    let live = scratch.live_qualified(table);
    let copy = scratch.qualified(table);
    let (only_live, live_samples) = rows_missing_from(conn, &select, &live, &copy).await?;
    let (only_rebuilt, rebuilt_samples) = rows_missing_from(conn, &select, &copy, &live).await?;
    if only_live == 0 && only_rebuilt == 0 {
        return Ok(None);
    }
    Ok(Some(TableDifference {
        table: table.to_owned(),
        only_live,
        only_rebuilt,
        live_samples,
        rebuilt_samples,
    }))
}

/// How many rows of `from` are not in `other` (duplicates counted), with a
/// few of them as JSON.
async fn rows_missing_from(
    conn: &mut PgConnection,
    select: &str,
    from: &str,
    other: &str,
) -> Result<(i64, Vec<String>), ProjectionError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(&format!(
        "SELECT count(*) OVER (), row_to_json(d)::text FROM \
         (SELECT {select} FROM {from} EXCEPT ALL SELECT {select} FROM {other}) AS d \
         LIMIT {SAMPLE_ROWS}"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let count = rows.first().map_or(0, |(count, _)| *count);
    Ok((count, rows.into_iter().map(|(_, row)| row).collect()))
}

async fn read_checkpoint_in(
    conn: &mut PgConnection,
    name: &str,
) -> Result<GlobalPosition, ProjectionError> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT last_txid, last_position FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?;
    Ok(row
        .map(|(txid, position)| GlobalPosition { txid, position })
        .unwrap_or_default())
}

/// The scratch schema of one run and the copies of a projection's tables.
struct Scratch {
    schema: String,
    live_schema: String,
    tables: Vec<&'static str>,
    /// Aggregate types the projection does not handle, learnt while
    /// replaying, whose payloads are then left unread.
    unhandled: UnhandledTypes,
}

impl Scratch {
    /// Makes the schema and empty copies of the live tables (columns,
    /// defaults, constraints and indexes, under the live index names).
    async fn create(pool: &PgPool, projection: &dyn Projection) -> Result<Self, ProjectionError> {
        let tables = projection.tables().to_vec();
        if tables.is_empty() {
            return Err(ProjectionError::Other(format!(
                "projection {} declares no tables",
                projection.name()
            )));
        }
        let live_schema: Option<String> = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(pool)
            .await?;
        let live_schema = live_schema.ok_or_else(|| {
            ProjectionError::Other("the search_path names no existing schema".into())
        })?;
        let label: String = projection
            .name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(24)
            .collect();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let scratch = Self {
            schema: format!("rebuild_{label}_{}", &suffix[..12]),
            live_schema,
            tables,
            unhandled: UnhandledTypes::default(),
        };
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(&format!("CREATE SCHEMA {}", quote_ident(&scratch.schema)))
            .execute(&mut *tx)
            .await?;
        for table in &scratch.tables {
            let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(scratch.live_qualified(table))
                .fetch_one(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(ProjectionError::Other(format!(
                    "projection {} declares table {table}, which does not exist",
                    projection.name()
                )));
            }
            sqlx::raw_sql(&format!(
                "CREATE TABLE {} (LIKE {} INCLUDING ALL)",
                scratch.qualified(table),
                scratch.live_qualified(table)
            ))
            .execute(&mut *tx)
            .await?;
            scratch.name_indexes_like_live(&mut tx, table).await?;
        }
        tx.commit().await?;
        Ok(scratch)
    }

    /// `LIKE ... INCLUDING INDEXES` names the copied indexes after their
    /// columns; renames them to the live names, so that after a swap the
    /// live schema has the very index names its migrations created (a later
    /// migration may drop or alter one by name). Indexes are paired by what
    /// they index, not by name.
    async fn name_indexes_like_live(
        &self,
        tx: &mut PgConnection,
        table: &str,
    ) -> Result<(), ProjectionError> {
        let pairs: Vec<(String, String)> = sqlx::query_as(
            "WITH described AS ( \
                 SELECT x.indrelid, c.relname::text AS name, \
                        concat_ws('|', x.indisunique, x.indisprimary, x.indkey::text, \
                                  x.indclass::text, x.indoption::text, x.indcollation::text, \
                                  c.relam, pg_get_expr(x.indexprs, x.indrelid), \
                                  pg_get_expr(x.indpred, x.indrelid)) AS shape \
                 FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid \
                 WHERE x.indrelid IN ($1::text::regclass, $2::text::regclass)), \
             ranked AS ( \
                 SELECT indrelid, name, shape, \
                        row_number() OVER (PARTITION BY indrelid, shape ORDER BY name) AS n \
                 FROM described) \
             SELECT copy.name, live.name FROM ranked copy JOIN ranked live \
                 ON copy.shape = live.shape AND copy.n = live.n \
             WHERE copy.indrelid = $1::text::regclass AND live.indrelid = $2::text::regclass",
        )
        .bind(self.qualified(table))
        .bind(self.live_qualified(table))
        .fetch_all(&mut *tx)
        .await?;
        let renames: Vec<&(String, String)> =
            pairs.iter().filter(|(copy, live)| copy != live).collect();
        // Through temporary names first: a copy's generated name may be the
        // live name of another of its indexes.
        let temporary: HashMap<&str, String> = renames
            .iter()
            .enumerate()
            .map(|(index, (copy, _))| (copy.as_str(), format!("rebuild_index_{index}")))
            .collect();
        for (copy, _) in &renames {
            sqlx::raw_sql(&format!(
                "ALTER INDEX {}.{} RENAME TO {}",
                quote_ident(&self.schema),
                quote_ident(copy),
                quote_ident(&temporary[copy.as_str()])
            ))
            .execute(&mut *tx)
            .await?;
        }
        for (copy, live) in &renames {
            sqlx::raw_sql(&format!(
                "ALTER INDEX {}.{} RENAME TO {}",
                quote_ident(&self.schema),
                quote_ident(&temporary[copy.as_str()]),
                quote_ident(live)
            ))
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// Points the transaction's unqualified names at the copies first.
    async fn use_in(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("SELECT set_config('search_path', $1, true)")
            .bind(format!(
                "{}, {}",
                quote_ident(&self.schema),
                quote_ident(&self.live_schema)
            ))
            .execute(tx)
            .await?;
        Ok(())
    }

    fn qualified(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    fn live_qualified(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.live_schema), quote_ident(table))
    }

    /// Drops the schema and whatever is left in it; a failure is logged
    /// (a leftover `rebuild_*` schema is harmless and safe to drop by hand).
    async fn drop_quietly(&self, pool: &PgPool) {
        let statement = format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&self.schema)
        );
        if let Err(error) = sqlx::raw_sql(&statement).execute(pool).await {
            tracing::warn!(schema = %self.schema, %error, "could not drop the scratch schema");
        }
    }
}

/// An SQL identifier in double quotes.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Lock waits that a later attempt may win: a lock timeout or a deadlock
/// with a reader.
fn is_lock_conflict(error: &ProjectionError) -> bool {
    match error {
        ProjectionError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("55P03" | "40P01"))
        }
        _ => false,
    }
}

fn per_second(events: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        events as f64 / seconds
    } else {
        0.0
    }
}
