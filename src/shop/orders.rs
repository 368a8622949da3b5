//! The customer's orders, read from the orders read model.

use actix_web::{get, web, HttpResponse};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::cart::Cart;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::http::extract::Query;
use crate::http::paging::{PageMeta, PageQuery, Paging};
use crate::http::problem::ApiError;
use crate::state::AppState;

/// A line as the API shows it; the read model keeps the lines as JSON in
/// the order's row, with the product id besides.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrderItem {
    pub variant_id: Uuid,
    pub sku: String,
    pub product_name: String,
    pub unit_price_cents: i64,
    pub quantity: i64,
    pub line_total_cents: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderView {
    pub id: Uuid,
    /// created, payment_pending, paid, cancelled or refunded.
    pub status: String,
    /// Why a cancelled order was cancelled: expired, payment_failed, customer...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_intent_id: Option<String>,
    #[serde(serialize_with = "crate::http::timestamp::rfc3339")]
    pub expires_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::http::timestamp::rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::http::timestamp::rfc3339")]
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub user_id: Uuid,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    user_id: Uuid,
    status: String,
    cancel_reason: Option<String>,
    total_cents: i64,
    currency: String,
    payment_intent_id: Option<String>,
    expires_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    lines: sqlx::types::Json<Vec<OrderItem>>,
}

const ORDER_COLUMNS: &str = "id, user_id, status, cancel_reason, total_cents, currency, \
     payment_intent_id, expires_at, created_at, updated_at, lines";

impl From<OrderRow> for OrderView {
    fn from(row: OrderRow) -> Self {
        OrderView {
            id: row.id,
            status: row.status,
            cancel_reason: row.cancel_reason,
            items: row.lines.0,
            total_cents: row.total_cents,
            currency: row.currency,
            payment_intent_id: row.payment_intent_id,
            expires_at: row.expires_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
            user_id: row.user_id,
        }
    }
}

/// One order as the read model has it, whoever owns it.
pub async fn order_view(pool: &PgPool, order_id: Uuid) -> Result<Option<OrderView>, sqlx::Error> {
    let row: Option<OrderRow> =
        sqlx::query_as(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(OrderView::from))
}

/// The caller's order; another user's order does not exist for them.
/// Checkout answers before the orders read model has the order, so an order
/// missing there but present in the event store is waited for.
pub async fn own_order(
    state: &AppState,
    user: AuthUser,
    order_id: Uuid,
) -> Result<OrderView, ApiError> {
    let mut order = order_view(&state.pool, order_id).await?;
    if order.is_none()
        && state
            .read_aggregate_writes(projections::orders::NAME, "Order", &order_id.to_string())
            .await?
    {
        order = order_view(&state.pool, order_id).await?;
    }
    match order {
        Some(order) if order.user_id == user.id => Ok(order),
        _ => Err(ApiError::not_found("order")),
    }
}

/// Waits until the orders read model holds every order the user placed, so
/// a list read right after a checkout shows it. An order is only ever placed
/// by checking out its buyer's cart, whose `CartCheckedOut` is stored in the
/// same transaction right after the `OrderPlaced` (`checkout_commit`), so
/// the cart's last event lies at or past the buyer's last order: one probe
/// of the events' primary key, no index of its own on every `OrderPlaced`.
async fn wait_for_placed_orders(state: &AppState, user_id: Uuid) -> Result<(), ApiError> {
    state
        .read_aggregate_writes(projections::orders::NAME, Cart::TYPE, &user_id.to_string())
        .await?;
    Ok(())
}

#[derive(Serialize, ToSchema)]
pub struct OrderListing {
    pub items: Vec<OrderView>,
    pub page: PageMeta,
}

/// The caller's orders, newest first.
#[utoipa::path(context_path = SCOPE, tag = "orders", params(PageQuery), security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = OrderListing),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
))]
#[get("/my-orders")]
pub async fn my_orders(
    state: web::Data<AppState>,
    user: AuthUser,
    query: Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let paging = Paging::try_from(query.0)?;
    wait_for_placed_orders(&state, user.id).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1")
        .bind(user.id)
        .fetch_one(&state.pool)
        .await?;
    let rows: Vec<OrderRow> = sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 \
         ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
    ))
    .bind(user.id)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let items = rows.into_iter().map(OrderView::from).collect();
    Ok(HttpResponse::Ok().json(OrderListing {
        items,
        page: paging.meta(total.max(0) as u64),
    }))
}

/// One of the caller's orders.
#[utoipa::path(context_path = SCOPE, tag = "orders", params(("order_id" = Uuid, Path)), security(("bearer" = []), ("cookie" = [])),
    responses((status = 200, body = OrderView), (status = 400, body = crate::http::problem::Problem),
    (status = 401, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem)))]
#[get("/my-orders/{order_id}")]
pub async fn my_order(
    state: web::Data<AppState>,
    user: AuthUser,
    order_id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(own_order(&state, user, order_id.into_inner()).await?))
}

/// The prefix of this module's routes, registered as one scope (see
/// [`crate::http::configure`]); utoipa's `context_path` adds it back.
const SCOPE: &str = "/api/v1/orders";

pub fn configure(config: &mut web::ServiceConfig) {
    config.service(web::scope(SCOPE).service(my_orders).service(my_order));
}
