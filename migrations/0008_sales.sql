-- Read models of the "sales" projection, folded from Order events only.
--
-- Money is in minor units of `currency`. A shop sells in one currency (the
-- SHOP_CURRENCY setting); rows keep their currency so that an order in any
-- other currency is kept apart instead of being added to the shop's money.
-- Hours are UTC hours; a day's figures are the sum of its 24 hour rows.

-- One row per hour and currency. Counters are added to by events, each in
-- the hour of the time written inside the event (paid_at, cancelled_at...).
CREATE TABLE sales_hourly (
    currency         text        NOT NULL,
    bucket_start     timestamptz NOT NULL,
    -- Net: payments of orders, less refunds of paid orders.
    revenue_cents    bigint      NOT NULL DEFAULT 0,
    orders_paid      bigint      NOT NULL DEFAULT 0,
    units_sold       bigint      NOT NULL DEFAULT 0,
    -- Cancelled for any reason but expiry; expired orders are counted apart.
    orders_cancelled bigint      NOT NULL DEFAULT 0,
    orders_expired   bigint      NOT NULL DEFAULT 0,
    orders_refunded  bigint      NOT NULL DEFAULT 0,
    refunded_cents   bigint      NOT NULL DEFAULT 0,
    -- Flash-sale figures, counted in the hour the hold was placed (every
    -- order holds its stock from checkout): how many of that hour's holds
    -- were later paid in time, and how many ran out.
    holds_placed     bigint      NOT NULL DEFAULT 0,
    holds_converted  bigint      NOT NULL DEFAULT 0,
    holds_expired    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (currency, bucket_start)
);

-- Units and net revenue per product and hour. `name` is the product's name
-- on the last order line written to the row.
CREATE TABLE sales_product_hourly (
    currency      text        NOT NULL,
    bucket_start  timestamptz NOT NULL,
    product_id    uuid        NOT NULL,
    name          text        NOT NULL,
    units_sold    bigint      NOT NULL DEFAULT 0,
    revenue_cents bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (currency, bucket_start, product_id)
);

-- What the projection remembers of each order: an OrderPaid or an
-- OrderRefunded carries neither the lines nor the placement time, and the
-- order's sequence guards every change so a replayed event adds nothing.
CREATE TABLE sales_orders (
    order_id    uuid        PRIMARY KEY,
    currency    text        NOT NULL,
    placed_at   timestamptz NOT NULL,
    units       bigint      NOT NULL,
    -- Money taken for the order and not refunded yet; only this much can be
    -- taken off revenue by a refund.
    paid_cents  bigint      NOT NULL DEFAULT 0,
    version     bigint      NOT NULL
);

CREATE TABLE sales_order_lines (
    order_id         uuid   NOT NULL,
    variant_id       uuid   NOT NULL,
    product_id       uuid   NOT NULL,
    product_name     text   NOT NULL,
    quantity         bigint NOT NULL,
    line_total_cents bigint NOT NULL,
    PRIMARY KEY (order_id, variant_id)
);
