//! Test processes: a throwaway `redis-server` and a three-master Redis Cluster on free
//! loopback ports in a temporary directory, killed when dropped (also when a test fails).
//! One launcher for the whole workspace, in `tollgate-test-support`.

#![allow(unused_imports)] // each test binary uses a different part

pub use tollgate_test_support::process::TempDir;
pub use tollgate_test_support::redis::{redis_command, Redis, RedisCluster};
