//! The cluster as the daemon's loop reads it (ARCHITECTURE.md, "Data flow"): watches that
//! keep Services, Nodes and EndpointSlices current in [`Kept`] stores (only what holepunch
//! reads of them: [`slim`](super::slim)), with a change notification, behind the
//! [`ClusterSource`] port that yields [`Snapshot`]s (in-process tests script their own).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use super::slim;
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

/// Watches of Services, Nodes and EndpointSlices; `changed` fires when what holepunch reads
/// of them changed.
pub struct ClusterWatch {
    /// One store per watched namespace (one for all when no allow list is set).
    services: Vec<Shared<Service>>,
    nodes: Shared<Node>,
    endpoint_slices: Vec<Shared<EndpointSlice>>,
    /// Fires when a watch changed what holepunch reads (not for Services it never publishes,
    /// nor for fields it does not read).
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
            nodes: Shared::default(),
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
        let kubernetes = config.kubernetes.clone();
        let keep_service = move |s| slim::service(s, &kubernetes);
        let keep_slice = slim::endpoint_slice;
        if namespaces.is_empty() {
            let services = watch.reflect(Api::all(client.clone()), "services", keep_service);
            let slices = watch.reflect(Api::all(client.clone()), "endpointslices", keep_slice);
            watch.services.push(services);
            watch.endpoint_slices.push(slices);
        } else {
            for namespace in namespaces {
                let api = Api::namespaced(client.clone(), namespace);
                let services = watch.reflect(api, "services", keep_service.clone());
                let api = Api::namespaced(client.clone(), namespace);
                let slices = watch.reflect(api, "endpointslices", keep_slice);
                watch.services.push(services);
                watch.endpoint_slices.push(slices);
            }
        }
        watch.nodes = watch.reflect(Api::all(client), "nodes", |n| Some(slim::node(n)));
        watch
    }

    /// Starts a watch of `api` into a [`Kept`] store of what `keep` keeps of each object, with
    /// a change notification whenever that changed.
    fn reflect<K>(
        &mut self,
        api: Api<K>,
        what: &'static str,
        keep: impl Fn(K) -> Option<K> + Send + 'static,
    ) -> Shared<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + PartialEq
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        let watch_config = watcher::Config::default().timeout(crate::kube::watch_timeout_secs());
        let kept = Kept::new(keep);
        let store = kept.objects.clone();
        let listed = Arc::new(AtomicBool::new(false));
        self.tasks.push(tokio::spawn(drive(
            watcher(api, watch_config).backoff(watch_backoff()),
            kept,
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
        self.services.iter().flat_map(objects).collect()
    }

    fn nodes(&self) -> Vec<Node> {
        objects(&self.nodes)
    }

    fn endpoint_slices(&self) -> Vec<EndpointSlice> {
        self.endpoint_slices.iter().flat_map(objects).collect()
    }
}

/// A store's objects, shared between its watch and the loop, by namespace and name.
type Shared<K> = Arc<Mutex<HashMap<ObjectKey, K>>>;
type ObjectKey = (Option<String>, String);

fn objects<K: Clone>(shared: &Shared<K>) -> Vec<K> {
    let objects = shared.lock().unwrap_or_else(PoisonError::into_inner);
    objects.values().cloned().collect()
}

/// What the daemon keeps of one kind of object, kept current from its watch's events: only
/// what `keep` keeps (slimmed objects; those holepunch never reads are not kept at all). A
/// relist replaces the objects at once when it is complete, as kube's reflector does.
pub struct Kept<K> {
    objects: Shared<K>,
    /// The objects of a relist in progress.
    relist: Option<HashMap<ObjectKey, K>>,
    keep: Box<dyn Fn(K) -> Option<K> + Send>,
}

impl<K: kube::Resource + Clone + PartialEq> Kept<K> {
    pub fn new(keep: impl Fn(K) -> Option<K> + Send + 'static) -> Self {
        Kept {
            objects: Shared::default(),
            relist: None,
            keep: Box::new(keep),
        }
    }

    /// The objects kept now.
    pub fn objects(&self) -> Vec<K> {
        objects(&self.objects)
    }

    /// Applies one watch event; `true` when what is kept changed.
    pub fn apply(&mut self, event: watcher::Event<K>) -> bool {
        let key = |object: &K| (object.namespace(), object.name_any());
        match event {
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let key = key(&object);
                if let Some(kept) = (self.keep)(object) {
                    self.relist.get_or_insert_default().insert(key, kept);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                *self.objects.lock().unwrap_or_else(PoisonError::into_inner) = listed;
                true
            }
            watcher::Event::Apply(object) => {
                let key = key(&object);
                let kept = (self.keep)(object);
                let mut objects = self.objects.lock().unwrap_or_else(PoisonError::into_inner);
                match kept {
                    Some(kept) if objects.get(&key) == Some(&kept) => false,
                    Some(kept) => {
                        objects.insert(key, kept);
                        true
                    }
                    None => objects.remove(&key).is_some(),
                }
            }
            watcher::Event::Delete(object) => {
                let key = key(&object);
                let mut objects = self.objects.lock().unwrap_or_else(PoisonError::into_inner);
                objects.remove(&key).is_some()
            }
        }
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

async fn drive<K: kube::Resource + Clone + PartialEq>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    mut kept: Kept<K>,
    changed: Arc<Notify>,
    listed: Arc<AtomicBool>,
    what: &'static str,
    metrics: Arc<Metrics>,
) {
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let done = matches!(event, watcher::Event::InitDone);
                if kept.apply(event) {
                    if done {
                        listed.store(true, Ordering::Release);
                    }
                    // The first stamp of a change's way to the router (README.md,
                    // "Benchmarks": the breakdown of annotated -> live).
                    tracing::debug!(target: "holepunch::timing", stage = "watch", resource = what,
                        "a kept object changed");
                    changed.notify_one();
                }
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

    fn service(name: &str, annotated: bool, version: &str) -> Service {
        let mut service = Service::default();
        service.metadata.name = Some(name.into());
        service.metadata.namespace = Some("default".into());
        service.metadata.resource_version = Some(version.into());
        if annotated {
            service.metadata.annotations =
                Some([("holepunch/punch-external".to_owned(), "true".to_owned())].into());
        }
        service
    }

    fn names(kept: &Kept<Service>) -> Vec<String> {
        let mut names: Vec<String> = kept.objects().iter().map(|s| s.name_any()).collect();
        names.sort();
        names
    }

    #[test]
    fn kept_services_are_those_holepunch_reads_and_only_their_changes_count() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let config = Config::default().kubernetes;
        let mut kept = Kept::new(move |s| slim::service(s, &config));
        // The first list: kept only once complete; the unannotated one not at all.
        assert!(!kept.apply(Init));
        assert!(!kept.apply(InitApply(service("web", true, "1"))));
        assert!(!kept.apply(InitApply(service("internal", false, "2"))));
        assert!(names(&kept).is_empty(), "a partial list is not read");
        assert!(kept.apply(InitDone));
        assert_eq!(names(&kept), ["web"]);

        // A Service holepunch never reads changes: nothing to reconcile.
        assert!(!kept.apply(Apply(service("internal", false, "3"))));
        // One it reads: a change (the resourceVersion the status writer needs).
        assert!(kept.apply(Apply(service("web", true, "4"))));
        assert!(
            !kept.apply(Apply(service("web", true, "4"))),
            "the same object again"
        );
        // Opting in and out.
        assert!(kept.apply(Apply(service("internal", true, "5"))));
        assert_eq!(names(&kept), ["internal", "web"]);
        assert!(kept.apply(Apply(service("web", false, "6"))));
        assert_eq!(names(&kept), ["internal"]);
        assert!(
            !kept.apply(Delete(service("web", false, "7"))),
            "was not kept"
        );
        assert!(kept.apply(Delete(service("internal", true, "8"))));
        assert!(names(&kept).is_empty());

        // A relist replaces everything at once: what was deleted meanwhile goes.
        assert!(kept.apply(Apply(service("gone", true, "9"))));
        assert!(!kept.apply(Init));
        assert!(!kept.apply(InitApply(service("new", true, "10"))));
        assert_eq!(
            names(&kept),
            ["gone"],
            "the old view stays until the relist is done"
        );
        assert!(kept.apply(InitDone));
        assert_eq!(names(&kept), ["new"]);
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
