-- An order's lines are only ever read with their order: they move into the
-- order's row (sorted by variant), one row and one index entry less for
-- every order placed.
ALTER TABLE orders ADD COLUMN lines jsonb NOT NULL DEFAULT '[]';

UPDATE orders o
SET lines = l.lines
FROM (
    SELECT order_id,
           jsonb_agg(jsonb_build_object(
               'variant_id', variant_id, 'sku', sku, 'product_id', product_id,
               'product_name', product_name, 'unit_price_cents', unit_price_cents,
               'quantity', quantity, 'line_total_cents', line_total_cents)
             ORDER BY variant_id) AS lines
    FROM order_lines
    GROUP BY order_id
) l
WHERE o.id = l.order_id;

ALTER TABLE orders ALTER COLUMN lines DROP DEFAULT;

DROP TABLE order_lines;
