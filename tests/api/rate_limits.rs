//! Rate limits: per class, shared across instances through Redis, local
//! while Redis is down, login abuse per account, and who the client is.

use std::time::{Duration, Instant};

use commerce::config::Settings;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{
    problem, spawn_app_from, spawn_instance_like, test_settings, OwnRedis, TestApp,
};
use crate::users::{unique_email, TestUser};

fn limited(auth_per_min: u32) -> Settings {
    let mut settings = test_settings();
    settings.rate_limit_auth_per_min = auth_per_min;
    settings
}

/// A cheap auth-class request: a registration refused for its password.
async fn auth_attempt(app: &TestApp, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = app
        .request(Method::POST, "/api/v1/auth/register")
        .json(&json!({ "email": unique_email("rl"), "password": "short" }));
    if let Some(address) = forwarded_for {
        request = request.header("x-forwarded-for", address);
    }
    request.send().await.unwrap()
}

async fn count_allowed(app: &TestApp, attempts: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..attempts {
        if auth_attempt(app, None).await.status() != 429 {
            allowed += 1;
        }
    }
    allowed
}

#[tokio::test]
async fn past_the_limit_the_answer_is_429_with_headers_and_the_reset_lets_the_next_through() {
    // 60 a minute: the limit refills one request a second.
    let app = spawn_app_from(limited(60)).await;

    for remaining in (0..60).rev() {
        let response = auth_attempt(&app, None).await;
        assert_eq!(response.status(), 422);
        assert_eq!(response.headers()["ratelimit-limit"], "60");
        assert_eq!(
            response.headers()["ratelimit-remaining"],
            remaining.to_string().as_str()
        );
        assert!(response.headers().contains_key("ratelimit-reset"));
    }
    let refused = auth_attempt(&app, None).await;
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(refused.headers()["ratelimit-remaining"], "0");
    problem(refused, 429, "rate_limited").await;
    assert!((1..=2).contains(&retry_after), "{retry_after}");

    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    assert_eq!(
        auth_attempt(&app, None).await.status(),
        422,
        "allowed again after the reset"
    );
}

#[tokio::test]
async fn unlimited_routes_carry_no_rate_limit_headers() {
    let app = spawn_app_from(limited(5)).await;
    let response = app.get("/healthz").await;
    assert!(response.headers().get("ratelimit-limit").is_none());
}

#[tokio::test]
async fn two_instances_on_one_redis_allow_the_limit_once_not_twice() {
    let first = spawn_app_from(limited(10)).await;
    let second = spawn_instance_like(&first).await;

    let allowed = count_allowed(&first, 8).await + count_allowed(&second, 8).await;

    assert_eq!(allowed, 10);
}

#[tokio::test]
async fn with_redis_down_limits_fall_back_to_each_instance_and_come_back_shared() {
    let mut redis = OwnRedis::start();
    let mut settings = limited(10);
    settings.redis_url = secrecy::SecretString::from(redis.url());
    let first = spawn_app_from(settings).await;
    let second = spawn_instance_like(&first).await;
    assert_eq!(count_allowed(&first, 4).await, 4);
    let ready: Value = first.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["rate_limits"], "shared");

    redis.stop();
    let started = Instant::now();
    let served = auth_attempt(&first, None).await;
    assert_eq!(served.status(), 422, "still served without Redis");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no request waits on a dead Redis"
    );
    let ready: Value = first.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["rate_limits"].as_str()),
        (Some("degraded"), Some("local"))
    );
    // Each instance now limits on its own: 10 each.
    assert_eq!(
        count_allowed(&first, 12).await,
        9,
        "the first instance already spent one locally"
    );
    assert_eq!(count_allowed(&second, 12).await, 10);

    redis.resume();
    // The breaker tries Redis again after its pause.
    let mut shared = false;
    for _ in 0..50 {
        auth_attempt(&first, None).await;
        let ready: Value = first.get("/readyz").await.json().await.unwrap();
        if ready["rate_limits"] == "shared" {
            shared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(shared, "limits are shared again once Redis is back");
}

#[tokio::test]
async fn a_forwarded_for_header_from_an_untrusted_peer_does_not_change_the_key() {
    let app = spawn_app_from(limited(2)).await;

    let statuses = [
        auth_attempt(&app, Some("198.51.100.1")).await.status(),
        auth_attempt(&app, Some("198.51.100.2")).await.status(),
        auth_attempt(&app, Some("198.51.100.3")).await.status(),
    ];

    assert_eq!(statuses.map(|s| s.as_u16()), [422, 422, 429]);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit() {
    let mut settings = limited(2);
    settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let app = spawn_app_from(settings).await;

    for client in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        assert_eq!(auth_attempt(&app, Some(client)).await.status(), 422);
        assert_eq!(auth_attempt(&app, Some(client)).await.status(), 422);
    }
    assert_eq!(auth_attempt(&app, Some("198.51.100.1")).await.status(), 429);
}

#[tokio::test]
async fn an_ipv6_client_is_limited_by_its_slash_64_not_by_each_address() {
    let mut settings = limited(2);
    settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let app = spawn_app_from(settings).await;

    // Three addresses of one /64 share one limit.
    let one_network = [
        auth_attempt(&app, Some("2001:db8:1:2::1")).await.status(),
        auth_attempt(&app, Some("2001:db8:1:2:ffff::9"))
            .await
            .status(),
        auth_attempt(&app, Some("2001:db8:1:2:abcd:1:2:3"))
            .await
            .status(),
    ];
    // The next /64 is another client; an IPv4 client written as an
    // IPv4-mapped IPv6 address is the IPv4 client.
    let others = [
        auth_attempt(&app, Some("2001:db8:1:3::1")).await.status(),
        auth_attempt(&app, Some("198.51.100.7")).await.status(),
        auth_attempt(&app, Some("::ffff:198.51.100.7"))
            .await
            .status(),
        auth_attempt(&app, Some("198.51.100.7")).await.status(),
    ];

    assert_eq!(one_network.map(|s| s.as_u16()), [422, 422, 429]);
    assert_eq!(others.map(|s| s.as_u16()), [422, 422, 422, 429]);
}

async fn login_from(
    app: &TestApp,
    email: &str,
    password: &str,
    address: &str,
) -> reqwest::Response {
    app.request(Method::POST, "/api/v1/auth/login")
        .header("x-forwarded-for", address)
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn failed_logins_sent_at_once_cannot_check_more_passwords_than_the_lock_allows() {
    let mut settings = test_settings();
    settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let app = spawn_app_from(settings).await;
    let user = TestUser::register_customer(&app).await;
    // One attempt from each of many addresses, so that no per-address
    // limit stops any of them.
    let attempts = (1..=30).map(|host| {
        let (app, email) = (&app, user.email.clone());
        async move {
            let address = format!("203.0.113.{host}");
            login_from(app, &email, "wrong password", &address)
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    let checked = statuses.iter().filter(|status| **status == 401).count();
    assert!(
        checked <= commerce::rate_limit::login_guard::LOCK_AFTER as usize,
        "{checked} passwords checked: {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|status| *status == 401 || *status == 429),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn wrong_current_passwords_at_change_password_count_toward_the_accounts_login_lock() {
    let mut settings = test_settings();
    settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let app = spawn_app_from(settings).await;
    let user = TestUser::register_customer(&app).await;
    // Whoever holds a stolen access token guesses the password here.
    let guesses = (1..=30).map(|n| {
        let (app, token) = (&app, user.access_token.clone());
        async move {
            app.request(Method::POST, "/api/v1/auth/change-password")
                .bearer_auth(token)
                .header("x-forwarded-for", "203.0.113.66")
                .json(&json!({
                    "current_password": format!("guess number {n}"),
                    "new_password": "a brand new passphrase",
                }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(guesses).await;

    let checked = statuses.iter().filter(|status| **status == 422).count();
    assert!(
        checked <= commerce::rate_limit::login_guard::LOCK_AFTER as usize,
        "{checked} passwords checked: {statuses:?}"
    );
    assert!(
        statuses.contains(&429)
            && statuses
                .iter()
                .all(|status| *status == 422 || *status == 429),
        "{statuses:?}"
    );
    // The same lock holds at login, for an address that never signed in.
    let login = login_from(&app, &user.email, &user.password, "192.0.2.77").await;
    problem(login, 429, "rate_limited").await;
}

#[tokio::test]
async fn failed_logins_slow_an_account_then_lock_it_for_new_addresses_until_the_window_ends() {
    let mut settings = test_settings();
    settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    // Long enough for the burst below: attempts sent together are slowed
    // one after another, up to 4 s.
    settings.login_failure_window = Duration::from_secs(8);
    let app = spawn_app_from(settings).await;
    let user = TestUser::register_customer(&app).await;
    let bystander = TestUser::register_customer(&app).await;
    let (home, attacker, traveller) = ("198.51.100.10", "203.0.113.66", "192.0.2.77");
    assert_eq!(
        login_from(&app, &user.email, &user.password, home)
            .await
            .status(),
        200
    );

    for _ in 0..3 {
        assert_eq!(
            login_from(&app, &user.email, "wrong password", attacker)
                .await
                .status(),
            401
        );
    }
    let started = Instant::now();
    assert_eq!(
        login_from(&app, &user.email, "wrong password", attacker)
            .await
            .status(),
        401
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "slowed after three failures"
    );
    let burst = (0..6).map(|_| login_from(&app, &user.email, "wrong password", attacker));
    for response in futures_util::future::join_all(burst).await {
        assert_eq!(response.status(), 401);
    }

    // Locked for an address that never signed in, even with the password.
    let locked = login_from(&app, &user.email, &user.password, traveller).await;
    assert!(locked.headers().contains_key("retry-after"));
    problem(locked, 429, "rate_limited").await;
    // Another account is unaffected.
    assert_eq!(
        login_from(&app, &bystander.email, &bystander.password, attacker)
            .await
            .status(),
        200
    );
    // The lock runs out with the window.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        login_from(&app, &user.email, &user.password, traveller)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_known_address_is_never_locked_out_and_a_good_login_resets_the_count() {
    let mut settings = test_settings();
    settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let app = spawn_app_from(settings).await;
    let user = TestUser::register_customer(&app).await;
    let (home, attacker, traveller) = ("198.51.100.10", "203.0.113.66", "192.0.2.77");
    assert_eq!(
        login_from(&app, &user.email, &user.password, home)
            .await
            .status(),
        200
    );
    let burst = (0..10).map(|_| login_from(&app, &user.email, "wrong password", attacker));
    futures_util::future::join_all(burst).await;
    assert_eq!(
        login_from(&app, &user.email, &user.password, traveller)
            .await
            .status(),
        429
    );

    assert_eq!(
        login_from(&app, &user.email, &user.password, home)
            .await
            .status(),
        200,
        "home still works"
    );

    assert_eq!(
        login_from(&app, &user.email, &user.password, traveller)
            .await
            .status(),
        200,
        "count reset"
    );
}
