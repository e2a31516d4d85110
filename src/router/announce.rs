//! Router restart announcements: a gateway that starts (or reboots, or changes its external
//! address) multicasts to 224.0.0.1:5350 a PCP ANNOUNCE response (RFC 6887 §14.1.3) or a
//! NAT-PMP external-address response (RFC 6886 §3.2.1). Hearing one means the gateway's
//! mapping table may be empty: the daemon re-creates its mappings at once instead of waiting
//! for the next renewal to notice the epoch.
//!
//! This module owns the listening socket and the filter (only the configured gateway is
//! believed); the decoding is the codecs' ([`super::pcp::codec`], [`super::natpmp::codec`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::natpmp::codec as natpmp;
use super::pcp::codec as pcp;

// NOTE: RFC 6887 §14.1.3 reuses NAT-PMP's group and port (RFC 6886 §3.2.1), so one socket
// hears both protocols.
const _: () = assert!(pcp::ANNOUNCE_PORT == natpmp::ANNOUNCE_PORT);

/// Where gateways send announcements.
pub const ANNOUNCE_GROUP: Ipv4Addr = pcp::ANNOUNCE_GROUP_V4;
/// The UDP port announcements go to.
pub const ANNOUNCE_PORT: u16 = pcp::ANNOUNCE_PORT;

/// Receive buffer: larger than any PCP message (1100 bytes), so that nothing is truncated
/// into something that decodes.
const RECV_BUFFER_BYTES: usize = 2048;
/// Pause after a failed receive, so that a persistent socket error cannot spin the loop.
const RECV_ERROR_PAUSE_MS: u64 = 100;

/// A gateway said it (re)started: its mapping table may be empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// A PCP ANNOUNCE response (RFC 6887 §14.1.3).
    Pcp { epoch_secs: u32 },
    /// A NAT-PMP external-address response sent unsolicited (RFC 6886 §3.2.1).
    Natpmp {
        epoch_secs: u32,
        external_address: Ipv4Addr,
    },
}

impl Announcement {
    /// The gateway's epoch: seconds since its mapping table was (re)initialized.
    pub fn epoch_secs(&self) -> u32 {
        match *self {
            Announcement::Pcp { epoch_secs } | Announcement::Natpmp { epoch_secs, .. } => {
                epoch_secs
            }
        }
    }
}

/// Why the announcement listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("cannot open a UDP socket for router announcements: {0}")]
    OpenSocket(#[source] io::Error),

    #[error("cannot set {option} on the router announcement socket: {source}")]
    SetOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot listen on 0.0.0.0:{ANNOUNCE_PORT} for router announcements: {0}; a program \
         that holds the port without SO_REUSEADDR blocks it (see `ss -ulpn sport = :5350`)"
    )]
    Bind(#[source] io::Error),

    #[error(
        "cannot join {ANNOUNCE_GROUP} on the interface of {lan_address}: {source}; check that \
         exposure.lan_address is an address of this host"
    )]
    JoinGroup {
        lan_address: Ipv4Addr,
        #[source]
        source: io::Error,
    },

    #[error("cannot register the router announcement socket with the tokio runtime: {0}")]
    Register(#[source] io::Error),
}

/// Why a datagram on the announcement port was not taken as an announcement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("it came from {0}, not from the gateway")]
    NotFromGateway(SocketAddr),

    #[error("it is no PCP or NAT-PMP message: {0}")]
    Undecodable(String),

    #[error("it is a {0}, not an announcement")]
    NotAnAnnouncement(String),
}

/// What one datagram from `source` means: an announcement from `gateway`, or why not.
/// Pure, and never panics on any input.
pub fn classify(
    source: SocketAddr,
    gateway: Ipv4Addr,
    bytes: &[u8],
) -> Result<Announcement, Ignored> {
    // NOTE: only the configured gateway is believed: any LAN host can send to 224.0.0.1, and
    // a forged announcement would make the daemon re-create every mapping.
    if source.ip() != IpAddr::V4(gateway) {
        return Err(Ignored::NotFromGateway(source));
    }
    decode(bytes)
}

/// Decode an announcement of either protocol; the version byte says which.
pub fn decode(bytes: &[u8]) -> Result<Announcement, Ignored> {
    match bytes.first() {
        Some(&natpmp::VERSION) => {
            let response = natpmp::decode_response(bytes)
                .map_err(|err| Ignored::Undecodable(err.to_string()))?;
            match (response.result, response.body) {
                (natpmp::ResultCode::Success, natpmp::ResponseBody::ExternalAddress(address)) => {
                    Ok(Announcement::Natpmp {
                        epoch_secs: response.epoch_secs,
                        external_address: address,
                    })
                }
                _ => Err(Ignored::NotAnAnnouncement(format!(
                    "NAT-PMP {:?} response ({})",
                    response.opcode, response.result
                ))),
            }
        }
        Some(&pcp::VERSION) => {
            let response =
                pcp::decode_response(bytes).map_err(|err| Ignored::Undecodable(err.to_string()))?;
            match response.body {
                // NOTE: the result code is not checked: an ANNOUNCE says the server restarted
                // whatever it carries (RFC 6887 §14.1.3 sends SUCCESS).
                pcp::ResponseBody::Announce => Ok(Announcement::Pcp {
                    epoch_secs: response.epoch_secs,
                }),
                _ => Err(Ignored::NotAnAnnouncement(format!(
                    "PCP {} response",
                    response.opcode()
                ))),
            }
        }
        Some(&version) => Err(Ignored::Undecodable(format!(
            "version {version} is neither NAT-PMP (0) nor PCP (2)"
        ))),
        None => Err(Ignored::Undecodable("empty datagram".to_owned())),
    }
}

/// Listens for announcements of one gateway.
#[derive(Debug)]
pub struct AnnounceListener {
    socket: UdpSocket,
    gateway: Ipv4Addr,
    ignored: u64,
}

impl AnnounceListener {
    /// Join 224.0.0.1 on the interface that holds `lan_address` and listen on 0.0.0.0:5350.
    /// The port is shared (SO_REUSEADDR and SO_REUSEPORT), so other listeners on the host,
    /// and they this one, keep working. Must be called inside a tokio runtime.
    pub fn bind(
        lan_address: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<AnnounceListener, AnnounceError> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(AnnounceError::OpenSocket)?;
        let option = |option: &'static str| {
            move |source: io::Error| AnnounceError::SetOption { option, source }
        };
        socket
            .set_reuse_address(true)
            .map_err(option("SO_REUSEADDR"))?;
        socket
            .set_reuse_port(true)
            .map_err(option("SO_REUSEPORT"))?;
        socket.set_nonblocking(true).map_err(option("O_NONBLOCK"))?;
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ANNOUNCE_PORT);
        socket.bind(&any.into()).map_err(AnnounceError::Bind)?;
        socket
            .join_multicast_v4(&ANNOUNCE_GROUP, &lan_address)
            .map_err(|source| AnnounceError::JoinGroup {
                lan_address,
                source,
            })?;
        // `from_std` panics outside a runtime; say so as an error instead.
        tokio::runtime::Handle::try_current()
            .map_err(|err| AnnounceError::Register(io::Error::other(err)))?;
        let socket = UdpSocket::from_std(socket.into()).map_err(AnnounceError::Register)?;
        Ok(AnnounceListener {
            socket,
            gateway,
            ignored: 0,
        })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// How many datagrams [`AnnounceListener::next`] has ignored so far (from other hosts,
    /// or not announcements).
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// The next announcement from the gateway; other datagrams are ignored (logged at debug).
    /// Cancel-safe: a datagram is consumed only when it is looked at, and no state is kept
    /// across an await.
    pub async fn next(&mut self) -> Announcement {
        let mut buf = [0u8; RECV_BUFFER_BYTES];
        loop {
            match self.socket.recv_from(&mut buf).await {
                Ok((len, source)) => match classify(source, self.gateway, &buf[..len]) {
                    Ok(announcement) => {
                        tracing::debug!(gateway = %self.gateway, ?announcement, "router announcement");
                        return announcement;
                    }
                    Err(why) => {
                        self.ignored = self.ignored.saturating_add(1);
                        tracing::debug!(%source, reason = %why, "ignoring a datagram on the router announcement port");
                    }
                },
                Err(err) => {
                    tracing::debug!(error = %err, "receiving a router announcement failed");
                    tokio::time::sleep(Duration::from_millis(RECV_ERROR_PAUSE_MS)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(11, 22, 33, 44);

    fn from(address: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((address, port))
    }

    fn natpmp_announcement(epoch: u32) -> Vec<u8> {
        let mut out = vec![0, 128, 0, 0];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&EXTERNAL.octets());
        out
    }

    /// A PCP ANNOUNCE response: header only (RFC 6887 §7.2, §14.1).
    fn pcp_announce(epoch: u32) -> Vec<u8> {
        let mut out = vec![2, 0x80, 0, 0, 0, 0, 0, 0];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        out
    }

    #[test]
    fn announcements_of_both_protocols_decode() {
        let gateway = from([192, 168, 77, 1], 5351);
        assert_eq!(
            classify(gateway, GATEWAY, &natpmp_announcement(7)),
            Ok(Announcement::Natpmp {
                epoch_secs: 7,
                external_address: EXTERNAL
            })
        );
        let pcp = classify(gateway, GATEWAY, &pcp_announce(9));
        assert_eq!(pcp, Ok(Announcement::Pcp { epoch_secs: 9 }));
        assert_eq!(pcp.map(|a| a.epoch_secs()), Ok(9));
    }

    #[test]
    fn other_hosts_are_not_believed() {
        for source in [from([192, 168, 77, 20], 5351), from([11, 22, 33, 44], 5351)] {
            assert_eq!(
                classify(source, GATEWAY, &natpmp_announcement(1)),
                Err(Ignored::NotFromGateway(source))
            );
        }
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 5351));
        assert!(classify(v6, GATEWAY, &pcp_announce(1)).is_err());
    }

    #[test]
    fn other_messages_are_not_announcements() {
        let gateway = from([192, 168, 77, 1], 5351);
        // A NAT-PMP mapping response.
        let mut map = vec![0, 130, 0, 0, 0, 0, 0, 5];
        map.extend_from_slice(&[0x1f, 0x90, 0x1f, 0x90, 0, 0, 0x0e, 0x10]);
        assert!(matches!(
            classify(gateway, GATEWAY, &map),
            Err(Ignored::NotAnAnnouncement(_))
        ));
        // A NAT-PMP external-address error.
        assert!(matches!(
            classify(gateway, GATEWAY, &[0, 128, 0, 3, 0, 0, 0, 5]),
            Err(Ignored::NotAnAnnouncement(_))
        ));
        // Requests, not responses.
        assert!(matches!(
            classify(gateway, GATEWAY, &[0, 0]),
            Err(Ignored::Undecodable(_))
        ));
        let mut request = pcp_announce(0);
        request[1] = 0;
        assert!(matches!(
            classify(gateway, GATEWAY, &request),
            Err(Ignored::Undecodable(_))
        ));
        for bytes in [&[][..], &[1, 128], &[0xff; 24]] {
            assert!(matches!(
                classify(gateway, GATEWAY, bytes),
                Err(Ignored::Undecodable(_))
            ));
        }
    }

    /// xorshift64: deterministic, dependency-free noise.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn garbage_never_panics() {
        let gateway = from([192, 168, 77, 1], 5351);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut announcements = 0;
        for round in 0..100_000 {
            let len = (xorshift(&mut state) % 1500) as usize;
            let len = if round % 2 == 0 { len % 40 } else { len };
            let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut state) as u8).collect();
            // Most inputs get a plausible version and a response opcode, to reach the bodies.
            if round % 4 != 3 && len >= 2 {
                bytes[0] = if round % 2 == 0 { 0 } else { 2 };
                bytes[1] = 0x80 | (bytes[1] % 4);
            }
            if classify(gateway, GATEWAY, &bytes).is_ok() {
                announcements += 1;
            }
        }
        assert!(
            announcements > 0,
            "the biased inputs should sometimes decode"
        );
    }
}
