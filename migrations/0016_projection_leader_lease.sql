-- Which server instance leads the projections, as a lease its holder
-- renews. It was a session-level advisory lock, which is session state
-- that a transaction-mode connection pooler cannot carry: the lock stays
-- with whichever server connection took it. One row at most.
CREATE TABLE projection_leader (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder uuid NOT NULL,
    until timestamptz NOT NULL
);
