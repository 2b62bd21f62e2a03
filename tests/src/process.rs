//! Child processes with their output in log files, killed on drop, and a readiness wait
//! that fails with the process's own log; free ports and temp dirs. Shared with the
//! services' own tests through `tollgate-test-support`.

pub use tollgate_test_support::process::{free_port, temp_dir, Proc, TempDir};
