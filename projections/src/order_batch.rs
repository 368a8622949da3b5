//! A batch of `Order` events as the orders and sales projections fold it:
//! decoded once, and split into orders that only appear placed and orders
//! that something happened to after their placement.

use std::collections::HashSet;

use domain::order::OrderEvent;
use uuid::Uuid;

use crate::runner::ProjectionError;
use crate::stored_event::StoredEvent;

/// One event of the batch with its order's id and its decoded payload.
pub(crate) type DecodedOrderEvent<'a> = (Uuid, &'a StoredEvent, OrderEvent);

pub(crate) fn decode(
    events: &[StoredEvent],
) -> Result<Vec<DecodedOrderEvent<'_>>, ProjectionError> {
    events
        .iter()
        .map(|event| {
            let order_id = event.aggregate_uuid()?;
            let payload: OrderEvent = event.payload_as()?;
            Ok((order_id, event, payload))
        })
        .collect()
}

/// The orders with an event other than their placement in the batch, once
/// each, in the order they first appear: the ones whose rows must be read
/// before the batch is folded. Orders only placed need no read; their
/// inserts skip the rows that exist.
pub(crate) fn changed_after_placement(decoded: &[DecodedOrderEvent<'_>]) -> Vec<Uuid> {
    let mut seen = HashSet::new();
    decoded
        .iter()
        .filter(|(_, _, payload)| !matches!(payload, OrderEvent::OrderPlaced { .. }))
        .map(|(order_id, _, _)| *order_id)
        .filter(|order_id| seen.insert(*order_id))
        .collect()
}
