-- Checkout answers from its decided events, before the orders read model
-- has applied them; a buyer's order list waits for the read model to reach
-- the buyer's last OrderPlaced event, found through this index.
CREATE INDEX events_order_placed_by_user
    ON events ((payload->>'user_id'), position)
    WHERE event_type = 'OrderPlaced';
