//! End-to-end harness: starts real Envoy, tollgate-authz, tollgate-ratelimit and the mock
//! model server on free loopback ports, and tears them all down when dropped.

pub mod envoy_config;
pub mod http;
pub mod invariant;
pub mod manifests;
pub mod paths;
pub mod postgres;
pub mod proc_stat;
pub mod process;
pub mod redis;
pub mod routing_config;
pub mod service_flags;
pub mod stack;
