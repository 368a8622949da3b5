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

    /// Decides an attempt before its password is checked, counting it as a
    /// failure at once (a successful login clears the count): attempts sent
    /// together each see the ones before them, so a burst cannot have more
    /// passwords checked than the lock allows.
    pub async fn gate(&self, email: &str, address: Option<IpAddr>) -> LoginGate {
        let key = self.account_key(email);
        let (failures, remaining, known) = match self.count_shared(&key, address).await {
            Some(shared) => shared,
            None => self.count_local(&key, address),
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

    /// Counts an attempt in Redis: the failures before it, how long their
    /// window has left, and whether the address signed in before.
    async fn count_shared(
        &self,
        key: &str,
        address: Option<IpAddr>,
    ) -> Option<(u64, Duration, bool)> {
        let mut redis = self.store.healthy_redis()?;
        let failures_key = format!("{key}:failures");
        let known_key = format!("{key}:known");
        let window = self.window.as_secs().max(1) as i64;
        let reply = tokio::time::timeout(REDIS_TIMEOUT, async {
            let (attempts, ttl, known): (u64, i64, bool) = redis::pipe()
                .incr(&failures_key, 1)
                .ttl(&failures_key)
                .sismember(
                    &known_key,
                    address.map(|a| a.to_string()).unwrap_or_default(),
                )
                .query_async(&mut redis)
                .await?;
            // The first failure of a window starts it (a count left without
            // an expiry by a failed call starts one too).
            let ttl = if ttl < 0 {
                let _: () = redis.expire(&failures_key, window).await?;
                window
            } else {
                ttl
            };
            Ok::<_, redis::RedisError>((
                attempts.saturating_sub(1),
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

    /// [`Self::count_shared`] in this instance's memory, while Redis is down.
    fn count_local(&self, key: &str, address: Option<IpAddr>) -> (u64, Duration, bool) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let account = local.entry(key.to_owned()).or_default();
        let (failures, remaining) = account.live_failures(self.window);
        if failures == 0 {
            account.failures = 0;
            account.window_started = Some(Instant::now());
        }
        account.failures += 1;
        let known = address.is_some_and(|a| account.known_addresses.contains(&a));
        let remaining = if failures == 0 {
            self.window
        } else {
            remaining
        };
        (failures, remaining, known)
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
        // Each attempt counts as a failure until one succeeds.
        for _ in 0..LOCK_AFTER {
            guard.gate("user@example.com", Some(attacker)).await;
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
