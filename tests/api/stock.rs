//! Stock: the admin's stock writes, the public stock level, the repair of
//! `reserved` from the events, and a hot item under 100 concurrent buyers.

use std::time::Duration;

use commerce::event_store::{CommandBus, CommandError, Metadata};
use cqrs_es::Aggregate;
use domain::inventory::{InventoryCommand, InventoryError, InventoryItem};
use domain::values::Quantity;
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::catalog::{create_product, product_body, send_as, unique_sku};
use crate::helpers::{new_client, problem, spawn_app, TestApp};
use crate::users::TestUser;

/// A product with one variant holding `stock` units; returns the variant id.
async fn variant_with_stock(app: &TestApp, admin: &TestUser, name: &str, stock: i64) -> String {
    let mut body = product_body(name, &[(&unique_sku(), 1000)]);
    body["variants"][0]["initial_stock"] = json!(stock);
    let product = create_product(app, admin, &body).await;
    product["variants"][0]["id"].as_str().unwrap().to_owned()
}

async fn stock_post(
    app: &TestApp,
    admin: &TestUser,
    route: &str,
    body: &Value,
) -> reqwest::Response {
    send_as(
        app,
        Method::POST,
        &format!("/api/v1/stock/{route}"),
        &admin.access_token,
        Some(body),
    )
    .await
}

fn reserve(order_id: Uuid) -> InventoryCommand {
    InventoryCommand::Reserve {
        order_id,
        quantity: Quantity::new(1).unwrap(),
    }
}

#[tokio::test]
async fn add_and_update_stock_answer_the_new_level() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant_id = variant_with_stock(&app, &admin, "Stock Pot", 2).await;

    let added = stock_post(
        &app,
        &admin,
        "add-stock",
        &json!({"variant_id": variant_id, "quantity": 8, "reason": "delivery"}),
    )
    .await;
    let counted = stock_post(
        &app,
        &admin,
        "update-stock",
        &json!({"variant_id": variant_id, "on_hand": 7}),
    )
    .await;
    let public: Value = new_client()
        .get(app.url(&format!("/api/v1/stock/get-stock-level/{variant_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let product: Value = app
        .get("/api/v1/products/get-product/stock-pot")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(added.status(), 200);
    let added: Value = added.json().await.unwrap();
    assert_eq!(
        (
            added["on_hand"].as_i64(),
            added["reserved"].as_i64(),
            added["available"].as_i64()
        ),
        (Some(10), Some(0), Some(10))
    );
    assert_eq!(counted.status(), 200);
    assert_eq!(counted.json::<Value>().await.unwrap()["on_hand"], 7);
    assert_eq!(public["available"], 7);
    assert_eq!(public["in_stock"], true);
    assert!(public["sku"].is_string());
    assert!(
        public.get("on_hand").is_none() && public.get("reserved").is_none(),
        "{public}"
    );
    assert_eq!(
        product["variants"][0]["stock"],
        json!({"available": 7, "in_stock": true})
    );
}

#[tokio::test]
async fn stock_routes_refuse_bad_input() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant_id = variant_with_stock(&app, &admin, "Bad Input Jar", 1).await;
    let unknown = Uuid::new_v4();

    let zero = stock_post(
        &app,
        &admin,
        "add-stock",
        &json!({"variant_id": variant_id, "quantity": 0}),
    )
    .await;
    let negative = stock_post(
        &app,
        &admin,
        "add-stock",
        &json!({"variant_id": variant_id, "quantity": -4}),
    )
    .await;
    let too_many = stock_post(
        &app,
        &admin,
        "add-stock",
        &json!({"variant_id": variant_id, "quantity": 10_001}),
    )
    .await;
    let unknown_add = stock_post(
        &app,
        &admin,
        "add-stock",
        &json!({"variant_id": unknown, "quantity": 1}),
    )
    .await;
    let malformed_id = stock_post(
        &app,
        &admin,
        "add-stock",
        &json!({"variant_id": "nope", "quantity": 1}),
    )
    .await;
    let negative_count = stock_post(
        &app,
        &admin,
        "update-stock",
        &json!({"variant_id": variant_id, "on_hand": -1}),
    )
    .await;
    let unknown_count = stock_post(
        &app,
        &admin,
        "update-stock",
        &json!({"variant_id": unknown, "on_hand": 3}),
    )
    .await;
    let unknown_sync = stock_post(
        &app,
        &admin,
        "sync-reserved-stock",
        &json!({"variant_id": unknown}),
    )
    .await;
    let unknown_level = app
        .get(&format!("/api/v1/stock/get-stock-level/{unknown}"))
        .await;
    let malformed_level = app.get("/api/v1/stock/get-stock-level/not-a-uuid").await;
    let customer = TestUser::register_customer(&app).await;
    let as_customer = send_as(
        &app,
        Method::POST,
        "/api/v1/stock/add-stock",
        &customer.access_token,
        Some(&json!({"variant_id": variant_id, "quantity": 1})),
    )
    .await;

    assert_eq!(
        problem(zero, 422, "validation_failed").await["errors"][0]["field"],
        "quantity"
    );
    assert_eq!(
        problem(negative, 422, "validation_failed").await["errors"][0]["field"],
        "quantity"
    );
    assert_eq!(
        problem(too_many, 422, "validation_failed").await["errors"][0]["field"],
        "quantity"
    );
    problem(unknown_add, 404, "not_found").await;
    problem(malformed_id, 422, "validation_failed").await;
    assert_eq!(
        problem(negative_count, 422, "validation_failed").await["errors"][0]["field"],
        "on_hand"
    );
    problem(unknown_count, 404, "not_found").await;
    problem(unknown_sync, 404, "not_found").await;
    problem(unknown_level, 404, "not_found").await;
    problem(malformed_level, 400, "validation_failed").await;
    problem(as_customer, 403, "forbidden").await;
}

#[tokio::test]
async fn on_hand_cannot_be_set_below_what_is_reserved() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant_id = variant_with_stock(&app, &admin, "Reserved Rug", 5).await;
    let bus = CommandBus::<InventoryItem>::new(app.state.store.clone());
    for _ in 0..3 {
        bus.execute(
            &variant_id,
            reserve(Uuid::new_v4()),
            Metadata::system("test"),
        )
        .await
        .expect("reserved");
    }

    let below = stock_post(
        &app,
        &admin,
        "update-stock",
        &json!({"variant_id": variant_id, "on_hand": 2}),
    )
    .await;
    let at = stock_post(
        &app,
        &admin,
        "update-stock",
        &json!({"variant_id": variant_id, "on_hand": 3}),
    )
    .await;

    problem(below, 409, "conflict").await;
    assert_eq!(at.status(), 200);
    let at: Value = at.json().await.unwrap();
    assert_eq!(
        (
            at["on_hand"].as_i64(),
            at["reserved"].as_i64(),
            at["available"].as_i64()
        ),
        (Some(3), Some(3), Some(0))
    );
    let admin_view: Value = app
        .get_as(
            &format!("/api/v1/stock/get-stock-level/{variant_id}"),
            &admin.access_token,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(admin_view["reserved"], 3);
    assert_eq!(admin_view["in_stock"], false);
}

#[tokio::test]
async fn sync_reserved_stock_repairs_a_read_model_that_disagrees_with_the_events() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let broken = variant_with_stock(&app, &admin, "Broken Bench", 10).await;
    let healthy = variant_with_stock(&app, &admin, "Healthy Bench", 10).await;
    let bus = CommandBus::<InventoryItem>::new(app.state.store.clone());
    let executed = bus
        .execute(&broken, reserve(Uuid::new_v4()), Metadata::system("test"))
        .await
        .expect("reserved");
    app.state
        .projections
        .wait_for(
            projections::stock::NAME,
            executed.position.unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let broken_id: Uuid = broken.parse().unwrap();
    sqlx::query("UPDATE stock_levels SET reserved = 7 WHERE variant_id = $1")
        .bind(broken_id)
        .execute(&app.pool)
        .await
        .unwrap();

    let one = stock_post(
        &app,
        &admin,
        "sync-reserved-stock",
        &json!({"variant_id": healthy}),
    )
    .await;
    let all = stock_post(&app, &admin, "sync-reserved-stock", &json!({})).await;
    let again = stock_post(&app, &admin, "sync-reserved-stock", &json!({})).await;
    let level: Value = app
        .get_as(
            &format!("/api/v1/stock/get-stock-level/{broken}"),
            &admin.access_token,
        )
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(
        one.json::<Value>().await.unwrap(),
        json!({"checked": 1, "corrected": []})
    );
    assert_eq!(
        all.json::<Value>().await.unwrap(),
        json!({"checked": 2, "corrected": [{"variant_id": broken, "before": 7, "after": 1}]})
    );
    assert_eq!(again.json::<Value>().await.unwrap()["corrected"], json!([]));
    assert_eq!(
        (level["reserved"].as_i64(), level["available"].as_i64()),
        (Some(1), Some(9))
    );
}

#[tokio::test]
async fn a_hundred_buyers_for_thirty_units_get_exactly_thirty_reservations() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let variant_id = variant_with_stock(&app, &admin, "Limited Sneaker", 30).await;
    let bus = CommandBus::<InventoryItem>::new(app.state.store.clone());

    let attempts = (0..100).map(|_| {
        let bus = bus.clone();
        let variant_id = variant_id.clone();
        async move {
            bus.execute(
                &variant_id,
                reserve(Uuid::new_v4()),
                Metadata::system("flash-sale"),
            )
            .await
        }
    });
    let outcomes = join_all(attempts).await;

    let won: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    let refused = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                Err(CommandError::Rejected(
                    InventoryError::InsufficientStock { .. }
                ))
            )
        })
        .count();
    assert_eq!((won.len(), refused), (30, 70));
    // Conservation in the events: on_hand = available + reserved.
    let mut item = InventoryItem::default();
    for event in app
        .state
        .store
        .load_after(InventoryItem::TYPE, &variant_id, 0)
        .await
        .unwrap()
    {
        item.apply(event.decode().unwrap());
    }
    assert_eq!(
        (item.on_hand(), item.reserved(), item.available()),
        (30, 30, 0)
    );
    assert_eq!(item.reservations().len(), 30);
    assert_eq!(item.on_hand(), item.available() + item.reserved());
    // And in the read model once the projection has caught up.
    let last = won.iter().filter_map(|e| e.position).max().unwrap();
    app.state
        .projections
        .wait_for(projections::stock::NAME, last, Duration::from_secs(5))
        .await
        .unwrap();
    let (on_hand, reserved): (i64, i64) =
        sqlx::query_as("SELECT on_hand, reserved FROM stock_levels WHERE variant_id = $1")
            .bind(variant_id.parse::<Uuid>().unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((on_hand, reserved), (30, 30));
    let public: Value = app
        .get(&format!("/api/v1/stock/get-stock-level/{variant_id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(public["available"], 0);
    assert_eq!(public["in_stock"], false);
}
