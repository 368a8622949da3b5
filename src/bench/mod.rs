//! The flash-sale benchmark: one product with one variant of S units, B
//! buyers with one unit each in their carts, B checkouts at concurrency C
//! over keep-alive connections spread over the instances; then the
//! invariants, and the same run's baselines (a hand-written SQL hot row,
//! `/healthz`, the search statement straight on Postgres) as ratios.
//!
//! [`run`] drives servers that are already running (given by URL); the
//! `bench` binary starts them, or the tests do. Nothing here is timed in
//! tests: the smoke test only checks that the invariants hold.

pub mod baseline;
pub mod client;
pub mod cpu;
pub mod instances;
pub mod load;
pub mod report;
mod scenario;

use std::time::Duration;

pub use report::Report;
pub use scenario::{measure_hot_row, run};

use instances::Commerce;

/// Goals from the flash-sale issue; checked, never lowered.
pub mod goals {
    /// Successful checkouts per second ÷ hot-row updates per second, one instance.
    pub const THROUGHPUT_ONE_INSTANCE: f64 = 2.0;
    /// The same with several instances.
    pub const THROUGHPUT_SEVERAL_INSTANCES: f64 = 1.5;
    /// Checkout p99 ÷ hot-row p99, at most.
    pub const P99: f64 = 2.0;
    /// Cached product detail and cart reads per second ÷ `/healthz`, at least.
    pub const CACHED_READS: f64 = 0.5;
    /// HTTP search p95 ÷ SQL p95, at most.
    pub const SEARCH_P95: f64 = 1.5;
}

/// What to run, and against what.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URLs of the running instances (`http://127.0.0.1:PORT`).
    pub urls: Vec<String>,
    /// The database the instances use (for the SQL baselines and the
    /// diagnostics); `sslmode=disable` on loopback.
    pub database_url: String,
    /// An admin's credentials (see `commerce create-admin`).
    pub admin_email: String,
    pub admin_password: String,
    /// S: units of the one variant on sale.
    pub stock: u32,
    /// B: buyers, each with one unit in the cart.
    pub buyers: usize,
    /// C: requests (or SQL statements) in flight.
    pub concurrency: usize,
    /// Requests for each read figure (`/healthz`, product detail, cart).
    pub read_requests: usize,
    /// The hot-row SQL baseline.
    pub hot_row: HotRowBaseline,
    /// Run the search figure.
    pub search: Option<SearchOptions>,
    /// The longest any one phase may take.
    pub phase_timeout: Duration,
    /// Makes emails, SKUs and idempotency keys unique to this run.
    pub run_id: String,
    /// `commerce` itself, for `seed-demo` (search only).
    pub commerce: Option<Commerce>,
}

/// Whether and when the hot-row baseline runs.
#[derive(Debug, Clone)]
pub enum HotRowBaseline {
    Skip,
    /// First thing in [`run`].
    Measure,
    /// Already measured, before the servers held any connections: the
    /// `bench` binary does that so that the baseline gets C connections.
    Measured(baseline::HotRow),
}

#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// The full-text query, as a shopper would type it.
    pub query: String,
    /// How many times each side runs it.
    pub requests: usize,
    /// The catalog size to search; seeded with `seed-demo` when smaller.
    pub products: usize,
    /// The longest seeding may take.
    pub seed_timeout: Duration,
}

impl Options {
    /// Small figures for a correctness smoke run against `urls`.
    pub fn smoke(urls: Vec<String>, database_url: String, email: &str, password: &str) -> Self {
        Self {
            urls,
            database_url,
            admin_email: email.to_owned(),
            admin_password: password.to_owned(),
            stock: 20,
            buyers: 60,
            concurrency: 8,
            read_requests: 100,
            hot_row: HotRowBaseline::Measure,
            search: None,
            phase_timeout: Duration::from_secs(120),
            run_id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            commerce: None,
        }
    }
}
