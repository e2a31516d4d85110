//! holepunch's NAT-PMP client and router-announcement listener against a real router:
//! miniupnpd 2.3.1 in the lab of `tests/lab/router-lab` (namespaces `hpn-*`, see
//! `tests/support/lab.rs`). The client runs inside the LAN namespace: each test re-runs this
//! binary there (`natpmp_step_in_lan`) and talks to it over stdin/stdout, so one client can
//! live across a router restart. Needs root: the lab tier
//! (as root: `cargo test --features lab --test natpmp_lab`).

#[path = "support/lab.rs"]
mod lab;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use holepunch::model::{Backend, Endpoint, MappingKey, Owner, Protocol};
use holepunch::router::announce::{AnnounceListener, Announcement};
use holepunch::router::natpmp::client::{NatpmpClient, Schedule};
use holepunch::router::natpmp::codec as natpmp;
use holepunch::router::{MapRequest, PortMapper, RouterError};
use holepunch::state::MappingRecord;
use lab::{LAN_IP, Lab, NODE_IP, ROUTER_LAN_IP, WAN_CLIENT_IP, listen, received, send_from_wan};

const PREFIX: &str = "hpn-";
const WAN_IP: Ipv4Addr = Ipv4Addr::new(11, 22, 33, 44);
/// A LAN address nobody answers on.
const SILENT_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 99);
const STEP_ENV: &str = "HOLEPUNCH_NATPMP_STEP";

fn lan_ip() -> Ipv4Addr {
    LAN_IP.parse().unwrap()
}

fn gateway() -> Ipv4Addr {
    ROUTER_LAN_IP.parse().unwrap()
}

/// Whether the router forwards `proto` port `external` to `LAN_IP:internal`.
fn forwarded(lab: &Lab, proto: &str, external: u16, internal: u16) -> bool {
    let rules = lab.router_forwards();
    let proto_byte = if proto == "tcp" { "0x6" } else { "0x11" };
    rules.lines().any(|line| {
        line.contains(proto_byte)
            && line.contains(&format!("dport {external} "))
            && line.contains(&format!("dnat ip to {LAN_IP}:{internal}"))
    })
}

/// This test binary, re-run inside the LAN namespace on one step of `natpmp_step_in_lan`.
struct Step {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    seen: String,
}

impl Step {
    fn start(lab: &Lab, name: &str) -> Step {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("lan")])
            .arg(exe)
            .args(["--exact", "natpmp_step_in_lan", "--ignored", "--nocapture"])
            .env(STEP_ENV, name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("re-run the test binary in the LAN namespace");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Step {
            name: name.to_owned(),
            child,
            stdin,
            stdout,
            seen: String::new(),
        }
    }

    /// The rest of the first output line that starts with `word`.
    fn expect(&mut self, word: &str) -> String {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).unwrap_or(0) == 0 {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .ok();
                panic!(
                    "step {} ended before printing {word}:\n{}{err}",
                    self.name, self.seen
                );
            }
            self.seen.push_str(&line);
            if let Some(rest) = line.strip_prefix(word) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Let the step go on past its next `wait_for` point.
    fn proceed(&mut self) {
        writeln!(self.stdin).expect("write to the step");
    }

    fn finish(mut self) {
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).ok();
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut err).ok();
        }
        assert!(
            status.success(),
            "step {} failed:\n{}{rest}{err}",
            self.name,
            self.seen
        );
    }
}

/// Run one step that needs no conversation; returns the rest of its `word` line.
fn run_step(lab: &Lab, name: &str, word: &str) -> String {
    let mut step = Step::start(lab, name);
    let line = step.expect(word);
    step.finish();
    line
}

/// TCP and UDP mappings made by holepunch's client carry real traffic from the internet to
/// the LAN host, the external address is the router's WAN address, unmapping stops the
/// forwarding, and unmapping again is still success.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn natpmp_client_maps_tcp_and_udp_that_carry_traffic_then_unmaps_idempotently() {
    let lab = Lab::up(PREFIX);
    let tcp = listen(&lab, "lan", "tcp", 18200);
    let udp = listen(&lab, "lan", "udp", 18200);
    assert!(
        !send_from_wan(&lab, "tcp", 18200, "too early")
            .status
            .success(),
        "reached the LAN without a mapping"
    );

    let mut step = Step::start(&lab, "map");
    let took = step.expect("TOOK");
    assert_eq!(step.expect("GRANTED"), "tcp 18200 udp 18200");
    step.finish();
    eprintln!("measured: map calls (the first also asks the external address) took {took}");
    assert!(
        forwarded(&lab, "tcp", 18200, 18200),
        "{}",
        lab.router_forwards()
    );
    assert!(
        forwarded(&lab, "udp", 18200, 18200),
        "{}",
        lab.router_forwards()
    );
    for proto in ["tcp", "udp"] {
        let sent = send_from_wan(&lab, proto, 18200, &format!("hello over nat-pmp {proto}"));
        assert!(sent.status.success(), "{sent:?}");
    }
    assert_eq!(
        received(tcp),
        format!("{WAN_CLIENT_IP} hello over nat-pmp tcp")
    );
    assert_eq!(
        received(udp),
        format!("{WAN_CLIENT_IP} hello over nat-pmp udp")
    );

    run_step(&lab, "unmap", "UNMAPPED");
    let rules = lab.router_forwards();
    assert!(!rules.contains("dport 18200 "), "{rules}");
    let mut late = listen(&lab, "lan", "tcp", 18200);
    let too_late = send_from_wan(&lab, "tcp", 18200, "too late");
    late.kill().ok();
    late.wait().ok();
    assert!(
        !too_late.status.success(),
        "reached the LAN after the unmap"
    );
    // Already gone: still success.
    run_step(&lab, "unmap", "UNMAPPED");
}

/// One client lives across a router restart: before it, its calls see a steady epoch; after
/// it, the next call sees the epoch jump (RFC 6886 §3.6) and the mapping is back.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn natpmp_client_sees_the_epoch_jump_after_a_router_restart() {
    let lab = Lab::up(PREFIX);
    let mut step = Step::start(&lab, "restart");
    let mapped_epoch: u32 = step.expect("MAPPED").parse().unwrap();
    assert!(
        forwarded(&lab, "tcp", 18210, 18210),
        "{}",
        lab.router_forwards()
    );
    // Let the epoch grow, so that the restart shows as the epoch falling behind.
    let mapped_at = Instant::now();
    while mapped_at.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
    }
    step.proceed();
    let steady_epoch: u32 = step.expect("STEADY").parse().unwrap();
    assert!(
        steady_epoch >= mapped_epoch + 2,
        "{mapped_epoch} then {steady_epoch}"
    );

    lab.restart_router();
    assert!(
        !forwarded(&lab, "tcp", 18210, 18210),
        "{}",
        lab.router_forwards()
    );
    step.proceed();
    let jumped_epoch: u32 = step.expect("JUMPED").parse().unwrap();
    assert!(
        jumped_epoch < steady_epoch,
        "{steady_epoch} then {jumped_epoch}"
    );
    step.finish();
    assert!(
        forwarded(&lab, "tcp", 18210, 18210),
        "{}",
        lab.router_forwards()
    );
}

/// A port another LAN host holds: miniupnpd grants another one, and the Grant says which.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn natpmp_client_reports_the_port_the_router_chose() {
    let lab = Lab::up(PREFIX);
    let held = natpmp::MapRequest {
        protocol: Protocol::Tcp,
        internal_port: 18220,
        suggested_external_port: 18220,
        lifetime_secs: 600,
    };
    let answer = lab.udp_exchange(
        "node",
        NODE_IP,
        ROUTER_LAN_IP,
        natpmp::SERVER_PORT,
        &held.encode(),
    );
    let response = natpmp::decode_response(&answer).expect("NAT-PMP answer");
    assert_eq!(response.result, natpmp::ResultCode::Success, "{response:?}");
    assert!(
        lab.router_forwards()
            .contains("dnat ip to 192.168.77.20:18220")
    );

    let granted: u16 = run_step(&lab, "conflict", "GRANTED").parse().unwrap();
    assert_ne!(granted, 18220);
    assert!(
        forwarded(&lab, "tcp", granted, 18220),
        "{}",
        lab.router_forwards()
    );
    assert!(
        lab.router_forwards()
            .contains("dnat ip to 192.168.77.20:18220")
    );
}

/// A gateway that never answers: Unreachable once the schedule is spent, and no more
/// datagrams than it allows (counted by nftables in the LAN namespace).
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn natpmp_client_gives_up_on_a_silent_gateway_within_the_schedule() {
    let lab = Lab::up(PREFIX);
    for command in [
        "add table ip hpn_probe".to_owned(),
        "add chain ip hpn_probe out { type filter hook output priority 0 ; }".to_owned(),
        format!("add rule ip hpn_probe out ip daddr {SILENT_GATEWAY} udp dport 5351 counter"),
    ] {
        let out = lab.exec("lan", &["nft", &command]);
        assert!(out.status.success(), "nft {command}: {out:?}");
    }
    let elapsed_ms: u64 = run_step(&lab, "silent", "UNREACHABLE").parse().unwrap();
    let schedule = silent_schedule();
    assert!(
        elapsed_ms >= schedule.worst_case().as_millis() as u64,
        "gave up after {elapsed_ms} ms"
    );
    assert!(
        elapsed_ms <= (schedule.worst_case() + Duration::from_millis(500)).as_millis() as u64,
        "gave up after {elapsed_ms} ms"
    );
    let out = lab.exec("lan", &["nft", "list", "table", "ip", "hpn_probe"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let packets: u32 = listing
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {listing}"));
    assert_eq!(packets, schedule.tries(), "{listing}");
    eprintln!("measured: silent gateway given up after {elapsed_ms} ms, {packets} datagrams sent");
}

/// Forged announcements from another LAN host, shaped like a NAT-PMP and a PCP gateway's.
const FORGE: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.168.77.20", 5351))
natpmp = bytes([0, 128, 0, 0, 0, 1, 0x86, 0x9f, 6, 6, 6, 6])
pcp = bytes([2, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 0x86, 0x9f]) + bytes(12)
for datagram in (natpmp, pcp):
    s.sendto(datagram, ("224.0.0.1", 5350))
"#;

/// The listener hears miniupnpd's announcement when the router restarts, within 10 s, and
/// ignores the forged ones another LAN host sent first. Two listeners share the port.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn announce_listener_hears_the_router_restart_and_ignores_other_hosts() {
    let lab = Lab::up(PREFIX);
    let mut step = Step::start(&lab, "announce");
    step.expect("LISTENING");
    let forged = lab.exec("node", &[lab::python(), "-c", FORGE]);
    assert!(forged.status.success(), "{forged:?}");

    let restarted = Instant::now();
    lab.restart_router();
    let heard = step.expect("ANNOUNCE");
    let waited = restarted.elapsed();
    step.finish();
    assert!(waited < Duration::from_secs(10), "heard after {waited:?}");
    eprintln!("measured: announcement {heard:?} heard {waited:?} after the restart began");
    let words: Vec<&str> = heard.split_whitespace().collect();
    // miniupnpd 2.3.1 announces in PCP at start (measured): epoch 0.
    let [kind, epoch, "ignored", ignored, "second", second] = words[..] else {
        panic!("unexpected announcement line {heard:?}");
    };
    assert!(kind == "pcp" || kind == "natpmp", "{heard}");
    assert!(epoch.parse::<u32>().unwrap() < 5, "{heard}");
    assert_eq!(
        ignored, "2",
        "the forged datagrams were not both seen and ignored"
    );
    assert_eq!(
        second, kind,
        "the second listener on the port heard otherwise"
    );
}

fn silent_schedule() -> Schedule {
    Schedule {
        initial: Duration::from_millis(250),
        max_tries: 3,
    }
}

fn request(protocol: Protocol, port: u16) -> MapRequest {
    MapRequest {
        owner: Owner::new("default", "web"),
        protocol,
        external_port: port,
        internal: Endpoint::new(lan_ip(), port),
        lifetime_secs: 600,
        nonce: None,
    }
}

fn record(protocol: Protocol, port: u16) -> MappingRecord {
    MappingRecord {
        router: ROUTER_LAN_IP.to_owned(),
        times: holepunch::state::LeaseTimes {
            lifetime_secs: 600,
            ..Default::default()
        },
        ..MappingRecord::leftover(
            Owner::new("default", "web"),
            MappingKey {
                protocol,
                external_port: port,
            },
            Endpoint::new(lan_ip(), port),
            Backend::Natpmp,
        )
    }
}

/// Block until the outer test says go on (a line on stdin).
fn wait_for_outer() {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("stdin");
}

/// The parts of the tests above that run inside the LAN namespace; not run on its own.
#[test]
#[ignore = "run by the natpmp_client_* tests inside the lab's LAN namespace"]
fn natpmp_step_in_lan() {
    let step = std::env::var(STEP_ENV).expect("set by the outer test");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = NatpmpClient::new(gateway(), lan_ip());
        match step.as_str() {
            "map" => {
                let mut granted = Vec::new();
                let mut took = Vec::new();
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    let started = Instant::now();
                    let grant = client
                        .map(&request(protocol, 18200))
                        .await
                        .expect("granted");
                    took.push(format!("{protocol} {:?}", started.elapsed()));
                    assert_eq!(grant.external_address, Some(WAN_IP));
                    assert_eq!(grant.router, ROUTER_LAN_IP);
                    assert!(grant.epoch.is_some());
                    let lifetime = u64::from(grant.lifetime_secs);
                    assert!(lifetime >= 120, "{grant:?}");
                    let renew = grant.renew_after.expect("renew point").as_secs_f64();
                    let lifetime = lifetime as f64;
                    assert!(
                        renew >= lifetime / 2.0 && renew <= lifetime * 5.0 / 8.0,
                        "{grant:?}"
                    );
                    granted.push(format!("{protocol} {}", grant.external_port));
                }
                assert_eq!(client.external_address().await.expect("address"), WAN_IP);
                println!("TOOK {}", took.join(", "));
                println!("GRANTED {}", granted.join(" "));
            }
            "unmap" => {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    client
                        .unmap(&record(protocol, 18200).lease())
                        .await
                        .expect("unmapped (or already gone)");
                }
                println!("UNMAPPED");
            }
            "restart" => {
                let grant = client
                    .map(&request(Protocol::Tcp, 18210))
                    .await
                    .expect("granted");
                assert_eq!(grant.external_port, 18210);
                println!("MAPPED {}", grant.epoch.expect("epoch"));
                wait_for_outer();
                // A renewal while the router runs steadily.
                let grant = client
                    .map(&request(Protocol::Tcp, 18210))
                    .await
                    .expect("renewed");
                assert_eq!(grant.external_port, 18210);
                assert!(!client.take_restart(), "a steady router looked restarted");
                println!("STEADY {}", client.last_epoch().expect("epoch"));
                wait_for_outer();
                // The daemon's renewal after the restart: it sees the jump and re-creates.
                let grant = client
                    .map(&request(Protocol::Tcp, 18210))
                    .await
                    .expect("granted again");
                assert!(client.take_restart(), "the restart went unnoticed");
                assert_eq!(grant.external_port, 18210);
                assert_eq!(grant.external_address, Some(WAN_IP));
                assert!(!client.take_restart(), "reading the restart clears it");
                println!("JUMPED {}", client.last_epoch().expect("epoch"));
            }
            "conflict" => {
                let grant = client
                    .map(&request(Protocol::Tcp, 18220))
                    .await
                    .expect("granted");
                println!("GRANTED {}", grant.external_port);
            }
            "silent" => {
                let mut client =
                    NatpmpClient::new(SILENT_GATEWAY, lan_ip()).with_schedule(silent_schedule());
                let started = Instant::now();
                let result = client.map(&request(Protocol::Tcp, 18230)).await;
                let elapsed = started.elapsed();
                assert!(
                    matches!(result, Err(RouterError::NoAnswer { .. })),
                    "{result:?}"
                );
                println!("UNREACHABLE {}", elapsed.as_millis());
            }
            "announce" => {
                let mut listener = AnnounceListener::bind(lan_ip(), gateway()).expect("bind");
                let mut second = AnnounceListener::bind(lan_ip(), gateway()).expect("share");
                println!("LISTENING");
                let describe = |announcement: Announcement| match announcement {
                    Announcement::Pcp { epoch_secs } => format!("pcp {epoch_secs}"),
                    Announcement::Natpmp {
                        epoch_secs,
                        external_address,
                    } => {
                        assert_eq!(external_address, WAN_IP);
                        format!("natpmp {epoch_secs}")
                    }
                };
                let heard = tokio::time::timeout(Duration::from_secs(20), listener.next())
                    .await
                    .expect("an announcement within 20 s");
                let also = tokio::time::timeout(Duration::from_secs(2), second.next())
                    .await
                    .expect("the second listener hears it too");
                let kind = |line: &str| line.split(' ').next().unwrap_or_default().to_owned();
                println!(
                    "ANNOUNCE {} ignored {} second {}",
                    describe(heard),
                    listener.ignored(),
                    kind(&describe(also))
                );
            }
            other => panic!("unknown step {other}"),
        }
    });
}
