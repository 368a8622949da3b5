//! Who may call which route: one table, enforced by one middleware.
//!
//! Every route the server registers must appear in `ROUTES`; a matched route
//! that is missing from it is refused, so a new route cannot forget its guard.
//! The route-table test walks this table against a running server.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};

use super::problem::ApiError;
use crate::auth::tokens::TokenError;
use crate::auth::{AuthUser, Role};
use crate::state::AppState;

/// The cookie that carries the access token for browsers.
pub const ACCESS_TOKEN_COOKIE: &str = "access_token";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// Anyone; the handler checks a credential of its own (a refresh token,
    /// a webhook signature) instead of an access token.
    OwnCredential,
    /// Any signed-in user.
    Private,
    /// Signed-in users with the `admin` role.
    Admin,
}

#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

const fn route(method: &'static str, path: &'static str, access: Access) -> RouteSpec {
    RouteSpec {
        method,
        path,
        access,
    }
}

/// Every route, with the access it needs. Paths are actix match patterns.
#[rustfmt::skip]
pub const ROUTES: &[RouteSpec] = &[
    route("GET", "/healthz", Access::Public),
    route("GET", "/readyz", Access::Public),
    route("GET", "/metrics", Access::Public),
    route("GET", "/api-docs/openapi.json", Access::Public),
    route("GET", "/docs", Access::Public),
    route("GET", "/docs/{_:.*}", Access::Public),
    // The dashboard page and its files; the figures it shows come from
    // admin routes below.
    route("GET", "/admin", Access::Public),
    route("GET", "/admin/{asset:.*}", Access::Public),
    route("POST", "/api/v1/auth/register", Access::Public),
    route("POST", "/api/v1/auth/login", Access::Public),
    route("POST", "/api/v1/auth/logout", Access::Private),
    route("POST", "/api/v1/auth/refresh-token", Access::OwnCredential),
    route("POST", "/api/v1/auth/change-password", Access::Private),
    route("GET", "/api/v1/auth/me", Access::Private),
    route("GET", "/api/v1/products/get-products", Access::Public),
    route("GET", "/api/v1/products/get-product/{slug}", Access::Public),
    route("POST", "/api/v1/products/create-product", Access::Admin),
    route("PUT", "/api/v1/products/update-product/{product_id}", Access::Admin),
    route("DELETE", "/api/v1/products/delete-product/{product_id}", Access::Admin),
    route("GET", "/api/v1/categories/tree", Access::Public),
    route("GET", "/api/v1/categories/slug/{slug}", Access::Public),
    route("POST", "/api/v1/categories/create-category", Access::Admin),
    route("PUT", "/api/v1/categories/update-category/{id}", Access::Admin),
    route("POST", "/api/v1/stock/add-stock", Access::Admin),
    route("POST", "/api/v1/stock/update-stock", Access::Admin),
    route("POST", "/api/v1/stock/sync-reserved-stock", Access::Admin),
    route("GET", "/api/v1/stock/get-stock-level/{variant_id}", Access::Public),
    route("POST", "/api/v1/cart/add-cart", Access::Private),
    route("GET", "/api/v1/cart/get-cart", Access::Private),
    route("PUT", "/api/v1/cart/update-item/{variant_id}", Access::Private),
    route("DELETE", "/api/v1/cart/remove-item/{variant_id}", Access::Private),
    route("DELETE", "/api/v1/cart/clear", Access::Private),
    route("POST", "/api/v1/checkout/", Access::Private),
    route("POST", "/api/v1/checkout/create-payment-intent", Access::Private),
    route("POST", "/api/v1/checkout/confirm-payment", Access::Private),
    route("POST", "/api/v1/webhooks/stripe", Access::OwnCredential),
    route("POST", "/api/v1/fake-payments/{payment_intent_id}", Access::Private),
    route("GET", "/api/v1/orders/my-orders", Access::Private),
    route("GET", "/api/v1/orders/my-orders/{order_id}", Access::Private),
    route("GET", "/api/v1/sales/summary", Access::Admin),
    route("GET", "/api/v1/sales/timeseries", Access::Admin),
    route("GET", "/api/v1/sales/top-products", Access::Admin),
    route("GET", "/api/v1/audit/events", Access::Admin),
    route("GET", "/api/v1/audit/inventory/{variant_id}", Access::Admin),
    route("GET", "/api/v1/audit/orders/{order_id}", Access::Admin),
];

fn access_for(method: &Method, pattern: &str) -> Option<Access> {
    ROUTES
        .iter()
        .find(|spec| spec.path == pattern && spec.method == method.as_str())
        .map(|spec| spec.access)
}

/// The access token from `Authorization: Bearer` or, failing that, the cookie.
fn presented_token(request: &ServiceRequest) -> Option<String> {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    bearer.or_else(|| {
        // Parsing cookies stores them in the request, even none: most
        // anonymous requests carry no cookie at all, and skip that.
        if !request.headers().contains_key(header::COOKIE) {
            return None;
        }
        request
            .cookie(ACCESS_TOKEN_COOKIE)
            .map(|c| c.value().to_owned())
    })
}

pub async fn enforce_access(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if let Err(refusal) = admit(&request) {
        // A response, not an error, so that the middlewares outside this one
        // (security headers, the request id, metrics) see it as any answer.
        return Ok(request.error_response(refusal).map_into_right_body());
    }
    next.call(request)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// Whether the route lets the caller in; a signed-in caller is attached to
/// the request for the handler.
fn admit(request: &ServiceRequest) -> Result<(), ApiError> {
    let Some(pattern) = super::middleware::route_pattern(request) else {
        // Unknown path: routing answers 404.
        return Ok(());
    };
    let access = match access_for(request.method(), &pattern) {
        Some(access) => access,
        // A known path with a method it does not serve: routing answers 405.
        None if ROUTES.iter().any(|spec| spec.path == &*pattern) => return Ok(()),
        None => {
            tracing::error!(%pattern, method = %request.method(), "route missing from the access table");
            return Err(ApiError::Forbidden);
        }
    };
    match access {
        Access::Private | Access::Admin => {
            let user = authenticate(request)?;
            if access == Access::Admin && user.role != Role::Admin {
                return Err(ApiError::Forbidden);
            }
            request.extensions_mut().insert(user);
        }
        // Public routes may show a signed-in caller more (an admin sees more
        // stock detail); a bad token there is ignored, not refused, and a
        // caller who shows none costs no refusal built and thrown away.
        Access::Public => {
            let user = presented_token(request).and_then(|token| user_of(request, &token).ok());
            if let Some(user) = user {
                request.extensions_mut().insert(user);
            }
        }
        Access::OwnCredential => {}
    }
    Ok(())
}

fn authenticate(request: &ServiceRequest) -> Result<AuthUser, ApiError> {
    let token =
        presented_token(request).ok_or_else(|| ApiError::Unauthorized("sign in first".into()))?;
    user_of(request, &token)
}

/// The user an access token names, if it is valid now.
fn user_of(request: &ServiceRequest, token: &str) -> Result<AuthUser, ApiError> {
    let state = request
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("application state missing")))?;
    let claims = state.tokens.verify(token).map_err(|error| match error {
        TokenError::Expired => ApiError::Unauthorized("the access token has expired".into()),
        _ => ApiError::Unauthorized("the access token is not valid".into()),
    })?;
    Ok(AuthUser {
        id: claims.sub,
        role: claims.role,
        session_id: claims.sid,
    })
}
