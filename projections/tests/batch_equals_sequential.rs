//! Every projection's `apply_batch` leaves exactly the rows that `apply`,
//! one event at a time, leaves: over a long mixed stream of inventory,
//! cart and order events, cut into batches of many sizes, with events
//! replayed, items and orders never registered, and an aggregate's events
//! now and then out of sequence. Runs against a real Postgres with the
//! server's migrations, one fresh database per test.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::cart::{CartEvent, CartLine};
use domain::inventory::{InventoryEvent, ReleaseReason};
use domain::order::{CancelReason, OrderEvent, OrderLine};
use domain::values::{Currency, Name, Sku};
use projections::cache::VersionedCache;
use projections::{Projection, StoredEvent};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// A fresh database with the server's migrations.
async fn database() -> PgPool {
    let server = std::env::var("TEST_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("test_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{server}/postgres?sslmode=disable"))
        .await
        .expect("the Postgres server answers");
    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("test database created");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&format!("{server}/{name}?sslmode=disable"))
        .await
        .expect("test database reachable");
    sqlx::migrate!("../migrations")
        .run(&pool)
        .await
        .expect("migrations applied");
    pool
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One aggregate's events, in its own order.
struct Stream {
    aggregate_type: &'static str,
    id: Uuid,
    events: Vec<(String, Value, DateTime<Utc>)>,
}

impl Stream {
    fn new(aggregate_type: &'static str, id: Uuid) -> Self {
        Self {
            aggregate_type,
            id,
            events: Vec::new(),
        }
    }

    fn push<E: serde::Serialize>(&mut self, kind: &str, event: &E, at: DateTime<Utc>) {
        let payload = serde_json::to_value(event).expect("an event as JSON");
        self.events.push((kind.to_owned(), payload, at));
    }
}

fn sku(text: &str) -> Sku {
    Sku::try_from(text.to_owned()).expect("a SKU")
}

fn name(text: &str) -> Name {
    Name::try_from(text.to_owned()).expect("a name")
}

fn currency(text: &str) -> Currency {
    Currency::try_from(text.to_owned()).expect("a currency")
}

const VARIANTS: usize = 5;

/// Variants 0 and 1 belong to one product, 3 and 4 to another.
fn product_of(variant: usize, products: &[Uuid]) -> Uuid {
    products[[0, 0, 1, 2, 2][variant]]
}

fn inventory_streams(dice: &mut Dice, variants: &[Uuid], start: DateTime<Utc>) -> Vec<Stream> {
    let mut streams = Vec::new();
    for (index, variant_id) in variants.iter().enumerate() {
        let mut stream = Stream::new("InventoryItem", *variant_id);
        let mut at = start;
        let (mut on_hand, mut reserved) = (100u32, 0u32);
        stream.push(
            "ItemRegistered",
            &InventoryEvent::ItemRegistered {
                variant_id: *variant_id,
                sku: sku(&format!("SKU-{index}")),
                on_hand,
            },
            at,
        );
        for _ in 0..40 + dice.below(40) {
            at += Duration::seconds(dice.below(300) as i64);
            let quantity = 1 + dice.below(3) as u32;
            let order_id = Uuid::new_v4();
            let (kind, event) = match dice.below(10) {
                0..=4 => {
                    reserved += quantity;
                    on_hand = on_hand.max(reserved);
                    (
                        "StockReserved",
                        InventoryEvent::StockReserved {
                            order_id,
                            quantity,
                            on_hand,
                            reserved,
                        },
                    )
                }
                5 | 6 => {
                    let quantity = quantity.min(reserved);
                    reserved -= quantity;
                    (
                        "ReservationReleased",
                        InventoryEvent::ReservationReleased {
                            order_id,
                            quantity,
                            reason: ReleaseReason::Expired,
                            on_hand,
                            reserved,
                        },
                    )
                }
                7 => {
                    let quantity = quantity.min(reserved);
                    reserved -= quantity;
                    on_hand -= quantity;
                    (
                        "ReservationCommitted",
                        InventoryEvent::ReservationCommitted {
                            order_id,
                            quantity,
                            on_hand,
                            reserved,
                        },
                    )
                }
                8 => {
                    on_hand += quantity * 10;
                    (
                        "StockAdded",
                        InventoryEvent::StockAdded {
                            quantity: quantity * 10,
                            reason: None,
                            on_hand,
                            reserved,
                        },
                    )
                }
                _ if dice.chance(30) => {
                    // Registered again: `reserved` starts over.
                    on_hand = 50 + quantity;
                    reserved = 0;
                    (
                        "ItemRegistered",
                        InventoryEvent::ItemRegistered {
                            variant_id: *variant_id,
                            sku: sku(&format!("SKU-{index}-again")),
                            on_hand,
                        },
                    )
                }
                _ => {
                    let previous_on_hand = on_hand;
                    on_hand = reserved + quantity;
                    (
                        "OnHandSet",
                        InventoryEvent::OnHandSet {
                            previous_on_hand,
                            on_hand,
                            reason: Some("counted".into()),
                            reserved,
                        },
                    )
                }
            };
            stream.push(kind, &event, at);
        }
        streams.push(stream);
    }
    // An item whose registration is not in the store: nothing to update.
    let mut stray = Stream::new("InventoryItem", Uuid::new_v4());
    for reserved in 1..4 {
        stray.push(
            "StockReserved",
            &InventoryEvent::StockReserved {
                order_id: Uuid::new_v4(),
                quantity: 1,
                on_hand: 10,
                reserved,
            },
            start,
        );
    }
    streams.push(stray);
    streams
}

fn cart_streams(dice: &mut Dice, variants: &[Uuid], start: DateTime<Utc>) -> Vec<Stream> {
    (0..30)
        .map(|_| {
            let mut stream = Stream::new("Cart", Uuid::new_v4());
            let mut at = start;
            let mut lines: Vec<(Uuid, u32)> = Vec::new();
            for _ in 0..1 + dice.below(12) {
                at += Duration::seconds(dice.below(600) as i64);
                let variant_id = variants[dice.below(VARIANTS as u64) as usize];
                match dice.below(10) {
                    0..=4 => {
                        let added = 1 + dice.below(3) as u32;
                        let quantity = match lines.iter_mut().find(|(id, _)| *id == variant_id) {
                            Some(line) => {
                                line.1 += added;
                                line.1
                            }
                            None => {
                                lines.push((variant_id, added));
                                added
                            }
                        };
                        stream.push(
                            "CartItemAdded",
                            &CartEvent::CartItemAdded {
                                variant_id,
                                added,
                                quantity,
                            },
                            at,
                        );
                    }
                    5 => {
                        let quantity = 1 + dice.below(5) as u32;
                        lines.retain(|(id, _)| *id != variant_id);
                        lines.push((variant_id, quantity));
                        stream.push(
                            "CartItemQuantitySet",
                            &CartEvent::CartItemQuantitySet {
                                variant_id,
                                quantity,
                            },
                            at,
                        );
                    }
                    6 | 7 => {
                        lines.retain(|(id, _)| *id != variant_id);
                        stream.push(
                            "CartItemRemoved",
                            &CartEvent::CartItemRemoved { variant_id },
                            at,
                        );
                    }
                    8 => {
                        lines.clear();
                        stream.push("CartCleared", &CartEvent::CartCleared {}, at);
                    }
                    _ => {
                        let checked_out = lines
                            .drain(..)
                            .map(|(variant_id, quantity)| CartLine {
                                variant_id,
                                quantity,
                            })
                            .collect();
                        stream.push(
                            "CartCheckedOut",
                            &CartEvent::CartCheckedOut {
                                order_id: Uuid::new_v4(),
                                lines: checked_out,
                            },
                            at,
                        );
                    }
                }
            }
            stream
        })
        .collect()
}

fn order_streams(
    dice: &mut Dice,
    variants: &[Uuid],
    products: &[Uuid],
    start: DateTime<Utc>,
) -> Vec<Stream> {
    let mut streams: Vec<Stream> = (0..70)
        .map(|_| {
            let order_id = Uuid::new_v4();
            let mut stream = Stream::new("Order", order_id);
            // Spread over a few hours, so that buckets are shared and split.
            let placed_at = start + Duration::seconds(dice.below(5 * 3600) as i64);
            let currency_code = if dice.chance(15) { "EUR" } else { "USD" };
            let mut lines = Vec::new();
            for _ in 0..1 + dice.below(3) {
                let variant = dice.below(VARIANTS as u64) as usize;
                let quantity = 1 + dice.below(3) as u32;
                let unit_price_cents = 500 + 100 * variant as i64;
                // A product renamed between orders: each order keeps the
                // name it was sold under.
                let product_name = if dice.chance(20) {
                    "Renamed"
                } else {
                    "Original"
                };
                lines.push(OrderLine {
                    variant_id: variants[variant],
                    sku: sku(&format!("SKU-{variant}")),
                    product_id: product_of(variant, products),
                    product_name: name(&format!("{product_name} {}", variant / 2)),
                    unit_price_cents,
                    quantity,
                    line_total_cents: unit_price_cents * i64::from(quantity),
                });
            }
            let total_cents: i64 = lines.iter().map(|line| line.line_total_cents).sum();
            stream.push(
                "OrderPlaced",
                &OrderEvent::OrderPlaced {
                    order_id,
                    user_id: Uuid::new_v4(),
                    lines,
                    currency: currency(currency_code),
                    total_cents,
                    placed_at,
                    expires_at: placed_at + Duration::minutes(15),
                },
                placed_at,
            );
            let later = |dice: &mut Dice, after: DateTime<Utc>| {
                after + Duration::seconds(dice.below(2 * 3600) as i64)
            };
            let started = |stream: &mut Stream, at: DateTime<Utc>| {
                stream.push(
                    "PaymentStarted",
                    &OrderEvent::PaymentStarted {
                        payment_intent_id: format!("pi_{order_id}"),
                        provider: "fake".into(),
                        started_at: at,
                    },
                    at,
                );
            };
            let paid = |stream: &mut Stream, at: DateTime<Utc>, amount_cents: i64, late: bool| {
                stream.push(
                    "OrderPaid",
                    &OrderEvent::OrderPaid {
                        payment_intent_id: format!("pi_{order_id}"),
                        amount_cents,
                        currency: currency(currency_code),
                        late,
                        paid_at: at,
                    },
                    at,
                );
            };
            // Every refund is decided before it is made, as the server does.
            let refunded = |stream: &mut Stream, at: DateTime<Utc>, amount_cents: i64| {
                stream.push(
                    "RefundDecided",
                    &OrderEvent::RefundDecided {
                        payment_intent_id: format!("pi_{order_id}"),
                        amount_cents,
                        currency: currency(currency_code),
                        decided_at: at,
                    },
                    at,
                );
                stream.push(
                    "OrderRefunded",
                    &OrderEvent::OrderRefunded {
                        payment_intent_id: format!("pi_{order_id}"),
                        refund_id: format!("re_{}", Uuid::new_v4()),
                        amount_cents,
                        currency: currency(currency_code),
                        refunded_at: at,
                    },
                    at,
                );
            };
            let cancelled = |stream: &mut Stream, at: DateTime<Utc>, reason: CancelReason| {
                stream.push(
                    "OrderCancelled",
                    &OrderEvent::OrderCancelled {
                        reason,
                        cancelled_at: at,
                    },
                    at,
                );
            };
            let mut at = placed_at;
            match dice.below(7) {
                0 => {}
                1 if dice.chance(50) => {
                    at = later(dice, at);
                    started(&mut stream, at);
                }
                1 | 2 => {
                    at = later(dice, at);
                    started(&mut stream, at);
                    at = later(dice, at);
                    paid(&mut stream, at, total_cents, false);
                    for _ in 0..dice.below(3) {
                        at = later(dice, at);
                        // Partial, whole, or more than was ever paid.
                        let amount = [total_cents / 3, total_cents, total_cents * 2, 0]
                            [dice.below(4) as usize];
                        refunded(&mut stream, at, amount);
                    }
                }
                3 => {
                    at = later(dice, at);
                    cancelled(&mut stream, at, CancelReason::Expired);
                    if dice.chance(60) {
                        at = later(dice, at);
                        paid(&mut stream, at, total_cents, true);
                        if dice.chance(50) {
                            at = later(dice, at);
                            refunded(&mut stream, at, total_cents);
                        }
                    }
                }
                4 => {
                    at = later(dice, at);
                    started(&mut stream, at);
                    at = later(dice, at);
                    cancelled(&mut stream, at, CancelReason::PaymentFailed);
                }
                _ => {
                    at = later(dice, at);
                    cancelled(&mut stream, at, CancelReason::Customer);
                }
            }
            stream
        })
        .collect();
    // Changes to an order whose placement is not in the store.
    let mut orphan = Stream::new("Order", Uuid::new_v4());
    orphan.push(
        "OrderPaid",
        &OrderEvent::OrderPaid {
            payment_intent_id: "pi_orphan".into(),
            amount_cents: 999,
            currency: currency("USD"),
            late: false,
            paid_at: start,
        },
        start,
    );
    streams.push(orphan);
    streams
}

/// An event before it has a place in the store: aggregate type and id,
/// sequence, event type, payload, and when it happened.
type Draft = (&'static str, Uuid, i64, String, Value, DateTime<Utc>);

/// The whole store: every stream's events interleaved at random, each
/// stream in its own order, then disturbed: some events stored again later
/// (replays) and some neighbours of one aggregate swapped.
fn mixed_store(seed: u64) -> Vec<StoredEvent> {
    let mut dice = Dice(seed);
    let start = Utc
        .with_ymd_and_hms(2024, 3, 10, 9, 30, 0)
        .single()
        .expect("a valid start");
    let variants: Vec<Uuid> = (0..VARIANTS).map(|_| Uuid::new_v4()).collect();
    let products: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut streams = inventory_streams(&mut dice, &variants, start);
    streams.extend(cart_streams(&mut dice, &variants, start));
    streams.extend(order_streams(&mut dice, &variants, &products, start));

    let mut drafts: Vec<Draft> = Vec::new();
    let mut next: Vec<usize> = vec![0; streams.len()];
    loop {
        let open: Vec<usize> = (0..streams.len())
            .filter(|index| next[*index] < streams[*index].events.len())
            .collect();
        if open.is_empty() {
            break;
        }
        let pick = open[dice.below(open.len() as u64) as usize];
        let stream = &streams[pick];
        let (kind, payload, at) = stream.events[next[pick]].clone();
        next[pick] += 1;
        drafts.push((
            stream.aggregate_type,
            stream.id,
            next[pick] as i64,
            kind,
            payload,
            at,
        ));
    }
    for _ in 0..drafts.len() / 15 {
        let from = dice.below(drafts.len() as u64) as usize;
        let to = from + dice.below((drafts.len() - from) as u64) as usize;
        let replay = drafts[from].clone();
        drafts.insert(to + 1, replay);
    }
    for _ in 0..drafts.len() / 25 {
        let first = dice.below(drafts.len() as u64) as usize;
        let (kind, id) = (drafts[first].0, drafts[first].1);
        if let Some(offset) = drafts[first + 1..]
            .iter()
            .position(|draft| draft.0 == kind && draft.1 == id)
        {
            drafts.swap(first, first + 1 + offset);
        }
    }
    drafts
        .into_iter()
        .enumerate()
        .map(
            |(index, (aggregate_type, id, sequence, event_type, payload, at))| StoredEvent {
                position: index as i64 + 1,
                txid: 1_000 + index as i64 / 7,
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: id.to_string(),
                sequence,
                event_type,
                event_version: "1".into(),
                payload: serde_json::value::to_raw_value(&payload).unwrap(),
                metadata: serde_json::value::to_raw_value(&json!({ "actor": "system" })).unwrap(),
                recorded_at: at + Duration::milliseconds(index as i64),
            },
        )
        .collect()
}

/// Empty copies of the projection's tables in `schema`.
async fn copies(pool: &PgPool, schema: &str, projection: &dyn Projection) {
    sqlx::raw_sql(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
    ))
    .execute(pool)
    .await
    .expect("schema made");
    for table in projection.tables() {
        sqlx::raw_sql(&format!(
            "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(pool)
        .await
        .expect("table copied");
    }
}

async fn in_schema(pool: &PgPool, schema: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.expect("transaction");
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(format!("{schema}, public"))
        .execute(&mut *tx)
        .await
        .expect("search_path");
    tx
}

/// `apply` on each event the projection handles, a transaction per `step`.
async fn one_at_a_time(
    pool: &PgPool,
    schema: &str,
    projection: &dyn Projection,
    events: &[StoredEvent],
) {
    for step in events.chunks(40) {
        let mut tx = in_schema(pool, schema).await;
        for event in step
            .iter()
            .filter(|e| projection.handles(&e.aggregate_type))
        {
            projection
                .apply(&mut tx, event)
                .await
                .unwrap_or_else(|error| {
                    panic!("{} applied {}: {error}", projection.name(), event.position)
                });
        }
        tx.commit().await.expect("committed");
    }
}

/// `apply_batch` on batches of `size` events (before filtering, as the
/// runner cuts them).
async fn in_batches(
    pool: &PgPool,
    schema: &str,
    projection: &dyn Projection,
    events: &[StoredEvent],
    size: usize,
) {
    for batch in events.chunks(size) {
        let handled: Vec<StoredEvent> = batch
            .iter()
            .filter(|e| projection.handles(&e.aggregate_type))
            .cloned()
            .collect();
        if handled.is_empty() {
            continue;
        }
        let mut tx = in_schema(pool, schema).await;
        projection
            .apply_batch(&mut tx, &handled)
            .await
            .unwrap_or_else(|error| {
                panic!("{} applied a batch of {size}: {error}", projection.name())
            });
        tx.commit().await.expect("committed");
    }
}

/// Rows of `table` in one schema and not in the other, both ways.
async fn differences(pool: &PgPool, table: &str, left: &str, right: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "(SELECT '{left} only: ' || row_to_json(d)::text FROM \
            (SELECT * FROM {left}.{table} EXCEPT ALL SELECT * FROM {right}.{table}) d) \
         UNION ALL \
         (SELECT '{right} only: ' || row_to_json(d)::text FROM \
            (SELECT * FROM {right}.{table} EXCEPT ALL SELECT * FROM {left}.{table}) d)"
    ))
    .fetch_all(pool)
    .await
    .expect("tables compared")
}

async fn count(pool: &PgPool, query: &str) -> i64 {
    sqlx::query_scalar(query)
        .fetch_one(pool)
        .await
        .expect("counted")
}

/// The stream's events in the store, as a projection that reads an
/// aggregate's earlier events there finds them (a replayed event is stored
/// once, at its first position).
async fn store(pool: &PgPool, events: &[StoredEvent]) {
    sqlx::query("TRUNCATE events")
        .execute(pool)
        .await
        .expect("store emptied");
    for event in events {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                                 event_version, payload, metadata, position, txid, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6::json, $7::json, $8, $9, $10) \
             ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING",
        )
        .bind(&event.aggregate_type)
        .bind(&event.aggregate_id)
        .bind(event.sequence)
        .bind(&event.event_type)
        .bind(&event.event_version)
        .bind(event.payload.get())
        .bind(event.metadata.get())
        .bind(event.position)
        .bind(event.txid)
        .bind(event.recorded_at)
        .execute(pool)
        .await
        .expect("event stored");
    }
}

/// Batches of every size, and the whole store applied twice, leave the
/// rows one-at-a-time leaves.
async fn batches_equal_one_at_a_time(pool: &PgPool, projection: Arc<dyn Projection>, seed: u64) {
    let events = mixed_store(seed);
    store(pool, &events).await;
    let twice: Vec<StoredEvent> = events.iter().chain(events.iter()).cloned().collect();
    copies(pool, "one_by_one", projection.as_ref()).await;
    one_at_a_time(pool, "one_by_one", projection.as_ref(), &twice).await;
    for size in [1, 2, 5, 13, 64, 500, twice.len()] {
        copies(pool, "batched", projection.as_ref()).await;
        in_batches(pool, "batched", projection.as_ref(), &twice, size).await;
        for table in projection.tables() {
            let differing = differences(pool, table, "one_by_one", "batched").await;
            assert!(
                differing.is_empty(),
                "{}: batches of {size} leave {table} different (seed {seed}):\n{}",
                projection.name(),
                differing.join("\n")
            );
        }
    }
}

#[tokio::test]
async fn stock_batches_equal_one_at_a_time() {
    let pool = database().await;
    let stock = Arc::new(projections::stock::StockProjection::new(
        pool.clone(),
        VersionedCache::disabled(),
    ));
    for seed in [7, 1_234_567] {
        batches_equal_one_at_a_time(&pool, stock.clone(), seed).await;
    }
    // Not equal by being equally empty.
    assert!(
        count(
            &pool,
            "SELECT count(*) FROM one_by_one.stock_levels WHERE reserved > 0"
        )
        .await
            > 0
    );
}

#[tokio::test]
async fn orders_batches_equal_one_at_a_time() {
    let pool = database().await;
    for seed in [7, 1_234_567] {
        batches_equal_one_at_a_time(&pool, Arc::new(projections::orders::OrdersProjection), seed)
            .await;
    }
    for status in [
        "created",
        "paid",
        "cancelled",
        "refunded",
        "payment_pending",
    ] {
        let found = count(
            &pool,
            &format!("SELECT count(*) FROM one_by_one.orders WHERE status = '{status}'"),
        )
        .await;
        assert!(found > 0, "the stream has {status} orders");
    }
}

#[tokio::test]
async fn carts_batches_equal_one_at_a_time() {
    let pool = database().await;
    for seed in [7, 1_234_567] {
        batches_equal_one_at_a_time(
            &pool,
            Arc::new(projections::carts::CartsProjection::new(
                VersionedCache::disabled(),
            )),
            seed,
        )
        .await;
    }
    assert!(count(&pool, "SELECT count(*) FROM one_by_one.cart_lines").await > 0);
}

#[tokio::test]
async fn sales_batches_equal_one_at_a_time() {
    let pool = database().await;
    for seed in [7, 1_234_567] {
        batches_equal_one_at_a_time(&pool, Arc::new(projections::sales::SalesProjection), seed)
            .await;
    }
    for column in [
        "revenue_cents",
        "orders_refunded",
        "holds_converted",
        "holds_expired",
        "orders_cancelled",
    ] {
        let total = count(
            &pool,
            &format!("SELECT coalesce(sum({column}), 0)::bigint FROM one_by_one.sales_hourly"),
        )
        .await;
        assert!(total > 0, "the stream moves {column}");
    }
    assert!(
        count(&pool, "SELECT count(*) FROM one_by_one.sales_product_hourly WHERE revenue_cents < units_sold * 500").await > 0,
        "some product revenue was refunded"
    );
}
