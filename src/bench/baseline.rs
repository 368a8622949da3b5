//! The SQL baselines the server is measured against, run by the benchmark
//! itself on the same Postgres: the hand-written hot-row reservation, and
//! the catalog search statement without the HTTP layer around it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use projections::catalog_queries::{self, ListingFilter, ListingSort};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use super::load::{rate, Latencies};

/// The page size of a listing when the client does not ask for one.
pub const SEARCH_PAGE_SIZE: i64 = 20;

/// Connections kept free for the servers and everybody else.
const CONNECTION_HEADROOM: i64 = 10;

/// The result of the hot-row baseline.
#[derive(Debug, Clone)]
pub struct HotRow {
    pub concurrency: usize,
    pub taken: usize,
    /// Updates that found nothing left (the sale was over).
    pub refused: usize,
    /// From the start until the last unit was taken.
    pub sell_out: Duration,
    /// Latencies of the successful updates.
    pub latencies: Latencies,
    /// Updates per second of every run this one was chosen from, sorted.
    pub runs_per_second: Vec<f64>,
}

impl HotRow {
    pub fn per_second(&self) -> f64 {
        rate(self.taken, self.sell_out)
    }

    /// The run with the median rate (the higher middle one of an even
    /// count), knowing the rates of all of them; `None` without runs.
    pub fn median_of(mut runs: Vec<HotRow>) -> Option<HotRow> {
        runs.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
        let rates: Vec<f64> = runs.iter().map(HotRow::per_second).collect();
        let middle = runs.len() / 2;
        let mut median = (middle < runs.len()).then(|| runs.swap_remove(middle))?;
        median.runs_per_second = rates;
        Some(median)
    }
}

/// A pool for the benchmark's own SQL, with at most `size` connections
/// (fewer if Postgres has not that many to spare; the second value says
/// how many it got).
pub async fn pool(database_url: &str, size: usize) -> anyhow::Result<(PgPool, usize)> {
    let small = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect(database_url)
        .await
        .context("connecting to Postgres")?;
    // Connections of a pool closed just before (the previous hot-row run)
    // take a moment to go: wait a little for them.
    let wanted = i64::try_from(size)
        .unwrap_or(i64::MAX)
        .saturating_add(CONNECTION_HEADROOM);
    let waiting_since = Instant::now();
    let free = loop {
        let free: i64 = sqlx::query_scalar(
            "SELECT current_setting('max_connections')::bigint \
                  - current_setting('superuser_reserved_connections')::bigint \
                  - (SELECT count(*) FROM pg_stat_activity)",
        )
        .fetch_one(&small)
        .await?;
        if free >= wanted || waiting_since.elapsed() > Duration::from_secs(3) {
            break free;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    small.close().await;
    let size = size.min(
        usize::try_from(free - CONNECTION_HEADROOM)
            .unwrap_or(1)
            .max(1),
    );
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(size).unwrap_or(u32::MAX))
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
        .connect(database_url)
        .await
        .context("connecting to Postgres")?;
    Ok((pool, size))
}

/// `UPDATE ... SET reserved = reserved + 1 WHERE ... AND on_hand - reserved >= 1`
/// on one row of `units`, autocommit, from `concurrency` connections, until
/// every unit is taken (or `timeout`). Uses, then drops, the scratch table
/// `bench_hot_row`.
pub async fn hot_row(
    database_url: &str,
    units: u32,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<HotRow> {
    let (pool, concurrency) = pool(database_url, concurrency).await?;
    sqlx::query("DROP TABLE IF EXISTS bench_hot_row")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE bench_hot_row (id int PRIMARY KEY, on_hand int NOT NULL, reserved int NOT NULL)",
    )
    .execute(&pool)
    .await?;
    sqlx::query("INSERT INTO bench_hot_row (id, on_hand, reserved) VALUES (1, $1, 0)")
        .bind(i32::try_from(units).context("--stock is too large for the hot row")?)
        .execute(&pool)
        .await?;

    // Every client holds its connection for the whole run, as pgbench's do.
    let mut connections = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut connection = pool.acquire().await?;
        // Prepared once per connection before the clock starts.
        sqlx::query("SELECT on_hand FROM bench_hot_row WHERE id = $1")
            .bind(1)
            .execute(&mut *connection)
            .await?;
        connections.push(connection);
    }
    let taken = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + timeout;
    let units = units as usize;
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|mut connection| {
            let taken = taken.clone();
            tokio::spawn(async move {
                let mut successes = Vec::new();
                let mut refused = 0;
                while taken.load(Ordering::Relaxed) < units && Instant::now() < deadline {
                    let sent = Instant::now();
                    let updated = sqlx::query(
                        "UPDATE bench_hot_row SET reserved = reserved + 1 \
                         WHERE id = $1 AND on_hand - reserved >= 1",
                    )
                    .bind(1)
                    .execute(&mut *connection)
                    .await?
                    .rows_affected();
                    let done = Instant::now();
                    if updated == 1 {
                        taken.fetch_add(1, Ordering::Relaxed);
                        successes.push((done - start, done - sent));
                    } else {
                        refused += 1;
                        break;
                    }
                }
                anyhow::Ok((successes, refused))
            })
        })
        .collect();
    let mut successes = Vec::with_capacity(units);
    let mut refused = 0;
    for task in tasks {
        let (mine, no) = task.await??;
        successes.extend(mine);
        refused += no;
    }
    let sell_out = successes
        .iter()
        .map(|(finished, _)| *finished)
        .max()
        .unwrap_or_default();
    let reserved: i32 = sqlx::query_scalar("SELECT reserved FROM bench_hot_row WHERE id = 1")
        .fetch_one(&pool)
        .await?;
    sqlx::query("DROP TABLE bench_hot_row")
        .execute(&pool)
        .await?;
    pool.close().await;
    if reserved as usize != successes.len() || successes.len() > units {
        bail!(
            "hot-row baseline is inconsistent: {} successful updates, reserved = {reserved}",
            successes.len()
        );
    }
    Ok(HotRow {
        concurrency,
        taken: successes.len(),
        refused,
        sell_out,
        latencies: Latencies::of(successes.into_iter().map(|(_, latency)| latency).collect()),
        runs_per_second: Vec::new(),
    })
}

/// The result of running the server's search statement directly.
#[derive(Debug, Clone)]
pub struct SqlSearch {
    pub concurrency: usize,
    pub queries: usize,
    pub elapsed: Duration,
    pub latencies: Latencies,
    /// How many products matched (the listing's `total`).
    pub total: u64,
}

/// What `GET /api/v1/products/get-products?q=<query>` asks the database:
/// the very function the handler calls (a count and a ranked page of 20).
pub fn search_filter(query: &str) -> ListingFilter {
    ListingFilter {
        search: Some(query.to_owned()),
        ..ListingFilter::default()
    }
}

/// Runs the search `queries` times at `concurrency`, straight on Postgres.
pub async fn sql_search(
    database_url: &str,
    query: &str,
    queries: usize,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<SqlSearch> {
    let (pool, concurrency) = pool(database_url, concurrency).await?;
    let filter = search_filter(query);
    // Warm: every connection opened, the plan cached, the index in memory.
    let (_, total) =
        catalog_queries::list_products(&pool, &filter, ListingSort::Relevance, SEARCH_PAGE_SIZE, 0)
            .await?;
    let mut warm = Vec::new();
    for _ in 0..concurrency {
        warm.push(pool.acquire().await?);
    }
    drop(warm);

    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + timeout;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let pool = pool.clone();
            let filter = filter.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < queries {
                    let sent = Instant::now();
                    catalog_queries::list_products(
                        &pool,
                        &filter,
                        ListingSort::Relevance,
                        SEARCH_PAGE_SIZE,
                        0,
                    )
                    .await?;
                    latencies.push(sent.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(queries);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = start.elapsed();
    pool.close().await;
    Ok(SqlSearch {
        concurrency,
        queries: latencies.len(),
        elapsed,
        latencies: Latencies::of(latencies),
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(taken: usize, seconds: u64) -> HotRow {
        HotRow {
            concurrency: 64,
            taken,
            refused: 0,
            sell_out: Duration::from_secs(seconds),
            latencies: Latencies::of(vec![Duration::from_millis(seconds)]),
            runs_per_second: Vec::new(),
        }
    }

    #[test]
    fn the_baseline_is_the_median_run_and_remembers_every_rate() {
        let median =
            HotRow::median_of(vec![run(3000, 1), run(1000, 1), run(2000, 1)]).expect("three runs");
        assert_eq!(median.taken, 2000);
        assert_eq!(median.latencies.p99, Duration::from_millis(1));
        assert_eq!(median.runs_per_second, vec![1000.0, 2000.0, 3000.0]);
        assert!(HotRow::median_of(Vec::new()).is_none());
    }
}
