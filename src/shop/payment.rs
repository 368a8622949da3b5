//! Paying for orders: payment intents, confirmation, provider webhooks and
//! the fake provider's "pay" button.
//!
//! Every way money can arrive (confirm-payment, a webhook, a fake payment)
//! ends in `settle_paid`, so the rules hold whichever comes first or twice:
//! an order is paid at most once, the reserved units leave the shelf when
//! it is, a payment that arrives after the hold expired is honoured if the
//! stock can be reserved again and refunded otherwise, and a second payment
//! for a paid order is refunded. Money is never silently kept.
//!
//! A refund is decided (an event) before the provider is asked for it, so
//! a retry after a refund the provider made but we failed to record
//! finishes that refund rather than keeping the payment.

use actix_web::http::header::HeaderMap;
use actix_web::{post, web, HttpRequest, HttpResponse};
use chrono::Utc;
use domain::inventory::{InventoryCommand, InventoryError, ReleaseReason};
use domain::order::{CancelReason, Order, OrderCommand, OrderError, OrderStatus};
use domain::values::{Currency, Quantity};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::checkout::{order_rejection, release_variants};
use super::orders::{own_order, OrderView};
use crate::auth::AuthUser;
use crate::event_store::{CommandError, Metadata};
use crate::http::extract::Json;
use crate::http::idempotency::IdempotencyKey;
use crate::http::middleware::request_id_of;
use crate::http::problem::ApiError;
use crate::payments::{IntentStatus, PaymentIntent, SettleOutcome, WebhookEvent, WebhookEventKind};
use crate::state::AppState;

/// How many times a late payment tries to take its stock again when the
/// scheduler is releasing the old hold at the same moment.
const LATE_PAYMENT_ATTEMPTS: usize = 3;

/// The order as its events say it is now (authoritative, unlike the read model).
async fn load_order(state: &AppState, order_id: Uuid) -> Result<Option<Order>, ApiError> {
    let mut order = Order::default();
    let version = state
        .store
        .catch_up(&order_id.to_string(), &mut order, 0)
        .await
        .map_err(ApiError::internal)?;
    Ok((version > 0).then_some(order))
}

async fn execute_order(
    state: &AppState,
    order_id: Uuid,
    command: OrderCommand,
    metadata: &Metadata,
) -> Result<Option<projections::GlobalPosition>, CommandError<OrderError>> {
    let executed = state
        .orders
        .execute(&order_id.to_string(), command, metadata.clone())
        .await?;
    Ok(executed.position)
}

async fn wait_for_orders(
    state: &AppState,
    position: Option<projections::GlobalPosition>,
) -> Result<(), ApiError> {
    state
        .read_your_write(projections::orders::NAME, position)
        .await
}

/// What became of a successful payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The order is paid (now, or it already was with this payment).
    Paid,
    /// The payment could not be kept (the order expired and its stock is
    /// gone, or the order was already paid another way) and was refunded.
    Refunded,
}

/// Records a verified, succeeded payment against its order.
pub async fn settle_paid(
    state: &AppState,
    order_id: Uuid,
    intent: &PaymentIntent,
    metadata: &Metadata,
) -> Result<Settlement, ApiError> {
    let Some(order) = load_order(state, order_id).await? else {
        return Err(ApiError::not_found("order"));
    };
    if order.status() == Some(OrderStatus::Refunded) {
        return Ok(Settlement::Refunded);
    }
    if order.refund_decided(&intent.id) {
        return refund_order(state, &order, &intent.id, intent.amount_cents, metadata).await;
    }
    let confirm = OrderCommand::ConfirmPayment {
        payment_intent_id: intent.id.clone(),
        amount_cents: intent.amount_cents,
        currency: intent.currency.clone(),
        paid_at: Utc::now(),
    };
    match execute_order(state, order_id, confirm, metadata).await {
        Ok(position) => {
            if !keep_stock(state, &order, metadata).await?
                || refund_decided_since(state, order_id, &intent.id).await?
            {
                // Paid already, by a late payment whose hold was released
                // before its units were committed, and they are gone now;
                // or another settlement of this payment gave up on it.
                return refund_order(state, &order, &intent.id, intent.amount_cents, metadata)
                    .await;
            }
            wait_for_orders(state, position).await?;
            Ok(Settlement::Paid)
        }
        Err(CommandError::Rejected(OrderError::NotPayable {
            status: OrderStatus::Cancelled,
        })) => honour_or_refund(state, order_id, &order, intent, metadata).await,
        Err(CommandError::Rejected(OrderError::NotPayable {
            status: OrderStatus::Refunded,
        })) => Ok(Settlement::Refunded),
        // Another settlement of this payment decided to refund it meanwhile.
        Err(CommandError::Rejected(OrderError::RefundUnderway { .. })) => {
            refund_order(state, &order, &intent.id, intent.amount_cents, metadata).await
        }
        // Paid already, with another payment: give this one back.
        Err(CommandError::Rejected(OrderError::PaymentIntentMismatch { .. })) => {
            refund_at_provider(state, order_id, &intent.id, intent.amount_cents).await?;
            Ok(Settlement::Refunded)
        }
        Err(error) => Err(ApiError::from_command(error, order_rejection)),
    }
}

fn variants_of(order: &Order) -> Vec<(Uuid, u32)> {
    let mut lines: Vec<(Uuid, u32)> = order
        .lines()
        .iter()
        .map(|line| (line.variant_id, line.quantity))
        .collect();
    lines.sort_by_key(|(variant_id, _)| *variant_id);
    lines
}

/// Whether every line of a paid order was committed.
enum Committed {
    All,
    /// A line's hold was gone: released (by the scheduler, say) before the
    /// payment could commit it. The lines before it are committed.
    HoldGone,
}

/// The paid order's reserved units leave `on_hand` for good.
async fn commit_stock(
    state: &AppState,
    order_id: Uuid,
    lines: &[(Uuid, u32)],
    metadata: &Metadata,
) -> Result<Committed, ApiError> {
    for (variant_id, _) in lines {
        let commit = InventoryCommand::Commit { order_id };
        match state
            .inventory
            .execute(&variant_id.to_string(), commit, metadata.clone())
            .await
        {
            Ok(_) => {}
            Err(CommandError::Rejected(InventoryError::NoReservation { .. })) => {
                return Ok(Committed::HoldGone)
            }
            Err(error) => return Err(stock_failure(error)),
        }
    }
    Ok(Committed::All)
}

/// A stock command that failed where the payment path expects it to work
/// (a refusal it does not handle is a bug; contention and store failures
/// are the caller's to retry).
fn stock_failure(error: CommandError<InventoryError>) -> ApiError {
    ApiError::from_command(error, |e| ApiError::internal(anyhow::anyhow!(e)))
}

/// Commits a paid order's units, taking a line's units again first when
/// its hold was released under the payment (the scheduler expiring the
/// order as the payment arrived, or after a commit that failed). False,
/// with none of the order's units held or sold, when some line's units
/// are gone: the money cannot be kept.
async fn keep_stock(
    state: &AppState,
    order: &Order,
    metadata: &Metadata,
) -> Result<bool, ApiError> {
    let order_id = order.order_id();
    let lines = variants_of(order);
    for _ in 0..LATE_PAYMENT_ATTEMPTS {
        if let Committed::All = commit_stock(state, order_id, &lines, metadata).await? {
            return Ok(true);
        }
        if !reserve_again(state, order, metadata).await? {
            break;
        }
    }
    // The money goes back, so the units it took go back too.
    give_back_units(state, order_id, &lines, metadata).await?;
    Ok(false)
}

/// Whether the payment's refund was decided since the order was loaded (by
/// another settlement of the same payment running at the same time): read
/// after this settlement's commits, so that either this settlement sees
/// the decision, or the deciding one gives back the units it committed.
async fn refund_decided_since(
    state: &AppState,
    order_id: Uuid,
    intent_id: &str,
) -> Result<bool, ApiError> {
    Ok(load_order(state, order_id)
        .await?
        .is_some_and(|order| order.refund_decided(intent_id)))
}

/// Puts back the units the order took off the shelf and releases those it
/// holds: both no-ops where there are none.
async fn give_back_units(
    state: &AppState,
    order_id: Uuid,
    lines: &[(Uuid, u32)],
    metadata: &Metadata,
) -> Result<(), ApiError> {
    return_committed(state, order_id, lines, metadata).await?;
    release_lines(state, order_id, lines, ReleaseReason::Cancelled, metadata).await
}

/// Puts back on the shelf the units the order's payment already took off
/// it (a line committed before another line's units turned out gone);
/// at most once per line, however often this runs.
async fn return_committed(
    state: &AppState,
    order_id: Uuid,
    lines: &[(Uuid, u32)],
    metadata: &Metadata,
) -> Result<(), ApiError> {
    for (variant_id, _) in lines {
        let give_back = InventoryCommand::ReturnCommitted { order_id };
        state
            .inventory
            .execute(&variant_id.to_string(), give_back, metadata.clone())
            .await
            .map_err(stock_failure)?;
    }
    Ok(())
}

/// Gives back whatever the order holds on each line (nothing, for a line
/// not held or already committed).
async fn release_lines(
    state: &AppState,
    order_id: Uuid,
    lines: &[(Uuid, u32)],
    reason: ReleaseReason,
    metadata: &Metadata,
) -> Result<(), ApiError> {
    let variant_ids: Vec<Uuid> = lines.iter().map(|(id, _)| *id).collect();
    release_variants(state, order_id, &variant_ids, reason, metadata)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))
}

/// At a paid order's deadline: makes sure its payment's units were
/// committed (a commit that failed with nobody retrying would otherwise
/// hold them forever), and refunds the payment if they are gone.
pub async fn settle_paid_stock(
    state: &AppState,
    order_id: Uuid,
    metadata: &Metadata,
) -> Result<(), ApiError> {
    let Some(order) = load_order(state, order_id).await? else {
        return Ok(());
    };
    if order.status() != Some(OrderStatus::Paid) {
        return Ok(());
    }
    let (Some(intent_id), Some(amount_cents)) =
        (order.payment_intent_id(), order.paid_amount_cents())
    else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "paid order {order_id} records no payment"
        )));
    };
    if !order.refund_decided(intent_id)
        && keep_stock(state, &order, metadata).await?
        && !refund_decided_since(state, order_id, intent_id).await?
    {
        return Ok(());
    }
    tracing::error!(%order_id, "paid order's units are gone, or its refund was decided; refunding");
    refund_order(state, &order, intent_id, amount_cents, metadata)
        .await
        .map(drop)
}

/// A payment that arrived after the order was cancelled: take the stock
/// again and honour it, or refund it when the stock is gone.
async fn honour_or_refund(
    state: &AppState,
    order_id: Uuid,
    order: &Order,
    intent: &PaymentIntent,
    metadata: &Metadata,
) -> Result<Settlement, ApiError> {
    let lines = variants_of(order);
    if !reserve_again(state, order, metadata).await? {
        return refund_order(state, order, &intent.id, intent.amount_cents, metadata).await;
    }
    let honour = OrderCommand::HonourLatePayment {
        payment_intent_id: intent.id.clone(),
        amount_cents: intent.amount_cents,
        currency: intent.currency.clone(),
        paid_at: Utc::now(),
    };
    let position = match execute_order(state, order_id, honour, metadata).await {
        Ok(position) => position,
        Err(error) => {
            let _ =
                release_lines(state, order_id, &lines, ReleaseReason::Cancelled, metadata).await;
            return match error {
                CommandError::Rejected(
                    OrderError::NotHonourable { .. }
                    | OrderError::InvalidTransition { .. }
                    | OrderError::RefundUnderway { .. },
                ) => refund_order(state, order, &intent.id, intent.amount_cents, metadata).await,
                other => Err(ApiError::from_command(other, order_rejection)),
            };
        }
    };
    if keep_stock(state, order, metadata).await?
        && !refund_decided_since(state, order_id, &intent.id).await?
    {
        wait_for_orders(state, position).await?;
        return Ok(Settlement::Paid);
    }
    // Honoured, but the scheduler released the old hold under us and the
    // units are gone: nothing may be sold twice, so the money goes back.
    tracing::error!(%order_id, "late payment honoured but stock could not be committed");
    refund_order(state, order, &intent.id, intent.amount_cents, metadata).await
}

/// Reserves every line again for the order; false (and nothing held) when
/// any line is short. The new hold gets a deadline first, so that it ends
/// even if what follows (the payment's commit, say) fails and nobody
/// retries: at the deadline the scheduler commits the units of an order
/// that is paid and releases those of one that is not.
async fn reserve_again(
    state: &AppState,
    order: &Order,
    metadata: &Metadata,
) -> Result<bool, ApiError> {
    let order_id = order.order_id();
    let lines = variants_of(order);
    set_deadline(state, order, &lines).await?;
    for (index, (variant_id, quantity)) in lines.iter().enumerate() {
        let quantity = Quantity::new(*quantity).map_err(ApiError::internal)?;
        let reserve = InventoryCommand::Reserve { order_id, quantity };
        match state
            .inventory
            .execute(&variant_id.to_string(), reserve, metadata.clone())
            .await
        {
            Ok(_) => {}
            Err(CommandError::Rejected(InventoryError::InsufficientStock { .. })) => {
                let taken = &lines[..index];
                release_lines(state, order_id, taken, ReleaseReason::Cancelled, metadata).await?;
                return Ok(false);
            }
            Err(error) => return Err(stock_failure(error)),
        }
    }
    Ok(true)
}

/// Gives the order's hold a deadline one hold's length from now (the first
/// one was deleted when the order expired), clearing any lease on it.
async fn set_deadline(
    state: &AppState,
    order: &Order,
    lines: &[(Uuid, u32)],
) -> Result<(), ApiError> {
    let due_at = Utc::now()
        + chrono::Duration::from_std(state.settings.order_hold).map_err(ApiError::internal)?;
    let variant_ids: Vec<Uuid> = lines.iter().map(|(variant_id, _)| *variant_id).collect();
    sqlx::query(
        "INSERT INTO order_deadlines (order_id, user_id, due_at, variant_ids) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (order_id) DO UPDATE SET due_at = EXCLUDED.due_at, variant_ids = EXCLUDED.variant_ids, \
                                              leased_until = NULL, attempts = 0, last_error = NULL",
    )
    .bind(order.order_id())
    .bind(order.user_id())
    .bind(due_at)
    .bind(&variant_ids)
    .execute(&state.pool)
    .await?;
    Ok(())
}

async fn refund_at_provider(
    state: &AppState,
    order_id: Uuid,
    intent_id: &str,
    amount_cents: i64,
) -> Result<crate::payments::Refund, ApiError> {
    let key = format!("refund-{order_id}-{intent_id}");
    let refund = state.payments.refund(intent_id, amount_cents, &key).await?;
    metrics::counter!("payments_refunded_total").increment(1);
    tracing::warn!(%order_id, intent = %intent_id, refund = %refund.id, "payment refunded");
    Ok(refund)
}

/// Gives a payment for `order` back, in an order that survives a failure at
/// any step: the decision first (from then on nothing can keep the
/// payment, and any retry lands here), then the units the order holds or
/// took go back (again, harmlessly, where they went back already), then
/// the money, idempotently at the provider, and last the record of it.
async fn refund_order(
    state: &AppState,
    order: &Order,
    intent_id: &str,
    amount_cents: i64,
    metadata: &Metadata,
) -> Result<Settlement, ApiError> {
    let order_id = order.order_id();
    if order.status() == Some(OrderStatus::Refunded) {
        return Ok(Settlement::Refunded);
    }
    let decide = OrderCommand::DecideRefund {
        payment_intent_id: intent_id.to_owned(),
        amount_cents,
        decided_at: Utc::now(),
    };
    match execute_order(state, order_id, decide, metadata).await {
        Ok(_) => {}
        // Paid meanwhile with another payment: this one goes back, the
        // order's units stay sold.
        Err(CommandError::Rejected(OrderError::PaymentIntentMismatch { .. })) => {
            refund_at_provider(state, order_id, intent_id, amount_cents).await?;
            return Ok(Settlement::Refunded);
        }
        Err(error) => return Err(ApiError::from_command(error, order_rejection)),
    }
    // Read after the decision: an order paid meanwhile with another
    // payment of its own keeps its units.
    let keeps_another_payment = load_order(state, order_id).await?.is_some_and(|current| {
        current.status() == Some(OrderStatus::Paid)
            && current.payment_intent_id() != Some(intent_id)
    });
    if !keeps_another_payment {
        give_back_units(state, order_id, &variants_of(order), metadata).await?;
    }
    let refund = refund_at_provider(state, order_id, intent_id, amount_cents).await?;
    let record = OrderCommand::Refund {
        payment_intent_id: intent_id.to_owned(),
        refund_id: refund.id,
        amount_cents,
        refunded_at: Utc::now(),
    };
    let position = execute_order(state, order_id, record, metadata)
        .await
        .map_err(|error| ApiError::from_command(error, order_rejection))?;
    wait_for_orders(state, position).await?;
    Ok(Settlement::Refunded)
}

/// A failed or cancelled payment ends an unpaid order and frees its stock.
async fn cancel_unpaid(
    state: &AppState,
    order_id: Uuid,
    metadata: &Metadata,
) -> Result<(), ApiError> {
    let Some(order) = load_order(state, order_id).await? else {
        return Ok(());
    };
    let cancel = OrderCommand::Cancel {
        reason: CancelReason::PaymentFailed,
        cancelled_at: Utc::now(),
    };
    match execute_order(state, order_id, cancel, metadata).await {
        Ok(position) => {
            let lines = variants_of(&order);
            release_lines(
                state,
                order_id,
                &lines,
                ReleaseReason::PaymentFailed,
                metadata,
            )
            .await?;
            wait_for_orders(state, position).await
        }
        // Paid or refunded in the meantime: a late failure changes nothing.
        Err(CommandError::Rejected(OrderError::InvalidTransition { .. })) => Ok(()),
        Err(error) => Err(ApiError::from_command(error, order_rejection)),
    }
}

/// Acts on a verified provider event; safe to call again for the same event.
pub async fn handle_event(
    state: &AppState,
    event: &WebhookEvent,
    metadata: &Metadata,
) -> Result<(), ApiError> {
    let Some(intent) = &event.intent else {
        return Ok(());
    };
    let Some(order_id) = intent.order_id else {
        tracing::warn!(intent = %intent.id, "payment event for an intent without an order");
        return Ok(());
    };
    match event.kind {
        WebhookEventKind::PaymentSucceeded => settle_paid(state, order_id, intent, metadata)
            .await
            .map(drop),
        WebhookEventKind::PaymentFailed | WebhookEventKind::PaymentCanceled => {
            cancel_unpaid(state, order_id, metadata).await
        }
        WebhookEventKind::Other(_) => Ok(()),
    }
}

/// Cancels the order's payment intent at the provider, if it has one, so
/// the customer can no longer pay for a hold that ended. A payment that
/// slips through anyway is handled as a late payment.
pub async fn cancel_open_intent(state: &AppState, order_id: Uuid) {
    let intent_id = match load_order(state, order_id).await {
        Ok(Some(order)) => order.payment_intent_id().map(str::to_owned),
        _ => None,
    };
    if let Some(intent_id) = intent_id {
        if let Err(error) = state.payments.cancel_intent(&intent_id).await {
            tracing::warn!(%order_id, %intent_id, %error, "could not cancel the payment intent");
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PaymentIntentRequest {
    pub order_id: Uuid,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentIntentResponse {
    pub order_id: Uuid,
    pub payment_intent_id: String,
    pub client_secret: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
}

fn provider_name(state: &AppState) -> &'static str {
    match state.payments.kind() {
        crate::config::PaymentProviderKind::Fake => "fake",
        crate::config::PaymentProviderKind::Stripe => "stripe",
    }
}

/// Makes (or returns again) the payment intent for one of the caller's
/// orders; the amount comes from the order.
#[utoipa::path(tag = "checkout", request_body = PaymentIntentRequest,
    params(("Idempotency-Key" = String, Header, description = "1 to 255 printable ASCII characters")),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = PaymentIntentResponse),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 404, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "the order can no longer be paid"),
    (status = 503, body = crate::http::problem::Problem, description = "the payment provider is unavailable"),
))]
#[post("/api/v1/checkout/create-payment-intent")]
pub async fn create_payment_intent(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: IdempotencyKey,
    body: Json<PaymentIntentRequest>,
) -> Result<HttpResponse, ApiError> {
    let order = own_order(&state, user, body.0.order_id).await?;
    if !matches!(order.status.as_str(), "created" | "payment_pending") {
        return Err(ApiError::Conflict(format!(
            "the order is {} and cannot be paid",
            order.status
        )));
    }
    let currency = Currency::try_from(order.currency.as_str()).map_err(ApiError::internal)?;
    // Derived from the order, not the request: every call for this order
    // gets the same intent from the provider.
    let provider_key = format!("order-{}-intent", order.id);
    let intent = state
        .payments
        .create_intent(order.id, order.total_cents, &currency, &provider_key)
        .await?;
    let metadata =
        Metadata::user(user.id, request_id_of(&request)).with_idempotency_key(Some(key.0));
    let start = OrderCommand::StartPayment {
        payment_intent_id: intent.id.clone(),
        provider: provider_name(&state).to_owned(),
        started_at: Utc::now(),
    };
    let position = execute_order(&state, order.id, start, &metadata)
        .await
        .map_err(|error| ApiError::from_command(error, order_rejection))?;
    wait_for_orders(&state, position).await?;
    Ok(HttpResponse::Ok().json(PaymentIntentResponse {
        order_id: order.id,
        payment_intent_id: intent.id,
        client_secret: intent.client_secret,
        amount_cents: order.total_cents,
        currency: order.currency,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ConfirmPaymentRequest {
    pub order_id: Uuid,
    pub payment_intent_id: String,
}

fn not_verified(reason: &str) -> ApiError {
    ApiError::PaymentNotVerified(format!("the payment could not be verified: {reason}"))
}

/// Marks one of the caller's orders paid after fetching the payment intent
/// from the provider and finding it succeeded, for this order, with the
/// order's amount and currency.
#[utoipa::path(tag = "checkout", request_body = ConfirmPaymentRequest,
    params(("Idempotency-Key" = String, Header, description = "1 to 255 printable ASCII characters")),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = OrderView, description = "the order, paid"),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 402, body = crate::http::problem::Problem, description = "payment_not_verified; nothing changed"),
    (status = 404, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "the order expired, its stock is gone, and the payment was refunded"),
    (status = 503, body = crate::http::problem::Problem),
))]
#[post("/api/v1/checkout/confirm-payment")]
pub async fn confirm_payment(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: IdempotencyKey,
    body: Json<ConfirmPaymentRequest>,
) -> Result<HttpResponse, ApiError> {
    let order = own_order(&state, user, body.0.order_id).await?;
    let intent = match state
        .payments
        .retrieve_intent(&body.0.payment_intent_id)
        .await
    {
        Ok(intent) => intent,
        Err(crate::payments::PaymentError::NotFound) => {
            return Err(not_verified("no such payment intent"))
        }
        Err(other) => return Err(other.into()),
    };
    if intent.order_id != Some(order.id) {
        return Err(not_verified("the payment intent belongs to another order"));
    }
    if intent.status != IntentStatus::Succeeded {
        return Err(not_verified(&format!(
            "the payment intent is {}",
            intent.status.as_str()
        )));
    }
    if intent.amount_cents != order.total_cents || intent.currency.as_str() != order.currency {
        return Err(not_verified(
            "the amount or currency differs from the order's",
        ));
    }
    let metadata =
        Metadata::user(user.id, request_id_of(&request)).with_idempotency_key(Some(key.0));
    match settle_paid(&state, order.id, &intent, &metadata).await? {
        Settlement::Paid => Ok(HttpResponse::Ok().json(own_order(&state, user, order.id).await?)),
        Settlement::Refunded => Err(ApiError::Conflict(
            "the order expired and its stock is gone; the payment was refunded".into(),
        )),
    }
}

fn signature(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok())
}

/// Stripe events, verified by their signature on the raw body. A repeated
/// event is acknowledged and changes nothing more.
#[utoipa::path(tag = "webhooks", request_body(content = String, description = "the raw Stripe event"),
    params(("Stripe-Signature" = String, Header)), responses(
    (status = 200, description = "handled, or already handled"),
    (status = 400, body = crate::http::problem::Problem, description = "missing or invalid signature"),
))]
#[post("/api/v1/webhooks/stripe")]
pub async fn stripe_webhook(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let event = state
        .payments
        .parse_webhook(&body, signature(request.headers()))?;
    let seen: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM processed_webhook_events WHERE event_id = $1)",
    )
    .bind(&event.id)
    .fetch_one(&state.pool)
    .await?;
    if !seen {
        let metadata = Metadata::system(format!("webhook:{}", event.id));
        handle_event(&state, &event, &metadata).await?;
        // Recorded only once handled: a failure above makes Stripe retry.
        sqlx::query(
            "INSERT INTO processed_webhook_events (event_id, event_type) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&event.id)
        .bind(event.kind.as_str())
        .execute(&state.pool)
        .await?;
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "received": true })))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct FakePaymentRequest {
    /// `succeeded` or `failed`.
    #[schema(value_type = String)]
    pub outcome: SettleOutcome,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FakePaymentResponse {
    pub payment_intent_id: String,
    pub status: String,
}

/// Development only (PAYMENT_PROVIDER=fake): pays or declines one of the
/// caller's payment intents, playing the customer's card and the provider's
/// webhook. Absent (404) with any other provider.
#[utoipa::path(tag = "fake payments", request_body = FakePaymentRequest,
    params(("payment_intent_id" = String, Path)), security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = FakePaymentResponse),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 404, body = crate::http::problem::Problem, description = "no such intent for this user, or not the fake provider"),
    (status = 409, body = crate::http::problem::Problem, description = "the intent can no longer be paid"),
))]
#[post("/api/v1/fake-payments/{payment_intent_id}")]
pub async fn fake_payment(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    intent_id: web::Path<String>,
    body: Json<FakePaymentRequest>,
) -> Result<HttpResponse, ApiError> {
    let Some(fake) = state.payments.as_fake() else {
        return Err(ApiError::NotFound("no such resource".into()));
    };
    let intent = state.payments.retrieve_intent(&intent_id).await?;
    let owned = match intent.order_id {
        Some(order_id) => own_order(&state, user, order_id).await.is_ok(),
        None => false,
    };
    if !owned {
        return Err(ApiError::not_found("payment intent"));
    }
    let event = fake
        .settle(&intent.id, body.0.outcome)
        .await
        .map_err(|error| match error {
            crate::payments::PaymentError::Rejected(reason) => ApiError::Conflict(reason),
            other => other.into(),
        })?;
    let metadata = Metadata::user(user.id, request_id_of(&request));
    handle_event(&state, &event, &metadata).await?;
    let status = event
        .intent
        .map_or_else(|| "unknown".to_owned(), |i| i.status.as_str().to_owned());
    Ok(HttpResponse::Ok().json(FakePaymentResponse {
        payment_intent_id: intent.id,
        status,
    }))
}

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .service(create_payment_intent)
        .service(confirm_payment)
        .service(stripe_webhook)
        .service(fake_payment);
}
