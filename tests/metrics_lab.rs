//! `/metrics` and `/healthz` of a running `holepunch run` in the router lab, against
//! what the real router (miniupnpd 2.3.1, PCP) holds: the daemon and the fake Kubernetes API
//! run in the lab's LAN namespace (see `tests/support/daemon_lab.rs`), and the test scrapes
//! over HTTP from inside that namespace.
//!
//! Needs `promtool` (Debian package `prometheus`) besides what the other lab tests need.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bin::text;
use daemon_lab::{forwards_of, wait_until, with_daemon_in_lan};
use fake_api::FakeApi;
use lab::{Lab, ROUTER_WAN_IP};
use serde_json::json;

const PREFIX: &str = "hpm-";
/// The LoadBalancer IP (as MetalLB would announce it) on the lab's node host.
const LB_IP: &str = "192.168.77.100";
/// Where the daemon serves metrics, inside the LAN namespace.
const METRICS_ADDRESS: &str = "127.0.0.1:9473";

/// `GET path` from the daemon's metrics listener: status code and body; `(0, error)` while
/// nothing listens.
fn get(path: &str) -> (u16, String) {
    get_from(METRICS_ADDRESS, path, "*/*")
}

/// [`get`] with an `Accept` header.
fn get_accepting(path: &str, accept: &str) -> (u16, String) {
    get_from(METRICS_ADDRESS, path, accept)
}

/// `GET path` from `address`, with an `Accept` header.
fn get_from(address: &str, path: &str, accept: &str) -> (u16, String) {
    let attempt = || -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: {accept}\r\n\
             Connection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = text(&response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, body.to_owned()))
    };
    attempt().unwrap_or_else(|e| (0, e.to_string()))
}

fn scrape() -> String {
    get("/metrics").1
}

/// The value of one series (`name{labels}` exactly as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The sum of every series of `name` (all label values).
fn total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

const ACTIVE_TCP: &str = r#"holepunch_mappings{backend="pcp",protocol="tcp",state="active"}"#;
const ACTIVE_UDP: &str = r#"holepunch_mappings{backend="pcp",protocol="udp",state="active"}"#;
const ROUTER_UP: &str = "holepunch_router_up";
const LEASE_EXPIRY: &str = "holepunch_lease_expiry_seconds";

/// Two annotated Services on the LB IP: `web` TCP 8080 and `voice` UDP 8081.
fn two_services(fake: &FakeApi) {
    for (name, port, protocol) in [("web", 8080, "TCP"), ("voice", 8081, "UDP")] {
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": name, "namespace": "default",
                "annotations": {"holepunch/punch-external": "true"}
            },
            "spec": {
                "type": "LoadBalancer",
                "ports": [{"name": name, "port": port, "protocol": protocol}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
        }));
    }
}

/// `promtool check metrics` on `metrics`: its complaints, empty when it is content.
fn promtool_check(metrics: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (apt install prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ends");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if out.status.success() {
        said
    } else {
        format!("promtool failed ({}): {said}", out.status)
    }
}

/// The router's DNAT rules, one per mapping it holds.
fn router_mappings(lab: &Lab) -> usize {
    lab.router_forwards()
        .lines()
        .filter(|line| line.contains(" dnat "))
        .count()
}

/// PCP in relay mode with 120 s leases (miniupnpd's least): the metrics say what the router
/// holds and promtool accepts them; with the router's PCP port blocked, `/healthz` stays 200
/// ("retrying") while the leases hold, turns 503 once one ran out, and 200 again when the
/// router is back (rebooted: it announces itself and holepunch restores the mappings).
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn metrics_match_the_router_and_health_follows_the_leases() {
    let lab = Lab::up(PREFIX);
    let started = Instant::now();
    with_daemon_in_lan(
        &lab,
        "relay",
        "pcp",
        METRICS_ADDRESS,
        |fake, _kubeconfig, _config, daemon| {
            two_services(fake);
            wait_until(
                daemon,
                "/metrics to show 2 active mappings",
                Duration::from_secs(30),
                || {
                    let metrics = scrape();
                    sample(&metrics, ACTIVE_TCP) == Some(1.0)
                        && sample(&metrics, ACTIVE_UDP) == Some(1.0)
                },
            );
            let metrics = scrape();
            // What the router really holds: one DNAT per mapping, on the right ports.
            assert_eq!(
                forwards_of(&lab, 8080).len(),
                1,
                "{}",
                lab.router_forwards()
            );
            assert_eq!(
                forwards_of(&lab, 8081).len(),
                1,
                "{}",
                lab.router_forwards()
            );
            assert_eq!(
                total(&metrics, "holepunch_mappings") as usize,
                router_mappings(&lab),
                "metrics:\n{metrics}\nrouter:\n{}",
                lab.router_forwards()
            );
            assert_eq!(
                sample(
                    &metrics,
                    r#"holepunch_router_requests_total{backend="pcp",operation="map",result="ok"}"#
                ),
                Some(2.0),
                "{metrics}"
            );
            assert_eq!(
                sample(
                    &metrics,
                    &format!(
                        r#"holepunch_router_external_address_info{{backend="pcp",address="{ROUTER_WAN_IP}"}}"#
                    )
                ),
                Some(1.0),
                "{metrics}"
            );
            assert_eq!(sample(&metrics, ROUTER_UP), Some(1.0), "{metrics}");
            let left = sample(&metrics, LEASE_EXPIRY).expect("lease expiry");
            assert!(left > 90.0 && left <= 120.0, "{metrics}");
            assert_eq!(
                sample(&metrics, r#"holepunch_problems{kind="conflict"}"#),
                Some(0.0)
            );
            assert!(!metrics.contains("default/web"), "no label per Service");
            let complaints = promtool_check(&metrics);
            assert!(complaints.trim().is_empty(), "{complaints}\n{metrics}");
            // What Prometheus itself asks for: OpenMetrics, the same values.
            let openmetrics = get_accepting(
                "/metrics",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )
            .1;
            assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
            assert_eq!(sample(&openmetrics, ACTIVE_TCP), Some(1.0));

            let (code, reason) = get("/healthz");
            assert_eq!((code, reason.as_str()), (200, "ok: 2 mappings up\n"));

            // The router goes silent: PCP requests from this host are dropped.
            let block = lab.exec(
                "lan",
                &[
                    "nft",
                    "add table inet hpm_block; \
                     add chain inet hpm_block out { type filter hook output priority 0 ; } ; \
                     add rule inet hpm_block out udp dport 5351 drop",
                ],
            );
            assert!(block.status.success(), "{block:?}");
            let blocked = Instant::now();
            wait_until(
                daemon,
                "the router to be seen silent",
                Duration::from_secs(60),
                || sample(&scrape(), ROUTER_UP) == Some(0.0),
            );
            let (code, reason) = get("/healthz");
            let left = sample(&scrape(), LEASE_EXPIRY).expect("lease expiry");
            assert!(
                left > 0.0,
                "the lease should still hold; the test is too slow"
            );
            assert_eq!(code, 200, "{reason}");
            assert!(
                reason.starts_with("retrying: the router has not answered"),
                "{reason}"
            );

            let silent_for = wait_until(
                daemon,
                "/healthz to turn 503 once a lease ran out",
                Duration::from_secs_f64(left) + Duration::from_secs(30),
                || get("/healthz").0 == 503,
            );
            let (_, reason) = get("/healthz");
            assert!(reason.contains("leases ran out meanwhile"), "{reason}");
            assert_eq!(reason.lines().count(), 1, "{reason}");
            assert!(sample(&scrape(), LEASE_EXPIRY).is_some_and(|left| left <= 0.0));
            eprintln!(
                "/healthz turned 503 {:.1} s after the block ({:.1} s after the lease's end was due)",
                blocked.elapsed().as_secs_f64(),
                silent_for.as_secs_f64() - left
            );

            // The router comes back from a reboot and announces itself (RFC 6887 §14.1.3).
            let unblock = lab.exec("lan", &["nft", "delete table inet hpm_block"]);
            assert!(unblock.status.success(), "{unblock:?}");
            lab.restart_router();
            let back = wait_until(
                daemon,
                "/healthz to be 200 again",
                Duration::from_secs(30),
                || get("/healthz").0 == 200,
            );
            wait_until(
                daemon,
                "the mappings to be restored on the router",
                Duration::from_secs(30),
                || {
                    let metrics = scrape();
                    sample(&metrics, ACTIVE_TCP) == Some(1.0)
                        && sample(&metrics, ACTIVE_UDP) == Some(1.0)
                        && router_mappings(&lab) == 2
                },
            );
            assert_eq!(sample(&scrape(), ROUTER_UP), Some(1.0));
            eprintln!(
                "/healthz was 200 again {:.1} s after the router restarted",
                back.as_secs_f64()
            );
        },
    );
    eprintln!("the test took {:.1} s", started.elapsed().as_secs_f64());
}

/// The README's two alert rules, through `promtool test rules`: a mapping down for 5
/// minutes fires (not before), and leases about to run out while the router is silent fire
/// with the seconds left.
#[test]
fn readme_alert_rules_fire_as_documented() {
    let readme = std::fs::read_to_string(bin::repo("README.md")).expect("README.md");
    let rules = readme
        .split("```yaml\n")
        .filter_map(|block| block.split_once("```").map(|(yaml, _)| yaml))
        .find(|yaml| yaml.starts_with("groups:"))
        .expect("a ```yaml block with the alert rules in README.md");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rules.yml"), rules).expect("write rules");
    let series = |name: &str, labels: &str, values: &str| {
        format!(
            "      - series: '{name}{{instance=\"nas:9473\",job=\"holepunch\"{labels}}}'\n        values: '{values}'\n"
        )
    };
    let tests = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}{}{}{}\
         \x20   alert_rule_test:\n\
         \x20     - eval_time: 5m\n        alertname: HolepunchMappingDown\n        exp_alerts: []\n\
         \x20     - eval_time: 7m\n        alertname: HolepunchMappingDown\n        exp_alerts:\n\
         \x20         - exp_labels: {{instance: \"nas:9473\"}}\n\
         \x20           exp_annotations: {{summary: \"1 mappings are not up on the router for 5 minutes; see `holepunch status`\"}}\n\
         \x20     - eval_time: 1m\n        alertname: HolepunchLeasesExpiringRouterUnreachable\n        exp_alerts: []\n\
         \x20     - eval_time: 3m\n        alertname: HolepunchLeasesExpiringRouterUnreachable\n        exp_alerts:\n\
         \x20         - exp_labels: {{instance: \"nas:9473\", job: \"holepunch\"}}\n\
         \x20           exp_annotations: {{summary: \"the router does not answer and a lease runs out in 200 s\"}}\n",
        series(
            "holepunch_mappings",
            ",backend=\"pcp\",protocol=\"tcp\",state=\"failed\"",
            "0 1 1 1 1 1 1 1 1"
        ),
        series(
            "holepunch_mappings",
            ",backend=\"pcp\",protocol=\"tcp\",state=\"active\"",
            "2 1 1 1 1 1 1 1 1"
        ),
        // Silent from minute 1; the lease ends in 500 s, then 200 s.
        series("holepunch_router_up", "", "1 0 0 0 0"),
        series("holepunch_lease_expiry_seconds", "", "800 500 350 200 100"),
    );
    std::fs::write(dir.path().join("tests.yml"), tests).expect("write tests");
    let out = Command::new("promtool")
        .args(["test", "rules", "tests.yml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool runs (apt install prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Without a kubeconfig the daemon waits and renews nothing: `/healthz` says so, and turns
/// 503 when a lease recorded in the state file has run out meanwhile; `/metrics` shows the
/// recorded mappings from the start. (Loopback of this namespace only; no router involved.)
#[test]
fn healthz_while_waiting_for_the_cluster() {
    for (lapsed, code, reason) in [
        (false, 200, "waiting for the cluster: "),
        (
            true,
            503,
            "waiting for the cluster, and 1 leases ran out meanwhile: ",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("address").to_string()
        };
        let config = dir.path().join("holepunch.toml");
        std::fs::write(
            &config,
            format!(
                "[kubernetes]\nkubeconfig = \"{dir}/no-kubeconfig\"\n\n[router]\nbackend = \"pcp\"\n\
                 address = \"127.0.0.1\"\n\n[exposure]\nlan_address = \"127.0.0.1\"\n\n\
                 [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"{address}\"\n",
                dir = dir.path().display()
            ),
        )
        .expect("write config");
        let expires = if lapsed {
            jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60)
        } else {
            jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600)
        };
        let record = bin::state_record(8080, "pcp").replace(
            "status = \"active\"",
            &format!(
                "lifetime_secs = 3600\ngranted_at = \"{}\"\nexpires_at = \"{expires}\"\n\
                 status = \"active\"",
                expires - jiff::SignedDuration::from_secs(3600)
            ),
        );
        std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
        std::fs::write(
            dir.path().join("state/state.toml"),
            format!("version = 1\n\n{record}"),
        )
        .expect("write state");

        let daemon = bin::Daemon::start(&config);
        wait_until(
            &daemon,
            "/healthz to answer",
            Duration::from_secs(20),
            || get_from(&address, "/healthz", "*/*").0 != 0,
        );
        let (got_code, got_reason) = get_from(&address, "/healthz", "*/*");
        assert_eq!(got_code, code, "{got_reason}");
        assert!(
            got_reason.starts_with(reason) && got_reason.contains("kubeconfig"),
            "{got_reason}"
        );
        let metrics = get_from(&address, "/metrics", "*/*").1;
        assert_eq!(sample(&metrics, ACTIVE_TCP), Some(1.0), "{metrics}");
        let left = sample(&metrics, LEASE_EXPIRY).expect("lease expiry");
        assert_eq!(left < 0.0, lapsed, "{metrics}");
    }
}
