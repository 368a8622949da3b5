//! An order: the lines a customer checked out, their price, and the life of
//! its payment.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::values::{Currency, Money, Name, Quantity, Sku};
use crate::Decider;

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed, stock held, no payment started yet.
    Created,
    /// A payment intent is attached; waiting for the provider.
    PaymentPending,
    /// Paid; the held stock is sold.
    Paid,
    /// Ended without payment; the held stock went back.
    Cancelled,
    /// A payment was taken and returned.
    Refunded,
}

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The hold on its stock reached its deadline unpaid.
    Expired,
    /// The payment provider reported the payment failed.
    PaymentFailed,
    /// The customer cancelled it.
    Customer,
    /// The checkout that created it could not finish.
    CheckoutFailed,
}

/// The command an order was asked to carry out, named in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderAction {
    Place,
    StartPayment,
    ConfirmPayment,
    HonourLatePayment,
    Cancel,
    Refund,
}

/// A line of an order about to be placed, priced by the caller from the
/// catalog at checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrderLine {
    pub variant_id: Uuid,
    pub sku: Sku,
    pub product_id: Uuid,
    pub product_name: Name,
    pub unit_price: Money,
    pub quantity: Quantity,
}

/// A line of a placed order, with the price it was sold at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub variant_id: Uuid,
    pub sku: Sku,
    pub product_id: Uuid,
    pub product_name: Name,
    pub unit_price_cents: i64,
    pub quantity: u32,
    pub line_total_cents: i64,
}

/// An amount as reported by a payment provider, not yet checked against
/// the order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Amount {
    pub amount_cents: i64,
    pub currency: Currency,
}

/// A customer's order (aggregate id = the order's id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    status: Option<OrderStatus>,
    order_id: Uuid,
    user_id: Uuid,
    lines: Vec<OrderLine>,
    currency: Option<Currency>,
    total_cents: i64,
    placed_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    payment_intent_id: Option<String>,
    payment_provider: Option<String>,
    paid_amount_cents: Option<i64>,
    paid_at: Option<DateTime<Utc>>,
    late_payment: bool,
    cancel_reason: Option<CancelReason>,
    refund_id: Option<String>,
    /// Payments whose refund was decided: none of them may be kept any more.
    refunds_decided: BTreeSet<String>,
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    /// Record a checkout: the lines, their prices and the hold's deadline.
    Place {
        order_id: Uuid,
        user_id: Uuid,
        lines: Vec<NewOrderLine>,
        currency: Currency,
        placed_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    /// A payment intent was created with the provider for this order.
    StartPayment {
        payment_intent_id: String,
        provider: String,
        started_at: DateTime<Utc>,
    },
    /// The provider says the payment succeeded (verified by the caller).
    ConfirmPayment {
        payment_intent_id: String,
        amount_cents: i64,
        currency: Currency,
        paid_at: DateTime<Utc>,
    },
    /// Accept a payment that arrived after the order was cancelled by expiry
    /// or a failed payment; the caller has already reserved the stock again.
    HonourLatePayment {
        payment_intent_id: String,
        amount_cents: i64,
        currency: Currency,
        paid_at: DateTime<Utc>,
    },
    /// End the order unpaid.
    Cancel {
        reason: CancelReason,
        cancelled_at: DateTime<Utc>,
    },
    /// Give a payment back: decided before the provider is asked, so that
    /// a retry after a refund the provider made but we did not record
    /// finishes the refund instead of keeping the payment.
    DecideRefund {
        payment_intent_id: String,
        amount_cents: i64,
        decided_at: DateTime<Utc>,
    },
    /// A payment for the order was returned to the customer.
    Refund {
        payment_intent_id: String,
        refund_id: String,
        amount_cents: i64,
        refunded_at: DateTime<Utc>,
    },
}

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// A checkout created the order; its stock is held until `expires_at`.
    OrderPlaced {
        order_id: Uuid,
        user_id: Uuid,
        lines: Vec<OrderLine>,
        currency: Currency,
        total_cents: i64,
        placed_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    /// A payment intent was attached; the order waits for the provider.
    PaymentStarted {
        payment_intent_id: String,
        provider: String,
        started_at: DateTime<Utc>,
    },
    /// The order was paid; `late` when after it had been cancelled.
    OrderPaid {
        payment_intent_id: String,
        amount_cents: i64,
        currency: Currency,
        late: bool,
        paid_at: DateTime<Utc>,
    },
    /// The order ended unpaid.
    OrderCancelled {
        reason: CancelReason,
        cancelled_at: DateTime<Utc>,
    },
    /// A payment is to be given back; the provider is asked next, and
    /// `OrderRefunded` follows once it has. The payment can no longer be
    /// kept.
    RefundDecided {
        payment_intent_id: String,
        amount_cents: i64,
        currency: Currency,
        decided_at: DateTime<Utc>,
    },
    /// A payment for the order was returned.
    OrderRefunded {
        payment_intent_id: String,
        refund_id: String,
        amount_cents: i64,
        currency: Currency,
        refunded_at: DateTime<Utc>,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::PaymentStarted { .. } => "PaymentStarted",
            Self::OrderPaid { .. } => "OrderPaid",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::RefundDecided { .. } => "RefundDecided",
            Self::OrderRefunded { .. } => "OrderRefunded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why an order command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OrderError {
    /// No order has been placed under this id.
    #[error("the order has not been placed")]
    NotPlaced,
    /// Another order (other user) already uses this id.
    #[error("order {order_id} was already placed")]
    AlreadyPlaced { order_id: Uuid },
    /// An order needs at least one line.
    #[error("an order needs at least one line")]
    NoLines,
    /// The same variant appears on two lines.
    #[error("variant {variant_id} appears on more than one line")]
    DuplicateLine { variant_id: Uuid },
    /// A line is priced in another currency than the order.
    #[error("line for variant {variant_id} is in {got}, the order in {expected}")]
    CurrencyMismatch {
        variant_id: Uuid,
        expected: Currency,
        got: Currency,
    },
    /// The order's total does not fit in the amount type.
    #[error("the order total is out of range")]
    TotalOverflow,
    /// The hold's deadline is not after the placement.
    #[error("the order would expire at {expires_at}, not after it is placed at {placed_at}")]
    ExpiresBeforePlaced {
        placed_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    /// The command is not allowed in the order's current status.
    #[error("cannot {action:?} an order that is {from:?}")]
    InvalidTransition {
        from: OrderStatus,
        action: OrderAction,
    },
    /// The payment intent is not the one attached to the order.
    #[error("payment intent {got} is not the order's ({expected})")]
    PaymentIntentMismatch { expected: String, got: String },
    /// The amount paid is not the order's total in the order's currency.
    #[error("payment of {got:?} does not match the order's {expected:?}")]
    PaymentMismatch { expected: Amount, got: Amount },
    /// The order can no longer be paid the normal way; the caller chooses
    /// between `HonourLatePayment` and `Refund`.
    #[error("an order that is {status:?} cannot be paid")]
    NotPayable { status: OrderStatus },
    /// A late payment can only be honoured on an order that expired or whose
    /// payment failed.
    #[error("a late payment cannot be honoured on an order cancelled for {reason:?}")]
    NotHonourable { reason: Option<CancelReason> },
    /// A refund must be positive and at most what was paid.
    #[error("cannot refund {amount_cents}: at most {max_cents}")]
    InvalidRefundAmount { amount_cents: i64, max_cents: i64 },
    /// The payment is being given back, so it cannot be kept.
    #[error("payment {payment_intent_id} is being refunded")]
    RefundUnderway { payment_intent_id: String },
}

impl Order {
    /// The order's status, `None` before it is placed.
    pub fn status(&self) -> Option<OrderStatus> {
        self.status
    }

    /// The order's id (nil before it is placed).
    pub fn order_id(&self) -> Uuid {
        self.order_id
    }

    /// The customer who placed the order (nil before it is placed).
    pub fn user_id(&self) -> Uuid {
        self.user_id
    }

    /// The order's lines.
    pub fn lines(&self) -> &[OrderLine] {
        &self.lines
    }

    /// The order's currency, once placed.
    pub fn currency(&self) -> Option<&Currency> {
        self.currency.as_ref()
    }

    /// The sum of the line totals, in minor units.
    pub fn total_cents(&self) -> i64 {
        self.total_cents
    }

    /// When the order was placed.
    pub fn placed_at(&self) -> Option<DateTime<Utc>> {
        self.placed_at
    }

    /// When the hold on the order's stock ends if it is still unpaid.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.expires_at
    }

    /// When the order last changed.
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        self.updated_at
    }

    /// The payment intent attached to the order, if any.
    pub fn payment_intent_id(&self) -> Option<&str> {
        self.payment_intent_id.as_deref()
    }

    /// The payment provider that made the attached intent, if any.
    pub fn payment_provider(&self) -> Option<&str> {
        self.payment_provider.as_deref()
    }

    /// The amount paid, once paid.
    pub fn paid_amount_cents(&self) -> Option<i64> {
        self.paid_amount_cents
    }

    /// When the order was paid.
    pub fn paid_at(&self) -> Option<DateTime<Utc>> {
        self.paid_at
    }

    /// Whether the payment was honoured after the order had been cancelled.
    pub fn is_late_payment(&self) -> bool {
        self.late_payment
    }

    /// Why the order was cancelled, while it is cancelled (or refunded after
    /// a cancellation).
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.cancel_reason
    }

    /// The provider's id of the refund, once refunded.
    pub fn refund_id(&self) -> Option<&str> {
        self.refund_id.as_deref()
    }

    /// Whether giving back the payment `payment_intent_id` was decided
    /// (whether or not the provider has made the refund yet).
    pub fn refund_decided(&self, payment_intent_id: &str) -> bool {
        self.refunds_decided.contains(payment_intent_id)
    }

    /// Refuses to keep a payment whose refund was decided.
    fn check_not_refunding(&self, payment_intent_id: &str) -> Result<(), OrderError> {
        if self.refund_decided(payment_intent_id) {
            return Err(OrderError::RefundUnderway {
                payment_intent_id: payment_intent_id.to_owned(),
            });
        }
        Ok(())
    }

    /// Checks an attached intent (if any) against the one reported.
    fn check_intent(&self, payment_intent_id: &str) -> Result<(), OrderError> {
        match &self.payment_intent_id {
            Some(attached) if attached != payment_intent_id => {
                Err(OrderError::PaymentIntentMismatch {
                    expected: attached.clone(),
                    got: payment_intent_id.to_owned(),
                })
            }
            _ => Ok(()),
        }
    }

    fn place(
        &self,
        order_id: Uuid,
        user_id: Uuid,
        lines: Vec<NewOrderLine>,
        currency: Currency,
        placed_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        if self.status.is_some() {
            return if self.order_id == order_id && self.user_id == user_id {
                Ok(vec![])
            } else {
                Err(OrderError::AlreadyPlaced {
                    order_id: self.order_id,
                })
            };
        }
        if lines.is_empty() {
            return Err(OrderError::NoLines);
        }
        if expires_at <= placed_at {
            return Err(OrderError::ExpiresBeforePlaced {
                placed_at,
                expires_at,
            });
        }
        let mut seen = BTreeSet::new();
        let mut total = Money::zero(currency.clone());
        let mut placed_lines = Vec::with_capacity(lines.len());
        for line in lines {
            if !seen.insert(line.variant_id) {
                return Err(OrderError::DuplicateLine {
                    variant_id: line.variant_id,
                });
            }
            if line.unit_price.currency() != &currency {
                return Err(OrderError::CurrencyMismatch {
                    variant_id: line.variant_id,
                    expected: currency,
                    got: line.unit_price.currency().clone(),
                });
            }
            let line_total = line
                .unit_price
                .checked_mul(line.quantity)
                .map_err(|_| OrderError::TotalOverflow)?;
            total = total
                .checked_add(&line_total)
                .map_err(|_| OrderError::TotalOverflow)?;
            placed_lines.push(OrderLine {
                variant_id: line.variant_id,
                sku: line.sku,
                product_id: line.product_id,
                product_name: line.product_name,
                unit_price_cents: line.unit_price.amount_cents(),
                quantity: line.quantity.get(),
                line_total_cents: line_total.amount_cents(),
            });
        }
        Ok(vec![OrderEvent::OrderPlaced {
            order_id,
            user_id,
            lines: placed_lines,
            currency,
            total_cents: total.amount_cents(),
            placed_at,
            expires_at,
        }])
    }
}

impl Order {
    /// The status and currency of a placed order; refuses an unplaced one.
    fn placed(&self) -> Result<(OrderStatus, &Currency), OrderError> {
        // Once placed, status and currency are always both set.
        match (self.status, self.currency.as_ref()) {
            (Some(status), Some(currency)) => Ok((status, currency)),
            _ => Err(OrderError::NotPlaced),
        }
    }

    /// Checks a reported payment against the order's total and currency.
    fn check_amount(&self, currency: &Currency, got: Amount) -> Result<Amount, OrderError> {
        let expected = Amount {
            amount_cents: self.total_cents,
            currency: currency.clone(),
        };
        if got == expected {
            Ok(got)
        } else {
            Err(OrderError::PaymentMismatch { expected, got })
        }
    }

    fn start_payment(
        &self,
        payment_intent_id: String,
        provider: String,
        started_at: DateTime<Utc>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let (status, _) = self.placed()?;
        match status {
            OrderStatus::Created => Ok(vec![OrderEvent::PaymentStarted {
                payment_intent_id,
                provider,
                started_at,
            }]),
            OrderStatus::PaymentPending => {
                self.check_intent(&payment_intent_id)?;
                Ok(vec![])
            }
            OrderStatus::Paid | OrderStatus::Cancelled | OrderStatus::Refunded => {
                Err(OrderError::InvalidTransition {
                    from: status,
                    action: OrderAction::StartPayment,
                })
            }
        }
    }

    fn confirm_payment(
        &self,
        payment_intent_id: String,
        got: Amount,
        paid_at: DateTime<Utc>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let (status, currency) = self.placed()?;
        self.check_not_refunding(&payment_intent_id)?;
        match status {
            OrderStatus::Created | OrderStatus::PaymentPending => {
                self.check_intent(&payment_intent_id)?;
                let paid = self.check_amount(currency, got)?;
                Ok(vec![OrderEvent::OrderPaid {
                    payment_intent_id,
                    amount_cents: paid.amount_cents,
                    currency: paid.currency,
                    late: false,
                    paid_at,
                }])
            }
            OrderStatus::Paid => {
                self.check_intent(&payment_intent_id)?;
                Ok(vec![])
            }
            OrderStatus::Cancelled | OrderStatus::Refunded => {
                Err(OrderError::NotPayable { status })
            }
        }
    }

    fn honour_late_payment(
        &self,
        payment_intent_id: String,
        got: Amount,
        paid_at: DateTime<Utc>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let (status, currency) = self.placed()?;
        self.check_not_refunding(&payment_intent_id)?;
        match status {
            OrderStatus::Cancelled => {
                if !matches!(
                    self.cancel_reason,
                    Some(CancelReason::Expired | CancelReason::PaymentFailed)
                ) {
                    return Err(OrderError::NotHonourable {
                        reason: self.cancel_reason,
                    });
                }
                self.check_intent(&payment_intent_id)?;
                let paid = self.check_amount(currency, got)?;
                Ok(vec![OrderEvent::OrderPaid {
                    payment_intent_id,
                    amount_cents: paid.amount_cents,
                    currency: paid.currency,
                    late: true,
                    paid_at,
                }])
            }
            OrderStatus::Paid => {
                self.check_intent(&payment_intent_id)?;
                Ok(vec![])
            }
            OrderStatus::Created | OrderStatus::PaymentPending | OrderStatus::Refunded => {
                Err(OrderError::InvalidTransition {
                    from: status,
                    action: OrderAction::HonourLatePayment,
                })
            }
        }
    }

    fn cancel(
        &self,
        reason: CancelReason,
        cancelled_at: DateTime<Utc>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let (status, _) = self.placed()?;
        match status {
            OrderStatus::Created | OrderStatus::PaymentPending => {
                Ok(vec![OrderEvent::OrderCancelled {
                    reason,
                    cancelled_at,
                }])
            }
            OrderStatus::Cancelled => Ok(vec![]),
            OrderStatus::Paid | OrderStatus::Refunded => Err(OrderError::InvalidTransition {
                from: status,
                action: OrderAction::Cancel,
            }),
        }
    }

    /// Whether `amount_cents` of `payment_intent_id` is still to be given
    /// back (false once the order is refunded); refuses an order that took
    /// no payment and more than was paid.
    fn refund_still_due(
        &self,
        status: OrderStatus,
        payment_intent_id: &str,
        amount_cents: i64,
    ) -> Result<bool, OrderError> {
        let max_cents = match status {
            OrderStatus::Refunded => return Ok(false),
            OrderStatus::Created | OrderStatus::PaymentPending => {
                return Err(OrderError::InvalidTransition {
                    from: status,
                    action: OrderAction::Refund,
                })
            }
            OrderStatus::Paid => {
                self.check_intent(payment_intent_id)?;
                self.paid_amount_cents.unwrap_or(self.total_cents)
            }
            // A payment that arrived after the cancellation and was not
            // honoured; its intent may be one the order never recorded.
            OrderStatus::Cancelled => self.total_cents,
        };
        if amount_cents <= 0 || amount_cents > max_cents {
            return Err(OrderError::InvalidRefundAmount {
                amount_cents,
                max_cents,
            });
        }
        Ok(true)
    }

    fn decide_refund(
        &self,
        payment_intent_id: String,
        amount_cents: i64,
        decided_at: DateTime<Utc>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let (status, currency) = self.placed()?;
        if !self.refund_still_due(status, &payment_intent_id, amount_cents)?
            || self.refund_decided(&payment_intent_id)
        {
            return Ok(vec![]);
        }
        Ok(vec![OrderEvent::RefundDecided {
            payment_intent_id,
            amount_cents,
            currency: currency.clone(),
            decided_at,
        }])
    }

    fn refund(
        &self,
        payment_intent_id: String,
        refund_id: String,
        amount_cents: i64,
        refunded_at: DateTime<Utc>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let (status, currency) = self.placed()?;
        if !self.refund_still_due(status, &payment_intent_id, amount_cents)? {
            return Ok(vec![]);
        }
        Ok(vec![OrderEvent::OrderRefunded {
            payment_intent_id,
            refund_id,
            amount_cents,
            currency: currency.clone(),
            refunded_at,
        }])
    }
}

impl Decider for Order {
    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match command {
            OrderCommand::Place {
                order_id,
                user_id,
                lines,
                currency,
                placed_at,
                expires_at,
            } => self.place(order_id, user_id, lines, currency, placed_at, expires_at),
            OrderCommand::StartPayment {
                payment_intent_id,
                provider,
                started_at,
            } => self.start_payment(payment_intent_id, provider, started_at),
            OrderCommand::ConfirmPayment {
                payment_intent_id,
                amount_cents,
                currency,
                paid_at,
            } => self.confirm_payment(
                payment_intent_id,
                Amount {
                    amount_cents,
                    currency,
                },
                paid_at,
            ),
            OrderCommand::HonourLatePayment {
                payment_intent_id,
                amount_cents,
                currency,
                paid_at,
            } => self.honour_late_payment(
                payment_intent_id,
                Amount {
                    amount_cents,
                    currency,
                },
                paid_at,
            ),
            OrderCommand::Cancel {
                reason,
                cancelled_at,
            } => self.cancel(reason, cancelled_at),
            OrderCommand::DecideRefund {
                payment_intent_id,
                amount_cents,
                decided_at,
            } => self.decide_refund(payment_intent_id, amount_cents, decided_at),
            OrderCommand::Refund {
                payment_intent_id,
                refund_id,
                amount_cents,
                refunded_at,
            } => self.refund(payment_intent_id, refund_id, amount_cents, refunded_at),
        }
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "Order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        crate::handle_with_decider(self, command, sink).await
    }

    fn apply(&mut self, event: Self::Event) {
        use OrderEvent as E;
        match event {
            E::OrderPlaced {
                order_id,
                user_id,
                lines,
                currency,
                total_cents,
                placed_at,
                expires_at,
            } => {
                self.status = Some(OrderStatus::Created);
                self.order_id = order_id;
                self.user_id = user_id;
                self.lines = lines;
                self.currency = Some(currency);
                self.total_cents = total_cents;
                self.placed_at = Some(placed_at);
                self.expires_at = Some(expires_at);
                self.updated_at = Some(placed_at);
            }
            E::PaymentStarted {
                payment_intent_id,
                provider,
                started_at,
            } => {
                self.status = Some(OrderStatus::PaymentPending);
                self.payment_intent_id = Some(payment_intent_id);
                self.payment_provider = Some(provider);
                self.updated_at = Some(started_at);
            }
            E::OrderPaid {
                payment_intent_id,
                amount_cents,
                late,
                paid_at,
                ..
            } => {
                self.status = Some(OrderStatus::Paid);
                self.payment_intent_id = Some(payment_intent_id);
                self.paid_amount_cents = Some(amount_cents);
                self.paid_at = Some(paid_at);
                self.late_payment = late;
                self.cancel_reason = None;
                self.updated_at = Some(paid_at);
            }
            E::OrderCancelled {
                reason,
                cancelled_at,
            } => {
                self.status = Some(OrderStatus::Cancelled);
                self.cancel_reason = Some(reason);
                self.updated_at = Some(cancelled_at);
            }
            E::RefundDecided {
                payment_intent_id,
                decided_at,
                ..
            } => {
                self.refunds_decided.insert(payment_intent_id);
                self.updated_at = Some(decided_at);
            }
            E::OrderRefunded {
                refund_id,
                refunded_at,
                ..
            } => {
                self.status = Some(OrderStatus::Refunded);
                self.refund_id = Some(refund_id);
                self.updated_at = Some(refunded_at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};
    use cqrs_es::test::TestFramework;

    use super::*;

    type Orders = TestFramework<Order>;

    const ORDER: Uuid = Uuid::from_u128(0x0_1);
    const USER: Uuid = Uuid::from_u128(0xc_1);
    const SHOE: Uuid = Uuid::from_u128(0x5_1);
    const HAT: Uuid = Uuid::from_u128(0x5_2);
    const PRODUCT: Uuid = Uuid::from_u128(0xb_1);
    const INTENT: &str = "pi_1";

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap()
    }

    fn later(minutes: i64) -> DateTime<Utc> {
        now() + Duration::minutes(minutes)
    }

    fn currency(code: &str) -> Currency {
        Currency::try_from(code).unwrap()
    }

    fn usd() -> Currency {
        currency("USD")
    }

    fn new_line(variant_id: Uuid, cents: i64, code: &str, quantity: u32) -> NewOrderLine {
        NewOrderLine {
            variant_id,
            sku: Sku::try_from(format!("SKU-{}", variant_id.as_u128())).unwrap(),
            product_id: PRODUCT,
            product_name: Name::try_from("Red Shoe").unwrap(),
            unit_price: Money::new(cents, currency(code)).unwrap(),
            quantity: Quantity::new(quantity).unwrap(),
        }
    }

    fn line(variant_id: Uuid, cents: i64, quantity: u32) -> OrderLine {
        OrderLine {
            variant_id,
            sku: Sku::try_from(format!("SKU-{}", variant_id.as_u128())).unwrap(),
            product_id: PRODUCT,
            product_name: Name::try_from("Red Shoe").unwrap(),
            unit_price_cents: cents,
            quantity,
            line_total_cents: cents * i64::from(quantity),
        }
    }

    fn place(lines: Vec<NewOrderLine>) -> OrderCommand {
        OrderCommand::Place {
            order_id: ORDER,
            user_id: USER,
            lines,
            currency: usd(),
            placed_at: now(),
            expires_at: later(15),
        }
    }

    /// An order for 2 shoes at 19.99 and 1 hat at 5.00: 44.98.
    fn placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: ORDER,
            user_id: USER,
            lines: vec![line(SHOE, 1999, 2), line(HAT, 500, 1)],
            currency: usd(),
            total_cents: 4498,
            placed_at: now(),
            expires_at: later(15),
        }
    }

    fn started(intent: &str) -> OrderEvent {
        OrderEvent::PaymentStarted {
            payment_intent_id: intent.to_owned(),
            provider: "fake".to_owned(),
            started_at: later(1),
        }
    }

    fn start(intent: &str) -> OrderCommand {
        OrderCommand::StartPayment {
            payment_intent_id: intent.to_owned(),
            provider: "fake".to_owned(),
            started_at: later(1),
        }
    }

    fn paid(late: bool) -> OrderEvent {
        OrderEvent::OrderPaid {
            payment_intent_id: INTENT.to_owned(),
            amount_cents: 4498,
            currency: usd(),
            late,
            paid_at: later(2),
        }
    }

    fn confirm(intent: &str, cents: i64, code: &str) -> OrderCommand {
        OrderCommand::ConfirmPayment {
            payment_intent_id: intent.to_owned(),
            amount_cents: cents,
            currency: currency(code),
            paid_at: later(2),
        }
    }

    fn honour(intent: &str, cents: i64) -> OrderCommand {
        OrderCommand::HonourLatePayment {
            payment_intent_id: intent.to_owned(),
            amount_cents: cents,
            currency: usd(),
            paid_at: later(2),
        }
    }

    fn cancelled(reason: CancelReason) -> OrderEvent {
        OrderEvent::OrderCancelled {
            reason,
            cancelled_at: later(15),
        }
    }

    fn cancel(reason: CancelReason) -> OrderCommand {
        OrderCommand::Cancel {
            reason,
            cancelled_at: later(15),
        }
    }

    fn refunded(cents: i64) -> OrderEvent {
        OrderEvent::OrderRefunded {
            payment_intent_id: INTENT.to_owned(),
            refund_id: "re_1".to_owned(),
            amount_cents: cents,
            currency: usd(),
            refunded_at: later(20),
        }
    }

    fn refund(intent: &str, cents: i64) -> OrderCommand {
        OrderCommand::Refund {
            payment_intent_id: intent.to_owned(),
            refund_id: "re_1".to_owned(),
            amount_cents: cents,
            refunded_at: later(20),
        }
    }

    fn refund_decided(intent: &str) -> OrderEvent {
        OrderEvent::RefundDecided {
            payment_intent_id: intent.to_owned(),
            amount_cents: 4498,
            currency: usd(),
            decided_at: later(19),
        }
    }

    fn decide_refund(intent: &str, cents: i64) -> OrderCommand {
        OrderCommand::DecideRefund {
            payment_intent_id: intent.to_owned(),
            amount_cents: cents,
            decided_at: later(19),
        }
    }

    fn underway(intent: &str) -> OrderError {
        OrderError::RefundUnderway {
            payment_intent_id: intent.to_owned(),
        }
    }

    fn invalid(from: OrderStatus, action: OrderAction) -> OrderError {
        OrderError::InvalidTransition { from, action }
    }

    // Place

    #[test]
    fn placing_prices_every_line_and_the_total() {
        Orders::with(())
            .given_no_previous_events()
            .when(place(vec![
                new_line(SHOE, 1999, "USD", 2),
                new_line(HAT, 500, "usd", 1),
            ]))
            .then_expect_events(vec![placed()]);
    }

    #[test]
    fn placing_the_same_order_again_emits_nothing() {
        Orders::with(())
            .given(vec![placed(), started(INTENT)])
            .when(place(vec![new_line(SHOE, 1999, "USD", 2)]))
            .then_expect_events(vec![]);
    }

    #[test]
    fn placing_over_another_users_order_is_refused() {
        Orders::with(())
            .given(vec![placed()])
            .when(OrderCommand::Place {
                order_id: ORDER,
                user_id: Uuid::from_u128(0xbad),
                lines: vec![new_line(SHOE, 1999, "USD", 2)],
                currency: usd(),
                placed_at: now(),
                expires_at: later(15),
            })
            .then_expect_error(OrderError::AlreadyPlaced { order_id: ORDER });
    }

    #[test]
    fn placing_without_lines_is_refused() {
        Orders::with(())
            .given_no_previous_events()
            .when(place(vec![]))
            .then_expect_error(OrderError::NoLines);
    }

    #[test]
    fn placing_one_variant_on_two_lines_is_refused() {
        Orders::with(())
            .given_no_previous_events()
            .when(place(vec![
                new_line(SHOE, 1999, "USD", 2),
                new_line(SHOE, 1999, "USD", 1),
            ]))
            .then_expect_error(OrderError::DuplicateLine { variant_id: SHOE });
    }

    #[test]
    fn placing_lines_in_another_currency_is_refused() {
        Orders::with(())
            .given_no_previous_events()
            .when(place(vec![
                new_line(SHOE, 1999, "USD", 2),
                new_line(HAT, 500, "EUR", 1),
            ]))
            .then_expect_error(OrderError::CurrencyMismatch {
                variant_id: HAT,
                expected: usd(),
                got: currency("EUR"),
            });
    }

    #[test]
    fn placing_an_order_whose_total_overflows_is_refused() {
        Orders::with(())
            .given_no_previous_events()
            .when(place(vec![new_line(SHOE, i64::MAX / 2, "USD", 3)]))
            .then_expect_error(OrderError::TotalOverflow);
        Orders::with(())
            .given_no_previous_events()
            .when(place(vec![
                new_line(SHOE, i64::MAX, "USD", 1),
                new_line(HAT, 1, "USD", 1),
            ]))
            .then_expect_error(OrderError::TotalOverflow);
    }

    #[test]
    fn placing_an_order_that_expires_when_placed_is_refused() {
        Orders::with(())
            .given_no_previous_events()
            .when(OrderCommand::Place {
                order_id: ORDER,
                user_id: USER,
                lines: vec![new_line(SHOE, 1999, "USD", 2)],
                currency: usd(),
                placed_at: now(),
                expires_at: now(),
            })
            .then_expect_error(OrderError::ExpiresBeforePlaced {
                placed_at: now(),
                expires_at: now(),
            });
    }

    #[test]
    fn commands_on_an_unplaced_order_are_refused() {
        for command in [
            start(INTENT),
            confirm(INTENT, 4498, "USD"),
            honour(INTENT, 4498),
            cancel(CancelReason::Customer),
            refund(INTENT, 4498),
        ] {
            Orders::with(())
                .given_no_previous_events()
                .when(command)
                .then_expect_error(OrderError::NotPlaced);
        }
    }

    // StartPayment

    #[test]
    fn starting_payment_attaches_the_intent() {
        Orders::with(())
            .given(vec![placed()])
            .when(start(INTENT))
            .then_expect_events(vec![started(INTENT)]);
    }

    #[test]
    fn starting_payment_again_with_the_same_intent_emits_nothing() {
        Orders::with(())
            .given(vec![placed(), started(INTENT)])
            .when(start(INTENT))
            .then_expect_events(vec![]);
    }

    #[test]
    fn starting_payment_with_another_intent_while_pending_is_refused() {
        Orders::with(())
            .given(vec![placed(), started(INTENT)])
            .when(start("pi_2"))
            .then_expect_error(OrderError::PaymentIntentMismatch {
                expected: INTENT.to_owned(),
                got: "pi_2".to_owned(),
            });
    }

    #[test]
    fn starting_payment_on_a_finished_order_is_refused() {
        let histories = [
            (vec![placed(), paid(false)], OrderStatus::Paid),
            (
                vec![placed(), cancelled(CancelReason::Expired)],
                OrderStatus::Cancelled,
            ),
            (
                vec![placed(), paid(false), refunded(4498)],
                OrderStatus::Refunded,
            ),
        ];
        for (history, status) in histories {
            Orders::with(())
                .given(history)
                .when(start(INTENT))
                .then_expect_error(invalid(status, OrderAction::StartPayment));
        }
    }

    // ConfirmPayment

    #[test]
    fn confirming_payment_of_a_pending_order_pays_it() {
        Orders::with(())
            .given(vec![placed(), started(INTENT)])
            .when(confirm(INTENT, 4498, "USD"))
            .then_expect_events(vec![paid(false)]);
    }

    #[test]
    fn confirming_payment_of_a_created_order_pays_it() {
        Orders::with(())
            .given(vec![placed()])
            .when(confirm(INTENT, 4498, "USD"))
            .then_expect_events(vec![paid(false)]);
    }

    #[test]
    fn confirming_payment_with_another_intent_is_refused() {
        Orders::with(())
            .given(vec![placed(), started(INTENT)])
            .when(confirm("pi_2", 4498, "USD"))
            .then_expect_error(OrderError::PaymentIntentMismatch {
                expected: INTENT.to_owned(),
                got: "pi_2".to_owned(),
            });
    }

    #[test]
    fn confirming_payment_of_another_amount_or_currency_is_refused() {
        let expected = Amount {
            amount_cents: 4498,
            currency: usd(),
        };
        for (cents, code) in [(4497, "USD"), (4498, "EUR")] {
            Orders::with(())
                .given(vec![placed(), started(INTENT)])
                .when(confirm(INTENT, cents, code))
                .then_expect_error(OrderError::PaymentMismatch {
                    expected: expected.clone(),
                    got: Amount {
                        amount_cents: cents,
                        currency: currency(code),
                    },
                });
        }
    }

    #[test]
    fn confirming_payment_again_with_the_same_intent_emits_nothing() {
        Orders::with(())
            .given(vec![placed(), started(INTENT), paid(false)])
            .when(confirm(INTENT, 4498, "USD"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn confirming_a_second_payment_of_a_paid_order_is_refused() {
        Orders::with(())
            .given(vec![placed(), started(INTENT), paid(false)])
            .when(confirm("pi_2", 4498, "USD"))
            .then_expect_error(OrderError::PaymentIntentMismatch {
                expected: INTENT.to_owned(),
                got: "pi_2".to_owned(),
            });
    }

    #[test]
    fn confirming_payment_of_a_cancelled_or_refunded_order_is_refused() {
        let histories = [
            (
                vec![placed(), started(INTENT), cancelled(CancelReason::Expired)],
                OrderStatus::Cancelled,
            ),
            (
                vec![placed(), paid(false), refunded(4498)],
                OrderStatus::Refunded,
            ),
        ];
        for (history, status) in histories {
            Orders::with(())
                .given(history)
                .when(confirm(INTENT, 4498, "USD"))
                .then_expect_error(OrderError::NotPayable { status });
        }
    }

    // HonourLatePayment

    #[test]
    fn honouring_a_late_payment_on_an_expired_order_pays_it_late() {
        for reason in [CancelReason::Expired, CancelReason::PaymentFailed] {
            Orders::with(())
                .given(vec![placed(), started(INTENT), cancelled(reason)])
                .when(honour(INTENT, 4498))
                .then_expect_events(vec![paid(true)]);
        }
    }

    #[test]
    fn honouring_a_late_payment_on_an_order_the_customer_cancelled_is_refused() {
        for reason in [CancelReason::Customer, CancelReason::CheckoutFailed] {
            Orders::with(())
                .given(vec![placed(), started(INTENT), cancelled(reason)])
                .when(honour(INTENT, 4498))
                .then_expect_error(OrderError::NotHonourable {
                    reason: Some(reason),
                });
        }
    }

    #[test]
    fn honouring_a_late_payment_of_another_amount_or_intent_is_refused() {
        Orders::with(())
            .given(vec![
                placed(),
                started(INTENT),
                cancelled(CancelReason::Expired),
            ])
            .when(honour(INTENT, 1))
            .then_expect_error(OrderError::PaymentMismatch {
                expected: Amount {
                    amount_cents: 4498,
                    currency: usd(),
                },
                got: Amount {
                    amount_cents: 1,
                    currency: usd(),
                },
            });
        Orders::with(())
            .given(vec![
                placed(),
                started(INTENT),
                cancelled(CancelReason::Expired),
            ])
            .when(honour("pi_2", 4498))
            .then_expect_error(OrderError::PaymentIntentMismatch {
                expected: INTENT.to_owned(),
                got: "pi_2".to_owned(),
            });
    }

    #[test]
    fn honouring_the_same_late_payment_again_emits_nothing() {
        Orders::with(())
            .given(vec![
                placed(),
                started(INTENT),
                cancelled(CancelReason::Expired),
                paid(true),
            ])
            .when(honour(INTENT, 4498))
            .then_expect_events(vec![]);
    }

    #[test]
    fn honouring_a_late_payment_on_a_live_or_refunded_order_is_refused() {
        let histories = [
            (vec![placed()], OrderStatus::Created),
            (vec![placed(), started(INTENT)], OrderStatus::PaymentPending),
            (
                vec![placed(), paid(false), refunded(4498)],
                OrderStatus::Refunded,
            ),
        ];
        for (history, status) in histories {
            Orders::with(())
                .given(history)
                .when(honour(INTENT, 4498))
                .then_expect_error(invalid(status, OrderAction::HonourLatePayment));
        }
    }

    // Cancel

    #[test]
    fn cancelling_an_unpaid_order_records_the_reason() {
        for history in [vec![placed()], vec![placed(), started(INTENT)]] {
            Orders::with(())
                .given(history)
                .when(cancel(CancelReason::Expired))
                .then_expect_events(vec![cancelled(CancelReason::Expired)]);
        }
    }

    #[test]
    fn cancelling_a_cancelled_order_emits_nothing() {
        Orders::with(())
            .given(vec![placed(), cancelled(CancelReason::Customer)])
            .when(cancel(CancelReason::Expired))
            .then_expect_events(vec![]);
    }

    #[test]
    fn cancelling_a_paid_or_refunded_order_is_refused() {
        let histories = [
            (vec![placed(), paid(false)], OrderStatus::Paid),
            (
                vec![placed(), paid(false), refunded(4498)],
                OrderStatus::Refunded,
            ),
        ];
        for (history, status) in histories {
            Orders::with(())
                .given(history)
                .when(cancel(CancelReason::Expired))
                .then_expect_error(invalid(status, OrderAction::Cancel));
        }
    }

    // Refund

    #[test]
    fn refunding_a_paid_order_records_the_refund() {
        Orders::with(())
            .given(vec![placed(), started(INTENT), paid(false)])
            .when(refund(INTENT, 4498))
            .then_expect_events(vec![refunded(4498)]);
    }

    #[test]
    fn refunding_a_payment_that_came_after_cancellation_records_the_refund() {
        Orders::with(())
            .given(vec![
                placed(),
                started(INTENT),
                cancelled(CancelReason::Expired),
            ])
            .when(refund(INTENT, 4498))
            .then_expect_events(vec![refunded(4498)]);
    }

    #[test]
    fn refunding_a_refunded_order_emits_nothing() {
        Orders::with(())
            .given(vec![placed(), paid(false), refunded(4498)])
            .when(refund(INTENT, 4498))
            .then_expect_events(vec![]);
    }

    #[test]
    fn refunding_another_intent_than_the_one_paid_is_refused() {
        Orders::with(())
            .given(vec![placed(), paid(false)])
            .when(refund("pi_2", 4498))
            .then_expect_error(OrderError::PaymentIntentMismatch {
                expected: INTENT.to_owned(),
                got: "pi_2".to_owned(),
            });
    }

    #[test]
    fn refunding_nothing_or_more_than_was_paid_is_refused() {
        for cents in [0, -1, 4499] {
            Orders::with(())
                .given(vec![placed(), paid(false)])
                .when(refund(INTENT, cents))
                .then_expect_error(OrderError::InvalidRefundAmount {
                    amount_cents: cents,
                    max_cents: 4498,
                });
        }
    }

    #[test]
    fn refunding_an_unpaid_live_order_is_refused() {
        let histories = [
            (vec![placed()], OrderStatus::Created),
            (vec![placed(), started(INTENT)], OrderStatus::PaymentPending),
        ];
        for (history, status) in histories {
            Orders::with(())
                .given(history)
                .when(refund(INTENT, 4498))
                .then_expect_error(invalid(status, OrderAction::Refund));
        }
    }

    // Deciding a refund

    #[test]
    fn a_refund_is_decided_once_for_a_paid_order_or_a_late_payment() {
        let histories = [
            vec![placed(), started(INTENT), paid(false)],
            vec![placed(), started(INTENT), cancelled(CancelReason::Expired)],
        ];
        for history in histories {
            Orders::with(())
                .given(history.clone())
                .when(decide_refund(INTENT, 4498))
                .then_expect_events(vec![refund_decided(INTENT)]);
            let mut decided = history;
            decided.push(refund_decided(INTENT));
            Orders::with(())
                .given(decided)
                .when(decide_refund(INTENT, 4498))
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn a_refund_is_decided_under_the_same_rules_as_a_refund() {
        Orders::with(())
            .given(vec![placed(), started(INTENT)])
            .when(decide_refund(INTENT, 4498))
            .then_expect_error(invalid(OrderStatus::PaymentPending, OrderAction::Refund));
        Orders::with(())
            .given(vec![placed(), paid(false)])
            .when(decide_refund(INTENT, 4499))
            .then_expect_error(OrderError::InvalidRefundAmount {
                amount_cents: 4499,
                max_cents: 4498,
            });
        Orders::with(())
            .given(vec![placed(), paid(false), refunded(4498)])
            .when(decide_refund(INTENT, 4498))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_payment_whose_refund_was_decided_can_no_longer_be_kept() {
        Orders::with(())
            .given(vec![
                placed(),
                started(INTENT),
                paid(false),
                refund_decided(INTENT),
            ])
            .when(confirm(INTENT, 4498, "USD"))
            .then_expect_error(underway(INTENT));
        Orders::with(())
            .given(vec![
                placed(),
                started(INTENT),
                cancelled(CancelReason::Expired),
                refund_decided(INTENT),
            ])
            .when(honour(INTENT, 4498))
            .then_expect_error(underway(INTENT));
        // The refund itself still goes through.
        Orders::with(())
            .given(vec![
                placed(),
                started(INTENT),
                paid(false),
                refund_decided(INTENT),
            ])
            .when(refund(INTENT, 4498))
            .then_expect_events(vec![refunded(4498)]);
    }

    #[test]
    fn another_late_payment_is_not_held_back_by_a_refund_decided_for_the_first() {
        Orders::with(())
            .given(vec![
                placed(),
                cancelled(CancelReason::Expired),
                refund_decided("pi_other"),
            ])
            .when(honour(INTENT, 4498))
            .then_expect_events(vec![OrderEvent::OrderPaid {
                payment_intent_id: INTENT.to_owned(),
                amount_cents: 4498,
                currency: usd(),
                late: true,
                paid_at: later(2),
            }]);
    }

    // State and wire format

    #[test]
    fn accessors_follow_the_order_through_a_late_payment() {
        let mut order = Order::default();
        assert_eq!(order.status(), None);
        order.apply(placed());
        assert_eq!(order.status(), Some(OrderStatus::Created));
        assert_eq!(order.total_cents(), 4498);
        assert_eq!(order.lines().len(), 2);
        assert_eq!(order.currency(), Some(&usd()));
        assert_eq!(order.expires_at(), Some(later(15)));
        order.apply(started(INTENT));
        assert_eq!(order.payment_intent_id(), Some(INTENT));
        assert_eq!(order.payment_provider(), Some("fake"));
        order.apply(cancelled(CancelReason::Expired));
        assert_eq!(order.cancel_reason(), Some(CancelReason::Expired));
        order.apply(paid(true));
        assert_eq!(order.status(), Some(OrderStatus::Paid));
        assert!(order.is_late_payment());
        assert_eq!(order.cancel_reason(), None);
        assert_eq!(order.paid_amount_cents(), Some(4498));
        assert_eq!(order.paid_at(), Some(later(2)));
        assert_eq!(order.updated_at(), Some(later(2)));
    }

    #[test]
    fn events_and_statuses_have_stable_names() {
        assert_eq!(placed().event_type(), "OrderPlaced");
        assert_eq!(paid(false).event_type(), "OrderPaid");
        assert_eq!(refunded(1).event_version(), "1");
        let json = serde_json::to_value(cancelled(CancelReason::PaymentFailed)).unwrap();
        assert_eq!(json["OrderCancelled"]["reason"], "payment_failed");
        assert_eq!(
            serde_json::to_value(OrderStatus::PaymentPending).unwrap(),
            "payment_pending"
        );
        let round: OrderEvent =
            serde_json::from_value(serde_json::to_value(placed()).unwrap()).unwrap();
        assert_eq!(round, placed());
    }
}
