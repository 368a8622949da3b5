//! Talking to the payment provider: one `PaymentProvider` trait, with Stripe
//! and an offline fake behind it, chosen once from the settings.
//!
//! The rest of the server sees only our own types (`PaymentIntent`,
//! `Refund`, `WebhookEvent`, `PaymentError`), never a provider's.
//!
//! The trait is object-safe through `async-trait` and held as
//! `Arc<dyn PaymentProvider>`: the checkout code and its tests take any
//! provider without a type parameter threading through `AppState` and every
//! handler, and the boxed future costs nothing next to a network round trip.
//! The one fake-only operation, `settle`, is reached through `as_fake()`,
//! so the fake-payments route can answer 404 for any other provider.

mod error;
pub mod fake;
mod model;
pub mod stripe;

use std::sync::Arc;

use async_trait::async_trait;
use domain::values::Currency;
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{ConfigError, PaymentProviderKind, Settings};

pub use error::PaymentError;
pub use fake::FakeProvider;
pub use model::{
    IntentStatus, PaymentIntent, Refund, RefundStatus, SettleOutcome, WebhookEvent,
    WebhookEventKind,
};
pub use stripe::StripeProvider;

/// A payment provider: makes, reads, cancels and refunds payment intents,
/// and reads its own webhooks.
#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Which provider this is.
    fn kind(&self) -> PaymentProviderKind;

    /// Makes a payment intent for an order. The same `idempotency_key`
    /// returns the same intent instead of a second one, so derive it from
    /// the order; reusing it with another amount or currency is `Rejected`.
    async fn create_intent(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &Currency,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, PaymentError>;

    /// The intent as the provider holds it now; `NotFound` if it has none.
    async fn retrieve_intent(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError>;

    /// Stops the intent from being paid. Cancelling a cancelled intent
    /// returns it unchanged; a succeeded one cannot be cancelled
    /// (`Rejected`): refund it instead.
    async fn cancel_intent(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError>;

    /// Returns `amount_cents` of a succeeded intent to the customer. The
    /// same `idempotency_key` returns the same refund instead of a second one.
    async fn refund(
        &self,
        intent_id: &str,
        amount_cents: i64,
        idempotency_key: &str,
    ) -> Result<Refund, PaymentError>;

    /// Verifies a webhook's signature over the raw request body and reads the
    /// event. Anything that cannot be verified is `BadSignature`.
    fn parse_webhook(
        &self,
        raw_body: &[u8],
        signature_header: Option<&str>,
    ) -> Result<WebhookEvent, PaymentError>;

    /// The fake provider, for its `settle` operation; `None` for real ones.
    fn as_fake(&self) -> Option<&FakeProvider> {
        None
    }
}

/// The provider the settings ask for. The fake keeps its intents in `pool`;
/// Stripe is configured from `STRIPE_SECRET_KEY`, `STRIPE_WEBHOOK_SECRET`
/// and `STRIPE_API_BASE`.
pub fn provider_from_settings(
    settings: &Settings,
    pool: PgPool,
) -> Result<Arc<dyn PaymentProvider>, ConfigError> {
    Ok(match settings.payment_provider {
        PaymentProviderKind::Fake => Arc::new(FakeProvider::new(pool)),
        PaymentProviderKind::Stripe => Arc::new(StripeProvider::from_settings(settings)?),
    })
}

/// Provider ids are short ASCII tokens (`pi_...`, `re_...`). Anything else,
/// such as an id from a client containing `/` or `?`, would change the URL
/// we call, so it is treated as an intent that does not exist.
fn is_plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// Stripe accepts keys of 1 to 255 characters; we hold the fake to the same.
fn check_idempotency_key(key: &str) -> Result<(), PaymentError> {
    if key.is_empty() || key.len() > 255 {
        return Err(PaymentError::InvalidRequest(
            "an idempotency key has 1 to 255 characters".into(),
        ));
    }
    Ok(())
}

fn check_positive_amount(amount_cents: i64) -> Result<(), PaymentError> {
    if amount_cents <= 0 {
        return Err(PaymentError::InvalidRequest(format!(
            "amount must be positive, got {amount_cents}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_change_the_request_url_are_not_plausible() {
        assert!(is_plausible_id("pi_3MtwBwLkdIwHu7ix28a3tqPa"));
        assert!(is_plausible_id("pi_fake_0f8e2c"));
        for bad in [
            "",
            "pi_1/cancel",
            "pi_1?expand=x",
            "../v1/refunds",
            "pi 1",
            "pi_ü",
        ] {
            assert!(!is_plausible_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn keys_and_amounts_are_checked_before_any_request() {
        assert!(check_idempotency_key("order-1").is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key(&"k".repeat(256)).is_err());
        assert!(check_positive_amount(1).is_ok());
        assert!(check_positive_amount(0).is_err());
        assert!(check_positive_amount(-5).is_err());
    }
}
