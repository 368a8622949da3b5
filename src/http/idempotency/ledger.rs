//! The idempotency key table's writes, many requests to one statement.
//!
//! Every keyed request claims its key before it runs and records its
//! response after; alone, that is two transactions per checkout, more than
//! the checkout's own share of the event store's group commit. One task per
//! instance takes every claim and record waiting and writes them in one
//! statement, so under load a key costs a fraction of a transaction. The
//! semantics are those of one `INSERT .. ON CONFLICT DO NOTHING` per claim
//! and one `UPDATE` per record; rare paths (taking over an expired lease,
//! releasing a key after a server error) stay single statements in the
//! middleware. A checkout's key is claimed by the checkout committer
//! instead, in the transaction that stores the checkout, and only its record
//! comes here.

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Writes waiting beyond this go into the next statement.
const MAX_BATCH: usize = 512;
/// How long records that nobody waits for are held for company. A key
/// statement costs Postgres about as much for one write as for ten (its
/// start and its commit dominate), and in a sale the records come one by
/// one as the checkouts are answered.
const HOLD_UNAWAITED: Duration = Duration::from_millis(10);

/// A request's key: unique per user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub user_id: Uuid,
    pub key: String,
}

/// What the key table held when a claim did not insert the key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredKey {
    pub fingerprint: Vec<u8>,
    pub status: Option<i16>,
    pub content_type: Option<String>,
    pub body: Option<Vec<u8>>,
    pub lease_alive: bool,
}

#[derive(Debug)]
pub enum ClaimResult {
    /// The key was new: this request runs.
    Inserted,
    /// The key was there already, as stored.
    Existing(StoredKey),
    /// Another transaction inserted the key after this statement's snapshot
    /// was taken (or removed it): look again.
    Unseen,
}

#[derive(Debug, Clone)]
pub struct Claim {
    pub key: KeyId,
    pub fingerprint: Vec<u8>,
    pub lease_seconds: f64,
    /// Commit without waiting for the disk (see the middleware's note).
    pub relaxed: bool,
}

pub struct Record {
    pub key: KeyId,
    pub status: i16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub relaxed: bool,
}

enum Write {
    Claim(Claim, oneshot::Sender<Result<ClaimResult, String>>),
    /// A record, and whom to tell once it is written, if anyone waits.
    Record(Record, Option<oneshot::Sender<Result<(), String>>>),
}

impl Write {
    fn awaited(&self) -> bool {
        !matches!(self, Write::Record(_, None))
    }

    fn relaxed(&self) -> bool {
        match self {
            Write::Claim(claim, _) => claim.relaxed,
            Write::Record(record, _) => record.relaxed,
        }
    }

    fn key(&self) -> &KeyId {
        match self {
            Write::Claim(claim, _) => &claim.key,
            Write::Record(record, _) => &record.key,
        }
    }
}

/// The handle to this instance's key writer.
#[derive(Clone)]
pub struct KeyLedger {
    queue: mpsc::Sender<Write>,
}

#[derive(Debug, thiserror::Error)]
#[error("idempotency key table: {0}")]
pub struct LedgerError(String);

const STOPPED: &str = "the key writer stopped";

impl KeyLedger {
    /// Starts the writing task on a thread of its own (see
    /// [`crate::dedicated`]); the server runs it beside the checkout
    /// committer instead (see [`KeyLedger::new`]).
    pub fn start(pool: &PgPool) -> std::io::Result<Self> {
        Self::start_holding(pool, HOLD_UNAWAITED)
    }

    /// As [`KeyLedger::start`], holding records that nobody waits for up to
    /// `hold` instead of `HOLD_UNAWAITED`.
    pub fn start_holding(pool: &PgPool, hold: Duration) -> std::io::Result<Self> {
        let (ledger, writing) = Self::holding(pool, hold);
        crate::dedicated::spawn("idempotency-keys", vec![writing])?;
        Ok(ledger)
    }

    /// The handle, and the writing task for the caller to run, with
    /// connections of its own to the database `pool` connects to.
    ///
    /// Those connections plan every statement generically: Postgres keeps
    /// making a custom plan for each call while batches are smaller than
    /// its guess for an array's length, and this statement's custom plan
    /// cost more to make than to run (with three instances, whose batches
    /// are small, 1.9 s of planning against 1.2 s of execution in one
    /// sale). One statement is in flight at a time, on a connection the
    /// writer keeps (see `Writer`); the second is there for a reconnect.
    pub fn new(pool: &PgPool) -> (Self, BoxFuture<'static, ()>) {
        Self::holding(pool, HOLD_UNAWAITED)
    }

    fn holding(pool: &PgPool, hold: Duration) -> (Self, BoxFuture<'static, ()>) {
        let options =
            crate::db::own_connection_options(pool, crate::db::application_names::IDEMPOTENCY_KEYS)
                .options([("plan_cache_mode", "force_generic_plan")]);
        let writer_pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(options);
        let (queue, receiver) = mpsc::channel(8192);
        let writer = Writer {
            pool: writer_pool,
            connection: None,
            last_used: Instant::now(),
        };
        (Self { queue }, Box::pin(run(writer, receiver, hold)))
    }

    pub async fn claim(&self, claim: Claim) -> Result<ClaimResult, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Write::Claim(claim, reply), answer).await
    }

    pub async fn record(&self, record: Record) -> Result<(), LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Write::Record(record, Some(reply)), answer).await
    }

    /// Queues a record without waiting for it to be written; a failure is
    /// logged by the writer. It may be held back for up to
    /// `HOLD_UNAWAITED`, to share its statement.
    pub async fn record_later(&self, record: Record) -> Result<(), LedgerError> {
        self.enqueue(Write::Record(record, None)).await
    }

    async fn enqueue(&self, write: Write) -> Result<(), LedgerError> {
        self.queue
            .send(write)
            .await
            .map_err(|_| LedgerError(STOPPED.into()))
    }

    async fn send<T>(
        &self,
        write: Write,
        answer: oneshot::Receiver<Result<T, String>>,
    ) -> Result<T, LedgerError> {
        self.enqueue(write).await?;
        answer
            .await
            .map_err(|_| LedgerError(STOPPED.into()))?
            .map_err(LedgerError)
    }
}

/// The writing task and the connection it keeps between statements. sqlx
/// checks a pooled connection with a round trip when it is taken from the
/// pool and again when it goes back: two round trips per statement, a
/// quarter of this thread's CPU time in a sale's profile. Kept, it is
/// checked only after a quiet spell, when Postgres may have gone away
/// meanwhile, and given back after any error.
struct Writer {
    pool: PgPool,
    connection: Option<PoolConnection<Postgres>>,
    last_used: Instant,
}

/// How long the kept connection may sit unused before it is checked.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

async fn run(mut writer: Writer, mut queue: mpsc::Receiver<Write>, hold: Duration) {
    let mut waiting: Vec<Write> = Vec::new();
    let mut deferred: Vec<Write> = Vec::new();
    loop {
        if waiting.is_empty() {
            if queue.recv_many(&mut waiting, MAX_BATCH).await == 0 {
                return;
            }
            hold_for_company(&mut waiting, &mut queue, hold).await;
        } else {
            // Writes deferred from the last statement go first; whatever
            // else is queued joins them.
            while waiting.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(write) => waiting.push(write),
                    Err(_) => break,
                }
            }
        }
        // A key written twice in one statement would be ambiguous (a claim
        // could see its own insert as someone else's); the second write
        // waits for the next statement.
        let mut keys = std::collections::HashSet::with_capacity(waiting.len());
        let mut batch = Vec::with_capacity(waiting.len());
        for write in waiting.drain(..) {
            if keys.insert(write.key().clone()) {
                batch.push(write);
            } else {
                deferred.push(write);
            }
        }
        metrics::histogram!("idempotency_key_batch_size").record(batch.len() as f64);
        write_batch(&mut writer, batch).await;
        waiting.append(&mut deferred);
    }
}

/// While nobody waits for the writes in `waiting`, waits up to `hold` for
/// more to join them; a write that someone waits for ends the wait, and so
/// does a full batch or a closed queue.
async fn hold_for_company(
    waiting: &mut Vec<Write>,
    queue: &mut mpsc::Receiver<Write>,
    hold: Duration,
) {
    if waiting.iter().any(Write::awaited) {
        return;
    }
    let until = tokio::time::Instant::now() + hold;
    while waiting.len() < MAX_BATCH {
        match tokio::time::timeout_at(until, queue.recv()).await {
            Ok(Some(write)) => {
                let awaited = write.awaited();
                waiting.push(write);
                if awaited {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

impl Writer {
    /// The kept connection, checked after a quiet spell, or a fresh one.
    async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let quiet = self.last_used.elapsed() > CHECK_AFTER_IDLE;
        self.last_used = Instant::now();
        if let Some(mut kept) = self.connection.take() {
            if !quiet || kept.ping().await.is_ok() {
                return Ok(&mut **self.connection.insert(kept));
            }
        }
        let fresh = self.pool.acquire().await?;
        Ok(&mut **self.connection.insert(fresh))
    }
}

async fn write_batch(writer: &mut Writer, batch: Vec<Write>) {
    let relaxed = batch.iter().all(Write::relaxed);
    let mut claims = Vec::new();
    let mut records = Vec::new();
    for write in batch {
        match write {
            Write::Claim(claim, reply) => claims.push((claim, reply)),
            Write::Record(record, reply) => records.push((record, reply)),
        }
    }
    let written = match writer.connection().await {
        Ok(connection) => {
            let claimed: Vec<&Claim> = claims.iter().map(|(claim, _)| claim).collect();
            let recorded: Vec<&Record> = records.iter().map(|(record, _)| record).collect();
            execute(connection, relaxed, &claimed, &recorded).await
        }
        Err(error) => Err(error),
    };
    if written.is_err() {
        // Whatever state the statement left it in, the pool checks it.
        writer.connection = None;
    }
    match written {
        Ok(rows) => {
            let mut rows = rows.into_iter();
            for (_, reply) in claims {
                let result = match rows.next() {
                    Some(row) => Ok(row.into_result()),
                    None => Err("a claim got no answer".to_owned()),
                };
                let _ = reply.send(result);
            }
            for reply in records.into_iter().filter_map(|(_, reply)| reply) {
                let _ = reply.send(Ok(()));
            }
        }
        Err(error) => {
            let error = error.to_string();
            tracing::warn!(%error, "idempotency key batch failed");
            for (_, reply) in claims {
                let _ = reply.send(Err(error.clone()));
            }
            for reply in records.into_iter().filter_map(|(_, reply)| reply) {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    inserted: bool,
    present: bool,
    #[sqlx(flatten)]
    stored: StoredKey,
}

impl ClaimRow {
    fn into_result(self) -> ClaimResult {
        if self.inserted {
            ClaimResult::Inserted
        } else if self.present {
            ClaimResult::Existing(self.stored)
        } else {
            ClaimResult::Unseen
        }
    }
}

// `synchronous_commit` is relaxed only when every write in the statement
// may be (`set_config(.., true)` lasts until this statement's commit).
// The key table as the final select sees it is the statement's snapshot,
// from before its own insert, which is what tells an inserted claim from
// one that found the key. `recorded` runs although nothing reads it, as
// every data-modifying WITH does; it is an upsert only so that it needs no
// join the planner could choose (it writes rows it found, with the
// fingerprint it found).
//
// The statement runs on generic plans (see `KeyLedger::start`), made once
// per connection, possibly while the table is empty: every key is looked
// up through a `LATERAL .. LIMIT 1`, which the planner cannot turn into a
// scan of the whole table, so the plan made then stays right as the table
// grows. Written as joins, the generic plan read the whole table per
// statement once it was made on an empty one.
const WRITE_KEYS: &str = "\
WITH relaxed AS (
    SELECT set_config('synchronous_commit',
        CASE WHEN $1 THEN 'off' ELSE current_setting('synchronous_commit') END, true)
), claims AS (
    SELECT * FROM UNNEST($2::uuid[], $3::text[], $4::bytea[], $5::float8[])
        WITH ORDINALITY AS c(user_id, key, fingerprint, lease_seconds, n)
), inserted AS (
    INSERT INTO idempotency_keys (user_id, key, fingerprint, leased_until)
    SELECT c.user_id, c.key, c.fingerprint, now() + make_interval(secs => c.lease_seconds)
    FROM claims c, relaxed
    ORDER BY c.user_id, c.key
    ON CONFLICT DO NOTHING
    RETURNING user_id, key
), recorded AS (
    INSERT INTO idempotency_keys
        (user_id, key, fingerprint, response_status, response_type, response_body)
    SELECT r.user_id, r.key, stored.fingerprint, r.status, r.content_type, r.body
    FROM UNNEST($6::uuid[], $7::text[], $8::int2[], $9::text[], $10::bytea[])
             AS r(user_id, key, status, content_type, body)
    CROSS JOIN LATERAL (
        SELECT fingerprint FROM idempotency_keys s
        WHERE s.user_id = r.user_id AND s.key = r.key LIMIT 1
    ) stored, relaxed
    ORDER BY r.user_id, r.key
    ON CONFLICT (user_id, key) DO UPDATE
    SET response_status = excluded.response_status, response_type = excluded.response_type,
        response_body = excluded.response_body, leased_until = NULL
)
SELECT i.key IS NOT NULL AS inserted,
       k.key IS NOT NULL AS present,
       coalesce(k.fingerprint, '') AS fingerprint,
       k.response_status AS status,
       k.response_type AS content_type,
       k.response_body AS body,
       coalesce(k.leased_until > now(), false) AS lease_alive
FROM claims c
LEFT JOIN inserted i ON i.user_id = c.user_id AND i.key = c.key
LEFT JOIN LATERAL (
    SELECT * FROM idempotency_keys s
    WHERE s.user_id = c.user_id AND s.key = c.key LIMIT 1
) k ON true
ORDER BY c.n";

/// Claims keys in one statement on the caller's connection: the checkout
/// committer claims its batch's keys this way when its own statement found
/// one of them taken.
/// Each claim gets the answer the writer's would; a key that comes twice is
/// claimed once, and its second claim answered `Unseen` (look again).
pub async fn claim_keys(
    connection: &mut PgConnection,
    claims: &[&Claim],
) -> Result<Vec<ClaimResult>, sqlx::Error> {
    let mut keys = std::collections::HashSet::with_capacity(claims.len());
    let first: Vec<bool> = claims.iter().map(|claim| keys.insert(&claim.key)).collect();
    let unique: Vec<&Claim> = claims
        .iter()
        .zip(&first)
        .filter_map(|(claim, first)| first.then_some(*claim))
        .collect();
    let relaxed = unique.iter().all(|claim| claim.relaxed);
    let mut rows = execute(connection, relaxed, &unique, &[])
        .await?
        .into_iter();
    // The statement answers the distinct keys in order.
    claims
        .iter()
        .zip(first)
        .map(|(_, first)| {
            if !first {
                return Ok(ClaimResult::Unseen);
            }
            rows.next()
                .map(ClaimRow::into_result)
                .ok_or_else(|| sqlx::Error::Protocol("a claim got no answer".to_owned()))
        })
        .collect()
}

async fn execute(
    connection: &mut PgConnection,
    relaxed: bool,
    claims: &[&Claim],
    records: &[&Record],
) -> Result<Vec<ClaimRow>, sqlx::Error> {
    let claims = ClaimColumns::new(claims);
    let record_users: Vec<Uuid> = records.iter().map(|r| r.key.user_id).collect();
    let record_keys: Vec<&str> = records.iter().map(|r| r.key.key.as_str()).collect();
    let statuses: Vec<i16> = records.iter().map(|r| r.status).collect();
    let types: Vec<Option<&str>> = records.iter().map(|r| r.content_type.as_deref()).collect();
    let bodies: Vec<&[u8]> = records.iter().map(|r| &r.body[..]).collect();
    claims
        .bind(sqlx::query_as(WRITE_KEYS).bind(relaxed))
        .bind(record_users)
        .bind(record_keys)
        .bind(statuses)
        .bind(types)
        .bind(bodies)
        .fetch_all(connection)
        .await
}

/// Claims as the columns of a key insert, bound as four arrays: user ids,
/// keys, fingerprints and lease lengths in seconds. The key writer's
/// statement and the checkout committer's batch both insert claims so.
pub struct ClaimColumns<'a> {
    user_ids: Vec<Uuid>,
    keys: Vec<&'a str>,
    fingerprints: Vec<&'a [u8]>,
    lease_seconds: Vec<f64>,
}

impl<'a> ClaimColumns<'a> {
    pub fn new(claims: &[&'a Claim]) -> Self {
        Self {
            user_ids: claims.iter().map(|c| c.key.user_id).collect(),
            keys: claims.iter().map(|c| c.key.key.as_str()).collect(),
            fingerprints: claims.iter().map(|c| &c.fingerprint[..]).collect(),
            lease_seconds: claims.iter().map(|c| c.lease_seconds).collect(),
        }
    }

    /// Binds the four arrays as the query's next parameters.
    pub fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.user_ids)
            .bind(&self.keys)
            .bind(&self.fingerprints)
            .bind(&self.lease_seconds)
    }
}
