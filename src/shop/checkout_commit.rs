//! One transaction for many checkouts: the flash-sale write path.
//!
//! A checkout touches three kinds of aggregate: an `InventoryItem` per line
//! (reserve), a new `Order` (place) and the buyer's `Cart` (check out). Done
//! as separate commands that is several commits per buyer, a compensation
//! when a later line is short, and a conflict storm on the one hot item.
//! Here one task per server instance takes every checkout that is waiting,
//! decides them one after another against in-memory copies of the items and
//! carts, and stores all of their events, and their deadline rows, in one
//! transaction. A checkout is all or nothing inside that transaction, so a
//! short line never holds stock it has to give back. The same transaction
//! claims the checkouts' idempotency keys (see [`crate::http::idempotency`]),
//! so that a checkout is decided only on a key that was new: a key that is
//! there already fails the statement, and the committer then claims the
//! batch's keys in a statement of their own, answers the checkouts whose
//! key was taken, and decides the rest again.
//!
//! The task runs on a thread of its own, with the idempotency key writer
//! ([`crate::dedicated`]), and works on a connection of its own (never
//! queued behind request handlers for a pooled one), in as few round trips
//! as it can. Each batch is one transaction that first takes a transaction
//! advisory lock per item it sells (in item-id order, so two transactions
//! never wait on each other in a cycle): instances take turns on a hot
//! item, a batch each, instead of racing for its next sequence, and no lock
//! outlives its transaction, so the committer keeps no session state from
//! one statement's transaction to the next and works through a
//! transaction-mode connection pooler. A batch is closed only once its
//! items are locked, so the checkouts that reach an instance while it waits
//! for its turn are decided in that turn. A batch reads from the store only
//! what its copies may lack: the items' events since its copies (another
//! instance may have sold since), and the carts that no handler read with a
//! version (a handler's read of the cart and its version stands for the
//! cart). It then stores every event, deadline row and key in one
//! statement, commits, and goes on to the next batch while a task of its
//! own drops the checked-out carts from the cache and then answers the
//! buyers. The locks are only a courtesy; correctness rests on the events'
//! primary key, so a copy that is behind (a cart changed since the handler
//! read it, an item changed by a writer that takes no lock: the command
//! bus, releasing or committing stock) makes the batch conflict, and the
//! batch is read again in full and decided again after a short jittered
//! pause, a bounded number of times, holding no lock meanwhile.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::cart::{Cart, CartCommand, CartError, CartEvent};
use domain::inventory::{InventoryCommand, InventoryError, InventoryItem};
use domain::order::{NewOrderLine, Order, OrderCommand, OrderError, OrderEvent};
use domain::values::{Currency, Quantity};
use domain::Decider;
use futures_util::future::BoxFuture;
use futures_util::TryStreamExt;
use projections::stored_event::STORED_EVENT_COLUMNS;
use projections::{GlobalPosition, StoredEvent};
use rand::Rng;
use sqlx::{Connection, Either, Executor, FromRow, PgConnection};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::event_store::{
    appended, serialize_events, AppendError, EventColumns, EventStore, Metadata, NewEvent,
};
use crate::http::idempotency::ledger::{self, ClaimResult};
use crate::http::problem::ShortLine;
use crate::shop::cart::cart_key;
use projections::cache::VersionedCache;

/// Checkouts decided and stored together, at most.
const MAX_BATCH: usize = 512;
/// Tries per batch before its callers hear `Contention`.
const MAX_ATTEMPTS: u32 = 8;
/// Stored batches waiting for their carts' cached copies to be dropped
/// before their buyers hear back, at most; past this the committer waits.
const STORED_WAITING: usize = 64;
/// Aggregates kept in memory per kind; past this the copies are dropped and
/// reloaded on demand (they are only a head start, never the truth).
const MAX_CACHED: usize = 100_000;

/// One buyer's checkout, priced from the catalog by the caller.
#[derive(Debug, Clone)]
pub struct CheckoutRequest {
    pub order_id: Uuid,
    pub user_id: Uuid,
    /// Sorted by variant id, one line per variant.
    pub lines: Vec<NewOrderLine>,
    pub currency: Currency,
    pub placed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The version of the cart that `lines` were read from, when one read
    /// gave both (the carts read model, or its cached copy). The committer
    /// then takes `lines` as the cart at that version instead of reading
    /// the cart's events, and the events' key turns a cart that has moved
    /// on since into a conflict.
    pub cart_version: Option<i64>,
    pub metadata: Metadata,
    /// The request's idempotency key, when it is the committer's to claim;
    /// the checkout is decided only if the claim inserts it.
    pub key: Option<ledger::Claim>,
}

/// The committer's answer to one checkout.
#[derive(Debug)]
pub struct CheckoutAnswer {
    /// Whether the committer claimed the checkout's key (it was asked to,
    /// and the key was new): from then on the key is the caller's, also
    /// when the outcome is an error.
    pub key_claimed: bool,
    pub outcome: Result<CheckoutOutcome, CheckoutError>,
}

/// What became of a checkout.
#[derive(Debug)]
pub enum CheckoutOutcome {
    /// The order was placed (this is its `OrderPlaced`); its stock is held.
    Placed { placed: OrderEvent },
    /// This order id exists already (a retry of a checkout that got through).
    AlreadyPlaced,
    /// Nothing to check out.
    CartEmpty,
    /// The cart holds other lines than the ones the caller priced: read it
    /// again and retry.
    CartChanged,
    /// At least one line is short; every short line is listed.
    Short(Vec<ShortLine>),
    /// The order itself was refused (mixed currencies, say).
    Refused(OrderError),
    /// The key was there already (another request with it ran or runs, or
    /// came twice in one batch): nothing was decided.
    KeyTaken,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("other writers kept winning the race for these items; try again")]
    Contention,
    #[error("event store failure: {0}")]
    Store(String),
}

type Reply = oneshot::Sender<CheckoutAnswer>;

struct Job {
    request: CheckoutRequest,
    reply: Reply,
    key_claimed: bool,
}

impl Job {
    /// The key this checkout brings that is not claimed yet, if any.
    fn unclaimed_key(&self) -> Option<&ledger::Claim> {
        self.request.key.as_ref().filter(|_| !self.key_claimed)
    }

    fn answer(self, outcome: Result<CheckoutOutcome, CheckoutError>) {
        let _ = self.reply.send(CheckoutAnswer {
            key_claimed: self.key_claimed,
            outcome,
        });
    }
}

/// Hands checkouts to this instance's committing task.
#[derive(Clone)]
pub struct CheckoutCommitter {
    queue: mpsc::Sender<Job>,
}

impl CheckoutCommitter {
    /// The handle, and the committing task for the caller to run (the
    /// server runs it on a thread of its own, see [`crate::dedicated`]).
    pub fn new(store: EventStore, cached_carts: VersionedCache) -> (Self, BoxFuture<'static, ()>) {
        let (queue, receiver) = mpsc::channel(8192);
        let committing = async move {
            let (stored, to_answer) = mpsc::channel(STORED_WAITING);
            // A task of its own, so that the next batch is decided and
            // stored while Redis drops the last one's carts.
            let answering = tokio::spawn(answer_stored(to_answer, cached_carts.clone()));
            let worker = Worker {
                connection: None,
                store,
                items: HashMap::new(),
                carts: HashMap::new(),
                cached_carts,
                stored,
            };
            worker.run(receiver).await;
            // The worker's end closes the channel: every stored batch is
            // answered before the task ends.
            if let Err(error) = answering.await {
                tracing::error!(%error, "answering stored checkouts ended abnormally");
            }
        };
        (Self { queue }, Box::pin(committing))
    }

    pub async fn check_out(&self, request: CheckoutRequest) -> CheckoutAnswer {
        let stopped = || CheckoutAnswer {
            key_claimed: false,
            outcome: Err(CheckoutError::Store(
                "the checkout committer stopped".into(),
            )),
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            reply,
            key_claimed: false,
        };
        if self.queue.send(job).await.is_err() {
            return stopped();
        }
        answer.await.unwrap_or_else(|_| stopped())
    }
}

/// An aggregate as of `version`.
#[derive(Clone, Default)]
struct Versioned<A> {
    state: A,
    version: i64,
}

struct Worker {
    /// Opened on first use and after any failure.
    connection: Option<PgConnection>,
    store: EventStore,
    items: HashMap<Uuid, Versioned<InventoryItem>>,
    carts: HashMap<Uuid, Versioned<Cart>>,
    /// Carts checked out are dropped from here (by a tombstone at their new
    /// version) before the buyers hear back, so no cached cart outlives it:
    /// by the answering task, or here when that task is gone.
    cached_carts: VersionedCache,
    /// Where stored batches go to be answered once their carts are
    /// dropped from `cached_carts` (see [`answer_stored`]).
    stored: mpsc::Sender<StoredBatch>,
}

/// The checkouts that reached the committer after a batch was opened.
struct Waiting<'a> {
    queue: &'a mut mpsc::Receiver<Job>,
    /// Those taken from the queue whose items the batch did not lock.
    later: &'a mut VecDeque<Job>,
}

impl Waiting<'_> {
    /// Moves the checkouts waiting in the queue into `jobs`, those whose
    /// items are all in `locked`, up to `MAX_BATCH`; the others to `later`.
    fn join(&mut self, jobs: &mut Vec<Job>, locked: &BTreeSet<Uuid>) {
        while jobs.len() < MAX_BATCH {
            let Ok(job) = self.queue.try_recv() else {
                return;
            };
            let covered = job
                .request
                .lines
                .iter()
                .all(|line| locked.contains(&line.variant_id));
            if covered {
                jobs.push(job);
            } else {
                self.later.push_back(job);
            }
        }
    }
}

/// Tombstones the cached copies of carts just checked out, at their new
/// versions, in one round trip.
async fn drop_cached_carts<'a>(
    cached_carts: &VersionedCache,
    checked_out: impl Iterator<Item = &'a (Uuid, i64)>,
) {
    let entries: Vec<(String, i64)> = checked_out
        .map(|(user_id, version)| (cart_key(*user_id), *version))
        .collect();
    cached_carts.invalidate_many(&entries).await;
}

/// A stored batch: its buyers hear back once the carts it checked out are
/// gone from the cache.
struct StoredBatch {
    jobs: Vec<Job>,
    answers: Vec<Result<CheckoutOutcome, CheckoutError>>,
    /// Each cart checked out, with its version after the checkout.
    checked_out: Vec<(Uuid, i64)>,
}

impl StoredBatch {
    fn answer(self) {
        for (job, answer) in self.jobs.into_iter().zip(self.answers) {
            job.answer(answer);
        }
    }
}

/// Answers stored batches in the order they were stored, each once its
/// checked-out carts are tombstoned in the cache, so that no buyer can
/// read a cached cart that outlived the checkout. Batches that wait
/// together share one Redis round trip.
async fn answer_stored(mut stored: mpsc::Receiver<StoredBatch>, cached_carts: VersionedCache) {
    let mut batches = Vec::new();
    while stored.recv_many(&mut batches, STORED_WAITING).await > 0 {
        drop_cached_carts(
            &cached_carts,
            batches.iter().flat_map(|batch| &batch.checked_out),
        )
        .await;
        for batch in batches.drain(..) {
            batch.answer();
        }
    }
}

/// What a batch reads from the store before it is decided.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Only what the worker's copies may lack: the items' new events, and
    /// the carts no handler read with a version. Orders are not looked for
    /// (an order id already taken makes the new order's first event
    /// collide). The events' key catches anything newer when the batch is
    /// stored. The items are always read, under their locks: a refusal for
    /// want of stock stores nothing for the key to check, so it must rest
    /// on the items as stored, never on a copy.
    Changes,
    /// Every aggregate the batch touches, after a conflict.
    Everything,
}

/// What one attempt at a batch produced.
enum Attempt {
    Committed {
        outcomes: Vec<Result<CheckoutOutcome, CheckoutError>>,
        /// Each cart checked out, with its version after the checkout.
        checked_out: Vec<(Uuid, i64)>,
    },
    Conflict,
    /// A key the batch claimed was there already; nothing was stored.
    KeysTaken,
}

/// The batch's working copies, which become the worker's only on commit.
struct Working {
    items: HashMap<Uuid, Versioned<InventoryItem>>,
    carts: HashMap<Uuid, Versioned<Cart>>,
    existing_orders: HashSet<Uuid>,
}

/// One decided checkout, before the batch is stored.
enum Decision {
    Done(CheckoutOutcome),
    Failed(String),
    Place {
        events: Vec<NewEvent>,
        placed: OrderEvent,
        deadline: Deadline,
        cart: (Uuid, i64),
    },
}

struct Deadline {
    order_id: Uuid,
    user_id: Uuid,
    due_at: DateTime<Utc>,
    variant_ids: Vec<Uuid>,
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        // Checkouts taken from the queue for a batch whose items they do not
        // share; they start the next one.
        let mut later: VecDeque<Job> = VecDeque::new();
        loop {
            let first = match later.pop_front() {
                Some(job) => job,
                None => match queue.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                let Some(job) = later.pop_front().or_else(|| queue.try_recv().ok()) else {
                    break;
                };
                jobs.push(job);
            }
            let started = Instant::now();
            let mut waiting = Waiting {
                queue: &mut queue,
                later: &mut later,
            };
            self.commit(jobs, &mut waiting).await;
            metrics::histogram!("checkout_batch_duration_seconds")
                .record(started.elapsed().as_secs_f64());
        }
    }

    /// Decides and stores `jobs`, with the checkouts that join them while
    /// their items' locks are taken (from `waiting`, on the first attempt),
    /// and sees every one of them answered.
    async fn commit(&mut self, mut jobs: Vec<Job>, waiting: &mut Waiting<'_>) {
        let mut attempt = 0;
        let mut reading = Reading::Changes;
        let mut checked_out = Vec::new();
        let answers = loop {
            attempt += 1;
            let joining = (attempt == 1).then_some(&mut *waiting);
            match self.attempt(&mut jobs, joining, reading).await {
                Ok(Attempt::Committed {
                    outcomes,
                    checked_out: carts,
                }) => {
                    for job in &mut jobs {
                        job.key_claimed |= job.request.key.is_some();
                    }
                    checked_out = carts;
                    break outcomes;
                }
                Ok(Attempt::KeysTaken) => {
                    // A key of the batch was there already (a retry, or a
                    // key twice in the batch): nothing was stored. The keys
                    // are claimed on their own, the checkouts whose key
                    // was taken answered, and the rest decided again.
                    jobs = self.claim_keys(jobs).await;
                    if jobs.is_empty() {
                        return;
                    }
                }
                Ok(Attempt::Conflict) if attempt < MAX_ATTEMPTS => {
                    // Some copy was behind the store: read everything.
                    reading = Reading::Everything;
                    let pause = rand::rng().random_range(1..=(1u64 << attempt.min(5)));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Ok(Attempt::Conflict) => {
                    break jobs
                        .iter()
                        .map(|_| Err(CheckoutError::Contention))
                        .collect::<Vec<_>>()
                }
                Err(error) => {
                    tracing::error!(%error, "checkout batch failed");
                    // The commit may or may not have happened: start over
                    // from the store next time.
                    self.items.clear();
                    self.carts.clear();
                    let message = error.to_string();
                    break jobs
                        .iter()
                        .map(|_| Err(CheckoutError::Store(message.clone())))
                        .collect();
                }
            }
        };
        let batch = StoredBatch {
            jobs,
            answers,
            checked_out,
        };
        if batch.checked_out.is_empty() {
            batch.answer();
        } else if let Err(mpsc::error::SendError(batch)) = self.stored.send(batch).await {
            // The answering task is gone (it panicked): drop the carts here.
            drop_cached_carts(&self.cached_carts, batch.checked_out.iter()).await;
            batch.answer();
        }
    }

    /// Claims the keys the checkouts bring that are not claimed yet, in one
    /// statement of their own, and answers the checkouts whose key it did
    /// not claim; the others are returned to be decided again.
    async fn claim_keys(&mut self, jobs: Vec<Job>) -> Vec<Job> {
        let claims: Vec<&ledger::Claim> = jobs.iter().filter_map(Job::unclaimed_key).collect();
        if claims.is_empty() {
            return jobs;
        }
        let claimed = match self.open_connection().await {
            Ok(mut connection) => {
                let claimed = ledger::claim_keys(&mut connection, &claims).await;
                self.put_back(connection, claimed.is_ok());
                claimed
            }
            Err(error) => Err(error),
        };
        let mut results = match claimed {
            Ok(results) => results.into_iter(),
            Err(error) => {
                tracing::error!(%error, "checkout key claims failed");
                let message = format!("the checkouts' keys could not be claimed: {error}");
                let (unclaimed, claimed): (Vec<Job>, Vec<Job>) = jobs
                    .into_iter()
                    .partition(|job| job.unclaimed_key().is_some());
                for job in unclaimed {
                    job.answer(Err(CheckoutError::Store(message.clone())));
                }
                return claimed;
            }
        };
        let mut to_decide = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            if job.unclaimed_key().is_none() {
                to_decide.push(job);
                continue;
            }
            match results.next() {
                Some(ClaimResult::Inserted) => {
                    job.key_claimed = true;
                    to_decide.push(job);
                }
                Some(ClaimResult::Existing(_) | ClaimResult::Unseen) => {
                    job.answer(Ok(CheckoutOutcome::KeyTaken));
                }
                None => job.answer(Err(CheckoutError::Store(
                    "a checkout's key claim got no answer".into(),
                ))),
            }
        }
        to_decide
    }

    /// One transaction: takes the locks of the batch's items, lets the
    /// checkouts waiting for those items join it (when `joining`), reads
    /// what `reading` asks for, decides, stores and commits.
    async fn attempt(
        &mut self,
        jobs: &mut Vec<Job>,
        joining: Option<&mut Waiting<'_>>,
        reading: Reading,
    ) -> Result<Attempt, sqlx::Error> {
        let mut connection = self.open_connection().await?;
        let result = self
            .attempt_on(&mut connection, jobs, joining, reading)
            .await;
        self.put_back(connection, result.is_ok());
        result
    }

    async fn attempt_on(
        &mut self,
        connection: &mut PgConnection,
        jobs: &mut Vec<Job>,
        joining: Option<&mut Waiting<'_>>,
        reading: Reading,
    ) -> Result<Attempt, sqlx::Error> {
        let item_ids = item_ids(jobs.iter().map(|job| &job.request));
        let mut items: HashMap<Uuid, Versioned<InventoryItem>> = item_ids
            .iter()
            .map(|id| (*id, self.items.get(id).cloned().unwrap_or_default()))
            .collect();
        let versions: Vec<(Uuid, i64)> = item_ids
            .iter()
            .map(|id| (*id, items.get(id).map_or(0, |copy| copy.version)))
            .collect();
        // The turn on these items: from here the transaction is open, and
        // every way out of this function commits it, rolls it back, or
        // fails, and a failure drops the connection (see `put_back`).
        for event in begin_turn(connection, &versions).await? {
            if let Ok(id) = event.aggregate_id.parse::<Uuid>() {
                fold(items.get_mut(&id), &event)?;
            }
        }
        // While this instance waited for its turn, more checkouts may have
        // reached it; those whose items it now holds join the batch.
        if let Some(waiting) = joining {
            waiting.join(jobs, &item_ids);
            metrics::histogram!("checkout_batch_size").record(jobs.len() as f64);
        }
        let requests: Vec<&CheckoutRequest> = jobs.iter().map(|job| &job.request).collect();
        // Keys not yet claimed are claimed in the batch's own statement.
        let claims: Vec<&ledger::Claim> = jobs.iter().filter_map(Job::unclaimed_key).collect();
        let mut working = self.load(connection, &requests, items, reading).await?;
        let decided = Decided::new(&mut working, &requests);
        let stored = store_batch(connection, &decided.events, &decided.deadlines, &claims).await;
        let position = match stored {
            Ok(Stored::Appended(position)) => position,
            Ok(Stored::KeysTaken) => {
                // The locks go now, before this batch's keys are claimed on
                // their own.
                connection.execute("ROLLBACK").await?;
                return Ok(Attempt::KeysTaken);
            }
            Err(AppendError::Conflict) => {
                // Nor are they held through the pause before the next try.
                connection.execute("ROLLBACK").await?;
                return Ok(Attempt::Conflict);
            }
            Err(AppendError::Database(error)) => return Err(error),
        };
        connection.execute("COMMIT").await?;

        if position.is_some() {
            self.store.signal_appended();
        }
        self.keep(working);
        Ok(Attempt::Committed {
            outcomes: decided.outcomes,
            checked_out: decided.checked_out,
        })
    }

    /// This committer's connection, opened again after a failure.
    async fn open_connection(&mut self) -> Result<PgConnection, sqlx::Error> {
        match self.connection.take() {
            Some(connection) => Ok(connection),
            None => {
                let options = crate::db::own_connection_options(
                    self.store.pool(),
                    crate::db::application_names::CHECKOUT_COMMITTER,
                );
                PgConnection::connect_with(&options).await
            }
        }
    }

    /// Keeps the connection after a success. After any error it is dropped,
    /// which ends the session (and a transaction left open in it).
    fn put_back(&mut self, connection: PgConnection, succeeded: bool) {
        if succeeded {
            self.connection = Some(connection);
        }
    }

    /// Copies of every aggregate the batch touches: `items`, already
    /// brought up to date under their locks, and the carts and orders,
    /// with what `reading` asks for read from the store.
    async fn load(
        &self,
        connection: &mut PgConnection,
        requests: &[&CheckoutRequest],
        items: HashMap<Uuid, Versioned<InventoryItem>>,
        reading: Reading,
    ) -> Result<Working, sqlx::Error> {
        let mut keys = Vec::new();
        let handed = match reading {
            Reading::Changes => handed_carts(requests),
            Reading::Everything => HashMap::new(),
        };
        let mut carts: HashMap<Uuid, Versioned<Cart>> = HashMap::new();
        for request in requests {
            if carts.contains_key(&request.user_id) {
                continue;
            }
            let copy = self
                .carts
                .get(&request.user_id)
                .cloned()
                .unwrap_or_default();
            let cart = match handed.get(&request.user_id) {
                Some(&(version, lines)) if version >= copy.version => Versioned {
                    state: Cart::holding(lines.iter().map(|line| (line.variant_id, line.quantity))),
                    version,
                },
                _ => {
                    keys.push(("Cart", request.user_id, copy.version));
                    copy
                }
            };
            carts.insert(request.user_id, cart);
        }
        if reading == Reading::Everything {
            keys.extend(
                requests
                    .iter()
                    .map(|request| ("Order", request.order_id, 0)),
            );
        }

        let mut existing_orders = HashSet::new();
        if !keys.is_empty() {
            for event in events_after(connection, &keys).await? {
                let Ok(id) = event.aggregate_id.parse::<Uuid>() else {
                    continue;
                };
                match event.aggregate_type.as_str() {
                    "Cart" => fold(carts.get_mut(&id), &event)?,
                    _ => {
                        existing_orders.insert(id);
                    }
                }
            }
        }
        Ok(Working {
            items,
            carts,
            existing_orders,
        })
    }

    fn keep(&mut self, working: Working) {
        if self.items.len() > MAX_CACHED {
            self.items.clear();
        }
        if self.carts.len() > MAX_CACHED {
            self.carts.clear();
        }
        self.items.extend(working.items);
        self.carts.extend(working.carts);
    }
}

/// The carts the batch's handlers read with a version, by user: the lines
/// each read, as the cart at that version. A user whose checkouts in the
/// batch read different versions is left out (the cart is read instead).
fn handed_carts<'a>(requests: &[&'a CheckoutRequest]) -> HashMap<Uuid, (i64, &'a [NewOrderLine])> {
    let mut handed: HashMap<Uuid, Option<(i64, &'a [NewOrderLine])>> = HashMap::new();
    for request in requests {
        let this = request
            .cart_version
            .map(|version| (version, request.lines.as_slice()));
        handed
            .entry(request.user_id)
            .and_modify(|agreed| {
                if agreed.map(|(version, _)| version) != this.map(|(version, _)| version) {
                    *agreed = None;
                }
            })
            .or_insert(this);
    }
    handed
        .into_iter()
        .filter_map(|(user_id, agreed)| Some((user_id, agreed?)))
        .collect()
}

/// A batch decided against working copies: what to store, and each
/// checkout's outcome.
struct Decided {
    events: Vec<NewEvent>,
    deadlines: Vec<Deadline>,
    /// Each cart checked out, with its version after the checkout.
    checked_out: Vec<(Uuid, i64)>,
    outcomes: Vec<Result<CheckoutOutcome, CheckoutError>>,
}

impl Decided {
    /// Decides the checkouts in order, each against the copies as the
    /// ones before it left them.
    fn new(working: &mut Working, requests: &[&CheckoutRequest]) -> Self {
        let mut decided = Self {
            events: Vec::new(),
            deadlines: Vec::new(),
            checked_out: Vec::new(),
            outcomes: Vec::with_capacity(requests.len()),
        };
        for request in requests {
            let outcome = match decide(working, request) {
                Decision::Done(outcome) => Ok(outcome),
                Decision::Failed(error) => Err(CheckoutError::Store(error)),
                Decision::Place {
                    events,
                    placed,
                    deadline,
                    cart,
                } => {
                    decided.events.extend(events);
                    decided.deadlines.push(deadline);
                    decided.checked_out.push(cart);
                    Ok(CheckoutOutcome::Placed { placed })
                }
            };
            decided.outcomes.push(outcome);
        }
        decided
    }
}

fn fold<A: Aggregate>(
    copy: Option<&mut Versioned<A>>,
    event: &StoredEvent,
) -> Result<(), sqlx::Error>
where
    A::Event: serde::de::DeserializeOwned,
{
    let Some(copy) = copy else { return Ok(()) };
    let decoded: A::Event = event
        .decode()
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
    copy.state.apply(decoded);
    copy.version = event.sequence;
    Ok(())
}

/// Decides one checkout against the working copies, applying its events to
/// them if it goes through.
fn decide(working: &mut Working, request: &CheckoutRequest) -> Decision {
    let order_id = request.order_id;
    if working.existing_orders.contains(&order_id) {
        return Decision::Done(CheckoutOutcome::AlreadyPlaced);
    }
    let cart = working.carts.entry(request.user_id).or_default();
    let cart_events = match cart.state.decide(CartCommand::CheckOut { order_id }) {
        Ok(events) if events.is_empty() => return Decision::Done(CheckoutOutcome::AlreadyPlaced),
        Ok(events) => events,
        Err(CartError::Empty) => return Decision::Done(CheckoutOutcome::CartEmpty),
        Err(CartError::QuantityTooLarge { .. }) => {
            return Decision::Done(CheckoutOutcome::CartChanged)
        }
    };
    if !cart_matches(&cart_events, &request.lines) {
        return Decision::Done(CheckoutOutcome::CartChanged);
    }

    // Every line is decided against the copies as they are before this
    // checkout (lines are distinct variants), so a short line leaves nothing
    // to undo and all short lines are found.
    let mut reservations = Vec::with_capacity(request.lines.len());
    let mut short = Vec::new();
    for line in &request.lines {
        let item = working.items.entry(line.variant_id).or_default();
        let quantity = line.quantity;
        match item
            .state
            .decide(InventoryCommand::Reserve { order_id, quantity })
        {
            Ok(events) => reservations.push((line.variant_id, events)),
            Err(InventoryError::InsufficientStock {
                requested,
                available,
            }) => short.push(ShortLine {
                variant_id: line.variant_id,
                requested,
                available,
            }),
            Err(_not_sellable) => short.push(ShortLine {
                variant_id: line.variant_id,
                requested: quantity.get(),
                available: 0,
            }),
        }
    }
    if !short.is_empty() {
        return Decision::Done(CheckoutOutcome::Short(short));
    }
    let place = OrderCommand::Place {
        order_id,
        user_id: request.user_id,
        lines: request.lines.clone(),
        currency: request.currency.clone(),
        placed_at: request.placed_at,
        expires_at: request.expires_at,
    };
    let order_events = match Order::default().decide(place) {
        Ok(events) => events,
        Err(error) => return Decision::Done(CheckoutOutcome::Refused(error)),
    };
    let Some(placed) = order_events.first().cloned() else {
        return Decision::Done(CheckoutOutcome::AlreadyPlaced);
    };

    let mut events = Vec::new();
    let serialized = (|| -> Result<(), serde_json::Error> {
        let metadata = &request.metadata.to_json()?;
        for (variant_id, item_events) in &reservations {
            let item = working.items.entry(*variant_id).or_default();
            events.extend(serialize_events::<InventoryItem>(
                &variant_id.to_string(),
                item_events,
                item.version,
                metadata,
            )?);
        }
        events.extend(serialize_events::<Order>(
            &order_id.to_string(),
            &order_events,
            0,
            metadata,
        )?);
        // The cart's event comes after the order's, so it takes a later
        // position: a buyer's order list waits for the cart's last event
        // (`shop::orders`), which then covers the order.
        let cart = working.carts.entry(request.user_id).or_default();
        events.extend(serialize_events::<Cart>(
            &request.user_id.to_string(),
            &cart_events,
            cart.version,
            metadata,
        )?);
        Ok(())
    })();
    if let Err(error) = serialized {
        return Decision::Failed(format!("checkout events could not be serialized: {error}"));
    }

    for (variant_id, item_events) in reservations {
        let item = working.items.entry(variant_id).or_default();
        item.version += item_events.len() as i64;
        for event in item_events {
            item.state.apply(event);
        }
    }
    let cart = working.carts.entry(request.user_id).or_default();
    cart.version += cart_events.len() as i64;
    for event in cart_events {
        cart.state.apply(event);
    }
    working.existing_orders.insert(order_id);
    Decision::Place {
        events,
        placed,
        deadline: Deadline {
            order_id,
            user_id: request.user_id,
            due_at: request.expires_at,
            variant_ids: request.lines.iter().map(|line| line.variant_id).collect(),
        },
        cart: (request.user_id, cart.version),
    }
}

/// Every item the checkouts reserve from, in id order.
fn item_ids<'a>(requests: impl Iterator<Item = &'a CheckoutRequest>) -> BTreeSet<Uuid> {
    requests
        .flat_map(|request| request.lines.iter().map(|line| line.variant_id))
        .collect()
}

/// Whether the cart would check out exactly the lines the caller priced.
fn cart_matches(cart_events: &[CartEvent], lines: &[NewOrderLine]) -> bool {
    let Some(CartEvent::CartCheckedOut {
        lines: cart_lines, ..
    }) = cart_events.first()
    else {
        return false;
    };
    cart_lines.len() == lines.len()
        && cart_lines.iter().all(|cart_line| {
            lines.iter().any(|line| {
                line.variant_id == cart_line.variant_id
                    && Quantity::try_from(i64::from(cart_line.quantity)).ok() == Some(line.quantity)
            })
        })
}

/// Opens a batch's transaction, takes the locks of its items (`versions`:
/// each item's id and the version of the worker's copy) one after another
/// in id order (a `BTreeSet` iterates sorted), and reads the items' events
/// after those versions, all in one round trip: statements of one simple
/// query, each with a snapshot of its own, so the read sees everything the
/// last lock holder committed. The ids and versions are a uuid's and an
/// integer's own formatting, nothing a caller wrote.
async fn begin_turn(
    connection: &mut PgConnection,
    versions: &[(Uuid, i64)],
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let mut sql = String::from("BEGIN");
    for (id, _) in versions {
        sql.push_str(&format!(
            "; SELECT pg_advisory_xact_lock(hashtextextended('InventoryItem/{id}', 0))"
        ));
    }
    if versions.is_empty() {
        // Checkouts without lines (the committer's callers send none, but
        // it answers them, as empty carts, rather than fail on `VALUES ()`).
        connection.execute(sql.as_str()).await?;
        return Ok(Vec::new());
    }
    let after: Vec<String> = versions
        .iter()
        .map(|(id, version)| format!("('{id}', {version}::bigint)"))
        .collect();
    sql.push_str(&format!(
        "; SELECT {STORED_EVENT_COLUMNS} FROM (VALUES {}) AS k(id, after) \
         JOIN events e ON e.aggregate_type = 'InventoryItem' \
                      AND e.aggregate_id = k.id AND e.sequence > k.after \
         ORDER BY e.aggregate_id, e.sequence",
        after.join(", ")
    ));
    // The read's rows come after the results of `BEGIN` and of each lock.
    let statements_before_read = 1 + versions.len();
    let mut finished = 0;
    let mut events = Vec::new();
    let mut results = sqlx::raw_sql(&sql).fetch_many(&mut *connection);
    while let Some(result) = results.try_next().await? {
        match result {
            Either::Left(_) => finished += 1,
            Either::Right(row) if finished == statements_before_read => {
                events.push(StoredEvent::from_row(&row)?);
            }
            Either::Right(_) => {}
        }
    }
    Ok(events)
}

/// Every stored event after the given version of each aggregate, in order.
async fn events_after(
    connection: &mut PgConnection,
    keys: &[(&'static str, Uuid, i64)],
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let types: Vec<&str> = keys.iter().map(|key| key.0).collect();
    let ids: Vec<String> = keys.iter().map(|key| key.1.to_string()).collect();
    let after: Vec<i64> = keys.iter().map(|key| key.2).collect();
    // The keys' columns are named apart from the events' so that the
    // events' columns need no qualifying.
    sqlx::query_as::<_, StoredEvent>(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(kind, id, after) \
         JOIN events e ON e.aggregate_type = k.kind AND e.aggregate_id = k.id \
                      AND e.sequence > k.after \
         ORDER BY e.aggregate_type, e.aggregate_id, e.sequence"
    ))
    .bind(&types)
    .bind(&ids)
    .bind(&after)
    .fetch_all(connection)
    .await
}

/// What storing a batch did.
enum Stored {
    /// Everything was stored; the position of the last event, if any.
    Appended(Option<GlobalPosition>),
    /// A key to claim was there already: nothing was stored.
    KeysTaken,
}

const IDEMPOTENCY_KEYS_PRIMARY_KEY: &str = "idempotency_keys_pkey";

/// Stores the events, the deadline rows and the claims of the keys not yet
/// claimed in one statement, which commits as one transaction: no order
/// without its deadline, no deadline without its order, and no checkout
/// decided on a key that another request holds. A key that is there
/// already fails the whole statement (its insert is a plain one), as an
/// event whose sequence is taken does.
async fn store_batch(
    connection: &mut PgConnection,
    events: &[NewEvent],
    deadlines: &[Deadline],
    claims: &[&ledger::Claim],
) -> Result<Stored, AppendError> {
    if events.is_empty() && claims.is_empty() {
        return Ok(Stored::Appended(None));
    }
    // Variant ids travel as one text per order (Postgres has no array of
    // arrays of different lengths); the cast rebuilds each uuid[].
    let order_ids: Vec<Uuid> = deadlines.iter().map(|d| d.order_id).collect();
    let user_ids: Vec<Uuid> = deadlines.iter().map(|d| d.user_id).collect();
    let due: Vec<DateTime<Utc>> = deadlines.iter().map(|d| d.due_at).collect();
    let variants: Vec<String> = deadlines
        .iter()
        .map(|d| {
            let ids: Vec<String> = d.variant_ids.iter().map(Uuid::to_string).collect();
            format!("{{{}}}", ids.join(","))
        })
        .collect();
    let claims = ledger::ClaimColumns::new(claims);
    // Keys are inserted in key order, as the key writer inserts them, so
    // that two statements never wait on each other's keys in a cycle.
    let sql = format!(
        "WITH appended AS ({}), \
              deadlines AS ( \
                INSERT INTO order_deadlines (order_id, user_id, due_at, variant_ids) \
                SELECT order_id, user_id, due_at, variant_ids::uuid[] \
                FROM UNNEST($8::uuid[], $9::uuid[], $10::timestamptz[], $11::text[]) \
                     AS d(order_id, user_id, due_at, variant_ids) \
                ON CONFLICT (order_id) DO NOTHING), \
              claimed AS ( \
                INSERT INTO idempotency_keys (user_id, key, fingerprint, leased_until) \
                SELECT user_id, key, fingerprint, now() + make_interval(secs => lease_seconds) \
                FROM UNNEST($12::uuid[], $13::text[], $14::bytea[], $15::float8[]) \
                     AS k(user_id, key, fingerprint, lease_seconds) \
                ORDER BY user_id, key) \
         SELECT max(txid), max(position) FROM appended",
        EventColumns::INSERT
    );
    let columns = EventColumns::new(events);
    let query = columns
        .bind(sqlx::query_as(&sql))
        .bind(&order_ids)
        .bind(&user_ids)
        .bind(&due)
        .bind(&variants);
    let result: Result<(Option<i64>, Option<i64>), sqlx::Error> =
        claims.bind(query).fetch_one(connection).await;
    match result {
        Ok((Some(txid), Some(position))) => {
            appended(Ok((txid, position)), events.len()).map(Stored::Appended)
        }
        Ok(_) => Ok(Stored::Appended(None)),
        Err(sqlx::Error::Database(error))
            if error.constraint() == Some(IDEMPOTENCY_KEYS_PRIMARY_KEY) =>
        {
            Ok(Stored::KeysTaken)
        }
        Err(error) => appended(Err(error), events.len()).map(Stored::Appended),
    }
}
