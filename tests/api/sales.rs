//! Sales figures: a scripted history of orders, with event times chosen by
//! the test, must give exactly the figures worked out by hand, hour and day
//! buckets must split at their boundaries, and a run through HTTP must be
//! counted as it happened.

use std::time::Duration;

use chrono::{DateTime, Utc};
use commerce::event_store::{CommandBus, Metadata};
use domain::order::{CancelReason, NewOrderLine, Order, OrderCommand};
use domain::values::{Currency, Money, Name, Quantity, Sku};
use projections::Projection;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::fake_stripe::FakeStripe;
use crate::helpers::{problem, spawn_app, spawn_app_from, TestApp};
use crate::shop_support::{
    customer_order, deliver_webhook, fake_pay, instance_with_hold, payment_intent, post_with_key,
    settle_projections, stocked_product, stripe_app, wait_for_status,
};
use crate::users::TestUser;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("a valid test time")
        .with_timezone(&Utc)
}

/// A product of the script, sold at one price.
struct Item {
    product_id: Uuid,
    variant_id: Uuid,
    name: &'static str,
    price_cents: i64,
    currency: &'static str,
}

impl Item {
    fn new(name: &'static str, price_cents: i64, currency: &'static str) -> Self {
        Self {
            product_id: Uuid::new_v4(),
            variant_id: Uuid::new_v4(),
            name,
            price_cents,
            currency,
        }
    }
}

/// Writes Order events straight through the command bus, with the times
/// the script chooses: the sales projection reads nothing but events, so
/// this is a history like any other.
struct Script {
    orders: CommandBus<Order>,
}

impl Script {
    fn new(app: &TestApp) -> Self {
        Self {
            orders: CommandBus::new(app.state.store.clone()),
        }
    }

    async fn run(&self, order_id: Uuid, command: OrderCommand) {
        self.orders
            .execute(
                &order_id.to_string(),
                command,
                Metadata::system("sales-script"),
            )
            .await
            .unwrap_or_else(|error| panic!("order {order_id}: {error:?}"));
    }

    async fn place(&self, lines: &[(&Item, u32)], placed_at: &str) -> Uuid {
        let order_id = Uuid::new_v4();
        let currency = Currency::try_from(lines[0].0.currency.to_owned()).expect("a currency");
        let new_lines = lines
            .iter()
            .map(|(item, quantity)| NewOrderLine {
                variant_id: item.variant_id,
                sku: Sku::try_from(format!("SKU-{}", item.name)).expect("a SKU"),
                product_id: item.product_id,
                product_name: Name::try_from(item.name.to_owned()).expect("a name"),
                unit_price: Money::new(item.price_cents, currency.clone()).expect("a price"),
                quantity: Quantity::new(*quantity).expect("a quantity"),
            })
            .collect();
        let placed_at = at(placed_at);
        let place = OrderCommand::Place {
            order_id,
            user_id: Uuid::new_v4(),
            lines: new_lines,
            currency,
            placed_at,
            expires_at: placed_at + chrono::Duration::minutes(15),
        };
        self.run(order_id, place).await;
        order_id
    }

    async fn pay(&self, order_id: Uuid, amount_cents: i64, currency: &str, paid_at: &str) {
        let pay = OrderCommand::ConfirmPayment {
            payment_intent_id: format!("pi_{order_id}"),
            amount_cents,
            currency: Currency::try_from(currency.to_owned()).expect("a currency"),
            paid_at: at(paid_at),
        };
        self.run(order_id, pay).await;
    }

    async fn pay_late(&self, order_id: Uuid, amount_cents: i64, paid_at: &str) {
        let pay = OrderCommand::HonourLatePayment {
            payment_intent_id: format!("pi_{order_id}"),
            amount_cents,
            currency: Currency::try_from("USD".to_owned()).expect("a currency"),
            paid_at: at(paid_at),
        };
        self.run(order_id, pay).await;
    }

    async fn cancel(&self, order_id: Uuid, reason: CancelReason, cancelled_at: &str) {
        let cancel = OrderCommand::Cancel {
            reason,
            cancelled_at: at(cancelled_at),
        };
        self.run(order_id, cancel).await;
    }

    async fn refund(&self, order_id: Uuid, amount_cents: i64, refunded_at: &str) {
        let refund = OrderCommand::Refund {
            payment_intent_id: format!("pi_{order_id}"),
            refund_id: format!("re_{}", Uuid::new_v4().simple()),
            amount_cents,
            refunded_at: at(refunded_at),
        };
        self.run(order_id, refund).await;
    }
}

/// The scripted history. Day one is 2024-05-06 (UTC), day two the 7th.
///
/// | order | placed | lines | then |
/// |---|---|---|---|
/// | o1 | d1 10:05 | A×2 + B×1 = 4500 | paid 10:20 |
/// | o2 | d1 10:59:59.999 | A×1 = 1000 | paid 11:00:00.000 (next hour) |
/// | o3 | d1 11:30 | B×2 = 5000 | payment failed 11:40 |
/// | o4 | d1 23:50 | A×3 = 3000 | expired d2 00:05 (next day) |
/// | o5 | d1 12:00 | B×1 = 2500 | paid 12:10, refunded in full d2 01:00 |
/// | o6 | d1 13:00 | A×1 = 1000 | expired 13:15, paid late 13:30 |
/// | o7 | d1 14:00 | A×1 = 1000 | expired 14:15; a late payment refunded 14:20 |
/// | o8 | d1 10:10 | C×1 = 900 EUR | paid 10:15 (another currency) |
/// | o9 | d1 15:00 | B×2 = 5000 | paid 15:05, 1000 refunded 15:30 |
async fn scripted_history(app: &TestApp) -> (Item, Item) {
    let a = Item::new("Alpha", 1000, "USD");
    let b = Item::new("Beta", 2500, "USD");
    let c = Item::new("Gamma", 900, "EUR");
    let script = Script::new(app);

    let o1 = script
        .place(&[(&a, 2), (&b, 1)], "2024-05-06T10:05:00Z")
        .await;
    script.pay(o1, 4500, "USD", "2024-05-06T10:20:00Z").await;
    let o2 = script.place(&[(&a, 1)], "2024-05-06T10:59:59.999Z").await;
    script.pay(o2, 1000, "USD", "2024-05-06T11:00:00Z").await;
    let o3 = script.place(&[(&b, 2)], "2024-05-06T11:30:00Z").await;
    script
        .run(
            o3,
            OrderCommand::StartPayment {
                payment_intent_id: format!("pi_{o3}"),
                provider: "fake".into(),
                started_at: at("2024-05-06T11:31:00Z"),
            },
        )
        .await;
    script
        .cancel(o3, CancelReason::PaymentFailed, "2024-05-06T11:40:00Z")
        .await;
    let o4 = script.place(&[(&a, 3)], "2024-05-06T23:50:00Z").await;
    script
        .cancel(o4, CancelReason::Expired, "2024-05-07T00:05:00Z")
        .await;
    let o5 = script.place(&[(&b, 1)], "2024-05-06T12:00:00Z").await;
    script.pay(o5, 2500, "USD", "2024-05-06T12:10:00Z").await;
    script.refund(o5, 2500, "2024-05-07T01:00:00Z").await;
    let o6 = script.place(&[(&a, 1)], "2024-05-06T13:00:00Z").await;
    script
        .cancel(o6, CancelReason::Expired, "2024-05-06T13:15:00Z")
        .await;
    script.pay_late(o6, 1000, "2024-05-06T13:30:00Z").await;
    let o7 = script.place(&[(&a, 1)], "2024-05-06T14:00:00Z").await;
    script
        .cancel(o7, CancelReason::Expired, "2024-05-06T14:15:00Z")
        .await;
    script.refund(o7, 1000, "2024-05-06T14:20:00Z").await;
    let o8 = script.place(&[(&c, 1)], "2024-05-06T10:10:00Z").await;
    script.pay(o8, 900, "EUR", "2024-05-06T10:15:00Z").await;
    let o9 = script.place(&[(&b, 2)], "2024-05-06T15:00:00Z").await;
    script.pay(o9, 5000, "USD", "2024-05-06T15:05:00Z").await;
    script.refund(o9, 1000, "2024-05-06T15:30:00Z").await;

    settle_projections(app).await;
    (a, b)
}

async fn admin_get(app: &TestApp, admin: &TestUser, path: &str) -> Value {
    let response = app.get_as(path, &admin.access_token).await;
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.expect("JSON body")
}

fn summary_path(from: &str, to: &str) -> String {
    format!("/api/v1/sales/summary?from={from}&to={to}")
}

/// The figures of a summary that the script decides, in a fixed order.
fn figures(summary: &Value) -> Vec<(String, Value)> {
    [
        "revenue_cents",
        "currency",
        "orders_paid",
        "units_sold",
        "average_order_cents",
        "orders_cancelled",
        "orders_expired",
        "orders_refunded",
        "refunded_cents",
        "holds_placed",
        "holds_converted",
        "holds_expired",
        "conversion_rate",
    ]
    .iter()
    .map(|field| (field.to_string(), summary[*field].clone()))
    .collect()
}

fn expected(values: Value) -> Vec<(String, Value)> {
    figures(&values)
}

#[tokio::test]
async fn sales_figures_equal_the_figures_worked_out_by_hand_from_the_script() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    scripted_history(&app).await;

    let day_one = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-06T00:00:00Z", "2024-05-07T00:00:00Z"),
    )
    .await;
    let day_two = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-07T00:00:00Z", "2024-05-08T00:00:00Z"),
    )
    .await;
    let both = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-06T00:00:00Z", "2024-05-08T00:00:00Z"),
    )
    .await;

    // Day one: paid o1 4500 + o2 1000 + o5 2500 + o6 1000 + o9 5000, less
    // o9's 1000 refund; o7's refund was of a payment never accepted.
    assert_eq!(
        figures(&day_one),
        expected(json!({
            "revenue_cents": 13000, "currency": "USD", "orders_paid": 5, "units_sold": 8,
            "average_order_cents": 2600, "orders_cancelled": 1, "orders_expired": 2,
            "orders_refunded": 1, "refunded_cents": 1000,
            "holds_placed": 8, "holds_converted": 4, "holds_expired": 3, "conversion_rate": 0.5
        }))
    );
    // Day two: o4 expired just after midnight; o5 refunded in full.
    assert_eq!(
        figures(&day_two),
        expected(json!({
            "revenue_cents": -2500, "currency": "USD", "orders_paid": 0, "units_sold": 0,
            "average_order_cents": 0, "orders_cancelled": 0, "orders_expired": 1,
            "orders_refunded": 1, "refunded_cents": 2500,
            "holds_placed": 0, "holds_converted": 0, "holds_expired": 0, "conversion_rate": 0.0
        }))
    );
    assert_eq!(
        figures(&both),
        expected(json!({
            "revenue_cents": 10500, "currency": "USD", "orders_paid": 5, "units_sold": 8,
            "average_order_cents": 2100, "orders_cancelled": 1, "orders_expired": 3,
            "orders_refunded": 2, "refunded_cents": 3500,
            "holds_placed": 8, "holds_converted": 4, "holds_expired": 3, "conversion_rate": 0.5
        }))
    );
    assert_eq!(both["from"], "2024-05-06T00:00:00Z");
    assert_eq!(both["to"], "2024-05-08T00:00:00Z");

    let top: Value = admin_get(
        &app,
        &admin,
        "/api/v1/sales/top-products?from=2024-05-06T00:00:00Z&to=2024-05-08T00:00:00Z",
    )
    .await;
    let items: Vec<(String, i64, i64)> = top["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            (
                item["name"].as_str().unwrap_or_default().to_owned(),
                item["units_sold"].as_i64().unwrap_or_default(),
                item["revenue_cents"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    // Both sold 4 units; Beta's revenue (2500 + 2500 + 5000 - 1000 - 2500)
    // ranks it above Alpha's (2000 + 1000 + 1000). Gamma sold in EUR only.
    assert_eq!(
        items,
        vec![("Beta".into(), 4, 6500), ("Alpha".into(), 4, 4000)]
    );
    let first_only = admin_get(
        &app,
        &admin,
        "/api/v1/sales/top-products?limit=1&from=2024-05-06T00:00:00Z&to=2024-05-07T00:00:00Z",
    )
    .await;
    assert_eq!(first_only["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        first_only["items"][0]["revenue_cents"], 9000,
        "day one only: before o5's refund"
    );

    // A shop that sells in euros sees only the euro order.
    let mut euro_settings = app.settings.clone();
    euro_settings.bind_addr = "127.0.0.1:0".parse().expect("an address");
    euro_settings.shop_currency = Currency::try_from("EUR".to_owned()).expect("a currency");
    let euro_shop = spawn_app_from(euro_settings).await;
    let euros = admin_get(
        &euro_shop,
        &admin,
        &summary_path("2024-05-06T00:00:00Z", "2024-05-08T00:00:00Z"),
    )
    .await;
    assert_eq!(
        (
            euros["currency"].as_str(),
            euros["revenue_cents"].as_i64(),
            euros["orders_paid"].as_i64()
        ),
        (Some("EUR"), Some(900), Some(1))
    );
}

fn points(series: &Value) -> Vec<(String, i64, i64, i64)> {
    series["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|point| {
            (
                point["bucket_start"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                point["revenue_cents"].as_i64().unwrap_or_default(),
                point["orders_paid"].as_i64().unwrap_or_default(),
                point["units_sold"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn hour_and_day_buckets_split_exactly_at_their_boundaries() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    scripted_history(&app).await;

    // o2 was placed at 10:59:59.999 and paid at 11:00:00.000: its hold
    // belongs to hour 10, its sale to hour 11. Hour 14 sold nothing.
    let hours = admin_get(
        &app,
        &admin,
        "/api/v1/sales/timeseries?interval=hour&from=2024-05-06T10:00:00Z&to=2024-05-06T16:00:00Z",
    )
    .await;
    assert_eq!(hours["interval"], "hour");
    assert_eq!(
        points(&hours),
        vec![
            ("2024-05-06T10:00:00Z".into(), 4500, 1, 3),
            ("2024-05-06T11:00:00Z".into(), 1000, 1, 1),
            ("2024-05-06T12:00:00Z".into(), 2500, 1, 1),
            ("2024-05-06T13:00:00Z".into(), 1000, 1, 1),
            ("2024-05-06T14:00:00Z".into(), 0, 0, 0),
            ("2024-05-06T15:00:00Z".into(), 4000, 1, 2),
        ]
    );
    let hour_ten = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-06T10:00:00Z", "2024-05-06T11:00:00Z"),
    )
    .await;
    assert_eq!(
        (
            hour_ten["revenue_cents"].as_i64(),
            hour_ten["holds_placed"].as_i64(),
            hour_ten["holds_converted"].as_i64()
        ),
        (Some(4500), Some(2), Some(2))
    );
    // `from` is rounded down to its hour; `to` is exclusive.
    let rounded = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-06T10:59:00Z", "2024-05-06T11:00:00Z"),
    )
    .await;
    assert_eq!(
        (rounded["from"].as_str(), rounded["revenue_cents"].as_i64()),
        (Some("2024-05-06T10:00:00Z"), Some(4500))
    );
    let offset = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-06T13:00:00%2B02:00", "2024-05-06T12:00:00Z"),
    )
    .await;
    assert_eq!(
        (offset["from"].as_str(), offset["revenue_cents"].as_i64()),
        (Some("2024-05-06T11:00:00Z"), Some(1000))
    );

    // Days are UTC days: o4 expired five minutes into day two.
    let days = admin_get(
        &app,
        &admin,
        "/api/v1/sales/timeseries?interval=day&from=2024-05-06T00:00:00Z&to=2024-05-08T00:00:00Z",
    )
    .await;
    assert_eq!(
        points(&days),
        vec![
            ("2024-05-06T00:00:00Z".into(), 13000, 5, 8),
            ("2024-05-07T00:00:00Z".into(), -2500, 0, 0)
        ]
    );
    let midnight = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-06T23:00:00Z", "2024-05-07T00:00:00Z"),
    )
    .await;
    assert_eq!(
        (
            midnight["orders_expired"].as_i64(),
            midnight["holds_expired"].as_i64()
        ),
        (Some(0), Some(1))
    );
    let after_midnight = admin_get(
        &app,
        &admin,
        &summary_path("2024-05-07T00:00:00Z", "2024-05-07T01:00:00Z"),
    )
    .await;
    assert_eq!(after_midnight["orders_expired"], 1);

    // A day only partly in the range holds that part: the points add up to
    // the summary of the same range.
    let partial_range = "from=2024-05-06T12:30:00Z&to=2024-05-07T00:30:00Z";
    let partial = admin_get(
        &app,
        &admin,
        &format!("/api/v1/sales/timeseries?interval=day&{partial_range}"),
    )
    .await;
    assert_eq!(
        points(&partial),
        vec![
            ("2024-05-06T00:00:00Z".into(), 7500, 3, 4),
            ("2024-05-07T00:00:00Z".into(), 0, 0, 0)
        ]
    );
    let partial_summary = admin_get(
        &app,
        &admin,
        &format!("/api/v1/sales/summary?{partial_range}"),
    )
    .await;
    assert_eq!(
        (
            partial_summary["revenue_cents"].as_i64(),
            partial_summary["orders_expired"].as_i64()
        ),
        (Some(7500), Some(3))
    );
    let default_interval = admin_get(
        &app,
        &admin,
        &format!("/api/v1/sales/timeseries?{partial_range}"),
    )
    .await;
    assert_eq!(default_interval["interval"], "day");
}

#[tokio::test]
async fn replaying_every_order_event_changes_no_sales_figure() {
    let app = spawn_app().await;
    scripted_history(&app).await;
    let before = sales_rows(&app).await;

    let events: Vec<projections::StoredEvent> = sqlx::query_as(&format!(
        "SELECT {} FROM events WHERE aggregate_type = 'Order' ORDER BY txid, position",
        projections::stored_event::STORED_EVENT_COLUMNS
    ))
    .fetch_all(&app.pool)
    .await
    .expect("events");
    let mut tx = app.pool.begin().await.expect("a transaction");
    for event in &events {
        projections::sales::SalesProjection
            .apply(&mut tx, event)
            .await
            .expect("event applied again");
    }
    tx.commit().await.expect("committed");

    assert!(!before.is_empty());
    assert_eq!(sales_rows(&app).await, before);
}

/// Every row of the sales tables, as text.
async fn sales_rows(app: &TestApp) -> Vec<String> {
    let mut rows = Vec::new();
    for table in projections::sales::SalesProjection.tables() {
        let mut table_rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM {table} t"))
                .fetch_all(&app.pool)
                .await
                .expect("rows");
        table_rows.sort();
        rows.extend(table_rows.into_iter().map(|row| format!("{table}: {row}")));
    }
    rows
}

#[tokio::test]
async fn bad_sales_queries_are_problems_and_only_admins_may_ask() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let customer = TestUser::register_customer(&app).await;
    let get = |path: &'static str| app.get_as(path, &admin.access_token);

    problem(
        get("/api/v1/sales/summary?from=2024-05-02T00:00:00Z&to=2024-05-01T00:00:00Z").await,
        422,
        "validation_failed",
    )
    .await;
    problem(
        get("/api/v1/sales/timeseries?interval=week").await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        get("/api/v1/sales/top-products?limit=0").await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        get("/api/v1/sales/top-products?limit=101").await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        get("/api/v1/sales/top-products?limit=-1").await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        get("/api/v1/sales/summary?from=yesterday").await,
        400,
        "validation_failed",
    )
    .await;
    problem(
        get("/api/v1/sales/summary?to=2024-13-01T00:00:00Z").await,
        400,
        "validation_failed",
    )
    .await;
    let unencoded_plus = problem(
        get("/api/v1/sales/summary?from=2024-05-01T00:00:00+02:00").await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(
        unencoded_plus["errors"][0]["field"], "from",
        "{unencoded_plus}"
    );
    let too_many = problem(
        get("/api/v1/sales/timeseries?interval=hour&from=2020-01-01T00:00:00Z&to=2022-01-01T00:00:00Z").await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(too_many["errors"][0]["field"], "interval", "{too_many}");
    let backwards = problem(
        get("/api/v1/sales/timeseries?from=2024-05-02T00:00:00Z&to=2024-05-01T00:00:00Z").await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(backwards["errors"][0]["field"], "from");

    for path in [
        "/api/v1/sales/summary",
        "/api/v1/sales/timeseries",
        "/api/v1/sales/top-products",
    ] {
        problem(
            app.get_as(path, &customer.access_token).await,
            403,
            "forbidden",
        )
        .await;
        problem(app.get(path).await, 401, "unauthorized").await;
    }
    // With no sales at all, every figure is zero and the series is all
    // empty days (30 of them, or 31 when today's part-day is counted).
    let empty = admin_get(&app, &admin, "/api/v1/sales/summary").await;
    assert_eq!(
        (
            empty["revenue_cents"].as_i64(),
            empty["conversion_rate"].as_f64()
        ),
        (Some(0), Some(0.0))
    );
    let series = admin_get(&app, &admin, "/api/v1/sales/timeseries").await;
    let days = points(&series);
    assert!((30..=31).contains(&days.len()), "{series}");
    assert!(days
        .iter()
        .all(|(_, revenue, paid, units)| (*revenue, *paid, *units) == (0, 0, 0)));
}

#[tokio::test]
async fn a_run_through_http_is_counted_as_it_happened() {
    let stripe = FakeStripe::start().await;
    let app = stripe_app(&stripe).await;
    // Checkouts through this instance hold their stock for one second.
    let hasty = instance_with_hold(&app, Duration::from_secs(1)).await;
    let admin = TestUser::create_admin(&app).await;
    let shoe = stocked_product(&app, &admin, 1999, 10).await;
    let last_one = stocked_product(&app, &admin, 500, 1).await;
    let started = Utc::now();

    // Paid with confirm-payment, and paid through a webhook.
    let (first, first_order) = customer_order(&app, &[(shoe.variant_id, 2)]).await;
    let intent = payment_intent(&app, &first, &first_order).await;
    stripe.pay(&intent);
    let confirm = json!({ "order_id": first_order["id"], "payment_intent_id": intent });
    assert_eq!(
        post_with_key(
            &app,
            &first,
            "/api/v1/checkout/confirm-payment",
            "confirm",
            &confirm
        )
        .await
        .status(),
        200
    );
    let (second, second_order) = customer_order(&app, &[(shoe.variant_id, 1)]).await;
    let intent = payment_intent(&app, &second, &second_order).await;
    stripe.pay(&intent);
    assert_eq!(
        deliver_webhook(&app, &stripe, "payment_intent.succeeded", &intent)
            .await
            .status(),
        200
    );
    wait_for_status(&app, &second, &second_order, "paid").await;
    // Declined.
    let (third, third_order) = customer_order(&app, &[(shoe.variant_id, 1)]).await;
    let intent = payment_intent(&app, &third, &third_order).await;
    stripe.decline(&intent);
    assert_eq!(
        deliver_webhook(&app, &stripe, "payment_intent.payment_failed", &intent)
            .await
            .status(),
        200
    );
    wait_for_status(&app, &third, &third_order, "cancelled").await;
    // Expired.
    let (fourth, fourth_order) = customer_order(&hasty, &[(shoe.variant_id, 1)]).await;
    wait_for_status(&app, &fourth, &fourth_order, "cancelled").await;
    // Expired, the last unit went to someone else, then the payment came
    // anyway: refunded, and never revenue.
    let (fifth, fifth_order) = customer_order(&hasty, &[(last_one.variant_id, 1)]).await;
    let late_intent = payment_intent(&hasty, &fifth, &fifth_order).await;
    wait_for_status(&app, &fifth, &fifth_order, "cancelled").await;
    let (_sixth, _sixth_order) = customer_order(&app, &[(last_one.variant_id, 1)]).await;
    stripe.set_status(&late_intent, "succeeded");
    assert_eq!(
        deliver_webhook(&app, &stripe, "payment_intent.succeeded", &late_intent)
            .await
            .status(),
        200
    );
    wait_for_status(&app, &fifth, &fifth_order, "refunded").await;
    settle_projections(&app).await;

    let range = format!(
        "from={}&to={}",
        (started - chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ"),
        (Utc::now() + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
    );
    let summary = admin_get(&app, &admin, &format!("/api/v1/sales/summary?{range}")).await;
    // Paid: 2 × 1999 and 1 × 1999. Six holds: two paid in time, two ran out.
    assert_eq!(
        figures(&summary),
        expected(json!({
            "revenue_cents": 5997, "currency": "USD", "orders_paid": 2, "units_sold": 3,
            "average_order_cents": 2999, "orders_cancelled": 1, "orders_expired": 2,
            "orders_refunded": 0, "refunded_cents": 0,
            "holds_placed": 6, "holds_converted": 2, "holds_expired": 2,
            "conversion_rate": 1.0 / 3.0
        }))
    );
    let series = admin_get(
        &app,
        &admin,
        &format!("/api/v1/sales/timeseries?interval=hour&{range}"),
    )
    .await;
    let revenue: i64 = points(&series)
        .iter()
        .map(|(_, revenue, _, _)| revenue)
        .sum();
    assert_eq!(revenue, 5997);
    let top = admin_get(&app, &admin, &format!("/api/v1/sales/top-products?{range}")).await;
    assert_eq!(
        top["items"],
        json!([{ "product_id": shoe.product_id, "name": shoe.name, "units_sold": 3, "revenue_cents": 5997 }])
    );

    // A fake-provider shop counts the same way.
    let fake_shop = spawn_app().await;
    let fake_admin = TestUser::create_admin(&fake_shop).await;
    let product = stocked_product(&fake_shop, &fake_admin, 700, 5).await;
    let (buyer, order) = customer_order(&fake_shop, &[(product.variant_id, 3)]).await;
    fake_pay(&fake_shop, &buyer, &order, "succeeded").await;
    settle_projections(&fake_shop).await;
    let fake_summary = admin_get(&fake_shop, &fake_admin, "/api/v1/sales/summary").await;
    assert_eq!(
        (
            fake_summary["revenue_cents"].as_i64(),
            fake_summary["units_sold"].as_i64()
        ),
        (Some(2100), Some(3))
    );
}
