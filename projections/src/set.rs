//! All projections of a server instance: started together, and waited on
//! by request handlers that must read their own writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::feed::EventFeed;
use crate::runner::{read_checkpoint, Projection, ProjectionError, ProjectionRunner};
use crate::stored_event::GlobalPosition;

#[derive(Clone, Default)]
pub struct ProjectionSet {
    runners: Arc<HashMap<&'static str, Arc<ProjectionRunner>>>,
    pool: Option<PgPool>,
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
        }
    }

    pub fn runner(&self, name: &str) -> Option<&Arc<ProjectionRunner>> {
        self.runners.get(name)
    }

    pub fn runners(&self) -> impl Iterator<Item = &Arc<ProjectionRunner>> {
        self.runners.values()
    }

    /// Starts one task per projection.
    pub fn spawn(
        &self,
        wake: &watch::Receiver<u64>,
        shutdown: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        self.runners
            .values()
            .map(|runner| tokio::spawn(runner.clone().run(wake.clone(), shutdown.clone())))
            .collect()
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
