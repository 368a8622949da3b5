//! Uniqueness across aggregates: product slugs, category slugs and SKUs are
//! claimed in `unique_claims` before the command that uses them runs.
//!
//! All claims of one request are made in one transaction; a value another
//! owner holds is a 409 naming the field (through the table's primary key,
//! never by reading error text). The same owner may claim a value again
//! (retries, or a product taking back its own old slug). Claims made for a
//! command that then fails are released.

use domain::values::Slug;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::http::problem::{ApiError, ResultExt};

const CLAIMS_KEY: &str = "unique_claims_pkey";

/// How many suffixed slugs (`-2`, `-3`, ...) are tried after a clash.
const MAX_SUFFIX_ATTEMPTS: u32 = 50;

/// What kind of value is claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    ProductSlug,
    CategorySlug,
    Sku,
}

impl ClaimKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProductSlug => "product_slug",
            Self::CategorySlug => "category_slug",
            Self::Sku => "sku",
        }
    }
}

/// A value that must be this owner's, and the request field it came from.
#[derive(Debug, Clone)]
pub struct Claim {
    pub kind: ClaimKind,
    pub value: String,
    pub field: String,
}

impl Claim {
    pub fn new(kind: ClaimKind, value: impl Into<String>, field: impl Into<String>) -> Self {
        Self {
            kind,
            value: value.into(),
            field: field.into(),
        }
    }
}

/// A slug to claim: exactly the one asked for, or one made from the name
/// that takes the first free suffix when the plain form is taken.
#[derive(Debug, Clone)]
pub enum SlugWish {
    Exactly(Slug),
    FromName(Slug),
}

/// What a request now holds: the slug it got, and the claims it made (the
/// ones to release if its command fails).
#[derive(Debug, Default)]
pub struct Claimed {
    pub slug: Option<Slug>,
    made: Vec<(ClaimKind, String)>,
}

/// Claims `claims` and the slug wish for `owner`, all or none.
pub async fn claim(
    pool: &PgPool,
    owner: Uuid,
    claims: &[Claim],
    slug: Option<(ClaimKind, SlugWish, &str)>,
) -> Result<Claimed, ApiError> {
    let mut tx = pool.begin().await?;
    let mut claimed = Claimed::default();
    for claim in claims {
        if claim_one(&mut tx, owner, claim).await? {
            claimed.made.push((claim.kind, claim.value.clone()));
        }
    }
    if let Some((kind, wish, field)) = slug {
        let (slug, made) = match wish {
            SlugWish::Exactly(slug) => {
                let made =
                    claim_one(&mut tx, owner, &Claim::new(kind, slug.as_str(), field)).await?;
                (slug, made)
            }
            SlugWish::FromName(base) => {
                claim_free_suffix(&mut tx, owner, kind, &base, field).await?
            }
        };
        if made {
            claimed.made.push((kind, slug.as_str().to_owned()));
        }
        claimed.slug = Some(slug);
    }
    tx.commit().await?;
    Ok(claimed)
}

/// Gives back the claims a failed command had made. Failures are logged:
/// a leftover claim only keeps a value reserved for an owner that never
/// came to exist.
pub async fn release(pool: &PgPool, owner: Uuid, claimed: Claimed) {
    if claimed.made.is_empty() {
        return;
    }
    let (kinds, values): (Vec<&str>, Vec<String>) = claimed
        .made
        .into_iter()
        .map(|(kind, value)| (kind.as_str(), value))
        .unzip();
    let released = sqlx::query(
        "DELETE FROM unique_claims c USING UNNEST($2::text[], $3::text[]) AS r(kind, value) \
         WHERE c.owner_id = $1 AND c.kind = r.kind AND c.value = r.value",
    )
    .bind(owner)
    .bind(&kinds)
    .bind(&values)
    .execute(pool)
    .await;
    if let Err(error) = released {
        tracing::warn!(%owner, %error, "could not release uniqueness claims");
    }
}

/// Claims one value; true when this call made the claim, false when the
/// owner already held it.
async fn claim_one(conn: &mut PgConnection, owner: Uuid, claim: &Claim) -> Result<bool, ApiError> {
    let holder: Option<Uuid> =
        sqlx::query_scalar("SELECT owner_id FROM unique_claims WHERE kind = $1 AND value = $2")
            .bind(claim.kind.as_str())
            .bind(&claim.value)
            .fetch_optional(&mut *conn)
            .await?;
    match holder {
        Some(holder) if holder == owner => return Ok(false),
        Some(_) => return Err(taken(claim)),
        None => {}
    }
    // A concurrent claimer of the same value waits here for our commit and
    // then fails on the primary key, or we fail on theirs.
    sqlx::query("INSERT INTO unique_claims (kind, value, owner_id) VALUES ($1, $2, $3)")
        .bind(claim.kind.as_str())
        .bind(&claim.value)
        .bind(owner)
        .execute(&mut *conn)
        .await
        .on_constraint(CLAIMS_KEY, || taken(claim))?;
    Ok(true)
}

fn taken(claim: &Claim) -> ApiError {
    let what = match claim.kind {
        ClaimKind::ProductSlug => "product slug",
        ClaimKind::CategorySlug => "category slug",
        ClaimKind::Sku => "SKU",
    };
    ApiError::Conflict(format!(
        "{}: the {what} {:?} is already taken",
        claim.field, claim.value
    ))
}

/// Claims `base`, or `base-2`, `base-3`, ... whichever is free first.
async fn claim_free_suffix(
    conn: &mut PgConnection,
    owner: Uuid,
    kind: ClaimKind,
    base: &Slug,
    field: &str,
) -> Result<(Slug, bool), ApiError> {
    // Look at what is taken first, so a popular name costs one query rather
    // than one failed insert per suffix.
    let taken: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT value, owner_id FROM unique_claims \
         WHERE kind = $1 AND (value = $2 OR value LIKE $3)",
    )
    .bind(kind.as_str())
    .bind(base.as_str())
    .bind(format!("{}-%", base.as_str()))
    .fetch_all(&mut *conn)
    .await?;
    let held: std::collections::HashMap<String, Uuid> = taken.into_iter().collect();
    let candidates = std::iter::once(base.clone()).chain((2..).map(|n| base.with_suffix(n)));
    let mut tried = 0;
    for candidate in candidates {
        tried += 1;
        if tried > MAX_SUFFIX_ATTEMPTS + held.len() as u32 {
            break;
        }
        match held.get(candidate.as_str()) {
            Some(holder) if *holder == owner => return Ok((candidate, false)),
            Some(_) => continue,
            None => {}
        }
        // Someone may take the candidate between our look and our insert:
        // a savepoint keeps that failure from ending the transaction.
        let mut savepoint = sqlx::Connection::begin(&mut *conn).await?;
        let inserted =
            sqlx::query("INSERT INTO unique_claims (kind, value, owner_id) VALUES ($1, $2, $3)")
                .bind(kind.as_str())
                .bind(candidate.as_str())
                .bind(owner)
                .execute(&mut *savepoint)
                .await;
        match inserted {
            Ok(_) => {
                savepoint.commit().await?;
                return Ok((candidate, true));
            }
            Err(sqlx::Error::Database(db)) if db.constraint() == Some(CLAIMS_KEY) => {
                savepoint.rollback().await?;
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "{field}: no free slug could be made from {:?}; give one",
        base.as_str()
    )))
}
