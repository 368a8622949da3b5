//! Accounts, sign-in, sessions and tokens through the HTTP API, and the
//! `create-admin` command.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::Utc;
use commerce::auth::tokens::AccessTokens;
use commerce::auth::Role;
use reqwest::{Method, Response};
use secrecy::SecretString;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{new_client, problem, spawn_app, spawn_app_with, TestApp, TEST_JWT_SECRET};
use crate::users::{self, unique_email, TestUser, TEST_PASSWORD};

const REGISTER: &str = "/api/v1/auth/register";
const LOGIN: &str = "/api/v1/auth/login";
const REFRESH: &str = "/api/v1/auth/refresh-token";
const LOGOUT: &str = "/api/v1/auth/logout";
const CHANGE_PASSWORD: &str = "/api/v1/auth/change-password";
const ME: &str = "/api/v1/auth/me";

/// `POST /register` from a client without cookies.
async fn register(app: &TestApp, body: Value) -> Response {
    new_client()
        .post(app.url(REGISTER))
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// The `Set-Cookie` header that sets `name`.
fn set_cookie(response: &Response, name: &str) -> String {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find(|value| value.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no Set-Cookie for {name}"))
        .to_owned()
}

/// The attributes of a `Set-Cookie` header, lowercased, without the value.
fn cookie_attributes(header: &str) -> Vec<String> {
    header
        .split(';')
        .skip(1)
        .map(|attribute| attribute.trim().to_ascii_lowercase())
        .collect()
}

fn field_names(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .expect("errors listed")
        .iter()
        .map(|error| error["field"].as_str().expect("field named"))
        .collect()
}

async fn me_with_bearer(app: &TestApp, token: &str) -> Response {
    new_client()
        .get(app.url(ME))
        .bearer_auth(token)
        .send()
        .await
        .expect("request sent")
}

async fn sessions_revoked_for(app: &TestApp, user_id: Uuid) -> Vec<Option<String>> {
    sqlx::query_scalar(
        "SELECT revoke_reason FROM sessions WHERE user_id = $1 ORDER BY created_at, id",
    )
    .bind(user_id)
    .fetch_all(&app.pool)
    .await
    .expect("sessions read")
}

// Registration

#[tokio::test]
async fn registering_creates_a_signed_in_customer() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = register(
        &app,
        json!({"email": "  Ada.Lovelace@Example.com ", "password": TEST_PASSWORD, "name": "Ada"}),
    )
    .await;

    // Assert
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["email"], "Ada.Lovelace@Example.com", "{body}");
    assert_eq!(body["user"]["name"], "Ada");
    assert_eq!(body["user"]["role"], "customer");
    assert!(body["user"]["id"].as_str().unwrap().parse::<Uuid>().is_ok());
    assert!(!body["access_token"].as_str().unwrap().is_empty());
    assert!(!body["refresh_token"].as_str().unwrap().is_empty());
    assert_eq!(body["expires_in"], 900);
    let me: Value = me_with_bearer(&app, body["access_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me, body["user"]);
}

#[tokio::test]
async fn registration_sets_http_only_cookies_that_are_not_secure_in_development() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = register(
        &app,
        json!({"email": unique_email("ada"), "password": TEST_PASSWORD}),
    )
    .await;

    // Assert
    assert_eq!(response.status(), 201);
    let access = cookie_attributes(&set_cookie(&response, "access_token"));
    for expected in ["httponly", "samesite=lax", "path=/", "max-age=900"] {
        assert!(access.contains(&expected.to_owned()), "{access:?}");
    }
    let refresh = cookie_attributes(&set_cookie(&response, "refresh_token"));
    for expected in [
        "httponly",
        "samesite=strict",
        "path=/api/v1/auth",
        "max-age=2592000",
    ] {
        assert!(refresh.contains(&expected.to_owned()), "{refresh:?}");
    }
    assert!(!access.contains(&"secure".to_owned()), "{access:?}");
    assert!(!refresh.contains(&"secure".to_owned()), "{refresh:?}");
}

#[tokio::test]
async fn cookies_are_secure_when_the_server_is_configured_for_https() {
    // Arrange
    let app = spawn_app_with(|settings| settings.cookie_secure = true).await;

    // Act
    let response = register(
        &app,
        json!({"email": unique_email("ada"), "password": TEST_PASSWORD}),
    )
    .await;

    // Assert
    assert_eq!(response.status(), 201);
    for name in ["access_token", "refresh_token"] {
        let attributes = cookie_attributes(&set_cookie(&response, name));
        assert!(attributes.contains(&"secure".to_owned()), "{attributes:?}");
    }
}

#[tokio::test]
async fn an_email_taken_in_another_letter_case_is_a_conflict() {
    // Arrange
    let app = spawn_app().await;
    let first = register(
        &app,
        json!({"email": "ada@example.com", "password": TEST_PASSWORD}),
    )
    .await;
    assert_eq!(first.status(), 201);

    // Act
    let second = register(
        &app,
        json!({"email": "ADA@Example.COM", "password": TEST_PASSWORD}),
    )
    .await;

    // Assert
    problem(second, 409, "conflict").await;
}

#[tokio::test]
async fn a_password_of_7_bytes_is_refused() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = register(
        &app,
        json!({"email": unique_email("ada"), "password": "1234567"}),
    )
    .await;

    // Assert
    let body = problem(response, 422, "validation_failed").await;
    assert_eq!(field_names(&body), ["password"]);
}

#[tokio::test]
async fn a_password_of_73_bytes_is_refused_rather_than_cut() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = register(
        &app,
        json!({"email": unique_email("ada"), "password": "x".repeat(73)}),
    )
    .await;

    // Assert
    let body = problem(response, 422, "validation_failed").await;
    assert_eq!(field_names(&body), ["password"]);
}

#[tokio::test]
async fn password_lengths_are_counted_in_bytes_not_characters() {
    // Arrange: "€" is three bytes in UTF-8.
    let app = spawn_app().await;
    let seventy_two_bytes = "€".repeat(24);
    let seventy_five_bytes = "€".repeat(25);
    let twelve_bytes_in_four_characters = "€".repeat(4);

    // Act
    let longest = register(
        &app,
        json!({"email": unique_email("a"), "password": seventy_two_bytes}),
    )
    .await;
    let too_long = register(
        &app,
        json!({"email": unique_email("b"), "password": seventy_five_bytes}),
    )
    .await;
    let short_in_characters = register(
        &app,
        json!({"email": unique_email("c"), "password": twelve_bytes_in_four_characters}),
    )
    .await;

    // Assert
    assert_eq!(longest.status(), 201);
    let user: Value = longest.json().await.unwrap();
    let email = user["user"]["email"].as_str().unwrap();
    assert_eq!(
        users::login(&app, email, &seventy_two_bytes).await.status(),
        200
    );
    let body = problem(too_long, 422, "validation_failed").await;
    assert_eq!(field_names(&body), ["password"]);
    assert_eq!(short_in_characters.status(), 201);
}

#[tokio::test]
async fn malformed_emails_are_refused_naming_the_field() {
    // Arrange
    let app = spawn_app().await;
    let too_long = format!("{}@example.com", "a".repeat(250));

    for email in [
        "",
        "plainaddress",
        "@example.com",
        "ada@",
        "ada@localhost",
        "ada@@example.com",
        "ada@example..com",
        "ada lovelace@example.com",
        too_long.as_str(),
    ] {
        // Act
        let response = register(&app, json!({"email": email, "password": TEST_PASSWORD})).await;

        // Assert
        let body = problem(response, 422, "validation_failed").await;
        assert_eq!(field_names(&body), ["email"], "{email:?}");
    }
}

#[tokio::test]
async fn every_invalid_field_is_reported_together() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = register(&app, json!({"email": "nope", "password": "short"})).await;

    // Assert
    let body = problem(response, 422, "validation_failed").await;
    assert_eq!(field_names(&body), ["email", "password"]);
}

#[tokio::test]
async fn malformed_json_is_a_bad_request() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = new_client()
        .post(app.url(REGISTER))
        .header("content-type", "application/json")
        .body(r#"{"email": "ada@example.com", "password": "#)
        .send()
        .await
        .unwrap();

    // Assert
    problem(response, 400, "validation_failed").await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_bad_request() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = new_client()
        .post(app.url(REGISTER))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=ada%40example.com&password=correct+horse+battery")
        .send()
        .await
        .unwrap();

    // Assert
    problem(response, 400, "validation_failed").await;
}

#[tokio::test]
async fn a_role_sent_at_registration_is_ignored() {
    // Arrange
    let app = spawn_app().await;
    let email = unique_email("mallory");

    // Act
    let response = register(
        &app,
        json!({"email": email, "password": TEST_PASSWORD, "role": "admin"}),
    )
    .await;

    // Assert
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["role"], "customer");
    let stored: String = sqlx::query_scalar("SELECT role FROM users WHERE email = $1")
        .bind(&email)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, "customer");
}

// Login

#[tokio::test]
async fn logging_in_with_the_right_password_starts_another_session() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;

    // Act
    let response = users::login(&app, &user.email.to_uppercase(), TEST_PASSWORD).await;

    // Assert
    assert_eq!(response.status(), 200);
    set_cookie(&response, "access_token");
    set_cookie(&response, "refresh_token");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["id"], user.id.to_string());
    assert_eq!(body["user"]["email"], user.email);
    assert_eq!(body["user"]["role"], "customer");
    assert_eq!(body["expires_in"], 900);
    assert_ne!(body["refresh_token"], user.refresh_token.as_str());
    assert_eq!(sessions_revoked_for(&app, user.id).await, [None, None]);
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_get_the_same_401() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;

    // Act
    let wrong_password = users::login(&app, &user.email, "not the password").await;
    let unknown_email = users::login(&app, &unique_email("nobody"), TEST_PASSWORD).await;

    // Assert
    let wrong_password = problem(wrong_password, 401, "unauthorized").await;
    let unknown_email = problem(unknown_email, 401, "unauthorized").await;
    assert_eq!(wrong_password, unknown_email);
}

#[tokio::test]
async fn a_password_extended_past_72_bytes_does_not_sign_in() {
    // Arrange
    let app = spawn_app().await;
    let password = "p".repeat(72);
    let email = unique_email("ada");
    let created = register(&app, json!({"email": email, "password": password})).await;
    assert_eq!(created.status(), 201);

    // Act
    let response = users::login(&app, &email, &format!("{password}extra")).await;

    // Assert
    problem(response, 401, "unauthorized").await;
}

// Access tokens

#[tokio::test]
async fn the_access_token_works_as_a_bearer_token_and_as_a_cookie() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    let browser = new_client();
    let registered = browser
        .post(app.url(REGISTER))
        .json(&json!({"email": unique_email("browser"), "password": TEST_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);

    // Act
    let by_bearer = me_with_bearer(&app, &user.access_token).await;
    let by_cookie_jar = browser.get(app.url(ME)).send().await.unwrap();
    let by_cookie_header = new_client()
        .get(app.url(ME))
        .header("cookie", format!("access_token={}", user.access_token))
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(by_bearer.status(), 200);
    assert_eq!(by_cookie_jar.status(), 200);
    assert_eq!(by_cookie_header.status(), 200);
    let me: Value = by_cookie_header.json().await.unwrap();
    assert_eq!(me["id"], user.id.to_string());
    assert_eq!(me["email"], user.email);
}

#[tokio::test]
async fn a_token_whose_claims_were_changed_is_refused() {
    // Arrange: promote the payload to admin, keep the signature.
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    let parts: Vec<&str> = user.access_token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["role"] = json!("admin");
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);

    // Act
    let response = me_with_bearer(&app, &tampered).await;

    // Assert
    problem(response, 401, "unauthorized").await;
}

#[tokio::test]
async fn an_unsigned_token_with_alg_none_is_refused() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    let now = Utc::now().timestamp();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"sub": user.id, "role": "admin", "sid": Uuid::new_v4(), "iat": now, "exp": now + 600})
            .to_string(),
    );
    let unsigned = format!("{header}.{payload}.");

    // Act
    let response = me_with_bearer(&app, &unsigned).await;

    // Assert
    problem(response, 401, "unauthorized").await;
}

#[tokio::test]
async fn an_expired_access_token_is_refused() {
    // Arrange: correctly signed, but issued an hour ago with a minute to live.
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    let tokens = AccessTokens::new(
        &SecretString::from(TEST_JWT_SECRET),
        Duration::from_secs(60),
    );
    let expired = tokens
        .issue(
            user.id,
            Role::Customer,
            Uuid::new_v4(),
            Utc::now() - chrono::Duration::hours(1),
        )
        .unwrap();

    // Act
    let response = me_with_bearer(&app, &expired).await;

    // Assert
    let body = problem(response, 401, "unauthorized").await;
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
}

// Refresh tokens

#[tokio::test]
async fn refreshing_rotates_the_refresh_token() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;

    // Act
    let response = users::refresh(&app, &user.refresh_token).await;

    // Assert
    assert_eq!(response.status(), 200);
    set_cookie(&response, "access_token");
    set_cookie(&response, "refresh_token");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["id"], user.id.to_string());
    assert_eq!(body["user"]["role"], "customer");
    let next = body["refresh_token"].as_str().unwrap();
    assert_ne!(next, user.refresh_token);
    assert_eq!(
        me_with_bearer(&app, body["access_token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    let next_again = users::refresh(&app, next).await;
    assert_eq!(next_again.status(), 200);
}

#[tokio::test]
async fn a_spent_refresh_token_is_refused() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    assert_eq!(
        users::refresh(&app, &user.refresh_token).await.status(),
        200
    );

    // Act
    let again = users::refresh(&app, &user.refresh_token).await;

    // Assert
    problem(again, 401, "unauthorized").await;
}

#[tokio::test]
async fn reusing_a_spent_refresh_token_ends_the_whole_session() {
    // Arrange: the session has moved on to a newer token; another session
    // of the same user is unrelated.
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    let other_session = TestUser::login(&app, &user.email, TEST_PASSWORD).await;
    let rotated: Value = users::refresh(&app, &user.refresh_token)
        .await
        .json()
        .await
        .unwrap();
    let newest = rotated["refresh_token"].as_str().unwrap();

    // Act
    let reuse = users::refresh(&app, &user.refresh_token).await;

    // Assert
    problem(reuse, 401, "unauthorized").await;
    problem(users::refresh(&app, newest).await, 401, "unauthorized").await;
    assert_eq!(
        users::refresh(&app, &other_session.refresh_token)
            .await
            .status(),
        200
    );
    assert_eq!(
        sessions_revoked_for(&app, user.id).await,
        [Some("refresh_token_reuse".to_owned()), None]
    );
}

#[tokio::test]
async fn concurrent_refreshes_with_one_token_cannot_both_succeed() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;

    // Act
    let attempts =
        futures_util::future::join_all((0..5).map(|_| users::refresh(&app, &user.refresh_token)))
            .await;

    // Assert
    let succeeded = attempts
        .iter()
        .filter(|response| response.status() == 200)
        .count();
    assert_eq!(succeeded, 1);
    assert!(attempts
        .iter()
        .all(|response| [200, 401].contains(&response.status().as_u16())));
}

#[tokio::test]
async fn unknown_and_expired_refresh_tokens_are_refused() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    sqlx::query("UPDATE refresh_tokens SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();

    // Act
    let unknown = users::refresh(&app, "not-a-token-we-issued").await;
    let expired = users::refresh(&app, &user.refresh_token).await;

    // Assert
    problem(unknown, 401, "unauthorized").await;
    problem(expired, 401, "unauthorized").await;
}

#[tokio::test]
async fn the_refresh_token_cookie_alone_is_enough_to_refresh() {
    // Arrange
    let app = spawn_app().await;
    let registered = app
        .post_json(
            REGISTER,
            &json!({"email": unique_email("ada"), "password": TEST_PASSWORD}),
        )
        .await;
    assert_eq!(registered.status(), 201);

    // Act: no body at all, then an empty JSON object.
    let first = app.request(Method::POST, REFRESH).send().await.unwrap();
    let second = app.post_json(REFRESH, &json!({})).await;

    // Assert: the jar holds the rotated cookie, so both succeed.
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
}

#[tokio::test]
async fn refreshing_without_any_refresh_token_is_unauthorized() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = app.request(Method::POST, REFRESH).send().await.unwrap();

    // Assert
    problem(response, 401, "unauthorized").await;
}

#[tokio::test]
async fn a_refresh_body_that_is_present_must_be_valid_json() {
    // Arrange: the cookie alone would have been enough.
    let app = spawn_app().await;
    let registered = app
        .post_json(
            REGISTER,
            &json!({"email": unique_email("ada"), "password": TEST_PASSWORD}),
        )
        .await;
    assert_eq!(registered.status(), 201);

    // Act
    let response = app
        .request(Method::POST, REFRESH)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();

    // Assert
    problem(response, 400, "validation_failed").await;
}

// Logout

#[tokio::test]
async fn logging_out_ends_the_session_and_clears_the_cookies() {
    // Arrange: a browser signed in by cookie.
    let app = spawn_app().await;
    let registered: Value = app
        .post_json(
            REGISTER,
            &json!({"email": unique_email("ada"), "password": TEST_PASSWORD}),
        )
        .await
        .json()
        .await
        .unwrap();
    let refresh_token = registered["refresh_token"].as_str().unwrap();

    // Act
    let response = app.request(Method::POST, LOGOUT).send().await.unwrap();

    // Assert
    assert_eq!(response.status(), 204);
    let access = cookie_attributes(&set_cookie(&response, "access_token"));
    assert!(access.contains(&"max-age=0".to_owned()), "{access:?}");
    assert!(access.contains(&"path=/".to_owned()), "{access:?}");
    let refresh = cookie_attributes(&set_cookie(&response, "refresh_token"));
    assert!(refresh.contains(&"max-age=0".to_owned()), "{refresh:?}");
    assert!(
        refresh.contains(&"path=/api/v1/auth".to_owned()),
        "{refresh:?}"
    );
    problem(
        users::refresh(&app, refresh_token).await,
        401,
        "unauthorized",
    )
    .await;
    problem(app.get(ME).await, 401, "unauthorized").await;
    let user_id: Uuid = registered["user"]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        sessions_revoked_for(&app, user_id).await,
        [Some("logout".to_owned())]
    );
}

#[tokio::test]
async fn logging_out_leaves_the_other_sessions_signed_in() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    let other_session = TestUser::login(&app, &user.email, TEST_PASSWORD).await;

    // Act
    let response = app
        .request(Method::POST, LOGOUT)
        .bearer_auth(&user.access_token)
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(response.status(), 204);
    problem(
        users::refresh(&app, &user.refresh_token).await,
        401,
        "unauthorized",
    )
    .await;
    assert_eq!(
        users::refresh(&app, &other_session.refresh_token)
            .await
            .status(),
        200
    );
}

// Change password

async fn change_password(app: &TestApp, token: &str, current: &str, new: &str) -> Response {
    new_client()
        .post(app.url(CHANGE_PASSWORD))
        .bearer_auth(token)
        .json(&json!({"current_password": current, "new_password": new}))
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn changing_the_password_ends_every_other_session_but_not_the_callers() {
    // Arrange: two sessions of one user.
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;
    let other_session = TestUser::login(&app, &user.email, TEST_PASSWORD).await;
    let new_password = "a brand new passphrase";

    // Act
    let response = change_password(&app, &user.access_token, TEST_PASSWORD, new_password).await;

    // Assert
    assert_eq!(response.status(), 204);
    problem(
        users::refresh(&app, &other_session.refresh_token).await,
        401,
        "unauthorized",
    )
    .await;
    assert_eq!(
        users::refresh(&app, &user.refresh_token).await.status(),
        200
    );
    assert_eq!(
        users::login(&app, &user.email, new_password).await.status(),
        200
    );
    problem(
        users::login(&app, &user.email, TEST_PASSWORD).await,
        401,
        "unauthorized",
    )
    .await;
}

#[tokio::test]
async fn a_wrong_current_password_is_refused_naming_the_field() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;

    // Act
    let response = change_password(
        &app,
        &user.access_token,
        "not the password",
        "a brand new passphrase",
    )
    .await;

    // Assert
    let body = problem(response, 422, "validation_failed").await;
    assert_eq!(field_names(&body), ["current_password"]);
    assert_eq!(
        users::login(&app, &user.email, TEST_PASSWORD)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_new_password_is_held_to_the_registration_rules() {
    // Arrange
    let app = spawn_app().await;
    let user = TestUser::register_customer(&app).await;

    // Act
    let too_short = change_password(&app, &user.access_token, TEST_PASSWORD, "short").await;
    let too_long = change_password(&app, &user.access_token, TEST_PASSWORD, &"x".repeat(73)).await;

    // Assert
    let body = problem(too_short, 422, "validation_failed").await;
    assert_eq!(field_names(&body), ["new_password"]);
    let body = problem(too_long, 422, "validation_failed").await;
    assert_eq!(field_names(&body), ["new_password"]);
}

#[tokio::test]
async fn changing_the_password_needs_a_signed_in_user() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = app
        .post_json(
            CHANGE_PASSWORD,
            &json!({"current_password": TEST_PASSWORD, "new_password": "whatever long"}),
        )
        .await;

    // Assert
    problem(response, 401, "unauthorized").await;
}

// Admins

#[tokio::test]
async fn an_admin_created_from_the_command_line_signs_in_as_admin() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let admin = TestUser::create_admin(&app).await;

    // Assert
    let me: Value = me_with_bearer(&app, &admin.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["role"], "admin");
    assert_eq!(me["email"], admin.email);
}

#[tokio::test]
async fn create_admin_refuses_a_taken_email_and_a_bad_password() {
    // Arrange
    let app = spawn_app().await;
    let customer = TestUser::register_customer(&app).await;
    let cost = app.settings.bcrypt_cost;

    // Act
    let taken = commerce::cli::create_admin(
        &app.pool,
        cost,
        &customer.email.to_uppercase(),
        TEST_PASSWORD.into(),
        None,
    )
    .await;
    let weak = commerce::cli::create_admin(
        &app.pool,
        cost,
        &unique_email("admin"),
        "short".into(),
        None,
    )
    .await;

    // Assert
    let taken = format!("{:#}", taken.unwrap_err());
    assert!(taken.contains("already exists"), "{taken}");
    let weak = format!("{:#}", weak.unwrap_err());
    assert!(weak.contains("--password"), "{weak}");
}

// Documentation

#[tokio::test]
async fn the_auth_routes_are_in_the_openapi_document() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let document: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();

    // Assert
    for (path, method) in [
        (REGISTER, "post"),
        (LOGIN, "post"),
        (REFRESH, "post"),
        (LOGOUT, "post"),
        (CHANGE_PASSWORD, "post"),
        (ME, "get"),
    ] {
        let operation = &document["paths"][path][method];
        assert_eq!(operation["tags"][0], "auth", "{path}");
        assert!(operation["responses"].is_object(), "{path}");
    }
    assert!(document["components"]["schemas"]["AuthResponse"].is_object());
}
