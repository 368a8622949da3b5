//! The access table against a running server: every route answers
//! anonymous callers, customers and admins as its table entry says.

use commerce::http::access::{Access, RouteSpec, ROUTES};
use reqwest::{Method, Response};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{new_client, problem, spawn_app, TestApp};
use crate::users::TestUser;

/// A concrete path for a route pattern: every `{param}` becomes a random UUID.
fn concrete_path(pattern: &str) -> String {
    let mut path = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .map(|offset| start + offset)
            .unwrap_or_else(|| panic!("unclosed parameter in {pattern}"));
        path.push_str(&rest[..start]);
        path.push_str(&Uuid::new_v4().to_string());
        rest = &rest[end + 1..];
    }
    path.push_str(rest);
    path
}

/// Calls `route` from a client without cookies, with `{}` as the body of
/// POST and PUT requests.
async fn call(app: &TestApp, route: &RouteSpec, bearer: Option<&str>) -> Response {
    let method = Method::from_bytes(route.method.as_bytes()).expect("a valid method");
    let mut request = new_client().request(method.clone(), app.url(&concrete_path(route.path)));
    if method == Method::POST || method == Method::PUT {
        request = request.json(&json!({}));
    }
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request sent")
}

fn describe(route: &RouteSpec) -> String {
    format!("{} {}", route.method, route.path)
}

fn routes_with(access: Access) -> impl Iterator<Item = &'static RouteSpec> {
    ROUTES.iter().filter(move |route| route.access == access)
}

#[test]
fn the_access_table_lists_the_auth_and_ops_routes() {
    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/api-docs/openapi.json"),
        ("POST", "/api/v1/auth/register"),
        ("POST", "/api/v1/auth/login"),
        ("POST", "/api/v1/auth/logout"),
        ("POST", "/api/v1/auth/refresh-token"),
        ("POST", "/api/v1/auth/change-password"),
        ("GET", "/api/v1/auth/me"),
    ] {
        assert!(
            ROUTES
                .iter()
                .any(|route| route.method == method && route.path == path),
            "{method} {path} is missing from the access table"
        );
    }
}

#[test]
fn route_parameters_become_uuids() {
    let path = concrete_path("/api/v1/cart/update-item/{variant_id}");
    let id = path.strip_prefix("/api/v1/cart/update-item/").unwrap();
    assert!(id.parse::<Uuid>().is_ok(), "{path}");
    assert_eq!(concrete_path("/healthz"), "/healthz");
}

#[tokio::test]
async fn private_and_admin_routes_refuse_anonymous_callers_with_401() {
    // Arrange
    let app = spawn_app().await;
    let guarded: Vec<_> = routes_with(Access::Private)
        .chain(routes_with(Access::Admin))
        .collect();
    assert!(!guarded.is_empty());

    for route in guarded {
        // Act
        let response = call(&app, route, None).await;

        // Assert
        problem(response, 401, "unauthorized").await;
    }
}

#[tokio::test]
async fn private_routes_let_any_signed_in_customer_through() {
    // Arrange: access tokens are stateless, so one customer serves every
    // route, logout included.
    let app = spawn_app().await;
    let customer = TestUser::register_customer(&app).await;

    for route in routes_with(Access::Private) {
        // Act
        let response = call(&app, route, Some(&customer.access_token)).await;

        // Assert
        let status = response.status().as_u16();
        assert!(
            status != 401 && status != 403,
            "{} answered {status} to a customer",
            describe(route)
        );
    }
}

#[tokio::test]
async fn admin_routes_refuse_customers_with_403_and_let_admins_through() {
    // Arrange: there may be no admin route yet; the table grows with the API.
    let app = spawn_app().await;
    let customer = TestUser::register_customer(&app).await;
    let admin = TestUser::create_admin(&app).await;

    for route in routes_with(Access::Admin) {
        // Act
        let as_customer = call(&app, route, Some(&customer.access_token)).await;
        let as_admin = call(&app, route, Some(&admin.access_token)).await;

        // Assert
        problem(as_customer, 403, "forbidden").await;
        let status = as_admin.status().as_u16();
        assert!(
            status != 401 && status != 403,
            "{} answered {status} to an admin",
            describe(route)
        );
    }
}

#[tokio::test]
async fn public_routes_answer_anonymous_callers() {
    // Arrange
    let app = spawn_app().await;

    for route in routes_with(Access::Public) {
        // Act
        let response = call(&app, route, None).await;

        // Assert
        let status = response.status().as_u16();
        assert!(
            status != 401 && status != 403,
            "{} answered {status} anonymously",
            describe(route)
        );
    }
}
