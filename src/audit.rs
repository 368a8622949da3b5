//! The audit API: the stored events themselves, and aggregates rebuilt from
//! them (stock as it stood at a moment, an order's whole history).

use actix_web::{get, web, HttpResponse};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::inventory::InventoryItem;
use domain::order::Order;
use projections::stored_event::STORED_EVENT_COLUMNS;
use projections::StoredEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::http::extract::Query;
use crate::http::problem::ApiError;
use crate::state::AppState;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1_000;

/// An event as stored, with who caused it and why in `metadata`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEvent {
    /// The event's unique position; pass it as `after` to read on.
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
    /// `actor` (user id or `system`), `correlation_id`, `idempotency_key`.
    #[schema(value_type = Object)]
    pub metadata: Box<RawValue>,
    pub recorded_at: DateTime<Utc>,
}

impl From<StoredEvent> for AuditEvent {
    fn from(event: StoredEvent) -> Self {
        Self {
            position: event.position,
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            sequence: event.sequence,
            event_type: event.event_type,
            payload: event.payload,
            metadata: event.metadata,
            recorded_at: event.recorded_at,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventsQuery {
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    /// The `position` of the last event already read (`next_after` of the
    /// previous page).
    pub after: Option<i64>,
    /// 1 to 1000, default 100.
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventsPage {
    pub items: Vec<AuditEvent>,
    /// Pass as `after` for the next page; null when nothing was returned.
    pub next_after: Option<i64>,
}

/// Stored events in the store's global order, optionally of one aggregate.
///
/// The global order is the one projections read in: `(txid, position)`,
/// only up to the oldest transaction still running. Paging with
/// `after=<position>` therefore never skips an event that committed late.
#[utoipa::path(context_path = SCOPE, tag = "audit", params(EventsQuery), security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = EventsPage),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
))]
#[get("/events")]
pub async fn audit_events(
    state: web::Data<AppState>,
    query: Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.0;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_field(
            "limit",
            format!("must be from 1 to {MAX_LIMIT}"),
        ));
    }
    let after_txid: i64 = match query.after {
        None => 0,
        Some(position) if position < 0 => {
            return Err(ApiError::bad_field("after", "must not be negative"))
        }
        Some(position) => sqlx::query_scalar("SELECT txid FROM events WHERE position = $1")
            .bind(position)
            .fetch_optional(&state.pool)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no event at position {position}")))?,
    };
    let events: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events \
         WHERE (txid, position) > ($1, $2) \
           AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
           AND ($3::text IS NULL OR aggregate_type = $3) \
           AND ($4::text IS NULL OR aggregate_id = $4) \
         ORDER BY txid, position LIMIT $5"
    ))
    .bind(after_txid)
    .bind(query.after.unwrap_or(0))
    .bind(query.aggregate_type)
    .bind(query.aggregate_id)
    .bind(i64::from(limit))
    .fetch_all(&state.pool)
    .await?;
    let next_after = events.last().map(|event| event.position);
    let items = events.into_iter().map(AuditEvent::from).collect();
    Ok(HttpResponse::Ok().json(EventsPage { items, next_after }))
}

async fn history(
    state: &AppState,
    aggregate_type: &str,
    id: Uuid,
) -> Result<Vec<StoredEvent>, ApiError> {
    Ok(state
        .store
        .load_after(aggregate_type, &id.to_string(), 0)
        .await?)
}

fn fold<A: Aggregate>(events: &[StoredEvent]) -> Result<A, ApiError> {
    let mut aggregate = A::default();
    for event in events {
        let payload = event.decode::<A::Event>().map_err(|error| {
            ApiError::internal(anyhow::anyhow!(
                "event {} unreadable: {error}",
                event.position
            ))
        })?;
        aggregate.apply(payload);
    }
    Ok(aggregate)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct AtQuery {
    /// RFC 3339 timestamp; now when absent.
    pub at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InventoryAtTime {
    pub variant_id: Uuid,
    pub at: DateTime<Utc>,
    pub on_hand: u32,
    pub reserved: u32,
    pub available: u32,
    /// The events that made this stock, oldest first.
    pub events: Vec<AuditEvent>,
}

/// A variant's stock as it stood at `at`, rebuilt by folding its events.
#[utoipa::path(context_path = SCOPE, tag = "audit", params(("variant_id" = Uuid, Path), AtQuery),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = InventoryAtTime),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
))]
#[get("/inventory/{variant_id}")]
pub async fn inventory_at(
    state: web::Data<AppState>,
    variant_id: web::Path<Uuid>,
    query: Query<AtQuery>,
) -> Result<HttpResponse, ApiError> {
    let variant_id = variant_id.into_inner();
    let at = query.0.at.unwrap_or_else(Utc::now);
    let all = history(&state, InventoryItem::TYPE, variant_id).await?;
    if all.is_empty() {
        return Err(ApiError::not_found("variant"));
    }
    let until: Vec<StoredEvent> = all
        .into_iter()
        .filter(|event| event.recorded_at <= at)
        .collect();
    let item: InventoryItem = fold(&until)?;
    Ok(HttpResponse::Ok().json(InventoryAtTime {
        variant_id,
        at,
        on_hand: item.on_hand(),
        reserved: item.reserved(),
        available: item.available(),
        events: until.into_iter().map(AuditEvent::from).collect(),
    }))
}

/// An order's state rebuilt from its events.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderState {
    pub status: Option<String>,
    pub cancel_reason: Option<String>,
    pub user_id: Uuid,
    pub total_cents: i64,
    pub currency: Option<String>,
    pub payment_intent_id: Option<String>,
    pub paid_amount_cents: Option<i64>,
    pub late_payment: bool,
    pub refund_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderHistory {
    pub order_id: Uuid,
    pub state: OrderState,
    /// Every event of the order with actor, time, correlation id and
    /// idempotency key.
    pub events: Vec<AuditEvent>,
}

fn wire_name(value: &impl Serialize) -> Option<String> {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
}

/// An order's full event history and its current state.
#[utoipa::path(context_path = SCOPE, tag = "audit", params(("order_id" = Uuid, Path)), security(("bearer" = []), ("cookie" = [])),
    responses(
    (status = 200, body = OrderHistory),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
))]
#[get("/orders/{order_id}")]
pub async fn order_history(
    state: web::Data<AppState>,
    order_id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let order_id = order_id.into_inner();
    let events = history(&state, Order::TYPE, order_id).await?;
    if events.is_empty() {
        return Err(ApiError::not_found("order"));
    }
    let order: Order = fold(&events)?;
    let state = OrderState {
        status: order.status().and_then(|status| wire_name(&status)),
        cancel_reason: order.cancel_reason().and_then(|reason| wire_name(&reason)),
        user_id: order.user_id(),
        total_cents: order.total_cents(),
        currency: order.currency().map(|c| c.as_str().to_owned()),
        payment_intent_id: order.payment_intent_id().map(str::to_owned),
        paid_amount_cents: order.paid_amount_cents(),
        late_payment: order.is_late_payment(),
        refund_id: order.refund_id().map(str::to_owned),
        expires_at: order.expires_at(),
    };
    let events = events.into_iter().map(AuditEvent::from).collect();
    Ok(HttpResponse::Ok().json(OrderHistory {
        order_id,
        state,
        events,
    }))
}

/// The prefix of this module's routes, registered as one scope (see
/// [`crate::http::configure`]); utoipa's `context_path` adds it back.
const SCOPE: &str = "/api/v1/audit";

pub fn configure(config: &mut web::ServiceConfig) {
    config.service(
        web::scope(SCOPE)
            .service(audit_events)
            .service(inventory_at)
            .service(order_history),
    );
}
