//! The HTTP shell: ops endpoints, request ids, and problem responses for
//! every kind of client mistake.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{problem, spawn_app};

#[tokio::test]
async fn healthz_answers_ok_with_a_request_id() {
    let app = spawn_app().await;
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let request_id = response
        .headers()
        .get("x-request-id")
        .expect("request id header");
    assert!(!request_id.is_empty());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn readyz_reports_postgres_and_redis_separately() {
    let app = spawn_app().await;
    let body: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(body["postgres"]["status"], "up", "{body}");
    assert_eq!(body["redis"]["status"], "up", "{body}");
    assert_eq!(body["status"], "ready");
}

#[tokio::test]
async fn readyz_is_degraded_but_ready_when_redis_is_unreachable() {
    let app = crate::helpers::spawn_app_with(|settings| {
        // Nothing listens on port 1.
        settings.redis_url = secrecy::SecretString::from("redis://127.0.0.1:1");
    })
    .await;
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["redis"]["status"], "down");
    assert_eq!(body["postgres"]["status"], "up");
}

/// Pooled connections are checked with a round trip only after a quiet
/// spell (`db::connect`); one that Postgres dropped meanwhile (a restart,
/// say) is replaced, not handed to a query.
#[tokio::test]
async fn a_pooled_connection_dropped_during_a_quiet_spell_is_replaced() {
    let app = spawn_app().await;
    let pool = commerce::db::connect(&app.settings).await.unwrap();
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let dropped: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(backend)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(dropped);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let now_on: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("the dropped connection was replaced");
    assert_ne!(now_on, backend);
}

#[tokio::test]
async fn metrics_are_in_prometheus_text_format() {
    let app = spawn_app().await;
    app.get("/healthz").await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("http_requests_total"), "{text}");
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("db_pool_connections"), "{text}");
}

#[tokio::test]
async fn openapi_document_and_docs_page_are_served() {
    let app = spawn_app().await;
    let document: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    assert!(document["paths"]["/healthz"].is_object());
    let redirect = app.get("/docs").await;
    assert_eq!(redirect.status(), 308);
    let page = app.get("/docs/").await;
    assert_eq!(page.status(), 200);
    assert!(
        page.text().await.unwrap().contains("swagger"),
        "Swagger UI page"
    );
}

#[tokio::test]
async fn unknown_routes_are_404_problems() {
    let app = spawn_app().await;
    problem(app.get("/no/such/route").await, 404, "not_found").await;
}

#[tokio::test]
async fn a_wrong_method_is_a_405_problem() {
    let app = spawn_app().await;
    let response = app
        .request(Method::DELETE, "/healthz")
        .send()
        .await
        .unwrap();
    problem(response, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn responses_carry_security_headers_and_the_docs_page_a_strict_csp() {
    let app = spawn_app().await;
    let api = app.get("/healthz").await;
    assert_eq!(api.headers()["x-content-type-options"], "nosniff");
    assert_eq!(api.headers()["referrer-policy"], "no-referrer");
    assert!(api.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    assert!(
        api.headers().get("strict-transport-security").is_none(),
        "no HSTS over plain HTTP"
    );

    let docs = app.get("/docs/").await;
    let csp = docs.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
}

#[tokio::test]
async fn hsts_is_sent_when_cookies_are_secure() {
    let app = crate::helpers::spawn_app_with(|settings| settings.cookie_secure = true).await;
    let response = app.get("/healthz").await;
    assert!(response.headers()["strict-transport-security"]
        .to_str()
        .unwrap()
        .contains("max-age="));
}

#[tokio::test]
async fn cross_origin_requests_are_allowed_only_from_configured_origins() {
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.cors_allowed_origins = vec!["https://shop.example".into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        app.request(Method::OPTIONS, "/healthz")
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };

    let allowed = preflight("https://shop.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn a_same_origin_browser_request_with_an_origin_header_is_served() {
    let app = spawn_app().await;
    let response = app
        .request(Method::GET, "/healthz")
        .header("origin", app.address.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn refusals_by_middleware_carry_the_security_headers_and_a_request_id() {
    let app = spawn_app().await;
    let buyer = crate::users::TestUser::register_customer(&app).await;
    let unsigned = app.get("/api/v1/cart/get-cart").await;
    let keyless = app
        .request(Method::POST, "/api/v1/checkout/")
        .bearer_auth(&buyer.access_token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    let oversized = app
        .request(Method::POST, "/api/v1/checkout/")
        .bearer_auth(&buyer.access_token)
        .header("idempotency-key", "too-big")
        .header("content-type", "application/json")
        .body(format!("{{\"note\":\"{}\"}}", "x".repeat(300 * 1024)))
        .send()
        .await
        .unwrap();
    for (response, status, code) in [
        (unsigned, 401, "unauthorized"),
        (keyless, 400, "validation_failed"),
        (oversized, 413, "payload_too_large"),
    ] {
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert_eq!(response.headers()["x-frame-options"], "DENY");
        assert!(response.headers().get("x-request-id").is_some());
        problem(response, status, code).await;
    }
}

#[tokio::test]
async fn a_nul_character_in_a_url_or_a_json_body_is_a_client_error_not_a_500() {
    let app = spawn_app().await;
    for path in [
        "/api/v1/products/get-product/a%00b",
        "/api/v1/products/get-products?q=a%00b",
        "/api/v1/products/get-products?category=a%00b",
    ] {
        problem(app.get(path).await, 400, "validation_failed").await;
    }
    let login = r#"{"email":"a\u0000@example.com","password":"whatever1"}"#;
    let register = r#"{"email":"nul@example.com","password":"a fine password","name":"a\u0000b"}"#;
    for (path, body) in [
        ("/api/v1/auth/login", login),
        ("/api/v1/auth/register", register),
    ] {
        let response = app
            .request(Method::POST, path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        problem(response, 422, "validation_failed").await;
    }
    // An escaped backslash before `u0000` is no NUL: this login is only wrong.
    let response = app
        .request(Method::POST, "/api/v1/auth/login")
        .header("content-type", "application/json")
        .body(r#"{"email":"a\\u0000@example.com","password":"whatever1"}"#)
        .send()
        .await
        .unwrap();
    problem(response, 401, "unauthorized").await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_problem() {
    let app = spawn_app().await;
    let huge = serde_json::json!({ "email": "a@b.example", "password": "x".repeat(300 * 1024) });
    let response = app.post_json("/api/v1/auth/register", &huge).await;
    problem(response, 413, "payload_too_large").await;
}

#[tokio::test]
async fn every_api_route_is_in_the_openapi_document_with_its_method() {
    let app = spawn_app().await;
    let document: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    let documented = |path: &str, method: &str| {
        // OpenAPI names path parameters the same way actix does ({id}).
        document["paths"][path][method.to_lowercase()].is_object()
    };
    let api_routes = commerce::http::access::ROUTES
        .iter()
        .filter(|route| route.path.starts_with("/api/v1/"));
    let missing: Vec<String> = api_routes
        .filter(|route| !documented(route.path, route.method))
        .map(|route| format!("{} {}", route.method, route.path))
        .collect();
    assert!(
        missing.is_empty(),
        "not in the OpenAPI document: {missing:?}"
    );
}
