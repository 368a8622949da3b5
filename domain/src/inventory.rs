//! The stock of one product variant: what is on the shelf, and which orders
//! hold how much of it.

use std::collections::HashMap;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::values::{Quantity, Sku};
use crate::Decider;

/// The stock of one product variant (aggregate id = the variant's id).
///
/// `on_hand` counts the units physically present and not yet sold;
/// `reserved` the part of them held by unpaid orders; the rest is
/// `available` to new orders.
// Invariant: reserved == sum of reservations <= on_hand, at every version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryItem {
    registered: bool,
    variant_id: Uuid,
    sku: Option<Sku>,
    initial_on_hand: u32,
    on_hand: u32,
    reserved: u32,
    // Hashed, not ordered: nothing reads them in order, and the checkout
    // committer copies a hot item for every batch, which costs one
    // allocation for a hash map and one per node of a B-tree (a tenth of
    // the server's CPU went to copying and dropping B-trees in a sale).
    reservations: HashMap<Uuid, u32>,
    /// The units each paid order took off the shelf.
    committed: HashMap<Uuid, u32>,
}

/// Why an order gave its reserved units back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The order's hold ran past its deadline.
    Expired,
    /// The payment for the order failed.
    PaymentFailed,
    /// The order was cancelled.
    Cancelled,
    /// The checkout could not reserve every line, so it gave back the ones it got.
    CheckoutAborted,
}

/// What can be asked of a variant's stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventoryCommand {
    /// Start tracking the variant with `initial_on_hand` units on the shelf.
    Register {
        variant_id: Uuid,
        sku: Sku,
        initial_on_hand: u32,
    },
    /// Units arrived (restock, return to shelf).
    AddStock {
        quantity: Quantity,
        reason: Option<String>,
    },
    /// A count of the shelf: the physical number of unsold units is `on_hand`.
    SetOnHand {
        on_hand: u32,
        reason: Option<String>,
    },
    /// Hold `quantity` units for an unpaid order.
    Reserve { order_id: Uuid, quantity: Quantity },
    /// Give an order's held units back to the available stock.
    Release {
        order_id: Uuid,
        reason: ReleaseReason,
    },
    /// The order is paid: its held units leave the shelf for good.
    Commit { order_id: Uuid },
    /// A paid order's units come back to the shelf: its payment was
    /// refunded before they left (a late payment that could not keep all of
    /// its lines). At most once per order.
    ReturnCommitted { order_id: Uuid },
}

/// What happened to a variant's stock. `on_hand` and `reserved` are the
/// values after the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryEvent {
    /// The variant's stock began to be tracked.
    ItemRegistered {
        variant_id: Uuid,
        sku: Sku,
        on_hand: u32,
    },
    /// Units were added to the shelf.
    StockAdded {
        quantity: u32,
        reason: Option<String>,
        on_hand: u32,
        reserved: u32,
    },
    /// The shelf was counted and found to hold `on_hand` unsold units.
    OnHandSet {
        previous_on_hand: u32,
        on_hand: u32,
        reason: Option<String>,
        reserved: u32,
    },
    /// Units were held for an order.
    StockReserved {
        order_id: Uuid,
        quantity: u32,
        on_hand: u32,
        reserved: u32,
    },
    /// An order's held units became available again.
    ReservationReleased {
        order_id: Uuid,
        quantity: u32,
        reason: ReleaseReason,
        on_hand: u32,
        reserved: u32,
    },
    /// An order's held units were sold and left the shelf.
    ReservationCommitted {
        order_id: Uuid,
        quantity: u32,
        on_hand: u32,
        reserved: u32,
    },
    /// An order's sold units came back to the shelf, its payment refunded.
    CommittedReturned {
        order_id: Uuid,
        quantity: u32,
        on_hand: u32,
        reserved: u32,
    },
}

impl DomainEvent for InventoryEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ItemRegistered { .. } => "ItemRegistered",
            Self::StockAdded { .. } => "StockAdded",
            Self::OnHandSet { .. } => "OnHandSet",
            Self::StockReserved { .. } => "StockReserved",
            Self::ReservationReleased { .. } => "ReservationReleased",
            Self::ReservationCommitted { .. } => "ReservationCommitted",
            Self::CommittedReturned { .. } => "CommittedReturned",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a stock command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InventoryError {
    /// The variant's stock is not tracked yet.
    #[error("the variant's stock is not registered")]
    NotRegistered,
    /// The variant is already registered, with other values.
    #[error("variant {variant_id} is already registered with other values")]
    AlreadyRegistered { variant_id: Uuid },
    /// Adding the units would overflow the counter.
    #[error("cannot add {adding} units to {on_hand} on hand")]
    TooMuchStock { on_hand: u32, adding: u32 },
    /// The shelf count would fall below what unpaid orders hold.
    #[error("cannot set on hand to {requested}: {reserved} units are reserved")]
    BelowReserved { requested: u32, reserved: u32 },
    /// Not enough units are available for the reservation.
    #[error("{requested} units requested, {available} available")]
    InsufficientStock { requested: u32, available: u32 },
    /// The order already holds a different number of units.
    #[error("order {order_id} already holds {held} units, not {requested}")]
    ReservationMismatch {
        order_id: Uuid,
        held: u32,
        requested: u32,
    },
    /// The order holds no units of this variant.
    #[error("order {order_id} holds no reservation")]
    NoReservation { order_id: Uuid },
}

impl InventoryItem {
    /// Whether the variant's stock is tracked.
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// The variant's id (nil before registration).
    pub fn variant_id(&self) -> Uuid {
        self.variant_id
    }

    /// The variant's SKU, once registered.
    pub fn sku(&self) -> Option<&Sku> {
        self.sku.as_ref()
    }

    /// Units physically present and not yet sold.
    pub fn on_hand(&self) -> u32 {
        self.on_hand
    }

    /// Units held by unpaid orders.
    pub fn reserved(&self) -> u32 {
        self.reserved
    }

    /// Units free for new orders: `on_hand - reserved`.
    pub fn available(&self) -> u32 {
        self.on_hand.saturating_sub(self.reserved)
    }

    /// The units `order_id` currently holds, if any.
    pub fn reservation(&self, order_id: Uuid) -> Option<u32> {
        self.reservations.get(&order_id).copied()
    }

    /// Every live reservation, by order id.
    pub fn reservations(&self) -> &HashMap<Uuid, u32> {
        &self.reservations
    }

    /// Whether `order_id`'s reservation was committed (sold).
    pub fn is_committed(&self, order_id: Uuid) -> bool {
        self.committed.contains_key(&order_id)
    }

    fn register(
        &self,
        variant_id: Uuid,
        sku: Sku,
        initial_on_hand: u32,
    ) -> Result<Vec<InventoryEvent>, InventoryError> {
        if self.registered {
            let same = self.variant_id == variant_id
                && self.sku.as_ref() == Some(&sku)
                && self.initial_on_hand == initial_on_hand;
            return if same {
                Ok(vec![])
            } else {
                Err(InventoryError::AlreadyRegistered {
                    variant_id: self.variant_id,
                })
            };
        }
        Ok(vec![InventoryEvent::ItemRegistered {
            variant_id,
            sku,
            on_hand: initial_on_hand,
        }])
    }

    fn reserve(
        &self,
        order_id: Uuid,
        quantity: Quantity,
    ) -> Result<Vec<InventoryEvent>, InventoryError> {
        let requested = quantity.get();
        if self.committed.contains_key(&order_id) {
            return Ok(vec![]);
        }
        if let Some(&held) = self.reservations.get(&order_id) {
            return if held == requested {
                Ok(vec![])
            } else {
                Err(InventoryError::ReservationMismatch {
                    order_id,
                    held,
                    requested,
                })
            };
        }
        let available = self.available();
        if requested > available {
            return Err(InventoryError::InsufficientStock {
                requested,
                available,
            });
        }
        Ok(vec![InventoryEvent::StockReserved {
            order_id,
            quantity: requested,
            on_hand: self.on_hand,
            // requested <= on_hand - reserved, so this cannot overflow.
            reserved: self.reserved + requested,
        }])
    }
}

impl Decider for InventoryItem {
    fn decide(&self, command: InventoryCommand) -> Result<Vec<InventoryEvent>, InventoryError> {
        use InventoryCommand as C;
        use InventoryEvent as E;

        if !self.registered && !matches!(command, C::Register { .. }) {
            return Err(InventoryError::NotRegistered);
        }
        match command {
            C::Register {
                variant_id,
                sku,
                initial_on_hand,
            } => self.register(variant_id, sku, initial_on_hand),
            C::AddStock { quantity, reason } => {
                let adding = quantity.get();
                let on_hand =
                    self.on_hand
                        .checked_add(adding)
                        .ok_or(InventoryError::TooMuchStock {
                            on_hand: self.on_hand,
                            adding,
                        })?;
                Ok(vec![E::StockAdded {
                    quantity: adding,
                    reason,
                    on_hand,
                    reserved: self.reserved,
                }])
            }
            C::SetOnHand { on_hand, reason } => {
                if on_hand == self.on_hand {
                    return Ok(vec![]);
                }
                if on_hand < self.reserved {
                    return Err(InventoryError::BelowReserved {
                        requested: on_hand,
                        reserved: self.reserved,
                    });
                }
                Ok(vec![E::OnHandSet {
                    previous_on_hand: self.on_hand,
                    on_hand,
                    reason,
                    reserved: self.reserved,
                }])
            }
            C::Reserve { order_id, quantity } => self.reserve(order_id, quantity),
            C::Release { order_id, reason } => {
                let Some(&quantity) = self.reservations.get(&order_id) else {
                    return Ok(vec![]);
                };
                Ok(vec![E::ReservationReleased {
                    order_id,
                    quantity,
                    reason,
                    on_hand: self.on_hand,
                    reserved: self.reserved.saturating_sub(quantity),
                }])
            }
            C::Commit { order_id } => {
                if self.committed.contains_key(&order_id) {
                    return Ok(vec![]);
                }
                let Some(&quantity) = self.reservations.get(&order_id) else {
                    return Err(InventoryError::NoReservation { order_id });
                };
                Ok(vec![E::ReservationCommitted {
                    order_id,
                    quantity,
                    on_hand: self.on_hand.saturating_sub(quantity),
                    reserved: self.reserved.saturating_sub(quantity),
                }])
            }
            C::ReturnCommitted { order_id } => {
                let Some(&quantity) = self.committed.get(&order_id) else {
                    return Ok(vec![]);
                };
                let on_hand =
                    self.on_hand
                        .checked_add(quantity)
                        .ok_or(InventoryError::TooMuchStock {
                            on_hand: self.on_hand,
                            adding: quantity,
                        })?;
                Ok(vec![E::CommittedReturned {
                    order_id,
                    quantity,
                    on_hand,
                    reserved: self.reserved,
                }])
            }
        }
    }
}

impl Aggregate for InventoryItem {
    const TYPE: &'static str = "InventoryItem";
    type Command = InventoryCommand;
    type Event = InventoryEvent;
    type Error = InventoryError;
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
        use InventoryEvent as E;
        match event {
            E::ItemRegistered {
                variant_id,
                sku,
                on_hand,
            } => {
                self.registered = true;
                self.variant_id = variant_id;
                self.sku = Some(sku);
                self.initial_on_hand = on_hand;
                self.on_hand = on_hand;
                self.reserved = 0;
            }
            E::StockAdded {
                on_hand, reserved, ..
            }
            | E::OnHandSet {
                on_hand, reserved, ..
            } => {
                self.on_hand = on_hand;
                self.reserved = reserved;
            }
            E::StockReserved {
                order_id,
                quantity,
                on_hand,
                reserved,
            } => {
                self.reservations.insert(order_id, quantity);
                self.on_hand = on_hand;
                self.reserved = reserved;
            }
            E::ReservationReleased {
                order_id,
                on_hand,
                reserved,
                ..
            } => {
                self.reservations.remove(&order_id);
                self.on_hand = on_hand;
                self.reserved = reserved;
            }
            E::ReservationCommitted {
                order_id,
                quantity,
                on_hand,
                reserved,
            } => {
                self.reservations.remove(&order_id);
                self.committed.insert(order_id, quantity);
                self.on_hand = on_hand;
                self.reserved = reserved;
            }
            E::CommittedReturned {
                order_id,
                on_hand,
                reserved,
                ..
            } => {
                self.committed.remove(&order_id);
                self.on_hand = on_hand;
                self.reserved = reserved;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type Inventory = TestFramework<InventoryItem>;

    const VARIANT: Uuid = Uuid::from_u128(0xa);
    const ORDER_1: Uuid = Uuid::from_u128(1);
    const ORDER_2: Uuid = Uuid::from_u128(2);

    fn sku() -> Sku {
        Sku::try_from("SHOE-42").unwrap()
    }

    fn qty(n: u32) -> Quantity {
        Quantity::new(n).unwrap()
    }

    fn registered(on_hand: u32) -> InventoryEvent {
        InventoryEvent::ItemRegistered {
            variant_id: VARIANT,
            sku: sku(),
            on_hand,
        }
    }

    fn reserved(order_id: Uuid, quantity: u32, on_hand: u32, reserved: u32) -> InventoryEvent {
        InventoryEvent::StockReserved {
            order_id,
            quantity,
            on_hand,
            reserved,
        }
    }

    #[test]
    fn registering_records_the_initial_stock() {
        Inventory::with(())
            .given_no_previous_events()
            .when(InventoryCommand::Register {
                variant_id: VARIANT,
                sku: sku(),
                initial_on_hand: 10,
            })
            .then_expect_events(vec![registered(10)]);
    }

    #[test]
    fn registering_again_with_the_same_values_emits_nothing() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 2, 10, 2)])
            .when(InventoryCommand::Register {
                variant_id: VARIANT,
                sku: sku(),
                initial_on_hand: 10,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn registering_again_with_other_values_is_refused() {
        Inventory::with(())
            .given(vec![registered(10)])
            .when(InventoryCommand::Register {
                variant_id: VARIANT,
                sku: sku(),
                initial_on_hand: 11,
            })
            .then_expect_error(InventoryError::AlreadyRegistered {
                variant_id: VARIANT,
            });
    }

    #[test]
    fn commands_on_an_unregistered_item_are_refused() {
        let commands = [
            InventoryCommand::AddStock {
                quantity: qty(1),
                reason: None,
            },
            InventoryCommand::SetOnHand {
                on_hand: 0,
                reason: None,
            },
            InventoryCommand::Reserve {
                order_id: ORDER_1,
                quantity: qty(1),
            },
            InventoryCommand::Release {
                order_id: ORDER_1,
                reason: ReleaseReason::Expired,
            },
            InventoryCommand::Commit { order_id: ORDER_1 },
        ];
        for command in commands {
            Inventory::with(())
                .given_no_previous_events()
                .when(command)
                .then_expect_error(InventoryError::NotRegistered);
        }
    }

    #[test]
    fn adding_stock_raises_on_hand() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::AddStock {
                quantity: qty(5),
                reason: Some("restock".to_owned()),
            })
            .then_expect_events(vec![InventoryEvent::StockAdded {
                quantity: 5,
                reason: Some("restock".to_owned()),
                on_hand: 15,
                reserved: 4,
            }]);
    }

    #[test]
    fn adding_stock_past_the_counter_is_refused() {
        Inventory::with(())
            .given(vec![registered(u32::MAX - 1)])
            .when(InventoryCommand::AddStock {
                quantity: qty(2),
                reason: None,
            })
            .then_expect_error(InventoryError::TooMuchStock {
                on_hand: u32::MAX - 1,
                adding: 2,
            });
    }

    #[test]
    fn setting_on_hand_records_the_previous_count() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::SetOnHand {
                on_hand: 4,
                reason: Some("count".to_owned()),
            })
            .then_expect_events(vec![InventoryEvent::OnHandSet {
                previous_on_hand: 10,
                on_hand: 4,
                reason: Some("count".to_owned()),
                reserved: 4,
            }]);
    }

    #[test]
    fn setting_on_hand_to_the_same_count_emits_nothing() {
        Inventory::with(())
            .given(vec![registered(10)])
            .when(InventoryCommand::SetOnHand {
                on_hand: 10,
                reason: None,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn setting_on_hand_below_reserved_is_refused() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::SetOnHand {
                on_hand: 3,
                reason: None,
            })
            .then_expect_error(InventoryError::BelowReserved {
                requested: 3,
                reserved: 4,
            });
    }

    #[test]
    fn reserving_within_availability_holds_the_units() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::Reserve {
                order_id: ORDER_2,
                quantity: qty(6),
            })
            .then_expect_events(vec![reserved(ORDER_2, 6, 10, 10)]);
    }

    #[test]
    fn reserving_beyond_availability_is_refused_with_the_shortage() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::Reserve {
                order_id: ORDER_2,
                quantity: qty(7),
            })
            .then_expect_error(InventoryError::InsufficientStock {
                requested: 7,
                available: 6,
            });
    }

    #[test]
    fn reserving_twice_for_one_order_emits_nothing_new() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::Reserve {
                order_id: ORDER_1,
                quantity: qty(4),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn reserving_another_quantity_for_the_same_order_is_refused() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::Reserve {
                order_id: ORDER_1,
                quantity: qty(5),
            })
            .then_expect_error(InventoryError::ReservationMismatch {
                order_id: ORDER_1,
                held: 4,
                requested: 5,
            });
    }

    #[test]
    fn reserving_for_a_committed_order_emits_nothing() {
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                InventoryEvent::ReservationCommitted {
                    order_id: ORDER_1,
                    quantity: 4,
                    on_hand: 6,
                    reserved: 0,
                },
            ])
            .when(InventoryCommand::Reserve {
                order_id: ORDER_1,
                quantity: qty(4),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn reserving_again_after_a_release_holds_the_units_again() {
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                InventoryEvent::ReservationReleased {
                    order_id: ORDER_1,
                    quantity: 4,
                    reason: ReleaseReason::Expired,
                    on_hand: 10,
                    reserved: 0,
                },
            ])
            .when(InventoryCommand::Reserve {
                order_id: ORDER_1,
                quantity: qty(4),
            })
            .then_expect_events(vec![reserved(ORDER_1, 4, 10, 4)]);
    }

    #[test]
    fn releasing_gives_the_units_back() {
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                reserved(ORDER_2, 1, 10, 5),
            ])
            .when(InventoryCommand::Release {
                order_id: ORDER_1,
                reason: ReleaseReason::PaymentFailed,
            })
            .then_expect_events(vec![InventoryEvent::ReservationReleased {
                order_id: ORDER_1,
                quantity: 4,
                reason: ReleaseReason::PaymentFailed,
                on_hand: 10,
                reserved: 1,
            }]);
    }

    #[test]
    fn releasing_an_unknown_reservation_emits_nothing() {
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::Release {
                order_id: ORDER_2,
                reason: ReleaseReason::Expired,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn releasing_a_committed_reservation_emits_nothing() {
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                InventoryEvent::ReservationCommitted {
                    order_id: ORDER_1,
                    quantity: 4,
                    on_hand: 6,
                    reserved: 0,
                },
            ])
            .when(InventoryCommand::Release {
                order_id: ORDER_1,
                reason: ReleaseReason::Cancelled,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn returning_a_commitment_puts_its_units_back_on_the_shelf_once() {
        let committed = InventoryEvent::ReservationCommitted {
            order_id: ORDER_1,
            quantity: 4,
            on_hand: 6,
            reserved: 0,
        };
        let returned = InventoryEvent::CommittedReturned {
            order_id: ORDER_1,
            quantity: 4,
            on_hand: 10,
            reserved: 0,
        };
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                committed.clone(),
            ])
            .when(InventoryCommand::ReturnCommitted { order_id: ORDER_1 })
            .then_expect_events(vec![returned.clone()]);
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                committed,
                returned,
            ])
            .when(InventoryCommand::ReturnCommitted { order_id: ORDER_1 })
            .then_expect_events(vec![]);
        Inventory::with(())
            .given(vec![registered(10), reserved(ORDER_1, 4, 10, 4)])
            .when(InventoryCommand::ReturnCommitted { order_id: ORDER_1 })
            .then_expect_events(vec![]);
    }

    #[test]
    fn committing_moves_the_units_out_of_on_hand() {
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                reserved(ORDER_2, 1, 10, 5),
            ])
            .when(InventoryCommand::Commit { order_id: ORDER_1 })
            .then_expect_events(vec![InventoryEvent::ReservationCommitted {
                order_id: ORDER_1,
                quantity: 4,
                on_hand: 6,
                reserved: 1,
            }]);
    }

    #[test]
    fn committing_twice_emits_nothing() {
        Inventory::with(())
            .given(vec![
                registered(10),
                reserved(ORDER_1, 4, 10, 4),
                InventoryEvent::ReservationCommitted {
                    order_id: ORDER_1,
                    quantity: 4,
                    on_hand: 6,
                    reserved: 0,
                },
            ])
            .when(InventoryCommand::Commit { order_id: ORDER_1 })
            .then_expect_events(vec![]);
    }

    #[test]
    fn committing_without_a_reservation_is_refused() {
        Inventory::with(())
            .given(vec![registered(10)])
            .when(InventoryCommand::Commit { order_id: ORDER_1 })
            .then_expect_error(InventoryError::NoReservation { order_id: ORDER_1 });
    }

    #[test]
    fn accessors_report_the_folded_state() {
        let mut item = InventoryItem::default();
        assert!(!item.is_registered());
        for event in [
            registered(10),
            reserved(ORDER_1, 4, 10, 4),
            reserved(ORDER_2, 1, 10, 5),
        ] {
            item.apply(event);
        }
        assert!(item.is_registered());
        assert_eq!(item.variant_id(), VARIANT);
        assert_eq!(item.sku(), Some(&sku()));
        assert_eq!(
            (item.on_hand(), item.reserved(), item.available()),
            (10, 5, 5)
        );
        assert_eq!(item.reservation(ORDER_1), Some(4));
        assert_eq!(item.reservation(Uuid::from_u128(99)), None);
        assert!(!item.is_committed(ORDER_1));
    }

    #[test]
    fn events_serialise_externally_tagged_with_stable_names() {
        let event = reserved(ORDER_1, 4, 10, 4);
        assert_eq!(event.event_type(), "StockReserved");
        assert_eq!(event.event_version(), "1");
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["StockReserved"]["reserved"], 4);
        let release = serde_json::to_value(InventoryEvent::ReservationReleased {
            order_id: ORDER_1,
            quantity: 1,
            reason: ReleaseReason::CheckoutAborted,
            on_hand: 1,
            reserved: 0,
        })
        .unwrap();
        assert_eq!(release["ReservationReleased"]["reason"], "checkout_aborted");
    }

    /// A tiny deterministic pseudo-random source (64-bit LCG, Knuth's MMIX
    /// constants), so the property test needs no `rand` and always replays.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, bound: u32) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % u64::from(bound)) as u32
        }
    }

    fn check_invariant(item: &InventoryItem, step: usize) {
        let sum: u32 = item.reservations().values().sum();
        assert_eq!(item.reserved(), sum, "step {step}: reserved != sum");
        assert!(
            item.reserved() <= item.on_hand(),
            "step {step}: reserved > on_hand"
        );
        assert_eq!(item.available(), item.on_hand() - item.reserved());
        for order_id in item.reservations().keys() {
            assert!(
                !item.is_committed(*order_id),
                "step {step}: committed and live"
            );
        }
    }

    #[test]
    fn reserved_never_exceeds_on_hand_over_a_long_random_run() {
        let mut rng = Lcg(0x5eed);
        let mut item = InventoryItem::default();
        let mut applied = 0_usize;
        let mut refused = 0_usize;
        let mut added = 0_u64;
        let mut sold = 0_u64;
        let mut returned = 0_u64;
        let mut adjusted = 0_i64;
        item.apply(registered(20));
        for step in 0..20_000 {
            // A sliding window of order ids, so new orders keep arriving.
            let order_id = Uuid::from_u128((step / 25 + rng.next(12) as usize) as u128);
            let command = match rng.next(10) {
                0 => InventoryCommand::AddStock {
                    quantity: qty(1 + rng.next(5)),
                    reason: None,
                },
                1 => InventoryCommand::SetOnHand {
                    on_hand: rng.next(40),
                    reason: None,
                },
                2..=4 => InventoryCommand::Reserve {
                    order_id,
                    quantity: qty(1 + rng.next(6)),
                },
                5..=6 => InventoryCommand::Release {
                    order_id,
                    reason: ReleaseReason::Expired,
                },
                7 if rng.next(4) == 0 => InventoryCommand::ReturnCommitted { order_id },
                _ => InventoryCommand::Commit { order_id },
            };
            match item.decide(command) {
                Ok(events) => {
                    for event in events {
                        match &event {
                            InventoryEvent::StockAdded { quantity, .. } => {
                                added += u64::from(*quantity)
                            }
                            InventoryEvent::ReservationCommitted { quantity, .. } => {
                                sold += u64::from(*quantity)
                            }
                            InventoryEvent::CommittedReturned { quantity, .. } => {
                                returned += u64::from(*quantity)
                            }
                            InventoryEvent::OnHandSet {
                                previous_on_hand,
                                on_hand,
                                ..
                            } => adjusted += i64::from(*on_hand) - i64::from(*previous_on_hand),
                            _ => {}
                        }
                        item.apply(event);
                        applied += 1;
                    }
                }
                Err(
                    InventoryError::InsufficientStock { .. }
                    | InventoryError::BelowReserved { .. }
                    | InventoryError::ReservationMismatch { .. }
                    | InventoryError::NoReservation { .. },
                ) => refused += 1,
                Err(other) => panic!("step {step}: unexpected {other:?}"),
            }
            check_invariant(&item, step);
            // Conservation: initial + added - sold + returned + adjustments
            // = on_hand.
            assert_eq!(
                20 + added as i64 - sold as i64 + returned as i64 + adjusted,
                i64::from(item.on_hand()),
                "step {step}: stock not conserved"
            );
        }
        // The run must have exercised both sides.
        assert!(applied > 2_000, "only {applied} events");
        assert!(refused > 500, "only {refused} refusals");
        assert!(sold > 0);
        assert!(returned > 0);
    }
}
