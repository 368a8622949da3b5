//! All projections of a server instance: started together, and waited on
//! by request handlers that must read their own writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::feed::EventFeed;
use crate::leadership;
use crate::runner::{read_checkpoint, Projection, ProjectionError, ProjectionRunner};
use crate::stored_event::GlobalPosition;

#[derive(Clone)]
pub struct ProjectionSet {
    runners: Arc<HashMap<&'static str, Arc<ProjectionRunner>>>,
    pool: Option<PgPool>,
    /// Whether this instance leads the projections (see `leadership`).
    leading: Arc<watch::Sender<bool>>,
}

impl Default for ProjectionSet {
    fn default() -> Self {
        Self {
            runners: Arc::default(),
            pool: None,
            leading: Arc::new(watch::channel(true).0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("projection {0} is not part of this server")]
    Unknown(&'static str),
    #[error("projection {name} did not reach the write within {waited:?}")]
    TimedOut {
        name: &'static str,
        waited: Duration,
    },
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

impl ProjectionSet {
    pub fn new(pool: PgPool, projections: Vec<Arc<dyn Projection>>) -> Self {
        let feed = Arc::new(EventFeed::new(pool.clone()));
        let runners = projections
            .into_iter()
            .map(|projection| {
                let runner = Arc::new(
                    ProjectionRunner::new(pool.clone(), projection).with_feed(feed.clone()),
                );
                (runner.name(), runner)
            })
            .collect();
        Self {
            runners: Arc::new(runners),
            pool: Some(pool),
            // Nobody leads until the leader's lock is won.
            leading: Arc::new(watch::channel(false).0),
        }
    }

    /// Whether this instance leads the projections: applies every event,
    /// where the others step only for their own readers.
    pub fn leads(&self) -> bool {
        *self.leading.borrow()
    }

    pub fn runner(&self, name: &str) -> Option<&Arc<ProjectionRunner>> {
        self.runners.get(name)
    }

    pub fn runners(&self) -> impl Iterator<Item = &Arc<ProjectionRunner>> {
        self.runners.values()
    }

    /// Starts one task per projection, and one that makes this instance
    /// the projections' leader whenever no other instance is.
    pub fn spawn(
        &self,
        wake: &watch::Receiver<u64>,
        shutdown: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks: Vec<JoinHandle<()>> = self
            .runners
            .values()
            .map(|runner| {
                tokio::spawn(runner.clone().run(
                    wake.clone(),
                    self.leading.subscribe(),
                    shutdown.clone(),
                ))
            })
            .collect();
        if let Some(pool) = &self.pool {
            tasks.push(tokio::spawn(leadership::hold(
                pool.clone(),
                self.leading.clone(),
                shutdown.clone(),
            )));
        }
        tasks
    }

    /// Resolves once projection `name` has applied the event at `target`.
    /// Follows this instance's runner, and re-reads the committed checkpoint
    /// now and then in case another instance applied it.
    pub async fn wait_for(
        &self,
        name: &'static str,
        target: GlobalPosition,
        timeout: Duration,
    ) -> Result<(), WaitError> {
        let runner = self.runners.get(name).ok_or(WaitError::Unknown(name))?;
        let mut local = runner.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if *local.borrow_and_update() >= target {
                return Ok(());
            }
            runner.hurry();
            if let Some(pool) = &self.pool {
                if read_checkpoint(pool, name).await? >= target {
                    return Ok(());
                }
            }
            let poll = tokio::time::sleep(Duration::from_millis(25));
            tokio::select! {
                _ = local.changed() => {}
                _ = poll => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(WaitError::TimedOut { name, waited: timeout });
                }
            }
        }
    }
}
