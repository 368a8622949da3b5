//! Short-lived access tokens (HS256 JWTs) and opaque refresh tokens.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hashlink::LruCache;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Role;

/// What an access token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: Uuid,
    pub role: Role,
    /// The session (login) this token belongs to.
    pub sid: Uuid,
    pub iat: i64,
    pub exp: i64,
}

/// Tokens verified recently, kept per server. A signed-in shopper sends the
/// same token with every request until it expires; checking its signature
/// and parsing its JSON each time was a tenth of the server's CPU time on a
/// cart read. Sized for the shoppers of a large drop within one token
/// lifetime (about 12 MB when full): a sale whose buyers outnumber it
/// would evict each token before its next use and hit nothing.
const VERIFIED_TOKENS_KEPT: usize = 32_768;

#[derive(Clone)]
pub struct AccessTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    /// Keyed by the whole token, so only the exact bytes once verified match.
    verified: Arc<Mutex<LruCache<Box<str>, Claims>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is not valid")]
    Invalid,
    #[error("could not sign a token: {0}")]
    Signing(String),
}

impl AccessTokens {
    pub fn new(secret: &SecretString, ttl: Duration) -> Self {
        Self::keeping(secret, ttl, VERIFIED_TOKENS_KEPT)
    }

    fn keeping(secret: &SecretString, ttl: Duration, kept: usize) -> Self {
        let secret = secret.expose_secret().as_bytes();
        // Only HS256 is accepted, so `alg: none` and algorithm swaps fail.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
            verified: Arc::new(Mutex::new(LruCache::new(kept))),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn issue(
        &self,
        user_id: Uuid,
        role: Role,
        session_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<String, TokenError> {
        let claims = Claims {
            sub: user_id,
            role,
            sid: session_id,
            iat: now.timestamp(),
            exp: now.timestamp() + self.ttl.as_secs() as i64,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }

    /// The token's claims if it is ours and still valid. A token verified
    /// before is answered from memory, checked for expiry as `decode` does
    /// (no leeway) against the same clock.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let remembered = self.verified().get(token).cloned();
        if let Some(claims) = remembered {
            if claims.exp < jsonwebtoken::get_current_timestamp() as i64 {
                self.verified().remove(token);
                return Err(TokenError::Expired);
            }
            return Ok(claims);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        self.verified().insert(token.into(), claims.clone());
        Ok(claims)
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, LruCache<Box<str>, Claims>> {
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new random refresh token (256 bits, URL-safe) and the hash we store.
pub fn new_refresh_token() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    (token, hash)
}

/// Refresh tokens are stored only as this hash; a leaked table cannot be replayed.
pub fn hash_refresh_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ttl_secs: u64) -> AccessTokens {
        AccessTokens::new(
            &SecretString::from("x".repeat(40)),
            Duration::from_secs(ttl_secs),
        )
    }

    fn customer_token(tokens: &AccessTokens) -> String {
        tokens
            .issue(Uuid::new_v4(), Role::Customer, Uuid::new_v4(), Utc::now())
            .unwrap()
    }

    #[test]
    fn an_issued_token_verifies_to_its_claims() {
        let (user, session) = (Uuid::new_v4(), Uuid::new_v4());
        let token = tokens(60)
            .issue(user, Role::Admin, session, Utc::now())
            .unwrap();
        let claims = tokens(60).verify(&token).unwrap();
        assert_eq!(
            (claims.sub, claims.role, claims.sid),
            (user, Role::Admin, session)
        );
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_are_refused() {
        let long_ago = Utc::now() - chrono::Duration::hours(1);
        let expired = tokens(60)
            .issue(Uuid::new_v4(), Role::Customer, Uuid::new_v4(), long_ago)
            .unwrap();
        assert!(matches!(
            tokens(60).verify(&expired),
            Err(TokenError::Expired)
        ));

        let token = tokens(60)
            .issue(Uuid::new_v4(), Role::Customer, Uuid::new_v4(), Utc::now())
            .unwrap();
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            tokens(60).verify(&tampered),
            Err(TokenError::Invalid)
        ));

        let other = AccessTokens::new(&SecretString::from("y".repeat(40)), Duration::from_secs(60));
        assert!(matches!(other.verify(&token), Err(TokenError::Invalid)));
    }

    #[test]
    fn a_remembered_token_is_refused_once_it_expires() {
        let tokens = tokens(1);
        let token = customer_token(&tokens);
        tokens.verify(&token).expect("fresh");
        assert_eq!(tokens.verified().len(), 1);
        std::thread::sleep(Duration::from_millis(2100));
        assert!(matches!(tokens.verify(&token), Err(TokenError::Expired)));
        assert_eq!(tokens.verified().len(), 0);
    }

    #[test]
    fn only_the_exact_token_verified_is_remembered() {
        let tokens = tokens(60);
        let token = customer_token(&tokens);
        tokens.verify(&token).unwrap();
        for tampered in [format!("{token}A"), token[..token.len() - 1].to_owned()] {
            assert!(matches!(tokens.verify(&tampered), Err(TokenError::Invalid)));
        }
        assert_eq!(tokens.verified().len(), 1);
    }

    #[test]
    fn memory_of_verified_tokens_is_bounded() {
        let tokens = AccessTokens::keeping(
            &SecretString::from("x".repeat(40)),
            Duration::from_secs(60),
            3,
        );
        for _ in 0..10 {
            tokens.verify(&customer_token(&tokens)).unwrap();
        }
        assert_eq!(tokens.verified().len(), 3);
    }

    #[test]
    fn refresh_tokens_are_random_and_hashed() {
        let (a, hash_a) = new_refresh_token();
        let (b, _) = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(hash_refresh_token(&a), hash_a);
        assert_eq!(hash_a.len(), 32);
    }
}
