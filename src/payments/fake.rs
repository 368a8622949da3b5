//! The offline provider for development (`PAYMENT_PROVIDER=fake`): payment
//! intents and refunds are rows in Postgres, so they survive restarts and
//! every instance sees the same ones, and the customer "pays" by `settle`.

use async_trait::async_trait;
use domain::values::Currency;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    check_idempotency_key, check_positive_amount, is_plausible_id, IntentStatus, PaymentError,
    PaymentIntent, PaymentProvider, Refund, RefundStatus, SettleOutcome, WebhookEvent,
    WebhookEventKind,
};
use crate::config::PaymentProviderKind;

/// Statuses from which an intent can still be paid, failed or cancelled.
const OPEN_STATUSES: [&str; 4] = [
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
];

const INTENT_COLUMNS: &str = "id, client_secret, status, amount_cents, currency, order_id";

#[derive(Clone)]
pub struct FakeProvider {
    pool: PgPool,
}

#[derive(sqlx::FromRow)]
struct IntentRow {
    id: String,
    client_secret: String,
    status: String,
    amount_cents: i64,
    currency: String,
    order_id: Uuid,
}

impl IntentRow {
    fn into_intent(self) -> Result<PaymentIntent, PaymentError> {
        let currency = Currency::try_from(self.currency).map_err(|error| {
            PaymentError::Provider(format!("fake payment intent {}: {error}", self.id))
        })?;
        Ok(PaymentIntent {
            status: IntentStatus::from_provider(&self.status),
            id: self.id,
            client_secret: Some(self.client_secret),
            amount_cents: self.amount_cents,
            currency,
            order_id: Some(self.order_id),
        })
    }
}

#[derive(sqlx::FromRow)]
struct RefundRow {
    id: String,
    payment_intent_id: String,
    amount_cents: i64,
    status: String,
}

impl RefundRow {
    fn into_refund(self) -> Refund {
        Refund {
            status: RefundStatus::from_provider(&self.status),
            id: self.id,
        }
    }
}

impl FakeProvider {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Plays the customer's card: an open intent succeeds, or its payment
    /// attempt fails and it goes back to `requires_payment_method` (as on
    /// Stripe, the customer may try again). Returns the event Stripe would
    /// have sent, so callers handle both providers with the same code.
    ///
    /// Succeeding twice is harmless; failing a succeeded intent, or settling
    /// a cancelled one, is `Rejected`.
    pub async fn settle(
        &self,
        intent_id: &str,
        outcome: SettleOutcome,
    ) -> Result<WebhookEvent, PaymentError> {
        let (new_status, kind) = match outcome {
            SettleOutcome::Succeeded => ("succeeded", WebhookEventKind::PaymentSucceeded),
            SettleOutcome::Failed => ("requires_payment_method", WebhookEventKind::PaymentFailed),
        };
        let intent = match self.transition_open(intent_id, new_status).await? {
            Some(intent) => intent,
            None => {
                let current = self.retrieve_intent(intent_id).await?;
                let repeat_success = outcome == SettleOutcome::Succeeded
                    && current.status == IntentStatus::Succeeded;
                if !repeat_success {
                    return Err(PaymentError::Rejected(format!(
                        "a {} payment intent cannot be settled as {outcome:?}",
                        current.status.as_str()
                    )));
                }
                current
            }
        };
        Ok(WebhookEvent {
            id: format!("evt_fake_{}", Uuid::new_v4().simple()),
            kind,
            intent: Some(intent),
        })
    }

    /// Moves an open intent to `new_status`; `None` if it is not open (or
    /// does not exist). One statement, so two settles cannot both win.
    async fn transition_open(
        &self,
        intent_id: &str,
        new_status: &str,
    ) -> Result<Option<PaymentIntent>, PaymentError> {
        if !is_plausible_id(intent_id) {
            return Err(PaymentError::NotFound);
        }
        let row: Option<IntentRow> = sqlx::query_as(&format!(
            "UPDATE fake_payment_intents SET status = $2, updated_at = now() \
             WHERE id = $1 AND status = ANY($3) RETURNING {INTENT_COLUMNS}"
        ))
        .bind(intent_id)
        .bind(new_status)
        .bind(&OPEN_STATUSES[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(IntentRow::into_intent).transpose()
    }
}

fn random_token() -> String {
    Uuid::new_v4().simple().to_string()
}

#[async_trait]
impl PaymentProvider for FakeProvider {
    fn kind(&self) -> PaymentProviderKind {
        PaymentProviderKind::Fake
    }

    async fn create_intent(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &Currency,
        idempotency_key: &str,
    ) -> Result<PaymentIntent, PaymentError> {
        check_positive_amount(amount_cents)?;
        check_idempotency_key(idempotency_key)?;
        let id = format!("pi_fake_{}", random_token());
        let client_secret = format!("{id}_secret_{}", random_token());
        // A concurrent insert with the same key waits on the unique index
        // and then does nothing; the select below sees the winner's row.
        let inserted: Option<IntentRow> = sqlx::query_as(&format!(
            "INSERT INTO fake_payment_intents \
                 (id, client_secret, order_id, amount_cents, currency, status, idempotency_key) \
             VALUES ($1, $2, $3, $4, $5, 'requires_payment_method', $6) \
             ON CONFLICT (idempotency_key) DO NOTHING \
             RETURNING {INTENT_COLUMNS}"
        ))
        .bind(&id)
        .bind(&client_secret)
        .bind(order_id)
        .bind(amount_cents)
        .bind(currency.as_ref())
        .bind(idempotency_key)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return row.into_intent();
        }
        let existing: IntentRow = sqlx::query_as(&format!(
            "SELECT {INTENT_COLUMNS} FROM fake_payment_intents WHERE idempotency_key = $1"
        ))
        .bind(idempotency_key)
        .fetch_one(&self.pool)
        .await?;
        // Stripe refuses a key reused with other parameters; so do we.
        if existing.order_id != order_id
            || existing.amount_cents != amount_cents
            || existing.currency != currency.as_ref()
        {
            return Err(PaymentError::Rejected(
                "idempotency key already used for another payment intent".into(),
            ));
        }
        existing.into_intent()
    }

    async fn retrieve_intent(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        if !is_plausible_id(intent_id) {
            return Err(PaymentError::NotFound);
        }
        let row: Option<IntentRow> = sqlx::query_as(&format!(
            "SELECT {INTENT_COLUMNS} FROM fake_payment_intents WHERE id = $1"
        ))
        .bind(intent_id)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(PaymentError::NotFound)?.into_intent()
    }

    async fn cancel_intent(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        if let Some(cancelled) = self.transition_open(intent_id, "canceled").await? {
            return Ok(cancelled);
        }
        let current = self.retrieve_intent(intent_id).await?;
        match current.status {
            IntentStatus::Canceled => Ok(current),
            other => Err(PaymentError::Rejected(format!(
                "a {} payment intent cannot be canceled",
                other.as_str()
            ))),
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
        check_idempotency_key(idempotency_key)?;

        let mut transaction = self.pool.begin().await?;
        // Locking the intent serialises refunds of it, so the checks below
        // (same key seen before, not more than was paid) cannot race.
        let intent: Option<(String, i64)> = sqlx::query_as(
            "SELECT status, amount_cents FROM fake_payment_intents WHERE id = $1 FOR UPDATE",
        )
        .bind(intent_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let (status, paid_cents) = intent.ok_or(PaymentError::NotFound)?;

        let earlier: Option<RefundRow> = sqlx::query_as(
            "SELECT id, payment_intent_id, amount_cents, status FROM fake_refunds \
             WHERE idempotency_key = $1",
        )
        .bind(idempotency_key)
        .fetch_optional(&mut *transaction)
        .await?;
        if let Some(earlier) = earlier {
            if earlier.payment_intent_id != intent_id || earlier.amount_cents != amount_cents {
                return Err(PaymentError::Rejected(
                    "idempotency key already used for another refund".into(),
                ));
            }
            return Ok(earlier.into_refund());
        }

        if status != "succeeded" {
            return Err(PaymentError::Rejected(format!(
                "a {status} payment intent has nothing to refund"
            )));
        }
        let refunded_cents: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(amount_cents), 0)::bigint FROM fake_refunds \
             WHERE payment_intent_id = $1 AND status <> 'failed'",
        )
        .bind(intent_id)
        .fetch_one(&mut *transaction)
        .await?;
        if refunded_cents + amount_cents > paid_cents {
            return Err(PaymentError::Rejected(format!(
                "refunding {amount_cents} would exceed the {} left of {paid_cents}",
                paid_cents - refunded_cents
            )));
        }

        let refund: RefundRow = sqlx::query_as(
            "INSERT INTO fake_refunds \
                 (id, payment_intent_id, amount_cents, status, idempotency_key) \
             VALUES ($1, $2, $3, 'succeeded', $4) \
             RETURNING id, payment_intent_id, amount_cents, status",
        )
        .bind(format!("re_fake_{}", random_token()))
        .bind(intent_id)
        .bind(amount_cents)
        .bind(idempotency_key)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(refund.into_refund())
    }

    /// The fake has no webhooks: `settle` hands its event straight to the
    /// caller, so anything arriving at the Stripe webhook route is refused.
    fn parse_webhook(
        &self,
        _raw_body: &[u8],
        _signature_header: Option<&str>,
    ) -> Result<WebhookEvent, PaymentError> {
        Err(PaymentError::BadSignature)
    }

    fn as_fake(&self) -> Option<&FakeProvider> {
        Some(self)
    }
}
