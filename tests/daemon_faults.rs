//! `holepunch run` while the Kubernetes API misbehaves: 410 Gone (and a relist that fails),
//! an API outage of 30 s, and a half-open watch.
//!
//! Real peers: the daemon runs on the LAN host of the router lab (prefix `hpx-`, miniupnpd
//! 2.3.1 in insecure mode so PCP may map to the LoadBalancer IP), talks PCP to miniupnpd,
//! and reads the in-test fake API (`tests/support/fake_api`) inside the same namespace.
//! Router calls are counted twice: every UDP packet to the router's PCP port (an nft counter
//! in the router's namespace, table `inet hpx_pcp_count`), and the daemon's debug log lines
//! `reconcile: mapped|renewed|restored|unmapped`. Leases are an hour and the router check
//! is hourly, so no renewal or verify falls inside a test: any call seen is a reaction to the
//! cluster.
//!
//! Each test brings its own lab (they run one after another, `Lab::up` serialises them) and
//! prints how long it took.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bin::{Daemon, status_json};
use daemon_lab::{forwards_of, kubectl, wait_until, with_fake_cluster_in};
use fake_api::FakeApi;
use lab::Lab;
use serde_json::{Value, json};
use tokio::runtime::Runtime;

const PREFIX: &str = "hpx-";
// The two slowest tests get labs of their own, so they run beside the others.
const OUTAGE_PREFIX: &str = "hpq-";
const HALF_OPEN_PREFIX: &str = "hpr-";
/// The LoadBalancer IP (as MetalLB would announce it) on the lab's node host.
const LB_IP: &str = "192.168.77.100";
/// Published from the start.
const WEB_PORT: u16 = 8080;
/// Published while the watch is in trouble (store changed directly).
const LATE_PORT: u16 = 8081;
/// Published with kubectl after a fault, to prove the watch works again.
const AFTER_PORT: u16 = 8082;
/// The daemon's watch timeout in the half-open test; its client read timeout is this plus
/// `holepunch::kube::READ_TIMEOUT_MARGIN_SECS`.
const SHORT_WATCH_TIMEOUT_SECS: u64 = 5;
/// How long the API stays away in the outage test (README.md, "Tests").
const OUTAGE_SECS: u64 = 30;
/// Issue 3: changes made during an outage are reconciled within this after the API returns.
const AFTER_OUTAGE_LIMIT_SECS: u64 = 30;
/// Slack for scheduling, backoff jitter and the debounce on a loaded 2-core machine.
const MARGIN_SECS: u64 = 10;
/// After a relist, how long the daemon has to show it would call the router (it would do so
/// within its 200 ms debounce).
const SETTLE_MS: u64 = 2_000;
/// How many Services requests fail (500) after the 410 in the failing-relist test.
const FAILED_LISTS: usize = 3;
const ROUTER_CALL_LINES: [&str; 4] = [
    "reconcile: mapped",
    "reconcile: renewed",
    "reconcile: restored",
    "reconcile: unmapped",
];

/// A LoadBalancer Service with the lab's LB IP and one TCP port, annotated or not.
fn service(name: &str, port: u16, annotated: bool) -> Value {
    let annotations = if annotated {
        json!({"holepunch/punch-external": "true"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}]
        },
        "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    })
}

fn config(dir: &Path, kubeconfig: &Path) -> PathBuf {
    let path = dir.join("holepunch.toml");
    let body = format!(
        "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n\
         [router]\nbackend = \"pcp\"\nlease_seconds = 3600\nverify_interval_seconds = 3600\n\n\
         [exposure]\nmode = \"direct\"\ntarget_cidrs = [\"{LB_IP}/32\"]\n\n\
         [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"\"\n\n\
         [log]\nformat = \"text\"\nlevel = \"info,holepunch=debug\"\n",
        dir = dir.display(),
        kubeconfig = kubeconfig.display()
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// `(owner, external port, status)` of every mapping in the daemon's state file.
fn recorded(config: &Path) -> Vec<(String, u64, String)> {
    let status = status_json(config);
    let mut rows: Vec<_> = status["mappings"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|m| {
                    (
                        m["owner"].as_str().unwrap_or("").to_owned(),
                        m["external_port"].as_u64().unwrap_or(0),
                        m["status"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort();
    rows
}

fn active(owner: &str, port: u16) -> (String, u64, String) {
    (owner.to_owned(), port.into(), "active".to_owned())
}

fn router_call_lines(daemon: &Daemon) -> usize {
    let log = daemon.log();
    ROUTER_CALL_LINES
        .iter()
        .map(|line| log.matches(line).count())
        .sum()
}

/// The fake API and the daemon in the lab's LAN namespace, with `default/web` published on
/// the router.
struct Published<'a> {
    lab: &'a Lab,
    runtime: &'a Runtime,
    fake: &'a FakeApi,
    kubeconfig: &'a Path,
    config: PathBuf,
    daemon: Daemon,
}

/// Runs `body` with [`Published`] set up inside the lab's LAN namespace; the daemon gets
/// `env`.
fn with_web_published(lab: &Lab, env: &[(&str, &str)], body: impl FnOnce(&Published) + Send) {
    lab.count_router_pcp_packets();
    with_fake_cluster_in(lab, "lan", |fake, dir, kubeconfig, runtime| {
        let config = config(dir, kubeconfig);
        fake.apply_object(service("web", WEB_PORT, true));
        fake.apply_object(service("late", LATE_PORT, false));
        fake.apply_object(service("after", AFTER_PORT, false));
        let daemon = Daemon::start_with_env(&config, env);
        wait_until(
            &daemon,
            "default/web mapped on the router and recorded",
            Duration::from_secs(20),
            || {
                forwards_of(lab, WEB_PORT).len() == 1
                    && recorded(&config) == [active("default/web", WEB_PORT)]
            },
        );
        let published = Published {
            lab,
            runtime,
            fake,
            kubeconfig,
            config,
            daemon,
        };
        body(&published);
        published.daemon.stop();
    });
}

impl Published<'_> {
    /// Annotates `default/after` with kubectl and waits for its mapping: the watch works.
    fn annotate_after_and_see_it_mapped(&self) -> Duration {
        let packets = self.lab.router_pcp_packets();
        kubectl(
            self.kubeconfig,
            &["annotate", "svc", "after", "holepunch/punch-external=true"],
        );
        let took = wait_until(
            &self.daemon,
            "default/after mapped after kubectl annotate",
            Duration::from_secs(10),
            || forwards_of(self.lab, AFTER_PORT).len() == 1,
        );
        assert!(
            self.lab.router_pcp_packets() > packets,
            "the counter counts"
        );
        took
    }
}

/// 410 Gone: every resourceVersion the daemon holds is compacted away and its watches are
/// cut; it relists Services, Nodes and EndpointSlices and, as nothing changed, makes no router
/// call. Then a kubectl change is still seen.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn gone_410_relists_and_makes_no_router_call_for_unchanged_services() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    let started = Instant::now();
    with_web_published(&lab, &[], |p| {
        let packets = p.lab.router_pcp_packets();
        let calls = router_call_lines(&p.daemon);
        p.fake.clear_requests();
        p.fake.compact();
        p.fake.drop_watches();

        let relisted = wait_until(
            &p.daemon,
            "a relist of Services, Nodes and EndpointSlices after 410 Gone",
            Duration::from_secs(20),
            || {
                let requests = p.fake.requests();
                let listed = |path: &str| {
                    requests
                        .iter()
                        .any(|r| r.method == "GET" && r.path == path && !r.is_watch())
                };
                listed("/api/v1/services")
                    && listed("/api/v1/nodes")
                    && listed("/apis/discovery.k8s.io/v1/endpointslices")
                    && p.fake.open_watches() == 3
            },
        );
        let requests = p.fake.requests();
        assert!(
            requests
                .iter()
                .any(|r| r.is_watch() && r.path == "/api/v1/services"),
            "the daemon first tried to resume its watch: {requests:#?}"
        );
        // NOTE: a reconcile follows the relist within the 200 ms debounce; give it time to
        // (wrongly) call the router.
        std::thread::sleep(Duration::from_millis(SETTLE_MS));
        assert_eq!(
            p.lab.router_pcp_packets(),
            packets,
            "no PCP packet after the relist"
        );
        assert_eq!(router_call_lines(&p.daemon), calls, "{}", p.daemon.log());
        assert_eq!(forwards_of(p.lab, WEB_PORT).len(), 1);
        assert_eq!(
            recorded(&p.config),
            [active("default/web", WEB_PORT)],
            "state file unchanged"
        );

        let took = p.annotate_after_and_see_it_mapped();
        eprintln!(
            "410: relisted and watching again in {relisted:?}; then annotate -> mapped in {took:?}"
        );
    });
    eprintln!("test took {:?} once its lab was up", started.elapsed());
}

/// 410 Gone and then the relist itself fails (500) a few times: the daemon keeps what it
/// knew, unmaps nothing and calls the router not once, and catches up when the list works.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn failing_relist_keeps_every_mapping_and_calls_no_router() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    let started = Instant::now();
    with_web_published(&lab, &[], |p| {
        let packets = p.lab.router_pcp_packets();
        let calls = router_call_lines(&p.daemon);
        p.fake.clear_requests();
        p.fake
            .fail_next_matching(FAILED_LISTS, 500, Some("GET"), Some("/api/v1/services"));
        p.fake.compact();
        p.fake.drop_watches();
        let recovered = wait_until(
            &p.daemon,
            "the Services relist to fail and then succeed",
            Duration::from_secs(40),
            || {
                let requests = p.fake.requests();
                let services = |r: &&fake_api::RecordedRequest| r.path == "/api/v1/services";
                let failed = requests
                    .iter()
                    .filter(services)
                    .filter(|r| r.status == 500)
                    .count();
                // Meanwhile the mapping stays on the router and in the state file.
                assert_eq!(forwards_of(p.lab, WEB_PORT).len(), 1, "{}", p.daemon.log());
                assert_eq!(p.lab.router_pcp_packets(), packets, "{}", p.daemon.log());
                failed == FAILED_LISTS
                    && requests
                        .iter()
                        .filter(services)
                        .any(|r| r.status == 200 && !r.is_watch())
                    && p.fake.open_watches() == 3
            },
        );
        std::thread::sleep(Duration::from_millis(SETTLE_MS));
        assert_eq!(p.lab.router_pcp_packets(), packets, "no PCP packet");
        assert_eq!(router_call_lines(&p.daemon), calls, "{}", p.daemon.log());
        assert_eq!(recorded(&p.config), [active("default/web", WEB_PORT)]);
        let took = p.annotate_after_and_see_it_mapped();
        eprintln!(
            "relist failed {FAILED_LISTS} times, watching again after {recovered:?}; then annotate -> mapped in {took:?}"
        );
    });
    eprintln!("test took {:?} once its lab was up", started.elapsed());
}

/// The API is away for 30 s: nothing is unmapped on the router or in the state file, and no
/// router call is made; a change made meanwhile (web unpublished, late published, straight in
/// the fake's store) is reconciled within 30 s of the API's return.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn api_down_30_s_removes_nothing_and_changes_apply_after_its_return() {
    let lab = Lab::up_with(OUTAGE_PREFIX, &["--insecure"]);
    let started = Instant::now();
    with_web_published(&lab, &[], |p| {
        let packets = p.lab.router_pcp_packets();
        p.runtime.block_on(p.fake.stop());
        let down = Instant::now();
        p.fake.apply_object(service("web", WEB_PORT, false));
        p.fake.apply_object(service("late", LATE_PORT, true));

        let mut checks = 0;
        while down.elapsed() < Duration::from_secs(OUTAGE_SECS) {
            assert_eq!(forwards_of(p.lab, WEB_PORT).len(), 1, "{}", p.daemon.log());
            assert_eq!(forwards_of(p.lab, LATE_PORT).len(), 0);
            assert_eq!(recorded(&p.config), [active("default/web", WEB_PORT)]);
            assert_eq!(
                p.lab.router_pcp_packets(),
                packets,
                "no router call while the API is away"
            );
            checks += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(
            p.daemon
                .log()
                .contains("cluster watch interrupted, retrying with backoff"),
            "the daemon noticed the outage: {}",
            p.daemon.log()
        );

        p.runtime.block_on(p.fake.restart());
        let took = wait_until(
            &p.daemon,
            "the changes made during the outage on the router",
            Duration::from_secs(AFTER_OUTAGE_LIMIT_SECS),
            || forwards_of(p.lab, WEB_PORT).is_empty() && forwards_of(p.lab, LATE_PORT).len() == 1,
        );
        wait_until(
            &p.daemon,
            "the state file to follow",
            Duration::from_secs(5),
            || recorded(&p.config) == [active("default/late", LATE_PORT)],
        );
        eprintln!(
            "API down {OUTAGE_SECS} s ({checks} checks: nothing removed); changes applied {took:?} after its return"
        );
    });
    eprintln!("test took {:?} once its lab was up", started.elapsed());
}

/// Half-open watches: the API keeps the connections open and sends nothing. With a 5 s watch
/// timeout the daemon's read timeout (15 s) ends them and it watches again, so a change made
/// meanwhile is seen within the read timeout plus a margin.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn half_open_watch_recovers_within_the_watch_timeout() {
    let lab = Lab::up_with(HALF_OPEN_PREFIX, &["--insecure"]);
    let started = Instant::now();
    let timeout = SHORT_WATCH_TIMEOUT_SECS.to_string();
    let env = [(holepunch::kube::WATCH_TIMEOUT_ENV, timeout.as_str())];
    with_web_published(&lab, &env, |p| {
        p.fake.set_hang_watches(true);
        p.fake.clear_requests();
        p.fake.drop_watches();
        wait_until(
            &p.daemon,
            "the daemon's three watches to be open and hung",
            Duration::from_secs(20),
            || {
                p.fake.requests().iter().filter(|r| r.is_watch()).count() >= 3
                    && p.fake.open_watches() == 3
            },
        );
        // New watches are answered again; the hung ones stay silent.
        p.fake.set_hang_watches(false);
        let watches_before = service_watches(p.fake);
        let hung = Instant::now();
        p.fake.apply_object(service("late", LATE_PORT, true));
        let limit = SHORT_WATCH_TIMEOUT_SECS + holepunch::kube::READ_TIMEOUT_MARGIN_SECS as u64;
        let took = wait_until(
            &p.daemon,
            "the change behind a half-open watch on the router",
            Duration::from_secs(limit + MARGIN_SECS),
            || forwards_of(p.lab, LATE_PORT).len() == 1,
        );
        assert!(
            service_watches(p.fake) > watches_before,
            "seen through a new watch"
        );
        assert_eq!(
            forwards_of(p.lab, WEB_PORT).len(),
            1,
            "nothing else touched"
        );
        eprintln!(
            "half-open watch: change seen {took:?} after it was made (read timeout {limit} s); {:?} since the hang",
            hung.elapsed()
        );
    });
    eprintln!("test took {:?} once its lab was up", started.elapsed());
}

fn service_watches(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.is_watch() && r.path == "/api/v1/services")
        .count()
}
