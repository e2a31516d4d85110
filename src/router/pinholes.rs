//! IPv6 pinholes at the router (README, "IPv6"): the [`PinholeRouter`] trait and its
//! clients, PCP MAP over IPv6 ([`super::pcp::v6`]), UPnP IGDv2 WANIPv6FirewallControl
//! ([`super::upnp::pinhole`]) and [`OnThisRouter`] (gateway mode: holepunch runs on the router,
//! every pinhole is granted and holepunch's own table accepts it); and the path to the router:
//! the next hop of the IPv6 default route (a link-local one with its interface's index) and
//! this host's stable global address toward it, with that address's prefix length. The loop
//! runs the pinhole plan through these in `daemon::pinholes`.

use std::future::Future;
use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::pin::Pin;
use std::time::Duration;

use super::RouterError;
use super::pcp::codec::Nonce;
use super::pcp::v6::{Pcp6Client, PinholeMap};
use super::upnp::pinhole::{PinholeClient, PinholeError, PinholeRequest, lease_for};
use crate::config::Config;
use crate::model::Backend;
use crate::pinholes::{NATPMP_HAS_NO_IPV6, RelayHost};
use crate::state::PinholeRecord;

/// A boxed future, so that pinhole clients can sit behind one trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the router granted for a pinhole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub lifetime_secs: u32,
    /// When to renew, counted from the grant.
    pub renew_after: Option<Duration>,
    /// PCP: the router's epoch with the answer.
    pub epoch: Option<u32>,
    /// UPnP: the pinhole's UniqueID.
    pub unique_id: Option<u16>,
}

/// One router protocol for IPv6 pinholes.
pub trait PinholeRouter: Send {
    fn backend(&self) -> Backend;
    /// The router's IPv6 address the pinholes are asked of.
    fn router(&self) -> Ipv6Addr;
    /// This host's IPv6 address toward the router (what relay mode opens).
    fn host(&self) -> Ipv6Addr;
    /// Creates the pinhole, restores it or extends its lease: one request for all three, as
    /// both protocols answer the same request again with a fresh lease (see the notes of
    /// each implementation).
    fn open<'a>(
        &'a mut self,
        record: &'a PinholeRecord,
        lifetime_secs: u32,
    ) -> BoxFuture<'a, Result<Opened, RouterError>>;
    /// Deletes it; one that is gone is success.
    fn close<'a>(&'a mut self, record: &'a PinholeRecord)
    -> BoxFuture<'a, Result<(), RouterError>>;
    /// Whether an answer since the last call showed a router restart. Reading it clears it.
    fn take_restart(&mut self) -> bool {
        false
    }
}

/// PCP MAP over IPv6.
pub struct PcpPinholes {
    client: Pcp6Client,
    router: Ipv6Addr,
    host: Ipv6Addr,
}

impl PcpPinholes {
    /// `scope_id`: the interface index when `router` is link-local, else 0.
    pub fn new(router: Ipv6Addr, scope_id: u32, host: Ipv6Addr) -> PcpPinholes {
        PcpPinholes {
            client: Pcp6Client::new(router, host).with_scope_id(scope_id),
            router,
            host,
        }
    }

    /// The PCP request for `record`, or why it cannot be asked.
    fn map(&self, record: &PinholeRecord, lifetime_secs: u32) -> Result<PinholeMap, RouterError> {
        if record.address != self.host {
            // NOTE: RFC 6887 §13.1: a MAP opens the client's own address; another's needs the
            // THIRD_PARTY option, which routers mostly refuse and holepunch does not send.
            return Err(RouterError::Refused {
                reason: format!(
                    "PCP opens IPv6 pinholes only to this host's own address {}, not {}; use \
                     exposure.mode = \"relay\"",
                    self.host, record.address
                ),
                retry_after: None,
            });
        }
        let nonce = record
            .nonce
            .as_deref()
            .and_then(|n| n.parse::<Nonce>().ok())
            .ok_or_else(|| RouterError::Refused {
                reason: "the pinhole's PCP nonce is missing or damaged in the state file".into(),
                retry_after: None,
            })?;
        Ok(PinholeMap {
            protocol: record.protocol,
            internal_port: record.port,
            lifetime_secs,
            nonce,
        })
    }
}

fn opened_pcp(grant: super::pcp::v6::PinholeGrant) -> Opened {
    Opened {
        lifetime_secs: grant.lifetime_secs,
        renew_after: grant.renew_after,
        epoch: Some(grant.epoch),
        unique_id: None,
    }
}

impl PinholeRouter for PcpPinholes {
    fn backend(&self) -> Backend {
        Backend::Pcp
    }
    fn router(&self) -> Ipv6Addr {
        self.router
    }
    fn host(&self) -> Ipv6Addr {
        self.host
    }
    fn open<'a>(
        &'a mut self,
        record: &'a PinholeRecord,
        lifetime_secs: u32,
    ) -> BoxFuture<'a, Result<Opened, RouterError>> {
        // NOTE: opened and renewed by replacing (delete with its nonce, then MAP), never in
        // place: miniupnpd 2.3.1 forgets the nonce of a pinhole renewed in place and then
        // refuses to delete it (see `Pcp6Client::renew`; found by the daemon lab). A restore
        // or a retry of a pinhole the router may still hold is such a renewal. Deleting one
        // that does not exist is success.
        Box::pin(async move {
            let map = self.map(record, lifetime_secs)?;
            self.client.renew(&map).await.map(opened_pcp)
        })
    }
    fn close<'a>(
        &'a mut self,
        record: &'a PinholeRecord,
    ) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async move {
            let map = self.map(record, 0)?;
            self.client.delete(&map).await
        })
    }
    fn take_restart(&mut self) -> bool {
        self.client.take_restart()
    }
}

/// UPnP IGDv2 WANIPv6FirewallControl.
pub struct UpnpPinholes {
    client: PinholeClient,
    router: Ipv6Addr,
}

impl UpnpPinholes {
    pub fn new(client: PinholeClient, router: Ipv6Addr) -> UpnpPinholes {
        UpnpPinholes { client, router }
    }

    async fn add(&self, record: &PinholeRecord, lifetime_secs: u32) -> Result<Opened, RouterError> {
        let pinhole = self
            .client
            .add(&PinholeRequest {
                protocol: record.protocol,
                internal_address: record.address,
                internal_port: record.port,
                lease_secs: lease_for(lifetime_secs),
            })
            .await
            .map_err(router_error)?;
        Ok(Opened {
            lifetime_secs: pinhole.lease_secs,
            renew_after: Some(pinhole.renew_after()),
            epoch: None,
            unique_id: Some(pinhole.unique_id),
        })
    }
}

/// A UPnP pinhole error in the terms the state records.
fn router_error(error: PinholeError) -> RouterError {
    match error {
        PinholeError::Transport { action, source } => RouterError::Http {
            action: action.to_owned(),
            control: "WANIPv6FirewallControl".to_owned(),
            source,
        },
        PinholeError::ReadReply { action, source } => RouterError::Reply {
            action: action.to_owned(),
            control: "WANIPv6FirewallControl".to_owned(),
            source,
        },
        other => RouterError::Refused {
            reason: other.to_string(),
            retry_after: None,
        },
    }
}

impl PinholeRouter for UpnpPinholes {
    fn backend(&self) -> Backend {
        Backend::Upnp
    }
    fn router(&self) -> Ipv6Addr {
        self.router
    }
    fn host(&self) -> Ipv6Addr {
        self.client.lan_address()
    }
    // NOTE: miniupnpd 2.3.1 gives UniqueIDs from 1 again after a restart, so a stored one may
    // name another host's pinhole by now (README, "IPv6"). Renewing and deleting therefore
    // never trust it: AddPinhole with the same parameters answers the pinhole's current
    // UniqueID (the same one while it exists, a renewal of its lease; measured in the lab),
    // and only that one is deleted.
    fn open<'a>(
        &'a mut self,
        record: &'a PinholeRecord,
        lifetime_secs: u32,
    ) -> BoxFuture<'a, Result<Opened, RouterError>> {
        Box::pin(self.add(record, lifetime_secs))
    }
    fn close<'a>(
        &'a mut self,
        record: &'a PinholeRecord,
    ) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async move {
            let current = self.add(record, CLOSE_LEASE_SECS).await?;
            match current.unique_id {
                Some(id) => self.client.delete(id).await.map_err(router_error),
                None => Ok(()),
            }
        })
    }
}

/// Gateway mode (README, "IPv6"): holepunch runs on the router, so there is no router to ask;
/// the accept and DNAT rules in holepunch's own table are the pinhole. Every pinhole is
/// "granted" permanently, as `NoRouter` grants IPv4 mappings, so that the state still says
/// what holepunch publishes.
#[derive(Debug, Default)]
pub struct OnThisRouter;

impl PinholeRouter for OnThisRouter {
    fn backend(&self) -> Backend {
        Backend::None
    }
    fn router(&self) -> Ipv6Addr {
        Ipv6Addr::UNSPECIFIED
    }
    fn host(&self) -> Ipv6Addr {
        Ipv6Addr::UNSPECIFIED
    }
    fn open<'a>(
        &'a mut self,
        _record: &'a PinholeRecord,
        _lifetime_secs: u32,
    ) -> BoxFuture<'a, Result<Opened, RouterError>> {
        Box::pin(async {
            Ok(Opened {
                lifetime_secs: 0,
                renew_after: None,
                epoch: None,
                unique_id: None,
            })
        })
    }
    fn close<'a>(
        &'a mut self,
        _record: &'a PinholeRecord,
    ) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The lease of the AddPinhole that learns a pinhole's UniqueID before it is deleted: if
/// the delete is lost, it closes by itself soon.
const CLOSE_LEASE_SECS: u32 = 60;

/// How the loop reaches a router for pinholes.
pub trait PinholeConnect: Send {
    /// Where pinholes are asked now: the router and this host's address toward it. Asked
    /// every pass, so that a new address or prefix of this host is followed.
    fn path(&mut self) -> Result<Ipv6Path, String>;
    /// A client for `backend` on `path`, or why there is none.
    fn connect<'a>(
        &'a mut self,
        path: Ipv6Path,
        backend: Backend,
        config: &'a Config,
    ) -> BoxFuture<'a, Result<Box<dyn PinholeRouter>, String>>;
}

/// The real routers: the IPv6 default route's next hop, this host's address toward it.
#[derive(Debug, Default)]
pub struct RouterPinholes;

/// How long the UPnP description and SOAP calls may take.
const UPNP_TIMEOUT_SECS: u64 = 5;

impl PinholeConnect for RouterPinholes {
    fn path(&mut self) -> Result<Ipv6Path, String> {
        ipv6_path()
    }
    fn connect<'a>(
        &'a mut self,
        path: Ipv6Path,
        backend: Backend,
        config: &'a Config,
    ) -> BoxFuture<'a, Result<Box<dyn PinholeRouter>, String>> {
        Box::pin(async move {
            // A former address of this host (its pinholes being closed from it) may be gone.
            let addresses = std::fs::read_to_string(PROC_IF_INET6)
                .map_err(|e| format!("cannot read {PROC_IF_INET6}: {e}"))?;
            if !parse_if_inet6(&addresses)
                .iter()
                .any(|a| a.address == path.host)
            {
                return Err(format!("this host no longer holds {}", path.host));
            }
            client_for(path, backend, config).await
        })
    }
}

/// The pinhole client for `backend` on `path`, or why there is none.
async fn client_for(
    path: Ipv6Path,
    backend: Backend,
    config: &Config,
) -> Result<Box<dyn PinholeRouter>, String> {
    let Ipv6Path {
        router,
        scope_id,
        host,
        ..
    } = path;
    match backend {
        Backend::Pcp => {
            Ok(Box::new(PcpPinholes::new(router, scope_id, host)) as Box<dyn PinholeRouter>)
        }
        Backend::Upnp => {
            // NOTE: the IGD's description is fetched again over IPv6, at the router's
            // IPv6 address with the port and path of `router.igd_url` (miniupnpd serves
            // both families on one port); WANIPv6FirewallControl must be called from
            // this host's IPv6 address (README, "IPv6"). A link-local router is dialled on
            // its interface (`scope_id`): the URL has no zone.
            let described = config.router.igd_url.as_deref().ok_or(
                "UPnP IPv6 pinholes need router.igd_url (the router's description URL) for now",
            )?;
            let url = super::upnp::http::HttpUrl::parse(described)
                .map_err(|e| format!("router.igd_url: {e}"))?;
            let url6 = super::upnp::http::HttpUrl::parse(&format!(
                "http://[{router}]:{}{}",
                url.port, url.path
            ))
            .map_err(|e| format!("the IPv6 description URL: {e}"))?;
            let client = PinholeClient::discover_scoped(
                &url6,
                host,
                scope_id,
                Duration::from_secs(UPNP_TIMEOUT_SECS),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(Box::new(UpnpPinholes::new(client, router)) as Box<dyn PinholeRouter>)
        }
        Backend::Natpmp => Err(NATPMP_HAS_NO_IPV6.to_owned()),
        Backend::None => Err("no router protocol is in use".to_owned()),
    }
}

const PROC_IPV6_ROUTE: &str = "/proc/net/ipv6_route";
const PROC_IF_INET6: &str = "/proc/net/if_inet6";

/// The IPv6 default route's next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Gateway {
    pub address: Ipv6Addr,
    /// The route's output interface.
    pub device: String,
}

impl Ipv6Gateway {
    pub fn is_link_local(&self) -> bool {
        is_link_local(self.address)
    }
}

fn is_link_local(address: Ipv6Addr) -> bool {
    address.segments()[0] & 0xffc0 == 0xfe80
}

/// Where the pinholes are asked: the router (with the interface scope a link-local address
/// needs) and this host's global address the requests are sent from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Path {
    pub router: Ipv6Addr,
    /// The interface index for a link-local router, else 0.
    pub scope_id: u32,
    pub host: Ipv6Addr,
    /// The prefix length of `host` on its interface (the on-link prefix the relay's ip6 DNAT
    /// leaves alone).
    pub prefix_len: u8,
}

impl Ipv6Path {
    /// This host's relay address and its prefix.
    pub fn relay_host(&self) -> RelayHost {
        RelayHost {
            address: self.host,
            prefix_len: self.prefix_len,
        }
    }
}

/// The prefix length assumed for this host's address when the kernel's list does not give it
/// (the LAN's usual SLAAC /64).
const DEFAULT_PREFIX_LEN: u8 = 64;

/// The router and this host's address for IPv6 pinholes: the next hop of the IPv6 default
/// route with the lowest metric. A link-local next hop (the usual one, learnt from a Router
/// Advertisement) is kept with its interface's index; the source is then this host's global
/// address on that interface (README, "IPv6").
pub fn ipv6_path() -> Result<Ipv6Path, String> {
    let table = std::fs::read_to_string(PROC_IPV6_ROUTE)
        .map_err(|e| format!("cannot read {PROC_IPV6_ROUTE}: {e}"))?;
    let gateway =
        parse_ipv6_default_gateway(&table).ok_or("this host has no IPv6 default route")?;
    let addresses = std::fs::read_to_string(PROC_IF_INET6)
        .map_err(|e| format!("cannot read {PROC_IF_INET6}: {e}"))?;
    let addresses = parse_if_inet6(&addresses);
    if !gateway.is_link_local() {
        let host = source_address_toward(gateway.address)?;
        return Ok(Ipv6Path {
            router: gateway.address,
            scope_id: 0,
            host,
            prefix_len: prefix_len_of(host, &addresses),
        });
    }
    link_local_path(&gateway, &addresses)
}

/// The prefix length of `address` on this host's interfaces (`/proc/net/if_inet6`), else
/// [`DEFAULT_PREFIX_LEN`].
pub fn prefix_len_of(address: Ipv6Addr, addresses: &[InterfaceAddress]) -> u8 {
    addresses
        .iter()
        .find(|a| a.address == address)
        .map_or(DEFAULT_PREFIX_LEN, |a| a.prefix_len)
}

/// For a link-local next hop: its interface's index and this host's global address there.
// NOTE: RFC 6887 §8.1: the client sends to its default router, which may be a link-local
// address; the MAP's client IP must still be the address the pinhole opens, and the request's
// source must equal it (else ADDRESS_MISMATCH), so the source is a global address on the
// route's interface, not the link-local one the kernel would pick for a link-local destination
// (RFC 6724, rule 2).
pub fn link_local_path(
    gateway: &Ipv6Gateway,
    addresses: &[InterfaceAddress],
) -> Result<Ipv6Path, String> {
    let on_device: Vec<&InterfaceAddress> = addresses
        .iter()
        .filter(|a| a.device == gateway.device)
        .collect();
    let Some(scope_id) = on_device.first().map(|a| a.ifindex) else {
        return Err(format!(
            "the IPv6 default route's next hop {} is link-local on {}, which has no IPv6 \
             address; give {} a global IPv6 address or set exposure.ipv6 = \"off\"",
            gateway.address, gateway.device, gateway.device
        ));
    };
    let (host, prefix_len) = on_device
        .iter()
        .filter(|a| a.usable_global())
        .min_by_key(|a| a.temporary())
        .map(|a| (a.address, a.prefix_len))
        .ok_or_else(|| {
            format!(
                "the IPv6 default route's next hop {} is link-local on {}, which has no \
                 usable global IPv6 address to open pinholes to; give {} a global address \
                 (from the router's prefix) or set exposure.ipv6 = \"off\"",
                gateway.address, gateway.device, gateway.device
            )
        })?;
    Ok(Ipv6Path {
        router: gateway.address,
        scope_id,
        host,
        prefix_len,
    })
}

/// Parses `/proc/net/ipv6_route`: destination, prefix length, source, source prefix length,
/// next hop, metric, reference count, use count, flags, device, the numbers as hex.
pub fn parse_ipv6_default_gateway(table: &str) -> Option<Ipv6Gateway> {
    let hex = |text: &str| u128::from_str_radix(text, 16).ok().map(Ipv6Addr::from);
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let destination = hex(fields.first()?)?;
            let length = u8::from_str_radix(fields.get(1)?, 16).ok()?;
            let next_hop = hex(fields.get(4)?)?;
            let metric = u32::from_str_radix(fields.get(5)?, 16).ok()?;
            let device = fields.get(9)?;
            (destination.is_unspecified() && length == 0 && !next_hop.is_unspecified()).then(|| {
                (
                    metric,
                    Ipv6Gateway {
                        address: next_hop,
                        device: (*device).to_owned(),
                    },
                )
            })
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gateway)| gateway)
}

/// One line of `/proc/net/if_inet6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub address: Ipv6Addr,
    pub ifindex: u32,
    /// The prefix length the address was given with (its on-link prefix).
    pub prefix_len: u8,
    /// The kernel's scope: 0x00 global, 0x20 link.
    pub scope: u8,
    /// IFA_F_* flags.
    pub flags: u32,
    pub device: String,
}

const IFA_F_TEMPORARY: u32 = 0x01;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_DEPRECATED: u32 = 0x20;
const IFA_F_TENTATIVE: u32 = 0x40;

impl InterfaceAddress {
    /// A global address the internet can reach and that stays: not unique local, not
    /// deprecated, not failed or still in duplicate address detection.
    fn usable_global(&self) -> bool {
        self.scope == 0
            && self.address.segments()[0] & 0xe000 == 0x2000
            && self.flags & (IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE) == 0
    }

    /// Privacy addresses change daily: a pinhole goes to a stable address when there is one.
    fn temporary(&self) -> bool {
        self.flags & IFA_F_TEMPORARY != 0
    }
}

/// Parses `/proc/net/if_inet6`: address, interface index, prefix length, scope, flags (hex),
/// device.
pub fn parse_if_inet6(text: &str) -> Vec<InterfaceAddress> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some(InterfaceAddress {
                address: u128::from_str_radix(fields.first()?, 16)
                    .ok()
                    .map(Ipv6Addr::from)?,
                ifindex: u32::from_str_radix(fields.get(1)?, 16).ok()?,
                prefix_len: u8::from_str_radix(fields.get(2)?, 16)
                    .ok()
                    .filter(|len| *len <= 128)?,
                scope: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                flags: u32::from_str_radix(fields.get(4)?, 16).ok()?,
                device: (*fields.get(5)?).to_owned(),
            })
        })
        .collect()
}

/// This host's IPv6 source address toward `router` (a connected UDP socket sends nothing).
fn source_address_toward(router: Ipv6Addr) -> Result<Ipv6Addr, String> {
    let error =
        |e: std::io::Error| format!("cannot find this host's IPv6 address toward {router}: {e}");
    let socket =
        UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)).map_err(error)?;
    socket
        .connect(SocketAddrV6::new(router, 9, 0, 0))
        .map_err(error)?;
    match socket.local_addr().map_err(error)? {
        std::net::SocketAddr::V6(addr) => Ok(*addr.ip()),
        std::net::SocketAddr::V4(_) => Err(format!("no IPv6 address toward {router}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_ipv6_default_route_with_the_lowest_metric() {
        let table = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8007700000000000000000001 00000400 00000001 00000000 00000003 lan0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000100 00000001 00000000 00000003 wlan0
20010db8007700000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 lan0
";
        let best = parse_ipv6_default_gateway(table).expect("a default route");
        assert_eq!(best.address, "fe80::1".parse::<Ipv6Addr>().expect("ip"));
        assert_eq!(best.device, "wlan0");
        assert!(best.is_link_local());
        let global_only = table.lines().next().unwrap_or_default();
        let global = parse_ipv6_default_gateway(global_only).expect("a default route");
        assert_eq!(
            global.address,
            "2001:db8:77::1".parse::<Ipv6Addr>().expect("ip")
        );
        assert!(!global.is_link_local());
        assert_eq!(parse_ipv6_default_gateway(""), None);
        assert_eq!(parse_ipv6_default_gateway("garbage zz\n"), None);
    }

    /// `/proc/net/if_inet6` of a host on wlan0 (index 3) with a link-local, a temporary, a
    /// stable and a unique local address, and lan0 (index 2) with another global one.
    const IF_INET6: &str = "\
fe80000000000000021122fffe334455 03 40 20 80     wlan0
20010db8007700001c2d3e4f5a6b7c8d 03 40 00 01     wlan0
fd000000000000000000000000000010 03 40 00 80     wlan0
20010db8007700000000000000000010 03 40 00 00     wlan0
20010db8005500000000000000000010 02 40 00 80      lan0
00000000000000000000000000000001 01 80 10 80        lo
";

    fn wlan_gateway() -> Ipv6Gateway {
        Ipv6Gateway {
            address: "fe80::1".parse().expect("ip"),
            device: "wlan0".to_owned(),
        }
    }

    #[test]
    fn a_link_local_router_is_asked_on_its_interface_from_the_stable_global_address() {
        let addresses = parse_if_inet6(IF_INET6);
        assert_eq!(addresses.len(), 6);
        let path = link_local_path(&wlan_gateway(), &addresses).expect("a path");
        assert_eq!(path.router, "fe80::1".parse::<Ipv6Addr>().expect("ip"));
        assert_eq!(path.scope_id, 3, "wlan0's index");
        assert_eq!(path.prefix_len, 64, "as the interface has it");
        // Not the link-local, the temporary (flag 0x01), the ULA or lan0's address.
        assert_eq!(
            path.host,
            "2001:db8:77::10".parse::<Ipv6Addr>().expect("ip")
        );
        // Only a temporary address: that one rather than none.
        let temporary_only: Vec<InterfaceAddress> = addresses
            .iter()
            .filter(|a| a.address != path.host)
            .cloned()
            .collect();
        let path = link_local_path(&wlan_gateway(), &temporary_only).expect("a path");
        assert_eq!(
            path.host,
            "2001:db8:77:0:1c2d:3e4f:5a6b:7c8d"
                .parse::<Ipv6Addr>()
                .expect("ip")
        );
    }

    /// The prefix length is the interface's, not a /64 taken for granted.
    #[test]
    fn the_prefix_length_is_read_from_the_interface() {
        let addresses = parse_if_inet6(
            "\
20010db8007700000000000000000010 03 38 00 80     wlan0
20010db8005500000000000000000010 02 40 00 80      lan0
",
        );
        let path = link_local_path(&wlan_gateway(), &addresses).expect("a path");
        assert_eq!(path.prefix_len, 0x38, "a /56 on wlan0");
        assert_eq!(
            path.relay_host(),
            RelayHost {
                address: "2001:db8:77::10".parse().expect("ip"),
                prefix_len: 56
            }
        );
        let lan0: Ipv6Addr = "2001:db8:55::10".parse().expect("ip");
        assert_eq!(prefix_len_of(lan0, &addresses), 64);
        // An address the list does not hold: the usual /64.
        let other: Ipv6Addr = "2001:db8:99::10".parse().expect("ip");
        assert_eq!(prefix_len_of(other, &addresses), 64);
        // A prefix length over 128 is no line at all.
        assert!(parse_if_inet6("20010db8007700000000000000000010 03 81 00 80 wlan0\n").is_empty());
    }

    #[test]
    fn a_link_local_router_without_a_usable_global_address_says_what_to_do() {
        let addresses = parse_if_inet6(IF_INET6);
        // The normal case works in the same run.
        assert!(link_local_path(&wlan_gateway(), &addresses).is_ok());
        // Deprecated (0x20), tentative (0x40) and ULA addresses are no source.
        let unusable = parse_if_inet6(
            "\
fe80000000000000021122fffe334455 03 40 20 80     wlan0
20010db8007700000000000000000010 03 40 00 20     wlan0
20010db8007700000000000000000011 03 40 00 40     wlan0
fd000000000000000000000000000010 03 40 00 80     wlan0
",
        );
        let error = link_local_path(&wlan_gateway(), &unusable).expect_err("no source");
        assert!(error.contains("no usable global IPv6 address"), "{error}");
        assert!(error.contains("exposure.ipv6 = \"off\""), "{error}");
        // An interface without any IPv6 address (no index known).
        let gone = Ipv6Gateway {
            device: "eth9".to_owned(),
            ..wlan_gateway()
        };
        let error = link_local_path(&gone, &addresses).expect_err("no interface");
        assert!(error.contains("eth9"), "{error}");
        assert!(parse_if_inet6("garbage\n").is_empty());
    }

    #[tokio::test]
    async fn a_link_local_router_gets_a_pcp_client_and_upnp_asks_for_the_igd_url() {
        let config = Config::default();
        let path = link_local_path(&wlan_gateway(), &parse_if_inet6(IF_INET6)).expect("a path");
        // PCP: asked at the link-local address (sends nothing until a request).
        let pcp = client_for(path, Backend::Pcp, &config)
            .await
            .expect("a PCP client");
        assert_eq!(pcp.router(), "fe80::1".parse::<Ipv6Addr>().expect("ip"));
        assert_eq!(
            pcp.host(),
            "2001:db8:77::10".parse::<Ipv6Addr>().expect("ip")
        );
        // UPnP: dialled on the interface (the lab proves it against miniupnpd); without the
        // IGD's URL it says what to set, before anything is sent.
        let error = match client_for(path, Backend::Upnp, &config).await {
            Err(error) => error,
            Ok(_) => panic!("a UPnP client without router.igd_url"),
        };
        assert!(error.contains("router.igd_url"), "{error}");
        assert!(!error.contains("link-local"), "{error}");
    }
}
