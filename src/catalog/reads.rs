//! Reading the catalog through the versioned cache: product detail by id or
//! slug (stock and category laid over the cached product at read time) and
//! stock levels. Every miss falls back to Postgres and fills the cache with
//! the version it read, so a slow filler can never bring back old data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use projections::cache::{keys, Snapshot, Start};
use projections::catalog_queries::{self, CategoryRef, ProductCore, ProductDetail, PublicStock};
use projections::stock::StockEntry;
use uuid::Uuid;

use super::Viewer;
use crate::http::problem::ApiError;
use crate::state::AppState;

/// The product page under `slug`, as the JSON the public (or an admin) is
/// served; `None` when there is none for them. Laid together from a page
/// made earlier whenever the cache still holds what it was made from.
pub async fn product_page_by_slug(
    state: &AppState,
    slug: &str,
    viewer: Viewer,
) -> Result<Option<Vec<u8>>, ApiError> {
    let slug_key = keys::product_slug(slug);
    let mut snapshot = state
        .caches
        .catalog
        .read_with_usual(Start::ThroughText {
            text: &slug_key,
            names: keys::product,
        })
        .await;
    if let Some(product_id) = product_id_of(&snapshot) {
        if let Some(template) = page_template(state, product_id, &mut snapshot).await {
            if template.slug != slug || !template.visible_to(viewer) {
                return Ok(None);
            }
            if let Some(page) = template.fill(&snapshot) {
                return Ok(Some(page));
            }
        }
    }
    let Some(detail) = product_by_slug(state, slug, &mut snapshot, viewer).await? else {
        return Ok(None);
    };
    serde_json::to_vec(&detail)
        .map(Some)
        .map_err(ApiError::internal)
}

/// The product whose slug the read went through, if the cache knows it.
fn product_id_of(snapshot: &Snapshot) -> Option<Uuid> {
    snapshot.text.as_deref()?.parse().ok()
}

/// The product `slug` names, put together from `snapshot` (read through
/// the slug) and whatever it lacks. A slug the product no longer carries
/// answers nothing, even though it still belongs to that product.
async fn product_by_slug(
    state: &AppState,
    slug: &str,
    snapshot: &mut Snapshot,
    viewer: Viewer,
) -> Result<Option<ProductDetail>, ApiError> {
    let detail = match product_id_of(snapshot) {
        Some(product_id) => detail_from_snapshot(state, product_id, snapshot, viewer).await?,
        None => {
            let Some(id) = catalog_queries::product_id_by_slug(&state.pool, slug).await? else {
                return Ok(None);
            };
            // Claims are never released, so this slug names this product forever.
            state
                .caches
                .catalog
                .put_text(&keys::product_slug(slug), &id.to_string())
                .await;
            product_detail(state, id, viewer).await?
        }
    };
    Ok(detail.filter(|detail| detail.slug == slug))
}

/// A product by id, as `viewer` may see it: drafts only for admins, deleted
/// products for no one.
pub async fn product_detail(
    state: &AppState,
    product_id: Uuid,
    viewer: Viewer,
) -> Result<Option<ProductDetail>, ApiError> {
    let mut snapshot = state
        .caches
        .catalog
        .read_with_usual(Start::Entry(&keys::product(product_id)))
        .await;
    detail_from_snapshot(state, product_id, &mut snapshot, viewer).await
}

/// The product with its category and stock: from the cache where `snapshot`
/// (after reading what it lacks) has them, else from Postgres, which then
/// fills the cache.
async fn detail_from_snapshot(
    state: &AppState,
    product_id: Uuid,
    snapshot: &mut Snapshot,
    viewer: Viewer,
) -> Result<Option<ProductDetail>, ApiError> {
    let product_key = keys::product(product_id);
    let core = match snapshot.get::<ProductCore>(&product_key) {
        Some(hit) => hit.body,
        None => {
            let Some((version, core)) =
                catalog_queries::product_core(&state.pool, product_id).await?
            else {
                return Ok(None);
            };
            state.caches.catalog.put(&product_key, version, &core).await;
            core
        }
    };
    if viewer == Viewer::Public && core.status != "active" {
        return Ok(None);
    }
    state
        .caches
        .catalog
        .read_also(snapshot, &needed_by(&core))
        .await;

    let mut stock = HashMap::with_capacity(core.variants.len());
    let mut missing_stock = Vec::new();
    for variant in &core.variants {
        match snapshot.get::<StockEntry>(&keys::stock(variant.id)) {
            Some(hit) => {
                stock.insert(variant.id, hit.body);
            }
            None => missing_stock.push(variant.id),
        }
    }
    let category = match core.category_id {
        None => None,
        Some(category_id) => match snapshot.get::<CategoryRef>(&keys::category(category_id)) {
            Some(hit) => Some(hit.body),
            None => category_ref(state, category_id).await?,
        },
    };
    stock.extend(stock_from_postgres(state, &missing_stock).await?);
    Ok(Some(ProductDetail::assemble(core, category, &stock)))
}

/// The entries a product's page lays over it: each variant's stock, then
/// the category's.
fn needed_by(core: &ProductCore) -> Vec<String> {
    let mut needed: Vec<String> = core.variants.iter().map(|v| keys::stock(v.id)).collect();
    if let Some(category_id) = core.category_id {
        needed.push(keys::category(category_id));
    }
    needed
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

// ------------------------------------------------------------ page templates

/// Page templates beyond this many, or beyond this many bytes, are all
/// forgotten at once: memory stays bounded, and the pages read often come
/// back at once.
const MAX_TEMPLATES: usize = 2_000;
const MAX_TEMPLATES_BYTES: usize = 32 * 1024 * 1024;
/// Larger pages are put together anew on every read rather than kept.
const MAX_TEMPLATE_BYTES: usize = 64 * 1024;
/// Stand-ins for the stock numbers while a template is cut: far beyond any
/// real stock, so a piece of the page can only be one where a stock goes
/// (and a template is only kept when each stands exactly once).
const STOCK_MARKER_BASE: i64 = 9_000_000_000_000_000_000;

/// A product page without its stock numbers, made from the cache bodies of
/// a product and its category. The same bodies always make the same page,
/// so while the cache holds them a read only lays the stock in.
#[derive(Debug)]
struct PageTemplate {
    /// The cache bodies the page was made from, by entry name.
    made_from: Vec<(String, Vec<u8>)>,
    slug: String,
    active: bool,
    /// The stock entries of the variants, in page order, then the category's.
    needed: Vec<String>,
    /// The page cut where each variant's stock goes.
    pieces: Vec<Vec<u8>>,
}

impl PageTemplate {
    /// The template for the product in `snapshot`, if it holds the
    /// product and its category with bodies that parse.
    fn new(product_id: Uuid, snapshot: &Snapshot) -> Option<Self> {
        let product_key = keys::product(product_id);
        let core = snapshot.get::<ProductCore>(&product_key)?.body;
        let mut made_from = vec![(product_key.clone(), snapshot.raw(&product_key)?.to_vec())];
        let category = match core.category_id {
            None => None,
            Some(category_id) => {
                let category_key = keys::category(category_id);
                let category = snapshot.get::<CategoryRef>(&category_key)?.body;
                let body = snapshot.raw(&category_key)?.to_vec();
                made_from.push((category_key, body));
                Some(category)
            }
        };
        let needed = needed_by(&core);
        let slug = core.slug.clone();
        let active = core.status == "active";
        let mut detail = ProductDetail::assemble(core, category, &HashMap::new());
        let mut markers = Vec::with_capacity(detail.variants.len());
        for (index, variant) in (0_i64..).zip(detail.variants.iter_mut()) {
            variant.stock = PublicStock {
                available: STOCK_MARKER_BASE + index,
                in_stock: false,
            };
            markers.push(serde_json::to_vec(&variant.stock).ok()?);
        }
        let page = serde_json::to_vec(&detail).ok()?;
        if page.len() > MAX_TEMPLATE_BYTES {
            return None;
        }
        let mut pieces = Vec::with_capacity(markers.len() + 1);
        let mut rest = &page[..];
        for marker in &markers {
            let mut found = page.windows(marker.len()).filter(|window| window == marker);
            if found.next().is_none() || found.next().is_some() {
                return None;
            }
            let at = rest
                .windows(marker.len())
                .position(|window| window == marker)?;
            pieces.push(rest[..at].to_vec());
            rest = &rest[at + marker.len()..];
        }
        pieces.push(rest.to_vec());
        Some(Self {
            made_from,
            slug,
            active,
            needed,
            pieces,
        })
    }

    /// Whether `snapshot` holds exactly the bodies this was made from.
    fn is_made_from(&self, snapshot: &Snapshot) -> bool {
        self.made_from
            .iter()
            .all(|(name, body)| snapshot.raw(name) == Some(body.as_slice()))
    }

    /// Roughly what keeping this costs.
    fn weight(&self) -> usize {
        let made_from: usize = self.made_from.iter().map(|(n, b)| n.len() + b.len()).sum();
        let pieces: usize = self.pieces.iter().map(Vec::len).sum();
        made_from + pieces
    }

    fn visible_to(&self, viewer: Viewer) -> bool {
        viewer == Viewer::Admin || self.active
    }

    /// The page with the stock in `snapshot` laid in; `None` if it lacks a
    /// variant's stock.
    fn fill(&self, snapshot: &Snapshot) -> Option<Vec<u8>> {
        let (first, rest) = self.pieces.split_first()?;
        let length = self.pieces.iter().map(Vec::len).sum::<usize>();
        let mut page = Vec::with_capacity(length + 48 * rest.len());
        page.extend_from_slice(first);
        for (name, piece) in self.needed.iter().zip(rest) {
            let entry = snapshot.get::<StockEntry>(name)?.body;
            serde_json::to_writer(&mut page, &PublicStock::of(Some(&entry))).ok()?;
            page.extend_from_slice(piece);
        }
        Some(page)
    }
}

/// The page template for the product as `snapshot` holds it (after reading
/// what the page needs that it lacks), if the cache has every part.
async fn page_template(
    state: &AppState,
    product_id: Uuid,
    snapshot: &mut Snapshot,
) -> Option<Arc<PageTemplate>> {
    let known = templates()
        .get(product_id)
        .filter(|template| template.is_made_from(snapshot));
    if let Some(template) = known {
        state
            .caches
            .catalog
            .read_also(snapshot, &template.needed)
            .await;
        return Some(template);
    }
    let core = snapshot
        .get::<ProductCore>(&keys::product(product_id))?
        .body;
    state
        .caches
        .catalog
        .read_also(snapshot, &needed_by(&core))
        .await;
    let template = Arc::new(PageTemplate::new(product_id, snapshot)?);
    templates().put(product_id, template.clone());
    Some(template)
}

/// Templates by product; shared by every app in the process, which is safe
/// because a template is only used for the very bodies it was made from.
#[derive(Default)]
struct Templates(Mutex<KeptTemplates>);

#[derive(Default)]
struct KeptTemplates {
    by_product: HashMap<Uuid, Arc<PageTemplate>>,
    bytes: usize,
}

impl Templates {
    fn get(&self, product_id: Uuid) -> Option<Arc<PageTemplate>> {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.by_product.get(&product_id).cloned()
    }

    fn put(&self, product_id: Uuid, template: Arc<PageTemplate>) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let weight = template.weight();
        if kept.by_product.len() >= MAX_TEMPLATES || kept.bytes + weight > MAX_TEMPLATES_BYTES {
            *kept = KeptTemplates::default();
        }
        if let Some(replaced) = kept.by_product.insert(product_id, template) {
            kept.bytes -= replaced.weight();
        }
        kept.bytes += weight;
    }
}

fn templates() -> &'static Templates {
    static TEMPLATES: OnceLock<Templates> = OnceLock::new();
    TEMPLATES.get_or_init(Templates::default)
}
