-- The sales projection reads an order's lines from its `OrderPlaced` in the
-- event store when a payment or a refund needs them, instead of copying
-- them for every order placed.
DROP TABLE sales_order_lines;
