//! tollgate-authz: decides who is calling (API key → tenant → policy) for Envoy's ext_authz
//! v3, and the admin operations on tenants, keys and policies.

pub mod api_key;
pub mod argon2_budget;
pub mod audit;
pub mod authz_config;
pub mod check_service;
pub mod client_ip;
pub mod credentials;
pub mod decision;
pub mod failure_throttle;
pub mod identity;
pub mod ip_net;
pub mod key_cache;
pub mod key_digest;
pub mod key_events;
pub mod key_store;
pub mod metrics;
pub mod policy;
pub mod profile;
pub mod static_keys;
pub mod store_breaker;
pub mod time;
pub mod verified_secrets;
