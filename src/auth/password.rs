//! Password rules and bcrypt hashing, run off the async workers.

use std::sync::OnceLock;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};

/// bcrypt reads at most 72 bytes; anything longer would be silently cut, so
/// it is refused instead.
pub const MAX_PASSWORD_BYTES: usize = 72;
pub const MIN_PASSWORD_BYTES: usize = 8;

/// A password that satisfies the rules; it cannot be built otherwise.
#[derive(Debug, Clone)]
pub struct Password(SecretString);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PasswordRuleError {
    #[error("must be at least {MIN_PASSWORD_BYTES} bytes long")]
    TooShort,
    #[error("must be at most {MAX_PASSWORD_BYTES} bytes long (bcrypt ignores the rest)")]
    TooLong,
}

impl Password {
    /// Lengths are counted in UTF-8 bytes, as bcrypt counts them, not in characters.
    pub fn parse(candidate: String) -> Result<Self, PasswordRuleError> {
        match candidate.len() {
            length if length < MIN_PASSWORD_BYTES => Err(PasswordRuleError::TooShort),
            length if length > MAX_PASSWORD_BYTES => Err(PasswordRuleError::TooLong),
            _ => Ok(Self(SecretString::from(candidate))),
        }
    }
}

/// Hashes a password with bcrypt at `cost` on the blocking pool.
pub async fn hash(password: &Password, cost: u32) -> anyhow::Result<String> {
    let password = password.0.clone();
    tokio::task::spawn_blocking(move || bcrypt::hash(password.expose_secret(), cost))
        .await
        .context("the password hashing task failed")?
        .context("could not hash a password")
}

/// Whether `candidate` matches `stored`. Without a stored hash (no such
/// account) a dummy hash of the same cost is checked instead, so that an
/// unknown email costs as much time as a wrong password.
pub async fn verify(
    candidate: SecretString,
    stored: Option<String>,
    cost: u32,
) -> anyhow::Result<bool> {
    tokio::task::spawn_blocking(move || {
        let candidate = candidate.expose_secret();
        let (hash, account_exists) = match &stored {
            Some(hash) => (hash.as_str(), true),
            None => (dummy_hash(cost)?, false),
        };
        let matches =
            bcrypt::verify(candidate, hash).context("a stored password hash is invalid")?;
        // bcrypt::verify would accept any extension of a 72-byte password.
        Ok(matches && account_exists && candidate.len() <= MAX_PASSWORD_BYTES)
    })
    .await
    .context("the password verification task failed")?
}

/// Computes the dummy hash for `cost` now, on the blocking pool, so that the
/// first sign-in attempt for an unknown email does not pay for it. Call once
/// at start-up.
pub async fn prepare_dummy_hash(cost: u32) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || dummy_hash(cost).map(drop))
        .await
        .context("the dummy hash task failed")?
}

/// One hash per cost, made once: tests run servers with different costs in
/// one process.
fn dummy_hash(cost: u32) -> anyhow::Result<&'static str> {
    static DUMMY_HASHES: [OnceLock<String>; 32] = [const { OnceLock::new() }; 32];
    let slot = DUMMY_HASHES
        .get(cost as usize)
        .with_context(|| format!("bcrypt cost {cost} is out of range"))?;
    if let Some(hash) = slot.get() {
        return Ok(hash);
    }
    let hash =
        bcrypt::hash("a password no account has", cost).context("could not make the dummy hash")?;
    Ok(slot.get_or_init(|| hash))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn passwords_are_measured_in_bytes() {
        assert_eq!(
            Password::parse("1234567".into()).unwrap_err(),
            PasswordRuleError::TooShort
        );
        assert!(Password::parse("12345678".into()).is_ok());
        // Four characters, twelve bytes.
        assert!(Password::parse("€€€€".into()).is_ok());
        assert!(Password::parse("€".repeat(24)).is_ok());
        assert_eq!(
            Password::parse("€".repeat(25)).unwrap_err(),
            PasswordRuleError::TooLong
        );
        assert_eq!(
            Password::parse("x".repeat(73)).unwrap_err(),
            PasswordRuleError::TooLong
        );
    }

    #[tokio::test]
    async fn a_hash_verifies_only_its_own_password() {
        let password = Password::parse("correct horse".into()).unwrap();
        let stored = hash(&password, 4).await.unwrap();
        assert!(verify("correct horse".into(), Some(stored.clone()), 4)
            .await
            .unwrap());
        assert!(!verify("wrong horse!".into(), Some(stored), 4)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn a_password_longer_than_72_bytes_never_verifies() {
        let password = Password::parse("x".repeat(72)).unwrap();
        let stored = hash(&password, 4).await.unwrap();
        let extended = format!("{}tail", "x".repeat(72));
        assert!(!verify(extended.into(), Some(stored), 4).await.unwrap());
    }

    #[tokio::test]
    async fn without_an_account_the_dummy_hash_of_the_configured_cost_is_checked() {
        assert!(!verify("a password no account has".into(), None, 5)
            .await
            .unwrap());
        let dummy = bcrypt::HashParts::from_str(dummy_hash(5).unwrap()).unwrap();
        assert_eq!(dummy.get_cost(), 5);
    }
}
