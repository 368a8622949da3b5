//! The carts read model: each user's cart lines (variant and quantity);
//! prices and availability are joined from the catalog when it is read.
//!
//! A batch folds its events per cart in memory (what is left after the last
//! clear, and each line's last change) and writes carts and lines in a few
//! statements, however many carts it touches.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::cart::{Cart, CartEvent};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::cache::{keys, VersionedCache};
use crate::runner::{Projection, ProjectionError};
use crate::stored_event::StoredEvent;

pub const NAME: &str = "carts";

/// The carts projection. It writes no cache entry as it goes (the cart
/// commands and reads keep a cart's entry), but after a rebuild it drops
/// the entries of every cart it rebuilt: a repaired cart keeps its version,
/// and an entry of that version holding the broken lines would otherwise
/// be served, and taken by a checkout as the cart, until it expired.
pub struct CartsProjection {
    cache: VersionedCache,
}

impl CartsProjection {
    pub fn new(cache: VersionedCache) -> Self {
        Self { cache }
    }
}

#[async_trait::async_trait]
impl Projection for CartsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, aggregate_type: &str) -> bool {
        aggregate_type == <Cart as cqrs_es::Aggregate>::TYPE
    }

    fn tables(&self) -> &'static [&'static str] {
        &["carts", "cart_lines"]
    }

    async fn after_rebuild(&self, latest: &[StoredEvent]) {
        let entries: Vec<(String, i64)> = latest
            .iter()
            .filter_map(|event| {
                let user_id = event.aggregate_uuid().ok()?;
                Some((keys::cart(user_id), event.sequence))
            })
            .collect();
        self.cache.invalidate_many(&entries).await;
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        let user_id = event.aggregate_uuid()?;
        // The cart's version guards every change: a replayed event is skipped.
        let fresh: Option<i32> = sqlx::query_scalar(
            "INSERT INTO carts (user_id, version, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at \
             WHERE carts.version < EXCLUDED.version RETURNING 1",
        )
        .bind(user_id)
        .bind(event.sequence)
        .bind(event.recorded_at)
        .fetch_optional(&mut *tx)
        .await?;
        if fresh.is_none() {
            return Ok(());
        }
        match event.payload_as::<CartEvent>()? {
            CartEvent::CartItemAdded {
                variant_id,
                quantity,
                ..
            }
            | CartEvent::CartItemQuantitySet {
                variant_id,
                quantity,
            } => {
                sqlx::query(
                    "INSERT INTO cart_lines (user_id, variant_id, quantity) VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id, variant_id) DO UPDATE SET quantity = EXCLUDED.quantity",
                )
                .bind(user_id)
                .bind(variant_id)
                .bind(i64::from(quantity))
                .execute(&mut *tx)
                .await?;
            }
            CartEvent::CartItemRemoved { variant_id } => {
                sqlx::query("DELETE FROM cart_lines WHERE user_id = $1 AND variant_id = $2")
                    .bind(user_id)
                    .bind(variant_id)
                    .execute(&mut *tx)
                    .await?;
            }
            CartEvent::CartCleared {} | CartEvent::CartCheckedOut { .. } => {
                sqlx::query("DELETE FROM cart_lines WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Reads the versions of the carts the batch touches and folds each
    /// cart's events that are newer than its row, as `apply` would (which
    /// also reads an event only once it knows the event is new).
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let owners = events
            .iter()
            .map(StoredEvent::aggregate_uuid)
            .collect::<Result<Vec<Uuid>, _>>()?;
        let mut seen = HashSet::new();
        let user_ids: Vec<Uuid> = owners
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect();
        let mut versions: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
            "SELECT user_id, version FROM carts WHERE user_id = ANY($1)",
        )
        .bind(&user_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut folded: HashMap<Uuid, CartFold> = HashMap::new();
        for (user_id, event) in owners.into_iter().zip(events) {
            if versions
                .get(&user_id)
                .is_some_and(|version| *version >= event.sequence)
            {
                continue;
            }
            versions.insert(user_id, event.sequence);
            let fold = folded.entry(user_id).or_default();
            fold.version = event.sequence;
            fold.updated_at = Some(event.recorded_at);
            match event.payload_as::<CartEvent>()? {
                CartEvent::CartItemAdded {
                    variant_id,
                    quantity,
                    ..
                }
                | CartEvent::CartItemQuantitySet {
                    variant_id,
                    quantity,
                } => fold.set(variant_id, Some(i64::from(quantity))),
                CartEvent::CartItemRemoved { variant_id } => fold.set(variant_id, None),
                CartEvent::CartCleared {} | CartEvent::CartCheckedOut { .. } => fold.clear(),
            }
        }
        write_folds(tx, &user_ids, &folded).await
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE carts, cart_lines")
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// What a batch's new events do to one cart.
#[derive(Debug, Default)]
struct CartFold {
    version: i64,
    updated_at: Option<DateTime<Utc>>,
    /// Every line went, before the changes below.
    cleared: bool,
    /// Each line's last change since then, in the order first changed:
    /// its quantity, or `None` when it was taken out.
    lines: Vec<(Uuid, Option<i64>)>,
}

impl CartFold {
    fn set(&mut self, variant_id: Uuid, quantity: Option<i64>) {
        match self.lines.iter_mut().find(|(id, _)| *id == variant_id) {
            Some(line) => line.1 = quantity,
            None => self.lines.push((variant_id, quantity)),
        }
    }

    fn clear(&mut self) {
        self.cleared = true;
        self.lines.clear();
    }
}

/// Writes the carts' versions, then their lines: clears first, then each
/// line's last change.
async fn write_folds(
    tx: &mut PgConnection,
    user_ids: &[Uuid],
    folded: &HashMap<Uuid, CartFold>,
) -> Result<(), ProjectionError> {
    let carts: Vec<(Uuid, &CartFold, DateTime<Utc>)> = user_ids
        .iter()
        .filter_map(|id| {
            let fold = folded.get(id)?;
            Some((*id, fold, fold.updated_at?))
        })
        .collect();
    if carts.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO carts (user_id, version, updated_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::timestamptz[]) \
         ON CONFLICT (user_id) DO UPDATE SET version = EXCLUDED.version, \
             updated_at = EXCLUDED.updated_at \
         WHERE carts.version < EXCLUDED.version",
    )
    .bind(carts.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
    .bind(
        carts
            .iter()
            .map(|(_, fold, _)| fold.version)
            .collect::<Vec<_>>(),
    )
    .bind(carts.iter().map(|(_, _, at)| *at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    let cleared: Vec<Uuid> = carts
        .iter()
        .filter(|(_, fold, _)| fold.cleared)
        .map(|(id, _, _)| *id)
        .collect();
    if !cleared.is_empty() {
        // `WHERE user_id = ANY($1)` was planned as a scan of every line
        // while the table held tens of thousands (Postgres prices hashing
        // each row against the array below probing the key once per cart),
        // and a flash sale clears a hundred carts a step: three to four
        // times the probes' cost. The lateral subquery, which `OFFSET 0`
        // keeps from being flattened into a join, probes the primary key
        // once per cart whatever the statistics say, and the delete takes
        // the lines it found by their row ids. Only this projection's
        // steps, under its lock, write these rows, so none moves between
        // the two.
        sqlx::query(
            "DELETE FROM cart_lines WHERE ctid = ANY (ARRAY( \
                 SELECT line.ctid FROM UNNEST($1::uuid[]) AS cleared(user_id) \
                 CROSS JOIN LATERAL (SELECT ctid FROM cart_lines \
                                     WHERE cart_lines.user_id = cleared.user_id OFFSET 0) AS line))",
        )
            .bind(&cleared)
            .execute(&mut *tx)
            .await?;
    }
    let changes = carts.iter().flat_map(|(id, fold, _)| {
        fold.lines
            .iter()
            .map(move |(variant, quantity)| (*id, *variant, *quantity))
    });
    let (mut removed_users, mut removed_variants) = (Vec::new(), Vec::new());
    let (mut kept_users, mut kept_variants, mut quantities) = (Vec::new(), Vec::new(), Vec::new());
    for (user_id, variant_id, quantity) in changes {
        match quantity {
            Some(quantity) => {
                kept_users.push(user_id);
                kept_variants.push(variant_id);
                quantities.push(quantity);
            }
            None => {
                removed_users.push(user_id);
                removed_variants.push(variant_id);
            }
        }
    }
    if !removed_users.is_empty() {
        sqlx::query(
            "DELETE FROM cart_lines c USING UNNEST($1::uuid[], $2::uuid[]) AS r(user_id, variant_id) \
             WHERE c.user_id = r.user_id AND c.variant_id = r.variant_id",
        )
        .bind(&removed_users)
        .bind(&removed_variants)
        .execute(&mut *tx)
        .await?;
    }
    if !kept_users.is_empty() {
        sqlx::query(
            "INSERT INTO cart_lines (user_id, variant_id, quantity) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[]) \
             ON CONFLICT (user_id, variant_id) DO UPDATE SET quantity = EXCLUDED.quantity",
        )
        .bind(&kept_users)
        .bind(&kept_variants)
        .bind(&quantities)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
