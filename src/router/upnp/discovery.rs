//! Finding the router's WAN connection service: SSDP M-SEARCH from the LAN address (UDA 1.1
//! §1.3), then the device description (§2.3). Answers are untrusted: only those that come from
//! the gateway and whose LOCATION points at the gateway are followed, the description is
//! size-capped and time-limited, redirects are not followed, and the control URL must stay on
//! the same host. Of several WAN connection services, the one that says it is connected wins.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::net::UdpSocket;

use super::UpnpError;
use super::description::{self, Description};
use super::http::{self, HttpUrl};
use super::{soap, ssdp};

/// How discovery searches; the defaults suit a real LAN, tests aim it at fakes.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// Where M-SEARCH goes: the SSDP multicast group, or a fake's socket in tests.
    pub ssdp_target: SocketAddr,
    /// How long to wait for a usable answer.
    pub search_timeout: Duration,
    /// Deadline of each HTTP exchange (the description fetch, then every SOAP call).
    pub http_timeout: Duration,
    /// Largest description accepted.
    pub max_description_bytes: usize,
}

/// Default wait for SSDP answers: MX is 1 s, so a router answers well within 3 s.
pub const DEFAULT_SEARCH_TIMEOUT_MS: u64 = 3000;
/// Default deadline of one HTTP exchange with the router (miniupnpd answers in 8-120 ms).
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 3000;

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            ssdp_target: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900)),
            search_timeout: Duration::from_millis(DEFAULT_SEARCH_TIMEOUT_MS),
            http_timeout: Duration::from_millis(DEFAULT_HTTP_TIMEOUT_MS),
            max_description_bytes: description::MAX_DESCRIPTION_BYTES,
        }
    }
}

/// A usable WAN connection service.
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub control: HttpUrl,
    pub service_type: String,
    pub udn: Option<String>,
    pub boot_id: Option<u32>,
}

/// Fetches and reads the description at `location`; `pinned` is the only host the control
/// URL may point at.
pub(super) async fn fetch(
    options: &Discovery,
    location: &HttpUrl,
    pinned: &str,
) -> Result<Found, UpnpError> {
    let response = http::request(
        location,
        "GET",
        &[],
        "",
        options.max_description_bytes,
        options.http_timeout,
    )
    .await
    .map_err(|source| UpnpError::FetchDescription {
        url: location.to_string(),
        source,
    })?;
    if response.status != 200 {
        return Err(UpnpError::DescriptionStatus {
            url: location.to_string(),
            status: response.status,
        });
    }
    let description: Description =
        description::parse(&response.body).map_err(|source| UpnpError::ReadDescription {
            url: location.to_string(),
            source,
        })?;
    let services = description.wan_services();
    if services.is_empty() {
        return Err(UpnpError::NoWanService {
            url: location.to_string(),
        });
    }
    let base = match &description.url_base {
        Some(base) => HttpUrl::parse(base).unwrap_or_else(|_| location.clone()),
        None => location.clone(),
    };
    let mut candidates = Vec::with_capacity(services.len());
    for service in services {
        let control = base
            .join(&service.control_url)
            .map_err(|source| UpnpError::ControlUrl {
                url: location.to_string(),
                source,
            })?;
        if control.host != pinned {
            return Err(UpnpError::ControlElsewhere {
                control: control.to_string(),
                pinned: pinned.to_owned(),
            });
        }
        candidates.push((control, service.service_type.clone()));
    }
    let chosen = if candidates.len() > 1 {
        connected_service(options, &candidates).await
    } else {
        0
    };
    let Some((control, service_type)) = candidates.into_iter().nth(chosen) else {
        return Err(UpnpError::NoWanService {
            url: location.to_string(),
        });
    };
    Ok(Found {
        control,
        service_type,
        udn: description.udn.clone(),
        boot_id: None,
    })
}

/// Which of several WAN connection services (most preferred first) carries the connection:
/// the first whose GetStatusInfo says `Connected`; the most preferred when none says so (or
/// none answers), as before.
// NOTE: PPPoE routers often list a WANIPConnection that stays `Disconnected` beside the
// WANPPPConnection that carries the traffic (WANIPConnection:1 §2.2.6 ConnectionStatus;
// miniupnpc's UPNP_GetValidIGD checks GetStatusInfo for the same reason). Mapping through the
// disconnected one succeeds and forwards nothing.
async fn connected_service(options: &Discovery, candidates: &[(HttpUrl, String)]) -> usize {
    for (index, (control, service_type)) in candidates.iter().enumerate() {
        let status = connection_status(options, control, service_type).await;
        tracing::debug!(%control, service = %service_type, ?status, "WAN connection status");
        if status.as_deref() == Some("Connected") {
            return index;
        }
    }
    0
}

/// GetStatusInfo's NewConnectionStatus, or `None` when the router does not say.
async fn connection_status(
    options: &Discovery,
    control: &HttpUrl,
    service_type: &str,
) -> Option<String> {
    const ACTION: &str = "GetStatusInfo";
    let response = http::request(
        control,
        "POST",
        &[
            ("Content-Type", "text/xml; charset=\"utf-8\""),
            ("SOAPAction", &soap::action_header(service_type, ACTION)),
        ],
        &soap::envelope(service_type, ACTION, &[]),
        soap::MAX_REPLY_BYTES,
        options.http_timeout,
    )
    .await
    .ok()?;
    match soap::parse_reply(response.status, &response.body, ACTION).ok()? {
        soap::Reply::Success(args) => args.get("NewConnectionStatus").map(str::to_owned),
        soap::Reply::Fault(_) => None,
    }
}

/// SSDP search from `lan_address`, following only answers from and about `gateway`.
pub(super) async fn search(
    options: &Discovery,
    gateway: Ipv4Addr,
    lan_address: Ipv4Addr,
) -> Result<Found, UpnpError> {
    let socket = UdpSocket::bind((lan_address, 0))
        .await
        .map_err(|source| UpnpError::Bind {
            address: lan_address,
            source,
        })?;
    // NOTE: UDA 1.1 §1.3.2: TTL defaults to 2 for M-SEARCH.
    socket
        .set_multicast_ttl_v4(2)
        .map_err(|source| UpnpError::Bind {
            address: lan_address,
            source,
        })?;
    let mut destinations = vec![options.ssdp_target];
    // NOTE: UDA 1.1 §1.3.2 allows a unicast M-SEARCH to port 1900; miniupnpd 2.3.1 answers it
    // (measured in the lab). It reaches the gateway even when multicast would leave by another
    // interface (the socket is bound to an address, not to an interface).
    if options.ssdp_target.ip().is_multicast() {
        destinations.push(SocketAddr::V4(SocketAddrV4::new(gateway, ssdp::PORT)));
    }
    // One destination is enough (multicast may have no route while unicast does).
    let mut sent_any = false;
    let mut last_failure = None;
    for destination in destinations {
        for target in ssdp::SEARCH_TARGETS {
            match socket
                .send_to(ssdp::search_request(target).as_bytes(), destination)
                .await
            {
                Ok(_) => sent_any = true,
                Err(source) => last_failure = Some((destination, source)),
            }
        }
    }
    if !sent_any && let Some((target, source)) = last_failure {
        return Err(UpnpError::Search { target, source });
    }
    let deadline = tokio::time::Instant::now() + options.search_timeout;
    let hard_deadline = deadline + options.http_timeout;
    let pinned = gateway.to_string();
    let mut tried: HashSet<String> = HashSet::new();
    let mut ignored: Vec<String> = Vec::new();
    let mut buf = [0u8; ssdp::MAX_ANSWER_BYTES];
    loop {
        let (len, from) = match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            Err(_elapsed) => break,
            Ok(Err(err)) => {
                note(&mut ignored, format!("receive error: {err}"));
                continue;
            }
            Ok(Ok(received)) => received,
        };
        if from.ip() != gateway {
            note(
                &mut ignored,
                format!("an answer from {} (not the gateway)", from.ip()),
            );
            continue;
        }
        let answer = match ssdp::parse_answer(&buf[..len]) {
            Ok(answer) => answer,
            Err(err) => {
                note(&mut ignored, format!("an answer from {from}: {err}"));
                continue;
            }
        };
        if !tried.insert(answer.location.clone()) {
            continue;
        }
        let location = match HttpUrl::parse(&answer.location) {
            Ok(location) if location.ipv4() == Some(gateway) => location,
            Ok(_) | Err(_) => {
                note(
                    &mut ignored,
                    format!(
                        "LOCATION {:?} does not point at the gateway",
                        answer.location.chars().take(100).collect::<String>()
                    ),
                );
                continue;
            }
        };
        // A gateway that keeps sending new LOCATIONs must not keep discovery going: every
        // fetch ends by one HTTP timeout after the search deadline.
        match tokio::time::timeout_at(hard_deadline, fetch(options, &location, &pinned)).await {
            Ok(Ok(found)) => {
                return Ok(Found {
                    boot_id: answer.boot_id,
                    ..found
                });
            }
            Ok(Err(err)) => note(&mut ignored, err.to_string()),
            Err(_elapsed) => {
                note(&mut ignored, format!("{location}: no description in time"));
                break;
            }
        }
    }
    Err(UpnpError::NoGateway {
        gateway,
        waited_ms: options.search_timeout.as_millis(),
        ignored: if ignored.is_empty() {
            String::new()
        } else {
            format!(" (ignored: {})", ignored.join("; "))
        },
    })
}

/// Records why an answer was ignored (a few reasons are enough for the message).
fn note(ignored: &mut Vec<String>, reason: String) {
    tracing::debug!(%reason, "ignoring an SSDP answer");
    if ignored.len() < 5 {
        ignored.push(reason);
    }
}
