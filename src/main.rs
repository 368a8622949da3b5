//! `commerce`: parse the command line, read settings, run.

use clap::Parser;
use commerce::cli::{self, Cli};
use commerce::config::Settings;

// glibc's allocator took a quarter of the server's CPU in a flash-sale
// profile (many threads freeing what others allocated); mimalloc's
// thread-local heaps make that a small fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A missing .env is normal; a broken one is reported by the settings.
    let _ = dotenvy::dotenv();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("commerce: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    commerce::telemetry::init_tracing(settings.log_format);
    match cli::run(cli, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "commerce failed");
            eprintln!("commerce: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
