//! Names of the dynamic metadata that tollgate-authz emits and of the rate-limit
//! descriptor entries built from it. Envoy config, filter and services use these names.

/// Envoy puts ext_authz `CheckResponse.dynamic_metadata` under this namespace.
pub const AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// Key id (string). Also the rate-limit descriptor key for per-key limits.
pub const KEY_ID: &str = "key_id";
/// Tenant id (string). Also the rate-limit descriptor key for per-tenant limits.
pub const TENANT_ID: &str = "tenant_id";
/// The key's model allowlist: comma-separated patterns (`*`, `llama3*`, `local/*`, exact).
pub const MODELS: &str = "models";

/// Limits, each shaped as Envoy's descriptor limit override
/// `{requests_per_unit: <number>, unit: "MINUTE" | "DAY" | "MONTH"}` and present only when
/// set. `key_*` bound one key, `tenant_*` the sum of a tenant's keys.
pub const KEY_RPM: &str = "key_rpm";
pub const TENANT_RPM: &str = "tenant_rpm";
pub const KEY_TPM: &str = "key_tpm";
pub const TENANT_TPM: &str = "tenant_tpm";
pub const KEY_BUDGET_DAY: &str = "key_budget_day";
pub const TENANT_BUDGET_DAY: &str = "tenant_budget_day";
pub const KEY_BUDGET_MONTH: &str = "key_budget_month";
pub const TENANT_BUDGET_MONTH: &str = "tenant_budget_month";
/// USD budgets, in the same shape; `requests_per_unit` counts `crate::usd` units
/// (1/10000 USD), so the largest budget is `u32::MAX` units, $429,496.7295 per period.
pub const KEY_BUDGET_USD_DAY: &str = "key_budget_usd_day";
pub const TENANT_BUDGET_USD_DAY: &str = "tenant_budget_usd_day";
pub const KEY_BUDGET_USD_MONTH: &str = "key_budget_usd_month";
pub const TENANT_BUDGET_USD_MONTH: &str = "tenant_budget_usd_month";
/// Every USD budget name: the filter refuses an unpriced model for a caller with any of them.
pub const USD_BUDGETS: [&str; 4] = [
    KEY_BUDGET_USD_DAY,
    TENANT_BUDGET_USD_DAY,
    KEY_BUDGET_USD_MONTH,
    TENANT_BUDGET_USD_MONTH,
];
/// Every token limit name (per minute and budgets): a caller with any of them, or with a USD
/// budget, is metered, and may only use endpoints whose usage the filter counts.
pub const TOKEN_LIMITS: [&str; 6] = [
    KEY_TPM,
    TENANT_TPM,
    KEY_BUDGET_DAY,
    TENANT_BUDGET_DAY,
    KEY_BUDGET_MONTH,
    TENANT_BUDGET_MONTH,
];
/// `"1"` when the key's tenant opted in to prompt logging.
pub const PROMPT_LOG: &str = "prompt_log";
/// Max concurrent requests of a key, shaped like the other limits
/// (`{requests_per_unit: <n>, unit: "MINUTE"}`) because Envoy only passes a descriptor
/// limit override in that shape; the unit means nothing for a concurrency limit.
pub const KEY_MAX_CONCURRENT: &str = "key_max_concurrent";
/// Max concurrent requests of all of a tenant's keys together, in the same shape.
pub const TENANT_MAX_CONCURRENT: &str = "tenant_max_concurrent";

/// Descriptor entry marking a token counter (TPM, budgets) and what this call does to it:
/// `tokens` admits against the reservation, `tokens_extra` debits tokens used beyond it
/// (never refused), `tokens_refund` gives back what was reserved but not used. All three
/// address the same counter.
pub const DESCRIPTOR_PHASE: &str = "tollgate_phase";
pub const PHASE_TOKENS: &str = "tokens";
pub const PHASE_TOKENS_EXTRA: &str = "tokens_extra";
pub const PHASE_TOKENS_REFUND: &str = "tokens_refund";

/// Descriptor entry naming what a `tollgate_phase` counter counts when it is not tokens:
/// `usd` counts cost in `crate::usd` units. Its presence makes a counter (and its Redis key)
/// distinct from the token counter of the same key and limit.
pub const DESCRIPTOR_UNIT: &str = "tollgate_unit";
pub const UNIT_USD: &str = "usd";

/// Concurrency: `lease` (at admission) takes one of the key's `key_max_concurrent` slots
/// under the request id, `release` (at stream end) gives it back. A lease also expires on
/// its own (tollgate-ratelimit `--lease-ttl-ms`), so a stream whose release never comes
/// (Envoy crashed, the admission call was cancelled) cannot hold its slot for ever.
pub const PHASE_LEASE: &str = "lease";
pub const PHASE_RELEASE: &str = "release";
/// ext_authz metadata and descriptor entry: a nonce tollgate-authz draws per check for keys
/// with a concurrency limit. A slot is held under it rather than under `x-request-id`, which
/// Envoy keeps from the client with `preserve_external_request_id` (or from internal
/// addresses): a reused id would otherwise let a refused request's release free another
/// stream's slot. `-` (Envoy's default when an older tollgate-authz sent none) falls back
/// to the request id.
pub const LEASE_ID: &str = "lease_id";
/// At stream end: the tokens the stream really used (`hits_addend`), for the budget ledger.
/// Never counted against a limit.
pub const PHASE_USAGE: &str = "usage";

/// Descriptor entry carrying `x-request-id`, so the RLS can put it in its error body.
/// It identifies the request, not the limit, and is never part of a counter key.
pub const DESCRIPTOR_REQUEST_ID: &str = "request_id";

/// Headers that tollgate-authz sets for the upstream after removing client copies.
pub const HEADER_TENANT: &str = "x-tollgate-tenant";
pub const HEADER_KEY_ID: &str = "x-tollgate-key-id";

/// Request header the filter sets to the backend it picked from the model, so that Envoy's
/// routes (matching on it) pick the cluster. Envoy strips a client's copy at the edge and the
/// filter removes it again before deciding: a client can never choose a backend.
pub const HEADER_BACKEND: &str = "x-tollgate-backend";

/// Filter-state keys the wasm filter sets (Envoy names them `wasm.<key>`): the model the
/// request used, and the tokens counted from the upstream's usage. Read by the access log
/// (audit, metrics) and by the rate limiter's stream-done debit.
pub const FILTER_STATE_MODEL: &str = "tollgate_model";
pub const FILTER_STATE_TOKENS_IN: &str = "tollgate_tokens_in";
pub const FILTER_STATE_TOKENS_OUT: &str = "tollgate_tokens_out";
pub const FILTER_STATE_TOKENS: &str = "tollgate_tokens";
/// Tokens reserved at admission (max_tokens or a default, plus the prompt estimate); the
/// rate limiter admits against it and reconciles with `tollgate_tokens` at stream end.
pub const FILTER_STATE_RESERVATION: &str = "tollgate_req";
/// At stream end: tokens used beyond the reservation (debited) and reserved but not used
/// (refunded). One of the two is 0.
pub const FILTER_STATE_TOKENS_EXTRA: &str = "tollgate_tokens_extra";
pub const FILTER_STATE_TOKENS_REFUND: &str = "tollgate_tokens_refund";
/// Cost in `crate::usd` units (1/10000 USD), set when the model has a price: reserved at
/// admission (prompt estimate at the input price plus the completion budget at the output
/// price), used at stream end, and the debit beyond / refund of the reservation.
pub const FILTER_STATE_COST_RESERVATION: &str = "tollgate_cost_req";
pub const FILTER_STATE_COST: &str = "tollgate_cost";
pub const FILTER_STATE_COST_EXTRA: &str = "tollgate_cost_extra";
pub const FILTER_STATE_COST_REFUND: &str = "tollgate_cost_refund";
/// The request body of an opted-in tenant's request (capped), for the prompt log.
pub const FILTER_STATE_PROMPT: &str = "tollgate_prompt";

/// Response header naming the error code of a Tollgate refusal (`invalid_api_key`,
/// `endpoint_blocked`, `rate_limited`, …): harmless to clients, read by the audit log.
pub const HEADER_ERROR: &str = "x-tollgate-error";
