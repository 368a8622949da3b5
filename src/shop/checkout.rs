//! Checkout: turns the caller's cart into an order that holds its stock.
//!
//! The handler prices the cart from the catalog and hands it to the
//! instance's [`CheckoutCommitter`](super::checkout_commit), which reserves
//! every line, places the order, empties the cart and writes the order's
//! deadline in one transaction shared with every other checkout waiting at
//! that moment. The order id comes from the idempotency key, so a retry
//! finds the order its first attempt placed. The answer is built from the
//! decided events; reads of the order and the cart afterwards wait for
//! their read models where needed (see `orders` and `cart`). The request's
//! idempotency key is claimed by the committer, in the transaction that
//! stores the checkout, or after the answer when nothing was handed to it
//! (see [`KeyClaim`]).

use actix_web::{post, web, HttpRequest, HttpResponse};
use chrono::{DateTime, SubsecRound, Utc};
use domain::inventory::{InventoryCommand, ReleaseReason};
use domain::order::{NewOrderLine, OrderError, OrderEvent};
use domain::values::{Currency, Money, Name, Quantity, Sku};
use uuid::Uuid;

use super::cart::{read_cart, read_cart_from_postgres, CartItem};
use super::checkout_commit::{CheckoutError, CheckoutOutcome, CheckoutRequest};
use super::orders::{order_view, OrderItem, OrderView};
use crate::auth::AuthUser;
use crate::event_store::{CommandError, Metadata};
use crate::http::idempotency::{IdempotencyKey, KeyClaim};
use crate::http::middleware::request_id_of;
use crate::http::problem::ApiError;
use crate::state::AppState;

/// How often a checkout reads the cart again when the cart changed between
/// the read and the commit.
const CART_READS: usize = 3;

fn internal(what: &str) -> impl Fn(domain::values::ValueError) -> ApiError + '_ {
    move |error| {
        ApiError::internal(anyhow::anyhow!(
            "catalog data for {what} is invalid: {error}"
        ))
    }
}

fn order_line(item: &CartItem) -> Result<NewOrderLine, ApiError> {
    let quantity = Quantity::try_from(item.quantity).map_err(internal("quantity"))?;
    let currency = Currency::try_from(item.currency.as_str()).map_err(internal("currency"))?;
    Ok(NewOrderLine {
        variant_id: item.variant_id,
        sku: Sku::try_from(item.sku.as_str()).map_err(internal("sku"))?,
        product_id: item.product_id,
        product_name: Name::try_from(item.product_name.as_str()).map_err(internal("name"))?,
        unit_price: Money::new(item.unit_price_cents, currency).map_err(internal("price"))?,
        quantity,
    })
}

fn empty_cart() -> ApiError {
    ApiError::invalid_field("cart", "the cart is empty")
}

/// Places an order for the caller's cart; see the module docs.
pub async fn check_out(
    state: &AppState,
    user: AuthUser,
    key: &IdempotencyKey,
    claim: &KeyClaim,
    metadata: Metadata,
    now: DateTime<Utc>,
) -> Result<OrderView, ApiError> {
    let order_id = key.derive_id(user.id, "order");
    // Postgres keeps microseconds: the answer, built from the event, must
    // say what the read model will say.
    let now = now.trunc_subsecs(6);
    let expires_at =
        now + chrono::Duration::from_std(state.settings.order_hold).unwrap_or_default();
    for read in 0..CART_READS {
        // Lines and prices as a cart read shows them, from the caches when
        // they have them (a price comes from a product entry that is never
        // stale), with the cart's version. The committer takes the lines as
        // the cart at that version; when the cart has moved on, the next
        // read goes to the carts read model, which by then holds every
        // change of the cart.
        let cart = if read == 0 {
            read_cart(state, user.id).await?
        } else {
            read_cart_from_postgres(state, user.id).await?
        };
        let items = cart.view.items;
        if items.is_empty() {
            // A retry of a checkout that got through finds the cart empty.
            // Nothing changes here, so the key is claimed after the answer.
            return placed_order(state, order_id).await?.ok_or_else(empty_cart);
        }
        let mut lines = items
            .iter()
            .map(order_line)
            .collect::<Result<Vec<_>, _>>()?;
        lines.sort_by_key(|line| line.variant_id);
        let currency =
            Currency::try_from(items[0].currency.as_str()).map_err(internal("currency"))?;
        let request = CheckoutRequest {
            order_id,
            user_id: user.id,
            lines,
            currency,
            placed_at: now,
            expires_at,
            cart_version: cart.version,
            metadata: metadata.clone(),
            // Claimed by the committer with the other keys of its batch,
            // the first time only.
            key: claim.for_commit(),
        };
        let answer = state.checkouts.check_out(request).await;
        if answer.key_claimed {
            claim.claimed_by_commit();
        }
        let outcome = answer.outcome.map_err(|error| match error {
            CheckoutError::Contention => {
                ApiError::from_command(CommandError::<OrderError>::Contention, order_rejection)
            }
            CheckoutError::Store(message) => ApiError::internal(anyhow::anyhow!(message)),
        })?;
        match outcome {
            CheckoutOutcome::KeyTaken => return Err(claim.taken()),
            CheckoutOutcome::Placed { placed, .. } => return placed_view(placed),
            CheckoutOutcome::AlreadyPlaced => {
                return placed_order(state, order_id).await?.ok_or_else(|| {
                    ApiError::internal(anyhow::anyhow!("order {order_id} placed but not found"))
                })
            }
            CheckoutOutcome::CartEmpty => return Err(empty_cart()),
            CheckoutOutcome::Short(lines) => return Err(ApiError::InsufficientStock { lines }),
            CheckoutOutcome::Refused(error) => return Err(order_rejection(error)),
            CheckoutOutcome::CartChanged => {
                // The carts read model was behind the cart: read it again
                // once it has every stored change.
                state
                    .read_aggregate_writes(projections::carts::NAME, "Cart", &user.id.to_string())
                    .await?;
            }
        }
    }
    Err(ApiError::Conflict(
        "the cart kept changing during checkout; try again".into(),
    ))
}

/// The order as the read model will show it, from its `OrderPlaced` event.
fn placed_view(placed: OrderEvent) -> Result<OrderView, ApiError> {
    let OrderEvent::OrderPlaced {
        order_id,
        user_id,
        lines,
        currency,
        total_cents,
        placed_at,
        expires_at,
    } = placed
    else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "a checkout decided something other than OrderPlaced"
        )));
    };
    let items = lines
        .into_iter()
        .map(|line| OrderItem {
            variant_id: line.variant_id,
            sku: line.sku.as_str().to_owned(),
            product_name: line.product_name.as_str().to_owned(),
            unit_price_cents: line.unit_price_cents,
            quantity: i64::from(line.quantity),
            line_total_cents: line.line_total_cents,
        })
        .collect();
    Ok(OrderView {
        id: order_id,
        status: "created".to_owned(),
        cancel_reason: None,
        items,
        total_cents,
        currency: currency.as_str().to_owned(),
        payment_intent_id: None,
        expires_at,
        created_at: placed_at,
        updated_at: placed_at,
        user_id,
    })
}

/// The order as the read model shows it, once its events are applied.
async fn placed_order(state: &AppState, order_id: Uuid) -> Result<Option<OrderView>, ApiError> {
    let stored = state
        .read_aggregate_writes(projections::orders::NAME, "Order", &order_id.to_string())
        .await?;
    if !stored {
        return Ok(None);
    }
    Ok(order_view(&state.pool, order_id).await?)
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
    claim: KeyClaim,
    // The body is `{}`: the order comes from the cart, never from the client.
    _body: crate::http::extract::Json<serde_json::Map<String, serde_json::Value>>,
) -> Result<HttpResponse, ApiError> {
    let metadata =
        Metadata::user(user.id, request_id_of(&request)).with_idempotency_key(Some(key.0.clone()));
    let order = check_out(&state, user, &key, &claim, metadata, Utc::now()).await?;
    Ok(HttpResponse::Created().json(order))
}
