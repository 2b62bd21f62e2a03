-- USD budgets per day and per month, in units of 1/10000 USD (tollgate_core::usd): at most
-- 4294967295 units ($429,496.7295), what Envoy's requests_per_unit (uint32) can carry.
ALTER TABLE policies ADD COLUMN budget_usd_day BIGINT;
ALTER TABLE policies ADD COLUMN budget_usd_month BIGINT;
