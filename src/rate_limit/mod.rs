//! Request rate limits in three classes (public per client IP, auth per
//! client IP, sensitive per user), shared by every instance through Redis
//! and falling back to per-instance limits while Redis is unreachable.
//!
//! The middleware is actix-extensible-rate-limit's; the backend is ours
//! (GCRA on redis 1.x, see `gcra` and `store`).

pub mod gcra;
pub mod login_guard;
pub mod store;

use std::future::{ready, Ready};
use std::net::IpAddr;
use std::sync::Arc;

use actix_extensible_rate_limit::backend::{Backend, Decision};
use actix_extensible_rate_limit::RateLimiter;
use actix_web::dev::ServiceRequest;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::{HttpMessage, HttpResponse, ResponseError};
use ipnet::IpNet;

use crate::auth::AuthUser;
use crate::config::Settings;
use crate::http::client_ip::client_ip;
use crate::http::problem::ApiError;
use gcra::{Quota, Verdict};
pub use store::{LimitMode, LimitStore};

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Which limit a route falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitClass {
    /// Catalog, categories, stock level: per client IP.
    Public,
    /// Register, login, refresh-token: per client IP.
    Auth,
    /// Checkout and payment routes: per signed-in user.
    Sensitive,
}

impl LimitClass {
    fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Auth => "auth",
            Self::Sensitive => "sensitive",
        }
    }

    /// The class of a route, by its match pattern.
    pub fn of_route(method: &Method, pattern: &str) -> Option<Self> {
        const AUTH: [&str; 3] = [
            "/api/v1/auth/register",
            "/api/v1/auth/login",
            "/api/v1/auth/refresh-token",
        ];
        const SENSITIVE: [&str; 2] = ["/api/v1/checkout", "/api/v1/fake-payments"];
        const PUBLIC: [&str; 3] = [
            "/api/v1/products/get-",
            "/api/v1/categories/",
            "/api/v1/stock/get-stock-level",
        ];
        if AUTH.contains(&pattern) {
            Some(Self::Auth)
        } else if SENSITIVE.iter().any(|prefix| pattern.starts_with(prefix)) {
            Some(Self::Sensitive)
        } else if method == Method::GET && PUBLIC.iter().any(|prefix| pattern.starts_with(prefix)) {
            Some(Self::Public)
        } else {
            None
        }
    }
}

/// The limits of this instance and where their counts live.
#[derive(Clone)]
pub struct RateLimits {
    store: Arc<LimitStore>,
    public: Option<Quota>,
    auth: Option<Quota>,
    sensitive: Option<Quota>,
    trusted_proxies: Arc<[IpNet]>,
    key_prefix: Arc<str>,
}

type InputFuture = Ready<Result<LimitInput, actix_web::Error>>;

/// What the middleware asks the backend about one request.
pub struct LimitInput {
    quota: Option<Quota>,
    key: String,
}

fn quota(per_minute: u32) -> Option<Quota> {
    // 0 turns a class off.
    (per_minute > 0).then(|| Quota::per_minute(per_minute))
}

impl RateLimits {
    pub fn new(settings: &Settings, redis: Option<redis::aio::ConnectionManager>) -> Self {
        Self {
            store: Arc::new(LimitStore::new(redis)),
            public: quota(settings.rate_limit_public_per_min),
            auth: quota(settings.rate_limit_auth_per_min),
            sensitive: quota(settings.rate_limit_sensitive_per_min),
            trusted_proxies: settings.trusted_proxies.clone().into(),
            key_prefix: settings.redis_key_prefix.clone().into(),
        }
    }

    pub fn store(&self) -> &Arc<LimitStore> {
        &self.store
    }

    pub fn mode(&self) -> LimitMode {
        self.store.mode()
    }

    /// Prefixed key for a limit's counter in Redis.
    pub fn key(&self, name: &str) -> String {
        format!("{}rl:{name}", self.key_prefix)
    }

    /// The client address as this server believes it (see `client_ip`).
    pub fn client_ip(&self, request: &actix_web::HttpRequest) -> Option<IpAddr> {
        let forwarded = request
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|value| value.to_str().ok());
        client_ip(
            request.peer_addr().map(|a| a.ip()),
            forwarded,
            &self.trusted_proxies,
        )
    }

    fn input_for(&self, request: &ServiceRequest) -> LimitInput {
        let class = crate::http::middleware::route_pattern(request)
            .and_then(|pattern| LimitClass::of_route(request.method(), &pattern));
        let quota = match class {
            Some(LimitClass::Public) => self.public,
            Some(LimitClass::Auth) => self.auth,
            Some(LimitClass::Sensitive) => self.sensitive,
            None => None,
        };
        let Some(class) = class.filter(|_| quota.is_some()) else {
            return LimitInput {
                quota: None,
                key: String::new(),
            };
        };
        let client = match (class, request.extensions().get::<AuthUser>()) {
            (LimitClass::Sensitive, Some(user)) => format!("user:{}", user.id),
            _ => match self.client_ip(request.request()) {
                Some(ip) => format!("ip:{}", address_block(ip)),
                None => "ip:unknown".to_owned(),
            },
        };
        LimitInput {
            quota,
            key: self.key(&format!("{}:{client}", class.as_str())),
        }
    }

    /// The actix middleware; install it inside the access middleware so
    /// that it sees the signed-in user.
    pub fn middleware(
        &self,
    ) -> RateLimiter<Self, Option<Verdict>, impl Fn(&ServiceRequest) -> InputFuture + 'static> {
        let limits = self.clone();
        let input = move |request: &ServiceRequest| ready(Ok(limits.input_for(request)));
        RateLimiter::builder(self.clone(), input)
            .request_allowed_transformation(Some(
                |headers: &mut HeaderMap, verdict: Option<&Option<Verdict>>, _rolled_back: bool| {
                    if let Some(Some(verdict)) = verdict {
                        insert_headers(headers, verdict);
                    }
                },
            ))
            .request_denied_response(|verdict: &Option<Verdict>| denied_response(verdict))
            .build()
    }
}

/// The addresses one client is taken to hold: its IPv4 address, or the
/// /64 of its IPv6 address, since a single subscriber is routinely handed a
/// whole /64 and could otherwise send from a fresh address every request.
fn address_block(ip: IpAddr) -> IpNet {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let prefix = if ip.is_ipv4() { 32 } else { 64 };
    IpNet::new_assert(ip, prefix).trunc()
}

fn seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

fn insert_headers(headers: &mut HeaderMap, verdict: &Verdict) {
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(verdict.limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(verdict.remaining));
    headers.insert(
        RATELIMIT_RESET,
        HeaderValue::from(seconds(verdict.reset_ms)),
    );
}

fn denied_response(verdict: &Option<Verdict>) -> HttpResponse {
    let retry_after_secs = verdict.map_or(1, |v| seconds(v.retry_after_ms).max(1));
    let mut response = ApiError::RateLimited { retry_after_secs }.error_response();
    if let Some(verdict) = verdict {
        insert_headers(response.headers_mut(), verdict);
    }
    response
}

impl Backend<LimitInput> for RateLimits {
    type Output = Option<Verdict>;
    type RollbackToken = ();
    type Error = ApiError;

    async fn request(
        &self,
        input: LimitInput,
    ) -> Result<(Decision, Option<Verdict>, ()), ApiError> {
        let Some(quota) = input.quota else {
            return Ok((Decision::Allowed, None, ()));
        };
        let verdict = self.store.check(&input.key, quota).await;
        Ok((Decision::from_allowed(verdict.allowed), Some(verdict), ()))
    }

    async fn rollback(&self, _token: ()) -> Result<(), ApiError> {
        Ok(())
    }
}
