//! The cluster as the daemon's loop reads it (ARCHITECTURE.md, "Data flow"): reflectors that
//! keep Services, Nodes and EndpointSlices current, with a change notification, behind the
//! [`ClusterSource`] port that yields [`Snapshot`]s (in-process tests script their own).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

use super::snapshot::Snapshot;
use crate::config::Config;
use crate::metrics::Metrics;

/// First wait before a failed cluster watch is tried again; it doubles up to
/// [`WATCH_RETRY_MAX_MS`], and jitter adds up to as much again.
pub const WATCH_RETRY_FIRST_MS: u64 = 800;
/// Longest wait (before jitter) between tries of a failed cluster watch.
pub const WATCH_RETRY_MAX_MS: u64 = 5_000;
/// A watch that went this long without failing starts over at [`WATCH_RETRY_FIRST_MS`].
pub const WATCH_RETRY_RESET_SECS: u64 = 120;

/// Where the loop reads the cluster from.
pub trait ClusterSource: Send {
    /// Services, Nodes and EndpointSlices as they are now; `None` until each has been listed
    /// once (nothing may be unmapped on a partial view).
    fn snapshot(&self) -> Option<Snapshot>;
}

impl ClusterSource for ClusterWatch {
    fn snapshot(&self) -> Option<Snapshot> {
        self.is_ready().then(|| Snapshot {
            services: self.services(),
            nodes: self.nodes(),
            endpoint_slices: self.endpoint_slices(),
        })
    }
}

/// Reflectors for Services and Nodes; `changed` fires on every event.
pub struct ClusterWatch {
    /// One store per watched namespace (one for all when no allow list is set).
    services: Vec<Store<Service>>,
    nodes: Store<Node>,
    endpoint_slices: Vec<Store<EndpointSlice>>,
    /// Fires on every event of every watch.
    pub changed: Arc<Notify>,
    /// Set once each watch has completed its first list.
    listed: Vec<Arc<AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl ClusterWatch {
    /// Starts the watches `config` asks for.
    pub fn start(client: kube::Client, config: &Config, metrics: Arc<Metrics>) -> ClusterWatch {
        let mut watch = ClusterWatch {
            services: Vec::new(),
            nodes: reflector::store().0,
            endpoint_slices: Vec::new(),
            changed: Arc::new(Notify::new()),
            listed: Vec::new(),
            tasks: Vec::new(),
            metrics,
        };
        // NOTE: with an allow list, Services and EndpointSlices are watched in those
        // namespaces only, so a ServiceAccount bound to them by RoleBindings suffices (a
        // cluster-wide watch would be refused). EndpointSlices matter only for
        // `externalTrafficPolicy: Local` (which nodes host a ready endpoint).
        let namespaces = &config.kubernetes.namespaces;
        if namespaces.is_empty() {
            let services = watch.reflect(Api::all(client.clone()), "services");
            let slices = watch.reflect(Api::all(client.clone()), "endpointslices");
            watch.services.push(services);
            watch.endpoint_slices.push(slices);
        } else {
            for namespace in namespaces {
                let services =
                    watch.reflect(Api::namespaced(client.clone(), namespace), "services");
                let slices =
                    watch.reflect(Api::namespaced(client.clone(), namespace), "endpointslices");
                watch.services.push(services);
                watch.endpoint_slices.push(slices);
            }
        }
        watch.nodes = watch.reflect(Api::all(client), "nodes");
        watch
    }

    /// Starts a reflector for `api`: its store, kept current, and a change notification on
    /// every event.
    fn reflect<K>(&mut self, api: Api<K>, what: &'static str) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        let watch_config = watcher::Config::default().timeout(crate::kube::watch_timeout_secs());
        let (store, writer) = reflector::store();
        let listed = Arc::new(AtomicBool::new(false));
        self.tasks.push(tokio::spawn(drive(
            reflector::reflector(writer, watcher(api, watch_config).backoff(watch_backoff())),
            self.changed.clone(),
            listed.clone(),
            what,
            self.metrics.clone(),
        )));
        self.listed.push(listed);
        store
    }

    fn is_ready(&self) -> bool {
        self.listed.iter().all(|flag| flag.load(Ordering::Acquire))
    }

    fn services(&self) -> Vec<Service> {
        self.services
            .iter()
            .flat_map(|store| store.state())
            .map(|s| (*s).clone())
            .collect()
    }

    fn nodes(&self) -> Vec<Node> {
        self.nodes.state().iter().map(|n| (**n).clone()).collect()
    }

    fn endpoint_slices(&self) -> Vec<EndpointSlice> {
        self.endpoint_slices
            .iter()
            .flat_map(|store| store.state())
            .map(|e| (*e).clone())
            .collect()
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How the cluster watches retry after a failure (API away, 5xx, dropped connection).
///
/// NOTE: kube-runtime's default (client-go's reflector: 0.8 s doubling to 30 s, plus up to
/// 100 % jitter) can leave the daemon blind for up to a minute after the API returns from an
/// outage; changes must be reconciled within 30 s of its return (tests/daemon_faults.rs). Capped at
/// [`WATCH_RETRY_MAX_MS`] (10 s with jitter): each watch asks at most every 5 s on average
/// while the API is away (3 watches, or 2 per allowed namespace + 1 with an allow list).
#[derive(Debug, Default)]
pub struct WatchBackoff {
    failures: u32,
}

impl WatchBackoff {
    /// The wait before try `failures + 1`, with `jitter` in `0.0..1.0` adding that fraction of
    /// the wait.
    pub fn delay(failures: u32, jitter: f64) -> Duration {
        let base_ms = WATCH_RETRY_FIRST_MS
            .saturating_mul(1u64 << failures.min(16))
            .min(WATCH_RETRY_MAX_MS);
        Duration::from_millis(base_ms).mul_f64(1.0 + jitter.clamp(0.0, 1.0))
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = WatchBackoff::delay(self.failures, rand::random::<f64>());
        self.failures = self.failures.saturating_add(1);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

fn watch_backoff() -> ResetTimerBackoff<WatchBackoff> {
    ResetTimerBackoff::new(
        WatchBackoff::default(),
        Duration::from_secs(WATCH_RETRY_RESET_SECS),
    )
}

async fn drive<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    changed: Arc<Notify>,
    listed: Arc<AtomicBool>,
    what: &'static str,
    metrics: Arc<Metrics>,
) {
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if matches!(event, watcher::Event::InitDone) {
                    listed.store(true, Ordering::Release);
                }
                changed.notify_one();
            }
            Err(e) => {
                metrics.watch_restarted(what);
                let e = match e {
                    watcher::Error::InitialListFailed(source)
                    | watcher::Error::WatchStartFailed(source)
                    | watcher::Error::WatchFailed(source) => {
                        crate::kube::request_error("watch", what, source).to_string()
                    }
                    other => other.to_string(),
                };
                tracing::warn!(
                    resource = what,
                    "cluster watch interrupted, retrying with backoff (mappings stay as they are): {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_retries_double_from_800_ms_and_stay_within_10_s() {
        let waits: Vec<u64> = (0..6)
            .map(|n| WatchBackoff::delay(n, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(waits, [800, 1_600, 3_200, 5_000, 5_000, 5_000]);
        assert_eq!(WatchBackoff::delay(u32::MAX, 1.0), Duration::from_secs(10));
        assert_eq!(WatchBackoff::delay(0, 7.0), Duration::from_millis(1_600));
    }

    #[test]
    fn watch_backoff_starts_over_after_a_reset() {
        let mut backoff = WatchBackoff::default();
        for _ in 0..5 {
            backoff.next();
        }
        assert!(backoff.next() >= Some(Duration::from_secs(5)));
        backoff.reset();
        assert!(backoff.next() <= Some(Duration::from_millis(1_600)));
    }
}
