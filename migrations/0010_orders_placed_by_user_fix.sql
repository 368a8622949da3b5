-- 0009 indexed payload->>'user_id', but an event's payload is its enum
-- variant, {"OrderPlaced": {..}}: the buyer's id is one level down. The
-- old index matched nothing (and the lookup through it found no order, so
-- a buyer's order list did not wait for the read model).
DROP INDEX IF EXISTS events_order_placed_by_user;
CREATE INDEX events_order_placed_by_user
    ON events ((payload->'OrderPlaced'->>'user_id'), position)
    WHERE event_type = 'OrderPlaced';
