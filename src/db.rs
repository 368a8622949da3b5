//! The Postgres pool, database creation and migrations.

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::Settings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What each of the server's connections calls itself in Postgres
/// (`application_name`, shown in `pg_stat_activity`), so that an operator,
/// and the benchmark's CPU split, can tell the serial stages' backends from
/// the pool's.
pub mod application_names {
    /// The shared pool: request handlers, projections, the scheduler.
    pub const POOL: &str = "commerce";
    /// The checkout committer's own connection.
    pub const CHECKOUT_COMMITTER: &str = "commerce checkout committer";
    /// The idempotency key writer's own connections.
    pub const IDEMPOTENCY_KEYS: &str = "commerce idempotency keys";
}

/// The options `pool` connects with, for a connection of a stage's own
/// that calls itself `application_name` (one of [`application_names`]).
pub fn own_connection_options(pool: &PgPool, application_name: &str) -> PgConnectOptions {
    pool.connect_options()
        .as_ref()
        .clone()
        .application_name(application_name)
}

pub fn connect_options(settings: &Settings) -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(settings.database_url.expose_secret())
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {e}"))?;
    // A runaway query must not hold a connection (or a lock) forever.
    Ok(options
        .application_name(application_names::POOL)
        .options([
            ("statement_timeout", "15s"),
            ("idle_in_transaction_session_timeout", "60s"),
        ])
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500)))
}

/// Creates the configured database if it does not exist yet.
pub async fn create_database_if_missing(settings: &Settings) -> anyhow::Result<()> {
    let options = connect_options(settings)?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another instance created it at the same moment.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
            Err(error) => return Err(error.into()),
        }
    }
    admin.close().await?;
    Ok(())
}

/// How long a pooled connection may sit unused before it is checked with a
/// round trip when taken.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // sqlx checks every connection taken from the pool with a round
        // trip; in a sale each projection step paid it. Only a connection
        // that sat unused for a while is checked now (Postgres may have
        // restarted meanwhile); one in use a moment ago was just checked
        // when it went back to the pool.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_AFTER_IDLE {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(connect_options(settings)?)
        .await?)
}

/// Applies pending migrations; safe to run from several instances at once
/// (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Fails, naming each migration this build brings that the database lacks,
/// unless there is none: for a server that does not migrate at start.
pub async fn check_migrated(pool: &PgPool) -> anyhow::Result<()> {
    const UNDEFINED_TABLE: &str = "42P01";
    let applied: Vec<i64> =
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
        {
            Ok(applied) => applied,
            Err(sqlx::Error::Database(error))
                if error.code().as_deref() == Some(UNDEFINED_TABLE) =>
            {
                Vec::new()
            }
            Err(error) => return Err(error.into()),
        };
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|migration| {
            !migration.migration_type.is_down_migration() && !applied.contains(&migration.version)
        })
        .map(|migration| format!("{:04} {}", migration.version, migration.description))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "MIGRATE_ON_START is false and the database lacks migrations ({}): \
         run `commerce migrate` against it first",
        missing.join(", ")
    )
}
