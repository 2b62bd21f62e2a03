-- Tenants, API keys, policies and the change log that invalidates authz caches.
-- Same shape as migrations/sqlite; times are unix seconds.
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

CREATE TABLE key_events (
    id          BIGSERIAL PRIMARY KEY,
    subject_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    at          BIGINT NOT NULL
);

-- Every replica LISTENs on this channel and drops its cache at once (revocation < 1 s).
CREATE FUNCTION tollgate_notify_key_event() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('tollgate_key_events', NEW.id::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER key_events_notify AFTER INSERT ON key_events
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_key_event();
