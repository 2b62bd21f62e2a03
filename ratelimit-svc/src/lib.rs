//! tollgate-ratelimit: the limit algorithms and counter stores (free of gRPC types),
//! and the Envoy RLS v3 service that exposes them.

pub mod counter_store;
pub mod gcra;
pub mod limit_policy;
pub mod rls_service;
