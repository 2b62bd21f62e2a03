//! Where counters live. The in-memory store serves a single process (`make up`);
//! Redis serves replicas.

mod memory;

pub use memory::MemoryStore;
