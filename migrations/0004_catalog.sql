-- The catalog: the write side's uniqueness claims, and the read models of
-- the "catalog" and "stock" projections.

-- Slugs and SKUs are unique across aggregates. A request claims them here
-- (one transaction for all of its claims) before its command runs, and gives
-- back the claims it made when the command fails. Claims outlive deleted
-- products, so a slug or SKU never moves to another owner.
CREATE TABLE unique_claims (
    kind       text        NOT NULL CHECK (kind IN ('product_slug', 'category_slug', 'sku')),
    value      text        NOT NULL,
    owner_id   uuid        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT unique_claims_pkey PRIMARY KEY (kind, value)
);
CREATE INDEX unique_claims_owner ON unique_claims (owner_id);

-- Read models. No unique constraint beyond the ids: a projection must never
-- fail on data the write side accepted. Each row carries the sequence of the
-- last event of its aggregate applied to it; updates are guarded by it, so a
-- replayed event changes nothing.
CREATE TABLE catalog_categories (
    id        uuid   PRIMARY KEY,
    slug      text   NOT NULL,
    name      text   NOT NULL,
    parent_id uuid,
    version   bigint NOT NULL
);
CREATE INDEX catalog_categories_slug ON catalog_categories (slug);
CREATE INDEX catalog_categories_parent ON catalog_categories (parent_id);

CREATE TABLE catalog_products (
    id              uuid        PRIMARY KEY,
    slug            text        NOT NULL,
    name            text        NOT NULL,
    description     text        NOT NULL,
    status          text        NOT NULL,
    category_id     uuid,
    currency        text        NOT NULL,
    -- The lowest variant price: what listings show, sort and filter by.
    min_price_cents bigint      NOT NULL,
    deleted         boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    version         bigint      NOT NULL,
    -- Full-text search: a word in the name ranks above one in the description.
    search          tsvector    GENERATED ALWAYS AS (
        setweight(to_tsvector('english', coalesce(name, '')), 'A') ||
        setweight(to_tsvector('english', coalesce(description, '')), 'B')
    ) STORED
);
CREATE INDEX catalog_products_slug ON catalog_products (slug);
CREATE INDEX catalog_products_search ON catalog_products USING gin (search);
-- Listings only ever show public products; partial indexes on that
-- predicate serve each sort order and the category filter.
CREATE INDEX catalog_products_newest ON catalog_products (created_at DESC, id DESC)
    WHERE status = 'active' AND NOT deleted;
CREATE INDEX catalog_products_price ON catalog_products (min_price_cents, id)
    WHERE status = 'active' AND NOT deleted;
CREATE INDEX catalog_products_name ON catalog_products (name, id)
    WHERE status = 'active' AND NOT deleted;
CREATE INDEX catalog_products_category ON catalog_products (category_id, created_at DESC)
    WHERE status = 'active' AND NOT deleted;

CREATE TABLE catalog_variants (
    id          uuid    PRIMARY KEY,
    product_id  uuid    NOT NULL,
    sku         text    NOT NULL,
    title       text    NOT NULL,
    price_cents bigint  NOT NULL,
    currency    text    NOT NULL,
    attributes  jsonb   NOT NULL DEFAULT '{}',
    -- The variant's place in its product, in the order variants were added.
    ordinal     integer NOT NULL
);
CREATE INDEX catalog_variants_product ON catalog_variants (product_id, ordinal);

-- One row per variant (InventoryItem); on_hand and reserved as of `version`.
CREATE TABLE stock_levels (
    variant_id uuid        PRIMARY KEY,
    sku        text        NOT NULL,
    on_hand    bigint      NOT NULL,
    reserved   bigint      NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);
-- The in_stock filter looks for variants with something available.
CREATE INDEX stock_levels_available ON stock_levels (variant_id) WHERE on_hand > reserved;
