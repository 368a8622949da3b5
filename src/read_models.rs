//! The projections this server runs, wired to what they need.

use std::sync::Arc;
use std::time::Duration;

use projections::cache::VersionedCache;
use projections::Projection;
use sqlx::PgPool;

use crate::redis_cache::Redis;

/// How long a cached product or category lives without being refreshed.
const CATALOG_TTL: Duration = Duration::from_secs(3600);
/// Stock moves all the time; a missed refresh must not linger.
const STOCK_TTL: Duration = Duration::from_secs(300);
/// Carts are small and rewritten on every change.
const CART_TTL: Duration = Duration::from_secs(3600);

/// The read models' Redis caches, under the deployment's key prefix.
#[derive(Clone)]
pub struct Caches {
    /// Product detail (without stock), slug to product id, category refs.
    pub catalog: VersionedCache,
    /// Stock per variant.
    pub stock: VersionedCache,
    /// Each cart's lines (variant, product, quantity), without prices or
    /// stock, which are laid over from the catalog caches when read.
    pub carts: VersionedCache,
}

impl Caches {
    pub fn new(redis: &Redis) -> Self {
        Self::from_cache(VersionedCache::new(redis.connection(), redis.key("")))
    }

    /// These caches on another connection.
    pub fn on_connection(&self, connection: Option<redis::aio::ConnectionManager>) -> Self {
        Self {
            catalog: self.catalog.clone().on_connection(connection.clone()),
            stock: self.stock.clone().on_connection(connection.clone()),
            carts: self.carts.clone().on_connection(connection),
        }
    }

    /// Both caches on one connection and prefix, each with its own expiry.
    pub fn from_cache(cache: VersionedCache) -> Self {
        Self {
            catalog: cache.clone().with_ttl(CATALOG_TTL),
            stock: cache.clone().with_ttl(STOCK_TTL),
            carts: cache.with_ttl(CART_TTL),
        }
    }
}

/// Every read model, in no particular order (each keeps its own checkpoint).
pub fn all(pool: &PgPool, caches: &Caches) -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(projections::orders::OrdersProjection),
        Arc::new(projections::carts::CartsProjection::new(
            caches.carts.clone(),
        )),
        Arc::new(projections::catalog::CatalogProjection::new(
            caches.catalog.clone(),
        )),
        Arc::new(projections::stock::StockProjection::new(
            pool.clone(),
            caches.stock.clone(),
        )),
        Arc::new(projections::sales::SalesProjection),
    ]
}
