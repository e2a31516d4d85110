//! NAT-PMP wire format (RFC 6886): external-address and mapping requests out, responses in.
//!
//! Sans-io: typed values become datagrams and datagrams become typed values; no sockets, no
//! clocks, and no panic on any input. The client owns retransmission (§3.1), checking that a
//! response came from the gateway it asked, and reboot detection from
//! [`Response::epoch_secs`] (§3.6).

use std::fmt;
use std::net::Ipv4Addr;

use crate::model::Protocol;

/// The NAT-PMP version (§3).
pub const VERSION: u8 = 0;
/// UDP port the gateway listens on (§3).
pub const SERVER_PORT: u16 = 5351;
/// UDP port on which clients hear external-address announcements (§3.2.1).
pub const ANNOUNCE_PORT: u16 = 5350;
/// IPv4 group to which gateways send external-address announcements (§3.2.1).
pub const ANNOUNCE_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
/// Version, opcode, result code and epoch: what every response starts with (§3.5).
pub const HEADER_BYTES: usize = 8;
/// A full external-address response (§3.2).
pub const EXTERNAL_ADDRESS_RESPONSE_BYTES: usize = 12;
/// A full mapping response (§3.3).
pub const MAP_RESPONSE_BYTES: usize = 16;

const RESPONSE_BIT: u8 = 0x80;

/// Why a datagram is not a NAT-PMP response this client can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("NAT-PMP response of {len} bytes is too short: at least {min} bytes are needed")]
    TooShort { len: usize, min: usize },

    #[error(
        "the gateway answered with version {version}, not NAT-PMP's 0 \
         (version 2 is PCP: use router.backend = \"pcp\")"
    )]
    UnsupportedVersion { version: u8 },

    #[error("datagram is a NAT-PMP request, not a response (opcode {opcode} < 128)")]
    NotAResponse { opcode: u8 },

    #[error("NAT-PMP response carries unknown opcode {opcode}")]
    UnknownOpcode { opcode: u8 },
}

/// NAT-PMP operation (§3.2, §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    ExternalAddress,
    MapUdp,
    MapTcp,
}

impl Opcode {
    /// The request code; a response carries `128 + code`.
    pub fn code(self) -> u8 {
        match self {
            Opcode::ExternalAddress => 0,
            Opcode::MapUdp => 1,
            Opcode::MapTcp => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Opcode::ExternalAddress),
            1 => Some(Opcode::MapUdp),
            2 => Some(Opcode::MapTcp),
            _ => None,
        }
    }

    /// The mapping opcode for `protocol`.
    pub fn map(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Udp => Opcode::MapUdp,
            Protocol::Tcp => Opcode::MapTcp,
        }
    }

    /// The protocol a mapping opcode maps; `None` for [`Opcode::ExternalAddress`].
    pub fn protocol(self) -> Option<Protocol> {
        match self {
            Opcode::ExternalAddress => None,
            Opcode::MapUdp => Some(Protocol::Udp),
            Opcode::MapTcp => Some(Protocol::Tcp),
        }
    }
}

/// Result code of a response (§3.5): 16 bits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    Success,
    UnsupportedVersion,
    NotAuthorized,
    NetworkFailure,
    OutOfResources,
    UnsupportedOpcode,
    Other(u16),
}

impl ResultCode {
    pub fn code(self) -> u16 {
        match self {
            ResultCode::Success => 0,
            ResultCode::UnsupportedVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::NetworkFailure => 3,
            ResultCode::OutOfResources => 4,
            ResultCode::UnsupportedOpcode => 5,
            ResultCode::Other(code) => code,
        }
    }

    /// What the code means, in words for the user.
    pub fn description(self) -> &'static str {
        match self {
            ResultCode::Success => "success",
            ResultCode::UnsupportedVersion => "the gateway does not support NAT-PMP version 0",
            ResultCode::NotAuthorized => {
                "the gateway refused: NAT-PMP is probably turned off in its settings"
            }
            ResultCode::NetworkFailure => {
                "the gateway has a network problem (for example no DHCP lease on its WAN side \
                 yet); it should pass"
            }
            ResultCode::OutOfResources => {
                "the gateway cannot create more mappings now: remove some or retry later"
            }
            ResultCode::UnsupportedOpcode => "the gateway does not support this NAT-PMP operation",
            ResultCode::Other(_) => {
                "the gateway answered with a result code RFC 6886 does not define"
            }
        }
    }
}

impl From<u16> for ResultCode {
    fn from(code: u16) -> Self {
        match code {
            0 => ResultCode::Success,
            1 => ResultCode::UnsupportedVersion,
            2 => ResultCode::NotAuthorized,
            3 => ResultCode::NetworkFailure,
            4 => ResultCode::OutOfResources,
            5 => ResultCode::UnsupportedOpcode,
            other => ResultCode::Other(other),
        }
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.description(), self.code())
    }
}

/// Ask the gateway for its external IPv4 address (§3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExternalAddressRequest;

impl ExternalAddressRequest {
    pub fn encode(&self) -> Vec<u8> {
        vec![VERSION, Opcode::ExternalAddress.code()]
    }
}

/// Create, renew or delete one mapping (§3.3, §3.4). The gateway may grant another external
/// port than the suggested one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRequest {
    pub protocol: Protocol,
    pub internal_port: u16,
    /// 0 = no preference.
    pub suggested_external_port: u16,
    /// 0 deletes the mapping (see [`MapRequest::delete`]).
    pub lifetime_secs: u32,
}

impl MapRequest {
    /// The request that deletes the mapping of `internal_port`.
    // NOTE: a delete is lifetime 0 with suggested external port 0 (RFC 6886 §3.4).
    pub fn delete(protocol: Protocol, internal_port: u16) -> Self {
        MapRequest {
            protocol,
            internal_port,
            suggested_external_port: 0,
            lifetime_secs: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12);
        out.extend_from_slice(&[VERSION, Opcode::map(self.protocol).code(), 0, 0]);
        out.extend_from_slice(&self.internal_port.to_be_bytes());
        out.extend_from_slice(&self.suggested_external_port.to_be_bytes());
        out.extend_from_slice(&self.lifetime_secs.to_be_bytes());
        out
    }
}

/// A decoded NAT-PMP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub opcode: Opcode,
    pub result: ResultCode,
    /// Seconds since the gateway's port-mapping table was initialized: a value that falls
    /// behind the elapsed time means the gateway rebooted and lost its mappings (§3.6).
    pub epoch_secs: u32,
    pub body: ResponseBody,
}

/// The opcode-specific part of a [`Response`]. On error responses its fields carry no
/// information; check [`Response::result`] first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    ExternalAddress(Ipv4Addr),
    Map(MapResponse),
    /// An error response that stops after the common 8-byte header.
    // NOTE: RFC 6886 §3.5 defines the Unsupported Version reply as that header alone, and a
    // gateway may answer other errors as briefly; nothing is lost, since the body fields of
    // an error response carry no information.
    HeaderOnly,
}

/// Mapping part of a response (§3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapResponse {
    pub internal_port: u16,
    /// May differ from the suggested port.
    pub external_port: u16,
    /// May differ from the requested lifetime.
    pub lifetime_secs: u32,
}

impl Response {
    /// Whether this answers `request`: the mapping opcode of its protocol and, when the body
    /// is there, its internal port. A header-only error matches every request of its opcode.
    /// The caller must also check the datagram came from the gateway it asked (§3.1).
    pub fn matches(&self, request: &MapRequest) -> bool {
        if self.opcode != Opcode::map(request.protocol) {
            return false;
        }
        match self.body {
            ResponseBody::Map(map) => map.internal_port == request.internal_port,
            ResponseBody::HeaderOnly => true,
            ResponseBody::ExternalAddress(_) => false,
        }
    }
}

/// Decode one datagram received from a NAT-PMP gateway (solicited or an announcement).
/// Bytes after a full response are ignored. Never panics.
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let len = bytes.len();
    let too_short = |min| DecodeError::TooShort { len, min };
    // NOTE: the version goes first: a PCP-only gateway answers a version-0 request with a
    // version-2 UNSUPP_VERSION response (RFC 6887 §9), which must not be read as NAT-PMP.
    match bytes.first() {
        None => return Err(too_short(HEADER_BYTES)),
        Some(&VERSION) => {}
        Some(&version) => return Err(DecodeError::UnsupportedVersion { version }),
    }
    let Some((header, mut rest)) = bytes.split_first_chunk::<HEADER_BYTES>() else {
        return Err(too_short(HEADER_BYTES));
    };
    let [
        _version,
        opcode_byte,
        result_high,
        result_low,
        e0,
        e1,
        e2,
        e3,
    ] = *header;
    if opcode_byte & RESPONSE_BIT == 0 {
        return Err(DecodeError::NotAResponse {
            opcode: opcode_byte,
        });
    }
    let code = opcode_byte & !RESPONSE_BIT;
    let opcode = Opcode::from_code(code).ok_or(DecodeError::UnknownOpcode { opcode: code })?;
    let result = ResultCode::from(u16::from_be_bytes([result_high, result_low]));

    let body = match opcode {
        Opcode::ExternalAddress => take::<4>(&mut rest)
            .map(|octets| ResponseBody::ExternalAddress(Ipv4Addr::from(octets)))
            .ok_or(EXTERNAL_ADDRESS_RESPONSE_BYTES),
        Opcode::MapUdp | Opcode::MapTcp => take::<8>(&mut rest)
            .map(|[i0, i1, x0, x1, l0, l1, l2, l3]| {
                ResponseBody::Map(MapResponse {
                    internal_port: u16::from_be_bytes([i0, i1]),
                    external_port: u16::from_be_bytes([x0, x1]),
                    lifetime_secs: u32::from_be_bytes([l0, l1, l2, l3]),
                })
            })
            .ok_or(MAP_RESPONSE_BYTES),
    };
    let body = match body {
        Ok(body) => body,
        Err(_) if result != ResultCode::Success => ResponseBody::HeaderOnly,
        Err(full_bytes) => return Err(too_short(full_bytes)),
    };
    Ok(Response {
        opcode,
        result,
        epoch_secs: u32::from_be_bytes([e0, e1, e2, e3]),
        body,
    })
}

fn take<const N: usize>(cursor: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = cursor.split_first_chunk::<N>()?;
    *cursor = tail;
    Some(*head)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

    fn tcp_8080_request() -> MapRequest {
        MapRequest {
            protocol: Protocol::Tcp,
            internal_port: 8080,
            suggested_external_port: 8080,
            lifetime_secs: 7200,
        }
    }

    /// A mapping response, built field by field from §3.3.
    fn map_response_bytes(
        opcode: u8,
        result: u16,
        epoch: u32,
        internal: u16,
        external: u16,
        lifetime: u32,
    ) -> Vec<u8> {
        let mut out = vec![0, opcode];
        out.extend_from_slice(&result.to_be_bytes());
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&internal.to_be_bytes());
        out.extend_from_slice(&external.to_be_bytes());
        out.extend_from_slice(&lifetime.to_be_bytes());
        out
    }

    #[test]
    fn requests_are_byte_exact() {
        assert_eq!(ExternalAddressRequest.encode(), [0x00, 0x00]);
        #[rustfmt::skip]
        let tcp: [u8; 12] = [
            // version 0, opcode 2 (TCP), reserved
            0x00, 0x02, 0x00, 0x00,
            // internal port 8080, suggested external port 8080
            0x1f, 0x90, 0x1f, 0x90,
            // lifetime 7200
            0x00, 0x00, 0x1c, 0x20,
        ];
        assert_eq!(tcp_8080_request().encode(), tcp);
        #[rustfmt::skip]
        let udp_delete: [u8; 12] = [
            0x00, 0x01, 0x00, 0x00,
            0xcf, 0x08, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(
            MapRequest::delete(Protocol::Udp, 53000).encode(),
            udp_delete
        );
    }

    #[test]
    fn external_address_response_vector_decodes() {
        #[rustfmt::skip]
        let bytes = [
            0x00, 0x80, 0x00, 0x00,
            0x00, 0x01, 0x51, 0x80,
            203, 0, 113, 7,
        ];
        assert_eq!(
            decode_response(&bytes),
            Ok(Response {
                opcode: Opcode::ExternalAddress,
                result: ResultCode::Success,
                epoch_secs: 86400,
                body: ResponseBody::ExternalAddress(EXTERNAL),
            })
        );
    }

    #[test]
    fn map_response_vector_decodes() {
        #[rustfmt::skip]
        let bytes = [
            // version 0, opcode 130 (TCP response), result 0
            0x00, 0x82, 0x00, 0x00,
            // epoch 1000
            0x00, 0x00, 0x03, 0xe8,
            // internal 8080, mapped external 8081
            0x1f, 0x90, 0x1f, 0x91,
            // lifetime 3600
            0x00, 0x00, 0x0e, 0x10,
        ];
        let response = decode_response(&bytes).expect("valid response");
        assert_eq!(
            response,
            Response {
                opcode: Opcode::MapTcp,
                result: ResultCode::Success,
                epoch_secs: 1000,
                body: ResponseBody::Map(MapResponse {
                    internal_port: 8080,
                    external_port: 8081,
                    lifetime_secs: 3600,
                }),
            }
        );
        assert!(response.matches(&tcp_8080_request()));
    }

    #[test]
    fn map_round_trips_for_both_protocols() {
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let request = MapRequest {
                protocol,
                ..tcp_8080_request()
            };
            let sent = request.encode();
            let reply = map_response_bytes(128 + sent[1], 0, 77, 8080, 8080, 7200);
            let response = decode_response(&reply).expect("valid response");
            assert_eq!(response.opcode, Opcode::map(protocol));
            assert_eq!(response.opcode.protocol(), Some(protocol));
            assert_eq!(response.epoch_secs, 77);
            assert_eq!(
                response.body,
                ResponseBody::Map(MapResponse {
                    internal_port: request.internal_port,
                    external_port: request.suggested_external_port,
                    lifetime_secs: request.lifetime_secs,
                })
            );
            assert!(response.matches(&request));
        }
    }

    #[test]
    fn matches_checks_opcode_and_internal_port() {
        let request = tcp_8080_request();
        let udp = decode_response(&map_response_bytes(129, 0, 1, 8080, 8080, 60)).expect("valid");
        assert!(!udp.matches(&request));
        let other_port =
            decode_response(&map_response_bytes(130, 0, 1, 8081, 8080, 60)).expect("valid");
        assert!(!other_port.matches(&request));
        let address = decode_response(&[0, 128, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]).expect("valid");
        assert!(!address.matches(&request));
    }

    #[test]
    fn error_responses_keep_result_and_epoch() {
        let refused = decode_response(&map_response_bytes(130, 2, 500, 8080, 0, 0)).expect("valid");
        assert_eq!(refused.result, ResultCode::NotAuthorized);
        assert_eq!(refused.epoch_secs, 500);
        assert!(refused.matches(&tcp_8080_request()));

        // Unsupported Version: the 8-byte header alone.
        let short = decode_response(&[0, 130, 0, 1, 0, 0, 0, 9]).expect("valid");
        assert_eq!(short.result, ResultCode::UnsupportedVersion);
        assert_eq!(short.body, ResponseBody::HeaderOnly);
        assert_eq!(short.epoch_secs, 9);
        assert!(short.matches(&tcp_8080_request()));

        let no_address = decode_response(&[0, 128, 0, 3, 0, 0, 0, 9, 0]).expect("valid");
        assert_eq!(no_address.result, ResultCode::NetworkFailure);
        assert_eq!(no_address.body, ResponseBody::HeaderOnly);
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut bytes = map_response_bytes(130, 0, 1, 8080, 8080, 60);
        bytes.extend_from_slice(&[0xde, 0xad]);
        assert!(decode_response(&bytes).is_ok());
    }

    #[test]
    fn every_error() {
        assert_eq!(
            decode_response(&[]),
            Err(DecodeError::TooShort { len: 0, min: 8 })
        );
        assert_eq!(
            decode_response(&[0, 128, 0, 0]),
            Err(DecodeError::TooShort { len: 4, min: 8 })
        );
        assert_eq!(
            decode_response(&[0, 128, 0, 0, 0, 0, 0, 1, 1, 2]),
            Err(DecodeError::TooShort { len: 10, min: 12 })
        );
        assert_eq!(
            decode_response(&map_response_bytes(129, 0, 1, 8080, 8080, 60)[..12]),
            Err(DecodeError::TooShort { len: 12, min: 16 })
        );
        // What a PCP-only server answers: version 2, UNSUPP_VERSION.
        assert_eq!(
            decode_response(&[2, 0x81, 0, 1]),
            Err(DecodeError::UnsupportedVersion { version: 2 })
        );
        assert_eq!(
            decode_response(&tcp_8080_request().encode()),
            Err(DecodeError::NotAResponse { opcode: 2 })
        );
        assert_eq!(
            decode_response(&[0, 131, 0, 5, 0, 0, 0, 1]),
            Err(DecodeError::UnknownOpcode { opcode: 3 })
        );
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..=u16::MAX {
            assert_eq!(ResultCode::from(code).code(), code);
        }
        for opcode in [Opcode::ExternalAddress, Opcode::MapUdp, Opcode::MapTcp] {
            assert_eq!(Opcode::from_code(opcode.code()), Some(opcode));
        }
        assert_eq!(Opcode::from_code(3), None);
        assert_eq!(Opcode::ExternalAddress.protocol(), None);
        assert_eq!(
            ResultCode::OutOfResources.to_string(),
            "the gateway cannot create more mappings now: remove some or retry later (4)"
        );
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
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut decoded = 0;
        for round in 0..100_000 {
            let len = (xorshift(&mut state) % 1200) as usize;
            let len = if round % 2 == 0 { len % 20 } else { len };
            let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut state) as u8).collect();
            // Half the inputs get a plausible version and opcode so the body paths are reached.
            if round % 2 == 0 && len >= 2 {
                bytes[0] = VERSION;
                bytes[1] = RESPONSE_BIT | (bytes[1] % 3);
            }
            if decode_response(&bytes).is_ok() {
                decoded += 1;
            }
        }
        assert!(decoded > 0, "the biased inputs should sometimes decode");
    }
}
