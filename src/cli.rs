//! The `commerce` command line: serve, migrate, create-admin, seed-demo,
//! rebuild-projections, verify-projections.

use std::sync::Arc;

use clap::{Parser, Subcommand};
use projections::Projection;

use crate::auth::accounts::{self, Account, NewAccount};
use crate::auth::Role;
use crate::config::Settings;
use crate::http::problem::ApiError;
use crate::startup::Application;

#[derive(Debug, Parser)]
#[command(
    name = "commerce",
    version,
    about = "Event-sourced commerce backend built for flash sales"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if needed, migrate, and serve HTTP (the default).
    Serve,
    /// Create the database if needed and apply migrations, then exit.
    Migrate,
    /// Create an admin account (admins cannot register through the API).
    CreateAdmin {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Fill the catalog with demo categories, products, variants and stock
    /// (safe to run again: it only adds what is missing).
    SeedDemo {
        /// How many products (default 30); 100000 makes a benchmark catalog.
        #[arg(long, default_value_t = crate::catalog::seed::DEMO_PRODUCTS)]
        products: usize,
    },
    /// Drop and rebuild read models from the event store: each is built
    /// beside the live tables and swapped in, so a running server keeps
    /// answering. Reports events per second.
    RebuildProjections {
        /// Only this projection (repeatable); every one when none is named.
        #[arg(long = "projection")]
        projections: Vec<String>,
    },
    /// Rebuild read models into scratch tables and compare them with the
    /// live ones, printing every difference; exits non-zero on any.
    VerifyProjections {
        /// Only this projection (repeatable); every one when none is named.
        #[arg(long = "projection")]
        projections: Vec<String>,
    },
}

pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let application = Application::build(settings).await?;
            tracing::info!(port = application.port(), "listening");
            application.run_until_stopped().await
        }
        Command::Migrate => {
            crate::db::create_database_if_missing(&settings).await?;
            let pool = crate::db::connect(&settings).await?;
            crate::db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::SeedDemo { products } => {
            crate::db::create_database_if_missing(&settings).await?;
            let pool = crate::db::connect(&settings).await?;
            crate::db::migrate(&pool).await?;
            let redis = crate::redis_cache::Redis::connect_lazily(&settings)?;
            let caches = crate::read_models::Caches::new(&redis);
            let report = crate::catalog::seed::seed_demo(&pool, &caches, products).await?;
            println!("{}", crate::catalog::seed::summary(&report));
            Ok(())
        }
        Command::RebuildProjections { projections } => {
            let (pool, chosen) = projections_to_rebuild(&settings, &projections).await?;
            let reports = projections::rebuild::rebuild_all(&pool, &chosen).await?;
            let (mut events, mut seconds) = (0u64, 0f64);
            for report in &reports {
                println!(
                    "{}: {} events read, {} applied, in {:.2} s ({:.0} events/s); swapped in",
                    report.projection,
                    report.events_read,
                    report.events_applied,
                    report.elapsed.as_secs_f64(),
                    report.events_per_second()
                );
                events += report.events_read;
                seconds += report.elapsed.as_secs_f64();
            }
            let rate = if seconds > 0.0 {
                events as f64 / seconds
            } else {
                0.0
            };
            println!(
                "rebuilt {} read models: {events} events replayed in {seconds:.2} s ({rate:.0} events/s)",
                reports.len()
            );
            Ok(())
        }
        Command::VerifyProjections { projections } => {
            let (pool, chosen) = projections_to_rebuild(&settings, &projections).await?;
            let reports = projections::rebuild::verify_all(&pool, &chosen).await?;
            let mut differing = Vec::new();
            for report in &reports {
                if report.is_clean() {
                    println!(
                        "{}: equal to a fresh rebuild ({} events, {:.2} s)",
                        report.projection,
                        report.events_read,
                        report.elapsed.as_secs_f64()
                    );
                    continue;
                }
                differing.push(report.projection);
                println!("{}: DIFFERS from a fresh rebuild", report.projection);
                for difference in &report.differences {
                    println!(
                        "  {}: {} live rows not in the rebuild, {} rebuilt rows not live",
                        difference.table, difference.only_live, difference.only_rebuilt
                    );
                    for row in &difference.live_samples {
                        println!("    live only:    {row}");
                    }
                    for row in &difference.rebuilt_samples {
                        println!("    rebuild only: {row}");
                    }
                }
            }
            if differing.is_empty() {
                Ok(())
            } else {
                anyhow::bail!(
                    "read models differ from a fresh rebuild: {}",
                    differing.join(", ")
                )
            }
        }
        Command::CreateAdmin {
            email,
            password,
            name,
        } => {
            crate::db::create_database_if_missing(&settings).await?;
            let pool = crate::db::connect(&settings).await?;
            crate::db::migrate(&pool).await?;
            let admin = create_admin(&pool, settings.bcrypt_cost, &email, password, name).await?;
            tracing::info!(user_id = %admin.id, email = %admin.email, "admin created");
            println!("created admin {} ({})", admin.email, admin.id);
            Ok(())
        }
    }
}

/// Creates an admin account under the same rules as registration.
pub async fn create_admin(
    pool: &sqlx::PgPool,
    bcrypt_cost: u32,
    email: &str,
    password: String,
    name: Option<String>,
) -> anyhow::Result<Account> {
    let new_account = NewAccount::parse(email, password, name).map_err(|errors| {
        let reasons: Vec<String> = errors
            .iter()
            .map(|error| format!("--{} {}", error.field, error.message))
            .collect();
        anyhow::anyhow!("cannot create the admin: {}", reasons.join("; "))
    })?;
    accounts::create_user(pool, new_account, Role::Admin, bcrypt_cost)
        .await
        .map_err(|error| match error {
            ApiError::Conflict(_) => {
                anyhow::anyhow!(
                    "cannot create the admin: an account with the email {email:?} already exists"
                )
            }
            other => anyhow::Error::new(other).context("cannot create the admin"),
        })
}

/// Connects (migrating first, so every read-model table exists) and picks
/// the projections named, wired to the caches they refresh.
async fn projections_to_rebuild(
    settings: &Settings,
    names: &[String],
) -> anyhow::Result<(sqlx::PgPool, Vec<Arc<dyn Projection>>)> {
    crate::db::create_database_if_missing(settings).await?;
    let pool = crate::db::connect(settings).await?;
    crate::db::migrate(&pool).await?;
    let redis = crate::redis_cache::Redis::connect_lazily(settings)?;
    let caches = crate::read_models::Caches::new(&redis);
    let every = crate::read_models::all(&pool, &caches);
    if names.is_empty() {
        return Ok((pool, every));
    }
    let known: Vec<&str> = every.iter().map(|projection| projection.name()).collect();
    if let Some(unknown) = names.iter().find(|name| !known.contains(&name.as_str())) {
        anyhow::bail!(
            "no projection is called {unknown:?}; there are: {}",
            known.join(", ")
        );
    }
    let chosen = every
        .into_iter()
        .filter(|projection| names.iter().any(|name| name == projection.name()))
        .collect();
    Ok((pool, chosen))
}
