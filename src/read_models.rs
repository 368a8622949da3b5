//! The projections this server runs, wired to what they need.

use std::sync::Arc;

use projections::Projection;

/// Every read model, in no particular order (each keeps its own checkpoint).
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(projections::orders::OrdersProjection),
        Arc::new(projections::carts::CartsProjection),
    ]
}
