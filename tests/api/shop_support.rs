#![allow(dead_code)] // shared by the sales and rebuild tests; neither uses every helper
//! Shopping through the API for tests that need orders to exist: products
//! with stock, carts, checkouts, payments with the fake provider.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::fake_stripe::{FakeStripe, TEST_SECRET_KEY, TEST_WEBHOOK_SECRET};
use crate::helpers::TestApp;
use crate::users::TestUser;

/// A product created by an admin, with its one variant.
#[derive(Debug, Clone)]
pub struct StockedProduct {
    pub product_id: Uuid,
    pub variant_id: Uuid,
    pub name: String,
}

/// An active product with one variant of `stock` units at `price_cents` USD.
pub async fn stocked_product(
    app: &TestApp,
    admin: &TestUser,
    price_cents: i64,
    stock: u32,
) -> StockedProduct {
    let sku = format!("SKU-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let name = format!("Drop {sku}");
    let body = json!({
        "name": name,
        "description": "A limited drop",
        "status": "active",
        "variants": [{ "sku": sku, "title": "One size", "price_cents": price_cents, "currency": "USD", "initial_stock": stock }]
    });
    let response = app
        .post_json_as(
            "/api/v1/products/create-product",
            &admin.access_token,
            &body,
        )
        .await;
    assert_eq!(response.status(), 201, "create-product");
    let product: Value = response.json().await.expect("product JSON");
    StockedProduct {
        product_id: id_in(&product["id"]),
        variant_id: id_in(&product["variants"][0]["id"]),
        name,
    }
}

pub fn id_in(value: &Value) -> Uuid {
    value
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("expected a UUID, got {value}"))
}

pub async fn add_to_cart(
    app: &TestApp,
    buyer: &TestUser,
    variant_id: Uuid,
    quantity: i64,
) -> reqwest::Response {
    app.post_json_as(
        "/api/v1/cart/add-cart",
        &buyer.access_token,
        &json!({ "variant_id": variant_id, "quantity": quantity }),
    )
    .await
}

/// `POST` with an `Idempotency-Key`, as the checkout routes require.
pub async fn post_with_key(
    app: &TestApp,
    buyer: &TestUser,
    path: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    app.request(Method::POST, path)
        .bearer_auth(&buyer.access_token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

pub async fn checkout(app: &TestApp, buyer: &TestUser, key: &str) -> reqwest::Response {
    post_with_key(app, buyer, "/api/v1/checkout/", key, &json!({})).await
}

/// A new customer who checked out `lines` (variant, quantity); the order.
pub async fn customer_order(app: &TestApp, lines: &[(Uuid, i64)]) -> (TestUser, Value) {
    let buyer = TestUser::register_customer(app).await;
    for (variant_id, quantity) in lines {
        let added = add_to_cart(app, &buyer, *variant_id, *quantity).await;
        assert_eq!(added.status(), 200, "add-cart");
    }
    let response = checkout(app, &buyer, "checkout").await;
    assert_eq!(response.status(), 201, "checkout");
    let order = response.json().await.expect("order JSON");
    (buyer, order)
}

/// Starts the payment of an order; the payment intent's id.
pub async fn payment_intent(app: &TestApp, buyer: &TestUser, order: &Value) -> String {
    let response = post_with_key(
        app,
        buyer,
        "/api/v1/checkout/create-payment-intent",
        &format!("intent-{}", order["id"]),
        &json!({ "order_id": order["id"] }),
    )
    .await;
    assert_eq!(response.status(), 200, "create-payment-intent");
    let intent: Value = response.json().await.expect("intent JSON");
    intent["payment_intent_id"]
        .as_str()
        .expect("an intent id")
        .to_owned()
}

/// Pays (`succeeded`) or declines (`failed`) an order with the fake provider.
pub async fn fake_pay(app: &TestApp, buyer: &TestUser, order: &Value, outcome: &str) {
    let intent_id = payment_intent(app, buyer, order).await;
    let response = app
        .post_json_as(
            &format!("/api/v1/fake-payments/{intent_id}"),
            &buyer.access_token,
            &json!({ "outcome": outcome }),
        )
        .await;
    assert_eq!(response.status(), 200, "fake payment {outcome}");
}

pub async fn order_of(app: &TestApp, buyer: &TestUser, order: &Value) -> Value {
    app.get_as(
        &format!(
            "/api/v1/orders/my-orders/{}",
            order["id"].as_str().unwrap_or_default()
        ),
        &buyer.access_token,
    )
    .await
    .json()
    .await
    .expect("order JSON")
}

/// Polls the order until it reaches `status` (expiry runs on a timer).
pub async fn wait_for_status(
    app: &TestApp,
    buyer: &TestUser,
    order: &Value,
    status: &str,
) -> Value {
    for _ in 0..150 {
        let current = order_of(app, buyer, order).await;
        if current["status"] == status {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("order {} never became {status}", order["id"]);
}

/// Another instance on the same database and Redis whose checkouts hold
/// their stock for `hold` only: orders placed through it expire quickly,
/// while those placed through the first instance stay open.
pub async fn instance_with_hold(app: &TestApp, hold: Duration) -> TestApp {
    let mut settings = app.settings.clone();
    settings.bind_addr = "127.0.0.1:0".parse().expect("an address");
    settings.order_hold = hold;
    crate::helpers::spawn_app_from(settings).await
}

/// Waits until every projection of `app` has applied everything appended
/// so far. (A runner that finds nothing new is not proof: an open
/// transaction anywhere on the server holds its horizon back.)
pub async fn settle_projections(app: &TestApp) {
    settle_projections_within(app, Duration::from_secs(20)).await;
}

/// `settle_projections`, for stores too big to catch up in 20 seconds.
pub async fn settle_projections_within(app: &TestApp, timeout: Duration) {
    let newest: Option<(i64, i64)> = sqlx::query_as(
        "SELECT txid, position FROM events ORDER BY txid DESC, position DESC LIMIT 1",
    )
    .fetch_optional(&app.pool)
    .await
    .expect("the newest event");
    let Some((txid, position)) = newest else {
        return;
    };
    let target = projections::GlobalPosition { txid, position };
    for runner in app.state.projections.runners() {
        app.state
            .projections
            .wait_for(runner.name(), target, timeout)
            .await
            .unwrap_or_else(|error| panic!("projection {} caught up: {error}", runner.name()));
    }
}

/// An app that pays through the fake Stripe server (holds of 15 minutes).
pub async fn stripe_app(stripe: &FakeStripe) -> TestApp {
    let base = stripe.base_url.clone();
    crate::helpers::spawn_app_with(move |settings| {
        settings.payment_provider = commerce::config::PaymentProviderKind::Stripe;
        settings.stripe_secret_key = Some(secrecy::SecretString::from(TEST_SECRET_KEY));
        settings.stripe_webhook_secret = Some(secrecy::SecretString::from(TEST_WEBHOOK_SECRET));
        settings.stripe_api_base = Some(base);
    })
    .await
}

/// Delivers a signed Stripe event about the intent, as Stripe would.
pub async fn deliver_webhook(
    app: &TestApp,
    stripe: &FakeStripe,
    event_type: &str,
    intent_id: &str,
) -> reqwest::Response {
    let webhook = stripe.signed_event(event_type, intent_id, TEST_WEBHOOK_SECRET);
    app.request(Method::POST, "/api/v1/webhooks/stripe")
        .header("stripe-signature", webhook.signature)
        .header("content-type", "application/json")
        .body(webhook.body)
        .send()
        .await
        .expect("request sent")
}
