//! What every request handler can reach.

use std::sync::Arc;
use std::time::Duration;

use projections::{GlobalPosition, ProjectionSet};
use sqlx::PgPool;

use crate::auth::tokens::AccessTokens;
use crate::config::Settings;
use domain::cart::Cart;
use domain::catalog::{Category, Product};
use domain::inventory::InventoryItem;
use domain::order::Order;

use crate::event_store::{CommandBus, EventStore};
use crate::http::idempotency::ledger::KeyLedger;
use crate::http::problem::ApiError;
use crate::payments::PaymentProvider;
use crate::rate_limit::login_guard::LoginGuard;
use crate::rate_limit::RateLimits;
use crate::read_models::Caches;
use crate::redis_cache::Redis;
use crate::shop::checkout_commit::CheckoutCommitter;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub redis: Redis,
    pub store: EventStore,
    pub projections: ProjectionSet,
    pub tokens: AccessTokens,
    pub rate_limits: RateLimits,
    pub login_guard: LoginGuard,
    /// Stock of each variant; the flash-sale hot path.
    pub inventory: CommandBus<InventoryItem>,
    /// Checkouts, decided and stored many to a transaction.
    pub checkouts: CheckoutCommitter,
    /// Idempotency key claims and records, many to a statement.
    pub idempotency_keys: KeyLedger,
    pub orders: CommandBus<Order>,
    pub carts: CommandBus<Cart>,
    pub products: CommandBus<Product>,
    pub categories: CommandBus<Category>,
    /// Versioned Redis caches of product detail and stock.
    pub caches: Caches,
    pub payments: Arc<dyn PaymentProvider>,
}

impl AppState {
    /// This state for one HTTP worker: the same everything, but cache reads
    /// on a Redis connection of the worker's own, made lazily on its first
    /// use, so its replies wake the worker's thread instead of going
    /// through a connection task on another one.
    pub fn for_worker(&self) -> Self {
        let mut state = self.clone();
        match Redis::connect_lazily(&self.settings) {
            Ok(redis) => state.caches = self.caches.on_connection(redis.connection()),
            Err(error) => {
                tracing::warn!(%error, "worker keeps the shared Redis connection");
            }
        }
        state
    }
}

/// How long a handler waits for a read model to show its own write.
pub const READ_YOUR_WRITES_TIMEOUT: Duration = Duration::from_secs(5);

impl AppState {
    /// Waits until `projection` has applied a write stored at `position`
    /// (`None`: the command stored nothing), so the handler's next read of
    /// that read model shows it.
    pub async fn read_your_write(
        &self,
        projection: &'static str,
        position: Option<GlobalPosition>,
    ) -> Result<(), ApiError> {
        let Some(position) = position else {
            return Ok(());
        };
        match self
            .projections
            .wait_for(projection, position, READ_YOUR_WRITES_TIMEOUT)
            .await
        {
            Ok(()) => Ok(()),
            // The write is stored; only its read model is behind. A retry
            // (under the same idempotency key, where there is one) finds
            // the write done and waits again.
            Err(error @ projections::WaitError::TimedOut { .. }) => {
                tracing::warn!(%error, "a read model is behind its write");
                Err(ApiError::Unavailable(
                    "the change is saved but not yet readable; try again shortly".into(),
                ))
            }
            Err(error) => Err(ApiError::internal(error)),
        }
    }

    /// Waits until `projection` has applied every event stored so far for
    /// one aggregate (written here or by another instance); returns whether
    /// the aggregate has any events at all.
    pub async fn read_aggregate_writes(
        &self,
        projection: &'static str,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<bool, ApiError> {
        let last = self
            .store
            .last_position(aggregate_type, aggregate_id)
            .await?;
        self.read_your_write(projection, last).await?;
        Ok(last.is_some())
    }
}
