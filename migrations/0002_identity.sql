-- Identity is not part of the commerce event log: accounts and sessions are
-- plain tables, like any authentication store.
CREATE TABLE users (
    id                  uuid        PRIMARY KEY,
    email               text        NOT NULL,
    email_normalized    text        NOT NULL UNIQUE,
    name                text,
    password_hash       text        NOT NULL,
    role                text        NOT NULL CHECK (role IN ('customer', 'admin')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- A session is one login; its refresh tokens rotate inside it. Reusing a
-- spent refresh token revokes the whole session.
CREATE TABLE sessions (
    id          uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    revoke_reason text
);
CREATE INDEX sessions_user ON sessions (user_id) WHERE revoked_at IS NULL;

-- Refresh tokens are stored only as SHA-256 hashes of their random value.
CREATE TABLE refresh_tokens (
    token_hash  bytea       PRIMARY KEY,
    session_id  uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
