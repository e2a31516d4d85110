//! holepunch's nftables table against the kernel, in network namespaces named `hpf-*`.
//!
//! The firewall code runs in the test process on a thread that has joined the namespace with
//! `setns(CLONE_NEWNET)` (netlink sockets belong to the namespace they are opened in); `nft`
//! in the same namespace is the oracle (`nft -j list table inet holepunch`). Traffic tests use
//! the router lab (`tests/support/lab.rs`, prefix `hpf-`): miniupnpd in `hpf-rtr`, the relay
//! host `hpf-lan`, the target server on 192.168.77.100 in `hpf-node`, the internet client in
//! `hpf-wan`. Needs root.

#[path = "support/lab.rs"]
mod lab;

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use holepunch::model::{Endpoint, Protocol};
use holepunch::nft::{Forward, NftError, NftFirewall, Ruleset, check_forwarding};
use lab::{LAN_IP, Lab, ROUTER_LAN_IP, ROUTER_WAN_IP, WAN_CLIENT_IP, in_netns};
use serde_json::Value;

const LAB_PREFIX: &str = "hpf-";
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
const TARGET_PORT: u16 = 8080;

/// A network namespace of its own, deleted when dropped (also when the test fails).
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        // A leftover of a killed run would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name} (needs root): {out:?}"
        );
        let ns = Netns(name.to_owned());
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// An interface `lan0` holding the relay address, as the lab's LAN host has it: the relay
    /// DNAT matches the interface that holds its address. (A veth pair inside the namespace:
    /// the dummy driver is not everywhere.)
    fn with_relay_address(self) -> Netns {
        self.run(&[
            "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0peer",
        ]);
        self.run(&["ip", "addr", "add", &format!("{LAN_IP}/24"), "dev", "lan0"]);
        self.run(&["ip", "link", "set", "lan0", "up"]);
        self
    }

    fn run(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        assert!(out.status.success(), "{cmd:?} in {}: {out:?}", self.0);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nft_script(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft -f: {script}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn forward(protocol: Protocol, port: u16, target_port: u16) -> Forward {
    Forward {
        protocol,
        port,
        target: Endpoint::new(TARGET_IP, target_port),
    }
}

fn relay(forwards: Vec<Forward>) -> Ruleset {
    Ruleset::Relay {
        lan_address: LAN_IP.parse().unwrap(),
        router: Some(ROUTER_LAN_IP.parse().unwrap()),
        forwards,
        ipv6: None,
    }
}

fn apply(ns: &str, ruleset: &Ruleset) -> Result<(), NftError> {
    in_netns(ns, || NftFirewall.apply(ruleset))
}

/// `nft -j list table inet holepunch`, or None when the table does not exist.
fn listed(ns: &str) -> Option<Value> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "-j",
            "list",
            "table",
            "inet",
            "holepunch",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No such file"), "nft list: {err}");
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("nft -j prints JSON"))
}

/// The objects of one kind ("map", "chain", "rule") in an `nft -j` listing.
fn objects<'a>(listing: &'a Value, kind: &str) -> Vec<&'a Value> {
    listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item.get(kind))
        .collect()
}

/// A map's elements as `(key parts, data parts)` strings, sorted: e.g.
/// `(["192.168.77.10", "tcp", "30080"], ["192.168.77.100", "8080"])`.
fn elements(listing: &Value, map: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let map = objects(listing, "map")
        .into_iter()
        .find(|m| m["name"] == map)
        .unwrap_or_else(|| panic!("no map {map} in {listing}"));
    let parts = |v: &Value| -> Vec<String> {
        match v.get("concat") {
            Some(list) => list.as_array().unwrap().iter().map(scalar).collect(),
            None => vec![scalar(v)],
        }
    };
    let mut out: Vec<_> = map["elem"]
        .as_array()
        .map(|elems| {
            elems
                .iter()
                .map(|pair| (parts(&pair[0]), parts(&pair[1])))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn relay_element(proto: &str, port: u16, target_port: u16) -> (Vec<String>, Vec<String>) {
    (
        strings(&[LAN_IP, proto, &port.to_string()]),
        strings(&["192.168.77.100", &target_port.to_string()]),
    )
}

const OTHER_TABLE: &str = "table ip other {\n\
    set blocked { type ipv4_addr; elements = { 10.9.8.7 } }\n\
    chain input { type filter hook input priority 0; policy accept; ip saddr @blocked drop; }\n\
    chain prerouting { type nat hook prerouting priority -100; tcp dport 2222 dnat to 10.0.0.2:22; }\n\
}\n";

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn apply_writes_the_meant_table_changes_only_the_difference_and_remove_leaves_others() {
    let ns = Netns::new("hpf-t1");
    // Without the relay address on an interface, nothing is applied.
    let err = apply(&ns.0, &relay(vec![])).expect_err("no interface holds the address");
    assert!(matches!(err, NftError::LanInterface { .. }), "{err:?}");
    assert!(err.to_string().contains("exposure.lan_address"), "{err}");
    assert!(listed(&ns.0).is_none());
    let ns = ns.with_relay_address();
    ns.nft_script(OTHER_TABLE);
    let other = || ns.run(&["nft", "-j", "list", "table", "ip", "other"]);
    let other_before = other();

    let web = forward(Protocol::Tcp, 30080, 8080);
    let dns = forward(Protocol::Udp, 30053, 53);
    apply(&ns.0, &relay(vec![web, dns])).expect("apply relay");

    let listing = listed(&ns.0).expect("table exists");
    let map = objects(&listing, "map")[0];
    assert_eq!(map["name"], "targets4");
    assert_eq!(map["family"], "inet");
    assert_eq!(
        map["type"],
        serde_json::json!(["ipv4_addr", "inet_proto", "inet_service"])
    );
    // NOTE: nft 1.0.6 prints a concatenated data type as one string, the key as a list.
    assert_eq!(map["map"], "ipv4_addr . inet_service");
    assert_eq!(
        elements(&listing, "targets4"),
        vec![
            relay_element("tcp", 30080, 8080),
            relay_element("udp", 30053, 53)
        ]
    );
    let chains: Vec<_> = objects(&listing, "chain")
        .into_iter()
        .map(|c| {
            (
                scalar(&c["name"]),
                scalar(&c["type"]),
                scalar(&c["hook"]),
                c["prio"].as_i64().unwrap(),
                scalar(&c["policy"]),
            )
        })
        .collect();
    assert_eq!(
        chains,
        vec![
            (
                "prerouting".into(),
                "nat".into(),
                "prerouting".into(),
                -100,
                "accept".into()
            ),
            (
                "postrouting".into(),
                "nat".into(),
                "postrouting".into(),
                100,
                "accept".into()
            ),
        ]
    );
    let rules = objects(&listing, "rule");
    assert_eq!(rules.len(), 2, "{listing}");
    let dnat = rules[0]["expr"].to_string();
    assert_eq!(rules[0]["chain"], "prerouting");
    assert!(
        dnat.contains(r#""dnat""#) && dnat.contains(r#""data":"@targets4""#),
        "{dnat}"
    );
    assert!(
        dnat.contains(r#""daddr""#) && dnat.contains(r#""l4proto""#),
        "{dnat}"
    );
    assert!(
        dnat.contains(r#""dport""#) && dnat.contains(r#""mark""#),
        "{dnat}"
    );
    // Narrow: only from the LAN interface, and from no LAN host but the router (.1).
    let exprs = rules[0]["expr"].as_array().unwrap();
    let saddr = serde_json::json!({"payload": {"protocol": "ip", "field": "saddr"}});
    for part in [
        serde_json::json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lan0"}}),
        serde_json::json!({"match": {"op": "!=", "left": saddr, "right": "192.168.77.0"}}),
        serde_json::json!({"match": {"op": "!=", "left": saddr,
            "right": {"range": ["192.168.77.2", "192.168.77.255"]}}}),
    ] {
        assert!(exprs.contains(&part), "{part} not in {dnat}");
    }
    let masquerade = rules[1]["expr"].to_string();
    assert_eq!(rules[1]["chain"], "postrouting");
    assert!(masquerade.contains(r#""masquerade""#), "{masquerade}");
    assert!(
        masquerade.contains(r#""mark""#),
        "masquerade not narrowed: {masquerade}"
    );
    assert_eq!(in_netns(&ns.0, || NftFirewall.current()).unwrap(), {
        let mut v = vec![web, dns];
        v.sort();
        v
    });

    // A changed ruleset: one forward gone, one new, one kept.
    let api = forward(Protocol::Tcp, 30443, 8443);
    apply(&ns.0, &relay(vec![web, api])).expect("apply changed relay");
    let changed = listed(&ns.0).unwrap();
    assert_eq!(
        elements(&changed, "targets4"),
        vec![
            relay_element("tcp", 30080, 8080),
            relay_element("tcp", 30443, 8443)
        ]
    );
    assert_eq!(objects(&changed, "rule").len(), 2, "{changed}");
    assert_eq!(objects(&changed, "chain").len(), 2, "{changed}");
    assert_eq!(other(), other_before, "apply touched another table");

    assert!(
        in_netns(&ns.0, || NftFirewall.remove()).unwrap(),
        "table was there"
    );
    assert!(listed(&ns.0).is_none(), "table still there after remove");
    assert_eq!(other(), other_before, "remove touched another table");
    // A refused batch is answered at once: its end message is never acknowledged, and
    // waiting for that ack cost 5 s (the receive timeout) at every direct-mode start.
    let started = std::time::Instant::now();
    assert!(
        !in_netns(&ns.0, || NftFirewall.remove()).unwrap(),
        "absent table is Ok(false)"
    );
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    assert_eq!(in_netns(&ns.0, || NftFirewall.current()).unwrap(), vec![]);
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_refused_batch_is_an_error_and_leaves_the_previous_gateway_ruleset() {
    let ns = Netns::new("hpf-t2");
    let gateway = |forwards| Ruleset::Gateway {
        wan_interface: "rwan".into(),
        forwards,
        forwards6: vec![],
    };
    let web = forward(Protocol::Tcp, 30080, 8080);
    apply(&ns.0, &gateway(vec![web])).expect("apply gateway");
    let before = listed(&ns.0).unwrap();
    assert_eq!(
        elements(&before, "gateway4"),
        vec![(
            strings(&["tcp", "30080"]),
            strings(&["192.168.77.100", "8080"])
        )]
    );
    let rule = objects(&before, "rule")[0]["expr"].to_string();
    assert!(
        rule.contains(r#""iifname""#) && rule.contains(r#""rwan""#),
        "{rule}"
    );
    assert!(
        !before.to_string().contains("masquerade"),
        "gateway keeps the source"
    );

    // The same protocol and port to two targets: the kernel refuses the whole batch.
    let conflict = forward(Protocol::Tcp, 30080, 9090);
    let err = apply(
        &ns.0,
        &gateway(vec![web, conflict, forward(Protocol::Udp, 5000, 5000)]),
    )
    .expect_err("conflicting forwards");
    assert!(matches!(err, NftError::Apply(_)), "{err:?}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("File exists"), "{source}");
    assert_eq!(
        listed(&ns.0).unwrap(),
        before,
        "a refused batch changed the table"
    );

    // Checked before anything is sent.
    let long = Ruleset::Gateway {
        wan_interface: "a-name-longer-than-ifnamsiz".into(),
        forwards: vec![web],
        forwards6: vec![],
    };
    assert!(matches!(
        apply(&ns.0, &long),
        Err(NftError::InterfaceName(_))
    ));
    assert_eq!(listed(&ns.0).unwrap(), before);
}

/// The look behind the IPv6 gateway's warning (README, "IPv6"), against the kernel's own
/// listing: a forward chain whose drop sits in a chain it jumps to is named, one that drops
/// nothing is not; once the operator's rule on holepunch's mark is in a chain it jumps to,
/// nothing is named.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn the_gateways_firewall_look_follows_jumps_in_the_kernels_ruleset() {
    let ns = Netns::new("hpf-t5");
    ns.nft_script(
        "table inet fw {\n\
           chain reject_wan { drop; }\n\
           chain forward_wan { ct state established accept; goto reject_wan; }\n\
           chain forward { type filter hook forward priority 0; policy accept; \
             iifname \"wan\" jump forward_wan; }\n\
         }\n\
         table ip6 open { chain forward { type filter hook forward priority 0; \
           policy accept; meta l4proto tcp accept; }\n}\n",
    );
    let look = || in_netns(&ns.0, || NftFirewall.blocking_forward_chains()).expect("the look");
    assert_eq!(look(), ["inet fw forward"]);
    ns.nft_script(
        "add chain inet fw holepunch_marked\n\
         add rule inet fw holepunch_marked ct mark and 0x02000000 != 0 accept\n\
         insert rule inet fw forward_wan jump holepunch_marked\n",
    );
    assert!(look().is_empty(), "{:?}", look());
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn forwarding_check_follows_the_namespace_sysctl() {
    let ns = Netns::new("hpf-t3");
    ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let err = in_netns(&ns.0, check_forwarding).expect_err("forwarding is off");
    assert!(err.to_string().contains("net.ipv4.ip_forward=1"), "{err}");
    ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    in_netns(&ns.0, check_forwarding).expect("forwarding is on");
}

/// Serves TCP and UDP on the target address: answers every line with "<peer address> <line>".
const ECHO_SERVER: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((host, port)); t.listen(8)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((host, port))
def serve_udp():
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(("%s %s" % (peer[0], data.decode().strip())).encode(), peer)
def serve_tcp(c, peer):
    for line in c.makefile("rb"):
        c.sendall(("%s %s\n" % (peer[0], line.decode().strip())).encode())
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, peer = t.accept()
    threading.Thread(target=serve_tcp, args=(c, peer), daemon=True).start()
"#;

/// One exchange from the internet client: prints the answer line. UDP retransmits 3 times.
const CLIENT: &str = r#"
import socket, sys
proto, host, port, line = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if proto == "tcp":
    c = socket.create_connection((host, port), timeout=3)
    c.sendall(line.encode() + b"\n")
    print(c.makefile("rb").readline().decode().strip())
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    for _ in range(3):
        s.sendto(line.encode(), (host, port))
        try:
            print(s.recvfrom(2048)[0].decode().strip()); sys.exit(0)
        except socket.timeout:
            pass
    sys.exit("no UDP answer")
"#;

/// Keeps one TCP connection open: sends every stdin line, prints every answer line.
const INTERACTIVE_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
answers = c.makefile("rb")
for line in sys.stdin:
    c.sendall(line.encode())
    print(answers.readline().decode().strip(), flush=True)
"#;

/// The echo server in `hpf-node`, stopped (by its PID) when dropped.
struct EchoServer(Child);

impl EchoServer {
    fn start(lab: &Lab) -> EchoServer {
        let port = TARGET_PORT.to_string();
        let mut child = lab.spawn(
            "node",
            &[lab::python(), "-c", ECHO_SERVER, "192.168.77.100", &port],
        );
        let mut ready = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "echo server did not start");
        EchoServer(child)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs [`CLIENT`] in the lab's namespace `ns`: sends `line` over `proto` to `host:port`.
fn run_client(lab: &Lab, ns: &str, proto: &str, host: &str, port: &str, line: &str) -> Output {
    lab.exec(ns, &[lab::python(), "-c", CLIENT, proto, host, port, line])
}

/// From the internet client to the router's public address: the answer line.
fn exchange(lab: &Lab, proto: &str, port: u16, line: &str) -> String {
    let port = port.to_string();
    let out = run_client(lab, "wan", proto, ROUTER_WAN_IP, &port, line);
    assert!(
        out.status.success(),
        "{proto} {line:?} to {ROUTER_WAN_IP}:{port} got no answer: {}\nrules in hpf-lan:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&lab.exec("lan", &["nft", "list", "ruleset"]).stdout)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The router maps WAN:port to the relay host's same port, as holepunch's relay mode asks.
fn map_on_router(lab: &Lab, proto: &str, port: u16) {
    let port = port.to_string();
    let out = lab.exec(
        "lan",
        &[
            "upnpc",
            "-u",
            "http://192.168.77.1:5000/rootDesc.xml",
            "-e",
            "holepunch:test/relay",
            "-a",
            LAN_IP,
            &port,
            &port,
            proto,
            "600",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("is redirected to internal"),
        "upnpc -a {proto} {port}: {text}\n{}",
        lab.router_log()
    );
}

fn relay_lab(forwards: Vec<Forward>) -> (Lab, Ruleset) {
    let lab = Lab::up(LAB_PREFIX);
    let lan = lab.ns("lan");
    // A new namespace may inherit forwarding (net.core.devconf_inherit_init_net): turn it off.
    let out = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    assert!(out.status.success(), "{out:?}");
    let off = in_netns(&lan, check_forwarding).expect_err("forwarding is off");
    assert!(matches!(off, NftError::ForwardingDisabled), "{off:?}");
    let out = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(out.status.success(), "{out:?}");
    in_netns(&lan, check_forwarding).expect("forwarding is on");
    let ruleset = relay(forwards);
    apply(&lan, &ruleset).expect("apply relay in hpf-lan");
    (lab, ruleset)
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn relay_carries_tcp_and_udp_from_the_internet_to_the_target_and_back() {
    const PORT: u16 = 30080;
    let (lab, _) = relay_lab(vec![
        forward(Protocol::Tcp, PORT, TARGET_PORT),
        forward(Protocol::Udp, PORT, TARGET_PORT),
    ]);
    let _server = EchoServer::start(&lab);
    map_on_router(&lab, "TCP", PORT);
    map_on_router(&lab, "UDP", PORT);

    // The target sees the relay host: replies must come back through it.
    assert_eq!(
        exchange(&lab, "tcp", PORT, "hello tcp"),
        format!("{LAN_IP} hello tcp")
    );
    assert_eq!(
        exchange(&lab, "udp", PORT, "hello udp"),
        format!("{LAN_IP} hello udp")
    );

    // Connections that another table DNATs on the relay host are not masqueraded (the rule
    // is narrower than `ct status dnat masquerade`): the target answers the router's own
    // address directly, which the UDP client accepts from any source.
    for command in [
        "add table ip other",
        "add chain ip other pre { type nat hook prerouting priority -100 ; }",
        "add rule ip other pre ip daddr 192.168.77.11 udp dport 8081 dnat to 192.168.77.100:8080",
    ] {
        let out = lab.exec("lan", &["nft", command]);
        assert!(out.status.success(), "nft {command}: {out:?}");
    }
    let out = run_client(&lab, "rtr", "udp", "192.168.77.11", "8081", "other");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "192.168.77.1 other"
    );

    // Without holepunch's table the relay host has nothing on the port: the rules carried it.
    assert!(in_netns(&lab.ns("lan"), || NftFirewall.remove()).unwrap());
    let port = PORT.to_string();
    let out = run_client(&lab, "wan", "tcp", ROUTER_WAN_IP, &port, "gone");
    assert!(
        !out.status.success(),
        "reached the target without the table"
    );
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn gateway_on_the_router_keeps_the_client_source_address() {
    const PORT: u16 = 30081;
    let lab = Lab::up(LAB_PREFIX);
    let rtr = lab.ns("rtr");
    in_netns(&rtr, check_forwarding).expect("the lab router forwards");
    // Before the ruleset, the router has nothing on this port.
    let out = run_client(
        &lab,
        "wan",
        "tcp",
        ROUTER_WAN_IP,
        &PORT.to_string(),
        "early",
    );
    assert!(!out.status.success(), "reached the LAN without a ruleset");

    let ruleset = Ruleset::Gateway {
        wan_interface: "rwan".into(),
        forwards: vec![
            forward(Protocol::Tcp, PORT, TARGET_PORT),
            forward(Protocol::Udp, PORT, TARGET_PORT),
        ],
        forwards6: vec![],
    };
    apply(&rtr, &ruleset).expect("apply gateway in hpf-rtr");
    let _server = EchoServer::start(&lab);
    assert_eq!(
        exchange(&lab, "tcp", PORT, "via gw"),
        format!("{WAN_CLIENT_IP} via gw")
    );
    assert_eq!(
        exchange(&lab, "udp", PORT, "via gw"),
        format!("{WAN_CLIENT_IP} via gw")
    );
}

/// A daemon restart re-applies the same ruleset: an open connection through the relay must
/// go on working, and so must one after a change that keeps its forward.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn an_open_tcp_connection_through_the_relay_survives_a_reapply() {
    const PORT: u16 = 30082;
    let web = forward(Protocol::Tcp, PORT, TARGET_PORT);
    let (lab, ruleset) = relay_lab(vec![web]);
    let _server = EchoServer::start(&lab);
    map_on_router(&lab, "TCP", PORT);

    let mut client = Command::new("ip")
        .args(["netns", "exec", &lab.ns("wan"), lab::python(), "-c"])
        .args([INTERACTIVE_CLIENT, ROUTER_WAN_IP, &PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = client.stdin.take().unwrap();
    let mut output = BufReader::new(client.stdout.take().unwrap());
    let say = |input: &mut ChildStdin, output: &mut BufReader<ChildStdout>, line: &str| {
        writeln!(input, "{line}").unwrap();
        input.flush().unwrap();
        let mut answer = String::new();
        output.read_line(&mut answer).unwrap();
        answer.trim().to_owned()
    };
    assert_eq!(
        say(&mut input, &mut output, "before"),
        format!("{LAN_IP} before")
    );

    let lan = lab.ns("lan");
    let started = Instant::now();
    apply(&lan, &ruleset).expect("re-apply the same ruleset");
    let reapply = started.elapsed();
    assert_eq!(
        say(&mut input, &mut output, "after"),
        format!("{LAN_IP} after")
    );

    let grown = relay(vec![web, forward(Protocol::Udp, 30083, 53)]);
    apply(&lan, &grown).expect("apply a grown ruleset");
    assert_eq!(
        say(&mut input, &mut output, "grown"),
        format!("{LAN_IP} grown")
    );
    assert!(
        reapply < Duration::from_secs(2),
        "re-apply took {reapply:?}"
    );

    drop(input);
    let status = client.wait().unwrap();
    assert!(status.success(), "client failed after re-apply");
}

/// 10,000 forwards take several netlink pages: they must still go in as one transaction, and
/// a refusal on the last page must undo the first ones.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn ten_thousand_forwards_are_one_atomic_batch() {
    const COUNT: u16 = 10_000;
    let ns = Netns::new("hpf-t4").with_relay_address();
    let many: Vec<Forward> = (0..COUNT)
        .map(|i| forward(Protocol::Tcp, 20_000 + i, 8000 + i % 1000))
        .collect();
    apply(&ns.0, &relay(many.clone())).expect("apply 10,000 forwards");
    let held = in_netns(&ns.0, || NftFirewall.current()).unwrap();
    assert_eq!(held.len(), usize::from(COUNT));
    assert_eq!(held, many, "read back differs");
    let listing = listed(&ns.0).unwrap();
    assert_eq!(elements(&listing, "targets4").len(), usize::from(COUNT));

    // Other forwards, plus a conflict at the very end of the batch.
    let mut refused: Vec<Forward> = (0..COUNT)
        .map(|i| forward(Protocol::Udp, 20_000 + i, 53))
        .collect();
    // Sorted last (apply sorts forwards), so the conflicting element is on the last page.
    refused.push(forward(Protocol::Udp, 20_000 + COUNT - 1, 54));
    let err = apply(&ns.0, &relay(refused)).expect_err("conflict on the last page");
    assert!(matches!(err, NftError::Apply(_)), "{err:?}");
    assert_eq!(in_netns(&ns.0, || NftFirewall.current()).unwrap(), many);
}
