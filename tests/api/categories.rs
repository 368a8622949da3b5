//! Categories: the tree, category pages with their path, and the admin's
//! create and update (renames, slugs, moves and the cycle check).

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::catalog::{create_product, product_body, send_as, unique_sku};
use crate::helpers::{new_client, problem, spawn_app, TestApp};
use crate::users::TestUser;

/// Creates a category (under `parent_id` when given) and returns its page.
pub async fn create_category(
    app: &TestApp,
    admin: &TestUser,
    name: &str,
    parent_id: Option<&str>,
) -> Value {
    let body = json!({"name": name, "parent_id": parent_id});
    let response = send_as(
        app,
        Method::POST,
        "/api/v1/categories/create-category",
        &admin.access_token,
        Some(&body),
    )
    .await;
    assert_eq!(response.status(), 201, "creating category {name}");
    response.json().await.expect("category JSON")
}

async fn update_category(
    app: &TestApp,
    admin: &TestUser,
    id: &str,
    body: &Value,
) -> reqwest::Response {
    let path = format!("/api/v1/categories/update-category/{id}");
    send_as(app, Method::PUT, &path, &admin.access_token, Some(body)).await
}

async fn page(app: &TestApp, slug: &str) -> (u16, Value) {
    let response = app.get(&format!("/api/v1/categories/slug/{slug}")).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn slugs(refs: &Value) -> Vec<&str> {
    refs.as_array()
        .unwrap()
        .iter()
        .map(|r| r["slug"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn categories_form_a_tree_with_paths_from_the_root() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let clothing = create_category(&app, &admin, "Clothing", None).await;
    let shoes = create_category(&app, &admin, "Shoes", clothing["id"].as_str()).await;
    let boots = create_category(&app, &admin, "Boots", shoes["id"].as_str()).await;
    create_category(&app, &admin, "Books", None).await;

    let tree: Value = app
        .get("/api/v1/categories/tree")
        .await
        .json()
        .await
        .unwrap();
    let (status, shoes_page) = page(&app, "shoes").await;

    assert_eq!(boots["path"].as_array().unwrap().len(), 3);
    assert_eq!(slugs(&tree), ["books", "clothing"]);
    assert_eq!(tree[1]["children"][0]["slug"], "shoes");
    assert_eq!(tree[1]["children"][0]["children"][0]["slug"], "boots");
    assert_eq!(tree[1]["children"][0]["children"][0]["children"], json!([]));
    assert_eq!(status, 200);
    assert_eq!(shoes_page["name"], "Shoes");
    assert_eq!(
        shoes_page["parent"],
        json!({"id": clothing["id"], "slug": "clothing", "name": "Clothing"})
    );
    assert_eq!(slugs(&shoes_page["path"]), ["clothing", "shoes"]);
    assert_eq!(slugs(&shoes_page["children"]), ["boots"]);
    assert_eq!(clothing["parent"], Value::Null);
}

#[tokio::test]
async fn category_writes_refuse_bad_input() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let path = "/api/v1/categories/create-category";
    let existing = create_category(&app, &admin, "Toys", None).await;

    let empty = send_as(
        &app,
        Method::POST,
        path,
        &admin.access_token,
        Some(&json!({"name": " "})),
    )
    .await;
    let missing = send_as(
        &app,
        Method::POST,
        path,
        &admin.access_token,
        Some(&json!({})),
    )
    .await;
    let orphan = send_as(
        &app,
        Method::POST,
        path,
        &admin.access_token,
        Some(&json!({"name": "Orphan", "parent_id": Uuid::new_v4()})),
    )
    .await;
    let taken = send_as(
        &app,
        Method::POST,
        path,
        &admin.access_token,
        Some(&json!({"name": "Games", "slug": "toys"})),
    )
    .await;
    let bad_slug = send_as(
        &app,
        Method::POST,
        path,
        &admin.access_token,
        Some(&json!({"name": "Games", "slug": "-games"})),
    )
    .await;
    let unknown = update_category(
        &app,
        &admin,
        &Uuid::new_v4().to_string(),
        &json!({"name": "x"}),
    )
    .await;
    let malformed = update_category(&app, &admin, "42", &json!({"name": "x"})).await;
    let empty_rename = update_category(
        &app,
        &admin,
        existing["id"].as_str().unwrap(),
        &json!({"name": ""}),
    )
    .await;
    let (unknown_page, _) = page(&app, "no-such-category").await;
    let second = create_category(&app, &admin, "Toys", None).await;

    assert_eq!(
        problem(empty, 422, "validation_failed").await["errors"][0]["field"],
        "name"
    );
    assert_eq!(
        problem(missing, 422, "validation_failed").await["errors"][0]["field"],
        "name"
    );
    assert_eq!(
        problem(orphan, 422, "validation_failed").await["errors"][0]["field"],
        "parent_id"
    );
    problem(taken, 409, "conflict").await;
    assert_eq!(
        problem(bad_slug, 422, "validation_failed").await["errors"][0]["field"],
        "slug"
    );
    problem(unknown, 404, "not_found").await;
    problem(malformed, 400, "validation_failed").await;
    assert_eq!(
        problem(empty_rename, 422, "validation_failed").await["errors"][0]["field"],
        "name"
    );
    assert_eq!(unknown_page, 404);
    assert_eq!(second["slug"], "toys-2");
}

#[tokio::test]
async fn renaming_keeps_the_slug_and_moves_follow_the_tree() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let outdoor = create_category(&app, &admin, "Outdoor", None).await;
    let camping = create_category(&app, &admin, "Camping", outdoor["id"].as_str()).await;
    let tents = create_category(&app, &admin, "Tents", camping["id"].as_str()).await;
    let camping_id = camping["id"].as_str().unwrap();

    let renamed = update_category(&app, &admin, camping_id, &json!({"name": "Camping Gear"})).await;
    let to_root = update_category(&app, &admin, camping_id, &json!({"parent_id": null})).await;
    let (_, outdoor_page) = page(&app, "outdoor").await;
    let back = update_category(
        &app,
        &admin,
        camping_id,
        &json!({"parent_id": outdoor["id"], "slug": "camping-gear"}),
    )
    .await;
    let (old_slug, _) = page(&app, "camping").await;
    let (_, tents_page) = page(&app, "tents").await;

    assert_eq!(renamed.status(), 200);
    let renamed: Value = renamed.json().await.unwrap();
    assert_eq!(
        (renamed["name"].as_str(), renamed["slug"].as_str()),
        (Some("Camping Gear"), Some("camping"))
    );
    assert_eq!(to_root.status(), 200);
    assert_eq!(
        to_root.json::<Value>().await.unwrap()["parent"],
        Value::Null
    );
    assert_eq!(outdoor_page["children"], json!([]));
    assert_eq!(back.status(), 200);
    assert_eq!(old_slug, 404);
    assert_eq!(
        slugs(&tents_page["path"]),
        ["outdoor", "camping-gear", "tents"]
    );
    assert_eq!(tents["parent"]["slug"], "camping");
}

#[tokio::test]
async fn a_move_that_would_make_a_cycle_is_a_409() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let a = create_category(&app, &admin, "Alpha", None).await;
    let b = create_category(&app, &admin, "Beta", a["id"].as_str()).await;
    let c = create_category(&app, &admin, "Gamma", b["id"].as_str()).await;
    let a_id = a["id"].as_str().unwrap();

    let under_itself = update_category(&app, &admin, a_id, &json!({"parent_id": a["id"]})).await;
    let under_grandchild =
        update_category(&app, &admin, a_id, &json!({"parent_id": c["id"]})).await;
    let (_, alpha) = page(&app, "alpha").await;

    problem(under_itself, 409, "conflict").await;
    problem(under_grandchild, 409, "conflict").await;
    assert_eq!(alpha["parent"], Value::Null);
}

#[tokio::test]
async fn the_tree_is_at_most_64_levels_deep_so_no_deep_move_escapes_the_cycle_check() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let root = create_category(&app, &admin, "Level 0", None).await;
    let mut deepest = root.clone();
    for level in 1..64 {
        deepest = create_category(
            &app,
            &admin,
            &format!("Level {level}"),
            deepest["id"].as_str(),
        )
        .await;
    }
    let body = json!({"name": "Level 64", "parent_id": deepest["id"]});

    let too_deep = send_as(
        &app,
        Method::POST,
        "/api/v1/categories/create-category",
        &admin.access_token,
        Some(&body),
    )
    .await;
    let root_under_deepest = update_category(
        &app,
        &admin,
        root["id"].as_str().unwrap(),
        &json!({"parent_id": deepest["id"]}),
    )
    .await;

    let refused = problem(too_deep, 422, "validation_failed").await;
    assert_eq!(refused["errors"][0]["field"], "parent_id");
    assert_eq!(root_under_deepest.status(), 422);
    let (_, level_0) = page(&app, "level-0").await;
    assert_eq!(level_0["parent"], Value::Null, "no cycle was made");
}

#[tokio::test]
async fn a_renamed_category_shows_at_once_on_its_product_pages() {
    let app = spawn_app().await;
    let admin = TestUser::create_admin(&app).await;
    let lamps = create_category(&app, &admin, "Lamps", None).await;
    let mut body = product_body("Desk Lamp", &[(&unique_sku(), 3000)]);
    body["category_id"] = lamps["id"].clone();
    create_product(&app, &admin, &body).await;
    let reader = new_client();
    let url = app.url("/api/v1/products/get-product/desk-lamp");
    let before: Value = reader.get(&url).send().await.unwrap().json().await.unwrap();

    let renamed = update_category(
        &app,
        &admin,
        lamps["id"].as_str().unwrap(),
        &json!({"name": "Lighting"}),
    )
    .await;
    let after: Value = reader.get(&url).send().await.unwrap().json().await.unwrap();

    assert_eq!(before["category"]["name"], "Lamps");
    assert_eq!(renamed.status(), 200);
    assert_eq!(
        after["category"],
        json!({"id": lamps["id"], "slug": "lamps", "name": "Lighting"})
    );
}
