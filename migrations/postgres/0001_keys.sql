-- Tenants and API keys. Keys are stored only as argon2id hashes (PHC strings);
-- the public prefix is the lookup handle. Times are unix seconds, as in SQLite.
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    prefix      TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    name        TEXT NOT NULL,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    rpm         BIGINT CHECK (rpm IS NULL OR rpm > 0),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);

CREATE INDEX api_keys_tenant ON api_keys(tenant_id);
