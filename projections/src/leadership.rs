//! Which server instance leads the projections.
//!
//! Every instance runs every projection, and a projection's advisory lock
//! lets one of them apply each batch. Left at that, the instances took
//! turns: each read, and decoded, every event that it applied, so with
//! three instances each event of a flash sale was read three times over.
//! One instance leads instead, for as long as it holds the leader's lease
//! (a row in `projection_leader`, renewed every `RENEW` for `LEASE`), and
//! the others step only when one of their own requests waits for a write,
//! or now and then in case the leader has stalled. A lease, not a
//! session's advisory lock: each renewal is one statement of its own, so
//! it works through a transaction-mode connection pooler. A leader that
//! stops gives the lease up; one that dies loses it within `LEASE`. Two
//! leaders for a moment (a renewal that came late) cost only work: each
//! projection's batch is applied under its own lock.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

/// How often the leader renews its lease, and how often an instance that
/// does not lead tries to.
const RENEW: Duration = Duration::from_secs(1);
/// How long a lease lasts unless renewed.
const LEASE: Duration = Duration::from_secs(5);

/// Keeps `leading` true while this instance holds the leader's lease,
/// until `shutdown` changes or closes, and then gives the lease up.
pub(crate) async fn hold(
    pool: PgPool,
    leading: Arc<watch::Sender<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let holder = Uuid::new_v4();
    while !*shutdown.borrow() {
        let held = match renew(&pool, holder).await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(%error, "could not renew the projections' leader lease");
                false
            }
        };
        leading.send_replace(held);
        tokio::select! {
            _ = tokio::time::sleep(RENEW) => {}
            _ = shutdown.changed() => break,
        }
    }
    leading.send_replace(false);
    if let Err(error) = give_up(&pool, holder).await {
        tracing::warn!(%error, "could not give up the projections' leader lease");
    }
}

/// Takes the lease if nobody holds it (or its holder let it lapse), or
/// extends it if `holder` holds it; whether `holder` holds it now.
async fn renew(pool: &PgPool, holder: Uuid) -> Result<bool, sqlx::Error> {
    let held: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO projection_leader (holder, until) \
         VALUES ($1, now() + make_interval(secs => $2)) \
         ON CONFLICT (singleton) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
         WHERE projection_leader.holder = EXCLUDED.holder OR projection_leader.until < now() \
         RETURNING holder",
    )
    .bind(holder)
    .bind(LEASE.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(held.is_some())
}

/// Ends `holder`'s lease, if it holds it, so that another instance leads
/// within `RENEW` instead of `LEASE`.
async fn give_up(pool: &PgPool, holder: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM projection_leader WHERE holder = $1")
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}
