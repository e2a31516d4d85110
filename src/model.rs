//! The domain vocabulary shared by every layer: who owns a mapping, which router port it
//! takes, where its traffic goes, and the problems that keep a Service from being published.
//!
//! Plain data only: no I/O, no clocks. Wire formats (TOML state, router protocols) convert
//! to and from these types at the edges.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The tag prefix in a router mapping's description that marks it as holepunch's.
pub const OWNER_TAG_PREFIX: &str = "holepunch:";

/// Transport protocol of a mapping. Only TCP and UDP can be mapped by IGD, PCP and NAT-PMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as PCP and nftables carry it.
    pub fn iana_number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The spelling UPnP IGD uses in `NewProtocol`.
    pub fn upnp_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Error for a protocol name that is neither TCP nor UDP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol {0:?} cannot be mapped: only TCP and UDP are supported")]
pub struct UnsupportedProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnsupportedProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Protocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Protocol::Udp)
        } else {
            Err(UnsupportedProtocol(s.to_owned()))
        }
    }
}

/// The Kubernetes Service a mapping belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
}

impl Owner {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Owner {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The description written on router mappings: `holepunch:<namespace>/<service>`.
    pub fn tag(&self) -> String {
        format!("{OWNER_TAG_PREFIX}{self}")
    }

    /// Reads an owner back from a router mapping description; `None` if it is not ours.
    pub fn from_tag(description: &str) -> Option<Owner> {
        description.strip_prefix(OWNER_TAG_PREFIX)?.parse().ok()
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Error for an owner that is not `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not of the form <namespace>/<name>")]
pub struct InvalidOwner(pub String);

impl FromStr for Owner {
    type Err = InvalidOwner;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Owner::new(ns, name))
            }
            _ => Err(InvalidOwner(s.to_owned())),
        }
    }
}

impl Serialize for Owner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A slot in the router's shared port space: one protocol and one external port.
/// Two mappings with the same key cannot coexist on one router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MappingKey {
    pub protocol: Protocol,
    pub external_port: u16,
}

impl fmt::Display for MappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.external_port, self.protocol)
    }
}

/// PCP's 96-bit mapping nonce (RFC 6887 §11.1). The server ties a mapping to the nonce that created it,
/// so renewals and deletes must send that same nonce. Text form: 24 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 12]);

impl Nonce {
    /// A fresh nonce from `rng`; use a cryptographically strong one (e.g. `rand::rng()`).
    pub fn random<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        Nonce(rng.random())
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl FromStr for Nonce {
    type Err = InvalidNonce;

    /// Accepts exactly 24 hex digits, either case.
    fn from_str(text: &str) -> Result<Self, InvalidNonce> {
        let invalid = || InvalidNonce {
            text: text.chars().take(48).collect(),
        };
        let mut bytes = [0u8; 12];
        if text.len() != 2 * bytes.len() {
            return Err(invalid());
        }
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            let [high, low] = pair else {
                return Err(invalid());
            };
            let (Some(high), Some(low)) = (hex_value(*high), hex_value(*low)) else {
                return Err(invalid());
            };
            *byte = (high << 4) | low;
        }
        Ok(Nonce(bytes))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}
/// A nonce text that is not 24 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PCP nonce {text:?} is not 24 hex digits")]
pub struct InvalidNonce {
    pub text: String,
}

/// A router mapping holepunch owns, as a router backend needs it to check or delete it:
/// the slot, who owns it (UPnP's description), where it forwards, and PCP's nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: Owner,
    pub protocol: Protocol,
    pub external_port: u16,
    /// What the router forwards to.
    pub internal: Endpoint,
    /// PCP: the nonce the mapping was made with (renewals and deletes must send it).
    pub nonce: Option<Nonce>,
}

impl Lease {
    pub fn key(&self) -> MappingKey {
        MappingKey {
            protocol: self.protocol,
            external_port: self.external_port,
        }
    }
}

/// An IPv4 address and port: where traffic for a mapping finally goes, or what the router
/// forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    pub fn new(address: Ipv4Addr, port: u16) -> Self {
        Endpoint { address, port }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

/// An IPv6 address and port: where a pinhole's traffic finally goes, or what a pinhole
/// opens (README, "IPv6").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint6 {
    pub address: Ipv6Addr,
    pub port: u16,
}

impl Endpoint6 {
    pub fn new(address: Ipv6Addr, port: u16) -> Self {
        Endpoint6 { address, port }
    }
}

impl fmt::Display for Endpoint6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]:{}", self.address, self.port)
    }
}

/// How the Service's target was chosen, for logs and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSource {
    /// `status.loadBalancer.ingress` IP and the Service port.
    LoadBalancer,
    /// A Ready node's InternalIP and the `nodePort`.
    NodePort,
}

/// Where a Service port's traffic must end up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub endpoint: Endpoint,
    pub source: TargetSource,
}

/// One port mapping that the cluster asks for: a Service port published on an external port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub owner: Owner,
    /// The Service's `spec.ports[].port`.
    pub service_port: u16,
    pub protocol: Protocol,
    pub external_port: u16,
    pub target: Target,
}

impl PortMapping {
    pub fn key(&self) -> MappingKey {
        MappingKey {
            protocol: self.protocol,
            external_port: self.external_port,
        }
    }
}

/// Which router protocol holds (or would hold) a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Upnp,
    Pcp,
    Natpmp,
    /// No router mapping at all (`gateway` mode, or `router.backend = "none"`).
    None,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Upnp => "upnp",
            Backend::Pcp => "pcp",
            Backend::Natpmp => "natpmp",
            Backend::None => "none",
        })
    }
}

/// What kind of thing keeps a Service (port) from being published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// An annotation value that does not parse, is too long, or names no port of the Service.
    InvalidAnnotation,
    /// The external port is on the deny list, outside the allowed ranges, or below 1024.
    DeniedPort,
    /// Another Service won the same external port and protocol.
    PortConflict,
    /// The Service has no usable target (no load balancer IP, no Ready node, no nodePort).
    NoTarget,
    /// The target address lies outside `exposure.target_cidrs`.
    TargetNotAllowed,
    /// The Service port's protocol cannot be mapped (SCTP).
    UnsupportedProtocol,
    /// The router refused the mapping.
    RouterRefused,
    /// The router's external address is private or CGNAT: the mapping cannot work from the Internet.
    DoubleNat,
    /// The load balancer IP is not an allowed target; a Ready node's nodePort is used instead.
    TargetFallback,
    /// A socket on this host (relay mode) or on the router (gateway mode) listens on the port.
    PortInUse,
    /// Over `ports.max_per_service`, `ports.max_per_namespace` or `ports.max_total`.
    OverQuota,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::InvalidAnnotation => "invalid-annotation",
            ProblemKind::DeniedPort => "denied-port",
            ProblemKind::PortConflict => "port-conflict",
            ProblemKind::NoTarget => "no-target",
            ProblemKind::TargetNotAllowed => "target-not-allowed",
            ProblemKind::UnsupportedProtocol => "unsupported-protocol",
            ProblemKind::RouterRefused => "router-refused",
            ProblemKind::DoubleNat => "double-nat",
            ProblemKind::TargetFallback => "target-fallback",
            ProblemKind::PortInUse => "port-in-use",
            ProblemKind::OverQuota => "over-quota",
        })
    }
}

/// A reason a Service is not (fully) published, addressed to the person who owns it.
/// Becomes a Warning Event on the Service.
///
/// Events are read by tenants (README, "Security model"): `message` never names another
/// namespace's Service or a LAN host's address; `detail` carries those for the operator (the
/// log and `holepunch plan`), and is never sent to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    pub owner: Owner,
    pub kind: ProblemKind,
    /// One sentence that says what is wrong and what to change; safe for the tenant to read.
    pub message: String,
    /// What only the operator may read: who holds the port, which address was refused and why.
    pub detail: Option<String>,
}

impl Problem {
    /// A problem whose message says everything (nothing in it is kept from the tenant).
    pub fn new(owner: Owner, kind: ProblemKind, message: impl Into<String>) -> Problem {
        Problem {
            owner,
            kind,
            message: message.into(),
            detail: None,
        }
    }

    /// Adds the operator's detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Problem {
        self.detail = Some(detail.into());
        self
    }
}

impl fmt::Display for Problem {
    /// The operator's view: the message, then the detail when there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]: {}", self.owner, self.kind, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

/// Why a router's external address cannot be reached from the Internet (double NAT: the
/// router sits behind another NAT, e.g. the ISP's carrier-grade NAT), or `None` for a public
/// address.
pub fn unreachable_external_address(address: std::net::Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = address.octets();
    if address.is_unspecified() {
        Some("the router has no external address yet (0.0.0.0)")
    } else if address.is_private() {
        Some("it is a private address (RFC 1918): the router is behind another router")
    } else if a == 100 && (64..128).contains(&b) {
        Some(
            "it is a carrier-grade NAT address (100.64.0.0/10, RFC 6598): the ISP shares one public address among customers; ask for a public IPv4 address",
        )
    } else if address.is_loopback() || address.is_link_local() {
        Some("it is a loopback or link-local address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_text_round_trips() {
        const NONCE: Nonce = Nonce([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(NONCE.to_string(), "0102030405060708090a0b0c");
        assert_eq!("0102030405060708090A0B0C".parse::<Nonce>(), Ok(NONCE));
        let mut rng = rand::rng();
        for _ in 0..100 {
            let nonce = Nonce::random(&mut rng);
            assert_eq!(nonce.to_string().len(), 24);
            assert_eq!(nonce.to_string().parse::<Nonce>(), Ok(nonce));
        }
    }

    #[test]
    fn bad_nonce_texts_are_errors() {
        for text in [
            "",
            "0102030405060708090a0b",
            "0102030405060708090a0b0c0d",
            "0102030405060708090a0bxx",
            " 102030405060708090a0b0c",
            "+102030405060708090a0b0c",
            "éééééééééééé",
            "ü102030405060708090a0b0",
        ] {
            assert!(
                matches!(text.parse::<Nonce>(), Err(InvalidNonce { .. })),
                "{text:?}"
            );
        }
    }

    #[test]
    fn private_cgnat_and_unspecified_external_addresses_are_double_nat() {
        use std::net::Ipv4Addr;
        for (address, double_nat) in [
            ("0.0.0.0", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("192.168.1.1", true),
            ("100.64.0.1", true),
            ("100.127.255.254", true),
            ("169.254.1.1", true),
            ("100.128.0.1", false),
            ("100.63.255.255", false),
            ("11.22.33.44", false),
            ("203.0.113.7", false),
        ] {
            let address: Ipv4Addr = address.parse().expect("test address");
            assert_eq!(
                unreachable_external_address(address).is_some(),
                double_nat,
                "{address}"
            );
        }
    }

    #[test]
    fn owner_tag_round_trips_and_rejects_foreign_descriptions() {
        let owner = Owner::new("media", "jellyfin");
        assert_eq!(owner.tag(), "holepunch:media/jellyfin");
        assert_eq!(Owner::from_tag(&owner.tag()), Some(owner));
        assert_eq!(Owner::from_tag("Skype (TCP)"), None);
        assert_eq!(Owner::from_tag("holepunch:noslash"), None);
        assert_eq!(Owner::from_tag("holepunch:a/b/c"), None);
    }

    #[test]
    fn protocol_parses_case_insensitively_and_refuses_sctp() {
        assert_eq!("TCP".parse::<Protocol>(), Ok(Protocol::Tcp));
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("SCTP".parse::<Protocol>().is_err());
    }
}
