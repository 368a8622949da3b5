-- Holds on stock end at a deadline kept here, not in memory or Redis, so it
-- survives restarts and flushes. Only the scheduler deletes rows.
CREATE TABLE order_deadlines (
    order_id     uuid        PRIMARY KEY,
    user_id      uuid        NOT NULL,
    due_at       timestamptz NOT NULL,
    -- The variants the checkout may have reserved, so the hold can be
    -- released even if the checkout died before the order was placed.
    variant_ids  uuid[]      NOT NULL,
    leased_until timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
);
CREATE INDEX order_deadlines_due ON order_deadlines (due_at);

-- Provider webhooks already handled, so a repeated delivery changes nothing.
CREATE TABLE processed_webhook_events (
    event_id    text        PRIMARY KEY,
    event_type  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Read models (projections "orders" and "carts").
CREATE TABLE orders (
    id                uuid        PRIMARY KEY,
    user_id           uuid        NOT NULL,
    status            text        NOT NULL,
    cancel_reason     text,
    total_cents       bigint      NOT NULL,
    currency          text        NOT NULL,
    payment_intent_id text,
    expires_at        timestamptz NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    version           bigint      NOT NULL
);
CREATE INDEX orders_by_user ON orders (user_id, created_at DESC, id DESC);

CREATE TABLE order_lines (
    order_id         uuid   NOT NULL,
    variant_id       uuid   NOT NULL,
    sku              text   NOT NULL,
    product_id       uuid   NOT NULL,
    product_name     text   NOT NULL,
    unit_price_cents bigint NOT NULL,
    quantity         integer NOT NULL,
    line_total_cents bigint NOT NULL,
    PRIMARY KEY (order_id, variant_id)
);

CREATE TABLE carts (
    user_id    uuid        PRIMARY KEY,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE cart_lines (
    user_id    uuid    NOT NULL,
    variant_id uuid    NOT NULL,
    quantity   integer NOT NULL,
    PRIMARY KEY (user_id, variant_id)
);
