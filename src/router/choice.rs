//! Which router protocol the daemon talks: the one the config names, or with
//! `router.backend = "auto"` the first that answers, in the order PCP, NAT-PMP, UPnP,
//! trying first the one the state file says worked with this router before.
//!
//! [`Router`] is the daemon's single [`PortMapper`]: an enum over the backends, so the
//! reconciler stays generic and the daemon can switch protocols without restarting.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::config::BackendChoice;
use crate::model::{Backend, Lease, MappingKey};
use crate::router::natpmp::client::NatpmpClient;
use crate::router::pcp::client::{PcpClient, Schedule};
use crate::router::upnp::UpnpClient;
use crate::router::{Grant, MapRequest, NoRouter, PortMapper, RouterError};

/// How long one protocol's probe may take before `auto` tries the next one.
pub const PROBE_TRY_MS: u64 = 1000;
/// Transmissions per probe.
pub const PROBE_TRIES: u32 = 2;

/// Where the router is and who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterAddress {
    /// The gateway: `router.address`, else the default route's next hop.
    pub gateway: Ipv4Addr,
    /// This host's address toward the gateway: the PCP client IP, the NAT-PMP sender, the
    /// UPnP control point.
    pub local: Ipv4Addr,
}

/// The backend in use.
#[derive(Debug)]
pub enum Router {
    None(NoRouter),
    Pcp(PcpClient),
    Natpmp(NatpmpClient),
    Upnp(UpnpClient),
}

/// `auto` found nothing that answers.
#[derive(Debug, thiserror::Error)]
#[error(
    "no router answered at {gateway} (tried {tried}); check that UPnP, PCP or NAT-PMP is \
     turned on in the router, that router.address is the router, or set router.backend \
     explicitly. Trying again later"
)]
pub struct NoRouterFound {
    pub gateway: Ipv4Addr,
    pub tried: String,
}

impl Router {
    /// The backend the config names, without asking the router anything: its calls fail
    /// (and are retried with backoff) while the router does not answer.
    pub fn configured(choice: BackendChoice, address: &RouterAddress) -> Option<Router> {
        match choice {
            BackendChoice::None => Some(Router::None(NoRouter)),
            BackendChoice::Pcp => Some(Router::Pcp(PcpClient::new(address.gateway, address.local))),
            BackendChoice::Natpmp => Some(Router::Natpmp(NatpmpClient::new(
                address.gateway,
                address.local,
            ))),
            BackendChoice::Auto | BackendChoice::Upnp => None,
        }
    }

    /// The client for `backend`, to remove what was made through it (`holepunch cleanup`).
    pub fn for_backend(backend: Backend, address: Option<&RouterAddress>) -> Option<Router> {
        match (backend, address) {
            (Backend::None, _) => Some(Router::None(NoRouter)),
            (Backend::Pcp, Some(address)) => {
                Some(Router::Pcp(PcpClient::new(address.gateway, address.local)))
            }
            (Backend::Natpmp, Some(address)) => Some(Router::Natpmp(NatpmpClient::new(
                address.gateway,
                address.local,
            ))),
            _ => None,
        }
    }

    /// Finds the router: with `router.backend = "upnp"` by UPnP discovery only (or the
    /// configured description URL), with `auto` by probing PCP, NAT-PMP and UPnP in that
    /// order, `preferred` (what worked before) first.
    pub async fn probe(
        address: &RouterAddress,
        choice: BackendChoice,
        preferred: Option<Backend>,
        igd_url: Option<&str>,
    ) -> Result<Router, NoRouterFound> {
        let mut order = match choice {
            BackendChoice::Upnp => vec![Backend::Upnp],
            BackendChoice::Pcp => vec![Backend::Pcp],
            BackendChoice::Natpmp => vec![Backend::Natpmp],
            BackendChoice::Auto | BackendChoice::None => {
                vec![Backend::Pcp, Backend::Natpmp, Backend::Upnp]
            }
        };
        if let Some(first) = preferred.filter(|b| order.contains(b)) {
            order.retain(|b| *b != first);
            order.insert(0, first);
        }
        let mut tried = Vec::new();
        for backend in order {
            // Each protocol tried (answered or timed out) is progress (ARCHITECTURE.md, "The
            // loop").
            if !tried.is_empty() {
                crate::yielding::progressed();
            }
            match backend {
                Backend::Pcp => {
                    let mut client = PcpClient::new(address.gateway, address.local)
                        .with_schedule(probe_schedule());
                    match client.announce().await {
                        Ok(epoch) => {
                            tracing::info!(gateway = %address.gateway, epoch, "the router speaks PCP");
                            return Ok(Router::Pcp(client.with_schedule(Schedule::default())));
                        }
                        Err(e) => {
                            tracing::debug!(gateway = %address.gateway, error = %e, "PCP probe failed");
                            tried.push(format!("PCP: {e}"));
                        }
                    }
                }
                Backend::Natpmp => {
                    let mut client = NatpmpClient::new(address.gateway, address.local);
                    match client.external_address().await {
                        Ok(external) => {
                            tracing::info!(gateway = %address.gateway, %external, "the router speaks NAT-PMP");
                            return Ok(Router::Natpmp(client));
                        }
                        Err(e) => {
                            tracing::debug!(gateway = %address.gateway, error = %e, "NAT-PMP probe failed");
                            tried.push(format!("NAT-PMP: {e}"));
                        }
                    }
                }
                Backend::Upnp => {
                    match UpnpClient::discover(address.gateway, address.local, igd_url).await {
                        Ok(client) => {
                            tracing::info!(gateway = %address.gateway, router = %client.router_identity(),
                                service = client.service_type(), "the router speaks UPnP IGD");
                            return Ok(Router::Upnp(client));
                        }
                        Err(e) => {
                            tracing::debug!(gateway = %address.gateway, error = %e, "UPnP discovery failed");
                            tried.push(format!("UPnP: {e}"));
                        }
                    }
                }
                Backend::None => {}
            }
        }
        Err(NoRouterFound {
            gateway: address.gateway,
            tried: tried.join("; "),
        })
    }
}

fn probe_schedule() -> Schedule {
    Schedule {
        initial: Duration::from_millis(PROBE_TRY_MS),
        max: Duration::from_millis(PROBE_TRY_MS),
        max_tries: PROBE_TRIES,
    }
}

impl Router {
    /// Deletes holepunch's leftovers on the router that `keep` does not hold (UPnP, the only
    /// protocol that can list mappings); 0 for the others.
    pub async fn purge_leftovers(
        &mut self,
        keep: &std::collections::BTreeSet<MappingKey>,
    ) -> Result<usize, RouterError> {
        match self {
            Router::Upnp(r) => r.purge_leftovers(keep).await,
            Router::None(_) | Router::Pcp(_) | Router::Natpmp(_) => Ok(0),
        }
    }
}

impl PortMapper for Router {
    fn backend(&self) -> Backend {
        match self {
            Router::None(r) => r.backend(),
            Router::Pcp(r) => r.backend(),
            Router::Natpmp(r) => r.backend(),
            Router::Upnp(r) => r.backend(),
        }
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        match self {
            Router::None(r) => r.map(request).await,
            Router::Pcp(r) => r.map(request).await,
            Router::Natpmp(r) => r.map(request).await,
            Router::Upnp(r) => r.map(request).await,
        }
    }

    async fn unmap(&mut self, lease: &Lease) -> Result<(), RouterError> {
        match self {
            Router::None(r) => r.unmap(lease).await,
            Router::Pcp(r) => r.unmap(lease).await,
            Router::Natpmp(r) => r.unmap(lease).await,
            Router::Upnp(r) => r.unmap(lease).await,
        }
    }

    async fn lost(&mut self, leases: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
        match self {
            Router::None(r) => r.lost(leases).await,
            Router::Pcp(r) => r.lost(leases).await,
            Router::Natpmp(r) => r.lost(leases).await,
            Router::Upnp(r) => r.lost(leases).await,
        }
    }

    fn take_restart(&mut self) -> bool {
        match self {
            Router::None(r) => r.take_restart(),
            Router::Pcp(r) => r.take_restart(),
            Router::Natpmp(r) => r.take_restart(),
            Router::Upnp(r) => r.take_restart(),
        }
    }
}
