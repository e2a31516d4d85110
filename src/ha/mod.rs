//! High availability: several hosts, one active through a `coordination.k8s.io/v1` Lease
//! (README.md, "High availability"). Kubernetes is the distributed engine;
//! holepunch adds no consensus of its own.
//!
//! The loop consults [`role::Leadership`] at every pass (README.md, "High availability"); the
//! pieces under it:
//! - [`election`]: client-go's leader election as a pure state machine, with the fencing
//!   deadline (`may_act`) that ends before any other host may acquire the Lease;
//! - [`mirror`]: the mapping records as the ConfigMap beside the Lease holds them (the state
//!   file's `[[mapping]]` format);
//! - [`lease`]: reading and writing the Lease and that ConfigMap through the API server, every
//!   write with a resourceVersion precondition, every request with a timeout;
//! - [`address`]: the floating relay address, added, announced (gratuitous ARP) and removed
//!   through the kernel;
//! - [`runner`]: the async loop that drives an election against the API server and publishes
//!   where this host stands;
//! - [`role`]: what the daemon's loop may do (act or stand by), the fence on every router
//!   request, the address guard and the mirror writer beside the loop.

pub mod address;
pub mod election;
pub mod lease;
pub mod mirror;
pub mod role;
pub mod runner;
