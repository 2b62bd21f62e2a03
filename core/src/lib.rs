//! Tollgate's shared vocabulary: names that the filter, tollgate-authz and
//! tollgate-ratelimit must agree on, the API-key format and the one JSON error body.

pub mod api_key;
pub mod error_body;
pub mod metadata;
pub mod model_pattern;
pub mod operation;
pub mod refusal;
pub mod usd;
