//! Products: admin writes, the public product page, listings and search,
//! the versioned cache (coherence, flushes, Redis down), uniqueness under
//! concurrency, and `seed-demo`.

use std::time::Duration;

use projections::cache::VersionedCache;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    new_client, problem, spawn_app, spawn_app_with, spawn_instance_like, OwnRedis, TestApp,
};
use crate::users::TestUser;

// ---------------------------------------------------------------- helpers

pub async fn send_as(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> Response {
    let mut request = new_client()
        .request(method, app.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.expect("request sent")
}

/// A product body with one variant per `(sku, price_cents)`.
pub fn product_body(name: &str, variants: &[(&str, i64)]) -> Value {
    let variants: Vec<Value> = variants
        .iter()
        .map(|(sku, price)| {
            json!({"sku": sku, "title": format!("Size {sku}"), "price_cents": price,
                   "currency": "USD", "attributes": {"size": sku}, "initial_stock": 5})
        })
        .collect();
    json!({"name": name, "description": format!("All about the {name}."), "variants": variants})
}

pub async fn create_product(app: &TestApp, admin: &TestUser, body: &Value) -> Value {
    let response = send_as(
        app,
        Method::POST,
        "/api/v1/products/create-product",
        &admin.access_token,
        Some(body),
    )
    .await;
    assert_eq!(response.status(), 201, "creating {body}");
    response.json().await.expect("product JSON")
}

pub async fn update_product(app: &TestApp, admin: &TestUser, id: &str, body: &Value) -> Response {
    let path = format!("/api/v1/products/update-product/{id}");
    send_as(app, Method::PUT, &path, &admin.access_token, Some(body)).await
}

pub fn unique_sku() -> String {
    format!("SKU-{}", &Uuid::new_v4().simple().to_string()[..12])
}

async fn get_json(client: &reqwest::Client, url: String) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn listing(app: &TestApp, query: &str) -> Value {
    let response = app
        .get(&format!("/api/v1/products/get-products?{query}"))
        .await;
    assert_eq!(response.status(), 200, "listing {query}");
    response.json().await.expect("listing JSON")
}

fn names(listing: &Value) -> Vec<String> {
    listing["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["name"].as_str().expect("name").to_owned())
        .collect()
}

/// Deletes this test's keys only (other tests share the Redis).
async fn flush_test_keys(app: &TestApp) {
    let Some(mut connection) = app.state.redis.connection() else {
        return;
    };
    let pattern = format!("{}*", app.settings.redis_key_prefix);
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await
            .expect("SCAN works");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .expect("DEL works");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

// ------------------------------------------------------- create and read

#[tokio::test]
async fn creating_a_product_answers_its_detail_and_publishes_it() {
    // Arrange
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let (small, large) = (unique_sku(), unique_sku());
    let body = json!({
        "name": "Red Shoe!", "description": "A shoe in red.",
        "variants": [
            {"sku": small, "title": "Small", "price_cents": 1999, "currency": "usd", "initial_stock": 3},
            {"sku": large, "title": "Large", "price_cents": 2199, "currency": "USD", "attributes": {"size": "L"}},
        ]
    });

    // Act
    let created = create_product(&app, &admin, &body).await;
    let (status, public) = get_json(
        &new_client(),
        app.url("/api/v1/products/get-product/red-shoe"),
    )
    .await;

    // Assert
    assert_eq!(created["slug"], "red-shoe");
    assert_eq!(created["status"], "active");
    assert_eq!(created["category"], Value::Null);
    assert_eq!(created["variants"][0]["currency"], "USD");
    assert_eq!(
        created["variants"][0]["stock"],
        json!({"available": 3, "in_stock": true})
    );
    assert_eq!(
        created["variants"][1]["stock"],
        json!({"available": 0, "in_stock": false})
    );
    assert_eq!(created["variants"][1]["attributes"], json!({"size": "L"}));
    assert!(created["created_at"].is_string() && created["updated_at"].is_string());
    assert_eq!(status, 200);
    assert_eq!(public, created);
}

#[tokio::test]
async fn a_second_product_with_the_same_name_gets_a_suffixed_slug() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;

    let first = create_product(
        &app,
        &admin,
        &product_body("Blue Hat", &[(&unique_sku(), 500)]),
    )
    .await;
    let second = create_product(
        &app,
        &admin,
        &product_body("Blue Hat", &[(&unique_sku(), 600)]),
    )
    .await;
    let third = create_product(
        &app,
        &admin,
        &product_body("Blue Hat", &[(&unique_sku(), 700)]),
    )
    .await;

    assert_eq!(first["slug"], "blue-hat");
    assert_eq!(second["slug"], "blue-hat-2");
    assert_eq!(third["slug"], "blue-hat-3");
}

#[tokio::test]
async fn a_taken_slug_or_sku_is_a_409_naming_the_field() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let sku = unique_sku();
    let mut body = product_body("Green Scarf", &[(&sku, 900)]);
    body["slug"] = json!("green-scarf");
    create_product(&app, &admin, &body).await;

    let mut same_slug = product_body("Other Scarf", &[(&unique_sku(), 900)]);
    same_slug["slug"] = json!("green-scarf");
    let slug_clash = send_as(
        &app,
        Method::POST,
        "/api/v1/products/create-product",
        &admin.access_token,
        Some(&same_slug),
    )
    .await;
    let sku_clash = send_as(
        &app,
        Method::POST,
        "/api/v1/products/create-product",
        &admin.access_token,
        Some(&product_body(
            "Third Scarf",
            &[(&unique_sku(), 1), (&sku, 2)],
        )),
    )
    .await;

    let slug_problem = problem(slug_clash, 409, "conflict").await;
    assert!(
        slug_problem["detail"].as_str().unwrap().starts_with("slug"),
        "{slug_problem}"
    );
    let sku_problem = problem(sku_clash, 409, "conflict").await;
    assert!(
        sku_problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("variants[1].sku"),
        "{sku_problem}"
    );
    // The refused request's other claims were given back: its name is free.
    let retry = create_product(
        &app,
        &admin,
        &product_body("Third Scarf", &[(&unique_sku(), 1)]),
    )
    .await;
    assert_eq!(retry["slug"], "third-scarf");
}

#[tokio::test]
async fn create_product_reports_every_bad_field_at_once() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let body = json!({
        "name": "  ", "status": "published", "slug": "Not A Slug",
        "variants": [
            {"sku": "bad sku", "title": "", "price_cents": -1, "currency": "US"},
            {"title": "ok", "price_cents": 5, "currency": "EUR", "initial_stock": -3},
            {"sku": "DEAR-1", "title": "dear", "price_cents": 10_000_000_001_i64, "currency": "EUR"},
        ]
    });

    let response = send_as(
        &app,
        Method::POST,
        "/api/v1/products/create-product",
        &admin.access_token,
        Some(&body),
    )
    .await;

    let body = problem(response, 422, "validation_failed").await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for field in [
        "name",
        "slug",
        "status",
        "variants[0].sku",
        "variants[0].title",
        "variants[0].currency",
        "variants[0].price_cents",
        "variants[1].sku",
        "variants[1].initial_stock",
        "variants[2].price_cents",
    ] {
        assert!(fields.contains(&field), "{field} missing from {fields:?}");
    }
}

#[tokio::test]
async fn create_product_refuses_malformed_and_incomplete_requests() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let path = "/api/v1/products/create-product";

    let malformed = new_client()
        .post(app.url(path))
        .bearer_auth(&admin.access_token)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    let wrong_type = new_client()
        .post(app.url(path))
        .bearer_auth(&admin.access_token)
        .body("name=x")
        .send()
        .await
        .unwrap();
    let no_variants = send_as(
        &app,
        Method::POST,
        path,
        &admin.access_token,
        Some(&json!({"name": "Lonely"})),
    )
    .await;
    let mut unknown_category = product_body("Filed Nowhere", &[(&unique_sku(), 100)]);
    unknown_category["category_id"] = json!(Uuid::new_v4());
    let unknown_category = send_as(
        &app,
        Method::POST,
        path,
        &admin.access_token,
        Some(&unknown_category),
    )
    .await;
    let mixed = json!({"name": "Mixed", "variants": [
        {"sku": unique_sku(), "title": "a", "price_cents": 1, "currency": "USD"},
        {"sku": unique_sku(), "title": "b", "price_cents": 1, "currency": "EUR"}]});
    let mixed = send_as(&app, Method::POST, path, &admin.access_token, Some(&mixed)).await;
    let customer = TestUser::register_customer(&app).await;
    let as_customer = send_as(
        &app,
        Method::POST,
        path,
        &customer.access_token,
        Some(&json!({})),
    )
    .await;

    problem(malformed, 400, "validation_failed").await;
    problem(wrong_type, 400, "validation_failed").await;
    let body = problem(no_variants, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "variants");
    let body = problem(unknown_category, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "category_id");
    let body = problem(mixed, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "variants[1].currency");
    problem(as_customer, 403, "forbidden").await;
}

// ---------------------------------------------------------- update/delete

#[tokio::test]
async fn updating_a_product_keeps_its_slug_unless_a_new_one_is_given() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let sku = unique_sku();
    let product = create_product(&app, &admin, &product_body("Wool Sock", &[(&sku, 800)])).await;
    let id = product["id"].as_str().unwrap();
    let variant_id = product["variants"][0]["id"].as_str().unwrap();

    // Rename, reprice the variant, add one.
    let new_sku = unique_sku();
    let renamed = update_product(
        &app,
        &admin,
        id,
        &json!({
            "name": "Merino Sock", "description": "Soft merino wool.",
            "variants": [
                {"id": variant_id, "price_cents": 950},
                {"sku": new_sku, "title": "Long", "price_cents": 1200, "initial_stock": 4},
            ]
        }),
    )
    .await;
    assert_eq!(renamed.status(), 200);
    let renamed: Value = renamed.json().await.unwrap();
    assert_eq!(renamed["name"], "Merino Sock");
    assert_eq!(renamed["slug"], "wool-sock");
    assert_eq!(renamed["variants"][0]["price_cents"], 950);
    assert_eq!(renamed["variants"][1]["sku"], new_sku.as_str());
    assert_eq!(renamed["variants"][1]["stock"]["available"], 4);
    let (status, page) = get_json(
        &new_client(),
        app.url("/api/v1/products/get-product/wool-sock"),
    )
    .await;
    assert_eq!((status, page["name"].as_str()), (200, Some("Merino Sock")));

    // A new slug: the old one stops answering.
    let moved = update_product(&app, &admin, id, &json!({"slug": "merino-sock"})).await;
    assert_eq!(moved.status(), 200);
    let (old, _) = get_json(
        &new_client(),
        app.url("/api/v1/products/get-product/wool-sock"),
    )
    .await;
    let (new, _) = get_json(
        &new_client(),
        app.url("/api/v1/products/get-product/merino-sock"),
    )
    .await;
    assert_eq!((old, new), (404, 200));
}

#[tokio::test]
async fn update_product_refuses_bad_input() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let sku = unique_sku();
    let product = create_product(&app, &admin, &product_body("Cotton Tee", &[(&sku, 800)])).await;
    let id = product["id"].as_str().unwrap();
    let variant_id = product["variants"][0]["id"].as_str().unwrap();
    let other = create_product(
        &app,
        &admin,
        &product_body("Linen Tee", &[(&unique_sku(), 800)]),
    )
    .await;

    let empty_name = update_product(&app, &admin, id, &json!({"name": ""})).await;
    let negative = update_product(
        &app,
        &admin,
        id,
        &json!({"variants": [{"id": variant_id, "price_cents": -5}]}),
    )
    .await;
    let too_dear = update_product(
        &app,
        &admin,
        id,
        &json!({"variants": [{"id": variant_id, "price_cents": i64::MAX}]}),
    )
    .await;
    let sku_change = update_product(
        &app,
        &admin,
        id,
        &json!({"variants": [{"id": variant_id, "sku": unique_sku()}]}),
    )
    .await;
    let unknown_variant = update_product(
        &app,
        &admin,
        id,
        &json!({"variants": [{"id": Uuid::new_v4(), "title": "x"}]}),
    )
    .await;
    let taken_slug = update_product(&app, &admin, id, &json!({"slug": other["slug"]})).await;
    let unknown = update_product(
        &app,
        &admin,
        &Uuid::new_v4().to_string(),
        &json!({"name": "Ghost"}),
    )
    .await;
    let malformed = update_product(&app, &admin, "not-a-uuid", &json!({"name": "Ghost"})).await;

    assert_eq!(
        problem(empty_name, 422, "validation_failed").await["errors"][0]["field"],
        "name"
    );
    assert_eq!(
        problem(negative, 422, "validation_failed").await["errors"][0]["field"],
        "variants[0].price_cents"
    );
    assert_eq!(
        problem(too_dear, 422, "validation_failed").await["errors"][0]["field"],
        "variants[0].price_cents"
    );
    assert_eq!(
        problem(sku_change, 422, "validation_failed").await["errors"][0]["field"],
        "variants[0].sku"
    );
    assert_eq!(
        problem(unknown_variant, 422, "validation_failed").await["errors"][0]["field"],
        "variants[0].id"
    );
    problem(taken_slug, 409, "conflict").await;
    problem(unknown, 404, "not_found").await;
    problem(malformed, 400, "validation_failed").await;
}

#[tokio::test]
async fn drafts_and_deleted_products_are_hidden_from_the_public() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let mut draft = product_body("Secret Boot", &[(&unique_sku(), 100)]);
    draft["status"] = json!("draft");
    create_product(&app, &admin, &draft).await;
    let gone = create_product(
        &app,
        &admin,
        &product_body("Old Boot", &[(&unique_sku(), 100)]),
    )
    .await;
    let gone_id = gone["id"].as_str().unwrap();

    let public_draft = app.get("/api/v1/products/get-product/secret-boot").await;
    let admin_draft = app
        .get_as(
            "/api/v1/products/get-product/secret-boot",
            &admin.access_token,
        )
        .await;
    let path = format!("/api/v1/products/delete-product/{gone_id}");
    let deleted = send_as(&app, Method::DELETE, &path, &admin.access_token, None).await;
    let deleted_again = send_as(&app, Method::DELETE, &path, &admin.access_token, None).await;
    let after_delete = app
        .get_as("/api/v1/products/get-product/old-boot", &admin.access_token)
        .await;
    let update_deleted = update_product(&app, &admin, gone_id, &json!({"name": "Revived"})).await;
    let unknown_delete = send_as(
        &app,
        Method::DELETE,
        &format!("/api/v1/products/delete-product/{}", Uuid::new_v4()),
        &admin.access_token,
        None,
    )
    .await;
    let listed = listing(&app, "").await;

    problem(public_draft, 404, "not_found").await;
    assert_eq!(admin_draft.status(), 200);
    assert_eq!(deleted.status(), 204);
    problem(deleted_again, 404, "not_found").await;
    problem(after_delete, 404, "not_found").await;
    problem(update_deleted, 404, "not_found").await;
    problem(unknown_delete, 404, "not_found").await;
    assert_eq!(listed["page"]["total"], 0, "{listed}");
}

// ---------------------------------------------------------------- listing

#[tokio::test]
async fn listing_counts_pages_and_sorts_every_way() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    // Created in this order, so "newest" is the reverse.
    let products = [
        ("Delta Lamp", 400),
        ("Alpha Lamp", 300),
        ("Echo Lamp", 100),
        ("Charlie Lamp", 500),
        ("Bravo Lamp", 200),
        ("Foxtrot Lamp", 600),
        ("Golf Lamp", 700),
    ];
    for (name, price) in products {
        create_product(&app, &admin, &product_body(name, &[(&unique_sku(), price)])).await;
    }

    let first = listing(&app, "per_page=3").await;
    let last = listing(&app, "per_page=3&page=3").await;
    let beyond = listing(&app, "per_page=3&page=4").await;

    assert_eq!(
        first["page"],
        json!({"page": 1, "per_page": 3, "total": 7, "total_pages": 3, "has_next": true})
    );
    assert_eq!(names(&first), ["Golf Lamp", "Foxtrot Lamp", "Bravo Lamp"]);
    assert_eq!(last["page"]["has_next"], false);
    assert_eq!(names(&last), ["Delta Lamp"]);
    assert_eq!(names(&beyond), Vec::<String>::new());
    let item = &first["items"][0];
    for field in [
        "id",
        "slug",
        "name",
        "price_cents",
        "currency",
        "in_stock",
        "category_slug",
    ] {
        assert!(item.get(field).is_some(), "{field} missing from {item}");
    }
    assert_eq!(item["price_cents"], 700);
    assert_eq!(item["in_stock"], true);

    let by_price = names(&listing(&app, "sort=price_asc").await);
    assert_eq!(by_price[..3], ["Echo Lamp", "Bravo Lamp", "Alpha Lamp"]);
    let by_price_desc = names(&listing(&app, "sort=price_desc").await);
    assert_eq!(by_price_desc[..2], ["Golf Lamp", "Foxtrot Lamp"]);
    let by_name = names(&listing(&app, "sort=name_asc").await);
    assert_eq!(by_name[..2], ["Alpha Lamp", "Bravo Lamp"]);
    let by_name_desc = names(&listing(&app, "sort=name_desc").await);
    assert_eq!(by_name_desc[..2], ["Golf Lamp", "Foxtrot Lamp"]);
    let newest = names(&listing(&app, "sort=newest").await);
    assert_eq!(newest[..2], ["Golf Lamp", "Foxtrot Lamp"]);
    let relevance = names(&listing(&app, "sort=relevance").await);
    assert_eq!(relevance.len(), 7);
}

#[tokio::test]
async fn listing_caps_per_page_at_100_and_refuses_bad_parameters() {
    let app = spawn_app().await;

    let capped = listing(&app, "per_page=500").await;
    let page_zero = app.get("/api/v1/products/get-products?page=0").await;
    let per_page_zero = app.get("/api/v1/products/get-products?per_page=0").await;
    let not_a_number = app.get("/api/v1/products/get-products?page=two").await;
    let unknown_sort = app.get("/api/v1/products/get-products?sort=cheapest").await;
    let inverted = app
        .get("/api/v1/products/get-products?min_price=500&max_price=100")
        .await;
    let negative = app.get("/api/v1/products/get-products?min_price=-1").await;
    let unknown_category = app
        .get("/api/v1/products/get-products?category=no-such-category")
        .await;

    assert_eq!(capped["page"]["per_page"], 100);
    assert_eq!(
        problem(page_zero, 400, "validation_failed").await["errors"][0]["field"],
        "page"
    );
    assert_eq!(
        problem(per_page_zero, 400, "validation_failed").await["errors"][0]["field"],
        "per_page"
    );
    problem(not_a_number, 400, "validation_failed").await;
    assert_eq!(
        problem(unknown_sort, 400, "validation_failed").await["errors"][0]["field"],
        "sort"
    );
    assert_eq!(
        problem(inverted, 422, "validation_failed").await["errors"][0]["field"],
        "min_price"
    );
    assert_eq!(
        problem(negative, 422, "validation_failed").await["errors"][0]["field"],
        "min_price"
    );
    problem(unknown_category, 404, "not_found").await;
}

#[tokio::test]
async fn listing_filters_by_category_with_descendants_price_and_stock() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let shoes = crate::categories::create_category(&app, &admin, "Shoes", None).await;
    let boots =
        crate::categories::create_category(&app, &admin, "Boots", shoes["id"].as_str()).await;
    let hats = crate::categories::create_category(&app, &admin, "Hats", None).await;
    for (name, price, category, stock) in [
        ("Sandal", 1000, &shoes, 5),
        ("Hiking Boot", 3000, &boots, 0),
        ("Cap", 1500, &hats, 2),
    ] {
        let mut body = product_body(name, &[(&unique_sku(), price)]);
        body["category_id"] = category["id"].clone();
        body["variants"][0]["initial_stock"] = json!(stock);
        create_product(&app, &admin, &body).await;
    }

    let in_shoes = listing(&app, "category=shoes&sort=name_asc").await;
    let in_boots = listing(&app, "category=boots").await;
    let mid_price = listing(&app, "min_price=1000&max_price=1500&sort=price_asc").await;
    let in_stock = listing(&app, "in_stock=true&sort=name_asc").await;

    assert_eq!(names(&in_shoes), ["Hiking Boot", "Sandal"]);
    assert_eq!(in_shoes["items"][0]["category_slug"], "boots");
    assert_eq!(names(&in_boots), ["Hiking Boot"]);
    assert_eq!(names(&mid_price), ["Sandal", "Cap"]);
    assert_eq!(names(&in_stock), ["Cap", "Sandal"]);
    assert_eq!(in_stock["page"]["total"], 2);
}

#[tokio::test]
async fn search_finds_a_word_that_is_only_in_the_description_and_ranks_names_higher() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let mut described = product_body("Plain Mug", &[(&unique_sku(), 900)]);
    described["description"] = json!("Glazed by hand in a small pottery studio.");
    create_product(&app, &admin, &described).await;
    let mut named = product_body("Pottery Bowl", &[(&unique_sku(), 900)]);
    named["description"] = json!("A bowl.");
    create_product(&app, &admin, &named).await;
    create_product(
        &app,
        &admin,
        &product_body("Steel Spoon", &[(&unique_sku(), 900)]),
    )
    .await;

    let glazed = listing(&app, "q=glazed").await;
    let pottery = listing(&app, "q=pottery").await;
    let nothing = listing(&app, "q=zeppelin").await;

    assert_eq!(names(&glazed), ["Plain Mug"]);
    assert_eq!(names(&pottery), ["Pottery Bowl", "Plain Mug"]);
    assert_eq!(nothing["page"]["total"], 0);
}

// ------------------------------------------------------------------ cache

#[tokio::test]
async fn twenty_updates_in_a_row_are_never_read_stale_by_another_client() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let product = create_product(
        &app,
        &admin,
        &product_body("Counter Clock", &[(&unique_sku(), 100)]),
    )
    .await;
    let id = product["id"].as_str().unwrap().to_owned();
    let variant_id = product["variants"][0]["id"].as_str().unwrap().to_owned();
    let reader = new_client();
    let url = app.url("/api/v1/products/get-product/counter-clock");
    // Warm the cache so every update has an entry to replace.
    assert_eq!(get_json(&reader, url.clone()).await.0, 200);

    for round in 1..=20 {
        let description = format!("revision {round}");
        let updated = update_product(
            &app,
            &admin,
            &id,
            &json!({
                "description": description,
                "variants": [{"id": variant_id, "price_cents": 100 + round}]
            }),
        )
        .await;
        assert_eq!(updated.status(), 200, "update {round}");

        let (status, page) = get_json(&reader, url.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(
            page["description"],
            description.as_str(),
            "stale after update {round}"
        );
        assert_eq!(page["variants"][0]["price_cents"], 100 + round);
        if round == 10 {
            // Someone flushes the cache mid-test: answers stay right.
            flush_test_keys(&app).await;
        }
    }
}

#[tokio::test]
async fn flushing_the_cache_keeps_answers_correct() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let product = create_product(
        &app,
        &admin,
        &product_body("Flush Vase", &[(&unique_sku(), 100)]),
    )
    .await;
    let url = app.url("/api/v1/products/get-product/flush-vase");
    let (_, before) = get_json(&new_client(), url.clone()).await;

    flush_test_keys(&app).await;
    let (status, after_flush) = get_json(&new_client(), url.clone()).await;
    let (_, cached_again) = get_json(&new_client(), url.clone()).await;
    let updated = update_product(
        &app,
        &admin,
        product["id"].as_str().unwrap(),
        &json!({"name": "Flushed Vase"}),
    )
    .await;
    assert_eq!(updated.status(), 200);
    flush_test_keys(&app).await;
    let (_, after_update) = get_json(&new_client(), url).await;

    assert_eq!(status, 200);
    assert_eq!(after_flush, before);
    assert_eq!(cached_again, before);
    assert_eq!(after_update["name"], "Flushed Vase");
}

/// The body of a GET, as text: pages are compared byte for byte.
async fn body_text(app: &TestApp, path: &str, token: Option<&str>) -> String {
    let mut request = new_client().get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request sent");
    assert_eq!(response.status(), 200, "GET {path}");
    response.text().await.expect("body")
}

async fn add_stock(app: &TestApp, admin: &TestUser, variant_id: &str, quantity: i64) {
    let response = send_as(
        app,
        Method::POST,
        "/api/v1/stock/add-stock",
        &admin.access_token,
        Some(&json!({"variant_id": variant_id, "quantity": quantity, "reason": "delivery"})),
    )
    .await;
    assert_eq!(response.status(), 200, "adding stock");
}

#[tokio::test]
async fn product_pages_from_the_cache_are_byte_for_byte_those_from_postgres() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let category = crate::categories::create_category(&app, &admin, "Lamps", None).await;
    let mut plain = product_body(
        "Arc Lamp",
        &[
            (&unique_sku(), 4900),
            (&unique_sku(), 5900),
            (&unique_sku(), 6900),
        ],
    );
    plain["category_id"] = category["id"].clone();
    plain["description"] = json!("A \"bright\" lamp: ünïcode, \\ and </script>.");
    plain["variants"][2]["attributes"] = json!({"nested": [1, {"a": null}], "note": "é"});
    // Attributes shaped like the stock a page lays in, at the stand-in values.
    let mut tricky = product_body("Trick Lamp", &[(&unique_sku(), 100), (&unique_sku(), 200)]);
    tricky["variants"][0]["attributes"] =
        json!({"stock": {"available": 9_000_000_000_000_000_001_i64, "in_stock": false}});
    tricky["variants"][1]["attributes"] =
        json!({"stock": {"available": 9_000_000_000_000_000_000_i64, "in_stock": false}});
    let plain = create_product(&app, &admin, &plain).await;
    create_product(&app, &admin, &tricky).await;

    for slug in ["arc-lamp", "trick-lamp"] {
        let path = format!("/api/v1/products/get-product/{slug}");
        let filled = body_text(&app, &path, None).await;
        let cached = body_text(&app, &path, None).await;
        let as_admin = body_text(&app, &path, Some(&admin.access_token)).await;
        flush_test_keys(&app).await;
        let from_postgres = body_text(&app, &path, None).await;
        assert_eq!(cached, filled, "{slug}");
        assert_eq!(as_admin, filled, "{slug}");
        assert_eq!(from_postgres, filled, "{slug}");
    }

    // Stock moves: the cached page lays in the new numbers at once.
    let path = "/api/v1/products/get-product/arc-lamp";
    body_text(&app, path, None).await;
    add_stock(
        &app,
        &admin,
        plain["variants"][1]["id"].as_str().unwrap(),
        7,
    )
    .await;
    let cached = body_text(&app, path, None).await;
    flush_test_keys(&app).await;
    let from_postgres = body_text(&app, path, None).await;
    assert_eq!(cached, from_postgres);
    let page: Value = serde_json::from_str(&cached).expect("page JSON");
    assert_eq!(page["variants"][1]["stock"]["available"], 12);
    assert_eq!(page["category"]["name"], "Lamps");
}

#[tokio::test]
async fn carts_from_the_cache_are_byte_for_byte_those_from_postgres() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let mug = create_product(
        &app,
        &admin,
        &product_body("Cart Mug", &[(&unique_sku(), 900), (&unique_sku(), 1100)]),
    )
    .await;
    let bowl = create_product(
        &app,
        &admin,
        &product_body("Cart Bowl", &[(&unique_sku(), 1500)]),
    )
    .await;
    let buyer = TestUser::register_customer(&app).await;
    for (variant, quantity) in [
        (&mug["variants"][0], 2),
        (&bowl["variants"][0], 1),
        (&mug["variants"][1], 3),
    ] {
        let response = app
            .post_json_as(
                "/api/v1/cart/add-cart",
                &buyer.access_token,
                &json!({"variant_id": variant["id"], "quantity": quantity}),
            )
            .await;
        assert_eq!(response.status(), 200, "adding to the cart");
    }
    let path = "/api/v1/cart/get-cart";
    let token = Some(buyer.access_token.as_str());

    let cached = body_text(&app, path, token).await;
    let again = body_text(&app, path, token).await;
    flush_test_keys(&app).await;
    let from_postgres = body_text(&app, path, token).await;
    assert_eq!(cached, from_postgres);
    assert_eq!(again, from_postgres);

    // A price and a stock change show in the cached cart at once.
    let updated = update_product(
        &app,
        &admin,
        mug["id"].as_str().unwrap(),
        &json!({"variants": [{"id": mug["variants"][1]["id"], "price_cents": 1200}]}),
    )
    .await;
    assert_eq!(updated.status(), 200);
    add_stock(&app, &admin, bowl["variants"][0]["id"].as_str().unwrap(), 4).await;
    let cached = body_text(&app, path, token).await;
    flush_test_keys(&app).await;
    let from_postgres = body_text(&app, path, token).await;
    assert_eq!(cached, from_postgres);
    let cart: Value = serde_json::from_str(&cached).expect("cart JSON");
    assert_eq!(cart["subtotal_cents"], 2 * 900 + 1500 + 3 * 1200);
    let bowl_line = cart["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["product_id"] == bowl["id"])
        .expect("the bowl's line");
    assert_eq!(bowl_line["available"], 9);
}

#[tokio::test]
async fn with_redis_down_product_pages_and_listings_come_from_postgres() {
    let app = spawn_app_with(|settings| {
        settings.redis_url = secrecy::SecretString::from("redis://127.0.0.1:1".to_owned());
    })
    .await;
    let admin = TestUser::create_admin(&app).await;
    let product = create_product(
        &app,
        &admin,
        &product_body("Offline Kettle", &[(&unique_sku(), 2500)]),
    )
    .await;

    let (status, page) = get_json(
        &new_client(),
        app.url("/api/v1/products/get-product/offline-kettle"),
    )
    .await;
    let updated = update_product(
        &app,
        &admin,
        product["id"].as_str().unwrap(),
        &json!({"name": "Offline Teapot"}),
    )
    .await;
    let (_, after) = get_json(
        &new_client(),
        app.url("/api/v1/products/get-product/offline-kettle"),
    )
    .await;
    let listed = listing(&app, "q=teapot").await;
    let stock = app
        .get(&format!(
            "/api/v1/stock/get-stock-level/{}",
            product["variants"][0]["id"].as_str().unwrap()
        ))
        .await;

    assert_eq!(status, 200);
    assert_eq!(page, product);
    assert_eq!(updated.status(), 200);
    assert_eq!(after["name"], "Offline Teapot");
    assert_eq!(names(&listed), ["Offline Teapot"]);
    assert_eq!(stock.status(), 200);
}

/// A cache on the app's Redis connection, under its prefix.
fn cache_of(app: &TestApp) -> VersionedCache {
    VersionedCache::new(
        app.state.redis.connection(),
        app.settings.redis_key_prefix.clone(),
    )
}

#[tokio::test]
async fn the_cache_never_goes_back_to_an_older_version() {
    let app = spawn_app().await;
    let cache = cache_of(&app);

    cache.put("entry", 5, &json!("five")).await;
    cache.put("entry", 4, &json!("four")).await;
    let after_older = cache.get::<Value>("entry").await.unwrap();
    cache.invalidate("entry", 6).await;
    let after_tombstone = cache.get::<Value>("entry").await;
    cache.put("entry", 5, &json!("five again")).await;
    let after_late_writer = cache.get::<Value>("entry").await;
    cache.put("entry", 6, &json!("six")).await;
    let after_rebuild = cache.get::<Value>("entry").await.unwrap();
    cache.put("entry", 6, &json!("six, twice")).await;
    let after_same_version = cache.get::<Value>("entry").await.unwrap();

    assert_eq!((after_older.version, after_older.body), (5, json!("five")));
    assert_eq!(after_tombstone, None);
    assert_eq!(after_late_writer, None);
    assert_eq!(
        (after_rebuild.version, after_rebuild.body),
        (6, json!("six"))
    );
    assert_eq!(after_same_version.body, json!("six"));
}

/// Reads that reach the cache together go out in one pipeline, each
/// entry asked for once: every read still gets exactly what it asked for.
#[tokio::test]
async fn reads_that_go_out_together_each_get_what_they_asked_for() {
    use projections::cache::{keys, Start};

    let app = spawn_app().await;
    let cache = cache_of(&app);
    let names: Vec<String> = (0..10).map(|i| format!("gathered-{i}")).collect();
    for (version, name) in (1..).zip(&names) {
        cache
            .put(name, version, &json!(format!("body of {name}")))
            .await;
    }
    let product_id = Uuid::new_v4();
    cache
        .put_text("gathered-slug", &product_id.to_string())
        .await;
    cache
        .put(&keys::product(product_id), 7, &json!("the product"))
        .await;

    let reads = (0..40).map(|i| {
        let cache = &cache;
        let start = names[i % 10].clone();
        let also = vec![names[(i + 3) % 10].clone(), format!("never-written-{i}")];
        async move {
            let mut snapshot = if i % 4 == 0 {
                cache
                    .read_with_usual(Start::ThroughText {
                        text: "gathered-slug",
                        names: keys::product,
                    })
                    .await
            } else {
                cache.read_with_usual(Start::Entry(&start)).await
            };
            cache.read_also(&mut snapshot, &also).await;
            (i, start, also, snapshot)
        }
    });
    let read = futures_util::future::join_all(reads).await;

    let product = keys::product(product_id);
    for (i, start, also, snapshot) in read {
        let expect = |name: &str| Some(format!("\"body of {name}\""));
        let raw = |name: &str| {
            snapshot
                .raw(name)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        if i % 4 == 0 {
            assert_eq!(snapshot.text, Some(product_id.to_string()), "read {i}");
            assert_eq!(
                raw(&product).as_deref(),
                Some("\"the product\""),
                "read {i}"
            );
            assert_eq!(snapshot.version(&product), Some(7), "read {i}");
        } else {
            assert_eq!(raw(&start), expect(&start), "read {i}");
            let version = names.iter().position(|n| *n == start).unwrap() + 1;
            assert_eq!(snapshot.version(&start), Some(version as i64), "read {i}");
        }
        assert_eq!(raw(&also[0]), expect(&also[0]), "read {i}");
        assert_eq!(raw(&also[1]), None, "read {i}");
    }
}

/// However many reads are in flight on the connection, a read that begins
/// after a write finished sees that write: a read only joins others that
/// have not gone out yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sees_every_write_that_finished_before_it_began() {
    use projections::cache::Start;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let app = spawn_app().await;
    let cache = cache_of(&app);
    cache.replace("hot", 0, &json!(0)).await;
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (cache, done) = (cache.clone(), done.clone());
            tokio::spawn(async move {
                let mut reads = 0_u64;
                while !done.load(Ordering::Relaxed) {
                    cache.read_with_usual(Start::Entry("hot")).await;
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    for version in 1..=200 {
        cache.replace("hot", version, &json!(version)).await;
        let snapshot = cache.read_with_usual(Start::Entry("hot")).await;
        assert_eq!(snapshot.version("hot"), Some(version), "stale read");
    }
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "every reader read meanwhile");
    }
}

// ------------------------------------------------------------ concurrency

#[tokio::test]
async fn two_concurrent_creates_with_the_same_sku_give_one_product() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let sku = unique_sku();
    let attempt = |name: &'static str| {
        let body = product_body(name, &[(&sku, 1000)]);
        let app = &app;
        let token = admin.access_token.clone();
        async move {
            send_as(
                app,
                Method::POST,
                "/api/v1/products/create-product",
                &token,
                Some(&body),
            )
            .await
            .status()
            .as_u16()
        }
    };

    let (first, second) = tokio::join!(attempt("Twin One"), attempt("Twin Two"));

    let mut statuses = [first, second];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409]);
    let products: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Product'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(products, 1);
    let listed = listing(&app, "").await;
    assert_eq!(listed["page"]["total"], 1);
}

// ------------------------------------------------------------------- seed

#[tokio::test]
async fn seed_demo_fills_the_catalog_and_is_safe_to_run_twice() {
    let app = spawn_app().await;

    let caches = commerce::read_models::Caches::new(&app.state.redis);
    let first = commerce::catalog::seed::seed_demo(&app.pool, &caches, 12)
        .await
        .expect("seeded");
    let second = commerce::catalog::seed::seed_demo(&app.pool, &caches, 14)
        .await
        .expect("seeded again");
    // The app's own runners may still be applying; wait for them to settle.
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(first.products_created, 12);
    assert_eq!(first.categories_created, 11);
    assert_eq!(
        (
            second.products_created,
            second.products_skipped,
            second.categories_created
        ),
        (2, 12, 0)
    );
    let listed = listing(&app, "per_page=100").await;
    assert_eq!(listed["page"]["total"], 14);
    let slug = listed["items"][0]["slug"].as_str().unwrap();
    let (status, page) = get_json(
        &new_client(),
        app.url(&format!("/api/v1/products/get-product/{slug}")),
    )
    .await;
    assert_eq!(status, 200);
    assert!(page["category"]["slug"].is_string(), "{page}");
    let tree = app
        .get("/api/v1/categories/tree")
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(tree.as_array().unwrap().len(), 3, "{tree}");
    let clothing = listing(&app, "category=clothing&per_page=100").await;
    assert!(clothing["page"]["total"].as_u64().unwrap() > 0);
}

async fn name_served(app: &TestApp, slug: &str) -> String {
    let page: Value = app
        .get(&format!("/api/v1/products/get-product/{slug}"))
        .await
        .json()
        .await
        .unwrap();
    page["name"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_change_redis_missed_is_written_once_it_answers_and_meanwhile_read_around_it() {
    let mut redis = OwnRedis::start_persistent();
    let url = redis.url();
    let app = spawn_app_with(move |settings| {
        settings.redis_url = secrecy::SecretString::from(url);
    })
    .await;
    let other = spawn_instance_like(&app).await;
    let admin = TestUser::create_admin(&app).await;
    let product = create_product(
        &app,
        &admin,
        &product_body("Wool Cap", &[(&unique_sku(), 900)]),
    )
    .await;
    let (id, slug) = (
        product["id"].as_str().unwrap().to_owned(),
        product["slug"].as_str().unwrap().to_owned(),
    );
    // Read twice on each instance, so that the page is cached and kept.
    for instance in [&app, &other] {
        for _ in 0..2 {
            assert_eq!(name_served(instance, &slug).await, "Wool Cap");
        }
    }

    // Redis is down while the product changes, and comes back with the
    // old entries it had on disk: the change's tombstones never reached it.
    redis.stop();
    let updated = update_product(&app, &admin, &id, &json!({"name": "Wool Hat"})).await;
    assert_eq!(updated.status(), 200);
    redis.resume();

    // Past the pause after a failure (2 s), the instances read Redis again,
    // but the instance that owes the tombstones reads around it until it
    // has written them; then every instance sees the change.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(name_served(&app, &slug).await, "Wool Hat");
    let mut everywhere = false;
    for _ in 0..50 {
        if name_served(&app, &slug).await == "Wool Hat"
            && name_served(&other, &slug).await == "Wool Hat"
        {
            everywhere = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(everywhere, "an instance still serves the old product");
}
