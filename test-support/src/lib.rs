//! Test support shared by the end-to-end harness (`tests/`) and the services' own tests:
//! child processes with log files killed on drop, free loopback ports, temporary
//! directories, and a throwaway `redis-server` (single node or a three-master cluster).

pub mod process;
pub mod redis;
