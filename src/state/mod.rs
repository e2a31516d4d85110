//! What holepunch owns, kept across restarts, crashes and upgrades (ARCHITECTURE.md, "State
//! lifecycle"): the domain record (`record.rs`) and the state file that stores it
//! (`file.rs`: format versions, migration, lock, atomic save). Nothing here depends on the
//! router, the plan or the reconciler.

mod file;
mod pinhole;
mod record;

pub use file::*;
pub use pinhole::*;
pub use record::*;
