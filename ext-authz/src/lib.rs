//! tollgate-authz: decides who is calling (API key → tenant) for Envoy's ext_authz v3,
//! and the admin operations that create tenants and keys.

pub mod api_key;
pub mod check_service;
pub mod decision;
pub mod key_store;
pub mod time;
