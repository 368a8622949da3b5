//! Product routes: the public listing and product page, and the admin's
//! create, update and delete, each written as `Product` commands (plus one
//! `InventoryItem` registration per new variant).

use actix_web::http::header::ContentType;
use actix_web::{delete, get, post, put, web, HttpRequest, HttpResponse};
use chrono::Utc;
use domain::catalog::{NewVariant, ProductCommand, ProductStatus, VariantChange};
use domain::inventory::{InventoryCommand, InventoryItem};
use domain::values::{Currency, Money, Name, Sku, Slug};
use futures_util::future::join_all;
use projections::cache::keys;
use projections::catalog_queries::{self, ListingFilter, ListingItem, ListingSort, ProductDetail};
use projections::GlobalPosition;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::claims::{self, Claim, ClaimKind, SlugWish};
use super::{
    check_description, metadata_for, product_rejection, reads, settle, FieldErrors, Viewer,
};
use crate::auth::AuthUser;
use crate::event_store::{Executed, Metadata};
use crate::http::extract::{Json, Query};
use crate::http::idempotency::IdempotencyKey;
use crate::http::paging::{PageMeta, PageQuery, Paging};
use crate::http::problem::ApiError;
use crate::state::AppState;

/// At most this many variants per product and request.
const MAX_VARIANTS: usize = 100;
/// The largest initial stock of one variant.
const MAX_INITIAL_STOCK: i64 = 1_000_000_000;
/// The longest search text.
const MAX_SEARCH_CHARS: usize = 200;

// ------------------------------------------------------------------ DTOs

/// A variant of a new product.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewVariantRequest {
    /// 1 to 64 characters of `A-Z a-z 0-9 . _ -`; unique across all variants.
    pub sku: Option<String>,
    pub title: Option<String>,
    /// Minor units (cents), from 0 to 10,000,000,000.
    pub price_cents: Option<i64>,
    /// ISO 4217; every variant of a product has the same currency.
    pub currency: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Map<String, Value>>,
    /// Units on the shelf to start with (default 0).
    pub initial_stock: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateProductRequest {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Made from the name when absent (`"Red Shoe!"` → `red-shoe`, with a
    /// `-2`, `-3`... suffix when taken).
    pub slug: Option<String>,
    pub category_id: Option<Uuid>,
    /// `active` (the default) or `draft`.
    pub status: Option<String>,
    pub variants: Option<Vec<NewVariantRequest>>,
}

/// A variant in an update: `id` (or an existing `sku`) names one to change;
/// anything else adds a new variant. SKUs cannot be changed.
#[derive(Debug, Deserialize, ToSchema)]
pub struct VariantUpdateRequest {
    pub id: Option<Uuid>,
    pub sku: Option<String>,
    pub title: Option<String>,
    /// Minor units (cents), from 0 to 10,000,000,000.
    pub price_cents: Option<i64>,
    pub currency: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Map<String, Value>>,
    /// For a new variant only: units on the shelf to start with.
    pub initial_stock: Option<i64>,
}

/// Any subset of the product's fields; absent fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateProductRequest {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A new slug; renaming alone keeps the old one, so links stay valid.
    pub slug: Option<String>,
    /// `null` files the product under no category.
    #[serde(default, deserialize_with = "super::absent_null_or")]
    #[schema(value_type = Option<Uuid>)]
    pub category_id: Option<Option<Uuid>>,
    pub status: Option<String>,
    pub variants: Option<Vec<VariantUpdateRequest>>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ProductListQuery {
    /// From 1.
    pub page: Option<u32>,
    /// 1 to 100 (larger values are capped at 100); default 20.
    pub per_page: Option<u32>,
    /// Full-text search over name and description.
    pub q: Option<String>,
    /// A category slug; its descendants are included.
    pub category: Option<String>,
    /// Lowest variant price at least this many cents.
    pub min_price: Option<i64>,
    /// Lowest variant price at most this many cents.
    pub max_price: Option<i64>,
    /// `true`: only products with a variant in stock.
    pub in_stock: Option<bool>,
    /// `newest`, `price_asc`, `price_desc`, `name_asc`, `name_desc` or
    /// `relevance` (the default with `q`; `newest` without).
    pub sort: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductListing {
    pub items: Vec<ListingItem>,
    pub page: PageMeta,
}

// ----------------------------------------------------------- validation

fn parse_status(errors: &mut FieldErrors, status: Option<String>) -> Option<ProductStatus> {
    match status.as_deref() {
        None => None,
        Some("active") => Some(ProductStatus::Active),
        Some("draft") => Some(ProductStatus::Draft),
        Some(_) => {
            errors.add("status", "must be \"active\" or \"draft\"");
            None
        }
    }
}

fn parse_slug(errors: &mut FieldErrors, slug: Option<String>) -> Option<Slug> {
    slug.and_then(|slug| errors.check("slug", Slug::try_from(slug)))
}

fn parse_initial_stock(errors: &mut FieldErrors, field: String, units: Option<i64>) -> u32 {
    match units {
        None => 0,
        Some(units) if (0..=MAX_INITIAL_STOCK).contains(&units) => {
            u32::try_from(units).unwrap_or(0)
        }
        Some(_) => {
            errors.add(field, format!("must be from 0 to {MAX_INITIAL_STOCK}"));
            0
        }
    }
}

/// The highest unit price, in minor units (100 million in major units): a
/// line of the most units a cart line holds stays far inside `i64`, and so
/// do the totals of carts and orders built from such lines.
pub const MAX_PRICE_CENTS: i64 = 10_000_000_000;

/// Whether `cents` is a unit price a variant may have; adds the error when not.
fn check_price_range(errors: &mut FieldErrors, field: String, cents: i64) -> bool {
    if (0..=MAX_PRICE_CENTS).contains(&cents) {
        return true;
    }
    errors.add(field, format!("must be from 0 to {MAX_PRICE_CENTS}"));
    false
}

fn parse_price(
    errors: &mut FieldErrors,
    prefix: &str,
    cents: Option<i64>,
    currency: Option<Currency>,
) -> Option<Money> {
    let cents = errors.require(&format!("{prefix}.price_cents"), cents)?;
    if !check_price_range(errors, format!("{prefix}.price_cents"), cents) {
        return None;
    }
    errors.check(
        format!("{prefix}.price_cents"),
        Money::new(cents, currency?),
    )
}

/// A new variant with its stock to start with.
struct VariantDraft {
    variant: NewVariant,
    initial_stock: u32,
    field: String,
}

/// A create request, checked.
struct NewProduct {
    name: Name,
    description: String,
    slug: SlugWish,
    category_id: Option<Uuid>,
    status: ProductStatus,
    variants: Vec<VariantDraft>,
}

impl NewProduct {
    /// Every field checked before any I/O; all problems reported together.
    fn parse(
        request: CreateProductRequest,
        variant_id: impl Fn(usize) -> Uuid,
    ) -> Result<Self, ApiError> {
        let mut errors = FieldErrors::default();
        let name = errors
            .require("name", request.name)
            .and_then(|name| errors.check("name", Name::try_from(name)));
        let description = errors
            .check(
                "description",
                check_description(request.description.as_deref().unwrap_or("")),
            )
            .unwrap_or_default();
        let slug = parse_slug(&mut errors, request.slug);
        let status = parse_status(&mut errors, request.status).unwrap_or(ProductStatus::Active);
        let variants = errors
            .require("variants", request.variants)
            .unwrap_or_default();
        if variants.is_empty() {
            errors.add("variants", "a product needs at least one variant");
        }
        if variants.len() > MAX_VARIANTS {
            errors.add("variants", format!("at most {MAX_VARIANTS} variants"));
        }
        let mut drafts = Vec::with_capacity(variants.len());
        let mut skus = std::collections::HashSet::new();
        let mut product_currency: Option<Currency> = None;
        for (index, variant) in variants.into_iter().enumerate() {
            let prefix = format!("variants[{index}]");
            let sku = errors
                .require(&format!("{prefix}.sku"), variant.sku)
                .and_then(|sku| errors.check(format!("{prefix}.sku"), Sku::try_from(sku)));
            if let Some(sku) = &sku {
                if !skus.insert(sku.clone()) {
                    errors.add(format!("{prefix}.sku"), "appears twice in this request");
                }
            }
            let title = errors
                .require(&format!("{prefix}.title"), variant.title)
                .and_then(|title| errors.check(format!("{prefix}.title"), Name::try_from(title)));
            let currency = errors
                .require(&format!("{prefix}.currency"), variant.currency)
                .and_then(|c| errors.check(format!("{prefix}.currency"), Currency::try_from(c)));
            if let Some(currency) = &currency {
                match &product_currency {
                    None => product_currency = Some(currency.clone()),
                    Some(first) if first != currency => errors.add(
                        format!("{prefix}.currency"),
                        format!("every variant must be priced in {first}"),
                    ),
                    Some(_) => {}
                }
            }
            let price = parse_price(&mut errors, &prefix, variant.price_cents, currency);
            let initial_stock = parse_initial_stock(
                &mut errors,
                format!("{prefix}.initial_stock"),
                variant.initial_stock,
            );
            if let (Some(sku), Some(title), Some(price)) = (sku, title, price) {
                drafts.push(VariantDraft {
                    variant: NewVariant {
                        variant_id: variant_id(index),
                        sku,
                        title,
                        price,
                        attributes: variant.attributes.unwrap_or_default(),
                    },
                    initial_stock,
                    field: prefix,
                });
            }
        }
        let slug = match (slug, &name) {
            (Some(slug), _) => Some(SlugWish::Exactly(slug)),
            (None, Some(name)) => errors
                .check("slug", Slug::from_name(name.as_str()))
                .map(SlugWish::FromName),
            (None, None) => None,
        };
        errors.into_result()?;
        match (name, slug) {
            (Some(name), Some(slug)) => Ok(Self {
                name,
                description,
                slug,
                category_id: request.category_id,
                status,
                variants: drafts,
            }),
            // Every None above recorded an error, so this is unreachable.
            _ => Err(ApiError::invalid_field("name", "is required")),
        }
    }
}

/// An update request, checked as far as it can be without the product.
struct ProductPatch {
    name: Option<Name>,
    description: Option<String>,
    slug: Option<Slug>,
    category_id: Option<Option<Uuid>>,
    status: Option<ProductStatus>,
    variants: Vec<VariantPatch>,
}

struct VariantPatch {
    field: String,
    id: Option<Uuid>,
    sku: Option<Sku>,
    title: Option<Name>,
    price_cents: Option<i64>,
    currency: Option<Currency>,
    attributes: Option<Map<String, Value>>,
    initial_stock: u32,
}

impl ProductPatch {
    fn parse(request: UpdateProductRequest) -> Result<Self, ApiError> {
        let mut errors = FieldErrors::default();
        let name = request
            .name
            .and_then(|name| errors.check("name", Name::try_from(name)));
        let description = request
            .description
            .and_then(|text| errors.check("description", check_description(&text)));
        let slug = parse_slug(&mut errors, request.slug);
        let status = parse_status(&mut errors, request.status);
        let requested = request.variants.unwrap_or_default();
        if requested.len() > MAX_VARIANTS {
            errors.add("variants", format!("at most {MAX_VARIANTS} variants"));
        }
        let mut variants = Vec::with_capacity(requested.len());
        for (index, variant) in requested.into_iter().enumerate() {
            let field = format!("variants[{index}]");
            let sku = variant
                .sku
                .and_then(|sku| errors.check(format!("{field}.sku"), Sku::try_from(sku)));
            let title = variant
                .title
                .and_then(|title| errors.check(format!("{field}.title"), Name::try_from(title)));
            let currency = variant
                .currency
                .and_then(|c| errors.check(format!("{field}.currency"), Currency::try_from(c)));
            if let Some(cents) = variant.price_cents {
                check_price_range(&mut errors, format!("{field}.price_cents"), cents);
            }
            let initial_stock = parse_initial_stock(
                &mut errors,
                format!("{field}.initial_stock"),
                variant.initial_stock,
            );
            variants.push(VariantPatch {
                field,
                id: variant.id,
                sku,
                title,
                price_cents: variant.price_cents,
                currency,
                attributes: variant.attributes,
                initial_stock,
            });
        }
        errors.into_result()?;
        Ok(Self {
            name,
            description,
            slug,
            category_id: request.category_id,
            status,
            variants,
        })
    }
}

fn check_listing(
    query: ProductListQuery,
) -> Result<(Paging, ListingFilter, ListingSort, Option<String>), ApiError> {
    let paging = Paging::try_from(PageQuery {
        page: query.page,
        per_page: query.per_page,
    })?;
    let search = query
        .q
        .map(|q| q.trim().to_owned())
        .filter(|q| !q.is_empty());
    let sort = match query.sort.as_deref() {
        None if search.is_some() => ListingSort::Relevance,
        None => ListingSort::Newest,
        Some(name) => ListingSort::parse(name).ok_or_else(|| {
            ApiError::bad_field(
                "sort",
                format!("must be one of {}", ListingSort::NAMES.join(", ")),
            )
        })?,
    };
    let mut errors = FieldErrors::default();
    if search
        .as_ref()
        .is_some_and(|q| q.chars().count() > MAX_SEARCH_CHARS)
    {
        errors.add(
            "q",
            format!("must be at most {MAX_SEARCH_CHARS} characters"),
        );
    }
    for (field, value) in [
        ("min_price", query.min_price),
        ("max_price", query.max_price),
    ] {
        if value.is_some_and(|cents| cents < 0) {
            errors.add(field, "must not be negative");
        }
    }
    if let (Some(min), Some(max)) = (query.min_price, query.max_price) {
        if min > max {
            errors.add("min_price", "must not be above max_price");
        }
    }
    errors.into_result()?;
    let filter = ListingFilter {
        search,
        category_ids: None,
        min_price_cents: query.min_price,
        max_price_cents: query.max_price,
        in_stock_only: query.in_stock == Some(true),
    };
    Ok((paging, filter, sort, query.category))
}

// ------------------------------------------------------------- handlers

/// Public products, filtered, searched, sorted and paged.
#[utoipa::path(context_path = SCOPE, tag = "catalog", params(ProductListQuery), responses(
    (status = 200, body = ProductListing),
    (status = 400, body = crate::http::problem::Problem, description = "bad paging or unknown sort"),
    (status = 404, body = crate::http::problem::Problem, description = "unknown category"),
    (status = 422, body = crate::http::problem::Problem, description = "bad price range"),
))]
#[get("/get-products")]
pub async fn get_products(
    state: web::Data<AppState>,
    query: Query<ProductListQuery>,
) -> Result<HttpResponse, ApiError> {
    let (paging, mut filter, sort, category) = check_listing(query.0)?;
    if let Some(slug) = category {
        let category_id = catalog_queries::category_id_by_slug(&state.pool, &slug)
            .await?
            .ok_or_else(|| ApiError::not_found("category"))?;
        filter.category_ids =
            Some(catalog_queries::category_descendants(&state.pool, category_id).await?);
    }
    let (items, total) =
        catalog_queries::list_products(&state.pool, &filter, sort, paging.limit(), paging.offset())
            .await?;
    Ok(HttpResponse::Ok().json(ProductListing {
        items,
        page: paging.meta(total),
    }))
}

/// A product page with each variant's public stock. Drafts only for admins.
#[utoipa::path(context_path = SCOPE, tag = "catalog", params(("slug" = String, Path)), responses(
    (status = 200, body = ProductDetail),
    (status = 404, body = crate::http::problem::Problem),
))]
#[get("/get-product/{slug}")]
pub async fn get_product(
    state: web::Data<AppState>,
    user: Option<AuthUser>,
    slug: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    reads::product_page_by_slug(&state, &slug, Viewer::of(user))
        .await?
        .map(|page| {
            HttpResponse::Ok()
                .content_type(ContentType::json())
                .body(page)
        })
        .ok_or_else(|| ApiError::not_found("product"))
}

/// Adds a product with its variants (each gets its stock tracked).
#[utoipa::path(context_path = SCOPE, tag = "catalog", request_body = CreateProductRequest,
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 201, body = ProductDetail),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "slug or SKU taken"),
    (status = 422, body = crate::http::problem::Problem),
))]
#[post("/create-product")]
pub async fn create_product(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: Option<IdempotencyKey>,
    body: Json<CreateProductRequest>,
) -> Result<HttpResponse, ApiError> {
    // With an Idempotency-Key, a retry after a crash rebuilds the same ids,
    // so it finds the product instead of making a second one.
    let product_id = key
        .as_ref()
        .map_or_else(Uuid::now_v7, |key| key.derive_id(user.id, "create-product"));
    let variant_id = |index: usize| {
        key.as_ref().map_or_else(Uuid::now_v7, |key| {
            key.derive_id(user.id, &format!("create-product:variant:{index}"))
        })
    };
    let product = NewProduct::parse(body.0, variant_id)?;
    if let Some(category_id) = product.category_id {
        ensure_category(&state, category_id).await?;
    }
    let sku_claims: Vec<Claim> = product
        .variants
        .iter()
        .map(|draft| {
            Claim::new(
                ClaimKind::Sku,
                draft.variant.sku.as_str(),
                format!("{}.sku", draft.field),
            )
        })
        .collect();
    let claimed = claims::claim(
        &state.pool,
        product_id,
        &sku_claims,
        Some((ClaimKind::ProductSlug, product.slug.clone(), "slug")),
    )
    .await?;
    let Some(slug) = claimed.slug.clone() else {
        claims::release(&state.pool, product_id, claimed).await;
        return Err(ApiError::internal(anyhow::anyhow!(
            "slug claim returned no slug"
        )));
    };
    let metadata = metadata_for(&request, &user, key.as_ref());
    let command = ProductCommand::Create {
        product_id,
        name: product.name,
        description: product.description,
        slug,
        category_id: product.category_id,
        status: product.status,
        variants: product.variants.iter().map(|d| d.variant.clone()).collect(),
        created_at: Utc::now(),
    };
    let executed = match state
        .products
        .execute(&product_id.to_string(), command, metadata.clone())
        .await
    {
        Ok(executed) => executed,
        Err(error) => {
            claims::release(&state.pool, product_id, claimed).await;
            return Err(ApiError::from_command(error, product_rejection));
        }
    };
    let stock_position = register_stock(&state, &product.variants, &metadata).await?;
    finish_write(&state, product_id, &executed, stock_position).await?;
    let detail = reads::product_detail(&state, product_id, Viewer::Admin)
        .await?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("created product is not readable")))?;
    Ok(HttpResponse::Created().json(detail))
}

/// Changes any subset of a product; new variants get their stock tracked.
#[utoipa::path(context_path = SCOPE, tag = "catalog", request_body = UpdateProductRequest, params(("product_id" = Uuid, Path)),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = ProductDetail),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
    (status = 409, body = crate::http::problem::Problem, description = "slug or SKU taken"),
    (status = 422, body = crate::http::problem::Problem),
))]
#[put("/update-product/{product_id}")]
pub async fn update_product(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    key: Option<IdempotencyKey>,
    product_id: web::Path<Uuid>,
    body: Json<UpdateProductRequest>,
) -> Result<HttpResponse, ApiError> {
    let product_id = product_id.into_inner();
    let patch = ProductPatch::parse(body.0)?;
    if let Some(Some(category_id)) = patch.category_id {
        ensure_category(&state, category_id).await?;
    }
    let current = load_product(&state, product_id).await?;
    if !current.exists() || current.is_deleted() {
        return Err(ApiError::not_found("product"));
    }
    let (variant_changes, new_variants) = resolve_variants(&current, patch.variants)?;

    let sku_claims: Vec<Claim> = new_variants
        .iter()
        .map(|draft| {
            Claim::new(
                ClaimKind::Sku,
                draft.variant.sku.as_str(),
                format!("{}.sku", draft.field),
            )
        })
        .collect();
    let slug_claim = patch
        .slug
        .clone()
        .map(|slug| (ClaimKind::ProductSlug, SlugWish::Exactly(slug), "slug"));
    let claimed = claims::claim(&state.pool, product_id, &sku_claims, slug_claim).await?;
    let metadata = metadata_for(&request, &user, key.as_ref());
    let command = ProductCommand::Update {
        name: patch.name,
        description: patch.description,
        slug: patch.slug,
        category_id: patch.category_id,
        status: patch.status,
        variant_changes,
        new_variants: new_variants.iter().map(|d| d.variant.clone()).collect(),
        updated_at: Utc::now(),
    };
    let executed = match state
        .products
        .execute(&product_id.to_string(), command, metadata.clone())
        .await
    {
        Ok(executed) => executed,
        Err(error) => {
            claims::release(&state.pool, product_id, claimed).await;
            return Err(ApiError::from_command(error, product_rejection));
        }
    };
    let stock_position = register_stock(&state, &new_variants, &metadata).await?;
    finish_write(&state, product_id, &executed, stock_position).await?;
    let detail = reads::product_detail(&state, product_id, Viewer::Admin)
        .await?
        .ok_or_else(|| ApiError::not_found("product"))?;
    Ok(HttpResponse::Ok().json(detail))
}

/// Takes a product out of the catalog; its history stays in the event store.
#[utoipa::path(context_path = SCOPE, tag = "catalog", params(("product_id" = Uuid, Path)),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 204, description = "deleted"),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 403, body = crate::http::problem::Problem), (status = 404, body = crate::http::problem::Problem),
))]
#[delete("/delete-product/{product_id}")]
pub async fn delete_product(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    product_id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let product_id = product_id.into_inner();
    let metadata = metadata_for(&request, &user, None);
    let executed = state
        .products
        .execute(
            &product_id.to_string(),
            ProductCommand::Delete {
                deleted_at: Utc::now(),
            },
            metadata,
        )
        .await
        .map_err(|error| ApiError::from_command(error, product_rejection))?;
    finish_write(&state, product_id, &executed, None).await?;
    Ok(HttpResponse::NoContent().finish())
}

// -------------------------------------------------------------- helpers

async fn ensure_category(state: &AppState, category_id: Uuid) -> Result<(), ApiError> {
    if catalog_queries::category_exists(&state.pool, category_id).await? {
        Ok(())
    } else {
        Err(ApiError::invalid_field("category_id", "no such category"))
    }
}

/// The product as its events make it now.
async fn load_product(
    state: &AppState,
    product_id: Uuid,
) -> Result<domain::catalog::Product, ApiError> {
    let mut product = domain::catalog::Product::default();
    state
        .store
        .catch_up(&product_id.to_string(), &mut product, 0)
        .await
        .map_err(ApiError::internal)?;
    Ok(product)
}

/// Splits the requested variants into changes of existing ones and new ones.
fn resolve_variants(
    current: &domain::catalog::Product,
    patches: Vec<VariantPatch>,
) -> Result<(Vec<VariantChange>, Vec<VariantDraft>), ApiError> {
    let mut errors = FieldErrors::default();
    let mut changes = Vec::new();
    let mut added = Vec::new();
    let product_currency = current.currency().cloned();
    for patch in patches {
        let existing = match (patch.id, &patch.sku) {
            (Some(id), _) => match current.variant(id) {
                Some(variant) => Some(variant),
                None => {
                    errors.add(
                        format!("{}.id", patch.field),
                        "the product has no such variant",
                    );
                    continue;
                }
            },
            (None, Some(sku)) => current.variants().iter().find(|v| &v.sku == sku),
            (None, None) => None,
        };
        if let Some(existing) = existing {
            if patch.sku.as_ref().is_some_and(|sku| sku != &existing.sku) {
                errors.add(format!("{}.sku", patch.field), "SKUs cannot be changed");
                continue;
            }
            let currency = patch
                .currency
                .clone()
                .unwrap_or_else(|| existing.price.currency().clone());
            let price = match patch.price_cents {
                Some(cents) => errors.check(
                    format!("{}.price_cents", patch.field),
                    Money::new(cents, currency),
                ),
                None if patch.currency.is_some() => errors.check(
                    format!("{}.currency", patch.field),
                    Money::new(existing.price.amount_cents(), currency),
                ),
                None => None,
            };
            changes.push(VariantChange {
                variant_id: existing.variant_id,
                title: patch.title,
                price,
                attributes: patch.attributes,
            });
            continue;
        }
        let field = patch.field;
        let sku = errors.require(&format!("{field}.sku"), patch.sku);
        let title = errors.require(&format!("{field}.title"), patch.title);
        let cents = errors.require(&format!("{field}.price_cents"), patch.price_cents);
        let currency = patch.currency.or_else(|| product_currency.clone());
        let price = cents.zip(currency).and_then(|(cents, currency)| {
            errors.check(format!("{field}.price_cents"), Money::new(cents, currency))
        });
        if let (Some(sku), Some(title), Some(price)) = (sku, title, price) {
            added.push(VariantDraft {
                variant: NewVariant {
                    variant_id: Uuid::now_v7(),
                    sku,
                    title,
                    price,
                    attributes: patch.attributes.unwrap_or_default(),
                },
                initial_stock: patch.initial_stock,
                field,
            });
        }
    }
    errors.into_result()?;
    Ok((changes, added))
}

/// Starts tracking the stock of each new variant; returns where the last
/// registration stands in the global order.
async fn register_stock(
    state: &AppState,
    variants: &[VariantDraft],
    metadata: &Metadata,
) -> Result<Option<GlobalPosition>, ApiError> {
    let registrations = variants.iter().map(|draft| async move {
        let variant = &draft.variant;
        let command = InventoryCommand::Register {
            variant_id: variant.variant_id,
            sku: variant.sku.clone(),
            initial_on_hand: draft.initial_stock,
        };
        state
            .inventory
            .execute(&variant.variant_id.to_string(), command, metadata.clone())
            .await
    });
    let mut newest: Option<GlobalPosition> = None;
    for outcome in join_all(registrations).await {
        let executed: Executed<InventoryItem> =
            outcome.map_err(|error| ApiError::from_command(error, super::inventory_rejection))?;
        newest = newest.max(executed.position);
    }
    Ok(newest)
}

/// Read-your-writes after a product write: wait for the read models, then
/// drop the cached product at its new version before answering.
async fn finish_write(
    state: &AppState,
    product_id: Uuid,
    executed: &Executed<domain::catalog::Product>,
    stock_position: Option<GlobalPosition>,
) -> Result<(), ApiError> {
    settle(
        state,
        &[
            (projections::catalog::NAME, executed.position),
            (projections::stock::NAME, stock_position),
        ],
    )
    .await?;
    if executed.position.is_some() {
        state
            .caches
            .catalog
            .invalidate(&keys::product(product_id), executed.version)
            .await;
    }
    Ok(())
}

/// The prefix of this module's routes, registered as one scope (see
/// [`crate::http::configure`]); utoipa's `context_path` adds it back.
const SCOPE: &str = "/api/v1/products";

pub fn configure(config: &mut web::ServiceConfig) {
    config.service(
        web::scope(SCOPE)
            .service(get_products)
            .service(get_product)
            .service(create_product)
            .service(update_product)
            .service(delete_product),
    );
}
