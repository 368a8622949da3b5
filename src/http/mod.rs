//! The HTTP layer: routing, extractors, errors and middleware.

pub mod access;
pub mod admin;
pub mod client_ip;
pub mod extract;
pub mod idempotency;
pub mod middleware;
pub mod openapi;
pub mod ops;
pub mod paging;
pub mod problem;
pub mod security;
pub mod timestamp;

use actix_web::{web, HttpRequest, HttpResponse};

/// Registers every route of the API.
///
/// actix tries routes in the order they were registered until one matches,
/// and passing a route with a parameter costs a regular expression's
/// search (a route without one, a string comparison). So each module whose
/// routes take parameters registers them as one scope under their common
/// prefix, which a request for another module's route passes with one
/// comparison (a cart read passed seven such searches, a checkout nine),
/// and the documentation, whose `/docs/{..}` matches anything under it,
/// comes last.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .service(ops::healthz)
        .service(ops::readyz)
        .service(ops::prometheus_metrics)
        .configure(crate::auth::routes::configure)
        .configure(crate::catalog::configure)
        .configure(crate::shop::configure)
        .configure(crate::audit::configure)
        .configure(crate::sales::configure)
        .configure(openapi::configure);
}

/// Requests no route took: 405 when the path is known (route macros guard
/// the method at the resource, so a wrong method lands here too), else 404.
/// The problem middleware fills in the body.
pub async fn not_found(request: HttpRequest) -> HttpResponse {
    if request.match_pattern().is_some() {
        HttpResponse::MethodNotAllowed().finish()
    } else {
        HttpResponse::NotFound().finish()
    }
}
