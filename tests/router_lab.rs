//! holepunch's PCP and NAT-PMP codecs against a real router: miniupnpd 2.3.1 in the lab of
//! `tests/lab/router-lab` (see `tests/support/lab.rs`). Requests are encoded by holepunch,
//! sent from the LAN host 192.168.77.10 to 192.168.77.1:5351, and the answers decoded by
//! holepunch. The lab tier: needs root (`cargo test --features lab --test router_lab`). Every
//! lab test lives in this one binary (the labs share addresses and run one at a time).

#[path = "support/lab.rs"]
mod lab;

use std::net::{IpAddr, Ipv4Addr};
use std::thread;
use std::time::Duration;

use holepunch::model::Protocol;
use holepunch::router::natpmp::codec as natpmp;
use holepunch::router::pcp::codec as pcp;
use lab::{LAN_IP, Lab, NODE_IP, ROUTER_LAN_IP, WAN_CLIENT_IP, listen, received, send_from_wan};

const PREFIX: &str = "hpt-";
const WAN_IP: Ipv4Addr = Ipv4Addr::new(11, 22, 33, 44);

fn lan_ip() -> Ipv4Addr {
    LAN_IP.parse().unwrap()
}

fn pcp_map(nonce: pcp::Nonce, protocol: Protocol, port: u16, lifetime: u32) -> pcp::MapRequest {
    pcp::MapRequest {
        lifetime_secs: lifetime,
        client_ip: lan_ip(),
        nonce,
        protocol: protocol.iana_number(),
        internal_port: port,
        suggested_external_port: port,
        suggested_external_ip: None,
        third_party: None,
        prefer_failure: true,
    }
}

fn pcp_send(lab: &Lab, request: &pcp::MapRequest) -> pcp::Response {
    let answer = lab.udp_exchange(
        "lan",
        LAN_IP,
        ROUTER_LAN_IP,
        pcp::SERVER_PORT,
        &request.encode(),
    );
    let response = pcp::decode_response(&answer)
        .unwrap_or_else(|err| panic!("decode PCP answer {}: {err}", lab::hex(&answer)));
    assert!(
        response.matches(request),
        "the answer does not match the request: {response:?} for {request:?}"
    );
    response
}

fn map_body(response: &pcp::Response) -> &pcp::MapResponse {
    match &response.body {
        pcp::ResponseBody::Map(map) => map,
        other => panic!("expected a MAP body, got {other:?}"),
    }
}

fn natpmp_send(lab: &Lab, request: &[u8]) -> natpmp::Response {
    let answer = lab.udp_exchange("lan", LAN_IP, ROUTER_LAN_IP, natpmp::SERVER_PORT, request);
    natpmp::decode_response(&answer)
        .unwrap_or_else(|err| panic!("decode NAT-PMP answer {}: {err}", lab::hex(&answer)))
}

fn nonce() -> pcp::Nonce {
    pcp::Nonce::random(&mut rand::rng())
}

/// Whether the router forwards `proto dport` to `LAN_IP:port`.
fn forwarded(lab: &Lab, proto: &str, port: u16) -> bool {
    let rules = lab.router_forwards();
    let proto_byte = if proto == "tcp" { "0x6" } else { "0x11" };
    rules.lines().any(|line| {
        line.contains(proto_byte)
            && line.contains(&format!("dport {port} "))
            && line.contains(&format!("dnat ip to {LAN_IP}:{port}"))
    })
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn natpmp_external_address_is_the_router_wan_address() {
    let lab = Lab::up(PREFIX);
    let response = natpmp_send(&lab, &natpmp::ExternalAddressRequest.encode());
    assert_eq!(response.opcode, natpmp::Opcode::ExternalAddress);
    assert_eq!(response.result, natpmp::ResultCode::Success);
    assert_eq!(response.body, natpmp::ResponseBody::ExternalAddress(WAN_IP));
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_map_then_delete_with_the_same_nonce() {
    let lab = Lab::up(PREFIX);
    let nonce = nonce();
    let request = pcp_map(nonce, Protocol::Tcp, 18080, 600);
    let response = pcp_send(&lab, &request);
    assert_eq!(response.result, pcp::ResultCode::Success, "{response:?}");
    assert_eq!(response.opcode(), pcp::Opcode::Map);
    assert_eq!(response.lifetime_secs, 600);
    let map = map_body(&response);
    assert_eq!(map.assigned_external_port, 18080);
    assert_eq!(map.assigned_external_ip, IpAddr::V4(WAN_IP));
    // miniupnpd's epoch counts from its start: seconds, not absent (u32::MAX) or garbage.
    assert!(response.epoch_secs < 3600, "epoch {}", response.epoch_secs);
    assert!(forwarded(&lab, "tcp", 18080), "{}", lab.router_forwards());

    let delete = pcp_send(&lab, &pcp_map(nonce, Protocol::Tcp, 18080, 0));
    assert_eq!(delete.result, pcp::ResultCode::Success, "{delete:?}");
    assert_eq!(delete.lifetime_secs, 0);
    assert!(!forwarded(&lab, "tcp", 18080), "{}", lab.router_forwards());

    // Measured on miniupnpd 2.3.1: deleting a mapping that is gone answers NO_RESOURCES with
    // a 30 s lifetime; a client must treat it as "gone", not as a failure to retry.
    let again = pcp_send(&lab, &pcp_map(nonce, Protocol::Tcp, 18080, 0));
    assert_eq!(again.result, pcp::ResultCode::NoResources, "{again:?}");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_delete_with_another_nonce_is_not_authorized() {
    let lab = Lab::up(PREFIX);
    let owner = nonce();
    let created = pcp_send(&lab, &pcp_map(owner, Protocol::Tcp, 18080, 600));
    assert_eq!(created.result, pcp::ResultCode::Success, "{created:?}");

    let intruder = pcp_send(&lab, &pcp_map(nonce(), Protocol::Tcp, 18080, 0));
    assert_eq!(
        intruder.result,
        pcp::ResultCode::NotAuthorized,
        "{intruder:?}"
    );
    assert!(forwarded(&lab, "tcp", 18080), "{}", lab.router_forwards());

    let delete = pcp_send(&lab, &pcp_map(owner, Protocol::Tcp, 18080, 0));
    assert_eq!(delete.result, pcp::ResultCode::Success, "{delete:?}");
    assert!(!forwarded(&lab, "tcp", 18080), "{}", lab.router_forwards());
}

/// Measured on miniupnpd 2.3.1: a MAP (lifetime > 0) from the same host with a new nonce for a
/// port it already maps is granted and takes the mapping over; from then on only the new nonce
/// may delete it. A nonce that is not persisted before sending loses the mapping this way.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_map_with_a_new_nonce_takes_over_the_mapping() {
    let lab = Lab::up(PREFIX);
    let first = nonce();
    let second = nonce();
    let created = pcp_send(&lab, &pcp_map(first, Protocol::Tcp, 18081, 600));
    assert_eq!(created.result, pcp::ResultCode::Success, "{created:?}");
    let taken = pcp_send(&lab, &pcp_map(second, Protocol::Tcp, 18081, 600));
    assert_eq!(taken.result, pcp::ResultCode::Success, "{taken:?}");
    assert_eq!(map_body(&taken).assigned_external_port, 18081);

    let old = pcp_send(&lab, &pcp_map(first, Protocol::Tcp, 18081, 0));
    assert_eq!(old.result, pcp::ResultCode::NotAuthorized, "{old:?}");
    let new = pcp_send(&lab, &pcp_map(second, Protocol::Tcp, 18081, 0));
    assert_eq!(new.result, pcp::ResultCode::Success, "{new:?}");
    assert!(!forwarded(&lab, "tcp", 18081), "{}", lab.router_forwards());
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_third_party_is_refused_in_secure_mode() {
    let lab = Lab::up(PREFIX);
    let request = pcp::MapRequest {
        third_party: Some(NODE_IP.parse().unwrap()),
        ..pcp_map(nonce(), Protocol::Tcp, 18080, 600)
    };
    let response = pcp_send(&lab, &request);
    assert_eq!(
        response.result,
        pcp::ResultCode::UnsuppOption,
        "{response:?}"
    );
    assert_eq!(response.lifetime_secs, 0);
    let rules = lab.router_forwards();
    assert!(!rules.contains("dnat"), "{rules}");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_mapping_is_gone_after_a_router_restart_and_can_be_recreated() {
    let lab = Lab::up(PREFIX);
    let nonce = nonce();
    let before = pcp_send(&lab, &pcp_map(nonce, Protocol::Tcp, 18082, 600));
    assert_eq!(before.result, pcp::ResultCode::Success, "{before:?}");
    // Let the epoch grow so that the restart shows as an epoch going backwards (§8.5).
    thread::sleep(Duration::from_secs(2));
    let probe = pcp_send(&lab, &pcp_map(nonce, Protocol::Tcp, 18082, 600));
    assert!(probe.epoch_secs >= 2, "{probe:?}");

    lab.restart_router();
    assert!(!forwarded(&lab, "tcp", 18082), "{}", lab.router_forwards());
    let after = pcp_send(&lab, &pcp_map(nonce, Protocol::Tcp, 18082, 600));
    assert_eq!(after.result, pcp::ResultCode::Success, "{after:?}");
    assert_eq!(map_body(&after).assigned_external_port, 18082);
    assert!(
        after.epoch_secs < probe.epoch_secs,
        "epoch did not go back: {} then {}",
        probe.epoch_secs,
        after.epoch_secs
    );
    assert!(forwarded(&lab, "tcp", 18082), "{}", lab.router_forwards());
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_tcp_mapping_carries_traffic_from_the_internet() {
    let lab = Lab::up(PREFIX);
    let listener = listen(&lab, "lan", "tcp", 18080);
    // Before the mapping the router itself answers: connection refused.
    let unmapped = send_from_wan(&lab, "tcp", 18080, "too early");
    assert!(
        !unmapped.status.success(),
        "reached the LAN without a mapping"
    );

    let nonce = nonce();
    let created = pcp_send(&lab, &pcp_map(nonce, Protocol::Tcp, 18080, 600));
    assert_eq!(created.result, pcp::ResultCode::Success, "{created:?}");
    let sent = send_from_wan(&lab, "tcp", 18080, "hello over pcp");
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(
        received(listener),
        format!("{WAN_CLIENT_IP} hello over pcp")
    );
    let delete = pcp_send(&lab, &pcp_map(nonce, Protocol::Tcp, 18080, 0));
    assert_eq!(delete.result, pcp::ResultCode::Success, "{delete:?}");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn natpmp_udp_mapping_carries_traffic_from_the_internet() {
    let lab = Lab::up(PREFIX);
    let listener = listen(&lab, "lan", "udp", 18090);
    let request = natpmp::MapRequest {
        protocol: Protocol::Udp,
        internal_port: 18090,
        suggested_external_port: 18090,
        lifetime_secs: 600,
    };
    let response = natpmp_send(&lab, &request.encode());
    assert!(response.matches(&request), "{response:?}");
    assert_eq!(response.result, natpmp::ResultCode::Success, "{response:?}");
    match response.body {
        natpmp::ResponseBody::Map(map) => {
            assert_eq!(map.internal_port, 18090);
            assert_eq!(map.external_port, 18090);
            assert_eq!(map.lifetime_secs, 600);
        }
        other => panic!("expected a mapping body, got {other:?}"),
    }
    assert!(forwarded(&lab, "udp", 18090), "{}", lab.router_forwards());

    let sent = send_from_wan(&lab, "udp", 18090, "hello over nat-pmp");
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(
        received(listener),
        format!("{WAN_CLIENT_IP} hello over nat-pmp")
    );

    let delete = natpmp::MapRequest::delete(Protocol::Udp, 18090);
    let deleted = natpmp_send(&lab, &delete.encode());
    assert!(deleted.matches(&delete), "{deleted:?}");
    assert_eq!(deleted.result, natpmp::ResultCode::Success, "{deleted:?}");
    assert!(!forwarded(&lab, "udp", 18090), "{}", lab.router_forwards());
}

/// Runs `pcp_client_step_in_lan` inside the lab's LAN namespace (a test process cannot open
/// sockets in another namespace), with `step` and `nonce` in its environment; returns its
/// output, asserting it passed.
fn pcp_client_step(lab: &Lab, step: &str, nonce: &str) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("lan")])
        .arg(exe)
        .args([
            "--exact",
            "pcp_client_step_in_lan",
            "--ignored",
            "--nocapture",
        ])
        .env("HOLEPUNCH_PCP_STEP", step)
        .env("HOLEPUNCH_PCP_NONCE", nonce)
        .output()
        .expect("re-run the test binary in the LAN namespace");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "step {step} failed:\n{output}");
    output
}

/// holepunch's PCP client (the `PortMapper` the daemon uses) against miniupnpd: map, the
/// router forwards, unmap removes it, a second unmap is still success, and a silent gateway
/// is reported unreachable within the retransmission bound.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_client_maps_unmaps_idempotently_and_reports_a_silent_gateway() {
    let lab = Lab::up(PREFIX);
    let nonce = nonce().to_string();
    let granted = pcp_client_step(&lab, "map", &nonce);
    assert!(granted.contains("GRANTED"), "{granted}");
    assert!(forwarded(&lab, "tcp", 18100), "{}", lab.router_forwards());

    pcp_client_step(&lab, "unmap", &nonce);
    assert!(!forwarded(&lab, "tcp", 18100), "{}", lab.router_forwards());
    pcp_client_step(&lab, "unmap", &nonce);
    pcp_client_step(&lab, "silent", &nonce);
}

/// The part of the test above that runs inside the LAN namespace; not run on its own.
#[test]
#[ignore = "run by pcp_client_maps_unmaps_idempotently_and_reports_a_silent_gateway"]
fn pcp_client_step_in_lan() {
    use holepunch::model::{Backend, Endpoint, MappingKey, Owner};
    use holepunch::router::pcp::client::{PcpClient, Schedule};
    use holepunch::router::{MapRequest, PortMapper, RouterError};
    use holepunch::state::MappingRecord;

    let step = std::env::var("HOLEPUNCH_PCP_STEP").expect("set by the outer test");
    let nonce = std::env::var("HOLEPUNCH_PCP_NONCE").expect("set by the outer test");
    let internal = Endpoint::new(lan_ip(), 18100);
    let gateway: Ipv4Addr = ROUTER_LAN_IP.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match step.as_str() {
            "map" => {
                let mut client = PcpClient::new(gateway, lan_ip());
                let request = MapRequest {
                    owner: Owner::new("default", "web"),
                    protocol: Protocol::Tcp,
                    external_port: 18100,
                    internal,
                    lifetime_secs: 600,
                    nonce: nonce.parse().ok(),
                };
                let grant = client.map(&request).await.expect("granted");
                assert_eq!(grant.external_port, 18100);
                assert_eq!(grant.lifetime_secs, 600);
                assert_eq!(grant.external_address, Some(WAN_IP));
                assert!(grant.epoch.is_some());
                let renew = grant.renew_after.expect("renew point").as_secs();
                assert!((300..=375).contains(&renew), "renew after {renew} s");
                println!("GRANTED {grant:?}");
            }
            "unmap" => {
                let mut client = PcpClient::new(gateway, lan_ip());
                let record = MappingRecord {
                    nonce: Some(nonce.clone()),
                    times: holepunch::state::LeaseTimes {
                        lifetime_secs: 600,
                        ..Default::default()
                    },
                    ..MappingRecord::leftover(
                        Owner::new("default", "web"),
                        MappingKey {
                            protocol: Protocol::Tcp,
                            external_port: 18100,
                        },
                        internal,
                        Backend::Pcp,
                    )
                };
                client
                    .unmap(&record.lease())
                    .await
                    .expect("unmapped (or already gone)");
            }
            "silent" => {
                let nobody: Ipv4Addr = "192.168.77.99".parse().unwrap();
                let schedule = Schedule {
                    initial: Duration::from_millis(200),
                    max: Duration::from_secs(1),
                    max_tries: 2,
                };
                let mut client = PcpClient::new(nobody, lan_ip()).with_schedule(schedule);
                let request = MapRequest {
                    owner: Owner::new("default", "web"),
                    protocol: Protocol::Tcp,
                    external_port: 18101,
                    internal,
                    lifetime_secs: 600,
                    nonce: nonce.parse().ok(),
                };
                let started = std::time::Instant::now();
                let result = client.map(&request).await;
                assert!(
                    matches!(result, Err(RouterError::NoAnswer { .. })),
                    "{result:?}"
                );
                assert!(started.elapsed() <= schedule.worst_case() + Duration::from_millis(1500));
            }
            other => panic!("unknown step {other}"),
        }
    });
}
