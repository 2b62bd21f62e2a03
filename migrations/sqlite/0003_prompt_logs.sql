-- Opt-in prompt logging, per tenant, kept apart from the audit log and purged after the
-- tenant's retention. 0 days = off (the default).
ALTER TABLE tenants ADD COLUMN prompt_log_days BIGINT NOT NULL DEFAULT 0;

CREATE TABLE prompt_logs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       BIGINT NOT NULL,
    request_id  TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    key_id      TEXT,
    model       TEXT,
    body        TEXT NOT NULL
);
CREATE INDEX prompt_logs_tenant_at ON prompt_logs(tenant_id, at_ms);
