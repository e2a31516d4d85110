//! Benchmark of the Kubernetes side, not a timed test: it prints a
//! table (and `BENCH` lines for `scripts/bench`) and asserts only that the daemon did its job.
//!
//! ```text
//! cargo test --test cluster_bench -- --ignored --nocapture
//! ```
//!
//! (root, the router lab's prerequisites; it uses lab prefix `hpj-`.) The daemon runs on the
//! lab's LAN host against the in-test fake API holding 10,000 Services, 200 of them
//! annotated (LoadBalancer Services, `direct` mode, PCP to miniupnpd in insecure mode), and:
//! - resident memory: `VmRSS` (and the peak, `VmHWM`) of the daemon's process once the 200
//!   mappings are live and again after the latency runs;
//! - latency: from just before `kubectl annotate` starts to the PCP request leaving the
//!   daemon's host (tcpdump's kernel timestamp on the LAN host), over [`RUNS`] Services, one
//!   at a time, each awaited on the router.
//!
//! Leases of an hour and an hourly router check keep every other PCP packet out of the runs.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;
#[path = "support/measure.rs"]
mod measure;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bin::{Daemon, status_json};
use daemon_lab::{kubectl, wait_until, with_fake_cluster_in};
use lab::Lab;
use measure::{memory_kib, percentile, report};
use serde_json::json;

const PREFIX: &str = "hpj-";
const LB_IP: &str = "192.168.77.100";
const SERVICES: usize = 10_000;
const PUBLISHED: usize = 200;
/// Annotate-to-request runs (one Service each).
const RUNS: usize = 20;
const PUBLISHED_FIRST_PORT: u16 = 20_000;
const RUN_FIRST_PORT: u16 = 21_000;
const PUBLISH_ALL_LIMIT_SECS: u64 = 180;
/// Lets the daemon's allocations settle (Events, status writes) before memory is read.
const SETTLE_SECS: u64 = 5;

fn load_balancer(name: &str, port: u16, annotated: bool) -> serde_json::Value {
    let annotations = if annotated {
        json!({"holepunch/punch-external": "true"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    })
}

/// A Service nobody publishes, as most of a cluster's are.
fn cluster_ip(index: usize) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": format!("internal-{index}"),
            "namespace": format!("team-{}", index % 50),
            "labels": {"app": format!("app-{index}")}
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": format!("app-{index}")},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
        }
    })
}

fn config(dir: &Path, kubeconfig: &Path) -> std::path::PathBuf {
    let path = dir.join("holepunch.toml");
    let body = format!(
        "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n\
         [router]\nbackend = \"pcp\"\nlease_seconds = 3600\nverify_interval_seconds = 3600\n\n\
         [exposure]\nmode = \"direct\"\ntarget_cidrs = [\"{LB_IP}/32\"]\n\n\
         [ports]\nmax_per_namespace = {quota}\nmax_total = {quota}\n\n\
         [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"\"\n\n\
         [log]\nformat = \"text\"\nlevel = \"info\"\n",
        dir = dir.display(),
        kubeconfig = kubeconfig.display(),
        // Room for every published Service (the default quotas are 32 per namespace, 128).
        quota = PUBLISHED + RUNS,
    );
    std::fs::write(&path, body).expect("write config");
    path
}

fn active_mappings(config: &Path) -> usize {
    status_json(config)["mappings"]
        .as_array()
        .map(|all| all.iter().filter(|m| m["status"] == "active").count())
        .unwrap_or(0)
}

/// Kernel timestamps (seconds since the epoch) of PCP packets on the LAN host: requests
/// leaving it (`true`) and the router's answers (`false`).
struct Capture {
    child: std::process::Child,
    packets: Arc<Mutex<Vec<(f64, bool)>>>,
}

impl Capture {
    fn start() -> Capture {
        let mut child = Command::new("tcpdump")
            .args(["-i", "any", "-n", "-l", "-tt", "udp", "and", "port", "5351"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tcpdump runs");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        // tcpdump says "listening on any ..." once it captures.
        let mut said = String::new();
        while !said.contains("listening on") {
            let read = stderr.read_line(&mut said).expect("tcpdump starts");
            assert!(read > 0, "tcpdump stopped: {said}");
        }
        let packets = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&packets);
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        std::thread::spawn(move || {
            // `1795599236.264445 lan0  Out IP 192.168.77.10.50751 > 192.168.77.1.5351: UDP, ...`
            for line in stdout.lines().map_while(Result::ok) {
                let words: Vec<&str> = line.split_whitespace().collect();
                let stamp = words.first().and_then(|t| t.parse::<f64>().ok());
                let to = words
                    .iter()
                    .position(|w| *w == ">")
                    .and_then(|i| words.get(i + 1));
                if let (Some(stamp), Some(to)) = (stamp, to) {
                    let request = to.ends_with(".5351:");
                    sink.lock().expect("packets").push((stamp, request));
                }
            }
        });
        Capture { child, packets }
    }

    /// The first request that left at or after `after` (seconds since the epoch), waiting up
    /// to [`CAPTURE_FLUSH_SECS`] for tcpdump to hand it over.
    fn first_after(&self, after: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(CAPTURE_FLUSH_SECS);
        loop {
            let found = self
                .packets
                .lock()
                .expect("packets")
                .iter()
                .find(|&&(t, request)| request && t >= after)
                .map(|&(t, _)| t);
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exchanges so far: (request sent, answer received), seconds since the epoch.
    fn exchanges(&self) -> Vec<(f64, f64)> {
        let mut asked = None;
        let mut exchanges = Vec::new();
        for &(t, request) in self.packets.lock().expect("packets").iter() {
            match (request, asked) {
                (true, _) => asked = Some(t),
                (false, Some(at)) => {
                    exchanges.push((at, t));
                    asked = None;
                }
                (false, None) => {}
            }
        }
        exchanges
    }

    /// The exchanges once at least `count` have been read from tcpdump: its output reaches
    /// this process a little after the daemon saw the answers, so the count is read again
    /// until it holds or [`CAPTURE_FLUSH_SECS`] pass (then the caller's assertion says so).
    fn exchanges_at_least(&self, count: usize) -> Vec<(f64, f64)> {
        let deadline = Instant::now() + Duration::from_secs(CAPTURE_FLUSH_SECS);
        loop {
            let exchanges = self.exchanges();
            if exchanges.len() >= count || Instant::now() >= deadline {
                return exchanges;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How long the capture may take to hand over packets already on the wire.
const CAPTURE_FLUSH_SECS: u64 = 10;

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn epoch_secs(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[test]
#[ignore = "benchmark: cargo test --test cluster_bench -- --ignored --nocapture"]
fn cluster_bench_memory_with_10000_services_and_annotate_to_pcp_request() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        let config = config(dir, kubeconfig);

        let loading = Instant::now();
        for i in 0..PUBLISHED {
            fake.apply_object(load_balancer(
                &format!("published-{i}"),
                PUBLISHED_FIRST_PORT + i as u16,
                true,
            ));
        }
        for i in 0..RUNS {
            fake.apply_object(load_balancer(
                &format!("bench-{i}"),
                RUN_FIRST_PORT + i as u16,
                false,
            ));
        }
        for i in 0..SERVICES - PUBLISHED - RUNS {
            fake.apply_object(cluster_ip(i));
        }
        assert_eq!(fake.objects("Service").len(), SERVICES);
        eprintln!(
            "fake API loaded with {SERVICES} Services in {:?}",
            loading.elapsed()
        );

        let capture = Capture::start();
        let router_cpu = lab.router_cpu_secs();
        let started = Instant::now();
        let started_at = SystemTime::now();
        let daemon = Daemon::start(&config);
        wait_until(
            &daemon,
            "the 200 annotated Services to be mapped",
            Duration::from_secs(PUBLISH_ALL_LIMIT_SECS),
            || active_mappings(&config) == PUBLISHED,
        );
        let to_published = started.elapsed();
        // The router's answers take its CPU (miniupnpd's nftables backend reads its whole
        // chain for each MAP) plus its wait for a CPU on a shared machine.
        let router_cpu_secs = lab.router_cpu_secs() - router_cpu;
        let exchanges = capture.exchanges_at_least(PUBLISHED);
        assert_eq!(exchanges.len(), PUBLISHED, "one PCP exchange per mapping");
        let router_answers_ms: Vec<f64> = exchanges
            .iter()
            .map(|(asked, answered)| (answered - asked) * 1e3)
            .collect();
        let waiting_for_router_secs = router_answers_ms.iter().sum::<f64>() / 1e3;
        // holepunch's own time: start -> first request, and each answer -> next request
        // (recording the result, saving the state, planning the next one).
        let started_epoch = epoch_secs(started_at);
        let first_request_secs = exchanges[0].0 - started_epoch;
        let between_requests: Vec<f64> = exchanges
            .windows(2)
            .map(|pair| (pair[1].0 - pair[0].1) * 1e3)
            .collect();
        let between_secs = between_requests.iter().sum::<f64>() / 1e3;
        let mut longest: Vec<(usize, f64)> = between_requests.iter().copied().enumerate().collect();
        longest.sort_by(|a, b| b.1.total_cmp(&a.1));
        longest.truncate(8);
        eprintln!("longest answer -> next request gaps (after exchange #, ms): {longest:?}");
        std::thread::sleep(Duration::from_secs(SETTLE_SECS));
        let (rss_published, _) = memory_kib(daemon.pid());

        let mut latencies_ms = Vec::new();
        let mut kubectl_ms = Vec::new();
        for i in 0..RUNS {
            let port = RUN_FIRST_PORT + i as u16;
            let before = SystemTime::now();
            let clock = Instant::now();
            kubectl(
                kubeconfig,
                &[
                    "annotate",
                    "svc",
                    &format!("bench-{i}"),
                    "holepunch/punch-external=true",
                ],
            );
            kubectl_ms.push(clock.elapsed().as_secs_f64() * 1e3);
            wait_until(
                &daemon,
                &format!("bench-{i} on the router"),
                Duration::from_secs(10),
                || lab.router_forwards().contains(&format!("dport {port} ")),
            );
            let sent = capture
                .first_after(epoch_secs(before))
                .unwrap_or_else(|| panic!("no PCP request captured for bench-{i}"));
            latencies_ms.push((sent - epoch_secs(before)) * 1e3);
        }
        let (rss_after, hwm) = memory_kib(daemon.pid());
        assert_eq!(active_mappings(&config), PUBLISHED + RUNS);
        drop(capture);
        daemon.stop();

        latencies_ms.sort_by(f64::total_cmp);
        kubectl_ms.sort_by(f64::total_cmp);
        let mib = |kib: u64| kib as f64 / 1024.0;
        eprintln!();
        eprintln!("| figure ({SERVICES} Services watched, {PUBLISHED} published, PCP) | value |");
        eprintln!("|---|---|");
        eprintln!(
            "| daemon start -> {PUBLISHED} mappings live | {:.1} s |",
            to_published.as_secs_f64()
        );
        eprintln!(
            "| of which waiting for miniupnpd's answers (miniupnpd's own CPU time) | {waiting_for_router_secs:.1} s ({router_cpu_secs:.1} s) |"
        );
        eprintln!(
            "| of which holepunch's own: start -> first request / between answer and next request (sum; median, max) | {first_request_secs:.2} s / {between_secs:.2} s ({:.1} ms, {:.1} ms) |",
            percentile(&between_requests, 0.5),
            percentile(&between_requests, 1.0)
        );
        eprintln!(
            "| miniupnpd's answer time for the 1st / 100th / 200th mapping | {:.0} / {:.0} / {:.0} ms |",
            router_answers_ms[0],
            router_answers_ms[PUBLISHED / 2 - 1],
            router_answers_ms[PUBLISHED - 1]
        );
        eprintln!(
            "| VmRSS, {PUBLISHED} published, settled {SETTLE_SECS} s | {:.1} MiB |",
            mib(rss_published)
        );
        eprintln!(
            "| VmRSS after {RUNS} more published / peak VmHWM | {:.1} MiB / {:.1} MiB |",
            mib(rss_after),
            mib(hwm)
        );
        eprintln!(
            "| kubectl annotate -> PCP request sent: median (p90, min-max) of {RUNS} | {:.0} ms ({:.0}, {:.0}-{:.0}) |",
            percentile(&latencies_ms, 0.5),
            percentile(&latencies_ms, 0.9),
            latencies_ms[0],
            latencies_ms[RUNS - 1]
        );
        eprintln!(
            "| of which kubectl itself runs: median | {:.0} ms |",
            percentile(&kubectl_ms, 0.5)
        );
        report("rss_10000_services_mib", mib(rss_published), "MiB");
        report("rss_peak_mib", mib(hwm), "MiB");
        report("start_to_200_live_secs", to_published.as_secs_f64(), "s");
        report(
            "start_to_200_router_wait_secs",
            waiting_for_router_secs,
            "s",
        );
        report("start_to_200_router_cpu_secs", router_cpu_secs, "s");
        report("start_to_200_first_request_secs", first_request_secs, "s");
        report("start_to_200_between_requests_secs", between_secs, "s");
        report(
            "start_to_200_between_requests_median_ms",
            percentile(&between_requests, 0.5),
            "ms",
        );
        report(
            "kubectl_annotate_to_pcp_request_ms",
            percentile(&latencies_ms, 0.5),
            "ms",
        );
    });
}
