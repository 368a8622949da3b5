//! Builds the application from settings and runs it: the HTTP server, the
//! projections and the event listener side by side, stopping together.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use projections::ProjectionSet;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing_actix_web::TracingLogger;

use crate::auth::tokens::AccessTokens;
use crate::config::Settings;
use crate::event_store::{CommandBus, EventStore};
use crate::http::idempotency::ledger::KeyLedger;
use crate::http::{self, access, extract, idempotency, middleware, problem, security};
use crate::rate_limit::login_guard::LoginGuard;
use crate::rate_limit::RateLimits;
use crate::redis_cache::Redis;
use crate::shop::checkout_commit::CheckoutCommitter;
use crate::state::AppState;

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    shutdown: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
}

impl Application {
    /// Connects, migrates (or, with `MIGRATE_ON_START` off, checks that
    /// nothing is left to migrate) and binds; nothing is served until
    /// `run_until_stopped`.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = if settings.migrate_on_start {
            crate::db::create_database_if_missing(&settings).await?;
            let pool = crate::db::connect(&settings).await?;
            crate::db::migrate(&pool).await?;
            pool
        } else {
            let pool = crate::db::connect(&settings).await?;
            crate::db::check_migrated(&pool).await?;
            pool
        };
        Self::build_with_pool(settings, pool).await
    }

    /// Like `build`, on a pool whose database is already migrated.
    pub async fn build_with_pool(settings: Settings, pool: sqlx::PgPool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.bind_addr)
            .map_err(|e| anyhow::anyhow!("cannot bind BIND_ADDR {}: {e}", settings.bind_addr))?;
        let port = listener.local_addr()?.port();
        // Computed before serving so that the first login with an unknown
        // email takes as long as any other.
        crate::auth::password::prepare_dummy_hash(settings.bcrypt_cost).await?;
        let store = EventStore::new(pool.clone());
        let redis = Redis::connect_lazily(&settings)?;
        let caches = crate::read_models::Caches::new(&redis);
        let projections = ProjectionSet::new(pool.clone(), crate::read_models::all(&pool, &caches));
        let payments = crate::payments::provider_from_settings(&settings, pool.clone())?;
        let rate_limits = RateLimits::new(&settings, redis.connection());
        let login_guard = LoginGuard::new(
            rate_limits.store().clone(),
            &settings.redis_key_prefix,
            settings.login_failure_window,
        );
        // The two stages every checkout waits on, on one thread of their own.
        let (checkouts, committing) = CheckoutCommitter::new(store.clone(), caches.carts.clone());
        let (idempotency_keys, key_writing) = KeyLedger::new(&pool);
        crate::dedicated::spawn("serial-stages", vec![committing, key_writing])
            .context("starting the checkout committer and the idempotency key writer")?;
        let state = web::Data::new(AppState {
            redis,
            rate_limits,
            login_guard,
            tokens: AccessTokens::new(&settings.jwt_secret, settings.access_token_ttl),
            settings: Arc::new(settings),
            pool: pool.clone(),
            inventory: CommandBus::new(store.clone()),
            checkouts,
            idempotency_keys,
            orders: CommandBus::new(store.clone()),
            carts: CommandBus::new(store.clone()),
            products: CommandBus::new(store.clone()),
            categories: CommandBus::new(store.clone()),
            caches,
            payments,
            store: store.clone(),
            projections: projections.clone(),
        });
        crate::telemetry::metrics_handle();

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut background = projections.spawn(&store.appended_signal(), &shutdown_rx);
        background.push(tokio::spawn(forward_notifications(
            pool,
            store,
            shutdown_rx,
        )));

        background.push(tokio::spawn(crate::scheduler::run(
            state.clone(),
            shutdown.subscribe(),
        )));
        let server = serve(listener, state.clone())?;
        Ok(Self {
            port,
            server,
            state,
            shutdown,
            background,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops the server gracefully from elsewhere (tests, restarts).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGINT/SIGTERM (or `handle().stop`): stop accepting,
    /// finish in-flight requests, then stop the background tasks.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let served = self.server.await;
        let _ = self.shutdown.send(true);
        for task in self.background {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                tracing::warn!("a background task did not stop within 10 s");
            }
        }
        tracing::info!("stopped");
        Ok(served?)
    }
}

fn serve(listener: TcpListener, state: web::Data<AppState>) -> anyhow::Result<Server> {
    let workers = state.settings.http_workers;
    let server = HttpServer::new(move || {
        let rate_limiter = state.rate_limits.middleware();
        App::new()
            .app_data(web::Data::new(state.for_worker()))
            .app_data(middleware::StaticRoutes::default())
            .app_data(extract::path_config())
            .app_data(web::JsonConfig::default().limit(extract::DEFAULT_BODY_LIMIT))
            .app_data(web::PayloadConfig::default().limit(extract::DEFAULT_BODY_LIMIT))
            // Listed innermost first: access control runs after the request
            // id exists and inside the problem-body guarantee.
            // Inside access control, so keys and per-user limits see the user.
            .wrap(from_fn(idempotency::idempotency))
            .wrap(rate_limiter)
            .wrap(from_fn(access::enforce_access))
            .wrap(from_fn(extract::refuse_nul_in_url))
            .wrap(from_fn(problem::ensure_problem_body))
            .wrap(from_fn(middleware::record_metrics))
            .wrap(security::cors(&state.settings.cors_allowed_origins))
            .wrap(from_fn(security::security_headers))
            .wrap(from_fn(middleware::request_id_header))
            .wrap(TracingLogger::<middleware::RequestSpan>::new())
            .configure(http::configure)
            .configure(http::admin::configure)
            .default_service(web::to(http::not_found))
    })
    .shutdown_timeout(30)
    .workers(workers)
    .listen(listener)?
    .run();
    Ok(server)
}

/// Wakes local projections when another instance appends (Postgres NOTIFY
/// from the `events` trigger). Local appends wake them directly.
async fn forward_notifications(
    pool: sqlx::PgPool,
    store: EventStore,
    mut shutdown: watch::Receiver<bool>,
) {
    while !*shutdown.borrow() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for events; projections fall back to polling");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        if let Err(error) = listener.listen("events_appended").await {
            tracing::warn!(%error, "LISTEN events_appended failed");
            continue;
        }
        loop {
            tokio::select! {
                received = listener.recv() => match received {
                    Ok(_) => store.signal_appended(),
                    Err(error) => {
                        tracing::warn!(%error, "event notifications interrupted; reconnecting");
                        break;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}
