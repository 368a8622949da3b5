//! `commerce seed-demo`: a believable demo catalog (a category tree, about
//! thirty products with one to three variants and stock), or with
//! `--products N` a large one for search and listing benchmarks.
//!
//! Everything is written as events: each aggregate's events are decided by
//! its own `Decider` and appended in large batches with metadata
//! `system/seed-demo`, then the projections catch up. Ids are derived from
//! the product's number, so a second run finds what the first made and only
//! adds what is missing; slugs and SKUs are claimed like any other write, and
//! a product whose slug or SKU someone else holds is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration as ChronoDuration, Utc};
use cqrs_es::Aggregate;
use domain::catalog::{
    Category, CategoryCommand, NewVariant, Product, ProductCommand, ProductStatus,
};
use domain::inventory::{InventoryCommand, InventoryItem};
use domain::values::{Currency, Money, Name, Sku, Slug};
use domain::Decider;
use futures_util::future::join_all;
use projections::ProjectionRunner;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::event_store::{serialize_events, AppendError, EventStore, Metadata};

/// How many products are decided and appended per batch.
const PRODUCTS_PER_BATCH: usize = 2_000;
/// Events a projection applies per step while catching up.
const CATCH_UP_BATCH: i64 = 5_000;
/// The demo catalog's size when no `--products` is given.
pub const DEMO_PRODUCTS: usize = 30;

/// What a run did, for the command line to print.
#[derive(Debug, Default)]
pub struct SeedReport {
    pub categories_created: usize,
    pub products_created: usize,
    pub products_skipped: usize,
    pub events_appended: usize,
    pub append_seconds: f64,
    pub projection_events: usize,
    pub projection_seconds: f64,
}

impl SeedReport {
    pub fn events_per_second(&self) -> f64 {
        rate(self.events_appended, self.append_seconds)
    }

    pub fn projected_per_second(&self) -> f64 {
        rate(self.projection_events, self.projection_seconds)
    }
}

fn rate(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// The demo tree: (slug, name, parent slug).
const CATEGORIES: &[(&str, &str, Option<&str>)] = &[
    ("clothing", "Clothing", None),
    ("shoes", "Shoes", Some("clothing")),
    ("running-shoes", "Running Shoes", Some("shoes")),
    ("boots", "Boots", Some("shoes")),
    ("jackets", "Jackets", Some("clothing")),
    ("electronics", "Electronics", None),
    ("audio", "Audio", Some("electronics")),
    ("computers", "Computers", Some("electronics")),
    ("home", "Home & Garden", None),
    ("kitchen", "Kitchen", Some("home")),
    ("garden", "Garden", Some("home")),
];

/// A kind of product: where it is filed, what it is called, how it varies.
struct Line {
    category: &'static str,
    nouns: &'static [&'static str],
    blurb: &'static str,
    options: (&'static str, &'static [&'static str]),
    base_price_cents: i64,
}

const LINES: &[Line] = &[
    Line {
        category: "running-shoes",
        nouns: &["Trail Runner", "Road Racer", "Tempo Trainer"],
        blurb: "A cushioned running shoe with a grippy outsole and a breathable mesh upper.",
        options: ("size", &["40", "42", "44"]),
        base_price_cents: 8_999,
    },
    Line {
        category: "boots",
        nouns: &["Hiking Boot", "Chelsea Boot", "Winter Boot"],
        blurb: "A leather boot with a sealed seam and a warm lining for cold, wet days.",
        options: ("size", &["41", "43", "45"]),
        base_price_cents: 12_900,
    },
    Line {
        category: "jackets",
        nouns: &["Rain Shell", "Down Parka", "Fleece Jacket"],
        blurb: "A layer that keeps wind and rain out and packs into its own pocket.",
        options: ("size", &["S", "M", "L"]),
        base_price_cents: 14_500,
    },
    Line {
        category: "audio",
        nouns: &["Wireless Headphones", "Bookshelf Speaker", "Studio Earbuds"],
        blurb: "Clear, balanced sound with deep bass and a battery that lasts all week.",
        options: ("color", &["black", "silver", "blue"]),
        base_price_cents: 7_900,
    },
    Line {
        category: "computers",
        nouns: &["Mechanical Keyboard", "Ultralight Laptop", "USB-C Dock"],
        blurb: "A quiet, fast companion for work and play with a two-year warranty.",
        options: ("color", &["graphite", "white"]),
        base_price_cents: 19_900,
    },
    Line {
        category: "kitchen",
        nouns: &["Chef Knife", "Cast Iron Pan", "Pour-Over Kettle"],
        blurb: "Kitchen gear that heats evenly, cleans easily and lasts for decades.",
        options: ("size", &["small", "large"]),
        base_price_cents: 4_500,
    },
    Line {
        category: "garden",
        nouns: &["Pruning Shears", "Watering Can", "Raised Bed"],
        blurb: "Sturdy garden tools with comfortable grips and rust-proof steel.",
        options: ("color", &["green", "terracotta"]),
        base_price_cents: 2_900,
    },
];

const MODELS: &[&str] = &[
    "Aurora", "Tempo", "Summit", "Drift", "Nimbus", "Harbor", "Ember", "Atlas", "Juniper", "Vela",
];

const TRAITS: &[&str] = &[
    "made from recycled materials",
    "water resistant",
    "designed in Lisbon",
    "hand finished in small batches",
    "lightweight and packable",
    "built for everyday comfort",
    "tested in the Alps",
];

/// The `number`th product of the demo catalog, always the same.
struct ProductPlan {
    product_id: Uuid,
    name: Name,
    slug: Slug,
    description: String,
    category_slug: &'static str,
    variants: Vec<(NewVariant, u32)>,
    created_at: chrono::DateTime<Utc>,
}

fn seed_id(kind: &str, key: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("commerce:seed-demo:{kind}:{key}").as_bytes(),
    )
}

fn plan_product(number: usize, now: chrono::DateTime<Utc>) -> anyhow::Result<ProductPlan> {
    let line = &LINES[number % LINES.len()];
    let round = number / LINES.len();
    let model = MODELS[round % MODELS.len()];
    let noun = line.nouns[(round / MODELS.len()) % line.nouns.len()];
    let series = round / (MODELS.len() * line.nouns.len());
    let name = if series == 0 {
        format!("{model} {noun}")
    } else {
        format!("{model} {noun} {}", series + 1)
    };
    let description = format!(
        "{} The {model} edition is {}.",
        line.blurb,
        TRAITS[number % TRAITS.len()]
    );
    let product_id = seed_id("product", &number.to_string());
    let usd = Currency::try_from("USD")?;
    let (option, values) = line.options;
    let variant_count = 1 + number % values.len().min(3);
    let mut variants = Vec::with_capacity(variant_count);
    for (index, value) in values.iter().take(variant_count).enumerate() {
        let price_cents = line.base_price_cents + (number as i64 % 17) * 100 + index as i64 * 500;
        let mut attributes = Map::new();
        attributes.insert(option.to_owned(), Value::String((*value).to_owned()));
        // Every seventh product is sold out, the rest have a little stock.
        let stock = if number % 7 == 3 {
            0
        } else {
            ((number * 37 + index * 11) % 60 + 5) as u32
        };
        variants.push((
            NewVariant {
                variant_id: seed_id("variant", &format!("{number}:{index}")),
                sku: Sku::try_from(format!("DEMO-{number:07}-{index}"))?,
                title: Name::try_from(format!("{} {value}", capitalised(option)))?,
                price: Money::new(price_cents, usd.clone())?,
                attributes,
            },
            stock,
        ));
    }
    Ok(ProductPlan {
        product_id,
        slug: Slug::from_name(&name)?,
        name: Name::try_from(name)?,
        description,
        category_slug: line.category,
        variants,
        created_at: now - ChronoDuration::seconds(number as i64 * 97),
    })
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Runs the seed: categories, products, then the projections' catch-up,
/// with `caches` (the deployment's), since the catch-up may also apply
/// events a running server stored meanwhile, whose cache entries it must
/// refresh as that server's runners would.
pub async fn seed_demo(
    pool: &PgPool,
    caches: &crate::read_models::Caches,
    products: usize,
) -> anyhow::Result<SeedReport> {
    let store = EventStore::new(pool.clone());
    let metadata = Metadata::system("seed-demo").to_json()?;
    let mut report = SeedReport::default();
    let started = Instant::now();

    let categories = seed_categories(&store, &metadata, &mut report).await?;
    let now = Utc::now();
    let mut number = 0;
    while number < products {
        let end = (number + PRODUCTS_PER_BATCH).min(products);
        let plans = (number..end)
            .map(|n| plan_product(n, now))
            .collect::<anyhow::Result<Vec<_>>>()?;
        seed_products(&store, &metadata, &categories, plans, &mut report).await?;
        number = end;
    }
    report.append_seconds = started.elapsed().as_secs_f64();

    let projecting = Instant::now();
    report.projection_events = catch_up(pool, caches).await?;
    report.projection_seconds = projecting.elapsed().as_secs_f64();
    Ok(report)
}

/// Creates the demo tree (or finds it); returns each slug's category id.
async fn seed_categories(
    store: &EventStore,
    metadata: &Arc<RawValue>,
    report: &mut SeedReport,
) -> anyhow::Result<HashMap<&'static str, Uuid>> {
    let mut ids: HashMap<&'static str, Uuid> = HashMap::new();
    for (slug, name, parent) in CATEGORIES {
        let wanted = seed_id("category", slug);
        // Someone else's category may already own the slug: file under it.
        let holder = claim_values(
            store.pool(),
            &[("category_slug", (*slug).to_owned(), wanted)],
        )
        .await?
        .get(&("category_slug", (*slug).to_owned()))
        .copied()
        .unwrap_or(wanted);
        ids.insert(slug, holder);
        if holder != wanted {
            continue;
        }
        let mut category = Category::default();
        let version = store
            .catch_up(&wanted.to_string(), &mut category, 0)
            .await?;
        let command = CategoryCommand::Create {
            category_id: wanted,
            name: Name::try_from(*name)?,
            slug: Slug::try_from(*slug)?,
            parent_id: parent.and_then(|parent| ids.get(parent).copied()),
        };
        let Ok(events) = category.decide(command) else {
            continue; // exists with other values: an admin changed it; keep theirs
        };
        if events.is_empty() {
            continue;
        }
        let new_events =
            serialize_events::<Category>(&wanted.to_string(), &events, version, metadata)?;
        store.append(&new_events).await?;
        report.categories_created += 1;
        report.events_appended += new_events.len();
    }
    Ok(ids)
}

/// Claims `(kind, value, owner)` rows that are free and returns the holder
/// of every one of them afterwards (ours or someone else's).
async fn claim_values(
    pool: &PgPool,
    wanted: &[(&'static str, String, Uuid)],
) -> anyhow::Result<HashMap<(&'static str, String), Uuid>> {
    let kinds: Vec<&str> = wanted.iter().map(|(kind, _, _)| *kind).collect();
    let values: Vec<&str> = wanted.iter().map(|(_, value, _)| value.as_str()).collect();
    let owners: Vec<Uuid> = wanted.iter().map(|(_, _, owner)| *owner).collect();
    sqlx::query(
        "INSERT INTO unique_claims (kind, value, owner_id) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[]) ON CONFLICT DO NOTHING",
    )
    .bind(&kinds)
    .bind(&values)
    .bind(&owners)
    .execute(pool)
    .await?;
    let rows: Vec<(String, String, Uuid)> = sqlx::query_as(
        "SELECT c.kind, c.value, c.owner_id FROM unique_claims c \
         JOIN UNNEST($1::text[], $2::text[]) AS w(kind, value) ON c.kind = w.kind AND c.value = w.value",
    )
    .bind(&kinds)
    .bind(&values)
    .fetch_all(pool)
    .await?;
    let kind_of = |text: &str| {
        wanted
            .iter()
            .map(|(kind, _, _)| *kind)
            .find(|kind| *kind == text)
    };
    Ok(rows
        .into_iter()
        .filter_map(|(kind, value, owner)| kind_of(&kind).map(|kind| ((kind, value), owner)))
        .collect())
}

/// Decides and appends one batch of products with their inventory items,
/// skipping products that exist already or whose slug or SKU is taken.
async fn seed_products(
    store: &EventStore,
    metadata: &Arc<RawValue>,
    categories: &HashMap<&'static str, Uuid>,
    plans: Vec<ProductPlan>,
    report: &mut SeedReport,
) -> anyhow::Result<()> {
    let ids: Vec<String> = plans.iter().map(|p| p.product_id.to_string()).collect();
    let existing: HashSet<String> = sqlx::query_scalar(
        // A join from the wanted ids probes the primary key once per id,
        // whatever the planner believes about a table that grows as we go.
        "SELECT e.aggregate_id FROM UNNEST($2::text[]) AS w(id) \
         JOIN events e ON e.aggregate_type = $1 AND e.aggregate_id = w.id AND e.sequence = 1",
    )
    .bind(Product::TYPE)
    .bind(&ids)
    .fetch_all(store.pool())
    .await?
    .into_iter()
    .collect();
    let fresh: Vec<ProductPlan> = plans
        .into_iter()
        .filter(|plan| !existing.contains(&plan.product_id.to_string()))
        .collect();
    report.products_skipped += existing.len();

    let mut wanted = Vec::new();
    for plan in &fresh {
        wanted.push((
            "product_slug",
            plan.slug.as_str().to_owned(),
            plan.product_id,
        ));
        for (variant, _) in &plan.variants {
            wanted.push(("sku", variant.sku.as_str().to_owned(), plan.product_id));
        }
    }
    let holders = claim_values(store.pool(), &wanted).await?;
    let owns = |kind: &'static str, value: &str, owner: Uuid| {
        holders.get(&(kind, value.to_owned())) == Some(&owner)
    };

    let mut events = Vec::new();
    for plan in fresh {
        let all_claimed = owns("product_slug", plan.slug.as_str(), plan.product_id)
            && plan
                .variants
                .iter()
                .all(|(variant, _)| owns("sku", variant.sku.as_str(), plan.product_id));
        if !all_claimed {
            tracing::warn!(product = %plan.name, "slug or SKU held by another product; skipped");
            report.products_skipped += 1;
            continue;
        }
        let product_events = Product::default()
            .decide(ProductCommand::Create {
                product_id: plan.product_id,
                name: plan.name,
                description: plan.description,
                slug: plan.slug,
                category_id: categories.get(plan.category_slug).copied(),
                status: ProductStatus::Active,
                variants: plan.variants.iter().map(|(v, _)| v.clone()).collect(),
                created_at: plan.created_at,
            })
            .map_err(|error| anyhow::anyhow!("seed product refused: {error}"))?;
        events.extend(serialize_events::<Product>(
            &plan.product_id.to_string(),
            &product_events,
            0,
            metadata,
        )?);
        for (variant, stock) in &plan.variants {
            let item_events = InventoryItem::default()
                .decide(InventoryCommand::Register {
                    variant_id: variant.variant_id,
                    sku: variant.sku.clone(),
                    initial_on_hand: *stock,
                })
                .map_err(|error| anyhow::anyhow!("seed stock refused: {error}"))?;
            events.extend(serialize_events::<InventoryItem>(
                &variant.variant_id.to_string(),
                &item_events,
                0,
                metadata,
            )?);
        }
        report.products_created += 1;
    }
    match store.append(&events).await {
        Ok(_) => {}
        Err(AppendError::Conflict) => anyhow::bail!(
            "another writer created some of these products at the same time; run seed-demo again"
        ),
        Err(AppendError::Database(error)) => return Err(error.into()),
    }
    report.events_appended += events.len();
    Ok(())
}

/// Lets every projection apply what is in the store, side by side.
async fn catch_up(pool: &PgPool, caches: &crate::read_models::Caches) -> anyhow::Result<usize> {
    let runners: Vec<Arc<ProjectionRunner>> = crate::read_models::all(pool, caches)
        .into_iter()
        .map(|projection| {
            Arc::new(
                ProjectionRunner::new(pool.clone(), projection).with_batch_size(CATCH_UP_BATCH),
            )
        })
        .collect();
    let outcomes = join_all(runners.iter().map(|runner| async move {
        runner.register().await?;
        runner.catch_up().await
    }))
    .await;
    // Every runner reads the whole store; the slowest one's count is the
    // number of events projected.
    let mut projected = 0;
    for outcome in outcomes {
        projected = projected.max(outcome?);
    }
    Ok(projected)
}

/// Shown by `commerce seed-demo` when it is done.
pub fn summary(report: &SeedReport) -> String {
    json!({
        "categories_created": report.categories_created,
        "products_created": report.products_created,
        "products_skipped": report.products_skipped,
        "events_appended": report.events_appended,
        "append_seconds": (report.append_seconds * 100.0).round() / 100.0,
        "events_per_second": report.events_per_second().round(),
        "projection_events": report.projection_events,
        "projection_seconds": (report.projection_seconds * 100.0).round() / 100.0,
        "projected_events_per_second": report.projected_per_second().round(),
    })
    .to_string()
}
