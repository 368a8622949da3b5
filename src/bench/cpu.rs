//! How busy the machine's cores were while the sale still had stock.
//!
//! Everything the bench measures shares one machine, so "CPU-bound" is a
//! claim about the whole machine: the kernel's idle counter (`/proc/stat`)
//! says how much of the cores' time nobody used. Sampled through the sale
//! and cut at the sell-out, because the refusals after it are cheaper and
//! would dilute the figure.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Sampling interval: the sale with stock lasts a second or two.
const EVERY: Duration = Duration::from_millis(50);

/// The kernel's cumulative CPU counters, in clock ticks, over all cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time no process wanted (`idle` + `iowait`).
    pub idle: u64,
    pub total: u64,
}

impl CpuTimes {
    /// Parses the first (`cpu`, all cores) line of `/proc/stat`.
    pub fn parse(proc_stat: &str) -> Option<Self> {
        let line = proc_stat.lines().find(|line| line.starts_with("cpu "))?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]:
        // guest time is already counted in user and nice.
        let counted = ticks.get(..8)?;
        Some(Self {
            idle: counted[3] + counted[4],
            total: counted.iter().sum(),
        })
    }

    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }
}

/// Counters taken through a phase, each with its time from the phase's start.
#[derive(Debug, Default)]
pub struct CpuSamples(Vec<(Duration, CpuTimes)>);

impl CpuSamples {
    /// Samples until `stop` turns true (or its sender is dropped); empty
    /// where `/proc/stat` cannot be read.
    pub async fn collect(mut stop: watch::Receiver<bool>) -> Self {
        let started = Instant::now();
        let mut samples = Vec::new();
        loop {
            match CpuTimes::read() {
                Some(times) => samples.push((started.elapsed(), times)),
                None => return Self::default(),
            }
            if *stop.borrow() {
                return Self(samples);
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                changed = stop.changed() => if changed.is_err() { return Self(samples) },
            }
        }
    }

    /// The share of the cores' time left idle from the first sample to the
    /// last one taken at or before `until`; `None` with fewer than two.
    pub fn idle_share_until(&self, until: Duration) -> Option<f64> {
        let (_, first) = self.0.first()?;
        let (_, last) = self.0.iter().rev().find(|(at, _)| *at <= until)?;
        let total = last.total.checked_sub(first.total).filter(|t| *t > 0)?;
        let idle = last.idle.saturating_sub(first.idle);
        Some(idle as f64 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_all_cores_line_counting_iowait_as_idle() {
        let stat = "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 3 0\n";
        assert_eq!(
            CpuTimes::parse(stat),
            Some(CpuTimes {
                idle: 820,
                total: 990
            })
        );
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn the_idle_share_stops_at_the_last_sample_before_the_cut() {
        let at =
            |ms: u64, idle: u64, total: u64| (Duration::from_millis(ms), CpuTimes { idle, total });
        let samples = CpuSamples(vec![
            at(0, 1_000, 10_000),
            at(50, 1_010, 10_100),
            at(100, 1_030, 10_200),
            at(150, 1_130, 10_300),
        ]);
        assert_eq!(
            samples.idle_share_until(Duration::from_millis(120)),
            Some(0.15)
        );
        assert_eq!(
            samples.idle_share_until(Duration::from_millis(500)),
            Some(0.43333333333333335)
        );
        assert_eq!(samples.idle_share_until(Duration::ZERO), None);
        assert_eq!(CpuSamples::default().idle_share_until(Duration::MAX), None);
    }
}
