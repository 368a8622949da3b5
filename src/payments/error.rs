//! What can go wrong talking to a payment provider, and how each failure
//! reaches a client without revealing anything about the provider.

use crate::http::problem::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// A webhook whose signature is missing, wrong, stale, or that cannot
    /// be checked because no webhook secret is configured.
    #[error("the webhook signature is missing or invalid")]
    BadSignature,
    /// A correctly signed webhook whose payment intent we cannot read.
    #[error("the webhook event could not be read: {0}")]
    InvalidEvent(String),
    /// The provider has no such payment intent (or the id cannot be one).
    #[error("no such payment intent")]
    NotFound,
    /// The provider understood the request and refused it: the intent is in
    /// the wrong state, an idempotency key was reused with other values, the
    /// API key is wrong. A bug or a misconfiguration on our side.
    #[error("the payment provider refused the request: {0}")]
    Rejected(String),
    /// The provider could not be reached or failed (network, timeout, 5xx,
    /// an unreadable answer). Retrying later may work.
    #[error("the payment provider is unavailable: {0}")]
    Provider(String),
    /// Our arguments cannot be sent at all (a non-positive amount, an empty
    /// idempotency key).
    #[error("invalid payment request: {0}")]
    InvalidRequest(String),
    /// The fake provider's tables failed.
    #[error("payment storage failed")]
    Storage(#[from] sqlx::Error),
}

/// The client sees only a stable code and a generic sentence; the cause
/// goes to the log through `ApiError::Internal`.
impl From<PaymentError> for ApiError {
    fn from(error: PaymentError) -> Self {
        match error {
            PaymentError::BadSignature => ApiError::bad_request("invalid webhook signature"),
            PaymentError::InvalidEvent(_) => ApiError::bad_request("unreadable webhook event"),
            PaymentError::NotFound => ApiError::not_found("payment intent"),
            PaymentError::Provider(cause) => {
                tracing::warn!(%cause, "payment provider unavailable");
                ApiError::Unavailable("the payment provider is unavailable; try again".into())
            }
            other @ (PaymentError::Rejected(_)
            | PaymentError::InvalidRequest(_)
            | PaymentError::Storage(_)) => ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::ResponseError;

    #[test]
    fn provider_failures_never_show_their_cause_to_clients() {
        let unavailable = ApiError::from(PaymentError::Provider("10.0.0.7 refused".into()));
        assert_eq!(unavailable.status_code(), 503);
        assert!(!unavailable.to_string().contains("10.0.0.7"));

        let rejected = ApiError::from(PaymentError::Rejected("sk_live_abc is invalid".into()));
        assert_eq!(rejected.status_code(), 500);
        assert_eq!(rejected.code(), "internal");
    }

    #[test]
    fn signature_failures_are_client_errors() {
        let error = ApiError::from(PaymentError::BadSignature);
        assert_eq!(error.status_code(), 400);
        assert_eq!(error.code(), "validation_failed");
        assert_eq!(ApiError::from(PaymentError::NotFound).status_code(), 404);
    }
}
