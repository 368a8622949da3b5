//! Reads of the catalog and stock read models: product detail, listings and
//! search, the category tree, and stock levels. Plain SQL over the
//! projections' tables; the HTTP layer adds the cache and the access rules.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::stock::StockEntry;

/// Recursive walks stop here even if concurrent moves left a cycle behind.
const MAX_DEPTH: i32 = 64;
/// How many levels the category tree may have: a category has fewer
/// ancestors than this, so a path read up to [`MAX_DEPTH`] levels is whole.
pub const MAX_CATEGORY_DEPTH: usize = MAX_DEPTH as usize;

/// A category as other resources show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct CategoryRef {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
}

/// A variant as the catalog holds it, without stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VariantCore {
    pub id: Uuid,
    pub sku: String,
    pub title: String,
    pub price_cents: i64,
    pub currency: String,
    #[schema(value_type = Object)]
    pub attributes: serde_json::Value,
}

/// A product without stock and with only its category's id: what the
/// product cache holds, at the product's version. Category and stock
/// change on their own and are added at read time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductCore {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub description: String,
    pub status: String,
    pub category_id: Option<Uuid>,
    pub variants: Vec<VariantCore>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What the public may know about a variant's stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PublicStock {
    pub available: i64,
    pub in_stock: bool,
}

impl PublicStock {
    pub fn of(entry: Option<&StockEntry>) -> Self {
        let available = entry.map_or(0, StockEntry::available);
        Self {
            available,
            in_stock: available > 0,
        }
    }
}

/// A variant on the product page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VariantDetail {
    pub id: Uuid,
    pub sku: String,
    pub title: String,
    pub price_cents: i64,
    pub currency: String,
    #[schema(value_type = Object)]
    pub attributes: serde_json::Value,
    pub stock: PublicStock,
}

/// The product page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProductDetail {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub description: String,
    /// `active` or `draft`.
    pub status: String,
    pub category: Option<CategoryRef>,
    pub variants: Vec<VariantDetail>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ProductDetail {
    /// Puts a product together from its parts, however each was found.
    pub fn assemble(
        core: ProductCore,
        category: Option<CategoryRef>,
        stock: &HashMap<Uuid, StockEntry>,
    ) -> Self {
        let variants = core
            .variants
            .into_iter()
            .map(|variant| VariantDetail {
                stock: PublicStock::of(stock.get(&variant.id)),
                id: variant.id,
                sku: variant.sku,
                title: variant.title,
                price_cents: variant.price_cents,
                currency: variant.currency,
                attributes: variant.attributes,
            })
            .collect();
        Self {
            id: core.id,
            slug: core.slug,
            name: core.name,
            description: core.description,
            status: core.status,
            category,
            variants,
            created_at: core.created_at,
            updated_at: core.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct ProductCoreRow {
    id: Uuid,
    slug: String,
    name: String,
    description: String,
    status: String,
    category_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
    variants: sqlx::types::Json<Vec<VariantCore>>,
}

/// A product that was not deleted (drafts included), with its version. One
/// statement, so the product and its variants come from one snapshot.
pub async fn product_core(
    pool: &PgPool,
    product_id: Uuid,
) -> Result<Option<(i64, ProductCore)>, sqlx::Error> {
    let row: Option<ProductCoreRow> = sqlx::query_as(
        "SELECT p.id, p.slug, p.name, p.description, p.status, p.category_id, p.created_at, \
                p.updated_at, p.version, \
                coalesce((SELECT json_agg(json_build_object('id', v.id, 'sku', v.sku, 'title', v.title, \
                                  'price_cents', v.price_cents, 'currency', v.currency, \
                                  'attributes', v.attributes) ORDER BY v.ordinal) \
                          FROM catalog_variants v WHERE v.product_id = p.id), '[]'::json) AS variants \
         FROM catalog_products p WHERE p.id = $1 AND NOT p.deleted",
    )
    .bind(product_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| {
        (
            row.version,
            ProductCore {
                id: row.id,
                slug: row.slug,
                name: row.name,
                description: row.description,
                status: row.status,
                category_id: row.category_id,
                variants: row.variants.0,
                created_at: row.created_at,
                updated_at: row.updated_at,
            },
        )
    }))
}

/// The product currently called `slug` (deleted ones excluded).
pub async fn product_id_by_slug(pool: &PgPool, slug: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM catalog_products WHERE slug = $1 AND NOT deleted LIMIT 1")
        .bind(slug)
        .fetch_optional(pool)
        .await
}

/// A category's reference with its version.
pub async fn category_ref(
    pool: &PgPool,
    category_id: Uuid,
) -> Result<Option<(i64, CategoryRef)>, sqlx::Error> {
    let row: Option<(i64, Uuid, String, String)> =
        sqlx::query_as("SELECT version, id, slug, name FROM catalog_categories WHERE id = $1")
            .bind(category_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(version, id, slug, name)| (version, CategoryRef { id, slug, name })))
}

/// A variant's stock with its version.
pub async fn stock_level(
    pool: &PgPool,
    variant_id: Uuid,
) -> Result<Option<(i64, StockEntry)>, sqlx::Error> {
    let rows = crate::stock::stock_entries(pool, &[variant_id]).await?;
    Ok(rows
        .into_iter()
        .next()
        .map(|(_, version, entry)| (version, entry)))
}

// ---------------------------------------------------------------- listing

/// The orders a listing can be sorted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingSort {
    Newest,
    PriceAsc,
    PriceDesc,
    NameAsc,
    NameDesc,
    /// Best full-text match first; newest first without a search.
    Relevance,
}

impl ListingSort {
    /// The wire names, as the `sort` parameter takes them.
    pub const NAMES: [&'static str; 6] = [
        "newest",
        "price_asc",
        "price_desc",
        "name_asc",
        "name_desc",
        "relevance",
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "newest" => Self::Newest,
            "price_asc" => Self::PriceAsc,
            "price_desc" => Self::PriceDesc,
            "name_asc" => Self::NameAsc,
            "name_desc" => Self::NameDesc,
            "relevance" => Self::Relevance,
            _ => return None,
        })
    }
}

/// Which public products a listing shows.
#[derive(Debug, Clone, Default)]
pub struct ListingFilter {
    /// Full-text search over name (ranked higher) and description.
    pub search: Option<String>,
    /// Only products filed under one of these categories.
    pub category_ids: Option<Vec<Uuid>>,
    /// Lowest variant price at least this (cents).
    pub min_price_cents: Option<i64>,
    /// Lowest variant price at most this (cents).
    pub max_price_cents: Option<i64>,
    /// Only products with at least one variant available.
    pub in_stock_only: bool,
}

/// A product in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ListingItem {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    /// The lowest price among the product's variants.
    pub price_cents: i64,
    pub currency: String,
    pub in_stock: bool,
    pub category_slug: Option<String>,
}

/// The in-stock filter: a semi-join over the variants with stock.
const IN_STOCK: &str =
    "EXISTS (SELECT 1 FROM catalog_variants v JOIN stock_levels s ON s.variant_id = v.id \
                        WHERE v.product_id = p.id AND s.on_hand > s.reserved)";

/// The in-stock column. A correlated aggregate rather than `EXISTS`, which
/// Postgres would turn into a hash of every in-stock product even for a
/// page of twenty.
const IN_STOCK_COLUMN: &str = "coalesce((SELECT bool_or(s.on_hand > s.reserved) \
    FROM catalog_variants v JOIN stock_levels s ON s.variant_id = v.id WHERE v.product_id = p.id), false)";

fn push_filter(query: &mut QueryBuilder<'_, Postgres>, filter: &ListingFilter) {
    query.push(" WHERE p.status = 'active' AND NOT p.deleted");
    if let Some(search) = &filter.search {
        query
            .push(" AND p.search @@ websearch_to_tsquery('english', ")
            .push_bind(search.clone())
            .push(")");
    }
    if let Some(ids) = &filter.category_ids {
        query
            .push(" AND p.category_id = ANY(")
            .push_bind(ids.clone())
            .push(")");
    }
    if let Some(min) = filter.min_price_cents {
        query.push(" AND p.min_price_cents >= ").push_bind(min);
    }
    if let Some(max) = filter.max_price_cents {
        query.push(" AND p.min_price_cents <= ").push_bind(max);
    }
    if filter.in_stock_only {
        query.push(" AND ").push(IN_STOCK);
    }
}

/// One page of public products and how many match in all.
pub async fn list_products(
    pool: &PgPool,
    filter: &ListingFilter,
    sort: ListingSort,
    limit: i64,
    offset: i64,
) -> Result<(Vec<ListingItem>, u64), sqlx::Error> {
    let mut count = QueryBuilder::new("SELECT count(*) FROM catalog_products p");
    push_filter(&mut count, filter);
    let total: i64 = count.build_query_scalar().fetch_one(pool).await?;

    let mut page = QueryBuilder::new(
        "SELECT p.id, p.slug, p.name, p.min_price_cents AS price_cents, p.currency, ",
    );
    page.push(IN_STOCK_COLUMN).push(
        " AS in_stock, c.slug AS category_slug \
         FROM catalog_products p LEFT JOIN catalog_categories c ON c.id = p.category_id",
    );
    push_filter(&mut page, filter);
    page.push(" ORDER BY ");
    match (sort, &filter.search) {
        (ListingSort::Relevance, Some(search)) => {
            page.push("ts_rank(p.search, websearch_to_tsquery('english', ")
                .push_bind(search.clone())
                .push(")) DESC, p.created_at DESC, p.id DESC");
        }
        (ListingSort::Newest | ListingSort::Relevance, _) => {
            page.push("p.created_at DESC, p.id DESC");
        }
        (ListingSort::PriceAsc, _) => {
            page.push("p.min_price_cents ASC, p.id ASC");
        }
        (ListingSort::PriceDesc, _) => {
            page.push("p.min_price_cents DESC, p.id DESC");
        }
        (ListingSort::NameAsc, _) => {
            page.push("p.name ASC, p.id ASC");
        }
        (ListingSort::NameDesc, _) => {
            page.push("p.name DESC, p.id DESC");
        }
    }
    page.push(" LIMIT ")
        .push_bind(limit)
        .push(" OFFSET ")
        .push_bind(offset);
    let items = page.build_query_as().fetch_all(pool).await?;
    Ok((items, u64::try_from(total).unwrap_or(0)))
}

// ------------------------------------------------------------- categories

/// A node of the category tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CategoryNode {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    #[schema(no_recursion)]
    pub children: Vec<CategoryNode>,
}

/// The whole tree, roots and siblings sorted by name. A category whose
/// parent is unknown shows as a root rather than disappearing.
pub async fn category_tree(pool: &PgPool) -> Result<Vec<CategoryNode>, sqlx::Error> {
    let rows: Vec<(Uuid, String, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT id, slug, name, parent_id FROM catalog_categories ORDER BY name, id",
    )
    .fetch_all(pool)
    .await?;
    let known: std::collections::HashSet<Uuid> = rows.iter().map(|row| row.0).collect();
    let mut children: HashMap<Option<Uuid>, Vec<CategoryRef>> = HashMap::new();
    for (id, slug, name, parent_id) in rows {
        let parent = parent_id.filter(|parent| known.contains(parent));
        children
            .entry(parent)
            .or_default()
            .push(CategoryRef { id, slug, name });
    }
    fn build(
        parent: Option<Uuid>,
        children: &HashMap<Option<Uuid>, Vec<CategoryRef>>,
        depth: i32,
    ) -> Vec<CategoryNode> {
        if depth > MAX_DEPTH {
            return Vec::new();
        }
        children
            .get(&parent)
            .map(|refs| {
                refs.iter()
                    .map(|category| CategoryNode {
                        id: category.id,
                        slug: category.slug.clone(),
                        name: category.name.clone(),
                        children: build(Some(category.id), children, depth + 1),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    Ok(build(None, &children, 0))
}

/// A category's page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CategoryPage {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub parent: Option<CategoryRef>,
    /// From the root down to this category, both included.
    pub path: Vec<CategoryRef>,
    /// The categories directly under this one, by name.
    pub children: Vec<CategoryRef>,
}

/// The category currently called `slug`.
pub async fn category_id_by_slug(pool: &PgPool, slug: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM catalog_categories WHERE slug = $1 LIMIT 1")
        .bind(slug)
        .fetch_optional(pool)
        .await
}

/// Whether a category exists in the read model.
pub async fn category_exists(pool: &PgPool, category_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM catalog_categories WHERE id = $1)")
        .bind(category_id)
        .fetch_one(pool)
        .await
}

/// The category and its ancestors, root first.
pub async fn category_path(
    pool: &PgPool,
    category_id: Uuid,
) -> Result<Vec<CategoryRef>, sqlx::Error> {
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "WITH RECURSIVE up (id, slug, name, parent_id, depth) AS ( \
             SELECT id, slug, name, parent_id, 0 FROM catalog_categories WHERE id = $1 \
             UNION ALL \
             SELECT c.id, c.slug, c.name, c.parent_id, up.depth + 1 \
             FROM catalog_categories c JOIN up ON c.id = up.parent_id WHERE up.depth < $2) \
         SELECT id, slug, name FROM up ORDER BY depth DESC",
    )
    .bind(category_id)
    .bind(MAX_DEPTH)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, slug, name)| CategoryRef { id, slug, name })
        .collect())
}

/// The ids of a category's ancestors (not the category itself): what the
/// `Category` aggregate needs to refuse a move that would make a cycle.
pub async fn category_ancestors(
    pool: &PgPool,
    category_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let path = category_path(pool, category_id).await?;
    Ok(path
        .into_iter()
        .map(|category| category.id)
        .filter(|id| *id != category_id)
        .collect())
}

/// The category and every category below it.
pub async fn category_descendants(
    pool: &PgPool,
    category_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    // UNION (not UNION ALL) drops repeated rows, so even a cycle ends.
    sqlx::query_scalar(
        "WITH RECURSIVE down (id) AS ( \
             SELECT id FROM catalog_categories WHERE id = $1 \
             UNION \
             SELECT c.id FROM catalog_categories c JOIN down ON c.parent_id = down.id) \
         SELECT id FROM down",
    )
    .bind(category_id)
    .fetch_all(pool)
    .await
}

/// The category page of `slug`: parent, path and direct children.
pub async fn category_by_slug(
    pool: &PgPool,
    slug: &str,
) -> Result<Option<CategoryPage>, sqlx::Error> {
    match category_id_by_slug(pool, slug).await? {
        Some(category_id) => category_page(pool, category_id).await,
        None => Ok(None),
    }
}

/// The category page of one category.
pub async fn category_page(
    pool: &PgPool,
    category_id: Uuid,
) -> Result<Option<CategoryPage>, sqlx::Error> {
    let path = category_path(pool, category_id).await?;
    let Some(this) = path.last().cloned() else {
        return Ok(None);
    };
    let parent = path.len().checked_sub(2).and_then(|i| path.get(i)).cloned();
    let children: Vec<CategoryRef> = sqlx::query_as(
        "SELECT id, slug, name FROM catalog_categories WHERE parent_id = $1 AND id <> $1 ORDER BY name, id",
    )
    .bind(category_id)
    .fetch_all(pool)
    .await?;
    Ok(Some(CategoryPage {
        id: this.id,
        slug: this.slug,
        name: this.name,
        parent,
        path,
        children,
    }))
}
