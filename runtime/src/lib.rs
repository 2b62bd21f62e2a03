//! What the two native services, tollgate-authz and tollgate-ratelimit, run on, written
//! once: log set-up, SIGINT/SIGTERM with a bounded drain, accept loops that back off when
//! the process is out of file descriptors, the plain-HTTP side port (`/metrics`,
//! `/healthz`, `/readyz`), one readiness value behind both `/readyz` and gRPC health, the
//! SQL pool (connect and migrate) and random ids. Native only: `tollgate-core` stays free of
//! I/O so it builds for wasm32.

pub mod accept;
pub mod ids;
pub mod logging;
pub mod readiness;
pub mod shutdown;
pub mod side_port;
pub mod sql_pool;
