//! What an operator watches (README.md, "Monitoring"): Prometheus metrics and a health check, served over
//! HTTP on `metrics.listen` (`/metrics` and `/healthz`).
//!
//! `/metrics` speaks the OpenMetrics 1.0 text format (what Prometheus asks for first) through
//! the official `prometheus-client` crate, and the classic Prometheus text format 0.0.4 to
//! clients that do not ask for OpenMetrics (curl, `promtool check metrics`), as client_golang
//! negotiates it. Names follow the Prometheus conventions: a
//! `holepunch_` prefix, the unit in the name, `_total` on counters. Labels are few and
//! bounded (backend, protocol, state, operation, result, problem kind): never one per Service.
//!
//! `/healthz` answers 200 or 503 with a one-line reason, decided by the pure [`health`]: the
//! event loop must be making progress, and the router may be unreachable only until a lease
//! runs out (then the published Services are down, whatever the daemon does).
//!
//! [`Metrics`] is the router's [`RequestLog`]: `router::instrument::Instrumented` wraps the
//! daemon's `PortMapper` to count every router request by backend, operation and result and
//! time it, without the reconciler knowing.
//!
//! Progress and the systemd watchdog are one thing here: the event loop's passes, its idle
//! waits and every router request that finishes count as progress ([`Metrics::loop_alive`]),
//! and only progress pings the watchdog (`WATCHDOG=1`, at most every
//! [`WATCHDOG_PING_MIN_GAP_MS`]). Nothing pings on a timer of its own, so a loop stuck for
//! `WatchdogSec` is killed, while a long pass of many router requests is not (README,
//! "Monitoring"). `/healthz` calls the loop stuck after the same `WatchdogSec`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::model::{Backend, Problem, ProblemKind, Protocol};
use crate::router::instrument::{Operation, RequestLog};
use crate::state::{MappingStatus, State};

/// `Content-Type` of `/metrics` for clients that accept OpenMetrics (Prometheus does).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of `/metrics` for everyone else (curl, promtool): the classic text format.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long the event loop may go without progress (a pass, or a router call finishing)
/// beyond one verify interval before `/healthz` calls it stuck. A pass may wait on a few
/// router calls that time out (PCP gives up after ~21 s each).
pub const LOOP_STALL_GRACE_SECS: u64 = 300;
/// Progress pings the systemd watchdog at most this often (a busy pass finishes many router
/// requests a second; one datagram each would be waste), or every eighth of `WatchdogSec`
/// when that is shorter.
pub const WATCHDOG_PING_MIN_GAP_MS: u64 = 1_000;
/// A client must send its request headers within this time.
pub const REQUEST_HEADER_TIMEOUT_SECS: u64 = 10;

/// Why the metrics endpoint could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {address}: {source}; free the port, or change \
         metrics.listen (\"\" turns metrics off)"
    )]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the metrics: {0}")]
    Encode(#[source] std::fmt::Error),
}

fn operation_label(operation: Operation) -> &'static str {
    match operation {
        Operation::Map => "map",
        Operation::Unmap => "unmap",
        Operation::Verify => "verify",
        Operation::Probe => "probe",
        Operation::PinholeOpen => "pinhole_open",
        Operation::PinholeClose => "pinhole_close",
    }
}

fn backend_label(backend: Backend) -> &'static str {
    match backend {
        Backend::Upnp => "upnp",
        Backend::Pcp => "pcp",
        Backend::Natpmp => "natpmp",
        Backend::None => "none",
    }
}

fn protocol_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn status_label(status: MappingStatus) -> &'static str {
    match status {
        MappingStatus::Pending => "pending",
        MappingStatus::Active => "active",
        MappingStatus::Failed => "failed",
    }
}

/// Every problem kind, so that `holepunch_problems` shows 0 rather than nothing.
const PROBLEM_KINDS: [ProblemKind; 11] = [
    ProblemKind::InvalidAnnotation,
    ProblemKind::DeniedPort,
    ProblemKind::PortConflict,
    ProblemKind::NoTarget,
    ProblemKind::TargetNotAllowed,
    ProblemKind::UnsupportedProtocol,
    ProblemKind::RouterRefused,
    ProblemKind::DoubleNat,
    ProblemKind::TargetFallback,
    ProblemKind::PortInUse,
    ProblemKind::OverQuota,
];

fn problem_label(kind: ProblemKind) -> &'static str {
    match kind {
        ProblemKind::InvalidAnnotation => "invalid_annotation",
        ProblemKind::DeniedPort => "denied_port",
        ProblemKind::PortConflict => "conflict",
        ProblemKind::NoTarget => "no_target",
        ProblemKind::TargetNotAllowed => "target_not_allowed",
        ProblemKind::UnsupportedProtocol => "unsupported_protocol",
        ProblemKind::RouterRefused => "router_refusal",
        ProblemKind::DoubleNat => "double_nat",
        ProblemKind::TargetFallback => "target_fallback",
        ProblemKind::PortInUse => "port_in_use",
        ProblemKind::OverQuota => "over_quota",
    }
}

type MappingLabels = [(&'static str, &'static str); 3];
type RequestLabels = [(&'static str, &'static str); 3];
type LatencyLabels = [(&'static str, &'static str); 2];
type OneLabel = [(&'static str, &'static str); 1];
type AddressLabels = [(&'static str, String); 2];
/// A metric that is present or absent as a whole.
type NoLabels = Vec<(&'static str, &'static str)>;

fn router_latency_histogram() -> Histogram {
    // 5 ms .. ~41 s: miniupnpd answers in 8-120 ms; PCP gives up after ~21 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Sets `family` (`holepunch_mappings` or `holepunch_pinholes`) to how many `records` there
/// are per backend, protocol and status; returns those counts.
fn set_counts(
    family: &Family<MappingLabels, Gauge>,
    records: impl Iterator<Item = (Backend, Protocol, MappingStatus)>,
) -> std::collections::BTreeMap<MappingLabels, i64> {
    let mut counts = std::collections::BTreeMap::new();
    for (backend, protocol, status) in records {
        *counts
            .entry([
                ("backend", backend_label(backend)),
                ("protocol", protocol_label(protocol)),
                ("state", status_label(status)),
            ])
            .or_default() += 1;
    }
    for (labels, count) in &counts {
        family.get_or_create(labels).set(*count);
    }
    counts
}

/// Removes the series of `family` that were `exposed` and have no count now; returns the
/// series exposed from now on.
fn drop_gone(
    family: &Family<MappingLabels, Gauge>,
    exposed: &[MappingLabels],
    now: std::collections::BTreeMap<MappingLabels, i64>,
) -> Vec<MappingLabels> {
    for gone in exposed.iter().filter(|labels| !now.contains_key(*labels)) {
        family.remove(gone);
    }
    now.into_keys().collect()
}

/// The daemon's metrics and what `/healthz` decides on. One per daemon, shared by the event
/// loop and the HTTP listener.
pub struct Metrics {
    registry: Registry,
    mappings: Family<MappingLabels, Gauge>,
    pinholes: Family<MappingLabels, Gauge>,
    router_requests: Family<RequestLabels, Counter>,
    router_request_duration: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    router_up: Gauge,
    external_address: Family<AddressLabels, Gauge>,
    reconcile_duration: Histogram,
    lease_expiry: Family<NoLabels, Gauge<f64, AtomicU64>>,
    watch_restarts: Family<OneLabel, Counter>,
    problems: Family<OneLabel, Gauge>,
    state_write_failures: Counter,
    cluster_writes_dropped: Family<OneLabel, Counter>,
    cluster_writes_queued: Gauge,
    leader: Gauge,
    observed: Mutex<Observed>,
    watchdog: Mutex<WatchdogPings>,
}

/// The systemd watchdog as progress pings it.
#[derive(Debug, Default)]
struct WatchdogPings {
    /// `WatchdogSec`, when systemd asked for pings.
    interval: Option<Duration>,
    last_ping: Option<Instant>,
}

impl WatchdogPings {
    /// Whether progress at `now` should ping (the first progress always does).
    fn due(&mut self, now: Instant) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        // Well under the idle wait's cadence (a quarter of `WatchdogSec`): an idle tick that
        // comes a hair early after the last ping must still ping, or the watchdog would see
        // twice that cadence of silence.
        let gap = Duration::from_millis(WATCHDOG_PING_MIN_GAP_MS).min(interval / 8);
        if self
            .last_ping
            .is_some_and(|last| now.saturating_duration_since(last) < gap)
        {
            return false;
        }
        self.last_ping = Some(now);
        true
    }
}

/// What the health decision needs, as the event loop last saw it.
#[derive(Debug, Clone)]
struct Observed {
    last_progress: Timestamp,
    unreachable_since: Option<Timestamp>,
    waiting_for_cluster: Option<String>,
    lease_expiries: Vec<Timestamp>,
    lease_secs: u32,
    verify_interval: Duration,
    state_write_error: Option<String>,
    mappings_up: usize,
    /// The series of `holepunch_mappings` and of the address info metric now exposed.
    mapping_series: Vec<MappingLabels>,
    /// The series of `holepunch_pinholes` now exposed.
    pinhole_series: Vec<MappingLabels>,
    address_series: Option<AddressLabels>,
}

impl Metrics {
    /// Registers every metric; `lease_secs` and `verify_interval` as configured (see
    /// [`Metrics::configure`] after a reload).
    pub fn new(lease_secs: u32, verify_interval: Duration) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("holepunch");
        let mappings = Family::<MappingLabels, Gauge>::default();
        registry.register(
            "mappings",
            "Mappings recorded in the state file, by backend, protocol and state (pending, active, failed)",
            mappings.clone(),
        );
        let pinholes = Family::<MappingLabels, Gauge>::default();
        registry.register(
            "pinholes",
            "IPv6 pinholes recorded in the state file, by backend, protocol and state (pending, active, failed), as for mappings (README, \"IPv6\")",
            pinholes.clone(),
        );
        let router_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "router_requests",
            "Requests to the router, by backend, operation (map, unmap, verify, probe, pinhole_open, pinhole_close) and result (ok, conflict, refused, unreachable)",
            router_requests.clone(),
        );
        let router_request_duration =
            Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                router_latency_histogram,
            );
        registry.register_with_unit(
            "router_request_duration",
            "How long router requests took, retransmissions included",
            Unit::Seconds,
            router_request_duration.clone(),
        );
        let router_up = Gauge::default();
        registry.register(
            "router_up",
            "1 if the router answered the last request, 0 if it did not answer",
            router_up.clone(),
        );
        let external_address = Family::<AddressLabels, Gauge>::default();
        registry.register(
            "router_external_address_info",
            "The router's external IPv4 address, as it reported with the latest grant",
            external_address.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 4.0, 10));
        registry.register_with_unit(
            "reconcile_duration",
            "How long one reconcile pass took (plan, router requests, state save)",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let lease_expiry = Family::<NoLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "lease_expiry",
            "Seconds until the earliest lease the router granted runs out (negative: it ran out); absent without finite leases",
            Unit::Seconds,
            lease_expiry.clone(),
        );
        let watch_restarts = Family::<OneLabel, Counter>::default();
        registry.register(
            "watch_restarts",
            "Cluster watches interrupted and restarted, by resource",
            watch_restarts.clone(),
        );
        let problems = Family::<OneLabel, Gauge>::default();
        registry.register(
            "problems",
            "Services with a problem, by kind",
            problems.clone(),
        );
        for kind in PROBLEM_KINDS {
            problems
                .get_or_create(&[("kind", problem_label(kind))])
                .set(0);
        }
        let state_write_failures = Counter::default();
        registry.register(
            "state_write_failures",
            "Failed saves of the state file",
            state_write_failures.clone(),
        );
        let cluster_writes_dropped = Family::<OneLabel, Counter>::default();
        registry.register(
            "cluster_writes_dropped",
            "Events on Services never written: dropped from a full queue (queue_full) or over a Service's rate (rate_limited)",
            cluster_writes_dropped.clone(),
        );
        for reason in ["queue_full", "rate_limited"] {
            let _ = cluster_writes_dropped.get_or_create(&[("reason", reason)]);
        }
        let cluster_writes_queued = Gauge::default();
        registry.register(
            "cluster_writes_queued",
            "Events and Service status writes waiting for the Kubernetes API",
            cluster_writes_queued.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 if this host acts (writes the router and nftables), 0 if it stands by (README, \"High availability\"); always 1 without [ha]",
            leader.clone(),
        );
        leader.set(1);
        Arc::new(Metrics {
            registry,
            mappings,
            pinholes,
            router_requests,
            router_request_duration,
            router_up,
            external_address,
            reconcile_duration,
            lease_expiry,
            watch_restarts,
            problems,
            state_write_failures,
            cluster_writes_dropped,
            cluster_writes_queued,
            leader,
            watchdog: Mutex::new(WatchdogPings::default()),
            observed: Mutex::new(Observed {
                last_progress: Timestamp::now(),
                unreachable_since: None,
                waiting_for_cluster: None,
                lease_expiries: Vec::new(),
                lease_secs,
                verify_interval,
                state_write_error: None,
                mappings_up: 0,
                mapping_series: Vec::new(),
                pinhole_series: Vec::new(),
                address_series: None,
            }),
        })
    }

    fn observed(&self) -> MutexGuard<'_, Observed> {
        // A panic elsewhere while holding the lock leaves plain data behind: still usable.
        self.observed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configured lease and verify interval (at start and after a reload).
    pub fn configure(&self, lease_secs: u32, verify_interval: Duration) {
        let mut observed = self.observed();
        observed.lease_secs = lease_secs;
        observed.verify_interval = verify_interval;
    }

    /// Whether this host acts (`holepunch_leader`).
    pub fn leader(&self, acting: bool) {
        self.leader.set(i64::from(acting));
    }

    /// The daemon cannot reach the cluster yet (`why`), or can again (`None`); nothing is
    /// reconciled, so nothing is renewed, meanwhile.
    pub fn waiting_for_cluster(&self, why: Option<&str>) {
        let mut observed = self.observed();
        observed.last_progress = Timestamp::now();
        observed.waiting_for_cluster = why.map(|why| first_line(why).to_owned());
    }

    /// systemd's `WatchdogSec` (from `WATCHDOG_USEC`), or `None`: from now on progress pings
    /// the watchdog, and `/healthz` calls a loop stuck after this long without progress.
    pub fn watch_over(&self, watchdog: Option<Duration>) {
        self.pings().interval = watchdog;
    }

    /// How often an idle loop should say it is alive: well within `WatchdogSec` and the
    /// `/healthz` stall limit.
    pub fn alive_every(&self) -> Duration {
        match self.pings().interval {
            Some(interval) => interval / 4,
            None => Duration::from_secs(LOOP_STALL_GRACE_SECS / 4),
        }
    }

    fn pings(&self) -> MutexGuard<'_, WatchdogPings> {
        self.watchdog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The event loop made progress: a pass, a router request finished, or it waits, alive,
    /// for something. Pings the systemd watchdog (see the module documentation).
    pub fn loop_alive(&self) {
        self.observed().last_progress = Timestamp::now();
        self.ping_watchdog();
    }

    fn ping_watchdog(&self) {
        if self.pings().due(Instant::now()) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// Events dropped by the cluster writer (`reason`: `queue_full` or `rate_limited`).
    pub fn cluster_writes_dropped(&self, reason: &'static str, count: u64) {
        if count > 0 {
            self.cluster_writes_dropped
                .get_or_create(&[("reason", reason)])
                .inc_by(count);
        }
    }

    /// Events and status writes waiting for the API now.
    pub fn cluster_writes_queued(&self, queued: usize) {
        self.cluster_writes_queued
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    fn count_request(
        &self,
        backend: &'static str,
        operation: Operation,
        result: &'static str,
        started: Timestamp,
        took: Duration,
    ) {
        self.router_requests
            .get_or_create(&[
                ("backend", backend),
                ("operation", operation_label(operation)),
                ("result", result),
            ])
            .inc();
        self.router_request_duration
            .get_or_create(&[
                ("backend", backend),
                ("operation", operation_label(operation)),
            ])
            .observe(took.as_secs_f64());
        {
            let mut observed = self.observed();
            observed.last_progress = Timestamp::now();
            if result == "unreachable" {
                self.router_up.set(0);
                observed.unreachable_since.get_or_insert(started);
            } else {
                self.router_up.set(1);
                observed.unreachable_since = None;
            }
        }
        // A long pass proves itself alive between its router requests.
        self.ping_watchdog();
    }

    /// A cluster watch was interrupted and restarts with backoff.
    pub fn watch_restarted(&self, resource: &'static str) {
        self.watch_restarts
            .get_or_create(&[("resource", resource)])
            .inc();
    }

    /// After a reconcile pass: the mappings as recorded, the problems reported, and whether
    /// the state could be saved.
    pub fn reconciled(
        &self,
        took: Duration,
        state: &State,
        problems: &[Problem],
        save_error: Option<&str>,
    ) {
        self.reconcile_duration.observe(took.as_secs_f64());
        self.observe_state(state, problems, save_error);
    }

    /// The mappings as recorded, the problems reported, and whether the state could be
    /// saved (also while no router is found and nothing is reconciled).
    pub fn observe_state(&self, state: &State, problems: &[Problem], save_error: Option<&str>) {
        // Set the new counts, then drop the series that went away: a scrape in between
        // never sees a mapping count fall to nothing and come back.
        let counts = set_counts(
            &self.mappings,
            state
                .mappings
                .values()
                .map(|r| (r.backend, r.protocol, r.status)),
        );
        let pinholes = set_counts(
            &self.pinholes,
            state
                .pinholes
                .values()
                .map(|r| (r.backend, r.protocol, r.status)),
        );
        let address = state
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Active && r.external_address.is_some())
            .max_by_key(|r| r.times.granted_at)
            .and_then(|r| {
                Some([
                    ("backend", backend_label(r.backend).to_owned()),
                    ("address", r.external_address?.to_string()),
                ])
            });
        if let Some(labels) = &address {
            self.external_address.get_or_create(labels).set(1);
        }
        {
            let mut observed = self.observed();
            observed.mapping_series = drop_gone(&self.mappings, &observed.mapping_series, counts);
            observed.pinhole_series = drop_gone(&self.pinholes, &observed.pinhole_series, pinholes);
            if let Some(gone) = observed.address_series.take()
                && Some(&gone) != address.as_ref()
            {
                self.external_address.remove(&gone);
            }
            observed.address_series = address;
        }
        for kind in PROBLEM_KINDS {
            let owners: std::collections::BTreeSet<_> = problems
                .iter()
                .filter(|p| p.kind == kind)
                .map(|p| &p.owner)
                .collect();
            self.problems
                .get_or_create(&[("kind", problem_label(kind))])
                .set(i64::try_from(owners.len()).unwrap_or(i64::MAX));
        }
        if save_error.is_some() {
            self.state_write_failures.inc();
        }
        let mut observed = self.observed();
        observed.last_progress = Timestamp::now();
        observed.lease_expiries = lease_expiries(state);
        observed.state_write_error = save_error.map(str::to_owned);
        observed.mappings_up = state
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Active)
            .count();
    }

    /// The metrics in the OpenMetrics text format, lease expiry counted from `now`.
    pub fn encode(&self, now: Timestamp) -> Result<String, MetricsError> {
        let earliest = self.observed().lease_expiries.iter().min().copied();
        match earliest {
            Some(at) => {
                let left = at.duration_since(now).as_secs_f64();
                self.lease_expiry.get_or_create(&Vec::new()).set(left);
            }
            None => self.lease_expiry.clear(),
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .map_err(MetricsError::Encode)?;
        Ok(text)
    }

    /// What `/healthz` answers now.
    pub fn health(&self, now: Timestamp) -> Health {
        let observed = self.observed().clone();
        let watchdog = self.pings().interval;
        health(&HealthInputs {
            now,
            last_progress: observed.last_progress,
            stall_limit: stall_limit(watchdog, observed.verify_interval),
            unreachable_since: observed.unreachable_since,
            waiting_for_cluster: observed.waiting_for_cluster.as_deref(),
            lease_expiries: &observed.lease_expiries,
            lease_secs: observed.lease_secs,
            state_write_error: observed.state_write_error.as_deref(),
            mappings_up: observed.mappings_up,
        })
    }
}

/// How long the loop may go without progress before `/healthz` calls it stuck: systemd's
/// `WatchdogSec` when it watches (then both agree: the watchdog kills what `/healthz` calls
/// stuck), else one verify interval and [`LOOP_STALL_GRACE_SECS`].
pub fn stall_limit(watchdog: Option<Duration>, verify_interval: Duration) -> Duration {
    watchdog.unwrap_or(verify_interval + Duration::from_secs(LOOP_STALL_GRACE_SECS))
}

/// When the leases the router granted run out (granted ones only, whatever their state now:
/// a lease whose renewal failed still ran out at its time).
fn lease_expiries(state: &State) -> Vec<Timestamp> {
    state
        .mappings
        .values()
        .filter(|r| r.backend != Backend::None && r.times.granted_at.is_some())
        .filter_map(|r| r.times.expires_at)
        .collect()
}

/// The facts `/healthz` decides on.
#[derive(Debug, Clone)]
pub struct HealthInputs<'a> {
    pub now: Timestamp,
    /// The last pass of the event loop, or router call finishing.
    pub last_progress: Timestamp,
    /// Longer than this without progress: the loop is stuck.
    pub stall_limit: Duration,
    /// Since when the router has not answered; `None` while it answers.
    pub unreachable_since: Option<Timestamp>,
    /// Why the cluster cannot be reached yet, while the daemon waits for it.
    pub waiting_for_cluster: Option<&'a str>,
    /// When the granted leases run out.
    pub lease_expiries: &'a [Timestamp],
    /// `router.lease_seconds` (0: permanent).
    pub lease_secs: u32,
    /// The last state save failed with this.
    pub state_write_error: Option<&'a str>,
    pub mappings_up: usize,
}

/// `/healthz`'s answer: healthy or not, and one line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub reason: String,
}

/// Healthy while the event loop makes progress and no lease runs out unrenewed: while the
/// daemon waits for the cluster (it renews nothing then), or while the router does not answer
/// (nor may it be silent for a whole lease). A failed state save is unhealthy too, since a
/// restart would then forget mappings.
pub fn health(inputs: &HealthInputs<'_>) -> Health {
    let secs = |from: Timestamp| inputs.now.duration_since(from).as_secs().max(0);
    let stalled = secs(inputs.last_progress);
    if u64::try_from(stalled).unwrap_or(0) > inputs.stall_limit.as_secs() {
        return Health {
            healthy: false,
            reason: format!(
                "the event loop has made no progress for {stalled} s; restart holepunch and \
                 report its log"
            ),
        };
    }
    if let Some(why) = inputs.waiting_for_cluster {
        // NOTE: nothing is renewed before the cluster is read (ARCHITECTURE.md, "State lifecycle":
        // nothing is changed while the cluster cannot be read), so recorded leases run out meanwhile.
        let lapsed = inputs
            .lease_expiries
            .iter()
            .filter(|at| **at <= inputs.now)
            .count();
        return Health {
            healthy: lapsed == 0,
            reason: if lapsed == 0 {
                format!("waiting for the cluster: {why}")
            } else {
                format!("waiting for the cluster, and {lapsed} leases ran out meanwhile: {why}")
            },
        };
    }
    if let Some(since) = inputs.unreachable_since {
        let silent = secs(since);
        let lapsed = inputs
            .lease_expiries
            .iter()
            .filter(|at| **at >= since && **at <= inputs.now)
            .count();
        if lapsed > 0 {
            return Health {
                healthy: false,
                reason: format!(
                    "the router has not answered for {silent} s and {lapsed} leases ran out \
                     meanwhile, so those Services are unreachable; check the router"
                ),
            };
        }
        if inputs.lease_secs > 0 && silent >= i64::from(inputs.lease_secs) {
            return Health {
                healthy: false,
                reason: format!(
                    "the router has not answered for {silent} s, longer than a lease ({} s); \
                     check the router",
                    inputs.lease_secs
                ),
            };
        }
        let holds = match inputs
            .lease_expiries
            .iter()
            .filter(|at| **at > inputs.now)
            .min()
        {
            Some(at) => format!(
                "; the earliest lease runs out in {} s",
                secs_until(inputs.now, *at)
            ),
            None => String::new(),
        };
        return Health {
            healthy: true,
            reason: format!("retrying: the router has not answered for {silent} s{holds}"),
        };
    }
    if let Some(error) = inputs.state_write_error {
        return Health {
            healthy: false,
            reason: format!("cannot save the state file: {}", first_line(error)),
        };
    }
    Health {
        healthy: true,
        reason: format!("ok: {} mappings up", inputs.mappings_up),
    }
}

fn secs_until(now: Timestamp, at: Timestamp) -> i64 {
    at.duration_since(now).as_secs()
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

impl RequestLog for Metrics {
    fn router_request(
        &self,
        backend: Backend,
        operation: Operation,
        result: &'static str,
        started: Timestamp,
        took: Duration,
    ) {
        self.count_request(backend_label(backend), operation, result, started, took);
    }

    /// A probe that found nothing is counted with `backend="unknown"`,
    /// `result="unreachable"`.
    fn probed(&self, found: Option<Backend>, started: Timestamp, took: Duration) {
        match found {
            Some(backend) => self.router_request(backend, Operation::Probe, "ok", started, took),
            None => {
                self.count_request("unknown", Operation::Probe, "unreachable", started, took);
            }
        }
    }
}

/// Binds the metrics listener.
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })
}

/// Serves `/metrics` and `/healthz` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: cannot accept a connection");
                // NOTE: e.g. EMFILE; do not spin while the condition lasts.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let openmetrics = request
                    .headers()
                    .get_all(hyper::header::ACCEPT)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(accepts_openmetrics));
                let response = respond(
                    &metrics,
                    request.method(),
                    request.uri().path(),
                    openmetrics,
                );
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(REQUEST_HEADER_TIMEOUT_SECS))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// Whether an `Accept` header value names OpenMetrics.
fn accepts_openmetrics(accept: &str) -> bool {
    accept
        .split(',')
        .any(|kind| kind.trim().starts_with("application/openmetrics-text"))
}

/// OpenMetrics text as the classic Prometheus text format 0.0.4: counter families are named
/// with their `_total` suffix, and `# UNIT` and `# EOF` go (the classic parser knows neither).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The answer to one request; `openmetrics`: the client accepts OpenMetrics.
fn respond(
    metrics: &Metrics,
    method: &Method,
    path: &str,
    openmetrics: bool,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".to_owned(),
        );
    }
    let now = Timestamp::now();
    match path {
        "/metrics" => match metrics.encode(now) {
            Ok(text) if openmetrics => with_type(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, text),
            Ok(text) => with_type(
                StatusCode::OK,
                PROMETHEUS_TEXT_CONTENT_TYPE,
                to_prometheus_text(&text),
            ),
            Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/healthz" => {
            let health = metrics.health(now);
            let status = if health.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            plain(status, format!("{}\n", health.reason))
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found; holepunch serves /metrics and /healthz\n".to_owned(),
        ),
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body)
}

fn with_type(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Owner, TargetSource};
    use crate::model::{Lease, MappingKey};
    use crate::router::NoRouter;
    use crate::router::instrument::Instrumented;
    use crate::router::{Grant, MapRequest, PortMapper, RouterError};
    use crate::state::MappingRecord;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    fn inputs<'a>(now: &str, expiries: &'a [Timestamp]) -> HealthInputs<'a> {
        HealthInputs {
            now: at(now),
            last_progress: at(now),
            stall_limit: Duration::from_secs(360),
            unreachable_since: None,
            waiting_for_cluster: None,
            lease_expiries: expiries,
            lease_secs: 120,
            state_write_error: None,
            mappings_up: 2,
        }
    }

    #[test]
    fn health_follows_the_loop_the_router_and_the_leases() {
        let expiries = [at("2025-01-01T00:02:00Z"), at("2025-01-01T00:03:00Z")];
        let cases: Vec<(&str, HealthInputs<'_>, bool, &str)> = vec![
            (
                "all well",
                inputs("2025-01-01T00:01:00Z", &expiries),
                true,
                "ok: 2 mappings up",
            ),
            (
                "router silent, leases still hold",
                HealthInputs {
                    unreachable_since: Some(at("2025-01-01T00:00:30Z")),
                    ..inputs("2025-01-01T00:01:00Z", &expiries)
                },
                true,
                "retrying: the router has not answered for 30 s; the earliest lease runs out in 60 s",
            ),
            (
                "router silent while a lease ran out",
                HealthInputs {
                    unreachable_since: Some(at("2025-01-01T00:00:30Z")),
                    ..inputs("2025-01-01T00:02:00Z", &expiries)
                },
                false,
                "the router has not answered for 90 s and 1 leases ran out",
            ),
            (
                "a lease that ran out before the silence does not count",
                HealthInputs {
                    unreachable_since: Some(at("2025-01-01T00:02:30Z")),
                    ..inputs("2025-01-01T00:02:40Z", &expiries)
                },
                true,
                "retrying",
            ),
            (
                "router silent for a whole lease, nothing granted",
                HealthInputs {
                    unreachable_since: Some(at("2025-01-01T00:00:00Z")),
                    ..inputs("2025-01-01T00:02:00Z", &[])
                },
                false,
                "longer than a lease (120 s)",
            ),
            (
                "permanent leases: silence alone is retrying",
                HealthInputs {
                    unreachable_since: Some(at("2025-01-01T00:00:00Z")),
                    lease_secs: 0,
                    ..inputs("2025-01-01T01:00:00Z", &[])
                },
                true,
                "retrying",
            ),
            (
                "no kubeconfig yet, leases hold",
                HealthInputs {
                    waiting_for_cluster: Some("no kubeconfig at /etc/holepunch/kubeconfig"),
                    ..inputs("2025-01-01T00:01:00Z", &expiries)
                },
                true,
                "waiting for the cluster: no kubeconfig",
            ),
            (
                "no kubeconfig yet, a lease ran out",
                HealthInputs {
                    waiting_for_cluster: Some("no kubeconfig at /etc/holepunch/kubeconfig"),
                    ..inputs("2025-01-01T00:02:30Z", &expiries)
                },
                false,
                "waiting for the cluster, and 1 leases ran out meanwhile",
            ),
            (
                "stuck loop",
                HealthInputs {
                    last_progress: at("2025-01-01T00:00:00Z"),
                    ..inputs("2025-01-01T00:06:01Z", &expiries)
                },
                false,
                "no progress for 361 s",
            ),
            (
                "state not saved",
                HealthInputs {
                    state_write_error: Some("disk full\nsecond line"),
                    ..inputs("2025-01-01T00:01:00Z", &expiries)
                },
                false,
                "cannot save the state file: disk full",
            ),
        ];
        for (name, input, healthy, reason) in cases {
            let health = health(&input);
            assert_eq!(health.healthy, healthy, "{name}: {health:?}");
            assert!(health.reason.contains(reason), "{name}: {health:?}");
            assert!(!health.reason.contains('\n'), "{name}: one line");
        }
    }

    fn record(port: u16, status: MappingStatus, granted: Option<&str>) -> MappingRecord {
        let internal = Endpoint {
            address: "192.168.77.10".parse().expect("ip"),
            port,
        };
        let mut record = MappingRecord::leftover(
            Owner {
                namespace: "default".into(),
                name: format!("web{port}"),
            },
            MappingKey {
                protocol: Protocol::Tcp,
                external_port: port,
            },
            internal,
            Backend::Pcp,
        );
        record.target_source = TargetSource::NodePort;
        record.status = status;
        record.times.granted_at = granted.map(at);
        record.times.lifetime_secs = 120;
        record.times.expires_at = granted.map(|g| at(g) + jiff::SignedDuration::from_secs(120));
        record.external_address = granted.map(|_| "11.22.33.44".parse().expect("ip"));
        record
    }

    fn state(records: Vec<MappingRecord>) -> State {
        let mut state = State::default();
        for record in records {
            state.mappings.insert(record.key(), record);
        }
        state
    }

    #[test]
    fn progress_pings_the_watchdog_at_most_once_a_second_and_only_when_asked() {
        let now = Instant::now();
        let mut off = WatchdogPings::default();
        assert!(!off.due(now), "no WATCHDOG_USEC: no pings");
        let mut on = WatchdogPings {
            interval: Some(Duration::from_secs(10)),
            last_ping: None,
        };
        assert!(on.due(now), "the first progress pings");
        assert!(!on.due(now + Duration::from_millis(500)));
        assert!(on.due(now + Duration::from_millis(1_000)));
        // Nothing pings without progress: `due` is only asked on progress.
        assert!(on.due(now + Duration::from_secs(60)));
    }

    #[test]
    fn an_idle_tick_a_hair_early_still_pings_under_a_short_watchdog() {
        // WatchdogSec=4: the idle wait ticks every second; a tick handled 1 ms sooner after
        // its deadline than the last one must not be skipped (2 s of silence, half of it).
        let watchdog = Duration::from_secs(4);
        let metrics = Metrics::new(3600, Duration::from_secs(60));
        metrics.watch_over(Some(watchdog));
        let every = metrics.alive_every();
        assert_eq!(every, Duration::from_secs(1));
        let mut pings = WatchdogPings {
            interval: Some(watchdog),
            last_ping: None,
        };
        let start = Instant::now();
        assert!(pings.due(start + Duration::from_millis(3)));
        assert!(
            pings.due(start + every + Duration::from_millis(2)),
            "a tick 999 ms after the last ping pings"
        );
        assert!(!pings.due(start + every + Duration::from_millis(100)));
    }

    #[test]
    fn healthz_calls_the_loop_stuck_after_watchdog_sec_when_systemd_watches() {
        let verify = Duration::from_secs(60);
        assert_eq!(
            stall_limit(Some(Duration::from_secs(30)), verify),
            Duration::from_secs(30)
        );
        assert_eq!(stall_limit(None, verify), Duration::from_secs(360));
        let metrics = Metrics::new(3600, verify);
        assert_eq!(metrics.alive_every(), Duration::from_secs(75));
        metrics.watch_over(Some(Duration::from_secs(10)));
        assert_eq!(metrics.alive_every(), Duration::from_millis(2_500));
        let at = |secs: i64| {
            Timestamp::now()
                .checked_add(jiff::SignedDuration::from_secs(secs))
                .expect("time")
        };
        metrics.loop_alive();
        assert!(metrics.health(at(9)).healthy);
        let stuck = metrics.health(at(12));
        assert!(
            !stuck.healthy && stuck.reason.contains("no progress"),
            "{stuck:?}"
        );
    }

    #[test]
    fn metrics_say_what_the_state_holds() {
        let metrics = Metrics::new(120, Duration::from_secs(60));
        let mut state = state(vec![
            record(8080, MappingStatus::Active, Some("2025-01-01T00:00:00Z")),
            record(8081, MappingStatus::Active, Some("2025-01-01T00:00:30Z")),
            record(8082, MappingStatus::Failed, None),
        ]);
        for (port, status) in [
            (8080, MappingStatus::Active),
            (8081, MappingStatus::Pending),
        ] {
            let mut pinhole = crate::state::PinholeRecord::example(port);
            pinhole.status = status;
            state.pinholes.insert(pinhole.key(), pinhole);
        }
        let problems = vec![
            Problem {
                owner: Owner {
                    namespace: "default".into(),
                    name: "web8082".into(),
                },
                kind: ProblemKind::PortConflict,
                message: "taken".into(),
                detail: None,
            },
            Problem::new(
                Owner::new("tenant", "greedy"),
                ProblemKind::OverQuota,
                "48 external port(s) not published",
            ),
        ];
        metrics.reconciled(Duration::from_millis(30), &state, &problems, None);
        let text = metrics.encode(at("2025-01-01T00:01:00Z")).expect("encode");
        for line in [
            "holepunch_mappings{backend=\"pcp\",protocol=\"tcp\",state=\"active\"} 2",
            "holepunch_mappings{backend=\"pcp\",protocol=\"tcp\",state=\"failed\"} 1",
            "holepunch_pinholes{backend=\"pcp\",protocol=\"tcp\",state=\"active\"} 1",
            "holepunch_pinholes{backend=\"pcp\",protocol=\"tcp\",state=\"pending\"} 1",
            "holepunch_problems{kind=\"conflict\"} 1",
            "holepunch_problems{kind=\"double_nat\"} 0",
            "holepunch_problems{kind=\"over_quota\"} 1",
            "holepunch_problems{kind=\"port_in_use\"} 0",
            "holepunch_problems{kind=\"target_fallback\"} 0",
            "holepunch_router_external_address_info{backend=\"pcp\",address=\"11.22.33.44\"} 1",
            "holepunch_lease_expiry_seconds 60.0",
            "holepunch_reconcile_duration_seconds_count 1",
            "holepunch_state_write_failures_total 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(!text.contains("web8080"), "no label per Service:\n{text}");

        // Nothing granted: no lease metric at all rather than a made-up number.
        metrics.reconciled(Duration::ZERO, &State::default(), &[], Some("disk full"));
        let text = metrics.encode(Timestamp::now()).expect("encode");
        assert!(
            !text.contains("holepunch_mappings{"),
            "gone mappings go: {text}"
        );
        assert!(
            !text.contains("holepunch_pinholes{"),
            "gone pinholes go: {text}"
        );
        assert!(!text.contains("address=\""), "{text}");
        assert!(!text.contains("holepunch_lease_expiry_seconds "), "{text}");
        assert!(
            text.contains("holepunch_state_write_failures_total 1"),
            "{text}"
        );
        assert!(!metrics.health(Timestamp::now()).healthy);
    }

    /// A router that never answers.
    struct Silent;

    impl PortMapper for Silent {
        fn backend(&self) -> Backend {
            Backend::Natpmp
        }
        async fn map(&mut self, _request: &MapRequest) -> Result<Grant, RouterError> {
            Err(RouterError::silent_for_tests())
        }
        async fn unmap(&mut self, _lease: &Lease) -> Result<(), RouterError> {
            Err(RouterError::silent_for_tests())
        }
    }

    fn request() -> MapRequest {
        MapRequest {
            owner: Owner {
                namespace: "default".into(),
                name: "web".into(),
            },
            protocol: Protocol::Udp,
            external_port: 8080,
            internal: Endpoint {
                address: "192.168.77.10".parse().expect("ip"),
                port: 8080,
            },
            lifetime_secs: 120,
            nonce: None,
        }
    }

    #[tokio::test]
    async fn instrumented_requests_are_counted_by_result_and_move_router_up() {
        let metrics = Metrics::new(120, Duration::from_secs(60));
        let mut silent = Silent;
        let result = Instrumented::new(&mut silent, &*metrics)
            .map(&request())
            .await;
        assert!(matches!(result, Err(RouterError::NoAnswer { .. })));
        let text = metrics.encode(Timestamp::now()).expect("encode");
        assert!(text.contains("holepunch_router_requests_total{backend=\"natpmp\",operation=\"map\",result=\"unreachable\"} 1"), "{text}");
        assert!(text.contains("holepunch_router_up 0"), "{text}");
        assert!(
            text.contains("holepunch_router_request_duration_seconds_count{backend=\"natpmp\",operation=\"map\"} 1"),
            "{text}"
        );
        assert!(metrics.observed().unreachable_since.is_some());

        let mut none = NoRouter;
        let mut instrumented = Instrumented::new(&mut none, &*metrics);
        instrumented.map(&request()).await.expect("granted");
        // A verify that found nothing lost is a verify all the same.
        instrumented.lost(&[]).await.expect("nothing lost");
        let text = metrics.encode(Timestamp::now()).expect("encode");
        assert!(text.contains("holepunch_router_requests_total{backend=\"none\",operation=\"map\",result=\"ok\"} 1"), "{text}");
        assert!(text.contains("holepunch_router_requests_total{backend=\"none\",operation=\"verify\",result=\"ok\"} 1"), "{text}");
        assert!(text.contains("holepunch_router_up 1"), "{text}");
        assert!(metrics.observed().unreachable_since.is_none());

        // A probe that found nothing: the router is silent, whatever protocol it speaks.
        metrics.probed(None, Timestamp::now(), Duration::from_secs(3));
        let text = metrics.encode(Timestamp::now()).expect("encode");
        assert!(
            text.contains(
                "holepunch_router_requests_total{backend=\"unknown\",operation=\"probe\",result=\"unreachable\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("holepunch_router_up 0"), "{text}");
    }

    #[test]
    fn http_answers_per_path_and_method() {
        let metrics = Metrics::new(120, Duration::from_secs(60));
        let ok = respond(&metrics, &Method::GET, "/healthz", false);
        assert_eq!(ok.status(), StatusCode::OK);
        let scrape = respond(&metrics, &Method::GET, "/metrics", true);
        assert_eq!(scrape.status(), StatusCode::OK);
        assert_eq!(
            scrape.headers()[hyper::header::CONTENT_TYPE],
            OPENMETRICS_CONTENT_TYPE
        );
        let classic = respond(&metrics, &Method::GET, "/metrics", false);
        assert_eq!(
            classic.headers()[hyper::header::CONTENT_TYPE],
            PROMETHEUS_TEXT_CONTENT_TYPE
        );
        assert_eq!(
            respond(&metrics, &Method::GET, "/nope", false).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&metrics, &Method::POST, "/metrics", false).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn accept_header_picks_the_format() {
        assert!(accepts_openmetrics(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
        ));
        assert!(!accepts_openmetrics("*/*"));
        assert!(!accepts_openmetrics("text/plain"));
    }

    #[test]
    fn classic_text_names_counters_with_total_and_drops_openmetrics_lines() {
        let openmetrics = "# HELP x_requests Requests.\n# TYPE x_requests counter\n\
                           x_requests_total{a=\"b\"} 2\n# HELP x_up Up.\n# TYPE x_up gauge\n\
                           x_up 1\n# HELP x_took_seconds Took.\n# TYPE x_took_seconds gauge\n\
                           # UNIT x_took_seconds seconds\nx_took_seconds 0.5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\n\
             x_requests_total{a=\"b\"} 2\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_took_seconds Took.\n# TYPE x_took_seconds gauge\nx_took_seconds 0.5\n"
        );
    }
}
