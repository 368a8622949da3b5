//! Idempotency keys written many to a statement: every claim gets its own
//! answer, a key is claimed once however many ask at once, and the rare
//! paths (a dead first attempt, a running one) behave as with one statement
//! per key.

use std::time::Duration;

use commerce::http::idempotency::ledger::{
    claim_keys, Claim, ClaimResult, KeyId, KeyLedger, Record,
};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{problem, spawn_app, TestApp};
use crate::shop_support::{add_to_cart, checkout, stocked_product};
use crate::users::TestUser;

fn claim(user_id: Uuid, key: &str, fingerprint: &[u8], relaxed: bool) -> Claim {
    Claim {
        key: KeyId {
            user_id,
            key: key.to_owned(),
        },
        fingerprint: fingerprint.to_vec(),
        lease_seconds: 30.0,
        relaxed,
    }
}

#[tokio::test]
async fn a_crowd_of_claims_and_records_each_get_their_own_answer() {
    let app = spawn_app().await;
    let ledger = KeyLedger::start(&app.pool).expect("the key writer starts");
    let user = Uuid::new_v4();
    let shared = "shared-key";

    // 300 distinct keys, 20 claims of one key, durable and relaxed mixed:
    // they share statements because they are all queued at once.
    let distinct = (0..300).map(|n| {
        let ledger = ledger.clone();
        async move {
            let key = format!("key-{n}");
            let fingerprint = vec![n as u8];
            let result = ledger
                .claim(claim(user, &key, &fingerprint, n % 3 != 0))
                .await
                .expect("claim");
            (key, result)
        }
    });
    let contenders = (0..20).map(|n| {
        let ledger = ledger.clone();
        async move {
            ledger
                .claim(claim(user, shared, b"same", n % 2 == 0))
                .await
                .expect("claim")
        }
    });
    let (distinct, contenders) = tokio::join!(
        futures_util::future::join_all(distinct),
        futures_util::future::join_all(contenders)
    );
    for (key, result) in &distinct {
        assert!(
            matches!(result, ClaimResult::Inserted),
            "{key} is new: {result:?}"
        );
    }
    let winners = contenders
        .iter()
        .filter(|result| matches!(result, ClaimResult::Inserted))
        .count();
    assert_eq!(winners, 1, "one claim of the shared key runs");
    for result in &contenders {
        match result {
            ClaimResult::Inserted | ClaimResult::Unseen => {}
            ClaimResult::Existing(stored) => {
                assert_eq!(stored.fingerprint, b"same");
                assert!(stored.lease_alive, "the winner holds the lease");
                assert_eq!(stored.status, None, "nothing recorded yet");
            }
        }
    }

    // Records for the even keys, all at once; then every key is claimed
    // again: the even ones replay what was recorded, the odd ones are
    // still leased, and another fingerprint is shown as it is stored.
    let records = (0..300).step_by(2).map(|n| {
        let ledger = ledger.clone();
        async move {
            let record = Record {
                key: KeyId {
                    user_id: user,
                    key: format!("key-{n}"),
                },
                status: 201,
                content_type: Some("application/json".into()),
                body: format!("{{\"n\":{n}}}").into_bytes(),
                relaxed: n % 4 == 0,
            };
            ledger.record(record).await.expect("record");
        }
    });
    futures_util::future::join_all(records).await;

    let again = (0..300).map(|n| {
        let ledger = ledger.clone();
        async move {
            let fingerprint = if n == 7 { vec![0xff] } else { vec![n as u8] };
            let result = ledger
                .claim(claim(user, &format!("key-{n}"), &fingerprint, true))
                .await
                .expect("claim");
            (n, result)
        }
    });
    for (n, result) in futures_util::future::join_all(again).await {
        let ClaimResult::Existing(stored) = result else {
            panic!("key-{n} exists: {result:?}");
        };
        assert_eq!(stored.fingerprint, vec![n as u8], "key-{n}");
        if n % 2 == 0 {
            assert_eq!(stored.status, Some(201), "key-{n}");
            assert_eq!(stored.body, Some(format!("{{\"n\":{n}}}").into_bytes()));
            assert_eq!(stored.content_type.as_deref(), Some("application/json"));
            assert!(!stored.lease_alive, "a recorded key holds no lease");
        } else {
            assert_eq!(stored.status, None, "key-{n}");
            assert!(stored.lease_alive, "key-{n}");
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE user_id = $1")
        .bind(user)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 301);
    app.stop().await;
}

/// How often the key table was read whole, and through an index, as the
/// statistics Postgres has gathered so far tell.
async fn key_table_scans(app: &TestApp) -> (i64, i64) {
    sqlx::query_as(
        "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables \
         WHERE relname = 'idempotency_keys'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_key_writer_reads_keys_by_index_on_a_plan_made_while_the_table_was_empty() {
    let app = spawn_app().await;
    let ledger = KeyLedger::start(&app.pool).expect("the key writer starts");
    let user = Uuid::new_v4();
    // The writer's connection plans its statement once, generically, on
    // the empty table.
    let first = ledger
        .claim(claim(user, "first", b"f", true))
        .await
        .expect("claim");
    assert!(matches!(first, ClaimResult::Inserted));

    // The table grows past what a scan of it would cost, without the
    // `ANALYZE` that would have the plan made again.
    sqlx::query(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint) \
         SELECT gen_random_uuid(), 'bulk-' || n, '\\x00' FROM generate_series(1, 20000) n",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // Backends report their statistics within a second or so of going
    // idle, the migrations' index builds (which read the table) included:
    // the count to compare with is the one that has stopped moving.
    let mut settled = key_table_scans(&app).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = key_table_scans(&app).await;
        if now == settled {
            break;
        }
        settled = now;
    }
    let (scans_before, index_reads_before) = settled;

    for n in 0..20 {
        let key = format!("key-{n}");
        let claimed = ledger
            .claim(claim(user, &key, b"f", true))
            .await
            .expect("claim");
        assert!(matches!(claimed, ClaimResult::Inserted), "{key}");
        ledger
            .record(Record {
                key: KeyId { user_id: user, key },
                status: 201,
                content_type: None,
                body: b"{}".to_vec(),
                relaxed: true,
            })
            .await
            .expect("record");
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (scans, index_reads) = loop {
        let (scans, index_reads) = key_table_scans(&app).await;
        if index_reads >= index_reads_before + 40 || tokio::time::Instant::now() > deadline {
            break (scans, index_reads);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        index_reads >= index_reads_before + 40,
        "the claims and records read keys by index ({index_reads_before} -> {index_reads})"
    );
    assert_eq!(scans, scans_before, "no statement read the whole key table");
    app.stop().await;
}

#[tokio::test]
async fn a_key_whose_first_attempt_died_is_taken_over_and_a_running_one_is_not() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let drop = stocked_product(&app, &admin, 2500, 5).await;
    let buyer = TestUser::register_customer(&app).await;
    assert_eq!(
        add_to_cart(&app, &buyer, drop.variant_id, 1).await.status(),
        200
    );
    let first = checkout(&app, &buyer, "died").await;
    assert_eq!(first.status(), 201);
    let order: serde_json::Value = first.json().await.unwrap();
    // Checkout answers before its record is written: the crash below must
    // come after the record, or the record would undo it.
    recorded(&app, buyer.id, "died").await;

    // As if the first attempt had stored its order and then died before it
    // recorded its answer: the key is leased by no one alive.
    let forget = |leased_for: f64| {
        sqlx::query(
            "UPDATE idempotency_keys SET response_status = NULL, response_body = NULL, \
                    leased_until = now() + make_interval(secs => $2) \
             WHERE user_id = $1 AND key = 'died'",
        )
        .bind(buyer.id)
        .bind(leased_for)
        .execute(&app.pool)
    };
    assert_eq!(forget(-1.0).await.unwrap().rows_affected(), 1);
    let retried = checkout(&app, &buyer, "died").await;
    assert_eq!(retried.status(), 201, "the retry takes the key over");
    assert!(retried.headers().get("idempotent-replayed").is_none());
    let retried: serde_json::Value = retried.json().await.unwrap();
    assert_eq!(retried["id"], order["id"], "the same order, not a second");

    // A first attempt still running (its lease alive) is not run twice.
    recorded(&app, buyer.id, "died").await;
    assert_eq!(forget(60.0).await.unwrap().rows_affected(), 1);
    let meanwhile = checkout(&app, &buyer, "died").await;
    problem(meanwhile, 409, "idempotency_in_progress").await;

    let orders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Order' AND event_type = 'OrderPlaced'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(orders, 1);
    app.stop().await;
}

/// Waits until the answer to `key` is stored (a checkout's answer is
/// recorded after it is sent).
pub(crate) async fn recorded(app: &TestApp, user_id: Uuid, key: &str) {
    for _ in 0..200 {
        let status: Option<i16> = sqlx::query_scalar(
            "SELECT response_status FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        .flatten();
        if status.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the answer to {key} was never recorded");
}

#[tokio::test]
async fn a_refused_checkout_replays_its_refusal_and_places_nothing_after_a_restock() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let drop = stocked_product(&app, &admin, 2500, 1).await;
    let buyer = TestUser::register_customer(&app).await;
    assert_eq!(
        add_to_cart(&app, &buyer, drop.variant_id, 2).await.status(),
        200
    );
    let refused = checkout(&app, &buyer, "too-early").await;
    problem(refused, 409, "insufficient_stock").await;
    recorded(&app, buyer.id, "too-early").await;

    let restock = app
        .post_json_as(
            "/api/v1/stock/add-stock",
            &admin.access_token,
            &json!({ "variant_id": drop.variant_id, "quantity": 5 }),
        )
        .await;
    assert_eq!(restock.status(), 200);
    // The committer claims the key before it decides; the claim finds the
    // refusal, so the checkout must not go on to place the order.
    let retried = checkout(&app, &buyer, "too-early").await;
    assert_eq!(retried.headers()["idempotent-replayed"], "true");
    problem(retried, 409, "insufficient_stock").await;

    let orders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Order' AND event_type = 'OrderPlaced'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(orders, 0, "the replayed refusal placed no order");
    let placed = checkout(&app, &buyer, "after-restock").await;
    assert_eq!(
        placed.status(),
        201,
        "a new key checks out the restocked cart"
    );
    app.stop().await;
}

/// Ends the backends of every key writer on the test's database (their
/// last statement wrote keys); returns how many.
async fn cut_key_writers(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND query LIKE '%INSERT INTO idempotency_keys%'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("terminate")
}

#[tokio::test]
async fn the_key_writer_keeps_answering_when_its_connection_is_cut() {
    let app = spawn_app().await;
    let ledger = KeyLedger::start(&app.pool).expect("the key writer starts");
    let user = Uuid::new_v4();
    let claim_key = |key: &'static str| ledger.claim(claim(user, key, b"f", true));
    let first = claim_key("before").await.expect("claim");
    assert!(matches!(first, ClaimResult::Inserted));
    assert!(
        cut_key_writers(&app).await >= 1,
        "the writer's backend was found"
    );

    // The writer keeps its connection between statements; after a quiet
    // spell it checks it before use, so a cut made meanwhile (Postgres
    // restarted, say) costs nobody an answer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_quiet = claim_key("after-quiet")
        .await
        .expect("a claim after a quiet spell is answered");
    assert!(matches!(after_quiet, ClaimResult::Inserted));

    // Cut with no quiet spell: the next statement may fail, and the one
    // after it runs on a fresh connection.
    assert!(cut_key_writers(&app).await >= 1);
    let _ = claim_key("right-after").await;
    let recovered = claim_key("recovered")
        .await
        .expect("the writer reconnects after a failed statement");
    assert!(matches!(recovered, ClaimResult::Inserted));
    app.stop().await;
}

/// The heap page each of the user's keys is on.
async fn key_pages(app: &TestApp, user_id: Uuid) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT key, (ctid::text::point)[0]::bigint FROM idempotency_keys \
         WHERE user_id = $1 ORDER BY key",
    )
    .bind(user_id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_record_stays_on_the_page_of_its_claim() {
    let app = spawn_app().await;
    let ledger = KeyLedger::start(&app.pool).expect("the key writer starts");
    let user = Uuid::new_v4();
    // Claimed together, as a sale's checkouts are, with keys and
    // fingerprints of the usual sizes (a uuid, a SHA-256), and then
    // recorded with a body the size of a checkout's answer. A record that
    // leaves its page is a new row version in both of the table's indexes.
    let keys: Vec<String> = (0..120).map(|_| Uuid::new_v4().to_string()).collect();
    let claims = keys.iter().map(|key| {
        let ledger = ledger.clone();
        async move { ledger.claim(claim(user, key, &[7; 32], true)).await }
    });
    for claimed in futures_util::future::join_all(claims).await {
        assert!(matches!(claimed, Ok(ClaimResult::Inserted)), "{claimed:?}");
    }
    let claimed_on = key_pages(&app, user).await;
    let records = keys.iter().map(|key| {
        let ledger = ledger.clone();
        async move {
            let record = Record {
                key: KeyId {
                    user_id: user,
                    key: key.clone(),
                },
                status: 201,
                content_type: Some("application/json".into()),
                body: vec![b'x'; 700],
                relaxed: true,
            };
            ledger.record(record).await
        }
    });
    for recorded in futures_util::future::join_all(records).await {
        recorded.expect("record");
    }
    let recorded_on = key_pages(&app, user).await;
    assert_eq!(recorded_on.len(), keys.len());
    let moved: Vec<&String> = claimed_on
        .iter()
        .zip(&recorded_on)
        .filter(|(claimed, recorded)| claimed != recorded)
        .map(|(claimed, _)| &claimed.0)
        .collect();
    assert!(moved.is_empty(), "records that left their page: {moved:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_batch_of_claims_shares_a_statement_and_each_gets_its_answer() {
    let app = spawn_app().await;
    let ledger = KeyLedger::start(&app.pool).expect("the key writer starts");
    let user = Uuid::new_v4();
    assert!(matches!(
        ledger.claim(claim(user, "answered", b"first", true)).await,
        Ok(ClaimResult::Inserted)
    ));
    let record = Record {
        key: KeyId {
            user_id: user,
            key: "answered".into(),
        },
        status: 201,
        content_type: Some("application/json".into()),
        body: b"{}".to_vec(),
        relaxed: false,
    };
    ledger.record(record).await.expect("record");
    assert!(matches!(
        ledger.claim(claim(user, "running", b"first", true)).await,
        Ok(ClaimResult::Inserted)
    ));

    // As the checkout committer claims its batch's keys, on a connection
    // of its own, once its batch's statement found one of them taken.
    let batch = [
        claim(user, "new", b"n", true),
        claim(user, "answered", b"other", true),
        claim(user, "new", b"n", true),
        claim(user, "running", b"first", true),
        claim(user, "also-new", b"n", true),
    ];
    let mut connection = app.pool.acquire().await.unwrap();
    let results = claim_keys(&mut connection, &batch.iter().collect::<Vec<_>>())
        .await
        .expect("one statement");

    assert!(matches!(results[0], ClaimResult::Inserted), "{results:?}");
    let ClaimResult::Existing(stored) = &results[1] else {
        panic!("the answered key is there: {results:?}");
    };
    assert_eq!(
        (
            stored.fingerprint.as_slice(),
            stored.status,
            stored.lease_alive
        ),
        (&b"first"[..], Some(201), false),
        "shown as stored, whatever the fingerprint asked with"
    );
    assert!(
        matches!(results[2], ClaimResult::Unseen),
        "a key twice in one batch is claimed once; the second looks again: {results:?}"
    );
    let ClaimResult::Existing(stored) = &results[3] else {
        panic!("the running key is there: {results:?}");
    };
    assert!(stored.lease_alive && stored.status.is_none());
    assert!(matches!(results[4], ClaimResult::Inserted), "{results:?}");
    let written = writing_transactions(&app, user).await;
    let new_keys: std::collections::HashSet<&str> = written
        .iter()
        .filter(|(key, _)| key == "new" || key == "also-new")
        .map(|(_, xmin)| xmin.as_str())
        .collect();
    assert_eq!(new_keys.len(), 1, "one statement claimed both: {written:?}");
    let claimed_once: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE user_id = $1")
            .bind(user)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(claimed_once, 4);
    app.stop().await;
}

/// The transaction that last wrote each of the user's keys, by key.
async fn writing_transactions(app: &TestApp, user_id: Uuid) -> Vec<(String, String)> {
    sqlx::query_as("SELECT key, xmin::text FROM idempotency_keys WHERE user_id = $1 ORDER BY key")
        .bind(user_id)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn records_nobody_waits_for_are_held_until_a_write_someone_waits_for() {
    let app = spawn_app().await;
    // Held far longer than the test takes, so that only the awaited write
    // can end the wait.
    let ledger = KeyLedger::start_holding(&app.pool, Duration::from_secs(60))
        .expect("the key writer starts");
    let user = Uuid::new_v4();
    let keys: Vec<String> = (0..3).map(|n| format!("held-{n}")).collect();
    for key in &keys {
        assert!(matches!(
            ledger.claim(claim(user, key, b"f", true)).await,
            Ok(ClaimResult::Inserted)
        ));
    }
    for key in &keys {
        let record = Record {
            key: KeyId {
                user_id: user,
                key: key.clone(),
            },
            status: 409,
            content_type: None,
            body: key.clone().into_bytes(),
            relaxed: true,
        };
        ledger.record_later(record).await.expect("queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unrecorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_keys WHERE user_id = $1 AND response_status IS NULL",
    )
    .bind(user)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(unrecorded, 3, "the records are held");

    assert!(matches!(
        ledger.claim(claim(user, "awaited", b"f", false)).await,
        Ok(ClaimResult::Inserted)
    ));
    let written = writing_transactions(&app, user).await;
    let transactions: std::collections::HashSet<&str> =
        written.iter().map(|(_, xmin)| xmin.as_str()).collect();
    assert_eq!(
        transactions.len(),
        1,
        "the claim and the three records share its statement: {written:?}"
    );
    for key in &keys {
        recorded(&app, user, key).await;
    }
    app.stop().await;
}
