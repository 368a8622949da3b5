//! The run itself, phase by phase: hot-row baseline, setup, the sale, the
//! invariants, the read figures and the search figure.

use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use super::baseline::{self, HotRow, SEARCH_PAGE_SIZE};
use super::client::{Answer, Call, Endpoint, Worker};
use super::cpu::{CpuSamples, CpuSplit, Group};
use super::load::{drive, Job, Run};
use super::report::{self, Check, Checkout, Machine, Reads, Report, Search};
use super::{HotRowBaseline, Options};

const BUYER_PASSWORD: &str = "flash sale buyer password";
/// At most this many buyers' carts are read in the cart figure.
const MAX_CART_READERS: usize = 256;
/// Rounds the read figures are taken in, alternating.
const READ_ROUNDS: usize = 5;
/// The hot row is run this many times back to back and the median run is
/// the baseline: one run alone varied by half from one bench to the next.
const HOT_ROW_RUNS: usize = 3;
/// How long the read model may take to show the sale's last reservation.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(15);

/// A job from a closure (lets the compiler see the higher-ranked signature).
fn job<F>(f: F) -> Job
where
    F: for<'a> Fn(usize, &'a mut Worker) -> BoxFuture<'a, anyhow::Result<Answer>>
        + Send
        + Sync
        + 'static,
{
    Arc::new(f)
}

fn say(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
    let _ = std::io::stdout().flush();
}

/// Runs the whole benchmark against `options.urls`; see the module docs.
/// An error means the run could not be carried out; failed invariants are
/// in the report (`Report::passed`).
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    if options.urls.is_empty() || options.stock == 0 || options.buyers == 0 {
        bail!("the benchmark needs at least one URL, one unit of stock and one buyer");
    }
    let endpoints: Arc<[Endpoint]> = options
        .urls
        .iter()
        .map(|url| Endpoint::parse(url))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into();
    let concurrency = options.concurrency.max(1);
    let db = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&options.database_url)
        .await
        .context("connecting to the benchmark's database")?;
    let postgres: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&db)
        .await?;
    let machine = Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu: report::cpu_model(),
        postgres: postgres
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
        load_before: report::load_average(),
        load_after: String::new(),
    };
    say(format!(
        "bench: {} instance(s) {:?}, C={concurrency}, S={}, B={}; {} cores, {}, load average {}",
        endpoints.len(),
        options.urls,
        options.stock,
        options.buyers,
        machine.cores,
        machine.postgres,
        machine.load_before
    ));

    let hot_row = match &options.hot_row {
        HotRowBaseline::Skip => None,
        HotRowBaseline::Measured(hot) => Some(hot.clone()),
        HotRowBaseline::Measure => Some(measure_hot_row(options).await?),
    };

    say(format!(
        "[setup] admin, product, {} buyers with one unit in the cart each",
        options.buyers
    ));
    let setup_started = Instant::now();
    let mut admin = Worker::new(endpoints.clone());
    let admin_token = login(&mut admin, &options.admin_email, &options.admin_password).await?;
    let (slug, variant_id) = create_product(&mut admin, &admin_token, options).await?;
    let tokens = buyers_with_carts(options, &endpoints, variant_id).await?;
    let setup = setup_started.elapsed();
    say(format!(
        "[setup] done in {:.1} s ({:.0} buyers/s)",
        setup.as_secs_f64(),
        options.buyers as f64 / setup.as_secs_f64()
    ));

    // The sale starts from a quiet server: the setup's carts are projected
    // first, so that the sale does not pay for them.
    let settled = Instant::now();
    projections_caught_up(&db, options.phase_timeout).await?;
    say(format!(
        "[setup] projections caught up in {:.1} s",
        settled.elapsed().as_secs_f64()
    ));

    let before = DbCounters::read(&db).await?;
    say(format!(
        "[checkout] {} checkouts at C={concurrency}",
        options.buyers
    ));
    let (stop_sampling, sampling) = tokio::sync::watch::channel(false);
    let lag = tokio::spawn(projection_lag(db.clone(), sampling.clone()));
    let cpu = tokio::spawn(CpuSamples::collect(sampling));
    let checkout = sell(options, &endpoints, &tokens).await;
    let _ = stop_sampling.send(true);
    let lag = lag.await?;
    let cpu = cpu.await?;
    let checkout = checkout?;
    let backends = serial_stage_backends(&db).await?;
    say(format!(
        "[checkout] {} answers/s, {} successful/s; {}",
        checkout.all_per_second().round(),
        checkout.successful_per_second().round(),
        checkout.run.status_line()
    ));
    // Backends publish their statistics at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = DbCounters::read(&db).await?;
    let mut diagnostics = before.compare(&after, options.buyers, checkout.successful);
    diagnostics.extend(event_diagnostics(&db, before.last_position, &checkout).await?);
    diagnostics.extend(lag);
    if let Some(split) = cpu.split_until(checkout.sell_out) {
        diagnostics.extend(cpu_lines(&split, &checkout, &backends));
    }

    say("[invariants]");
    let admin_token = login(&mut admin, &options.admin_email, &options.admin_password).await?;
    let checks = invariants(options, &mut admin, &admin_token, variant_id, &checkout).await?;
    for check in &checks {
        let verdict = if check.passed { "PASS" } else { "FAIL" };
        say(format!("  {verdict}  {}: {}", check.name, check.detail));
    }

    let reads = if options.read_requests > 0 {
        Some(reads(options, &endpoints, &slug, &tokens, &checkout).await?)
    } else {
        None
    };

    let search = match &options.search {
        Some(search_options) => Some(search(options, search_options, &endpoints, &db).await?),
        None => None,
    };
    db.close().await;

    let mut machine = machine;
    machine.load_after = report::load_average();
    Ok(Report {
        instances: endpoints.len(),
        concurrency,
        stock: options.stock,
        buyers: options.buyers,
        machine,
        setup,
        hot_row,
        checkout,
        checks,
        reads,
        search,
        diagnostics,
    })
}

/// The hot-row SQL baseline at C, printed as it finishes.
pub async fn measure_hot_row(options: &Options) -> anyhow::Result<HotRow> {
    say(format!(
        "[hot row] UPDATE ... reserved + 1 on one row of {} units from {} connections, {HOT_ROW_RUNS} runs",
        options.stock, options.concurrency
    ));
    let mut runs = Vec::with_capacity(HOT_ROW_RUNS);
    for _ in 0..HOT_ROW_RUNS {
        // How much of the machine was left idle or taken by the hypervisor,
        // so that a run slowed by something else shows as such. (Not who
        // used the rest: the run's own backends end with it, and the time
        // of a process that has ended is no longer in /proc.)
        let (stop_sampling, sampling) = tokio::sync::watch::channel(false);
        let cpu = tokio::spawn(CpuSamples::collect(sampling));
        let hot = baseline::hot_row(
            &options.database_url,
            options.stock,
            options.concurrency.max(1),
            options.phase_timeout,
        )
        .await;
        let _ = stop_sampling.send(true);
        let cpu = cpu.await?;
        let hot = hot.context("hot-row baseline")?;
        let machine = cpu
            .split_until(Duration::MAX)
            .map(|split| {
                format!(
                    "; idle {:.0}%, stolen by the hypervisor {:.0}% of the machine's time",
                    split.idle * 100.0,
                    split.stolen * 100.0
                )
            })
            .unwrap_or_default();
        say(format!(
            "[hot row] {} connections, {} updates/s, {}{machine}",
            hot.concurrency,
            hot.per_second().round(),
            hot.latencies.line()
        ));
        runs.push(hot);
    }
    HotRow::median_of(runs).context("the hot row did not run")
}

async fn login(worker: &mut Worker, email: &str, password: &str) -> anyhow::Result<String> {
    let answer = worker
        .send(
            0,
            &Call::post(
                "/api/v1/auth/login",
                &json!({ "email": email, "password": password }),
            ),
        )
        .await?;
    let body = answer.expect(200, "signing in as the admin")?;
    text(&body["access_token"], "access_token")
}

fn text(value: &Value, what: &str) -> anyhow::Result<String> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{what} missing in {value}"))
}

/// The product on sale: one variant of S units. Returns its slug and the
/// variant's id.
async fn create_product(
    admin: &mut Worker,
    token: &str,
    options: &Options,
) -> anyhow::Result<(String, Uuid)> {
    let sku = format!("BENCH-{}", options.run_id);
    let body = json!({
        "name": format!("Flash sale sneaker {}", options.run_id),
        "description": "One limited drop, everybody at once.",
        "status": "active",
        "variants": [{
            "sku": sku, "title": "EU 42", "price_cents": 1999, "currency": "USD",
            "initial_stock": options.stock
        }]
    });
    let answer = admin
        .send(
            0,
            &Call::post("/api/v1/products/create-product", &body).bearer(token),
        )
        .await?;
    let product = answer.expect(201, "creating the product")?;
    let slug = text(&product["slug"], "slug")?;
    let variant_id = text(&product["variants"][0]["id"], "variant id")?.parse()?;
    Ok((slug, variant_id))
}

/// Registers B buyers and puts one unit in each one's cart, C at a time;
/// returns their access tokens.
async fn buyers_with_carts(
    options: &Options,
    endpoints: &Arc<[Endpoint]>,
    variant_id: Uuid,
) -> anyhow::Result<Arc<[String]>> {
    let slots: Arc<[OnceLock<String>]> = (0..options.buyers).map(|_| OnceLock::new()).collect();
    let run_id = Arc::<str>::from(options.run_id.as_str());
    let filled = slots.clone();
    let setup = drive(
        options.buyers,
        options.concurrency,
        endpoints,
        options.phase_timeout,
        job(move |index, worker| {
            let slots = filled.clone();
            let run_id = run_id.clone();
            Box::pin(async move {
                let email = format!("buyer-{index}-{run_id}@example.com");
                let registration = json!({
                    "email": email, "password": BUYER_PASSWORD, "name": format!("Buyer {index}"),
                });
                let mut signed_in = worker
                    .send_repeatable(index, &Call::post("/api/v1/auth/register", &registration))
                    .await?;
                if signed_in.status == 409 {
                    // A repeated registration whose first attempt got through.
                    let login = json!({ "email": email, "password": BUYER_PASSWORD });
                    signed_in = worker
                        .send_repeatable(index, &Call::post("/api/v1/auth/login", &login))
                        .await?;
                }
                if !matches!(signed_in.status, 200 | 201) {
                    return Ok(signed_in);
                }
                let token = text(&signed_in.json()?["access_token"], "access_token")?;
                // Setting the quantity (not adding to it) is safe to repeat.
                let added = worker
                    .send_repeatable(
                        index,
                        &Call::put(
                            format!("/api/v1/cart/update-item/{variant_id}"),
                            &json!({ "quantity": 1 }),
                        )
                        .bearer(&token),
                    )
                    .await?;
                if added.status == 200 {
                    let _ = slots[index].set(token);
                }
                Ok(added)
            })
        }),
    )
    .await?;
    let ready = slots.iter().filter(|slot| slot.get().is_some()).count();
    if ready != options.buyers {
        let failures: Vec<String> = setup
            .outcomes()
            .into_iter()
            .filter(|((status, _), _)| *status != 200)
            .map(|((status, code), count)| format!("{status} {code} ×{count}"))
            .collect();
        bail!(
            "setup incomplete: {ready} of {} buyers have a cart ({}; not sent: {})",
            options.buyers,
            failures.join(", "),
            setup.not_sent
        );
    }
    Ok(slots
        .iter()
        .map(|slot| slot.get().cloned().unwrap_or_default())
        .collect())
}

/// The sale: every buyer checks out once, round robin over the instances.
async fn sell(
    options: &Options,
    endpoints: &Arc<[Endpoint]>,
    tokens: &Arc<[String]>,
) -> anyhow::Result<Checkout> {
    let tokens_for_job = tokens.clone();
    let run_id = Arc::<str>::from(options.run_id.as_str());
    let run = drive(
        options.buyers,
        options.concurrency,
        endpoints,
        options.phase_timeout,
        job(move |index, worker| {
            let token = tokens_for_job[index].clone();
            let key = format!("bench-{run_id}-{index}");
            Box::pin(async move {
                let call = Call::post("/api/v1/checkout/", &json!({}))
                    .bearer(&token)
                    .idempotency_key(key);
                worker.send(index, &call).await
            })
        }),
    )
    .await?;
    let successful = run.count(201);
    let sell_out = run
        .samples
        .iter()
        .filter(|sample| sample.status == 201)
        .map(|sample| sample.finished)
        .max()
        .unwrap_or_default();
    let mut per_instance = vec![0; endpoints.len()];
    for sample in &run.samples {
        per_instance[sample.index % endpoints.len()] += 1;
    }
    Ok(Checkout {
        run,
        successful,
        sell_out,
        per_instance,
    })
}

/// Stock as an admin sees it: (on_hand, reserved, available).
fn counts(body: &Value) -> Option<(i64, i64, i64)> {
    Some((
        body["on_hand"].as_i64()?,
        body["reserved"].as_i64()?,
        body["available"].as_i64()?,
    ))
}

async fn invariants(
    options: &Options,
    admin: &mut Worker,
    token: &str,
    variant_id: Uuid,
    checkout: &Checkout,
) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let stock = i64::from(options.stock);
    let sold = checkout.successful as i64;
    let expected = stock.min(options.buyers as i64);
    checks.push(Check::new(
        "201s == min(S, B)",
        sold == expected,
        format!("{sold} == min({stock}, {})", options.buyers),
    ));

    let others = checkout.run.samples.len() - checkout.successful;
    let unexpected: Vec<String> = checkout
        .run
        .outcomes()
        .into_iter()
        .filter(|((status, code), _)| {
            *status != 201 && !(*status == 409 && code == "insufficient_stock")
        })
        .map(|((status, code), count)| format!("{status} {code} ×{count}"))
        .collect();
    checks.push(Check::new(
        "every other answer is 409 insufficient_stock",
        unexpected.is_empty() && checkout.run.not_sent == 0,
        if unexpected.is_empty() && checkout.run.not_sent == 0 {
            format!("{others} of {others}")
        } else {
            format!(
                "unexpected: {}; not sent: {}",
                unexpected.join(", "),
                checkout.run.not_sent
            )
        },
    ));

    // The read model catches up after the answers: poll briefly.
    let path = format!("/api/v1/stock/get-stock-level/{variant_id}");
    let started = Instant::now();
    let level = loop {
        let body = admin
            .send(0, &Call::get(&path).bearer(token))
            .await?
            .expect(200, "get-stock-level")?;
        let level =
            counts(&body).ok_or_else(|| anyhow!("admin stock level lacks counts: {body}"))?;
        if level.1 == sold || started.elapsed() > CATCH_UP_TIMEOUT {
            break level;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (on_hand, reserved, available) = level;
    checks.push(Check::new(
        "on_hand == S",
        on_hand == stock,
        format!("{on_hand} == {stock}"),
    ));
    checks.push(Check::new(
        "reserved == 201s",
        reserved == sold,
        format!("{reserved} == {sold}"),
    ));
    checks.push(Check::new(
        "available == S - reserved",
        available == stock - reserved,
        format!("{available} == {stock} - {reserved}"),
    ));
    checks.push(Check::new(
        "on_hand == available + reserved, no oversell",
        on_hand == available + reserved && reserved <= on_hand && available >= 0,
        format!("{on_hand} == {available} + {reserved}"),
    ));

    let audit = admin
        .send(
            0,
            &Call::get(format!("/api/v1/audit/inventory/{variant_id}")).bearer(token),
        )
        .await?
        .expect(200, "audit/inventory")?;
    let from_events = counts(&audit).ok_or_else(|| anyhow!("audit lacks counts: {audit}"))?;
    checks.push(Check::new(
        "the events say the same (audit/inventory)",
        from_events == level,
        format!("events (on_hand, reserved, available) = {from_events:?}, read model = {level:?}"),
    ));

    let report = admin
        .send(
            0,
            // The sale's variant: all of a 100,000-product catalog takes minutes.
            &Call::post(
                "/api/v1/stock/sync-reserved-stock",
                &json!({ "variant_id": variant_id }),
            )
            .bearer(token),
        )
        .await?
        .expect(200, "sync-reserved-stock")?;
    let corrected = report["corrected"].as_array().map_or(usize::MAX, Vec::len);
    checks.push(Check::new(
        "sync-reserved-stock corrects nothing",
        corrected == 0,
        format!(
            "checked {}, corrected {}",
            report["checked"], report["corrected"]
        ),
    ));
    Ok(checks)
}

async fn reads(
    options: &Options,
    endpoints: &Arc<[Endpoint]>,
    slug: &str,
    tokens: &Arc<[String]>,
    checkout: &Checkout,
) -> anyhow::Result<Reads> {
    let requests = options.read_requests;
    let healthz = repeating([Call::get("/healthz")].into());

    let product_path: Arc<str> = format!("/api/v1/products/get-product/{slug}").into();
    let mut warm = Worker::new(endpoints.clone());
    for instance in 0..endpoints.len() {
        warm.send(instance, &Call::get(&*product_path))
            .await?
            .expect(200, "warming the product cache")?;
    }
    let product = repeating([Call::get(&*product_path)].into());

    // Buyers who lost the sale still have their unit in the cart; the
    // winners' carts are empty. Prefer the fuller carts.
    let mut readers: Vec<usize> = checkout
        .run
        .samples
        .iter()
        .filter(|sample| sample.status == 409)
        .map(|sample| sample.index)
        .take(MAX_CART_READERS)
        .collect();
    if readers.is_empty() {
        readers = (0..tokens.len().min(MAX_CART_READERS)).collect();
    }
    let reader_tokens: Arc<[String]> = readers.iter().map(|i| tokens[*i].clone()).collect();
    for (number, token) in reader_tokens.iter().enumerate() {
        warm.send(number, &Call::get("/api/v1/cart/get-cart").bearer(token))
            .await?
            .expect(200, "warming the cart cache")?;
    }
    let cart = repeating(
        reader_tokens
            .iter()
            .map(|token| Call::get("/api/v1/cart/get-cart").bearer(token))
            .collect(),
    );

    say(format!(
        "[reads] GET /healthz, {product_path}, /api/v1/cart/get-cart ({} buyers): \
         ×{requests} each, taken in {READ_ROUNDS} alternating rounds",
        reader_tokens.len()
    ));
    let [healthz, product, cart] = alternate([healthz, product, cart], options, endpoints).await?;
    Ok(Reads {
        healthz,
        product,
        cart,
        cart_readers: reader_tokens.len(),
    })
}

/// A job that sends job `i` the call `calls[i % calls.len()]`, built once
/// for every time it is sent.
fn repeating(calls: Arc<[Call]>) -> Job {
    job(move |index, worker| {
        let calls = calls.clone();
        Box::pin(async move {
            let call = calls
                .get(index % calls.len().max(1))
                .ok_or_else(|| anyhow!("no request to send"))?;
            worker.send(index, call).await
        })
    })
}

/// Runs `options.read_requests` of each job, in `READ_ROUNDS` rounds that
/// take the jobs in turn, so that whatever else the machine does meanwhile
/// (autovacuum after the sale, say) weighs on each figure alike; the
/// ratios between them are the point.
async fn alternate<const N: usize>(
    jobs: [Job; N],
    options: &Options,
    endpoints: &Arc<[Endpoint]>,
) -> anyhow::Result<[Run; N]> {
    let mut rounds: [Vec<Run>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..READ_ROUNDS {
        let count = share(options.read_requests, READ_ROUNDS, round);
        for (job, runs) in jobs.iter().zip(rounds.iter_mut()) {
            let run = drive(
                count,
                options.concurrency,
                endpoints,
                options.phase_timeout,
                job.clone(),
            )
            .await?;
            runs.push(run);
        }
    }
    Ok(rounds.map(Run::combine))
}

/// Round `round`'s part of `total` split into `rounds` parts.
fn share(total: usize, rounds: usize, round: usize) -> usize {
    total / rounds + usize::from(round < total % rounds)
}

async fn search(
    options: &Options,
    search: &super::SearchOptions,
    endpoints: &Arc<[Endpoint]>,
    db: &PgPool,
) -> anyhow::Result<Search> {
    let mut products = active_products(db).await?;
    let mut seeded = None;
    if (products as usize) < search.products {
        let commerce = options.commerce.as_ref().ok_or_else(|| {
            anyhow!(
                "the catalog has {products} products, search needs {}: run `commerce seed-demo --products {}` first",
                search.products,
                search.products
            )
        })?;
        say(format!(
            "[search] seeding the catalog: commerce seed-demo --products {}",
            search.products
        ));
        let started = Instant::now();
        let output = commerce
            .run(
                &["seed-demo", "--products", &search.products.to_string()],
                search.seed_timeout,
            )
            .await?;
        seeded = Some(started.elapsed());
        say(format!("[search] {}", output.trim()));
        products = active_products(db).await?;
    }

    let path: Arc<str> = format!(
        "/api/v1/products/get-products?q={}",
        form_urlencoded::byte_serialize(search.query.as_bytes()).collect::<String>()
    )
    .into();
    let mut warm = Worker::new(endpoints.clone());
    for instance in 0..endpoints.len() {
        let listing = warm
            .send(instance, &Call::get(&*path))
            .await?
            .expect(200, "the first search")?;
        if listing["items"].as_array().map_or(0, Vec::len) == 0 {
            bail!(
                "the search {:?} finds nothing: pick another --search-query",
                search.query
            );
        }
    }
    say(format!(
        "[search] GET {path} ×{} (page of {SEARCH_PAGE_SIZE}, {products} products)",
        search.requests
    ));
    let http = drive(
        search.requests,
        options.concurrency,
        endpoints,
        options.phase_timeout,
        repeating([Call::get(&*path)].into()),
    )
    .await?;
    say(format!(
        "[search] the same statements in SQL ×{}",
        search.requests
    ));
    let sql = baseline::sql_search(
        &options.database_url,
        &search.query,
        search.requests,
        options.concurrency,
        options.phase_timeout,
    )
    .await?;
    Ok(Search {
        query: search.query.clone(),
        products: products as u64,
        http,
        sql,
        seeded,
    })
}

/// Waits until every projection has applied every event stored so far.
async fn projections_caught_up(db: &PgPool, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection_checkpoints \
             WHERE (last_txid, last_position) < \
                   (SELECT txid, position FROM events ORDER BY txid DESC, position DESC LIMIT 1)",
        )
        .fetch_one(db)
        .await?;
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{behind} projection(s) still behind the setup's events after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples, during the sale, how far each projection is behind the newest
/// event; returns one line per projection (max and mean, in events).
async fn projection_lag(db: PgPool, mut stop: tokio::sync::watch::Receiver<bool>) -> Vec<String> {
    let mut samples: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    // Bounded by the sale, which is bounded by the phase timeout.
    while !*stop.borrow() {
        let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as(
            "SELECT name, greatest((SELECT coalesce(max(position), 0) FROM events) - last_position, 0) \
             FROM projection_checkpoints ORDER BY name",
        )
        .fetch_all(&db)
        .await;
        for (name, behind) in rows.unwrap_or_default() {
            samples.entry(name).or_default().push(behind);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => {}
        }
    }
    let lines: Vec<String> = samples
        .into_iter()
        .filter(|(_, behind)| behind.iter().any(|b| *b > 0))
        .map(|(name, behind)| {
            let max = behind.iter().max().copied().unwrap_or(0);
            let mean = behind.iter().sum::<i64>() as f64 / behind.len().max(1) as f64;
            format!("{name}: mean {mean:.1}, max {max}")
        })
        .collect();
    if lines.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "projections behind the newest event during the sale (events, sampled every 50 ms): {}",
        lines.join("; ")
    )]
}

async fn active_products(db: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM catalog_products WHERE status = 'active' AND NOT deleted",
    )
    .fetch_one(db)
    .await
}

/// Database-wide counters around the sale, to see what a checkout costs.
struct DbCounters {
    transactions: i64,
    inserted: i64,
    updated: i64,
    last_position: i64,
}

impl DbCounters {
    async fn read(db: &PgPool) -> anyhow::Result<Self> {
        let (transactions, inserted, updated): (i64, i64, i64) = sqlx::query_as(
            "SELECT xact_commit + xact_rollback, tup_inserted, tup_updated \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(db)
        .await?;
        let last_position: i64 =
            sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
                .fetch_one(db)
                .await?;
        Ok(Self {
            transactions,
            inserted,
            updated,
            last_position,
        })
    }

    fn compare(&self, after: &Self, answers: usize, sold: usize) -> Vec<String> {
        let per = |value: i64| value as f64 / answers.max(1) as f64;
        vec![format!(
            "Postgres during the sale (whole database, ≈): {} transactions, {} rows inserted, {} updated \
             for {answers} checkouts ({sold} sold) = {:.1} transactions, {:.1} inserts, {:.1} updates per checkout",
            after.transactions - self.transactions,
            after.inserted - self.inserted,
            after.updated - self.updated,
            per(after.transactions - self.transactions),
            per(after.inserted - self.inserted),
            per(after.updated - self.updated),
        )]
    }
}

/// Events written during the sale, and how many went into each commit
/// (the group commit on the hot item).
async fn event_diagnostics(
    db: &PgPool,
    after_position: i64,
    checkout: &Checkout,
) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT aggregate_type, count(*), count(DISTINCT txid) FROM events \
         WHERE position > $1 GROUP BY aggregate_type ORDER BY aggregate_type",
    )
    .bind(after_position)
    .fetch_all(db)
    .await?;
    let mut lines = Vec::new();
    for (aggregate_type, events, transactions) in rows {
        lines.push(format!(
            "{aggregate_type}: {events} events in {transactions} transactions ({:.1} per commit)",
            events as f64 / transactions.max(1) as f64
        ));
    }
    let created = checkout.latencies_created();
    let refused = checkout.latencies_refused();
    lines.push(format!(
        "a 201 takes p50 {} vs p50 {} for a refusal: refusals come after the sell-out, when batches store nothing and the machine has less to do",
        super::load::ms(created.p50),
        super::load::ms(refused.p50)
    ));
    Ok(lines)
}

/// Where the machine's CPU time went until the sell-out: shares of it, and
/// CPU time per successful checkout (the figure that moves least between
/// runs of one build).
fn cpu_lines(split: &CpuSplit, checkout: &Checkout, backends: &[(u32, String)]) -> Vec<String> {
    let mut lines = vec![format!(
        "CPU until the sell-out (/proc, sampled every 50 ms): {split} of the machine's time"
    )];
    if let Some(micros) = split.micros_per(checkout.successful, checkout.sell_out) {
        let per: Vec<String> = Group::ALL
            .iter()
            .zip(micros)
            .map(|(group, micros)| format!("{} {micros:.0} µs", group.label()))
            .collect();
        lines.push(format!(
            "CPU per successful checkout until the sell-out: {} (total {:.0} µs)",
            per.join(", "),
            micros.iter().sum::<f64>()
        ));
    }
    // Servers that do not name their connections (older releases, with
    // `--url`) leave nothing to split: the line would repeat Postgres's.
    let by_role = split
        .postgres_micros_by_role(
            backends,
            "other Postgres processes",
            checkout.successful,
            checkout.sell_out,
        )
        .filter(|_| !backends.is_empty());
    if let Some(by_role) = by_role {
        let per: Vec<String> = by_role
            .iter()
            .map(|(role, micros)| format!("{role} {micros:.0} µs"))
            .collect();
        lines.push(format!(
            "Postgres per successful checkout, by connection: {}",
            per.join(", ")
        ));
    }
    lines
}

/// The backends of the servers' serial stages (the checkout committers and
/// the idempotency key writers, told apart by `application_name`), by pid.
async fn serial_stage_backends(db: &PgPool) -> anyhow::Result<Vec<(u32, String)>> {
    use crate::db::application_names::{CHECKOUT_COMMITTER, IDEMPOTENCY_KEYS};
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT pid, application_name FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = ANY($1) \
         ORDER BY array_position($1, application_name), pid",
    )
    .bind(&[CHECKOUT_COMMITTER, IDEMPOTENCY_KEYS][..])
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(pid, name)| Some((u32::try_from(pid).ok()?, name)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn rounds_share_the_requests_without_losing_any() {
        for (total, rounds) in [(20_000, 5), (7, 5), (3, 5), (0, 5), (100_001, 5)] {
            let parts: Vec<usize> = (0..rounds).map(|r| share(total, rounds, r)).collect();
            assert_eq!(parts.iter().sum::<usize>(), total, "{total} in {rounds}");
            let (min, max) = (parts.iter().min().unwrap(), parts.iter().max().unwrap());
            assert!(max - min <= 1, "{parts:?}");
        }
    }
}
