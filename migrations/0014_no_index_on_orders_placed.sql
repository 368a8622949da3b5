-- A buyer's order list waited for the buyer's last `OrderPlaced`, found
-- through this index, which parsed every `OrderPlaced` payload on insert.
-- Every order is placed by checking out the buyer's cart, whose
-- `CartCheckedOut` follows the `OrderPlaced` in the same transaction, so the
-- list now waits for the cart's last event, found through the primary key.
DROP INDEX IF EXISTS events_order_placed_by_user;
