//! Stock routes: the admin's add-stock, update-stock and
//! sync-reserved-stock as `InventoryItem` commands and checks, and the
//! public stock level of a variant (admins see the counts behind it).

use std::collections::HashMap;

use actix_web::{get, post, web, HttpRequest, HttpResponse};
use cqrs_es::Aggregate;
use domain::inventory::{InventoryCommand, InventoryItem};
use domain::values::Quantity;
use projections::cache::keys;
use projections::stock::StockEntry;
use projections::StoredEvent;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{check_reason, inventory_rejection, metadata_for, reads, settle, FieldErrors, Viewer};
use crate::auth::AuthUser;
use crate::event_store::Executed;
use crate::http::extract::Json;
use crate::http::idempotency::IdempotencyKey;
use crate::http::problem::ApiError;
use crate::state::AppState;

/// The largest physical count accepted by update-stock.
const MAX_ON_HAND: i64 = 1_000_000_000;
/// Variants checked per round trip by sync-reserved-stock.
const SYNC_CHUNK: i64 = 500;

#[derive(Debug, Deserialize, ToSchema)]
pub struct AddStockRequest {
    pub variant_id: Uuid,
    /// 1 to 10,000.
    pub quantity: i64,
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateStockRequest {
    pub variant_id: Uuid,
    /// The physical count of unsold units; not below what is reserved.
    pub on_hand: i64,
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct SyncReservedRequest {
    /// One variant; every variant when absent.
    pub variant_id: Option<Uuid>,
}

/// A variant's stock. `on_hand` and `reserved` are shown to admins only.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StockLevel {
    pub variant_id: Uuid,
    pub sku: String,
    pub available: i64,
    pub in_stock: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_hand: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved: Option<i64>,
}

impl StockLevel {
    fn of(variant_id: Uuid, entry: StockEntry, viewer: Viewer) -> Self {
        let available = entry.available();
        let admin = viewer == Viewer::Admin;
        Self {
            variant_id,
            available,
            in_stock: available > 0,
            on_hand: admin.then_some(entry.on_hand),
            reserved: admin.then_some(entry.reserved),
            sku: entry.sku,
        }
    }
}

/// A read model row that disagreed with the events, and what it was set to.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Correction {
    pub variant_id: Uuid,
    /// `reserved` as the read model had it (null: the row was missing).
    pub before: Option<i64>,
    /// `reserved` recomputed from the live reservations.
    pub after: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SyncReport {
    /// How many variants were checked.
    pub checked: u64,
    pub corrected: Vec<Correction>,
}

/// Units arrived for a variant.
#[utoipa::path(context_path = SCOPE, tag = "stock", request_body = AddStockRequest, security(("bearer" = []), ("cookie" = [])),
    responses(
    (status = 200, body = StockLevel),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem), (status = 422, body = crate::http::problem::Problem),
))]
#[post("/add-stock")]
pub async fn add_stock(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: Option<IdempotencyKey>,
    body: Json<AddStockRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let mut errors = FieldErrors::default();
    let quantity = errors.check("quantity", Quantity::try_from(body.quantity));
    let reason = errors.check("reason", check_reason(body.reason));
    errors.into_result()?;
    let (Some(quantity), Some(reason)) = (quantity, reason) else {
        return Err(ApiError::invalid_field("quantity", "is required"));
    };
    let metadata = metadata_for(&request, &user, key.as_ref());
    let executed = state
        .inventory
        .execute(
            &body.variant_id.to_string(),
            InventoryCommand::AddStock { quantity, reason },
            metadata,
        )
        .await
        .map_err(|error| ApiError::from_command(error, inventory_rejection))?;
    answer_after_write(&state, body.variant_id, &executed).await
}

/// Sets a variant's physical count (never below what orders hold).
#[utoipa::path(context_path = SCOPE, tag = "stock", request_body = UpdateStockRequest, security(("bearer" = []), ("cookie" = [])),
    responses(
    (status = 200, body = StockLevel),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "below what is reserved"),
    (status = 422, body = crate::http::problem::Problem),
))]
#[post("/update-stock")]
pub async fn update_stock(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: Option<IdempotencyKey>,
    body: Json<UpdateStockRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    let mut errors = FieldErrors::default();
    let on_hand = if (0..=MAX_ON_HAND).contains(&body.on_hand) {
        u32::try_from(body.on_hand).ok()
    } else {
        errors.add("on_hand", format!("must be from 0 to {MAX_ON_HAND}"));
        None
    };
    let reason = errors.check("reason", check_reason(body.reason));
    errors.into_result()?;
    let (Some(on_hand), Some(reason)) = (on_hand, reason) else {
        return Err(ApiError::invalid_field("on_hand", "is required"));
    };
    let metadata = metadata_for(&request, &user, key.as_ref());
    let executed = state
        .inventory
        .execute(
            &body.variant_id.to_string(),
            InventoryCommand::SetOnHand { on_hand, reason },
            metadata,
        )
        .await
        .map_err(|error| ApiError::from_command(error, inventory_rejection))?;
    answer_after_write(&state, body.variant_id, &executed).await
}

/// Recomputes `reserved` from each variant's live reservations (its
/// `InventoryItem` events) and repairs the read model where it disagrees.
#[utoipa::path(context_path = SCOPE, tag = "stock", request_body = SyncReservedRequest, security(("bearer" = []), ("cookie" = [])),
    responses(
    (status = 200, body = SyncReport),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
))]
#[post("/sync-reserved-stock")]
pub async fn sync_reserved_stock(
    state: web::Data<AppState>,
    body: Json<SyncReservedRequest>,
) -> Result<HttpResponse, ApiError> {
    let mut report = SyncReport {
        checked: 0,
        corrected: Vec::new(),
    };
    if let Some(variant_id) = body.0.variant_id {
        let checked = sync_variants(&state, &[variant_id.to_string()], &mut report).await?;
        if checked == 0 {
            return Err(ApiError::not_found("variant"));
        }
        return Ok(HttpResponse::Ok().json(report));
    }
    // Every variant whose stock is tracked, a chunk at a time, in id order.
    let mut after = String::new();
    loop {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM events \
             WHERE aggregate_type = $1 AND sequence = 1 AND aggregate_id > $2 \
             ORDER BY aggregate_id LIMIT $3",
        )
        .bind(InventoryItem::TYPE)
        .bind(&after)
        .bind(SYNC_CHUNK)
        .fetch_all(&state.pool)
        .await?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        sync_variants(&state, &ids, &mut report).await?;
        after = last;
    }
    Ok(HttpResponse::Ok().json(report))
}

/// Checks one chunk of variants; returns how many had events.
async fn sync_variants(
    state: &AppState,
    aggregate_ids: &[String],
    report: &mut SyncReport,
) -> Result<u64, ApiError> {
    let events: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {} FROM events WHERE aggregate_type = $1 AND aggregate_id = ANY($2) \
         ORDER BY aggregate_id, sequence",
        projections::stored_event::STORED_EVENT_COLUMNS
    ))
    .bind(InventoryItem::TYPE)
    .bind(aggregate_ids)
    .fetch_all(&state.pool)
    .await?;
    let mut items: HashMap<Uuid, (InventoryItem, i64)> = HashMap::new();
    let newest = events.iter().map(StoredEvent::global_position).max();
    for event in events {
        let Ok(variant_id) = event.aggregate_id.parse::<Uuid>() else {
            continue;
        };
        let payload = event.decode().map_err(|error| {
            ApiError::internal(anyhow::anyhow!(
                "event {} unreadable: {error}",
                event.position
            ))
        })?;
        let (item, version) = items.entry(variant_id).or_default();
        item.apply(payload);
        *version = event.sequence;
    }
    // A row the projection has not reached yet is late, not wrong: give
    // the projection its chance first, so only real disagreements are fixed.
    if let Some(newest) = newest {
        let waited = state
            .projections
            .wait_for(
                projections::stock::NAME,
                newest,
                crate::state::READ_YOUR_WRITES_TIMEOUT,
            )
            .await;
        if let Err(error) = waited {
            tracing::warn!(%error, "stock projection is behind; repairing what it has not applied");
        }
    }
    let checked = items.len() as u64;
    for (variant_id, (item, version)) in items {
        // What the live reservations add up to is the truth for `reserved`.
        let reserved: i64 = item
            .reservations()
            .values()
            .map(|units| i64::from(*units))
            .sum();
        let on_hand = i64::from(item.on_hand());
        let sku = item
            .sku()
            .map(|sku| sku.as_str().to_owned())
            .unwrap_or_default();
        if let Some(before) = repair(state, variant_id, &sku, on_hand, reserved, version).await? {
            state
                .caches
                .stock
                .invalidate(&keys::stock(variant_id), version)
                .await;
            report.corrected.push(Correction {
                variant_id,
                before,
                after: reserved,
            });
        }
    }
    report.checked += checked;
    Ok(checked)
}

/// Sets the row to what the events say when it disagrees; returns the old
/// `reserved` (`Some(None)` for a missing row) when it changed anything. A
/// row already past `version` (the projection moved on meanwhile) is left.
async fn repair(
    state: &AppState,
    variant_id: Uuid,
    sku: &str,
    on_hand: i64,
    reserved: i64,
    version: i64,
) -> Result<Option<Option<i64>>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT on_hand, reserved, version FROM stock_levels WHERE variant_id = $1 FOR UPDATE",
    )
    .bind(variant_id)
    .fetch_optional(&mut *tx)
    .await?;
    let before = match row {
        Some((_, _, row_version)) if row_version > version => return Ok(None),
        Some((row_on_hand, row_reserved, _))
            if row_on_hand == on_hand && row_reserved == reserved =>
        {
            return Ok(None)
        }
        Some((_, row_reserved, _)) => Some(row_reserved),
        None => None,
    };
    sqlx::query(
        "INSERT INTO stock_levels (variant_id, sku, on_hand, reserved, version, updated_at) \
         VALUES ($1, $2, $3, $4, $5, now()) \
         ON CONFLICT (variant_id) DO UPDATE SET on_hand = EXCLUDED.on_hand, \
             reserved = EXCLUDED.reserved, version = EXCLUDED.version, updated_at = now()",
    )
    .bind(variant_id)
    .bind(sku)
    .bind(on_hand)
    .bind(reserved)
    .bind(version)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::warn!(%variant_id, ?before, after = reserved, "stock read model repaired from events");
    Ok(Some(before))
}

/// A variant's stock; admins also see `on_hand` and `reserved`.
#[utoipa::path(context_path = SCOPE, tag = "stock", params(("variant_id" = Uuid, Path)), responses(
    (status = 200, body = StockLevel),
    (status = 400, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
))]
#[get("/get-stock-level/{variant_id}")]
pub async fn get_stock_level(
    state: web::Data<AppState>,
    user: Option<AuthUser>,
    variant_id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let variant_id = variant_id.into_inner();
    let entry = reads::stock_entry(&state, variant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("variant"))?;
    Ok(HttpResponse::Ok().json(StockLevel::of(variant_id, entry, Viewer::of(user))))
}

/// Read-your-writes after a stock write: wait for the stock projection,
/// drop the cached level at its new version, answer with the admin's view.
async fn answer_after_write(
    state: &AppState,
    variant_id: Uuid,
    executed: &Executed<InventoryItem>,
) -> Result<HttpResponse, ApiError> {
    settle(state, &[(projections::stock::NAME, executed.position)]).await?;
    if executed.position.is_some() {
        state
            .caches
            .stock
            .invalidate(&keys::stock(variant_id), executed.version)
            .await;
    }
    let entry = reads::stock_entry(state, variant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("variant"))?;
    Ok(HttpResponse::Ok().json(StockLevel::of(variant_id, entry, Viewer::Admin)))
}

/// The prefix of this module's routes, registered as one scope (see
/// [`crate::http::configure`]); utoipa's `context_path` adds it back.
const SCOPE: &str = "/api/v1/stock";

pub fn configure(config: &mut web::ServiceConfig) {
    config.service(
        web::scope(SCOPE)
            .service(add_stock)
            .service(update_stock)
            .service(sync_reserved_stock)
            .service(get_stock_level),
    );
}
