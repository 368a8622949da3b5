//! What a benchmark run found: the figures, the baselines, the invariant
//! checks, and the summary table that goes into the README.

use std::fmt::Write as _;
use std::time::Duration;

use super::baseline::{HotRow, SqlSearch};
use super::goals;
use super::load::{grouped, ms, rate, Latencies, Run};

/// The machine the run happened on.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub postgres: String,
    /// `/proc/loadavg`'s first three fields before and after the run.
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), {}; load average before {} / after {}",
            self.cores, self.cpu, self.postgres, self.load_before, self.load_after
        )
    }
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The checkout phase.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub run: Run,
    /// Answers 201.
    pub successful: usize,
    /// From the first request until the last 201 arrived.
    pub sell_out: Duration,
    /// Answers per instance.
    pub per_instance: Vec<usize>,
}

impl Checkout {
    pub fn all_per_second(&self) -> f64 {
        self.run.per_second()
    }

    /// 201s per second while there was stock to sell: the figure that
    /// compares with the hot row, which also stops at sell-out.
    pub fn successful_per_second(&self) -> f64 {
        rate(self.successful, self.sell_out)
    }

    pub fn latencies_all(&self) -> Latencies {
        self.run.latencies(|_| true)
    }

    pub fn latencies_created(&self) -> Latencies {
        self.run.latencies(|sample| sample.status == 201)
    }

    pub fn latencies_refused(&self) -> Latencies {
        self.run.latencies(|sample| sample.status != 201)
    }
}

/// One invariant, checked after the sale.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

/// The read figures: the trivial route and two cached reads.
#[derive(Debug, Clone)]
pub struct Reads {
    pub healthz: Run,
    pub product: Run,
    pub cart: Run,
    /// How many different buyers' carts were read.
    pub cart_readers: usize,
}

/// The search figure: HTTP against the same statement in SQL.
#[derive(Debug, Clone)]
pub struct Search {
    pub query: String,
    pub products: u64,
    pub http: Run,
    pub sql: SqlSearch,
    /// Seconds spent seeding the catalog first, if it had to be.
    pub seeded: Option<Duration>,
}

/// Everything one run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub instances: usize,
    pub concurrency: usize,
    pub stock: u32,
    pub buyers: usize,
    pub machine: Machine,
    pub setup: Duration,
    pub hot_row: Option<HotRow>,
    pub checkout: Checkout,
    pub checks: Vec<Check>,
    pub reads: Option<Reads>,
    pub search: Option<Search>,
    /// Where the time went (database work per checkout and the like).
    pub diagnostics: Vec<String>,
}

/// A line of the summary table.
#[derive(Debug, Clone)]
pub struct Row {
    pub figure: String,
    pub ours: String,
    pub baseline: String,
    pub ratio: Option<f64>,
    pub goal: String,
    pub met: Option<bool>,
}

fn per_second(value: f64) -> String {
    format!("{}/s", grouped(value.round() as u64))
}

fn ratio(ours: f64, baseline: f64) -> Option<f64> {
    (baseline > 0.0).then(|| ours / baseline)
}

fn duration_ratio(ours: Duration, baseline: Duration) -> Option<f64> {
    ratio(ours.as_secs_f64(), baseline.as_secs_f64())
}

impl Report {
    /// Every invariant held.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|check| check.passed)
    }

    pub fn checks_text(&self) -> String {
        let mut text = String::new();
        for check in &self.checks {
            let verdict = if check.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(text, "  {verdict}  {}: {}", check.name, check.detail);
        }
        text
    }

    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let checkout = &self.checkout;
        let throughput_goal = if self.instances > 1 {
            goals::THROUGHPUT_SEVERAL_INSTANCES
        } else {
            goals::THROUGHPUT_ONE_INSTANCE
        };
        let hot = self.hot_row.as_ref();
        let hot_rate = hot.map(HotRow::per_second);
        let successful = ratio(checkout.successful_per_second(), hot_rate.unwrap_or(0.0));
        rows.push(Row {
            figure: "successful checkouts/s (until sell-out) vs hot-row updates/s".into(),
            ours: per_second(checkout.successful_per_second()),
            baseline: hot_rate.map_or("—".into(), per_second),
            ratio: successful,
            goal: format!("≥ {throughput_goal:.1}×"),
            met: successful.map(|r| r >= throughput_goal),
        });
        rows.push(Row {
            figure: "all checkout answers/s (201 + 409)".into(),
            ours: per_second(checkout.all_per_second()),
            baseline: hot_rate.map_or("—".into(), per_second),
            ratio: ratio(checkout.all_per_second(), hot_rate.unwrap_or(0.0)),
            goal: "—".into(),
            met: None,
        });
        let created = checkout.latencies_created();
        let p99 = hot.and_then(|hot| duration_ratio(created.p99, hot.latencies.p99));
        rows.push(Row {
            figure: "checkout p99, 201s vs hot-row p99".into(),
            ours: ms(created.p99),
            baseline: hot.map_or("—".into(), |hot| ms(hot.latencies.p99)),
            ratio: p99,
            goal: format!("≤ {:.1}×", goals::P99),
            met: p99.map(|r| r <= goals::P99),
        });
        let all = checkout.latencies_all();
        rows.push(Row {
            figure: "checkout p99, all answers".into(),
            ours: ms(all.p99),
            baseline: hot.map_or("—".into(), |hot| ms(hot.latencies.p99)),
            ratio: hot.and_then(|hot| duration_ratio(all.p99, hot.latencies.p99)),
            goal: "—".into(),
            met: None,
        });
        if let Some(reads) = &self.reads {
            let healthz = reads.healthz.per_second();
            for (figure, run) in [
                (
                    "product detail req/s (cache hit) vs /healthz",
                    &reads.product,
                ),
                ("cart read req/s (cache hit) vs /healthz", &reads.cart),
            ] {
                let r = ratio(run.per_second(), healthz);
                let clean = run.count(200) == run.samples.len() && run.not_sent == 0;
                rows.push(Row {
                    figure: figure.into(),
                    ours: per_second(run.per_second()),
                    baseline: per_second(healthz),
                    ratio: r,
                    goal: format!("≥ {:.1}×", goals::CACHED_READS),
                    met: r.map(|r| clean && r >= goals::CACHED_READS),
                });
            }
        }
        if let Some(search) = &self.search {
            let http = search.http.latencies(|s| s.status == 200);
            let r = duration_ratio(http.p95, search.sql.latencies.p95);
            let clean = search.http.count(200) == search.http.samples.len();
            rows.push(Row {
                figure: format!(
                    "search p95, HTTP vs SQL (q={:?}, {} products)",
                    search.query,
                    grouped(search.products)
                ),
                ours: ms(http.p95),
                baseline: ms(search.sql.latencies.p95),
                ratio: r,
                goal: format!("≤ {:.1}×", goals::SEARCH_P95),
                met: r.map(|r| clean && r <= goals::SEARCH_P95),
            });
        }
        let passed = self.checks.iter().filter(|check| check.passed).count();
        rows.push(Row {
            figure: "invariant checks".into(),
            ours: format!("{passed}/{} PASS", self.checks.len()),
            baseline: "—".into(),
            ratio: None,
            goal: "all pass".into(),
            met: Some(self.passed()),
        });
        rows
    }

    /// The summary as a Markdown table.
    pub fn summary_table(&self) -> String {
        let mut table = String::from(
            "| figure | ours | baseline | ratio | goal | met? |\n|---|---|---|---|---|---|\n",
        );
        for row in self.rows() {
            let _ = writeln!(
                table,
                "| {} | {} | {} | {} | {} | {} |",
                row.figure,
                row.ours,
                row.baseline,
                row.ratio.map_or("—".into(), |r| format!("{r:.2}×")),
                row.goal,
                match row.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                }
            );
        }
        table
    }

    /// The whole report, as the benchmark prints it at the end.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let checkout = &self.checkout;
        let _ = writeln!(
            out,
            "\n== results: {} instance(s), C={}, S={}, B={} ==",
            self.instances, self.concurrency, self.stock, self.buyers
        );
        let _ = writeln!(out, "machine: {}", self.machine.describe());
        let _ = writeln!(
            out,
            "setup (not measured): {:.1} s",
            self.setup.as_secs_f64()
        );
        if let Some(hot) = &self.hot_row {
            let capped = if hot.concurrency < self.concurrency {
                " — fewer than C: Postgres had no more free connections"
            } else {
                ""
            };
            let runs = if hot.runs_per_second.len() > 1 {
                let rates: Vec<String> =
                    hot.runs_per_second.iter().map(|r| per_second(*r)).collect();
                format!(
                    " (the median of {} runs: {})",
                    rates.len(),
                    rates.join(", ")
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "hot row (SQL, {} connections{capped}): {} units in {:.2} s = {}{runs}; latency {}",
                hot.concurrency,
                hot.taken,
                hot.sell_out.as_secs_f64(),
                per_second(hot.per_second()),
                hot.latencies.line()
            );
        }
        let _ = writeln!(
            out,
            "checkout: {} answers in {:.2} s = {} (all); {} 201s, sold out after {:.2} s = {} (successful)",
            checkout.run.samples.len(),
            checkout.run.elapsed.as_secs_f64(),
            per_second(checkout.all_per_second()),
            checkout.successful,
            checkout.sell_out.as_secs_f64(),
            per_second(checkout.successful_per_second()),
        );
        let _ = writeln!(out, "  latency, all:  {}", checkout.latencies_all().line());
        let _ = writeln!(
            out,
            "  latency, 201:  {}",
            checkout.latencies_created().line()
        );
        let _ = writeln!(
            out,
            "  latency, rest: {}",
            checkout.latencies_refused().line()
        );
        let _ = writeln!(out, "  status: {}", checkout.run.status_line());
        for ((status, code), count) in checkout.run.outcomes() {
            if status != 201 {
                let _ = writeln!(out, "    {status} {code}: {count}");
            }
        }
        let _ = writeln!(out, "  answers per instance: {:?}", checkout.per_instance);
        let _ = writeln!(out, "invariants:\n{}", self.checks_text().trim_end());
        if let Some(reads) = &self.reads {
            for (name, run) in [
                ("/healthz", &reads.healthz),
                ("product detail", &reads.product),
                ("cart read", &reads.cart),
            ] {
                let _ = writeln!(
                    out,
                    "{name}: {} in {:.2} s = {}; latency {}; status {}",
                    run.samples.len(),
                    run.elapsed.as_secs_f64(),
                    per_second(run.per_second()),
                    run.latencies(|_| true).line(),
                    run.status_line()
                );
            }
        }
        if let Some(search) = &self.search {
            if let Some(seeded) = search.seeded {
                let _ = writeln!(
                    out,
                    "search: catalog seeded in {:.0} s",
                    seeded.as_secs_f64()
                );
            }
            let _ = writeln!(
                out,
                "search HTTP: {} in {:.2} s = {}; latency {}; status {}",
                search.http.samples.len(),
                search.http.elapsed.as_secs_f64(),
                per_second(search.http.per_second()),
                search.http.latencies(|_| true).line(),
                search.http.status_line()
            );
            let _ = writeln!(
                out,
                "search SQL ({} connections): {} in {:.2} s = {}; latency {}; {} matches",
                search.sql.concurrency,
                search.sql.queries,
                search.sql.elapsed.as_secs_f64(),
                per_second(rate(search.sql.queries, search.sql.elapsed)),
                search.sql.latencies.line(),
                search.sql.total
            );
        }
        if !self.diagnostics.is_empty() {
            let _ = writeln!(out, "where the time goes:");
            for line in &self.diagnostics {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(out, "\n{}", self.summary_table());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_grouped_by_thousands() {
        assert_eq!(per_second(0.4), "0/s");
        assert_eq!(per_second(999.6), "1,000/s");
        assert_eq!(per_second(1_234_567.0), "1,234,567/s");
    }
}
