//! Router restart announcements: a gateway that starts (or reboots, or changes its external
//! address) multicasts to 224.0.0.1:5350 a PCP ANNOUNCE response (RFC 6887 §14.1.3) or a
//! NAT-PMP external-address response (RFC 6886 §3.2.1). Hearing one means the gateway's
//! mapping table may be empty: the daemon re-creates its mappings at once instead of waiting
//! for the next renewal to notice the epoch.
//!
//! Anyone on the LAN can send to 224.0.0.1, and a forged announcement must not make the
//! daemon re-create every mapping (README.md, "Security model: traffic and the router"). So a
//! datagram is an announcement only when it comes from the gateway's address **and** port
//! 5351 and decodes as a PCP ANNOUNCE or a NAT-PMP address announcement ([`classify`]), and
//! even then it is only a reason to ask the router once, by unicast ([`AnnounceGate`]): the
//! router's own answer (its epoch, its external address) decides, mappings granted before its
//! table began are restored, at most once per [`RESTORE_INTERVAL_SECS`], and the questions
//! themselves come from a small budget ([`CHECK_BURST`], one more per
//! [`CHECK_REFILL_SECS`]), so a flood costs the router a few requests a minute.
//!
//! This module owns the listening socket, the filter and the gate; the decoding is the
//! codecs' ([`super::pcp::codec`], [`super::natpmp::codec`]).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::RouterError;
use super::choice::RouterAddress;
use super::natpmp::client::{NatpmpClient, Schedule as NatpmpSchedule};
use super::natpmp::codec as natpmp;
use super::pcp::client::{CHECK_SCHEDULE, PcpClient, epoch_is_consistent};
use super::pcp::codec as pcp;
use crate::model::{Backend, MappingKey};
use crate::state::{MappingRecord, MappingStatus, State};

// NOTE: RFC 6887 §14.1.3 reuses NAT-PMP's group and port (RFC 6886 §3.2.1), so one socket
// hears both protocols.
const _: () = assert!(pcp::ANNOUNCE_PORT == natpmp::ANNOUNCE_PORT);

/// Where gateways send announcements.
pub const ANNOUNCE_GROUP: Ipv4Addr = pcp::ANNOUNCE_GROUP_V4;
/// The UDP port announcements go to.
pub const ANNOUNCE_PORT: u16 = pcp::ANNOUNCE_PORT;
/// The UDP port announcements come from: the server's own.
// NOTE: RFC 6886 §3.2.1 and RFC 6887 §14.1.3: the server multicasts from the socket it
// serves on, port 5351 (measured: miniupnpd 2.3.1 does, tests/edge_lab.rs).
pub const SERVER_PORT: u16 = pcp::SERVER_PORT;
const _: () = assert!(pcp::SERVER_PORT == natpmp::SERVER_PORT);

/// Unicast checks the gate allows at once (a real restart sends a NAT-PMP and a PCP
/// announcement, and an address change may follow within seconds).
pub const CHECK_BURST: u32 = 3;
/// One more check is allowed per this many seconds, up to [`CHECK_BURST`]: a flood of
/// forged announcements costs the router two requests a minute.
pub const CHECK_REFILL_SECS: u64 = 30;
/// At most one restore of lost mappings per this many seconds, whatever arrives.
pub const RESTORE_INTERVAL_SECS: u64 = 30;
/// Slack when the router's epoch is compared with holepunch's clock, plus 1/16 of the time
/// compared (RFC 6887 §8.5 allows as much), on top of the epoch's 1 s granularity.
const EPOCH_SLACK_MS: i64 = 1000;
/// A router that answers with an epoch this small (re)started within the last seconds: the
/// epoch cannot tell whether a mapping granted just before is still there, so every mapping
/// granted before the answer is restored (asking for one it holds is a renewal).
const FRESH_EPOCH_SECS: u32 = 2;
/// The NAT-PMP check: two tries, 1 s then 2 s (as PCP's [`CHECK_SCHEDULE`]).
const NATPMP_CHECK_SCHEDULE: NatpmpSchedule = NatpmpSchedule {
    initial: Duration::from_secs(1),
    max_tries: 2,
};

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

    #[error("it came from port {} of the gateway, not from its server port {SERVER_PORT}", .0.port())]
    NotFromServerPort(SocketAddr),

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
    // NOTE: only the configured gateway's server port is believed: any LAN host can send to
    // 224.0.0.1, and a process on the router that is not the server (or a forger using the
    // router's address from another port) must not be taken for it.
    if source.ip() != IpAddr::V4(gateway) {
        return Err(Ignored::NotFromGateway(source));
    }
    if source.port() != SERVER_PORT {
        return Err(Ignored::NotFromServerPort(source));
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

/// The unicast request that checks an announcement with the router: the cheapest one of the
/// protocol it came in, which shows the router's epoch (and, in NAT-PMP, its address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// A PCP ANNOUNCE request (RFC 6887 §14.1): the epoch.
    Pcp,
    /// A NAT-PMP external-address request (RFC 6886 §3.2): the epoch and the address.
    Natpmp,
}

/// What to do with one announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It says nothing the router's last answer did not (a repeat): nothing to do.
    Known,
    /// It would be news, but the check budget is spent: the next verify will see a restart.
    RateLimited,
    /// Ask the router this, once, and act on its answer ([`AnnounceGate::on_answer`]).
    Check(Check),
}

/// What the router answered to a [`Check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterAnswer {
    /// The request it answered.
    pub check: Check,
    /// Seconds since the router's mapping table was (re)initialized.
    pub epoch_secs: u32,
    /// Its external address, when the check tells it (NAT-PMP).
    pub external_address: Option<Ipv4Addr>,
}

impl RouterAnswer {
    /// Whether the router restarted since it granted `record` (and so lost it): its table is
    /// younger than `record` would be had it run on, that is its epoch now (under `epoch + 1`
    /// s) is behind the epoch at the grant (when `record` carries one of this answer's
    /// protocol; else 0) plus the time since (RFC 6887 §8.5, RFC 6886 §3.6; with 1 s + 1/16
    /// of slack). A router that just (re)started ([`FRESH_EPOCH_SECS`]) lost everything it
    /// granted before. `now` is the wall clock of the answer.
    pub fn lost(&self, record: &MappingRecord, now: Timestamp) -> bool {
        let Some(granted_at) = record.times.granted_at else {
            return false;
        };
        let age_ms = i64::try_from(now.duration_since(granted_at).as_millis()).unwrap_or(i64::MAX);
        if age_ms < 0 {
            return false;
        }
        if self.epoch_secs <= FRESH_EPOCH_SECS {
            return true;
        }
        let same_protocol = matches!(
            (self.check, record.backend),
            (Check::Pcp, Backend::Pcp) | (Check::Natpmp, Backend::Natpmp)
        );
        let epoch_at_grant = match record.epoch {
            Some(epoch) if same_protocol => i64::from(epoch),
            _ => 0,
        };
        let table_under_ms = (i64::from(self.epoch_secs) + 1) * 1000;
        let had_it_run_on_ms = (epoch_at_grant * 1000).saturating_add(age_ms);
        table_under_ms + EPOCH_SLACK_MS + age_ms / 16 <= had_it_run_on_ms
    }
}

/// The announcement gate: decides which announcements are worth one unicast request, and
/// whether the answer may restore mappings. Pure: every call takes `now`.
#[derive(Debug, Clone, Default)]
pub struct AnnounceGate {
    /// Checks left; refilled one per [`CHECK_REFILL_SECS`] from `refilled_at`.
    tokens: u32,
    refilled_at: Option<Instant>,
    /// The router's last answer, and when it came.
    confirmed: Option<(Instant, RouterAnswer)>,
    restored_at: Option<Instant>,
}

impl AnnounceGate {
    pub fn new() -> AnnounceGate {
        AnnounceGate::default()
    }

    /// What to do with `announcement` (already [`classify`]d) arriving at `now`.
    pub fn on_announcement(&mut self, now: Instant, announcement: &Announcement) -> Verdict {
        if self.is_known(now, announcement) {
            return Verdict::Known;
        }
        self.refill(now);
        if self.tokens == 0 {
            return Verdict::RateLimited;
        }
        self.tokens -= 1;
        Verdict::Check(match announcement {
            Announcement::Pcp { .. } => Check::Pcp,
            Announcement::Natpmp { .. } => Check::Natpmp,
        })
    }

    /// Records the router's `answer` to a check, received at `now`.
    pub fn on_answer(&mut self, now: Instant, answer: RouterAnswer) {
        // A PCP answer has no address: keep the one NAT-PMP told.
        let external_address = answer
            .external_address
            .or(self.confirmed.and_then(|(_, known)| known.external_address));
        self.confirmed = Some((
            now,
            RouterAnswer {
                check: Check::Natpmp,
                epoch_secs: answer.epoch_secs,
                external_address,
            },
        ));
    }

    /// Whether a restore may happen at `now`: none in the last [`RESTORE_INTERVAL_SECS`].
    pub fn may_restore(&self, now: Instant) -> bool {
        self.restored_at.is_none_or(|at| {
            now.saturating_duration_since(at) >= Duration::from_secs(RESTORE_INTERVAL_SECS)
        })
    }

    /// Records a restore at `now`.
    pub fn restored(&mut self, now: Instant) {
        self.restored_at = Some(now);
    }

    /// Whether the router's last answer already says what `announcement` says: an epoch
    /// consistent with the answer's (RFC 6887 §8.5) and, for NAT-PMP, the same address.
    fn is_known(&self, now: Instant, announcement: &Announcement) -> bool {
        let Some((at, known)) = self.confirmed else {
            return false;
        };
        let epoch_fits = epoch_is_consistent(
            known.epoch_secs,
            announcement.epoch_secs(),
            now.saturating_duration_since(at),
        );
        let address_fits = match announcement {
            Announcement::Pcp { .. } => true,
            Announcement::Natpmp {
                external_address, ..
            } => known.external_address == Some(*external_address),
        };
        epoch_fits && address_fits
    }

    fn refill(&mut self, now: Instant) {
        let Some(since) = self.refilled_at else {
            self.tokens = CHECK_BURST;
            self.refilled_at = Some(now);
            return;
        };
        let period = Duration::from_secs(CHECK_REFILL_SECS);
        let earned = now.saturating_duration_since(since).as_secs() / CHECK_REFILL_SECS;
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        if earned == 0 {
            return;
        }
        self.tokens = self.tokens.saturating_add(earned).min(CHECK_BURST);
        self.refilled_at = Some(if self.tokens == CHECK_BURST {
            now
        } else {
            since + period * earned
        });
    }
}

/// What answering one announcement showed, and changed in the state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Response {
    /// Active mappings the router lost: it restarted after granting them. The caller hands
    /// them to the plan as observations, which restores them (same ports and nonces).
    pub lost: BTreeSet<MappingKey>,
    /// Active mappings that record another external address than the router's answer.
    pub readdressed: usize,
    /// The router's external address when `readdressed` mappings record another: the
    /// caller hands it to the plan as an observation, which corrects them.
    pub external_address: Option<Ipv4Addr>,
    /// No router protocol is chosen yet and the router spoke: probe it now.
    pub probe: bool,
}

/// Acts on the router's `answer` to a check: records it in `gate`; names a new external
/// address when active mappings carry another; names the active mappings of `backend` the
/// router granted before its table began (lost), when `gate` allows a restore.
/// `now` and `wall` are the same moment on the monotonic and the wall clock. Pure.
pub fn apply_answer(
    gate: &mut AnnounceGate,
    answer: RouterAnswer,
    now: Instant,
    wall: Timestamp,
    backend: Backend,
    state: &State,
) -> Response {
    gate.on_answer(now, answer);
    let mut response = Response::default();
    if let Some(address) = answer.external_address {
        // A new address is no restart: the mappings stay (miniupnpd keeps them); only what
        // holepunch tells the Services changes. No request to the router.
        response.readdressed = state
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Active)
            .filter(|r| r.external_address.is_some_and(|a| a != address))
            .count();
        if response.readdressed > 0 {
            response.external_address = Some(address);
        }
    }
    if backend != Backend::None && gate.may_restore(now) {
        response.lost = state
            .mappings
            .values()
            .filter(|r| {
                r.status == MappingStatus::Active && r.backend == backend && answer.lost(r, wall)
            })
            .map(MappingRecord::key)
            .collect();
        if !response.lost.is_empty() {
            gate.restored(now);
        }
    }
    response
}

/// Asks the router `check` once (two tries, about 3 s at most) from `router.local`.
pub async fn ask(router: &RouterAddress, check: Check) -> Result<RouterAnswer, RouterError> {
    match check {
        Check::Pcp => {
            let mut client =
                PcpClient::new(router.gateway, router.local).with_schedule(CHECK_SCHEDULE);
            let epoch_secs = client.announce().await?;
            Ok(RouterAnswer {
                check,
                epoch_secs,
                external_address: None,
            })
        }
        Check::Natpmp => {
            let mut client = NatpmpClient::new(router.gateway, router.local)
                .with_schedule(NATPMP_CHECK_SCHEDULE);
            let address = client.ask_external_address().await?;
            let epoch_secs = client.last_epoch().ok_or_else(|| RouterError::Unusable {
                protocol: "NAT-PMP",
                what: "an answer without an epoch".to_owned(),
            })?;
            Ok(RouterAnswer {
                check,
                epoch_secs,
                external_address: Some(address),
            })
        }
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

    #[test]
    fn only_the_server_port_of_the_gateway_is_believed() {
        for port in [5350, 40000, 1] {
            let source = from([192, 168, 77, 1], port);
            assert_eq!(
                classify(source, GATEWAY, &pcp_announce(1)),
                Err(Ignored::NotFromServerPort(source))
            );
        }
        assert!(classify(from([192, 168, 77, 1], 5351), GATEWAY, &pcp_announce(1)).is_ok());
    }

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    fn wall(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn natpmp(epoch_secs: u32, external_address: Ipv4Addr) -> Announcement {
        Announcement::Natpmp {
            epoch_secs,
            external_address,
        }
    }

    /// Two active PCP mappings granted at wall second 0 with `EXTERNAL`.
    fn granted_state() -> State {
        let mut state = State::default();
        for port in [8080, 8081] {
            let key = crate::model::MappingKey {
                protocol: crate::model::Protocol::Tcp,
                external_port: port,
            };
            let mut record = crate::state::MappingRecord::leftover(
                crate::model::Owner::new("default", "web"),
                key,
                crate::model::Endpoint::new(Ipv4Addr::new(192, 168, 77, 10), port),
                Backend::Pcp,
            );
            record.times.granted_at = Some(wall(0));
            record.external_address = Some(EXTERNAL);
            state.mappings.insert(key, record);
        }
        state
    }

    #[test]
    fn a_restart_is_the_router_epoch_behind_what_it_would_be() {
        let answer = |check, epoch_secs| RouterAnswer {
            check,
            epoch_secs,
            external_address: None,
        };
        // A UPnP mapping (no epoch) granted 100 s ago; the router's table is 3 s old.
        let mut upnp = granted_state().mappings.into_values().next().unwrap();
        upnp.backend = Backend::Upnp;
        upnp.epoch = None;
        assert!(answer(Check::Pcp, 3).lost(&upnp, wall(100)));
        // Its table is older than the mapping: no restart.
        assert!(!answer(Check::Pcp, 5000).lost(&upnp, wall(100)));
        assert!(!answer(Check::Natpmp, 100).lost(&upnp, wall(100)));
        // Within the slack (1 s granularity + 1 s + 1/16): clocks differ, no conclusion.
        assert!(!answer(Check::Pcp, 92).lost(&upnp, wall(100)));
        assert!(!answer(Check::Pcp, 3).lost(&upnp, wall(5)));
        // A router that just started lost what it granted before, however recently.
        assert!(answer(Check::Pcp, 0).lost(&upnp, wall(1)));
        assert!(answer(Check::Pcp, 2).lost(&upnp, wall(0)));
        assert!(answer(Check::Pcp, 91).lost(&upnp, wall(100)));
        // A grant "in the future" (the clock went back), or none, is no restart.
        assert!(!answer(Check::Pcp, 0).lost(&upnp, wall(-50)));
        upnp.times.granted_at = None;
        assert!(!answer(Check::Pcp, 0).lost(&upnp, wall(100)));

        // A PCP mapping granted by a router up for an hour, which restarted 5 s later and is
        // asked 3 s after that: the age alone cannot tell, the epoch at the grant can.
        let mut pcp = granted_state().mappings.into_values().next().unwrap();
        pcp.epoch = Some(3600);
        assert!(answer(Check::Pcp, 3).lost(&pcp, wall(8)));
        assert!(!answer(Check::Pcp, 3608).lost(&pcp, wall(8)));
        assert!(
            !answer(Check::Pcp, 3606).lost(&pcp, wall(8)),
            "within the slack"
        );
        // A NAT-PMP epoch is not compared with a PCP one (routers may count them apart).
        assert!(answer(Check::Pcp, 3600).lost(&pcp, wall(8)));
        assert!(!answer(Check::Natpmp, 3600).lost(&pcp, wall(8)));
        // ... though by the age alone a table younger than the mapping lost it.
        assert!(answer(Check::Natpmp, 3).lost(&pcp, wall(8)));
    }

    #[test]
    fn a_real_restart_is_checked_once_and_restores_once() {
        let start = Instant::now();
        let mut gate = AnnounceGate::new();
        let mut state = granted_state();
        // The router restarted at wall 95 and announces in both protocols.
        assert_eq!(
            gate.on_announcement(at(start, 100), &natpmp(5, EXTERNAL)),
            Verdict::Check(Check::Natpmp)
        );
        let answer = RouterAnswer {
            check: Check::Natpmp,
            epoch_secs: 5,
            external_address: Some(EXTERNAL),
        };
        let response = apply_answer(
            &mut gate,
            answer,
            at(start, 100),
            wall(100),
            Backend::Pcp,
            &state,
        );
        assert_eq!(response.lost.len(), 2);
        assert_eq!((response.readdressed, response.probe), (0, false));
        // Its PCP ANNOUNCE and the NAT-PMP repeats say nothing new: no request.
        for (secs, announcement) in [
            (100, Announcement::Pcp { epoch_secs: 5 }),
            (101, natpmp(6, EXTERNAL)),
            (108, natpmp(13, EXTERNAL)),
        ] {
            assert_eq!(
                gate.on_announcement(at(start, secs), &announcement),
                Verdict::Known
            );
        }
        // Another restart shown within 30 s restores nothing; after them it does.
        for record in state.mappings.values_mut() {
            record.status = MappingStatus::Active;
        }
        let again = RouterAnswer {
            check: Check::Pcp,
            epoch_secs: 1,
            external_address: None,
        };
        let early = apply_answer(
            &mut gate,
            again,
            at(start, 120),
            wall(120),
            Backend::Pcp,
            &state,
        );
        assert!(early.lost.is_empty(), "within 30 s of the last restore");
        let later = apply_answer(
            &mut gate,
            again,
            at(start, 130),
            wall(130),
            Backend::Pcp,
            &state,
        );
        assert_eq!(later.lost.len(), 2);
    }

    #[test]
    fn a_flood_costs_a_few_checks_a_minute_and_restores_nothing() {
        let start = Instant::now();
        let mut gate = AnnounceGate::new();
        let state = granted_state();
        // The router is up since long before the mappings (epoch 10,000 at wall 100).
        let real = |secs: u64| RouterAnswer {
            check: Check::Natpmp,
            epoch_secs: 9_900 + secs as u32,
            external_address: Some(EXTERNAL),
        };
        let mut checks = 0;
        // Ten forged "restarts" a second for two minutes, from the router's address and port.
        for tenth in 0..1200u64 {
            let now = start + Duration::from_millis(100 * tenth);
            let secs = 100 + tenth / 10;
            let forged = if tenth % 2 == 0 {
                natpmp(0, Ipv4Addr::new(6, 6, 6, 6))
            } else {
                Announcement::Pcp { epoch_secs: 0 }
            };
            if let Verdict::Check(_) = gate.on_announcement(now, &forged) {
                checks += 1;
                let response = apply_answer(
                    &mut gate,
                    real(secs),
                    now,
                    wall(secs as i64),
                    Backend::Pcp,
                    &state,
                );
                assert_eq!(response, Response::default());
            }
        }
        // 3 at once, then one each at 30, 60 and 90 s: 6 requests in two minutes.
        assert_eq!(checks, CHECK_BURST as usize + 3);
        assert_eq!(
            state
                .mappings
                .values()
                .map(|r| r.external_address)
                .collect::<Vec<_>>(),
            [Some(EXTERNAL); 2],
            "forged addresses are never recorded"
        );
        // The budget comes back: a real restart after the flood is checked and restores.
        let later = at(start, 120 + 90);
        let verdict = gate.on_announcement(later, &Announcement::Pcp { epoch_secs: 2 });
        assert_eq!(verdict, Verdict::Check(Check::Pcp));
        let restart = RouterAnswer {
            check: Check::Pcp,
            epoch_secs: 2,
            external_address: None,
        };
        let response = apply_answer(&mut gate, restart, later, wall(310), Backend::Pcp, &state);
        assert_eq!(response.lost.len(), 2);
    }

    #[test]
    fn a_confirmed_new_address_is_recorded_without_a_restore() {
        const NEW: Ipv4Addr = Ipv4Addr::new(11, 22, 33, 45);
        let start = Instant::now();
        let mut gate = AnnounceGate::new();
        let state = granted_state();
        assert_eq!(
            gate.on_announcement(at(start, 100), &natpmp(10_000, NEW)),
            Verdict::Check(Check::Natpmp)
        );
        let answer = RouterAnswer {
            check: Check::Natpmp,
            epoch_secs: 10_000,
            external_address: Some(NEW),
        };
        let response = apply_answer(
            &mut gate,
            answer,
            at(start, 100),
            wall(100),
            Backend::Pcp,
            &state,
        );
        assert!(response.lost.is_empty());
        assert_eq!((response.readdressed, response.probe), (2, false));
        // Named for the plan, which corrects the records; nothing changed here.
        assert_eq!(response.external_address, Some(NEW));
        assert!(
            state
                .mappings
                .values()
                .all(|r| r.external_address == Some(EXTERNAL))
        );
        // The same address again is known; the old one is news again.
        assert_eq!(
            gate.on_announcement(at(start, 101), &natpmp(10_001, NEW)),
            Verdict::Known
        );
        assert_eq!(
            gate.on_announcement(at(start, 102), &natpmp(10_002, EXTERNAL)),
            Verdict::Check(Check::Natpmp)
        );
    }

    #[test]
    fn no_backend_restores_nothing() {
        let start = Instant::now();
        let mut gate = AnnounceGate::new();
        let state = granted_state();
        let answer = RouterAnswer {
            check: Check::Pcp,
            epoch_secs: 0,
            external_address: None,
        };
        let response = apply_answer(&mut gate, answer, start, wall(100), Backend::None, &state);
        assert!(response.lost.is_empty());
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
