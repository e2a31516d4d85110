//! Router port-mapping backends: one module per protocol behind one small trait,
//! [`PortMapper`]. Codecs are sans-io (bytes in, bytes out); clients own the sockets.
//!
//! Backends are idempotent (ARCHITECTURE.md, "Adding a router protocol"): removing what is already gone
//! is success, adding what exists is a renewal.

pub mod announce;
pub mod choice;
pub mod clamp;
pub mod discover;
pub mod natpmp;
pub mod pcp;
pub mod pinholes;
pub mod session;
pub mod upnp;

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::model::{Backend, Endpoint, MappingKey, Owner, Protocol};
use crate::state::{Failure, MappingRecord};

/// A request to create or renew one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRequest {
    pub owner: Owner,
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal: Endpoint,
    pub lifetime_secs: u32,
    /// PCP: the mapping's nonce (24 hex digits), already persisted in the state file.
    pub nonce: Option<String>,
}

/// What the router granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub external_port: u16,
    /// 0: permanent.
    pub lifetime_secs: u32,
    /// When to renew, counted from the grant (the backend's own schedule, with jitter).
    pub renew_after: Option<Duration>,
    pub external_address: Option<Ipv4Addr>,
    pub epoch: Option<u32>,
    /// The router's identity, recorded with the mapping.
    pub router: String,
}

/// Why a router call failed, in terms the reconciler acts on.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Another host (or a mapping holepunch does not own) holds the external port.
    #[error("external port {port}/{protocol} is taken on the router by another host: {detail}")]
    Conflict {
        port: u16,
        protocol: Protocol,
        detail: String,
    },
    /// The router answered and said no.
    #[error("the router refused: {reason}")]
    Refused {
        reason: String,
        /// The least time to wait before asking again, if the protocol says (PCP lifetimes).
        retry_after: Option<Duration>,
    },
    /// No answer, or no usable answer.
    #[error("{UNREACHABLE_PREFIX}: {0}")]
    Unreachable(String),
}

/// How an [`RouterError::Unreachable`] reads in a mapping's `last_error` (and how a version 1
/// state file, which has no `failure`, says so).
pub const UNREACHABLE_PREFIX: &str = "the router did not answer";

impl RouterError {
    /// The kind of failure this error records on a mapping.
    pub fn failure(&self) -> Failure {
        match self {
            RouterError::Unreachable(_) => Failure::RouterSilent,
            _ => Failure::Refused,
        }
    }
}

/// One router protocol.
pub trait PortMapper: Send {
    fn backend(&self) -> Backend;

    /// Creates or renews a mapping (adding one that exists is a renewal).
    fn map(
        &mut self,
        request: &MapRequest,
    ) -> impl Future<Output = Result<Grant, RouterError>> + Send;

    /// Deletes a mapping holepunch owns; one that is already gone is success.
    fn unmap(
        &mut self,
        record: &MappingRecord,
    ) -> impl Future<Output = Result<(), RouterError>> + Send;

    /// Asks the router which of `records` (mappings it granted) it no longer holds, as
    /// cheaply as the protocol allows; called every verify interval. The default knows no
    /// way to ask and reports nothing lost.
    fn lost(
        &mut self,
        records: &[&MappingRecord],
    ) -> impl Future<Output = Result<Vec<MappingKey>, RouterError>> + Send {
        let _ = records;
        async { Ok(Vec::new()) }
    }

    /// Whether an answer since the last call showed that the router restarted (and so lost
    /// every mapping). Reading it clears it.
    fn take_restart(&mut self) -> bool {
        false
    }
}

/// No router at all: `gateway` mode and `router.backend = "none"`. Every mapping is
/// "granted" permanently, so the state still says what holepunch publishes.
#[derive(Debug, Default)]
pub struct NoRouter;

impl PortMapper for NoRouter {
    fn backend(&self) -> Backend {
        Backend::None
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        Ok(Grant {
            external_port: request.external_port,
            lifetime_secs: 0,
            renew_after: None,
            external_address: None,
            epoch: None,
            router: String::new(),
        })
    }

    async fn unmap(&mut self, _record: &MappingRecord) -> Result<(), RouterError> {
        Ok(())
    }
}
