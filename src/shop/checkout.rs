//! Checkout: turns the caller's cart into an order that holds its stock.
//!
//! All lines or none: lines are reserved one `InventoryItem` at a time in
//! variant-id order (so two carts never wait on each other in a cycle), and
//! a shortage gives back what was already taken before answering. The order
//! id comes from the idempotency key, and a deadline row is written before
//! anything is reserved, so a checkout that dies half-way is either finished
//! by its retry or undone by the scheduler.

use std::time::Instant;

use actix_web::{post, web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use domain::inventory::{InventoryCommand, InventoryError, ReleaseReason};
use domain::order::{NewOrderLine, OrderCommand, OrderError};
use domain::values::{Currency, Money, Name, Quantity, Sku};
use uuid::Uuid;

use super::cart::{after_cart_write, cart_lines, CartItem};
use super::orders::{order_view, OrderView};
use crate::auth::AuthUser;
use crate::event_store::{CommandError, Metadata};
use crate::http::idempotency::IdempotencyKey;
use crate::http::middleware::request_id_of;
use crate::http::problem::{ApiError, ShortLine};
use crate::state::AppState;

/// A cart line priced and ready to become an order line.
struct CheckoutLine {
    variant_id: Uuid,
    quantity: Quantity,
    order_line: NewOrderLine,
}

fn internal(what: &str) -> impl Fn(domain::values::ValueError) -> ApiError + '_ {
    move |error| {
        ApiError::internal(anyhow::anyhow!(
            "catalog data for {what} is invalid: {error}"
        ))
    }
}

fn checkout_line(item: &CartItem) -> Result<CheckoutLine, ApiError> {
    let quantity = Quantity::try_from(item.quantity).map_err(internal("quantity"))?;
    let currency = Currency::try_from(item.currency.as_str()).map_err(internal("currency"))?;
    Ok(CheckoutLine {
        variant_id: item.variant_id,
        quantity,
        order_line: NewOrderLine {
            variant_id: item.variant_id,
            sku: Sku::try_from(item.sku.as_str()).map_err(internal("sku"))?,
            product_id: item.product_id,
            product_name: Name::try_from(item.product_name.as_str()).map_err(internal("name"))?,
            unit_price: Money::new(item.unit_price_cents, currency).map_err(internal("price"))?,
            quantity,
        },
    })
}

/// Places an order for the caller's cart; see the module docs.
pub async fn check_out(
    state: &AppState,
    user: AuthUser,
    key: &IdempotencyKey,
    metadata: Metadata,
    now: DateTime<Utc>,
) -> Result<OrderView, ApiError> {
    let order_id = key.derive_id(user.id, "order");
    // A retry of a checkout that already placed its order (the cart is
    // empty by now) answers with that order.
    if let Some(order) = placed_order(state, order_id).await? {
        return Ok(order);
    }
    let items = cart_lines(&state.pool, user.id).await?;
    if items.is_empty() {
        return Err(ApiError::invalid_field("cart", "the cart is empty"));
    }
    let mut lines = items
        .iter()
        .map(checkout_line)
        .collect::<Result<Vec<_>, _>>()?;
    lines.sort_by_key(|line| line.variant_id);
    let currency = Currency::try_from(items[0].currency.as_str()).map_err(internal("currency"))?;
    let expires_at =
        now + chrono::Duration::from_std(state.settings.order_hold).unwrap_or_default();

    record_deadline(state, order_id, user.id, expires_at, &lines).await?;
    reserve_all(state, order_id, &lines, &items, &metadata).await?;

    let place = OrderCommand::Place {
        order_id,
        user_id: user.id,
        lines: lines.iter().map(|line| line.order_line.clone()).collect(),
        currency,
        placed_at: now,
        expires_at,
    };
    let placed = state
        .orders
        .execute(&order_id.to_string(), place, metadata.clone())
        .await;
    if let Err(error) = placed {
        release_all(state, order_id, &lines, &metadata).await;
        return Err(ApiError::from_command(error, order_rejection));
    }
    let emptied = state
        .carts
        .execute(
            &user.id.to_string(),
            domain::cart::CartCommand::CheckOut { order_id },
            metadata,
        )
        .await
        .map_err(|error| {
            ApiError::from_command(error, |e| ApiError::internal(anyhow::anyhow!(e)))
        })?;
    after_cart_write(state, user.id, emptied.position).await?;
    placed_order(state, order_id)
        .await?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("order {order_id} placed but not found")))
}

/// The order as the read model shows it, once its events are applied.
async fn placed_order(state: &AppState, order_id: Uuid) -> Result<Option<OrderView>, ApiError> {
    let last: Option<(i64, i64)> = sqlx::query_as(
        "SELECT txid, position FROM events WHERE aggregate_type = 'Order' AND aggregate_id = $1 \
         ORDER BY sequence DESC LIMIT 1",
    )
    .bind(order_id.to_string())
    .fetch_optional(&state.pool)
    .await?;
    let Some((txid, position)) = last else {
        return Ok(None);
    };
    let last = projections::GlobalPosition { txid, position };
    state
        .read_your_write(projections::orders::NAME, Some(last))
        .await?;
    Ok(order_view(&state.pool, order_id).await?)
}

async fn record_deadline(
    state: &AppState,
    order_id: Uuid,
    user_id: Uuid,
    due_at: DateTime<Utc>,
    lines: &[CheckoutLine],
) -> Result<(), ApiError> {
    let variant_ids: Vec<Uuid> = lines.iter().map(|line| line.variant_id).collect();
    sqlx::query(
        "INSERT INTO order_deadlines (order_id, user_id, due_at, variant_ids) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(user_id)
    .bind(due_at)
    .bind(&variant_ids)
    .execute(&state.pool)
    .await?;
    Ok(())
}

/// Reserves every line or none; on a shortage, reports every short line.
async fn reserve_all(
    state: &AppState,
    order_id: Uuid,
    lines: &[CheckoutLine],
    items: &[CartItem],
    metadata: &Metadata,
) -> Result<(), ApiError> {
    for (index, line) in lines.iter().enumerate() {
        let reserve = InventoryCommand::Reserve {
            order_id,
            quantity: line.quantity,
        };
        let outcome = state
            .inventory
            .execute(&line.variant_id.to_string(), reserve, metadata.clone())
            .await;
        let failure = match outcome {
            Ok(_) => continue,
            Err(CommandError::Rejected(InventoryError::InsufficientStock {
                requested,
                available,
            })) => ApiError::InsufficientStock {
                lines: short_lines(
                    line.variant_id,
                    requested,
                    available,
                    &lines[index + 1..],
                    items,
                ),
            },
            Err(CommandError::Rejected(InventoryError::NotRegistered)) => {
                ApiError::InsufficientStock {
                    lines: short_lines(
                        line.variant_id,
                        line.quantity.get(),
                        0,
                        &lines[index + 1..],
                        items,
                    ),
                }
            }
            Err(error) => ApiError::from_command(error, |e| ApiError::internal(anyhow::anyhow!(e))),
        };
        let compensating = Instant::now();
        let variant_ids: Vec<Uuid> = lines[..index].iter().map(|line| line.variant_id).collect();
        let released = release_variants(
            state,
            order_id,
            &variant_ids,
            ReleaseReason::CheckoutAborted,
            metadata,
        )
        .await;
        if released.is_ok() {
            sqlx::query("DELETE FROM order_deadlines WHERE order_id = $1")
                .bind(order_id)
                .execute(&state.pool)
                .await?;
        }
        // How long a failed checkout held stock it could not keep.
        metrics::histogram!("checkout_compensation_duration_seconds")
            .record(compensating.elapsed().as_secs_f64());
        return Err(failure);
    }
    Ok(())
}

/// The line that failed, plus any later line the read model already shows
/// as short, so the buyer learns about all of them at once.
fn short_lines(
    variant_id: Uuid,
    requested: u32,
    available: u32,
    later: &[CheckoutLine],
    items: &[CartItem],
) -> Vec<ShortLine> {
    let mut short = vec![ShortLine {
        variant_id,
        requested,
        available,
    }];
    for line in later {
        let shown = items
            .iter()
            .find(|item| item.variant_id == line.variant_id)
            .map_or(0, |item| {
                item.available.clamp(0, i64::from(u32::MAX)) as u32
            });
        if shown < line.quantity.get() {
            short.push(ShortLine {
                variant_id: line.variant_id,
                requested: line.quantity.get(),
                available: shown,
            });
        }
    }
    short
}

/// Gives back whatever `order_id` holds on these lines (idempotent).
async fn release_all(
    state: &AppState,
    order_id: Uuid,
    lines: &[CheckoutLine],
    metadata: &Metadata,
) {
    let variant_ids: Vec<Uuid> = lines.iter().map(|line| line.variant_id).collect();
    // On failure the deadline row stays, so the scheduler releases it later.
    let _ = release_variants(
        state,
        order_id,
        &variant_ids,
        ReleaseReason::CheckoutAborted,
        metadata,
    )
    .await;
}

/// Releases the order's hold on each variant, trying every one; the first
/// failure is returned so that the caller keeps the deadline for a retry.
pub async fn release_variants(
    state: &AppState,
    order_id: Uuid,
    variant_ids: &[Uuid],
    reason: ReleaseReason,
    metadata: &Metadata,
) -> Result<(), String> {
    let mut first_failure = None;
    for variant_id in variant_ids {
        let release = InventoryCommand::Release { order_id, reason };
        if let Err(error) = state
            .inventory
            .execute(&variant_id.to_string(), release, metadata.clone())
            .await
        {
            tracing::error!(%order_id, %variant_id, ?error, "could not release a reservation");
            first_failure.get_or_insert(error.to_string());
        }
    }
    first_failure.map_or(Ok(()), Err)
}

pub fn order_rejection(error: OrderError) -> ApiError {
    match error {
        OrderError::CurrencyMismatch { .. } => {
            ApiError::invalid_field("cart", "all lines of an order must be in one currency")
        }
        OrderError::NotPlaced => ApiError::not_found("order"),
        OrderError::InvalidTransition { from, action } => ApiError::Conflict(
            format!("an order that is {from:?} cannot {action:?}").to_lowercase(),
        ),
        other => ApiError::Conflict(other.to_string()),
    }
}

/// Turns the caller's cart into an order holding its stock until `expires_at`.
#[utoipa::path(tag = "checkout", request_body(content = serde_json::Value, description = "`{}`"),
    params(("Idempotency-Key" = String, Header, description = "1 to 255 printable ASCII characters")),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 201, body = super::orders::OrderView),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "insufficient_stock with `lines`, or idempotency_in_progress"),
    (status = 422, body = crate::http::problem::Problem, description = "empty cart, or idempotency_key_reused"),
))]
#[post("/api/v1/checkout/")]
pub async fn checkout(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: IdempotencyKey,
    // The body is `{}`: the order comes from the cart, never from the client.
    _body: crate::http::extract::Json<serde_json::Map<String, serde_json::Value>>,
) -> Result<HttpResponse, ApiError> {
    let metadata =
        Metadata::user(user.id, request_id_of(&request)).with_idempotency_key(Some(key.0.clone()));
    let order = check_out(&state, user, &key, metadata, Utc::now()).await?;
    Ok(HttpResponse::Created().json(order))
}
