//! The catalog: products with their sellable variants, and the category tree
//! they are filed under.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;
use uuid::Uuid;

use crate::values::{Currency, Money, Name, Sku, Slug};
use crate::Decider;

/// Serde for a field that may be left unchanged (`None`: key absent),
/// cleared (`Some(None)`: `null`) or set (`Some(Some(v))`: the value).
/// Use with `#[serde(default, skip_serializing_if = "Option::is_none")]`.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<Option<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}

// ---------------------------------------------------------------- Product

/// Whether a product is shown to the public.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductStatus {
    /// Listed in the public catalog.
    Active,
    /// Being prepared; only admins see it.
    #[default]
    Draft,
}

/// A variant to add to a product: one sellable size/colour/etc. with its
/// own SKU and price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVariant {
    pub variant_id: Uuid,
    pub sku: Sku,
    pub title: Name,
    pub price: Money,
    pub attributes: Map<String, Value>,
}

/// New values for an existing variant; `None` leaves a field as it is.
/// The SKU cannot be changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantChange {
    pub variant_id: Uuid,
    pub title: Option<Name>,
    pub price: Option<Money>,
    pub attributes: Option<Map<String, Value>>,
}

/// A sellable variant of a product, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    pub variant_id: Uuid,
    pub sku: Sku,
    pub title: Name,
    pub price: Money,
    pub attributes: Map<String, Value>,
}

impl From<NewVariant> for Variant {
    fn from(new: NewVariant) -> Self {
        Self {
            variant_id: new.variant_id,
            sku: new.sku,
            title: new.title,
            price: new.price,
            attributes: new.attributes,
        }
    }
}

/// A product in the catalog (aggregate id = the product's id).
// Invariant: once created, every variant is priced in `currency`, and
// variant ids and SKUs are unique within the product.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    created: bool,
    deleted: bool,
    product_id: Uuid,
    name: Option<Name>,
    description: String,
    slug: Option<Slug>,
    category_id: Option<Uuid>,
    status: ProductStatus,
    currency: Option<Currency>,
    variants: Vec<Variant>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
}

/// What can be asked of a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductCommand {
    /// Put a new product in the catalog with at least one variant.
    Create {
        product_id: Uuid,
        name: Name,
        description: String,
        slug: Slug,
        category_id: Option<Uuid>,
        status: ProductStatus,
        variants: Vec<NewVariant>,
        created_at: DateTime<Utc>,
    },
    /// Change any subset of the product; `None` leaves a field as it is
    /// (`category_id: Some(None)` files the product under no category).
    Update {
        name: Option<Name>,
        description: Option<String>,
        slug: Option<Slug>,
        category_id: Option<Option<Uuid>>,
        status: Option<ProductStatus>,
        variant_changes: Vec<VariantChange>,
        new_variants: Vec<NewVariant>,
        updated_at: DateTime<Utc>,
    },
    /// Take the product out of the catalog for good (its history stays).
    Delete { deleted_at: DateTime<Utc> },
}

/// What happened to a product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProductEvent {
    /// The product entered the catalog.
    ProductCreated {
        product_id: Uuid,
        name: Name,
        description: String,
        slug: Slug,
        category_id: Option<Uuid>,
        status: ProductStatus,
        currency: Currency,
        variants: Vec<Variant>,
        created_at: DateTime<Utc>,
    },
    /// Some of the product changed. Only the fields that changed are
    /// present, with their new values; `variants_changed` holds each changed
    /// variant in full, `variants_added` each new one.
    ProductUpdated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Name>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slug: Option<Slug>,
        /// Absent: unchanged; `null`: no category any more; an id: moved.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "double_option"
        )]
        category_id: Option<Option<Uuid>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<ProductStatus>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        variants_changed: Vec<Variant>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        variants_added: Vec<Variant>,
        updated_at: DateTime<Utc>,
    },
    /// The product left the catalog.
    ProductDeleted { deleted_at: DateTime<Utc> },
}

impl DomainEvent for ProductEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ProductCreated { .. } => "ProductCreated",
            Self::ProductUpdated { .. } => "ProductUpdated",
            Self::ProductDeleted { .. } => "ProductDeleted",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a product command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProductError {
    /// No product has been created under this id.
    #[error("the product does not exist")]
    NotFound,
    /// A different product was already created under this id.
    #[error("product {product_id} already exists")]
    AlreadyExists { product_id: Uuid },
    /// The product was deleted; nothing more can happen to it.
    #[error("the product was deleted")]
    Deleted,
    /// A product needs at least one variant.
    #[error("a product needs at least one variant")]
    NoVariants,
    /// Two variants share an id.
    #[error("variant {variant_id} appears more than once")]
    DuplicateVariant { variant_id: Uuid },
    /// Two variants of the product share a SKU.
    #[error("SKU {sku} is used by more than one variant")]
    DuplicateSku { sku: Sku },
    /// A variant is priced in another currency than the product.
    #[error("variant {variant_id} is priced in {got}, the product in {expected}")]
    CurrencyMismatch {
        variant_id: Uuid,
        expected: Currency,
        got: Currency,
    },
    /// A change names a variant the product does not have.
    #[error("the product has no variant {variant_id}")]
    UnknownVariant { variant_id: Uuid },
}

impl Product {
    /// Whether the product was created (deleted products included).
    pub fn exists(&self) -> bool {
        self.created
    }

    /// Whether the product was deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// The product's id (nil before creation).
    pub fn product_id(&self) -> Uuid {
        self.product_id
    }

    /// The product's display name.
    pub fn name(&self) -> Option<&Name> {
        self.name.as_ref()
    }

    /// The product's description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The product's URL name.
    pub fn slug(&self) -> Option<&Slug> {
        self.slug.as_ref()
    }

    /// The category the product is filed under.
    pub fn category_id(&self) -> Option<Uuid> {
        self.category_id
    }

    /// Whether the product is public.
    pub fn status(&self) -> ProductStatus {
        self.status
    }

    /// The currency every variant is priced in.
    pub fn currency(&self) -> Option<&Currency> {
        self.currency.as_ref()
    }

    /// The product's variants, in the order they were added.
    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }

    /// One variant by id.
    pub fn variant(&self, variant_id: Uuid) -> Option<&Variant> {
        self.variants.iter().find(|v| v.variant_id == variant_id)
    }

    /// When the product was created.
    pub fn created_at(&self) -> Option<DateTime<Utc>> {
        self.created_at
    }

    /// When the product last changed.
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        self.updated_at
    }

    /// When the product was deleted.
    pub fn deleted_at(&self) -> Option<DateTime<Utc>> {
        self.deleted_at
    }

    /// Refuses a command on a product that is missing or deleted.
    fn check_live(&self) -> Result<&Currency, ProductError> {
        if self.deleted {
            return Err(ProductError::Deleted);
        }
        self.currency.as_ref().ok_or(ProductError::NotFound)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of ProductCommand::Create, unpacked"
    )]
    fn create(
        &self,
        product_id: Uuid,
        name: Name,
        description: String,
        slug: Slug,
        category_id: Option<Uuid>,
        status: ProductStatus,
        variants: Vec<NewVariant>,
        created_at: DateTime<Utc>,
    ) -> Result<Vec<ProductEvent>, ProductError> {
        if self.deleted {
            return Err(ProductError::Deleted);
        }
        let Some(first) = variants.first() else {
            return Err(ProductError::NoVariants);
        };
        let currency = first.price.currency().clone();
        let mut ids = BTreeSet::new();
        let mut skus = BTreeSet::new();
        for variant in &variants {
            check_currency(&currency, variant.variant_id, &variant.price)?;
            if !ids.insert(variant.variant_id) {
                return Err(ProductError::DuplicateVariant {
                    variant_id: variant.variant_id,
                });
            }
            if !skus.insert(&variant.sku) {
                return Err(ProductError::DuplicateSku {
                    sku: variant.sku.clone(),
                });
            }
        }
        let variants: Vec<Variant> = variants.into_iter().map(Variant::from).collect();
        if self.created {
            // A re-sent create of the same product is not a second product.
            let same = self.product_id == product_id
                && self.name.as_ref() == Some(&name)
                && self.description == description
                && self.slug.as_ref() == Some(&slug)
                && self.category_id == category_id
                && self.status == status
                && self.variants == variants;
            return if same {
                Ok(vec![])
            } else {
                Err(ProductError::AlreadyExists {
                    product_id: self.product_id,
                })
            };
        }
        Ok(vec![ProductEvent::ProductCreated {
            product_id,
            name,
            description,
            slug,
            category_id,
            status,
            currency,
            variants,
            created_at,
        }])
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of ProductCommand::Update, unpacked"
    )]
    fn update(
        &self,
        name: Option<Name>,
        description: Option<String>,
        slug: Option<Slug>,
        category_id: Option<Option<Uuid>>,
        status: Option<ProductStatus>,
        variant_changes: Vec<VariantChange>,
        new_variants: Vec<NewVariant>,
        updated_at: DateTime<Utc>,
    ) -> Result<Vec<ProductEvent>, ProductError> {
        let currency = self.check_live()?;

        let mut changed_ids = BTreeSet::new();
        let mut variants_changed = Vec::new();
        for change in variant_changes {
            let Some(current) = self.variant(change.variant_id) else {
                return Err(ProductError::UnknownVariant {
                    variant_id: change.variant_id,
                });
            };
            if !changed_ids.insert(change.variant_id) {
                return Err(ProductError::DuplicateVariant {
                    variant_id: change.variant_id,
                });
            }
            if let Some(price) = &change.price {
                check_currency(currency, change.variant_id, price)?;
            }
            let next = Variant {
                variant_id: current.variant_id,
                sku: current.sku.clone(),
                title: change.title.unwrap_or_else(|| current.title.clone()),
                price: change.price.unwrap_or_else(|| current.price.clone()),
                attributes: change
                    .attributes
                    .unwrap_or_else(|| current.attributes.clone()),
            };
            if &next != current {
                variants_changed.push(next);
            }
        }

        let mut added_ids = BTreeSet::new();
        let mut added_skus = BTreeSet::new();
        let mut variants_added = Vec::new();
        for new in new_variants {
            let new = Variant::from(new);
            check_currency(currency, new.variant_id, &new.price)?;
            if let Some(existing) = self.variant(new.variant_id) {
                // Re-sending the same new variant adds nothing.
                if existing == &new {
                    continue;
                }
                return Err(ProductError::DuplicateVariant {
                    variant_id: new.variant_id,
                });
            }
            if !added_ids.insert(new.variant_id) {
                return Err(ProductError::DuplicateVariant {
                    variant_id: new.variant_id,
                });
            }
            let sku_taken = self.variants.iter().any(|v| v.sku == new.sku);
            if sku_taken || !added_skus.insert(new.sku.clone()) {
                return Err(ProductError::DuplicateSku { sku: new.sku });
            }
            variants_added.push(new);
        }

        let name = name.filter(|n| self.name.as_ref() != Some(n));
        let description = description.filter(|d| d != &self.description);
        let slug = slug.filter(|s| self.slug.as_ref() != Some(s));
        let category_id = category_id.filter(|c| c != &self.category_id);
        let status = status.filter(|s| s != &self.status);

        let nothing_changed = name.is_none()
            && description.is_none()
            && slug.is_none()
            && category_id.is_none()
            && status.is_none()
            && variants_changed.is_empty()
            && variants_added.is_empty();
        if nothing_changed {
            return Ok(vec![]);
        }
        Ok(vec![ProductEvent::ProductUpdated {
            name,
            description,
            slug,
            category_id,
            status,
            variants_changed,
            variants_added,
            updated_at,
        }])
    }
}

fn check_currency(
    expected: &Currency,
    variant_id: Uuid,
    price: &Money,
) -> Result<(), ProductError> {
    if price.currency() == expected {
        Ok(())
    } else {
        Err(ProductError::CurrencyMismatch {
            variant_id,
            expected: expected.clone(),
            got: price.currency().clone(),
        })
    }
}

impl Decider for Product {
    fn decide(&self, command: ProductCommand) -> Result<Vec<ProductEvent>, ProductError> {
        match command {
            ProductCommand::Create {
                product_id,
                name,
                description,
                slug,
                category_id,
                status,
                variants,
                created_at,
            } => self.create(
                product_id,
                name,
                description,
                slug,
                category_id,
                status,
                variants,
                created_at,
            ),
            ProductCommand::Update {
                name,
                description,
                slug,
                category_id,
                status,
                variant_changes,
                new_variants,
                updated_at,
            } => self.update(
                name,
                description,
                slug,
                category_id,
                status,
                variant_changes,
                new_variants,
                updated_at,
            ),
            ProductCommand::Delete { deleted_at } => {
                self.check_live()?;
                Ok(vec![ProductEvent::ProductDeleted { deleted_at }])
            }
        }
    }
}

impl Aggregate for Product {
    const TYPE: &'static str = "Product";
    type Command = ProductCommand;
    type Event = ProductEvent;
    type Error = ProductError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        crate::handle_with_decider(self, command, sink).await
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ProductEvent::ProductCreated {
                product_id,
                name,
                description,
                slug,
                category_id,
                status,
                currency,
                variants,
                created_at,
            } => {
                self.created = true;
                self.product_id = product_id;
                self.name = Some(name);
                self.description = description;
                self.slug = Some(slug);
                self.category_id = category_id;
                self.status = status;
                self.currency = Some(currency);
                self.variants = variants;
                self.created_at = Some(created_at);
                self.updated_at = Some(created_at);
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
                if let Some(name) = name {
                    self.name = Some(name);
                }
                if let Some(description) = description {
                    self.description = description;
                }
                if let Some(slug) = slug {
                    self.slug = Some(slug);
                }
                if let Some(category_id) = category_id {
                    self.category_id = category_id;
                }
                if let Some(status) = status {
                    self.status = status;
                }
                for changed in variants_changed {
                    if let Some(slot) = self
                        .variants
                        .iter_mut()
                        .find(|v| v.variant_id == changed.variant_id)
                    {
                        *slot = changed;
                    }
                }
                self.variants.extend(variants_added);
                self.updated_at = Some(updated_at);
            }
            ProductEvent::ProductDeleted { deleted_at } => {
                self.deleted = true;
                self.deleted_at = Some(deleted_at);
                self.updated_at = Some(deleted_at);
            }
        }
    }
}

// --------------------------------------------------------------- Category

/// A node of the category tree (aggregate id = the category's id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    created: bool,
    category_id: Uuid,
    name: Option<Name>,
    slug: Option<Slug>,
    parent_id: Option<Uuid>,
}

/// What can be asked of a category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CategoryCommand {
    /// Add a category, at the root or under `parent_id`.
    Create {
        category_id: Uuid,
        name: Name,
        slug: Slug,
        parent_id: Option<Uuid>,
    },
    /// Rename or move a category; `None` leaves a field as it is
    /// (`parent_id: Some(None)` moves it to the root). The caller reads the
    /// tree and passes the ancestors of the new parent, root first or in any
    /// order, so that the category can refuse to move under itself.
    Update {
        name: Option<Name>,
        slug: Option<Slug>,
        parent_id: Option<Option<Uuid>>,
        ancestors_of_new_parent: Vec<Uuid>,
    },
}

/// What happened to a category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CategoryEvent {
    /// The category was added to the tree.
    CategoryCreated {
        category_id: Uuid,
        name: Name,
        slug: Slug,
        parent_id: Option<Uuid>,
    },
    /// The category was renamed or moved. Only the fields that changed are
    /// present, with their new values.
    CategoryUpdated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Name>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slug: Option<Slug>,
        /// Absent: unchanged; `null`: moved to the root; an id: moved under it.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "double_option"
        )]
        parent_id: Option<Option<Uuid>>,
    },
}

impl DomainEvent for CategoryEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CategoryCreated { .. } => "CategoryCreated",
            Self::CategoryUpdated { .. } => "CategoryUpdated",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a category command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CategoryError {
    /// No category has been created under this id.
    #[error("the category does not exist")]
    NotFound,
    /// A different category was already created under this id.
    #[error("category {category_id} already exists")]
    AlreadyExists { category_id: Uuid },
    /// The move would put the category under itself or its own descendant.
    #[error("moving category {category_id} under {parent_id} would create a cycle")]
    WouldCreateCycle { category_id: Uuid, parent_id: Uuid },
}

impl Category {
    /// Whether the category was created.
    pub fn exists(&self) -> bool {
        self.created
    }

    /// The category's id (nil before creation).
    pub fn category_id(&self) -> Uuid {
        self.category_id
    }

    /// The category's display name.
    pub fn name(&self) -> Option<&Name> {
        self.name.as_ref()
    }

    /// The category's URL name.
    pub fn slug(&self) -> Option<&Slug> {
        self.slug.as_ref()
    }

    /// The parent category, `None` at the root.
    pub fn parent_id(&self) -> Option<Uuid> {
        self.parent_id
    }
}

impl Decider for Category {
    fn decide(&self, command: CategoryCommand) -> Result<Vec<CategoryEvent>, CategoryError> {
        match command {
            CategoryCommand::Create {
                category_id,
                name,
                slug,
                parent_id,
            } => {
                if parent_id == Some(category_id) {
                    return Err(CategoryError::WouldCreateCycle {
                        category_id,
                        parent_id: category_id,
                    });
                }
                if self.created {
                    let same = self.category_id == category_id
                        && self.name.as_ref() == Some(&name)
                        && self.slug.as_ref() == Some(&slug)
                        && self.parent_id == parent_id;
                    return if same {
                        Ok(vec![])
                    } else {
                        Err(CategoryError::AlreadyExists {
                            category_id: self.category_id,
                        })
                    };
                }
                Ok(vec![CategoryEvent::CategoryCreated {
                    category_id,
                    name,
                    slug,
                    parent_id,
                }])
            }
            CategoryCommand::Update {
                name,
                slug,
                parent_id,
                ancestors_of_new_parent,
            } => {
                if !self.created {
                    return Err(CategoryError::NotFound);
                }
                let parent_id = parent_id.filter(|p| p != &self.parent_id);
                // A category may not sit under itself or under one of its
                // own descendants (whose ancestors include it).
                if let Some(Some(new_parent)) = parent_id {
                    if new_parent == self.category_id
                        || ancestors_of_new_parent.contains(&self.category_id)
                    {
                        return Err(CategoryError::WouldCreateCycle {
                            category_id: self.category_id,
                            parent_id: new_parent,
                        });
                    }
                }
                let name = name.filter(|n| self.name.as_ref() != Some(n));
                let slug = slug.filter(|s| self.slug.as_ref() != Some(s));
                if name.is_none() && slug.is_none() && parent_id.is_none() {
                    return Ok(vec![]);
                }
                Ok(vec![CategoryEvent::CategoryUpdated {
                    name,
                    slug,
                    parent_id,
                }])
            }
        }
    }
}

impl Aggregate for Category {
    const TYPE: &'static str = "Category";
    type Command = CategoryCommand;
    type Event = CategoryEvent;
    type Error = CategoryError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        crate::handle_with_decider(self, command, sink).await
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            CategoryEvent::CategoryCreated {
                category_id,
                name,
                slug,
                parent_id,
            } => {
                self.created = true;
                self.category_id = category_id;
                self.name = Some(name);
                self.slug = Some(slug);
                self.parent_id = parent_id;
            }
            CategoryEvent::CategoryUpdated {
                name,
                slug,
                parent_id,
            } => {
                if let Some(name) = name {
                    self.name = Some(name);
                }
                if let Some(slug) = slug {
                    self.slug = Some(slug);
                }
                if let Some(parent_id) = parent_id {
                    self.parent_id = parent_id;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use cqrs_es::test::TestFramework;
    use serde_json::json;

    use super::*;

    type Products = TestFramework<Product>;
    type Categories = TestFramework<Category>;

    const PRODUCT: Uuid = Uuid::from_u128(0xb_1);
    const SMALL: Uuid = Uuid::from_u128(0x5_1);
    const LARGE: Uuid = Uuid::from_u128(0x5_2);
    const XL: Uuid = Uuid::from_u128(0x5_3);
    const SHOES: Uuid = Uuid::from_u128(0xc_1);
    const BOOTS: Uuid = Uuid::from_u128(0xc_2);
    const HIKING: Uuid = Uuid::from_u128(0xc_3);

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, hour, 0, 0).unwrap()
    }

    fn name(text: &str) -> Name {
        Name::try_from(text).unwrap()
    }

    fn slug(text: &str) -> Slug {
        Slug::try_from(text).unwrap()
    }

    fn sku(text: &str) -> Sku {
        Sku::try_from(text).unwrap()
    }

    fn price(cents: i64, code: &str) -> Money {
        Money::new(cents, Currency::try_from(code).unwrap()).unwrap()
    }

    fn usd() -> Currency {
        Currency::try_from("USD").unwrap()
    }

    fn attributes(size: &str) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("size".to_owned(), json!(size));
        map
    }

    fn new_variant(variant_id: Uuid, code: &str, cents: i64) -> NewVariant {
        NewVariant {
            variant_id,
            sku: sku(&format!("SHOE-{}", variant_id.as_u128())),
            title: name("Size"),
            price: price(cents, code),
            attributes: attributes("M"),
        }
    }

    fn variant(variant_id: Uuid, cents: i64) -> Variant {
        Variant::from(new_variant(variant_id, "USD", cents))
    }

    fn create(variants: Vec<NewVariant>) -> ProductCommand {
        ProductCommand::Create {
            product_id: PRODUCT,
            name: name("Red Shoe"),
            description: "A shoe, red.".to_owned(),
            slug: slug("red-shoe"),
            category_id: Some(SHOES),
            status: ProductStatus::Active,
            variants,
            created_at: at(9),
        }
    }

    fn created() -> ProductEvent {
        ProductEvent::ProductCreated {
            product_id: PRODUCT,
            name: name("Red Shoe"),
            description: "A shoe, red.".to_owned(),
            slug: slug("red-shoe"),
            category_id: Some(SHOES),
            status: ProductStatus::Active,
            currency: usd(),
            variants: vec![variant(SMALL, 1999), variant(LARGE, 2199)],
            created_at: at(9),
        }
    }

    fn no_update() -> ProductCommand {
        ProductCommand::Update {
            name: None,
            description: None,
            slug: None,
            category_id: None,
            status: None,
            variant_changes: vec![],
            new_variants: vec![],
            updated_at: at(10),
        }
    }

    fn empty_updated() -> ProductEvent {
        ProductEvent::ProductUpdated {
            name: None,
            description: None,
            slug: None,
            category_id: None,
            status: None,
            variants_changed: vec![],
            variants_added: vec![],
            updated_at: at(10),
        }
    }

    fn update(edit: impl FnOnce(&mut ProductCommand)) -> ProductCommand {
        let mut command = no_update();
        edit(&mut command);
        command
    }

    fn updated(edit: impl FnOnce(&mut ProductEvent)) -> ProductEvent {
        let mut event = empty_updated();
        edit(&mut event);
        event
    }

    fn deleted() -> ProductEvent {
        ProductEvent::ProductDeleted { deleted_at: at(11) }
    }

    // Product: create

    #[test]
    fn creating_a_product_records_it_with_its_currency() {
        Products::with(())
            .given_no_previous_events()
            .when(create(vec![
                new_variant(SMALL, "USD", 1999),
                new_variant(LARGE, "USD", 2199),
            ]))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn creating_a_product_without_variants_is_refused() {
        Products::with(())
            .given_no_previous_events()
            .when(create(vec![]))
            .then_expect_error(ProductError::NoVariants);
    }

    #[test]
    fn creating_a_product_priced_in_two_currencies_is_refused() {
        Products::with(())
            .given_no_previous_events()
            .when(create(vec![
                new_variant(SMALL, "USD", 1999),
                new_variant(LARGE, "EUR", 2199),
            ]))
            .then_expect_error(ProductError::CurrencyMismatch {
                variant_id: LARGE,
                expected: usd(),
                got: Currency::try_from("EUR").unwrap(),
            });
    }

    #[test]
    fn creating_a_product_with_a_repeated_variant_or_sku_is_refused() {
        Products::with(())
            .given_no_previous_events()
            .when(create(vec![
                new_variant(SMALL, "USD", 1999),
                new_variant(SMALL, "USD", 2199),
            ]))
            .then_expect_error(ProductError::DuplicateVariant { variant_id: SMALL });
        let mut clash = new_variant(LARGE, "USD", 2199);
        clash.sku = sku(&format!("SHOE-{}", SMALL.as_u128()));
        Products::with(())
            .given_no_previous_events()
            .when(create(vec![new_variant(SMALL, "USD", 1999), clash.clone()]))
            .then_expect_error(ProductError::DuplicateSku { sku: clash.sku });
    }

    #[test]
    fn creating_the_same_product_again_emits_nothing() {
        Products::with(())
            .given(vec![created()])
            .when(create(vec![
                new_variant(SMALL, "USD", 1999),
                new_variant(LARGE, "USD", 2199),
            ]))
            .then_expect_events(vec![]);
    }

    #[test]
    fn creating_another_product_under_a_taken_id_is_refused() {
        Products::with(())
            .given(vec![created()])
            .when(create(vec![new_variant(SMALL, "USD", 1999)]))
            .then_expect_error(ProductError::AlreadyExists {
                product_id: PRODUCT,
            });
    }

    // Product: update

    #[test]
    fn updating_records_only_what_changed() {
        Products::with(())
            .given(vec![created()])
            .when(update(|c| {
                if let ProductCommand::Update {
                    name: n,
                    description,
                    slug: s,
                    category_id,
                    status,
                    ..
                } = c
                {
                    *n = Some(name("Crimson Shoe"));
                    *description = Some("A shoe, red.".to_owned());
                    *s = Some(slug("red-shoe"));
                    *category_id = Some(None);
                    *status = Some(ProductStatus::Draft);
                }
            }))
            .then_expect_events(vec![updated(|e| {
                if let ProductEvent::ProductUpdated {
                    name: n,
                    category_id,
                    status,
                    ..
                } = e
                {
                    *n = Some(name("Crimson Shoe"));
                    *category_id = Some(None);
                    *status = Some(ProductStatus::Draft);
                }
            })]);
    }

    #[test]
    fn updating_nothing_emits_nothing() {
        Products::with(())
            .given(vec![created()])
            .when(no_update())
            .then_expect_events(vec![]);
        let same = update(|c| {
            if let ProductCommand::Update {
                name: n,
                category_id,
                variant_changes,
                ..
            } = c
            {
                *n = Some(name("Red Shoe"));
                *category_id = Some(Some(SHOES));
                variant_changes.push(VariantChange {
                    variant_id: SMALL,
                    title: Some(name("Size")),
                    price: Some(price(1999, "USD")),
                    attributes: None,
                });
            }
        });
        Products::with(())
            .given(vec![created()])
            .when(same)
            .then_expect_events(vec![]);
    }

    #[test]
    fn changing_a_variant_records_it_in_full() {
        let command = update(|c| {
            if let ProductCommand::Update {
                variant_changes, ..
            } = c
            {
                variant_changes.push(VariantChange {
                    variant_id: LARGE,
                    title: None,
                    price: Some(price(2499, "USD")),
                    attributes: Some(attributes("L")),
                });
            }
        });
        let mut large = variant(LARGE, 2499);
        large.attributes = attributes("L");
        Products::with(())
            .given(vec![created()])
            .when(command)
            .then_expect_events(vec![updated(|e| {
                if let ProductEvent::ProductUpdated {
                    variants_changed, ..
                } = e
                {
                    variants_changed.push(large);
                }
            })]);
    }

    #[test]
    fn changing_an_unknown_variant_is_refused() {
        let command = update(|c| {
            if let ProductCommand::Update {
                variant_changes, ..
            } = c
            {
                variant_changes.push(VariantChange {
                    variant_id: XL,
                    title: Some(name("XL")),
                    price: None,
                    attributes: None,
                });
            }
        });
        Products::with(())
            .given(vec![created()])
            .when(command)
            .then_expect_error(ProductError::UnknownVariant { variant_id: XL });
    }

    #[test]
    fn repricing_a_variant_in_another_currency_is_refused() {
        let command = update(|c| {
            if let ProductCommand::Update {
                variant_changes, ..
            } = c
            {
                variant_changes.push(VariantChange {
                    variant_id: SMALL,
                    title: None,
                    price: Some(price(1999, "EUR")),
                    attributes: None,
                });
            }
        });
        Products::with(())
            .given(vec![created()])
            .when(command)
            .then_expect_error(ProductError::CurrencyMismatch {
                variant_id: SMALL,
                expected: usd(),
                got: Currency::try_from("EUR").unwrap(),
            });
    }

    #[test]
    fn adding_a_variant_records_it() {
        let command = update(|c| {
            if let ProductCommand::Update { new_variants, .. } = c {
                new_variants.push(new_variant(XL, "USD", 2999));
            }
        });
        Products::with(())
            .given(vec![created()])
            .when(command)
            .then_expect_events(vec![updated(|e| {
                if let ProductEvent::ProductUpdated { variants_added, .. } = e {
                    variants_added.push(variant(XL, 2999));
                }
            })]);
    }

    #[test]
    fn adding_the_same_variant_again_emits_nothing() {
        let added = updated(|e| {
            if let ProductEvent::ProductUpdated { variants_added, .. } = e {
                variants_added.push(variant(XL, 2999));
            }
        });
        let command = update(|c| {
            if let ProductCommand::Update { new_variants, .. } = c {
                new_variants.push(new_variant(XL, "USD", 2999));
            }
        });
        Products::with(())
            .given(vec![created(), added])
            .when(command)
            .then_expect_events(vec![]);
    }

    #[test]
    fn adding_a_variant_whose_id_or_sku_is_taken_is_refused() {
        let other_small = update(|c| {
            if let ProductCommand::Update { new_variants, .. } = c {
                new_variants.push(new_variant(SMALL, "USD", 1));
            }
        });
        Products::with(())
            .given(vec![created()])
            .when(other_small)
            .then_expect_error(ProductError::DuplicateVariant { variant_id: SMALL });

        let mut clash = new_variant(XL, "USD", 2999);
        clash.sku = sku(&format!("SHOE-{}", SMALL.as_u128()));
        let taken_sku = clash.sku.clone();
        let command = update(|c| {
            if let ProductCommand::Update { new_variants, .. } = c {
                new_variants.push(clash);
            }
        });
        Products::with(())
            .given(vec![created()])
            .when(command)
            .then_expect_error(ProductError::DuplicateSku { sku: taken_sku });
    }

    #[test]
    fn adding_a_variant_in_another_currency_is_refused() {
        let command = update(|c| {
            if let ProductCommand::Update { new_variants, .. } = c {
                new_variants.push(new_variant(XL, "EUR", 2999));
            }
        });
        Products::with(())
            .given(vec![created()])
            .when(command)
            .then_expect_error(ProductError::CurrencyMismatch {
                variant_id: XL,
                expected: usd(),
                got: Currency::try_from("EUR").unwrap(),
            });
    }

    #[test]
    fn updating_a_missing_product_is_refused() {
        Products::with(())
            .given_no_previous_events()
            .when(no_update())
            .then_expect_error(ProductError::NotFound);
    }

    // Product: delete

    #[test]
    fn deleting_a_product_records_it() {
        Products::with(())
            .given(vec![created()])
            .when(ProductCommand::Delete { deleted_at: at(11) })
            .then_expect_events(vec![deleted()]);
    }

    #[test]
    fn deleting_a_missing_product_is_refused() {
        Products::with(())
            .given_no_previous_events()
            .when(ProductCommand::Delete { deleted_at: at(11) })
            .then_expect_error(ProductError::NotFound);
    }

    #[test]
    fn every_command_on_a_deleted_product_is_refused() {
        for command in [
            create(vec![
                new_variant(SMALL, "USD", 1999),
                new_variant(LARGE, "USD", 2199),
            ]),
            no_update(),
            ProductCommand::Delete { deleted_at: at(12) },
        ] {
            Products::with(())
                .given(vec![created(), deleted()])
                .when(command)
                .then_expect_error(ProductError::Deleted);
        }
    }

    // Product: state and wire format

    #[test]
    fn applying_updates_moves_the_product_state() {
        let mut product = Product::default();
        product.apply(created());
        product.apply(updated(|e| {
            if let ProductEvent::ProductUpdated {
                category_id,
                variants_changed,
                variants_added,
                ..
            } = e
            {
                *category_id = Some(None);
                variants_changed.push(variant(SMALL, 999));
                variants_added.push(variant(XL, 2999));
            }
        }));
        assert_eq!(product.category_id(), None);
        assert_eq!(product.name(), Some(&name("Red Shoe")));
        assert_eq!(
            product.variant(SMALL).map(|v| v.price.amount_cents()),
            Some(999)
        );
        assert_eq!(product.variants().len(), 3);
        assert_eq!(product.updated_at(), Some(at(10)));
        product.apply(deleted());
        assert!(product.is_deleted());
        assert!(product.exists());
    }

    #[test]
    fn product_updated_tells_a_cleared_category_from_an_unchanged_one() {
        let cleared = updated(|e| {
            if let ProductEvent::ProductUpdated { category_id, .. } = e {
                *category_id = Some(None);
            }
        });
        let json = serde_json::to_value(&cleared).unwrap();
        assert_eq!(json["ProductUpdated"]["category_id"], Value::Null);
        assert!(json["ProductUpdated"]
            .as_object()
            .unwrap()
            .contains_key("category_id"));
        assert_eq!(
            serde_json::from_value::<ProductEvent>(json).unwrap(),
            cleared
        );

        let unchanged = empty_updated();
        let json = serde_json::to_value(&unchanged).unwrap();
        assert!(!json["ProductUpdated"]
            .as_object()
            .unwrap()
            .contains_key("category_id"));
        assert_eq!(
            serde_json::from_value::<ProductEvent>(json).unwrap(),
            unchanged
        );

        let round: ProductEvent =
            serde_json::from_value(serde_json::to_value(created()).unwrap()).unwrap();
        assert_eq!(round, created());
        assert_eq!(created().event_type(), "ProductCreated");
        assert_eq!(deleted().event_version(), "1");
    }

    // Category

    fn category_created(category_id: Uuid, parent_id: Option<Uuid>) -> CategoryEvent {
        CategoryEvent::CategoryCreated {
            category_id,
            name: name("Boots"),
            slug: slug("boots"),
            parent_id,
        }
    }

    fn move_to(parent_id: Option<Uuid>, ancestors: Vec<Uuid>) -> CategoryCommand {
        CategoryCommand::Update {
            name: None,
            slug: None,
            parent_id: Some(parent_id),
            ancestors_of_new_parent: ancestors,
        }
    }

    #[test]
    fn creating_a_category_records_it() {
        Categories::with(())
            .given_no_previous_events()
            .when(CategoryCommand::Create {
                category_id: BOOTS,
                name: name("Boots"),
                slug: slug("boots"),
                parent_id: Some(SHOES),
            })
            .then_expect_events(vec![category_created(BOOTS, Some(SHOES))]);
    }

    #[test]
    fn creating_a_category_under_itself_is_refused() {
        Categories::with(())
            .given_no_previous_events()
            .when(CategoryCommand::Create {
                category_id: BOOTS,
                name: name("Boots"),
                slug: slug("boots"),
                parent_id: Some(BOOTS),
            })
            .then_expect_error(CategoryError::WouldCreateCycle {
                category_id: BOOTS,
                parent_id: BOOTS,
            });
    }

    #[test]
    fn creating_the_same_category_again_emits_nothing_and_another_is_refused() {
        Categories::with(())
            .given(vec![category_created(BOOTS, Some(SHOES))])
            .when(CategoryCommand::Create {
                category_id: BOOTS,
                name: name("Boots"),
                slug: slug("boots"),
                parent_id: Some(SHOES),
            })
            .then_expect_events(vec![]);
        Categories::with(())
            .given(vec![category_created(BOOTS, Some(SHOES))])
            .when(CategoryCommand::Create {
                category_id: BOOTS,
                name: name("Wellies"),
                slug: slug("wellies"),
                parent_id: None,
            })
            .then_expect_error(CategoryError::AlreadyExists { category_id: BOOTS });
    }

    #[test]
    fn renaming_a_category_records_only_what_changed() {
        Categories::with(())
            .given(vec![category_created(BOOTS, Some(SHOES))])
            .when(CategoryCommand::Update {
                name: Some(name("Boots & Wellies")),
                slug: Some(slug("boots")),
                parent_id: Some(Some(SHOES)),
                ancestors_of_new_parent: vec![],
            })
            .then_expect_events(vec![CategoryEvent::CategoryUpdated {
                name: Some(name("Boots & Wellies")),
                slug: None,
                parent_id: None,
            }]);
    }

    #[test]
    fn updating_a_category_to_what_it_is_emits_nothing() {
        Categories::with(())
            .given(vec![category_created(BOOTS, Some(SHOES))])
            .when(CategoryCommand::Update {
                name: Some(name("Boots")),
                slug: None,
                parent_id: Some(Some(SHOES)),
                ancestors_of_new_parent: vec![BOOTS],
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn moving_a_category_records_the_new_parent() {
        Categories::with(())
            .given(vec![category_created(BOOTS, Some(SHOES))])
            .when(move_to(None, vec![]))
            .then_expect_events(vec![CategoryEvent::CategoryUpdated {
                name: None,
                slug: None,
                parent_id: Some(None),
            }]);
        Categories::with(())
            .given(vec![category_created(BOOTS, None)])
            .when(move_to(Some(SHOES), vec![]))
            .then_expect_events(vec![CategoryEvent::CategoryUpdated {
                name: None,
                slug: None,
                parent_id: Some(Some(SHOES)),
            }]);
    }

    #[test]
    fn moving_a_category_under_itself_is_refused() {
        Categories::with(())
            .given(vec![category_created(BOOTS, Some(SHOES))])
            .when(move_to(Some(BOOTS), vec![SHOES]))
            .then_expect_error(CategoryError::WouldCreateCycle {
                category_id: BOOTS,
                parent_id: BOOTS,
            });
    }

    #[test]
    fn moving_a_category_under_its_own_descendant_is_refused() {
        // Tree: SHOES > BOOTS > HIKING. Moving BOOTS under HIKING, whose
        // ancestors are SHOES and BOOTS.
        Categories::with(())
            .given(vec![category_created(BOOTS, Some(SHOES))])
            .when(move_to(Some(HIKING), vec![SHOES, BOOTS]))
            .then_expect_error(CategoryError::WouldCreateCycle {
                category_id: BOOTS,
                parent_id: HIKING,
            });
    }

    #[test]
    fn updating_a_missing_category_is_refused() {
        Categories::with(())
            .given_no_previous_events()
            .when(move_to(None, vec![]))
            .then_expect_error(CategoryError::NotFound);
    }

    #[test]
    fn applying_category_events_moves_the_state() {
        let mut category = Category::default();
        assert!(!category.exists());
        category.apply(category_created(BOOTS, Some(SHOES)));
        category.apply(CategoryEvent::CategoryUpdated {
            name: Some(name("Wellies")),
            slug: None,
            parent_id: Some(None),
        });
        assert!(category.exists());
        assert_eq!(category.category_id(), BOOTS);
        assert_eq!(category.name(), Some(&name("Wellies")));
        assert_eq!(category.slug(), Some(&slug("boots")));
        assert_eq!(category.parent_id(), None);
        let moved = CategoryEvent::CategoryUpdated {
            name: None,
            slug: None,
            parent_id: Some(None),
        };
        let json = serde_json::to_string(&moved).unwrap();
        assert_eq!(json, r#"{"CategoryUpdated":{"parent_id":null}}"#);
        assert_eq!(serde_json::from_str::<CategoryEvent>(&json).unwrap(), moved);
        assert_eq!(moved.event_type(), "CategoryUpdated");
    }
}
