//! The event store, the group-commit executor and the projection runner,
//! under concurrency.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use commerce::event_store::{
    AppendError, CommandBus, CommandError, EventStore, Metadata, NewEvent,
};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use domain::Decider;
use projections::{Projection, ProjectionError, ProjectionRunner, StoredEvent};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

use crate::helpers::{spawn_app, spawn_instance_like, TestApp};

/// A test aggregate shaped like stock: adds are refused beyond a cap, and a
/// re-sent operation id changes nothing.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Counter {
    total: u32,
    ops: BTreeSet<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CounterEvent {
    Added { op: u32, amount: u32, total: u32 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        "Added".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum CounterError {
    #[error("only {available} left")]
    Full { available: u32 },
}

#[derive(Debug, Clone)]
struct Add {
    op: u32,
    amount: u32,
}

const CAP: u32 = 30;

impl Aggregate for Counter {
    const TYPE: &'static str = "TestCounter";
    type Command = Add;
    type Event = CounterEvent;
    type Error = CounterError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Add,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CounterError> {
        domain::handle_with_decider(self, command, sink).await
    }

    fn apply(&mut self, CounterEvent::Added { op, total, .. }: CounterEvent) {
        self.ops.insert(op);
        self.total = total;
    }
}

impl Decider for Counter {
    fn decide(&self, Add { op, amount }: Add) -> Result<Vec<CounterEvent>, CounterError> {
        if self.ops.contains(&op) {
            return Ok(Vec::new());
        }
        let available = CAP - self.total;
        if amount > available {
            return Err(CounterError::Full { available });
        }
        Ok(vec![CounterEvent::Added {
            op,
            amount,
            total: self.total + amount,
        }])
    }
}

fn metadata() -> Metadata {
    Metadata::system("event-store-test")
}

fn raw_event(aggregate_id: &str, sequence: i64) -> NewEvent {
    NewEvent {
        aggregate_type: "TestStream",
        aggregate_id: aggregate_id.to_owned(),
        sequence,
        event_type: "Happened".into(),
        event_version: "1".into(),
        payload: serde_json::value::to_raw_value(&serde_json::json!({ "sequence": sequence }))
            .expect("JSON"),
        metadata: metadata().to_json().expect("JSON"),
    }
}

/// Records every event it is given, refusing (through the primary key) to
/// see one twice, and remembers the order it saw them in.
struct SeenEvents;

#[async_trait::async_trait]
impl Projection for SeenEvents {
    fn name(&self) -> &'static str {
        "test_seen_events"
    }

    fn handles(&self, aggregate_type: &str) -> bool {
        aggregate_type == "TestStream"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["test_seen"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        sqlx::query("INSERT INTO test_seen (position, aggregate_id, sequence) VALUES ($1, $2, $3)")
            .bind(event.position)
            .bind(&event.aggregate_id)
            .bind(event.sequence)
            .execute(tx)
            .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE test_seen").execute(tx).await?;
        Ok(())
    }
}

async fn create_seen_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE test_seen (applied bigserial, position bigint PRIMARY KEY, \
         aggregate_id text NOT NULL, sequence bigint NOT NULL)",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Appends `count` events to each of `streams` aggregates, in transactions
/// held open for random short times, so commits land out of position order.
async fn slow_writer(pool: PgPool, writer: usize, streams: usize, count: i64) {
    for sequence in 1..=count {
        for stream in 0..streams {
            let id = format!("w{writer}-s{stream}");
            let hold_ms = rand::rng().random_range(0..8u64);
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
                 VALUES ('TestStream', $1, $2, 'Happened', '1', '{}', '{}')",
            )
            .bind(&id)
            .bind(sequence)
            .execute(&mut *tx)
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(hold_ms)).await;
            tx.commit().await.unwrap();
        }
    }
}

/// Runs `writers` slow writers at once, to the end.
async fn write_concurrently(pool: &PgPool, writers: usize, streams: usize, per_stream: i64) {
    let tasks: Vec<_> = (0..writers)
        .map(|writer| tokio::spawn(slow_writer(pool.clone(), writer, streams, per_stream)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Steps the runner until it has seen every stored test event. One
/// `catch_up` can stop short: the horizon is the oldest transaction in the
/// whole cluster, and other tests running in parallel hold theirs open.
async fn catch_up_past_other_transactions(pool: &PgPool, runner: &ProjectionRunner) {
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'TestStream'")
            .fetch_one(pool)
            .await
            .unwrap();
    for _ in 0..600 {
        runner.catch_up().await.unwrap();
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM test_seen")
            .fetch_one(pool)
            .await
            .unwrap();
        if seen >= stored {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_seen_exactly_once_in_order(
    pool: &PgPool,
    expected_streams: usize,
    per_stream: i64,
) {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, sequence FROM test_seen ORDER BY applied")
            .fetch_all(pool)
            .await
            .unwrap();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'TestStream'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        rows.len() as i64,
        stored,
        "every stored event seen exactly once"
    );
    let mut last: HashMap<String, i64> = HashMap::new();
    for (aggregate_id, sequence) in rows {
        let previous = last.insert(aggregate_id.clone(), sequence).unwrap_or(0);
        assert_eq!(
            sequence,
            previous + 1,
            "{aggregate_id} seen in sequence order"
        );
    }
    assert_eq!(last.len(), expected_streams);
    assert!(last.values().all(|&sequence| sequence == per_stream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tailing_projection_sees_every_event_once_in_order_while_commits_land_out_of_order() {
    let app = spawn_app().await;
    create_seen_table(&app.pool).await;
    let store = EventStore::new(app.pool.clone());
    let runner =
        Arc::new(ProjectionRunner::new(app.pool.clone(), Arc::new(SeenEvents)).with_batch_size(7));
    runner.register().await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let (_leader, leading) = watch::channel(true);
    let tailing = tokio::spawn(
        runner
            .clone()
            .run(store.appended_signal(), leading, stopped),
    );

    let (writers, streams, per_stream) = (12, 3, 15);
    write_concurrently(&app.pool, writers, streams, per_stream).await;
    store.signal_appended();
    catch_up_past_other_transactions(&app.pool, &runner).await;
    stop.send(true).unwrap();
    tailing.await.unwrap();

    assert_seen_exactly_once_in_order(&app.pool, writers * streams, per_stream).await;
}

/// Each instance's runners share one read of the store (the event feed);
/// two instances take turns on the projection, so each feed in turn finds
/// the checkpoint ahead of what it read, or behind what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_sharing_reads_among_their_runners_apply_every_event_once_in_order() {
    let app = spawn_app().await;
    create_seen_table(&app.pool).await;
    let store = EventStore::new(app.pool.clone());
    let instances: Vec<_> = (0..2)
        .map(|_| projections::ProjectionSet::new(app.pool.clone(), vec![Arc::new(SeenEvents)]))
        .collect();
    let (stop, stopped) = watch::channel(false);
    let tailing: Vec<_> = instances
        .iter()
        .flat_map(|set| set.spawn(&store.appended_signal(), &stopped))
        .collect();

    let (writers, streams, per_stream) = (12, 3, 15);
    write_concurrently(&app.pool, writers, streams, per_stream).await;
    store.signal_appended();
    let runner = instances[1].runner("test_seen_events").unwrap();
    catch_up_past_other_transactions(&app.pool, runner).await;
    stop.send(true).unwrap();
    for task in tailing {
        task.await.unwrap();
    }

    assert_seen_exactly_once_in_order(&app.pool, writers * streams, per_stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_killed_mid_stream_resumes_without_losing_or_repeating_events() {
    let app = spawn_app().await;
    create_seen_table(&app.pool).await;
    let store = EventStore::new(app.pool.clone());
    let (writers, streams, per_stream) = (8, 3, 12);
    let tasks: Vec<_> = (0..writers)
        .map(|writer| tokio::spawn(slow_writer(app.pool.clone(), writer, streams, per_stream)))
        .collect();

    // Kill the runner (mid-transaction, whenever the abort lands) again and
    // again while writers are still writing; each new runner resumes from
    // the committed checkpoint.
    for _ in 0..6 {
        let runner = Arc::new(
            ProjectionRunner::new(app.pool.clone(), Arc::new(SeenEvents)).with_batch_size(5),
        );
        let (_stop, stopped) = watch::channel(false);
        let (_leader, leading) = watch::channel(true);
        let tailing = tokio::spawn(runner.run(store.appended_signal(), leading, stopped));
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(20..80))).await;
        tailing.abort();
        let _ = tailing.await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    let resumed = ProjectionRunner::new(app.pool.clone(), Arc::new(SeenEvents));
    resumed.register().await.unwrap();
    resumed.catch_up().await.unwrap();

    assert_seen_exactly_once_in_order(&app.pool, writers * streams, per_stream).await;
}

#[tokio::test]
async fn two_runners_on_one_projection_apply_each_event_once() {
    let app = spawn_app().await;
    create_seen_table(&app.pool).await;
    let store = EventStore::new(app.pool.clone());
    for sequence in 1..=40 {
        store
            .append(&[raw_event("shared", sequence)])
            .await
            .unwrap();
    }
    let first = ProjectionRunner::new(app.pool.clone(), Arc::new(SeenEvents)).with_batch_size(3);
    let second = ProjectionRunner::new(app.pool.clone(), Arc::new(SeenEvents)).with_batch_size(3);
    first.register().await.unwrap();
    second.register().await.unwrap();

    let (a, b) = tokio::join!(first.catch_up(), second.catch_up());

    assert_eq!(a.unwrap() + b.unwrap(), 40);
    assert_seen_exactly_once_in_order(&app.pool, 1, 40).await;
}

#[tokio::test]
async fn of_many_concurrent_appends_of_one_sequence_exactly_one_wins() {
    let app = spawn_app().await;
    let store = EventStore::new(app.pool.clone());

    let attempts = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.append(&[raw_event("contested", 1)]).await })
    });
    let results: Vec<_> = futures_util::future::join_all(attempts).await;

    let wins = results
        .iter()
        .filter(|r| matches!(r, Ok(Ok(Some(_)))))
        .count();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Ok(Err(AppendError::Conflict))))
        .count();
    assert_eq!((wins, conflicts), (1, 19));
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = 'contested'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_batch_that_conflicts_on_one_aggregate_stores_nothing() {
    let app = spawn_app().await;
    let store = EventStore::new(app.pool.clone());
    store.append(&[raw_event("b", 1)]).await.unwrap();

    let result = store.append(&[raw_event("a", 1), raw_event("b", 1)]).await;

    assert!(matches!(result, Err(AppendError::Conflict)));
    assert!(store
        .load_after("TestStream", "a", 0)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_commands_from_two_instances_never_exceed_the_cap_and_never_reuse_a_sequence() {
    let app = spawn_app().await;
    // Two buses with their own in-memory copies stand for two instances.
    let instances = [
        CommandBus::<Counter>::new(EventStore::new(app.pool.clone())),
        CommandBus::<Counter>::new(EventStore::new(app.pool.clone())),
    ];

    let commands = (0..100u32).map(|op| {
        let bus = instances[op as usize % 2].clone();
        tokio::spawn(async move { bus.execute("hot", Add { op, amount: 1 }, metadata()).await })
    });
    let results: Vec<_> = futures_util::future::join_all(commands).await;

    let accepted = results
        .iter()
        .filter(|r| matches!(r, Ok(Ok(e)) if !e.events.is_empty()))
        .count();
    let refused = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Ok(Err(CommandError::Rejected(CounterError::Full { .. })))
            )
        })
        .count();
    assert_eq!(accepted as u32, CAP);
    assert_eq!(
        refused as u32,
        100 - CAP,
        "no other outcome than accepted or refused"
    );
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_id = 'hot' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(sequences, (1..=i64::from(CAP)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_resent_command_changes_nothing_and_reports_no_position() {
    let app = spawn_app().await;
    let bus = CommandBus::<Counter>::new(EventStore::new(app.pool.clone()));

    let first = bus
        .execute("idem", Add { op: 7, amount: 2 }, metadata())
        .await
        .unwrap();
    let again = bus
        .execute("idem", Add { op: 7, amount: 2 }, metadata())
        .await
        .unwrap();

    assert_eq!(first.events.len(), 1);
    assert!(first.position.is_some());
    assert!(again.events.is_empty());
    assert_eq!(again.position, None);
    assert_eq!(again.version, first.version);
}

#[tokio::test]
async fn every_event_records_who_why_and_when() {
    let app = spawn_app().await;
    let bus = CommandBus::<Counter>::new(EventStore::new(app.pool.clone()));
    let user = uuid::Uuid::new_v4();
    let metadata = Metadata::user(user, "request-42").with_idempotency_key(Some("key-1".into()));

    bus.execute("audited", Add { op: 1, amount: 1 }, metadata)
        .await
        .unwrap();

    let events = EventStore::new(app.pool.clone())
        .load_after(Counter::TYPE, "audited", 0)
        .await
        .unwrap();
    let event = &events[0];
    assert_eq!(event.metadata_str("actor"), Some(user.to_string()));
    assert_eq!(
        event.metadata_str("correlation_id").as_deref(),
        Some("request-42")
    );
    assert_eq!(
        event.metadata_str("idempotency_key").as_deref(),
        Some("key-1")
    );
    assert!((chrono::Utc::now() - event.recorded_at).num_seconds().abs() < 60);
    assert_eq!(event.event_type, "Added");
}

#[tokio::test]
async fn cqrs_es_runs_on_our_store_and_reloads_what_it_wrote() {
    let app = spawn_app().await;
    let store = EventStore::new(app.pool.clone());
    let framework = cqrs_es::CqrsFramework::new(
        cqrs_es::persist::PersistedEventStore::<EventStore, Counter>::new_event_store(
            store.clone(),
        ),
        vec![],
        (),
    );

    for op in 0..5 {
        framework
            .execute("via-cqrs", Add { op, amount: 2 })
            .await
            .unwrap();
    }
    let refused = framework
        .execute("via-cqrs", Add { op: 99, amount: 25 })
        .await;

    assert!(matches!(
        refused,
        Err(cqrs_es::AggregateError::UserError(CounterError::Full {
            available: 20
        }))
    ));
    // Our executor, on the same rows, sees exactly what cqrs-es wrote.
    let bus = CommandBus::<Counter>::new(store);
    let executed = bus
        .execute("via-cqrs", Add { op: 100, amount: 1 }, metadata())
        .await
        .unwrap();
    assert_eq!(executed.version, 6);
    assert_eq!(
        executed.events,
        vec![CounterEvent::Added {
            op: 100,
            amount: 1,
            total: 11
        }]
    );
}

#[tokio::test]
async fn a_handler_can_wait_until_a_projection_has_applied_its_write() {
    let app = spawn_app().await;
    create_seen_table(&app.pool).await;
    let store = EventStore::new(app.pool.clone());
    let set = projections::ProjectionSet::new(app.pool.clone(), vec![Arc::new(SeenEvents)]);
    let (_stop, stopped) = watch::channel(false);
    let _tasks = set.spawn(&store.appended_signal(), &stopped);

    let written = store
        .append(&[raw_event("read-your-write", 1)])
        .await
        .unwrap()
        .unwrap();
    set.wait_for("test_seen_events", written, Duration::from_secs(5))
        .await
        .unwrap();

    let seen: i64 =
        sqlx::query_scalar("SELECT count(*) FROM test_seen WHERE aggregate_id = 'read-your-write'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        seen, 1,
        "the read model shows the write as soon as the wait returns"
    );
}

/// Waits up to `within` for `condition`, checking every 20 ms.
async fn eventually(within: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

fn leaders(apps: &[&TestApp]) -> usize {
    apps.iter()
        .filter(|app| app.state.projections.leads())
        .count()
}

#[tokio::test]
async fn one_instance_leads_the_projections_and_another_takes_over_when_it_stops() {
    let first = spawn_app().await;
    let second = spawn_instance_like(&first).await;
    assert!(
        eventually(Duration::from_secs(5), || leaders(&[&first, &second]) == 1).await,
        "one of two instances leads"
    );
    // The lock is held, not won again on every try: still one, a while on.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(leaders(&[&first, &second]), 1, "exactly one leads");
    }

    let (leader, follower) = if first.state.projections.leads() {
        (first, second)
    } else {
        (second, first)
    };
    leader.stop().await;
    assert!(
        eventually(Duration::from_secs(5), || follower
            .state
            .projections
            .leads())
        .await,
        "the other instance leads once the leader stopped"
    );
    follower.stop().await;
}
