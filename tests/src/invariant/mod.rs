//! The enforcement invariant suite (tests/tests/invariant.rs): the table of what an upstream
//! acts on, the runner that sends every row through a real stack, and the oracle that reads
//! the mock model servers' recorders (what each server made of each request) against the
//! key's policy.

pub mod oracle;
pub mod run;
pub mod table;
