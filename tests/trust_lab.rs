//! The trust rules of README "Security model", tried as a hostile tenant would: the daemon
//! with the SHIPPED `etc/holepunch.toml` (plus only the lab's kubeconfig, router address,
//! state path, metrics off and text logs), relay mode, PCP through miniupnpd, the cluster
//! served by the in-test fake API, traffic from the lab's internet namespace.
//!
//! One test per attack; each also proves in the same run that a normal Service is published
//! and reachable from the internet, so no test passes because nothing works. Event texts are
//! read as the tenant reads them (`kubectl get events`): they never name another namespace's
//! Service or a LAN host's address.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bin::{Daemon, repo, status_json};
use daemon_lab::{
    forwards_of, kubectl, wait_for_first_reconcile, wait_until, with_fake_cluster_in,
};
use fake_api::FakeApi;
use lab::{LAN_IP, Lab, NODE_IP, ROUTER_LAN_IP, ROUTER_WAN_IP, WAN_CLIENT_IP};
use serde_json::{Value, json};

const PREFIX: &str = "hpa-";
/// The normal Service: home/normal, port 9090 through the node's nodePort 31090.
const NORMAL_PORT: u16 = 9090;
const NORMAL_NODE_PORT: u16 = 31090;
/// miniupnpd's HTTP port in the lab (tests/lab/router-lab: http_port=5000): the UPnP
/// control page a tenant would like to publish.
const ROUTER_UPNP_PORT: u16 = 5000;
const SETTLE: Duration = Duration::from_secs(30);

/// The shipped config, with only what the lab needs changed.
fn shipped_config(dir: &Path, kubeconfig: &Path) -> PathBuf {
    let shipped = std::fs::read_to_string(repo("etc/holepunch.toml")).expect("etc/holepunch.toml");
    let mut text = shipped.clone();
    for (from, to) in [
        (
            "#kubeconfig = \"/etc/holepunch/kubeconfig\"".to_owned(),
            format!("kubeconfig = \"{}\"", kubeconfig.display()),
        ),
        (
            "#address = \"192.168.1.1\"".to_owned(),
            format!("address = \"{ROUTER_LAN_IP}\""),
        ),
        (
            "path = \"/var/lib/holepunch/state.toml\"".to_owned(),
            format!("path = \"{}/state/state.toml\"", dir.display()),
        ),
        (
            "listen = \"127.0.0.1:9473\"".to_owned(),
            "listen = \"\"".to_owned(),
        ),
        // The test reads the daemon's log file (not journald).
        (
            "format = \"auto\"".to_owned(),
            "format = \"text\"".to_owned(),
        ),
    ] {
        assert!(text.contains(&from), "the shipped config lost {from:?}");
        text = text.replacen(&from, &to, 1);
    }
    // Everything a tenant could abuse stays as shipped.
    for shipped_line in [
        "mode = \"relay\"",
        "target_cidrs = []",
        "max_per_service = 16",
        "backend = \"auto\"",
    ] {
        assert!(text.contains(shipped_line), "{shipped_line} is not shipped");
    }
    let path = dir.join("holepunch.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A Ready node at the lab's node host.
fn node(fake: &FakeApi) {
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": NODE_IP}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }));
}

/// home/normal: annotated NodePort Service, port 9090 -> nodePort 31090.
fn normal_service(fake: &FakeApi) {
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "normal", "namespace": "home",
                     "annotations": {"holepunch/punch-external": "true"}},
        "spec": {"type": "NodePort", "ports": [
            {"name": "web", "port": NORMAL_PORT, "protocol": "TCP", "nodePort": NORMAL_NODE_PORT}
        ]}
    }));
}

/// An annotated LoadBalancer Service in namespace `tenant` whose ingress IP the tenant chose
/// (kube-vip, Cilium LB-IPAM and MetalLB annotations let them). `node_port`: `None` asks for
/// none (`allocateLoadBalancerNodePorts: false`).
fn tenant_lb_service(
    fake: &FakeApi,
    name: &str,
    ingress: &str,
    port: u16,
    node_port: Option<u16>,
    annotations: Value,
) {
    let mut annotations = annotations;
    annotations["holepunch/punch-external"] = json!("true");
    let mut port_spec = json!({"name": "p", "port": port, "protocol": "TCP"});
    if let Some(node_port) = node_port {
        port_spec["nodePort"] = json!(node_port);
    }
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "tenant", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": node_port.is_some(),
                 "ports": [port_spec]},
        "status": {"loadBalancer": {"ingress": [{"ip": ingress}]}}
    }));
}

/// Every Event the cluster holds: (namespace, object name, type, reason, message).
fn events(kubeconfig: &Path) -> Vec<(String, String, String, String, String)> {
    let listed = kubectl(kubeconfig, &["get", "events", "-A", "-o", "json"]);
    let listed: Value = serde_json::from_str(&listed).unwrap_or_default();
    listed["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| {
                    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                    (
                        s(&e["involvedObject"]["namespace"]),
                        s(&e["involvedObject"]["name"]),
                        s(&e["type"]),
                        s(&e["reason"]),
                        s(&e["message"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The message of the `reason` Event on `namespace/name`, once there is one.
fn wait_for_event(
    daemon: &Daemon,
    kubeconfig: &Path,
    namespace: &str,
    name: &str,
    reason: &str,
) -> String {
    let mut found = String::new();
    wait_until(
        daemon,
        &format!("a {reason} Event on {namespace}/{name}"),
        SETTLE,
        || {
            found = events(kubeconfig)
                .into_iter()
                .find(|e| e.0 == namespace && e.1 == name && e.3 == reason)
                .map(|e| e.4)
                .unwrap_or_default();
            !found.is_empty()
        },
    );
    found
}

/// No Event a tenant can read names a LAN host's address (not even the Service's own target:
/// it may be a node's) or another namespace's Service.
fn assert_events_are_tenant_safe(kubeconfig: &Path, others: &[&str]) {
    let all = events(kubeconfig);
    assert!(
        all.iter().any(|e| e.2 == "Warning") && all.iter().any(|e| e.2 == "Normal"),
        "no Warning and Published Event to check: {all:#?}"
    );
    for (namespace, name, kind, reason, message) in all {
        assert!(
            !message.contains("192.168.77."),
            "{namespace}/{name} {kind} {reason}: a LAN address in {message:?}"
        );
        for other in others {
            assert!(
                !message.contains(other),
                "{namespace}/{name} {reason}: {other:?} in {message:?}"
            );
        }
    }
}

/// The lab's nftables DNAT of holepunch in the LAN namespace.
fn holepunch_table(lab: &Lab) -> String {
    let out = lab.exec("lan", &["nft", "list", "table", "inet", "holepunch"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An HTTP GET from namespace `ns`; the status line, or `None`.
fn http_get(lab: &Lab, ns: &str, ip: &str, port: u16, path: &str) -> Option<String> {
    let script = "import sys, urllib.request\n\
                  r = urllib.request.urlopen('http://%s:%s%s' % (sys.argv[1], sys.argv[2], sys.argv[3]), timeout=2)\n\
                  print(r.status, r.read(200).decode(errors='replace').replace('\\n', ' '))";
    let out = lab.exec(
        ns,
        &[lab::python(), "-c", script, ip, &port.to_string(), path],
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The lab up, relay forwarding on, the node's nodePort server, the shipped config; `body`
/// gets the lab, the fake API, the kubeconfig, the config and the daemon, after the normal
/// Service is reachable from the internet.
fn attack(body: impl FnOnce(&Lab, &FakeApi, &Path, &Path, &mut Option<Daemon>) + Send) {
    let lab = Lab::up(PREFIX);
    let sysctl = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(sysctl.status.success(), "{sysctl:?}");
    let _normal = lab.echo_server("node", NODE_IP, NORMAL_NODE_PORT);
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        let config = shipped_config(dir, kubeconfig);
        node(fake);
        normal_service(fake);
        let mut daemon = Some(Daemon::start(&config));
        if let Some(daemon) = &daemon {
            wait_for_first_reconcile(daemon, SETTLE);
            assert_normal_is_published(&lab, daemon);
        }
        body(&lab, fake, kubeconfig, &config, &mut daemon);
        // Still there after the attack.
        if let Some(daemon) = &daemon {
            assert_normal_is_published(&lab, daemon);
        }
    });
}

fn assert_normal_is_published(lab: &Lab, daemon: &Daemon) {
    wait_until(
        daemon,
        "home/normal reachable from the internet",
        SETTLE,
        || {
            lab.ask("wan", "tcp", ROUTER_WAN_IP, NORMAL_PORT, "hi")
                .is_some()
        },
    );
    // Relayed: the node sees this host's address (masquerade).
    assert_eq!(
        lab.ask("wan", "tcp", ROUTER_WAN_IP, NORMAL_PORT, "hi")
            .as_deref(),
        Some(format!("{LAN_IP} hi").as_str())
    );
}

/// A LoadBalancer IP = the router's LAN address, on the router's UPnP port: refused with an
/// Event; the router's page stays off the internet.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn load_balancer_ip_of_the_router_is_refused() {
    attack(|lab, fake, kubeconfig, _, daemon| {
        let daemon = daemon.as_ref().expect("daemon");
        // The page is there, on the LAN.
        let page = http_get(lab, "lan", ROUTER_LAN_IP, ROUTER_UPNP_PORT, "/rootDesc.xml");
        assert!(
            page.as_deref().is_some_and(|p| p.starts_with("200")),
            "{page:?}"
        );

        tenant_lb_service(
            fake,
            "evil",
            ROUTER_LAN_IP,
            ROUTER_UPNP_PORT,
            None,
            json!({}),
        );
        let said = wait_for_event(daemon, kubeconfig, "tenant", "evil", "TargetNotAllowed");
        assert!(said.contains("exposure.target_cidrs"), "{said}");
        assert_eq!(
            http_get(lab, "wan", ROUTER_WAN_IP, ROUTER_UPNP_PORT, "/rootDesc.xml"),
            None,
            "the router's UPnP page reached the internet"
        );
        assert!(
            forwards_of(lab, ROUTER_UPNP_PORT).is_empty(),
            "{}",
            lab.router_forwards()
        );
        assert!(
            !holepunch_table(lab).contains(&format!(": {ROUTER_LAN_IP} .")),
            "{}",
            holepunch_table(lab)
        );
        // The operator's log says why.
        assert!(
            daemon.log().contains(&format!(
                "load balancer IP {ROUTER_LAN_IP}: it is an address of the router"
            )),
            "{}",
            daemon.log()
        );
        assert_events_are_tenant_safe(kubeconfig, &["home/", "normal"]);
    });
}

/// A LoadBalancer IP = the holepunch host's own address, remapped to an external port
/// nothing listens on: refused; the host's private port stays private.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn load_balancer_ip_of_the_holepunch_host_is_refused() {
    attack(|lab, fake, kubeconfig, _, daemon| {
        let daemon = daemon.as_ref().expect("daemon");
        // A private service of the host, on its LAN address.
        let _private = lab.echo_server("lan", LAN_IP, 7777);
        assert!(lab.ask("node", "tcp", LAN_IP, 7777, "lan").is_some());

        tenant_lb_service(
            fake,
            "evil",
            LAN_IP,
            7777,
            None,
            json!({"holepunch.port/7777": "17777"}),
        );
        let said = wait_for_event(daemon, kubeconfig, "tenant", "evil", "TargetNotAllowed");
        assert!(!said.contains(LAN_IP), "{said}");
        assert_eq!(lab.ask("wan", "tcp", ROUTER_WAN_IP, 17777, "steal"), None);
        assert!(
            forwards_of(lab, 17777).is_empty(),
            "{}",
            lab.router_forwards()
        );
        assert!(
            daemon
                .log()
                .contains("it is an address of the holepunch host"),
            "{}",
            daemon.log()
        );
        assert_events_are_tenant_safe(kubeconfig, &["home/", "normal"]);
    });
}

/// A LoadBalancer IP = a LAN device (the NAS on the lab's node host), with the shipped empty
/// target_cidrs: with a nodePort the Service goes through the node's nodePort instead (and is
/// told); without one it is refused. The NAS's page never reaches the internet.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn load_balancer_ip_of_a_lan_nas_falls_back_to_the_node_port_or_is_refused() {
    attack(|lab, fake, kubeconfig, _, daemon| {
        let daemon = daemon.as_ref().expect("daemon");
        let _nas = lab.echo_server("node", NODE_IP, 5001);
        let _nas2 = lab.echo_server("node", NODE_IP, 5002);
        let _node_port = lab.echo_server("node", NODE_IP, 31501);

        tenant_lb_service(fake, "nas", NODE_IP, 5001, Some(31501), json!({}));
        tenant_lb_service(fake, "nas2", NODE_IP, 5002, None, json!({}));
        let said = wait_for_event(daemon, kubeconfig, "tenant", "nas", "TargetFallback");
        assert!(said.contains("nodePort 31501"), "{said}");
        wait_for_event(daemon, kubeconfig, "tenant", "nas2", "TargetNotAllowed");
        // The fallback carries traffic, to the nodePort and not to the NAS's port.
        wait_until(daemon, "tenant/nas through its nodePort", SETTLE, || {
            lab.ask("wan", "tcp", ROUTER_WAN_IP, 5001, "x").is_some()
        });
        let table = holepunch_table(lab);
        assert!(
            table.contains(&format!("tcp . 5001 : {NODE_IP} . 31501")),
            "{table}"
        );
        assert!(!table.contains(&format!("{NODE_IP} . 5001")), "{table}");
        assert_eq!(lab.ask("wan", "tcp", ROUTER_WAN_IP, 5002, "nas"), None);
        assert!(
            forwards_of(lab, 5002).is_empty(),
            "{}",
            lab.router_forwards()
        );
        assert_events_are_tenant_safe(kubeconfig, &["home/", "normal"]);
    });
}

/// A Service created earlier cannot take a live port from its holder, not even across a
/// daemon restart (the state file says who holds what); when the holder lets go, it gets it.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_live_port_stays_with_its_holder_across_a_restart() {
    attack(|lab, fake, kubeconfig, config, daemon| {
        let _old = lab.echo_server("node", NODE_IP, 31801);
        let _young = lab.echo_server("node", NODE_IP, 31802);
        let service = |ns: &str, name: &str, node_port: u16, annotated: bool| {
            let annotations = if annotated {
                json!({"holepunch/punch-external": "true"})
            } else {
                json!({})
            };
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                "spec": {"type": "NodePort", "ports": [
                    {"name": "web", "port": 8080, "protocol": "TCP", "nodePort": node_port}
                ]}
            })
        };
        // a/old is created first, but not published yet.
        fake.apply_object(service("a", "old", 31801, false));
        std::thread::sleep(Duration::from_millis(1100));
        fake.apply_object(service("b", "young", 31802, true));
        let mapped_to = |lab: &Lab, node_port: u16| {
            holepunch_table(lab).contains(&format!("tcp . 8080 : {NODE_IP} . {node_port}"))
        };
        {
            let running = daemon.as_ref().expect("daemon");
            wait_until(running, "b/young to hold 8080", SETTLE, || {
                mapped_to(lab, 31802) && !forwards_of(lab, 8080).is_empty()
            });
            // Now the older Service asks for the same port.
            fake.apply_object(service("a", "old", 31801, true));
            let said = wait_for_event(running, kubeconfig, "a", "old", "PortConflict");
            assert!(said.contains("held by another Service"), "{said}");
            assert!(mapped_to(lab, 31802), "{}", holepunch_table(lab));
            assert!(
                running.log().contains("held by b/young"),
                "the operator's log names the holder: {}",
                running.log()
            );
        }
        // Restart: the state file says who holds 8080.
        let log = daemon.take().expect("daemon").stop();
        assert!(log.contains("stopping"), "{log}");
        let held: Vec<String> = status_json(config)["mappings"]
            .as_array()
            .expect("mappings")
            .iter()
            .filter(|m| m["external_port"] == 8080)
            .map(|m| m["owner"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(held, ["b/young"]);
        let restarted = Daemon::start(config);
        wait_for_first_reconcile(&restarted, SETTLE);
        std::thread::sleep(Duration::from_secs(2));
        assert!(mapped_to(lab, 31802), "{}", holepunch_table(lab));
        assert!(!mapped_to(lab, 31801), "{}", holepunch_table(lab));
        let held: Vec<String> = status_json(config)["mappings"]
            .as_array()
            .expect("mappings")
            .iter()
            .filter(|m| m["external_port"] == 8080)
            .map(|m| m["owner"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(held, ["b/young"], "after the restart");

        // The holder lets go: the next claimant gets the port.
        kubectl(kubeconfig, &["delete", "svc", "young", "-n", "b"]);
        wait_until(&restarted, "a/old to get 8080", SETTLE, || {
            mapped_to(lab, 31801)
        });
        wait_until(&restarted, "8080 reachable again", SETTLE, || {
            lab.ask("wan", "tcp", ROUTER_WAN_IP, 8080, "old").is_some()
        });
        assert_events_are_tenant_safe(kubeconfig, &["b/young", "young", "home/"]);
        *daemon = Some(restarted);
    });
}

/// One Service asking for 64 ports gets its lowest 16 (ports.max_per_service) and one Event
/// naming the limit and the key that raises it.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_service_asking_for_64_ports_gets_16() {
    attack(|lab, fake, kubeconfig, _, daemon| {
        let daemon = daemon.as_ref().expect("daemon");
        let ports: Vec<Value> = (0..64u16)
            .map(|i| json!({"name": format!("p{i}"), "port": 20000 + i, "protocol": "TCP"}))
            .collect();
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "greedy", "namespace": "tenant",
                         "annotations": {"holepunch/punch-external": "true"}},
            "spec": {"type": "NodePort", "ports": ports}
        }));
        let said = wait_for_event(daemon, kubeconfig, "tenant", "greedy", "OverQuota");
        assert!(said.contains("48 external port(s) not published"), "{said}");
        assert!(said.contains("ports.max_per_service"), "{said}");
        let mapped = || {
            lab.router_forwards()
                .lines()
                .filter(|l| (20000..20064).any(|p| l.contains(&format!("dport {p} "))))
                .count()
        };
        wait_until(daemon, "16 router mappings", SETTLE, || mapped() == 16);
        for port in [20000u16, 20015] {
            assert!(!forwards_of(lab, port).is_empty(), "{port}");
        }
        for port in [20016u16, 20063] {
            assert!(forwards_of(lab, port).is_empty(), "{port}");
        }
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(mapped(), 16);
        assert_events_are_tenant_safe(kubeconfig, &["home/"]);
    });
}

/// A Service on a port this host listens on (node-exporter on 9100) is refused: publishing
/// it would expose the host's own service; LAN clients keep reaching it.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_port_the_host_listens_on_is_refused() {
    attack(|lab, fake, kubeconfig, _, daemon| {
        let daemon = daemon.as_ref().expect("daemon");
        let _exporter = lab.echo_server("lan", "0.0.0.0", 9100);
        let _node_port = lab.echo_server("node", NODE_IP, 31910);
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "exporter", "namespace": "tenant",
                         "annotations": {"holepunch/punch-external": "true"}},
            "spec": {"type": "NodePort", "ports": [
                {"name": "m", "port": 9100, "protocol": "TCP", "nodePort": 31910}
            ]}
        }));
        let said = wait_for_event(daemon, kubeconfig, "tenant", "exporter", "PortInUse");
        assert!(said.contains("holepunch.port/9100"), "{said}");
        assert!(
            forwards_of(lab, 9100).is_empty(),
            "{}",
            lab.router_forwards()
        );
        assert_eq!(lab.ask("wan", "tcp", ROUTER_WAN_IP, 9100, "scrape"), None);
        // The LAN still reaches the host's own exporter, not a Service.
        assert_eq!(
            lab.ask("node", "tcp", LAN_IP, 9100, "lan").as_deref(),
            Some(format!("{NODE_IP} lan").as_str())
        );
        // The same Service on another external port is published.
        kubectl(
            kubeconfig,
            &[
                "annotate",
                "svc",
                "exporter",
                "-n",
                "tenant",
                "holepunch.port/9100=19100",
            ],
        );
        wait_until(daemon, "tenant/exporter on 19100", SETTLE, || {
            lab.ask("wan", "tcp", ROUTER_WAN_IP, 19100, "ok").as_deref()
                == Some(format!("{LAN_IP} ok").as_str())
        });
        assert!(!said.contains(WAN_CLIENT_IP));
        assert_events_are_tenant_safe(kubeconfig, &["home/"]);
    });
}
