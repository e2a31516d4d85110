//! What the cluster is told after a reconcile, written from a task of its own: Events on the
//! Services (each once while it holds) and, for Services of holepunch's loadBalancerClass,
//! the external IP in their status.
//!
//! The event loop hands each pass's [`Report`] to [`ClusterWriter::submit`], which never
//! waits: it only updates a [`Backlog`] under a short lock and wakes the writer task. So a
//! slow or half-dead API server (README, "Monitoring") delays what the cluster is told, never
//! a router request, a renewal or a watchdog ping. The backlog:
//!
//! - coalesces status writes: one pending write per Service, the latest wins; one that
//!   fails waits out a backoff of its own ([`EVENT_RETRY_FLOOR_SECS`] doubling to
//!   [`EVENT_RETRY_CEILING_SECS`], with jitter) instead of being sent again at every pass;
//! - deduplicates Events (one is queued when it appears in the current set, and again only
//!   after it left the set and came back), retries a refused one with the same backoff, and
//!   allows each Service [`EVENT_BURST_PER_SERVICE`] Events, then one per
//!   [`EVENT_REFILL_SECS`] (client-go's spam filter does the same);
//! - holds at most [`QUEUE_EVENTS`] Events: a full queue drops the oldest, and every dropped
//!   Event is counted in `holepunch_cluster_writes_dropped_total`.
//!
//! Status writes go before Events; every request gives up after [`WRITE_TIMEOUT_SECS`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use k8s_openapi::api::core::v1::Service;
use tokio::sync::Notify;

use super::KubeError;
use super::events::{
    self, EVENT_RETRY_CEILING_SECS, EVENT_RETRY_FLOOR_SECS, EventPublisher, ServiceEvent,
};
use super::status::{self, StatusUpdate};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::Problem;
use crate::state::{MappingStatus, State};

/// Each request to the API (an Event with the read of its Service, or a status write) gives
/// up after this long and is retried after its backoff.
pub const WRITE_TIMEOUT_SECS: u64 = 10;
/// Most Events waiting to be written; a full queue drops its oldest.
pub const QUEUE_EVENTS: usize = 2048;
/// Events one Service may get at once before the rate limit holds them back.
pub const EVENT_BURST_PER_SERVICE: u32 = 25;
/// Beyond the burst, one more Event per Service this often.
pub const EVENT_REFILL_SECS: u64 = 300;

/// `(namespace, name)` of a Service.
type ServiceKey = (String, String);

/// What the cluster should be told after one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The Events that hold now (published once each while they hold).
    pub events: Vec<ServiceEvent>,
    /// The status writes the Services need now.
    pub statuses: Vec<StatusUpdate>,
}

/// The report of a pass: an Event per problem and per live mapping, and the status of the
/// Services of `class` (the router's public address, from the most recently granted
/// mapping, on the published ones).
pub fn report(problems: &[Problem], state: &State, services: &[Service], class: &str) -> Report {
    let live = state
        .mappings
        .values()
        .filter(|r| r.status == MappingStatus::Active);
    let events = problems
        .iter()
        .filter_map(events::event_for_problem)
        .chain(live.clone().map(|r| {
            let pinhole = state
                .pinholes
                .get(&r.key())
                .filter(|p| p.status == MappingStatus::Active);
            events::event_for_live_dual(r, pinhole)
        }))
        .collect();
    let published: BTreeSet<ServiceKey> = live
        .clone()
        .map(|r| (r.owner.namespace.clone(), r.owner.name.clone()))
        .collect();
    let external_ip = live
        .filter(|r| r.external_address.is_some())
        .max_by_key(|r| r.times.granted_at)
        .and_then(|r| r.external_address);
    // The IPv6 address each Service is reachable on through an open pinhole.
    let reachable6: BTreeMap<ServiceKey, std::net::Ipv6Addr> = state
        .pinholes
        .values()
        .filter(|p| p.status == MappingStatus::Active)
        .map(|p| ((p.owner.namespace.clone(), p.owner.name.clone()), p.address))
        .collect();
    Report {
        events,
        statuses: status::status_updates(services, class, external_ip, &published, &reachable6),
    }
}

/// One request to the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    Status(StatusUpdate),
    Event(ServiceEvent),
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (or the Service is gone: nothing to write to).
    Done,
    /// Refused because the Service changed since it was read (409): the next pass decides
    /// again from the newer Service.
    Stale,
    /// Not written (error, or no answer in time); retried after a backoff.
    Failed(String),
}

/// Where the writer task sends its requests: the API server, or a test double.
pub trait ClusterSink: Send + Sync + 'static {
    fn write(&self, job: &Job) -> impl Future<Output = Outcome> + Send;
}

/// The API server, through kube-rs.
pub struct KubeSink {
    client: kube::Client,
    events: EventPublisher,
}

impl KubeSink {
    /// `instance` is the `reportingInstance` of the Events (the host name).
    pub fn new(client: kube::Client, instance: &str) -> KubeSink {
        KubeSink {
            events: EventPublisher::new(client.clone(), instance),
            client,
        }
    }
}

impl ClusterSink for KubeSink {
    async fn write(&self, job: &Job) -> Outcome {
        match job {
            Job::Status(update) => match status::write_status(&self.client, update).await {
                Ok(()) => Outcome::Done,
                Err(KubeError::Request {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 409 || status.code == 404 => Outcome::Stale,
                Err(e) => Outcome::Failed(e.to_string()),
            },
            Job::Event(event) => match self.events.create(event).await {
                Ok(_) => Outcome::Done,
                Err(e) => Outcome::Failed(e.to_string()),
            },
        }
    }
}

/// The backoff of one write that failed.
#[derive(Debug)]
struct Retry {
    backoff: ExponentialBackoff,
    at: Instant,
}

impl Retry {
    /// The backoff of a write that has not failed yet (it is due at `now`).
    fn new(now: Instant) -> Retry {
        Retry {
            backoff: ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(EVENT_RETRY_FLOOR_SECS))
                .with_max_delay(Duration::from_secs(EVENT_RETRY_CEILING_SECS))
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build(),
            at: now,
        }
    }

    /// Another failure at `now`: the next try waits longer. Returns the wait.
    fn failed(&mut self, now: Instant) -> Duration {
        let wait = self
            .backoff
            .next()
            .unwrap_or(Duration::from_secs(EVENT_RETRY_CEILING_SECS));
        self.at = now + wait;
        wait
    }
}

/// A token bucket per Service: [`EVENT_BURST_PER_SERVICE`] Events, refilled one per
/// [`EVENT_REFILL_SECS`].
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(EVENT_BURST_PER_SERVICE),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned =
            now.saturating_duration_since(self.at).as_secs_f64() / EVENT_REFILL_SECS as f64;
        self.tokens = (self.tokens + earned).min(f64::from(EVENT_BURST_PER_SERVICE));
        self.at = now;
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A status as written: the IPv4 and IPv6 ingress, and the resourceVersion it was written
/// against.
type Written = (Option<Ipv4Addr>, Option<std::net::Ipv6Addr>, Option<String>);

/// What waits to be written, and what was: the writer's bookkeeping, without I/O (the
/// clock is passed in).
#[derive(Debug)]
pub struct Backlog {
    capacity: usize,
    /// Events of the current set that were queued (written, dropped, in flight or waiting).
    seen: BTreeSet<ServiceEvent>,
    queue: VecDeque<ServiceEvent>,
    event_retry: BTreeMap<ServiceEvent, Retry>,
    /// The status write each Service waits for, the latest submitted.
    statuses: BTreeMap<ServiceKey, StatusUpdate>,
    status_retry: BTreeMap<ServiceKey, Retry>,
    /// What was last written per Service (ingress, resourceVersion it was written against),
    /// while the cluster's copy does not show it yet.
    written: BTreeMap<ServiceKey, Written>,
    buckets: BTreeMap<ServiceKey, Bucket>,
    dropped_full: u64,
    dropped_rate: u64,
}

fn key_of(update: &StatusUpdate) -> ServiceKey {
    (update.namespace.clone(), update.name.clone())
}

fn event_key(event: &ServiceEvent) -> ServiceKey {
    (event.namespace.clone(), event.name.clone())
}

impl Backlog {
    /// A backlog that holds at most `capacity` Events.
    pub fn new(capacity: usize) -> Backlog {
        Backlog {
            capacity: capacity.max(1),
            seen: BTreeSet::new(),
            queue: VecDeque::new(),
            event_retry: BTreeMap::new(),
            statuses: BTreeMap::new(),
            status_retry: BTreeMap::new(),
            written: BTreeMap::new(),
            buckets: BTreeMap::new(),
            dropped_full: 0,
            dropped_rate: 0,
        }
    }

    /// Takes in a pass's report: Events new to the current set are queued, Events that left
    /// it are forgotten (queued ones unsent); each Service's status write is the latest, and
    /// one that is no longer needed is dropped.
    pub fn offer(&mut self, report: &Report, now: Instant) {
        let current: BTreeSet<&ServiceEvent> = report.events.iter().collect();
        self.seen.retain(|e| current.contains(e));
        let seen = &self.seen;
        self.queue.retain(|e| seen.contains(e));
        self.event_retry.retain(|e, _| seen.contains(e));
        for event in &report.events {
            if self.seen.insert(event.clone()) {
                self.enqueue(event.clone());
            }
        }
        let services: BTreeSet<ServiceKey> = report.events.iter().map(event_key).collect();
        self.buckets.retain(|key, bucket| {
            bucket.refill(now);
            services.contains(key) || bucket.tokens < f64::from(EVENT_BURST_PER_SERVICE)
        });

        let wanted: BTreeMap<ServiceKey, &StatusUpdate> =
            report.statuses.iter().map(|u| (key_of(u), u)).collect();
        self.statuses.retain(|key, _| wanted.contains_key(key));
        self.status_retry.retain(|key, _| wanted.contains_key(key));
        self.written.retain(|key, _| wanted.contains_key(key));
        for (key, update) in wanted {
            let already = self.written.get(&key)
                == Some(&(
                    update.ingress_ip,
                    update.ingress_ip6,
                    update.resource_version.clone(),
                ));
            if already {
                self.statuses.remove(&key);
            } else {
                self.statuses.insert(key, update.clone());
            }
        }
    }

    fn enqueue(&mut self, event: ServiceEvent) {
        if self.queue.len() >= self.capacity {
            self.queue.pop_front();
            self.dropped_full += 1;
        }
        self.queue.push_back(event);
    }

    /// The next request to send at `now`: a status write whose backoff is over, else the
    /// oldest Event whose backoff is over (Events over their Service's rate are dropped).
    pub fn next_job(&mut self, now: Instant) -> Option<Job> {
        let due = |retry: Option<&Retry>| retry.is_none_or(|r| r.at <= now);
        let status = self
            .statuses
            .keys()
            .find(|key| due(self.status_retry.get(*key)))
            .cloned();
        if let Some(key) = status {
            return self.statuses.remove(&key).map(Job::Status);
        }
        loop {
            let position = self
                .queue
                .iter()
                .position(|e| due(self.event_retry.get(e)))?;
            let event = self.queue.remove(position)?;
            let first_try = !self.event_retry.contains_key(&event);
            let allowed = !first_try
                || self
                    .buckets
                    .entry(event_key(&event))
                    .or_insert_with(|| Bucket::full(now))
                    .take(now);
            if allowed {
                return Some(Job::Event(event));
            }
            self.dropped_rate += 1;
        }
    }

    /// When the earliest write waiting out a backoff is due; `None` when none waits.
    pub fn next_wake(&self) -> Option<Instant> {
        let statuses = self
            .statuses
            .keys()
            .filter_map(|key| self.status_retry.get(key).map(|r| r.at));
        let events = self
            .queue
            .iter()
            .filter_map(|e| self.event_retry.get(e).map(|r| r.at));
        statuses.chain(events).min()
    }

    /// Records how `job` ended at `now`; returns the backoff before its retry, if it failed.
    pub fn done(&mut self, job: Job, outcome: &Outcome, now: Instant) -> Option<Duration> {
        match job {
            Job::Status(update) => {
                let key = key_of(&update);
                match outcome {
                    Outcome::Done => {
                        self.status_retry.remove(&key);
                        self.written.insert(
                            key,
                            (
                                update.ingress_ip,
                                update.ingress_ip6,
                                update.resource_version,
                            ),
                        );
                        None
                    }
                    Outcome::Stale => {
                        self.status_retry.remove(&key);
                        None
                    }
                    Outcome::Failed(_) => {
                        // A newer update submitted meanwhile wins; else this one is retried.
                        self.statuses.entry(key.clone()).or_insert(update);
                        let retry = self
                            .status_retry
                            .entry(key)
                            .or_insert_with(|| Retry::new(now));
                        Some(retry.failed(now))
                    }
                }
            }
            Job::Event(event) => match outcome {
                Outcome::Done | Outcome::Stale => {
                    self.event_retry.remove(&event);
                    None
                }
                Outcome::Failed(_) => {
                    if !self.seen.contains(&event) {
                        // It left the current set while it was being written.
                        return None;
                    }
                    let wait = self
                        .event_retry
                        .entry(event.clone())
                        .or_insert_with(|| Retry::new(now))
                        .failed(now);
                    self.enqueue(event);
                    Some(wait)
                }
            },
        }
    }

    /// Events and status writes waiting.
    pub fn queued(&self) -> usize {
        self.queue.len() + self.statuses.len()
    }

    /// Events dropped since the last call: `(queue full, over the rate)`.
    pub fn take_dropped(&mut self) -> (u64, u64) {
        let dropped = (self.dropped_full, self.dropped_rate);
        self.dropped_full = 0;
        self.dropped_rate = 0;
        dropped
    }
}

/// How much the writer holds and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most Events queued ([`QUEUE_EVENTS`]).
    pub capacity: usize,
    /// Per request ([`WRITE_TIMEOUT_SECS`]).
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            capacity: QUEUE_EVENTS,
            timeout: Duration::from_secs(WRITE_TIMEOUT_SECS),
        }
    }
}

/// What [`ClusterWriter::submit`] and the writer task share.
struct Shared {
    backlog: Mutex<Backlog>,
    wake: Notify,
}

impl Shared {
    fn backlog(&self) -> MutexGuard<'_, Backlog> {
        // Plain data: usable after a panic elsewhere.
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer task and its inbox; the task ends when this is dropped.
pub struct ClusterWriter {
    shared: Arc<Shared>,
    load_balancer_class: String,
    task: tokio::task::JoinHandle<()>,
}

impl ClusterWriter {
    /// Starts the writer for the daemon: the API through `client`, Events reported by this
    /// host (its name from `/proc/sys/kernel/hostname`).
    pub fn start(client: kube::Client, config: &Config, metrics: Arc<Metrics>) -> ClusterWriter {
        let instance = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "holepunch".to_owned());
        ClusterWriter::with_sink(
            KubeSink::new(client, &instance),
            &config.kubernetes.load_balancer_class,
            Limits::default(),
            metrics,
        )
    }

    /// Starts the writer task over `sink` (tests pass a double).
    pub fn with_sink(
        sink: impl ClusterSink,
        load_balancer_class: &str,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> ClusterWriter {
        let shared = Arc::new(Shared {
            backlog: Mutex::new(Backlog::new(limits.capacity)),
            wake: Notify::new(),
        });
        let task = tokio::spawn(write_forever(shared.clone(), sink, limits.timeout, metrics));
        ClusterWriter {
            shared,
            load_balancer_class: load_balancer_class.to_owned(),
            task,
        }
    }

    /// Hands a pass's outcome to the writer: what holds now (problems, live mappings) and the
    /// Services as read. Never waits for the API.
    pub fn submit(&self, problems: &[Problem], state: &State, services: &[Service]) {
        self.submit_report(&report(
            problems,
            state,
            services,
            &self.load_balancer_class,
        ));
    }

    /// [`ClusterWriter::submit`] of a ready report.
    pub fn submit_report(&self, report: &Report) {
        self.shared.backlog().offer(report, Instant::now());
        self.shared.wake.notify_one();
    }
}

impl Drop for ClusterWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The writer task: one request at a time, each bounded by `timeout`.
async fn write_forever(
    shared: Arc<Shared>,
    sink: impl ClusterSink,
    timeout: Duration,
    metrics: Arc<Metrics>,
) {
    loop {
        let (job, wake) = {
            let mut backlog = shared.backlog();
            let job = backlog.next_job(Instant::now());
            let (full, rate) = backlog.take_dropped();
            if full > 0 {
                tracing::warn!(
                    events = full,
                    "the Kubernetes API is too slow for the Events to keep up; dropped the oldest"
                );
            }
            metrics.cluster_writes_dropped("queue_full", full);
            metrics.cluster_writes_dropped("rate_limited", rate);
            metrics.cluster_writes_queued(backlog.queued() + usize::from(job.is_some()));
            (job, backlog.next_wake())
        };
        let Some(job) = job else {
            match wake {
                Some(at) => {
                    tokio::select! {
                        () = shared.wake.notified() => {}
                        () = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => shared.wake.notified().await,
            }
            continue;
        };
        let outcome = match tokio::time::timeout(timeout, sink.write(&job)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed(format!(
                "the Kubernetes API did not answer within {} ms",
                timeout.as_millis()
            )),
        };
        log(&job, &outcome);
        let retry_in = shared.backlog().done(job, &outcome, Instant::now());
        if let (Some(wait), Outcome::Failed(_)) = (retry_in, &outcome) {
            tracing::debug!(
                retry_in_secs = wait.as_secs(),
                "cluster write will be retried"
            );
        }
    }
}

fn log(job: &Job, outcome: &Outcome) {
    match (job, outcome) {
        (Job::Status(update), Outcome::Done) => {
            tracing::info!(service = %format!("{}/{}", update.namespace, update.name),
                ingress = ?update.ingress_ip, "LoadBalancer status written")
        }
        (Job::Status(update), Outcome::Stale) => {
            tracing::debug!(service = %format!("{}/{}", update.namespace, update.name),
                "the Service changed since it was read; its LoadBalancer status is decided again")
        }
        (Job::Status(update), Outcome::Failed(e)) => {
            tracing::warn!(service = %format!("{}/{}", update.namespace, update.name),
                error = %e, "could not write the LoadBalancer status; will retry after a backoff")
        }
        (Job::Event(_), Outcome::Done | Outcome::Stale) => {}
        (Job::Event(event), Outcome::Failed(e)) => {
            tracing::warn!(service = %format!("{}/{}", event.namespace, event.name),
                reason = %event.reason, error = %e,
                "could not publish an Event; will retry after a backoff")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::events::EventKind;

    fn event(name: &str, reason: &str) -> ServiceEvent {
        ServiceEvent {
            namespace: "default".into(),
            name: name.into(),
            kind: EventKind::Warning,
            reason: reason.into(),
            note: format!("{reason} on {name}"),
        }
    }

    fn update(name: &str, ip: Option<[u8; 4]>, rv: &str) -> StatusUpdate {
        StatusUpdate {
            namespace: "default".into(),
            name: name.into(),
            ingress_ip: ip.map(Ipv4Addr::from),
            ingress_ip6: None,
            resource_version: Some(rv.into()),
        }
    }

    fn events_of(report: &[ServiceEvent]) -> Report {
        Report {
            events: report.to_vec(),
            statuses: Vec::new(),
        }
    }

    /// Every job due at `now`, each answered with `outcome`.
    fn drain(backlog: &mut Backlog, now: Instant, outcome: &Outcome) -> Vec<Job> {
        let mut jobs = Vec::new();
        while let Some(job) = backlog.next_job(now) {
            jobs.push(job.clone());
            backlog.done(job, outcome, now);
            if jobs.len() > 10_000 {
                break;
            }
        }
        jobs
    }

    #[test]
    fn an_event_is_written_once_while_it_holds_and_again_when_it_comes_back() {
        let now = Instant::now();
        let mut backlog = Backlog::new(16);
        let a = event("web", "PortConflict");
        let b = event("db", "DeniedPort");
        backlog.offer(&events_of(&[a.clone(), b.clone()]), now);
        assert_eq!(
            drain(&mut backlog, now, &Outcome::Done),
            [Job::Event(a.clone()), Job::Event(b.clone())]
        );
        backlog.offer(&events_of(&[a.clone(), b.clone()]), now);
        assert_eq!(
            drain(&mut backlog, now, &Outcome::Done),
            [],
            "unchanged set"
        );
        backlog.offer(&events_of(std::slice::from_ref(&b)), now);
        backlog.offer(&events_of(&[a.clone(), b.clone()]), now);
        assert_eq!(
            drain(&mut backlog, now, &Outcome::Done),
            [Job::Event(a)],
            "back after it left"
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest_events_and_counts_them() {
        let now = Instant::now();
        let mut backlog = Backlog::new(3);
        let all: Vec<ServiceEvent> = (0..5)
            .map(|i| event(&format!("s{i}"), "NoTarget"))
            .collect();
        backlog.offer(&events_of(&all), now);
        assert_eq!(backlog.queued(), 3);
        assert_eq!(backlog.take_dropped(), (2, 0));
        let written = drain(&mut backlog, now, &Outcome::Done);
        assert_eq!(
            written,
            all[2..].iter().cloned().map(Job::Event).collect::<Vec<_>>(),
            "the newest three"
        );
        // Dropped Events count as told: the same set again queues nothing.
        backlog.offer(&events_of(&all), now);
        assert_eq!(backlog.queued(), 0);
        assert_eq!(backlog.take_dropped(), (0, 0));
    }

    #[test]
    fn a_service_gets_its_burst_then_one_event_per_refill() {
        let now = Instant::now();
        let mut backlog = Backlog::new(1024);
        let burst = EVENT_BURST_PER_SERVICE as usize;
        let flood: Vec<ServiceEvent> = (0..burst + 5)
            .map(|i| event("web", &format!("Reason{i}")))
            .collect();
        let other = event("db", "NoTarget");
        let mut all = flood.clone();
        all.push(other.clone());
        backlog.offer(&events_of(&all), now);
        let written = drain(&mut backlog, now, &Outcome::Done);
        assert_eq!(
            written.len(),
            burst + 1,
            "the burst, and the other Service's"
        );
        assert!(written.contains(&Job::Event(other)));
        assert_eq!(backlog.take_dropped(), (0, 5));

        let later = now + Duration::from_secs(EVENT_REFILL_SECS);
        let next = event("web", "Late");
        let too_soon = event("web", "TooSoon");
        all.push(next.clone());
        backlog.offer(&events_of(&all), later);
        assert_eq!(
            drain(&mut backlog, later, &Outcome::Done),
            [Job::Event(next)]
        );
        all.push(too_soon);
        backlog.offer(&events_of(&all), later);
        assert_eq!(drain(&mut backlog, later, &Outcome::Done), []);
        assert_eq!(backlog.take_dropped(), (0, 1));
    }

    #[test]
    fn a_failed_event_waits_its_backoff_and_is_not_sent_at_every_pass() {
        let now = Instant::now();
        let mut backlog = Backlog::new(16);
        let a = event("web", "PortConflict");
        backlog.offer(&events_of(std::slice::from_ref(&a)), now);
        let job = backlog.next_job(now).expect("a job");
        let wait = backlog
            .done(job, &Outcome::Failed("timeout".into()), now)
            .expect("a backoff");
        let floor = Duration::from_secs(EVENT_RETRY_FLOOR_SECS);
        assert!(wait >= floor && wait <= floor * 2, "{wait:?}");
        for pass in 1..5 {
            backlog.offer(&events_of(std::slice::from_ref(&a)), now);
            assert_eq!(backlog.next_job(now + Duration::from_millis(pass)), None);
        }
        assert_eq!(backlog.next_wake(), Some(now + wait));
        let second = backlog.next_job(now + wait).expect("retried");
        let longer = backlog
            .done(second, &Outcome::Failed("timeout".into()), now + wait)
            .expect("a backoff");
        assert!(longer >= floor * 2, "doubles: {longer:?}");
        // It leaves the set: nothing to retry.
        backlog.offer(&events_of(&[]), now + wait);
        assert_eq!(backlog.queued(), 0);
        assert_eq!(backlog.next_wake(), None);
    }

    #[test]
    fn status_writes_coalesce_and_retry_with_backoff() {
        let now = Instant::now();
        let mut backlog = Backlog::new(16);
        let statuses = |updates: Vec<StatusUpdate>| Report {
            events: Vec::new(),
            statuses: updates,
        };
        // Three passes before the writer gets to it: the latest wins.
        backlog.offer(&statuses(vec![update("lb", Some([1, 1, 1, 1]), "7")]), now);
        backlog.offer(&statuses(vec![update("lb", Some([2, 2, 2, 2]), "8")]), now);
        let latest = update("lb", Some([3, 3, 3, 3]), "9");
        backlog.offer(&statuses(vec![latest.clone()]), now);
        assert_eq!(backlog.queued(), 1);
        let job = backlog.next_job(now).expect("a job");
        assert_eq!(job, Job::Status(latest.clone()));
        let wait = backlog
            .done(job, &Outcome::Failed("503".into()), now)
            .expect("a backoff");
        // The next passes submit the same update: not sent before the backoff is over.
        for _ in 0..3 {
            backlog.offer(&statuses(vec![latest.clone()]), now);
            assert_eq!(backlog.next_job(now + wait / 2), None);
        }
        let retried = backlog.next_job(now + wait).expect("retried");
        assert_eq!(retried, Job::Status(latest.clone()));
        backlog.done(retried, &Outcome::Done, now + wait);
        // Until the cluster's copy shows it, the passes still ask for it: written already.
        backlog.offer(&statuses(vec![latest.clone()]), now + wait);
        assert_eq!(backlog.next_job(now + wait), None);
        // Someone else changed the Service (newer resourceVersion): written again.
        let again = update("lb", Some([3, 3, 3, 3]), "12");
        backlog.offer(&statuses(vec![again.clone()]), now + wait);
        assert_eq!(backlog.next_job(now + wait), Some(Job::Status(again)));
    }

    #[test]
    fn status_writes_go_before_events_and_a_stale_one_is_dropped() {
        let now = Instant::now();
        let mut backlog = Backlog::new(16);
        let report = Report {
            events: vec![event("web", "NoTarget")],
            statuses: vec![update("lb", None, "3")],
        };
        backlog.offer(&report, now);
        let first = backlog.next_job(now).expect("a job");
        assert!(matches!(first, Job::Status(_)), "{first:?}");
        assert_eq!(backlog.done(first, &Outcome::Stale, now), None);
        assert!(matches!(backlog.next_job(now), Some(Job::Event(_))));
        assert_eq!(
            backlog.next_job(now),
            None,
            "the stale write is not retried"
        );
    }

    /// A sink that answers after `delay` and records what it was asked.
    struct SlowSink {
        delay: Duration,
        asked: Arc<Mutex<Vec<Job>>>,
    }

    impl ClusterSink for SlowSink {
        async fn write(&self, job: &Job) -> Outcome {
            self.asked.lock().expect("lock").push(job.clone());
            tokio::time::sleep(self.delay).await;
            Outcome::Done
        }
    }

    #[tokio::test]
    async fn submit_never_waits_for_a_slow_api_and_a_write_times_out() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let metrics = Metrics::new(3600, Duration::from_secs(60));
        let writer = ClusterWriter::with_sink(
            SlowSink {
                delay: Duration::from_secs(25),
                asked: asked.clone(),
            },
            "holepunch.io/router",
            Limits {
                capacity: 4,
                timeout: Duration::from_millis(300),
            },
            metrics.clone(),
        );
        let started = Instant::now();
        let all: Vec<ServiceEvent> = (0..10)
            .map(|i| event(&format!("s{i}"), "NoTarget"))
            .collect();
        for _ in 0..100 {
            writer.submit_report(&events_of(&all));
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "submit does not wait: {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(450)).await;
        let first = asked.lock().expect("lock").clone();
        // The first answers after 25 s: given up after 300 ms, the next one is under way.
        assert!((2..10).contains(&first.len()), "{first:?}");
        let text = metrics.encode(jiff::Timestamp::now()).expect("encode");
        assert!(
            text.contains("holepunch_cluster_writes_dropped_total{reason=\"queue_full\"} 6"),
            "{text}"
        );
    }
}
