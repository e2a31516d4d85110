//! Soak (README.md, "Soak"; not in CI): `holepunch run` through PCP against the lab router with
//! 120 s leases, under random Service churn, for `HOLEPUNCH_SOAK_SECS` (default an hour):
//!
//! ```text
//! scripts/soak [seconds]      # or: HOLEPUNCH_SOAK_SECS=300 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! (root; lab prefix `hps-`.) A set of stable Services stays published the whole run while
//! churn Services are created, deleted, unannotated and relabelled at random (seeded:
//! `HOLEPUNCH_SOAK_SEED`, printed). Every [`SAMPLE_SECS`] the daemon's `VmRSS` and open file
//! descriptors are read from `/proc`. Renewals of the stable mappings are read from the
//! daemon's log (its timestamps). It prints the figures and asserts:
//! - memory and descriptors grow < 10 %: the median of the last window against the median
//!   of the window right after warm-up;
//! - renewals per stable mapping within 10 % of the expected count: PCP renews at a random
//!   point in 1/2-5/8 of the lease, on average after 67.5 s at 120 s, so over the span from
//!   the grant to the last renewal the count should be span / 67.5 s; and no stable mapping
//!   went longer than 5/8 of a lease (plus slack) without a renewal at the end of the run.

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

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::time::{Duration, Instant};

use bin::Daemon;
use daemon_lab::{wait_until, with_fake_cluster_in};
use lab::Lab;
use measure::{lab_config, load_balancer, median, memory_kib, open_fds};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PREFIX: &str = "hps-";
const DEFAULT_SECS: u64 = 3600;
/// miniupnpd's shortest lease in the lab (`min_lifetime=120`).
const LEASE_SECS: u32 = 120;
const VERIFY_SECS: u32 = 60;
/// Mean renewal interval: 9/16 of the lease (a random point in 1/2-5/8 of it).
const MEAN_RENEWAL_SECS: f64 = LEASE_SECS as f64 * 0.5625;
/// Longest renewal interval (5/8 of the lease), plus slack for a busy machine.
const MAX_RENEWAL_GAP_SECS: f64 = LEASE_SECS as f64 * 0.625 + 10.0;
const STABLE: u16 = 10;
const STABLE_FIRST_PORT: u16 = 40_000;
const CHURN_FIRST_PORT: u16 = 41_000;
const CHURN_PORTS: u16 = 500;
/// At most this many churn Services exist at once.
const CHURN_MAX_LIVE: usize = 30;
/// Pause between churn operations: random in this range.
const CHURN_PAUSE_MS: std::ops::Range<u64> = 200..2_000;
const SAMPLE_SECS: u64 = 5;
/// Allowed growth of memory and descriptors, and allowed renewal-count error.
const TOLERANCE: f64 = 0.10;

/// The daemon's log, read as it grows: renewal and grant times of the stable mappings.
struct LogFollower {
    file: std::fs::File,
    partial: String,
    /// Port -> timestamps (s since the epoch) of its grant.
    granted: BTreeMap<u16, f64>,
    /// Port -> timestamps of its renewals.
    renewed: BTreeMap<u16, Vec<f64>>,
    /// Other log lines that say something went wrong.
    warnings: usize,
}

impl LogFollower {
    fn new(path: &std::path::Path) -> LogFollower {
        LogFollower {
            file: std::fs::File::open(path).expect("daemon.log"),
            partial: String::new(),
            granted: BTreeMap::new(),
            renewed: BTreeMap::new(),
            warnings: 0,
        }
    }

    /// Reads what was logged since the last call.
    fn follow(&mut self) {
        let mut new = String::new();
        self.file.read_to_string(&mut new).expect("read daemon.log");
        self.partial.push_str(&new);
        let Some(end) = self.partial.rfind('\n') else {
            return;
        };
        let complete: String = self.partial.drain(..=end).collect();
        for line in complete.lines() {
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                self.warnings += 1;
            }
            let stable_port = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("external_port="))
                .and_then(|port| port.parse::<u16>().ok())
                .filter(|port| (STABLE_FIRST_PORT..STABLE_FIRST_PORT + STABLE).contains(port));
            let Some(port) = stable_port else { continue };
            let at = line
                .split_whitespace()
                .next()
                .and_then(|stamp| stamp.parse::<jiff::Timestamp>().ok())
                .unwrap_or_else(|| panic!("no timestamp on {line:?}"))
                .as_millisecond() as f64
                / 1e3;
            if line.contains("reconcile: mapped") {
                self.granted.entry(port).or_insert(at);
            } else if line.contains("reconcile: renewed") {
                self.renewed.entry(port).or_default().push(at);
            }
        }
    }
}

/// One `/proc` reading: seconds into the run, VmRSS (KiB), open descriptors.
struct Sample {
    at_secs: f64,
    rss_kib: u64,
    fds: usize,
}

/// Median of `value` over the samples taken in `from..to` seconds.
fn window_median(samples: &[Sample], from: f64, to: f64, value: impl Fn(&Sample) -> f64) -> f64 {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| (from..to).contains(&s.at_secs))
        .map(value)
        .collect();
    median(&values)
}

#[test]
#[ignore = "soak: scripts/soak [seconds]"]
fn soak_memory_descriptors_and_renewals_under_service_churn() {
    let secs: u64 = std::env::var("HOLEPUNCH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECS);
    assert!(
        secs >= 300,
        "a soak needs at least 300 s (warm-up, two windows, several renewals)"
    );
    let seed: u64 = std::env::var("HOLEPUNCH_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("soak: {secs} s, seed {seed} (HOLEPUNCH_SOAK_SEED={seed} repeats the churn)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Warm-up: the first fifth (at least 60 s); the two compared windows are a fifth each.
    let warmup = (secs as f64 / 5.0).max(60.0);
    let window = secs as f64 / 5.0;

    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    lab.count_router_pcp_packets();
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        let config = lab_config(dir, kubeconfig, "pcp", LEASE_SECS, VERIFY_SECS, "");
        for i in 0..STABLE {
            let port = STABLE_FIRST_PORT + i;
            fake.apply_object(load_balancer(&format!("stable-{i}"), port, true, "0"));
        }
        let mut daemon = Daemon::start(&config);
        let pid = daemon.pid();
        let mut log = LogFollower::new(&config.with_file_name("daemon.log"));
        wait_until(
            &daemon,
            "the stable mappings",
            Duration::from_secs(30),
            || {
                log.follow();
                log.granted.len() == usize::from(STABLE)
            },
        );

        let started = Instant::now();
        let end = started + Duration::from_secs(secs);
        let mut samples: Vec<Sample> = Vec::new();
        let mut next_sample = started;
        // Churn Services: port -> (name, annotated).
        let mut live: BTreeMap<u16, (String, bool)> = BTreeMap::new();
        let mut created = 0u64;
        let mut operations: BTreeMap<&str, u64> = BTreeMap::new();
        while Instant::now() < end {
            if Instant::now() >= next_sample {
                samples.push(Sample {
                    at_secs: started.elapsed().as_secs_f64(),
                    rss_kib: memory_kib(pid).0,
                    fds: open_fds(pid),
                });
                log.follow();
                next_sample += Duration::from_secs(SAMPLE_SECS);
            }
            let roll: f64 = rng.random();
            let operation = if live.is_empty() || (live.len() < CHURN_MAX_LIVE && roll < 0.45) {
                let taken: BTreeSet<u16> = live.keys().copied().collect();
                let port = loop {
                    let port = CHURN_FIRST_PORT + rng.random_range(0..CHURN_PORTS);
                    if !taken.contains(&port) {
                        break port;
                    }
                };
                created += 1;
                let name = format!("churn-{created}");
                fake.apply_object(load_balancer(&name, port, true, "0"));
                live.insert(port, (name, true));
                "create"
            } else {
                let index = rng.random_range(0..live.len());
                let port = *live.keys().nth(index).expect("index in range");
                if roll < 0.75 {
                    let (name, _) = live.remove(&port).expect("live");
                    fake.delete_object("Service", "default", &name);
                    "delete"
                } else if roll < 0.9 {
                    let (name, annotated) = live.get_mut(&port).expect("live");
                    *annotated = !*annotated;
                    fake.apply_object(load_balancer(name, port, *annotated, "0"));
                    "toggle annotation"
                } else {
                    let (name, annotated) = &live[&port];
                    let label = rng.random::<u32>().to_string();
                    fake.apply_object(load_balancer(name, port, *annotated, &label));
                    "relabel"
                }
            };
            *operations.entry(operation).or_default() += 1;
            std::thread::sleep(Duration::from_millis(rng.random_range(CHURN_PAUSE_MS)));
        }
        log.follow();
        let ended_at = jiff::Timestamp::now().as_millisecond() as f64 / 1e3;
        let router_packets = lab.router_pcp_packets();
        assert!(
            daemon.0.try_wait().expect("wait").is_none(),
            "the daemon exited:\n{}",
            daemon.log()
        );
        daemon.stop();

        let rss = |s: &Sample| s.rss_kib as f64;
        let fds = |s: &Sample| s.fds as f64;
        let late_from = secs as f64 - window;
        let (rss_base, rss_late) = (
            window_median(&samples, warmup, warmup + window, rss),
            window_median(&samples, late_from, f64::MAX, rss),
        );
        let (fds_base, fds_late) = (
            window_median(&samples, warmup, warmup + window, fds),
            window_median(&samples, late_from, f64::MAX, fds),
        );
        let rss_peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let fds_peak = samples.iter().map(|s| s.fds).max().unwrap_or(0);
        let (mut counted, mut expected) = (0usize, 0.0f64);
        let mut longest_quiet: f64 = 0.0;
        for i in 0..STABLE {
            let port = STABLE_FIRST_PORT + i;
            let granted = log.granted[&port];
            let renewals = log.renewed.get(&port).cloned().unwrap_or_default();
            let last = renewals.last().copied().unwrap_or(granted);
            counted += renewals.len();
            expected += (last - granted) / MEAN_RENEWAL_SECS;
            longest_quiet = longest_quiet.max(ended_at - last);
        }
        let renewal_error = counted as f64 / expected - 1.0;
        let growth = |base: f64, late: f64| late / base - 1.0;
        eprintln!();
        eprintln!("soak figures ({secs} s, seed {seed}, PCP, {LEASE_SECS} s leases):");
        eprintln!(
            "  churn: {operations:?}; {} churn Services live at the end",
            live.len()
        );
        eprintln!(
            "  VmRSS: {:.1} MiB after warm-up ({warmup:.0}-{:.0} s) -> {:.1} MiB at the end, growth {:+.1} % (peak {:.1} MiB)",
            rss_base / 1024.0,
            warmup + window,
            rss_late / 1024.0,
            growth(rss_base, rss_late) * 100.0,
            rss_peak as f64 / 1024.0
        );
        eprintln!(
            "  open fds: {fds_base} after warm-up -> {fds_late} at the end, growth {:+.1} % (peak {fds_peak})",
            growth(fds_base, fds_late) * 100.0
        );
        eprintln!(
            "  renewals of {STABLE} stable mappings: {counted} counted, {expected:.1} expected \
             (span / {MEAN_RENEWAL_SECS} s), error {:+.1} %; longest wait at the end {longest_quiet:.0} s",
            renewal_error * 100.0
        );
        eprintln!(
            "  router: {router_packets} PCP packets in all; daemon warnings/errors logged: {}",
            log.warnings
        );
        measure::report("soak_secs", secs as f64, "s");
        measure::report(
            "soak_rss_growth_pct",
            growth(rss_base, rss_late) * 100.0,
            "%",
        );
        measure::report(
            "soak_fds_growth_pct",
            growth(fds_base, fds_late) * 100.0,
            "%",
        );
        measure::report("soak_renewal_error_pct", renewal_error * 100.0, "%");

        assert!(
            samples.len() as u64 >= secs / SAMPLE_SECS - 2,
            "too few samples"
        );
        assert!(
            growth(rss_base, rss_late) < TOLERANCE,
            "VmRSS grew from {rss_base} to {rss_late} KiB"
        );
        assert!(
            growth(fds_base, fds_late) < TOLERANCE,
            "open fds grew from {fds_base} to {fds_late}"
        );
        assert!(
            renewal_error.abs() < TOLERANCE,
            "{counted} renewals, expected {expected:.1}"
        );
        assert!(
            longest_quiet < MAX_RENEWAL_GAP_SECS,
            "a stable mapping went {longest_quiet:.0} s without a renewal at the end"
        );
    });
}
