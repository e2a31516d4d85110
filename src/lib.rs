//! holepunch: publish Kubernetes Services through the home router.
//!
//! A pure core (`desired`, `plan`) between I/O edges (`kube`, `router`, `nft`, `state`),
//! driven by the event loop in `daemon`. See DESIGN.md for the architecture.

pub mod config;
pub mod desired;
pub mod plan;
pub mod model;
pub mod state;
pub mod router;
pub mod cli;
pub mod kube;
pub mod reconcile;
pub mod daemon;
pub mod logging;
