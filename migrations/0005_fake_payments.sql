-- The fake payment provider (PAYMENT_PROVIDER=fake, development only) keeps
-- its payment intents and refunds here, so they survive restarts and every
-- instance sees the same ones. Nothing else reads these tables.
CREATE TABLE fake_payment_intents (
    id              text        PRIMARY KEY,  -- 'pi_fake_...'
    client_secret   text        NOT NULL,
    order_id        uuid        NOT NULL,
    amount_cents    bigint      NOT NULL CHECK (amount_cents > 0),
    currency        text        NOT NULL,     -- upper-case ISO 4217
    status          text        NOT NULL,     -- Stripe's status names
    -- The caller's key: creating again with it returns this row.
    idempotency_key text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX fake_payment_intents_idempotency_key
    ON fake_payment_intents (idempotency_key);
CREATE INDEX fake_payment_intents_order ON fake_payment_intents (order_id);

CREATE TABLE fake_refunds (
    id                text        PRIMARY KEY,  -- 're_fake_...'
    payment_intent_id text        NOT NULL REFERENCES fake_payment_intents (id),
    amount_cents      bigint      NOT NULL CHECK (amount_cents > 0),
    status            text        NOT NULL,
    idempotency_key   text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX fake_refunds_idempotency_key ON fake_refunds (idempotency_key);
CREATE INDEX fake_refunds_payment_intent ON fake_refunds (payment_intent_id);
