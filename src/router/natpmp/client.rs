//! NAT-PMP client (RFC 6886): one UDP socket from the LAN address to the gateway's port 5351,
//! requests retransmitted from 250 ms doubling (§3.1), responses accepted only from the
//! gateway and only when they answer the request (§3.3), and router restarts detected from
//! the seconds-since-start-of-epoch of every response (§3.6). The wire format lives in
//! [`super::codec`].
//!
//! NAT-PMP has no nonce and no third-party mappings: a gateway maps only ports of the host
//! that asks, and identifies a mapping by its protocol and internal port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::codec::{self, Opcode, ResponseBody, ResultCode};
use crate::model::{Backend, Lease, MappingKey, Protocol};
use crate::router::pcp::client::renew_after;
use crate::router::pcp::codec::VERSION as PCP_VERSION;
use crate::router::udp::{Route, UdpExchange, Verdict};
use crate::router::{Grant, MapRequest, PortMapper, RouterError, clamp};

/// Receive buffer: larger than any NAT-PMP response (16 bytes), so that oversized or foreign
/// datagrams are seen whole and rejected by the codec.
const RECV_BUFFER_BYTES: usize = 1500;

/// The lifetime asked for when holepunch wants a permanent mapping (`router.lease_seconds =
/// 0`): NAT-PMP has no permanent mappings, and lifetime 0 deletes (RFC 6886 §3.4).
// NOTE: 7200 s is the lifetime RFC 6886 §3.3 recommends; the grant is renewed like any other.
pub const PERMANENT_SUBSTITUTE_SECS: u32 = 7200;

/// The lifetime to put in a mapping request for holepunch's `lifetime_secs`.
fn requested_lifetime(lifetime_secs: u32) -> u32 {
    if lifetime_secs == 0 {
        PERMANENT_SUBSTITUTE_SECS
    } else {
        lifetime_secs
    }
}

/// Retransmission schedule of one request (RFC 6886 §3.1): wait `initial` after the first
/// transmission, doubling after each, for at most `max_tries` transmissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The wait after the first transmission.
    pub initial: Duration,
    /// Transmissions before the call gives up with [`RouterError::NoAnswer`] (at least 1).
    pub max_tries: u32,
}

impl Default for Schedule {
    /// 250 ms doubling, 4 tries: 0.25 + 0.5 + 1 + 2 = 3.75 s before giving up.
    // NOTE: RFC 6886 §3.1 goes on for 9 tries (64 s in all); one call stops after 4, because
    // the reconciler retries failed mappings with its own backoff.
    fn default() -> Self {
        Schedule {
            initial: Duration::from_millis(250),
            max_tries: 4,
        }
    }
}

impl Schedule {
    /// The wait after transmission number `index` (0-based): `initial` doubled `index` times.
    pub fn wait(&self, index: u32) -> Duration {
        let factor = 1u32.checked_shl(index.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor)
    }

    /// How many datagrams one call sends at most.
    pub fn tries(&self) -> u32 {
        self.max_tries.max(1)
    }

    /// The waits of one call, one after each transmission.
    pub fn waits(&self) -> impl Iterator<Item = Duration> + use<> {
        let schedule = *self;
        (0..schedule.tries()).map(move |index| schedule.wait(index))
    }

    /// The longest one call waits for an answer in total.
    pub fn worst_case(&self) -> Duration {
        self.waits().sum()
    }
}

/// Whether a gateway's seconds-since-start-of-epoch is consistent with the one seen
/// `elapsed` earlier (RFC 6886 §3.6): `false` means the gateway rebooted or lost its state,
/// and every mapping must be re-created.
///
/// The client's conservative estimate is the previous value plus 7/8 of the elapsed time; a
/// new value more than 2 s below that estimate means a restart.
pub fn epoch_is_consistent(previous_secs: u32, current_secs: u32, elapsed: Duration) -> bool {
    // Milliseconds, so that 7/8 of a short interval is not lost to rounding.
    let expected_ms = u128::from(previous_secs) * 1000 + elapsed.as_millis() * 7 / 8;
    let current_ms = u128::from(current_secs) * 1000;
    current_ms + 2000 >= expected_ms
}

/// What an error result code means for the reconciler, with the RFC's meaning (§3.5) in the
/// reason. NAT-PMP has no "port taken" code (the gateway picks another port instead), so
/// every error is a refusal.
pub fn error_for_result(result: ResultCode, protocol: Protocol, port: u16) -> RouterError {
    RouterError::Refused {
        reason: format!("NAT-PMP mapping of {port}/{protocol}: {result}"),
        retry_after: None,
    }
}

/// NAT-PMP maps only ports of the host that sends the request (RFC 6886 §3.3: the internal
/// address is the request's source address), so a mapping to another host cannot be asked for.
fn check_internal_address(internal: Ipv4Addr, client_ip: Ipv4Addr) -> Result<(), RouterError> {
    if internal == client_ip {
        return Ok(());
    }
    Err(RouterError::Refused {
        reason: format!(
            "NAT-PMP cannot map to another host: the router forwards only to the address that \
             asks ({client_ip}), not to {internal}; use exposure.mode = \"relay\" (or a router \
             protocol that allows it, e.g. UPnP with secure mode off)"
        ),
        retry_after: None,
    })
}

/// The refusal for a datagram from the gateway in another protocol version.
fn version_mismatch(err: &codec::DecodeError) -> RouterError {
    RouterError::Refused {
        reason: err.to_string(),
        retry_after: None,
    }
}

/// What a response must be to answer a request.
#[derive(Debug, Clone, Copy)]
enum Expect<'a> {
    ExternalAddress,
    Map(&'a codec::MapRequest),
}

impl Expect<'_> {
    fn accepts(self, response: &codec::Response) -> bool {
        match self {
            Expect::ExternalAddress => response.opcode == Opcode::ExternalAddress,
            Expect::Map(request) => response.matches(request),
        }
    }
}

/// The last epoch the gateway reported (§3.6), and when it was seen.
#[derive(Debug, Clone, Copy)]
struct EpochSeen {
    server_secs: u32,
    at: Instant,
}

/// A NAT-PMP client talking to one gateway from one LAN address.
#[derive(Debug)]
pub struct NatpmpClient {
    gateway: Ipv4Addr,
    client_ip: Ipv4Addr,
    server_port: u16,
    schedule: Schedule,
    udp: UdpExchange,
    epoch: Option<EpochSeen>,
    epoch_jumped: bool,
    /// The gateway's external address, once asked; `None` again after an epoch jump.
    external_address: Option<Ipv4Addr>,
}

impl NatpmpClient {
    /// A client for the NAT-PMP gateway at `gateway:5351`, sending from `client_ip`: the
    /// address the gateway maps ports to.
    pub fn new(gateway: Ipv4Addr, client_ip: Ipv4Addr) -> NatpmpClient {
        NatpmpClient {
            gateway,
            client_ip,
            server_port: codec::SERVER_PORT,
            schedule: Schedule::default(),
            udp: UdpExchange::default(),
            epoch: None,
            epoch_jumped: false,
            external_address: None,
        }
    }

    /// Replace the retransmission schedule (tests use short ones).
    pub fn with_schedule(mut self, schedule: Schedule) -> NatpmpClient {
        self.schedule = schedule;
        self
    }

    /// The gateway's seconds-since-start-of-epoch in the last response, if any.
    pub fn last_epoch(&self) -> Option<u32> {
        self.epoch.map(|seen| seen.server_secs)
    }

    /// The gateway's external IPv4 address (§3.2), asked once and cached until the gateway
    /// restarts.
    pub async fn external_address(&mut self) -> Result<Ipv4Addr, RouterError> {
        if let Some(address) = self.external_address {
            return Ok(address);
        }
        self.ask_external_address().await
    }

    /// Asks the gateway for its external address even when one is cached: one round trip
    /// that also shows the gateway's epoch (§3.6) and a changed address.
    pub async fn ask_external_address(&mut self) -> Result<Ipv4Addr, RouterError> {
        let response = self
            .exchange(
                &codec::ExternalAddressRequest.encode(),
                Expect::ExternalAddress,
            )
            .await?;
        if response.result != ResultCode::Success {
            return Err(RouterError::Refused {
                reason: format!("NAT-PMP external address request: {}", response.result),
                retry_after: None,
            });
        }
        let ResponseBody::ExternalAddress(address) = response.body else {
            return Err(RouterError::Unusable {
                protocol: "NAT-PMP",
                what: "an external address response without an address".to_owned(),
            });
        };
        self.external_address = Some(address);
        Ok(address)
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
                "NAT-PMP gateway epoch went back: the router restarted and lost its mappings"
            );
            self.epoch_jumped = true;
            // A restarted gateway may have a new external address (RFC 6886 §3.6).
            self.external_address = None;
        }
        self.epoch = Some(EpochSeen {
            server_secs,
            at: now,
        });
    }

    /// Where this client's requests go.
    fn route(&self) -> Route {
        Route {
            protocol: "NAT-PMP",
            local: IpAddr::V4(self.client_ip),
            router: SocketAddr::from((self.gateway, self.server_port)),
            read_cap_bytes: RECV_BUFFER_BYTES,
            hint: "; check router.address and that NAT-PMP is on in the router",
            sent_point: Some(crate::crashpoint::NATPMP_SENT),
        }
    }

    /// Send `request` until a response that `expect` accepts arrives or the schedule runs out.
    async fn exchange(
        &mut self,
        request: &[u8],
        expect: Expect<'_>,
    ) -> Result<codec::Response, RouterError> {
        let route = self.route();
        let response = self
            .udp
            .exchange(&route, request, self.schedule.waits(), |datagram| {
                match codec::decode_response(datagram) {
                    Ok(response) if expect.accepts(&response) => Verdict::Answer(response),
                    Ok(response) => Verdict::Ignore(format!(
                        "ignored a {:?} response for another request",
                        response.opcode
                    )),
                    // NOTE: a PCP-only gateway answers with a version-2 UNSUPP_VERSION
                    // (RFC 6887 §9): NAT-PMP will not work with it, retrying is pointless.
                    Err(err @ codec::DecodeError::UnsupportedVersion { version })
                        if version == PCP_VERSION =>
                    {
                        Verdict::Fail(version_mismatch(&err))
                    }
                    Err(err) => Verdict::Ignore(format!("ignored an undecodable answer: {err}")),
                }
            })
            .await?;
        self.observe_epoch(response.epoch_secs);
        Ok(response)
    }
}

impl PortMapper for NatpmpClient {
    fn backend(&self) -> Backend {
        Backend::Natpmp
    }

    /// NAT-PMP cannot list mappings; an external-address request shows the epoch, and an
    /// inconsistent one (§3.6) means the gateway restarted and lost them all.
    async fn lost(&mut self, leases: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
        self.ask_external_address().await?;
        if self.take_restart() {
            return Ok(leases.iter().map(Lease::key).collect());
        }
        Ok(Vec::new())
    }

    fn take_restart(&mut self) -> bool {
        std::mem::take(&mut self.epoch_jumped)
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        check_internal_address(request.internal.address, self.client_ip)?;
        let wire = codec::MapRequest {
            protocol: request.protocol,
            internal_port: request.internal.port,
            suggested_external_port: request.external_port,
            lifetime_secs: requested_lifetime(request.lifetime_secs),
        };
        let response = self.exchange(&wire.encode(), Expect::Map(&wire)).await?;
        if response.result != ResultCode::Success {
            return Err(error_for_result(
                response.result,
                request.protocol,
                request.external_port,
            ));
        }
        let ResponseBody::Map(body) = response.body else {
            return Err(RouterError::Unusable {
                protocol: "NAT-PMP",
                what: "a success response without a mapping body".to_owned(),
            });
        };
        // NOTE: RFC 6886 §3.3: the gateway may grant less than asked; more is taken as the
        // ask, so the router cannot put a renewal off. 0 s maps nothing (§3.4).
        let lifetime_secs = clamp::granted_lifetime(body.lifetime_secs, wire.lifetime_secs)
            .ok_or_else(|| RouterError::Refused {
                reason: format!(
                    "NAT-PMP mapping of {}/{}: the gateway answered success with a lifetime \
                     of 0 s, which maps nothing; asking again later",
                    request.external_port, request.protocol
                ),
                retry_after: None,
            })?;
        // NOTE: the gateway may grant another external port than the suggested one
        // (RFC 6886 §3.3); the Grant says which, and the reconciler treats a different port
        // as a conflict.
        let external_address = match self.external_address().await {
            Ok(address) => Some(address),
            Err(err) => {
                tracing::warn!(gateway = %self.gateway, error = %err, "mapped, but the NAT-PMP external address is unknown");
                None
            }
        };
        Ok(Grant {
            external_port: body.external_port,
            lifetime_secs,
            renew_after: renew_after(lifetime_secs),
            external_address,
            epoch: Some(response.epoch_secs),
            router: self.gateway.to_string(),
        })
    }

    async fn unmap(&mut self, lease: &Lease) -> Result<(), RouterError> {
        check_internal_address(lease.internal.address, self.client_ip)?;
        // NOTE: a delete is lifetime 0 with external port 0 (RFC 6886 §3.4); the gateway
        // finds the mapping by protocol and internal port.
        let wire = codec::MapRequest::delete(lease.protocol, lease.internal.port);
        let response = self.exchange(&wire.encode(), Expect::Map(&wire)).await?;
        match response.result {
            // NOTE: measured on miniupnpd 2.3.1 (tests/natpmp_lab.rs): deleting a mapping
            // that is already gone answers success, which is what was asked for.
            ResultCode::Success => Ok(()),
            other => Err(error_for_result(other, lease.protocol, lease.external_port)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Owner};

    const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

    fn short() -> Schedule {
        Schedule {
            initial: Duration::from_millis(100),
            max_tries: 3,
        }
    }

    fn request(protocol: Protocol, port: u16) -> MapRequest {
        MapRequest {
            owner: Owner::new("default", "web"),
            protocol,
            external_port: port,
            internal: Endpoint::new(LOCAL, port),
            lifetime_secs: 600,
            nonce: None,
        }
    }

    fn lease(protocol: Protocol, port: u16, address: Ipv4Addr) -> Lease {
        Lease {
            owner: Owner::new("default", "web"),
            protocol,
            external_port: port,
            internal: Endpoint::new(address, port),
            nonce: None,
        }
    }

    fn map_reply(opcode: u8, result: u16, epoch: u32, internal: u16, external: u16) -> Vec<u8> {
        let mut out = vec![0, opcode];
        out.extend_from_slice(&result.to_be_bytes());
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&internal.to_be_bytes());
        out.extend_from_slice(&external.to_be_bytes());
        out.extend_from_slice(&600u32.to_be_bytes());
        out
    }

    fn address_reply(epoch: u32, address: Ipv4Addr) -> Vec<u8> {
        let mut out = vec![0, 128, 0, 0];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&address.octets());
        out
    }

    /// A gateway on loopback that speaks the NAT-PMP wire format: for each request it
    /// receives, `answer` returns the datagrams to send back (in order).
    struct FakeGateway {
        socket: std::sync::Arc<tokio::net::UdpSocket>,
        task: tokio::task::JoinHandle<Vec<Vec<u8>>>,
    }

    impl FakeGateway {
        async fn start(
            mut answer: impl FnMut(&[u8]) -> Vec<Vec<u8>> + Send + 'static,
        ) -> FakeGateway {
            let socket = std::sync::Arc::new(
                tokio::net::UdpSocket::bind((LOCAL, 0))
                    .await
                    .expect("bind fake gateway"),
            );
            let server = socket.clone();
            let task = tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 64];
                while let Ok(Ok((len, peer))) =
                    tokio::time::timeout(Duration::from_secs(2), server.recv_from(&mut buf)).await
                {
                    seen.push(buf[..len].to_vec());
                    for reply in answer(&buf[..len]) {
                        server
                            .send_to(&reply, peer)
                            .await
                            .expect("fake gateway sends");
                    }
                }
                seen
            });
            FakeGateway { socket, task }
        }

        fn client(&self) -> NatpmpClient {
            let mut client = NatpmpClient::new(LOCAL, LOCAL).with_schedule(short());
            client.server_port = self.socket.local_addr().expect("fake address").port();
            client
        }

        /// Every request the gateway received, once it has been quiet for 2 s.
        async fn requests(self) -> Vec<Vec<u8>> {
            self.task.await.expect("fake gateway task")
        }
    }

    #[test]
    fn schedule_doubles_from_250_ms_and_is_bounded() {
        let schedule = Schedule::default();
        assert_eq!(
            schedule.waits().collect::<Vec<_>>(),
            [250, 500, 1000, 2000].map(Duration::from_millis).to_vec()
        );
        assert_eq!(schedule.worst_case(), Duration::from_millis(3750));
        assert_eq!(schedule.wait(40), schedule.initial.saturating_mul(1 << 31));
        let zero = Schedule {
            max_tries: 0,
            ..schedule
        };
        assert_eq!(zero.tries(), 1);
        assert_eq!(zero.waits().count(), 1);
        assert_eq!(zero.worst_case(), Duration::from_millis(250));
    }

    #[test]
    fn epoch_consistent_when_clocks_agree() {
        assert!(epoch_is_consistent(100, 100, Duration::ZERO));
        assert!(epoch_is_consistent(100, 160, Duration::from_secs(60)));
        // Exactly the estimate: 7/8 of the elapsed time.
        assert!(epoch_is_consistent(100, 100 + 56, Duration::from_secs(64)));
        assert!(epoch_is_consistent(100, 98, Duration::ZERO));
        // A gateway clock running fast is no restart.
        assert!(epoch_is_consistent(100, 10_000, Duration::from_secs(1)));
    }

    #[test]
    fn epoch_jump_detected_per_rfc_6886_3_6() {
        // Back by more than 2 s.
        assert!(!epoch_is_consistent(100, 97, Duration::ZERO));
        // After 64 s the estimate is 100 + 56 = 156; 153 + 2 < 156.
        assert!(!epoch_is_consistent(100, 153, Duration::from_secs(64)));
        assert!(epoch_is_consistent(100, 154, Duration::from_secs(64)));
        // Restarted and up again for a while, but less than the time that passed.
        assert!(!epoch_is_consistent(5000, 600, Duration::from_secs(3600)));
        // Sub-second precision: 7/8 of 3.2 s is 2.8 s.
        assert!(!epoch_is_consistent(0, 0, Duration::from_millis(3200)));
        assert!(epoch_is_consistent(0, 0, Duration::from_millis(2200)));
    }

    #[test]
    fn client_tracks_epoch_jumps_and_forgets_the_external_address() {
        let mut client = NatpmpClient::new(LOCAL, LOCAL);
        client.observe_epoch(500);
        client.external_address = Some(EXTERNAL);
        client.observe_epoch(501);
        assert!(!client.take_restart());
        assert_eq!(client.external_address, Some(EXTERNAL));
        client.observe_epoch(3);
        assert!(client.take_restart());
        assert_eq!(client.last_epoch(), Some(3));
        assert_eq!(client.external_address, None);
        assert!(!client.take_restart(), "reading the restart clears it");
    }

    #[test]
    fn result_codes_map_to_refusals_with_their_meaning() {
        for (code, words) in [
            (ResultCode::UnsupportedVersion, "version 0"),
            (ResultCode::NotAuthorized, "turned off"),
            (ResultCode::NetworkFailure, "network problem"),
            (ResultCode::OutOfResources, "cannot create more mappings"),
            (ResultCode::UnsupportedOpcode, "does not support this"),
            (ResultCode::Other(77), "does not define"),
        ] {
            match error_for_result(code, Protocol::Tcp, 8080) {
                RouterError::Refused {
                    reason,
                    retry_after,
                } => {
                    assert!(reason.contains(words), "{reason}");
                    assert!(reason.contains("8080/tcp"), "{reason}");
                    assert!(reason.ends_with(&format!("({})", code.code())), "{reason}");
                    assert_eq!(retry_after, None);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn grants_the_port_the_gateway_chose_and_its_external_address() {
        let gateway = FakeGateway::start(|req| match req {
            [0, 0] => vec![address_reply(50, EXTERNAL)],
            [0, 2, ..] => {
                let internal = u16::from_be_bytes([req[4], req[5]]);
                vec![map_reply(130, 0, 50, internal, internal + 1)]
            }
            _ => vec![],
        })
        .await;
        let mut client = gateway.client();
        let grant = client
            .map(&request(Protocol::Tcp, 18080))
            .await
            .expect("granted");
        assert_eq!(grant.external_port, 18081);
        assert_eq!(grant.lifetime_secs, 600);
        assert_eq!(grant.external_address, Some(EXTERNAL));
        assert_eq!(grant.epoch, Some(50));
        assert_eq!(grant.router, "127.0.0.1");
        let renew = grant.renew_after.expect("renew point");
        assert!(
            renew >= Duration::from_secs(300) && renew <= Duration::from_secs(375),
            "{renew:?}"
        );
        // The external address is cached: a second map does not ask again.
        client
            .map(&request(Protocol::Tcp, 18082))
            .await
            .expect("granted");
        let asked = gateway
            .requests()
            .await
            .iter()
            .filter(|req| req.as_slice() == [0, 0])
            .count();
        assert_eq!(asked, 1);
    }

    #[tokio::test]
    async fn a_granted_lifetime_longer_than_asked_is_clamped_to_the_ask() {
        let reply = |lifetime: u32| {
            move |req: &[u8]| {
                let internal = u16::from_be_bytes([req[4], req[5]]);
                let mut out = map_reply(128 + req[1], 0, 9, internal, internal);
                out[12..16].copy_from_slice(&lifetime.to_be_bytes());
                vec![out]
            }
        };
        // u32::MAX seconds (136 years) granted for 600 asked.
        let hostile = FakeGateway::start(reply(u32::MAX)).await;
        let mut client = hostile.client();
        client.external_address = Some(EXTERNAL);
        let grant = client.map(&request(Protocol::Tcp, 18080)).await.unwrap();
        assert_eq!(grant.lifetime_secs, 600);
        assert!(grant.renew_after.unwrap() <= Duration::from_secs(375));
        // Less than asked is kept.
        let fair = FakeGateway::start(reply(120)).await;
        let mut client = fair.client();
        client.external_address = Some(EXTERNAL);
        let grant = client.map(&request(Protocol::Tcp, 18080)).await.unwrap();
        assert_eq!(grant.lifetime_secs, 120);
        // Success with 0 s maps nothing.
        let zero = FakeGateway::start(reply(0)).await;
        let mut client = zero.client();
        client.external_address = Some(EXTERNAL);
        let result = client.map(&request(Protocol::Tcp, 18080)).await;
        assert!(
            matches!(&result, Err(RouterError::Refused { reason, .. }) if reason.contains("0 s")),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_permanent_request_asks_for_a_lifetime_never_for_a_delete() {
        let gateway = FakeGateway::start(|req| {
            let internal = u16::from_be_bytes([req[4], req[5]]);
            vec![map_reply(128 + req[1], 0, 9, internal, internal)]
        })
        .await;
        let mut client = gateway.client();
        client.external_address = Some(EXTERNAL);
        let permanent = MapRequest {
            lifetime_secs: 0,
            ..request(Protocol::Tcp, 18080)
        };
        client.map(&permanent).await.expect("granted");
        let sent = gateway.requests().await;
        assert_eq!(
            sent,
            [codec::MapRequest {
                protocol: Protocol::Tcp,
                internal_port: 18080,
                suggested_external_port: 18080,
                lifetime_secs: PERMANENT_SUBSTITUTE_SECS,
            }
            .encode()]
        );
    }

    #[tokio::test]
    async fn ignores_answers_to_other_requests_and_garbage() {
        let gateway = FakeGateway::start(|req| {
            if req.len() != 12 {
                return vec![];
            }
            vec![
                // Garbage, a request echoed back, the other protocol, another internal
                // port, an external-address answer: none of them answers the request.
                vec![0xff; 3],
                req.to_vec(),
                map_reply(129, 0, 7, 18080, 1),
                map_reply(130, 0, 7, 18081, 2),
                address_reply(7, EXTERNAL),
                // The answer.
                map_reply(130, 0, 7, 18080, 18080),
            ]
        })
        .await;
        let mut client = gateway.client();
        let wire = codec::MapRequest {
            protocol: Protocol::Tcp,
            internal_port: 18080,
            suggested_external_port: 18080,
            lifetime_secs: 600,
        };
        let response = client
            .exchange(&wire.encode(), Expect::Map(&wire))
            .await
            .expect("answered");
        assert_eq!(
            response.body,
            ResponseBody::Map(codec::MapResponse {
                internal_port: 18080,
                external_port: 18080,
                lifetime_secs: 600,
            })
        );
        assert_eq!(
            gateway.requests().await.len(),
            1,
            "no retransmission needed"
        );
    }

    #[tokio::test]
    async fn ignores_answers_from_another_address_or_port() {
        let gateway = FakeGateway::start(|_| vec![]).await;
        let mut client = gateway.client();
        let impostor = tokio::net::UdpSocket::bind((LOCAL, 0)).await.unwrap();
        // Open the client's socket, then let the impostor answer it before the gateway.
        let route = client.route();
        let client_address = client.udp.local_address(&route).await.unwrap();
        let forged = map_reply(130, 0, 7, 18080, 18080);
        let exchange = tokio::spawn(async move {
            let wire = codec::MapRequest {
                protocol: Protocol::Tcp,
                internal_port: 18080,
                suggested_external_port: 18080,
                lifetime_secs: 600,
            };
            client.exchange(&wire.encode(), Expect::Map(&wire)).await
        });
        for _ in 0..5 {
            impostor.send_to(&forged, client_address).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let result = exchange.await.unwrap();
        assert!(
            matches!(result, Err(RouterError::NoAnswer { .. })),
            "{result:?}"
        );
        assert_eq!(gateway.requests().await.len(), 3);
    }

    #[tokio::test]
    async fn error_results_are_refusals() {
        let gateway = FakeGateway::start(|req| vec![map_reply(128 + req[1], 2, 9, 18080, 0)]).await;
        let mut client = gateway.client();
        let result = client.map(&request(Protocol::Udp, 18080)).await;
        match result {
            Err(RouterError::Refused { reason, .. }) => {
                assert!(
                    reason.contains("NAT-PMP is probably turned off"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            client.last_epoch(),
            Some(9),
            "error responses carry the epoch"
        );
    }

    #[tokio::test]
    async fn a_pcp_only_gateway_is_refused_at_once() {
        // What a PCP-only server answers: version 2, UNSUPP_VERSION.
        let gateway = FakeGateway::start(|_| vec![vec![2, 0x81, 0, 1, 0, 0, 0, 0]]).await;
        let mut client = gateway.client();
        match client.external_address().await {
            Err(RouterError::Refused { reason, .. }) => {
                assert!(reason.contains("router.backend = \"pcp\""), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(gateway.requests().await.len(), 1);
    }

    #[tokio::test]
    async fn another_host_is_refused_without_a_packet() {
        let gateway = FakeGateway::start(|_| vec![]).await;
        let mut client = gateway.client();
        let other = Ipv4Addr::new(192, 168, 77, 20);
        let mut direct = request(Protocol::Tcp, 18080);
        direct.internal.address = other;
        for result in [
            client.map(&direct).await.map(|_| ()),
            client.unmap(&lease(Protocol::Tcp, 18080, other)).await,
        ] {
            match result {
                Err(RouterError::Refused { reason, .. }) => {
                    assert!(reason.contains("cannot map to another host"), "{reason}");
                    assert!(reason.contains("exposure.mode = \"relay\""), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(gateway.requests().await.is_empty());
    }

    #[tokio::test]
    async fn unmap_sends_the_rfc_delete_and_accepts_success() {
        let gateway = FakeGateway::start(|req| {
            let internal = u16::from_be_bytes([req[4], req[5]]);
            vec![map_reply(128 + req[1], 0, 9, internal, 0)]
        })
        .await;
        let mut client = gateway.client();
        client
            .unmap(&lease(Protocol::Udp, 18090, LOCAL))
            .await
            .expect("deleted");
        let requests = gateway.requests().await;
        assert_eq!(
            requests,
            [codec::MapRequest::delete(Protocol::Udp, 18090).encode()]
        );
    }

    #[tokio::test]
    async fn silent_gateway_is_unreachable_after_the_scheduled_tries() {
        let gateway = FakeGateway::start(|_| vec![]).await;
        let mut client = gateway.client();
        let started = Instant::now();
        let result = client.map(&request(Protocol::Tcp, 18080)).await;
        let elapsed = started.elapsed();
        assert!(
            matches!(result, Err(RouterError::NoAnswer { .. })),
            "{result:?}"
        );
        // 100 + 200 + 400 ms.
        assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1200), "{elapsed:?}");
        assert_eq!(gateway.requests().await.len(), 3);
    }
}
