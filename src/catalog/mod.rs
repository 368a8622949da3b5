//! The catalog, category and stock API: requests become `Product`,
//! `Category` and `InventoryItem` commands; answers come from the `catalog`
//! and `stock` read models through the versioned Redis cache.

pub mod categories;
pub mod claims;
pub mod products;
pub mod reads;
pub mod seed;
pub mod stock;

use std::fmt::Display;

use actix_web::{web, HttpRequest};
use domain::catalog::{CategoryError, ProductError};
use domain::inventory::InventoryError;
use projections::GlobalPosition;
use serde::{Deserialize, Deserializer};

use crate::auth::{AuthUser, Role};
use crate::event_store::Metadata;
use crate::http::idempotency::IdempotencyKey;
use crate::http::middleware::request_id_of;
use crate::http::problem::{ApiError, FieldError};
use crate::state::AppState;

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .configure(products::configure)
        .configure(categories::configure)
        .configure(stock::configure);
}

/// Who is reading: admins also see drafts and stock counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer {
    Public,
    Admin,
}

impl Viewer {
    pub fn of(user: Option<AuthUser>) -> Self {
        match user {
            Some(user) if user.role == Role::Admin => Self::Admin,
            _ => Self::Public,
        }
    }
}

/// Event metadata for a command caused by this request.
fn metadata_for(request: &HttpRequest, user: &AuthUser, key: Option<&IdempotencyKey>) -> Metadata {
    Metadata::user(user.id, request_id_of(request)).with_idempotency_key(key.map(|k| k.0.clone()))
}

/// Waits until each named projection has applied the write at its position
/// (positions are `None` when a command stored nothing).
async fn settle(
    state: &AppState,
    waits: &[(&'static str, Option<GlobalPosition>)],
) -> Result<(), ApiError> {
    for (projection, position) in waits {
        state.read_your_write(projection, *position).await?;
    }
    Ok(())
}

/// A product refusal as a problem.
pub fn product_rejection(error: ProductError) -> ApiError {
    match error {
        ProductError::NotFound | ProductError::Deleted => ApiError::not_found("product"),
        ProductError::AlreadyExists { .. } => ApiError::Conflict(error.to_string()),
        ProductError::NoVariants
        | ProductError::DuplicateVariant { .. }
        | ProductError::DuplicateSku { .. }
        | ProductError::UnknownVariant { .. } => {
            ApiError::invalid_field("variants", error.to_string())
        }
        ProductError::CurrencyMismatch { .. } => {
            ApiError::invalid_field("variants", error.to_string())
        }
    }
}

/// A category refusal as a problem.
pub fn category_rejection(error: CategoryError) -> ApiError {
    match error {
        CategoryError::NotFound => ApiError::not_found("category"),
        CategoryError::AlreadyExists { .. } | CategoryError::WouldCreateCycle { .. } => {
            ApiError::Conflict(error.to_string())
        }
    }
}

/// A stock refusal as a problem.
pub fn inventory_rejection(error: InventoryError) -> ApiError {
    match error {
        InventoryError::NotRegistered => ApiError::not_found("variant"),
        InventoryError::InsufficientStock {
            requested,
            available,
        } => ApiError::Conflict(format!(
            "{requested} units requested, {available} available"
        )),
        InventoryError::AlreadyRegistered { .. }
        | InventoryError::TooMuchStock { .. }
        | InventoryError::BelowReserved { .. }
        | InventoryError::ReservationMismatch { .. }
        | InventoryError::NoReservation { .. } => ApiError::Conflict(error.to_string()),
    }
}

/// Collects every offending field of a request before anything is done.
#[derive(Debug, Default)]
struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    /// The value, or `None` with the error recorded under `field`.
    fn check<T, E: Display>(
        &mut self,
        field: impl Into<String>,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.add(field, error.to_string());
                None
            }
        }
    }

    /// A required field's value, or `None` with "is required" recorded.
    fn require<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.add(field, "is required");
        }
        value
    }

    fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(self.0))
        }
    }
}

/// A description: free text up to this many characters.
const MAX_DESCRIPTION_CHARS: usize = 10_000;
/// A stock change's reason: free text up to this many characters.
const MAX_REASON_CHARS: usize = 500;

fn check_description(text: &str) -> Result<String, String> {
    let count = text.chars().count();
    if count > MAX_DESCRIPTION_CHARS {
        return Err(format!(
            "must be at most {MAX_DESCRIPTION_CHARS} characters, got {count}"
        ));
    }
    Ok(text.trim().to_owned())
}

fn check_reason(reason: Option<String>) -> Result<Option<String>, String> {
    let Some(reason) = reason else {
        return Ok(None);
    };
    let reason = reason.trim().to_owned();
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(format!("must be at most {MAX_REASON_CHARS} characters"));
    }
    Ok(Some(reason).filter(|r| !r.is_empty()))
}

/// Serde for a field that may be absent (`None`), `null` (`Some(None)`) or
/// set (`Some(Some(v))`). Use with `#[serde(default, deserialize_with = ...)]`.
fn absent_null_or<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}
