//! The `commerce` command line: serve, migrate, create-admin.

use clap::{Parser, Subcommand};

use crate::config::Settings;
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
        Command::CreateAdmin {
            email,
            password,
            name,
        } => {
            crate::db::create_database_if_missing(&settings).await?;
            let pool = crate::db::connect(&settings).await?;
            crate::db::migrate(&pool).await?;
            let _ = (email, password, name);
            anyhow::bail!("create-admin is not available yet")
        }
    }
}
