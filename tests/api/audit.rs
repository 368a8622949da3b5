//! The audit API: events in global order, stock as it stood at a moment,
//! and an order's history with who did what and why.

use std::time::Duration;

use chrono::Utc;
use commerce::auth::tokens::AccessTokens;
use commerce::auth::Role;
use commerce::event_store::{CommandBus, EventStore, Metadata};
use domain::inventory::{InventoryCommand, InventoryItem, ReleaseReason};
use domain::values::{Quantity, Sku};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{problem, spawn_app, TestApp, TEST_JWT_SECRET};

/// An admin's access token (tokens are checked statelessly).
fn admin_token() -> String {
    let tokens = AccessTokens::new(
        &secrecy::SecretString::from(TEST_JWT_SECRET),
        Duration::from_secs(300),
    );
    tokens
        .issue(Uuid::new_v4(), Role::Admin, Uuid::new_v4(), Utc::now())
        .unwrap()
}

fn inventory(app: &TestApp) -> CommandBus<InventoryItem> {
    CommandBus::new(EventStore::new(app.pool.clone()))
}

/// Waits until `count` events are readable: the audit API shows events only
/// once every older transaction (in any database of the cluster) finished.
async fn wait_until_visible(app: &TestApp, token: &str, count: usize) {
    for _ in 0..200 {
        let page: Value = app
            .get_as("/api/v1/audit/events?limit=1000", token)
            .await
            .json()
            .await
            .unwrap();
        if page["items"]
            .as_array()
            .is_some_and(|items| items.len() >= count)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{count} events never became visible");
}

fn quantity(units: u32) -> Quantity {
    Quantity::new(units).unwrap()
}

async fn stock_item(app: &TestApp, initial: u32) -> Uuid {
    let variant_id = Uuid::new_v4();
    let register = InventoryCommand::Register {
        variant_id,
        sku: Sku::try_from(format!("SKU-{}", &variant_id.simple().to_string()[..8])).unwrap(),
        initial_on_hand: initial,
    };
    inventory(app)
        .execute(&variant_id.to_string(), register, Metadata::system("test"))
        .await
        .unwrap();
    variant_id
}

#[tokio::test]
async fn paging_through_events_returns_each_once_in_global_order() {
    let app = spawn_app().await;
    for _ in 0..7 {
        stock_item(&app, 1).await;
    }
    let token = admin_token();
    wait_until_visible(&app, &token, 7).await;

    let mut seen = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(position) => format!("/api/v1/audit/events?limit=3&after={position}"),
            None => "/api/v1/audit/events?limit=3".to_owned(),
        };
        let page: Value = app.get_as(&path, &token).await.json().await.unwrap();
        let items = page["items"].as_array().unwrap().clone();
        if items.is_empty() {
            assert!(page["next_after"].is_null());
            break;
        }
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|item| item["position"].as_i64().unwrap()));
        after = page["next_after"].as_i64();
    }

    assert_eq!(seen.len(), 7);
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 7, "no event twice");
}

#[tokio::test]
async fn events_can_be_filtered_by_aggregate() {
    let app = spawn_app().await;
    let wanted = stock_item(&app, 3).await;
    stock_item(&app, 4).await;
    let token = admin_token();
    wait_until_visible(&app, &token, 2).await;

    let page: Value = app
        .get_as(
            &format!("/api/v1/audit/events?aggregate_type=InventoryItem&aggregate_id={wanted}"),
            &token,
        )
        .await
        .json()
        .await
        .unwrap();

    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["aggregate_id"], wanted.to_string());
    assert_eq!(items[0]["event_type"], "ItemRegistered");
    assert_eq!(items[0]["metadata"]["actor"], "system");
}

#[tokio::test]
async fn bad_audit_queries_are_problems() {
    let app = spawn_app().await;
    let token = admin_token();
    problem(
        app.get_as("/api/v1/audit/events?limit=0", &token).await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        app.get_as("/api/v1/audit/events?after=abc", &token).await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        app.get_as("/api/v1/audit/events?after=999999", &token)
            .await,
        404,
        "not_found",
    )
    .await;
    problem(
        app.get_as("/api/v1/audit/inventory/not-a-uuid", &token)
            .await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        app.get_as(
            &format!("/api/v1/audit/inventory/{}", Uuid::new_v4()),
            &token,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    problem(
        app.get_as(
            "/api/v1/audit/inventory/00000000-0000-0000-0000-000000000000?at=yesterday",
            &token,
        )
        .await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        app.get_as(&format!("/api/v1/audit/orders/{}", Uuid::new_v4()), &token)
            .await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn stock_can_be_read_as_it_stood_before_a_restock_and_after_a_checkout() {
    let app = spawn_app().await;
    let token = admin_token();
    let variant_id = stock_item(&app, 10).await;
    let id = variant_id.to_string();
    let bus = inventory(&app);
    tokio::time::sleep(Duration::from_millis(30)).await;
    bus.execute(
        &id,
        InventoryCommand::AddStock {
            quantity: quantity(5),
            reason: None,
        },
        Metadata::system("t"),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let order_id = Uuid::new_v4();
    bus.execute(
        &id,
        InventoryCommand::Reserve {
            order_id,
            quantity: quantity(3),
        },
        Metadata::system("t"),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    bus.execute(
        &id,
        InventoryCommand::Release {
            order_id,
            reason: ReleaseReason::Expired,
        },
        Metadata::system("t"),
    )
    .await
    .unwrap();
    let history: Value = app
        .get_as(&format!("/api/v1/audit/inventory/{variant_id}"), &token)
        .await
        .json()
        .await
        .unwrap();
    let times: Vec<String> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["recorded_at"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(times.len(), 4);

    let at = |time: &str| {
        let path = format!(
            "/api/v1/audit/inventory/{variant_id}?at={}",
            time.replace('+', "%2B")
        );
        let app = &app;
        let token = token.clone();
        async move {
            app.get_as(&path, &token)
                .await
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let before_restock = at(&times[0]).await;
    let after_checkout = at(&times[2]).await;
    let now = at(&times[3]).await;

    assert_eq!(
        (
            before_restock["on_hand"].as_u64(),
            before_restock["reserved"].as_u64()
        ),
        (Some(10), Some(0))
    );
    assert_eq!(before_restock["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        (
            after_checkout["on_hand"].as_u64(),
            after_checkout["reserved"].as_u64(),
            after_checkout["available"].as_u64()
        ),
        (Some(15), Some(3), Some(12))
    );
    assert_eq!(
        (now["reserved"].as_u64(), now["available"].as_u64()),
        (Some(0), Some(15))
    );
}
