//! `holepunch run` publishing dual-stack Services over IPv6 (README, "IPv6"): the daemon on the
//! LAN host of `tests/lab/router-lab up --ipv6` (prefix `hq6-`; miniupnpd 2.3.1, whose firewall
//! drops new inbound IPv6 unless a pinhole allows it), the cluster served by the in-test fake
//! API, relay mode: the router's pinhole opens this host's global address 2001:db8:77::10 and
//! holepunch's ip6 DNAT carries the traffic on to the node's IPv6 address and nodePort. Real
//! TCP and UDP from the internet client 2001:db8:ffff::1. Needs root: the lab tier (as root:
//! `cargo test --features lab --test ipv6_daemon_lab`).

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::path::Path;
use std::time::Duration;

use bin::{Daemon, holepunch, text};
use daemon_lab::{has_event, kubectl, wait_until, with_fake_cluster_in};
use fake_api::FakeApi;
use lab::{EchoServer, Lab, NODE_IP, ROUTER_WAN_IP};
use serde_json::json;

const PREFIX: &str = "hq6-";
const HOST6: &str = "2001:db8:77::10";
const NODE6: &str = "2001:db8:77::20";
const ROUTER6: &str = "2001:db8:77::1";

/// The lab's echo server (tests/support/lab.rs) on `[ip]:port` in namespace `ns`.
fn echo6(lab: &Lab, ns: &str, ip: &str, port: u16) -> EchoServer {
    lab.echo_server(ns, ip, port)
}

/// Whether the internet client reaches `[HOST6]:port` over `proto` and gets its line back
/// (from the node's echo, through the relay).
fn reaches6(lab: &Lab, proto: &str, port: u16) -> bool {
    let line = format!("hello {proto} {port}");
    lab.ask("wan", proto, HOST6, port, &line)
        .is_some_and(|answer| answer.ends_with(&line))
}

/// Whether the internet client reaches the router's IPv4 address on `port` (the mapping).
fn reaches4(lab: &Lab, proto: &str, port: u16) -> bool {
    lab.ask("wan", proto, ROUTER_WAN_IP, port, "v4").is_some()
}

/// The router's pinhole chain.
fn pinhole_rules(lab: &Lab) -> String {
    let out = lab.exec(
        "rtr",
        &["nft", "list", "chain", "inet", "filter", "miniupnpd"],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many of the router's pinholes open `port` on this host's address.
fn pinholes_on(lab: &Lab, port: u16) -> usize {
    pinholes_to(lab, HOST6, port)
}

/// How many of the router's pinholes open `port` on `address`.
// NOTE: nft 1.0.6 lists miniupnpd 2.3.1's pinhole rules with the raw header match
// `@nh,192,128 0x<address in hex>` for the IPv6 destination.
fn pinholes_to(lab: &Lab, address: &str, port: u16) -> usize {
    let host: std::net::Ipv6Addr = address.parse().expect("address");
    let hex: String = host.octets().iter().map(|b| format!("{b:02x}")).collect();
    pinhole_rules(lab)
        .lines()
        .filter(|l| l.contains(&hex) && l.contains(&format!("dport {port} ")))
        .count()
}

fn dual_node(fake: &FakeApi) {
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": NODE_IP},
                {"type": "InternalIP", "address": NODE6}
            ],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }));
}

/// A dual-stack NodePort Service opted in: TCP (and UDP when `udp`) on `port` (8000..8999),
/// nodePort 23000 + port (UDP: 23100 + port).
fn service(fake: &FakeApi, name: &str, port: u16, udp: bool) {
    let node_port = 23_000 + port;
    let mut ports =
        vec![json!({"name": "tcp", "port": port, "protocol": "TCP", "nodePort": node_port})];
    if udp {
        ports.push(
            json!({"name": "udp", "port": port, "protocol": "UDP", "nodePort": node_port + 100}),
        );
    }
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default",
                     "annotations": {"holepunch/punch-external": "true"}},
        "spec": {"type": "NodePort", "ipFamilyPolicy": "PreferDualStack", "ports": ports}
    }));
}

/// A config for the IPv6 lab: relay, `backend`, leases of 120 s, verify every 5 s; the LB
/// pool and the LAN's IPv6 /64 in target_cidrs (so that only the fixed rules refuse the
/// router's address).
fn config(dir: &Path, kubeconfig: &Path, backend: &str) -> std::path::PathBuf {
    config_in_mode(dir, kubeconfig, backend, "relay")
}

/// [`config`] with `exposure.mode = mode`.
fn config_in_mode(dir: &Path, kubeconfig: &Path, backend: &str, mode: &str) -> std::path::PathBuf {
    let path = dir.join("holepunch.toml");
    // NOTE: miniupnpd 2.3.1 with ipv6_listening_ip serves HTTP on that IPv6 address only
    // (`ss -ltn` in the lab's router: [2001:db8:77::1]%br0:5000, nothing on IPv4), so the
    // IGD is reached over IPv6 for IPv4 mappings too.
    let igd = if backend == "upnp" {
        "igd_url = \"http://[2001:db8:77::1]:5000/rootDesc.xml\"\n"
    } else {
        ""
    };
    let body = format!(
        "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n\
         [router]\nbackend = \"{backend}\"\n{igd}lease_seconds = 120\nverify_interval_seconds = 5\n\n\
         [exposure]\nmode = \"{mode}\"\nipv6 = \"auto\"\n\
         target_cidrs = [\"192.168.77.100/32\", \"2001:db8:77::/64\"]\n\n\
         [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"\"\n\n\
         [log]\nformat = \"text\"\nlevel = \"info,holepunch=debug\"\n",
        dir = dir.display(),
        kubeconfig = kubeconfig.display(),
    );
    std::fs::write(&path, body).expect("write config");
    path
}

const WAIT: Duration = Duration::from_secs(20);

/// Relay forwards on the LAN host: IPv4 and IPv6 forwarding on.
fn forwarding_on(lab: &Lab) {
    for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        let out = lab.exec("lan", &["sysctl", "-qw", sysctl]);
        assert!(out.status.success(), "{out:?}");
    }
}

/// The IPv6 router lab for relaying through `backend`, forwarding on in the LAN host.
fn relay_lab(prefix: &str, backend: &str) -> Lab {
    // UPnP: the IGD is called over IPv6 (see `config`), so the IPv4 mapping to this host's
    // IPv4 address is for "another host" in secure mode: the lab's router runs without it.
    let options: &[&str] = if backend == "upnp" {
        &["--ipv6", "--insecure"]
    } else {
        &["--ipv6"]
    };
    let lab = Lab::up_with(prefix, options);
    forwarding_on(&lab);
    lab
}

/// The whole story through one backend: published over IPv4 and IPv6 together, a second
/// Service independent, restored after a router restart, removed together.
fn dual_stack_relay_through(backend: &str) {
    let lab = relay_lab(PREFIX, backend);
    let _web6 = echo6(&lab, "node", NODE6, 31080);
    let _web6_udp = echo6(&lab, "node", NODE6, 31180);
    let _api6 = echo6(&lab, "node", NODE6, 31081);
    let _web4 = lab.echo_server("node", NODE_IP, 31080);

    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        dual_node(fake);
        // Before holepunch: the router lets nothing in over IPv6.
        assert!(!reaches6(&lab, "tcp", 8080), "open before any pinhole");
        assert_eq!(pinholes_on(&lab, 8080), 0);
        service(fake, "web", 8080, true);
        let config = config(dir, kubeconfig, backend);
        let daemon = Daemon::start(&config);

        let took = wait_until(&daemon, "web over IPv6 (TCP)", WAIT, || {
            reaches6(&lab, "tcp", 8080)
        });
        println!(
            "BENCH ipv6_{backend}_first_reachable_ms {}",
            took.as_millis()
        );
        assert!(reaches6(&lab, "udp", 8080), "UDP over IPv6");
        assert!(reaches4(&lab, "tcp", 8080), "the IPv4 mapping beside it");
        wait_until(
            &daemon,
            "the Published Event with both addresses",
            WAIT,
            || {
                has_event(
                    kubeconfig,
                    Some("Normal"),
                    "Published",
                    "web",
                    &format!("{ROUTER_WAN_IP}:8080 and [{HOST6}]:8080"),
                )
            },
        );
        assert_eq!(pinholes_on(&lab, 8080), 2, "{}", pinhole_rules(&lab));
        let state = std::fs::read_to_string(dir.join("state/state.toml")).expect("state");
        assert!(state.starts_with("version = 3\n"), "{state}");
        assert_eq!(state.matches("[[pinhole]]").count(), 2, "{state}");
        if backend == "pcp" {
            assert_eq!(state.matches("\nnonce = ").count(), 4, "{state}");
        } else {
            // A UniqueID is never trusted (miniupnpd renumbers after a restart): not recorded.
            assert!(!state.contains("unique_id"), "{state}");
        }

        // A second Service: its own pinhole, reachable while web is, and independent of it.
        service(fake, "api", 8081, false);
        wait_until(&daemon, "api over IPv6", WAIT, || {
            reaches6(&lab, "tcp", 8081)
        });

        // A router restart loses every pinhole; the daemon restores them.
        let opened = daemon.log().matches("IPv6 pinhole open").count();
        lab.restart_router();
        let took = wait_until(
            &daemon,
            "web over IPv6 after the router restart",
            WAIT,
            || reaches6(&lab, "tcp", 8080) && reaches6(&lab, "tcp", 8081),
        );
        println!(
            "BENCH ipv6_{backend}_restored_after_restart_ms {}",
            took.as_millis()
        );
        assert!(
            reaches6(&lab, "udp", 8080),
            "UDP over IPv6 after the restart"
        );
        assert!(
            daemon.log().matches("IPv6 pinhole open").count() > opened,
            "not restored by the daemon:\n{}",
            daemon.log()
        );
        assert_eq!(pinholes_on(&lab, 8080), 2, "{}", pinhole_rules(&lab));

        // web unpublished: its IPv4 mapping and its pinholes go together; api stays.
        kubectl(kubeconfig, &["delete", "svc", "web"]);
        wait_until(&daemon, "web's pinholes to close", WAIT, || {
            pinholes_on(&lab, 8080) == 0
        });
        assert!(!reaches6(&lab, "tcp", 8080), "IPv6 open after unpublish");
        assert!(!reaches6(&lab, "udp", 8080), "IPv6 open after unpublish");
        assert!(!reaches4(&lab, "tcp", 8080), "IPv4 open after unpublish");
        assert!(reaches6(&lab, "tcp", 8081), "api closed with web");
        assert_eq!(pinholes_on(&lab, 8081), 1);
        drop(daemon);
    });
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_dual_stack_service_is_reachable_over_ipv6_through_pcp_only_while_published() {
    dual_stack_relay_through("pcp");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_dual_stack_service_is_reachable_over_ipv6_through_upnp_only_while_published() {
    dual_stack_relay_through("upnp");
}

/// Direct mode through UPnP (README, "IPv6"): the pinhole would open the target's own global
/// address and port (the node's IPv6 address and nodePort; IPv6 has no port translation).
/// miniupnpd 2.3.1 refuses it even with secure mode off (`--insecure`): its AddPinhole checks
/// that InternalClient is the caller's own address whatever `secure_mode` says
/// (`PinholeVerification` in its upnpsoap.c; the router logs "Client 2001:db8:77::10 tried to
/// access pinhole for internal 2001:db8:77::20 and is not authorized") and answers 606. The
/// daemon turns that into the typed refusal and a RouterRefused Event, opens nothing over IPv6
/// (the node stays shut; the state keeps the two pinholes it asked for, to the node's
/// address and ports, as refused), and publishes the IPv4 mapping beside it, which carries
/// traffic until the Service is unpublished.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn direct_mode_through_upnp_is_refused_for_the_nodes_address_beside_a_working_ipv4_mapping() {
    let lab = Lab::up_with(PREFIX, &["--ipv6", "--insecure"]);
    let _web6 = echo6(&lab, "node", NODE6, 31080);
    let _web6_udp = echo6(&lab, "node", NODE6, 31180);
    let _web4 = lab.echo_server("node", NODE_IP, 31080);
    // The route works: the node answers its own LAN (the router) over IPv6.
    assert!(
        lab.ask("rtr", "tcp", NODE6, 31080, "lan").is_some(),
        "the node's echo is not reachable from the router"
    );
    let direct6 = |proto: &str, port: u16| lab.ask("wan", proto, NODE6, port, "direct6");

    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        dual_node(fake);
        assert_eq!(direct6("tcp", 31080), None, "open before any pinhole");
        service(fake, "web", 8080, true);
        let config = config_in_mode(dir, kubeconfig, "upnp", "direct");
        let daemon = Daemon::start(&config);

        // The IPv4 mapping works (direct: WAN:8080 -> the node's nodePort).
        wait_until(&daemon, "web over IPv4", WAIT, || {
            reaches4(&lab, "tcp", 8080)
        });
        wait_until(&daemon, "the RouterRefused Event", WAIT, || {
            has_event(
                kubeconfig,
                Some("Warning"),
                "RouterRefused",
                "web",
                "IPv6 pinhole",
            )
        });
        // The router's answer: 606 for the node's address, asked by this host.
        let log = daemon.log();
        for text in [
            "pinhole=[2001:db8:77::20]:31080",
            "pinhole=[2001:db8:77::20]:31180",
            "UPnP error 606 (Action not authorized)",
            "only to the host that asks (2001:db8:77::10)",
        ] {
            assert!(log.contains(text), "no {text:?} in:\n{log}");
        }
        let router = lab.router_log();
        assert!(
            router.contains("tried to access pinhole for internal 2001:db8:77::20"),
            "{router}"
        );
        // Nothing opened over IPv6: no pinhole to the node nor to this host, the node shut.
        let rules = pinhole_rules(&lab);
        assert_eq!(pinholes_to(&lab, NODE6, 31080), 0, "{rules}");
        assert_eq!(pinholes_on(&lab, 8080), 0, "{rules}");
        assert_eq!(direct6("tcp", 31080), None, "IPv6 open without a pinhole");
        assert_eq!(direct6("udp", 31180), None, "IPv6 open without a pinhole");
        // The state keeps both pinholes as asked (the node's address and its own ports,
        // never this host's) and refused, to be retried later.
        let state = std::fs::read_to_string(dir.join("state/state.toml")).expect("state");
        assert_eq!(state.matches("[[pinhole]]").count(), 2, "{state}");
        for line in [
            "address = \"2001:db8:77::20\"\nport = 31080\n",
            "address = \"2001:db8:77::20\"\nport = 31180\n",
        ] {
            assert!(state.contains(line), "no {line:?} in:\n{state}");
        }
        assert_eq!(state.matches("failure = \"refused\"").count(), 2, "{state}");
        assert!(
            !state.contains(&format!("address = \"{HOST6}\"")),
            "{state}"
        );

        // Unpublished: the IPv4 mapping goes too, and the refused pinholes leave the state.
        kubectl(kubeconfig, &["delete", "svc", "web"]);
        wait_until(&daemon, "web's IPv4 mapping to close", WAIT, || {
            !reaches4(&lab, "tcp", 8080)
        });
        wait_until(
            &daemon,
            "the refused pinholes out of the state",
            WAIT,
            || {
                std::fs::read_to_string(dir.join("state/state.toml"))
                    .is_ok_and(|state| !state.contains("[[pinhole]]"))
            },
        );
        assert_eq!(direct6("tcp", 31080), None, "IPv6 open after unpublish");
        // Nothing was asked to close what the router never made.
        assert!(
            !daemon.log().contains("could not close the IPv6 pinhole"),
            "{}",
            daemon.log()
        );
        drop(daemon);
    });
}

/// The router's IPv6 address as a load balancer's ingress (inside target_cidrs): refused with
/// an Event, no pinhole, while a normal Service in the same run is published over IPv6, and a
/// Service of holepunch's own class shows the IPv6 address beside the router's in its status.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn the_routers_ipv6_address_as_ingress_is_refused_while_a_normal_service_is_published() {
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    forwarding_on(&lab);
    let _web6 = echo6(&lab, "node", NODE6, 31080);
    let _own6 = echo6(&lab, "node", NODE6, 31090);
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        dual_node(fake);
        service(fake, "web", 8080, false);
        // holepunch's own class: its status lists the IPv6 address beside the router's.
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "own", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "holepunch.io/router",
                     "ports": [{"name": "web", "port": 9090, "protocol": "TCP", "nodePort": 31090}]}
        }));
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "attack", "namespace": "default",
                         "annotations": {"holepunch/punch-external": "true"}},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "admin", "port": 8090, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.168.77.100"}, {"ip": ROUTER6}]}}
        }));
        let config = config(dir, kubeconfig, "pcp");
        let daemon = Daemon::start(&config);
        wait_until(&daemon, "web over IPv6", WAIT, || {
            reaches6(&lab, "tcp", 8080)
        });
        wait_until(&daemon, "own over IPv6", WAIT, || {
            reaches6(&lab, "tcp", 9090)
        });
        wait_until(&daemon, "own's status with both addresses", WAIT, || {
            kubectl(
                kubeconfig,
                &[
                    "get",
                    "svc",
                    "own",
                    "-o",
                    "jsonpath={.status.loadBalancer.ingress[*].ip}",
                ],
            ) == format!("{ROUTER_WAN_IP} {HOST6}")
        });
        wait_until(&daemon, "the refusal Event", WAIT, || {
            has_event(
                kubeconfig,
                Some("Warning"),
                "TargetNotAllowed",
                "attack",
                "no IPv6 pinhole",
            )
        });
        assert_eq!(pinholes_on(&lab, 8090), 0, "{}", pinhole_rules(&lab));
        // No IPv6 rule at all for the port (its IPv4 mapping is there: the IPv4 side is fine).
        let rules = pinhole_rules(&lab);
        assert!(
            !rules
                .lines()
                .any(|l| l.contains("dport 8090 ") && l.contains("@nh,192,128")),
            "{rules}"
        );
        assert!(
            rules
                .lines()
                .any(|l| l.contains("dport 8090 ") && l.contains("@nh,128,32")),
            "the IPv4 mapping of the same Service: {rules}"
        );
        // The Event names no address.
        let events = kubectl(kubeconfig, &["get", "events", "-o", "json"]);
        // (This host's address, in the Published Events, begins with the router's.)
        assert!(!events.replace(HOST6, "").contains(ROUTER6), "{events}");
        assert!(
            daemon.log().contains("it is an address of the router"),
            "the operator's log says why"
        );
        drop(daemon);
    });
}

/// The router's link-local address on the LAN (br0), as a Router Advertisement gives it.
fn router_link_local(lab: &Lab) -> String {
    let out = lab.exec(
        "rtr",
        &[
            "ip", "-6", "-o", "addr", "show", "dev", "br0", "scope", "link",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("the router has no link-local address on br0: {text}"))
}

/// The usual home: this host's IPv6 default route goes via the router's link-local address
/// (learnt from a Router Advertisement). PCP is asked at `[fe80::…%lan0]:5351` from this
/// host's global address; the internet reaches the Service over IPv6 only once the pinhole
/// exists. The router runs without `ipv6_listening_ip` (`router-lab up --ipv6-any`): with it,
/// miniupnpd 2.3.1 binds its IPv6 PCP socket to that global address only and never sees a
/// request sent to its link-local address (measured: `ss -lun` shows [2001:db8:77::1]:5351).
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_link_local_next_hop_is_asked_through_pcp_from_the_global_address() {
    link_local_next_hop_through("pcp");
}

/// The same home through UPnP: the IGD's URL has no interface scope, so holepunch dials the
/// router's link-local address on the route's interface itself (README, "IPv6"); the
/// description and every WANIPv6FirewallControl call go there from this host's global
/// address. The router runs without secure mode, as in the UPnP dual-stack test: the IPv4
/// mapping is asked over IPv6 (`router.igd_url` at the router's global address).
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_link_local_next_hop_is_asked_through_upnp_on_its_interface() {
    link_local_next_hop_through("upnp");
}

fn link_local_next_hop_through(backend: &str) {
    let options: &[&str] = if backend == "upnp" {
        &["--ipv6-any", "--insecure"]
    } else {
        &["--ipv6-any"]
    };
    let lab = Lab::up_with(PREFIX, options);
    forwarding_on(&lab);
    let router_ll = router_link_local(&lab);
    assert!(router_ll.starts_with("fe80:"), "{router_ll}");
    let out = lab.exec(
        "lan",
        &[
            "ip", "-6", "route", "replace", "default", "via", &router_ll, "dev", "lan0",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let routes = lab.exec("lan", &["ip", "-6", "route", "show", "default"]);
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(
        routes.contains(&format!("via {router_ll} dev lan0")) && !routes.contains(ROUTER6),
        "{routes}"
    );
    let _web6 = echo6(&lab, "node", NODE6, 31080);
    let _web4 = lab.echo_server("node", NODE_IP, 31080);

    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        dual_node(fake);
        // Before holepunch: the router lets nothing in over IPv6 (and the route works: the
        // internet client's packets come back through the link-local next hop later).
        assert!(!reaches6(&lab, "tcp", 8080), "open before any pinhole");
        assert_eq!(pinholes_on(&lab, 8080), 0);
        service(fake, "web", 8080, false);
        let config = config(dir, kubeconfig, backend);
        let daemon = Daemon::start(&config);
        let took = wait_until(
            &daemon,
            "web over IPv6 via the link-local router",
            WAIT,
            || reaches6(&lab, "tcp", 8080),
        );
        println!(
            "BENCH ipv6_{backend}_link_local_first_reachable_ms {}",
            took.as_millis()
        );
        assert!(reaches4(&lab, "tcp", 8080), "the IPv4 mapping beside it");
        assert_eq!(pinholes_on(&lab, 8080), 1, "{}", pinhole_rules(&lab));
        let log = daemon.log();
        assert!(
            log.lines().any(
                |l| l.contains("IPv6 pinholes go through the router's IPv6 address")
                    && l.contains(&router_ll)
                    && l.contains(HOST6)
            ),
            "the router asked is the link-local one, from the global address:\n{log}"
        );
        assert!(!log.contains("is link-local"), "{log}");
        drop(daemon);
    });
}

/// The prefix of the cleanup tests' lab: apart from `hq6-`, so they need not wait for it.
const CLEANUP_PREFIX: &str = "hq8-";

/// `holepunch cleanup` after the daemon stopped (a stop leaves mappings and pinholes in
/// place): the pinholes are deleted at the router as the mappings are (README, "IPv6"), not
/// left to run out, and nothing of the Service is reachable any more.
fn cleanup_deletes_the_pinholes_through(backend: &str) {
    let lab = relay_lab(CLEANUP_PREFIX, backend);
    let _web6 = echo6(&lab, "node", NODE6, 31080);
    let _web6_udp = echo6(&lab, "node", NODE6, 31180);
    let _web4 = lab.echo_server("node", NODE_IP, 31080);
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        dual_node(fake);
        service(fake, "web", 8080, true);
        let config = config(dir, kubeconfig, backend);
        let daemon = Daemon::start(&config);
        wait_until(&daemon, "web over IPv6", WAIT, || {
            reaches6(&lab, "tcp", 8080) && reaches6(&lab, "udp", 8080)
        });
        assert_eq!(pinholes_on(&lab, 8080), 2, "{}", pinhole_rules(&lab));
        let log = daemon.stop();
        assert!(
            reaches6(&lab, "tcp", 8080) && reaches4(&lab, "tcp", 8080),
            "a stop must leave the pinholes and the mapping in place:\n{log}"
        );

        let out = holepunch(&["cleanup", "--config", config.to_str().expect("utf-8")]);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "cleanup failed: {said}");
        assert!(said.contains("removed 2 mappings, 0 left"), "{said}");
        assert!(said.contains("removed 2 IPv6 pinholes, 0 left"), "{said}");
        assert_eq!(pinholes_on(&lab, 8080), 0, "{}", pinhole_rules(&lab));
        assert!(!reaches6(&lab, "tcp", 8080), "IPv6 TCP open after cleanup");
        assert!(!reaches6(&lab, "udp", 8080), "IPv6 UDP open after cleanup");
        assert!(!reaches4(&lab, "tcp", 8080), "IPv4 open after cleanup");
        let state = std::fs::read_to_string(dir.join("state/state.toml")).expect("state");
        assert_eq!(state, "version = 2\n");
    });
}

/// The internet client's IPv6 address (the echo answers with the peer's address).
const WAN_CLIENT6: &str = "2001:db8:ffff::1";
/// The node's second IPv6 address, as a load balancer would announce it.
const LB6: &str = "2001:db8:77::100";

/// A config for gateway mode on the lab's router: no router backend, the WAN interface
/// `rwan`; target_cidrs lists only the IPv4 LB address (so an IPv6 ingress is refused).
fn gateway_config(dir: &Path, kubeconfig: &Path) -> std::path::PathBuf {
    let path = dir.join("holepunch.toml");
    let body = format!(
        "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n\
         [router]\nbackend = \"none\"\nverify_interval_seconds = 5\n\n\
         [exposure]\nmode = \"gateway\"\nwan_interface = \"rwan\"\nipv6 = \"auto\"\n\
         target_cidrs = [\"192.168.77.100/32\"]\n\n\
         [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"\"\n\n\
         [log]\nformat = \"text\"\nlevel = \"info,holepunch=debug\"\n",
        dir = dir.display(),
        kubeconfig = kubeconfig.display(),
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// What the internet client gets back from `[ip]:port` over `proto`, if anything.
fn ask6(lab: &Lab, proto: &str, ip: &str, port: u16) -> Option<String> {
    lab.ask("wan", proto, ip, port, &format!("gw6 {proto}"))
}

/// The IPv6 gateway map in holepunch's table on the router.
fn gateway6_map(lab: &Lab) -> String {
    let out = lab.exec(
        "rtr",
        &["nft", "list", "map", "inet", "holepunch", "gateway6"],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gateway mode over IPv6 (README, "IPv6"): holepunch on the router publishes a node's IPv6
/// nodePort on the node's own address at the external port, in its own table. The router's
/// own firewall (the lab's `inet filter forward` drops new IPv6 from the WAN) still drops it
/// until the operator accepts holepunch's mark there, which holepunch's log asks for; then
/// the internet reaches it over TCP and UDP with its own address kept, and no longer after
/// the Service is unpublished. A load balancer's IPv6 ingress outside target_cidrs beside it
/// is refused and stays unreachable.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn gateway_mode_on_the_router_publishes_ipv6_targets_once_the_hosts_firewall_accepts_the_mark() {
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    let _web6 = echo6(&lab, "node", NODE6, 31080);
    let _web6_udp = echo6(&lab, "node", NODE6, 31180);
    let _web_own_port = echo6(&lab, "node", NODE6, 8080);
    let _lb6 = echo6(&lab, "node", LB6, 8090);
    // The route works: the node answers its own LAN (the router) over IPv6.
    assert!(
        lab.ask("rtr", "tcp", NODE6, 31080, "lan").is_some(),
        "the node's echo is not reachable from the router"
    );
    with_fake_cluster_in(&lab, "rtr", |fake, dir, kubeconfig, _| {
        dual_node(fake);
        // A Service whose IPv6 load balancer address is outside target_cidrs (no nodePort to
        // fall back to): refused over IPv6, published over IPv4 only.
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "attack", "namespace": "default",
                         "annotations": {"holepunch/punch-external": "true"}},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "web", "port": 8090, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.168.77.100"}, {"ip": LB6}]}}
        }));
        let config = gateway_config(dir, kubeconfig);
        let daemon = Daemon::start(&config);
        wait_until(&daemon, "the refusal Event", WAIT, || {
            has_event(
                kubeconfig,
                Some("Warning"),
                "TargetNotAllowed",
                "attack",
                "no IPv6 pinhole",
            )
        });
        // Before publishing: nothing reaches the node over IPv6 (not even the port it
        // listens on directly).
        assert_eq!(
            ask6(&lab, "tcp", NODE6, 8080),
            None,
            "open before publishing"
        );
        service(fake, "web", 8080, true);
        wait_until(&daemon, "web in the gateway6 map", WAIT, || {
            gateway6_map(&lab).contains(&format!("{NODE6} . tcp . 8080"))
        });
        // holepunch's accept does not override the router's own drop; the log says what to
        // add, naming the chain.
        wait_until(&daemon, "the firewall warning", WAIT, || {
            daemon.log().contains("inet filter forward")
        });
        assert!(
            daemon.log().contains("ct mark and 0x02000000 != 0 accept"),
            "{}",
            daemon.log()
        );
        assert_eq!(
            ask6(&lab, "tcp", NODE6, 8080),
            None,
            "reached through the router's own drop"
        );

        // The operator accepts holepunch's mark in the router's forward chain.
        let out = lab.exec(
            "rtr",
            &[
                "nft",
                "insert",
                "rule",
                "inet",
                "filter",
                "forward",
                "ct",
                "mark",
                "and",
                "0x02000000",
                "!=",
                "0",
                "accept",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let took = wait_until(&daemon, "web over IPv6 through the gateway", WAIT, || {
            ask6(&lab, "tcp", NODE6, 8080).is_some()
        });
        println!(
            "BENCH ipv6_gateway_reachable_after_rule_ms {}",
            took.as_millis()
        );
        // The client's own address is kept, and the nodePort answered (DNAT 8080 -> 31080).
        assert_eq!(
            ask6(&lab, "tcp", NODE6, 8080).as_deref(),
            Some(format!("{WAN_CLIENT6} gw6 tcp").as_str())
        );
        assert_eq!(
            ask6(&lab, "udp", NODE6, 8080).as_deref(),
            Some(format!("{WAN_CLIENT6} gw6 udp").as_str())
        );
        // Only what is published: the nodePort itself and the refused LB address stay shut.
        assert_eq!(ask6(&lab, "tcp", NODE6, 31080), None, "the bare nodePort");
        assert_eq!(ask6(&lab, "tcp", LB6, 8090), None, "the refused target");
        assert!(!gateway6_map(&lab).contains(LB6), "{}", gateway6_map(&lab));
        let status = std::fs::read_to_string(dir.join("state/state.toml")).expect("state");
        assert_eq!(status.matches("[[pinhole]]").count(), 2, "{status}");

        // Unpublished: its IPv6 forward goes and the internet no longer gets in.
        kubectl(kubeconfig, &["delete", "svc", "web"]);
        wait_until(&daemon, "web out of the gateway6 map", WAIT, || {
            !gateway6_map(&lab).contains(&format!("{NODE6} . tcp . 8080"))
        });
        assert_eq!(ask6(&lab, "tcp", NODE6, 8080), None, "open after unpublish");
        assert_eq!(ask6(&lab, "udp", NODE6, 8080), None, "open after unpublish");
        drop(daemon);
    });
}

/// The host's address toward the router changes (a new address, the old one deprecated, as
/// after the ISP renumbered and the router advertised the new prefix): the daemon finds it at
/// its next pass, closes the pinhole of the old address from that address, opens one to the
/// new address, and the ip6 DNAT follows: the internet reaches the Service on the new address
/// and no longer on the old one.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_new_host_address_moves_the_pinhole_and_the_relay_to_it() {
    const NEW_HOST6: &str = "2001:db8:77::11";
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    forwarding_on(&lab);
    let _web6 = echo6(&lab, "node", NODE6, 31080);
    let reaches_at = |ip: &str| {
        lab.ask("wan", "tcp", ip, 8080, "moved")
            .is_some_and(|answer| answer.ends_with("moved"))
    };
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        dual_node(fake);
        service(fake, "web", 8080, false);
        let config = config(dir, kubeconfig, "pcp");
        let daemon = Daemon::start(&config);
        wait_until(&daemon, "web on the first address", WAIT, || {
            reaches_at(HOST6)
        });
        assert_eq!(pinholes_on(&lab, 8080), 1, "{}", pinhole_rules(&lab));
        assert!(!reaches_at(NEW_HOST6), "the new address before it exists");

        for change in [
            vec![
                "ip",
                "-6",
                "addr",
                "add",
                "2001:db8:77::11/64",
                "dev",
                "lan0",
                "nodad",
            ],
            vec![
                "ip",
                "-6",
                "addr",
                "change",
                "2001:db8:77::10/64",
                "dev",
                "lan0",
                "preferred_lft",
                "0",
            ],
        ] {
            let out = lab.exec("lan", &change);
            assert!(out.status.success(), "{change:?}: {out:?}");
        }
        let took = wait_until(&daemon, "web on the new address", WAIT, || {
            reaches_at(NEW_HOST6)
        });
        println!(
            "BENCH ipv6_relay_moved_to_new_address_ms {}",
            took.as_millis()
        );
        wait_until(&daemon, "the old pinhole closed", WAIT, || {
            pinholes_on(&lab, 8080) == 0
        });
        assert!(!reaches_at(HOST6), "the old address still forwarded");
        assert!(
            pinhole_rules(&lab)
                .lines()
                .any(|l| l.contains("dport 8080 ")),
            "no pinhole for the new address: {}",
            pinhole_rules(&lab)
        );
        let log = daemon.log();
        assert!(
            log.contains("this host's IPv6 address toward the router changed"),
            "{log}"
        );
        drop(daemon);
    });
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn cleanup_deletes_the_pinholes_at_the_router_through_pcp() {
    cleanup_deletes_the_pinholes_through("pcp");
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn cleanup_deletes_the_pinholes_at_the_router_through_upnp() {
    cleanup_deletes_the_pinholes_through("upnp");
}
