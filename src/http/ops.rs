//! Operational endpoints: liveness, readiness and metrics.

use actix_web::{get, web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::rate_limit::LimitMode;
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    status: &'static str,
}

/// The process is up and serving HTTP.
#[utoipa::path(tag = "ops", responses((status = 200, body = Health)))]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

#[derive(Serialize, ToSchema)]
pub struct DependencyStatus {
    /// `up`, or `down` with the reason in `error`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, `degraded` (Redis is down: answers come from Postgres and
    /// rate limits are per instance) or `unavailable` (Postgres is down).
    status: &'static str,
    postgres: DependencyStatus,
    redis: DependencyStatus,
    /// `shared` (counted in Redis across instances) or `local` (per
    /// instance, while Redis is unreachable).
    rate_limits: &'static str,
}

fn dependency(result: Result<(), String>) -> DependencyStatus {
    match result {
        Ok(()) => DependencyStatus {
            status: "up",
            error: None,
        },
        Err(error) => DependencyStatus {
            status: "down",
            error: Some(error),
        },
    }
}

/// Whether this instance can serve traffic. Postgres is required; without
/// Redis the instance still serves, more slowly, and says so.
#[utoipa::path(tag = "ops", responses(
    (status = 200, body = Readiness, description = "ready or degraded"),
    (status = 503, body = Readiness, description = "Postgres is unreachable"),
))]
#[get("/readyz")]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let postgres = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await
    .map_err(|_| "timed out".to_owned())
    .and_then(|result| result.map(drop).map_err(|e| e.to_string()));
    let redis = state.redis.ping().await;
    let status = match (&postgres, &redis) {
        (Err(_), _) => "unavailable",
        (Ok(()), Err(_)) => "degraded",
        (Ok(()), Ok(())) => "ready",
    };
    let rate_limits = match state.rate_limits.mode() {
        LimitMode::Shared => "shared",
        LimitMode::Local => "local",
    };
    let body = Readiness {
        status,
        postgres: dependency(postgres),
        redis: dependency(redis),
        rate_limits,
    };
    if status == "unavailable" {
        HttpResponse::ServiceUnavailable().json(body)
    } else {
        HttpResponse::Ok().json(body)
    }
}

/// Prometheus text format: requests by route and status with latency
/// histograms, database pool use, events appended, projection lag.
#[utoipa::path(tag = "ops", responses((status = 200, content_type = "text/plain", body = String)))]
#[get("/metrics")]
pub async fn prometheus_metrics(state: web::Data<AppState>) -> HttpResponse {
    record_gauges(&state).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::telemetry::metrics_handle().render())
}

/// Gauges that are cheapest to read at scrape time.
async fn record_gauges(state: &AppState) {
    metrics::gauge!("db_pool_connections").set(f64::from(state.pool.size()));
    metrics::gauge!("db_pool_idle_connections").set(state.pool.num_idle() as f64);
    let head: Result<Option<i64>, _> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&state.pool)
        .await;
    let checkpoints: Result<Vec<(String, i64)>, _> =
        sqlx::query_as("SELECT name, last_position FROM projection_checkpoints")
            .fetch_all(&state.pool)
            .await;
    if let (Ok(head), Ok(checkpoints)) = (head, checkpoints) {
        let head = head.unwrap_or(0);
        metrics::gauge!("event_store_head_position").set(head as f64);
        for (name, position) in checkpoints {
            // Positions are allocated, not committed, in order: this is an
            // estimate of how many events the projection has yet to apply.
            metrics::gauge!("projection_lag_events", "projection" => name)
                .set((head - position).max(0) as f64);
        }
    }
}
