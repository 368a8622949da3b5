//! User accounts: the one way an account is created, and reading one back.

use secrecy::SecretString;
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use super::password::{self, Password};
use super::sessions::{self, RevokeReason};
use super::Role;
use crate::http::problem::{ApiError, FieldError, ResultExt};

/// The longest address SMTP can carry (RFC 5321 path limit).
const MAX_EMAIL_BYTES: usize = 254;
const MAX_NAME_CHARS: usize = 100;

/// An email address as the user typed it (trimmed) and the lowercase form
/// that makes it unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    address: String,
    normalized: String,
}

impl Email {
    /// A deliberately loose shape check: one `@`, a non-empty local part and
    /// a dotted domain. Whether the address receives mail is not our call.
    pub fn parse(candidate: &str) -> Result<Self, &'static str> {
        let address = candidate.trim();
        if address.is_empty() {
            return Err("is required");
        }
        if address.len() > MAX_EMAIL_BYTES {
            return Err("must be at most 254 bytes long");
        }
        let Some((local, domain)) = address.split_once('@') else {
            return Err("must contain an @");
        };
        let well_formed = !local.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && domain.split('.').all(|label| !label.is_empty())
            && !address.chars().any(|c| c.is_whitespace() || c.is_control());
        if !well_formed {
            return Err("is not a valid email address");
        }
        Ok(Self {
            address: address.to_owned(),
            normalized: normalize_email(address),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.address
    }
}

/// The key accounts are looked up by: emails are case-insensitive.
pub fn normalize_email(address: &str) -> String {
    address.trim().to_lowercase()
}

/// Everything needed to open an account, already checked.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub email: Email,
    pub password: Password,
    pub name: Option<String>,
}

impl NewAccount {
    /// Checks every field and reports all the offending ones together.
    pub fn parse(
        email: &str,
        password: String,
        name: Option<String>,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let email = Email::parse(email)
            .map_err(|message| errors.push(FieldError::new("email", message)))
            .ok();
        let password = Password::parse(password)
            .map_err(|error| errors.push(FieldError::new("password", error.to_string())))
            .ok();
        let name = name
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty());
        if name
            .as_ref()
            .is_some_and(|name| name.chars().count() > MAX_NAME_CHARS)
        {
            errors.push(FieldError::new(
                "name",
                format!("must be at most {MAX_NAME_CHARS} characters long"),
            ));
        }
        match (email, password) {
            (Some(email), Some(password)) if errors.is_empty() => Ok(Self {
                email,
                password,
                name,
            }),
            _ => Err(errors),
        }
    }
}

/// An account as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub name: Option<String>,
    pub role: Role,
}

/// Opens an account with `role`. Registration and `commerce create-admin`
/// both come through here. A taken email (in any letter case) is 409
/// `conflict`.
pub async fn create_user(
    pool: &PgPool,
    account: NewAccount,
    role: Role,
    bcrypt_cost: u32,
) -> Result<Account, ApiError> {
    let password_hash = password::hash(&account.password, bcrypt_cost).await?;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO users (id, email, email_normalized, name, password_hash, role)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(&account.email.address)
    .bind(&account.email.normalized)
    .bind(&account.name)
    .bind(&password_hash)
    .bind(role.as_str())
    .execute(pool)
    .await
    .on_constraint("users_email_normalized_key", || {
        ApiError::Conflict("an account with this email already exists".into())
    })?;
    Ok(Account {
        id,
        email: account.email.address,
        name: account.name,
        role,
    })
}

/// An account together with its password hash, for checking credentials.
pub struct Credentials {
    pub account: Account,
    pub password_hash: String,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    name: Option<String>,
    role: String,
    password_hash: String,
}

impl TryFrom<UserRow> for Credentials {
    type Error = ApiError;

    fn try_from(row: UserRow) -> Result<Self, ApiError> {
        let role = Role::parse(&row.role).ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!(
                "user {} has unknown role {:?}",
                row.id,
                row.role
            ))
        })?;
        Ok(Self {
            account: Account {
                id: row.id,
                email: row.email,
                name: row.name,
                role,
            },
            password_hash: row.password_hash,
        })
    }
}

const SELECT_USER: &str = "SELECT id, email, name, role, password_hash FROM users";

pub async fn find_by_email(pool: &PgPool, email: &str) -> Result<Option<Credentials>, ApiError> {
    sqlx::query_as::<_, UserRow>(&format!("{SELECT_USER} WHERE email_normalized = $1"))
        .bind(normalize_email(email))
        .fetch_optional(pool)
        .await?
        .map(Credentials::try_from)
        .transpose()
}

pub async fn find_by_id(
    executor: impl sqlx::PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<Credentials>, ApiError> {
    sqlx::query_as::<_, UserRow>(&format!("{SELECT_USER} WHERE id = $1"))
        .bind(id)
        .fetch_optional(executor)
        .await?
        .map(Credentials::try_from)
        .transpose()
}

/// The account whose email and password these are. An unknown email and a
/// wrong password are the same 401 and cost the same bcrypt work.
pub async fn authenticate(
    pool: &PgPool,
    email: &str,
    candidate: String,
    bcrypt_cost: u32,
) -> Result<Account, ApiError> {
    let credentials = find_by_email(pool, email).await?;
    let stored = credentials.as_ref().map(|c| c.password_hash.clone());
    let matches = password::verify(SecretString::from(candidate), stored, bcrypt_cost).await?;
    match credentials {
        Some(credentials) if matches => Ok(credentials.account),
        _ => Err(ApiError::Unauthorized(
            "the email or the password is not correct".into(),
        )),
    }
}

/// Whether `candidate` is the password of the account `credentials` hold.
pub async fn is_password_of(
    credentials: Credentials,
    candidate: String,
    bcrypt_cost: u32,
) -> Result<bool, ApiError> {
    password::verify(
        SecretString::from(candidate),
        Some(credentials.password_hash),
        bcrypt_cost,
    )
    .await
    .map_err(ApiError::internal)
}

/// Replaces the password of `user_id`, when the caller gave its current
/// one (checked by [`is_password_of`]), and ends every session but
/// `keep_session`: whoever else held the old password is signed out, the
/// caller is not. A wrong current password and a new one that breaks the
/// rules are reported together.
pub async fn change_password(
    pool: &PgPool,
    user_id: Uuid,
    keep_session: Uuid,
    current_password_matches: bool,
    new_password: String,
    bcrypt_cost: u32,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let new_password = Password::parse(new_password)
        .map_err(|error| errors.push(FieldError::new("new_password", error.to_string())))
        .ok();
    if !current_password_matches {
        errors.insert(
            0,
            FieldError::new("current_password", "is not the current password"),
        );
    }
    let Some(new_password) = new_password.filter(|_| errors.is_empty()) else {
        return Err(ApiError::invalid(errors));
    };
    let new_hash = password::hash(&new_password, bcrypt_cost).await?;
    let mut transaction = pool.begin().await?;
    sqlx::query("UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1")
        .bind(user_id)
        .bind(new_hash)
        .execute(&mut *transaction)
        .await?;
    sessions::revoke_other_sessions(
        &mut transaction,
        user_id,
        keep_session,
        RevokeReason::PasswordChanged,
    )
    .await?;
    transaction.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_normalized_to_lowercase() {
        let email = Email::parse("  Ada.Lovelace@Example.COM ").unwrap();
        assert_eq!(email.as_str(), "Ada.Lovelace@Example.COM");
        assert_eq!(email.normalized, "ada.lovelace@example.com");
    }

    #[test]
    fn emails_without_the_expected_shape_are_refused() {
        let too_long = format!("{}@example.com", "a".repeat(250));
        for candidate in [
            "",
            "   ",
            "plainaddress",
            "@example.com",
            "ada@",
            "ada@localhost",
            "ada@@example.com",
            "ada@example@example.com",
            "ada@example..com",
            "ada@.example.com",
            "ada@example.com.",
            "ada lovelace@example.com",
            too_long.as_str(),
        ] {
            assert!(Email::parse(candidate).is_err(), "{candidate:?}");
        }
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let errors = NewAccount::parse("nope", "short".into(), Some("x".repeat(101))).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["email", "password", "name"]);
    }

    #[test]
    fn a_blank_name_counts_as_no_name() {
        let account =
            NewAccount::parse("ada@example.com", "long enough".into(), Some("  ".into())).unwrap();
        assert_eq!(account.name, None);
    }
}
