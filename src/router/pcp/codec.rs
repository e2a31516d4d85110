//! PCP wire format (RFC 6887): MAP and ANNOUNCE requests out, responses in.
//!
//! Sans-io: typed values become datagrams and datagrams become typed values; no sockets, no
//! clocks, and no panic on any input. Everything that needs time or addresses belongs to the
//! client: retransmission (§8.1.1), checking the source address and the epoch (§8.3, §8.5),
//! renewing, and choosing the nonce (see [`Nonce::random`]).
//!
//! Requests are IPv4 ([`MapRequest`]) or IPv6 ([`MapRequestV6`]: a pinhole on a router that
//! only firewalls IPv6). Responses are decoded as sent, so an address that is not IPv4-mapped
//! (§5) comes back as an [`IpAddr::V6`], never as an error.
//!
//! Version negotiation (§9) ends in one of three ways: [`DecodeError::NatPmpServer`] (the
//! gateway answered in NAT-PMP: fall back to it), [`DecodeError::UnsupportedVersion`] (another
//! PCP version), or a version-2 response whose result is [`ResultCode::UnsuppVersion`].
//! [`DecodeError::is_version_mismatch`] groups the first two.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The PCP version this codec speaks (§9).
pub const VERSION: u8 = 2;
/// UDP port the PCP server listens on: NAT-PMP's port, reassigned to PCP (§19).
pub const SERVER_PORT: u16 = 5351;
/// UDP port on which clients hear unsolicited ANNOUNCE responses (§14.1).
pub const ANNOUNCE_PORT: u16 = 5350;
/// IPv4 group to which servers send unsolicited ANNOUNCE responses (§14.1).
pub const ANNOUNCE_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
/// Largest PCP message on the wire (§7).
pub const MAX_MESSAGE_BYTES: usize = 1100;
/// Common request and response header (§7.1, §7.2).
pub const HEADER_BYTES: usize = 24;
/// MAP opcode-specific data, the same size in requests and responses (§11.1).
pub const MAP_PAYLOAD_BYTES: usize = 36;
/// PEER opcode-specific data (§12.1).
pub const PEER_PAYLOAD_BYTES: usize = 56;

pub use crate::model::{InvalidNonce, Nonce};

const R_BIT: u8 = 0x80;
const OPTION_HEADER_BYTES: usize = 4;
const OPTION_THIRD_PARTY: u8 = 1;
const OPTION_PREFER_FAILURE: u8 = 2;
const OPTION_FILTER: u8 = 3;
const THIRD_PARTY_DATA_BYTES: u16 = 16;
const PREFER_FAILURE_DATA_BYTES: u16 = 0;

/// Why a datagram is not a PCP response this client can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("PCP response of {len} bytes is too short: at least {min} bytes are needed")]
    TooShort { len: usize, min: usize },

    #[error("PCP response of {len} bytes exceeds the 1100-byte limit of RFC 6887 §7")]
    TooLong { len: usize },

    #[error("PCP response of {len} bytes is not a whole number of 32-bit words (RFC 6887 §7)")]
    Misaligned { len: usize },

    #[error(
        "the gateway answered in NAT-PMP (version 0), so it does not speak PCP: \
         use NAT-PMP with it (router.backend = \"natpmp\")"
    )]
    NatPmpServer,

    #[error("the gateway answered with PCP version {version}; holepunch speaks only version 2")]
    UnsupportedVersion { version: u8 },

    #[error("datagram is a PCP request, not a response (opcode byte {opcode:#04x} has no R bit)")]
    NotAResponse { opcode: u8 },

    #[error("PCP response carries unknown opcode {opcode}")]
    UnknownOpcode { opcode: u8 },

    #[error("PCP {opcode} response of {len} bytes is cut short: {needed} bytes are needed")]
    TruncatedPayload {
        opcode: Opcode,
        len: usize,
        needed: usize,
    },

    #[error("PCP option header at byte {offset} is cut short: {available} of 4 bytes present")]
    TruncatedOption { offset: usize, available: usize },

    #[error(
        "PCP option {code} at byte {offset} claims {length} data bytes (plus padding), \
         but only {available} remain"
    )]
    OptionOverrun {
        code: u8,
        offset: usize,
        length: u16,
        available: usize,
    },

    #[error("PCP option {code} has {length} data bytes, which is not a valid length for it")]
    MalformedOption { code: u8, length: usize },
}

impl DecodeError {
    /// Whether the gateway speaks another protocol version (§9): the client should stop
    /// sending PCP to it, and try NAT-PMP after [`DecodeError::NatPmpServer`].
    pub fn is_version_mismatch(&self) -> bool {
        matches!(
            self,
            DecodeError::NatPmpServer | DecodeError::UnsupportedVersion { .. }
        )
    }
}

/// PCP operation (§7.1, §19.2). Only these three are defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    Announce,
    Map,
    Peer,
}

impl Opcode {
    /// The 7-bit code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Opcode::Announce => 0,
            Opcode::Map => 1,
            Opcode::Peer => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Opcode::Announce),
            1 => Some(Opcode::Map),
            2 => Some(Opcode::Peer),
            _ => None,
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Opcode::Announce => "ANNOUNCE",
            Opcode::Map => "MAP",
            Opcode::Peer => "PEER",
        })
    }
}

/// Result code of a response (§7.4). `Display` gives the RFC's name and number;
/// [`ResultCode::description`] says what it means for the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    Success,
    UnsuppVersion,
    NotAuthorized,
    MalformedRequest,
    UnsuppOpcode,
    UnsuppOption,
    MalformedOption,
    NetworkFailure,
    NoResources,
    UnsuppProtocol,
    UserExQuota,
    CannotProvideExternal,
    AddressMismatch,
    ExcessiveRemotePeers,
    Other(u8),
}

impl ResultCode {
    pub fn code(self) -> u8 {
        match self {
            ResultCode::Success => 0,
            ResultCode::UnsuppVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::MalformedRequest => 3,
            ResultCode::UnsuppOpcode => 4,
            ResultCode::UnsuppOption => 5,
            ResultCode::MalformedOption => 6,
            ResultCode::NetworkFailure => 7,
            ResultCode::NoResources => 8,
            ResultCode::UnsuppProtocol => 9,
            ResultCode::UserExQuota => 10,
            ResultCode::CannotProvideExternal => 11,
            ResultCode::AddressMismatch => 12,
            ResultCode::ExcessiveRemotePeers => 13,
            ResultCode::Other(code) => code,
        }
    }

    /// The RFC's name for the code.
    pub fn name(self) -> &'static str {
        match self {
            ResultCode::Success => "SUCCESS",
            ResultCode::UnsuppVersion => "UNSUPP_VERSION",
            ResultCode::NotAuthorized => "NOT_AUTHORIZED",
            ResultCode::MalformedRequest => "MALFORMED_REQUEST",
            ResultCode::UnsuppOpcode => "UNSUPP_OPCODE",
            ResultCode::UnsuppOption => "UNSUPP_OPTION",
            ResultCode::MalformedOption => "MALFORMED_OPTION",
            ResultCode::NetworkFailure => "NETWORK_FAILURE",
            ResultCode::NoResources => "NO_RESOURCES",
            ResultCode::UnsuppProtocol => "UNSUPP_PROTOCOL",
            ResultCode::UserExQuota => "USER_EX_QUOTA",
            ResultCode::CannotProvideExternal => "CANNOT_PROVIDE_EXTERNAL",
            ResultCode::AddressMismatch => "ADDRESS_MISMATCH",
            ResultCode::ExcessiveRemotePeers => "EXCESSIVE_REMOTE_PEERS",
            ResultCode::Other(_) => "unknown result code",
        }
    }

    // NOTE: RFC 6887 §7.4 classes each error as "long lifetime" or "short lifetime" (advice
    // for the server's Lifetime field: 30 min and 30 s recommended). CANNOT_PROVIDE_EXTERNAL
    // is in neither class ("depends on the reason"), and unknown codes have no class, so the
    // two predicates below are both false for them.

    /// A long-lifetime error of §7.4: repeating the same request will fail the same way for a
    /// long while.
    pub fn is_long_lifetime_error(self) -> bool {
        matches!(
            self,
            ResultCode::UnsuppVersion
                | ResultCode::NotAuthorized
                | ResultCode::MalformedRequest
                | ResultCode::UnsuppOpcode
                | ResultCode::UnsuppOption
                | ResultCode::MalformedOption
                | ResultCode::UnsuppProtocol
                | ResultCode::AddressMismatch
                | ResultCode::ExcessiveRemotePeers
        )
    }

    /// A short-lifetime error of §7.4: a transient condition on the server.
    pub fn is_short_lifetime_error(self) -> bool {
        matches!(
            self,
            ResultCode::NetworkFailure | ResultCode::NoResources | ResultCode::UserExQuota
        )
    }

    /// What the code means, in words for the user.
    pub fn description(self) -> &'static str {
        match self {
            ResultCode::Success => "success",
            ResultCode::UnsuppVersion => "the router does not support PCP version 2",
            ResultCode::NotAuthorized => {
                "the router refused the request: PCP mapping may be turned off on it, it may \
                 forbid mappings to other hosts, or the mapping was made with another nonce"
            }
            ResultCode::MalformedRequest => "the router could not parse the request",
            ResultCode::UnsuppOpcode => "the router does not support this PCP operation",
            ResultCode::UnsuppOption => {
                "the router does not support an option the request needs (usually THIRD_PARTY: \
                 use exposure mode \"relay\")"
            }
            ResultCode::MalformedOption => "the router found an option in the request malformed",
            ResultCode::NetworkFailure => {
                "the router has a network problem (for example no external address yet); \
                 it should pass"
            }
            ResultCode::NoResources => {
                "the router is out of resources (mapping table or memory); it may pass"
            }
            ResultCode::UnsuppProtocol => "the router cannot map this transport protocol",
            ResultCode::UserExQuota => {
                "this host has used up its mapping quota on the router: remove mappings or \
                 raise the quota"
            }
            ResultCode::CannotProvideExternal => {
                "the router cannot give the requested external port or address (taken or not \
                 allowed): choose another external port"
            }
            ResultCode::AddressMismatch => {
                "the router saw the request come from another address than the one inside it: \
                 a NAT sits between this host and the router, or the socket is bound to the \
                 wrong address"
            }
            ResultCode::ExcessiveRemotePeers => "the router cannot create the requested filters",
            ResultCode::Other(_) => {
                "the router answered with a result code RFC 6887 does not define"
            }
        }
    }
}

impl From<u8> for ResultCode {
    fn from(code: u8) -> Self {
        match code {
            0 => ResultCode::Success,
            1 => ResultCode::UnsuppVersion,
            2 => ResultCode::NotAuthorized,
            3 => ResultCode::MalformedRequest,
            4 => ResultCode::UnsuppOpcode,
            5 => ResultCode::UnsuppOption,
            6 => ResultCode::MalformedOption,
            7 => ResultCode::NetworkFailure,
            8 => ResultCode::NoResources,
            9 => ResultCode::UnsuppProtocol,
            10 => ResultCode::UserExQuota,
            11 => ResultCode::CannotProvideExternal,
            12 => ResultCode::AddressMismatch,
            13 => ResultCode::ExcessiveRemotePeers,
            other => ResultCode::Other(other),
        }
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// A MAP request (§11.1): create, renew (same nonce) or delete (lifetime 0) one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRequest {
    /// Requested lifetime; 0 deletes the mapping (§15).
    pub lifetime_secs: u32,
    /// This host's address toward the router. It must be the address the request is sent
    /// from, or the router answers ADDRESS_MISMATCH (§8.1).
    pub client_ip: Ipv4Addr,
    pub nonce: Nonce,
    /// IANA protocol number (`Protocol::iana_number`).
    pub protocol: u8,
    pub internal_port: u16,
    /// 0 = no preference.
    pub suggested_external_port: u16,
    /// `None` = no preference.
    pub suggested_external_ip: Option<Ipv4Addr>,
    /// Map to this host instead of `client_ip` (THIRD_PARTY option, §13.1). miniupnpd refuses
    /// it by default with UNSUPP_OPTION.
    pub third_party: Option<Ipv4Addr>,
    /// Send PREFER_FAILURE (§13.2): fail with CANNOT_PROVIDE_EXTERNAL rather than grant
    /// another port.
    // NOTE: without PREFER_FAILURE miniupnpd 2.3.1 may search all 65535 ports for a free one
    // and stall for about two minutes (measured in the lab, README.md "Router protocols"); it still grants another port on
    // conflict, so the client compares granted and wanted ports anyway.
    pub prefer_failure: bool,
}

impl MapRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_BYTES
                + MAP_PAYLOAD_BYTES
                + 2 * OPTION_HEADER_BYTES
                + usize::from(THIRD_PARTY_DATA_BYTES),
        );
        encode_request_header(&mut out, Opcode::Map, self.lifetime_secs, self.client_ip);
        out.extend_from_slice(&self.nonce.0);
        out.extend_from_slice(&[self.protocol, 0, 0, 0]);
        out.extend_from_slice(&self.internal_port.to_be_bytes());
        out.extend_from_slice(&self.suggested_external_port.to_be_bytes());
        // NOTE: "no preference" is the all-zeros address of the wanted family (RFC 6887 §11.1,
        // §5): for IPv4 that is ::ffff:0.0.0.0. Plain `::` would ask a NAT44 for an IPv6
        // external address.
        let suggested = self.suggested_external_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        out.extend_from_slice(&ipv4_to_wire(suggested));
        if let Some(internal_ip) = self.third_party {
            encode_option_header(&mut out, OPTION_THIRD_PARTY, THIRD_PARTY_DATA_BYTES);
            out.extend_from_slice(&ipv4_to_wire(internal_ip));
        }
        if self.prefer_failure {
            encode_option_header(&mut out, OPTION_PREFER_FAILURE, PREFER_FAILURE_DATA_BYTES);
        }
        out
    }
}

/// A MAP request over IPv6 (§11.1) from and for `client_ip`: on a router without NAT66 the
/// mapping is a pinhole in its firewall, and the "external" address granted is the internal
/// one (RFC 6887 §11.1, "the PCP server ... acting as a firewall"). No THIRD_PARTY: a pinhole
/// for another host is refused by secure-mode routers just as for IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRequestV6 {
    /// Requested lifetime; 0 deletes the mapping (§15).
    pub lifetime_secs: u32,
    /// This host's IPv6 address; the request must be sent from it (§8.1).
    pub client_ip: Ipv6Addr,
    pub nonce: Nonce,
    /// IANA protocol number (`Protocol::iana_number`).
    pub protocol: u8,
    pub internal_port: u16,
    /// 0 = no preference; a firewall keeps the internal port.
    pub suggested_external_port: u16,
    /// `None` = no preference (`::`).
    pub suggested_external_ip: Option<Ipv6Addr>,
    /// Send PREFER_FAILURE (§13.2), as for IPv4.
    pub prefer_failure: bool,
}

impl MapRequestV6 {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + MAP_PAYLOAD_BYTES + OPTION_HEADER_BYTES);
        encode_header_wire(
            &mut out,
            Opcode::Map,
            self.lifetime_secs,
            self.client_ip.octets(),
        );
        out.extend_from_slice(&self.nonce.0);
        out.extend_from_slice(&[self.protocol, 0, 0, 0]);
        out.extend_from_slice(&self.internal_port.to_be_bytes());
        out.extend_from_slice(&self.suggested_external_port.to_be_bytes());
        // NOTE: "no preference" for an IPv6 external address is the all-zeros address `::`
        // (RFC 6887 §11.1), not ::ffff:0.0.0.0, which would ask for an IPv4 one.
        let suggested = self.suggested_external_ip.unwrap_or(Ipv6Addr::UNSPECIFIED);
        out.extend_from_slice(&suggested.octets());
        if self.prefer_failure {
            encode_option_header(&mut out, OPTION_PREFER_FAILURE, PREFER_FAILURE_DATA_BYTES);
        }
        out
    }
}

/// An ANNOUNCE request (§14.1): a cheap probe for whether the gateway speaks PCP, and which
/// epoch it is in.
// NOTE: some Apple routers answer ANNOUNCE in NAT-PMP yet handle MAP (offbynull/portmapper,
// PcpPortMapper.identify, probes with MAP for that reason): a NatPmpServer answer to ANNOUNCE
// alone does not prove the gateway lacks PCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceRequest {
    pub client_ip: Ipv4Addr,
}

impl AnnounceRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES);
        encode_request_header(&mut out, Opcode::Announce, 0, self.client_ip);
        out
    }
}

fn encode_request_header(
    out: &mut Vec<u8>,
    opcode: Opcode,
    lifetime_secs: u32,
    client_ip: Ipv4Addr,
) {
    encode_header_wire(out, opcode, lifetime_secs, ipv4_to_wire(client_ip));
}

/// The request header with the client address already in its 128-bit form.
fn encode_header_wire(out: &mut Vec<u8>, opcode: Opcode, lifetime_secs: u32, client: [u8; 16]) {
    out.extend_from_slice(&[VERSION, opcode.code(), 0, 0]);
    out.extend_from_slice(&lifetime_secs.to_be_bytes());
    out.extend_from_slice(&client);
}

fn encode_option_header(out: &mut Vec<u8>, code: u8, data_bytes: u16) {
    out.extend_from_slice(&[code, 0]);
    out.extend_from_slice(&data_bytes.to_be_bytes());
}

// NOTE: PCP carries every address in a 128-bit field; IPv4 goes in IPv4-mapped form,
// ::ffff:a.b.c.d (RFC 6887 §5).
fn ipv4_to_wire(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

fn ip_from_wire(octets: [u8; 16]) -> IpAddr {
    let ip = Ipv6Addr::from(octets);
    ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4)
}

/// An option found in a response (§7.3, §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PcpOption {
    /// THIRD_PARTY (§13.1): the internal address the mapping points to.
    ThirdParty(IpAddr),
    /// PREFER_FAILURE (§13.2).
    PreferFailure,
    /// FILTER (§13.3): only this remote prefix and port may use the mapping (port 0 = all).
    Filter {
        prefix_length: u8,
        remote_peer_port: u16,
        remote_peer_ip: IpAddr,
    },
    /// Any other option, data without padding.
    Unknown { code: u8, data: Vec<u8> },
}

impl PcpOption {
    fn decode(code: u8, data: &[u8]) -> Result<Self, DecodeError> {
        let malformed = || DecodeError::MalformedOption {
            code,
            length: data.len(),
        };
        match code {
            OPTION_THIRD_PARTY => {
                let internal_ip: [u8; 16] = data.try_into().map_err(|_| malformed())?;
                Ok(PcpOption::ThirdParty(ip_from_wire(internal_ip)))
            }
            OPTION_PREFER_FAILURE if data.is_empty() => Ok(PcpOption::PreferFailure),
            OPTION_PREFER_FAILURE => Err(malformed()),
            OPTION_FILTER => {
                let [
                    _reserved,
                    prefix_length,
                    port_high,
                    port_low,
                    remote_peer_ip @ ..,
                ]: [u8; 20] = data.try_into().map_err(|_| malformed())?;
                Ok(PcpOption::Filter {
                    prefix_length,
                    remote_peer_port: u16::from_be_bytes([port_high, port_low]),
                    remote_peer_ip: ip_from_wire(remote_peer_ip),
                })
            }
            _ => Ok(PcpOption::Unknown {
                code,
                data: data.to_vec(),
            }),
        }
    }
}

/// A decoded PCP response. Always version 2: other versions are [`DecodeError`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub result: ResultCode,
    /// On success, the granted lifetime; on error, how long the same request will keep
    /// failing (§7.2).
    pub lifetime_secs: u32,
    /// The server's epoch time, for restart detection (§8.5).
    pub epoch_secs: u32,
    pub body: ResponseBody,
    pub options: Vec<PcpOption>,
}

/// The opcode-specific part of a [`Response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    /// ANNOUNCE carries no opcode-specific data (§14.1).
    Announce,
    Map(MapResponse),
    Peer(PeerResponse),
    /// An error response that stops after the header.
    // NOTE: a server that could not parse a request cannot copy its payload back; instead it
    // copies the last 96 bits of the request's client address into the header's reserved
    // field (RFC 6887 §7.2), kept here so the client can still match the response.
    HeaderOnly {
        opcode: Opcode,
        reserved: [u8; 12],
    },
}

/// MAP opcode-specific data of a response (§11.1). On error responses the "assigned" fields
/// hold the suggested values copied from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapResponse {
    pub nonce: Nonce,
    pub protocol: u8,
    pub internal_port: u16,
    pub assigned_external_port: u16,
    /// IPv4 when the server sent an IPv4-mapped address, else the IPv6 address as sent.
    pub assigned_external_ip: IpAddr,
}

impl MapResponse {
    /// Whether this answers `request`: same nonce, protocol and internal port (§11.4). The
    /// caller must also check the datagram came from the server it asked (§8.3).
    pub fn matches(&self, request: &MapRequest) -> bool {
        self.nonce == request.nonce
            && self.protocol == request.protocol
            && self.internal_port == request.internal_port
    }
}

/// PEER opcode-specific data of a response (§12.1). holepunch sends no PEER requests; these
/// are decoded so that every defined opcode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerResponse {
    pub mapping: MapResponse,
    pub remote_peer_port: u16,
    pub remote_peer_ip: IpAddr,
}

impl Response {
    pub fn opcode(&self) -> Opcode {
        match &self.body {
            ResponseBody::Announce => Opcode::Announce,
            ResponseBody::Map(_) => Opcode::Map,
            ResponseBody::Peer(_) => Opcode::Peer,
            ResponseBody::HeaderOnly { opcode, .. } => *opcode,
        }
    }

    /// Whether this answers the MAP `request`: [`MapResponse::matches`] when the response has
    /// a MAP body, else (a header-only MAP error) the echoed client address.
    pub fn matches(&self, request: &MapRequest) -> bool {
        match &self.body {
            ResponseBody::Map(map) => map.matches(request),
            ResponseBody::HeaderOnly {
                opcode: Opcode::Map,
                reserved,
            } => {
                let [_, _, _, _, client_ip_tail @ ..] = ipv4_to_wire(request.client_ip);
                *reserved == client_ip_tail
            }
            _ => false,
        }
    }
}

impl Response {
    /// Whether this answers the IPv6 MAP `request`: same nonce, protocol and internal port,
    /// or (a header-only MAP error) the echoed last 96 bits of its client address (§7.2).
    pub fn matches_v6(&self, request: &MapRequestV6) -> bool {
        match &self.body {
            ResponseBody::Map(map) => {
                map.nonce == request.nonce
                    && map.protocol == request.protocol
                    && map.internal_port == request.internal_port
            }
            ResponseBody::HeaderOnly {
                opcode: Opcode::Map,
                reserved,
            } => {
                let [_, _, _, _, client_ip_tail @ ..] = request.client_ip.octets();
                *reserved == client_ip_tail
            }
            _ => false,
        }
    }
}

/// Decode one datagram received from a PCP server (solicited or not). Never panics.
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let len = bytes.len();
    if len > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLong { len });
    }
    // NOTE: the version is checked before the length: a NAT-PMP gateway answers a version it
    // does not know with its own 8-byte header (RFC 6886 §3.5), which is how a PCP client
    // learns to fall back (RFC 6887 §9).
    match bytes.first() {
        None => {
            return Err(DecodeError::TooShort {
                len,
                min: HEADER_BYTES,
            });
        }
        Some(0) => return Err(DecodeError::NatPmpServer),
        Some(&VERSION) => {}
        Some(&version) => return Err(DecodeError::UnsupportedVersion { version }),
    }
    let Some((header, mut rest)) = bytes.split_first_chunk::<HEADER_BYTES>() else {
        return Err(DecodeError::TooShort {
            len,
            min: HEADER_BYTES,
        });
    };
    if !len.is_multiple_of(4) {
        return Err(DecodeError::Misaligned { len });
    }
    let [
        _version,
        opcode_byte,
        _reserved,
        result,
        l0,
        l1,
        l2,
        l3,
        e0,
        e1,
        e2,
        e3,
        reserved @ ..,
    ] = *header;
    if opcode_byte & R_BIT == 0 {
        return Err(DecodeError::NotAResponse {
            opcode: opcode_byte,
        });
    }
    let code = opcode_byte & !R_BIT;
    let opcode = Opcode::from_code(code).ok_or(DecodeError::UnknownOpcode { opcode: code })?;
    let result = ResultCode::from(result);

    let truncated = |payload_bytes: usize| DecodeError::TruncatedPayload {
        opcode,
        len,
        needed: HEADER_BYTES + payload_bytes,
    };
    let body = match opcode {
        Opcode::Announce => ResponseBody::Announce,
        Opcode::Map | Opcode::Peer if result != ResultCode::Success && rest.is_empty() => {
            ResponseBody::HeaderOnly { opcode, reserved }
        }
        Opcode::Map => {
            ResponseBody::Map(take_map(&mut rest).ok_or_else(|| truncated(MAP_PAYLOAD_BYTES))?)
        }
        Opcode::Peer => {
            ResponseBody::Peer(take_peer(&mut rest).ok_or_else(|| truncated(PEER_PAYLOAD_BYTES))?)
        }
    };
    let options = decode_options(rest, len - rest.len())?;
    Ok(Response {
        result,
        lifetime_secs: u32::from_be_bytes([l0, l1, l2, l3]),
        epoch_secs: u32::from_be_bytes([e0, e1, e2, e3]),
        body,
        options,
    })
}

fn take<const N: usize>(cursor: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = cursor.split_first_chunk::<N>()?;
    *cursor = tail;
    Some(*head)
}

fn take_map(cursor: &mut &[u8]) -> Option<MapResponse> {
    let nonce = Nonce(take(cursor)?);
    let [protocol, _, _, _] = take(cursor)?;
    let internal_port = u16::from_be_bytes(take(cursor)?);
    let assigned_external_port = u16::from_be_bytes(take(cursor)?);
    let assigned_external_ip = ip_from_wire(take(cursor)?);
    Some(MapResponse {
        nonce,
        protocol,
        internal_port,
        assigned_external_port,
        assigned_external_ip,
    })
}

fn take_peer(cursor: &mut &[u8]) -> Option<PeerResponse> {
    let mapping = take_map(cursor)?;
    let [port_high, port_low, _, _] = take(cursor)?;
    let remote_peer_ip = ip_from_wire(take(cursor)?);
    Some(PeerResponse {
        mapping,
        remote_peer_port: u16::from_be_bytes([port_high, port_low]),
        remote_peer_ip,
    })
}

/// Options from `bytes`, which start `base_offset` bytes into the datagram.
fn decode_options(bytes: &[u8], base_offset: usize) -> Result<Vec<PcpOption>, DecodeError> {
    let mut options = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let offset = base_offset + (bytes.len() - rest.len());
        let Some([code, _reserved, length_high, length_low]) =
            take::<OPTION_HEADER_BYTES>(&mut rest)
        else {
            return Err(DecodeError::TruncatedOption {
                offset,
                available: rest.len(),
            });
        };
        let length = u16::from_be_bytes([length_high, length_low]);
        let overrun = DecodeError::OptionOverrun {
            code,
            offset,
            length,
            available: rest.len(),
        };
        let Some((data, after_data)) = rest.split_at_checked(usize::from(length)) else {
            return Err(overrun);
        };
        // NOTE: option data is followed by zero padding up to a 4-byte boundary, and the
        // length field counts the data only (RFC 6887 §7.3).
        let padding = data.len().next_multiple_of(4) - data.len();
        let Some(after_padding) = after_data.get(padding..) else {
            return Err(overrun);
        };
        options.push(PcpOption::decode(code, data)?);
        rest = after_padding;
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: Nonce = Nonce([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
    const TARGET: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

    fn tcp_8080_request() -> MapRequest {
        MapRequest {
            lifetime_secs: 3600,
            client_ip: CLIENT,
            nonce: NONCE,
            protocol: 6,
            internal_port: 8080,
            suggested_external_port: 8080,
            suggested_external_ip: None,
            third_party: Some(TARGET),
            prefer_failure: true,
        }
    }

    /// A response header, built field by field from §7.2.
    fn response_header(opcode: u8, result: u8, lifetime: u32, epoch: u32) -> Vec<u8> {
        let mut out = vec![2, 0x80 | opcode, 0, result];
        out.extend_from_slice(&lifetime.to_be_bytes());
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        out
    }

    /// A MAP response payload, built field by field from §11.1.
    fn map_payload(
        nonce: Nonce,
        protocol: u8,
        internal: u16,
        external: u16,
        ip: [u8; 16],
    ) -> Vec<u8> {
        let mut out = nonce.0.to_vec();
        out.extend_from_slice(&[protocol, 0, 0, 0]);
        out.extend_from_slice(&internal.to_be_bytes());
        out.extend_from_slice(&external.to_be_bytes());
        out.extend_from_slice(&ip);
        out
    }

    fn mapped(ip: Ipv4Addr) -> [u8; 16] {
        let [a, b, c, d] = ip.octets();
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
    }

    #[test]
    fn map_request_with_third_party_and_prefer_failure_is_byte_exact() {
        #[rustfmt::skip]
        let expected: [u8; 84] = [
            // header §7.1: version 2, R=0 opcode MAP, reserved, lifetime 3600
            0x02, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x0e, 0x10,
            // client IP ::ffff:192.168.1.2
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 2,
            // MAP §11.1: nonce
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            // protocol TCP, reserved
            0x06, 0x00, 0x00, 0x00,
            // internal port 8080, suggested external port 8080
            0x1f, 0x90, 0x1f, 0x90,
            // suggested external IP ::ffff:0.0.0.0
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0,
            // THIRD_PARTY §13.1: code 1, reserved, length 16, ::ffff:192.168.1.10
            0x01, 0x00, 0x00, 0x10,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 10,
            // PREFER_FAILURE §13.2: code 2, reserved, length 0
            0x02, 0x00, 0x00, 0x00,
        ];
        assert_eq!(tcp_8080_request().encode(), expected);
    }

    #[test]
    fn plain_map_request_is_byte_exact() {
        let request = MapRequest {
            lifetime_secs: 0,
            protocol: 17,
            internal_port: 53000,
            suggested_external_port: 0,
            suggested_external_ip: Some(EXTERNAL),
            third_party: None,
            prefer_failure: false,
            ..tcp_8080_request()
        };
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            0x02, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 2,
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            0x11, 0x00, 0x00, 0x00,
            0xcf, 0x08, 0x00, 0x00,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7,
        ];
        assert_eq!(request.encode(), expected);
    }

    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);

    fn tcp_8443_request_v6() -> MapRequestV6 {
        MapRequestV6 {
            lifetime_secs: 600,
            client_ip: CLIENT6,
            nonce: NONCE,
            protocol: 6,
            internal_port: 8443,
            suggested_external_port: 8443,
            suggested_external_ip: None,
            prefer_failure: true,
        }
    }

    #[test]
    fn ipv6_map_request_is_byte_exact() {
        #[rustfmt::skip]
        let expected: [u8; 64] = [
            // header §7.1: version 2, MAP, lifetime 600
            0x02, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x02, 0x58,
            // client IP 2001:db8:77::10, all 128 bits (not IPv4-mapped)
            0x20, 0x01, 0x0d, 0xb8, 0x00, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10,
            // MAP §11.1: nonce, protocol TCP, ports 8443
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            0x06, 0x00, 0x00, 0x00,
            0x20, 0xfb, 0x20, 0xfb,
            // suggested external IP: `::`, no preference for an IPv6 address
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            // PREFER_FAILURE
            0x02, 0x00, 0x00, 0x00,
        ];
        assert_eq!(tcp_8443_request_v6().encode(), expected);
        let delete = MapRequestV6 {
            lifetime_secs: 0,
            prefer_failure: false,
            suggested_external_ip: Some(CLIENT6),
            ..tcp_8443_request_v6()
        }
        .encode();
        assert_eq!(delete.len(), 60);
        assert_eq!(&delete[4..8], &[0, 0, 0, 0]);
        assert_eq!(&delete[44..60], &CLIENT6.octets());
    }

    #[test]
    fn ipv6_map_response_decodes_and_matches() {
        // What miniupnpd 2.3.1 answers (lab): result 0, lifetime 600, external = internal.
        let mut bytes = response_header(1, 0, 600, 1234);
        bytes.extend_from_slice(&map_payload(NONCE, 6, 8443, 8443, CLIENT6.octets()));
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(response.result, ResultCode::Success);
        assert_eq!(response.lifetime_secs, 600);
        assert!(response.matches_v6(&tcp_8443_request_v6()));
        let ResponseBody::Map(map) = &response.body else {
            panic!("MAP body expected");
        };
        assert_eq!(map.assigned_external_ip, IpAddr::V6(CLIENT6));
        for other in [
            MapRequestV6 {
                nonce: Nonce([9; 12]),
                ..tcp_8443_request_v6()
            },
            MapRequestV6 {
                protocol: 17,
                ..tcp_8443_request_v6()
            },
            MapRequestV6 {
                internal_port: 8444,
                ..tcp_8443_request_v6()
            },
        ] {
            assert!(!response.matches_v6(&other), "{other:?}");
        }
        // A header-only error matches by the echoed last 96 bits of the client address.
        let mut header_only = response_header(1, 3, 1800, 77);
        header_only[12..24].copy_from_slice(&CLIENT6.octets()[4..]);
        let response = decode_response(&header_only).expect("valid response");
        assert!(response.matches_v6(&tcp_8443_request_v6()));
        let elsewhere = MapRequestV6 {
            client_ip: Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x11),
            ..tcp_8443_request_v6()
        };
        assert!(!response.matches_v6(&elsewhere));
    }

    #[test]
    fn announce_request_is_byte_exact() {
        #[rustfmt::skip]
        let expected: [u8; 24] = [
            0x02, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 2,
        ];
        assert_eq!(AnnounceRequest { client_ip: CLIENT }.encode(), expected);
    }

    #[test]
    fn map_response_vector_decodes() {
        #[rustfmt::skip]
        let bytes: [u8; 64] = [
            // version 2, R=1 opcode MAP, reserved, SUCCESS
            0x02, 0x81, 0x00, 0x00,
            // lifetime 7200, epoch 1000
            0x00, 0x00, 0x1c, 0x20,
            0x00, 0x00, 0x03, 0xe8,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            0x06, 0x00, 0x00, 0x00,
            // internal 8080, assigned external 8081
            0x1f, 0x90, 0x1f, 0x91,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7,
            // PREFER_FAILURE echoed
            0x02, 0x00, 0x00, 0x00,
        ];
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(
            response,
            Response {
                result: ResultCode::Success,
                lifetime_secs: 7200,
                epoch_secs: 1000,
                body: ResponseBody::Map(MapResponse {
                    nonce: NONCE,
                    protocol: 6,
                    internal_port: 8080,
                    assigned_external_port: 8081,
                    assigned_external_ip: IpAddr::V4(EXTERNAL),
                }),
                options: vec![PcpOption::PreferFailure],
            }
        );
        assert_eq!(response.opcode(), Opcode::Map);
        assert!(response.matches(&tcp_8080_request()));
    }

    #[test]
    fn map_round_trip_through_a_server_echo() {
        let request = tcp_8080_request();
        let sent = request.encode();
        // A server echoes the request's payload and options, sets R, result, lifetime and
        // epoch, and fills in the assigned port and address.
        let mut reply = response_header(1, 0, 3000, 42);
        reply.extend_from_slice(&map_payload(request.nonce, 6, 8080, 8080, mapped(EXTERNAL)));
        reply.extend_from_slice(&sent[HEADER_BYTES + MAP_PAYLOAD_BYTES..]);

        let response = decode_response(&reply).expect("valid response");
        assert_eq!(response.result, ResultCode::Success);
        assert_eq!(response.lifetime_secs, 3000);
        assert_eq!(response.epoch_secs, 42);
        assert_eq!(
            response.options,
            vec![
                PcpOption::ThirdParty(IpAddr::V4(TARGET)),
                PcpOption::PreferFailure
            ]
        );
        let ResponseBody::Map(map) = &response.body else {
            panic!("MAP body expected, got {:?}", response.body);
        };
        assert_eq!(map.nonce, request.nonce);
        assert_eq!(map.protocol, request.protocol);
        assert_eq!(map.internal_port, request.internal_port);
        assert_eq!(map.assigned_external_port, 8080);
        assert_eq!(map.assigned_external_ip, IpAddr::V4(EXTERNAL));
        assert!(map.matches(&request));
        assert!(response.matches(&request));
    }

    #[test]
    fn matches_checks_nonce_protocol_and_internal_port() {
        let request = tcp_8080_request();
        let map = MapResponse {
            nonce: NONCE,
            protocol: 6,
            internal_port: 8080,
            assigned_external_port: 1,
            assigned_external_ip: IpAddr::V4(EXTERNAL),
        };
        assert!(map.matches(&request));
        assert!(
            !MapResponse {
                nonce: Nonce([0; 12]),
                ..map.clone()
            }
            .matches(&request)
        );
        assert!(
            !MapResponse {
                protocol: 17,
                ..map.clone()
            }
            .matches(&request)
        );
        assert!(
            !MapResponse {
                internal_port: 8081,
                ..map
            }
            .matches(&request)
        );
    }

    #[test]
    fn announce_response_decodes() {
        let bytes = response_header(0, 0, 0, 5);
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(response.body, ResponseBody::Announce);
        assert_eq!(response.opcode(), Opcode::Announce);
        assert_eq!(response.epoch_secs, 5);
        assert!(response.options.is_empty());
        assert!(!response.matches(&tcp_8080_request()));
    }

    #[test]
    fn peer_response_decodes() {
        let mut bytes = response_header(2, 0, 60, 9);
        bytes.extend_from_slice(&map_payload(NONCE, 17, 4000, 4001, mapped(EXTERNAL)));
        bytes.extend_from_slice(&[0x13, 0x88, 0, 0]);
        bytes.extend_from_slice(&mapped(TARGET));
        let response = decode_response(&bytes).expect("valid response");
        let ResponseBody::Peer(peer) = response.body else {
            panic!("PEER body expected");
        };
        assert_eq!(peer.mapping.internal_port, 4000);
        assert_eq!(peer.remote_peer_port, 5000);
        assert_eq!(peer.remote_peer_ip, IpAddr::V4(TARGET));
    }

    #[test]
    fn error_response_keeps_result_lifetime_and_echoed_payload() {
        let mut bytes = response_header(1, 5, 1800, 77);
        bytes.extend_from_slice(&map_payload(
            NONCE,
            6,
            8080,
            8080,
            mapped(Ipv4Addr::UNSPECIFIED),
        ));
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(response.result, ResultCode::UnsuppOption);
        assert!(response.result.is_long_lifetime_error());
        assert_eq!(response.lifetime_secs, 1800);
        assert!(response.matches(&tcp_8080_request()));
        let ResponseBody::Map(map) = response.body else {
            panic!("MAP body expected");
        };
        assert_eq!(map.assigned_external_ip, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }

    #[test]
    fn header_only_error_matches_by_echoed_client_address() {
        let mut bytes = response_header(1, 3, 1800, 77);
        bytes[12..24].copy_from_slice(&mapped(CLIENT)[4..]);
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(response.result, ResultCode::MalformedRequest);
        assert_eq!(response.opcode(), Opcode::Map);
        assert!(matches!(
            response.body,
            ResponseBody::HeaderOnly {
                opcode: Opcode::Map,
                ..
            }
        ));
        assert!(response.matches(&tcp_8080_request()));
        let elsewhere = MapRequest {
            client_ip: Ipv4Addr::new(192, 168, 1, 3),
            ..tcp_8080_request()
        };
        assert!(!response.matches(&elsewhere));
    }

    #[test]
    fn unsupp_version_result_from_a_version_2_server_decodes() {
        let bytes = response_header(1, 1, 1800, 0);
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(response.result, ResultCode::UnsuppVersion);
    }

    #[test]
    fn non_mapped_external_address_is_kept_as_ipv6() {
        let v6: Ipv6Addr = "2001:db8::7".parse().expect("valid address");
        let mut bytes = response_header(1, 0, 60, 1);
        bytes.extend_from_slice(&map_payload(NONCE, 6, 8080, 8080, v6.octets()));
        let response = decode_response(&bytes).expect("valid response");
        let ResponseBody::Map(map) = response.body else {
            panic!("MAP body expected");
        };
        assert_eq!(map.assigned_external_ip, IpAddr::V6(v6));
    }

    #[test]
    fn options_decode_with_padding_filter_and_unknown() {
        let mut bytes = response_header(1, 0, 60, 1);
        bytes.extend_from_slice(&map_payload(NONCE, 6, 8080, 8080, mapped(EXTERNAL)));
        // unknown optional option 0x80 with 5 data bytes and 3 padding bytes
        bytes.extend_from_slice(&[0x80, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        // FILTER: reserved, prefix 120, port 443, ::ffff:198.51.100.0
        bytes.extend_from_slice(&[3, 0, 0, 20, 0, 120, 0x01, 0xbb]);
        bytes.extend_from_slice(&mapped(Ipv4Addr::new(198, 51, 100, 0)));
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(
            response.options,
            vec![
                PcpOption::Unknown {
                    code: 0x80,
                    data: vec![1, 2, 3, 4, 5]
                },
                PcpOption::Filter {
                    prefix_length: 120,
                    remote_peer_port: 443,
                    remote_peer_ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 0)),
                },
            ]
        );
    }

    #[test]
    fn every_length_and_header_error() {
        assert_eq!(
            decode_response(&[]),
            Err(DecodeError::TooShort { len: 0, min: 24 })
        );
        assert_eq!(
            decode_response(&[2; 1101]),
            Err(DecodeError::TooLong { len: 1101 })
        );
        assert_eq!(
            decode_response(&[
                2, 0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]),
            Err(DecodeError::TooShort { len: 20, min: 24 })
        );
        let mut misaligned = response_header(0, 0, 0, 0);
        misaligned.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode_response(&misaligned),
            Err(DecodeError::Misaligned { len: 26 })
        );
        let mut request = response_header(1, 0, 0, 0);
        request[1] = 0x01;
        assert_eq!(
            decode_response(&request),
            Err(DecodeError::NotAResponse { opcode: 0x01 })
        );
        assert_eq!(
            decode_response(&response_header(5, 0, 0, 0)),
            Err(DecodeError::UnknownOpcode { opcode: 5 })
        );
    }

    #[test]
    fn version_mismatches_are_distinguishable() {
        // What a NAT-PMP gateway sends back for a PCP MAP request: version 0, opcode 128+1,
        // result 1 (Unsupported Version), epoch.
        let natpmp = [0, 129, 0, 1, 0, 0, 0x12, 0x34];
        let error = decode_response(&natpmp).expect_err("not PCP");
        assert_eq!(error, DecodeError::NatPmpServer);
        assert!(error.is_version_mismatch());

        let mut version_1 = response_header(1, 1, 0, 0);
        version_1[0] = 1;
        let error = decode_response(&version_1).expect_err("not PCP v2");
        assert_eq!(error, DecodeError::UnsupportedVersion { version: 1 });
        assert!(error.is_version_mismatch());
        assert!(!DecodeError::TooLong { len: 2000 }.is_version_mismatch());
    }

    #[test]
    fn truncated_payloads_are_errors() {
        let success_without_payload = response_header(1, 0, 60, 1);
        assert_eq!(
            decode_response(&success_without_payload),
            Err(DecodeError::TruncatedPayload {
                opcode: Opcode::Map,
                len: 24,
                needed: 60
            })
        );
        let mut partial_error = response_header(1, 8, 30, 1);
        partial_error.extend_from_slice(&NONCE.0[..4]);
        assert_eq!(
            decode_response(&partial_error),
            Err(DecodeError::TruncatedPayload {
                opcode: Opcode::Map,
                len: 28,
                needed: 60
            })
        );
        let mut short_peer = response_header(2, 0, 60, 1);
        short_peer.extend_from_slice(&map_payload(NONCE, 6, 1, 1, mapped(EXTERNAL)));
        assert_eq!(
            decode_response(&short_peer),
            Err(DecodeError::TruncatedPayload {
                opcode: Opcode::Peer,
                len: 60,
                needed: 80
            })
        );
    }

    #[test]
    fn option_errors() {
        let mut base = response_header(1, 0, 60, 1);
        base.extend_from_slice(&map_payload(NONCE, 6, 8080, 8080, mapped(EXTERNAL)));

        let mut overrun = base.clone();
        overrun.extend_from_slice(&[0x81, 0, 0, 8, 1, 2, 3, 4]);
        assert_eq!(
            decode_response(&overrun),
            Err(DecodeError::OptionOverrun {
                code: 0x81,
                offset: 60,
                length: 8,
                available: 4
            })
        );

        let mut bad_third_party = base.clone();
        bad_third_party.extend_from_slice(&[1, 0, 0, 4, 192, 168, 1, 10]);
        assert_eq!(
            decode_response(&bad_third_party),
            Err(DecodeError::MalformedOption { code: 1, length: 4 })
        );

        let mut bad_prefer_failure = base.clone();
        bad_prefer_failure.extend_from_slice(&[2, 0, 0, 4, 0, 0, 0, 0]);
        assert_eq!(
            decode_response(&bad_prefer_failure),
            Err(DecodeError::MalformedOption { code: 2, length: 4 })
        );

        let mut bad_filter = base;
        bad_filter.extend_from_slice(&[3, 0, 0, 16]);
        bad_filter.extend_from_slice(&mapped(TARGET));
        assert_eq!(
            decode_response(&bad_filter),
            Err(DecodeError::MalformedOption {
                code: 3,
                length: 16
            })
        );

        // Only reachable on unaligned input, which decode_response refuses earlier.
        assert_eq!(
            decode_options(&[2, 0], 60),
            Err(DecodeError::TruncatedOption {
                offset: 60,
                available: 2
            })
        );
        assert_eq!(
            decode_options(&[0x80, 0, 0, 1, 9], 60),
            Err(DecodeError::OptionOverrun {
                code: 0x80,
                offset: 60,
                length: 1,
                available: 1
            })
        );
    }

    #[test]
    fn result_codes_round_trip_and_classify() {
        for code in 0..=u8::MAX {
            let result = ResultCode::from(code);
            assert_eq!(result.code(), code);
            assert!(!(result.is_long_lifetime_error() && result.is_short_lifetime_error()));
            assert!(!result.description().is_empty());
        }
        let long = [1, 2, 3, 4, 5, 6, 9, 12, 13];
        let short = [7, 8, 10];
        for code in 0..=u8::MAX {
            let result = ResultCode::from(code);
            assert_eq!(
                result.is_long_lifetime_error(),
                long.contains(&code),
                "{result}"
            );
            assert_eq!(
                result.is_short_lifetime_error(),
                short.contains(&code),
                "{result}"
            );
        }
        assert_eq!(ResultCode::NotAuthorized.to_string(), "NOT_AUTHORIZED (2)");
        assert_eq!(
            ResultCode::Other(99).to_string(),
            "unknown result code (99)"
        );
    }

    #[test]
    fn opcodes_round_trip() {
        for opcode in [Opcode::Announce, Opcode::Map, Opcode::Peer] {
            assert_eq!(Opcode::from_code(opcode.code()), Some(opcode));
        }
        assert_eq!(Opcode::from_code(3), None);
        assert_eq!(Opcode::Map.to_string(), "MAP");
    }

    /// xorshift64: deterministic, dependency-free noise.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut decoded = 0;
        for round in 0..100_000 {
            let len = (xorshift(&mut state) % 1200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut state) as u8).collect();
            // Half the inputs get a plausible header and length so the payload and option
            // paths are reached, not only the early rejections.
            if round % 2 == 0 && len >= 4 {
                bytes.truncate(len - len % 4);
                bytes[0] = VERSION;
                bytes[1] = R_BIT | (bytes[1] % 3);
                if bytes.len() > 64 && round % 4 == 0 {
                    bytes[60] %= 4;
                    bytes[62] = 0;
                    bytes[63] %= 24;
                }
            }
            if decode_response(&bytes).is_ok() {
                decoded += 1;
            }
            let _ = decode_options(&bytes, 0);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = text.parse::<Nonce>();
            }
        }
        assert!(decoded > 0, "the biased inputs should sometimes decode");
    }
}
