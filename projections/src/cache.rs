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
//! Postgres.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Writes `{v, body}` (mode `set`) or a tombstone `{v}` (mode `tombstone`).
/// A body is written over nothing, over an older version, or over a
/// tombstone of the same version; a tombstone over anything not newer than
/// itself. Both refresh the expiry. Returns 1 when it wrote.
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
    /// When the last failure happened, while Redis counts as down.
    breaker: Arc<Mutex<Option<Instant>>>,
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
            breaker: Arc::default(),
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

    /// The full key of an entry.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
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
        let _ = self.outcome("(tombstones)", reply);
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
        let _ = self.outcome(name, reply);
    }

    async fn run<T: redis::FromRedisValue>(&self, name: &str, command: &redis::Cmd) -> Option<T> {
        let mut connection = self.healthy()?;
        let reply = tokio::time::timeout(CALL_TIMEOUT, command.query_async(&mut connection)).await;
        self.outcome(name, reply)
    }

    /// The connection, unless a recent failure says Redis is down.
    fn healthy(&self) -> Option<ConnectionManager> {
        let breaker = *self.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        match breaker {
            Some(failed) if failed.elapsed() < BREAKER_PAUSE => None,
            _ => self.connection.clone(),
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
                *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) = None;
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
        *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        None
    }
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
        format!("catalog:product:{product_id}")
    }

    /// A slug's product id (a slug never moves to another product).
    pub fn product_slug(slug: &str) -> String {
        format!("catalog:slug:{slug}")
    }

    /// A category's `{id, slug, name}`, at the category's version.
    pub fn category(category_id: Uuid) -> String {
        format!("catalog:category:{category_id}")
    }

    /// A variant's stock, at its InventoryItem's version.
    pub fn stock(variant_id: Uuid) -> String {
        format!("stock:{variant_id}")
    }
}
