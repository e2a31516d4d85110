//! Local nftables rules for the `relay` and `gateway` exposure modes (README.md, "How traffic
//! flows"): one table, `inet holepunch`, owned by holepunch and written over netlink with
//! nftnl + mnl (never by running `nft`).
//!
//! The data path is a map, as kube-proxy's nftables mode does it: one DNAT rule looks
//! `address . protocol . port` up in a map, so a packet costs one lookup whatever the number
//! of forwards. Every [`NftFirewall::apply`] is one atomic transaction that replaces the table
//! with exactly the wanted ruleset (`add table; delete table; add table ...`, as `nft -f`
//! scripts do): packets see the old or the new ruleset, never a gap, and connections already
//! NATed keep their conntrack entries. Other tables are never touched.
//!
//! The relay DNAT catches only what the router forwards (README.md, "Security model: traffic
//! and the router"): packets that arrive on the interface toward the router from outside its
//! LAN prefixes, or from the router itself (hairpinned LAN traffic the router NATs to its own
//! address). LAN hosts, pods (other interfaces) and this host (output, not prerouting) that
//! connect to the relay address keep reaching what listens there. Still one rule and one map
//! lookup per packet: the source test is one or two `range` comparisons, not a set.
//!
//! Building blocks: `expr` (expressions with explicit registers), `map` (maps with data,
//! which the nftnl crate lacks), `netlink` (one `sendmsg` per batch, every ack read), `lan`
//! (the relay host's interface toward the router and its prefixes).

mod expr;
pub mod firewall;
mod lan;
mod map;
pub mod netlink;

pub use firewall::{Firewall, FirewallError, LocalRules, MemoryFirewall};

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

use crate::model::{Endpoint, Endpoint6, Protocol};
use crate::pinholes::RelayHost;
use crate::plan::Forwarding;
use crate::state::{MappingRecord, State};
use expr::{REG_1, REG32_00, RawExpr};
use lan::{LanSide, excluded_sources};
use map::{GATEWAY_SHAPE, Map, MapShape, RELAY_SHAPE};
use netlink::{NetfilterSocket, NetlinkError};

/// The one table holepunch owns.
pub const TABLE_NAME: &str = "holepunch";
const TABLE: &CStr = c"holepunch";
/// Relay map: `ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service`.
pub const RELAY_MAP: &str = "targets4";
/// IPv6 relay map: `ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service`.
pub const RELAY6_MAP: &str = "targets6";
/// Gateway map: `inet_proto . inet_service : ipv4_addr . inet_service`.
pub const GATEWAY_MAP: &str = "gateway4";
/// IPv6 gateway map (README, "IPv6"): `ipv6_addr . inet_proto . inet_service : ipv6_addr .
/// inet_service`, the published address and port to the target.
pub const GATEWAY6_MAP: &str = "gateway6";
/// The conntrack mark bit set on connections to a published IPv6 target in gateway mode. An
/// accept in holepunch's table does not override another table's drop (each base chain on a
/// hook judges the packet), so the host's own forward chain accepts this bit (README, "IPv6":
/// `ct mark and 0x02000000 != 0 accept`).
pub const PUBLISHED6_CT_MARK: u32 = 0x0200_0000;
/// Netfilter priority `filter` (NF_IP_PRI_FILTER).
const PRIORITY_FILTER: i32 = 0;
/// The conntrack mark bit set on connections holepunch DNATs in relay mode; only those are
/// masqueraded, so the host's other forwarded traffic keeps its source address. Other bits
/// of the mark are kept (`ct mark set ct mark | bit`).
pub const RELAYED_CT_MARK: u32 = 0x0100_0000;
/// Netfilter priorities `dstnat` and `srcnat` (NF_IP_PRI_NAT_DST / NF_IP_PRI_NAT_SRC).
const PRIORITY_DSTNAT: i32 = -100;
const PRIORITY_SRCNAT: i32 = 100;
/// The longest interface name the kernel accepts (IFNAMSIZ without the NUL).
const INTERFACE_NAME_MAX_BYTES: usize = 15;
const MAP_ID: u32 = 1;
const MAP6_ID: u32 = 2;
const IP_FORWARD_PATH: &str = "/proc/sys/net/ipv4/ip_forward";

/// One forwarded port: packets for `protocol` `port` go to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Forward {
    pub protocol: Protocol,
    pub port: u16,
    pub target: Endpoint,
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} -> {}", self.port, self.protocol, self.target)
    }
}

/// One forwarded IPv6 port (README, "IPv6"): packets for `protocol` `port` to the relay
/// address go to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Forward6 {
    pub protocol: Protocol,
    pub port: u16,
    pub target: Endpoint6,
}

impl fmt::Display for Forward6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} -> {}", self.port, self.protocol, self.target)
    }
}

/// The IPv6 side of relay mode: the router's pinholes open `host` (this host's global
/// address), and the DNAT forwards each port on to its target. Sources inside `host`'s
/// on-link prefix (`prefix_len`, as the interface has it) are left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay6 {
    pub host: Ipv6Addr,
    pub prefix_len: u8,
    pub forwards: Vec<Forward6>,
}

/// What the table holds, for one exposure mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ruleset {
    /// relay: DNAT lan_address:port -> target for packets the router forwards (arriving on
    /// the interface of `lan_address` from outside its LAN prefixes, or from `router`),
    /// masquerade only holepunch's own connections
    Relay {
        lan_address: Ipv4Addr,
        /// The router's LAN address: its forwards and hairpinned traffic come from it. `None`
        /// (unknown): every source on the LAN prefixes is left alone.
        router: Option<Ipv4Addr>,
        forwards: Vec<Forward>,
        /// The pinholes' forwards, when there are any.
        ipv6: Option<Relay6>,
    },
    /// gateway: DNAT on wan_interface, port -> target, client source address kept
    Gateway {
        wan_interface: String,
        forwards: Vec<Forward>,
        /// Published IPv6 targets: each on its own address at the external `port`, marked
        /// and accepted (DNAT only where the target's port differs).
        forwards6: Vec<Forward6>,
    },
}

impl Ruleset {
    /// What the table must hold for the mappings recorded in `state`, in the exposure mode
    /// `forwarding`: relay forwards this host's port (the router's mapping lands there) to the
    /// target, gateway forwards the external port arriving on `wan_interface`. `None` in
    /// direct mode, which needs no local rules. `router`: the router's LAN address (relay).
    /// `relay_host`: this host's IPv6 relay address and prefix as found this pass (relay:
    /// only the pinholes that open it are forwarded).
    pub fn for_state(
        forwarding: Forwarding,
        wan_interface: Option<&str>,
        router: Option<Ipv4Addr>,
        relay_host: Option<RelayHost>,
        state: &State,
    ) -> Option<Ruleset> {
        let forward = |record: &MappingRecord, port| Forward {
            protocol: record.protocol,
            port,
            target: record.target,
        };
        match forwarding {
            Forwarding::Direct => None,
            Forwarding::Relay { lan_address } => Some(Ruleset::Relay {
                lan_address,
                router,
                forwards: state
                    .mappings
                    .values()
                    .map(|r| forward(r, r.internal.port))
                    .collect(),
                ipv6: relay_host.and_then(|host| relay6(state, host)),
            }),
            Forwarding::Gateway => Some(Ruleset::Gateway {
                wan_interface: wan_interface.unwrap_or_default().to_owned(),
                forwards: state
                    .mappings
                    .values()
                    .map(|r| forward(r, r.external_port))
                    .collect(),
                // Gateway pinholes open the target's own address on the external port.
                forwards6: state
                    .pinholes
                    .values()
                    .filter(|r| r.address == r.target_address)
                    .map(|r| Forward6 {
                        protocol: r.protocol,
                        port: r.port,
                        target: r.target(),
                    })
                    .collect(),
            }),
        }
    }

    /// The IPv6 forwards (relay mode with pinholes, gateway mode's published IPv6 targets).
    pub fn forwards6(&self) -> &[Forward6] {
        match self {
            Ruleset::Relay {
                ipv6: Some(relay6), ..
            } => &relay6.forwards,
            Ruleset::Gateway { forwards6, .. } => forwards6,
            Ruleset::Relay { ipv6: None, .. } => &[],
        }
    }

    pub fn forwards(&self) -> &[Forward] {
        match self {
            Ruleset::Relay { forwards, .. } | Ruleset::Gateway { forwards, .. } => forwards,
        }
    }
}

/// The IPv6 relay forwards of the pinholes in `state` that open this host's relay address
/// `host` (found from the interface every pass, not from the records: after a new address or
/// prefix, the pinholes of the former one are being closed and get no forward); `None`
/// without pinholes.
fn relay6(state: &State, host: RelayHost) -> Option<Relay6> {
    if state.pinholes.is_empty() {
        return None;
    }
    let RelayHost {
        address: host,
        prefix_len,
    } = host;
    let forwards = state
        .pinholes
        .values()
        // A target on this host (its own node's nodePort) is forwarded too, to its port; only
        // a pinhole that already opens its target needs no rule.
        .filter(|r| r.address == host && r.target() != r.opens())
        .map(|r| Forward6 {
            protocol: r.protocol,
            port: r.port,
            target: r.target(),
        })
        .collect();
    Some(Relay6 {
        host,
        prefix_len,
        forwards,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "wan_interface {0:?} is not an interface name (1 to 15 bytes, no '/', ':' or \
         whitespace); set [exposure] wan_interface to the router's WAN interface, e.g. eth0"
    )]
    InterfaceName(String),
    #[error(
        "no interface of this host holds the relay address {address}; set exposure.lan_address \
         to this host's address toward the router (the router forwards to it)"
    )]
    LanInterface { address: Ipv4Addr },
    #[error("cannot list this host's interfaces to find the one toward the router")]
    ReadInterfaces(#[source] io::Error),
    #[error("cannot talk to the kernel's nftables over netlink")]
    Connect(#[source] NetlinkError),
    #[error(
        "the kernel did not apply table inet {TABLE_NAME}; the previous ruleset stays in place \
         (a batch is all or nothing). 'File exists' means two forwards share a protocol and port"
    )]
    Apply(#[source] NetlinkError),
    #[error("cannot read table inet {TABLE_NAME} back from the kernel")]
    ReadBack(#[source] NetlinkError),
    #[error(
        "table inet {TABLE_NAME} holds other forwards than were applied (expected {expected:?}, \
         found {found:?}); is another program changing it?"
    )]
    Verify {
        expected: Vec<Forward>,
        found: Vec<Forward>,
    },
    #[error(
        "table inet {TABLE_NAME} holds other rules than were applied (one per chain expected, \
         by chain: expected {expected:?}, found {found:?}); is another program changing it?"
    )]
    VerifyRules {
        expected: Vec<String>,
        found: Vec<String>,
    },
    #[error(
        "table inet {TABLE_NAME} holds other IPv6 forwards than were applied (expected \
         {expected:?}, found {found:?}); is another program changing it?"
    )]
    Verify6 {
        expected: Vec<Forward6>,
        found: Vec<Forward6>,
    },
    #[error("map {map} holds an element holepunch did not write (key {key:02x?})")]
    ForeignElement { map: &'static str, key: Vec<u8> },
    #[error("cannot delete table inet {TABLE_NAME}")]
    Remove(#[source] NetlinkError),
    #[error("cannot read {IP_FORWARD_PATH} to check IPv4 forwarding")]
    ReadForwarding(#[source] io::Error),
    #[error(
        "IPv4 forwarding is off, so relay and gateway cannot forward traffic: set \
         net.ipv4.ip_forward=1 (sysctl -w net.ipv4.ip_forward=1, and in /etc/sysctl.d/ to keep \
         it across reboots)"
    )]
    ForwardingDisabled,
}

/// The nftables firewall of this host's (the calling thread's) network namespace.
/// Synchronous: netlink sockets block; call it from `spawn_blocking`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NftFirewall;

impl NftFirewall {
    /// One atomic batch: table `inet holepunch`, chains, rules, map elements = exactly
    /// `ruleset`. Re-applying the same ruleset does not disturb live connections (a single
    /// transaction has no gap; conntrack keeps existing flows). Then reads the map and the
    /// rules back and verifies the map holds exactly the ruleset's forwards and each chain
    /// its rules (their count; their expressions are checked by the tests against `nft -j`).
    pub fn apply(&self, ruleset: &Ruleset) -> Result<(), NftError> {
        let lan = match ruleset {
            Ruleset::Relay { lan_address, .. } => Some(
                LanSide::find(*lan_address)
                    .map_err(NftError::ReadInterfaces)?
                    .ok_or(NftError::LanInterface {
                        address: *lan_address,
                    })?,
            ),
            Ruleset::Gateway { .. } => None,
        };
        let plan = plan(ruleset, lan.as_ref())?;
        let mut socket = NetfilterSocket::open().map_err(NftError::Connect)?;
        socket
            .run_batch(&build_batch(&plan))
            .map_err(NftError::Apply)?;
        let mut expected: Vec<Forward> = ruleset.forwards().to_vec();
        expected.sort();
        expected.dedup();
        let mut found = read_map(&mut socket, plan.map)?.unwrap_or_default();
        found.sort();
        if found != expected {
            return Err(NftError::Verify { expected, found });
        }
        if !plan.elements6.is_empty() {
            let mut expected: Vec<Forward6> = ruleset.forwards6().to_vec();
            expected.sort();
            expected.dedup();
            let mut found = read_map6(&mut socket, plan.map6)?;
            found.sort();
            if found != expected {
                return Err(NftError::Verify6 { expected, found });
            }
        }
        let expected_rules: Vec<String> = plan
            .chains
            .iter()
            .flat_map(|chain| {
                let name = chain.name.to_string_lossy().into_owned();
                std::iter::repeat_n(name, chain.rules.len())
            })
            .collect();
        let found_rules = socket
            .dump_rule_chains(libc::NFPROTO_INET as u8, TABLE_NAME)
            .map_err(NftError::ReadBack)?
            .unwrap_or_default();
        if found_rules != expected_rules {
            return Err(NftError::VerifyRules {
                expected: expected_rules,
                found: found_rules,
            });
        }
        if matches!(ruleset, Ruleset::Gateway { .. }) && !plan.elements6.is_empty() {
            // The host's own firewall decides too (README, "IPv6"): say which of its chains
            // would drop what holepunch accepts. A failed look is only logged.
            match hosts_blocking_forward_chains(&mut socket) {
                Ok(blocking) => {
                    for chain in blocking {
                        tracing::warn!(chain = %chain,
                            "IPv6 gateway: the host's firewall chain {chain} on the forward hook \
                             drops traffic and accepts no connection marked by holepunch, so \
                             published IPv6 targets stay unreachable: add `ct mark and \
                             0x02000000 != 0 accept` to it before its drop (README, \"IPv6\")");
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot list the host's other nftables chains")
                }
            }
        }
        Ok(())
    }

    /// The host's forward chains that would drop what the IPv6 gateway accepts (see
    /// [`blocking_forward_chains`]), read from the kernel; `apply` logs them.
    pub fn blocking_forward_chains(&self) -> Result<Vec<String>, NftError> {
        let mut socket = NetfilterSocket::open().map_err(NftError::ReadBack)?;
        hosts_blocking_forward_chains(&mut socket).map_err(NftError::ReadBack)
    }

    /// The forwards the kernel holds now in holepunch's maps (read back over netlink), sorted.
    /// Empty when the table does not exist.
    pub fn current(&self) -> Result<Vec<Forward>, NftError> {
        let mut socket = NetfilterSocket::open().map_err(NftError::ReadBack)?;
        let mut forwards = Vec::new();
        for kind in [MapKind::Relay, MapKind::Gateway] {
            forwards.extend(read_map(&mut socket, kind)?.unwrap_or_default());
        }
        forwards.sort();
        Ok(forwards)
    }

    /// Delete table inet holepunch (absent = Ok(false)). Other tables are never touched.
    pub fn remove(&self) -> Result<bool, NftError> {
        let table = Table::new(TABLE, ProtoFamily::Inet);
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Del);
        let mut socket = NetfilterSocket::open().map_err(NftError::Remove)?;
        match socket.run_batch(&batch.finalize()) {
            Ok(()) => Ok(true),
            Err(NetlinkError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(err) => Err(NftError::Remove(err)),
        }
    }
}

/// The host's own base chains on the forward hook (IPv6: families `ip6` and `inet`, other
/// than holepunch's table) that drop, by policy or by a rule, and have no rule that reads the
/// conntrack mark: an accept in holepunch's table does not override their drop, so published
/// IPv6 targets stay unreachable in gateway mode until the operator accepts
/// [`PUBLISHED6_CT_MARK`] there (README, "IPv6"). As `<family> <table> <chain>`. The rules of
/// the chains a base chain jumps or goes to (and theirs) count as its own; the order of the
/// rules is not looked at.
pub(crate) fn blocking_forward_chains(
    chains: &[netlink::ChainInfo],
    rules: &[netlink::RuleInfo],
) -> Vec<String> {
    const NF_INET_FORWARD: u32 = libc::NF_INET_FORWARD as u32;
    let ipv6 = [libc::NFPROTO_IPV6 as u8, libc::NFPROTO_INET as u8];
    chains
        .iter()
        .filter(|c| c.hook == Some(NF_INET_FORWARD) && ipv6.contains(&c.family))
        .filter(|c| !(c.family == libc::NFPROTO_INET as u8 && c.table == TABLE_NAME))
        .filter(|c| {
            let reached = reached_rules(c, rules);
            let drops =
                c.policy == Some(libc::NF_DROP as u32) || reached.iter().any(|rule| rule.drops);
            drops && !reached.iter().any(|rule| rule.ct_mark)
        })
        .map(|c| {
            let family = if c.family == libc::NFPROTO_INET as u8 {
                "inet"
            } else {
                "ip6"
            };
            format!("{family} {} {}", c.table, c.name)
        })
        .collect()
}

/// [`blocking_forward_chains`] of every table in the socket's namespace.
fn hosts_blocking_forward_chains(
    socket: &mut NetfilterSocket,
) -> Result<Vec<String>, NetlinkError> {
    let chains = socket.dump_all_chains()?;
    let rules = socket.dump_all_rules()?;
    Ok(blocking_forward_chains(&chains, &rules))
}

/// The rules a packet in `base` may meet: its own and those of every chain of its table it
/// jumps or goes to, followed through (each chain once, so a loop ends).
fn reached_rules<'a>(
    base: &netlink::ChainInfo,
    rules: &'a [netlink::RuleInfo],
) -> Vec<&'a netlink::RuleInfo> {
    let mut seen = std::collections::BTreeSet::from([base.name.as_str()]);
    let mut next = vec![base.name.as_str()];
    let mut reached = Vec::new();
    while let Some(chain) = next.pop() {
        for rule in rules
            .iter()
            .filter(|r| r.family == base.family && r.table == base.table && r.chain == chain)
        {
            reached.push(rule);
            for target in &rule.jumps {
                if seen.insert(target.as_str()) {
                    next.push(target.as_str());
                }
            }
        }
    }
    reached
}

/// ip_forward check for relay/gateway: a clear error saying which sysctl to set.
pub fn check_forwarding() -> Result<(), NftError> {
    forwarding_enabled(Path::new(IP_FORWARD_PATH))
}

fn forwarding_enabled(path: &Path) -> Result<(), NftError> {
    let value = std::fs::read_to_string(path).map_err(NftError::ReadForwarding)?;
    if value.trim() == "1" {
        Ok(())
    } else {
        Err(NftError::ForwardingDisabled)
    }
}

/// Which of holepunch's maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MapKind {
    Relay,
    Gateway,
}

impl MapKind {
    fn name(self) -> &'static str {
        match self {
            MapKind::Relay => RELAY_MAP,
            MapKind::Gateway => GATEWAY_MAP,
        }
    }

    fn c_name(self) -> &'static CStr {
        match self {
            MapKind::Relay => c"targets4",
            MapKind::Gateway => c"gateway4",
        }
    }

    fn shape(self) -> MapShape {
        match self {
            MapKind::Relay => RELAY_SHAPE,
            MapKind::Gateway => GATEWAY_SHAPE,
        }
    }
}

fn read_map(socket: &mut NetfilterSocket, kind: MapKind) -> Result<Option<Vec<Forward>>, NftError> {
    let family = libc::NFPROTO_INET as u8;
    let Some(elements) = socket
        .dump_elements(family, TABLE_NAME, kind.name())
        .map_err(NftError::ReadBack)?
    else {
        return Ok(None);
    };
    elements
        .into_iter()
        .map(|(key, data)| {
            decode_element(kind, &key, &data).ok_or(NftError::ForeignElement {
                map: kind.name(),
                key,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The IPv6 forwards the kernel holds in map `name` (none without the map).
fn read_map6(socket: &mut NetfilterSocket, name: &'static str) -> Result<Vec<Forward6>, NftError> {
    let family = libc::NFPROTO_INET as u8;
    let Some(elements) = socket
        .dump_elements(family, TABLE_NAME, name)
        .map_err(NftError::ReadBack)?
    else {
        return Ok(Vec::new());
    };
    elements
        .into_iter()
        .map(|(key, data)| {
            map::decode_relay6(&key, &data)
                .map(|(protocol, port, address, target_port)| Forward6 {
                    protocol,
                    port,
                    target: Endpoint6::new(address, target_port),
                })
                .ok_or(NftError::ForeignElement { map: name, key })
        })
        .collect()
}

fn decode_element(kind: MapKind, key: &[u8], data: &[u8]) -> Option<Forward> {
    let (protocol, port) = match kind {
        MapKind::Relay => map::decode_relay_key(key).map(|(_, protocol, port)| (protocol, port))?,
        MapKind::Gateway => map::decode_gateway_key(key)?,
    };
    let (address, target_port) = map::decode_target(data)?;
    Some(Forward {
        protocol,
        port,
        target: Endpoint::new(address, target_port),
    })
}

/// A base chain and its rules, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainPlan {
    name: &'static CStr,
    /// `filter` rather than `nat`.
    filter: bool,
    hook: Hook,
    priority: i32,
    rules: Vec<Vec<RawExpr>>,
}

/// Everything the table will hold, as data: the pure half of [`NftFirewall::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct TablePlan {
    map: MapKind,
    elements: Vec<(Vec<u8>, Vec<u8>)>,
    /// The IPv6 map's elements (relay with pinholes, gateway with published IPv6 targets; the
    /// map exists only then).
    elements6: Vec<(Vec<u8>, Vec<u8>)>,
    /// The IPv6 map's name: `targets6` (relay) or `gateway6`.
    map6: &'static str,
    chains: Vec<ChainPlan>,
}

const R0: u32 = REG32_00;
const R1: u32 = REG32_00 + 1;
const R2: u32 = REG32_00 + 2;
const R4: u32 = REG32_00 + 4;

fn nfproto_ipv4() -> [RawExpr; 2] {
    [
        expr::meta(libc::NFT_META_NFPROTO, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, &[libc::NFPROTO_IPV4 as u8]),
    ]
}

/// `th dport`: TCP and UDP both carry the destination port at offset 2.
fn transport_dport(dreg: u32) -> RawExpr {
    expr::payload(libc::NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, dreg)
}

/// The tests of a relay DNAT before its lookup: the packet came in on the interface toward
/// the router, and not from another LAN host (`ip saddr != <range>` for each range that
/// [`excluded_sources`] leaves out; the router itself is let through).
fn from_the_router(lan: &LanSide, router: Option<Ipv4Addr>) -> Result<Vec<RawExpr>, NftError> {
    let name = interface_name(&lan.interface)?;
    let mut exprs = vec![
        expr::meta(libc::NFT_META_IIFNAME, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, &name),
        // ip saddr
        expr::payload(libc::NFT_PAYLOAD_NETWORK_HEADER, 12, 4, REG_1),
    ];
    for (from, to) in excluded_sources(&lan.prefixes, router) {
        exprs.push(if from == to {
            expr::cmp(libc::NFT_CMP_NEQ, REG_1, &from.octets())
        } else {
            expr::range(libc::NFT_RANGE_NEQ, REG_1, &from.octets(), &to.octets())
        });
    }
    Ok(exprs)
}

/// The IPv6 relay DNAT: `meta nfproto ipv6 iifname <lan> ip6 saddr != <host's prefix> ip6
/// daddr . meta l4proto . th dport` looked up in `targets6`, marked, DNAT to the target. The
/// router forwards nothing over IPv6 (no NAT loopback), so only sources outside the host's
/// on-link prefix (its length as the interface has it) are the internet's (README,
/// "Security model": the DNAT catches only what comes through the router; LAN hosts and this
/// host keep reaching what listens on the address).
fn dnat6(lan: &LanSide, relay6: &Relay6) -> Result<Vec<RawExpr>, NftError> {
    let name = interface_name(&lan.interface)?;
    let net = ipnet::Ipv6Net::new(relay6.host, relay6.prefix_len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| ipnet::Ipv6Net::from(relay6.host));
    let mut exprs = vec![
        expr::meta(libc::NFT_META_NFPROTO, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, &[libc::NFPROTO_IPV6 as u8]),
        expr::meta(libc::NFT_META_IIFNAME, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, &name),
        // ip6 saddr
        expr::payload(libc::NFT_PAYLOAD_NETWORK_HEADER, 8, 16, REG_1),
        expr::range(
            libc::NFT_RANGE_NEQ,
            REG_1,
            &net.network().octets(),
            &net.broadcast().octets(),
        ),
    ];
    exprs.extend(lookup_mark_dnat6(c"targets6", RELAYED_CT_MARK));
    Ok(exprs)
}

/// The tail of an IPv6 DNAT rule: `ip6 daddr . meta l4proto . th dport` looked up in `map`,
/// `ct mark set ct mark | mark`, DNAT to the element's address and port.
fn lookup_mark_dnat6(map: &CStr, mark: u32) -> [RawExpr; 8] {
    const R5: u32 = REG32_00 + 5;
    const R8: u32 = REG32_00 + 8;
    [
        // ip6 daddr . meta l4proto . th dport -> R0..R5; found: addr -> R0..R3, port -> R4
        expr::payload(libc::NFT_PAYLOAD_NETWORK_HEADER, 24, 16, R0),
        expr::meta(libc::NFT_META_L4PROTO, R4),
        transport_dport(R5),
        expr::map_lookup(map, MAP6_ID, R0, R0),
        expr::ct_load(libc::NFT_CT_MARK, R8),
        expr::bitwise(R8, &(!mark).to_ne_bytes(), &mark.to_ne_bytes()),
        expr::ct_set(libc::NFT_CT_MARK, R8),
        expr::dnat_ipv6(R0, R4),
    ]
}

/// The IPv6 gateway rule (README, "IPv6"): `iifname <wan> meta nfproto ipv6 ip6 daddr . meta
/// l4proto . th dport` looked up in `gateway6` (a published target's own address and the
/// external port), the connection marked [`PUBLISHED6_CT_MARK`], then DNAT to the target.
// NOTE: a nat chain sees only a connection's first packet, and the mark stays on the
// conntrack entry. Where the target's port is the external one, the DNAT's tuple equals the
// packet's and the kernel leaves it untranslated (nf_nat_setup_info sets no NAT status for an
// unchanged tuple), so only a changed port is translated.
fn gateway_dnat6(wan: &[u8; INTERFACE_NAME_MAX_BYTES + 1]) -> Vec<RawExpr> {
    let mut exprs = vec![
        expr::meta(libc::NFT_META_IIFNAME, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, wan),
        expr::meta(libc::NFT_META_NFPROTO, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, &[libc::NFPROTO_IPV6 as u8]),
    ];
    exprs.extend(lookup_mark_dnat6(c"gateway6", PUBLISHED6_CT_MARK));
    exprs
}

/// The IPv6 gateway's accept: `iifname <wan> meta nfproto ipv6 ct mark and 0x02000000 != 0
/// accept`. It decides holepunch's chain only: the host's own forward chain must accept the
/// same mark (README, "IPv6").
fn gateway_accept6(wan: &[u8; INTERFACE_NAME_MAX_BYTES + 1]) -> Vec<RawExpr> {
    vec![
        expr::meta(libc::NFT_META_IIFNAME, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, wan),
        expr::meta(libc::NFT_META_NFPROTO, REG_1),
        expr::cmp(libc::NFT_CMP_EQ, REG_1, &[libc::NFPROTO_IPV6 as u8]),
        expr::ct_load(libc::NFT_CT_MARK, REG_1),
        expr::bitwise(REG_1, &PUBLISHED6_CT_MARK.to_ne_bytes(), &[0; 4]),
        expr::cmp(libc::NFT_CMP_NEQ, REG_1, &[0; 4]),
        expr::accept(),
    ]
}

/// `lan`: the relay host's LAN side (relay only; found by [`NftFirewall::apply`]).
fn plan(ruleset: &Ruleset, lan: Option<&LanSide>) -> Result<TablePlan, NftError> {
    let mut forwards = ruleset.forwards().to_vec();
    forwards.sort();
    forwards.dedup();
    match ruleset {
        Ruleset::Relay {
            lan_address,
            router,
            ipv6,
            ..
        } => {
            let lan = lan.ok_or(NftError::LanInterface {
                address: *lan_address,
            })?;
            let kind = MapKind::Relay;
            let elements = forwards
                .iter()
                .map(|f| {
                    let key = map::relay_key(*lan_address, f.protocol, f.port);
                    (key, map::target_data(f.target.address, f.target.port))
                })
                .collect();
            // ip daddr . meta l4proto . th dport -> R0..R2; found: addr -> R0, port -> R1
            let mut dnat: Vec<RawExpr> = nfproto_ipv4().into();
            dnat.extend(from_the_router(lan, *router)?);
            dnat.extend([
                expr::payload(libc::NFT_PAYLOAD_NETWORK_HEADER, 16, 4, R0),
                expr::meta(libc::NFT_META_L4PROTO, R1),
                transport_dport(R2),
                expr::map_lookup(kind.c_name(), MAP_ID, R0, R0),
                // NOTE: nft 1.0.6 lists this rule as `ct mark set ct mark | 0x01000000 dnat
                // ip to ... map @targets4`, but the mark is set only after the lookup found
                // the key (a miss ends the rule), and before the DNAT, which is terminal.
                expr::ct_load(libc::NFT_CT_MARK, R4),
                expr::bitwise(
                    R4,
                    &(!RELAYED_CT_MARK).to_ne_bytes(),
                    &RELAYED_CT_MARK.to_ne_bytes(),
                ),
                expr::ct_set(libc::NFT_CT_MARK, R4),
                expr::dnat_ipv4(R0, R1),
            ]);
            let mut prerouting = vec![dnat];
            let mut elements6 = Vec::new();
            if let Some(relay6) = ipv6.as_ref().filter(|r| !r.forwards.is_empty()) {
                let mut forwards6 = relay6.forwards.clone();
                forwards6.sort();
                forwards6.dedup();
                elements6 = forwards6
                    .iter()
                    .map(|f| {
                        (
                            map::relay6_key(relay6.host, f.protocol, f.port),
                            map::target6_data(f.target.address, f.target.port),
                        )
                    })
                    .collect();
                prerouting.push(dnat6(lan, relay6)?);
            }
            let masquerade = vec![
                expr::ct_load(libc::NFT_CT_MARK, REG_1),
                expr::bitwise(REG_1, &RELAYED_CT_MARK.to_ne_bytes(), &[0; 4]),
                expr::cmp(libc::NFT_CMP_NEQ, REG_1, &[0; 4]),
                expr::masquerade(),
            ];
            Ok(TablePlan {
                map: kind,
                elements,
                elements6,
                map6: RELAY6_MAP,
                chains: vec![
                    ChainPlan {
                        name: c"prerouting",
                        filter: false,
                        hook: Hook::PreRouting,
                        priority: PRIORITY_DSTNAT,
                        rules: prerouting,
                    },
                    ChainPlan {
                        name: c"postrouting",
                        filter: false,
                        hook: Hook::PostRouting,
                        priority: PRIORITY_SRCNAT,
                        rules: vec![masquerade],
                    },
                ],
            })
        }
        Ruleset::Gateway {
            wan_interface,
            forwards6,
            ..
        } => {
            let name = interface_name(wan_interface)?;
            let kind = MapKind::Gateway;
            let elements = forwards
                .iter()
                .map(|f| {
                    let key = map::gateway_key(f.protocol, f.port);
                    (key, map::target_data(f.target.address, f.target.port))
                })
                .collect();
            let mut dnat = vec![
                expr::meta(libc::NFT_META_IIFNAME, REG_1),
                expr::cmp(libc::NFT_CMP_EQ, REG_1, &name),
            ];
            dnat.extend(nfproto_ipv4());
            dnat.extend([
                expr::meta(libc::NFT_META_L4PROTO, R0),
                transport_dport(R1),
                expr::map_lookup(kind.c_name(), MAP_ID, R0, R0),
                expr::dnat_ipv4(R0, R1),
            ]);
            let mut chains = vec![ChainPlan {
                name: c"prerouting",
                filter: false,
                hook: Hook::PreRouting,
                priority: PRIORITY_DSTNAT,
                rules: vec![dnat],
            }];
            let mut forwards6 = forwards6.clone();
            forwards6.sort();
            forwards6.dedup();
            let elements6: Vec<_> = forwards6
                .iter()
                .map(|f| {
                    (
                        map::relay6_key(f.target.address, f.protocol, f.port),
                        map::target6_data(f.target.address, f.target.port),
                    )
                })
                .collect();
            if !elements6.is_empty() {
                chains[0].rules.push(gateway_dnat6(&name));
                chains.push(ChainPlan {
                    name: c"forward",
                    filter: true,
                    hook: Hook::Forward,
                    priority: PRIORITY_FILTER,
                    rules: vec![gateway_accept6(&name)],
                });
            }
            Ok(TablePlan {
                map: kind,
                elements,
                elements6,
                map6: GATEWAY6_MAP,
                chains,
            })
        }
    }
}

/// The interface name as `meta iifname` holds it: zero-padded to IFNAMSIZ.
fn interface_name(name: &str) -> Result<[u8; INTERFACE_NAME_MAX_BYTES + 1], NftError> {
    let valid = !name.is_empty()
        && name.len() <= INTERFACE_NAME_MAX_BYTES
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if !valid {
        return Err(NftError::InterfaceName(name.to_owned()));
    }
    let mut out = [0u8; INTERFACE_NAME_MAX_BYTES + 1];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

/// The batch for a plan: the table is created if missing, deleted, and created again with
/// everything in it, all in one transaction.
fn build_batch(plan: &TablePlan) -> nftnl::FinalizedBatch {
    let table = Table::new(TABLE, ProtoFamily::Inet);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);

    let mut map = Map::new(plan.map.c_name(), MAP_ID, &table, plan.map.shape());
    for (key, data) in &plan.elements {
        map.add(key, data);
    }
    batch.add(&map, MsgType::Add);
    map.add_elements_to(&mut batch);
    let map6_name = if plan.map6 == GATEWAY6_MAP {
        c"gateway6"
    } else {
        c"targets6"
    };
    let mut map6 = Map::new(map6_name, MAP6_ID, &table, map::RELAY6_SHAPE);
    if !plan.elements6.is_empty() {
        for (key, data) in &plan.elements6 {
            map6.add(key, data);
        }
        batch.add(&map6, MsgType::Add);
        map6.add_elements_to(&mut batch);
    }

    for chain_plan in &plan.chains {
        let mut chain = Chain::new(chain_plan.name, &table);
        chain.set_type(if chain_plan.filter {
            ChainType::Filter
        } else {
            ChainType::Nat
        });
        chain.set_hook(chain_plan.hook, chain_plan.priority);
        chain.set_policy(Policy::Accept);
        batch.add(&chain, MsgType::Add);
        for exprs in &chain_plan.rules {
            let mut rule = Rule::new(&chain);
            for e in exprs {
                rule.add_expr(e);
            }
            batch.add(&rule, MsgType::Add);
        }
    }
    batch.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftnl::nftnl_sys as sys;

    fn forward(protocol: Protocol, port: u16, target: [u8; 4], target_port: u16) -> Forward {
        Forward {
            protocol,
            port,
            target: Endpoint::new(Ipv4Addr::from(target), target_port),
        }
    }

    fn relay(forwards: Vec<Forward>) -> Ruleset {
        Ruleset::Relay {
            lan_address: Ipv4Addr::new(192, 168, 77, 10),
            router: Some(Ipv4Addr::new(192, 168, 77, 1)),
            forwards,
            ipv6: None,
        }
    }

    fn lan() -> LanSide {
        LanSide {
            interface: "lan0".into(),
            prefixes: vec!["192.168.77.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn relay_plan_has_one_element_per_forward_and_drops_exact_duplicates() {
        let web = forward(Protocol::Tcp, 30080, [192, 168, 77, 100], 8080);
        let dns = forward(Protocol::Udp, 30053, [192, 168, 77, 100], 53);
        let plan = plan(&relay(vec![web, dns, web]), Some(&lan())).unwrap();
        assert_eq!(plan.map, MapKind::Relay);
        assert_eq!(plan.elements.len(), 2);
        let decoded: Vec<_> = plan
            .elements
            .iter()
            .map(|(k, d)| decode_element(MapKind::Relay, k, d).unwrap())
            .collect();
        assert_eq!(decoded, vec![web, dns]);
    }

    #[test]
    fn relay_with_pinholes_adds_an_ipv6_map_and_rule_beside_the_ipv4_ones() {
        let host: Ipv6Addr = "2001:db8:77::10".parse().unwrap();
        let web6 = Forward6 {
            protocol: Protocol::Tcp,
            port: 8080,
            target: Endpoint6::new("2001:db8:77::20".parse().unwrap(), 38080),
        };
        let Ruleset::Relay {
            lan_address,
            router,
            forwards,
            ..
        } = relay(vec![forward(
            Protocol::Tcp,
            8080,
            [192, 168, 77, 100],
            8080,
        )])
        else {
            unreachable!()
        };
        let ruleset = Ruleset::Relay {
            lan_address,
            router,
            forwards,
            ipv6: Some(Relay6 {
                host,
                prefix_len: 64,
                forwards: vec![web6, web6],
            }),
        };
        let plan = plan(&ruleset, Some(&lan())).unwrap();
        assert_eq!(plan.elements.len(), 1);
        let decoded: Vec<_> = plan
            .elements6
            .iter()
            .map(|(k, d)| map::decode_relay6(k, d).unwrap())
            .collect();
        assert_eq!(decoded, [(Protocol::Tcp, 8080, web6.target.address, 38080)]);
        assert_eq!(plan.elements6[0].0[..16], host.octets());
        let prerouting = &plan.chains[0].rules;
        assert_eq!(prerouting.len(), 2);
        let dnat6 = &prerouting[1];
        let kinds: Vec<_> = dnat6.iter().map(|e| e.name.to_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "meta", "cmp", "meta", "cmp", "payload", "range", "payload", "meta", "payload",
                "lookup", "ct", "bitwise", "ct", "nat"
            ]
        );
        // ip6 daddr fills R0..R3, the protocol R4, the port R5: the key the lookup reads.
        assert_eq!(dnat6[6].u32_attr(sys::NFTNL_EXPR_PAYLOAD_DREG), Some(R0));
        assert_eq!(dnat6[7].u32_attr(sys::NFTNL_EXPR_META_DREG), Some(R4));
        assert_eq!(dnat6[9].u32_attr(sys::NFTNL_EXPR_LOOKUP_SREG), Some(R0));
        assert_eq!(
            dnat6[13].u32_attr(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN),
            Some(R0)
        );
        assert_eq!(
            dnat6[13].u32_attr(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN),
            Some(R4)
        );
        // The sources left alone are the host's on-link prefix, as long as the interface
        // has it: 2001:db8:77::/64 here, 2001:db8:77::/56 with a /56.
        let range = |plan: &TablePlan| {
            plan.chains[0].rules[1][5]
                .attrs
                .iter()
                .filter_map(|a| match a {
                    expr::Attr::Bytes(_, v) => Some(v.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let v6 = |text: &str| text.parse::<Ipv6Addr>().unwrap().octets().to_vec();
        assert_eq!(
            range(&plan),
            [v6("2001:db8:77::"), v6("2001:db8:77:0:ffff:ffff:ffff:ffff")]
        );
        let Ruleset::Relay {
            lan_address,
            router,
            forwards,
            ipv6: Some(relay6),
        } = ruleset
        else {
            unreachable!()
        };
        let wide = Ruleset::Relay {
            lan_address,
            router,
            forwards,
            ipv6: Some(Relay6 {
                prefix_len: 56,
                ..relay6
            }),
        };
        assert_eq!(
            range(&super::plan(&wide, Some(&lan())).unwrap()),
            [
                v6("2001:db8:77::"),
                v6("2001:db8:77:ff:ffff:ffff:ffff:ffff")
            ]
        );
        // Without pinholes: no IPv6 map, one DNAT rule, as before.
        let plain = super::plan(&relay(vec![]), Some(&lan())).unwrap();
        assert!(plain.elements6.is_empty());
        assert_eq!(plain.chains[0].rules.len(), 1);
    }

    /// The IPv6 forwards are those of the pinholes that open the relay address found this
    /// pass, not the address of whichever record comes first.
    #[test]
    fn the_ipv6_relay_forwards_follow_the_host_address_found_not_the_records() {
        use crate::model::{Backend, MappingKey, Owner, TargetSource};
        use crate::pinholes::{DesiredPinhole, PinholeRoute};
        use crate::state::MappingStatus;
        let old: Ipv6Addr = "2001:db8:77::10".parse().unwrap();
        let new: Ipv6Addr = "2001:db8:88::10".parse().unwrap();
        let node: Ipv6Addr = "2001:db8:77::20".parse().unwrap();
        let mut state = State::default();
        for (port, opens) in [(8080, old), (8081, new)] {
            let key = MappingKey {
                protocol: Protocol::Tcp,
                external_port: port,
            };
            let wanted = DesiredPinhole {
                owner: Owner::new("default", "web"),
                service_port: port,
                key,
                target: Endpoint6::new(node, 30_000 + port),
                source: TargetSource::NodePort,
            };
            let route = PinholeRoute {
                backend: Backend::Pcp,
                router: "2001:db8:77::1".parse().unwrap(),
                relay_from: Some(opens),
                on_external_port: false,
            };
            let mut record = crate::pinholes::record_for(&wanted, &route);
            record.status = MappingStatus::Active;
            state.pinholes.insert(key, record);
        }
        let relay = Forwarding::Relay {
            lan_address: Ipv4Addr::new(192, 168, 77, 10),
        };
        let host = |address| RelayHost {
            address,
            prefix_len: 60,
        };
        for (found, port) in [(old, 8080), (new, 8081)] {
            let ruleset = Ruleset::for_state(relay, None, None, Some(host(found)), &state)
                .expect("relay rules");
            let Ruleset::Relay {
                ipv6: Some(relay6), ..
            } = ruleset
            else {
                panic!("no IPv6 relay");
            };
            assert_eq!((relay6.host, relay6.prefix_len), (found, 60));
            let ports: Vec<u16> = relay6.forwards.iter().map(|f| f.port).collect();
            assert_eq!(ports, [port]);
        }
        // No path found yet: no IPv6 DNAT at all.
        let ruleset = Ruleset::for_state(relay, None, None, None, &state).expect("relay rules");
        assert!(ruleset.forwards6().is_empty());
    }

    #[test]
    fn relay_dnat_looks_up_a_concatenated_key_and_marks_before_nat() {
        let plan = plan(&relay(vec![]), Some(&lan())).unwrap();
        let names: Vec<_> = plan
            .chains
            .iter()
            .map(|c| (c.name, c.hook, c.priority))
            .collect();
        assert_eq!(
            names,
            vec![
                (c"prerouting", Hook::PreRouting, -100),
                (c"postrouting", Hook::PostRouting, 100)
            ]
        );
        let dnat = &plan.chains[0].rules[0];
        let kinds: Vec<_> = dnat.iter().map(|e| e.name.to_str().unwrap()).collect();
        // nfproto; iifname and source (see the next test); key, lookup, mark, DNAT.
        assert_eq!(
            kinds,
            [
                "meta", "cmp", "meta", "cmp", "payload", "cmp", "range", "payload", "meta",
                "payload", "lookup", "ct", "bitwise", "ct", "nat"
            ]
        );
        // The key parts sit in consecutive 32-bit registers, where the lookup reads them.
        assert_eq!(dnat[7].u32_attr(sys::NFTNL_EXPR_PAYLOAD_DREG), Some(R0));
        assert_eq!(dnat[8].u32_attr(sys::NFTNL_EXPR_META_DREG), Some(R1));
        assert_eq!(dnat[9].u32_attr(sys::NFTNL_EXPR_PAYLOAD_DREG), Some(R2));
        assert_eq!(dnat[10].u32_attr(sys::NFTNL_EXPR_LOOKUP_SREG), Some(R0));
        // The found address and port are where the DNAT takes them from.
        assert_eq!(dnat[10].u32_attr(sys::NFTNL_EXPR_LOOKUP_DREG), Some(R0));
        assert_eq!(
            dnat[14].u32_attr(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN),
            Some(R0)
        );
        assert_eq!(
            dnat[14].u32_attr(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN),
            Some(R1)
        );
        // The mark is set in a register the key and the data do not use.
        assert_eq!(dnat[13].u32_attr(sys::NFTNL_EXPR_CT_SREG), Some(R4));
        let masquerade = &plan.chains[1].rules[0];
        assert_eq!(masquerade.last().unwrap().name, c"masq");
    }

    #[test]
    fn relay_dnat_catches_only_the_lan_interface_and_sources_off_the_lan_or_the_router() {
        let plan = plan(&relay(vec![]), Some(&lan())).unwrap();
        let dnat = &plan.chains[0].rules[0];
        assert_eq!(plan.chains[0].rules.len(), 1, "still one rule");
        let lookups = dnat.iter().filter(|e| e.name == c"lookup").count();
        assert_eq!(lookups, 1, "still one map lookup per packet");
        let bytes = |e: &RawExpr, key| {
            e.attrs.iter().find_map(|a| match a {
                expr::Attr::Bytes(k, v) if *k == key => Some(v.clone()),
                _ => None,
            })
        };
        // meta nfproto ipv4; iifname "lan0"; ip saddr (offset 12) ...
        assert_eq!(dnat[2].name, c"meta");
        assert_eq!(
            bytes(&dnat[3], sys::NFTNL_EXPR_CMP_DATA),
            Some(b"lan0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec())
        );
        assert_eq!(dnat[4].u32_attr(sys::NFTNL_EXPR_PAYLOAD_OFFSET), Some(12));
        // ... != 192.168.77.0 and not in 192.168.77.2-255: the router .1 gets through.
        assert_eq!(dnat[5].name, c"cmp");
        assert_eq!(
            dnat[5].u32_attr(sys::NFTNL_EXPR_CMP_OP),
            Some(libc::NFT_CMP_NEQ as u32)
        );
        assert_eq!(
            bytes(&dnat[5], sys::NFTNL_EXPR_CMP_DATA),
            Some(vec![192, 168, 77, 0])
        );
        assert_eq!(dnat[6].name, c"range");
        assert_eq!(
            dnat[6].u32_attr(sys::NFTNL_EXPR_RANGE_OP),
            Some(libc::NFT_RANGE_NEQ as u32)
        );
        assert_eq!(
            bytes(&dnat[6], sys::NFTNL_EXPR_RANGE_FROM_DATA),
            Some(vec![192, 168, 77, 2])
        );
        assert_eq!(
            bytes(&dnat[6], sys::NFTNL_EXPR_RANGE_TO_DATA),
            Some(vec![192, 168, 77, 255])
        );
        assert_eq!(dnat[7].u32_attr(sys::NFTNL_EXPR_PAYLOAD_OFFSET), Some(16));
        // Without the LAN side there is no relay plan.
        assert!(matches!(
            plan_without_lan(),
            Err(NftError::LanInterface { .. })
        ));
    }

    fn plan_without_lan() -> Result<TablePlan, NftError> {
        plan(&relay(vec![]), None)
    }

    #[test]
    fn gateway_matches_the_interface_and_keys_on_protocol_and_port() {
        let rules = Ruleset::Gateway {
            wan_interface: "rwan".into(),
            forwards: vec![forward(Protocol::Udp, 5000, [10, 0, 0, 2], 5001)],
            forwards6: vec![],
        };
        let plan = plan(&rules, None).unwrap();
        assert_eq!(plan.map, MapKind::Gateway);
        assert_eq!(
            plan.chains.len(),
            1,
            "no masquerade: the client address is kept"
        );
        let dnat = &plan.chains[0].rules[0];
        assert_eq!(
            dnat[1].attrs[2],
            expr::Attr::Bytes(
                sys::NFTNL_EXPR_CMP_DATA,
                b"rwan\0\0\0\0\0\0\0\0\0\0\0\0".to_vec()
            )
        );
        let (key, data) = &plan.elements[0];
        assert_eq!(
            decode_element(MapKind::Gateway, key, data),
            Some(forward(Protocol::Udp, 5000, [10, 0, 0, 2], 5001))
        );
    }

    /// Gateway mode with published IPv6 targets: a `gateway6` map keyed on the target's own
    /// address and the external port, a DNAT rule that marks the connection, and a filter
    /// chain on the forward hook that accepts the mark; without them, the IPv4 table as
    /// before.
    #[test]
    fn gateway_with_ipv6_targets_marks_accepts_and_dnats_on_the_wan_interface() {
        let node6: Ipv6Addr = "2001:db8:77::20".parse().unwrap();
        let web6 = Forward6 {
            protocol: Protocol::Tcp,
            port: 8080,
            target: Endpoint6::new(node6, 31080),
        };
        let rules = Ruleset::Gateway {
            wan_interface: "rwan".into(),
            forwards: vec![forward(Protocol::Tcp, 8080, [192, 168, 77, 20], 31080)],
            forwards6: vec![web6, web6],
        };
        assert_eq!(rules.forwards6(), [web6, web6]);
        let plan = plan(&rules, None).unwrap();
        assert_eq!(plan.map6, GATEWAY6_MAP);
        let decoded: Vec<_> = plan
            .elements6
            .iter()
            .map(|(k, d)| map::decode_relay6(k, d).unwrap())
            .collect();
        assert_eq!(decoded, [(Protocol::Tcp, 8080, node6, 31080)]);
        // The key is the target's own address (routed, no NAT of the address).
        assert_eq!(plan.elements6[0].0[..16], node6.octets());
        let chains: Vec<_> = plan
            .chains
            .iter()
            .map(|c| (c.name, c.filter, c.hook, c.priority, c.rules.len()))
            .collect();
        assert_eq!(
            chains,
            [
                (c"prerouting", false, Hook::PreRouting, -100, 2),
                (c"forward", true, Hook::Forward, 0, 1),
            ]
        );
        let kinds = |rule: &[RawExpr]| -> Vec<String> {
            rule.iter()
                .map(|e| e.name.to_string_lossy().into_owned())
                .collect()
        };
        let dnat6 = &plan.chains[0].rules[1];
        assert_eq!(
            kinds(dnat6),
            [
                "meta", "cmp", "meta", "cmp", "payload", "meta", "payload", "lookup", "ct",
                "bitwise", "ct", "nat"
            ]
        );
        assert_eq!(
            dnat6[1].attrs[2],
            expr::Attr::Bytes(
                sys::NFTNL_EXPR_CMP_DATA,
                b"rwan\0\0\0\0\0\0\0\0\0\0\0\0".to_vec()
            )
        );
        // The mark set is the one the README tells the operator to accept.
        assert_eq!(
            dnat6[9].attrs[4],
            expr::Attr::Bytes(
                sys::NFTNL_EXPR_BITWISE_XOR,
                0x0200_0000u32.to_ne_bytes().to_vec()
            )
        );
        let accept = &plan.chains[1].rules[0];
        assert_eq!(
            kinds(accept),
            [
                "meta",
                "cmp",
                "meta",
                "cmp",
                "ct",
                "bitwise",
                "cmp",
                "immediate"
            ]
        );
        assert_eq!(
            accept[7].u32_attr(sys::NFTNL_EXPR_IMM_VERDICT),
            Some(libc::NF_ACCEPT as u32)
        );
        // Without IPv6 targets: no IPv6 map, no forward chain.
        let plain = super::plan(
            &Ruleset::Gateway {
                wan_interface: "rwan".into(),
                forwards: vec![],
                forwards6: vec![],
            },
            None,
        )
        .unwrap();
        assert!(plain.elements6.is_empty());
        assert_eq!(plain.chains.len(), 1);
    }

    /// The host's forward chains that would drop what the IPv6 gateway accepts: a drop
    /// policy or a drop rule without a rule on the conntrack mark; not a chain that accepts
    /// the mark, not one that drops nothing, not another hook, not holepunch's own table.
    #[test]
    fn the_hosts_forward_chains_that_drop_without_the_mark_are_named() {
        use netlink::{ChainInfo, RuleInfo};
        let inet = libc::NFPROTO_INET as u8;
        let chain = |table: &str, name: &str, hook: u32, policy: u32| ChainInfo {
            family: inet,
            table: table.into(),
            name: name.into(),
            hook: Some(hook),
            policy: Some(policy),
        };
        let rule = |table: &str, name: &str, drops: bool, ct_mark: bool| RuleInfo {
            family: inet,
            table: table.into(),
            chain: name.into(),
            drops,
            ct_mark,
            jumps: Vec::new(),
        };
        let forward = libc::NF_INET_FORWARD as u32;
        let chains = [
            // The lab's router: policy accept, a drop rule for new IPv6 from the WAN.
            chain("filter", "forward", forward, 1),
            // OpenWrt's fw4: policy drop.
            chain("fw4", "forward", forward, 0),
            // A chain that drops but accepts the mark first.
            chain("marked", "forward", forward, 0),
            // Drops nothing; another hook; holepunch's own.
            chain("open", "forward", forward, 1),
            chain("filter", "input", libc::NF_INET_LOCAL_IN as u32, 0),
            chain(TABLE_NAME, "forward", forward, 0),
        ];
        let rules = [
            rule("filter", "forward", false, false),
            rule("filter", "forward", true, false),
            rule("marked", "forward", false, true),
            rule("open", "forward", false, false),
        ];
        assert_eq!(
            blocking_forward_chains(&chains, &rules),
            ["inet filter forward", "inet fw4 forward"]
        );
        // Once the operator's rule is in: nothing to say.
        let mut fixed = rules.to_vec();
        fixed.push(rule("filter", "forward", false, true));
        fixed.push(rule("fw4", "forward", false, true));
        assert!(blocking_forward_chains(&chains, &fixed).is_empty());
    }

    /// A drop or the operator's rule in a chain the base chain jumps to counts as the base
    /// chain's own, followed through chains that jump in a loop.
    #[test]
    fn the_chains_a_forward_chain_jumps_to_count_as_its_own() {
        use netlink::{ChainInfo, RuleInfo};
        let inet = libc::NFPROTO_INET as u8;
        let base = |table: &str| ChainInfo {
            family: inet,
            table: table.into(),
            name: "forward".into(),
            hook: Some(libc::NF_INET_FORWARD as u32),
            policy: Some(libc::NF_ACCEPT as u32),
        };
        let rule =
            |table: &str, chain: &str, drops: bool, ct_mark: bool, jumps: &[&str]| RuleInfo {
                family: inet,
                table: table.into(),
                chain: chain.into(),
                drops,
                ct_mark,
                jumps: jumps.iter().map(|j| (*j).to_owned()).collect(),
            };
        let chains = [base("fw"), base("firewalld"), base("other")];
        let rules = [
            // fw: the drop is two jumps away, through chains that jump back.
            rule("fw", "forward", false, false, &["forward_wan"]),
            rule(
                "fw",
                "forward_wan",
                false,
                false,
                &["reject_wan", "forward"],
            ),
            rule("fw", "reject_wan", true, false, &["forward_wan"]),
            // firewalld: the drop is a jump away, the operator's rule in another jumped chain.
            rule("firewalld", "forward", false, false, &["zones", "policy"]),
            rule("firewalld", "zones", true, false, &[]),
            rule("firewalld", "policy", false, true, &[]),
            // A chain of the same name in another table is not jumped to.
            rule("other", "forward", false, false, &["reject_wan"]),
        ];
        assert_eq!(
            blocking_forward_chains(&chains, &rules),
            ["inet fw forward"]
        );
        // Without the jump, nothing in fw's forward chain drops.
        let mut unjumped = rules.to_vec();
        unjumped[0].jumps.clear();
        assert!(blocking_forward_chains(&chains, &unjumped).is_empty());
    }

    #[test]
    fn bad_interface_names_are_refused_before_anything_is_sent() {
        for name in ["", "a-very-long-interface0", "eth0/1", "wan 0", ".."] {
            let rules = Ruleset::Gateway {
                wan_interface: name.into(),
                forwards: vec![],
                forwards6: vec![],
            };
            assert!(
                matches!(plan(&rules, None), Err(NftError::InterfaceName(n)) if n == name),
                "{name:?}"
            );
        }
        assert!(interface_name("enp3s0f1.100").is_ok());
    }

    #[test]
    fn forwarding_check_reads_the_sysctl_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ip_forward");
        std::fs::write(&path, "1\n").unwrap();
        assert!(forwarding_enabled(&path).is_ok());
        std::fs::write(&path, "0\n").unwrap();
        let err = forwarding_enabled(&path).unwrap_err();
        assert!(err.to_string().contains("net.ipv4.ip_forward=1"), "{err}");
        let missing = forwarding_enabled(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(missing, NftError::ReadForwarding(_)));
    }
}
