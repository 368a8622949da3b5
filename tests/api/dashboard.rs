//! The admin dashboard at `/admin`: its files and headers, the vendored
//! chart library against what npm delivers, and the page itself in a real
//! browser (Debian's headless Chromium over WebDriver), which signs in and
//! must draw exactly the figures the JSON API returns.
//!
//! The browser test needs `/usr/bin/chromium` and `/usr/bin/chromedriver`
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them) and
//! fails, never skips, without them. `CHROMIUM` and `CHROMEDRIVER` point
//! elsewhere; `DASHBOARD_SCREENSHOT=file.png` keeps a picture of the page.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::DateTime;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{problem, spawn_app, TestApp};
use crate::shop_support::{
    customer_order, fake_pay, settle_projections, stocked_product, StockedProduct,
};
use crate::users::TestUser;

const ADMIN_SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/admin");
const BROWSER_WAIT: Duration = Duration::from_secs(45);

// ---- the page's files -------------------------------------------------------

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_else(|| panic!("{} has no {name} header", response.url()))
}

/// The `/admin/NAME?v=VERSION` link the page gives for `name`.
fn versioned_link(page: &str, name: &str) -> String {
    let start = page
        .find(&format!("\"/admin/{name}?v="))
        .unwrap_or_else(|| panic!("the page does not link {name} by version"));
    let link = &page[start + 1..];
    link[..link.find('"').expect("a closing quote")].to_owned()
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_their_types_csp_and_cache_headers() {
    let app = spawn_app().await;

    let page = app.get("/admin").await;
    assert_eq!(page.status(), 200);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    let csp = header(&page, "content-security-policy").to_owned();
    assert!(
        csp.contains("script-src 'self'")
            && csp.contains("connect-src 'self'")
            && !csp.contains("unsafe-inline")
            && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    let etag = header(&page, "etag").to_owned();
    let html = page.text().await.expect("the page");
    // The policy forbids inline code; the page must not need any.
    assert!(
        !html.contains(" style=")
            && html.matches("<script").count() == html.matches("<script src=").count(),
        "inline style or script in the page"
    );
    let revalidated = app
        .request(reqwest::Method::GET, "/admin")
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("request sent");
    assert_eq!(revalidated.status(), 304);

    for (name, content_type, on_disk) in [
        (
            "dashboard.js",
            "text/javascript; charset=utf-8",
            "dashboard.js",
        ),
        ("dashboard.css", "text/css; charset=utf-8", "dashboard.css"),
        (
            "vendor/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
            "vendor/uPlot.iife.min.js",
        ),
        (
            "vendor/uPlot.min.css",
            "text/css; charset=utf-8",
            "vendor/uPlot.min.css",
        ),
    ] {
        let link = versioned_link(&html, name);
        let asset = app.get(&link).await;
        assert_eq!(asset.status(), 200, "{link}");
        assert_eq!(header(&asset, "content-type"), content_type, "{link}");
        assert_eq!(
            header(&asset, "cache-control"),
            "public, max-age=31536000, immutable",
            "{link}"
        );
        let served = asset.bytes().await.expect("the file");
        let expected = std::fs::read(Path::new(ADMIN_SOURCES).join(on_disk)).expect("the source");
        assert!(served == expected, "{link} is not {on_disk}");
    }
    // Without this build's version the file may change under the URL.
    let unversioned = app.get("/admin/dashboard.js").await;
    assert_eq!(header(&unversioned, "cache-control"), "no-cache");
    let licence = app.get("/admin/vendor/LICENSE").await;
    assert_eq!(
        header(&licence, "content-type"),
        "text/plain; charset=utf-8"
    );
    assert!(licence.text().await.expect("text").contains("MIT License"));

    let trailing_slash = app.get("/admin/").await;
    assert_eq!(trailing_slash.status(), 308);
    assert_eq!(header(&trailing_slash, "location"), "/admin");
    problem(app.get("/admin/no-such-file.js").await, 404, "not_found").await;
    // The API keeps its own deny-all policy.
    let api = app.get("/healthz").await;
    assert!(header(&api, "content-security-policy").starts_with("default-src 'none'; frame"));
}

// ---- the vendored chart library -------------------------------------------

#[test]
fn the_vendored_chart_library_is_byte_for_byte_what_npm_delivers_for_the_locked_version() {
    // Arrange: vendor.sh's own file list, into a scratch folder (npm ci
    // checks the tarball against the lock's sha512 integrity).
    let fresh = scratch_dir("vendor");
    let npm_missing = Command::new("npm").arg("--version").output().is_err();
    assert!(
        !npm_missing,
        "npm is not installed: it is needed to check src/http/admin/vendor against the npm registry"
    );

    // Act
    let run = Command::new("bash")
        .arg(Path::new(ADMIN_SOURCES).join("vendor.sh"))
        .arg("--into")
        .arg(&fresh)
        .output()
        .expect("vendor.sh runs");

    // Assert
    assert!(
        run.status.success(),
        "vendor.sh failed ({}):\n{}{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let delivered = files_in(&fresh);
    let vendored = files_in(&Path::new(ADMIN_SOURCES).join("vendor"));
    let _ = std::fs::remove_dir_all(&fresh);
    assert_eq!(
        vendored.keys().collect::<Vec<_>>(),
        delivered.keys().collect::<Vec<_>>(),
        "vendor/ holds other files than vendor.sh delivers"
    );
    for (name, bytes) in &delivered {
        assert!(
            vendored[name] == *bytes,
            "src/http/admin/vendor/{name} differs from what npm delivers for the locked \
             version: run src/http/admin/vendor.sh"
        );
    }
    let lock: Value = serde_json::from_slice(
        &std::fs::read(Path::new(ADMIN_SOURCES).join("package-lock.json")).expect("the lock"),
    )
    .expect("the lock is JSON");
    let locked = lock["packages"]["node_modules/uplot"]["version"]
        .as_str()
        .expect("uplot in the lock");
    let script = String::from_utf8_lossy(&vendored["uPlot.iife.min.js"]);
    assert!(
        script.contains(&format!("(v{locked})")),
        "not uPlot {locked}"
    );
}

fn scratch_dir(purpose: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "commerce-dashboard-{purpose}-{}",
        Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a folder entry").path();
            let name = path
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("a readable file"))
        })
        .collect()
}

// ---- the page in a browser -------------------------------------------------

/// Headless Chromium driven by its own chromedriver on a free port, with a
/// fresh profile. Dropping it ends the chromedriver process group (and so a
/// browser left behind by a failed test) and removes the profile.
struct Browser {
    client: Client,
    driver: Child,
    profile: PathBuf,
}

fn installed(variable: &str, default: &str, package: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.is_file(),
        "{} not found: the dashboard test needs Debian's {package} \
         (apt-get install chromium chromium-driver; .ci/run installs both), or {variable} \
         naming another binary",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl Browser {
    async fn launch() -> Self {
        let chromium = installed("CHROMIUM", "/usr/bin/chromium", "chromium");
        let chromedriver = installed("CHROMEDRIVER", "/usr/bin/chromedriver", "chromium-driver");
        let profile = scratch_dir("profile");
        let port = free_port();
        let mut driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Drop can end the browsers it
            // started along with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("{} did not start: {error}", chromedriver.display()));
        let webdriver_url = format!("http://127.0.0.1:{port}");
        wait_for_driver(&mut driver, &webdriver_url).await;

        // Without the background-networking flags Chromium keeps trying
        // Google's hosts, which this machine's closed network refuses.
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&webdriver_url)
            .await
            .unwrap_or_else(|error| panic!("chromedriver could not start Chromium: {error}"));
        Self {
            client,
            driver,
            profile,
        }
    }

    /// Runs `steps`, then closes the browser whatever happened, and only
    /// then passes a failure on.
    async fn run<F: std::future::Future<Output = ()>>(self, steps: impl FnOnce(Client) -> F) {
        let outcome = AssertUnwindSafe(steps(self.client.clone()))
            .catch_unwind()
            .await;
        let _ = self.client.clone().close().await;
        drop(self);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

async fn wait_for_driver(driver: &mut Child, url: &str) {
    let started = Instant::now();
    let client = reqwest::Client::new();
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(status)) = driver.try_wait() {
            panic!("chromedriver exited at once ({status})");
        }
        if let Ok(response) = client.get(format!("{url}/status")).send().await {
            if response.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer on {url} within 20 s");
}

/// Waits until `css` matches; on timeout, fails with what the page says.
async fn wait_for(browser: &Client, css: &str, what: &str) {
    let found = browser
        .wait()
        .at_most(BROWSER_WAIT)
        .every(Duration::from_millis(100))
        .for_element(Locator::Css(css))
        .await;
    if found.is_err() {
        let state = page_state(browser).await;
        panic!("the page never showed {what} ({css}) within {BROWSER_WAIT:?}; the page: {state}");
    }
}

/// The page's view, its loading flags, its shown errors and `dashboard.errors`.
async fn page_state(browser: &Client) -> Value {
    browser
        .execute(
            "const shown = [...document.querySelectorAll('.error')] \
               .filter((node) => !node.hidden).map((node) => node.textContent); \
             const errors = window.dashboard ? window.dashboard.errors : 'dashboard.js never ran'; \
             return { url: location.href, flags: { ...document.body.dataset }, shown, errors };",
            vec![],
        )
        .await
        .unwrap_or_else(|error| json!(format!("unreadable: {error}")))
}

async fn snapshot(browser: &Client) -> Value {
    browser
        .execute("return window.dashboard.snapshot();", vec![])
        .await
        .expect("window.dashboard.snapshot() answers")
}

async fn admin_get(app: &TestApp, admin: &TestUser, path: &str, query: &[(&str, &str)]) -> Value {
    let response = app
        .request(reqwest::Method::GET, path)
        .bearer_auth(&admin.access_token)
        .query(query)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.expect("JSON body")
}

fn numbers(values: &Value) -> Vec<f64> {
    values
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {values}"))
        .iter()
        .map(|value| {
            value
                .as_f64()
                .unwrap_or_else(|| panic!("not a number: {value}"))
        })
        .collect()
}

fn epoch_seconds(text: &Value) -> f64 {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {text}"));
    let time = DateTime::parse_from_rfc3339(text).unwrap_or_else(|error| panic!("{text}: {error}"));
    // Browsers keep milliseconds.
    time.timestamp_millis() as f64 / 1000.0
}

fn top_row(product: &StockedProduct, units_sold: u32, revenue_cents: i64) -> Value {
    json!({
        "product_id": product.product_id,
        "name": product.name,
        "units_sold": units_sold,
        "revenue_cents": revenue_cents,
    })
}

fn card<'a>(cards: &'a Value, key: &str) -> &'a Value {
    cards
        .as_array()
        .and_then(|cards| cards.iter().find(|card| card["key"] == key))
        .unwrap_or_else(|| panic!("no {key} card in {cards}"))
}

/// The stock the chart should hold: the state after each event, one point
/// per instant (the page keeps the last state of events stored together),
/// then the state at the moment the stock was read.
fn expected_stock_chart(inventory: &Value) -> BTreeMap<&'static str, Vec<f64>> {
    const SERIES: [&str; 5] = ["time", "on_hand", "reserved", "available", "holds"];
    let mut points: Vec<[f64; 5]> = Vec::new();
    let mut push = |point: [f64; 5]| match points.last_mut() {
        Some(last) if last[0] == point[0] => *last = point,
        _ => points.push(point),
    };
    let mut holds: BTreeSet<String> = BTreeSet::new();
    let (mut on_hand, mut reserved) = (0.0, 0.0);
    for event in inventory["events"].as_array().expect("events") {
        let kind = event["event_type"].as_str().expect("an event type");
        let body = &event["payload"][kind];
        let order = body["order_id"].as_str().unwrap_or_default().to_owned();
        match kind {
            "StockReserved" => {
                holds.insert(order);
            }
            "ReservationReleased" | "ReservationCommitted" => {
                holds.remove(&order);
            }
            _ => {}
        }
        on_hand = body["on_hand"].as_f64().unwrap_or(on_hand);
        reserved = body["reserved"].as_f64().unwrap_or(reserved);
        let time = epoch_seconds(&event["recorded_at"]);
        push([
            time,
            on_hand,
            reserved,
            on_hand - reserved,
            holds.len() as f64,
        ]);
    }
    let figure = |field: &str| inventory[field].as_f64().expect("a stock figure");
    push([
        epoch_seconds(&inventory["at"]),
        figure("on_hand"),
        figure("reserved"),
        figure("available"),
        holds.len() as f64,
    ]);
    SERIES
        .iter()
        .enumerate()
        .map(|(index, name)| (*name, points.iter().map(|point| point[index]).collect()))
        .collect()
}

async fn type_into(page: &Client, id: &str, text: &str) {
    let field = page
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|error| panic!("no #{id} on the page: {error}"));
    field.clear().await.expect("cleared");
    field.send_keys(text).await.expect("typed");
}

async fn click(page: &Client, css: &str) {
    page.find(Locator::Css(css))
        .await
        .unwrap_or_else(|error| panic!("nothing to click at {css}: {error}"))
        .click()
        .await
        .unwrap_or_else(|error| panic!("{css} could not be clicked: {error}"));
}

async fn sign_in(page: &Client, email: &str, password: &str) {
    type_into(page, "email", email).await;
    type_into(page, "password", password).await;
    click(page, "#sign-in-button").await;
}

/// Waits until the page has drawn sales for `interval`.
async fn wait_for_sales(page: &Client, interval: &str) -> Value {
    let started = Instant::now();
    while started.elapsed() < BROWSER_WAIT {
        let drawn = snapshot(page).await["sales"].clone();
        let loaded = page
            .execute("return document.body.dataset.sales;", vec![])
            .await
            .unwrap_or_default();
        if loaded == "loaded" && drawn["range"]["interval"] == interval {
            return drawn;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = page_state(page).await;
    panic!("the page never drew sales by {interval} within {BROWSER_WAIT:?}; the page: {state}");
}

/// Asks the API for the range the page drew and checks that the chart, the
/// cards and the top products hold the very same numbers. The summary.
async fn assert_sales_drawn_as_the_api_answers(
    app: &TestApp,
    admin: &TestUser,
    drawn: &Value,
) -> Value {
    let range = &drawn["range"];
    let span = [
        ("from", range["from"].as_str().expect("from")),
        ("to", range["to"].as_str().expect("to")),
    ];
    let interval = range["interval"].as_str().expect("interval");
    let summary = admin_get(app, admin, "/api/v1/sales/summary", &span).await;
    let series = admin_get(
        app,
        admin,
        "/api/v1/sales/timeseries",
        &[span[0], span[1], ("interval", interval)],
    )
    .await;
    let top = admin_get(
        app,
        admin,
        "/api/v1/sales/top-products",
        &[span[0], span[1], ("limit", "10")],
    )
    .await;

    let points = series["points"].as_array().expect("points");
    let api_series = |field: &str| -> Vec<f64> {
        points
            .iter()
            .map(|point| point[field].as_f64().expect("a figure"))
            .collect()
    };
    let chart = &drawn["chart"];
    assert_eq!(
        numbers(&chart["bucket_start"]),
        points
            .iter()
            .map(|point| epoch_seconds(&point["bucket_start"]))
            .collect::<Vec<_>>(),
        "the sales chart's buckets ({interval})"
    );
    assert_eq!(
        numbers(&chart["revenue_cents"]),
        api_series("revenue_cents"),
        "the sales chart's revenue ({interval})"
    );
    assert_eq!(
        numbers(&chart["orders_paid"]),
        api_series("orders_paid"),
        "the sales chart's paid orders ({interval})"
    );
    for key in [
        "revenue_cents",
        "orders_paid",
        "units_sold",
        "average_order_cents",
        "conversion_rate",
        "orders_expired",
        "orders_cancelled",
    ] {
        assert_eq!(
            card(&drawn["cards"], key)["value"],
            summary[key],
            "the {key} card"
        );
    }
    assert_eq!(drawn["top_products"], top["items"], "the top products");
    summary
}

#[tokio::test]
async fn an_admin_signs_in_and_the_charts_hold_the_numbers_the_api_returns() {
    // Arrange: three paid orders and one unpaid hold, made now, so that the
    // page's default range (the last seven days) holds them.
    let browser = Browser::launch().await;
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let tee = stocked_product(&app, &admin, 1999, 10).await;
    let mug = stocked_product(&app, &admin, 500, 20).await;
    for lines in [
        vec![(tee.variant_id, 2)],
        vec![(mug.variant_id, 3)],
        vec![(tee.variant_id, 1), (mug.variant_id, 1)],
    ] {
        let (buyer, order) = customer_order(&app, &lines).await;
        fake_pay(&app, &buyer, &order, "succeeded").await;
    }
    let (_holder, _held_order) = customer_order(&app, &[(tee.variant_id, 1)]).await;
    settle_projections(&app).await;

    browser
        .run(|page| async move {
            // A wrong password is refused on the form.
            page.goto(&app.url("/admin")).await.expect("the page opens");
            wait_for(&page, "body[data-view='sign-in']", "the sign-in form").await;
            sign_in(&page, &admin.email, "not the password").await;
            wait_for(&page, "#sign-in-error:not([hidden])", "the sign-in error").await;

            // Act: sign in.
            sign_in(&page, &admin.email, &admin.password).await;
            let by_hour = wait_for_sales(&page, "hour").await;

            // Assert: the same range asked of the API gives the same
            // figures, and they are the ones worked out by hand: 2 × 1999,
            // 3 × 500, 1999 + 500.
            let summary = assert_sales_drawn_as_the_api_answers(&app, &admin, &by_hour).await;
            assert_eq!(
                by_hour["chart"]["bucket_start"].as_array().map(Vec::len),
                Some(168),
                "seven days of hours"
            );
            assert_eq!(
                numbers(&by_hour["chart"]["revenue_cents"])
                    .iter()
                    .sum::<f64>(),
                7997.0
            );
            assert_eq!(
                numbers(&by_hour["chart"]["orders_paid"])
                    .iter()
                    .sum::<f64>(),
                3.0
            );
            assert_eq!(
                (
                    summary["revenue_cents"].as_i64(),
                    summary["units_sold"].as_i64()
                ),
                (Some(7997), Some(7))
            );
            let revenue_text = card(&by_hour["cards"], "revenue_cents")["text"]
                .as_str()
                .expect("text");
            assert!(
                revenue_text.contains("79.97"),
                "the revenue card reads {revenue_text}"
            );
            assert_eq!(
                by_hour["top_products"],
                json!([top_row(&mug, 4, 2000), top_row(&tee, 3, 5997)])
            );

            // Act: thirty days, by day.
            click(&page, "#range option[value='30d']").await;
            let by_day = wait_for_sales(&page, "day").await;

            // Assert
            let summary = assert_sales_drawn_as_the_api_answers(&app, &admin, &by_day).await;
            assert_eq!(summary["revenue_cents"], 7997);
            assert_eq!(
                numbers(&by_day["chart"]["revenue_cents"])
                    .iter()
                    .sum::<f64>(),
                7997.0
            );

            // Act: find the tee by name and choose its variant.
            type_into(&page, "product-query", &tee.name).await;
            click(&page, "#product-search button[type='submit']").await;
            let variant_button = format!("#product-results button[title='{}']", tee.variant_id);
            wait_for(
                &page,
                &variant_button,
                "the tee's variant among the search results",
            )
            .await;
            click(&page, &variant_button).await;
            wait_for(&page, "body[data-stock='loaded']", "the variant's stock").await;
            let state = snapshot(&page).await;
            let stock = &state["stock"];

            // Assert: the stock as it stood at the moment the page read it.
            assert_eq!(stock["variant_id"], tee.variant_id.to_string());
            let at = stock["at"].as_str().expect("at");
            let inventory = admin_get(
                &app,
                &admin,
                &format!("/api/v1/audit/inventory/{}", tee.variant_id),
                &[("at", at)],
            )
            .await;
            let expected = expected_stock_chart(&inventory);
            for (series, values) in &expected {
                assert_eq!(
                    &numbers(&stock["chart"][*series]),
                    values,
                    "the stock chart's {series}"
                );
            }
            // 10 on the shelf, 3 sold, 1 held by the unpaid order; the
            // first order's hold of 2 is history on the chart.
            for (key, value) in [
                ("on_hand", 7),
                ("reserved", 1),
                ("available", 6),
                ("active_holds", 1),
            ] {
                assert_eq!(card(&stock["cards"], key)["value"], value, "the {key} card");
            }
            assert!(expected["reserved"].contains(&2.0), "{expected:?}");

            if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT") {
                let height = page
                    .execute("return document.documentElement.scrollHeight;", vec![])
                    .await
                    .ok()
                    .and_then(|height| height.as_u64())
                    .unwrap_or(1000);
                let _ = page.set_window_size(1280, height as u32 + 120).await;
                let png = page.screenshot().await.expect("a screenshot");
                std::fs::write(&path, png).expect("the screenshot saved");
            }
            assert_eq!(
                state["errors"],
                json!([]),
                "script errors or CSP violations on the page"
            );

            // A reload keeps the session (the login's cookies) and the
            // chosen variant (the address); signing out ends both.
            page.refresh().await.expect("reloaded");
            wait_for(
                &page,
                "body[data-stock='loaded']",
                "the variant after a reload",
            )
            .await;
            click(&page, "#sign-out").await;
            wait_for(
                &page,
                "body[data-view='sign-in']",
                "the sign-in form after signing out",
            )
            .await;
            page.refresh().await.expect("reloaded");
            wait_for(
                &page,
                "body[data-view='sign-in']",
                "no session after signing out",
            )
            .await;

            // A customer's account opens nothing.
            let customer = TestUser::register_customer(&app).await;
            sign_in(&page, &customer.email, &customer.password).await;
            wait_for(
                &page,
                "#sign-in-error:not([hidden])",
                "the refusal of a customer",
            )
            .await;
            let refusal = page
                .find(Locator::Id("sign-in-error"))
                .await
                .expect("the error")
                .text()
                .await
                .expect("its text");
            assert!(refusal.contains("not an admin"), "{refusal}");
            let after = snapshot(&page).await;
            assert_eq!(after["sales"], Value::Null, "nothing drawn for a customer");
            assert_eq!(
                after["errors"],
                json!([]),
                "script errors or CSP violations after the reloads"
            );
        })
        .await;
}
