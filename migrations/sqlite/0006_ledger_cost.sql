-- Each stream's cost in 1/10000 USD (0 when its model had no price), and what each budget
-- counter counts ('tokens' or 'usd'), so USD counters reconcile against cost, not tokens.
ALTER TABLE token_ledger ADD COLUMN cost_usd BIGINT NOT NULL DEFAULT 0;
ALTER TABLE token_ledger_counters ADD COLUMN measure TEXT NOT NULL DEFAULT 'tokens';
