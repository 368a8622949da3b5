//! Typed settings read once from the environment at start-up.
//!
//! Every setting has a safe default for local development. A value that is
//! present but invalid, or a secret that production requires, stops start-up
//! with one line that names the variable.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};

/// Where the server runs; production refuses development shortcuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentProviderKind {
    Fake,
    Stripe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub environment: Environment,
    pub database_url: SecretString,
    pub database_max_connections: u32,
    /// Whether `serve` creates the database and applies migrations when it
    /// starts. Off behind a transaction-mode pooler: sqlx's migrator holds
    /// a session lock, so `commerce migrate` runs against Postgres itself
    /// and `serve` only checks that nothing is missing.
    pub migrate_on_start: bool,
    pub redis_url: SecretString,
    /// Prefix of every Redis key this instance writes, so that several
    /// deployments (or parallel tests) can share one Redis.
    pub redis_key_prefix: String,
    pub bind_addr: SocketAddr,
    /// Threads serving HTTP. Several instances on one machine each want
    /// their share of the cores, not all of them (see the README's bench).
    pub http_workers: usize,
    pub jwt_secret: SecretString,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub cookie_secure: bool,
    pub bcrypt_cost: u32,
    pub order_hold: Duration,
    /// The one currency the shop sells in: what the sales figures answer
    /// for (orders in any other currency are kept apart, never added in).
    pub shop_currency: domain::values::Currency,
    pub payment_provider: PaymentProviderKind,
    pub stripe_secret_key: Option<SecretString>,
    pub stripe_webhook_secret: Option<SecretString>,
    pub stripe_api_base: Option<String>,
    pub rate_limit_public_per_min: u32,
    pub rate_limit_auth_per_min: u32,
    pub rate_limit_sensitive_per_min: u32,
    /// How long failed logins count against an account, and so the longest
    /// an account stays locked for new addresses.
    pub login_failure_window: Duration,
    /// Proxies whose `X-Forwarded-For` is believed (addresses or CIDR ranges).
    pub trusted_proxies: Vec<IpNet>,
    /// Origins allowed to call the API from a browser (none by default).
    pub cors_allowed_origins: Vec<String>,
    pub log_format: LogFormat,
}

/// A setting that is present but unusable, named so the operator can fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// Used only in development so that `commerce serve` works with no setup;
/// production refuses to start without `JWT_SECRET`.
const DEVELOPMENT_JWT_SECRET: &str = "development-only-secret-change-me-in-production";
const MIN_JWT_SECRET_BYTES: usize = 32;

impl Settings {
    /// Reads the process environment (after loading `.env` if present).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds settings from any variable lookup; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&|name: &str| lookup(name).filter(|v| !v.trim().is_empty()));

        let environment = match env.get("APP_ENV").as_deref() {
            None | Some("development") | Some("dev") => Environment::Development,
            Some("production") | Some("prod") => Environment::Production,
            Some(other) => {
                return Err(ConfigError::new(
                    "APP_ENV",
                    format!("expected development or production, got {other:?}"),
                ))
            }
        };
        let production = environment == Environment::Production;

        let jwt_secret = match env.get("JWT_SECRET") {
            Some(secret) if secret.len() < MIN_JWT_SECRET_BYTES => {
                return Err(ConfigError::new(
                    "JWT_SECRET",
                    format!("must be at least {MIN_JWT_SECRET_BYTES} bytes"),
                ))
            }
            Some(secret) => secret,
            None if production => {
                return Err(ConfigError::new(
                    "JWT_SECRET",
                    "required in production".into(),
                ))
            }
            None => DEVELOPMENT_JWT_SECRET.to_owned(),
        };

        let stripe_secret_key = env.get("STRIPE_SECRET_KEY").map(SecretString::from);
        let payment_provider = match env.get("PAYMENT_PROVIDER").as_deref() {
            Some("fake") => PaymentProviderKind::Fake,
            Some("stripe") => PaymentProviderKind::Stripe,
            None if stripe_secret_key.is_some() => PaymentProviderKind::Stripe,
            None => PaymentProviderKind::Fake,
            Some(other) => {
                return Err(ConfigError::new(
                    "PAYMENT_PROVIDER",
                    format!("expected fake or stripe, got {other:?}"),
                ))
            }
        };
        if payment_provider == PaymentProviderKind::Stripe && stripe_secret_key.is_none() {
            return Err(ConfigError::new(
                "STRIPE_SECRET_KEY",
                "required when PAYMENT_PROVIDER is stripe".into(),
            ));
        }
        if payment_provider == PaymentProviderKind::Fake && production {
            return Err(ConfigError::new(
                "PAYMENT_PROVIDER",
                "the fake provider is for development only".into(),
            ));
        }

        let trusted_proxies = match env.get("TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| {
                    IpNet::from_str(item)
                        .or_else(|_| std::net::IpAddr::from_str(item).map(IpNet::from))
                        .map_err(|_| {
                            ConfigError::new(
                                "TRUSTED_PROXIES",
                                format!("{item:?} is not an IP address or CIDR range"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        };

        Ok(Self {
            environment,
            database_url: SecretString::from(
                env.get("DATABASE_URL")
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/commerce".into()),
            ),
            database_max_connections: env.parse("DATABASE_MAX_CONNECTIONS", 20)?,
            migrate_on_start: env.parse_bool("MIGRATE_ON_START", true)?,
            redis_url: SecretString::from(
                env.get("REDIS_URL")
                    .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            ),
            redis_key_prefix: env
                .get("REDIS_KEY_PREFIX")
                .unwrap_or_else(|| "commerce:".into()),
            bind_addr: env.parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            http_workers: env.parse_in_range("HTTP_WORKERS", available_cores(), 1..=1024)?,
            jwt_secret: SecretString::from(jwt_secret),
            access_token_ttl: Duration::from_secs(env.parse("ACCESS_TOKEN_TTL_SECONDS", 900)?),
            refresh_token_ttl: Duration::from_secs(
                env.parse("REFRESH_TOKEN_TTL_SECONDS", 30 * 24 * 3600)?,
            ),
            cookie_secure: env.parse_bool("COOKIE_SECURE", production)?,
            bcrypt_cost: env.parse_in_range("BCRYPT_COST", 12, 4..=31)?,
            order_hold: Duration::from_secs(env.parse_in_range(
                "ORDER_HOLD_SECONDS",
                900,
                1..=7 * 24 * 3600,
            )?),
            shop_currency: {
                let raw = env.get("SHOP_CURRENCY").unwrap_or_else(|| "USD".into());
                domain::values::Currency::try_from(raw.trim().to_owned()).map_err(|_| {
                    ConfigError::new(
                        "SHOP_CURRENCY",
                        format!("{raw:?} is not a three-letter ISO 4217 code"),
                    )
                })?
            },
            payment_provider,
            stripe_secret_key,
            stripe_webhook_secret: env.get("STRIPE_WEBHOOK_SECRET").map(SecretString::from),
            stripe_api_base: env.get("STRIPE_API_BASE"),
            rate_limit_public_per_min: env.parse("RATE_LIMIT_PUBLIC_PER_MIN", 600)?,
            rate_limit_auth_per_min: env.parse("RATE_LIMIT_AUTH_PER_MIN", 30)?,
            rate_limit_sensitive_per_min: env.parse("RATE_LIMIT_SENSITIVE_PER_MIN", 60)?,
            login_failure_window: Duration::from_secs(env.parse_in_range(
                "LOGIN_FAILURE_WINDOW_SECONDS",
                900,
                1..=24 * 3600,
            )?),
            trusted_proxies,
            cors_allowed_origins: env
                .get("CORS_ALLOWED_ORIGINS")
                .map(|list| {
                    list.split(',')
                        .map(|origin| origin.trim().trim_end_matches('/').to_owned())
                        .filter(|origin| !origin.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            log_format: match env.get("LOG_FORMAT").as_deref() {
                Some("json") => LogFormat::Json,
                Some("pretty") => LogFormat::Pretty,
                None if production => LogFormat::Json,
                None => LogFormat::Pretty,
                Some(other) => {
                    return Err(ConfigError::new(
                        "LOG_FORMAT",
                        format!("expected json or pretty, got {other:?}"),
                    ))
                }
            },
        })
    }

    /// The settings with the database name replaced; used to create the
    /// database at start-up and by tests that each get a database of their own.
    pub fn database_name(&self) -> Option<String> {
        let url = self.database_url.expose_secret();
        let without_query = url.split('?').next()?;
        let name = without_query.rsplit('/').next()?;
        (!name.is_empty() && !name.contains('@')).then(|| name.to_owned())
    }
}

/// The cores this process may run on; actix-web's own default worker count.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get())
}

impl ConfigError {
    fn new(name: &'static str, reason: String) -> Self {
        Self { name, reason }
    }
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }

    fn parse<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(name, format!("{raw:?}: {e}"))),
        }
    }

    fn parse_in_range<T>(
        &self,
        name: &'static str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + std::fmt::Display,
        T::Err: std::fmt::Display,
    {
        let value = self.parse(name, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::new(
                name,
                format!("{value} is outside {}..={}", range.start(), range.end()),
            ))
        }
    }

    fn parse_bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self
            .get(name)
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(ConfigError::new(
                name,
                format!("expected true or false, got {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn development_defaults_need_no_variables() {
        let s = settings(&[]).expect("defaults are valid");
        assert_eq!(s.environment, Environment::Development);
        assert_eq!(s.bind_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.http_workers, available_cores());
        assert_eq!(s.order_hold, Duration::from_secs(900));
        assert_eq!(s.shop_currency.as_str(), "USD");
        assert_eq!(s.payment_provider, PaymentProviderKind::Fake);
        assert!(!s.cookie_secure);
        assert!(s.migrate_on_start);
        assert_eq!(s.database_name().as_deref(), Some("commerce"));
    }

    #[test]
    fn production_requires_a_jwt_secret() {
        let err = settings(&[("APP_ENV", "production")]).unwrap_err();
        assert_eq!(err.name, "JWT_SECRET");
    }

    #[test]
    fn invalid_values_name_their_variable() {
        for (name, value) in [
            ("BIND_ADDR", "not-an-address"),
            ("BCRYPT_COST", "40"),
            ("HTTP_WORKERS", "0"),
            ("ORDER_HOLD_SECONDS", "-5"),
            ("COOKIE_SECURE", "maybe"),
            ("MIGRATE_ON_START", "sometimes"),
            ("TRUSTED_PROXIES", "10.0.0.1,nope"),
            ("PAYMENT_PROVIDER", "paypal"),
            ("JWT_SECRET", "short"),
            ("SHOP_CURRENCY", "dollars"),
        ] {
            let err = settings(&[(name, value)]).unwrap_err();
            assert_eq!(err.name, name, "{value}");
        }
    }

    #[test]
    fn a_stripe_key_selects_stripe_unless_told_otherwise() {
        let s = settings(&[("STRIPE_SECRET_KEY", "sk_test_1")]).unwrap();
        assert_eq!(s.payment_provider, PaymentProviderKind::Stripe);
        let s = settings(&[
            ("STRIPE_SECRET_KEY", "sk_test_1"),
            ("PAYMENT_PROVIDER", "fake"),
        ])
        .unwrap();
        assert_eq!(s.payment_provider, PaymentProviderKind::Fake);
        let err = settings(&[("PAYMENT_PROVIDER", "stripe")]).unwrap_err();
        assert_eq!(err.name, "STRIPE_SECRET_KEY");
    }
}
