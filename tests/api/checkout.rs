//! Cart, checkout, payment and the order lifecycle, end to end over HTTP:
//! every unit sold once, every payment accounted for.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use commerce::event_store::{CommandBus, EventStore, Metadata};
use commerce::shop::checkout_commit::{
    CheckoutCommitter, CheckoutError, CheckoutOutcome, CheckoutRequest,
};
use domain::order::NewOrderLine;
use domain::values::{Currency, Money, Name, Quantity, Sku};
use projections::cache::VersionedCache;

use crate::fake_stripe::{FakeStripe, TEST_SECRET_KEY, TEST_WEBHOOK_SECRET};
use crate::helpers::{problem, spawn_app, spawn_app_with, spawn_instance_like, TestApp};
use crate::users::TestUser;

/// A product with one variant of `stock` units at 19.99 USD; returns the variant id.
async fn product_with_stock(app: &TestApp, admin: &TestUser, stock: u32) -> Uuid {
    let sku = format!("SKU-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let body = json!({
        "name": format!("Limited sneaker {sku}"),
        "description": "A drop of very few pairs",
        "status": "active",
        "variants": [{ "sku": sku, "title": "EU 42", "price_cents": 1999, "currency": "USD", "initial_stock": stock }]
    });
    let response = app
        .post_json_as(
            "/api/v1/products/create-product",
            &admin.access_token,
            &body,
        )
        .await;
    assert_eq!(response.status(), 201, "create-product");
    let product: Value = response.json().await.unwrap();
    product["variants"][0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn add_to_cart(
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

async fn checkout(app: &TestApp, buyer: &TestUser, key: &str) -> reqwest::Response {
    app.request(Method::POST, "/api/v1/checkout/")
        .bearer_auth(&buyer.access_token)
        .header("Idempotency-Key", key)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
}

async fn post_with_key(
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
        .unwrap()
}

/// Creates (or gets again) the payment intent of one of the buyer's orders.
async fn payment_intent_for(app: &TestApp, buyer: &TestUser, order_id: &str, key: &str) -> String {
    let intent: Value = post_with_key(
        app,
        buyer,
        "/api/v1/checkout/create-payment-intent",
        key,
        &json!({ "order_id": order_id }),
    )
    .await
    .json()
    .await
    .unwrap();
    intent["payment_intent_id"].as_str().unwrap().to_owned()
}

/// The variant's stock rebuilt from its events (the audit API).
async fn stock(app: &TestApp, admin: &TestUser, variant_id: Uuid) -> Value {
    let response = app
        .get_as(
            &format!("/api/v1/audit/inventory/{variant_id}"),
            &admin.access_token,
        )
        .await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "audit/inventory answered {body}");
    serde_json::from_str(&body).unwrap()
}

fn counts(stock: &Value) -> (u64, u64, u64) {
    (
        stock["on_hand"].as_u64().unwrap(),
        stock["reserved"].as_u64().unwrap(),
        stock["available"].as_u64().unwrap(),
    )
}

async fn order_of(app: &TestApp, buyer: &TestUser, order_id: &str) -> Value {
    app.get_as(
        &format!("/api/v1/orders/my-orders/{order_id}"),
        &buyer.access_token,
    )
    .await
    .json()
    .await
    .unwrap()
}

/// Polls the order until it reaches `status` (the scheduler runs on a timer).
async fn wait_for_status(app: &TestApp, buyer: &TestUser, order_id: &str, status: &str) -> Value {
    for _ in 0..100 {
        let order = order_of(app, buyer, order_id).await;
        if order["status"] == status {
            return order;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("order {order_id} never became {status}");
}

/// The variant's stock once nothing is reserved, or as it stands after
/// ten seconds. An expired hold's order is cancelled first and its stock
/// released in a transaction of its own, so a cancelled order can be seen
/// a moment before its stock comes back.
async fn released_stock(app: &TestApp, admin: &TestUser, variant_id: Uuid) -> Value {
    for _ in 0..100 {
        let current = stock(app, admin, variant_id).await;
        if current["reserved"] == 0 {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stock(app, admin, variant_id).await
}

/// The buyer's cart, as `get-cart` answers it.
async fn cart_of(app: &TestApp, buyer: &TestUser) -> Value {
    app.get_as("/api/v1/cart/get-cart", &buyer.access_token)
        .await
        .json()
        .await
        .unwrap()
}

async fn buyer_with_cart(app: &TestApp, variant_id: Uuid, quantity: i64) -> TestUser {
    let buyer = TestUser::register_customer(app).await;
    assert_eq!(
        add_to_cart(app, &buyer, variant_id, quantity)
            .await
            .status(),
        200
    );
    buyer
}

async fn buyers_with_one_unit(app: &TestApp, variant_id: Uuid, count: usize) -> Vec<TestUser> {
    futures_util::future::join_all((0..count).map(|_| buyer_with_cart(app, variant_id, 1))).await
}

/// Every buyer checks out at the same moment, each with a key of their own.
async fn check_out_at_once(app: &TestApp, buyers: &[TestUser]) -> Vec<reqwest::Response> {
    futures_util::future::join_all(
        buyers
            .iter()
            .enumerate()
            .map(|(i, buyer)| async move { checkout(app, buyer, &format!("buyer-{i}")).await }),
    )
    .await
}

async fn stripe_app(stripe: &FakeStripe, hold_seconds: u64) -> TestApp {
    let base = stripe.base_url.clone();
    spawn_app_with(move |settings| {
        settings.payment_provider = commerce::config::PaymentProviderKind::Stripe;
        settings.stripe_secret_key = Some(secrecy::SecretString::from(TEST_SECRET_KEY));
        settings.stripe_webhook_secret = Some(secrecy::SecretString::from(TEST_WEBHOOK_SECRET));
        settings.stripe_api_base = Some(base);
        settings.order_hold = Duration::from_secs(hold_seconds);
    })
    .await
}

async fn deliver(
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
        .unwrap()
}

#[tokio::test]
async fn a_write_whose_read_model_falls_behind_answers_503_and_is_kept() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let buyer = TestUser::register_customer(&app).await;
    // The carts projection fails (and retries) while its table refuses
    // rows. Not a lock held open: an open transaction anywhere in the
    // cluster holds back every test's projections (their horizon is the
    // oldest running transaction id).
    refuse_writes(&app, "INSERT OR UPDATE", "carts", "true").await;

    let added = add_to_cart(&app, &buyer, variant, 2).await;

    let problem = problem(added, 503, "unavailable").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("saved"),
        "{problem}"
    );
    stop_refusing(&app, "carts").await;
    let mut kept = Value::Null;
    for _ in 0..20 {
        let response = app
            .get_as("/api/v1/cart/get-cart", &buyer.access_token)
            .await;
        if response.status() == 200 {
            kept = response.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(kept["item_count"], 2, "the write was kept: {kept}");
}

#[tokio::test]
async fn the_cart_merges_lines_and_shows_prices_and_availability() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 7).await;
    let buyer = TestUser::register_customer(&app).await;

    add_to_cart(&app, &buyer, variant, 2).await;
    let cart: Value = add_to_cart(&app, &buyer, variant, 3)
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(cart["items"].as_array().unwrap().len(), 1);
    let line = &cart["items"][0];
    assert_eq!(
        (line["quantity"].as_i64(), line["unit_price_cents"].as_i64()),
        (Some(5), Some(1999))
    );
    assert_eq!(
        (
            line["line_total_cents"].as_i64(),
            line["available"].as_i64()
        ),
        (Some(9995), Some(7))
    );
    assert_eq!(
        (cart["item_count"].as_i64(), cart["subtotal_cents"].as_i64()),
        (Some(5), Some(9995))
    );
    assert_eq!(cart["currency"], "USD");
    let read = cart_of(&app, &buyer).await;
    assert_eq!(read["item_count"], 5, "a read right after a write shows it");
}

#[tokio::test]
async fn cart_lines_can_be_set_removed_and_cleared() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let first = product_with_stock(&app, &admin, 5).await;
    let second = product_with_stock(&app, &admin, 5).await;
    let buyer = TestUser::register_customer(&app).await;
    add_to_cart(&app, &buyer, first, 1).await;
    add_to_cart(&app, &buyer, second, 1).await;
    let token = &buyer.access_token;

    let set: Value = app
        .request(Method::PUT, &format!("/api/v1/cart/update-item/{first}"))
        .bearer_auth(token)
        .json(&json!({ "quantity": 4 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(set["item_count"], 5);
    let zeroed: Value = app
        .request(Method::PUT, &format!("/api/v1/cart/update-item/{first}"))
        .bearer_auth(token)
        .json(&json!({ "quantity": 0 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        zeroed["items"].as_array().unwrap().len(),
        1,
        "0 removes the line"
    );
    let removed: Value = app
        .request(
            Method::DELETE,
            &format!("/api/v1/cart/remove-item/{second}"),
        )
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(removed["items"].as_array().unwrap().is_empty());
    add_to_cart(&app, &buyer, second, 2).await;
    let cleared = app
        .request(Method::DELETE, "/api/v1/cart/clear")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);
    let cleared: Value = cleared.json().await.unwrap();
    assert_eq!(
        (
            cleared["item_count"].as_i64(),
            cleared["currency"].is_null()
        ),
        (Some(0), true)
    );
}

#[tokio::test]
async fn bad_cart_input_is_a_problem() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let buyer = TestUser::register_customer(&app).await;

    problem(
        add_to_cart(&app, &buyer, variant, 0).await,
        422,
        "validation_failed",
    )
    .await;
    problem(
        add_to_cart(&app, &buyer, variant, -3).await,
        422,
        "validation_failed",
    )
    .await;
    problem(
        add_to_cart(&app, &buyer, variant, 10_001).await,
        422,
        "validation_failed",
    )
    .await;
    problem(
        add_to_cart(&app, &buyer, Uuid::new_v4(), 1).await,
        404,
        "not_found",
    )
    .await;
    let malformed = app
        .post_json_as(
            "/api/v1/cart/add-cart",
            &buyer.access_token,
            &json!({ "variant_id": "nope", "quantity": 1 }),
        )
        .await;
    problem(malformed, 422, "validation_failed").await;
    let bad_path = app
        .request(Method::PUT, "/api/v1/cart/update-item/not-a-uuid")
        .bearer_auth(&buyer.access_token)
        .json(&json!({ "quantity": 1 }))
        .send()
        .await
        .unwrap();
    problem(bad_path, 400, "validation_failed").await;
    problem(app.get("/api/v1/cart/get-cart").await, 401, "unauthorized").await;
}

#[tokio::test]
async fn checkout_needs_an_idempotency_key_and_a_cart() {
    let app = spawn_app().await;
    let buyer = TestUser::register_customer(&app).await;

    let without_key = app
        .request(Method::POST, "/api/v1/checkout/")
        .bearer_auth(&buyer.access_token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    problem(without_key, 400, "validation_failed").await;
    let bad_key = checkout(&app, &buyer, &"k".repeat(256)).await;
    problem(bad_key, 400, "validation_failed").await;
    problem(
        checkout(&app, &buyer, "empty-cart").await,
        422,
        "validation_failed",
    )
    .await;
}

#[tokio::test]
async fn a_checkout_refused_before_the_committer_replays_its_refusal() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 10).await;
    let buyer = TestUser::register_customer(&app).await;

    // The handler changes nothing here, so its key is claimed after the
    // answer, and the answer recorded as any other.
    problem(
        checkout(&app, &buyer, "too-soon").await,
        422,
        "validation_failed",
    )
    .await;
    crate::idempotency::recorded(&app, buyer.id, "too-soon").await;
    assert_eq!(add_to_cart(&app, &buyer, variant, 1).await.status(), 200);
    let retried = checkout(&app, &buyer, "too-soon").await;
    assert_eq!(retried.headers()["idempotent-replayed"], "true");
    problem(retried, 422, "validation_failed").await;
    assert_eq!(
        counts(&stock(&app, &admin, variant).await),
        (10, 0, 10),
        "the replay reserved nothing"
    );
    assert_eq!(checkout(&app, &buyer, "in-time").await.status(), 201);
}

#[tokio::test]
async fn checkout_holds_the_stock_empties_the_cart_and_replays_for_the_same_key() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 10).await;
    let buyer = buyer_with_cart(&app, variant, 3).await;

    let first = checkout(&app, &buyer, "order-1").await;
    assert_eq!(first.status(), 201);
    let order: Value = first.json().await.unwrap();
    let again = checkout(&app, &buyer, "order-1").await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let replayed: Value = again.json().await.unwrap();

    assert_eq!(replayed, order);
    assert_eq!(order["status"], "created");
    assert_eq!(
        (order["total_cents"].as_i64(), order["currency"].as_str()),
        (Some(5997), Some("USD"))
    );
    assert_eq!(order["items"][0]["quantity"], 3);
    assert!(order["expires_at"].is_string());
    assert_eq!(counts(&stock(&app, &admin, variant).await), (10, 3, 7));
    let cart = cart_of(&app, &buyer).await;
    assert_eq!(cart["item_count"], 0, "the cart is emptied");
    let listing: Value = app
        .get_as("/api/v1/orders/my-orders", &buyer.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listing["page"]["total"], 1);
    assert_eq!(listing["items"][0]["id"], order["id"]);
    let other_body = post_with_key(
        &app,
        &buyer,
        "/api/v1/checkout/",
        "order-1",
        &json!({ "note": "different" }),
    )
    .await;
    problem(other_body, 422, "idempotency_key_reused").await;
}

async fn checkout_with_body(
    app: &TestApp,
    buyer: &TestUser,
    key: &str,
    body: &str,
) -> reqwest::Response {
    app.request(Method::POST, "/api/v1/checkout/")
        .bearer_auth(&buyer.access_token)
        .header("Idempotency-Key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retry_whose_json_differs_only_in_spacing_and_key_order_is_a_replay() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 10).await;
    let buyer = buyer_with_cart(&app, variant, 1).await;

    let first = checkout_with_body(&app, &buyer, "k", r#"{"note":"gift","channel":"web"}"#).await;
    let first_status = first.status();
    let first_body: Value = first.json().await.unwrap();
    let again = checkout_with_body(
        &app,
        &buyer,
        "k",
        "{ \"channel\" : \"web\",\n  \"note\": \"gift\" }",
    )
    .await;
    let other = checkout_with_body(&app, &buyer, "k", r#"{"note":"gift","channel":"app"}"#).await;

    assert_eq!(again.status(), first_status);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first_body);
    problem(other, 422, "idempotency_key_reused").await;
}

#[tokio::test]
async fn a_key_stored_with_the_body_as_sent_still_replays_for_the_same_bytes() {
    use sha2::{Digest, Sha256};
    let app = spawn_app().await;
    let buyer = TestUser::register_customer(&app).await;
    let body = r#"{ "note": "gift" }"#;
    // What a key claimed before JSON bodies were compared as documents holds.
    let mut as_sent = Sha256::new();
    as_sent.update(b"POST\0/api/v1/checkout/\0\0");
    as_sent.update(body.as_bytes());
    sqlx::query(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint, response_status, response_type, response_body) \
         VALUES ($1, 'before', $2, 201, 'application/json', $3)",
    )
    .bind(buyer.id)
    .bind(as_sent.finalize().to_vec())
    .bind(br#"{"stored":true}"#.to_vec())
    .execute(&app.pool)
    .await
    .unwrap();

    let again = checkout_with_body(&app, &buyer, "before", body).await;

    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        json!({"stored": true})
    );
}

#[tokio::test]
async fn the_serial_stages_name_their_postgres_connections() {
    use commerce::db::application_names::{CHECKOUT_COMMITTER, IDEMPOTENCY_KEYS, POOL};

    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 10).await;
    let buyer = buyer_with_cart(&app, variant, 1).await;
    assert_eq!(checkout(&app, &buyer, "named-1").await.status(), 201);
    crate::idempotency::recorded(&app, buyer.id, "named-1").await;

    // The bench's CPU split and an operator's pg_stat_activity tell the
    // committer's and the key writer's backends apart by these names.
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT application_name FROM pg_stat_activity \
         WHERE datname = current_database() ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    for expected in [POOL, CHECKOUT_COMMITTER, IDEMPOTENCY_KEYS] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} in {names:?}"
        );
    }
}

#[tokio::test]
async fn another_users_order_does_not_exist_for_you() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 10).await;
    let owner = buyer_with_cart(&app, variant, 1).await;
    let order: Value = checkout(&app, &owner, "mine").await.json().await.unwrap();
    let stranger = TestUser::register_customer(&app).await;
    let order_id = order["id"].as_str().unwrap();

    problem(
        app.get_as(
            &format!("/api/v1/orders/my-orders/{order_id}"),
            &stranger.access_token,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    let intent = post_with_key(
        &app,
        &stranger,
        "/api/v1/checkout/create-payment-intent",
        "k",
        &json!({ "order_id": order_id }),
    )
    .await;
    problem(intent, 404, "not_found").await;
    let listing: Value = app
        .get_as("/api/v1/orders/my-orders", &stranger.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listing["page"]["total"], 0);
}

#[tokio::test]
async fn twelve_concurrent_checkouts_with_one_key_make_one_order_and_one_reservation() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 10).await;
    let buyer = buyer_with_cart(&app, variant, 2).await;

    let attempts = (0..12).map(|_| checkout(&app, &buyer, "same-key"));
    let responses = futures_util::future::join_all(attempts).await;

    let mut order_ids = std::collections::HashSet::new();
    for response in responses {
        match response.status().as_u16() {
            201 => {
                let order: Value = response.json().await.unwrap();
                order_ids.insert(order["id"].as_str().unwrap().to_owned());
            }
            409 => {
                problem(response, 409, "idempotency_in_progress").await;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(order_ids.len(), 1, "one order");
    assert_eq!(
        counts(&stock(&app, &admin, variant).await),
        (10, 2, 8),
        "one reservation"
    );
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Order'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "one OrderPlaced");
}

#[tokio::test]
async fn a_checkout_reserves_every_line_or_none() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let plenty = product_with_stock(&app, &admin, 10).await;
    let scarce = product_with_stock(&app, &admin, 1).await;
    let buyer = TestUser::register_customer(&app).await;
    add_to_cart(&app, &buyer, plenty, 2).await;
    add_to_cart(&app, &buyer, scarce, 2).await;

    let body = problem(
        checkout(&app, &buyer, "too-much").await,
        409,
        "insufficient_stock",
    )
    .await;

    let lines = body["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1, "{body}");
    assert_eq!(lines[0]["variant_id"], scarce.to_string());
    assert_eq!(
        (
            lines[0]["requested"].as_u64(),
            lines[0]["available"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(
        counts(&stock(&app, &admin, plenty).await),
        (10, 0, 10),
        "no stock stays held"
    );
    assert_eq!(counts(&stock(&app, &admin, scarce).await), (1, 0, 1));
    let cart = cart_of(&app, &buyer).await;
    assert_eq!(cart["item_count"], 4, "a failed checkout keeps the cart");
}

#[tokio::test]
async fn paying_with_the_fake_provider_marks_the_order_paid_and_takes_the_units_for_good() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let buyer = buyer_with_cart(&app, variant, 2).await;
    let order: Value = checkout(&app, &buyer, "pay-me").await.json().await.unwrap();
    let order_id = order["id"].as_str().unwrap();

    let intent: Value = post_with_key(
        &app,
        &buyer,
        "/api/v1/checkout/create-payment-intent",
        "intent-1",
        &json!({ "order_id": order_id }),
    )
    .await
    .json()
    .await
    .unwrap();
    let again: Value = post_with_key(
        &app,
        &buyer,
        "/api/v1/checkout/create-payment-intent",
        "intent-2",
        &json!({ "order_id": order_id }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        again["payment_intent_id"], intent["payment_intent_id"],
        "the same intent again"
    );
    assert_eq!(
        (intent["amount_cents"].as_i64(), intent["currency"].as_str()),
        (Some(3998), Some("USD"))
    );
    assert_eq!(
        order_of(&app, &buyer, order_id).await["status"],
        "payment_pending"
    );
    let intent_id = intent["payment_intent_id"].as_str().unwrap();

    let confirm_body = json!({ "order_id": order_id, "payment_intent_id": intent_id });
    let early = post_with_key(
        &app,
        &buyer,
        "/api/v1/checkout/confirm-payment",
        "confirm-early",
        &confirm_body,
    )
    .await;
    problem(early, 402, "payment_not_verified").await;
    let paid = app
        .post_json_as(
            &format!("/api/v1/fake-payments/{intent_id}"),
            &buyer.access_token,
            &json!({ "outcome": "succeeded" }),
        )
        .await;
    assert_eq!(paid.status(), 200);
    let confirmed = post_with_key(
        &app,
        &buyer,
        "/api/v1/checkout/confirm-payment",
        "confirm",
        &confirm_body,
    )
    .await;

    assert_eq!(confirmed.status(), 200);
    let confirmed: Value = confirmed.json().await.unwrap();
    assert_eq!(confirmed["status"], "paid");
    assert_eq!(confirmed["payment_intent_id"], intent_id);
    assert_eq!(
        counts(&stock(&app, &admin, variant).await),
        (3, 0, 3),
        "paid units left on_hand"
    );
}

#[tokio::test]
async fn a_failed_fake_payment_cancels_the_order_and_returns_the_stock() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let buyer = buyer_with_cart(&app, variant, 2).await;
    let order: Value = checkout(&app, &buyer, "declined")
        .await
        .json()
        .await
        .unwrap();
    let order_id = order["id"].as_str().unwrap();
    let intent_id = payment_intent_for(&app, &buyer, order_id, "i").await;
    let intent_id = intent_id.as_str();

    let declined = app
        .post_json_as(
            &format!("/api/v1/fake-payments/{intent_id}"),
            &buyer.access_token,
            &json!({ "outcome": "failed" }),
        )
        .await;

    assert_eq!(declined.status(), 200);
    let order = order_of(&app, &buyer, order_id).await;
    assert_eq!(
        (order["status"].as_str(), order["cancel_reason"].as_str()),
        (Some("cancelled"), Some("payment_failed"))
    );
    assert_eq!(counts(&stock(&app, &admin, variant).await), (5, 0, 5));
    let stranger = TestUser::register_customer(&app).await;
    let not_yours = app
        .post_json_as(
            &format!("/api/v1/fake-payments/{intent_id}"),
            &stranger.access_token,
            &json!({ "outcome": "succeeded" }),
        )
        .await;
    problem(not_yours, 404, "not_found").await;
    let bad_outcome = app
        .post_json_as(
            &format!("/api/v1/fake-payments/{intent_id}"),
            &buyer.access_token,
            &json!({ "outcome": "maybe" }),
        )
        .await;
    problem(bad_outcome, 422, "validation_failed").await;
}

#[tokio::test]
async fn a_hold_that_is_not_paid_expires_and_its_stock_returns() {
    let app = spawn_app_with(|settings| settings.order_hold = Duration::from_secs(1)).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 4).await;
    let buyer = buyer_with_cart(&app, variant, 3).await;
    let order: Value = checkout(&app, &buyer, "will-expire")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(counts(&stock(&app, &admin, variant).await), (4, 3, 1));

    let expired = wait_for_status(&app, &buyer, order["id"].as_str().unwrap(), "cancelled").await;

    assert_eq!(expired["cancel_reason"], "expired");
    assert_eq!(
        counts(&released_stock(&app, &admin, variant).await),
        (4, 0, 4)
    );
}

#[tokio::test]
async fn a_hold_still_expires_after_the_server_restarts() {
    let app = spawn_app_with(|settings| settings.order_hold = Duration::from_secs(2)).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 4).await;
    let buyer = buyer_with_cart(&app, variant, 2).await;
    let order: Value = checkout(&app, &buyer, "restart")
        .await
        .json()
        .await
        .unwrap();
    let restarted = spawn_instance_like(&app).await;
    app.stop().await;

    let expired = wait_for_status(
        &restarted,
        &buyer,
        order["id"].as_str().unwrap(),
        "cancelled",
    )
    .await;

    assert_eq!(expired["cancel_reason"], "expired");
    assert_eq!(
        counts(&released_stock(&restarted, &admin, variant).await),
        (4, 0, 4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flash_sale_sells_every_unit_once_and_the_events_explain_every_unit() {
    let app = spawn_app_with(|settings| settings.order_hold = Duration::from_secs(3)).await;
    let admin = TestUser::create_admin(&app).await;
    let units = 50;
    let variant = product_with_stock(&app, &admin, units).await;
    let buyers = buyers_with_one_unit(&app, variant, 200).await;
    let responses = check_out_at_once(&app, &buyers).await;

    let mut won = Vec::new();
    let mut lost = 0;
    for (buyer, response) in buyers.iter().zip(responses) {
        match response.status().as_u16() {
            201 => won.push((buyer, response.json::<Value>().await.unwrap())),
            409 => {
                problem(response, 409, "insufficient_stock").await;
                lost += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((won.len(), lost), (50, 150));
    assert_eq!(counts(&stock(&app, &admin, variant).await), (50, 50, 0));

    // Half pay; the other half let their holds expire.
    for (buyer, order) in won.iter().take(25) {
        let order_id = order["id"].as_str().unwrap();
        let intent_id = payment_intent_for(&app, buyer, order_id, "pay").await;
        let intent_id = intent_id.as_str();
        let paid = app
            .post_json_as(
                &format!("/api/v1/fake-payments/{intent_id}"),
                &buyer.access_token,
                &json!({ "outcome": "succeeded" }),
            )
            .await;
        assert_eq!(paid.status(), 200);
    }
    for (buyer, order) in won.iter().skip(25) {
        wait_for_status(&app, buyer, order["id"].as_str().unwrap(), "cancelled").await;
    }

    let history = stock(&app, &admin, variant).await;
    assert_eq!(counts(&history), (25, 0, 25));
    let events = history["events"].as_array().unwrap();
    let of_type = |name: &str| events.iter().filter(|e| e["event_type"] == name).count();
    assert_eq!(of_type("ItemRegistered"), 1);
    assert_eq!(
        of_type("StockReserved"),
        50,
        "one reservation per order that won"
    );
    assert_eq!(
        of_type("ReservationCommitted"),
        25,
        "one sale per paid order"
    );
    assert_eq!(
        of_type("ReservationReleased"),
        25,
        "one release per expired order"
    );
    // initial - sold = on_hand, and every reservation ended.
    assert_eq!(units as usize - of_type("ReservationCommitted"), 25);
}

#[tokio::test]
async fn stripe_payments_are_verified_with_stripe_before_an_order_is_paid() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 900).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let buyer = buyer_with_cart(&app, variant, 1).await;
    let order: Value = checkout(&app, &buyer, "stripe-order")
        .await
        .json()
        .await
        .unwrap();
    let order_id = order["id"].as_str().unwrap();
    let intent: Value = post_with_key(
        &app,
        &buyer,
        "/api/v1/checkout/create-payment-intent",
        "i",
        &json!({ "order_id": order_id }),
    )
    .await
    .json()
    .await
    .unwrap();
    let intent_id = intent["payment_intent_id"].as_str().unwrap();
    assert!(intent["client_secret"].is_string());
    let created = stripe.calls_to("POST", "/v1/payment_intents");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].param("metadata[order_id]"), Some(order_id));
    assert_eq!(created[0].param("amount"), Some("1999"));

    // Another order's intent does not pay this order.
    let other_buyer = buyer_with_cart(&app, variant, 1).await;
    let other: Value = checkout(&app, &other_buyer, "other")
        .await
        .json()
        .await
        .unwrap();
    let other_intent: Value = post_with_key(
        &app,
        &other_buyer,
        "/api/v1/checkout/create-payment-intent",
        "i",
        &json!({ "order_id": other["id"] }),
    )
    .await
    .json()
    .await
    .unwrap();
    stripe.pay(other_intent["payment_intent_id"].as_str().unwrap());
    let wrong =
        json!({ "order_id": order_id, "payment_intent_id": other_intent["payment_intent_id"] });
    problem(
        post_with_key(
            &app,
            &buyer,
            "/api/v1/checkout/confirm-payment",
            "c0",
            &wrong,
        )
        .await,
        402,
        "payment_not_verified",
    )
    .await;

    let confirm = json!({ "order_id": order_id, "payment_intent_id": intent_id });
    problem(
        post_with_key(
            &app,
            &buyer,
            "/api/v1/checkout/confirm-payment",
            "c1",
            &confirm,
        )
        .await,
        402,
        "payment_not_verified",
    )
    .await;
    assert_eq!(
        order_of(&app, &buyer, order_id).await["status"],
        "payment_pending",
        "nothing changed"
    );
    stripe.pay(intent_id);
    let paid = post_with_key(
        &app,
        &buyer,
        "/api/v1/checkout/confirm-payment",
        "c2",
        &confirm,
    )
    .await;
    assert_eq!(paid.status(), 200);
    assert_eq!(paid.json::<Value>().await.unwrap()["status"], "paid");
}

#[tokio::test]
async fn stripe_webhooks_pay_or_cancel_orders_once_whatever_their_order_and_number() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 900).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let payer = buyer_with_cart(&app, variant, 2).await;
    let decliner = buyer_with_cart(&app, variant, 1).await;
    let paid_order: Value = checkout(&app, &payer, "p").await.json().await.unwrap();
    let failed_order: Value = checkout(&app, &decliner, "d").await.json().await.unwrap();
    let intent_of = |buyer: &TestUser, order: &Value| {
        let body = json!({ "order_id": order["id"] });
        let app = &app;
        let token = buyer.access_token.clone();
        async move {
            let response = app
                .request(Method::POST, "/api/v1/checkout/create-payment-intent")
                .bearer_auth(token)
                .header("Idempotency-Key", "intent")
                .json(&body)
                .send()
                .await
                .unwrap();
            response.json::<Value>().await.unwrap()["payment_intent_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let paid_intent = intent_of(&payer, &paid_order).await;
    let failed_intent = intent_of(&decliner, &failed_order).await;

    let unsigned = app
        .request(Method::POST, "/api/v1/webhooks/stripe")
        .header("content-type", "application/json")
        .body(stripe.event_body("payment_intent.succeeded", &paid_intent))
        .send()
        .await
        .unwrap();
    problem(unsigned, 400, "validation_failed").await;
    assert_eq!(
        order_of(&app, &payer, paid_order["id"].as_str().unwrap()).await["status"],
        "payment_pending"
    );

    stripe.pay(&paid_intent);
    stripe.decline(&failed_intent);
    // Failure first for one, success twice for the other, in any order.
    assert_eq!(
        deliver(
            &app,
            &stripe,
            "payment_intent.payment_failed",
            &failed_intent
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        deliver(&app, &stripe, "payment_intent.succeeded", &paid_intent)
            .await
            .status(),
        200
    );
    assert_eq!(
        deliver(&app, &stripe, "payment_intent.succeeded", &paid_intent)
            .await
            .status(),
        200
    );
    assert_eq!(
        deliver(
            &app,
            &stripe,
            "payment_intent.payment_failed",
            &failed_intent
        )
        .await
        .status(),
        200
    );

    let paid = order_of(&app, &payer, paid_order["id"].as_str().unwrap()).await;
    let failed = order_of(&app, &decliner, failed_order["id"].as_str().unwrap()).await;
    assert_eq!(paid["status"], "paid");
    assert_eq!(
        (failed["status"].as_str(), failed["cancel_reason"].as_str()),
        (Some("cancelled"), Some("payment_failed"))
    );
    assert_eq!(counts(&stock(&app, &admin, variant).await), (3, 0, 3));
    let commits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ReservationCommitted'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(commits, 1, "paid once");
}

#[tokio::test]
async fn a_payment_after_expiry_is_honoured_while_the_stock_is_there_and_refunded_when_it_is_gone()
{
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 1).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 1).await;
    let late = buyer_with_cart(&app, variant, 1).await;
    let order: Value = checkout(&app, &late, "late").await.json().await.unwrap();
    let order_id = order["id"].as_str().unwrap().to_owned();
    let intent_id = payment_intent_for(&app, &late, &order_id, "i").await;
    wait_for_status(&app, &late, &order_id, "cancelled").await;
    // The scheduler cancels the intent after it has cancelled the order.
    let cancel_path = format!("/v1/payment_intents/{intent_id}/cancel");
    for _ in 0..50 {
        if !stripe.calls_to("POST", &cancel_path).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stripe.calls_to("POST", &cancel_path).len(), 1);

    // Someone else buys the only unit; then the late payment lands anyway.
    let quick = buyer_with_cart(&app, variant, 1).await;
    assert_eq!(checkout(&app, &quick, "quick").await.status(), 201);
    stripe.set_status(&intent_id, "succeeded");
    assert_eq!(
        deliver(&app, &stripe, "payment_intent.succeeded", &intent_id)
            .await
            .status(),
        200
    );

    let refunded = order_of(&app, &late, &order_id).await;
    assert_eq!(refunded["status"], "refunded");
    let refunds = stripe.refunds();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["payment_intent"], intent_id.as_str());
    assert_eq!(
        counts(&stock(&app, &admin, variant).await),
        (1, 1, 0),
        "the other buyer keeps the unit"
    );
}

#[tokio::test]
async fn a_late_payment_is_honoured_when_the_stock_is_still_there() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 1).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 3).await;
    let buyer = buyer_with_cart(&app, variant, 2).await;
    let order: Value = checkout(&app, &buyer, "late-ok")
        .await
        .json()
        .await
        .unwrap();
    let order_id = order["id"].as_str().unwrap().to_owned();
    let intent_id = payment_intent_for(&app, &buyer, &order_id, "i").await;
    wait_for_status(&app, &buyer, &order_id, "cancelled").await;

    stripe.set_status(&intent_id, "succeeded");
    assert_eq!(
        deliver(&app, &stripe, "payment_intent.succeeded", &intent_id)
            .await
            .status(),
        200
    );

    assert_eq!(order_of(&app, &buyer, &order_id).await["status"], "paid");
    assert!(stripe.refunds().is_empty());
    assert_eq!(counts(&stock(&app, &admin, variant).await), (1, 0, 1));
}

#[tokio::test]
async fn a_late_payment_whose_commit_failed_has_its_new_hold_ended_by_a_deadline() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 1).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 3).await;
    let buyer = buyer_with_cart(&app, variant, 2).await;
    let order: Value = checkout(&app, &buyer, "late-fails")
        .await
        .json()
        .await
        .unwrap();
    let order_id = order["id"].as_str().unwrap().to_owned();
    let intent_id = payment_intent_for(&app, &buyer, &order_id, "i").await;
    wait_for_status(&app, &buyer, &order_id, "cancelled").await;

    // The late payment takes the units again and is honoured, but the store
    // fails to record their commit, and the payment is never retried.
    stripe.set_status(&intent_id, "succeeded");
    refuse_events_of_type(&app, "ReservationCommitted").await;
    let delivered = deliver(&app, &stripe, "payment_intent.succeeded", &intent_id).await;
    assert_eq!(delivered.status(), 500);
    stop_refusing(&app, "events").await;
    assert_eq!(order_of(&app, &buyer, &order_id).await["status"], "paid");

    // A hold's length later the scheduler commits the paid order's units.
    assert_eq!(
        counts(&released_stock(&app, &admin, variant).await),
        (1, 0, 1),
        "the new hold outlived its payment's failed commit"
    );
    assert!(stripe.refunds().is_empty());
}

#[tokio::test]
async fn a_deadline_whose_row_cannot_be_deleted_does_not_hold_up_the_rest_of_its_batch() {
    let app = spawn_app_with(|settings| settings.order_hold = Duration::from_secs(900)).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let (first, second) = (
        buyer_with_cart(&app, variant, 1).await,
        buyer_with_cart(&app, variant, 1).await,
    );
    let first_order: Value = checkout(&app, &first, "a").await.json().await.unwrap();
    let second_order: Value = checkout(&app, &second, "b").await.json().await.unwrap();
    let (first_id, second_id) = (
        first_order["id"].as_str().unwrap(),
        second_order["id"].as_str().unwrap(),
    );
    // The first deadline's row refuses to go, as a failing statement would.
    let first_row = format!("OLD.order_id = '{first_id}'");
    refuse_writes(&app, "DELETE", "order_deadlines", &first_row).await;
    // Both come due in one step of the scheduler, the first one first.
    sqlx::query(
        "UPDATE order_deadlines SET due_at = now() + interval '1 second' \
                                           + CASE WHEN order_id = $1 THEN interval '0' ELSE interval '1 microsecond' END \
         WHERE order_id IN ($1, $2)",
    )
    .bind(first_id.parse::<Uuid>().unwrap())
    .bind(second_id.parse::<Uuid>().unwrap())
    .execute(&app.pool)
    .await
    .unwrap();

    // Within the test's patience (ten seconds), not the lease's minute.
    wait_for_status(&app, &first, first_id, "cancelled").await;
    wait_for_status(&app, &second, second_id, "cancelled").await;
    assert_eq!(
        counts(&released_stock(&app, &admin, variant).await),
        (5, 0, 5)
    );
}

/// Marks the order paid in its events alone: what a payment whose stock
/// commit then failed (a contended item, a lost connection) leaves.
async fn mark_paid(app: &TestApp, order_id: &str, intent_id: &str, amount_cents: i64) {
    let confirm = domain::order::OrderCommand::ConfirmPayment {
        payment_intent_id: intent_id.to_owned(),
        amount_cents,
        currency: Currency::try_from("USD").unwrap(),
        paid_at: chrono::Utc::now(),
    };
    CommandBus::<domain::order::Order>::new(EventStore::new(app.pool.clone()))
        .execute(order_id, confirm, Metadata::system("test"))
        .await
        .unwrap();
}

/// A buyer's order of two units of a new variant of `stock` units, with a
/// payment intent, marked paid in its events alone (see [`mark_paid`]).
/// Returns the variant, the buyer, the order's id and the intent's id.
async fn order_paid_without_commit(
    app: &TestApp,
    admin: &TestUser,
    stock: u32,
) -> (Uuid, TestUser, String, String) {
    let variant = product_with_stock(app, admin, stock).await;
    let buyer = buyer_with_cart(app, variant, 2).await;
    let order: Value = checkout(app, &buyer, "paid").await.json().await.unwrap();
    let order_id = order["id"].as_str().unwrap().to_owned();
    let intent_id = payment_intent_for(app, &buyer, &order_id, "i").await;
    mark_paid(app, &order_id, &intent_id, 2 * 1999).await;
    (variant, buyer, order_id, intent_id)
}

/// Runs `command` on the variant's stock, as another server process would.
async fn on_stock(app: &TestApp, variant: Uuid, command: domain::inventory::InventoryCommand) {
    CommandBus::<domain::inventory::InventoryItem>::new(EventStore::new(app.pool.clone()))
        .execute(&variant.to_string(), command, Metadata::system("test"))
        .await
        .unwrap();
}

/// Gives the order's units on `variant` back, as the scheduler expiring
/// the order at that moment would.
async fn release_hold(app: &TestApp, variant: Uuid, order_id: &str) {
    let release = domain::inventory::InventoryCommand::Release {
        order_id: order_id.parse().unwrap(),
        reason: domain::inventory::ReleaseReason::Expired,
    };
    on_stock(app, variant, release).await;
}

#[tokio::test]
async fn a_paid_order_whose_commit_failed_has_its_units_committed_at_its_deadline() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 1).await;
    let admin = TestUser::create_admin(&app).await;
    let (variant, buyer, order_id, _) = order_paid_without_commit(&app, &admin, 5).await;

    // Past the one-second deadline the scheduler finds the order paid.
    assert_eq!(
        counts(&released_stock(&app, &admin, variant).await),
        (3, 0, 3),
        "the paid units left the shelf instead of staying held"
    );
    wait_for_status(&app, &buyer, &order_id, "paid").await;
    assert!(stripe.refunds().is_empty());
}

#[tokio::test]
async fn a_paid_order_whose_hold_was_released_takes_its_units_again_when_the_payment_repeats() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 900).await;
    let admin = TestUser::create_admin(&app).await;
    let (variant, buyer, order_id, intent_id) = order_paid_without_commit(&app, &admin, 5).await;
    release_hold(&app, variant, &order_id).await;

    stripe.set_status(&intent_id, "succeeded");
    let delivered = deliver(&app, &stripe, "payment_intent.succeeded", &intent_id).await;
    assert_eq!(delivered.status(), 200);

    wait_for_status(&app, &buyer, &order_id, "paid").await;
    assert!(stripe.refunds().is_empty());
    assert_eq!(counts(&stock(&app, &admin, variant).await), (3, 0, 3));
}

#[tokio::test]
async fn a_paid_order_whose_released_units_were_sold_again_is_refunded_when_the_payment_repeats() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 900).await;
    let admin = TestUser::create_admin(&app).await;
    let (variant, buyer, order_id, intent_id) = order_paid_without_commit(&app, &admin, 2).await;
    release_hold(&app, variant, &order_id).await;
    let quick = buyer_with_cart(&app, variant, 2).await;
    assert_eq!(checkout(&app, &quick, "quick").await.status(), 201);

    stripe.set_status(&intent_id, "succeeded");
    let delivered = deliver(&app, &stripe, "payment_intent.succeeded", &intent_id).await;
    assert_eq!(delivered.status(), 200);

    assert_eq!(
        order_of(&app, &buyer, &order_id).await["status"],
        "refunded"
    );
    let refunds = stripe.refunds();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["payment_intent"], intent_id.as_str());
    assert_eq!(
        counts(&stock(&app, &admin, variant).await),
        (2, 2, 0),
        "the other buyer keeps the units"
    );
}

#[tokio::test]
async fn a_paid_order_that_cannot_keep_every_line_puts_back_what_it_had_sold_and_refunds() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 900).await;
    let admin = TestUser::create_admin(&app).await;
    let plenty = product_with_stock(&app, &admin, 5).await;
    let scarce = product_with_stock(&app, &admin, 1).await;
    let buyer = buyer_with_cart(&app, plenty, 2).await;
    assert_eq!(add_to_cart(&app, &buyer, scarce, 1).await.status(), 200);
    let order: Value = checkout(&app, &buyer, "two").await.json().await.unwrap();
    let order_id = order["id"].as_str().unwrap().to_owned();
    let intent_id = payment_intent_for(&app, &buyer, &order_id, "i").await;
    // A payment got as far as one line; the other's hold was released and
    // its only unit sold to someone else.
    mark_paid(&app, &order_id, &intent_id, 3 * 1999).await;
    let order_uuid: Uuid = order_id.parse().unwrap();
    on_stock(
        &app,
        plenty,
        domain::inventory::InventoryCommand::Commit {
            order_id: order_uuid,
        },
    )
    .await;
    release_hold(&app, scarce, &order_id).await;
    let quick = buyer_with_cart(&app, scarce, 1).await;
    assert_eq!(checkout(&app, &quick, "quick").await.status(), 201);

    stripe.set_status(&intent_id, "succeeded");
    let delivered = deliver(&app, &stripe, "payment_intent.succeeded", &intent_id).await;
    assert_eq!(delivered.status(), 200);

    wait_for_status(&app, &buyer, &order_id, "refunded").await;
    assert_eq!(stripe.refunds().len(), 1);
    assert_eq!(
        counts(&stock(&app, &admin, plenty).await),
        (5, 0, 5),
        "the units sold for a refunded order are back on the shelf"
    );
    assert_eq!(counts(&stock(&app, &admin, scarce).await), (1, 1, 0));
    // Delivered again, it changes nothing.
    let again = deliver(&app, &stripe, "payment_intent.succeeded", &intent_id).await;
    assert_eq!(again.status(), 200);
    assert_eq!(counts(&stock(&app, &admin, plenty).await), (5, 0, 5));
}

/// Makes `writes` ("INSERT", "DELETE", "INSERT OR UPDATE") on `table` in
/// this test's database fail for the rows the trigger condition `rows`
/// picks, as a store that fails at that moment would, until
/// [`stop_refusing`]. Each failing statement rolls back at once: no
/// transaction stays open (one would hold back every test's projections).
async fn refuse_writes(app: &TestApp, writes: &str, table: &str, rows: &str) {
    sqlx::raw_sql(&format!(
        "CREATE OR REPLACE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'the store is down'; END $$; \
         CREATE TRIGGER refuse_writes BEFORE {writes} ON {table} FOR EACH ROW \
         WHEN ({rows}) EXECUTE FUNCTION refuse_writes();"
    ))
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn stop_refusing(app: &TestApp, table: &str) {
    sqlx::raw_sql(&format!("DROP TRIGGER refuse_writes ON {table}"))
        .execute(&app.pool)
        .await
        .unwrap();
}

/// Makes this test's event store refuse events of `event_type`.
async fn refuse_events_of_type(app: &TestApp, event_type: &str) {
    let rows = format!("NEW.event_type = '{event_type}'");
    refuse_writes(app, "INSERT", "events", &rows).await;
}

/// How many times the order's units were reserved.
async fn reservations_of(app: &TestApp, order_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'StockReserved' \
         AND payload -> 'StockReserved' ->> 'order_id' = $1",
    )
    .bind(order_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_refund_made_at_the_provider_but_not_recorded_is_finished_by_the_retry_even_after_a_restock(
) {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe, 1).await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 1).await;
    let late = buyer_with_cart(&app, variant, 1).await;
    let order: Value = checkout(&app, &late, "late").await.json().await.unwrap();
    let order_id = order["id"].as_str().unwrap().to_owned();
    let intent_id = payment_intent_for(&app, &late, &order_id, "i").await;
    wait_for_status(&app, &late, &order_id, "cancelled").await;
    let quick = buyer_with_cart(&app, variant, 1).await;
    assert_eq!(checkout(&app, &quick, "quick").await.status(), 201);
    assert_eq!(reservations_of(&app, &order_id).await, 1);

    // The late payment is refunded at the provider, and then the store
    // fails to record the refund: the webhook is answered 500, so Stripe
    // will deliver it again.
    stripe.set_status(&intent_id, "succeeded");
    refuse_events_of_type(&app, "OrderRefunded").await;
    let first = deliver(&app, &stripe, "payment_intent.succeeded", &intent_id).await;
    assert_eq!(first.status(), 500);
    assert_eq!(stripe.refunds().len(), 1, "the money went back");
    stop_refusing(&app, "events").await;

    // Units arrive before the retry: the money is gone already, so they
    // must not be taken for this order.
    on_stock(
        &app,
        variant,
        domain::inventory::InventoryCommand::AddStock {
            quantity: Quantity::new(5).unwrap(),
            reason: None,
        },
    )
    .await;
    let retry = deliver(&app, &stripe, "payment_intent.succeeded", &intent_id).await;
    assert_eq!(retry.status(), 200);

    assert_eq!(order_of(&app, &late, &order_id).await["status"], "refunded");
    let refunds = stripe.refunds();
    assert_eq!(refunds.len(), 1, "refunded once: {refunds:?}");
    assert_eq!(
        reservations_of(&app, &order_id).await,
        1,
        "no units were taken for a payment that was given back"
    );
}

#[tokio::test]
async fn the_cart_is_served_from_redis_with_current_prices_and_from_postgres_when_redis_is_gone() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let buyer = buyer_with_cart(&app, variant, 2).await;
    let cached_key = format!(
        "{}cart-at-version:{}",
        app.settings.redis_key_prefix, buyer.id
    );
    let mut redis = app.state.redis.connection().unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&cached_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(exists, "the write cached the cart");
    // Read twice, so that the answer rendered from these entries is kept
    // (and served) before the price changes under it.
    for _ in 0..2 {
        let before = cart_of(&app, &buyer).await;
        assert_eq!(before["item_count"], 2);
        assert_ne!(before["subtotal_cents"], 5000);
    }

    // A price change shows in the cached cart at once.
    let product_id = cart_product(&app, variant).await;
    let update = app
        .request(
            Method::PUT,
            &format!("/api/v1/products/update-product/{product_id}"),
        )
        .bearer_auth(&admin.access_token)
        .json(&json!({ "variants": [{ "id": variant, "price_cents": 2500 }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(update.status(), 200);
    let cart = cart_of(&app, &buyer).await;
    assert_eq!(cart["subtotal_cents"], 5000);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&cached_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(exists, "served from the cached cart");

    // Checkout empties the cached cart too.
    assert_eq!(checkout(&app, &buyer, "cached").await.status(), 201);
    let cart = cart_of(&app, &buyer).await;
    assert_eq!(cart["item_count"], 0);

    let without_redis = spawn_app_with(|settings| {
        settings.database_url = app.settings.database_url.clone();
        settings.redis_url = secrecy::SecretString::from("redis://127.0.0.1:1");
    })
    .await;
    add_to_cart(&without_redis, &buyer, variant, 1).await;
    let cart = cart_of(&without_redis, &buyer).await;
    assert_eq!(
        (cart["item_count"].as_i64(), cart["subtotal_cents"].as_i64()),
        (Some(1), Some(2500))
    );
}

/// What a sampler of `pg_locks` saw while a sale ran.
#[derive(Debug, Default)]
struct AdvisoryLocksSeen {
    /// Samples in which some session of the database held an advisory lock.
    samples_with_locks: usize,
    /// The sessions (by `application_name`) seen holding one while idle,
    /// out of any transaction, since before the sample began, and how often.
    idle_holders: std::collections::BTreeMap<String, usize>,
}

/// Samples the advisory locks of `app`'s database until `done` is set.
/// A lock held by a session that went idle before the sample began (and
/// so before its locks were read: the activity is read after them, in the
/// same transaction) is a session-level lock kept between transactions:
/// session state that a transaction-mode pooler would hand, with the
/// server connection, to whichever client runs there next.
async fn advisory_locks_until(
    app: &TestApp,
    done: &std::sync::atomic::AtomicBool,
) -> AdvisoryLocksSeen {
    use sqlx::Connection;
    let mut seen = AdvisoryLocksSeen::default();
    let mut connection = app.pool.acquire().await.unwrap();
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        let mut sample = connection.begin().await.unwrap();
        let began: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *sample)
            .await
            .unwrap();
        let holders: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(&mut *sample)
        .await
        .unwrap();
        if !holders.is_empty() {
            seen.samples_with_locks += 1;
            let idle: Vec<String> = sqlx::query_scalar(
                "SELECT coalesce(application_name, '') FROM pg_stat_activity \
                 WHERE pid = ANY($1) AND state = 'idle' AND state_change < $2",
            )
            .bind(&holders)
            .bind(began)
            .fetch_all(&mut *sample)
            .await
            .unwrap();
            for name in idle {
                *seen.idle_holders.entry(name).or_default() += 1;
            }
        }
        sample.commit().await.unwrap();
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_hold_no_lock_between_transactions_so_a_transaction_pooler_can_carry_them() {
    let first = spawn_app().await;
    let second = spawn_instance_like(&first).await;
    let instances = [&first, &second];
    let admin = TestUser::create_admin(&first).await;
    let hot = product_with_stock(&first, &admin, 40).await;
    let buyers = buyers_with_one_unit(&first, hot, 100).await;

    let done = std::sync::atomic::AtomicBool::new(false);
    let sale = async {
        let answers = futures_util::future::join_all(buyers.iter().enumerate().map(
            |(index, buyer)| async move {
                checkout(instances[index % 2], buyer, "drop")
                    .await
                    .status()
                    .as_u16()
            },
        ))
        .await;
        // And past the projections' leader's next renewal, with no sale.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        done.store(true, std::sync::atomic::Ordering::Release);
        answers
    };
    let (answers, seen) = tokio::join!(sale, advisory_locks_until(&first, &done));

    assert_eq!(answers.iter().filter(|status| **status == 201).count(), 40);
    assert_eq!(answers.iter().filter(|status| **status == 409).count(), 60);
    assert!(
        seen.samples_with_locks > 0,
        "the sampler saw no advisory lock at all: the committers' turns went unseen"
    );
    assert!(
        seen.idle_holders.is_empty(),
        "sessions held advisory locks outside a transaction: {:?}",
        seen.idle_holders
    );
}

async fn cart_product(app: &TestApp, variant_id: Uuid) -> Uuid {
    sqlx::query_scalar("SELECT product_id FROM catalog_variants WHERE id = $1")
        .bind(variant_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_sell_a_restocked_drop_once_and_answer_with_what_they_stored() {
    let first = spawn_app().await;
    let instances = [
        &first,
        &spawn_instance_like(&first).await,
        &spawn_instance_like(&first).await,
    ];
    let admin = TestUser::create_admin(&first).await;
    let hot = product_with_stock(&first, &admin, 30).await;
    let plenty = product_with_stock(&first, &admin, 1_000).await;
    // Every third buyer also wants a unit of a variant that never runs out:
    // a checkout is all lines or none, so those who lose hold nothing there.
    let mut buyers = Vec::new();
    for index in 0..120 {
        let buyer = buyer_with_cart(&first, hot, 1).await;
        if index % 3 == 0 {
            assert_eq!(add_to_cart(&first, &buyer, plenty, 2).await.status(), 200);
        }
        buyers.push(buyer);
    }

    // Restocks go through the command bus, which takes no item lock: the
    // committers' batches conflict with them and are decided again.
    let restocks = async {
        for _ in 0..10 {
            let response = first
                .post_json_as(
                    "/api/v1/stock/add-stock",
                    &admin.access_token,
                    &json!({ "variant_id": hot, "quantity": 1 }),
                )
                .await;
            assert_eq!(response.status(), 200, "add-stock");
        }
    };
    let checkouts = futures_util::future::join_all(buyers.iter().enumerate().map(
        |(index, buyer)| async move {
            let response = checkout(instances[index % 3], buyer, "drop").await;
            let status = response.status().as_u16();
            (index, status, response.json::<Value>().await.unwrap())
        },
    ));
    let (answers, ()) = tokio::join!(checkouts, restocks);

    let mut sold = 0;
    let mut plenty_held = 0;
    for (index, status, body) in &answers {
        let buyer = &buyers[*index];
        // Read back through another instance than the one that answered.
        let reader = instances[(index + 1) % 3];
        let cart = cart_of(reader, buyer).await;
        match status {
            201 => {
                sold += 1;
                let wanted = if index % 3 == 0 { 2 } else { 1 };
                assert_eq!(body["items"].as_array().unwrap().len(), wanted);
                if index % 3 == 0 {
                    plenty_held += 2;
                }
                let order_id = body["id"].as_str().unwrap();
                let stored = order_of(reader, buyer, order_id).await;
                assert_eq!(&stored, body, "the answer is what the read model shows");
                assert_eq!(cart["item_count"], 0, "a winner's cart is empty at once");
            }
            409 => {
                assert_eq!(body["code"], "insufficient_stock");
                let short = body["lines"].as_array().unwrap();
                assert_eq!(short.len(), 1, "only the hot line is short: {body}");
                assert_eq!(short[0]["variant_id"], hot.to_string());
                assert_ne!(cart["item_count"], 0, "a loser keeps the cart");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    let restocked = counts(&stock(&first, &admin, hot).await);
    assert_eq!(restocked.0, 40, "30 units plus 10 restocked");
    // The restocks raced the sale: the sale took what was there when each
    // batch was decided, never more.
    assert_eq!(restocked.1, sold, "every 201 holds one hot unit");
    assert_eq!(restocked.0, restocked.1 + restocked.2);
    assert!(
        sold >= 30,
        "at least the first 30 units were sold, got {sold}"
    );
    assert_eq!(
        counts(&stock(&first, &admin, plenty).await),
        (1_000, plenty_held, 1_000 - plenty_held),
        "nothing held on the plentiful line by a checkout that lost"
    );
}

#[tokio::test]
async fn a_checkout_whose_cached_cart_is_behind_the_cart_orders_what_the_cart_holds() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 10).await;
    let buyer = buyer_with_cart(&app, variant, 1).await;
    // Another writer (here: a bus of our own, as another instance's would
    // be) changes the cart without refreshing the cached copy, which still
    // says one unit.
    let carts = commerce::event_store::CommandBus::<domain::cart::Cart>::new(
        commerce::event_store::EventStore::new(app.pool.clone()),
    );
    carts
        .execute(
            &buyer.id.to_string(),
            domain::cart::CartCommand::SetQuantity {
                variant_id: variant,
                quantity: 3,
            },
            commerce::event_store::Metadata::system("test"),
        )
        .await
        .unwrap();

    let response = checkout(&app, &buyer, "behind").await;
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["items"][0]["quantity"], 3, "{order}");
    assert_eq!(order["total_cents"], 3 * 1999);
    assert_eq!(counts(&stock(&app, &admin, variant).await), (10, 3, 7));
}

/// A committer of the test's own, which keeps its copies of the items it
/// sold from one batch to the next, as every committer does.
fn committer_of_its_own(app: &TestApp) -> CheckoutCommitter {
    let (committer, committing) = CheckoutCommitter::new(
        EventStore::new(app.pool.clone()),
        VersionedCache::disabled(),
    );
    tokio::spawn(committing);
    committer
}

/// A checkout of one unit of `variant_id` for a buyer whose cart holds
/// that one unit at version 1 (their one `add-cart`), as a handler that
/// read the cart hands it over.
async fn one_unit_request(app: &TestApp, buyer: &TestUser, variant_id: Uuid) -> CheckoutRequest {
    let usd = Currency::try_from("USD").unwrap();
    let now = chrono::Utc::now();
    CheckoutRequest {
        order_id: Uuid::new_v4(),
        user_id: buyer.id,
        lines: vec![NewOrderLine {
            variant_id,
            sku: Sku::try_from("SKU-HELD").unwrap(),
            product_id: cart_product(app, variant_id).await,
            product_name: Name::try_from("Limited sneaker").unwrap(),
            unit_price: Money::new(1999, usd.clone()).unwrap(),
            quantity: Quantity::new(1).unwrap(),
        }],
        currency: usd,
        placed_at: now,
        expires_at: now + chrono::Duration::minutes(15),
        cart_version: Some(1),
        metadata: Metadata::user(buyer.id, "test"),
        key: None,
    }
}

/// A committer sells one of `stock` units to a first buyer; an admin then
/// changes the stock through `stock_route` (the command bus, which takes no
/// item lock, so the committer's copy of the item is left behind); a second
/// buyer checks out one unit with that committer. Returns the second checkout's outcome and
/// the stock as its events give it afterwards.
async fn second_checkout_after_a_stock_change_behind_the_committer(
    stock_units: u32,
    stock_route: &str,
    change: impl FnOnce(Uuid) -> Value,
) -> (Result<CheckoutOutcome, CheckoutError>, (u64, u64, u64)) {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, stock_units).await;
    let first = buyer_with_cart(&app, variant, 1).await;
    let second = buyer_with_cart(&app, variant, 1).await;
    let committer = committer_of_its_own(&app);

    let sold = committer
        .check_out(one_unit_request(&app, &first, variant).await)
        .await;
    assert!(
        matches!(sold.outcome, Ok(CheckoutOutcome::Placed { .. })),
        "{sold:?}"
    );
    let response = app
        .post_json_as(stock_route, &admin.access_token, &change(variant))
        .await;
    assert_eq!(response.status(), 200, "{stock_route}");

    let answer = committer
        .check_out(one_unit_request(&app, &second, variant).await)
        .await;
    (answer.outcome, counts(&stock(&app, &admin, variant).await))
}

#[tokio::test]
async fn a_checkout_without_lines_is_answered_as_an_empty_cart_not_failed() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 1).await;
    let buyer = buyer_with_cart(&app, variant, 1).await;
    let mut request = one_unit_request(&app, &buyer, variant).await;
    request.lines.clear();

    let answer = committer_of_its_own(&app).check_out(request).await;
    assert!(
        matches!(answer.outcome, Ok(CheckoutOutcome::CartEmpty)),
        "{answer:?}"
    );
    assert_eq!(counts(&stock(&app, &admin, variant).await), (1, 0, 1));
}

#[tokio::test]
async fn a_committer_between_batches_refuses_only_on_stock_as_stored() {
    // The only unit is sold; a restock brings one more.
    let (outcome, stock) = second_checkout_after_a_stock_change_behind_the_committer(
        1,
        "/api/v1/stock/add-stock",
        |variant| json!({ "variant_id": variant, "quantity": 1 }),
    )
    .await;
    assert!(
        matches!(outcome, Ok(CheckoutOutcome::Placed { .. })),
        "the restocked unit is sold, not refused on the committer's copy: {outcome:?}"
    );
    assert_eq!(stock, (2, 2, 0));
}

#[tokio::test]
async fn a_committer_between_batches_sells_nothing_taken_away_meanwhile() {
    // One of two units is sold; the other is written off.
    let (outcome, stock) = second_checkout_after_a_stock_change_behind_the_committer(
        2,
        "/api/v1/stock/update-stock",
        |variant| json!({ "variant_id": variant, "on_hand": 1 }),
    )
    .await;
    assert!(
        matches!(outcome, Ok(CheckoutOutcome::Short(_))),
        "the events' key turns the stale copy into a conflict, decided again: {outcome:?}"
    );
    assert_eq!(stock, (1, 1, 0));
}

#[tokio::test]
async fn a_buyers_order_list_waits_for_the_order_just_placed() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 5).await;
    let buyer = buyer_with_cart(&app, variant, 1).await;

    // A transaction with an id holds every projection below it: the order
    // is stored and answered, but the orders read model cannot have it
    // until this commits.
    let mut horizon = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *horizon)
        .await
        .unwrap();
    let placed = checkout(&app, &buyer, "wait-for-me").await;
    assert_eq!(placed.status(), 201);
    let order: Value = placed.json().await.unwrap();

    let listing = tokio::spawn({
        let api = app.api.clone();
        let url = app.url("/api/v1/orders/my-orders");
        let token = buyer.access_token.clone();
        async move {
            let response = api.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!listing.is_finished(), "the list waits for the read model");
    horizon.commit().await.unwrap();
    let listing = listing.await.unwrap();
    assert_eq!(listing["page"]["total"], 1);
    assert_eq!(listing["items"][0]["id"], order["id"]);
}

/// The buyer's order list waits for the cart's last event, not for the
/// order's own (`shop::orders`), which is only right while every order is
/// stored before its cart's checkout, in the same transaction.
#[tokio::test]
async fn every_order_is_stored_before_the_checkout_of_its_buyers_cart() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant = product_with_stock(&app, &admin, 40).await;
    let buyers = buyers_with_one_unit(&app, variant, 40).await;
    let responses = check_out_at_once(&app, &buyers).await;
    assert!(responses.iter().all(|r| r.status() == 201));

    let (orders, covered): (i64, i64) = sqlx::query_as(
        "SELECT count(*), \
                count(*) FILTER (WHERE c.txid = o.txid AND c.position > o.position \
                                   AND c.aggregate_id = o.payload->'OrderPlaced'->>'user_id') \
         FROM events o \
         LEFT JOIN events c ON c.aggregate_type = 'Cart' AND c.event_type = 'CartCheckedOut' \
                           AND c.payload->'CartCheckedOut'->>'order_id' = o.aggregate_id \
         WHERE o.event_type = 'OrderPlaced'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(orders, 40);
    assert_eq!(covered, 40, "each order precedes its cart's checkout");
}
