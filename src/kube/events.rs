//! Kubernetes Events on Services: what a Service's owner sees in `kubectl describe svc` and
//! `kubectl events`, reported by the component `holepunch`.
//!
//! Two pure functions decide which Event a problem or a live mapping deserves; the
//! [`EventPublisher`] writes them as `events.k8s.io/v1` Events (the API that replaced
//! core/v1 Events in Kubernetes 1.19; the apiserver shows them through both), once each: an
//! Event is published when it appears in the current set and again only after it has left
//! the set and come back. A publish the API refuses is retried with a backoff of its own
//! ([`EVENT_RETRY_FLOOR_SECS`] doubling to [`EVENT_RETRY_CEILING_SECS`]), not at every
//! reconcile.
//!
//! The daemon does not call [`EventPublisher::publish_changes`]: its writer task
//! (`kube::writer`) keeps the same once-while-it-holds rule with a bounded queue, a rate per
//! Service and a timeout per request, and calls [`EventPublisher::create`].
//!
//! Not `kube::runtime::events::Recorder`: it turns an Event seen again within its cache time
//! into a PATCH of the old one's `series`, while an Event that comes back here is news and
//! gets a new Event, and its cache is keyed without the note, so two different conflicts of one
//! Service would be folded into one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

use super::{KubeError, request_error};
use crate::model::{Problem, ProblemKind};
use crate::state::MappingRecord;

/// `reportingController` of every Event holepunch writes.
pub const REPORTING_CONTROLLER: &str = "holepunch";

/// Longest `note` the events.k8s.io/v1 API accepts.
pub const MAX_NOTE_BYTES: usize = 1024;

/// Longest `reportingInstance` the events.k8s.io/v1 API accepts.
pub const MAX_INSTANCE_BYTES: usize = 128;

/// `reason` of the Event for a live mapping.
pub const REASON_PUBLISHED: &str = "Published";

/// Wait before the first retry of an Event the API refused.
pub const EVENT_RETRY_FLOOR_SECS: u64 = 5;

/// Longest wait between retries of an Event the API keeps refusing.
pub const EVENT_RETRY_CEILING_SECS: u64 = 300;

/// Normal or Warning, as Kubernetes Events have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    Normal,
    Warning,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Normal => "Normal",
            EventKind::Warning => "Warning",
        }
    }
}

/// One Event about one Service. Two equal values are the same Event: it is published once.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceEvent {
    pub namespace: String,
    pub name: String,
    pub kind: EventKind,
    /// UpperCamelCase, as Kubernetes reasons are (`PortConflict`).
    pub reason: String,
    /// What happened and what to do, at most [`MAX_NOTE_BYTES`].
    pub note: String,
}

/// Why an Event could not be published.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("cannot read Service {namespace}/{name} to attach an Event to it: {source}")]
    ReadService {
        namespace: String,
        name: String,
        #[source]
        source: KubeError,
    },
    #[error("cannot create an Event on Service {namespace}/{name}: {source}")]
    CreateEvent {
        namespace: String,
        name: String,
        #[source]
        source: KubeError,
    },
}

/// The Warning Event a problem deserves. Every kind of problem keeps a Service port from
/// being published, so every kind is worth telling its owner; `None` only for a problem
/// without a Service to attach it to.
pub fn event_for_problem(problem: &Problem) -> Option<ServiceEvent> {
    if problem.owner.namespace.is_empty() || problem.owner.name.is_empty() {
        return None;
    }
    let reason = match problem.kind {
        ProblemKind::InvalidAnnotation => "InvalidAnnotation",
        ProblemKind::DeniedPort => "DeniedPort",
        // Tenant-safe: says "another Service", never which (README, "Security model").
        ProblemKind::PortConflict => "PortConflict",
        ProblemKind::NoTarget => "NoTarget",
        ProblemKind::TargetNotAllowed => "TargetNotAllowed",
        ProblemKind::UnsupportedProtocol => "UnsupportedProtocol",
        // Tenant-safe: never the LAN host holding the port; the router's words stay in
        // the problem's detail, for the log.
        ProblemKind::RouterRefused => "RouterRefused",
        ProblemKind::DoubleNat => "DoubleNat",
        ProblemKind::TargetFallback => "TargetFallback",
        ProblemKind::PortInUse => "PortInUse",
        ProblemKind::OverQuota => "OverQuota",
    };
    Some(ServiceEvent {
        namespace: problem.owner.namespace.clone(),
        name: problem.owner.name.clone(),
        kind: EventKind::Warning,
        reason: reason.to_owned(),
        note: cut_note(&problem.message),
    })
}

/// The Normal Event of a live mapping: which Service port is reachable at which public
/// `ip:port`. Only stable facts go in the note (no lease times), so a renewal is not news.
pub fn event_for_live(record: &MappingRecord) -> ServiceEvent {
    event_for_live_dual(record, None)
}

/// [`event_for_live`] with the IPv6 pinhole of the same Service port, when one is open: the
/// note gives the IPv6 address and port beside the IPv4 one (README, "IPv6"). That address
/// is the one the internet reaches (this host's in relay mode), already public.
pub fn event_for_live_dual(
    record: &MappingRecord,
    pinhole: Option<&crate::state::PinholeRecord>,
) -> ServiceEvent {
    let public = match record.external_address {
        Some(ip) => format!("{ip}:{}", record.external_port),
        None => format!(
            "external port {} (the router did not report its public address)",
            record.external_port
        ),
    };
    ServiceEvent {
        namespace: record.owner.namespace.clone(),
        name: record.owner.name.clone(),
        kind: EventKind::Normal,
        reason: REASON_PUBLISHED.to_owned(),
        // NOTE: no target address: it may be a node's, and tenants read Events (README,
        // "Security model"); `holepunch status` shows it to the operator.
        note: cut_note(&format!(
            "port {}/{} is published on {public}{} through the router ({})",
            record.service_port,
            record.protocol,
            pinhole.map_or_else(String::new, |p| format!(" and {}", p.opens())),
            record.backend
        )),
    }
}

/// Cuts a note to [`MAX_NOTE_BYTES`] on a character boundary.
fn cut_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_owned();
    }
    const ELLIPSIS: &str = "...";
    let mut end = MAX_NOTE_BYTES - ELLIPSIS.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &note[..end])
}

/// Writes Events on Services, each once while it stays in the current set.
pub struct EventPublisher {
    client: kube::Client,
    instance: String,
    /// The Events of the previous call that were published (or whose Service is gone).
    published: BTreeSet<ServiceEvent>,
    /// Events the API refused: how often in a row, and when to try again.
    refused: BTreeMap<ServiceEvent, Retry>,
}

/// The backoff of one refused Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retry {
    failures: u32,
    at: Instant,
}

impl Retry {
    /// The retry after `failures` refusals in a row, the last at `now`.
    fn after(failures: u32, now: Instant) -> Retry {
        let wait = crate::backoff::doubling(
            failures,
            Duration::from_secs(EVENT_RETRY_FLOOR_SECS),
            Duration::from_secs(EVENT_RETRY_CEILING_SECS),
        );
        Retry {
            failures,
            at: now + wait,
        }
    }
}

impl EventPublisher {
    /// `instance` becomes `reportingInstance` (the host name, so two holepunch hosts can be
    /// told apart); it is cut to what the API accepts.
    pub fn new(client: kube::Client, instance: &str) -> EventPublisher {
        let mut end = instance.len().min(MAX_INSTANCE_BYTES);
        while !instance.is_char_boundary(end) {
            end -= 1;
        }
        let instance = match &instance[..end] {
            "" => REPORTING_CONTROLLER,
            cut => cut,
        };
        EventPublisher {
            client,
            instance: instance.to_owned(),
            published: BTreeSet::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Publishes the events in `current` that were not in the previous call's set; an event
    /// that disappears is forgotten, so it is published again if it comes back. An unchanged
    /// set publishes nothing. A failed publish is logged and retried on a later call, once
    /// its backoff has passed. Returns how many Events were created.
    pub async fn publish_changes(&mut self, current: &[ServiceEvent]) -> usize {
        self.publish_changes_at(current, Instant::now()).await
    }

    /// [`EventPublisher::publish_changes`] as if called at `now` (tests step the clock).
    pub async fn publish_changes_at(&mut self, current: &[ServiceEvent], now: Instant) -> usize {
        let current: BTreeSet<&ServiceEvent> = current.iter().collect();
        self.published.retain(|event| current.contains(event));
        self.refused.retain(|event, _| current.contains(event));
        let mut created = 0;
        for event in current {
            if self.published.contains(event) {
                continue;
            }
            let failures = match self.refused.get(event) {
                Some(retry) if retry.at > now => continue,
                Some(retry) => retry.failures,
                None => 0,
            };
            match self.create(event).await {
                Ok(true) => {
                    created += 1;
                    self.refused.remove(event);
                    self.published.insert(event.clone());
                }
                Ok(false) => {
                    // The Service is gone: nothing to attach the Event to, and nothing to retry.
                    self.refused.remove(event);
                    self.published.insert(event.clone());
                }
                Err(e) => {
                    let retry = Retry::after(failures.saturating_add(1), now);
                    tracing::warn!(service = %format!("{}/{}", event.namespace, event.name),
                        reason = %event.reason, error = %e,
                        retry_in_secs = retry.at.duration_since(now).as_secs(),
                        "could not publish an Event; will retry");
                    self.refused.insert(event.clone(), retry);
                }
            }
        }
        created
    }

    /// Creates one Event, whatever was published before; `Ok(false)` when the Service no
    /// longer exists. The daemon's writer task (`kube::writer`) calls this.
    pub async fn create(&self, event: &ServiceEvent) -> Result<bool, EventError> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &event.namespace);
        // NOTE: `kubectl describe` finds a Service's Events by the Service's uid too, so the
        // reference carries it; the reflector's copy could be older than the Service.
        let service = match services.get_opt(&event.name).await {
            Ok(Some(service)) => service,
            Ok(None) => return Ok(false),
            Err(source) => {
                return Err(EventError::ReadService {
                    namespace: event.namespace.clone(),
                    name: event.name.clone(),
                    source: request_error("get", "services", source),
                });
            }
        };
        let now = jiff::Timestamp::now();
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(event.namespace.clone()),
            name: Some(event.name.clone()),
            uid: service.metadata.uid.clone(),
            resource_version: service.metadata.resource_version.clone(),
            field_path: None,
        };
        let object = Event {
            metadata: ObjectMeta {
                namespace: Some(event.namespace.clone()),
                // The apiserver adds a random suffix: Events of one Service never collide.
                generate_name: Some(format!("{}.", event.name)),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(action(event).to_owned()),
            reason: Some(event.reason.clone()),
            note: Some(event.note.clone()),
            type_: Some(event.kind.as_str().to_owned()),
            regarding: Some(regarding),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &event.namespace);
        events
            .create(&PostParams::default(), &object)
            .await
            .map_err(|source| EventError::CreateEvent {
                namespace: event.namespace.clone(),
                name: event.name.clone(),
                source: request_error("create", "events", source),
            })?;
        Ok(true)
    }
}

/// `action`: what holepunch did or failed to do (events.k8s.io/v1 requires one).
fn action(event: &ServiceEvent) -> &'static str {
    match event.kind {
        EventKind::Normal => "Publish",
        EventKind::Warning => "Refuse",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Endpoint, MappingKey, Owner, Protocol};

    #[test]
    fn a_refused_event_waits_5_s_doubling_to_5_min() {
        let now = Instant::now();
        let waits: Vec<u64> = [1, 2, 3, 6, 7, 40]
            .into_iter()
            .map(|failures| Retry::after(failures, now).at.duration_since(now).as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 160, 300, 300]);
    }

    fn problem(kind: ProblemKind, message: &str) -> Problem {
        Problem {
            detail: None,
            owner: Owner::new("media", "jelly"),
            kind,
            message: message.into(),
        }
    }

    #[test]
    fn every_problem_becomes_a_warning_with_its_message() {
        let conflict = problem(
            ProblemKind::PortConflict,
            "external port 8080/tcp is held by another Service",
        )
        .with_detail("held by a/old (service port 8080)");
        let event = event_for_problem(&conflict).expect("a Service to attach to");
        // The operator's detail never reaches the tenant.
        assert!(!event.note.contains("a/old"), "{}", event.note);
        assert_eq!(event.kind, EventKind::Warning);
        assert_eq!(event.reason, "PortConflict");
        assert_eq!(
            (event.namespace.as_str(), event.name.as_str()),
            ("media", "jelly")
        );
        assert!(event.note.contains("another Service"), "{}", event.note);

        let refused = problem(
            ProblemKind::RouterRefused,
            "router said 718 ConflictInMappingEntry",
        );
        let event = event_for_problem(&refused).expect("event");
        assert_eq!(event.reason, "RouterRefused");
        assert!(event.note.contains("718 ConflictInMappingEntry"));

        let reasons: BTreeSet<String> = [
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
        ]
        .into_iter()
        .filter_map(|kind| event_for_problem(&problem(kind, "m")))
        .map(|e| e.reason)
        .collect();
        assert_eq!(
            reasons.len(),
            11,
            "one distinct reason per kind: {reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .all(|r| r.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        );
    }

    #[test]
    fn a_problem_without_a_service_has_no_event() {
        let mut p = problem(ProblemKind::DoubleNat, "m");
        p.owner.namespace.clear();
        assert_eq!(event_for_problem(&p), None);
    }

    #[test]
    fn long_notes_are_cut_to_what_the_api_accepts_on_a_char_boundary() {
        let long = "é".repeat(MAX_NOTE_BYTES);
        let event =
            event_for_problem(&problem(ProblemKind::InvalidAnnotation, &long)).expect("event");
        assert!(event.note.len() <= MAX_NOTE_BYTES, "{}", event.note.len());
        assert!(event.note.ends_with("..."));
    }

    fn record(external: Option<&str>) -> MappingRecord {
        MappingRecord {
            service_port: 8080,
            target: Endpoint::new("192.168.77.20".parse().expect("ip"), 30080),
            times: crate::state::LeaseTimes {
                lifetime_secs: 120,
                ..Default::default()
            },
            external_address: external.map(|ip| ip.parse().expect("ip")),
            ..MappingRecord::leftover(
                Owner::new("default", "web"),
                MappingKey {
                    protocol: Protocol::Tcp,
                    external_port: 18080,
                },
                Endpoint::new("192.168.77.10".parse().expect("ip"), 18080),
                Backend::Pcp,
            )
        }
    }

    #[test]
    fn live_event_names_the_public_ip_and_port_and_ignores_lease_times() {
        let live = event_for_live(&record(Some("11.22.33.44")));
        assert_eq!(live.kind, EventKind::Normal);
        assert_eq!(live.reason, REASON_PUBLISHED);
        assert!(live.note.contains("11.22.33.44:18080"), "{}", live.note);
        assert!(live.note.contains("8080/tcp"), "{}", live.note);
        assert!(
            !live.note.contains("192.168.77."),
            "names a LAN host: {}",
            live.note
        );

        let mut renewed = record(Some("11.22.33.44"));
        renewed.times.lifetime_secs = 3600;
        renewed.epoch = Some(99);
        assert_eq!(
            event_for_live(&renewed),
            live,
            "a renewal is not a new Event"
        );

        let unknown = event_for_live(&record(None));
        assert!(
            unknown.note.contains("external port 18080"),
            "{}",
            unknown.note
        );
    }
}
