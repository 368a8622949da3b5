//! What every request handler can reach.

use std::sync::Arc;

use projections::ProjectionSet;
use sqlx::PgPool;

use crate::auth::tokens::AccessTokens;
use crate::config::Settings;
use domain::cart::Cart;
use domain::catalog::{Category, Product};
use domain::inventory::InventoryItem;
use domain::order::Order;

use crate::event_store::{CommandBus, EventStore};
use crate::payments::PaymentProvider;
use crate::rate_limit::login_guard::LoginGuard;
use crate::rate_limit::RateLimits;
use crate::read_models::Caches;
use crate::redis_cache::Redis;

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
    pub orders: CommandBus<Order>,
    pub carts: CommandBus<Cart>,
    pub products: CommandBus<Product>,
    pub categories: CommandBus<Category>,
    /// Versioned Redis caches of product detail and stock.
    pub caches: Caches,
    pub payments: Arc<dyn PaymentProvider>,
}
