//! Executes commands on aggregates with group commit.
//!
//! Each aggregate that is receiving commands has one worker task in this
//! process, fed by a queue. The worker keeps the aggregate in memory, takes
//! every command that is waiting, decides them one after another against the
//! current state, and appends all of their events in one statement. Every
//! caller is answered from that one commit. Before deciding, the worker folds
//! in whatever other instances stored since its version; if another instance
//! still wins the race to the next sequence, the batch is decided again after
//! a short jittered pause, a bounded number of times.
//!
//! This is what keeps a flash sale from collapsing onto one hot
//! `InventoryItem`: no history reload per command, one disk flush for many
//! decisions, and no conflict storm inside one instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cqrs_es::{Aggregate, DomainEvent};
use domain::Decider;
use projections::GlobalPosition;
use rand::Rng;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::repository::{AppendError, EventStore, NewEvent};
use super::Metadata;

/// The result of a command that was accepted.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    /// The events this command caused; empty when it changed nothing
    /// (an idempotent re-send, for example).
    pub events: Vec<A::Event>,
    /// The aggregate's version (last sequence) after this command.
    pub version: i64,
    /// Where the batch that carried these events stands in the global order;
    /// `None` when no events were stored. Wait on it for read-your-writes.
    pub position: Option<GlobalPosition>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError<E> {
    /// The aggregate refused the command.
    #[error(transparent)]
    Rejected(E),
    /// Other writers kept winning the race for this aggregate.
    #[error("the aggregate is under too much contention; try again")]
    Contention,
    #[error("event store failure: {0}")]
    Store(String),
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    pub max_batch: usize,
    pub max_attempts: u32,
    pub idle_timeout: Duration,
    pub queue_capacity: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            max_batch: 512,
            max_attempts: 8,
            idle_timeout: Duration::from_secs(30),
            queue_capacity: 4096,
        }
    }
}

type Reply<A> = oneshot::Sender<Result<Executed<A>, CommandError<<A as Aggregate>::Error>>>;

struct Job<A: Aggregate> {
    command: A::Command,
    metadata: Metadata,
    reply: Reply<A>,
}

type Workers<A> = Arc<Mutex<HashMap<String, mpsc::Sender<Job<A>>>>>;

/// Sends commands for one aggregate type to their per-aggregate workers.
pub struct CommandBus<A: Aggregate> {
    store: EventStore,
    workers: Workers<A>,
    config: BusConfig,
}

impl<A: Aggregate> Clone for CommandBus<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            workers: self.workers.clone(),
            config: self.config.clone(),
        }
    }
}

impl<A> CommandBus<A>
where
    A: Decider + Clone + Send + Sync + 'static,
    A::Command: Clone + Send + 'static,
    A::Event: Send + 'static,
    A::Error: Send + 'static,
{
    pub fn new(store: EventStore) -> Self {
        Self::with_config(store, BusConfig::default())
    }

    pub fn with_config(store: EventStore, config: BusConfig) -> Self {
        Self {
            store,
            workers: Arc::default(),
            config,
        }
    }

    /// Decides `command` against the latest state of aggregate `id` and
    /// stores its events.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        let (reply, answer) = oneshot::channel();
        let mut job = Job {
            command,
            metadata,
            reply,
        };
        // A worker that retired between our lookup and our send hands the
        // job back; a fresh worker then takes it.
        loop {
            match self.sender_for(id).send(job).await {
                Ok(()) => break,
                Err(mpsc::error::SendError(returned)) => job = returned,
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(CommandError::Store("command worker stopped".into())))
    }

    fn sender_for(&self, id: &str) -> mpsc::Sender<Job<A>> {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = workers.get(id).filter(|sender| !sender.is_closed()) {
            return sender.clone();
        }
        let (sender, receiver) = mpsc::channel(self.config.queue_capacity);
        workers.insert(id.to_owned(), sender.clone());
        let worker = Worker::<A> {
            store: self.store.clone(),
            id: id.to_owned(),
            state: A::default(),
            version: 0,
            config: self.config.clone(),
            workers: self.workers.clone(),
        };
        tokio::spawn(worker.run(receiver, sender.clone()));
        sender
    }
}

struct Worker<A: Aggregate> {
    store: EventStore,
    id: String,
    state: A,
    version: i64,
    config: BusConfig,
    workers: Workers<A>,
}

/// One command's decision: its events and the version after them.
type Outcome<A> =
    Result<(Vec<<A as Aggregate>::Event>, i64), CommandError<<A as Aggregate>::Error>>;

/// What deciding a batch produced, before it is stored.
struct Decided<A: Aggregate> {
    outcomes: Vec<Outcome<A>>,
    new_events: Vec<NewEvent>,
    next_state: Option<A>,
    next_version: i64,
}

impl<A> Worker<A>
where
    A: Decider + Clone + Send + Sync + 'static,
    A::Command: Clone + Send + 'static,
    A::Event: Send + 'static,
    A::Error: Send + 'static,
{
    async fn run(mut self, mut queue: mpsc::Receiver<Job<A>>, own_sender: mpsc::Sender<Job<A>>) {
        let mut retired = false;
        loop {
            let first = match tokio::time::timeout(self.config.idle_timeout, queue.recv()).await {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(_idle) if retired => return,
                Err(_idle) => {
                    self.retire(&own_sender);
                    queue.close();
                    retired = true;
                    continue;
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < self.config.max_batch {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            metrics::histogram!("command_batch_size", "aggregate" => A::TYPE)
                .record(jobs.len() as f64);
            self.process(jobs).await;
        }
    }

    /// Leaves the map so that the next command starts a fresh worker. Jobs
    /// already queued are still processed after this.
    fn retire(&self, own_sender: &mpsc::Sender<Job<A>>) {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if workers
            .get(&self.id)
            .is_some_and(|sender| sender.same_channel(own_sender))
        {
            workers.remove(&self.id);
        }
    }

    async fn process(&mut self, jobs: Vec<Job<A>>) {
        let mut attempt: u32 = 0;
        loop {
            if let Err(error) = self.refresh().await {
                return self.fail_all(jobs, &error);
            }
            let decided = self.decide(&jobs);
            let appended = match self.store.append(&decided.new_events).await {
                Ok(position) => position,
                Err(AppendError::Conflict) => {
                    attempt += 1;
                    if attempt >= self.config.max_attempts {
                        for job in jobs {
                            let _ = job.reply.send(Err(CommandError::Contention));
                        }
                        return;
                    }
                    let pause = rand::rng().random_range(1..=(1u64 << attempt.min(6)));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
                Err(AppendError::Database(error)) => {
                    // The commit may or may not have happened: forget the
                    // state and reload it from the store next time.
                    self.state = A::default();
                    self.version = 0;
                    return self.fail_all(jobs, &error.to_string());
                }
            };
            if let Some(next_state) = decided.next_state {
                self.state = next_state;
                self.version = decided.next_version;
            }
            for (job, outcome) in jobs.into_iter().zip(decided.outcomes) {
                let _ = job.reply.send(outcome.map(|(events, version)| Executed {
                    position: if events.is_empty() { None } else { appended },
                    events,
                    version,
                }));
            }
            return;
        }
    }

    /// Folds in what other instances stored since our version.
    async fn refresh(&mut self) -> Result<(), String> {
        match self
            .store
            .catch_up(&self.id, &mut self.state, self.version)
            .await
        {
            Ok(version) => {
                self.version = version;
                Ok(())
            }
            Err(error) => {
                self.state = A::default();
                self.version = 0;
                Err(error.to_string())
            }
        }
    }

    fn decide(&self, jobs: &[Job<A>]) -> Decided<A> {
        // Decisions run against `self.state` until the first event; from then
        // on against a copy that the batch's events are applied to, which
        // becomes the state only once the append has committed.
        let mut next_state: Option<A> = None;
        let mut version = self.version;
        let mut new_events = Vec::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            let current = next_state.as_ref().unwrap_or(&self.state);
            let events = match current.decide(job.command.clone()) {
                Ok(events) => events,
                Err(rejection) => {
                    outcomes.push(Err(CommandError::Rejected(rejection)));
                    continue;
                }
            };
            let serialized =
                match job.metadata.to_json().and_then(|metadata| {
                    serialize_events::<A>(&self.id, &events, version, &metadata)
                }) {
                    Ok(serialized) => serialized,
                    Err(error) => {
                        outcomes.push(Err(CommandError::Store(error.to_string())));
                        continue;
                    }
                };
            if !events.is_empty() {
                let state = next_state.get_or_insert_with(|| self.state.clone());
                for event in &events {
                    state.apply(event.clone());
                }
                version += events.len() as i64;
                new_events.extend(serialized);
            }
            outcomes.push(Ok((events, version)));
        }
        Decided {
            outcomes,
            new_events,
            next_state,
            next_version: version,
        }
    }

    fn fail_all(&self, jobs: Vec<Job<A>>, error: &str) {
        tracing::error!(aggregate = A::TYPE, id = %self.id, error, "command batch failed");
        for job in jobs {
            let _ = job.reply.send(Err(CommandError::Store(error.to_owned())));
        }
    }
}

/// The events one command of aggregate `id` caused, numbered after `version`
/// and ready to append.
pub fn serialize_events<A: Aggregate>(
    id: &str,
    events: &[A::Event],
    version: i64,
    metadata: &Arc<RawValue>,
) -> Result<Vec<NewEvent>, serde_json::Error> {
    events
        .iter()
        .zip(version + 1..)
        .map(|(event, sequence)| {
            Ok(NewEvent {
                aggregate_type: A::TYPE,
                aggregate_id: id.to_owned(),
                sequence,
                event_type: event.event_type(),
                event_version: event.event_version(),
                payload: serde_json::value::to_raw_value(event)?,
                metadata: metadata.clone(),
            })
        })
        .collect()
}
