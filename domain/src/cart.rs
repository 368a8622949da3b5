//! A customer's shopping cart: which variants, how many of each.

use std::collections::BTreeMap;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::values::Quantity;
use crate::Decider;

/// A customer's cart (aggregate id = the user's id: one cart per user).
/// Prices are not kept here: they are read from the catalog when the cart
/// is shown and when it is checked out.
// Invariant: every line holds 1..=Quantity::MAX units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    lines: BTreeMap<Uuid, u32>,
    last_order_id: Option<Uuid>,
}

/// One line of a cart: a variant and how many units of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CartLine {
    pub variant_id: Uuid,
    pub quantity: u32,
}

/// What can be asked of a cart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartCommand {
    /// Put units of a variant in the cart, on top of any already there.
    AddItem {
        variant_id: Uuid,
        quantity: Quantity,
    },
    /// Make a line hold exactly `quantity` units; 0 removes the line.
    SetQuantity { variant_id: Uuid, quantity: u32 },
    /// Take a variant out of the cart.
    RemoveItem { variant_id: Uuid },
    /// Empty the cart.
    Clear,
    /// Turn the cart into order `order_id` and empty it.
    CheckOut { order_id: Uuid },
}

/// What happened to a cart. Line events carry the line's resulting quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CartEvent {
    /// `added` units were put in the cart; the line now holds `quantity`.
    CartItemAdded {
        variant_id: Uuid,
        added: u32,
        quantity: u32,
    },
    /// The line was set to hold `quantity` units (created if it was absent).
    CartItemQuantitySet { variant_id: Uuid, quantity: u32 },
    /// The line was taken out of the cart.
    CartItemRemoved { variant_id: Uuid },
    /// Every line was taken out of the cart.
    CartCleared {},
    /// The cart became order `order_id` with these lines, and is now empty.
    CartCheckedOut {
        order_id: Uuid,
        lines: Vec<CartLine>,
    },
}

impl DomainEvent for CartEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CartItemAdded { .. } => "CartItemAdded",
            Self::CartItemQuantitySet { .. } => "CartItemQuantitySet",
            Self::CartItemRemoved { .. } => "CartItemRemoved",
            Self::CartCleared {} => "CartCleared",
            Self::CartCheckedOut { .. } => "CartCheckedOut",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a cart command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CartError {
    /// There is nothing to check out.
    #[error("the cart is empty")]
    Empty,
    /// The line would hold more than `max` units.
    #[error("variant {variant_id}: {requested} units requested, at most {max} per line")]
    QuantityTooLarge {
        variant_id: Uuid,
        requested: u32,
        max: u32,
    },
}

impl Cart {
    /// A cart holding exactly `lines` and nothing else, as a read of the
    /// cart at some version showed it (the order it was last checked out
    /// into is not known from such a read).
    pub fn holding(lines: impl IntoIterator<Item = (Uuid, Quantity)>) -> Self {
        Self {
            lines: lines
                .into_iter()
                .map(|(variant_id, quantity)| (variant_id, quantity.get()))
                .collect(),
            last_order_id: None,
        }
    }

    /// The cart's lines: units by variant id.
    pub fn lines(&self) -> &BTreeMap<Uuid, u32> {
        &self.lines
    }

    /// The units of `variant_id` in the cart, if any.
    pub fn quantity(&self, variant_id: Uuid) -> Option<u32> {
        self.lines.get(&variant_id).copied()
    }

    /// Whether the cart has no lines.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The number of lines (distinct variants).
    pub fn line_count(&self) -> usize {
        self.lines.len()
    }

    /// The number of units over all lines.
    pub fn unit_count(&self) -> u64 {
        self.lines.values().map(|&q| u64::from(q)).sum()
    }

    /// The order the cart was last checked out into.
    pub fn last_order_id(&self) -> Option<Uuid> {
        self.last_order_id
    }

    fn too_large(variant_id: Uuid, requested: u32) -> CartError {
        CartError::QuantityTooLarge {
            variant_id,
            requested,
            max: Quantity::MAX,
        }
    }
}

impl Decider for Cart {
    fn decide(&self, command: CartCommand) -> Result<Vec<CartEvent>, CartError> {
        match command {
            CartCommand::AddItem {
                variant_id,
                quantity,
            } => {
                let added = quantity.get();
                let held = self.quantity(variant_id).unwrap_or(0);
                let total = held.saturating_add(added);
                if total > Quantity::MAX {
                    return Err(Cart::too_large(variant_id, total));
                }
                Ok(vec![CartEvent::CartItemAdded {
                    variant_id,
                    added,
                    quantity: total,
                }])
            }
            CartCommand::SetQuantity {
                variant_id,
                quantity,
            } => {
                if quantity > Quantity::MAX {
                    return Err(Cart::too_large(variant_id, quantity));
                }
                match (self.quantity(variant_id), quantity) {
                    (None, 0) => Ok(vec![]),
                    (Some(_), 0) => Ok(vec![CartEvent::CartItemRemoved { variant_id }]),
                    (Some(held), _) if held == quantity => Ok(vec![]),
                    _ => Ok(vec![CartEvent::CartItemQuantitySet {
                        variant_id,
                        quantity,
                    }]),
                }
            }
            CartCommand::RemoveItem { variant_id } => {
                if self.lines.contains_key(&variant_id) {
                    Ok(vec![CartEvent::CartItemRemoved { variant_id }])
                } else {
                    Ok(vec![])
                }
            }
            CartCommand::Clear => {
                if self.lines.is_empty() {
                    Ok(vec![])
                } else {
                    Ok(vec![CartEvent::CartCleared {}])
                }
            }
            CartCommand::CheckOut { order_id } => {
                // A re-sent checkout of the order just made is not a new one.
                if self.last_order_id == Some(order_id) {
                    return Ok(vec![]);
                }
                if self.lines.is_empty() {
                    return Err(CartError::Empty);
                }
                let lines = self
                    .lines
                    .iter()
                    .map(|(&variant_id, &quantity)| CartLine {
                        variant_id,
                        quantity,
                    })
                    .collect();
                Ok(vec![CartEvent::CartCheckedOut { order_id, lines }])
            }
        }
    }
}

impl Aggregate for Cart {
    const TYPE: &'static str = "Cart";
    type Command = CartCommand;
    type Event = CartEvent;
    type Error = CartError;
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
            CartEvent::CartItemAdded {
                variant_id,
                quantity,
                ..
            }
            | CartEvent::CartItemQuantitySet {
                variant_id,
                quantity,
            } => {
                self.lines.insert(variant_id, quantity);
            }
            CartEvent::CartItemRemoved { variant_id } => {
                self.lines.remove(&variant_id);
            }
            CartEvent::CartCleared {} => self.lines.clear(),
            CartEvent::CartCheckedOut { order_id, .. } => {
                self.lines.clear();
                self.last_order_id = Some(order_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type Carts = TestFramework<Cart>;

    const SHOE: Uuid = Uuid::from_u128(0x5_1);
    const HAT: Uuid = Uuid::from_u128(0x5_2);
    const ORDER: Uuid = Uuid::from_u128(0x0_1);

    fn qty(n: u32) -> Quantity {
        Quantity::new(n).unwrap()
    }

    fn added(variant_id: Uuid, added: u32, quantity: u32) -> CartEvent {
        CartEvent::CartItemAdded {
            variant_id,
            added,
            quantity,
        }
    }

    fn checked_out(order_id: Uuid) -> CartEvent {
        CartEvent::CartCheckedOut {
            order_id,
            lines: vec![
                CartLine {
                    variant_id: SHOE,
                    quantity: 2,
                },
                CartLine {
                    variant_id: HAT,
                    quantity: 1,
                },
            ],
        }
    }

    #[test]
    fn a_cart_holding_lines_is_the_cart_its_events_build() {
        let mut built = Cart::default();
        built.apply(added(SHOE, 2, 2));
        built.apply(added(HAT, 1, 1));
        let holding = Cart::holding([(HAT, qty(1)), (SHOE, qty(2))]);
        assert_eq!(holding, built);
        // It checks out the same lines as the cart built from events.
        assert_eq!(
            holding.decide(CartCommand::CheckOut { order_id: ORDER }),
            built.decide(CartCommand::CheckOut { order_id: ORDER })
        );
    }

    #[test]
    fn adding_a_new_item_creates_its_line() {
        Carts::with(())
            .given_no_previous_events()
            .when(CartCommand::AddItem {
                variant_id: SHOE,
                quantity: qty(2),
            })
            .then_expect_events(vec![added(SHOE, 2, 2)]);
    }

    #[test]
    fn adding_an_item_already_in_the_cart_adds_to_its_quantity() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::AddItem {
                variant_id: SHOE,
                quantity: qty(3),
            })
            .then_expect_events(vec![added(SHOE, 3, 5)]);
    }

    #[test]
    fn adding_past_the_line_limit_is_refused() {
        Carts::with(())
            .given(vec![added(SHOE, 9_999, 9_999)])
            .when(CartCommand::AddItem {
                variant_id: SHOE,
                quantity: qty(2),
            })
            .then_expect_error(CartError::QuantityTooLarge {
                variant_id: SHOE,
                requested: 10_001,
                max: 10_000,
            });
    }

    #[test]
    fn adding_up_to_the_line_limit_is_accepted() {
        Carts::with(())
            .given(vec![added(SHOE, 9_999, 9_999)])
            .when(CartCommand::AddItem {
                variant_id: SHOE,
                quantity: qty(1),
            })
            .then_expect_events(vec![added(SHOE, 1, 10_000)]);
    }

    #[test]
    fn setting_a_quantity_replaces_the_line() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::SetQuantity {
                variant_id: SHOE,
                quantity: 7,
            })
            .then_expect_events(vec![CartEvent::CartItemQuantitySet {
                variant_id: SHOE,
                quantity: 7,
            }]);
    }

    #[test]
    fn setting_a_quantity_of_an_unknown_line_adds_it() {
        Carts::with(())
            .given_no_previous_events()
            .when(CartCommand::SetQuantity {
                variant_id: HAT,
                quantity: 1,
            })
            .then_expect_events(vec![CartEvent::CartItemQuantitySet {
                variant_id: HAT,
                quantity: 1,
            }]);
    }

    #[test]
    fn setting_the_same_quantity_emits_nothing() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::SetQuantity {
                variant_id: SHOE,
                quantity: 2,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn setting_a_quantity_to_zero_removes_the_line() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::SetQuantity {
                variant_id: SHOE,
                quantity: 0,
            })
            .then_expect_events(vec![CartEvent::CartItemRemoved { variant_id: SHOE }]);
    }

    #[test]
    fn setting_an_unknown_line_to_zero_emits_nothing() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::SetQuantity {
                variant_id: HAT,
                quantity: 0,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn setting_a_quantity_past_the_line_limit_is_refused() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::SetQuantity {
                variant_id: SHOE,
                quantity: 10_001,
            })
            .then_expect_error(CartError::QuantityTooLarge {
                variant_id: SHOE,
                requested: 10_001,
                max: 10_000,
            });
    }

    #[test]
    fn removing_an_item_removes_its_line() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2), added(HAT, 1, 1)])
            .when(CartCommand::RemoveItem { variant_id: HAT })
            .then_expect_events(vec![CartEvent::CartItemRemoved { variant_id: HAT }]);
    }

    #[test]
    fn removing_an_unknown_item_emits_nothing() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::RemoveItem { variant_id: HAT })
            .then_expect_events(vec![]);
    }

    #[test]
    fn clearing_empties_the_cart() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2)])
            .when(CartCommand::Clear)
            .then_expect_events(vec![CartEvent::CartCleared {}]);
    }

    #[test]
    fn clearing_an_empty_cart_emits_nothing() {
        Carts::with(())
            .given_no_previous_events()
            .when(CartCommand::Clear)
            .then_expect_events(vec![]);
    }

    #[test]
    fn checking_out_records_every_line() {
        Carts::with(())
            .given(vec![added(SHOE, 2, 2), added(HAT, 1, 1)])
            .when(CartCommand::CheckOut { order_id: ORDER })
            .then_expect_events(vec![checked_out(ORDER)]);
    }

    #[test]
    fn checking_out_an_empty_cart_is_refused() {
        Carts::with(())
            .given_no_previous_events()
            .when(CartCommand::CheckOut { order_id: ORDER })
            .then_expect_error(CartError::Empty);
    }

    #[test]
    fn checking_out_the_same_order_again_emits_nothing() {
        Carts::with(())
            .given(vec![
                added(SHOE, 2, 2),
                added(HAT, 1, 1),
                checked_out(ORDER),
            ])
            .when(CartCommand::CheckOut { order_id: ORDER })
            .then_expect_events(vec![]);
    }

    #[test]
    fn checking_out_a_new_order_from_an_emptied_cart_is_refused() {
        Carts::with(())
            .given(vec![
                added(SHOE, 2, 2),
                added(HAT, 1, 1),
                checked_out(ORDER),
            ])
            .when(CartCommand::CheckOut {
                order_id: Uuid::from_u128(0x0_2),
            })
            .then_expect_error(CartError::Empty);
    }

    #[test]
    fn checking_out_empties_the_cart_and_remembers_the_order() {
        let mut cart = Cart::default();
        for event in [added(SHOE, 2, 2), added(HAT, 1, 1)] {
            cart.apply(event);
        }
        assert_eq!(cart.quantity(SHOE), Some(2));
        assert_eq!((cart.line_count(), cart.unit_count()), (2, 3));
        cart.apply(checked_out(ORDER));
        assert!(cart.is_empty());
        assert_eq!(cart.last_order_id(), Some(ORDER));
    }

    #[test]
    fn events_have_stable_names_and_round_trip() {
        let event = checked_out(ORDER);
        assert_eq!(event.event_type(), "CartCheckedOut");
        assert_eq!(CartEvent::CartCleared {}.event_type(), "CartCleared");
        assert_eq!(event.event_version(), "1");
        assert_eq!(
            serde_json::to_string(&CartEvent::CartCleared {}).unwrap(),
            r#"{"CartCleared":{}}"#
        );
        let round: CartEvent =
            serde_json::from_value(serde_json::to_value(&event).unwrap()).unwrap();
        assert_eq!(round, event);
    }
}
