//! The write side's persistence: appending events with optimistic
//! concurrency, loading aggregates, and executing commands with group commit.

mod cqrs_adapter;
mod executor;
mod metadata;
mod repository;

pub use executor::{serialize_events, CommandBus, CommandError, Executed};
pub use metadata::{Actor, Metadata};
pub use repository::{appended, AppendError, EventColumns, EventStore, NewEvent};
