//! Ends holds whose deadline has passed: the order is cancelled as expired
//! and its stock goes back, through the same commands as everything else;
//! a paid order's units are committed if its payment's commit did not
//! happen.
//!
//! Deadlines live in Postgres. Any number of instances run this; a deadline
//! is leased (`FOR UPDATE SKIP LOCKED` picks it, a lease marks it taken) so
//! one instance handles it, and if that instance dies mid-way the lease runs
//! out and another finishes the job; the commands are idempotent, so doing a
//! step twice changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::inventory::ReleaseReason;
use domain::order::{CancelReason, OrderCommand, OrderError, OrderStatus};
use tokio::sync::watch;
use uuid::Uuid;

use crate::event_store::{CommandError, Metadata};
use crate::shop::checkout::release_variants;
use crate::state::AppState;

const BATCH: i64 = 50;
const LEASE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryOutcome {
    /// Deadlines handled (the order expired, or it had been paid already).
    pub handled: usize,
    /// Deadlines that failed and will be tried again after their lease.
    pub failed: usize,
}

/// A deadline this instance leased: the order, its variants, and the lease
/// (which names the lease in the row, so that a deadline set again while
/// the job ran survives the job's end).
type Leased = (Uuid, Vec<Uuid>, DateTime<Utc>);

/// Takes the deadlines due at `now` that no other instance holds.
async fn lease_due(state: &AppState, now: DateTime<Utc>) -> Result<Vec<Leased>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE order_deadlines SET leased_until = $1 + make_interval(secs => $2), attempts = attempts + 1 \
         WHERE order_id IN ( \
             SELECT order_id FROM order_deadlines \
             WHERE due_at <= $1 AND (leased_until IS NULL OR leased_until <= $1) \
             ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
         RETURNING order_id, variant_ids, leased_until",
    )
    .bind(now)
    .bind(LEASE.as_secs_f64())
    .bind(BATCH)
    .fetch_all(&state.pool)
    .await
}

/// One step: expire every hold that is due. Tests call this directly.
pub async fn try_expire_due(
    state: &AppState,
    now: DateTime<Utc>,
) -> Result<ExpiryOutcome, sqlx::Error> {
    let due = lease_due(state, now).await?;
    let mut outcome = ExpiryOutcome::default();
    let run = format!("scheduler:{}", Uuid::now_v7());
    for (order_id, variant_ids, lease) in due {
        // A statement that fails below leaves its deadline leased: it runs
        // again (idempotently) once the lease is over, and the rest of the
        // batch goes on now.
        match expire(state, order_id, &variant_ids, &run, now).await {
            Ok(()) => {
                // A late payment that took the units again meanwhile set a
                // new deadline (and cleared the lease): that one stays.
                let deleted = sqlx::query(
                    "DELETE FROM order_deadlines WHERE order_id = $1 AND leased_until = $2",
                )
                .bind(order_id)
                .bind(lease)
                .execute(&state.pool)
                .await;
                if let Err(error) = deleted {
                    tracing::warn!(%order_id, %error, "could not delete a handled deadline");
                }
                outcome.handled += 1;
            }
            Err(error) => {
                tracing::error!(%order_id, error, "could not expire a hold; will retry");
                let noted =
                    sqlx::query("UPDATE order_deadlines SET last_error = $2 WHERE order_id = $1")
                        .bind(order_id)
                        .bind(&error)
                        .execute(&state.pool)
                        .await;
                if let Err(error) = noted {
                    tracing::warn!(%order_id, %error, "could not note a deadline's failure");
                }
                outcome.failed += 1;
            }
        }
    }
    Ok(outcome)
}

async fn expire(
    state: &AppState,
    order_id: Uuid,
    variant_ids: &[Uuid],
    run: &str,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let metadata = Metadata::system(run);
    let cancel = OrderCommand::Cancel {
        reason: CancelReason::Expired,
        cancelled_at: now,
    };
    let release = match state
        .orders
        .execute(&order_id.to_string(), cancel, metadata.clone())
        .await
    {
        Ok(_) => true,
        // Never placed: the checkout died after reserving; give the stock back.
        Err(CommandError::Rejected(OrderError::NotPlaced)) => true,
        // Paid before the deadline: its payment committed the units, unless
        // that commit failed and nobody retried; settle them now (a no-op
        // for units already committed) so that no hold outlives its order.
        Err(CommandError::Rejected(OrderError::InvalidTransition {
            from: OrderStatus::Paid,
            ..
        })) => {
            crate::shop::payment::settle_paid_stock(state, order_id, &metadata)
                .await
                .map_err(|error| error.to_string())?;
            false
        }
        // Refunded before the deadline: the hold ended with its payment.
        Err(CommandError::Rejected(OrderError::InvalidTransition { .. })) => false,
        Err(error) => return Err(error.to_string()),
    };
    if release {
        release_variants(
            state,
            order_id,
            variant_ids,
            ReleaseReason::Expired,
            &metadata,
        )
        .await?;
        crate::shop::payment::cancel_open_intent(state, order_id).await;
    }
    Ok(())
}

/// Runs the step on a timer until shutdown, also sweeping old idempotency keys.
pub async fn run(state: actix_web::web::Data<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut sweeps = tokio::time::interval(Duration::from_secs(3600));
    while !*shutdown.borrow() {
        match try_expire_due(&state, Utc::now()).await {
            Ok(outcome) if outcome.handled > 0 => {
                metrics::counter!("holds_expired_total").increment(outcome.handled as u64);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "expiry step failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = sweeps.tick() => {
                if let Err(error) = crate::http::idempotency::sweep_expired(&state.pool).await {
                    tracing::warn!(%error, "could not sweep idempotency keys");
                }
            }
            _ = shutdown.changed() => {}
        }
    }
}
