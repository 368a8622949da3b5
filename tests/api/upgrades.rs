//! Upgrades: migrations that move data (what an older release stored means
//! the same after the upgrade as what the new code writes), and a server
//! that leaves migrating to `commerce migrate`.

use domain::order::OrderLine;
use domain::values::{Name, Sku};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::helpers::test_settings;

/// A fresh database with every migration before `version` applied, as an
/// older release left it, and the SQL of the migrations from `version` on
/// (the server's own, as `commerce::db::migrate` applies them).
async fn database_before(version: i64) -> (PgConnection, Vec<&'static str>) {
    let settings = test_settings();
    commerce::db::create_database_if_missing(&settings)
        .await
        .unwrap();
    let options = commerce::db::connect_options(&settings).unwrap();
    let mut database = PgConnection::connect_with(&options).await.unwrap();
    let mut later = Vec::new();
    for migration in commerce::db::MIGRATOR.iter() {
        if migration.version < version {
            sqlx::raw_sql(&migration.sql)
                .execute(&mut database)
                .await
                .unwrap();
        } else {
            later.push(&*migration.sql);
        }
    }
    (database, later)
}

fn line(variant_id: Uuid, sku: &str, quantity: u32) -> OrderLine {
    OrderLine {
        variant_id,
        sku: Sku::try_from(sku.to_owned()).unwrap(),
        product_id: Uuid::new_v4(),
        product_name: Name::try_from(format!("Product {sku}")).unwrap(),
        unit_price_cents: 1999,
        quantity,
        line_total_cents: 1999 * i64::from(quantity),
    }
}

#[tokio::test]
async fn an_orders_lines_move_into_its_row_as_the_orders_projection_writes_them() {
    let (mut database, later) = database_before(15).await;
    let (with_lines, without_lines, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut variants = [Uuid::new_v4(), Uuid::new_v4()];
    variants.sort();
    let lines = [
        line(variants[0], "SKU-LOW", 2),
        line(variants[1], "SKU-HIGH", 1),
    ];
    for order_id in [with_lines, without_lines] {
        sqlx::query(
            "INSERT INTO orders (id, user_id, status, total_cents, currency, expires_at, \
                                 created_at, updated_at, version) \
             VALUES ($1, $2, 'created', 5997, 'USD', now(), now(), now(), 1)",
        )
        .bind(order_id)
        .bind(user)
        .execute(&mut database)
        .await
        .unwrap();
    }
    // Stored in the other order than the variants sort in.
    for line in lines.iter().rev() {
        sqlx::query(
            "INSERT INTO order_lines (order_id, variant_id, sku, product_id, product_name, \
                                      unit_price_cents, quantity, line_total_cents) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(with_lines)
        .bind(line.variant_id)
        .bind(line.sku.as_str())
        .bind(line.product_id)
        .bind(line.product_name.as_str())
        .bind(line.unit_price_cents)
        .bind(i64::from(line.quantity))
        .bind(line.line_total_cents)
        .execute(&mut database)
        .await
        .unwrap();
    }

    sqlx::raw_sql(later[0])
        .execute(&mut database)
        .await
        .unwrap();

    let stored = |order_id: Uuid| {
        sqlx::query_scalar::<_, Value>("SELECT lines FROM orders WHERE id = $1").bind(order_id)
    };
    let moved = stored(with_lines).fetch_one(&mut database).await.unwrap();
    assert_eq!(moved, serde_json::to_value(&lines).unwrap());
    let none = stored(without_lines)
        .fetch_one(&mut database)
        .await
        .unwrap();
    assert_eq!(none, serde_json::json!([]));
    let table_left: bool = sqlx::query_scalar("SELECT to_regclass('order_lines') IS NOT NULL")
        .fetch_one(&mut database)
        .await
        .unwrap();
    assert!(!table_left, "order_lines is dropped");
}

#[tokio::test]
async fn a_server_told_not_to_migrate_refuses_a_database_that_lacks_migrations() {
    let mut settings = test_settings();
    settings.migrate_on_start = false;
    // The database exists, empty: as an operator who forgot `commerce migrate`.
    commerce::db::create_database_if_missing(&settings)
        .await
        .unwrap();
    let refused = match commerce::startup::Application::build(settings.clone()).await {
        Ok(_) => panic!("a server started on a database without its tables"),
        Err(error) => error.to_string(),
    };
    assert!(refused.contains("MIGRATE_ON_START"), "{refused}");
    assert!(
        refused.contains("0016 projection leader lease"),
        "{refused}"
    );

    let pool = commerce::db::connect(&settings).await.unwrap();
    commerce::db::migrate(&pool).await.unwrap();
    let application = commerce::startup::Application::build(settings)
        .await
        .expect("a migrated database is served without migrating");
    assert_ne!(application.port(), 0);
}
