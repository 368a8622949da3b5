//! A closed-loop load driver: C workers take job numbers from one counter
//! until every job ran or the phase's time is up, and record the status and
//! latency of each. Jobs choose their instance (round robin by number).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::client::{Answer, Endpoint, Worker};

/// What happened to one job.
#[derive(Debug, Clone)]
pub struct Sample {
    pub index: usize,
    /// The HTTP status; 0 when no answer came (connection error, timeout).
    pub status: u16,
    /// The problem `code` of an error answer, or the transport error.
    pub code: Option<String>,
    /// When the answer arrived, from the start of the phase.
    pub finished: Duration,
    pub latency: Duration,
}

/// A finished phase.
#[derive(Debug, Clone)]
pub struct Run {
    pub samples: Vec<Sample>,
    pub elapsed: Duration,
    /// Jobs never started because the phase ran out of time.
    pub not_sent: usize,
}

impl Run {
    /// Phases run one after another as one: their answers, their summed
    /// time. Indices are renumbered to stay distinct.
    pub fn combine(runs: Vec<Run>) -> Run {
        let mut combined = Run {
            samples: Vec::new(),
            elapsed: Duration::ZERO,
            not_sent: 0,
        };
        for run in runs {
            let offset = combined.samples.len() + combined.not_sent;
            let finished_before = combined.elapsed;
            combined
                .samples
                .extend(run.samples.into_iter().map(|sample| Sample {
                    index: sample.index + offset,
                    finished: sample.finished + finished_before,
                    ..sample
                }));
            combined.elapsed += run.elapsed;
            combined.not_sent += run.not_sent;
        }
        combined
    }

    /// How many answers had each status (0: no answer).
    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut counts = BTreeMap::new();
        for sample in &self.samples {
            *counts.entry(sample.status).or_insert(0) += 1;
        }
        counts
    }

    /// Each distinct (status, code) and how often it came.
    pub fn outcomes(&self) -> BTreeMap<(u16, String), usize> {
        let mut counts = BTreeMap::new();
        for sample in &self.samples {
            let code = sample.code.clone().unwrap_or_default();
            *counts.entry((sample.status, code)).or_insert(0) += 1;
        }
        counts
    }

    pub fn count(&self, status: u16) -> usize {
        self.samples.iter().filter(|s| s.status == status).count()
    }

    /// Answers per second over the whole phase.
    pub fn per_second(&self) -> f64 {
        rate(self.samples.len(), self.elapsed)
    }

    pub fn latencies(&self, keep: impl Fn(&Sample) -> bool) -> Latencies {
        Latencies::of(
            self.samples
                .iter()
                .filter(|sample| keep(sample))
                .map(|s| s.latency)
                .collect(),
        )
    }

    /// A line like `201 ×5000, 409 ×15000`.
    pub fn status_line(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses()
            .iter()
            .map(|(status, count)| match status {
                0 => format!("no answer ×{count}"),
                status => format!("{status} ×{count}"),
            })
            .collect();
        if self.not_sent > 0 {
            parts.push(format!("not sent (timeout) ×{}", self.not_sent));
        }
        parts.join(", ")
    }
}

pub fn rate(count: usize, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// A latency distribution (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, Default)]
pub struct Latencies {
    pub count: usize,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latencies {
    pub fn of(mut values: Vec<Duration>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_unstable();
        let at = |p: f64| {
            let rank = (p * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Self {
            count: values.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }

    /// `p50 1.2 ms, p95 …, p99 …, max …`.
    pub fn line(&self) -> String {
        format!(
            "p50 {}, p95 {}, p99 {}, max {}",
            ms(self.p50),
            ms(self.p95),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// A duration in milliseconds, with a precision that suits its size.
pub fn ms(duration: Duration) -> String {
    let millis = duration.as_secs_f64() * 1000.0;
    if millis < 10.0 {
        format!("{millis:.2} ms")
    } else if millis < 100.0 {
        format!("{millis:.1} ms")
    } else {
        format!("{} ms", grouped(millis.round() as u64))
    }
}

/// A whole number with its thousands grouped by commas, as the README
/// writes figures: `4544` is `4,544`.
pub fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// One job: given its number and the worker's connections, send whatever
/// requests it needs and return the answer that counts.
pub type Job = Arc<
    dyn for<'a> Fn(usize, &'a mut Worker) -> BoxFuture<'a, anyhow::Result<Answer>> + Send + Sync,
>;

/// Runs jobs `0..count` at `concurrency`, for at most `timeout`. Every
/// worker's connections are opened before the clock starts.
pub async fn drive(
    count: usize,
    concurrency: usize,
    endpoints: &Arc<[Endpoint]>,
    timeout: Duration,
    job: Job,
) -> anyhow::Result<Run> {
    let concurrency = concurrency.clamp(1, count.max(1));
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut worker = Worker::new(endpoints.clone());
        worker.connect_all().await?;
        workers.push(worker);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + timeout;
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            let next = next.clone();
            let job = job.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        break;
                    }
                    let sent = Instant::now();
                    let answer = job(index, &mut worker).await;
                    let done = Instant::now();
                    let (status, code) = match answer {
                        Ok(answer) if answer.status < 300 => (answer.status, None),
                        Ok(answer) => (answer.status, answer.problem_code()),
                        Err(error) => (0, Some(format!("{error:#}"))),
                    };
                    samples.push(Sample {
                        index,
                        status,
                        code,
                        finished: done - start,
                        latency: done - sent,
                    });
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(count);
    for task in tasks {
        samples.extend(task.await?);
    }
    let elapsed = start.elapsed();
    samples.sort_by_key(|sample| sample.index);
    let not_sent = count.saturating_sub(samples.len());
    Ok(Run {
        samples,
        elapsed,
        not_sent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(statuses: &[u16], elapsed_ms: u64, not_sent: usize) -> Run {
        let samples = statuses
            .iter()
            .enumerate()
            .map(|(index, status)| Sample {
                index,
                status: *status,
                code: None,
                finished: Duration::from_millis(elapsed_ms),
                latency: Duration::from_millis(1),
            })
            .collect();
        Run {
            samples,
            elapsed: Duration::from_millis(elapsed_ms),
            not_sent,
        }
    }

    #[test]
    fn combined_runs_add_their_time_and_keep_every_answer_apart() {
        let combined = Run::combine(vec![
            run_of(&[200, 200], 10, 1),
            run_of(&[200, 429, 200], 30, 0),
        ]);
        assert_eq!(combined.elapsed, Duration::from_millis(40));
        assert_eq!(combined.not_sent, 1);
        assert_eq!(combined.statuses(), BTreeMap::from([(200, 4), (429, 1)]));
        let indices: Vec<usize> = combined.samples.iter().map(|s| s.index).collect();
        assert_eq!(indices, [0, 1, 3, 4, 5]);
        assert_eq!(combined.samples[4].finished, Duration::from_millis(40));
        assert_eq!(combined.per_second(), 5.0 / 0.04);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let latencies = Latencies::of(values);
        assert_eq!(latencies.count, 100);
        assert_eq!(latencies.p50, Duration::from_millis(50));
        assert_eq!(latencies.p95, Duration::from_millis(95));
        assert_eq!(latencies.p99, Duration::from_millis(99));
        assert_eq!(latencies.max, Duration::from_millis(100));
        let one = Latencies::of(vec![Duration::from_millis(7)]);
        assert_eq!(
            (one.p50, one.p99),
            (Duration::from_millis(7), Duration::from_millis(7))
        );
        assert_eq!(Latencies::of(Vec::new()).count, 0);
    }

    #[test]
    fn long_durations_are_whole_milliseconds_grouped_by_thousands() {
        assert_eq!(ms(Duration::from_micros(4_567)), "4.57 ms");
        assert_eq!(ms(Duration::from_micros(45_670)), "45.7 ms");
        assert_eq!(ms(Duration::from_micros(456_700)), "457 ms");
        assert_eq!(ms(Duration::from_micros(4_543_600)), "4,544 ms");
        assert_eq!(grouped(100_001), "100,001");
    }
}
