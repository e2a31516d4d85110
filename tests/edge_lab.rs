//! The trust edges of README.md's "Security model: traffic and the router", in the router lab
//! (prefix `hpl-`, `tests/support/lab.rs`): the relay DNAT catches only what the router
//! forwards (LAN hosts, pods and the host itself keep reaching what listens on the host), and
//! router announcements are believed only from the router's server port and only after the
//! router confirms them, so forged ones cost it a few requests and restore nothing, while a
//! real router restart still restores the mappings on the same ports.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bin::{Daemon, status_json};
use daemon_lab::{forwards_of, wait_until, with_fake_cluster_in};
use holepunch::model::{Endpoint, Protocol};
use holepunch::nft::{Forward, NftFirewall, Ruleset};
use holepunch::router::announce::CHECK_BURST;
use lab::{LAN_IP, Lab, NODE_IP, ROUTER_LAN_IP, ROUTER_WAN_IP, in_netns};
use serde_json::json;

const PREFIX: &str = "hpl-";
/// The target of the relay test, as a LoadBalancer IP on the node host.
const TARGET_IP: &str = "192.168.77.100";
const TARGET_PORT: u16 = 8080;

/// Serves TCP on `ip:port`, answering each line with "<tag> <peer address> <line>": the tag
/// says which server a client reached.
const TAGGED_SERVER: &str = r#"
import socket, sys, threading
tag, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((ip, port)); t.listen(16)
print("ready", flush=True)
def serve(c, peer):
    for line in c.makefile("rb"):
        c.sendall(("%s %s %s\n" % (tag, peer[0], line.decode().strip())).encode())
    c.close()
while True:
    c, peer = t.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#;

/// Sends PCP ANNOUNCE and NAT-PMP address announcements (alternating, epoch 0, address
/// 6.6.6.6) to 224.0.0.1:5350 from `src:sport`, as raw IPv4 packets: `count` of them, `gap`
/// seconds apart. A raw socket, because miniupnpd holds the router's port 5351.
const FORGER: &str = r#"
import socket, struct, sys, time
src, sport, count, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
natpmp = bytes([0, 128, 0, 0]) + struct.pack("!I", 0) + socket.inet_aton("6.6.6.6")
pcp = bytes([2, 0x80, 0, 0, 0, 0, 0, 0]) + struct.pack("!I", 0) + bytes(12)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(src))
for i in range(count):
    payload = natpmp if i % 2 == 0 else pcp
    udp = struct.pack("!HHHH", sport, 5350, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 1, 17, 0,
                     socket.inet_aton(src), socket.inet_aton("224.0.0.1"))
    s.sendto(ip + udp, ("224.0.0.1", 0))
    time.sleep(gap)
"#;

/// A process started for the test, killed (by its PID) when dropped.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tagged_server(lab: &Lab, ns: &str, tag: &str, ip: &str, port: u16) -> Started {
    let mut child = lab.spawn(
        ns,
        &[
            lab::python(),
            "-c",
            TAGGED_SERVER,
            tag,
            ip,
            &port.to_string(),
        ],
    );
    let mut ready = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut ready)
        .expect("read");
    assert_eq!(
        ready.trim(),
        "ready",
        "{tag} server on {ip}:{port} did not start"
    );
    Started(child)
}

/// A network namespace of the test's own (a pod on the relay host), deleted when dropped.
struct Pod(String);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// A pod on the relay host: namespace `hpl-pod`, 10.244.0.2 behind a veth whose host end
/// (10.244.0.1, `vpod`) is in the lab's LAN namespace, as a CNI bridge or veth would be.
fn pod(lab: &Lab) -> Pod {
    let name = lab.ns("pod");
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    run(&["ip", "netns", "add", &name]);
    let pod = Pod(name.clone());
    let lan = lab.ns("lan");
    run(&[
        "ip", "link", "add", "vpod", "netns", &lan, "type", "veth", "peer", "name", "eth0",
        "netns", &name,
    ]);
    run(&[
        "ip",
        "-n",
        &lan,
        "addr",
        "add",
        "10.244.0.1/24",
        "dev",
        "vpod",
    ]);
    run(&["ip", "-n", &lan, "link", "set", "vpod", "up"]);
    run(&[
        "ip",
        "-n",
        &name,
        "addr",
        "add",
        "10.244.0.2/24",
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", &name, "link", "set", "eth0", "up"]);
    run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
    run(&[
        "ip",
        "-n",
        &name,
        "route",
        "add",
        "default",
        "via",
        "10.244.0.1",
    ]);
    pod
}

/// From namespace `ns` (a lab one, or a full name), one TCP line to `ip:port`: the answer.
fn ask_from(ns: &str, ip: &str, port: u16, line: &str) -> Option<String> {
    const ASK: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
c.sendall((sys.argv[3] + "\n").encode())
print(c.makefile("rb").readline().decode().strip())
"#;
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            lab::python(),
            "-c",
            ASK,
            ip,
            &port.to_string(),
            line,
        ])
        .output()
        .expect("ask");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Relay mode: from the LAN host `node`, from a pod on the relay host and from the relay
/// host itself, the relay host's address and published port reach what listens on the relay
/// host; from the internet through the router (and from the router's own address, as NAT
/// loopback sends it) they reach the target. The ruleset read back with `nft -j` says why.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn relay_dnat_catches_only_what_the_router_forwards() {
    const PORT: u16 = 30090;
    let lab = Lab::up(PREFIX);
    let lan = lab.ns("lan");
    let out = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(out.status.success(), "{out:?}");
    let ruleset = Ruleset::Relay {
        lan_address: LAN_IP.parse().expect("ip"),
        router: Some(ROUTER_LAN_IP.parse().expect("ip")),
        forwards: vec![Forward {
            protocol: Protocol::Tcp,
            port: PORT,
            target: Endpoint::new(TARGET_IP.parse().expect("ip"), TARGET_PORT),
        }],
        ipv6: None,
    };
    in_netns(&lan, || NftFirewall.apply(&ruleset)).expect("apply relay");
    let _target = tagged_server(&lab, "node", "target", TARGET_IP, TARGET_PORT);
    // What the relay host itself serves on the published port (node-exporter, say).
    let _own = tagged_server(&lab, "lan", "host", "0.0.0.0", PORT);
    let out = lab.exec(
        "lan",
        &[
            "upnpc",
            "-u",
            "http://192.168.77.1:5000/rootDesc.xml",
            "-e",
            "holepunch:test/edge",
            "-a",
            LAN_IP,
            &PORT.to_string(),
            &PORT.to_string(),
            "TCP",
            "600",
        ],
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("is redirected"),
        "upnpc: {out:?}\n{}",
        lab.router_log()
    );
    let pod = pod(&lab);

    // The internet, through the router: the target (which sees the relay host).
    assert_eq!(
        ask_from(&lab.ns("wan"), ROUTER_WAN_IP, PORT, "wan").as_deref(),
        Some(format!("target {LAN_IP} wan").as_str())
    );
    // The router's own address (what a router doing NAT loopback sends): the target.
    assert_eq!(
        ask_from(&lab.ns("rtr"), LAN_IP, PORT, "hairpin").as_deref(),
        Some(format!("target {LAN_IP} hairpin").as_str())
    );
    // A LAN host, a pod and the host itself: the host's own server, with their own address.
    assert_eq!(
        ask_from(&lab.ns("node"), LAN_IP, PORT, "lan host").as_deref(),
        Some(format!("host {NODE_IP} lan host").as_str()),
        "a LAN host was sent to the target: the DNAT shadows the host's port"
    );
    assert_eq!(
        ask_from(&pod.0, LAN_IP, PORT, "pod").as_deref(),
        Some("host 10.244.0.2 pod")
    );
    assert_eq!(
        ask_from(&lan, LAN_IP, PORT, "self").as_deref(),
        Some(format!("host {LAN_IP} self").as_str())
    );
    // And the internet still reaches the target in the same run.
    assert_eq!(
        ask_from(&lab.ns("wan"), ROUTER_WAN_IP, PORT, "again").as_deref(),
        Some(format!("target {LAN_IP} again").as_str())
    );

    // The narrow match, as the kernel holds it: one rule, one map lookup.
    let out = lab.exec(
        "lan",
        &[
            "nft",
            "-j",
            "list",
            "chain",
            "inet",
            "holepunch",
            "prerouting",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j");
    let rules: Vec<&serde_json::Value> = listing["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|item| item.get("rule"))
        .collect();
    assert_eq!(rules.len(), 1, "{listing}");
    let exprs = rules[0]["expr"].as_array().expect("expr");
    let saddr = json!({"payload": {"protocol": "ip", "field": "saddr"}});
    for part in [
        json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lan0"}}),
        json!({"match": {"op": "!=", "left": saddr, "right": "192.168.77.0"}}),
        json!({"match": {"op": "!=", "left": saddr,
            "right": {"range": ["192.168.77.2", "192.168.77.255"]}}}),
    ] {
        assert!(exprs.contains(&part), "{part} not in {exprs:?}");
    }
    let rule = rules[0].to_string();
    assert_eq!(rule.matches("@targets4").count(), 1, "{rule}");
}

/// The router's udp/5351 packets counted so far (the counter of `count_router_pcp_packets`).
fn router_requests(lab: &Lab) -> u64 {
    lab.router_pcp_packets()
}

/// Sends `count` forged announcements from the router's address and port `sport`.
fn forge(lab: &Lab, sport: u16, count: u32, gap_secs: f64) {
    let out = lab.exec(
        "rtr",
        &[
            lab::python(),
            "-c",
            FORGER,
            ROUTER_LAN_IP,
            &sport.to_string(),
            &count.to_string(),
            &gap_secs.to_string(),
        ],
    );
    assert!(out.status.success(), "forger: {out:?}");
}

/// Relay mode through PCP with a verify interval of 10 min, so that every request the router
/// sees comes from an announcement: a real restart is believed and restores the mapping on
/// its port; then 40 forged announcements from the router's address but another port cost
/// nothing, and a flood of 300 from its port 5351 costs at most [`CHECK_BURST`] requests and
/// restores nothing, records no forged address, and the Service stays reachable; a second
/// real restart once the budget is back restores again.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn forged_announcements_cost_a_few_requests_and_a_real_restart_still_restores() {
    const PORT: u16 = 9090;
    const NODE_PORT: u16 = 31090;
    let lab = Lab::up(PREFIX);
    let out = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(out.status.success(), "{out:?}");
    let _server = tagged_server(&lab, "node", "service", NODE_IP, NODE_PORT);
    lab.count_router_pcp_packets();
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        let config = dir.join("holepunch.toml");
        std::fs::write(
            &config,
            format!(
                "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n\
                 [router]\nbackend = \"pcp\"\nlease_seconds = 600\nverify_interval_seconds = 600\n\n\
                 [exposure]\nmode = \"relay\"\n\n\
                 [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"\"\n\n\
                 [log]\nformat = \"text\"\nlevel = \"info,holepunch=debug\"\n",
                kubeconfig = kubeconfig.display(),
                dir = dir.display(),
            ),
        )
        .expect("config");
        // A Service of holepunch's own class on a Ready node's nodePort.
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": NODE_IP}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }));
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": "holepunch.io/router",
                "ports": [{"name": "web", "port": PORT, "protocol": "TCP", "nodePort": NODE_PORT}]
            }
        }));
        let daemon = Daemon::start(&config);
        let reached = |line: &str| {
            ask_from(&lab.ns("wan"), ROUTER_WAN_IP, PORT, line)
                == Some(format!("service {LAN_IP} {line}"))
        };
        wait_until(
            &daemon,
            "the Service through the relay",
            Duration::from_secs(30),
            || reached("up"),
        );
        let restored = || daemon.log().matches("reconcile: restored").count();

        // A real restart, once the mapping is older than the slack of the epoch comparison.
        std::thread::sleep(Duration::from_secs(5));
        let restarted = Instant::now();
        lab.restart_router();
        wait_until(
            &daemon,
            "the restore after the restart",
            Duration::from_secs(10),
            || restored() == 1 && forwards_of(&lab, PORT).len() == 1,
        );
        let took = restarted.elapsed();
        assert!(reached("restored"), "{}", daemon.log());
        assert!(
            daemon
                .log()
                .contains("restoring every mapping after the router's announcement"),
            "{}",
            daemon.log()
        );
        eprintln!("real router restart -> restored on port {PORT} in {took:?}");
        std::thread::sleep(Duration::from_secs(2));

        // 40 from the router's address but not its server port: not even a question.
        let before = router_requests(&lab);
        forge(&lab, 40000, 40, 0.02);
        std::thread::sleep(Duration::from_secs(3));
        let other_port = router_requests(&lab) - before;
        assert_eq!(other_port, 0, "{}", daemon.log());

        // 300 from the router's address and port 5351, over 6 s.
        let before = router_requests(&lab);
        forge(&lab, 5351, 300, 0.02);
        std::thread::sleep(Duration::from_secs(5));
        let flood = router_requests(&lab) - before;
        eprintln!(
            "forged announcements: 40 from port 40000 -> {other_port} router requests; \
             300 from port 5351 -> {flood} router requests"
        );
        assert!(
            flood >= 1,
            "the flood never reached the daemon: {}",
            daemon.log()
        );
        assert!(
            flood <= u64::from(CHECK_BURST),
            "{flood} requests for a flood: {}",
            daemon.log()
        );
        assert_eq!(
            restored(),
            1,
            "a forged announcement restored: {}",
            daemon.log()
        );
        assert_eq!(
            forwards_of(&lab, PORT).len(),
            1,
            "{}",
            lab.router_forwards()
        );
        let status = status_json(&config);
        let addresses: Vec<&str> = status["mappings"]
            .as_array()
            .expect("mappings")
            .iter()
            .map(|m| m["external_address"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(addresses, [ROUTER_WAN_IP], "{status}");
        assert!(reached("after the flood"), "{}", daemon.log());
        assert!(
            daemon.log().contains("shows no restart and no new address"),
            "{}",
            daemon.log()
        );

        // The flood spent the budget, which comes back (one check per 30 s): a second real
        // restart, 31 s after the first, is believed and restores again.
        let since = restarted.elapsed();
        std::thread::sleep(Duration::from_secs(31).saturating_sub(since));
        lab.restart_router();
        wait_until(
            &daemon,
            "the restore after the second restart",
            Duration::from_secs(10),
            || restored() == 2 && forwards_of(&lab, PORT).len() == 1,
        );
        assert!(reached("restored again"), "{}", daemon.log());
        drop(daemon);
    });
}
