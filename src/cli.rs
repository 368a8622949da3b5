//! The `commerce` command line: serve, migrate, create-admin, seed-demo.

use clap::{Parser, Subcommand};

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
            let report = crate::catalog::seed::seed_demo(&pool, products).await?;
            println!("{}", crate::catalog::seed::summary(&report));
            Ok(())
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
