//! The Lease and the mapping mirror through the API server (README.md, "High availability"):
//! get, create and replace of a `coordination.k8s.io/v1` Lease and of the ConfigMap beside it,
//! through kube's `Api`.
//!
//! Every replace carries the resourceVersion last read (the API server answers 409 Conflict
//! when someone wrote in between); a create of an object that exists is a conflict too. Every
//! request has its own timeout ([`request_timeout`]), shorter than the renew deadline, so one
//! hung request never eats the holder's whole renewal window.
//!
//! A standby also watches the one Lease object ([`LeaseStore::releases`]), so that it tries to
//! take a released Lease at once instead of at its next retry.
//!
//! RBAC this needs, in the Lease's namespace only: `get`, `create`, `update` on `leases` and
//! `configmaps`, and `list`, `watch` on `leases` (`packaging/kubernetes/rbac.yaml` grants them
//! with `watch` on configmaps and `patch`).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

use super::election::{LeaseRecord, ObservedLease, Timings, WriteFailure};
use super::mirror::{self, MirrorError};
use crate::state::State;

/// The timeout of one request: the retry period, but at most half the renew deadline, so the
/// holder gets at least a second try before it must stop acting.
pub fn request_timeout(timings: &Timings) -> Duration {
    timings.retry_period.min(timings.renew_deadline / 2)
}

/// Why one request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the API server did not answer within {} ms", .after.as_millis())]
    TimedOut { after: Duration },
    #[error("the API server refused the request or could not be reached")]
    Api {
        #[source]
        source: kube::Error,
    },
}

impl RequestError {
    /// 409: someone else wrote (or created) the object first.
    pub fn is_conflict(&self) -> bool {
        matches!(self, RequestError::Api { source: kube::Error::Api(status) } if status.code == 409)
    }
}

/// Why reading or writing the Lease or the mirror failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "cannot read Lease {at}; check that the API server is reachable and that holepunch may get leases there"
    )]
    Get {
        at: String,
        #[source]
        source: RequestError,
    },
    #[error(
        "cannot create Lease {at}; check that holepunch may create leases there (another host may have created it first: then this is retried)"
    )]
    Create {
        at: String,
        #[source]
        source: RequestError,
    },
    #[error(
        "cannot update Lease {at}; check that holepunch may update leases there (another host may have written it first: then this is retried)"
    )]
    Replace {
        at: String,
        #[source]
        source: RequestError,
    },
    #[error(
        "cannot read the mapping records in ConfigMap {at}; check that holepunch may get configmaps there"
    )]
    GetMirror {
        at: String,
        #[source]
        source: RequestError,
    },
    #[error(
        "cannot write the mapping records to ConfigMap {at}; check that holepunch may create and update configmaps there (another host may have written it first)"
    )]
    WriteMirror {
        at: String,
        #[source]
        source: RequestError,
    },
    #[error("the mapping records in ConfigMap {at} are unusable")]
    DecodeMirror {
        at: String,
        #[source]
        source: MirrorError,
    },
    #[error(
        "not writing the mapping records to ConfigMap {at}: this host does not hold the Lease (any more); the active host writes them"
    )]
    Fenced { at: String },
    #[error("cannot prepare the mapping records for ConfigMap {at}")]
    EncodeMirror {
        at: String,
        #[source]
        source: MirrorError,
    },
}

impl LeaseError {
    /// How the election counts this failure.
    pub fn failure(&self) -> WriteFailure {
        let conflict = match self {
            LeaseError::Get { source, .. }
            | LeaseError::Create { source, .. }
            | LeaseError::Replace { source, .. }
            | LeaseError::GetMirror { source, .. }
            | LeaseError::WriteMirror { source, .. } => source.is_conflict(),
            LeaseError::DecodeMirror { .. }
            | LeaseError::EncodeMirror { .. }
            | LeaseError::Fenced { .. } => false,
        };
        if conflict {
            WriteFailure::Conflict
        } else {
            WriteFailure::Other
        }
    }
}

async fn bounded<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, RequestError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(RequestError::Api { source }),
        Err(_) => Err(RequestError::TimedOut { after: timeout }),
    }
}

/// The election fields of a Lease as read.
pub fn observed_of(lease: &Lease) -> ObservedLease {
    let spec = lease.spec.clone().unwrap_or_default();
    ObservedLease {
        record: LeaseRecord {
            // NOTE: client-go writes "" for "nobody"; both mean free.
            holder: spec.holder_identity.filter(|holder| !holder.is_empty()),
            lease_duration_secs: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time.map(|time| time.0),
            renew_time: spec.renew_time.map(|time| time.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        },
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

/// The Lease object for `record` (`resource_version`: the precondition of a replace).
pub fn lease_of(name: &str, record: &LeaseRecord, resource_version: Option<&str>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            resource_version: resource_version.map(str::to_owned),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(record.holder.clone().unwrap_or_default()),
            lease_duration_seconds: record.lease_duration_secs,
            acquire_time: record.acquire_time.map(MicroTime),
            renew_time: record.renew_time.map(MicroTime),
            lease_transitions: Some(record.transitions),
            ..LeaseSpec::default()
        }),
    }
}

/// One Lease in one namespace.
#[derive(Clone)]
pub struct LeaseStore {
    api: Api<Lease>,
    name: String,
    at: String,
    timeout: Duration,
}

impl LeaseStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str, timeout: Duration) -> Self {
        LeaseStore {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            at: format!("{namespace}/{name}"),
            timeout,
        }
    }

    /// The Lease, or `None` when it does not exist.
    pub async fn get(&self) -> Result<Option<ObservedLease>, LeaseError> {
        let lease = bounded(self.timeout, self.api.get_opt(&self.name))
            .await
            .map_err(|source| LeaseError::Get {
                at: self.at.clone(),
                source,
            })?;
        Ok(lease.as_ref().map(observed_of))
    }

    /// One item each time a watch of this Lease (a `fieldSelector` on its name) sees it
    /// without a holder (released) or deleted: the moment a standby should read and try to
    /// take it. A failed watch is tried again after 200 ms, doubling up to `retry` (the
    /// election's retry period, which stays the fallback meanwhile), so that it is back soon
    /// after the API is (kube's default waits up to a minute).
    pub fn releases(&self, retry: Duration) -> impl Stream<Item = ()> + Send + 'static {
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.name))
            .timeout(crate::kube::watch_timeout_secs());
        let at = self.at.clone();
        watcher(self.api.clone(), config)
            .backoff(LeaseWatchBackoff {
                failures: 0,
                max: retry,
            })
            .filter_map(move |event| {
                let free = match event {
                    Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                        observed_of(&lease).record.holder.is_none()
                    }
                    Ok(watcher::Event::Delete(_)) => true,
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => false,
                    Err(error) => {
                        tracing::debug!(lease = %at, error = %crate::reconcile::with_causes(&error),
                            "leader election: the watch of the Lease failed; reading it every retry period meanwhile");
                        false
                    }
                };
                std::future::ready(free.then_some(()))
            })
    }

    /// Creates the Lease (a conflict when it exists).
    pub async fn create(&self, record: &LeaseRecord) -> Result<ObservedLease, LeaseError> {
        let lease = lease_of(&self.name, record, None);
        let created = bounded(
            self.timeout,
            self.api.create(&PostParams::default(), &lease),
        )
        .await
        .map_err(|source| LeaseError::Create {
            at: self.at.clone(),
            source,
        })?;
        Ok(observed_of(&created))
    }

    /// Replaces the Lease's record if it still has `resource_version`.
    pub async fn replace(
        &self,
        record: &LeaseRecord,
        resource_version: &str,
    ) -> Result<ObservedLease, LeaseError> {
        let lease = lease_of(&self.name, record, Some(resource_version));
        let replaced = bounded(
            self.timeout,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        .map_err(|source| LeaseError::Replace {
            at: self.at.clone(),
            source,
        })?;
        Ok(observed_of(&replaced))
    }
}

/// The first wait before a failed Lease watch is tried again.
const LEASE_WATCH_RETRY_FIRST_MS: u64 = 200;

/// The Lease watch's backoff: [`LEASE_WATCH_RETRY_FIRST_MS`] doubling up to `max`; kube resets
/// it at every event.
#[derive(Debug)]
struct LeaseWatchBackoff {
    failures: u32,
    max: Duration,
}

impl LeaseWatchBackoff {
    fn delay(failures: u32, max: Duration) -> Duration {
        Duration::from_millis(LEASE_WATCH_RETRY_FIRST_MS.saturating_mul(1u64 << failures.min(16)))
            .min(max)
    }
}

impl Iterator for LeaseWatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = LeaseWatchBackoff::delay(self.failures, self.max);
        self.failures = self.failures.saturating_add(1);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for LeaseWatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The mapping records as last read from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    pub state: State,
    /// The precondition of the next write.
    pub resource_version: String,
    /// Who wrote them, and the Lease's transitions then (from the annotations).
    pub holder: Option<String>,
    pub transitions: Option<i32>,
}

/// The ConfigMap beside the Lease that mirrors the active host's mapping records.
#[derive(Clone)]
pub struct MirrorStore {
    api: Api<ConfigMap>,
    name: String,
    at: String,
    timeout: Duration,
}

impl MirrorStore {
    /// The mirror beside the Lease `lease_name`.
    pub fn new(client: kube::Client, namespace: &str, lease_name: &str, timeout: Duration) -> Self {
        let name = mirror::configmap_name(lease_name);
        MirrorStore {
            api: Api::namespaced(client, namespace),
            at: format!("{namespace}/{name}"),
            name,
            timeout,
        }
    }

    /// The records, or `None` when no host has written any yet.
    pub async fn get(&self) -> Result<Option<Mirrored>, LeaseError> {
        let found = bounded(self.timeout, self.api.get_opt(&self.name))
            .await
            .map_err(|source| LeaseError::GetMirror {
                at: self.at.clone(),
                source,
            })?;
        let Some(configmap) = found else {
            return Ok(None);
        };
        let state = mirror::decode_data(configmap.data.as_ref()).map_err(|source| {
            LeaseError::DecodeMirror {
                at: self.at.clone(),
                source,
            }
        })?;
        let annotations = configmap.metadata.annotations.unwrap_or_default();
        Ok(Some(Mirrored {
            state,
            resource_version: configmap.metadata.resource_version.unwrap_or_default(),
            holder: annotations.get(mirror::HOLDER_ANNOTATION).cloned(),
            transitions: annotations
                .get(mirror::TRANSITIONS_ANNOTATION)
                .and_then(|text| text.parse().ok()),
        }))
    }

    /// Writes the records: a create when `resource_version` is `None`, else a replace with it
    /// as the precondition. Returns the new resourceVersion.
    pub async fn write(
        &self,
        state: &State,
        holder: &str,
        transitions: i32,
        resource_version: Option<&str>,
    ) -> Result<String, LeaseError> {
        let data = mirror::encode_data(state).map_err(|source| LeaseError::EncodeMirror {
            at: self.at.clone(),
            source,
        })?;
        let configmap = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: resource_version.map(str::to_owned),
                annotations: Some(BTreeMap::from([
                    (mirror::HOLDER_ANNOTATION.to_owned(), holder.to_owned()),
                    (
                        mirror::TRANSITIONS_ANNOTATION.to_owned(),
                        transitions.to_string(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        };
        let params = PostParams::default();
        let written = match resource_version {
            None => bounded(self.timeout, self.api.create(&params, &configmap)).await,
            Some(_) => {
                bounded(
                    self.timeout,
                    self.api.replace(&self.name, &params, &configmap),
                )
                .await
            }
        }
        .map_err(|source| LeaseError::WriteMirror {
            at: self.at.clone(),
            source,
        })?;
        Ok(written.metadata.resource_version.unwrap_or_default())
    }
}

/// The active host's side of the mirror: takes over the records a previous holder wrote, and
/// saves its own, only while it may act (checked at each save, against the clock) and never
/// over the records of a later holder.
pub struct MirrorWriter {
    store: MirrorStore,
    /// The version last read or written: the precondition of the next save.
    resource_version: Option<String>,
}

impl MirrorWriter {
    pub fn new(store: MirrorStore) -> MirrorWriter {
        MirrorWriter {
            store,
            resource_version: None,
        }
    }

    /// Reads the records the previous holder left (`None`: there are none), to renew the
    /// same mappings with the same nonces; the next save replaces exactly this version.
    pub async fn take_over(&mut self) -> Result<Option<Mirrored>, LeaseError> {
        let found = self.store.get().await?;
        self.resource_version = found.as_ref().map(|m| m.resource_version.clone());
        Ok(found)
    }

    /// Saves `state` as the records of `standing`'s holder, if it may act now. A conflict
    /// (someone wrote since our last read) is read again and retried once, unless a later
    /// holder (more Lease transitions) wrote them: then this host has been replaced.
    pub async fn save(
        &mut self,
        state: &State,
        standing: &super::runner::Standing,
    ) -> Result<(), LeaseError> {
        let fenced = || LeaseError::Fenced {
            at: self.store.at.clone(),
        };
        for attempt in 0..2 {
            if !standing.may_act(std::time::Instant::now()) {
                return Err(fenced());
            }
            let written = self
                .store
                .write(
                    state,
                    &standing.identity,
                    standing.transitions,
                    self.resource_version.as_deref(),
                )
                .await;
            match written {
                Ok(version) => {
                    self.resource_version = Some(version);
                    return Ok(());
                }
                Err(error) if attempt == 0 && error.failure() == WriteFailure::Conflict => {
                    let current = self.store.get().await?;
                    if current
                        .as_ref()
                        .and_then(|m| m.transitions)
                        .is_some_and(|theirs| theirs > standing.transitions)
                    {
                        return Err(fenced());
                    }
                    self.resource_version = current.map(|m| m.resource_version);
                }
                Err(error) => return Err(error),
            }
        }
        Err(fenced())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[test]
    fn the_lease_watch_retries_soon_and_never_slower_than_the_retry_period() {
        use kube::runtime::utils::Backoff;
        let mut backoff = LeaseWatchBackoff {
            failures: 0,
            max: Duration::from_secs(2),
        };
        let waits: Vec<u64> = backoff
            .by_ref()
            .take(6)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(200)));
    }

    #[test]
    fn lease_fields_round_trip_and_empty_holder_is_free() {
        let at = Timestamp::from_second(1_800_000_000).expect("a valid timestamp");
        let record = LeaseRecord {
            holder: Some("node-a".into()),
            lease_duration_secs: Some(15),
            acquire_time: Some(at),
            renew_time: Some(at),
            transitions: 4,
        };
        let mut lease = lease_of("holepunch", &record, Some("12"));
        assert_eq!(lease.metadata.resource_version.as_deref(), Some("12"));
        lease.metadata.resource_version = Some("13".into());
        let observed = observed_of(&lease);
        assert_eq!(observed.record, record);
        assert_eq!(observed.resource_version, "13");

        // A released Lease (client-go writes holderIdentity "") reads as free.
        let released = LeaseRecord {
            holder: None,
            ..record
        };
        let lease = lease_of("holepunch", &released, None);
        assert_eq!(
            lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref()),
            Some("")
        );
        assert_eq!(observed_of(&lease).record.holder, None);
        // No spec at all: free, no transitions.
        assert_eq!(
            observed_of(&Lease::default()).record,
            LeaseRecord::default()
        );
    }

    #[test]
    fn request_timeout_is_below_the_renew_deadline() {
        let defaults = Timings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert_eq!(request_timeout(&defaults), Duration::from_secs(2));
        let slow_retry = Timings {
            retry_period: Duration::from_secs(9),
            ..defaults
        };
        assert_eq!(request_timeout(&slow_retry), Duration::from_secs(5));
    }
}
