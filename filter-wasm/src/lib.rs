//! Tollgate's proxy-wasm filter for Envoy. The decisions live in plain Rust modules tested
//! natively; `glue` binds them to proxy-wasm and exists only in the wasm32 build.

pub mod config;
pub mod discovery;
pub mod http_filter;
pub mod model_gate;
pub mod path_guard;
pub mod pricing;
pub mod request_head;
pub mod routing;
pub mod stream;
pub mod transcoder;
pub mod translate;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod glue;
