//! The catalog read model: products, their variants and the category tree,
//! folded from `Product` and `Category` events into the `catalog_*` tables.
//!
//! Every row update is guarded by the aggregate's sequence (`version`), so a
//! replayed event changes nothing. After a batch commits, the cached detail
//! of every product and category it touched is tombstoned at its new version.

use std::collections::HashMap;

use cqrs_es::Aggregate;
use domain::catalog::{Category, CategoryEvent, Product, ProductEvent, ProductStatus, Variant};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::cache::{keys, VersionedCache};
use crate::runner::{Projection, ProjectionError};
use crate::stored_event::StoredEvent;

pub const NAME: &str = "catalog";

pub struct CatalogProjection {
    cache: VersionedCache,
}

impl CatalogProjection {
    pub fn new(cache: VersionedCache) -> Self {
        Self { cache }
    }
}

/// The word the API and the read model use for a status.
pub fn status_name(status: ProductStatus) -> &'static str {
    match status {
        ProductStatus::Active => "active",
        ProductStatus::Draft => "draft",
    }
}

#[async_trait::async_trait]
impl Projection for CatalogProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, aggregate_type: &str) -> bool {
        aggregate_type == Product::TYPE || aggregate_type == Category::TYPE
    }

    fn tables(&self) -> &'static [&'static str] {
        &["catalog_products", "catalog_variants", "catalog_categories"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        let id = event.aggregate_uuid()?;
        if event.aggregate_type == Category::TYPE {
            let payload: CategoryEvent = event.payload_as()?;
            return apply_category(tx, id, event.sequence, payload).await;
        }
        let payload: ProductEvent = event.payload_as()?;
        apply_product(tx, id, event.sequence, payload).await
    }

    async fn reset(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("TRUNCATE catalog_products, catalog_variants, catalog_categories")
            .execute(tx)
            .await?;
        Ok(())
    }

    async fn after_commit(&self, events: &[StoredEvent]) {
        // One tombstone per aggregate, at the newest version the batch reached.
        let mut newest: HashMap<String, i64> = HashMap::new();
        for event in events {
            let Ok(id) = event.aggregate_id.parse::<Uuid>() else {
                continue;
            };
            let key = if event.aggregate_type == Category::TYPE {
                keys::category(id)
            } else {
                keys::product(id)
            };
            let version = newest.entry(key).or_insert(event.sequence);
            *version = (*version).max(event.sequence);
        }
        for (key, version) in newest {
            self.cache.invalidate(&key, version).await;
        }
    }
}

async fn apply_category(
    tx: &mut PgConnection,
    category_id: Uuid,
    sequence: i64,
    event: CategoryEvent,
) -> Result<(), ProjectionError> {
    match event {
        CategoryEvent::CategoryCreated {
            name,
            slug,
            parent_id,
            ..
        } => {
            sqlx::query(
                "INSERT INTO catalog_categories (id, slug, name, parent_id, version) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (id) DO UPDATE SET slug = EXCLUDED.slug, name = EXCLUDED.name, \
                     parent_id = EXCLUDED.parent_id, version = EXCLUDED.version \
                 WHERE catalog_categories.version < EXCLUDED.version",
            )
            .bind(category_id)
            .bind(slug.as_str())
            .bind(name.as_str())
            .bind(parent_id)
            .bind(sequence)
            .execute(tx)
            .await?;
        }
        CategoryEvent::CategoryUpdated {
            name,
            slug,
            parent_id,
        } => {
            sqlx::query(
                "UPDATE catalog_categories SET name = coalesce($3, name), slug = coalesce($4, slug), \
                     parent_id = CASE WHEN $5 THEN $6 ELSE parent_id END, version = $2 \
                 WHERE id = $1 AND version < $2",
            )
            .bind(category_id)
            .bind(sequence)
            .bind(name.as_ref().map(|n| n.as_str()))
            .bind(slug.as_ref().map(|s| s.as_str()))
            .bind(parent_id.is_some())
            .bind(parent_id.flatten())
            .execute(tx)
            .await?;
        }
    }
    Ok(())
}

async fn apply_product(
    tx: &mut PgConnection,
    product_id: Uuid,
    sequence: i64,
    event: ProductEvent,
) -> Result<(), ProjectionError> {
    match event {
        ProductEvent::ProductCreated {
            name,
            description,
            slug,
            category_id,
            status,
            currency,
            variants,
            created_at,
            ..
        } => {
            let min_price = variants
                .iter()
                .map(|v| v.price.amount_cents())
                .min()
                .unwrap_or(0);
            // The product and its variants in one statement (one round trip):
            // the variants are written only when the product row was.
            let columns = VariantColumns::of(&variants, 0);
            sqlx::query(
                "WITH product AS ( \
                     INSERT INTO catalog_products (id, slug, name, description, status, category_id, \
                         currency, min_price_cents, deleted, created_at, updated_at, version) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, false, $9, $9, $10) \
                     ON CONFLICT (id) DO UPDATE SET slug = EXCLUDED.slug, name = EXCLUDED.name, \
                         description = EXCLUDED.description, status = EXCLUDED.status, \
                         category_id = EXCLUDED.category_id, currency = EXCLUDED.currency, \
                         min_price_cents = EXCLUDED.min_price_cents, deleted = false, \
                         created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
                         version = EXCLUDED.version \
                     WHERE catalog_products.version < EXCLUDED.version RETURNING id) \
                 INSERT INTO catalog_variants (id, product_id, sku, title, price_cents, currency, \
                                               attributes, ordinal) \
                 SELECT v.id, product.id, v.sku, v.title, v.price, v.currency, v.attributes, v.ordinal \
                 FROM product, UNNEST($11::uuid[], $12::text[], $13::text[], $14::bigint[], \
                                      $15::text[], $16::jsonb[], $17::int[]) \
                      AS v(id, sku, title, price, currency, attributes, ordinal) \
                 ON CONFLICT (id) DO UPDATE SET product_id = EXCLUDED.product_id, sku = EXCLUDED.sku, \
                     title = EXCLUDED.title, price_cents = EXCLUDED.price_cents, \
                     currency = EXCLUDED.currency, attributes = EXCLUDED.attributes, \
                     ordinal = EXCLUDED.ordinal",
            )
            .bind(product_id)
            .bind(slug.as_str())
            .bind(name.as_str())
            .bind(&description)
            .bind(status_name(status))
            .bind(category_id)
            .bind(currency.as_str())
            .bind(min_price)
            .bind(created_at)
            .bind(sequence)
            .bind(&columns.ids)
            .bind(&columns.skus)
            .bind(&columns.titles)
            .bind(&columns.prices)
            .bind(&columns.currencies)
            .bind(&columns.attributes)
            .bind(&columns.ordinals)
            .execute(&mut *tx)
            .await?;
        }
        ProductEvent::ProductUpdated {
            name,
            description,
            slug,
            category_id,
            status,
            variants_changed,
            variants_added,
            updated_at,
        } => {
            let fresh: Option<i32> = sqlx::query_scalar(
                "UPDATE catalog_products SET name = coalesce($3, name), \
                     description = coalesce($4, description), slug = coalesce($5, slug), \
                     category_id = CASE WHEN $6 THEN $7 ELSE category_id END, \
                     status = coalesce($8, status), updated_at = $9, version = $2 \
                 WHERE id = $1 AND version < $2 RETURNING 1",
            )
            .bind(product_id)
            .bind(sequence)
            .bind(name.as_ref().map(|n| n.as_str()))
            .bind(description.as_deref())
            .bind(slug.as_ref().map(|s| s.as_str()))
            .bind(category_id.is_some())
            .bind(category_id.flatten())
            .bind(status.map(status_name))
            .bind(updated_at)
            .fetch_optional(&mut *tx)
            .await?;
            if fresh.is_none() || (variants_changed.is_empty() && variants_added.is_empty()) {
                return Ok(());
            }
            // Changed variants keep their place; added ones go after the rest.
            update_variants(tx, &variants_changed).await?;
            let next_ordinal: i32 = sqlx::query_scalar(
                "SELECT coalesce(max(ordinal) + 1, 0) FROM catalog_variants WHERE product_id = $1",
            )
            .bind(product_id)
            .fetch_one(&mut *tx)
            .await?;
            upsert_variants(tx, product_id, &variants_added, next_ordinal).await?;
            sqlx::query(
                "UPDATE catalog_products SET min_price_cents = \
                     (SELECT coalesce(min(price_cents), 0) FROM catalog_variants WHERE product_id = $1) \
                 WHERE id = $1",
            )
            .bind(product_id)
            .execute(&mut *tx)
            .await?;
        }
        ProductEvent::ProductDeleted { deleted_at } => {
            sqlx::query(
                "UPDATE catalog_products SET deleted = true, updated_at = $3, version = $2 \
                 WHERE id = $1 AND version < $2",
            )
            .bind(product_id)
            .bind(sequence)
            .bind(deleted_at)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

/// The columns of a batch of variants, for one `UNNEST` statement.
#[derive(Default)]
struct VariantColumns {
    ids: Vec<Uuid>,
    skus: Vec<String>,
    titles: Vec<String>,
    prices: Vec<i64>,
    currencies: Vec<String>,
    attributes: Vec<serde_json::Value>,
    ordinals: Vec<i32>,
}

impl VariantColumns {
    fn of(variants: &[Variant], first_ordinal: i32) -> Self {
        let mut columns = Self::default();
        for (variant, ordinal) in variants.iter().zip(first_ordinal..) {
            columns.ids.push(variant.variant_id);
            columns.skus.push(variant.sku.as_str().to_owned());
            columns.titles.push(variant.title.as_str().to_owned());
            columns.prices.push(variant.price.amount_cents());
            columns
                .currencies
                .push(variant.price.currency().as_str().to_owned());
            columns
                .attributes
                .push(serde_json::Value::Object(variant.attributes.clone()));
            columns.ordinals.push(ordinal);
        }
        columns
    }
}

async fn upsert_variants(
    tx: &mut PgConnection,
    product_id: Uuid,
    variants: &[Variant],
    first_ordinal: i32,
) -> Result<(), ProjectionError> {
    if variants.is_empty() {
        return Ok(());
    }
    let columns = VariantColumns::of(variants, first_ordinal);
    sqlx::query(
        "INSERT INTO catalog_variants (id, product_id, sku, title, price_cents, currency, attributes, ordinal) \
         SELECT id, $1, sku, title, price, currency, attributes, ordinal \
         FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::jsonb[], $8::int[]) \
              AS v(id, sku, title, price, currency, attributes, ordinal) \
         ON CONFLICT (id) DO UPDATE SET product_id = EXCLUDED.product_id, sku = EXCLUDED.sku, \
             title = EXCLUDED.title, price_cents = EXCLUDED.price_cents, currency = EXCLUDED.currency, \
             attributes = EXCLUDED.attributes, ordinal = EXCLUDED.ordinal",
    )
    .bind(product_id)
    .bind(&columns.ids)
    .bind(&columns.skus)
    .bind(&columns.titles)
    .bind(&columns.prices)
    .bind(&columns.currencies)
    .bind(&columns.attributes)
    .bind(&columns.ordinals)
    .execute(tx)
    .await?;
    Ok(())
}

async fn update_variants(
    tx: &mut PgConnection,
    variants: &[Variant],
) -> Result<(), ProjectionError> {
    if variants.is_empty() {
        return Ok(());
    }
    let columns = VariantColumns::of(variants, 0);
    sqlx::query(
        "UPDATE catalog_variants c SET title = v.title, price_cents = v.price, currency = v.currency, \
             attributes = v.attributes \
         FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[]) \
              AS v(id, title, price, currency, attributes) \
         WHERE c.id = v.id",
    )
    .bind(&columns.ids)
    .bind(&columns.titles)
    .bind(&columns.prices)
    .bind(&columns.currencies)
    .bind(&columns.attributes)
    .execute(tx)
    .await?;
    Ok(())
}
