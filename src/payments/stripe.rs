//! The Stripe provider: payment intents and refunds through async-stripe,
//! webhooks verified with Stripe's signature scheme.

use std::time::Duration;

use async_trait::async_trait;
use domain::values::Currency;
use secrecy::{ExposeSecret, SecretString};
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_core::payment_intent::{
    CancelPaymentIntent, CreatePaymentIntent, CreatePaymentIntentAutomaticPaymentMethods,
    RetrievePaymentIntent,
};
use stripe_core::refund::CreateRefund;
use stripe_webhook::{EventObject, Webhook, WebhookError};
use uuid::Uuid;

use super::{
    check_idempotency_key, check_positive_amount, is_plausible_id, IntentStatus, PaymentError,
    PaymentIntent, PaymentProvider, Refund, RefundStatus, WebhookEvent, WebhookEventKind,
};
use crate::config::{ConfigError, PaymentProviderKind, Settings};

/// Each attempt gives up after this long. async-stripe has no timeout of its
/// own, and a checkout request must not hang on a stalled connection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata key that ties an intent to its order.
const ORDER_ID_METADATA: &str = "order_id";

#[derive(Clone)]
pub struct StripeProvider {
    client: Client,
    /// `None` refuses every webhook: without the secret nothing can be
    /// verified, and an unverified webhook could mark any order paid.
    webhook_secret: Option<SecretString>,
}

impl StripeProvider {
    /// A client for `STRIPE_SECRET_KEY`, at `STRIPE_API_BASE` when set (the
    /// root URL, without `/v1`), verifying webhooks with `STRIPE_WEBHOOK_SECRET`.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let secret_key = settings
            .stripe_secret_key
            .as_ref()
            .ok_or_else(|| ConfigError {
                name: "STRIPE_SECRET_KEY",
                reason: "required when PAYMENT_PROVIDER is stripe".into(),
            })?;
        let mut builder = ClientBuilder::new(secret_key.expose_secret()).timeout(REQUEST_TIMEOUT);
        if let Some(base) = &settings.stripe_api_base {
            builder = builder.url(with_trailing_slash(base));
        }
        let client = builder.build().map_err(|error| match error {
            StripeError::ConfigError(reason) => ConfigError {
                name: "STRIPE_API_BASE",
                reason,
            },
            _ => ConfigError {
                name: "STRIPE_SECRET_KEY",
                reason: "must be printable ASCII".into(),
            },
        })?;
        if settings.stripe_webhook_secret.is_none() {
            tracing::warn!(
                "STRIPE_WEBHOOK_SECRET is not set: every Stripe webhook will be refused"
            );
        }
        Ok(Self {
            client,
            webhook_secret: settings.stripe_webhook_secret.clone(),
        })
    }
}

/// async-stripe appends `v1/...` to the base as written, so the base must
/// end in a slash.
fn with_trailing_slash(base: &str) -> String {
    if base.ends_with('/') {
        base.to_owned()
    } else {
        format!("{base}/")
    }
}

fn idempotent(key: &str) -> Result<RequestStrategy, PaymentError> {
    check_idempotency_key(key)?;
    let key = IdempotencyKey::new(key)
        .map_err(|error| PaymentError::InvalidRequest(error.to_string()))?;
    Ok(RequestStrategy::Idempotent(key))
}

#[async_trait]
impl PaymentProvider for StripeProvider {
    fn kind(&self) -> PaymentProviderKind {
        PaymentProviderKind::Stripe
    }

    async fn create_intent(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &Currency,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, PaymentError> {
        check_positive_amount(amount_cents)?;
        let strategy = idempotent(idempotency_key)?;
        let request = CreatePaymentIntent::new(amount_cents, stripe_currency(currency))
            .metadata([(ORDER_ID_METADATA.to_owned(), order_id.to_string())])
            .automatic_payment_methods(CreatePaymentIntentAutomaticPaymentMethods::new(true));
        let intent = request
            .customize()
            .request_strategy(strategy)
            .send(&self.client)
            .await
            .map_err(from_stripe)?;
        intent_from_stripe(intent).map_err(PaymentError::Provider)
    }

    async fn retrieve_intent(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        if !is_plausible_id(intent_id) {
            return Err(PaymentError::NotFound);
        }
        let intent = RetrievePaymentIntent::new(intent_id)
            .send(&self.client)
            .await
            .map_err(from_stripe)?;
        intent_from_stripe(intent).map_err(PaymentError::Provider)
    }

    async fn cancel_intent(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        if !is_plausible_id(intent_id) {
            return Err(PaymentError::NotFound);
        }
        match CancelPaymentIntent::new(intent_id).send(&self.client).await {
            Ok(intent) => intent_from_stripe(intent).map_err(PaymentError::Provider),
            Err(error) => match from_stripe(error) {
                // Stripe refuses to cancel twice; that the intent is
                // cancelled is all the caller wants.
                refused @ PaymentError::Rejected(_) => {
                    let current = self.retrieve_intent(intent_id).await?;
                    if current.status == IntentStatus::Canceled {
                        Ok(current)
                    } else {
                        Err(refused)
                    }
                }
                other => Err(other),
            },
        }
    }

    async fn refund(
        &self,
        intent_id: &str,
        amount_cents: i64,
        idempotency_key: &str,
    ) -> Result<Refund, PaymentError> {
        if !is_plausible_id(intent_id) {
            return Err(PaymentError::NotFound);
        }
        check_positive_amount(amount_cents)?;
        let strategy = idempotent(idempotency_key)?;
        let refund = CreateRefund::new()
            .payment_intent(intent_id)
            .amount(amount_cents)
            .customize()
            .request_strategy(strategy)
            .send(&self.client)
            .await
            .map_err(from_stripe)?;
        Ok(Refund {
            id: refund.id.as_str().to_owned(),
            // Stripe leaves the status out only for refunds that are not
            // card refunds in progress; treat that as not yet settled.
            status: refund
                .status
                .as_deref()
                .map_or(RefundStatus::Pending, RefundStatus::from_provider),
        })
    }

    fn parse_webhook(
        &self,
        raw_body: &[u8],
        signature_header: Option<&str>,
    ) -> Result<WebhookEvent, PaymentError> {
        let Some(secret) = &self.webhook_secret else {
            tracing::warn!("Stripe webhook refused: STRIPE_WEBHOOK_SECRET is not set");
            return Err(PaymentError::BadSignature);
        };
        let header = signature_header.ok_or(PaymentError::BadSignature)?;
        // Stripe signs UTF-8 JSON; other bytes cannot carry a valid signature.
        let payload = std::str::from_utf8(raw_body).map_err(|_| PaymentError::BadSignature)?;
        match Webhook::construct_event(payload, header, secret.expose_secret()) {
            Ok(event) => event_from_stripe(event),
            // async-stripe parses only after the signature and timestamp
            // passed, so this event is genuine; read what we can of it.
            Err(WebhookError::BadParse(reason)) => event_beyond_async_stripe(payload, reason),
            Err(_) => Err(PaymentError::BadSignature),
        }
    }
}

fn stripe_currency(currency: &Currency) -> stripe_types::Currency {
    let lowercase = currency.as_ref().to_ascii_lowercase();
    // Unknown codes parse to `Currency::Unknown` and Stripe itself refuses them.
    lowercase
        .parse()
        .unwrap_or_else(|never: std::convert::Infallible| match never {})
}

/// Our view of a Stripe payment intent; the error says which field was unusable.
fn intent_from_stripe(intent: stripe_core::PaymentIntent) -> Result<PaymentIntent, String> {
    let currency = Currency::try_from(intent.currency.to_string().to_ascii_uppercase())
        .map_err(|error| format!("payment intent {} has {error}", intent.id))?;
    Ok(PaymentIntent {
        order_id: intent
            .metadata
            .get(ORDER_ID_METADATA)
            .and_then(|raw| Uuid::parse_str(raw).ok()),
        id: intent.id.as_str().to_owned(),
        client_secret: intent.client_secret,
        status: IntentStatus::from_provider(intent.status.as_str()),
        amount_cents: intent.amount,
        currency,
    })
}

fn event_from_stripe(event: stripe_webhook::Event) -> Result<WebhookEvent, PaymentError> {
    let kind = WebhookEventKind::from_provider(event.type_.as_str());
    let intent = match event.data.object {
        EventObject::PaymentIntentSucceeded(intent)
        | EventObject::PaymentIntentPaymentFailed(intent)
        | EventObject::PaymentIntentCanceled(intent)
        | EventObject::PaymentIntentCreated(intent)
        | EventObject::PaymentIntentProcessing(intent)
        | EventObject::PaymentIntentRequiresAction(intent)
        | EventObject::PaymentIntentPartiallyFunded(intent)
        | EventObject::PaymentIntentAmountCapturableUpdated(intent) => {
            Some(intent_from_stripe(*intent).map_err(PaymentError::InvalidEvent)?)
        }
        _ => None,
    };
    Ok(WebhookEvent {
        id: event.id.as_str().to_owned(),
        kind,
        intent,
    })
}

/// A genuine event async-stripe could not read (an object shape newer than
/// the library, say). Events we act on must be readable, so those are
/// refused and Stripe retries them; any other is acknowledged as `Other`.
fn event_beyond_async_stripe(payload: &str, reason: String) -> Result<WebhookEvent, PaymentError> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        id: String,
        #[serde(rename = "type")]
        event_type: String,
    }
    let envelope: Envelope = serde_json::from_str(payload)
        .map_err(|error| PaymentError::InvalidEvent(format!("{reason}: {error}")))?;
    match WebhookEventKind::from_provider(&envelope.event_type) {
        WebhookEventKind::Other(event_type) => Ok(WebhookEvent {
            id: envelope.id,
            kind: WebhookEventKind::Other(event_type),
            intent: None,
        }),
        _ => Err(PaymentError::InvalidEvent(format!(
            "{} {}: {reason}",
            envelope.event_type, envelope.id
        ))),
    }
}

fn from_stripe(error: StripeError) -> PaymentError {
    match error {
        StripeError::Stripe(details, status) => {
            let code = details.code.as_ref().map_or("", |code| code.as_str());
            let message = details.message.as_deref().unwrap_or("no message");
            if status == 404 || code == "resource_missing" {
                PaymentError::NotFound
            } else if status == 429 || status >= 500 {
                PaymentError::Provider(format!("status {status}: {message}"))
            } else {
                PaymentError::Rejected(format!("status {status} {code}: {message}"))
            }
        }
        StripeError::Timeout => PaymentError::Provider("no answer within the timeout".into()),
        other => PaymentError::Provider(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_base_always_ends_in_a_slash() {
        assert_eq!(
            with_trailing_slash("http://127.0.0.1:9"),
            "http://127.0.0.1:9/"
        );
        assert_eq!(
            with_trailing_slash("http://127.0.0.1:9/"),
            "http://127.0.0.1:9/"
        );
    }

    #[test]
    fn currencies_go_to_stripe_in_lower_case() {
        let usd = Currency::try_from("USD".to_owned()).expect("valid currency");
        assert_eq!(stripe_currency(&usd), stripe_types::Currency::USD);
        assert_eq!(stripe_currency(&usd).to_string(), "usd");
    }

    #[test]
    fn timeouts_and_server_errors_are_provider_failures() {
        assert!(matches!(
            from_stripe(StripeError::Timeout),
            PaymentError::Provider(_)
        ));
        assert!(matches!(
            from_stripe(StripeError::ClientError("connection refused".into())),
            PaymentError::Provider(_)
        ));
    }
}
