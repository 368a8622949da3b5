-- Responses to requests that carried an Idempotency-Key, per user, so a
-- retry is answered with the first response instead of running again.
CREATE TABLE idempotency_keys (
    user_id          uuid        NOT NULL,
    key              text        NOT NULL,
    -- SHA-256 of method, path, query and body: the same key with another
    -- request is refused.
    fingerprint      bytea       NOT NULL,
    response_status  smallint,
    response_type    text,
    response_body    bytea,
    -- While a request runs it holds a lease; a request that finds the lease
    -- expired (its first attempt crashed) takes over.
    leased_until     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
