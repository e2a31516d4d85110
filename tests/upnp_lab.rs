//! holepunch's UPnP IGD client (`holepunch::router::upnp::UpnpClient`, the `PortMapper` the
//! daemon uses) against a real router: miniupnpd 2.3.1 in the lab of `tests/lab/router-lab`
//! (prefix `hpu-`). The client runs inside the LAN namespace (the test binary re-runs itself
//! there, see `upnp_steps_in_lan`), discovers the router over SSDP, and the traffic checks send
//! real TCP and UDP from the WAN namespace through the router's NAT. Needs root: the lab tier
//! (as root: `cargo test --features lab --test upnp_lab`).

#[path = "support/lab.rs"]
mod lab;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use holepunch::model::{Backend, Endpoint, MappingKey, Owner, Protocol};
use holepunch::router::upnp::http::{self, HttpUrl};
use holepunch::router::upnp::{Discovery, UpnpClient, soap};
use holepunch::router::{MapRequest, PortMapper};
use holepunch::state::MappingRecord;
use lab::{LAN_IP, Lab, NODE_IP, ROUTER_LAN_IP, WAN_CLIENT_IP, listen, received, send_from_wan};

const PREFIX: &str = "hpu-";
const IGD_URL: &str = "http://192.168.77.1:5000/rootDesc.xml";

/// Runs `steps` (`;`-separated, see `upnp_steps_in_lan`) with one client inside the LAN
/// namespace; returns one output line per step, asserting the process passed.
fn steps(lab: &Lab, steps: &str) -> Vec<String> {
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("lan")])
        .arg(exe)
        .args(["--exact", "upnp_steps_in_lan", "--ignored", "--nocapture"])
        .env("HOLEPUNCH_UPNP_STEPS", steps)
        .output()
        .expect("re-run the test binary in the LAN namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "steps {steps:?} failed:\n{stdout}{}\nrouter log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.router_log()
    );
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("STEP "))
        .map(str::to_owned)
        .collect()
}

/// Whether the router forwards `proto dport` to `to:port`.
fn forwarded(lab: &Lab, proto: &str, port: u16, to: &str) -> bool {
    let rules = lab.router_forwards();
    let proto_byte = if proto == "tcp" { "0x6" } else { "0x11" };
    rules.lines().any(|line| {
        line.contains(proto_byte)
            && line.contains(&format!("dport {port} "))
            && line.contains(&format!("dnat ip to {to}:{port}"))
    })
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_maps_tcp_and_udp_that_carry_traffic_and_unmaps_idempotently() {
    let lab = Lab::up(PREFIX);
    let tcp = listen(&lab, "lan", "tcp", 18200);
    let udp = listen(&lab, "lan", "udp", 18201);
    let out = steps(
        &lab,
        "discover; external; map tcp 18200 192.168.77.10; map udp 18201 192.168.77.10; \
         entry tcp 18200; list",
    );
    assert_eq!(
        out[0],
        "discover upnp:uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b \
         urn:schemas-upnp-org:service:WANIPConnection:2"
    );
    assert_eq!(out[1], "external 11.22.33.44");
    assert_eq!(out[2], "map OK 18200 lifetime 3600 renew 1800");
    assert_eq!(out[3], "map OK 18201 lifetime 3600 renew 1800");
    assert!(
        out[4].starts_with("entry 192.168.77.10:18200 holepunch:lab/web-tcp-18200 enabled"),
        "{}",
        out[4]
    );
    assert!(
        out[5].contains("TCP 18200 -> 192.168.77.10:18200 holepunch:lab/web-tcp-18200")
            && out[5].contains("UDP 18201 -> 192.168.77.10:18201 holepunch:lab/web-udp-18201"),
        "{}",
        out[5]
    );

    let sent = send_from_wan(&lab, "tcp", 18200, "hello over upnp tcp");
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(
        received(tcp),
        format!("{WAN_CLIENT_IP} hello over upnp tcp")
    );
    let sent = send_from_wan(&lab, "udp", 18201, "hello over upnp udp");
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(
        received(udp),
        format!("{WAN_CLIENT_IP} hello over upnp udp")
    );

    let out = steps(
        &lab,
        "unmap tcp 18200 192.168.77.10; unmap udp 18201 192.168.77.10; \
         unmap tcp 18200 192.168.77.10; entry tcp 18200",
    );
    assert_eq!(out, ["unmap OK", "unmap OK", "unmap OK", "entry none"]);
    assert!(
        !forwarded(&lab, "tcp", 18200, LAN_IP),
        "{}",
        lab.router_forwards()
    );
    assert!(
        !forwarded(&lab, "udp", 18201, LAN_IP),
        "{}",
        lab.router_forwards()
    );
    // The router itself now answers the port: connection refused.
    let refused = send_from_wan(&lab, "tcp", 18200, "too late");
    assert!(!refused.status.success(), "still forwarded after unmap");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_configured_url_and_unicast_search_find_the_same_router() {
    let lab = Lab::up(PREFIX);
    let out = steps(&lab, "url; external; unicast; external");
    let service = "upnp:uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b \
                   urn:schemas-upnp-org:service:WANIPConnection:2";
    assert_eq!(
        out,
        [
            format!("url {service}"),
            "external 11.22.33.44".to_owned(),
            format!("unicast {service}"),
            "external 11.22.33.44".to_owned(),
        ]
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_router_restart_loses_the_mapping_and_map_restores_the_same_port() {
    let lab = Lab::up(PREFIX);
    let out = steps(&lab, "map tcp 18210 192.168.77.10");
    assert_eq!(out, ["map OK 18210 lifetime 3600 renew 1800"]);
    assert!(
        forwarded(&lab, "tcp", 18210, LAN_IP),
        "{}",
        lab.router_forwards()
    );

    lab.restart_router();
    assert!(
        !forwarded(&lab, "tcp", 18210, LAN_IP),
        "{}",
        lab.router_forwards()
    );
    let out = steps(&lab, "entry tcp 18210; map tcp 18210 192.168.77.10; list");
    assert_eq!(out[0], "entry none");
    assert_eq!(out[1], "map OK 18210 lifetime 3600 renew 1800");
    // Exactly one mapping: restored, not duplicated.
    assert_eq!(out[2].matches(" -> ").count(), 1, "{}", out[2]);
    assert!(
        forwarded(&lab, "tcp", 18210, LAN_IP),
        "{}",
        lab.router_forwards()
    );
}

/// A router restart that keeps its forwarding rules (miniupnpd stopped without a lease file,
/// as `router-lab restart-router --keep-rules` does): the mapping is adopted and renewed in
/// place, never duplicated.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_router_restart_keeping_rules_leaves_no_duplicates() {
    let lab = Lab::up(PREFIX);
    let out = steps(&lab, "map tcp 18260 192.168.77.10");
    assert_eq!(out, ["map OK 18260 lifetime 3600 renew 1800"]);
    let restart = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/router-lab"),
    )
    .args(["restart-router", "--keep-rules"])
    .env("LAB_PREFIX", PREFIX)
    .output()
    .expect("run router-lab restart-router --keep-rules");
    assert!(restart.status.success(), "{restart:?}");
    assert!(
        forwarded(&lab, "tcp", 18260, LAN_IP),
        "{}",
        lab.router_forwards()
    );

    let out = steps(&lab, "entry tcp 18260; map tcp 18260 192.168.77.10; list");
    assert!(
        out[0].starts_with("entry 192.168.77.10:18260 holepunch:lab/web-tcp-18260 enabled"),
        "{}",
        out[0]
    );
    assert_eq!(out[1], "map OK 18260 lifetime 3600 renew 1800");
    assert_eq!(out[2].matches(" -> ").count(), 1, "{}", out[2]);
    let rules = lab.router_forwards();
    assert_eq!(
        rules.matches("dport 18260 ").count(),
        1,
        "one forwarding rule:\n{rules}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_port_held_by_another_lan_host_is_a_conflict_and_left_untouched() {
    let lab = Lab::up(PREFIX);
    let other = lab.exec(
        "node",
        &[
            "upnpc",
            "-u",
            IGD_URL,
            "-e",
            "someone-else",
            "-a",
            NODE_IP,
            "18220",
            "18220",
            "TCP",
        ],
    );
    assert!(other.status.success(), "{other:?}");
    assert!(
        forwarded(&lab, "tcp", 18220, NODE_IP),
        "{}",
        lab.router_forwards()
    );

    let out = steps(
        &lab,
        "map tcp 18220 192.168.77.10; unmap tcp 18220 192.168.77.10; entry tcp 18220",
    );
    assert!(
        out[0].starts_with("map ERR Conflict") && out[0].contains(NODE_IP),
        "{}",
        out[0]
    );
    assert_eq!(out[1], "unmap OK");
    assert!(
        out[2].starts_with("entry 192.168.77.20:18220 someone-else"),
        "{}",
        out[2]
    );
    assert!(
        forwarded(&lab, "tcp", 18220, NODE_IP),
        "{}",
        lab.router_forwards()
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_secure_mode_refuses_another_host_with_the_relay_hint_and_low_ports() {
    let lab = Lab::up(PREFIX);
    let out = steps(
        &lab,
        "map tcp 18230 192.168.77.20; map tcp 80 192.168.77.10",
    );
    assert!(
        out[0].starts_with("map ERR Refused")
            && out[0].contains("192.168.77.20")
            && out[0].contains(r#"exposure.mode = \"relay\""#),
        "{}",
        out[0]
    );
    assert!(
        out[1].starts_with("map ERR Refused") && out[1].contains("below 1024"),
        "{}",
        out[1]
    );
    let rules = lab.router_forwards();
    assert!(!rules.contains("dnat"), "{rules}");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_insecure_router_maps_to_another_host() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    let listener = listen(&lab, "node", "tcp", 18240);
    let out = steps(&lab, "map tcp 18240 192.168.77.20");
    assert_eq!(out, ["map OK 18240 lifetime 3600 renew 1800"]);
    assert!(
        forwarded(&lab, "tcp", 18240, NODE_IP),
        "{}",
        lab.router_forwards()
    );
    let sent = send_from_wan(&lab, "tcp", 18240, "to the node");
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(received(listener), format!("{WAN_CLIENT_IP} to the node"));
    let out = steps(&lab, "unmap tcp 18240 192.168.77.20");
    assert_eq!(out, ["unmap OK"]);
    assert!(
        !forwarded(&lab, "tcp", 18240, NODE_IP),
        "{}",
        lab.router_forwards()
    );
}

/// miniupnpd 2.3.1 gives back descriptions of 64 bytes or more with stray bytes: an owner
/// whose tag is that long must still be recognised by a fresh client (a restarted daemon),
/// renewed and deleted, not reported as a conflict with itself.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_owner_with_a_long_tag_is_recognised_after_a_restart() {
    let lab = Lab::up(PREFIX);
    let name = "a-service-name-that-is-sixty-three-characters-long-0123456789ab";
    assert_eq!(name.len(), 63);
    let out = steps(
        &lab,
        &format!("map tcp 18250 192.168.77.10 {name}; entry tcp 18250"),
    );
    assert_eq!(out[0], "map OK 18250 lifetime 3600 renew 1800");
    let written = holepunch::router::upnp::description_for(&Owner::new("lab", name));
    // The router reports the lease left, which may have ticked once since the grant.
    let (entry, lease) = out[1]
        .rsplit_once(" enabled lease ")
        .unwrap_or_else(|| panic!("no lease in {:?}", out[1]));
    assert_eq!(entry, format!("entry 192.168.77.10:18250 {written}"));
    let lease: u32 = lease.parse().unwrap_or_else(|e| panic!("{lease:?}: {e}"));
    assert!((3598..=3600).contains(&lease), "lease {lease}");
    // A new process: nothing remembered, the router's description decides.
    let out = steps(
        &lab,
        &format!(
            "map tcp 18250 192.168.77.10 {name}; unmap tcp 18250 192.168.77.10 {name}; \
             entry tcp 18250"
        ),
    );
    assert_eq!(
        out,
        [
            "map OK 18250 lifetime 3600 renew 1800",
            "unmap OK",
            "entry none"
        ]
    );
}

/// Prints the time of SSDP discovery, of a bare AddPortMapping, of `map` on first use
/// (GetSpecificPortMappingEntry + AddPortMapping) and of a renewal (AddPortMapping only).
/// Not a timed assertion: numbers for the report.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_call_timings() {
    let lab = Lab::up(PREFIX);
    let out = steps(&lab, "timings");
    for line in &out {
        println!("{line}");
    }
    assert!(out[0].starts_with("timings"), "{out:?}");
}

fn parse_protocol(text: &str) -> Protocol {
    match text {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => panic!("protocol {other}"),
    }
}

fn owner_for(protocol: Protocol, port: u16) -> Owner {
    Owner::new("lab", format!("web-{protocol}-{port}"))
}

fn map_request(protocol: Protocol, port: u16, address: Ipv4Addr) -> MapRequest {
    MapRequest {
        owner: owner_for(protocol, port),
        protocol,
        external_port: port,
        internal: Endpoint::new(address, port),
        lifetime_secs: 3600,
        nonce: None,
    }
}

fn record(protocol: Protocol, port: u16, address: Ipv4Addr) -> MappingRecord {
    MappingRecord {
        times: holepunch::state::LeaseTimes {
            lifetime_secs: 3600,
            ..Default::default()
        },
        ..MappingRecord::leftover(
            owner_for(protocol, port),
            MappingKey {
                protocol,
                external_port: port,
            },
            Endpoint::new(address, port),
            Backend::Upnp,
        )
    }
}

fn millis(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// The client side of the tests above, run inside the LAN namespace; not run on its own.
/// `HOLEPUNCH_UPNP_STEPS` holds `;`-separated steps, each printing one `STEP ...` line:
/// `discover`, `url`, `external`, `map <tcp|udp> <port> <internal ip> [<owner name>]`,
/// `unmap ...` (same words),
/// `entry <tcp|udp> <port>`, `list`, `timings`.
#[test]
#[ignore = "run by the upnp_* lab tests inside the LAN namespace"]
fn upnp_steps_in_lan() {
    let steps = std::env::var("HOLEPUNCH_UPNP_STEPS").expect("set by the outer test");
    let gateway: Ipv4Addr = ROUTER_LAN_IP.parse().unwrap();
    let lan: Ipv4Addr = LAN_IP.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client: Option<UpnpClient> = None;
        let mut discovery_ms = 0.0;
        for step in steps.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let words: Vec<&str> = step.split_whitespace().collect();
            if words[0] == "unicast" {
                // Only the unicast M-SEARCH to the router's port 1900.
                let options = Discovery {
                    ssdp_target: SocketAddr::new(gateway.into(), 1900),
                    ..Discovery::default()
                };
                let found = UpnpClient::discover_with(&options, gateway, lan, None)
                    .await
                    .expect("unicast SSDP discovery of the lab router");
                println!(
                    "STEP unicast {} {}",
                    found.router_identity(),
                    found.service_type()
                );
                client = Some(found);
                continue;
            }
            if words[0] == "url" {
                let found = UpnpClient::discover(gateway, lan, Some(IGD_URL))
                    .await
                    .expect("description at the configured URL");
                println!(
                    "STEP url {} {}",
                    found.router_identity(),
                    found.service_type()
                );
                client = Some(found);
                continue;
            }
            if client.is_none() || words[0] == "discover" {
                let started = Instant::now();
                let found = UpnpClient::discover(gateway, lan, None)
                    .await
                    .expect("SSDP discovery of the lab router");
                discovery_ms = millis(started);
                if words[0] == "discover" {
                    println!(
                        "STEP discover {} {}",
                        found.router_identity(),
                        found.service_type()
                    );
                }
                client = Some(found);
                if words[0] == "discover" {
                    continue;
                }
            }
            let client = client.as_mut().expect("discovered above");
            let protocol = || parse_protocol(words[1]);
            let port = || words[2].parse::<u16>().expect("port");
            match words[0] {
                "external" => {
                    let address = client.external_address().await.expect("external address");
                    println!("STEP external {address}");
                }
                "map" => {
                    let address = words[3].parse().expect("address");
                    let mut request = map_request(protocol(), port(), address);
                    if let Some(name) = words.get(4) {
                        request.owner = Owner::new("lab", *name);
                    }
                    match client.map(&request).await {
                        Ok(grant) => {
                            assert_eq!(grant.router, client.router_identity());
                            println!(
                                "STEP map OK {} lifetime {} renew {}",
                                grant.external_port,
                                grant.lifetime_secs,
                                grant.renew_after.map_or(0, |d| d.as_secs())
                            );
                        }
                        Err(err) => println!("STEP map ERR {err:?}"),
                    }
                }
                "unmap" => {
                    let address = words[3].parse().expect("address");
                    let mut record = record(protocol(), port(), address);
                    if let Some(name) = words.get(4) {
                        record.owner = Owner::new("lab", *name);
                    }
                    match client.unmap(&record.lease()).await {
                        Ok(()) => println!("STEP unmap OK"),
                        Err(err) => println!("STEP unmap ERR {err:?}"),
                    }
                }
                "entry" => {
                    match client
                        .specific_entry(parse_protocol(words[1]), port())
                        .await
                        .expect("GetSpecificPortMappingEntry")
                    {
                        Some(entry) => println!(
                            "STEP entry {}:{} {} {} lease {}",
                            entry.internal_client,
                            entry.internal_port,
                            entry.description,
                            if entry.enabled { "enabled" } else { "disabled" },
                            entry.lease_secs
                        ),
                        None => println!("STEP entry none"),
                    }
                }
                "list" => {
                    let entries = client.list().await.expect("GetGenericPortMappingEntry");
                    let shown: Vec<String> = entries
                        .iter()
                        .map(|entry| {
                            format!(
                                "{} {} -> {}:{} {}",
                                entry.protocol.upnp_name(),
                                entry.external_port,
                                entry.internal_client,
                                entry.internal_port,
                                entry.description
                            )
                        })
                        .collect();
                    println!("STEP list {}", shown.join(", "));
                }
                "timings" => {
                    const ROUNDS: u16 = 20;
                    let (mut raw_add, mut raw_again, mut first, mut renew) = (0.0, 0.0, 0.0, 0.0);
                    let url = HttpUrl::parse(&client.control_url()).expect("control URL");
                    let service = client.service_type().to_owned();
                    for round in 0..ROUNDS {
                        // A bare AddPortMapping, no client logic around it.
                        let raw = map_request(Protocol::Tcp, 19100 + round, lan);
                        let (port, tag) = (raw.external_port.to_string(), raw.owner.tag());
                        let body = soap::envelope(
                            &service,
                            "AddPortMapping",
                            &[
                                ("NewRemoteHost", ""),
                                ("NewExternalPort", &port),
                                ("NewProtocol", "TCP"),
                                ("NewInternalPort", &port),
                                ("NewInternalClient", LAN_IP),
                                ("NewEnabled", "1"),
                                ("NewPortMappingDescription", &tag),
                                ("NewLeaseDuration", "3600"),
                            ],
                        );
                        let header = soap::action_header(&service, "AddPortMapping");
                        // Twice: a new mapping, then the same again (a renewal).
                        for total in [&mut raw_add, &mut raw_again] {
                            let started = Instant::now();
                            let response = http::request(
                                &url,
                                "POST",
                                &[("Content-Type", "text/xml"), ("SOAPAction", &header)],
                                &body,
                                65536,
                                std::time::Duration::from_secs(3),
                            )
                            .await
                            .expect("raw AddPortMapping");
                            *total += millis(started);
                            assert_eq!(response.status, 200, "{}", response.body);
                        }

                        let request = map_request(Protocol::Tcp, 19000 + round, lan);
                        let started = Instant::now();
                        client.map(&request).await.expect("map");
                        first += millis(started);
                        let started = Instant::now();
                        client.map(&request).await.expect("renew");
                        renew += millis(started);
                    }
                    let n = f64::from(ROUNDS);
                    println!(
                        "STEP timings over {ROUNDS} rounds (router holding 0-{} mappings): \
                         discovery {discovery_ms:.1} ms; new mapping: raw AddPortMapping \
                         {:.2} ms, UpnpClient::map (GetSpecificPortMappingEntry + \
                         AddPortMapping) {:.2} ms = {:.2}x; renewal: raw AddPortMapping \
                         {:.2} ms, UpnpClient::map {:.2} ms = {:.2}x",
                        2 * ROUNDS,
                        raw_add / n,
                        first / n,
                        first / raw_add,
                        raw_again / n,
                        renew / n,
                        renew / raw_again,
                    );
                    for round in 0..ROUNDS {
                        for base in [19000, 19100] {
                            client
                                .unmap(&record(Protocol::Tcp, base + round, lan).lease())
                                .await
                                .expect("unmap");
                        }
                    }
                    let left = client.list().await.expect("list");
                    assert!(left.is_empty(), "{left:?}");
                }
                other => panic!("unknown step {other}"),
            }
        }
    });
}
