-- The event store: the single source of truth. Every other table is either a
-- read model rebuilt from it or bookkeeping (checkpoints, sessions, keys).
CREATE TABLE events (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence > 0),
    event_type     text        NOT NULL,
    event_version  text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    -- Allocation order only: a transaction can take a position and commit
    -- after one that took a larger position.
    position       bigserial   NOT NULL,
    -- The appending transaction's id. Every transaction whose id is below
    -- pg_snapshot_xmin(pg_current_snapshot()) has finished, so reading in
    -- (txid, position) order below that horizon never skips a late commit.
    txid           bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    -- Optimistic concurrency: two writers that decided against the same
    -- version cannot both store the next sequence.
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_order ON events (txid, position);
CREATE UNIQUE INDEX events_position ON events (position);

-- Wakes tailing projections in every server instance when events commit
-- (NOTIFY is delivered at commit, and only then). Statement level, so a
-- group commit of many events sends one notification.
CREATE FUNCTION notify_events_appended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('events_appended', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events_appended();

-- Where each projection stands in the global order. Written in the same
-- transaction as the projection's read-model changes.
CREATE TABLE projection_checkpoints (
    name          text        PRIMARY KEY,
    last_txid     bigint      NOT NULL DEFAULT 0,
    last_position bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
