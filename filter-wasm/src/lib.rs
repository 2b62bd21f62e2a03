//! Tollgate's proxy-wasm filter for Envoy. The decisions live in plain Rust modules tested
//! natively; `wasm_contexts` binds them to proxy-wasm and exists only in the wasm32 build.

pub mod admission;
pub mod config;
pub mod discovery;
pub mod discovery_schedule;
pub mod endpoint;
pub mod exchange;
pub mod grant;
pub mod host;
pub mod model_gate;
pub mod path_guard;
pub mod pricing;
pub mod replies;
pub mod request_head;
pub mod response_stream;
pub mod routing;
pub mod stream;
pub mod translate;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod wasm_contexts;
