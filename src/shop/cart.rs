//! The customer's cart: written as `Cart` commands, read from the carts read
//! model (cached in Redis) with current prices and availability from the
//! catalog.

use actix_web::http::header::ContentType;
use actix_web::web::Bytes;
use actix_web::{delete, get, post, put, web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use domain::cart::{CartCommand, CartError};
use domain::values::Quantity;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgPool, Row};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::catalog::{reads, Viewer};
use crate::event_store::{Executed, Metadata};
use crate::http::extract::Json;
use crate::http::middleware::request_id_of;
use crate::http::problem::ApiError;
use crate::state::AppState;

mod rendered;

#[derive(Debug, Deserialize, ToSchema)]
pub struct AddToCart {
    pub variant_id: Uuid,
    /// 1 to 10,000.
    pub quantity: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SetQuantity {
    /// 0 removes the line; at most 10,000.
    pub quantity: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct CartItem {
    pub variant_id: Uuid,
    pub sku: String,
    pub product_id: Uuid,
    pub product_name: String,
    pub product_slug: String,
    pub unit_price_cents: i64,
    pub currency: String,
    pub quantity: i64,
    pub line_total_cents: i64,
    /// Units that could be bought right now.
    pub available: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CartView {
    /// The cart's id (one cart per user: the user's id).
    pub id: Uuid,
    pub items: Vec<CartItem>,
    /// Units in the cart.
    pub item_count: i64,
    pub subtotal_cents: i64,
    /// The lines' currency; null while the cart is empty.
    pub currency: Option<String>,
    #[serde(serialize_with = "crate::http::timestamp::rfc3339_option")]
    pub updated_at: Option<DateTime<Utc>>,
}

/// A cart as one read saw it: its lines, with current catalog data, and
/// the version of the carts read model they were built from (`None` when
/// the user has no cart yet).
pub struct ReadCart {
    pub view: CartView,
    pub version: Option<i64>,
}

/// The cart's lines with current catalog data, and its version, from one
/// statement: the lines are the cart at that version, which a checkout
/// relies on (see [`super::checkout_commit::CheckoutRequest::cart_version`]).
/// Lines whose variant left the public catalog show no availability.
async fn cart_rows(
    pool: &PgPool,
    user_id: Uuid,
) -> Result<(Option<(i64, DateTime<Utc>)>, Vec<CartItem>), sqlx::Error> {
    let rows = sqlx::query(
        "WITH cart AS (SELECT version, updated_at FROM carts WHERE user_id = $1) \
         SELECT cart.version AS cart_version, cart.updated_at AS cart_updated_at, line.* \
         FROM cart LEFT JOIN LATERAL ( \
           SELECT cl.variant_id, v.sku, v.product_id, p.name AS product_name, p.slug AS product_slug, \
                  v.price_cents AS unit_price_cents, v.currency, cl.quantity::bigint AS quantity, \
                  v.price_cents * cl.quantity AS line_total_cents, \
                  CASE WHEN p.status = 'active' AND NOT p.deleted \
                       THEN greatest(coalesce(s.on_hand - s.reserved, 0), 0)::bigint ELSE 0 END AS available \
           FROM cart_lines cl \
           JOIN catalog_variants v ON v.id = cl.variant_id \
           JOIN catalog_products p ON p.id = v.product_id \
           LEFT JOIN stock_levels s ON s.variant_id = cl.variant_id \
           WHERE cl.user_id = $1) line ON true \
         ORDER BY line.variant_id",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await?;
    let mut cart = None;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        cart = Some((
            row.try_get("cart_version")?,
            row.try_get("cart_updated_at")?,
        ));
        // A cart without lines comes back as one row without a line.
        if row.try_get::<Option<Uuid>, _>("variant_id")?.is_some() {
            items.push(CartItem::from_row(row)?);
        }
    }
    Ok((cart, items))
}

fn assemble(user_id: Uuid, items: Vec<CartItem>, updated_at: Option<DateTime<Utc>>) -> CartView {
    CartView {
        id: user_id,
        item_count: items.iter().map(|item| item.quantity).sum(),
        subtotal_cents: items.iter().map(|item| item.line_total_cents).sum(),
        currency: items.first().map(|item| item.currency.clone()),
        items,
        updated_at,
    }
}

/// What the cart cache holds: the lines, not their prices or stock.
#[derive(Debug, Serialize, Deserialize)]
struct CachedCart {
    lines: Vec<CachedLine>,
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedLine {
    variant_id: Uuid,
    product_id: Uuid,
    quantity: i64,
}

/// A cart's cache entry (see [`projections::cache::keys::cart`]).
pub(crate) fn cart_key(user_id: Uuid) -> String {
    projections::cache::keys::cart(user_id)
}

/// The cart from Postgres, refreshing the cache with the version it read.
pub async fn read_cart_from_postgres(
    state: &AppState,
    user_id: Uuid,
) -> Result<ReadCart, ApiError> {
    let (cart, items) = cart_rows(&state.pool, user_id).await?;
    if let Some((version, updated_at)) = cart {
        let cached = CachedCart {
            lines: items
                .iter()
                .map(|item| CachedLine {
                    variant_id: item.variant_id,
                    product_id: item.product_id,
                    quantity: item.quantity,
                })
                .collect(),
            updated_at: Some(updated_at),
        };
        state
            .caches
            .carts
            .refresh(&cart_key(user_id), version, &cached)
            .await;
    }
    Ok(ReadCart {
        view: assemble(user_id, items, cart.map(|(_, updated_at)| updated_at)),
        version: cart.map(|(version, _)| version),
    })
}

/// A cart as the cache holds it, read together with the catalog entries
/// its lines need.
struct CachedRead {
    cart: std::sync::Arc<CachedCart>,
    version: i64,
    snapshot: projections::cache::Snapshot,
    /// The cart's entry, then the entries its lines need, by name.
    names: Vec<String>,
}

/// The cart's entry from Redis, with the entries its lines needed the
/// last time, in one round trip.
async fn read_cart_entry(state: &AppState, cart_name: &str) -> projections::cache::Snapshot {
    state
        .caches
        .carts
        .read_with_usual(projections::cache::Start::Entry(cart_name))
        .await
}

/// The cart from Redis with the entries its lines need (current prices and
/// stock): `snapshot` (see [`read_cart_entry`]), completed with a second
/// round trip only when the lines need entries it lacks. `None` on a miss
/// of the cart.
async fn read_cached(
    state: &AppState,
    cart_name: String,
    mut snapshot: projections::cache::Snapshot,
) -> Option<CachedRead> {
    use projections::cache::keys;

    let (Some(cart), Some(version)) = (
        snapshot.get_shared::<CachedCart>(&cart_name),
        snapshot.version(&cart_name),
    ) else {
        return None;
    };
    let mut needed = Vec::with_capacity(2 * cart.lines.len());
    for line in &cart.lines {
        let product = keys::product(line.product_id);
        if !needed.contains(&product) {
            needed.push(product);
        }
        needed.push(keys::stock(line.variant_id));
    }
    state.caches.carts.read_also(&mut snapshot, &needed).await;
    let mut names = Vec::with_capacity(1 + needed.len());
    names.push(cart_name);
    names.extend(needed);
    Some(CachedRead {
        cart,
        version,
        snapshot,
        names,
    })
}

/// The cart a cached read shows (`None` when a line's variant is no longer
/// on sale), and whether it was built from the read's entries alone.
async fn cart_from_cached(
    state: &AppState,
    user_id: Uuid,
    read: &CachedRead,
) -> Result<(Option<ReadCart>, bool), ApiError> {
    let mut items = Vec::with_capacity(read.cart.lines.len());
    let mut from_entries_alone = true;
    for line in &read.cart.lines {
        let item = match item_from_snapshot(&read.snapshot, line) {
            FromSnapshot::Item(item) => Some(item),
            FromSnapshot::NotOnSale => None,
            FromSnapshot::Missing => {
                from_entries_alone = false;
                item_from_catalog(state, line).await?
            }
        };
        let Some(item) = item else {
            return Ok((None, from_entries_alone));
        };
        items.push(item);
    }
    let cart = ReadCart {
        view: assemble(user_id, items, read.cart.updated_at),
        version: Some(read.version),
    };
    Ok((Some(cart), from_entries_alone))
}

/// The cart from Redis: its lines, with current prices and stock laid over
/// from the catalog caches. `None` on a miss of the cart or when a line's
/// variant is no longer on sale.
async fn read_cart_from_cache(
    state: &AppState,
    user_id: Uuid,
) -> Result<Option<ReadCart>, ApiError> {
    let cart_name = cart_key(user_id);
    let snapshot = read_cart_entry(state, &cart_name).await;
    match read_cached(state, cart_name, snapshot).await {
        Some(read) => Ok(cart_from_cached(state, user_id, &read).await?.0),
        None => Ok(None),
    }
}

/// What a cached read says about one cart line.
enum FromSnapshot {
    /// The line with its product's current data and its variant's stock.
    Item(CartItem),
    /// The variant is no longer on sale.
    NotOnSale,
    /// The read lacks the product's or the stock's entry (or one that parses).
    Missing,
}

fn item_from_snapshot(snapshot: &projections::cache::Snapshot, line: &CachedLine) -> FromSnapshot {
    use projections::cache::keys;
    use projections::catalog_queries::ProductCore;
    use projections::stock::StockEntry;

    let product = snapshot.get_shared::<ProductCore>(&keys::product(line.product_id));
    let stock = snapshot.get::<StockEntry>(&keys::stock(line.variant_id));
    let (Some(product), Some(stock)) = (product, stock) else {
        return FromSnapshot::Missing;
    };
    if product.status != "active" {
        return FromSnapshot::NotOnSale;
    }
    let Some(variant) = product.variants.iter().find(|v| v.id == line.variant_id) else {
        return FromSnapshot::NotOnSale;
    };
    FromSnapshot::Item(CartItem {
        variant_id: variant.id,
        sku: variant.sku.clone(),
        product_id: product.id,
        product_name: product.name.clone(),
        product_slug: product.slug.clone(),
        unit_price_cents: variant.price_cents,
        currency: variant.currency.clone(),
        quantity: line.quantity,
        line_total_cents: variant.price_cents * line.quantity,
        available: stock.body.available(),
    })
}

/// A cart line with its product's current data, through the catalog's
/// reads. `None` when the variant is no longer on sale.
async fn item_from_catalog(
    state: &AppState,
    line: &CachedLine,
) -> Result<Option<CartItem>, ApiError> {
    let product = reads::product_detail(state, line.product_id, Viewer::Public).await?;
    let Some(product) = product else {
        return Ok(None);
    };
    let Some(variant) = product.variants.iter().find(|v| v.id == line.variant_id) else {
        return Ok(None);
    };
    Ok(Some(CartItem {
        variant_id: variant.id,
        sku: variant.sku.clone(),
        product_id: product.id,
        product_name: product.name.clone(),
        product_slug: product.slug.clone(),
        unit_price_cents: variant.price_cents,
        currency: variant.currency.clone(),
        quantity: line.quantity,
        line_total_cents: variant.price_cents * line.quantity,
        available: variant.stock.available.max(0),
    }))
}

/// The caller's cart: from the cache when it has it, else from Postgres.
pub async fn read_cart(state: &AppState, user_id: Uuid) -> Result<ReadCart, ApiError> {
    if let Some(cart) = read_cart_from_cache(state, user_id).await? {
        return Ok(cart);
    }
    read_cart_after_cache_miss(state, user_id).await
}

/// The cart from Postgres once the carts read model holds every change
/// stored for it.
async fn read_cart_after_cache_miss(state: &AppState, user_id: Uuid) -> Result<ReadCart, ApiError> {
    // A checkout empties the cart without waiting for the carts read model
    // (it drops the cached cart instead), so a miss waits for the read model
    // to hold every change stored for this cart.
    state
        .read_aggregate_writes(projections::carts::NAME, "Cart", &user_id.to_string())
        .await?;
    read_cart_from_postgres(state, user_id).await
}

/// Whether a variant can be put in a cart: it exists and its product is public.
async fn ensure_sellable(pool: &PgPool, variant_id: Uuid) -> Result<(), ApiError> {
    let sellable: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM catalog_variants v JOIN catalog_products p ON p.id = v.product_id \
                        WHERE v.id = $1 AND p.status = 'active' AND NOT p.deleted)",
    )
    .bind(variant_id)
    .fetch_one(pool)
    .await?;
    if sellable {
        Ok(())
    } else {
        Err(ApiError::not_found("variant"))
    }
}

fn cart_rejection(error: CartError) -> ApiError {
    match error {
        CartError::Empty => ApiError::invalid_field("cart", "the cart is empty"),
        CartError::QuantityTooLarge { max, .. } => {
            ApiError::invalid_field("quantity", format!("a line holds at most {max} units"))
        }
    }
}

/// Runs a cart command and answers with the cart as it is after it.
async fn execute_and_show(
    state: &AppState,
    request: &HttpRequest,
    user: AuthUser,
    command: CartCommand,
) -> Result<HttpResponse, ApiError> {
    let metadata = Metadata::user(user.id, request_id_of(request));
    let executed: Executed<domain::cart::Cart> = state
        .carts
        .execute(&user.id.to_string(), command, metadata)
        .await
        .map_err(|error| ApiError::from_command(error, cart_rejection))?;
    let view = after_cart_write(state, user.id, executed.position).await?;
    Ok(HttpResponse::Ok().json(view))
}

/// After any cart command: wait until the carts read model has it, then
/// read the cart from Postgres, which also replaces the cached cart (a
/// cached copy must never outlive a write).
pub async fn after_cart_write(
    state: &AppState,
    user_id: Uuid,
    position: Option<projections::GlobalPosition>,
) -> Result<CartView, ApiError> {
    state
        .read_your_write(projections::carts::NAME, position)
        .await?;
    Ok(read_cart_from_postgres(state, user_id).await?.view)
}

/// A line quantity where 0 means "remove the line".
fn quantity_or_zero(value: i64) -> Result<u32, ApiError> {
    if value == 0 {
        return Ok(0);
    }
    Quantity::try_from(value)
        .map(|quantity| quantity.get())
        .map_err(|_| ApiError::invalid_field("quantity", "must be a whole number from 0 to 10000"))
}

/// Adds units of a variant (to the line already there, if any).
#[utoipa::path(context_path = SCOPE, tag = "cart", request_body = AddToCart, security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = CartView),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 404, body = crate::http::problem::Problem, description = "unknown variant"),
    (status = 422, body = crate::http::problem::Problem),
))]
#[post("/add-cart")]
pub async fn add_to_cart(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    body: Json<AddToCart>,
) -> Result<HttpResponse, ApiError> {
    let quantity = Quantity::try_from(body.0.quantity).map_err(|_| {
        ApiError::invalid_field("quantity", "must be a whole number from 1 to 10000")
    })?;
    ensure_sellable(&state.pool, body.0.variant_id).await?;
    execute_and_show(
        &state,
        &request,
        user,
        CartCommand::AddItem {
            variant_id: body.0.variant_id,
            quantity,
        },
    )
    .await
}

/// The caller's cart with current prices and availability.
#[utoipa::path(context_path = SCOPE, tag = "cart", security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = CartView), (status = 401, body = crate::http::problem::Problem),
))]
#[get("/get-cart")]
pub async fn get_cart(
    state: web::Data<AppState>,
    user: AuthUser,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok()
        .insert_header(ContentType::json())
        .body(cart_json(&state, user.id).await?))
}

/// The caller's cart as the JSON `get-cart` answers with. A cart read from
/// the cache whose entries all came back with bodies is a function of those
/// bodies, so the answer rendered from the very same bodies is sent again:
/// checked as soon as the first round trip is back, since the cart's own
/// body among them fixes which entries its lines need.
async fn cart_json(state: &AppState, user_id: Uuid) -> Result<Bytes, ApiError> {
    let cart_name = cart_key(user_id);
    let snapshot = read_cart_entry(state, &cart_name).await;
    if let Some(json) = rendered::carts().get(user_id, |name| snapshot.raw(name)) {
        return Ok(json);
    }
    let read = read_cached(state, cart_name, snapshot).await;
    let entries = read.as_ref().and_then(|read| {
        read.names
            .iter()
            .map(|name| Some((name.as_str(), read.snapshot.raw(name)?)))
            .collect::<Option<Vec<(&str, &[u8])>>>()
    });
    let (cart, from_entries_alone) = match &read {
        Some(read) => cart_from_cached(state, user_id, read).await?,
        None => (None, false),
    };
    let view = match cart {
        Some(cart) => cart.view,
        None => read_cart_after_cache_miss(state, user_id).await?.view,
    };
    let json = Bytes::from(serde_json::to_vec(&view).map_err(ApiError::internal)?);
    if let Some(entries) = entries.filter(|_| from_entries_alone) {
        rendered::carts().put(user_id, &entries, json.clone());
    }
    Ok(json)
}

/// Sets a line's quantity; 0 removes it.
#[utoipa::path(context_path = SCOPE, tag = "cart", request_body = SetQuantity, params(("variant_id" = Uuid, Path)),
    security(("bearer" = []), ("cookie" = [])), responses(
    (status = 200, body = CartView),
    (status = 400, body = crate::http::problem::Problem), (status = 401, body = crate::http::problem::Problem),
    (status = 404, body = crate::http::problem::Problem), (status = 422, body = crate::http::problem::Problem),
))]
#[put("/update-item/{variant_id}")]
pub async fn update_cart_item(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    variant_id: web::Path<Uuid>,
    body: Json<SetQuantity>,
) -> Result<HttpResponse, ApiError> {
    let variant_id = variant_id.into_inner();
    let quantity = quantity_or_zero(body.0.quantity)?;
    if quantity > 0 {
        ensure_sellable(&state.pool, variant_id).await?;
    }
    execute_and_show(
        &state,
        &request,
        user,
        CartCommand::SetQuantity {
            variant_id,
            quantity,
        },
    )
    .await
}

/// Removes a line (nothing happens if it is not there).
#[utoipa::path(context_path = SCOPE, tag = "cart", params(("variant_id" = Uuid, Path)), security(("bearer" = []), ("cookie" = [])),
    responses((status = 200, body = CartView), (status = 400, body = crate::http::problem::Problem),
    (status = 401, body = crate::http::problem::Problem)))]
#[delete("/remove-item/{variant_id}")]
pub async fn remove_cart_item(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
    variant_id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let command = CartCommand::RemoveItem {
        variant_id: variant_id.into_inner(),
    };
    execute_and_show(&state, &request, user, command).await
}

/// Empties the cart.
#[utoipa::path(context_path = SCOPE, tag = "cart", security(("bearer" = []), ("cookie" = [])),
    responses((status = 200, body = CartView), (status = 401, body = crate::http::problem::Problem)))]
#[delete("/clear")]
pub async fn clear_cart(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: AuthUser,
) -> Result<HttpResponse, ApiError> {
    execute_and_show(&state, &request, user, CartCommand::Clear).await
}

/// The prefix of this module's routes, registered as one scope (see
/// [`crate::http::configure`]); utoipa's `context_path` adds it back.
const SCOPE: &str = "/api/v1/cart";

pub fn configure(config: &mut web::ServiceConfig) {
    config.service(
        web::scope(SCOPE)
            .service(add_to_cart)
            .service(get_cart)
            .service(update_cart_item)
            .service(remove_cart_item)
            .service(clear_cart),
    );
}
