-- Tenants, API keys, policies and the change log that invalidates authz caches.
-- Keys are stored only as argon2id hashes (PHC strings); the public prefix is the lookup
-- handle. Times are unix seconds.
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    labels      TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    prefix       TEXT NOT NULL UNIQUE,
    secret_hash  TEXT NOT NULL,
    name         TEXT NOT NULL,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    labels       TEXT NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT,
    rotated_to   TEXT
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

-- One row per tenant (scope 'tenant') and optionally per key (scope 'key'). NULL means
-- "not set": a key inherits models/operations/ips from its tenant; limits are per scope.
CREATE TABLE policies (
    scope          TEXT NOT NULL CHECK (scope IN ('tenant', 'key')),
    subject_id     TEXT NOT NULL,
    models         TEXT,
    operations     TEXT,
    ips            TEXT,
    rpm            BIGINT,
    tpm            BIGINT,
    budget_day     BIGINT,
    budget_month   BIGINT,
    max_concurrent BIGINT,
    PRIMARY KEY (scope, subject_id)
);

-- Append-only: every revocation, rotation, disable or policy change. tollgate-authz
-- follows it to drop cached decisions.
CREATE TABLE key_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    at          BIGINT NOT NULL
);
