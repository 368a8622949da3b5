//! `bench`: the flash-sale benchmark. Starts `commerce` instances (or uses
//! running ones), runs `commerce::bench::run`, prints the figures and the
//! invariants, and exits non-zero when an invariant fails.
//!
//! ```sh
//! cargo build --release --bin commerce && cargo run --release --bin bench -- --instances 1
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use commerce::bench::instances::{Commerce, Instances};
use commerce::bench::{self, HotRowBaseline, Options, SearchOptions};

// The client shares the machine with what it measures: the same allocator
// as the server keeps its own share of the CPU small.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Flash-sale benchmark: S units of one variant, B buyers, C checkouts in flight; \
             baselines and invariants in the same run"
)]
struct Args {
    /// How many `commerce` instances to start (sharing one database and Redis).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Use running servers instead of starting any (repeat or comma-separate;
    /// loopback only). Needs --database-url.
    #[arg(long = "url", value_delimiter = ',')]
    urls: Vec<String>,
    /// C: requests in flight (and SQL connections for the baselines).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// S: units of the variant on sale.
    #[arg(long, default_value_t = 5_000)]
    stock: u32,
    /// B: buyers, each with one unit in the cart.
    #[arg(long, default_value_t = 20_000)]
    buyers: usize,
    /// Requests for each read figure (/healthz, product detail, cart); 0 skips them.
    // Enough that each round of a figure lasts a good fraction of a second:
    // at 20,000 a figure took under half a second, and one run's ratios
    // moved by a tenth from the next's.
    #[arg(long, default_value_t = 200_000)]
    read_requests: usize,
    /// Also measure search (seeds a catalog of --search-products first if needed).
    #[arg(long)]
    search: bool,
    #[arg(long, default_value = "trail runner")]
    search_query: String,
    #[arg(long, default_value_t = 2_000)]
    search_requests: usize,
    #[arg(long, default_value_t = 100_000)]
    search_products: usize,
    /// The longest seeding the search catalog may take, in seconds.
    #[arg(long, default_value_t = 1_800)]
    seed_timeout: u64,
    /// Skip the hot-row SQL baseline.
    #[arg(long)]
    no_hot_row: bool,
    /// The longest any one phase (setup, sale, each read figure) may take, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The Postgres server (without a database name) the bench creates its database on.
    #[arg(
        long,
        env = "BENCH_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres: String,
    /// The database to use (created if missing, kept). Default: a fresh
    /// `bench_<timestamp>`, dropped after a run whose invariants all pass.
    #[arg(long)]
    database: Option<String>,
    /// The full URL of the database the --url servers use.
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long, env = "BENCH_REDIS", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Keep the fresh database after the run.
    #[arg(long)]
    keep_database: bool,
    /// The `commerce` binary (default: the one next to this binary).
    #[arg(long)]
    commerce_bin: Option<PathBuf>,
    /// An existing admin (default: one made with `commerce create-admin`).
    #[arg(long, requires = "admin_password")]
    admin_email: Option<String>,
    #[arg(long, requires = "admin_email")]
    admin_password: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Dropping the run (ctrl-c) drops the instances, which kills them.
    let outcome = tokio::select! {
        outcome = bench_main(args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: an invariant failed");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("bench: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Adds `sslmode=disable` unless the URL names a mode: TLS on loopback
/// costs a quarter of Postgres's throughput.
fn without_tls(url: &str) -> String {
    if url.contains("sslmode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    }
}

async fn bench_main(args: Args) -> anyhow::Result<bool> {
    let run_id = chrono::Utc::now().format("%Y%m%d_%H%M%S").to_string();
    let timeout = Duration::from_secs(args.timeout);
    let spawning = args.urls.is_empty();
    if spawning && !(1..=16).contains(&args.instances) {
        bail!("--instances must be from 1 to 16");
    }
    let postgres = args.postgres.trim_end_matches('/').to_owned();
    let (database_url, fresh_database) = match (&args.database_url, &args.database) {
        (Some(url), _) => (without_tls(url), None),
        (None, _) if !spawning => {
            bail!("--url needs --database-url (the database those servers use)")
        }
        (None, Some(name)) => (without_tls(&format!("{postgres}/{name}")), None),
        (None, None) => {
            let name = format!("bench_{run_id}");
            (without_tls(&format!("{postgres}/{name}")), Some(name))
        }
    };

    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let redis_prefix = format!("bench:{run_id}:");
    let env: Vec<(String, String)> = [
        ("APP_ENV", "development"),
        ("DATABASE_URL", database_url.as_str()),
        ("REDIS_URL", args.redis.as_str()),
        ("REDIS_KEY_PREFIX", redis_prefix.as_str()),
        ("JWT_SECRET", secret.as_str()),
        ("BCRYPT_COST", "4"),
        ("RATE_LIMIT_PUBLIC_PER_MIN", "0"),
        ("RATE_LIMIT_AUTH_PER_MIN", "0"),
        ("RATE_LIMIT_SENSITIVE_PER_MIN", "0"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "warn"),
        ("PAYMENT_PROVIDER", "fake"),
        // Long enough that no token or hold runs out during a run.
        ("ACCESS_TOKEN_TTL_SECONDS", "7200"),
        ("ORDER_HOLD_SECONDS", "7200"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    let binary = match &args.commerce_bin {
        Some(path) => path.clone(),
        None => Commerce::sibling_binary()?,
    };
    let commerce = Commerce { binary, env };

    let (admin_email, admin_password) = match (&args.admin_email, &args.admin_password) {
        (Some(email), Some(password)) => (email.clone(), password.clone()),
        _ => {
            let email = format!("admin-{run_id}@example.com");
            let password = uuid::Uuid::new_v4().simple().to_string();
            // Also creates the database and migrates it.
            commerce
                .run(
                    &["create-admin", "--email", &email, "--password", &password],
                    timeout,
                )
                .await
                .context("creating the admin")?;
            (email, password)
        }
    };

    let mut options = Options {
        urls: Vec::new(),
        database_url: database_url.clone(),
        admin_email,
        admin_password,
        stock: args.stock,
        buyers: args.buyers,
        concurrency: args.concurrency,
        read_requests: args.read_requests,
        hot_row: if args.no_hot_row {
            HotRowBaseline::Skip
        } else {
            HotRowBaseline::Measure
        },
        search: args.search.then(|| SearchOptions {
            query: args.search_query.clone(),
            requests: args.search_requests,
            products: args.search_products,
            seed_timeout: Duration::from_secs(args.seed_timeout),
        }),
        phase_timeout: timeout,
        run_id: run_id.clone(),
        commerce: Some(commerce.clone()),
    };
    if spawning && !args.no_hot_row {
        // Before the instances open their pools, so that it gets C connections.
        options.hot_row = HotRowBaseline::Measured(bench::measure_hot_row(&options).await?);
    }

    let (instances, urls) = if spawning {
        let logs = std::env::temp_dir().join(format!("commerce-bench-{run_id}"));
        std::fs::create_dir_all(&logs)?;
        println!(
            "starting {} instance(s) of {} (logs in {})",
            args.instances,
            commerce.binary.display(),
            logs.display()
        );
        let instances = Instances::start(&commerce, args.instances, &logs).await?;
        let urls = instances.urls();
        (Some(instances), urls)
    } else {
        (None, args.urls.clone())
    };

    options.urls = urls;
    let outcome = bench::run(&options).await;

    if let Some(instances) = instances {
        let logs = instances.logs();
        instances.stop().await;
        println!("instances stopped; logs: {logs:?}");
        match forget_redis_keys(&args.redis, &redis_prefix).await {
            Ok(count) => println!("removed {count} Redis keys under {redis_prefix}"),
            Err(error) => {
                eprintln!("could not remove the Redis keys under {redis_prefix}: {error:#}")
            }
        }
    }
    let report = outcome?;
    println!(
        "{}\ncommand: bench {}",
        report.render(),
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let passed = report.passed();
    if let Some(name) = fresh_database {
        if passed && !args.keep_database {
            drop_database(&postgres, &name).await?;
            println!("database {name} dropped");
        } else {
            println!("database {name} kept");
        }
    }
    Ok(passed)
}

/// Deletes this run's cache and rate-limit keys (they would expire anyway).
async fn forget_redis_keys(url: &str, prefix: &str) -> anyhow::Result<usize> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    // Bounded: a scan visits every key once; stop after far more rounds than that needs.
    for _ in 0..100_000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            deleted += redis::cmd("DEL")
                .arg(&keys)
                .query_async::<usize>(&mut connection)
                .await?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(deleted)
}

async fn drop_database(postgres: &str, name: &str) -> anyhow::Result<()> {
    if !name.starts_with("bench_") || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("refusing to drop {name:?}: not a benchmark database");
    }
    let mut connection: sqlx::PgConnection =
        sqlx::Connection::connect(&without_tls(&format!("{postgres}/postgres"))).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut connection)
        .await?;
    Ok(())
}
