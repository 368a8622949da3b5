//! Our own view of a provider's payment intents, refunds and webhook events,
//! so nothing outside `payments` depends on a provider's types.

use domain::values::Currency;
use uuid::Uuid;

/// A request to the provider to collect one order's total from the customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentIntent {
    /// The provider's id (`pi_...`); the client pays against it.
    pub id: String,
    /// Handed to the browser so it can confirm the payment; the provider
    /// returns it on every read made with the secret key.
    pub client_secret: Option<String>,
    pub status: IntentStatus,
    /// The amount to collect, in minor units.
    pub amount_cents: i64,
    /// Upper-case ISO 4217, whatever case the provider uses.
    pub currency: Currency,
    /// The order this intent pays for, from `metadata.order_id`; `None` for
    /// intents not made by this server.
    pub order_id: Option<Uuid>,
}

/// Where a payment intent stands. Only `Succeeded` means the money arrived.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IntentStatus {
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresAction,
    Processing,
    Succeeded,
    Canceled,
    /// A status we do not act on (`requires_capture`, or one added later).
    Other(String),
}

impl IntentStatus {
    /// Reads the provider's status name; unknown names are kept, not refused.
    pub fn from_provider(name: &str) -> Self {
        match name {
            "requires_payment_method" => Self::RequiresPaymentMethod,
            "requires_confirmation" => Self::RequiresConfirmation,
            "requires_action" => Self::RequiresAction,
            "processing" => Self::Processing,
            "succeeded" => Self::Succeeded,
            "canceled" => Self::Canceled,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The provider's name for this status.
    pub fn as_str(&self) -> &str {
        match self {
            Self::RequiresPaymentMethod => "requires_payment_method",
            Self::RequiresConfirmation => "requires_confirmation",
            Self::RequiresAction => "requires_action",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Canceled => "canceled",
            Self::Other(name) => name,
        }
    }

    /// Whether the customer may still pay (or the intent may still be
    /// cancelled): neither succeeded nor cancelled.
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            Self::RequiresPaymentMethod
                | Self::RequiresConfirmation
                | Self::RequiresAction
                | Self::Processing
        )
    }
}

/// Money sent back to the customer for a succeeded payment intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// The provider's id (`re_...`).
    pub id: String,
    pub status: RefundStatus,
}

/// Where a refund stands; card refunds are normally `Succeeded` at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RefundStatus {
    Pending,
    RequiresAction,
    Succeeded,
    Failed,
    Canceled,
    Other(String),
}

impl RefundStatus {
    /// Reads the provider's status name; unknown names are kept, not refused.
    pub fn from_provider(name: &str) -> Self {
        match name {
            "pending" => Self::Pending,
            "requires_action" => Self::RequiresAction,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Pending => "pending",
            Self::RequiresAction => "requires_action",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Other(name) => name,
        }
    }
}

/// A verified notification from the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// The provider's event id (`evt_...`); the same event may be delivered
    /// more than once, so handlers deduplicate by it.
    pub id: String,
    pub kind: WebhookEventKind,
    /// The payment intent the event is about, as it stood when the event was
    /// sent. Always `Some` for the three payment kinds and for any other
    /// `payment_intent.*` event; `None` for events about other objects.
    pub intent: Option<PaymentIntent>,
}

/// The events the order lifecycle reacts to; everything else is `Other`
/// and is acknowledged without effect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WebhookEventKind {
    /// `payment_intent.succeeded`: the money arrived.
    PaymentSucceeded,
    /// `payment_intent.payment_failed`: an attempt to pay was declined.
    PaymentFailed,
    /// `payment_intent.canceled`: the intent can no longer be paid.
    PaymentCanceled,
    /// Any other event type, by its provider name.
    Other(String),
}

impl WebhookEventKind {
    pub fn from_provider(event_type: &str) -> Self {
        match event_type {
            "payment_intent.succeeded" => Self::PaymentSucceeded,
            "payment_intent.payment_failed" => Self::PaymentFailed,
            "payment_intent.canceled" => Self::PaymentCanceled,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The provider's name for this event type.
    pub fn as_str(&self) -> &str {
        match self {
            Self::PaymentSucceeded => "payment_intent.succeeded",
            Self::PaymentFailed => "payment_intent.payment_failed",
            Self::PaymentCanceled => "payment_intent.canceled",
            Self::Other(name) => name,
        }
    }
}

/// What the customer's card did, in the fake provider's simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettleOutcome {
    Succeeded,
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_provider_names() {
        for name in [
            "requires_payment_method",
            "requires_confirmation",
            "requires_action",
            "processing",
            "succeeded",
            "canceled",
            "requires_capture",
        ] {
            assert_eq!(IntentStatus::from_provider(name).as_str(), name);
        }
        assert_eq!(
            IntentStatus::from_provider("requires_capture"),
            IntentStatus::Other("requires_capture".into())
        );
        for name in [
            "pending",
            "requires_action",
            "succeeded",
            "failed",
            "canceled",
        ] {
            assert_eq!(RefundStatus::from_provider(name).as_str(), name);
        }
    }

    #[test]
    fn only_unfinished_intents_are_open() {
        assert!(IntentStatus::RequiresPaymentMethod.is_open());
        assert!(IntentStatus::Processing.is_open());
        assert!(!IntentStatus::Succeeded.is_open());
        assert!(!IntentStatus::Canceled.is_open());
        assert!(!IntentStatus::Other("requires_capture".into()).is_open());
    }

    #[test]
    fn event_kinds_round_trip_and_keep_unknown_names() {
        for name in [
            "payment_intent.succeeded",
            "payment_intent.payment_failed",
            "payment_intent.canceled",
            "charge.refunded",
        ] {
            assert_eq!(WebhookEventKind::from_provider(name).as_str(), name);
        }
        assert_eq!(
            WebhookEventKind::from_provider("charge.refunded"),
            WebhookEventKind::Other("charge.refunded".into())
        );
    }
}
