//! Reading the catalog through the versioned cache: product detail by id or
//! slug (stock and category laid over the cached product at read time) and
//! stock levels. Every miss falls back to Postgres and fills the cache with
//! the version it read, so a slow filler can never bring back old data.

use std::collections::HashMap;

use projections::cache::keys;
use projections::catalog_queries::{self, CategoryRef, ProductCore, ProductDetail};
use projections::stock::StockEntry;
use uuid::Uuid;

use super::Viewer;
use crate::http::problem::ApiError;
use crate::state::AppState;

/// The product the public (or an admin) may see under `slug`. A slug the
/// product no longer carries answers nothing, even though it still belongs
/// to that product.
pub async fn product_by_slug(
    state: &AppState,
    slug: &str,
    viewer: Viewer,
) -> Result<Option<ProductDetail>, ApiError> {
    let slug_key = keys::product_slug(slug);
    let cached = state
        .caches
        .catalog
        .get_text(&slug_key)
        .await
        .and_then(|text| text.parse::<Uuid>().ok());
    let product_id = match cached {
        Some(id) => id,
        None => {
            let Some(id) = catalog_queries::product_id_by_slug(&state.pool, slug).await? else {
                return Ok(None);
            };
            // Claims are never released, so this slug names this product forever.
            state
                .caches
                .catalog
                .put_text(&slug_key, &id.to_string())
                .await;
            id
        }
    };
    let detail = product_detail(state, product_id, viewer).await?;
    Ok(detail.filter(|detail| detail.slug == slug))
}

/// A product by id, as `viewer` may see it: drafts only for admins, deleted
/// products for no one.
pub async fn product_detail(
    state: &AppState,
    product_id: Uuid,
    viewer: Viewer,
) -> Result<Option<ProductDetail>, ApiError> {
    let Some(core) = product_core(state, product_id).await? else {
        return Ok(None);
    };
    if viewer == Viewer::Public && core.status != "active" {
        return Ok(None);
    }
    // The category and every variant's stock in one round trip.
    let variant_ids: Vec<Uuid> = core.variants.iter().map(|v| v.id).collect();
    let mut names: Vec<String> = variant_ids.iter().map(|id| keys::stock(*id)).collect();
    if let Some(category_id) = core.category_id {
        names.push(keys::category(category_id));
    }
    let mut found = state
        .caches
        .catalog
        .get_many::<serde_json::Value>(&names)
        .await
        .into_iter();
    let mut stock = HashMap::new();
    let mut missing_stock = Vec::new();
    for variant_id in &variant_ids {
        match found
            .next()
            .flatten()
            .and_then(|hit| serde_json::from_value::<StockEntry>(hit.body).ok())
        {
            Some(entry) => {
                stock.insert(*variant_id, entry);
            }
            None => missing_stock.push(*variant_id),
        }
    }
    let category = match core.category_id {
        None => None,
        Some(category_id) => {
            match found
                .next()
                .flatten()
                .and_then(|hit| serde_json::from_value::<CategoryRef>(hit.body).ok())
            {
                Some(category) => Some(category),
                None => category_ref(state, category_id).await?,
            }
        }
    };
    stock.extend(stock_from_postgres(state, &missing_stock).await?);
    Ok(Some(ProductDetail::assemble(core, category, &stock)))
}

/// The cached product without stock, or Postgres's (which then fills the cache).
async fn product_core(state: &AppState, product_id: Uuid) -> Result<Option<ProductCore>, ApiError> {
    let key = keys::product(product_id);
    if let Some(hit) = state.caches.catalog.get::<ProductCore>(&key).await {
        return Ok(Some(hit.body));
    }
    let Some((version, core)) = catalog_queries::product_core(&state.pool, product_id).await?
    else {
        return Ok(None);
    };
    state.caches.catalog.put(&key, version, &core).await;
    Ok(Some(core))
}

async fn category_ref(
    state: &AppState,
    category_id: Uuid,
) -> Result<Option<CategoryRef>, ApiError> {
    let Some((version, category)) = catalog_queries::category_ref(&state.pool, category_id).await?
    else {
        return Ok(None);
    };
    state
        .caches
        .catalog
        .put(&keys::category(category_id), version, &category)
        .await;
    Ok(Some(category))
}

async fn stock_from_postgres(
    state: &AppState,
    variant_ids: &[Uuid],
) -> Result<HashMap<Uuid, StockEntry>, ApiError> {
    if variant_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = projections::stock::stock_entries(&state.pool, variant_ids).await?;
    let mut stock = HashMap::with_capacity(rows.len());
    for (variant_id, version, entry) in rows {
        state
            .caches
            .stock
            .put(&keys::stock(variant_id), version, &entry)
            .await;
        stock.insert(variant_id, entry);
    }
    Ok(stock)
}

/// One variant's stock, from the cache or Postgres.
pub async fn stock_entry(
    state: &AppState,
    variant_id: Uuid,
) -> Result<Option<StockEntry>, ApiError> {
    if let Some(hit) = state
        .caches
        .stock
        .get::<StockEntry>(&keys::stock(variant_id))
        .await
    {
        return Ok(Some(hit.body));
    }
    Ok(stock_from_postgres(state, &[variant_id])
        .await?
        .remove(&variant_id))
}
