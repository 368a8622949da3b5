//! The commerce domain: aggregates, their commands and events, and the value
//! types they are made of.
//!
//! Pure logic only. Nothing here does I/O, reads a clock or draws a random
//! number: time, ids and prices arrive inside commands. The crate may depend
//! on `cqrs-es` (for its `Aggregate` and `DomainEvent` traits and its test
//! framework) and on plain data crates; never on sqlx, actix or redis.
//!
//! Aggregates, each one `Decider` with its commands, events and error enum
//! beside it: [`inventory::InventoryItem`] (stock of one variant),
//! [`order::Order`], [`catalog::Product`], [`catalog::Category`] and
//! [`cart::Cart`]. Checked value types (quantity, money, SKU, slug, name)
//! are in [`values`].

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;

pub mod cart;
pub mod catalog;
pub mod inventory;
pub mod order;
pub mod values;

/// An aggregate whose business rules are one pure, synchronous function.
///
/// `decide` looks at the current state and a command and either refuses the
/// command or names the events that record it; it never changes the state.
/// State only changes through `Aggregate::apply`. Keeping the two apart lets
/// the command executor decide many queued commands in a row against one
/// in-memory copy (group commit) without cloning the aggregate for each one.
pub trait Decider: Aggregate + Clone {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// `cqrs_es::Aggregate::handle` for every `Decider`: decide, then apply each
/// event through the sink (which is how cqrs-es 0.5 expects state to move).
pub async fn handle_with_decider<A: Decider>(
    aggregate: &mut A,
    command: A::Command,
    sink: &EventSink<A>,
) -> Result<(), A::Error> {
    for event in aggregate.decide(command)? {
        sink.write(event, aggregate).await;
    }
    Ok(())
}
