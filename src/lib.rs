//! holepunch: publish Kubernetes Services through the home router.
//!
//! A pure core (`desired`, `plan`) between I/O edges (`kube`, `router`, `nft`, `state`),
//! driven by the event loop in `daemon`. See ARCHITECTURE.md for the architecture.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod daemon;
pub mod desired;
pub mod ha;
pub mod host;
pub mod kube;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod pinholes;
pub mod plan;
pub mod reconcile;
pub mod router;
pub mod state;
pub mod trust;
pub mod yielding;
