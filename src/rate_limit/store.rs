//! Where limit state lives: in Redis, shared by every instance, or, while
//! Redis is unreachable, in this process.
//!
//! A circuit breaker keeps requests from waiting on a dead Redis: after one
//! failure the store answers from memory at once and only tries Redis again
//! after a pause.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::gcra::{self, Quota, Verdict};

/// Same arithmetic as `gcra::decide`, on Redis's clock so every instance
/// agrees on the time. Returns {allowed, remaining, reset_ms, retry_after_ms}.
const GCRA_SCRIPT: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if allow_at > now then
  return {0, 0, math.ceil(tat - now), math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
local remaining = math.floor((now + period - new_tat) / interval)
if remaining < 0 then remaining = 0 end
return {1, remaining, math.ceil(new_tat - now), 0}
"#;

pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
const BREAKER_PAUSE: Duration = Duration::from_secs(2);
const LOCAL_SWEEP_EVERY: u32 = 1024;

/// Where limits are being counted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// In Redis: one limit across all instances.
    Shared,
    /// In this process: Redis is unreachable, each instance limits alone.
    Local,
}

pub struct LimitStore {
    redis: Option<ConnectionManager>,
    script: redis::Script,
    local: Mutex<LocalLimits>,
    breaker: Mutex<Option<Instant>>,
    started: Instant,
}

#[derive(Default)]
struct LocalLimits {
    tats: HashMap<String, f64>,
    since_sweep: u32,
}

impl LimitStore {
    pub fn new(redis: Option<ConnectionManager>) -> Self {
        Self {
            redis,
            script: redis::Script::new(GCRA_SCRIPT),
            local: Mutex::default(),
            breaker: Mutex::new(None),
            started: Instant::now(),
        }
    }

    pub fn mode(&self) -> LimitMode {
        match *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(_) => LimitMode::Local,
            None if self.redis.is_some() => LimitMode::Shared,
            None => LimitMode::Local,
        }
    }

    /// Counts one request under `key` and decides it.
    pub async fn check(&self, key: &str, quota: Quota) -> Verdict {
        if let Some(connection) = self.healthy_redis() {
            match self.check_in_redis(connection, key, quota).await {
                Ok(verdict) => {
                    self.close_breaker();
                    return verdict;
                }
                Err(error) => self.open_breaker(&error),
            }
        }
        self.check_locally(key, quota)
    }

    async fn check_in_redis(
        &self,
        mut connection: ConnectionManager,
        key: &str,
        quota: Quota,
    ) -> Result<Verdict, String> {
        let mut invocation = self.script.key(key);
        invocation
            .arg(quota.emission_interval_ms())
            .arg(quota.period_ms);
        let reply: Result<redis::RedisResult<(u8, u64, u64, u64)>, _> =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection)).await;
        match reply {
            Ok(Ok((allowed, remaining, reset_ms, retry_after_ms))) => Ok(Verdict {
                allowed: allowed == 1,
                limit: quota.limit,
                remaining,
                reset_ms,
                retry_after_ms,
            }),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
        }
    }

    fn check_locally(&self, key: &str, quota: Quota) -> Verdict {
        let now = self.started.elapsed().as_secs_f64() * 1000.0;
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.since_sweep += 1;
        if local.since_sweep >= LOCAL_SWEEP_EVERY {
            local.since_sweep = 0;
            local.tats.retain(|_, tat| *tat > now);
        }
        let (verdict, tat) = gcra::decide(quota, local.tats.get(key).copied(), now);
        local.tats.insert(key.to_owned(), tat);
        verdict
    }

    /// Redis, unless the breaker says it is down.
    pub(crate) fn healthy_redis(&self) -> Option<ConnectionManager> {
        self.redis.clone().filter(|_| self.may_try_redis())
    }

    /// Feeds the breaker with the outcome of a Redis call made elsewhere.
    pub(crate) fn note_redis_outcome(&self, outcome: &Result<(), String>) {
        match outcome {
            Ok(()) => self.close_breaker(),
            Err(error) => self.open_breaker(error),
        }
    }

    fn may_try_redis(&self) -> bool {
        match *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(opened) => opened.elapsed() >= BREAKER_PAUSE,
            None => true,
        }
    }

    fn open_breaker(&self, error: &str) {
        let mut breaker = self.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        if breaker.is_none() {
            tracing::warn!(
                error,
                "Redis unreachable: rate limits fall back to per-instance limits"
            );
        }
        *breaker = Some(Instant::now());
    }

    fn close_breaker(&self) {
        let mut breaker = self.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        if breaker.take().is_some() {
            tracing::info!("Redis answers again: rate limits are shared across instances again");
        }
    }
}
