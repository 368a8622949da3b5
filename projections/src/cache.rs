//! A versioned Redis cache in front of the read models.
//!
//! Each entry is a hash `{v: version, body: json}` where `version` is the
//! sequence of the aggregate the body was built from. Every write goes through
//! one Lua script that refuses to move an entry backwards, so a slow reader
//! that built its body from an old row can never replace a newer value.
//! Invalidation writes a tombstone `{v: new_version}` with no body instead of
//! deleting the key: a plain DEL would let that slow reader back in.
//!
//! Redis is only ever a cache here: errors and timeouts are logged at debug
//! level and read as misses, so with Redis down every answer comes from
//! Postgres. A change that could not be written is owed as a tombstone and
//! written as soon as Redis answers again; until then this instance reads
//! around Redis, so no old entry that survived the outage is served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Writes `{v, body}` (mode `set` or `replace`) or a tombstone `{v}` (mode
/// `tombstone`). `set` writes a body over nothing, over an older version, or
/// over a tombstone of the same version; `replace` also over a body of the
/// same version; a tombstone goes over anything not newer than itself. All
/// refresh the expiry. Returns 1 when it wrote.
const WRITE_SCRIPT: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], 'v'))
local version = tonumber(ARGV[1])
if ARGV[2] == 'set' then
  if stored ~= nil then
    if stored > version then return 0 end
    if stored == version and redis.call('HEXISTS', KEYS[1], 'body') == 1 then return 0 end
  end
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'body', ARGV[3])
elseif ARGV[2] == 'replace' then
  if stored ~= nil and stored > version then return 0 end
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'body', ARGV[3])
else
  if stored ~= nil and stored > version then return 0 end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// How long any one Redis call may take before it counts as a miss.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed call, reads and value writes skip Redis this long, so a
/// dead Redis costs one timeout now and then instead of one per call.
/// Writes that record a change are always attempted: a dropped one could
/// leave a stale value behind.
const BREAKER_PAUSE: Duration = Duration::from_secs(2);

/// What a hit holds: the body and the version it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached<T> {
    pub version: i64,
    pub body: T,
}

/// A handle on the cache: cheap to clone, shared by projections and handlers.
#[derive(Clone)]
pub struct VersionedCache {
    connection: Option<ConnectionManager>,
    prefix: String,
    ttl: Duration,
    script: Arc<redis::Script>,
    /// Whether Redis counts as down, and the changes it has not taken yet.
    health: Arc<Mutex<Health>>,
    /// Reads on this connection not sent yet, which later reads join.
    gathering: Arc<together::Gathering>,
}

impl VersionedCache {
    /// A cache on `connection` whose keys all start with `prefix` (the
    /// deployment's, so that tests and deployments sharing a Redis never see
    /// each other's keys). `None` gives a cache that always misses.
    pub fn new(connection: Option<ConnectionManager>, prefix: impl Into<String>) -> Self {
        Self {
            connection,
            prefix: prefix.into(),
            ttl: Duration::from_secs(3600),
            script: Arc::new(redis::Script::new(WRITE_SCRIPT)),
            health: Arc::default(),
            gathering: Arc::default(),
        }
    }

    /// A cache that stores nothing: every read misses, every write is dropped.
    pub fn disabled() -> Self {
        Self::new(None, "")
    }

    /// Entries (tombstones too) expire after `ttl`, so a missed invalidation
    /// heals by itself.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// This cache (same keys, expiry and failure state) on another
    /// connection.
    pub fn on_connection(mut self, connection: Option<ConnectionManager>) -> Self {
        self.connection = connection;
        self.gathering = Arc::default();
        self
    }

    /// The full key of an entry.
    pub fn key(&self, name: &str) -> String {
        [self.prefix.as_str(), name].concat()
    }

    /// The entry under `name`, if it has a body that parses.
    pub async fn get<T: DeserializeOwned>(&self, name: &str) -> Option<Cached<T>> {
        let mut command = redis::cmd("HMGET");
        command.arg(self.key(name)).arg("v").arg("body");
        let (version, body): (Option<i64>, Option<String>) = self.run(name, &command).await?;
        decode(name, version, body)
    }

    /// Several entries in one round trip, in the order of `names`.
    pub async fn get_many<T: DeserializeOwned>(&self, names: &[String]) -> Vec<Option<Cached<T>>> {
        if names.is_empty() {
            return Vec::new();
        }
        let mut pipeline = redis::pipe();
        for name in names {
            pipeline
                .cmd("HMGET")
                .arg(self.key(name))
                .arg("v")
                .arg("body");
        }
        let Some(mut connection) = self.healthy() else {
            return names.iter().map(|_| None).collect();
        };
        let reply = tokio::time::timeout(CALL_TIMEOUT, pipeline.query_async(&mut connection)).await;
        let replies: Option<Vec<(Option<i64>, Option<String>)>> = self.outcome("pipeline", reply);
        match replies {
            Some(replies) if replies.len() == names.len() => names
                .iter()
                .zip(replies)
                .map(|(name, (version, body))| decode(name, version, body))
                .collect(),
            _ => names.iter().map(|_| None).collect(),
        }
    }

    /// Stores `body` as the value at `version`, unless the entry already
    /// holds something newer (or this very version with a body). For filling
    /// the cache after a miss: skipped while Redis counts as down.
    pub async fn put<T: Serialize>(&self, name: &str, version: i64, body: &T) {
        if let Some(json) = to_json(name, body) {
            self.write(name, version, Mode::Fill, &json).await;
        }
    }

    /// Like `put`, for a value that just changed: always attempted, even
    /// while Redis counts as down, because skipping it could leave an older
    /// value in place once Redis answers again.
    pub async fn refresh<T: Serialize>(&self, name: &str, version: i64, body: &T) {
        if let Some(json) = to_json(name, body) {
            self.write(name, version, Mode::Change, &json).await;
        }
    }

    /// Like `refresh`, but also over a body of the same version: for a value
    /// known to be right at `version` while the cached one, of that same
    /// version, may be wrong (a rebuild repairs rows without changing their
    /// version). In one step, so no reader's fill can slip in between.
    pub async fn replace<T: Serialize>(&self, name: &str, version: i64, body: &T) {
        if let Some(json) = to_json(name, body) {
            self.write(name, version, Mode::Replace, &json).await;
        }
    }

    /// Marks the entry as changed at `version`: readers miss until someone
    /// stores a body of that version or newer.
    pub async fn invalidate(&self, name: &str, version: i64) {
        self.write(name, version, Mode::Tombstone, "").await;
    }

    /// [`VersionedCache::invalidate`] for many entries in one round trip
    /// (a pipeline of the write script by its hash).
    pub async fn invalidate_many(&self, entries: &[(String, i64)]) {
        let Some(mut connection) = self.connection.clone() else {
            return;
        };
        if entries.is_empty() {
            return;
        }
        let mut pipeline = redis::pipe();
        self.push_tombstones(&mut pipeline, entries);
        let reply =
            tokio::time::timeout(CALL_TIMEOUT, pipeline.query_async::<()>(&mut connection)).await;
        if let Ok(Err(_)) = reply {
            // Most likely NOSCRIPT (Redis restarted and forgot the script):
            // the one-by-one path loads it.
            for (name, version) in entries {
                self.invalidate(name, *version).await;
            }
            return;
        }
        if self.outcome("(tombstones)", reply).is_none() {
            self.owe(entries.iter().cloned());
        }
    }

    /// Adds a tombstone write (the write script by its hash) for each entry
    /// to `pipeline`, its replies ignored.
    fn push_tombstones(&self, pipeline: &mut redis::Pipeline, entries: &[(String, i64)]) {
        for (name, version) in entries {
            pipeline
                .cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(self.key(name))
                .arg(version)
                .arg("tombstone")
                .arg("")
                .arg(self.ttl_millis())
                .ignore();
        }
    }

    /// A plain string entry (for mappings that never change, such as a slug
    /// to its product's id).
    pub async fn get_text(&self, name: &str) -> Option<String> {
        let mut command = redis::cmd("GET");
        command.arg(self.key(name));
        self.run::<Option<String>>(name, &command).await.flatten()
    }

    /// Stores a plain string entry with the cache's expiry.
    pub async fn put_text(&self, name: &str, value: &str) {
        let mut command = redis::cmd("SET");
        command
            .arg(self.key(name))
            .arg(value)
            .arg("PX")
            .arg(self.ttl_millis());
        let _: Option<()> = self.run(name, &command).await;
    }

    fn ttl_millis(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    async fn write(&self, name: &str, version: i64, mode: Mode, body: &str) {
        let connection = match mode {
            Mode::Fill => self.healthy(),
            Mode::Change | Mode::Replace | Mode::Tombstone => self.connection.clone(),
        };
        let script_mode = match mode {
            Mode::Fill | Mode::Change => "set",
            Mode::Replace => "replace",
            Mode::Tombstone => "tombstone",
        };
        let Some(mut connection) = connection else {
            return;
        };
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.key(name))
            .arg(version)
            .arg(script_mode)
            .arg(body)
            .arg(self.ttl_millis());
        let reply = tokio::time::timeout(
            CALL_TIMEOUT,
            invocation.invoke_async::<i64>(&mut connection),
        )
        .await;
        if self.outcome(name, reply).is_none() && !matches!(mode, Mode::Fill) {
            self.owe([(name.to_owned(), version)]);
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, name: &str, command: &redis::Cmd) -> Option<T> {
        let mut connection = self.healthy()?;
        let reply = tokio::time::timeout(CALL_TIMEOUT, command.query_async(&mut connection)).await;
        self.outcome(name, reply)
    }

    /// The connection, unless a recent failure says Redis is down or a
    /// change is still owed to it.
    fn healthy(&self) -> Option<ConnectionManager> {
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if !health.owed.is_empty() {
            return None;
        }
        match health.failed_at {
            Some(failed) if failed.elapsed() < BREAKER_PAUSE => None,
            _ => self.connection.clone(),
        }
    }

    /// Records changes Redis did not take, as tombstones to write once it
    /// answers again, and starts the task that writes them.
    fn owe(&self, entries: impl IntoIterator<Item = (String, i64)>) {
        if self.connection.is_none() {
            return;
        }
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, version) in entries {
            let owed = health.owed.entry(name).or_insert(version);
            *owed = (*owed).max(version);
        }
        if health.owed.is_empty() || health.paying {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        health.paying = true;
        runtime.spawn(self.clone().pay_owed());
    }

    /// Writes the owed tombstones, every [`BREAKER_PAUSE`] until Redis takes
    /// them; changes owed meanwhile go out in the next round.
    async fn pay_owed(self) {
        let Some(mut connection) = self.connection.clone() else {
            return;
        };
        loop {
            tokio::time::sleep(BREAKER_PAUSE).await;
            let owed: Vec<(String, i64)> = {
                let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
                health
                    .owed
                    .iter()
                    .map(|(name, v)| (name.clone(), *v))
                    .collect()
            };
            let mut pipeline = redis::pipe();
            pipeline
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(WRITE_SCRIPT)
                .ignore();
            self.push_tombstones(&mut pipeline, &owed);
            let reply =
                tokio::time::timeout(CALL_TIMEOUT, pipeline.query_async::<()>(&mut connection))
                    .await;
            if self.outcome("(owed tombstones)", reply).is_none() {
                continue;
            }
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            for (name, version) in owed {
                if health.owed.get(&name).is_some_and(|owed| *owed <= version) {
                    health.owed.remove(&name);
                }
            }
            if health.owed.is_empty() {
                health.paying = false;
                tracing::info!("cache changes owed during a Redis failure are written");
                return;
            }
        }
    }

    /// A call's value, or `None` (logged, and the breaker opened) on failure.
    fn outcome<T>(
        &self,
        name: &str,
        reply: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let failure = match reply {
            Ok(Ok(value)) => {
                self.health
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .failed_at = None;
                return Some(value);
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
        };
        tracing::debug!(
            key = name,
            error = failure,
            "cache call failed; treating as a miss"
        );
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed_at = Some(Instant::now());
        None
    }
}

/// What the cache knows of Redis's state, shared by every handle on it.
#[derive(Default)]
struct Health {
    /// When the last failure happened, while Redis counts as down.
    failed_at: Option<Instant>,
    /// Changes not written (the newest version of each entry), owed as
    /// tombstones.
    owed: HashMap<String, i64>,
    /// Whether a task is writing `owed`.
    paying: bool,
}

/// Why a write happens, which decides whether a down Redis is tried anyway.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// A value read from Postgres after a miss.
    Fill,
    /// A value that just changed.
    Change,
    /// A value that is right, over a cached one that may not be.
    Replace,
    /// A change whose new value is not at hand.
    Tombstone,
}

fn to_json<T: Serialize>(name: &str, body: &T) -> Option<String> {
    match serde_json::to_string(body) {
        Ok(json) => Some(json),
        Err(error) => {
            tracing::debug!(key = name, %error, "cache body did not serialise");
            None
        }
    }
}

fn decode<T: DeserializeOwned>(
    name: &str,
    version: Option<i64>,
    body: Option<String>,
) -> Option<Cached<T>> {
    let (version, body) = (version?, body?);
    match serde_json::from_str(&body) {
        Ok(body) => Some(Cached { version, body }),
        Err(error) => {
            // A body of an older shape (after a deploy): a miss, rebuilt soon.
            tracing::debug!(key = name, %error, "cached body did not parse");
            None
        }
    }
}

/// Cache entry names, in one place so writers and readers agree.
pub mod keys {
    use uuid::Uuid;

    /// A product's detail without stock, at the product's version.
    pub fn product(product_id: Uuid) -> String {
        with_id("catalog:product:", product_id)
    }

    /// A slug's product id (a slug never moves to another product).
    pub fn product_slug(slug: &str) -> String {
        ["catalog:slug:", slug].concat()
    }

    /// A category's `{id, slug, name}`, at the category's version.
    pub fn category(category_id: Uuid) -> String {
        with_id("catalog:category:", category_id)
    }

    /// A variant's stock, at its InventoryItem's version.
    pub fn stock(variant_id: Uuid) -> String {
        with_id("stock:", variant_id)
    }

    /// A user's cart, at its Cart's version. Its lines are the cart at the
    /// entry's version: a checkout takes them as the cart. Entries filled
    /// before that held (`cart:`, whose lines and version came from two
    /// reads) are never read.
    pub fn cart(user_id: Uuid) -> String {
        with_id("cart-at-version:", user_id)
    }

    /// `name` and the id in its hyphenated form. A read names several keys,
    /// and building them with `format!` took 2% of the server's CPU in a
    /// profile of cart reads.
    pub fn with_id(name: &str, id: Uuid) -> String {
        [
            name,
            id.hyphenated().encode_lower(&mut Uuid::encode_buffer()),
        ]
        .concat()
    }
}

pub use together::{Snapshot, Start};

/// Reads of an entry together with the entries it needs (a product's stock
/// and category, a cart's products and stock) in one round trip: each read
/// remembers what the entry needed, and the next read of that entry asks for
/// those entries in the same pipeline. The memory is only a guess; what a
/// reader uses is checked against what Redis answered, so a wrong guess
/// costs a second round trip and never a wrong answer.
mod together {
    use std::any::Any;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, PoisonError};

    use redis::aio::ConnectionManager;
    use serde::de::DeserializeOwned;
    use tokio::sync::watch;
    use uuid::Uuid;

    use super::{Cached, VersionedCache, CALL_TIMEOUT};

    /// Remembered reads (and parsed bodies) beyond this many are all
    /// forgotten at once: memory stays bounded, and the entries that are
    /// read often come back at once.
    const MAX_REMEMBERED: usize = 10_000;
    /// The same for the bytes of the parsed bodies kept (each counted
    /// twice, for its parsed value).
    const MAX_PARSED_BYTES: usize = 32 * 1024 * 1024;

    /// Where a read starts.
    #[derive(Debug, Clone, Copy)]
    pub enum Start<'a> {
        /// The entry with this name.
        Entry(&'a str),
        /// The entry that `names` gives for the id held by the text entry
        /// `text` (a slug's product, say).
        ThroughText {
            text: &'a str,
            names: fn(Uuid) -> String,
        },
    }

    /// What the last read from a starting point led to.
    #[derive(Debug, PartialEq, Eq)]
    struct Remembered {
        /// The entry a text entry led to.
        first: Option<String>,
        /// The entries the first one needed.
        needed: Vec<String>,
    }

    /// Entries read together, by name: `None` for a name read and not found
    /// (or found without a body).
    #[derive(Debug, Default)]
    pub struct Snapshot {
        /// The text entry's value, when the read started through one.
        pub text: Option<String>,
        /// The prefixed name of where the read started.
        start: String,
        /// The entry the text entry led to.
        through_text: Option<String>,
        remembered: Option<Arc<Remembered>>,
        entries: HashMap<String, Option<Cached<Vec<u8>>>>,
    }

    impl Snapshot {
        /// The entry under `name`, if this read found it with a body that parses.
        pub fn get<T: DeserializeOwned>(&self, name: &str) -> Option<Cached<T>> {
            let found = self.entries.get(name)?.as_ref()?;
            match serde_json::from_slice(&found.body) {
                Ok(body) => Some(Cached {
                    version: found.version,
                    body,
                }),
                Err(error) => {
                    // A body of an older shape (after a deploy): a miss, rebuilt soon.
                    tracing::debug!(key = name, %error, "cached body did not parse");
                    None
                }
            }
        }

        /// The version of the entry under `name`, if this read found it
        /// with a body.
        pub fn version(&self, name: &str) -> Option<i64> {
            Some(self.entries.get(name)?.as_ref()?.version)
        }

        /// The body under `name` as stored, if this read found one.
        pub fn raw(&self, name: &str) -> Option<&[u8]> {
            Some(&self.entries.get(name)?.as_ref()?.body)
        }

        /// Like [`Self::get`] without the version, but each distinct body
        /// is parsed once: a read that finds the very body an earlier read
        /// parsed shares its value.
        pub fn get_shared<T>(&self, name: &str) -> Option<Arc<T>>
        where
            T: DeserializeOwned + Send + Sync + 'static,
        {
            let body = &self.entries.get(name)?.as_ref()?.body;
            if let Some(value) = parsed().get::<T>(name, body) {
                return Some(value);
            }
            let value: Arc<T> = Arc::new(self.get::<T>(name)?.body);
            parsed().put(name, body, value.clone());
            Some(value)
        }
    }

    impl VersionedCache {
        /// The entry `start` leads to, with the entries it needed last time
        /// (see [`Self::read_also`]), in one round trip.
        pub async fn read_with_usual(&self, start: Start<'_>) -> Snapshot {
            let start_name = match start {
                Start::Entry(name) | Start::ThroughText { text: name, .. } => self.key(name),
            };
            let remembered = remembered().get(&start_name);
            let mut snapshot = Snapshot {
                start: start_name,
                ..Snapshot::default()
            };
            let needed = remembered.as_ref().map_or(&[][..], |r| &r.needed[..]);
            match start {
                Start::Entry(name) => {
                    let mut names = Vec::with_capacity(1 + needed.len());
                    names.push(name);
                    names.extend(needed.iter().map(String::as_str));
                    self.read_into(&mut snapshot, None, &names).await;
                }
                Start::ThroughText { text, names } => {
                    let guess = remembered.as_ref().and_then(|r| r.first.as_deref());
                    let mut read: Vec<&str> = Vec::with_capacity(1 + needed.len());
                    read.extend(guess);
                    read.extend(needed.iter().map(String::as_str));
                    self.read_into(&mut snapshot, Some(text), &read).await;
                    let first = snapshot
                        .text
                        .as_deref()
                        .and_then(|id| id.parse::<Uuid>().ok())
                        .map(names);
                    if let Some(first) = first.as_deref().filter(|first| guess != Some(*first)) {
                        self.read_into(&mut snapshot, None, &[first]).await;
                    }
                    snapshot.through_text = first;
                }
            }
            snapshot.remembered = remembered;
            snapshot
        }

        /// Makes `snapshot` hold every entry in `needed`, reading those it
        /// lacks in one more round trip, and remembers them as what the
        /// snapshot's first entry needs, so that the next read brings them
        /// along.
        pub async fn read_also(&self, snapshot: &mut Snapshot, needed: &[String]) {
            let missing: Vec<&str> = needed
                .iter()
                .map(String::as_str)
                .filter(|name| !snapshot.entries.contains_key(*name))
                .collect();
            if !missing.is_empty() {
                self.read_into(snapshot, None, &missing).await;
            }
            let unchanged = snapshot.remembered.as_deref().is_some_and(|remembered| {
                remembered.first == snapshot.through_text && remembered.needed == needed
            });
            if !unchanged {
                remembered().put(
                    &snapshot.start,
                    Remembered {
                        first: snapshot.through_text.clone(),
                        needed: needed.to_vec(),
                    },
                );
            }
        }

        /// Reads `text` (a text entry) and the entries `names` into
        /// `snapshot`, in one round trip shared with the other reads on this
        /// connection that go out with it (see [`Gathering`]). Nothing is
        /// added if Redis fails.
        async fn read_into(&self, snapshot: &mut Snapshot, text: Option<&str>, names: &[&str]) {
            if text.is_none() && names.is_empty() {
                return;
            }
            let Some(answers) = self.read_gathered(text, names).await else {
                return;
            };
            if let Some(text) = text {
                snapshot.text = answers.texts.get(text).cloned().flatten();
            }
            for name in names {
                let entry = answers.entries.get(*name).cloned().flatten();
                snapshot.entries.insert((*name).to_owned(), entry);
            }
        }

        /// The answers of the batch this read goes out in: the open one,
        /// or a new one with its sender spawned. `None` if Redis failed.
        async fn read_gathered(&self, text: Option<&str>, names: &[&str]) -> Option<Arc<Answers>> {
            let connection = self.healthy()?;
            let mut answered = {
                let mut open = self
                    .gathering
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                // A batch whose sender is gone (its runtime shut down)
                // would never be answered.
                if open
                    .as_ref()
                    .is_some_and(|batch| batch.answered.has_changed().is_err())
                {
                    *open = None;
                }
                let batch = match &mut *open {
                    Some(batch) => batch,
                    None => {
                        let (answer, answered) = watch::channel(None);
                        tokio::spawn(self.clone().send_gathered(connection, answer));
                        open.insert(Batch {
                            texts: Vec::new(),
                            names: Vec::new(),
                            answered,
                        })
                    }
                };
                batch.ask(text, names);
                batch.answered.clone()
            };
            let answers = answered.wait_for(Option::is_some).await.ok()?;
            answers.clone().flatten()
        }

        /// Sends the open batch as one pipeline and hands its answers to
        /// every read in it.
        async fn send_gathered(
            self,
            mut connection: ConnectionManager,
            answer: watch::Sender<Answered>,
        ) {
            let batch = self
                .gathering
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let Some(batch) = batch else {
                return;
            };
            let mut pipeline = redis::pipe();
            for text in &batch.texts {
                pipeline.cmd("GET").arg(self.key(text));
            }
            for name in &batch.names {
                pipeline
                    .cmd("HMGET")
                    .arg(self.key(name))
                    .arg("v")
                    .arg("body");
            }
            let label = batch.texts.first().or(batch.names.first());
            let label = label.cloned().unwrap_or_default();
            let label = label.as_str();
            let reply = tokio::time::timeout(
                CALL_TIMEOUT,
                pipeline.query_async::<Vec<redis::Value>>(&mut connection),
            )
            .await;
            let answers = self.outcome(label, reply).and_then(|replies| {
                let answers = Answers::of(batch, replies);
                if answers.is_none() {
                    tracing::debug!(key = label, "cache read answered with an unexpected shape");
                }
                answers
            });
            answer.send_replace(Some(answers.map(Arc::new)));
        }
    }

    /// The reads on one connection that have not gone out yet. A read joins
    /// the open batch, or opens one and spawns the task that sends it. That
    /// task runs after the tasks already due, so the reads that reach the
    /// cache meanwhile go out in the same pipeline, each entry asked for
    /// once however many reads want it: in a sale, every buyer's product
    /// page and cart want the same product and stock entries. A batch is
    /// only joined before it is sent, so Redis answers it after each of its
    /// reads began, and a read that joined one sees every write that
    /// finished before it began, as a read of its own would.
    #[derive(Default)]
    pub(super) struct Gathering(Mutex<Option<Batch>>);

    /// What a batch's reads wait for: nothing yet, then its answers (`None`
    /// when Redis failed).
    type Answered = Option<Option<Arc<Answers>>>;

    /// A batch being gathered: what its reads ask for, each name once.
    struct Batch {
        texts: Vec<String>,
        names: Vec<String>,
        answered: watch::Receiver<Answered>,
    }

    impl Batch {
        fn ask(&mut self, text: Option<&str>, names: &[&str]) {
            if let Some(text) = text {
                if !self.texts.iter().any(|asked| asked == text) {
                    self.texts.push(text.to_owned());
                }
            }
            for name in names {
                if !self.names.iter().any(|asked| asked == name) {
                    self.names.push((*name).to_owned());
                }
            }
        }
    }

    /// A batch's answers, by name.
    struct Answers {
        texts: HashMap<String, Option<String>>,
        entries: HashMap<String, Option<Cached<Vec<u8>>>>,
    }

    impl Answers {
        /// The replies to `batch`'s pipeline (its texts, then its names),
        /// if there is one for each.
        fn of(batch: Batch, replies: Vec<redis::Value>) -> Option<Self> {
            if replies.len() != batch.texts.len() + batch.names.len() {
                return None;
            }
            let mut replies = replies.into_iter();
            let texts = batch
                .texts
                .into_iter()
                .zip(replies.by_ref())
                .map(|(text, reply)| {
                    let value = into_bytes(reply).and_then(|bytes| String::from_utf8(bytes).ok());
                    (text, value)
                })
                .collect();
            let entries = batch
                .names
                .into_iter()
                .zip(replies)
                .map(|(name, reply)| (name, into_entry(reply)))
                .collect();
            Some(Self { texts, entries })
        }
    }

    /// An `HMGET v body` reply as an entry; tombstones and anything
    /// malformed are `None`.
    fn into_entry(reply: redis::Value) -> Option<Cached<Vec<u8>>> {
        let redis::Value::Array(fields) = reply else {
            return None;
        };
        let mut fields = fields.into_iter();
        let version = into_bytes(fields.next()?)?;
        let version = std::str::from_utf8(&version).ok()?.parse::<i64>().ok()?;
        let body = into_bytes(fields.next()?)?;
        Some(Cached { version, body })
    }

    fn into_bytes(value: redis::Value) -> Option<Vec<u8>> {
        match value {
            redis::Value::BulkString(bytes) => Some(bytes),
            redis::Value::SimpleString(text) => Some(text.into_bytes()),
            _ => None,
        }
    }

    /// What reads needed, by prefixed starting name; shared by every cache
    /// in the process (the prefix keeps deployments and tests apart).
    #[derive(Default)]
    struct Memory(Mutex<HashMap<String, Arc<Remembered>>>);

    impl Memory {
        fn get(&self, start: &str) -> Option<Arc<Remembered>> {
            let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            map.get(start).cloned()
        }

        fn put(&self, start: &str, remembered: Remembered) {
            let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() >= MAX_REMEMBERED && !map.contains_key(start) {
                map.clear();
            }
            map.insert(start.to_owned(), Arc::new(remembered));
        }
    }

    fn remembered() -> &'static Memory {
        static MEMORY: OnceLock<Memory> = OnceLock::new();
        MEMORY.get_or_init(Memory::default)
    }

    /// The value last parsed from an entry, with the body it came from.
    struct ParsedBody {
        body: Vec<u8>,
        value: Arc<dyn Any + Send + Sync>,
    }

    /// Parsed bodies by entry name, shared by every cache in the process:
    /// a value is only handed out for the very bytes it was parsed from.
    #[derive(Default)]
    struct Parsed(Mutex<ParsedBodies>);

    #[derive(Default)]
    struct ParsedBodies {
        by_name: HashMap<String, ParsedBody>,
        bytes: usize,
    }

    impl Parsed {
        fn get<T: Send + Sync + 'static>(&self, name: &str, body: &[u8]) -> Option<Arc<T>> {
            let value = {
                let parsed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
                let found = parsed
                    .by_name
                    .get(name)
                    .filter(|found| found.body == body)?;
                found.value.clone()
            };
            value.downcast::<T>().ok()
        }

        fn put<T: Send + Sync + 'static>(&self, name: &str, body: &[u8], value: Arc<T>) {
            let mut parsed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let weight = 2 * body.len();
            if parsed.by_name.len() >= MAX_REMEMBERED || parsed.bytes + weight > MAX_PARSED_BYTES {
                *parsed = ParsedBodies::default();
            }
            let replaced = parsed.by_name.insert(
                name.to_owned(),
                ParsedBody {
                    body: body.to_vec(),
                    value,
                },
            );
            parsed.bytes += weight;
            if let Some(replaced) = replaced {
                parsed.bytes -= 2 * replaced.body.len();
            }
        }
    }

    fn parsed() -> &'static Parsed {
        static PARSED: OnceLock<Parsed> = OnceLock::new();
        PARSED.get_or_init(Parsed::default)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn bulk(text: &str) -> redis::Value {
            redis::Value::BulkString(text.as_bytes().to_vec())
        }

        #[test]
        fn an_entry_needs_a_version_and_a_body() {
            let entry = into_entry(redis::Value::Array(vec![bulk("7"), bulk("{}")]));
            assert_eq!(
                entry,
                Some(Cached {
                    version: 7,
                    body: b"{}".to_vec()
                })
            );
            let tombstone = redis::Value::Array(vec![bulk("7"), redis::Value::Nil]);
            assert_eq!(into_entry(tombstone), None);
            let unversioned = redis::Value::Array(vec![bulk("seven"), bulk("{}")]);
            assert_eq!(into_entry(unversioned), None);
            assert_eq!(into_entry(bulk("{}")), None);
        }

        #[test]
        fn a_body_that_does_not_parse_is_a_miss() {
            let mut snapshot = Snapshot::default();
            snapshot.entries.insert(
                "a".to_owned(),
                Some(Cached {
                    version: 1,
                    body: b"{not json".to_vec(),
                }),
            );
            assert!(snapshot.get::<serde_json::Value>("a").is_none());
            assert!(snapshot.get::<serde_json::Value>("b").is_none());
        }
    }
}
