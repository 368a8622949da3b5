//! The generic cell rate algorithm (GCRA): a limit of `limit` requests per
//! `period`, allowing a burst of the whole limit, with no fixed-window edge
//! that would let twice the limit through at a boundary.
//!
//! State per key is one number, the theoretical arrival time (TAT). The same
//! arithmetic runs in Redis (a Lua script) for shared limits and here for the
//! per-instance fallback.

/// What a limit decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u64,
    /// Requests that would still be allowed right now.
    pub remaining: u64,
    /// Milliseconds until the limit is entirely free again.
    pub reset_ms: u64,
    /// Milliseconds until the next request would be allowed (0 if allowed).
    pub retry_after_ms: u64,
}

/// A limit of `limit` requests per `period_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub period_ms: u64,
}

impl Quota {
    pub fn per_minute(limit: u32) -> Self {
        Self {
            limit: u64::from(limit.max(1)),
            period_ms: 60_000,
        }
    }

    /// Milliseconds between requests at the sustained rate.
    pub fn emission_interval_ms(&self) -> f64 {
        self.period_ms as f64 / self.limit as f64
    }
}

/// Decides a request arriving at `now_ms` against the stored `tat_ms`;
/// returns the verdict and the TAT to store (unchanged when denied).
pub fn decide(quota: Quota, tat_ms: Option<f64>, now_ms: f64) -> (Verdict, f64) {
    let interval = quota.emission_interval_ms();
    let tolerance = quota.period_ms as f64;
    let tat = tat_ms.unwrap_or(now_ms).max(now_ms);
    let new_tat = tat + interval;
    let allow_at = new_tat - tolerance;
    if allow_at > now_ms {
        let verdict = Verdict {
            allowed: false,
            limit: quota.limit,
            remaining: 0,
            reset_ms: ceil_ms(tat - now_ms),
            retry_after_ms: ceil_ms(allow_at - now_ms),
        };
        return (verdict, tat);
    }
    let remaining = ((now_ms + tolerance - new_tat) / interval).floor().max(0.0) as u64;
    let verdict = Verdict {
        allowed: true,
        limit: quota.limit,
        remaining,
        reset_ms: ceil_ms(new_tat - now_ms),
        retry_after_ms: 0,
    };
    (verdict, new_tat)
}

fn ceil_ms(value: f64) -> u64 {
    value.max(0.0).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(quota: Quota, arrivals: &[f64]) -> Vec<bool> {
        let mut tat = None;
        arrivals
            .iter()
            .map(|&now| {
                let (verdict, next) = decide(quota, tat, now);
                tat = Some(next);
                verdict.allowed
            })
            .collect()
    }

    #[test]
    fn a_burst_of_the_whole_limit_passes_and_the_next_is_refused() {
        let quota = Quota {
            limit: 5,
            period_ms: 60_000,
        };
        let allowed = run(quota, &[0.0; 6]);
        assert_eq!(allowed, vec![true, true, true, true, true, false]);
    }

    #[test]
    fn remaining_counts_down_to_zero() {
        let quota = Quota {
            limit: 3,
            period_ms: 3_000,
        };
        let mut tat = None;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (verdict, next) = decide(quota, tat, 0.0);
            tat = Some(next);
            remaining.push(verdict.remaining);
        }
        assert_eq!(remaining, vec![2, 1, 0]);
    }

    #[test]
    fn a_refused_request_learns_when_to_come_back() {
        let quota = Quota {
            limit: 2,
            period_ms: 2_000,
        };
        let (_, tat) = decide(quota, None, 0.0);
        let (_, tat) = decide(quota, Some(tat), 0.0);
        let (refused, _) = decide(quota, Some(tat), 0.0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 1_000);
        let (later, _) = decide(quota, Some(tat), 1_000.0);
        assert!(later.allowed);
    }

    #[test]
    fn no_window_boundary_lets_twice_the_limit_through() {
        // A fixed window would allow 10 at t=59.9s and 10 more at t=60.1s.
        let quota = Quota {
            limit: 10,
            period_ms: 60_000,
        };
        let mut arrivals = vec![59_900.0; 10];
        arrivals.extend(vec![60_100.0; 10]);
        let allowed = run(quota, &arrivals).iter().filter(|a| **a).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn the_sustained_rate_is_the_limit_per_period() {
        let quota = Quota {
            limit: 60,
            period_ms: 60_000,
        };
        // One request every 500 ms for two minutes, after an initial burst.
        let arrivals: Vec<f64> = (0..240).map(|i| f64::from(i) * 500.0).collect();
        let allowed = run(quota, &arrivals).iter().filter(|a| **a).count();
        // The burst of 60 plus one per second for 120 s, give or take one.
        assert!((179..=181).contains(&allowed), "{allowed}");
    }
}
