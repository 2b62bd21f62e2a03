//! Names of the dynamic metadata that tollgate-authz emits and of the rate-limit
//! descriptor entries built from it. Envoy config, filter and services use these names.

/// Envoy puts ext_authz `CheckResponse.dynamic_metadata` under this namespace.
pub const AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// Key id (string). Also the rate-limit descriptor key for per-key limits.
pub const KEY_ID: &str = "key_id";
/// Tenant id (string). Also the rate-limit descriptor key for per-tenant limits.
pub const TENANT_ID: &str = "tenant_id";
/// Per-key requests-per-minute override, shaped as Envoy's descriptor limit
/// override: `{requests_per_unit: <number>, unit: "MINUTE"}`.
pub const RPM_OVERRIDE: &str = "rpm_override";

/// Descriptor entry carrying `x-request-id`, so the RLS can put it in its error body.
/// It identifies the request, not the limit, and is never part of a counter key.
pub const DESCRIPTOR_REQUEST_ID: &str = "request_id";

/// Headers that tollgate-authz sets for the upstream after removing client copies.
pub const HEADER_TENANT: &str = "x-tollgate-tenant";
pub const HEADER_KEY_ID: &str = "x-tollgate-key-id";
