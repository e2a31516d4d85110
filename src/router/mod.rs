//! Router port-mapping backends: one module per protocol behind one small trait,
//! [`PortMapper`]. Codecs are sans-io (bytes in, bytes out); clients own the sockets.
//!
//! Backends are idempotent (ARCHITECTURE.md, "Adding a router protocol"): removing what is already gone
//! is success, adding what exists is a renewal.

pub mod announce;
pub mod choice;
pub mod clamp;
pub mod discover;
pub mod instrument;
pub mod natpmp;
pub mod pcp;
pub mod pinholes;
pub mod session;
pub mod udp;
pub mod upnp;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::model::{
    Backend, Endpoint, Lease, MappingKey, Nonce, Owner, Problem, ProblemKind, Protocol,
};

/// A request to create or renew one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRequest {
    pub owner: Owner,
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal: Endpoint,
    pub lifetime_secs: u32,
    /// PCP: the mapping's nonce, already persisted in the state file.
    pub nonce: Option<Nonce>,
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

/// Why a router call failed, one variant per failing step; [`RouterError::is_refusal`] says
/// whether the router answered at all. Each message says what went wrong and, where the user can act,
/// what to check.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The router answered: another host (or a mapping holepunch does not own) holds the
    /// external port.
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
    /// The UDP socket toward the router could not be opened (bind or connect).
    #[error(
        "{UNREACHABLE_PREFIX}: {protocol}: cannot {step} the UDP socket ({local} -> {router}): \
         {source}; check exposure.lan_address and router.address"
    )]
    Socket {
        protocol: &'static str,
        step: SocketStep,
        local: IpAddr,
        router: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Sent, and no answer came within the retransmission schedule.
    #[error(
        "{UNREACHABLE_PREFIX}: no {protocol} answer from {router} after {tries} tries in \
         {:.1} s{hint}{}",
        waited.as_secs_f64(),
        last_problem.as_ref().map(|p| format!(" (last problem: {p})")).unwrap_or_default()
    )]
    NoAnswer {
        protocol: &'static str,
        router: SocketAddr,
        tries: u32,
        waited: Duration,
        /// What the user can check, starting with "; " (or empty).
        hint: &'static str,
        /// The last thing that went wrong while waiting (a send error, a foreign datagram).
        last_problem: Option<String>,
    },
    /// An answer came that holepunch cannot use (it lacks what the request asked for).
    #[error("{UNREACHABLE_PREFIX}: {protocol}: unusable answer: {what}")]
    Unusable {
        protocol: &'static str,
        what: String,
    },
    /// A UPnP control request found no usable HTTP answer.
    #[error("{UNREACHABLE_PREFIX}: UPnP {action} to {control}: {source}")]
    Http {
        action: String,
        control: String,
        #[source]
        source: upnp::http::HttpError,
    },
    /// A UPnP control request's reply could not be read.
    #[error("{UNREACHABLE_PREFIX}: UPnP {action} to {control}: {source}")]
    Reply {
        action: String,
        control: String,
        #[source]
        source: upnp::soap::SoapError,
    },
    /// No router address is known, so none can be asked.
    #[error("{UNREACHABLE_PREFIX}: no router is used, so none can be asked")]
    NoAddress,
    /// Not sent: an earlier request of the same pass got no answer (`earlier` is how that
    /// one read).
    #[error(
        "{UNREACHABLE_PREFIX} an earlier request of this pass, so this one was not sent ({earlier})"
    )]
    NotSent { earlier: String },
    /// Not sent: with `[ha]`, this host may no longer act (its renew deadline passed; README,
    /// "High availability"). Nothing is wrong with the router, so it counts as a refusal (the
    /// mapping waits for its retry, no "router silent" backoff), and it is no request.
    #[error(
        "this host is no longer the active holepunch host (it could not renew the Lease in \
         time); the active host makes the request"
    )]
    Fenced,
}

/// Which step of opening a UDP socket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketStep {
    Bind,
    Connect,
}

impl std::fmt::Display for SocketStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SocketStep::Bind => "bind",
            SocketStep::Connect => "connect",
        })
    }
}

/// How a router that did not answer reads in a mapping's `last_error`.
pub const UNREACHABLE_PREFIX: &str = "the router did not answer";

impl RouterError {
    /// Whether the router answered and said no (a conflict or a refusal), as opposed to not
    /// answering usably at all.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            RouterError::Conflict { .. } | RouterError::Refused { .. } | RouterError::Fenced
        )
    }
}

#[cfg(test)]
impl RouterError {
    /// A router that did not answer, for scripted routers in tests.
    pub(crate) fn silent_for_tests() -> RouterError {
        RouterError::NoAnswer {
            protocol: "test",
            router: SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 5351)),
            tries: 1,
            waited: Duration::ZERO,
            hint: "",
            last_problem: None,
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
    fn unmap(&mut self, lease: &Lease) -> impl Future<Output = Result<(), RouterError>> + Send;

    /// Asks the router which of `leases` (mappings it granted) it no longer holds, as
    /// cheaply as the protocol allows; called every verify interval. The default knows no
    /// way to ask and reports nothing lost.
    fn lost(
        &mut self,
        leases: &[Lease],
    ) -> impl Future<Output = Result<Vec<MappingKey>, RouterError>> + Send {
        let _ = leases;
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

    async fn unmap(&mut self, _lease: &Lease) -> Result<(), RouterError> {
        Ok(())
    }
}

/// The problem a router's refusal becomes, for the Service's Events (README, "Security model"). The router's own words can name the LAN host (or
/// another tenant's Service) holding the port, so they go in the operator's detail only.
pub fn refusal_problem(owner: &Owner, key: MappingKey, error: &RouterError) -> Problem {
    let message = match error {
        RouterError::Conflict { .. } => format!(
            "external port {key} is held on the router by another device on the LAN; choose \
             another external port with a holepunch.port/<port> annotation"
        ),
        _ => format!(
            "the router refused to map external port {key}; holepunch's log on the host says \
             why, ask its administrator"
        ),
    };
    Problem::new(owner.clone(), ProblemKind::RouterRefused, message).with_detail(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failing_step_reads_as_what_to_check_and_counts_as_silence_or_refusal() {
        let router = SocketAddr::from((Ipv4Addr::new(192, 168, 1, 1), 5351));
        let socket = RouterError::Socket {
            protocol: "NAT-PMP",
            step: SocketStep::Bind,
            local: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
            router,
            source: std::io::Error::from(std::io::ErrorKind::AddrNotAvailable),
        };
        let text = socket.to_string();
        assert!(text.starts_with(UNREACHABLE_PREFIX), "{text}");
        assert!(text.contains("cannot bind the UDP socket (192.168.1.10 -> 192.168.1.1:5351)"));
        assert!(
            text.contains("check exposure.lan_address and router.address"),
            "{text}"
        );
        // The cause is kept, not only its words.
        let cause = std::error::Error::source(&socket).map(ToString::to_string);
        assert_eq!(
            cause,
            Some(std::io::Error::from(std::io::ErrorKind::AddrNotAvailable).to_string())
        );
        assert!(!socket.is_refusal());

        let silent = RouterError::NoAnswer {
            protocol: "PCP",
            router,
            tries: 3,
            waited: Duration::from_millis(21_000),
            hint: "",
            last_problem: Some("receive failed: connection refused".to_owned()),
        };
        assert_eq!(
            silent.to_string(),
            "the router did not answer: no PCP answer from 192.168.1.1:5351 after 3 tries in \
             21.0 s (last problem: receive failed: connection refused)"
        );
        let not_sent = RouterError::NotSent {
            earlier: silent.to_string(),
        };
        assert!(not_sent.to_string().starts_with(UNREACHABLE_PREFIX));
        assert!(not_sent.to_string().contains("no PCP answer"), "{not_sent}");
        for error in [&silent, &not_sent, &RouterError::NoAddress] {
            assert!(!error.is_refusal(), "{error}");
        }

        // The normal case of an answer: a refusal and a conflict are refusals.
        let refused = RouterError::Refused {
            reason: "NOT_AUTHORIZED".to_owned(),
            retry_after: None,
        };
        let conflict = RouterError::Conflict {
            port: 443,
            protocol: Protocol::Tcp,
            detail: "held".to_owned(),
        };
        for error in [&refused, &conflict, &RouterError::Fenced] {
            assert!(error.is_refusal(), "{error}");
        }
    }

    #[test]
    fn router_conflict_is_tenant_safe_and_keeps_the_detail() {
        let key = MappingKey {
            protocol: Protocol::Tcp,
            external_port: 8080,
        };
        let error = RouterError::Conflict {
            port: 8080,
            protocol: Protocol::Tcp,
            detail: "192.168.1.50 holds it (description \"holepunch:other/svc\")".into(),
        };
        let problem = refusal_problem(&Owner::new("a", "web"), key, &error);
        assert!(problem.message.contains("another device on the LAN"));
        assert!(
            !problem.message.contains("192.168.1.50"),
            "{}",
            problem.message
        );
        assert!(
            !problem.message.contains("other/svc"),
            "{}",
            problem.message
        );
        assert!(
            problem
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("192.168.1.50"))
        );
        let refused = RouterError::Refused {
            reason: "maps only to the host that asks (192.168.1.10)".into(),
            retry_after: None,
        };
        let problem = refusal_problem(&Owner::new("a", "web"), key, &refused);
        assert!(
            !problem.message.contains("192.168.1.10"),
            "{}",
            problem.message
        );
        assert!(
            problem
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("192.168.1.10"))
        );
    }
}
