#![allow(dead_code)] // shared by every test module; no module uses every helper
//! Signed-in users for tests: customers through the API, admins through the
//! function `commerce create-admin` runs.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{new_client, TestApp};

pub const TEST_PASSWORD: &str = "correct horse battery";

/// A signed-in user and the credentials it signed in with.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: Uuid,
    pub email: String,
    pub password: String,
    pub access_token: String,
    pub refresh_token: String,
}

impl TestUser {
    /// Registers a new customer with a unique email. Uses a client of its own
    /// so that its cookies never leak into `app.api`.
    pub async fn register_customer(app: &TestApp) -> Self {
        let email = unique_email("customer");
        let response = new_client()
            .post(app.url("/api/v1/auth/register"))
            .json(&json!({"email": email, "password": TEST_PASSWORD, "name": "Test Customer"}))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 201, "registering {email}");
        Self::from_auth_response(response.json().await.expect("JSON body"), TEST_PASSWORD)
    }

    /// Creates an admin the way `commerce create-admin` does, then signs in.
    pub async fn create_admin(app: &TestApp) -> Self {
        let email = unique_email("admin");
        commerce::cli::create_admin(
            &app.pool,
            app.settings.bcrypt_cost,
            &email,
            TEST_PASSWORD.to_owned(),
            Some("Test Admin".into()),
        )
        .await
        .expect("admin created");
        Self::login(app, &email, TEST_PASSWORD).await
    }

    /// Signs in: a new session with its own tokens.
    pub async fn login(app: &TestApp, email: &str, password: &str) -> Self {
        let response = login(app, email, password).await;
        assert_eq!(response.status(), 200, "signing in as {email}");
        Self::from_auth_response(response.json().await.expect("JSON body"), password)
    }

    fn from_auth_response(body: Value, password: &str) -> Self {
        let text = |value: &Value| value.as_str().expect("a string").to_owned();
        Self {
            id: text(&body["user"]["id"]).parse().expect("a UUID"),
            email: text(&body["user"]["email"]),
            password: password.to_owned(),
            access_token: text(&body["access_token"]),
            refresh_token: text(&body["refresh_token"]),
        }
    }
}

pub fn unique_email(prefix: &str) -> String {
    format!("{prefix}-{}@example.com", Uuid::new_v4().simple())
}

/// `POST /api/v1/auth/login` from a client without cookies.
pub async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    new_client()
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("request sent")
}

/// `POST /api/v1/auth/refresh-token` with the token in the body, from a
/// client without cookies.
pub async fn refresh(app: &TestApp, refresh_token: &str) -> reqwest::Response {
    new_client()
        .post(app.url("/api/v1/auth/refresh-token"))
        .json(&json!({"refresh_token": refresh_token}))
        .send()
        .await
        .expect("request sent")
}
