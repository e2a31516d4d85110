//! Benchmarks of the daemon against the lab router (README.md, "Benchmarks"), not timed
//! tests: each prints `BENCH <key>\t<value>\t<unit>` lines (see `support/measure.rs`) that
//! `scripts/bench` gathers into one table, and asserts only what must hold for the numbers
//! to mean anything.
//!
//! ```text
//! cargo test --release --test bench -- --ignored --nocapture --test-threads=1
//! ```
//!
//! (root; lab prefix `hpb-`, miniupnpd in insecure mode so that `direct` mode may map the
//! LoadBalancer IP.) The daemon runs on the lab's LAN host against the in-test fake API:
//! - PCP: `annotated -> mapping live` (the Service written to the API until the daemon logs
//!   the router's grant) next to one bare PCP MAP exchange with the same router; router calls
//!   (packets counted at the router's port 5351) during reconciles where nothing changed;
//!   router calls per mapping-hour at steady state with 120 s leases;
//! - UPnP: `annotated -> mapping live` next to one bare AddPortMapping; a burst of 50
//!   annotated Services written at once: until all are live, and the reconcile passes;
//! - one bare MAP at a fixed chain, sent five ways (blocking or tokio sockets, one per call or
//!   connected once, awaited in `block_on` or on a worker): what the way a client waits for
//!   the answer costs on this machine;
//! - start -> `READY=1` (read from the daemon's `NOTIFY_SOCKET`) with 1,000 Services and a
//!   state file that already holds their mappings.
//!
//! In each annotate run the bare call and the daemon's take turns going first, each after the
//! router has settled from the other: miniupnpd keeps working after it answers, and a call
//! sent at once takes about twice as long (measured beside the runs:
//! `BENCH *_back_to_back_ms`).
//!
//! The annotate runs also break each change's time down by the daemon's debug stamps (log
//! target `holepunch::timing`, README.md "Benchmarks") and print each step's median.

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

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bin::Daemon;
use daemon_lab::{forwards_of, wait_for_first_reconcile, with_fake_cluster_in};
use fake_api::FakeApi;
use holepunch::model::{Backend, Endpoint, MappingKey, Owner, Protocol, TargetSource};
use holepunch::router::pcp::codec::{self, Nonce, ResultCode};
use holepunch::state::{LeaseTimes, MappingRecord, State};
use lab::{LAN_IP, Lab, ROUTER_LAN_IP, ROUTER_WAN_IP};
use measure::{LB_IP, lab_config, load_balancer, median, percentile, reconcile_passes, report};

const PREFIX: &str = "hpb-";
/// miniupnpd's shortest lease in the lab (`min_lifetime=120`).
const LEASE_SECS: u32 = 120;
/// The default `router.verify_interval_seconds`.
const VERIFY_SECS: u32 = 60;
/// The default `router.lease_seconds`, for the expected steady-state figure.
const DEFAULT_LEASE_SECS: f64 = 3600.0;
/// PCP renews at a random point in 1/2-5/8 of the lease: on average at 9/16 of it.
const MEAN_RENEWAL_FRACTION: f64 = 0.5625;
/// Where the daemon serves metrics, inside the LAN namespace.
const METRICS_ADDRESS: &str = "127.0.0.1:19480";
/// PCP runs: Services annotated one at a time, spread over one mean renewal interval so that
/// their renewals are spread evenly over the steady-state window.
const PCP_RUNS: u16 = 20;
const UPNP_RUNS: u16 = 10;
/// Of the PCP runs, the first this many are each followed by a reconcile where nothing changed.
const NOOP_ROUNDS: u16 = 8;
/// Steady-state window: two mean renewal intervals at 120 s (`HOLEPUNCH_BENCH_STEADY_SECS`).
const STEADY_SECS: u64 = 135;
/// Services written at once in the UPnP run's burst, on ports from [`BURST_FIRST_PORT`].
const BURST_SERVICES: u16 = 50;
const BURST_FIRST_PORT: u16 = 25_000;
/// Services and mappings for start -> READY=1.
const READY_SERVICES: u16 = 1000;
const POLL_MS: u64 = 2;
/// After a bare router call, the annotate runs wait this long plus [`ROUTER_SETTLE_FACTOR`]
/// times the call's own time before annotating (see [`settle_after`]).
const ROUTER_SETTLE_MIN_MS: f64 = 300.0;
const ROUTER_SETTLE_FACTOR: f64 = 4.0;
/// [`bench_pcp_client_styles_at_a_fixed_chain`]: mappings made first, rounds of three calls,
/// and the pause around each call and delete.
const CLIENT_STYLES_CHAIN: u16 = 30;
const CLIENT_STYLES_ROUNDS: u16 = 15;
const CLIENT_STYLES_GAP: Duration = Duration::from_millis(700);
/// A call quicker than this met no wake-up delay (README.md, "Benchmarks").
const CLIENT_STYLES_QUICK_MS: f64 = 25.0;
/// Pairs of bare calls in [`back_to_back`].
const BACK_TO_BACK_PAIRS: u16 = 5;
/// A quiet period before each UPnP run: longer than the daemon's coalescing window.
const QUIET: Duration = Duration::from_millis(holepunch::daemon::COALESCE_WINDOW_MS + 100);
/// The daemon's log filter in the annotate runs: info, and the debug stamps of each change's
/// way to the router (target `holepunch::timing`, README.md "Benchmarks").
const TIMING_LOG: &str = "info,holepunch::timing=debug";

/// `config` with room for `mappings` in one namespace (the default quotas, 32 per namespace
/// and 128 in all, are smaller than these benchmarks' clusters).
fn with_quota(config: std::path::PathBuf, mappings: usize) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(&format!(
        "\n[ports]\nmax_per_namespace = {mappings}\nmax_total = {mappings}\n"
    ));
    std::fs::write(&config, text).expect("write config");
    config
}

/// Whether `line` logs the router's first grant of a mapping: `mapped`, or `restored` for one
/// a pass that stopped early left pending (README.md, "Benchmarks": a burst's first pass
/// stops for the changes still arriving).
fn is_grant(line: &str) -> bool {
    line.contains("reconcile: mapped") || line.contains("reconcile: restored")
}

/// Polls the daemon's log every [`POLL_MS`] until it has logged the router's grant for
/// `port`; returns when it saw it. Each poll reads only what was appended since the last: the
/// poller must not compete with the daemon and the router for the CPU (reading the whole log
/// each time grew with every run).
fn wait_for_grant(daemon: &Daemon, port: u16, limit: Duration) -> Instant {
    let started = Instant::now();
    let needle = format!("external_port={port} ");
    let mut file = std::fs::File::open(daemon.log_path()).expect("the daemon's log");
    // Bytes: a read may end inside a character; only whole lines are looked at.
    let mut pending = Vec::new();
    loop {
        file.read_to_end(&mut pending)
            .expect("read the daemon's log");
        let complete = pending
            .iter()
            .rposition(|byte| *byte == b'\n')
            .map_or(0, |end| end + 1);
        if String::from_utf8_lossy(&pending[..complete])
            .lines()
            .any(|line| is_grant(line) && line.contains(&needle))
        {
            return Instant::now();
        }
        pending.drain(..complete);
        assert!(
            started.elapsed() < limit,
            "no grant for port {port} within {limit:?}; the daemon logged:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
}

/// Waits until miniupnpd has finished a call that took `took_ms` to answer: it keeps working
/// after its answer (a second call sent at once takes about twice as long; see
/// [`back_to_back`]), and neither side of an annotate run may pay for the other's tail.
fn settle_after(took_ms: f64) {
    let settle_ms = ROUTER_SETTLE_MIN_MS + ROUTER_SETTLE_FACTOR * took_ms;
    std::thread::sleep(Duration::from_secs_f64(settle_ms / 1e3));
}

/// The effect [`settle_after`] waits out, measured: [`BACK_TO_BACK_PAIRS`] pairs of bare calls
/// (`raw` on a port), the second sent as soon as the first is answered. Prints
/// `BENCH <key>` (the second's median) and `BENCH <key>_first` (the first's).
fn back_to_back(key: &str, first_port: u16, mut raw: impl FnMut(u16) -> f64) {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for pair in 0..BACK_TO_BACK_PAIRS {
        let port = first_port + 2 * pair;
        let took = raw(port);
        first.push(took);
        second.push(raw(port + 1));
        settle_after(took);
    }
    eprintln!("{key}: first {first:?}, right after it {second:?}");
    report(&format!("{key}_first"), median(&first), "ms");
    report(key, median(&second), "ms");
}

/// One bare PCP MAP exchange with the router for `port` (THIRD_PARTY, as `direct` mode
/// sends it): request out, answer in, in milliseconds. Runs on a thread inside the LAN
/// namespace.
fn raw_pcp_map_ms(port: u16) -> f64 {
    let (took_ms, response) = bare_pcp_exchange(&bare_map_request(port, LEASE_SECS));
    assert_eq!(response.result, ResultCode::Success, "{response:?}");
    took_ms
}

/// `request` sent from a socket of its own in the LAN namespace: (ms until the answer, the
/// answer).
fn bare_pcp_exchange(request: &codec::MapRequest) -> (f64, codec::Response) {
    let lan: Ipv4Addr = LAN_IP.parse().expect("lab address");
    let socket = UdpSocket::bind((lan, 0)).expect("bind in the LAN namespace");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let bytes = request.encode();
    let mut answer = [0u8; 1100];
    let started = Instant::now();
    socket
        .send_to(&bytes, (ROUTER_LAN_IP, 5351))
        .expect("send MAP");
    let (len, _) = socket.recv_from(&mut answer).expect("the router answers");
    let took = started.elapsed();
    let response = codec::decode_response(&answer[..len]).expect("a PCP answer");
    (took.as_secs_f64() * 1e3, response)
}

/// The bare MAP for `port` (THIRD_PARTY, as `direct` mode sends it), with one nonce per port so
/// that a lifetime of 0 deletes what an earlier call made.
fn bare_map_request(port: u16, lifetime_secs: u32) -> codec::MapRequest {
    let mut nonce = [0u8; 12];
    nonce[..2].copy_from_slice(&port.to_be_bytes());
    codec::MapRequest {
        lifetime_secs,
        client_ip: LAN_IP.parse().expect("lab address"),
        nonce: Nonce(nonce),
        protocol: Protocol::Tcp.iana_number(),
        internal_port: port,
        suggested_external_port: port,
        suggested_external_ip: None,
        third_party: Some(LB_IP.parse().expect("lab address")),
        prefer_failure: lifetime_secs != 0,
    }
}

/// One bare AddPortMapping (a hand-written SOAP request on a fresh connection, as any IGD
/// client sends it) to `control_url` for `port`, in milliseconds.
fn raw_upnp_add_ms(control_url: &str, service: &str, port: u16) -> f64 {
    let arguments = format!(
        "<NewRemoteHost></NewRemoteHost>\
         <NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>\
         <NewInternalPort>{port}</NewInternalPort><NewInternalClient>{LB_IP}</NewInternalClient>\
         <NewEnabled>1</NewEnabled><NewPortMappingDescription>bench</NewPortMappingDescription>\
         <NewLeaseDuration>{LEASE_SECS}</NewLeaseDuration>"
    );
    let (took, response) = raw_soap(control_url, service, "AddPortMapping", &arguments);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    took
}

/// One bare GetSpecificPortMappingEntry for `port` (not mapped: the router answers fault
/// 714, NoSuchEntryInArray), in milliseconds: what holepunch asks before its first
/// AddPortMapping of a port.
fn raw_upnp_get_ms(control_url: &str, service: &str, port: u16) -> f64 {
    let arguments = format!(
        "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort>\
         <NewProtocol>TCP</NewProtocol>"
    );
    let (took, response) = raw_soap(
        control_url,
        service,
        "GetSpecificPortMappingEntry",
        &arguments,
    );
    assert!(response.contains("714"), "{response}");
    took
}

/// One SOAP `action` with `arguments` on a fresh connection: (milliseconds, the response).
fn raw_soap(control_url: &str, service: &str, action: &str, arguments: &str) -> (f64, String) {
    let rest = control_url
        .strip_prefix("http://")
        .expect("an http control URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{service}\">{arguments}</u:{action}></s:Body></s:Envelope>\r\n"
    );
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"{service}#{action}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let mut stream = TcpStream::connect(host).expect("connect to the IGD");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    (started.elapsed().as_secs_f64() * 1e3, response)
}

/// Waits for at least one reconcile pass after `before` passes and for the daemon to go
/// quiet (no pass for longer than its coalescing window); `false` if no pass came at all.
fn wait_for_passes(before: f64) -> bool {
    let started = Instant::now();
    let mut last = before;
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let now = reconcile_passes(METRICS_ADDRESS).unwrap_or(last);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
        if last > before && quiet_since.elapsed() > Duration::from_millis(600) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last > before
}

/// Where one change's time went, from the Service's write to the API until the router's grant:
/// the daemon's stamps (log target `holepunch::timing`) in ms after the write. Each stage is
/// the first stamp at or after the one before it.
#[derive(Debug, Clone, Default)]
struct Breakdown {
    /// (stage, ms after the write), in order.
    stages: Vec<(&'static str, f64)>,
    /// How long the pending save (write + fsyncs) took, in ms.
    save_ms: Option<f64>,
}

/// The stages of [`Breakdown`], each with what its stamp line holds.
const STAGES: [(&str, &[&str]); 10] = [
    ("watch", &["stage=\"watch\"", "resource=\"services\""]),
    ("woke", &["stage=\"woke\""]),
    ("pass", &["stage=\"pass\""]),
    ("desired", &["stage=\"desired\""]),
    ("planned", &["stage=\"planned\""]),
    ("saved", &["stage=\"pending saved\""]),
    ("map", &["stage=\"map\"", "external_port={port} "]),
    ("request", &["holepunch::timing", "sent"]),
    ("add", &["action=\"AddPortMapping\""]),
    ("grant", &["reconcile: mapped", "external_port={port} "]),
];

/// A log line's timestamp (tracing's RFC 3339 first word), in ms after `since`.
fn ms_after(line: &str, since: jiff::Timestamp) -> Option<f64> {
    let at: jiff::Timestamp = line.split_whitespace().next()?.parse().ok()?;
    Some(at.duration_since(since).as_secs_f64() * 1e3)
}

impl Breakdown {
    /// The stamps in `log` of the change written at `written` for `port`, after the in-test
    /// API's own: when its watch handed the change to the response body (`api_sent`; the
    /// daemon's next stamp can precede it by microseconds, as the body may be written first).
    fn of(log: &str, written: SystemTime, api_sent: Option<SystemTime>, port: u16) -> Breakdown {
        let since = jiff::Timestamp::try_from(written).expect("a clock after 1970");
        let lines: Vec<(f64, &str)> = log
            .lines()
            .filter_map(|line| Some((ms_after(line, since)?, line)))
            .collect();
        let mut breakdown = Breakdown::default();
        if let Some(sent) = api_sent.and_then(|at| at.duration_since(written).ok()) {
            breakdown.stages.push(("api", sent.as_secs_f64() * 1e3));
        }
        let mut from = 0;
        let mut after = 0.0;
        for (stage, needles) in STAGES {
            let needles: Vec<String> = needles
                .iter()
                .map(|n| n.replace("{port}", &port.to_string()))
                .collect();
            // (A space after the last field too, so that `external_port=1 ` is a whole value.)
            let found = lines[from..].iter().position(|(at, line)| {
                let line = format!("{line} ");
                *at >= after
                    && !line.contains("router_calls=0")
                    && needles.iter().all(|n| line.contains(n.as_str()))
            });
            let Some(index) = found else { continue };
            let (at, line) = lines[from + index];
            if stage == "saved" {
                breakdown.save_ms = line
                    .split("took_us=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|us| us.parse::<f64>().ok())
                    .map(|us| us / 1e3);
            }
            breakdown.stages.push((stage, at));
            from += index;
            after = at;
        }
        breakdown
    }

    /// Each stage's share: (name of the step that ends at the stage, ms since the stage before).
    fn steps(&self) -> Vec<(String, f64)> {
        let mut last = ("written", 0.0);
        self.stages
            .iter()
            .map(|&(stage, at)| {
                let step = (format!("{}_to_{stage}", last.0), at - last.1);
                last = (stage, at);
                step
            })
            .collect()
    }
}

/// `annotated -> mapping live` runs for one backend: Services `<backend>-<i>` on ports from
/// `first_port`, written unannotated before the daemon starts; run `i` annotates one and times
/// it until the daemon logs the router's grant, next to one bare router call.
struct AnnotateRuns<'a> {
    lab: &'a Lab,
    fake: &'a FakeApi,
    backend: &'static str,
    first_port: u16,
    /// `annotated -> live` of each run, in ms.
    ours_ms: Vec<f64>,
    /// The bare router call of each run, in ms.
    raw_ms: Vec<f64>,
    /// Where each run's time went.
    breakdowns: Vec<Breakdown>,
}

impl<'a> AnnotateRuns<'a> {
    fn new(lab: &'a Lab, fake: &'a FakeApi, backend: &'static str, first_port: u16) -> Self {
        AnnotateRuns {
            lab,
            fake,
            backend,
            first_port,
            ours_ms: Vec::new(),
            raw_ms: Vec::new(),
            breakdowns: Vec::new(),
        }
    }

    fn name(&self, i: u16) -> String {
        format!("{}-{i}", self.backend)
    }

    fn port(&self, i: u16) -> u16 {
        self.first_port + i
    }

    /// Writes the `count` Services unannotated, starts the daemon on this backend (metrics on
    /// `metrics_listen`, none when empty) and waits for its first reconcile.
    fn start_daemon(&self, dir: &Path, kubeconfig: &Path, count: u16, metrics: &str) -> Daemon {
        let config = lab_config(
            dir,
            kubeconfig,
            self.backend,
            LEASE_SECS,
            VERIFY_SECS,
            metrics,
        );
        let config = with_quota(config, usize::from(count + BURST_SERVICES));
        for i in 0..count {
            self.fake
                .apply_object(load_balancer(&self.name(i), self.port(i), false, "0"));
        }
        let daemon = Daemon::start_with_env(&config, &[("RUST_LOG", TIMING_LOG)]);
        wait_for_first_reconcile(&daemon, Duration::from_secs(30));
        daemon
    }

    /// Run `i`: the bare router call `raw` (on its own port: both see a chain of the same
    /// length) and Service `<backend>-<i>` annotated until the grant, which must leave one
    /// forwarding rule on the router. Each waits for the router to settle from the other, and
    /// they take turns going first: how fast the lab's router answers depends on what it did
    /// just before (README.md, "Benchmarks"), and neither side may be favoured.
    fn run(&mut self, daemon: &Daemon, i: u16, raw: impl FnOnce() -> f64) {
        let bare_first = i.is_multiple_of(2);
        let mut raw = Some(raw);
        if bare_first && let Some(raw) = raw.take() {
            let raw_ms = raw();
            self.raw_ms.push(raw_ms);
            settle_after(raw_ms);
        }
        let written = SystemTime::now();
        let annotated = Instant::now();
        self.fake
            .apply_object(load_balancer(&self.name(i), self.port(i), true, "0"));
        let live = wait_for_grant(daemon, self.port(i), Duration::from_secs(10));
        let ours_ms = (live - annotated).as_secs_f64() * 1e3;
        self.ours_ms.push(ours_ms);
        let api_sent = self.fake.watch_event_sent_after(written);
        self.breakdowns.push(Breakdown::of(
            &daemon.log(),
            written,
            api_sent,
            self.port(i),
        ));
        assert_eq!(
            forwards_of(self.lab, self.port(i)).len(),
            1,
            "port {}",
            self.port(i)
        );
        if let Some(raw) = raw {
            settle_after(ours_ms);
            self.raw_ms.push(raw());
        }
    }

    /// `BENCH <backend>_annotate_live_ms` (the median), its p90 and `BENCH <raw_key>` (the
    /// bare call's median).
    fn report(&self, raw_key: &str) {
        let backend = self.backend;
        report(
            &format!("{backend}_annotate_live_ms"),
            median(&self.ours_ms),
            "ms",
        );
        report(
            &format!("{backend}_annotate_live_p90_ms"),
            percentile(&self.ours_ms, 0.9),
            "ms",
        );
        report(raw_key, median(&self.raw_ms), "ms");
        // Where the time went: each step's median over the runs, with its range.
        let mut steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for (run, breakdown) in self.breakdowns.iter().enumerate() {
            eprintln!(
                "{backend} run {run}: {:?} (pending save {:?} ms)",
                breakdown.steps(),
                breakdown.save_ms
            );
            for (step, ms) in breakdown.steps() {
                if !order.contains(&step) {
                    order.push(step.clone());
                }
                steps.entry(step).or_default().push(ms);
            }
            if let Some(ms) = breakdown.save_ms {
                steps.entry("pending_save".into()).or_default().push(ms);
            }
        }
        order.push("pending_save".into());
        for step in order {
            let Some(values) = steps.get(&step) else {
                continue;
            };
            report(&format!("{backend}_step_{step}_ms"), median(values), "ms");
            eprintln!(
                "{backend} {step}: median {:.1} ms, {:.1}-{:.1} ms over {} runs",
                median(values),
                percentile(values, 0.0),
                percentile(values, 1.0),
                values.len()
            );
        }
    }
}

/// PCP: annotated -> live vs a bare MAP; router calls during no-op reconciles; router calls
/// per mapping-hour at steady state.
#[test]
#[ignore = "benchmark: scripts/bench"]
fn bench_pcp_annotate_noop_and_steady_state() {
    let steady_secs = std::env::var("HOLEPUNCH_BENCH_STEADY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEADY_SECS);
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    lab.count_router_pcp_packets();
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        let mut runs = AnnotateRuns::new(&lab, fake, "pcp", 21_000);
        let daemon = runs.start_daemon(dir, kubeconfig, PCP_RUNS, METRICS_ADDRESS);

        let spacing = Duration::from_secs_f64(
            LEASE_SECS as f64 * MEAN_RENEWAL_FRACTION / f64::from(PCP_RUNS),
        );
        let (mut noop_calls, mut noop_passes) = (0u64, 0u16);
        let mut noop_done = Duration::ZERO;
        let first_grant = Instant::now();
        for i in 0..PCP_RUNS {
            let slot = first_grant + spacing * u32::from(i);
            std::thread::sleep(slot.saturating_duration_since(Instant::now()));
            runs.run(&daemon, i, || raw_pcp_map_ms(22_000 + i));

            if i < NOOP_ROUNDS {
                // Every published Service changes in a way holepunch must ignore; no lease
                // is near its renewal (the first is due 60 s after the first grant).
                let passes = reconcile_passes(METRICS_ADDRESS).expect("metrics");
                let packets = lab.router_pcp_packets();
                for j in 0..=i {
                    let (name, port) = (runs.name(j), runs.port(j));
                    fake.apply_object(load_balancer(&name, port, true, &format!("r{i}")));
                }
                if wait_for_passes(passes) {
                    noop_passes += 1;
                }
                noop_calls += lab.router_pcp_packets() - packets;
                noop_done = first_grant.elapsed();
            }
        }
        back_to_back("pcp_raw_map_back_to_back_ms", 22_100, raw_pcp_map_ms);
        // Otherwise a renewal (60 s after a grant at the earliest) could fall into a round.
        assert!(
            noop_done < Duration::from_secs(60),
            "the no-op rounds ended {noop_done:?} after the first grant"
        );

        // Steady state: every mapping is renewed at its own time; the router is checked
        // (one ANNOUNCE) every VERIFY_SECS.
        let settle =
            (first_grant + spacing * u32::from(PCP_RUNS)).saturating_duration_since(Instant::now());
        std::thread::sleep(settle);
        let packets = lab.router_pcp_packets();
        let window = Instant::now();
        std::thread::sleep(Duration::from_secs(steady_secs));
        let steady_calls = lab.router_pcp_packets() - packets;
        let window_hours = window.elapsed().as_secs_f64() / 3600.0;
        let mappings = f64::from(PCP_RUNS);
        let per_mapping_hour = steady_calls as f64 / (mappings * window_hours);
        let checks_per_hour = 3600.0 / f64::from(VERIFY_SECS);
        let expected =
            3600.0 / (f64::from(LEASE_SECS) * MEAN_RENEWAL_FRACTION) + checks_per_hour / mappings;
        let expected_default =
            3600.0 / (DEFAULT_LEASE_SECS * MEAN_RENEWAL_FRACTION) + checks_per_hour / mappings;
        let renewed = daemon.log().matches("reconcile: renewed").count();
        let remapped = daemon.log().matches("reconcile: mapped").count();
        daemon.stop();

        let AnnotateRuns {
            ours_ms, raw_ms, ..
        } = &runs;
        eprintln!(
            "PCP annotated -> live (ms): {ours_ms:?}\nbare MAP (ms): {raw_ms:?}\n\
             no-op: {noop_calls} router calls in {NOOP_ROUNDS} rounds ({noop_passes} passes)\n\
             steady: {steady_calls} calls in {:.0} s for {PCP_RUNS} mappings, {renewed} renewals logged",
            window_hours * 3600.0
        );
        runs.report("pcp_raw_map_ms");
        report("noop_router_calls", noop_calls as f64, "calls");
        report("noop_rounds", f64::from(NOOP_ROUNDS), "rounds");
        report("noop_passes", f64::from(noop_passes), "passes");
        report("steady_calls_per_mapping_hour", per_mapping_hour, "calls");
        report("steady_expected_per_mapping_hour", expected, "calls");
        report(
            "steady_expected_default_lease_per_mapping_hour",
            expected_default,
            "calls",
        );
        report("steady_mappings", mappings, "mappings");
        report("steady_window_secs", window_hours * 3600.0, "s");

        assert_eq!(remapped, usize::from(PCP_RUNS), "renewed, never re-mapped");
        assert!(
            noop_passes > 0,
            "no reconcile pass ran for the no-op changes"
        );
        assert_eq!(
            noop_calls, 0,
            "router calls for Services that did not change"
        );
        assert!(
            (per_mapping_hour / expected - 1.0).abs() < 0.25,
            "{per_mapping_hour:.1} router calls per mapping-hour, expected {expected:.1}"
        );
    });
}

/// UPnP: annotated -> live vs a bare AddPortMapping to the same control URL; then a burst of
/// [`BURST_SERVICES`] annotated Services written at once (as `kubectl apply -f` of a
/// directory does): the time until all are live and how many reconcile passes it took.
#[test]
#[ignore = "benchmark: scripts/bench"]
fn bench_upnp_annotate_and_burst() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, runtime| {
        let mut runs = AnnotateRuns::new(&lab, fake, "upnp", 23_000);
        let daemon = runs.start_daemon(dir, kubeconfig, UPNP_RUNS, METRICS_ADDRESS);
        let client = runtime
            .block_on(holepunch::router::upnp::UpnpClient::discover(
                ROUTER_LAN_IP.parse().expect("lab address"),
                LAN_IP.parse().expect("lab address"),
                Some("http://192.168.77.1:5000/rootDesc.xml"),
            ))
            .expect("the lab's IGD");
        let (control, service) = (client.control_url(), client.service_type().to_owned());

        let mut raw_get_ms = Vec::new();
        for i in 0..UPNP_RUNS {
            // Each change after a quiet period, as the goal has it (and as the PCP runs are,
            // seconds apart): a change within the window of the one before is gathered on
            // purpose (README.md, "Benchmarks": the burst below measures that).
            std::thread::sleep(QUIET);
            raw_get_ms.push(raw_upnp_get_ms(&control, &service, 24_000 + i));
            runs.run(&daemon, i, || {
                raw_upnp_add_ms(&control, &service, 24_000 + i)
            });
        }

        back_to_back("upnp_raw_add_back_to_back_ms", 24_100, |port| {
            raw_upnp_add_ms(&control, &service, port)
        });

        // Quiet first: the burst's first Service goes at once, the rest are gathered.
        std::thread::sleep(Duration::from_secs(1));
        let passes = reconcile_passes(METRICS_ADDRESS).expect("metrics");
        let written = Instant::now();
        for i in 0..BURST_SERVICES {
            fake.apply_object(load_balancer(
                &format!("burst-{i}"),
                BURST_FIRST_PORT + i,
                true,
                "0",
            ));
        }
        let writing = written.elapsed();
        let mut all_live = written;
        for i in 0..BURST_SERVICES {
            all_live = all_live.max(wait_for_grant(
                &daemon,
                BURST_FIRST_PORT + i,
                Duration::from_secs(60),
            ));
        }
        let burst_ms = (all_live - written).as_secs_f64() * 1e3;
        assert!(wait_for_passes(passes), "no pass for the burst");
        let burst_passes = reconcile_passes(METRICS_ADDRESS).expect("metrics") - passes;
        let log = daemon.stop();
        let grants: Vec<&str> = log.lines().filter(|line| is_grant(line)).collect();
        let ports = (0..UPNP_RUNS)
            .map(|i| runs.port(i))
            .chain((0..BURST_SERVICES).map(|i| BURST_FIRST_PORT + i));
        for port in ports {
            let needle = format!("external_port={port} ");
            let granted = grants.iter().filter(|line| line.contains(&needle)).count();
            assert_eq!(granted, 1, "port {port} granted {granted} times:\n{log}");
        }
        assert_eq!(
            grants.len(),
            usize::from(UPNP_RUNS + BURST_SERVICES),
            "each Service mapped once:\n{log}"
        );
        let AnnotateRuns {
            ours_ms, raw_ms, ..
        } = &runs;
        eprintln!(
            "UPnP annotated -> live (ms): {ours_ms:?}\nbare AddPortMapping (ms): {raw_ms:?}\n\
             bare GetSpecificPortMappingEntry (ms): {raw_get_ms:?}\n\
             burst: {BURST_SERVICES} Services written in {writing:?}, all live after \
             {burst_ms:.0} ms, in {burst_passes} passes"
        );
        runs.report("upnp_raw_add_ms");
        report("upnp_raw_get_ms", median(&raw_get_ms), "ms");
        report("burst_services", f64::from(BURST_SERVICES), "Services");
        report("burst_all_live_ms", burst_ms, "ms");
        report("burst_passes", burst_passes, "passes");
        report(
            "burst_upnp_add_ms",
            median(raw_ms) * f64::from(BURST_SERVICES),
            "ms",
        );
    });
}

/// A state file holding a fresh PCP mapping for each of `count` Services (ports from
/// 30,000), as the daemon would have left it a minute ago.
fn write_state(path: &Path, count: u16) {
    let now = jiff::Timestamp::now();
    let lb: Ipv4Addr = LB_IP.parse().expect("lab address");
    let granted = now - jiff::SignedDuration::from_secs(60);
    let mut mappings = BTreeMap::new();
    for i in 0..count {
        let port = 30_000 + i;
        let endpoint = Endpoint::new(lb, port);
        let key = MappingKey {
            protocol: Protocol::Tcp,
            external_port: port,
        };
        let record = MappingRecord {
            target_source: TargetSource::LoadBalancer,
            router: ROUTER_LAN_IP.to_owned(),
            nonce: Some(format!("{:024x}", u128::from(i) + 1)),
            times: LeaseTimes {
                lifetime_secs: 3600,
                granted_at: Some(granted),
                renew_at: Some(granted + jiff::SignedDuration::from_secs(1800)),
                expires_at: Some(granted + jiff::SignedDuration::from_secs(3600)),
            },
            external_address: Some(ROUTER_WAN_IP.parse().expect("lab address")),
            ..MappingRecord::leftover(
                Owner::new("default", format!("svc-{i}")),
                key,
                endpoint,
                Backend::Pcp,
            )
        };
        mappings.insert(key, record);
    }
    let state = State {
        mappings,
        ..State::default()
    };
    let dir = path.parent().expect("state dir");
    std::fs::create_dir_all(dir).expect("state dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::write(path, state.to_toml().expect("state as TOML")).expect("write state");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// One bare MAP sent five ways, taking turns, at a fixed chain of [`CLIENT_STYLES_CHAIN`]
/// mappings (each call's mapping deleted after it), the calls [`CLIENT_STYLES_GAP`] apart: a
/// blocking socket of its own per call (as the annotate runs' floor), a blocking socket bound
/// and connected once, a tokio socket of its own, and a tokio socket bound and connected once
/// (as the daemon's) awaited in the runtime's `block_on` (as `holepunch run` drives its loop)
/// or on a worker: what the way a client waits for the answer costs beside the router's time,
/// on this machine (README.md, "Benchmarks").
#[test]
#[ignore = "benchmark: scripts/bench"]
fn bench_pcp_client_styles_at_a_fixed_chain() {
    let _lab = Lab::up_with(PREFIX, &["--insecure"]);
    let styles = lab::in_netns(&format!("{PREFIX}lan"), || {
        for i in 0..CLIENT_STYLES_CHAIN {
            raw_pcp_map_ms(26_000 + i);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let lan: Ipv4Addr = LAN_IP.parse().expect("lab address");
        let socket = runtime.block_on(async {
            let socket = tokio::net::UdpSocket::bind((lan, 0)).await.expect("bind");
            socket
                .connect((ROUTER_LAN_IP, 5351))
                .await
                .expect("connect");
            std::sync::Arc::new(socket)
        });
        let port = 26_500;
        let (mut blocking, mut in_block_on, mut spawned) = (Vec::new(), Vec::new(), Vec::new());
        let (mut std_connected, mut tokio_fresh) = (Vec::new(), Vec::new());
        let connected = UdpSocket::bind((lan, 0)).expect("bind");
        connected.connect((ROUTER_LAN_IP, 5351)).expect("connect");
        connected
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let pause = || std::thread::sleep(CLIENT_STYLES_GAP);
        for _ in 0..CLIENT_STYLES_ROUNDS {
            pause();
            blocking.push(raw_pcp_map_ms(port));
            pause();
            raw_pcp_delete(port);
            pause();
            {
                let bytes = bare_map_request(port, LEASE_SECS).encode();
                let mut answer = [0u8; 1100];
                let started = Instant::now();
                connected.send(&bytes).expect("send");
                connected.recv(&mut answer).expect("recv");
                std_connected.push(started.elapsed().as_secs_f64() * 1e3);
            }
            pause();
            raw_pcp_delete(port);
            pause();
            tokio_fresh.push(runtime.block_on(async move {
                let socket = tokio::net::UdpSocket::bind((lan, 0)).await.expect("bind");
                let bytes = bare_map_request(port, LEASE_SECS).encode();
                let mut answer = [0u8; 1100];
                let started = Instant::now();
                socket
                    .send_to(&bytes, (ROUTER_LAN_IP, 5351))
                    .await
                    .expect("send");
                socket.recv_from(&mut answer).await.expect("recv");
                started.elapsed().as_secs_f64() * 1e3
            }));
            pause();
            raw_pcp_delete(port);
            pause();
            let once = socket.clone();
            in_block_on.push(runtime.block_on(async move { tokio_pcp_map_ms(&once, port).await }));
            pause();
            raw_pcp_delete(port);
            pause();
            let once = socket.clone();
            spawned.push(runtime.block_on(async move {
                tokio::spawn(async move { tokio_pcp_map_ms(&once, port).await })
                    .await
                    .expect("the task")
            }));
            pause();
            raw_pcp_delete(port);
        }
        [
            ("blocking", blocking),
            ("blocking_connected", std_connected),
            ("tokio_fresh", tokio_fresh),
            ("tokio_block_on", in_block_on),
            ("tokio_spawned", spawned),
        ]
    });
    for (style, calls) in &styles {
        eprintln!("bare MAP at a chain of {CLIENT_STYLES_CHAIN}, {style} (ms): {calls:?}");
        report(&format!("pcp_client_{style}_ms"), median(calls), "ms");
        // The lab's answers come in two modes (README.md, "Benchmarks"): how often the quick one.
        let quick = calls
            .iter()
            .filter(|ms| **ms < CLIENT_STYLES_QUICK_MS)
            .count();
        report(&format!("pcp_client_{style}_quick"), quick as f64, "calls");
    }
}

/// One MAP for `port` as in [`raw_pcp_map_ms`], through `socket` (connected to the router).
async fn tokio_pcp_map_ms(socket: &tokio::net::UdpSocket, port: u16) -> f64 {
    let bytes = bare_map_request(port, LEASE_SECS).encode();
    let mut answer = [0u8; 1100];
    let started = Instant::now();
    socket.send(&bytes).await.expect("send MAP");
    let len = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut answer))
        .await
        .expect("the router answers")
        .expect("receive");
    let took = started.elapsed();
    let response = codec::decode_response(&answer[..len]).expect("a PCP answer");
    assert_eq!(response.result, ResultCode::Success, "{response:?}");
    took.as_secs_f64() * 1e3
}

/// Deletes the bare mapping of `port` (a MAP with lifetime 0).
fn raw_pcp_delete(port: u16) {
    bare_pcp_exchange(&bare_map_request(port, 0));
}

/// Start -> `READY=1` on `NOTIFY_SOCKET` with 1,000 Services whose mappings the state file
/// already holds: nothing to ask the router, so this is the daemon's own start-up cost.
#[test]
#[ignore = "benchmark: scripts/bench"]
fn bench_start_to_ready_with_1000_services_and_a_state_file() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    lab.count_router_pcp_packets();
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        let config = lab_config(dir, kubeconfig, "pcp", 3600, VERIFY_SECS, "");
        let config = with_quota(config, usize::from(READY_SERVICES));
        for i in 0..READY_SERVICES {
            fake.apply_object(load_balancer(&format!("svc-{i}"), 30_000 + i, true, "0"));
        }
        write_state(&dir.join("state/state.toml"), READY_SERVICES);
        let socket_path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");

        let started = Instant::now();
        let daemon = Daemon::start_with_env(
            &config,
            &[("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8"))],
        );
        let mut message = [0u8; 4096];
        let ready = loop {
            let len = socket.recv(&mut message).unwrap_or_else(|e| {
                panic!("no READY=1 ({e}); the daemon logged:\n{}", daemon.log())
            });
            let text = String::from_utf8_lossy(&message[..len]);
            if text.lines().any(|line| line == "READY=1") {
                break started.elapsed();
            }
        };
        // READY=1 comes once the router and nftables hold the mappings; the Events of the
        // first pass (one per live mapping) are posted after it, so they are not counted here.
        let events = fake.objects("Event").len();
        let log = daemon.stop();
        let router_calls = lab.router_pcp_packets();
        eprintln!(
            "start -> READY=1: {ready:?}, {router_calls} PCP packets to the router, {events} Events, log:\n{}",
            log.lines().take(20).collect::<Vec<_>>().join("\n")
        );
        report("ready_ms", ready.as_secs_f64() * 1e3, "ms");
        report("ready_services", f64::from(READY_SERVICES), "Services");
        report("ready_router_calls", router_calls as f64, "calls");
        report("ready_events_posted", events as f64, "Events");
        assert!(
            log.contains(&format!(
                "first reconcile done; ready mappings={READY_SERVICES}"
            )),
            "{log}"
        );
        assert_eq!(
            log.matches("reconcile: mapped").count(),
            0,
            "the state file's mappings were requested again:\n{log}"
        );
    });
}
