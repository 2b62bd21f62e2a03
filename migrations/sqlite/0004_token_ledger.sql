-- Budget ledger: the real token usage of every stream that reached a model server, as
-- tollgate-ratelimit saw it at stream end. Rows come from a replica's durable local buffer
-- (`source`, `seq`), so replaying the buffer after a crash inserts each row once.
CREATE TABLE token_ledger (
    source      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    at_us       BIGINT NOT NULL,
    request_id  TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    tokens      BIGINT NOT NULL,
    PRIMARY KEY (source, seq)
);
CREATE INDEX token_ledger_key_at ON token_ledger(key_id, at_us);
CREATE INDEX token_ledger_tenant_at ON token_ledger(tenant_id, at_us);

-- The budget counters (day or longer) those streams were charged to, for reconciliation:
-- the counter key in the rate limiter's store, its subject and its limit.
CREATE TABLE token_ledger_counters (
    counter_key        TEXT PRIMARY KEY,
    subject_kind       TEXT NOT NULL,
    subject_id         TEXT NOT NULL,
    requests_per_unit  BIGINT NOT NULL,
    unit               TEXT NOT NULL,
    last_seen_us       BIGINT NOT NULL
);
