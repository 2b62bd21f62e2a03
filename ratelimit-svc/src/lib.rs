//! tollgate-ratelimit: the limit algorithms, descriptor configuration and counter stores
//! (free of gRPC types), and the Envoy RLS v3 service that exposes them.

pub mod config_watch;
pub mod counter_store;
pub mod descriptor_config;
pub mod envoy_descriptor;
pub mod gcra;
pub mod ledger;
pub mod limit_policy;
pub mod limiter;
pub mod metrics;
pub mod rls_response;
pub mod rls_service;
pub mod startup_gate;
pub mod usage_records;
