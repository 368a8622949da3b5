//! Which server instance leads the projections.
//!
//! Every instance runs every projection, and a projection's advisory lock
//! lets one of them apply each batch. Left at that, the instances took
//! turns: each read, and decoded, every event that it applied, so with
//! three instances each event of a flash sale was read three times over.
//! One instance leads instead, for as long as its session holds a
//! session-level advisory lock, and the others step only when one of their
//! own requests waits for a write, or now and then in case the leader has
//! stalled. The lock goes with the leader's session, so when the leader
//! dies another instance takes over within `RETRY`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;

use crate::runner::lock_key;

/// How often an instance that does not lead tries to.
const RETRY: Duration = Duration::from_secs(1);
/// How often the leader checks that its session, and its lock, still live.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Keeps `leading` true while this instance holds the leader's lock, until
/// `shutdown` changes or closes (ending the session gives the lock up).
pub(crate) async fn hold(
    pool: PgPool,
    leading: Arc<watch::Sender<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    if *shutdown.borrow() {
        return;
    }
    loop {
        match lead_while_connected(&pool, &leading, &mut shutdown).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "projection leadership lost its connection"),
        }
        leading.send_replace(false);
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Leads, or waits to, on one session; `Ok` once `shutdown` changed.
async fn lead_while_connected(
    pool: &PgPool,
    leading: &watch::Sender<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), sqlx::Error> {
    let mut session = PgConnection::connect_with(&pool.connect_options()).await?;
    loop {
        let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key("(leader)"))
            .fetch_one(&mut session)
            .await?;
        if won {
            leading.send_replace(true);
            // The lock is ours for as long as the session lives.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                sqlx::query("SELECT 1").execute(&mut session).await?;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}
