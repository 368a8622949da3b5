//! Auth endpoints: register, login, refresh-token, logout, change-password, me.

use std::net::IpAddr;

use actix_web::cookie::time::Duration as CookieDuration;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::StatusCode;
use actix_web::{get, post, web, FromRequest, HttpRequest, HttpResponse};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::accounts::{self, Account, NewAccount};
use super::sessions::{self, IssuedRefreshToken, RevokeReason};
use super::{AuthUser, Role};
use crate::http::access::ACCESS_TOKEN_COOKIE;
use crate::http::extract::Json;
use crate::http::problem::{ApiError, Problem};
use crate::rate_limit::login_guard::LoginGate;
use crate::state::AppState;

/// The cookie that carries the refresh token; browsers send it only to the
/// auth routes.
pub const REFRESH_TOKEN_COOKIE: &str = "refresh_token";
const REFRESH_TOKEN_COOKIE_PATH: &str = "/api/v1/auth";

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .service(register)
        .service(login)
        .service(refresh)
        .service(logout)
        .service(change_password)
        .service(me);
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// Case-insensitive and unique; surrounding spaces are dropped.
    #[serde(default)]
    #[schema(required = true, example = "ada@example.com")]
    pub email: String,
    /// 8 to 72 bytes (UTF-8), bcrypt's limit; longer is refused, never cut.
    #[serde(default)]
    #[schema(required = true, example = "correct horse battery")]
    pub password: String,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RefreshTokenRequest {
    /// Optional when the `refresh_token` cookie is sent.
    pub refresh_token: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChangePasswordRequest {
    pub current_password: String,
    /// Same rules as at registration.
    pub new_password: String,
}

/// A signed-in user with fresh tokens. The same tokens are also set as
/// cookies for browsers.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthResponse {
    pub user: Account,
    /// A JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// Single-use: exchange it at `refresh-token` for the next pair.
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

/// Opens a customer account and signs it in. A `role` in the body is
/// ignored: admins are made from the command line only.
#[utoipa::path(
    tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, body = AuthResponse, description = "Account created and signed in",
            headers(("set-cookie" = String, description = "`access_token` and `refresh_token`"))),
        (status = 400, body = Problem, content_type = "application/problem+json",
            description = "Malformed JSON or not a JSON content type"),
        (status = 409, body = Problem, content_type = "application/problem+json",
            description = "`conflict`: the email is taken"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json",
            description = "`validation_failed`: every offending field in `errors`"),
    )
)]
#[post("/api/v1/auth/register")]
pub async fn register(
    state: web::Data<AppState>,
    Json(body): Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let new_account =
        NewAccount::parse(&body.email, body.password, body.name).map_err(ApiError::invalid)?;
    let account = accounts::create_user(
        &state.pool,
        new_account,
        Role::Customer,
        state.settings.bcrypt_cost,
    )
    .await?;
    let refresh_token =
        sessions::start_session(&state.pool, account.id, state.settings.refresh_token_ttl).await?;
    signed_in(&state, StatusCode::CREATED, account, refresh_token)
}

/// Signs in with email and password. A wrong email and a wrong password get
/// the same answer in about the same time.
#[utoipa::path(
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, body = AuthResponse, description = "Signed in; a new session",
            headers(("set-cookie" = String, description = "`access_token` and `refresh_token`"))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json",
            description = "`unauthorized`: the email or the password is not correct"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json",
            description = "`rate_limited`: too many attempts from this address, or this account \
                is locked for new addresses after repeated failures (see `Retry-After`)"),
    )
)]
#[post("/api/v1/auth/login")]
pub async fn login(
    state: web::Data<AppState>,
    request: HttpRequest,
    Json(body): Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let address = state.rate_limits.client_ip(&request);
    pass_password_gate(&state, &body.email, address).await?;
    let email = body.email.clone();
    let account = match accounts::authenticate(
        &state.pool,
        &body.email,
        body.password,
        state.settings.bcrypt_cost,
    )
    .await
    {
        Ok(account) => account,
        // The gate counted the attempt as a failure already.
        Err(error) => return Err(error),
    };
    state.login_guard.record_success(&email, address).await;
    let refresh_token =
        sessions::start_session(&state.pool, account.id, state.settings.refresh_token_ttl).await?;
    signed_in(&state, StatusCode::OK, account, refresh_token)
}

/// Lets a password check on the account `email` go ahead, after its
/// slow-down, or refuses it while the account is locked for `address`.
/// The attempt counts as a failure until a success clears it.
async fn pass_password_gate(
    state: &AppState,
    email: &str,
    address: Option<IpAddr>,
) -> Result<(), ApiError> {
    match state.login_guard.gate(email, address).await {
        LoginGate::Locked { retry_after } => Err(ApiError::RateLimited {
            retry_after_secs: retry_after.as_secs().max(1),
        }),
        LoginGate::Proceed { delay } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(())
        }
    }
}

/// Exchanges a refresh token (the `refresh_token` cookie, or `refresh_token`
/// in the body, which wins when both are sent) for a new access token and a
/// new refresh token. The presented token stops working; presenting it again
/// ends the whole session.
#[utoipa::path(
    tag = "auth",
    request_body(content = RefreshTokenRequest,
        description = "May be omitted when the `refresh_token` cookie is sent"),
    responses(
        (status = 200, body = AuthResponse, description = "The next access and refresh token",
            headers(("set-cookie" = String, description = "`access_token` and `refresh_token`"))),
        (status = 400, body = Problem, content_type = "application/problem+json",
            description = "A body was sent but is not valid JSON"),
        (status = 401, body = Problem, content_type = "application/problem+json",
            description = "`unauthorized`: no refresh token, or an unknown, expired, spent or revoked one"),
    )
)]
#[post("/api/v1/auth/refresh-token")]
pub async fn refresh(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let presented = match refresh_token_in_body(&request, body).await? {
        Some(token) => token,
        None => request
            .cookie(REFRESH_TOKEN_COOKIE)
            .map(|cookie| cookie.value().to_owned())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("no refresh token was presented".into()))?,
    };
    let rotated =
        sessions::rotate_refresh_token(&state.pool, &presented, state.settings.refresh_token_ttl)
            .await?;
    signed_in(
        &state,
        StatusCode::OK,
        rotated.account,
        rotated.refresh_token,
    )
}

/// An empty body is allowed (the cookie carries the token); one that is
/// present goes through the usual JSON checks.
async fn refresh_token_in_body(
    request: &HttpRequest,
    body: web::Bytes,
) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut payload = actix_web::dev::Payload::from(body);
    let Json(parsed) = Json::<RefreshTokenRequest>::from_request(request, &mut payload).await?;
    Ok(parsed.refresh_token.filter(|token| !token.is_empty()))
}

/// Ends the caller's session: its refresh tokens stop working and both
/// cookies are cleared. Access tokens already issued run out on their own.
#[utoipa::path(
    tag = "auth",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 204, description = "Signed out; cookies cleared",
            headers(("set-cookie" = String, description = "Both cookies, expired"))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/api/v1/auth/logout")]
pub async fn logout(
    state: web::Data<AppState>,
    caller: AuthUser,
) -> Result<HttpResponse, ApiError> {
    sessions::revoke_session(
        &state.pool,
        caller.id,
        caller.session_id,
        RevokeReason::Logout,
    )
    .await?;
    let secure = state.settings.cookie_secure;
    let mut expired_access = access_token_cookie(String::new(), 0, secure);
    expired_access.make_removal();
    let mut expired_refresh = refresh_token_cookie(String::new(), 0, secure);
    expired_refresh.make_removal();
    Ok(HttpResponse::NoContent()
        .cookie(expired_access)
        .cookie(expired_refresh)
        .finish())
}

/// Changes the caller's password and ends every other session of the
/// account; the caller's own session stays signed in. The current password
/// is checked under the same per-account guard as a login, so a stolen
/// access token cannot be used to guess it faster than a login could.
#[utoipa::path(
    tag = "auth",
    request_body = ChangePasswordRequest,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 204, description = "Password changed; other sessions ended"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json",
            description = "`validation_failed`: `current_password` is wrong or `new_password` breaks the rules"),
        (status = 429, body = Problem, content_type = "application/problem+json",
            description = "`rate_limited`: the account is locked for this address after repeated \
                wrong passwords, at login or here (see `Retry-After`)"),
    )
)]
#[post("/api/v1/auth/change-password")]
pub async fn change_password(
    state: web::Data<AppState>,
    request: HttpRequest,
    caller: AuthUser,
    Json(body): Json<ChangePasswordRequest>,
) -> Result<HttpResponse, ApiError> {
    let credentials = accounts::find_by_id(&state.pool, caller.id)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("this account no longer exists".into()))?;
    let email = credentials.account.email.clone();
    let address = state.rate_limits.client_ip(&request);
    pass_password_gate(&state, &email, address).await?;
    let current_password_matches = accounts::is_password_of(
        credentials,
        body.current_password,
        state.settings.bcrypt_cost,
    )
    .await?;
    if current_password_matches {
        state.login_guard.record_success(&email, address).await;
    }
    accounts::change_password(
        &state.pool,
        caller.id,
        caller.session_id,
        current_password_matches,
        body.new_password,
        state.settings.bcrypt_cost,
    )
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The signed-in user.
#[utoipa::path(
    tag = "auth",
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, body = Account),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/auth/me")]
pub async fn me(state: web::Data<AppState>, caller: AuthUser) -> Result<HttpResponse, ApiError> {
    let account = accounts::find_by_id(&state.pool, caller.id)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("this account no longer exists".into()))?
        .account;
    Ok(HttpResponse::Ok().json(account))
}

/// The answer to every successful sign-in or refresh: tokens in the body
/// and in cookies.
fn signed_in(
    state: &AppState,
    status: StatusCode,
    account: Account,
    refresh_token: IssuedRefreshToken,
) -> Result<HttpResponse, ApiError> {
    let settings = &state.settings;
    let access_token = state
        .tokens
        .issue(
            account.id,
            account.role,
            refresh_token.session_id,
            Utc::now(),
        )
        .map_err(ApiError::internal)?;
    let access_ttl = state.tokens.ttl().as_secs();
    let refresh_ttl = settings.refresh_token_ttl.as_secs();
    Ok(HttpResponse::build(status)
        .cookie(access_token_cookie(
            access_token.clone(),
            access_ttl,
            settings.cookie_secure,
        ))
        .cookie(refresh_token_cookie(
            refresh_token.token.clone(),
            refresh_ttl,
            settings.cookie_secure,
        ))
        .json(AuthResponse {
            user: account,
            access_token,
            refresh_token: refresh_token.token,
            expires_in: access_ttl,
        }))
}

fn access_token_cookie(value: String, max_age_secs: u64, secure: bool) -> Cookie<'static> {
    Cookie::build(ACCESS_TOKEN_COOKIE, value)
        .http_only(true)
        .same_site(SameSite::Lax)
        .path("/")
        .max_age(cookie_max_age(max_age_secs))
        .secure(secure)
        .finish()
}

/// Strict and scoped to the auth routes: the refresh token is never sent
/// cross-site nor to any other route.
fn refresh_token_cookie(value: String, max_age_secs: u64, secure: bool) -> Cookie<'static> {
    Cookie::build(REFRESH_TOKEN_COOKIE, value)
        .http_only(true)
        .same_site(SameSite::Strict)
        .path(REFRESH_TOKEN_COOKIE_PATH)
        .max_age(cookie_max_age(max_age_secs))
        .secure(secure)
        .finish()
}

fn cookie_max_age(secs: u64) -> CookieDuration {
    CookieDuration::seconds(i64::try_from(secs).unwrap_or(i64::MAX))
}
