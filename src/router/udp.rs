//! One UDP request/response exchange with a router, shared by PCP over IPv4 and IPv6 and by
//! NAT-PMP: the socket (bound to the address the router must see, connected to the router),
//! the retransmission schedule, the deadline of each try, the source check, the read cap,
//! and the error when nothing usable came back. The protocols judge the datagrams.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use super::{RouterError, SocketStep};

/// At most this many stale datagrams are dropped before an exchange.
const STALE_DATAGRAMS_MAX: usize = 64;

/// Who is asked, from where, and how: fixed per client.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The protocol's name in messages ("PCP", "NAT-PMP").
    pub protocol: &'static str,
    /// The address requests are sent from (the one the router maps to or checks).
    pub local: IpAddr,
    pub router: SocketAddr,
    /// The largest datagram read whole; a longer one is cut to this and left to the codec to
    /// refuse, so make it larger than any valid answer.
    pub read_cap_bytes: usize,
    /// What the user can check when nothing answers, starting with "; " (or empty).
    pub hint: &'static str,
    /// The crash point reached after each send (`crate::crashpoint`), if any.
    pub sent_point: Option<&'static str>,
}

/// What a protocol makes of one datagram from the router.
#[derive(Debug)]
pub enum Verdict<T> {
    /// The answer to this request: the exchange ends with it.
    Answer(T),
    /// Not an answer to this request (another request's, undecodable): keep waiting; the
    /// words go into the error if no answer comes.
    Ignore(String),
    /// An answer that ends the exchange with an error (the router speaks another version).
    Fail(RouterError),
}

/// The socket of one client, opened at the first exchange and kept.
#[derive(Debug, Default)]
pub struct UdpExchange {
    socket: Option<UdpSocket>,
}

impl UdpExchange {
    async fn socket(&mut self, route: &Route) -> Result<&UdpSocket, RouterError> {
        if let Some(socket) = self.socket.take() {
            return Ok(self.socket.insert(socket));
        }
        let failed = |step, source| RouterError::Socket {
            protocol: route.protocol,
            step,
            local: route.local,
            router: route.router,
            source,
        };
        // NOTE: the source address must be the one in the request (RFC 6887 §8.1: else
        // ADDRESS_MISMATCH; RFC 6886 §3.3: NAT-PMP maps the sender's ports).
        let socket = UdpSocket::bind((route.local, 0))
            .await
            .map_err(|err| failed(SocketStep::Bind, err))?;
        // NOTE: a connected socket receives only datagrams from the router's address and
        // port: the source check of RFC 6886 §3.1 and RFC 6887 §8.3, done by the kernel.
        socket
            .connect(route.router)
            .await
            .map_err(|err| failed(SocketStep::Connect, err))?;
        Ok(self.socket.insert(socket))
    }

    /// Opens the socket (if it is not yet) and says its local address: tests answer it from
    /// elsewhere.
    #[cfg(test)]
    pub(crate) async fn local_address(&mut self, route: &Route) -> Result<SocketAddr, RouterError> {
        let socket = self.socket(route).await?;
        Ok(socket.local_addr().expect("a bound socket has an address"))
    }

    /// Sends `request`, waits each of `waits` in turn for a datagram that `judge` takes as
    /// the answer, and sends again after each wait that brought none; gives up with
    /// [`RouterError::NoAnswer`] after the last. Late answers to earlier requests, already
    /// queued, are dropped first.
    pub async fn exchange<T>(
        &mut self,
        route: &Route,
        request: &[u8],
        waits: impl IntoIterator<Item = Duration>,
        mut judge: impl FnMut(&[u8]) -> Verdict<T>,
    ) -> Result<T, RouterError> {
        let socket = self.socket(route).await?;
        let mut buf = vec![0u8; route.read_cap_bytes.max(1)];
        // Stale answers of an earlier exchange are dropped, a bounded number: a flood from the
        // router's address must not keep this task spinning.
        for _ in 0..STALE_DATAGRAMS_MAX {
            if socket.try_recv(&mut buf).is_err() {
                break;
            }
        }

        let mut last_problem: Option<String> = None;
        let mut tries = 0;
        let mut waited = Duration::ZERO;
        'tries: for wait in waits {
            tries += 1;
            waited += wait;
            let deadline = tokio::time::Instant::now() + wait;
            // README.md, "Benchmarks": the breakdown of annotated -> live.
            tracing::debug!(target: "holepunch::timing", stage = "udp sent", protocol = route.protocol,
                try_number = tries, "request sent");
            if let Err(err) = socket.send(request).await {
                last_problem = Some(format!("send failed: {err}"));
            }
            if let Some(point) = route.sent_point {
                crate::crashpoint::reached(point);
            }
            loop {
                let len = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                    Err(_elapsed) => continue 'tries,
                    Ok(Err(err)) => {
                        // ICMP errors (port or host unreachable) surface here on a connected
                        // socket; keep to the schedule all the same.
                        last_problem = Some(format!("receive failed: {err}"));
                        tokio::time::sleep_until(deadline).await;
                        continue 'tries;
                    }
                    Ok(Ok(len)) => len,
                };
                match judge(&buf[..len]) {
                    Verdict::Answer(answer) => return Ok(answer),
                    Verdict::Fail(err) => return Err(err),
                    Verdict::Ignore(why) => {
                        tracing::debug!(router = %route.router, protocol = route.protocol,
                            %why, "ignoring a datagram");
                        last_problem = Some(why);
                    }
                }
            }
        }
        Err(RouterError::NoAnswer {
            protocol: route.protocol,
            router: route.router,
            tries,
            waited,
            hint: route.hint,
            last_problem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn route(router: SocketAddr, read_cap_bytes: usize) -> Route {
        Route {
            protocol: "TEST",
            local: IpAddr::V4(Ipv4Addr::LOCALHOST),
            router,
            read_cap_bytes,
            hint: "; check the test",
            sent_point: None,
        }
    }

    /// A router that ignores the first request, then answers each later one with a foreign
    /// datagram and an oversized answer.
    #[tokio::test]
    async fn retransmits_on_schedule_skips_what_it_ignores_and_caps_reads() {
        let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let router = server.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (_, _) = server.recv_from(&mut buf).await.unwrap();
            let (len, from) = server.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..len], b"ask");
            server.send_to(b"noise", from).await.unwrap();
            server.send_to(&[7u8; 40], from).await.unwrap();
        });
        let mut udp = UdpExchange::default();
        let waits = [Duration::from_millis(100), Duration::from_secs(5)];
        let answer = udp
            .exchange(&route(router, 16), b"ask", waits, |datagram| {
                if datagram == b"noise" {
                    Verdict::Ignore("noise".to_owned())
                } else {
                    Verdict::Answer(datagram.len())
                }
            })
            .await
            .unwrap();
        // The 40-byte answer was read only up to the cap.
        assert_eq!(answer, 16);
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn silence_ends_after_the_last_wait_and_says_what_was_seen() {
        let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let router = server.local_addr().unwrap();
        let mut udp = UdpExchange::default();
        let waits = [Duration::from_millis(50), Duration::from_millis(100)];
        let started = std::time::Instant::now();
        let result: Result<(), _> = udp
            .exchange(&route(router, 16), b"ask", waits, |_| Verdict::Answer(()))
            .await;
        let elapsed = started.elapsed();
        match result {
            Err(RouterError::NoAnswer {
                tries: 2,
                waited,
                hint: "; check the test",
                ..
            }) => assert_eq!(waited, Duration::from_millis(150)),
            other => panic!("{other:?}"),
        }
        assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        // Both requests went out.
        let mut buf = [0u8; 8];
        for _ in 0..2 {
            let len = server.recv(&mut buf).await.unwrap();
            assert_eq!(&buf[..len], b"ask");
        }
    }

    #[tokio::test]
    async fn a_failing_verdict_ends_the_exchange_at_once() {
        let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let router = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let (_, from) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(b"v9", from).await.unwrap();
        });
        let mut udp = UdpExchange::default();
        let result: Result<(), _> = udp
            .exchange(&route(router, 16), b"ask", [Duration::from_secs(5)], |_| {
                Verdict::Fail(RouterError::Refused {
                    reason: "another version".to_owned(),
                    retry_after: None,
                })
            })
            .await;
        assert!(
            matches!(result, Err(RouterError::Refused { .. })),
            "{result:?}"
        );
    }
}
