//! Read models and the code that builds them from the event store.
//!
//! A projection folds stored events, in the store's global order, into
//! Postgres tables (and, after commit, into Redis caches). The runner tails
//! the `events` table gap-safely, applies each batch and moves the
//! projection's checkpoint in one transaction, so a crash never loses or
//! double-applies an event. Depends on `domain` for event types, on sqlx and
//! on redis (for caches); never on the HTTP layer.

pub mod cache;
pub mod carts;
pub mod catalog;
pub mod catalog_queries;
mod feed;
mod leadership;
mod order_batch;
pub mod orders;
pub mod rebuild;
pub mod runner;
pub mod sales;
pub mod set;
pub mod stock;
pub mod stored_event;

pub use runner::{Projection, ProjectionError, ProjectionRunner, StepOutcome};
pub use set::{ProjectionSet, WaitError};
pub use stored_event::{GlobalPosition, StoredEvent};
