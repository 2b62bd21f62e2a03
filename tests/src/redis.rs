//! A throwaway redis-server on a free loopback port, stoppable and restartable on the same
//! port (to test outages), killed on drop. Shared with tollgate-ratelimit's own tests
//! through `tollgate-test-support`.

pub use tollgate_test_support::redis::{redis_command, Redis, RedisCluster};
