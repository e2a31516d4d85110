//! PCP MAP over IPv6 (RFC 6887): a pinhole in the router's IPv6 firewall for one of this
//! host's global addresses, asked of the PCP server on the router's IPv6 LAN address. The same
//! rules as for IPv4 (README, "IPv6"): the socket is bound to the address in the client-IP
//! field, one nonce per pinhole renews and deletes it, PREFER_FAILURE, retransmission per
//! §8.1.1, the epoch checked on every answer (§8.5), and lifetime 0 deletes.
//!
//! Not used by the daemon yet. Kept beside [`super::client`] rather than in it: the IPv4
//! client's types (`MapRequest`, `Grant`, `PortMapper`) carry IPv4 addresses.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use super::client::{Schedule, epoch_is_consistent, error_for_result, judge, renew_after};
use super::codec::{self, MapRequestV6, Nonce, ResultCode};
use crate::model::Protocol;
use crate::router::RouterError;
use crate::router::udp::{Route, UdpExchange};

/// Receive buffer: larger than the 1100-byte PCP limit, so oversized datagrams are seen.
const RECV_BUFFER_BYTES: usize = 2048;

/// One pinhole to ask for: `protocol` to `internal_port` of the client's own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinholeMap {
    pub protocol: Protocol,
    pub internal_port: u16,
    /// 0 asks for a long lease that is renewed (PCP has no permanent mappings).
    pub lifetime_secs: u32,
    /// The pinhole's nonce, persisted before the first request.
    pub nonce: Nonce,
}

/// What the router granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinholeGrant {
    /// The address the internet reaches: the internal one on a router that only firewalls.
    pub external_address: Ipv6Addr,
    pub external_port: u16,
    pub lifetime_secs: u32,
    /// A random point in 1/2-5/8 of the lifetime.
    pub renew_after: Option<Duration>,
    pub epoch: u32,
}

/// A PCP client for IPv6 pinholes, talking to one router from one of this host's addresses.
#[derive(Debug)]
pub struct Pcp6Client {
    gateway: Ipv6Addr,
    /// The interface index of a link-local `gateway`, else 0.
    scope_id: u32,
    client_ip: Ipv6Addr,
    server_port: u16,
    schedule: Schedule,
    udp: UdpExchange,
    epoch: Option<(u32, Instant)>,
    epoch_jumped: bool,
}

impl Pcp6Client {
    /// A client for the PCP server at `[gateway]:5351`, sending from `client_ip`, the
    /// address the pinholes open.
    pub fn new(gateway: Ipv6Addr, client_ip: Ipv6Addr) -> Pcp6Client {
        Pcp6Client {
            gateway,
            scope_id: 0,
            client_ip,
            server_port: codec::SERVER_PORT,
            schedule: Schedule::default(),
            udp: UdpExchange::default(),
            epoch: None,
            epoch_jumped: false,
        }
    }

    /// The interface a link-local gateway is on (its index): requests go to
    /// `[gateway%scope_id]:5351`, still from `client_ip`.
    // NOTE: RFC 6887 §8.1: the PCP server is the default router, which may be link-local;
    // the socket stays bound to the global client IP (the source must equal the client-IP
    // field) and connected to the scoped link-local address, so the kernel's source check
    // still takes only the router's answers.
    pub fn with_scope_id(mut self, scope_id: u32) -> Pcp6Client {
        self.scope_id = scope_id;
        self
    }

    /// Replace the retransmission schedule (tests use short ones).
    pub fn with_schedule(mut self, schedule: Schedule) -> Pcp6Client {
        self.schedule = schedule;
        self
    }

    /// Whether an answer since the last call showed that the router restarted (§8.5), and so
    /// lost every pinhole. Reading it clears it.
    pub fn take_restart(&mut self) -> bool {
        std::mem::take(&mut self.epoch_jumped)
    }

    fn wire(&self, map: &PinholeMap, lifetime_secs: u32) -> MapRequestV6 {
        MapRequestV6 {
            lifetime_secs,
            client_ip: self.client_ip,
            nonce: map.nonce,
            protocol: map.protocol.iana_number(),
            internal_port: map.internal_port,
            // NOTE: a router without NAT66 opens the internal port itself; asking for it makes
            // a router that does translate say so (granted port != wanted).
            suggested_external_port: map.internal_port,
            suggested_external_ip: None,
            prefer_failure: lifetime_secs != 0,
        }
    }

    /// Creates the pinhole, or renews it in place (same nonce; see [`Pcp6Client::renew`]).
    pub async fn map(&mut self, map: &PinholeMap) -> Result<PinholeGrant, RouterError> {
        let lifetime_secs = match map.lifetime_secs {
            0 => crate::router::natpmp::client::PERMANENT_SUBSTITUTE_SECS,
            secs => secs,
        };
        let request = self.wire(map, lifetime_secs);
        let response = self.exchange(&request).await?;
        if response.result != ResultCode::Success {
            return Err(error_for_result(
                response.result,
                response.lifetime_secs,
                map.protocol,
                map.internal_port,
            ));
        }
        let codec::ResponseBody::Map(body) = &response.body else {
            return Err(RouterError::Unusable {
                protocol: "PCP",
                what: "a SUCCESS response without a MAP body".to_owned(),
            });
        };
        let external_address = match body.assigned_external_ip {
            IpAddr::V6(address) => address,
            IpAddr::V4(address) => {
                return Err(RouterError::Unusable {
                    protocol: "PCP",
                    what: format!("an IPv6 MAP was granted the IPv4 address {address}"),
                });
            }
        };
        if body.assigned_external_port != map.internal_port {
            // Not the pinhole asked for: give it back rather than open another port.
            let wanted = map.internal_port;
            let granted = body.assigned_external_port;
            if let Err(err) = self.delete(map).await {
                tracing::warn!(error = %err, granted, "could not give back a PCP grant for another port");
            }
            return Err(RouterError::Conflict {
                port: wanted,
                protocol: map.protocol,
                detail: format!(
                    "the router granted [{external_address}]:{granted} instead of port {wanted}"
                ),
            });
        }
        // A router's lifetime is used only up to the one asked, and a SUCCESS of 0 s is no
        // grant (README, "Security model"), as for IPv4.
        let lifetime_secs =
            crate::router::clamp::granted_lifetime(response.lifetime_secs, lifetime_secs)
                .ok_or_else(|| RouterError::Unusable {
                    protocol: "PCP",
                    what: "a SUCCESS answer granting a pinhole for 0 s".to_owned(),
                })?;
        Ok(PinholeGrant {
            external_address,
            external_port: body.assigned_external_port,
            lifetime_secs,
            renew_after: renew_after(lifetime_secs),
            epoch: response.epoch_secs,
        })
    }

    /// Renews the pinhole by replacing it: delete (lifetime 0, its nonce), then MAP again.
    /// Use this, not [`Pcp6Client::map`], to renew.
    // NOTE: miniupnpd 2.3.1 (nftables) keeps an IPv6 pinhole's nonce only in the rule's
    // description, and renewing through MAP (pcpserver.c CreatePCPMap_FW ->
    // upnp_update_inboundpinhole) rewrites the rule without it: from then on a delete with the
    // right nonce is refused NOT_AUTHORIZED and the pinhole stays open until its lifetime ends
    // (measured in the lab). Replacing keeps the nonce on the rule. New inbound connections
    // that arrive between the two answers (about a millisecond) are dropped and retried by the
    // peer; established ones are not affected (the router's firewall drops only new flows).
    pub async fn renew(&mut self, map: &PinholeMap) -> Result<PinholeGrant, RouterError> {
        match self.delete(map).await {
            Ok(()) => {}
            // Already renewed in place (by `map`): the replace cannot happen, renew in place.
            Err(RouterError::Refused { reason, .. }) => {
                tracing::debug!(%reason, port = map.internal_port,
                    "PCP: could not replace the IPv6 pinhole; renewing it in place");
            }
            Err(err) => return Err(err),
        }
        self.map(map).await
    }

    /// Deletes the pinhole (lifetime 0, the same nonce, §15); one that is gone is success.
    pub async fn delete(&mut self, map: &PinholeMap) -> Result<(), RouterError> {
        let request = self.wire(map, 0);
        let response = self.exchange(&request).await?;
        match response.result {
            ResultCode::Success => Ok(()),
            // NOTE: deleting a pinhole it does not hold, miniupnpd 2.3.1 answers SUCCESS for
            // IPv6 (pcpserver.c DeletePCPMap leaves the result unset; measured in the lab) and
            // NO_RESOURCES for IPv4 mappings: either way, gone is what was asked for.
            ResultCode::NoResources => Ok(()),
            other => Err(error_for_result(
                other,
                response.lifetime_secs,
                map.protocol,
                map.internal_port,
            )),
        }
    }

    /// Where this client's requests go.
    fn route(&self) -> Route {
        Route {
            protocol: "PCP",
            local: IpAddr::V6(self.client_ip),
            router: SocketAddr::V6(SocketAddrV6::new(
                self.gateway,
                self.server_port,
                0,
                self.scope_id,
            )),
            read_cap_bytes: RECV_BUFFER_BYTES,
            hint: "",
            sent_point: None,
        }
    }

    fn observe_epoch(&mut self, server_secs: u32) {
        let now = Instant::now();
        if let Some((previous, at)) = self.epoch
            && !epoch_is_consistent(previous, server_secs, now.duration_since(at))
        {
            tracing::warn!(gateway = %self.gateway, previous, current = server_secs,
                "PCP server epoch is inconsistent: the router restarted and lost its pinholes");
            self.epoch_jumped = true;
        }
        self.epoch = Some((server_secs, now));
    }

    /// Sends `request` until a matching answer arrives or the schedule runs out.
    async fn exchange(&mut self, request: &MapRequestV6) -> Result<codec::Response, RouterError> {
        let route = self.route();
        let response = self
            .udp
            .exchange(
                &route,
                &request.encode(),
                self.schedule.waits(),
                |datagram| {
                    judge(datagram, codec::Opcode::Map, |response| {
                        response.matches_v6(request)
                    })
                },
            )
            .await?;
        self.observe_epoch(response.epoch_secs);
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    const ROUTER: Ipv6Addr = Ipv6Addr::LOCALHOST;

    fn map() -> PinholeMap {
        PinholeMap {
            protocol: Protocol::Tcp,
            internal_port: 8443,
            lifetime_secs: 600,
            nonce: Nonce([7; 12]),
        }
    }

    /// A one-answer PCP server on [::1]: answers the first request with `answer(request)`.
    async fn server(
        answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static,
    ) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let socket = UdpSocket::bind((ROUTER, 0))
            .await
            .expect("these tests need the IPv6 loopback address ::1");
        let port = socket.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let (len, from) = socket.recv_from(&mut buf).await.unwrap();
            let reply = answer(&buf[..len]);
            socket.send_to(&reply, from).await.unwrap();
            buf[..len].to_vec()
        });
        (port, task)
    }

    fn reply(request: &[u8], result: u8, lifetime: u32, port: u16, external: Ipv6Addr) -> Vec<u8> {
        let mut out = vec![2, 0x81, 0, result];
        out.extend_from_slice(&lifetime.to_be_bytes());
        out.extend_from_slice(&1000u32.to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        out.extend_from_slice(&request[24..24 + 12 + 4 + 2]); // nonce, protocol, internal port
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&external.octets());
        out
    }

    fn client(port: u16) -> Pcp6Client {
        let mut client = Pcp6Client::new(ROUTER, ROUTER).with_schedule(Schedule {
            initial: Duration::from_millis(200),
            max: Duration::from_millis(200),
            max_tries: 2,
        });
        client.server_port = port;
        client
    }

    #[tokio::test]
    async fn grant_is_the_pinhole_asked_for() {
        let (port, server) = server(|req| reply(req, 0, 600, 8443, ROUTER)).await;
        let grant = client(port).map(&map()).await.unwrap();
        assert_eq!(grant.external_address, ROUTER);
        assert_eq!(grant.external_port, 8443);
        assert_eq!(grant.lifetime_secs, 600);
        assert_eq!(grant.epoch, 1000);
        let sent = server.await.unwrap();
        assert_eq!(&sent[8..24], &ROUTER.octets(), "client IP, not IPv4-mapped");
        assert_eq!(sent.len(), 64, "MAP with PREFER_FAILURE");
    }

    #[tokio::test]
    async fn another_port_is_a_conflict_and_an_ipv4_grant_is_refused() {
        let (port, _server) = server(|req| reply(req, 0, 600, 9000, ROUTER)).await;
        // The give-back (lifetime 0) finds no server any more: the conflict is still reported.
        match client(port).map(&map()).await {
            Err(RouterError::Conflict {
                port: 8443, detail, ..
            }) => {
                assert!(detail.contains("9000"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        let mapped = std::net::Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped();
        let (port, _server) = server(move |req| reply(req, 0, 600, 8443, mapped)).await;
        assert!(matches!(
            client(port).map(&map()).await,
            Err(RouterError::Unusable { .. })
        ));
    }

    #[tokio::test]
    async fn error_results_are_refusals_and_delete_of_a_missing_one_is_success() {
        // NOT_AUTHORIZED (2)
        let (port, _server) = server(|req| reply(req, 2, 30, 0, Ipv6Addr::UNSPECIFIED)).await;
        assert!(matches!(
            client(port).map(&map()).await,
            Err(RouterError::Refused { .. })
        ));
        // NO_RESOURCES (8) to a delete: gone.
        let (port, server) = server(|req| reply(req, 8, 30, 0, Ipv6Addr::UNSPECIFIED)).await;
        client(port).delete(&map()).await.unwrap();
        let sent = server.await.unwrap();
        assert_eq!(&sent[4..8], &[0, 0, 0, 0], "lifetime 0");
        assert_eq!(&sent[24..36], &[7; 12], "the same nonce");
    }

    #[test]
    fn a_link_local_gateway_is_asked_on_its_interface_from_the_client_ip() {
        let global: Ipv6Addr = "2001:db8:77::10".parse().unwrap();
        let plain = Pcp6Client::new("2001:db8:77::1".parse().unwrap(), global).route();
        assert_eq!(plain.router.to_string(), "[2001:db8:77::1]:5351");
        let scoped = Pcp6Client::new("fe80::1".parse().unwrap(), global)
            .with_scope_id(3)
            .route();
        assert_eq!(scoped.router.to_string(), "[fe80::1%3]:5351");
        assert_eq!(
            scoped.local,
            IpAddr::V6(global),
            "bound to the global client IP"
        );
    }
}
