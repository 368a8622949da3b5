//! Failed logins per account: after a few, every attempt on the account is
//! slowed down; after more, the account is locked for new logins from
//! addresses it has never signed in from, until the lock runs out.
//!
//! The lock can never keep the real user out for good: it lasts a fixed
//! time from the last failure window, addresses that signed in successfully
//! before are exempt, and a successful login clears the count. Counts live
//! in Redis (shared by every instance) and in memory while Redis is down.
//! The memory copy is bounded: once it holds [`LOCAL_ACCOUNTS_MAX`] it
//! forgets half, those with the fewest live failures first and the least
//! recently seen among equals (so a flood of attempts on made-up accounts
//! does not wipe a real account's count), and it keeps a few addresses
//! per account.

use std::collections::HashMap;
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
/// Accounts remembered in this instance's memory at most. Every sign-in is
/// remembered there (Redis may fail later), so without a bound the map
/// would grow with every account that ever signed in.
pub const LOCAL_ACCOUNTS_MAX: usize = 100_000;
/// Addresses remembered per account in memory: the most recent ones.
const LOCAL_ADDRESSES_MAX: usize = 8;

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
    local: Arc<Mutex<LocalAccounts>>,
}

/// The accounts this instance remembers, at most `capacity` of them.
struct LocalAccounts {
    accounts: HashMap<String, LocalAccount>,
    capacity: usize,
}

struct LocalAccount {
    failures: u64,
    window_started: Option<Instant>,
    /// Addresses that signed in, with when they last did, newest last.
    known_addresses: Vec<(IpAddr, Instant)>,
    last_seen: Instant,
}

impl LocalAccounts {
    fn new(capacity: usize) -> Self {
        Self {
            accounts: HashMap::new(),
            capacity: capacity.max(2),
        }
    }

    /// The account under `key`, remembered from now on; when the map is
    /// full, half of it is forgotten first (amortised: one sweep per
    /// `capacity / 2` new accounts).
    fn remember(&mut self, key: &str, window: Duration) -> &mut LocalAccount {
        if !self.accounts.contains_key(key) && self.accounts.len() >= self.capacity {
            self.forget_least_needed(self.capacity / 2, window);
        }
        let account = self
            .accounts
            .entry(key.to_owned())
            .or_insert_with(|| LocalAccount {
                failures: 0,
                window_started: None,
                known_addresses: Vec::new(),
                last_seen: Instant::now(),
            });
        account.last_seen = Instant::now();
        account
    }

    /// Keeps `keep` accounts: those with the most live failures, and the
    /// most recently seen among equals.
    fn forget_least_needed(&mut self, keep: usize, window: Duration) {
        let forget = self.accounts.len().saturating_sub(keep);
        if forget == 0 {
            return;
        }
        let mut by_need: Vec<((u64, Instant), String)> = self
            .accounts
            .iter()
            .map(|(key, account)| {
                let need = (account.live_failures(window).0, account.last_seen);
                (need, key.clone())
            })
            .collect();
        by_need.select_nth_unstable_by_key(forget - 1, |(need, _)| *need);
        for (_, key) in &by_need[..forget] {
            self.accounts.remove(key);
        }
    }
}

impl LocalAccount {
    fn knows(&self, address: IpAddr) -> bool {
        self.known_addresses
            .iter()
            .any(|(known, at)| *known == address && at.elapsed() < KNOWN_ADDRESS_TTL)
    }

    fn signed_in_from(&mut self, address: IpAddr) {
        self.known_addresses.retain(|(known, _)| *known != address);
        if self.known_addresses.len() >= LOCAL_ADDRESSES_MAX {
            self.known_addresses.remove(0);
        }
        self.known_addresses.push((address, Instant::now()));
    }

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
            local: Arc::new(Mutex::new(LocalAccounts::new(LOCAL_ACCOUNTS_MAX))),
        }
    }

    /// A guard whose memory copy holds at most `capacity` accounts.
    #[cfg(test)]
    fn with_local_capacity(mut self, capacity: usize) -> Self {
        self.local = Arc::new(Mutex::new(LocalAccounts::new(capacity)));
        self
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
        let account = local.remember(&key, self.window);
        account.failures = 0;
        account.window_started = None;
        if let Some(address) = address {
            account.signed_in_from(address);
        }
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
        let account = local.remember(key, self.window);
        let (failures, remaining) = account.live_failures(self.window);
        if failures == 0 {
            account.failures = 0;
            account.window_started = Some(Instant::now());
        }
        account.failures += 1;
        let known = address.is_some_and(|a| account.knows(a));
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

    #[tokio::test]
    async fn the_memory_copy_forgets_the_least_recently_seen_accounts_past_its_bound() {
        let guard = LoginGuard::new(
            Arc::new(LimitStore::new(None)),
            "t:",
            Duration::from_secs(900),
        )
        .with_local_capacity(4);
        let home: IpAddr = "198.51.100.1".parse().unwrap();
        guard.record_success("kept@example.com", Some(home)).await;
        for n in 0..100 {
            guard
                .record_success(&format!("user{n}@example.com"), Some(home))
                .await;
            // Seen again, so it stays among the most recent.
            guard.gate("kept@example.com", Some(home)).await;
        }
        let local = guard.local.lock().unwrap();
        assert!(local.accounts.len() <= 4, "{}", local.accounts.len());
        assert!(local
            .accounts
            .contains_key(&guard.account_key("kept@example.com")));
        assert!(local
            .accounts
            .contains_key(&guard.account_key("user99@example.com")));
        assert!(!local
            .accounts
            .contains_key(&guard.account_key("user0@example.com")));
    }

    #[tokio::test]
    async fn a_flood_of_made_up_accounts_does_not_wipe_a_real_accounts_failures() {
        let guard = LoginGuard::new(
            Arc::new(LimitStore::new(None)),
            "t:",
            Duration::from_secs(900),
        )
        .with_local_capacity(4);
        let attacker: IpAddr = "203.0.113.66".parse().unwrap();
        for _ in 0..LOCK_AFTER {
            guard.gate("victim@example.com", Some(attacker)).await;
        }
        for n in 0..100 {
            guard
                .gate(&format!("made-up{n}@example.com"), Some(attacker))
                .await;
        }
        assert!(matches!(
            guard.gate("victim@example.com", Some(attacker)).await,
            LoginGate::Locked { .. }
        ));
    }

    #[tokio::test]
    async fn the_memory_copy_keeps_only_an_accounts_most_recent_addresses() {
        let guard = LoginGuard::new(
            Arc::new(LimitStore::new(None)),
            "t:",
            Duration::from_secs(900),
        );
        let addresses: Vec<IpAddr> = (1..=LOCAL_ADDRESSES_MAX as u8 + 1)
            .map(|host| IpAddr::from([198, 51, 100, host]))
            .collect();
        for address in &addresses {
            guard
                .record_success("user@example.com", Some(*address))
                .await;
        }
        let local = guard.local.lock().unwrap();
        let account = &local.accounts[&guard.account_key("user@example.com")];
        assert!(
            !account.knows(addresses[0]),
            "the oldest address is forgotten"
        );
        assert!(addresses[1..].iter().all(|address| account.knows(*address)));
    }
}
