//! Failed logins per account: after a few, every attempt on the account is
//! slowed down; after more, the account is locked for new logins from
//! addresses it has never signed in from, until the lock runs out.
//!
//! The lock can never keep the real user out for good: it lasts a fixed
//! time from the last failure window, addresses that signed in successfully
//! before are exempt, and a successful login clears the count. Counts live
//! in Redis (shared by every instance) and in memory while Redis is down.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use super::store::{LimitStore, REDIS_TIMEOUT};

/// Failures after which attempts on the account are slowed down.
pub const SLOW_DOWN_AFTER: u64 = 3;
/// Failures after which new addresses are locked out.
pub const LOCK_AFTER: u64 = 10;
const MAX_DELAY: Duration = Duration::from_secs(4);
const KNOWN_ADDRESS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What to do with a login attempt before checking its password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginGate {
    /// Go ahead after waiting this long (zero when nothing is wrong).
    Proceed { delay: Duration },
    /// Refuse: the account is locked for this address for this long.
    Locked { retry_after: Duration },
}

#[derive(Clone)]
pub struct LoginGuard {
    store: Arc<LimitStore>,
    /// How long failures are remembered, and so how long a lock lasts at most.
    window: Duration,
    key_prefix: Arc<str>,
    local: Arc<Mutex<HashMap<String, LocalAccount>>>,
}

#[derive(Default)]
struct LocalAccount {
    failures: u64,
    window_started: Option<Instant>,
    known_addresses: HashSet<IpAddr>,
}

impl LocalAccount {
    fn live_failures(&self, window: Duration) -> (u64, Duration) {
        match self.window_started {
            Some(started) if started.elapsed() < window => {
                (self.failures, window - started.elapsed())
            }
            _ => (0, Duration::ZERO),
        }
    }
}

/// The slow-down for `failures` failed attempts: doubling from 250 ms.
pub fn delay_for(failures: u64) -> Duration {
    if failures < SLOW_DOWN_AFTER {
        return Duration::ZERO;
    }
    let doublings = (failures - SLOW_DOWN_AFTER).min(10) as u32;
    (Duration::from_millis(250) * 2u32.pow(doublings)).min(MAX_DELAY)
}

impl LoginGuard {
    pub fn new(store: Arc<LimitStore>, key_prefix: &str, window: Duration) -> Self {
        Self {
            store,
            window,
            key_prefix: key_prefix.into(),
            local: Arc::default(),
        }
    }

    /// Accounts are keyed by a hash of the normalised email, so Redis never
    /// holds addresses in clear.
    fn account_key(&self, email: &str) -> String {
        let digest = Sha256::digest(email.trim().to_lowercase().as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("{}login:{hex}", self.key_prefix)
    }

    pub async fn gate(&self, email: &str, address: Option<IpAddr>) -> LoginGate {
        let key = self.account_key(email);
        let (failures, remaining, known) = match self.read_shared(&key, address).await {
            Some(shared) => shared,
            None => self.read_local(&key, address),
        };
        if failures >= LOCK_AFTER && !known {
            return LoginGate::Locked {
                retry_after: remaining.max(Duration::from_secs(1)),
            };
        }
        LoginGate::Proceed {
            delay: delay_for(failures),
        }
    }

    pub async fn record_failure(&self, email: &str) {
        let key = self.account_key(email);
        if let Some(mut redis) = self.store.healthy_redis() {
            let failures_key = format!("{key}:failures");
            let outcome = tokio::time::timeout(REDIS_TIMEOUT, async {
                let count: u64 = redis.incr(&failures_key, 1).await?;
                if count == 1 {
                    let _: () = redis
                        .expire(&failures_key, self.window.as_secs().max(1) as i64)
                        .await?;
                }
                Ok::<(), redis::RedisError>(())
            })
            .await;
            let outcome = flatten(outcome);
            self.store.note_redis_outcome(&outcome);
            if outcome.is_ok() {
                return;
            }
        }
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let account = local.entry(key).or_default();
        if account.live_failures(self.window).0 == 0 {
            account.failures = 0;
            account.window_started = Some(Instant::now());
        }
        account.failures += 1;
    }

    pub async fn record_success(&self, email: &str, address: Option<IpAddr>) {
        let key = self.account_key(email);
        if let Some(mut redis) = self.store.healthy_redis() {
            let outcome = tokio::time::timeout(REDIS_TIMEOUT, async {
                let _: () = redis.del(format!("{key}:failures")).await?;
                if let Some(address) = address {
                    let known_key = format!("{key}:known");
                    let _: () = redis.sadd(&known_key, address.to_string()).await?;
                    let _: () = redis
                        .expire(&known_key, KNOWN_ADDRESS_TTL.as_secs() as i64)
                        .await?;
                }
                Ok::<(), redis::RedisError>(())
            })
            .await;
            self.store.note_redis_outcome(&flatten(outcome));
        }
        // Remembered locally too, so a Redis outage does not lock the real
        // user out of an address they just used.
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let account = local.entry(key).or_default();
        account.failures = 0;
        account.window_started = None;
        account.known_addresses.extend(address);
    }

    async fn read_shared(
        &self,
        key: &str,
        address: Option<IpAddr>,
    ) -> Option<(u64, Duration, bool)> {
        let mut redis = self.store.healthy_redis()?;
        let failures_key = format!("{key}:failures");
        let known_key = format!("{key}:known");
        let reply = tokio::time::timeout(REDIS_TIMEOUT, async {
            let (failures, ttl, known): (Option<u64>, i64, bool) = redis::pipe()
                .get(&failures_key)
                .ttl(&failures_key)
                .sismember(
                    &known_key,
                    address.map(|a| a.to_string()).unwrap_or_default(),
                )
                .query_async(&mut redis)
                .await?;
            Ok::<_, redis::RedisError>((
                failures.unwrap_or(0),
                Duration::from_secs(ttl.max(0) as u64),
                known,
            ))
        })
        .await;
        let outcome = match &reply {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        self.store.note_redis_outcome(&outcome);
        reply.ok().and_then(Result::ok)
    }

    fn read_local(&self, key: &str, address: Option<IpAddr>) -> (u64, Duration, bool) {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        match local.get(key) {
            Some(account) => {
                let (failures, remaining) = account.live_failures(self.window);
                let known = address.is_some_and(|a| account.known_addresses.contains(&a));
                (failures, remaining, known)
            }
            None => (0, Duration::ZERO, false),
        }
    }
}

fn flatten(
    outcome: Result<Result<(), redis::RedisError>, tokio::time::error::Elapsed>,
) -> Result<(), String> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slow_down_starts_late_doubles_and_is_capped() {
        assert_eq!(delay_for(0), Duration::ZERO);
        assert_eq!(delay_for(SLOW_DOWN_AFTER - 1), Duration::ZERO);
        assert_eq!(delay_for(SLOW_DOWN_AFTER), Duration::from_millis(250));
        assert_eq!(delay_for(SLOW_DOWN_AFTER + 1), Duration::from_millis(500));
        assert_eq!(delay_for(100), MAX_DELAY);
    }

    #[tokio::test]
    async fn without_redis_failures_lock_new_addresses_but_not_known_ones() {
        let guard = LoginGuard::new(
            Arc::new(LimitStore::new(None)),
            "t:",
            Duration::from_secs(900),
        );
        let home: IpAddr = "198.51.100.1".parse().unwrap();
        let attacker: IpAddr = "203.0.113.66".parse().unwrap();
        guard.record_success("User@Example.com", Some(home)).await;
        for _ in 0..LOCK_AFTER {
            guard.record_failure("user@example.com").await;
        }
        assert!(matches!(
            guard.gate("user@example.com", Some(attacker)).await,
            LoginGate::Locked { .. }
        ));
        assert!(matches!(
            guard.gate("user@example.com", Some(home)).await,
            LoginGate::Proceed { .. }
        ));
        assert_eq!(
            guard.gate("other@example.com", Some(attacker)).await,
            LoginGate::Proceed {
                delay: Duration::ZERO
            }
        );

        guard.record_success("user@example.com", Some(home)).await;
        assert_eq!(
            guard.gate("user@example.com", Some(attacker)).await,
            LoginGate::Proceed {
                delay: Duration::ZERO
            }
        );
    }
}
