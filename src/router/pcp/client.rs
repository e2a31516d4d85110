//! PCP client (RFC 6887): one UDP socket toward the gateway, MAP requests with retransmission
//! (§8.1.1), response matching (§8.3) and epoch tracking (§8.5). The wire format lives in
//! [`super::codec`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::codec::{self, Nonce, ResultCode};
use crate::model::{Backend, Lease, MappingKey, Protocol};
use crate::router::udp::{Route, UdpExchange, Verdict};
use crate::router::{Grant, MapRequest, PortMapper, RouterError, clamp};

/// Receive buffer: larger than the 1100-byte PCP limit so that oversized datagrams are seen
/// (and rejected by the codec) rather than silently truncated.
const RECV_BUFFER_BYTES: usize = 2048;

/// Retransmission schedule of one request (RFC 6887 §8.1.1), bounded by `max_tries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// IRT: the wait after the first transmission (before jitter).
    pub initial: Duration,
    /// MRT: the cap of the doubling wait (before jitter).
    pub max: Duration,
    /// Transmissions before the call gives up with [`RouterError::Unreachable`] (at least 1).
    pub max_tries: u32,
}

/// The schedule of the verify check's ANNOUNCE: 1 s, then 2 s (about 3 s in all).
pub const CHECK_SCHEDULE: Schedule = Schedule {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(2),
    max_tries: 2,
};

impl Default for Schedule {
    /// IRT 3 s, MRT 1024 s, 3 tries: about 3 + 6 + 12 = 21 s (±10%) before giving up. The
    /// reconciler retries later with its own backoff, so one call need not wait for MRC.
    fn default() -> Self {
        Schedule {
            initial: Duration::from_secs(3),
            max: Duration::from_secs(1024),
            max_tries: 3,
        }
    }
}

impl Schedule {
    /// The nominal (unjittered) wait after transmission number `index` (0-based): IRT
    /// doubling, capped at MRT.
    fn nominal_wait(&self, index: u32) -> Duration {
        let factor = 1u32.checked_shl(index.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The wait after transmission number `index`: RT = (1 + RAND) * min(IRT * 2^index, MRT)
    /// with RAND in [-0.1, +0.1] (§8.1.1).
    // NOTE: §8.1.1 doubles the previous *jittered* RT, so jitter compounds (3 tries could
    // take 26.5 s); doubling the nominal RT keeps the same shape with a tight bound.
    fn wait(&self, index: u32, rand: f64) -> Duration {
        self.nominal_wait(index)
            .mul_f64(1.0 + rand.clamp(-0.1, 0.1))
    }

    /// The waits of one call, each with its own jitter.
    pub fn waits(&self) -> impl Iterator<Item = Duration> + use<> {
        let schedule = *self;
        (0..schedule.max_tries.max(1))
            .map(move |index| schedule.wait(index, rand::random_range(-0.1..=0.1)))
    }

    /// The longest a call can wait in total (every wait at +10%).
    pub fn worst_case(&self) -> Duration {
        (0..self.max_tries.max(1))
            .map(|index| self.wait(index, 0.1))
            .sum()
    }
}

/// The last epoch the server reported (§8.5), and when it was seen.
#[derive(Debug, Clone, Copy)]
struct EpochSeen {
    server_secs: u32,
    at: Instant,
}

/// Whether a server epoch is consistent with the previous one (RFC 6887 §8.5): `false` means
/// the server lost its state (rebooted, or was replaced) and every mapping must be re-created.
///
/// Invalid when the epoch went back by more than one second, or when the server's clock and
/// the client's clock advanced too differently: `client_delta + 2 < server_delta -
/// server_delta/16` or `server_delta + 2 < client_delta - client_delta/16`.
pub fn epoch_is_consistent(previous_secs: u32, current_secs: u32, elapsed: Duration) -> bool {
    let previous = i64::from(previous_secs);
    let current = i64::from(current_secs);
    if current < previous - 1 {
        return false;
    }
    let server_delta = current - previous;
    let client_delta = i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX / 2);
    !(client_delta + 2 < server_delta - server_delta / 16
        || server_delta + 2 < client_delta - client_delta / 16)
}

/// When to renew a grant of `lifetime_secs`: a random point in [1/2, 5/8] of the lifetime
/// (README.md, "Router protocols"), `unit` in [0, 1] choosing where. `None` for a zero lifetime.
fn renew_point(lifetime_secs: u32, unit: f64) -> Option<Duration> {
    if lifetime_secs == 0 {
        return None;
    }
    let lifetime = Duration::from_secs(u64::from(lifetime_secs));
    let low = lifetime / 2;
    let high = lifetime * 5 / 8;
    Some(low + (high - low).mul_f64(unit.clamp(0.0, 1.0)))
}

/// A random renewal point in [1/2, 5/8] of `lifetime_secs`; `None` for a zero lifetime.
pub fn renew_after(lifetime_secs: u32) -> Option<Duration> {
    renew_point(lifetime_secs, rand::random_range(0.0..=1.0))
}

/// What an error result code means for the reconciler. `port` and `protocol` name the
/// mapping asked for; `lifetime_secs` is how long the server says the error will last, used
/// as the retry floor only clamped into 30 s .. 30 min ([`clamp::retry_hint`]).
pub fn error_for_result(
    result: ResultCode,
    lifetime_secs: u32,
    protocol: Protocol,
    port: u16,
) -> RouterError {
    let detail = format!("{}: {}", result.name(), result.description());
    match result {
        ResultCode::CannotProvideExternal => RouterError::Conflict {
            port,
            protocol,
            detail,
        },
        _ => RouterError::Refused {
            reason: detail,
            retry_after: clamp::retry_hint(lifetime_secs),
        },
    }
}

/// The refusal for a SUCCESS that grants 0 s: RFC 6887 §15 reads lifetime 0 as "deleted", so
/// nothing is mapped; recording it would make a permanent mapping of it.
fn zero_lifetime(protocol: Protocol, port: u16) -> RouterError {
    RouterError::Refused {
        reason: format!(
            "the router answered the mapping of {port}/{protocol} with SUCCESS and a lifetime \
             of 0 s, which maps nothing; asking again later"
        ),
        retry_after: None,
    }
}

/// The refusal for a gateway that does not speak PCP version 2.
fn version_mismatch(err: &codec::DecodeError) -> RouterError {
    let reason = match err {
        codec::DecodeError::NatPmpServer => format!(
            "the router speaks NAT-PMP only, not PCP: set router.backend = \"natpmp\" ({err})"
        ),
        _ => err.to_string(),
    };
    RouterError::Refused {
        reason,
        retry_after: None,
    }
}

/// The mapping's nonce, or a refusal to send a request without one.
fn recorded_nonce(nonce: Option<Nonce>) -> Result<Nonce, RouterError> {
    nonce.ok_or_else(|| RouterError::Refused {
        reason: "PCP needs the mapping's nonce, and the state file holds no usable one for it \
                 (24 hex digits; a bug: the nonce must be persisted before the first request)"
            .to_owned(),
        retry_after: None,
    })
}

/// A PCP client talking to one gateway from one LAN address.
#[derive(Debug)]
pub struct PcpClient {
    gateway: Ipv4Addr,
    client_ip: Ipv4Addr,
    server_port: u16,
    schedule: Schedule,
    udp: UdpExchange,
    epoch: Option<EpochSeen>,
    epoch_jumped: bool,
}

impl PcpClient {
    /// A client for the PCP server at `gateway:5351`, sending from `client_ip` (the address
    /// that goes in the requests' client-IP field: the router checks the two agree).
    pub fn new(gateway: Ipv4Addr, client_ip: Ipv4Addr) -> PcpClient {
        PcpClient {
            gateway,
            client_ip,
            server_port: codec::SERVER_PORT,
            schedule: Schedule::default(),
            udp: UdpExchange::default(),
            epoch: None,
            epoch_jumped: false,
        }
    }

    /// Replace the retransmission schedule (tests use short ones).
    pub fn with_schedule(mut self, schedule: Schedule) -> PcpClient {
        self.schedule = schedule;
        self
    }

    /// The server epoch of the last matching response, if any.
    pub fn last_epoch(&self) -> Option<u32> {
        self.epoch.map(|seen| seen.server_secs)
    }

    /// Sends an ANNOUNCE request (RFC 6887 §14.1): whether the gateway speaks PCP, and its
    /// epoch, which is checked like every response's (§8.5). One packet per try, no mapping
    /// touched: the cheap way to notice a router restart between renewals.
    pub async fn announce(&mut self) -> Result<u32, RouterError> {
        let request = codec::AnnounceRequest {
            client_ip: self.client_ip,
        };
        let response = self
            .exchange_bytes(&request.encode(), codec::Opcode::Announce, |_| true)
            .await?;
        if response.result != ResultCode::Success {
            return Err(error_for_result(
                response.result,
                response.lifetime_secs,
                Protocol::Tcp,
                0,
            ));
        }
        Ok(response.epoch_secs)
    }

    /// The THIRD_PARTY option for a mapping to another host (`direct` mode, RFC 6887 §13.1);
    /// none when the router should forward to this host itself (`relay`).
    fn third_party(&self, internal: Ipv4Addr) -> Option<Ipv4Addr> {
        (internal != self.client_ip).then_some(internal)
    }

    fn observe_epoch(&mut self, server_secs: u32) {
        let now = Instant::now();
        if let Some(previous) = self.epoch
            && !epoch_is_consistent(
                previous.server_secs,
                server_secs,
                now.duration_since(previous.at),
            )
        {
            tracing::warn!(
                gateway = %self.gateway,
                previous = previous.server_secs,
                current = server_secs,
                "PCP server epoch is inconsistent: the router restarted and lost its mappings"
            );
            self.epoch_jumped = true;
        }
        self.epoch = Some(EpochSeen {
            server_secs,
            at: now,
        });
    }

    /// Where this client's requests go.
    fn route(&self) -> Route {
        Route {
            protocol: "PCP",
            local: IpAddr::V4(self.client_ip),
            router: SocketAddr::from((self.gateway, self.server_port)),
            read_cap_bytes: RECV_BUFFER_BYTES,
            hint: "",
            sent_point: Some(crate::crashpoint::PCP_SENT),
        }
    }

    /// Send `request` until a matching response arrives or the schedule runs out.
    async fn exchange(
        &mut self,
        request: &codec::MapRequest,
    ) -> Result<codec::Response, RouterError> {
        self.exchange_bytes(&request.encode(), codec::Opcode::Map, |response| {
            response.matches(request)
        })
        .await
    }

    /// Send `bytes` until a response with `opcode` that `matches` arrives or the schedule
    /// runs out.
    async fn exchange_bytes(
        &mut self,
        bytes: &[u8],
        opcode: codec::Opcode,
        matches: impl Fn(&codec::Response) -> bool,
    ) -> Result<codec::Response, RouterError> {
        let route = self.route();
        let response = self
            .udp
            .exchange(&route, bytes, self.schedule.waits(), |datagram| {
                judge(datagram, opcode, &matches)
            })
            .await?;
        self.observe_epoch(response.epoch_secs);
        Ok(response)
    }
}

/// What a datagram from the PCP server is to a request with `opcode` that `matches` answers.
pub(crate) fn judge(
    datagram: &[u8],
    opcode: codec::Opcode,
    matches: impl Fn(&codec::Response) -> bool,
) -> Verdict<codec::Response> {
    match codec::decode_response(datagram) {
        Ok(response) if response.opcode() == opcode && matches(&response) => {
            Verdict::Answer(response)
        }
        Ok(response) if response.opcode() == opcode => {
            Verdict::Ignore(format!("ignored a {opcode} response for another request"))
        }
        Ok(response) => Verdict::Ignore(format!("ignored a {} response", response.opcode())),
        Err(err) if err.is_version_mismatch() => Verdict::Fail(version_mismatch(&err)),
        Err(err) => Verdict::Ignore(format!("ignored an undecodable answer: {err}")),
    }
}

fn external_ipv4(address: IpAddr) -> Option<Ipv4Addr> {
    match address {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

impl PortMapper for PcpClient {
    fn backend(&self) -> Backend {
        Backend::Pcp
    }

    /// PCP cannot list mappings; an ANNOUNCE request shows the epoch, and an inconsistent
    /// one (§8.5) means the router restarted and lost them all.
    async fn lost(&mut self, leases: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
        // A check must not hold the daemon's loop for the whole MAP schedule (21 s): a short
        // one suffices to tell "answers" from "does not".
        let schedule = std::mem::replace(&mut self.schedule, CHECK_SCHEDULE);
        let answered = self.announce().await;
        self.schedule = schedule;
        answered?;
        if self.take_restart() {
            return Ok(leases.iter().map(Lease::key).collect());
        }
        Ok(Vec::new())
    }

    fn take_restart(&mut self) -> bool {
        std::mem::take(&mut self.epoch_jumped)
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        let nonce = recorded_nonce(request.nonce)?;
        // NOTE: lifetime 0 deletes (RFC 6887 §15); PCP has no permanent mappings, so a
        // "permanent" one (router.lease_seconds = 0) asks for a long lease and renews it.
        let lifetime_secs = match request.lifetime_secs {
            0 => crate::router::natpmp::client::PERMANENT_SUBSTITUTE_SECS,
            secs => secs,
        };
        let wire = codec::MapRequest {
            lifetime_secs,
            client_ip: self.client_ip,
            nonce,
            protocol: request.protocol.iana_number(),
            internal_port: request.internal.port,
            suggested_external_port: request.external_port,
            suggested_external_ip: None,
            third_party: self.third_party(request.internal.address),
            prefer_failure: true,
        };
        let response = self.exchange(&wire).await?;
        if response.result != ResultCode::Success {
            return Err(error_for_result(
                response.result,
                response.lifetime_secs,
                request.protocol,
                request.external_port,
            ));
        }
        let codec::ResponseBody::Map(body) = &response.body else {
            return Err(RouterError::Unusable {
                protocol: "PCP",
                what: "a SUCCESS response without a MAP body".to_owned(),
            });
        };
        // NOTE: RFC 6887 §15: the server may grant less than asked, never more; a longer
        // lifetime is taken as the one asked for, so a renewal is never put off by the router.
        let lifetime_secs = clamp::granted_lifetime(response.lifetime_secs, lifetime_secs)
            .ok_or_else(|| zero_lifetime(request.protocol, request.external_port))?;
        Ok(Grant {
            external_port: body.assigned_external_port,
            lifetime_secs,
            renew_after: renew_after(lifetime_secs),
            external_address: external_ipv4(body.assigned_external_ip),
            epoch: Some(response.epoch_secs),
            router: self.gateway.to_string(),
        })
    }

    async fn unmap(&mut self, lease: &Lease) -> Result<(), RouterError> {
        let nonce = recorded_nonce(lease.nonce)?;
        let wire = codec::MapRequest {
            lifetime_secs: 0,
            client_ip: self.client_ip,
            nonce,
            protocol: lease.protocol.iana_number(),
            internal_port: lease.internal.port,
            suggested_external_port: lease.external_port,
            suggested_external_ip: None,
            third_party: self.third_party(lease.internal.address),
            prefer_failure: false,
        };
        let response = self.exchange(&wire).await?;
        match response.result {
            ResultCode::Success => Ok(()),
            // Measured on miniupnpd 2.3.1: deleting a mapping that is already gone answers
            // NO_RESOURCES (lifetime 30). Gone is what was asked for.
            ResultCode::NoResources => Ok(()),
            other => Err(error_for_result(
                other,
                response.lifetime_secs,
                lease.protocol,
                lease.external_port,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_point_spans_one_half_to_five_eighths() {
        assert_eq!(renew_point(600, 0.0), Some(Duration::from_secs(300)));
        assert_eq!(renew_point(600, 1.0), Some(Duration::from_secs(375)));
        assert_eq!(renew_point(0, 0.5), None);
        for _ in 0..1000 {
            let renew = renew_after(7200).unwrap();
            assert!(renew >= Duration::from_secs(3600), "{renew:?}");
            assert!(renew <= Duration::from_secs(4500), "{renew:?}");
        }
        let odd = renew_after(1).unwrap();
        assert!(odd >= Duration::from_millis(500) && odd <= Duration::from_millis(625));
    }

    #[test]
    fn epoch_consistent_when_clocks_agree() {
        assert!(epoch_is_consistent(100, 100, Duration::ZERO));
        assert!(epoch_is_consistent(100, 160, Duration::from_secs(60)));
        // One second back is tolerated (rounding, reordering).
        assert!(epoch_is_consistent(100, 99, Duration::ZERO));
        // Small drift within 1/16 + 2 s.
        assert!(epoch_is_consistent(
            1000,
            1000 + 3600,
            Duration::from_secs(3500)
        ));
        assert!(epoch_is_consistent(
            1000,
            1000 + 3400,
            Duration::from_secs(3600)
        ));
    }

    #[test]
    fn epoch_jump_detected_on_restart_or_skew() {
        // Went backwards: the router restarted.
        assert!(!epoch_is_consistent(100, 5, Duration::from_secs(1)));
        // Router restarted long ago but epoch grew far less than our clock: restarted.
        assert!(!epoch_is_consistent(100, 110, Duration::from_secs(600)));
        // Server clock ran ahead implausibly.
        assert!(!epoch_is_consistent(100, 10_000, Duration::from_secs(60)));
        // Boundaries of server_delta + 2 < client_delta - client_delta / 16.
        // client 160 -> 160 - 10 = 150; server 148 + 2 = 150 is not < 150: valid.
        assert!(epoch_is_consistent(0, 148, Duration::from_secs(160)));
        assert!(!epoch_is_consistent(0, 147, Duration::from_secs(160)));
    }

    #[test]
    fn client_tracks_epoch_jumps() {
        let mut client = PcpClient::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST);
        client.observe_epoch(500);
        client.observe_epoch(500);
        assert!(!client.take_restart());
        client.observe_epoch(3);
        assert!(client.take_restart());
        assert_eq!(client.last_epoch(), Some(3));
        assert!(!client.take_restart(), "reading the restart clears it");
    }

    #[test]
    fn result_codes_map_to_router_errors() {
        match error_for_result(ResultCode::NotAuthorized, 1800, Protocol::Tcp, 8080) {
            RouterError::Refused {
                reason,
                retry_after,
            } => {
                assert!(reason.starts_with("NOT_AUTHORIZED: "), "{reason}");
                assert_eq!(retry_after, Some(Duration::from_secs(1800)));
            }
            other => panic!("{other:?}"),
        }
        match error_for_result(ResultCode::UnsuppOption, 0, Protocol::Tcp, 8080) {
            RouterError::Refused {
                reason,
                retry_after,
            } => {
                assert!(reason.starts_with("UNSUPP_OPTION: "), "{reason}");
                assert_eq!(retry_after, None);
            }
            other => panic!("{other:?}"),
        }
        match error_for_result(ResultCode::CannotProvideExternal, 30, Protocol::Udp, 443) {
            RouterError::Conflict {
                port,
                protocol,
                detail,
            } => {
                assert_eq!((port, protocol), (443, Protocol::Udp));
                assert!(detail.starts_with("CANNOT_PROVIDE_EXTERNAL: "), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn natpmp_server_is_refused_with_a_clear_message() {
        match version_mismatch(&codec::DecodeError::NatPmpServer) {
            RouterError::Refused { reason, .. } => {
                assert!(reason.contains("NAT-PMP only"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_or_bad_nonce_is_refused() {
        assert!(matches!(
            recorded_nonce(None),
            Err(RouterError::Refused { .. })
        ));
        assert!(matches!(
            recorded_nonce("xyz".parse().ok()),
            Err(RouterError::Refused { .. })
        ));
        let nonce = recorded_nonce("00112233445566778899aabb".parse().ok()).unwrap();
        assert_eq!(nonce.to_string(), "00112233445566778899aabb");
    }

    #[test]
    fn schedule_doubles_with_jitter_and_caps() {
        let schedule = Schedule::default();
        assert_eq!(schedule.wait(0, 0.0), Duration::from_secs(3));
        assert_eq!(schedule.wait(1, 0.0), Duration::from_secs(6));
        assert_eq!(schedule.wait(2, 0.0), Duration::from_secs(12));
        assert_eq!(schedule.wait(9, 0.0), Duration::from_secs(1024));
        assert_eq!(schedule.wait(40, 0.0), Duration::from_secs(1024));
        let low = schedule.wait(1, -0.5);
        assert!(low >= Duration::from_millis(5399) && low <= Duration::from_millis(5400));
        let high = schedule.wait(0, 0.1);
        assert!(high > Duration::from_millis(3299) && high <= Duration::from_millis(3300));
        // 3.3 + 6.6 + 13.2 = 23.1 s at most.
        assert!(schedule.worst_case() <= Duration::from_millis(23_101));
        assert!(schedule.worst_case() >= Duration::from_secs(23));
    }

    /// A PCP server on loopback that answers every MAP request with `result` and
    /// `lifetime_secs` (a hostile router picks any value); returns the client aimed at it.
    async fn answering(result: u8, lifetime_secs: u32) -> PcpClient {
        let server = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 1100];
            while let Ok((len, peer)) = server.recv_from(&mut buf).await {
                // Header (RFC 6887 §7.2), then the request's MAP payload (nonce, protocol,
                // internal port, suggested port) with an assigned address (§11.1).
                let mut reply = vec![2, 0x81, 0, result];
                reply.extend_from_slice(&lifetime_secs.to_be_bytes());
                reply.extend_from_slice(&77u32.to_be_bytes());
                reply.extend_from_slice(&[0; 12]);
                reply.extend_from_slice(&buf[24..44.min(len)]);
                reply.extend_from_slice(&Ipv4Addr::new(11, 22, 33, 44).to_ipv6_mapped().octets());
                server.send_to(&reply, peer).await.unwrap();
            }
        });
        let mut client =
            PcpClient::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST).with_schedule(Schedule {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(1),
                max_tries: 2,
            });
        client.server_port = port;
        client
    }

    fn map_request(lifetime_secs: u32) -> MapRequest {
        MapRequest {
            owner: crate::model::Owner::new("default", "web"),
            protocol: Protocol::Tcp,
            external_port: 8080,
            internal: crate::model::Endpoint::new(Ipv4Addr::LOCALHOST, 8080),
            lifetime_secs,
            nonce: "00112233445566778899aabb".parse().ok(),
        }
    }

    #[tokio::test]
    async fn a_granted_lifetime_longer_than_asked_is_clamped_to_the_ask() {
        // 136 years granted for 600 s asked: renewed as if 600 s were granted.
        let grant = answering(0, u32::MAX)
            .await
            .map(&map_request(600))
            .await
            .unwrap();
        assert_eq!(grant.lifetime_secs, 600);
        let renew = grant.renew_after.unwrap();
        assert!(renew <= Duration::from_secs(375), "{renew:?}");
        // A shorter grant is the router's right and is kept.
        let grant = answering(0, 300)
            .await
            .map(&map_request(600))
            .await
            .unwrap();
        assert_eq!((grant.lifetime_secs, grant.external_port), (300, 8080));
        // SUCCESS with 0 s maps nothing: a refusal, not a permanent mapping.
        let zero = answering(0, 0).await.map(&map_request(600)).await;
        assert!(
            matches!(&zero, Err(RouterError::Refused { reason, retry_after: None }) if reason.contains("0 s")),
            "{zero:?}"
        );
    }

    #[tokio::test]
    async fn an_error_lifetime_is_a_retry_floor_of_at_most_30_minutes() {
        // NO_RESOURCES (8) "for 136 years".
        let refused = answering(8, u32::MAX).await.map(&map_request(600)).await;
        match refused {
            Err(RouterError::Refused { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(1800)))
            }
            other => panic!("{other:?}"),
        }
        let refused = answering(8, 1).await.map(&map_request(600)).await;
        match refused {
            Err(RouterError::Refused { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(30)))
            }
            other => panic!("{other:?}"),
        }
        let refused = answering(8, 600).await.map(&map_request(600)).await;
        match refused {
            Err(RouterError::Refused { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(600)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn silent_gateway_is_unreachable_within_the_schedule() {
        // A bound UDP socket that never answers.
        let silent = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut client =
            PcpClient::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST).with_schedule(Schedule {
                initial: Duration::from_millis(50),
                max: Duration::from_secs(1),
                max_tries: 2,
            });
        client.server_port = silent.local_addr().unwrap().port();
        let request = MapRequest {
            owner: crate::model::Owner::new("default", "web"),
            protocol: Protocol::Tcp,
            external_port: 8080,
            internal: crate::model::Endpoint::new(Ipv4Addr::LOCALHOST, 8080),
            lifetime_secs: 600,
            nonce: "00112233445566778899aabb".parse().ok(),
        };
        let started = Instant::now();
        let result = client.map(&request).await;
        assert!(
            matches!(result, Err(RouterError::NoAnswer { .. })),
            "{result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The silent socket did receive the retransmissions.
        let mut buf = [0u8; 2048];
        silent.set_nonblocking(true).unwrap();
        let mut received = 0;
        while silent.recv(&mut buf).is_ok() {
            received += 1;
        }
        assert_eq!(received, 2);
    }
}
