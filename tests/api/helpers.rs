#![allow(dead_code)] // shared by every test module; no module uses every helper
//! Starting test servers and talking to them.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use commerce::config::Settings;
use commerce::startup::Application;
use reqwest::{Method, Response};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

pub const TEST_JWT_SECRET: &str = "test-secret-that-is-long-enough-for-hs256-use";

pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub pool: PgPool,
    pub settings: Settings,
    /// A client with its own cookie jar, like one browser.
    pub api: reqwest::Client,
    pub server: actix_web::dev::ServerHandle,
    pub state: std::sync::Arc<AppHandle>,
    running: tokio::task::JoinHandle<()>,
}

/// What tests may reach inside the running application.
pub struct AppHandle {
    pub store: commerce::event_store::EventStore,
    pub projections: projections::ProjectionSet,
    pub redis: commerce::redis_cache::Redis,
}

/// Settings for a fresh test: its own database, its own Redis prefix, a
/// random port, a cheap bcrypt cost.
pub fn test_settings() -> Settings {
    let database = format!("test_{}", Uuid::new_v4().simple());
    let vars: HashMap<&str, String> = HashMap::from([
        (
            "DATABASE_URL",
            format!(
                "{}/{database}?sslmode=disable",
                std::env::var("TEST_DATABASE_SERVER")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
            ),
        ),
        (
            "REDIS_URL",
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        ),
        (
            "REDIS_KEY_PREFIX",
            format!("test:{}:", Uuid::new_v4().simple()),
        ),
        ("BIND_ADDR", "127.0.0.1:0".into()),
        ("JWT_SECRET", TEST_JWT_SECRET.into()),
        ("BCRYPT_COST", "4".into()),
        ("DATABASE_MAX_CONNECTIONS", "8".into()),
        ("LOG_FORMAT", "pretty".into()),
        // Many buyers share 127.0.0.1 in tests; the rate-limit tests turn
        // the limits back on.
        ("RATE_LIMIT_PUBLIC_PER_MIN", "0".into()),
        ("RATE_LIMIT_AUTH_PER_MIN", "0".into()),
        ("RATE_LIMIT_SENSITIVE_PER_MIN", "0".into()),
    ]);
    Settings::from_lookup(|name| vars.get(name).cloned()).expect("test settings are valid")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customize: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    customize(&mut settings);
    spawn_app_from(settings).await
}

/// Another instance on the same database and Redis as `app`.
pub async fn spawn_instance_like(app: &TestApp) -> TestApp {
    let mut settings = app.settings.clone();
    settings.bind_addr = "127.0.0.1:0".parse().unwrap();
    spawn_app_from(settings).await
}

pub async fn spawn_app_from(settings: Settings) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        commerce::telemetry::init_tracing(commerce::config::LogFormat::Pretty);
    }
    let application = Application::build(settings.clone())
        .await
        .expect("application builds");
    let port = application.port();
    let server = application.handle();
    let pool = application.state().pool.clone();
    let state = std::sync::Arc::new(AppHandle {
        store: application.state().store.clone(),
        projections: application.state().projections.clone(),
        redis: application.state().redis.clone(),
    });
    let running = tokio::spawn(async move {
        application.run_until_stopped().await.expect("server ran");
    });
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        pool,
        settings,
        api: new_client(),
        server,
        state,
        running,
    }
}

pub fn new_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client builds")
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// A request with this app's shared cookie jar.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.api.request(method, self.url(path))
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get_as(&self, path: &str, token: &str) -> Response {
        self.request(Method::GET, path)
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json_as(&self, path: &str, token: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Stops this instance gracefully and waits until it has.
    pub async fn stop(self) {
        self.server.stop(true).await;
        let _ = self.running.await;
    }
}

/// Reads a problem response and checks its shape.
pub async fn problem(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(
        response.status().as_u16(),
        status,
        "status of {}",
        response.url()
    );
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        content_type,
        "application/problem+json",
        "content type of {}",
        response.url()
    );
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string() && body["type"].is_string(),
        "{body}"
    );
    body
}

/// A Redis server of this test's own, so it can be stopped and started
/// without disturbing the other tests.
pub struct OwnRedis {
    port: u16,
    process: Option<Child>,
    /// Where it keeps its data across a stop, for one started to.
    data_dir: Option<std::path::PathBuf>,
}

impl OwnRedis {
    /// One that keeps nothing: a stop loses every key.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// One that writes every change to its append-only file and reads it
    /// back when resumed, as a Redis restarted with persistence does.
    pub fn start_persistent() -> Self {
        let dir = std::env::temp_dir().join(format!("own-redis-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_with(Some(dir))
    }

    fn start_with(data_dir: Option<std::path::PathBuf>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            process: None,
            data_dir,
        };
        redis.resume();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn resume(&mut self) {
        let port = self.port.to_string();
        let mut args = vec!["--port", &port, "--bind", "127.0.0.1", "--save", ""];
        match &self.data_dir {
            Some(dir) => args.extend([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                dir.to_str().expect("a UTF-8 temporary directory"),
            ]),
            None => args.extend(["--appendonly", "no"]),
        }
        let process = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.process = Some(process);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start");
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
