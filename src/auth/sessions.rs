//! Sessions (one per sign-in) and the refresh tokens that rotate inside them.
//!
//! A refresh token is good for one use. Presenting one that was already
//! spent means two parties hold the session's tokens, so the whole session
//! is revoked.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::accounts::{self, Account};
use super::tokens::{hash_refresh_token, new_refresh_token};
use crate::http::problem::ApiError;

/// Why a session was ended, as stored in `sessions.revoke_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    Logout,
    PasswordChanged,
    RefreshTokenReuse,
}

impl RevokeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Logout => "logout",
            Self::PasswordChanged => "password_changed",
            Self::RefreshTokenReuse => "refresh_token_reuse",
        }
    }
}

/// A refresh token as handed to the client; only its hash is stored.
#[derive(Debug, Clone)]
pub struct IssuedRefreshToken {
    pub session_id: Uuid,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// Starts a session for `user_id` with its first refresh token.
pub async fn start_session(
    pool: &PgPool,
    user_id: Uuid,
    refresh_ttl: Duration,
) -> Result<IssuedRefreshToken, ApiError> {
    let session_id = Uuid::now_v7();
    let mut transaction = pool.begin().await?;
    sqlx::query("INSERT INTO sessions (id, user_id) VALUES ($1, $2)")
        .bind(session_id)
        .bind(user_id)
        .execute(&mut *transaction)
        .await?;
    let issued = issue_refresh_token(&mut transaction, session_id, refresh_ttl).await?;
    transaction.commit().await?;
    Ok(issued)
}

async fn issue_refresh_token(
    connection: &mut PgConnection,
    session_id: Uuid,
    ttl: Duration,
) -> Result<IssuedRefreshToken, ApiError> {
    let (token, hash) = new_refresh_token();
    let expires_at = Utc::now() + ttl;
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)",
    )
    .bind(hash)
    .bind(session_id)
    .bind(expires_at)
    .execute(connection)
    .await?;
    Ok(IssuedRefreshToken {
        session_id,
        token,
        expires_at,
    })
}

/// A refresh token exchanged for its successor.
#[derive(Debug, Clone)]
pub struct Rotated {
    pub account: Account,
    pub refresh_token: IssuedRefreshToken,
}

#[derive(sqlx::FromRow)]
struct PresentedToken {
    session_id: Uuid,
    user_id: Uuid,
    expires_at: DateTime<Utc>,
    used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

/// Spends `presented` and issues the next token of its session. Unknown,
/// expired, spent or revoked tokens are 401; a spent one also revokes its
/// session.
pub async fn rotate_refresh_token(
    pool: &PgPool,
    presented: &str,
    refresh_ttl: Duration,
) -> Result<Rotated, ApiError> {
    let refused = |why: &str| ApiError::Unauthorized(format!("the refresh token {why}"));
    let mut transaction = pool.begin().await?;
    // Locking the token and its session makes a concurrent refresh with the
    // same token wait here and then see it spent: two cannot both succeed.
    let token: Option<PresentedToken> = sqlx::query_as(
        "SELECT t.session_id, s.user_id, t.expires_at, t.used_at, s.revoked_at
         FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
         WHERE t.token_hash = $1
         FOR UPDATE OF t, s",
    )
    .bind(hash_refresh_token(presented))
    .fetch_optional(&mut *transaction)
    .await?;
    let Some(token) = token else {
        return Err(refused("is not valid"));
    };
    if token.revoked_at.is_some() {
        return Err(refused("belongs to a session that has ended"));
    }
    if token.used_at.is_some() {
        revoke_session_in(
            &mut transaction,
            token.session_id,
            RevokeReason::RefreshTokenReuse,
        )
        .await?;
        transaction.commit().await?;
        tracing::warn!(session_id = %token.session_id, user_id = %token.user_id,
            "a spent refresh token was presented again; session revoked");
        return Err(refused("was already used; the session has been ended"));
    }
    if token.expires_at <= Utc::now() {
        return Err(refused("has expired"));
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1")
        .bind(hash_refresh_token(presented))
        .execute(&mut *transaction)
        .await?;
    let account = accounts::find_by_id(&mut *transaction, token.user_id)
        .await?
        .ok_or_else(|| refused("belongs to an account that no longer exists"))?
        .account;
    let refresh_token =
        issue_refresh_token(&mut transaction, token.session_id, refresh_ttl).await?;
    transaction.commit().await?;
    Ok(Rotated {
        account,
        refresh_token,
    })
}

/// Ends one session of `user_id`; its refresh tokens stop working.
pub async fn revoke_session(
    pool: &PgPool,
    user_id: Uuid,
    session_id: Uuid,
    reason: RevokeReason,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE sessions SET revoked_at = now(), revoke_reason = $3
         WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
    )
    .bind(session_id)
    .bind(user_id)
    .bind(reason.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

async fn revoke_session_in(
    connection: &mut PgConnection,
    session_id: Uuid,
    reason: RevokeReason,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE sessions SET revoked_at = now(), revoke_reason = $2
         WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(session_id)
    .bind(reason.as_str())
    .execute(connection)
    .await?;
    Ok(())
}

/// Ends every session of `user_id` except `keep`.
pub async fn revoke_other_sessions(
    connection: &mut PgConnection,
    user_id: Uuid,
    keep: Uuid,
    reason: RevokeReason,
) -> Result<u64, ApiError> {
    let revoked = sqlx::query(
        "UPDATE sessions SET revoked_at = now(), revoke_reason = $3
         WHERE user_id = $1 AND id <> $2 AND revoked_at IS NULL",
    )
    .bind(user_id)
    .bind(keep)
    .bind(reason.as_str())
    .execute(connection)
    .await?;
    Ok(revoked.rows_affected())
}
