-- One row per request, allowed or denied: who, which model and operation, the outcome,
-- tokens and latency. Never request or response content, never key material.
CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       BIGINT NOT NULL,
    request_id  TEXT NOT NULL,
    key_id      TEXT,
    tenant_id   TEXT,
    model       TEXT,
    operation   TEXT NOT NULL,
    decision    TEXT NOT NULL CHECK (decision IN ('allowed', 'denied')),
    reason      TEXT NOT NULL,
    status      BIGINT NOT NULL,
    tokens_in   BIGINT,
    tokens_out  BIGINT,
    latency_ms  BIGINT NOT NULL,
    client_ip   TEXT
);
CREATE INDEX audit_events_at ON audit_events(at_ms);
CREATE INDEX audit_events_tenant_at ON audit_events(tenant_id, at_ms);
