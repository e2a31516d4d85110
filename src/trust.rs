//! The trust rules of README "Security model", as pure functions over plain facts: which
//! addresses may never be a target, which ports this host (or the router, in gateway mode)
//! already serves, who holds which router port, and the tenant-safe wording of the router's
//! refusals.
//!
//! The facts about this host are gathered at the edge (`host.rs`) and passed in as
//! [`HostFacts`]; nothing here reads a socket, a file or the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{MappingKey, Owner, Protocol};
use crate::state::{MappingStatus, State};

/// What this host knows about itself and the router, for the target and shadowing rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Every address of this host's interfaces (loopback included).
    pub own_addresses: BTreeSet<IpAddr>,
    /// Broadcast addresses of this host's networks.
    pub broadcast_addresses: BTreeSet<IpAddr>,
    /// The router's addresses: its LAN address (the gateway) and its external address(es).
    pub router_addresses: BTreeSet<IpAddr>,
    /// Ports a socket listens on, on this host's wildcard or LAN address.
    pub listening: BTreeSet<(Protocol, u16)>,
}

impl HostFacts {
    /// Adds the router's LAN address and every external address the state recorded.
    pub fn with_router(mut self, gateway: Option<Ipv4Addr>, state: &State) -> HostFacts {
        self.router_addresses
            .extend(gateway.into_iter().map(IpAddr::V4));
        self.router_addresses.extend(
            state
                .mappings
                .values()
                .filter_map(|r| r.external_address)
                .map(IpAddr::V4),
        );
        self
    }
}

/// Who holds each router port: the owner of every active or pending mapping in the state.
/// A live port stays with its holder while the holder still asks for it.
pub type Holders = BTreeMap<MappingKey, Owner>;

/// The holders the state records (pending: the router may hold it already).
pub fn holders(state: &State) -> Holders {
    state
        .mappings
        .iter()
        .filter(|(_, r)| matches!(r.status, MappingStatus::Active | MappingStatus::Pending))
        .map(|(key, r)| (*key, r.owner.clone()))
        .collect()
}

/// Why an address may never be a target, whatever the config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// Loopback, link-local, multicast, broadcast, unspecified or "this network".
    Special(&'static str),
    /// One of the router's own addresses (its admin and UPnP pages live there).
    Router,
    /// One of this host's addresses (its private ports live there).
    ThisHost,
}

impl Forbidden {
    /// For the operator's log: why the address was refused.
    pub fn reason(self) -> &'static str {
        match self {
            Forbidden::Special(why) => why,
            Forbidden::Router => "it is an address of the router",
            Forbidden::ThisHost => "it is an address of the holepunch host",
        }
    }
}

/// Whether `address` may never be a target. `node_port`: the address is a Node's InternalIP
/// used with a nodePort, the one case where this host's own address is a target (a node may
/// run holepunch itself).
pub fn forbidden_target(
    address: Ipv4Addr,
    facts: &HostFacts,
    node_port: bool,
) -> Option<Forbidden> {
    let ip = IpAddr::V4(address);
    let special = if address.is_unspecified() || address.octets()[0] == 0 {
        Some("it is unspecified (0.0.0.0/8)")
    } else if address.is_loopback() {
        Some("it is a loopback address")
    } else if address.is_link_local() {
        Some("it is a link-local address")
    } else if address.is_multicast() {
        Some("it is a multicast address")
    } else if address.is_broadcast() || facts.broadcast_addresses.contains(&ip) {
        Some("it is a broadcast address")
    } else {
        None
    };
    special
        .map(Forbidden::Special)
        .or_else(|| forbidden_host(ip, facts, node_port))
}

/// Whether the IPv6 `address` may never be a target (README, "IPv6"): the rules of
/// [`forbidden_target`], and a unique local address (fc00::/7) or a site-local one
/// (fec0::/10) only when `listed` (inside `exposure.target_cidrs`).
pub fn forbidden_target6(
    address: Ipv6Addr,
    facts: &HostFacts,
    node_port: bool,
    listed: bool,
) -> Option<Forbidden> {
    let ip = IpAddr::V6(address);
    let [first, second, ..] = address.segments();
    let special = if address.is_unspecified() {
        Some("it is unspecified (::)")
    } else if address.is_loopback() {
        Some("it is a loopback address")
    } else if first & 0xffc0 == 0xfe80 {
        Some("it is a link-local address (fe80::/10)")
    } else if address.is_multicast() {
        Some("it is a multicast address")
    } else if address.to_ipv4_mapped().is_some() || (first == 0 && second == 0) {
        Some("it is an IPv4-mapped or IPv4-compatible address")
    } else if first == 0x64 && second == 0xff9b {
        // NOTE: RFC 6052 (64:ff9b::/96) and RFC 8215 (64:ff9b:1::/48) NAT64 prefixes embed
        // an IPv4 address, which may be the router's or this host's: a way around the IPv4
        // rules.
        Some("it is a NAT64 address (64:ff9b::/32)")
    } else if first & 0xfe00 == 0xfc00 && !listed {
        Some(
            "it is a unique local address (fc00::/7), a target only when listed in \
             exposure.target_cidrs",
        )
    } else if first & 0xffc0 == 0xfec0 && !listed {
        // NOTE: RFC 3879 §4 deprecates site-local addresses (fec0::/10) but lets existing
        // networks keep them: like a unique local address, one is private to a site, so a
        // load balancer or node may claim it only inside a listed network.
        Some(
            "it is a deprecated site-local address (fec0::/10), a target only when listed in \
             exposure.target_cidrs",
        )
    } else {
        None
    };
    special
        .map(Forbidden::Special)
        .or_else(|| forbidden_host(ip, facts, node_port))
}

/// The rules both address families share, once the address is not special: never the
/// router, and this host only as a node's InternalIP with a nodePort.
fn forbidden_host(ip: IpAddr, facts: &HostFacts, node_port: bool) -> Option<Forbidden> {
    if facts.router_addresses.contains(&ip) {
        Some(Forbidden::Router)
    } else if !node_port && facts.own_addresses.contains(&ip) {
        Some(Forbidden::ThisHost)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            own_addresses: ["127.0.0.1", "192.168.1.10"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            broadcast_addresses: ["192.168.1.255"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            router_addresses: ["192.168.1.1", "203.0.113.7"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            listening: BTreeSet::new(),
        }
    }

    #[test]
    fn forbidden_targets_table() {
        for (address, node_port, want) in [
            // The normal cases: a LAN device and a node.
            ("192.168.1.20", false, None),
            ("192.168.1.20", true, None),
            ("10.0.0.5", false, None),
            // This host: only as a Node's InternalIP with a nodePort.
            ("192.168.1.10", false, Some(Forbidden::ThisHost)),
            ("192.168.1.10", true, None),
            // The router, LAN side and WAN side, even as a node.
            ("192.168.1.1", false, Some(Forbidden::Router)),
            ("192.168.1.1", true, Some(Forbidden::Router)),
            ("203.0.113.7", false, Some(Forbidden::Router)),
            (
                "127.0.0.1",
                true,
                Some(Forbidden::Special("it is a loopback address")),
            ),
            (
                "127.1.2.3",
                false,
                Some(Forbidden::Special("it is a loopback address")),
            ),
            (
                "169.254.1.1",
                false,
                Some(Forbidden::Special("it is a link-local address")),
            ),
            (
                "224.0.0.1",
                false,
                Some(Forbidden::Special("it is a multicast address")),
            ),
            (
                "255.255.255.255",
                false,
                Some(Forbidden::Special("it is a broadcast address")),
            ),
            (
                "192.168.1.255",
                false,
                Some(Forbidden::Special("it is a broadcast address")),
            ),
            (
                "0.0.0.0",
                true,
                Some(Forbidden::Special("it is unspecified (0.0.0.0/8)")),
            ),
            (
                "0.1.2.3",
                false,
                Some(Forbidden::Special("it is unspecified (0.0.0.0/8)")),
            ),
        ] {
            let ip: Ipv4Addr = address.parse().expect("test address");
            assert_eq!(
                forbidden_target(ip, &facts(), node_port),
                want,
                "{address} node_port={node_port}"
            );
        }
    }

    fn facts6() -> HostFacts {
        let mut facts = facts();
        facts.own_addresses.extend(
            ["::1", "2001:db8:77::10", "fe80::10"]
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok()),
        );
        facts.router_addresses.extend(
            ["2001:db8:77::1", "2001:db8:ff::7"]
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok()),
        );
        facts
    }

    /// One row per IPv6 target that must be refused, each beside the accepted normal case.
    #[test]
    fn forbidden_ipv6_targets_table() {
        const ULA: &str = "it is a unique local address (fc00::/7), a target only when listed in exposure.target_cidrs";
        const SITE: &str = "it is a deprecated site-local address (fec0::/10), a target only when listed in exposure.target_cidrs";
        for (address, node_port, listed, want) in [
            // The normal cases: a LAN device's and a node's global address.
            ("2001:db8:77::30", false, false, None),
            ("2001:db8:77::20", true, false, None),
            // The router, LAN side and WAN side, even as a node.
            ("2001:db8:77::1", false, false, Some(Forbidden::Router)),
            ("2001:db8:77::1", true, false, Some(Forbidden::Router)),
            ("2001:db8:ff::7", false, false, Some(Forbidden::Router)),
            // This host: only as a Node's InternalIP with a nodePort.
            ("2001:db8:77::10", false, false, Some(Forbidden::ThisHost)),
            ("2001:db8:77::10", true, false, None),
            (
                "::1",
                true,
                true,
                Some(Forbidden::Special("it is a loopback address")),
            ),
            (
                "fe80::20",
                true,
                true,
                Some(Forbidden::Special("it is a link-local address (fe80::/10)")),
            ),
            (
                "febf::1",
                false,
                true,
                Some(Forbidden::Special("it is a link-local address (fe80::/10)")),
            ),
            (
                "ff02::1",
                false,
                true,
                Some(Forbidden::Special("it is a multicast address")),
            ),
            (
                "::",
                true,
                true,
                Some(Forbidden::Special("it is unspecified (::)")),
            ),
            (
                "::ffff:192.168.1.1",
                false,
                true,
                Some(Forbidden::Special(
                    "it is an IPv4-mapped or IPv4-compatible address",
                )),
            ),
            // Unique local: refused unless listed in target_cidrs, then accepted.
            ("fd00:77::20", true, false, Some(Forbidden::Special(ULA))),
            ("fc00::20", false, false, Some(Forbidden::Special(ULA))),
            ("fd00:77::20", true, true, None),
            // Site-local (deprecated, RFC 3879): refused unless listed, then accepted.
            ("fec0::1", false, false, Some(Forbidden::Special(SITE))),
            ("feff::1", true, false, Some(Forbidden::Special(SITE))),
            ("fec0::1", false, true, None),
            ("fec0:77::20", true, true, None),
            (
                "64:ff9b::c0a8:101",
                true,
                false,
                Some(Forbidden::Special("it is a NAT64 address (64:ff9b::/32)")),
            ),
        ] {
            let ip: Ipv6Addr = address.parse().expect("test address");
            assert_eq!(
                forbidden_target6(ip, &facts6(), node_port, listed),
                want,
                "{address} node_port={node_port} listed={listed}"
            );
        }
    }

    #[test]
    fn holders_are_active_and_pending_records_only() {
        use crate::model::Endpoint;
        use crate::state::MappingRecord;
        let mut state = State::default();
        for (port, status) in [
            (8080, MappingStatus::Active),
            (8081, MappingStatus::Pending),
            (8082, MappingStatus::Failed),
        ] {
            let mut record = MappingRecord::leftover(
                Owner::new("a", "web"),
                MappingKey {
                    protocol: Protocol::Tcp,
                    external_port: port,
                },
                Endpoint::new(Ipv4Addr::new(192, 168, 1, 10), port),
                crate::model::Backend::Pcp,
            );
            record.status = status;
            state.mappings.insert(record.key(), record);
        }
        let ports: Vec<u16> = holders(&state).keys().map(|k| k.external_port).collect();
        assert_eq!(ports, [8080, 8081]);
    }
}
