//! What to do next: desired mappings x recorded state x now -> a [`Plan`] of actions.
//!
//! Pure and synchronous: `now` is an argument, nothing is read from the clock, the router or
//! the disk. Router calls are costly (README.md, "Benchmarks": ~80-120 ms each at 50 mappings on miniupnpd), so an
//! unchanged, valid mapping yields no action at all; renewals happen on the schedule the
//! reconciler wrote into the state when the lease was granted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use jiff::Timestamp;

use crate::desired::Desired;
use crate::model::{Backend, Endpoint, MappingKey, PortMapping, Problem};
use crate::state::{Failure, MappingRecord, MappingStatus, State};

/// Where the router forwards a mapping's traffic, by exposure mode (README.md, "How traffic
/// flows").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Router -> this host (`lan_address`) on the external port; nftables carries it on.
    Relay { lan_address: Ipv4Addr },
    /// Router -> the target itself.
    Direct,
    /// No router mapping: holepunch runs on the router and DNATs on the WAN interface.
    Gateway,
}

impl Forwarding {
    /// The internal endpoint a router mapping points at (in gateway mode, the target, which
    /// only the local DNAT uses).
    pub fn internal(&self, mapping: &PortMapping) -> Endpoint {
        match self {
            Forwarding::Relay { lan_address } => Endpoint::new(*lan_address, mapping.external_port),
            Forwarding::Direct | Forwarding::Gateway => mapping.target.endpoint,
        }
    }
}

/// Why an owned mapping must be requested again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreReason {
    /// Recorded as pending: the request may never have reached the router.
    Unconfirmed,
    /// Its lease ran out before it was renewed (daemon stopped, router unreachable).
    Expired,
    /// An earlier request failed and its backoff is over.
    RetryDue,
    /// The router restarted (it announced it, or an answer showed it) and lost it.
    RouterRestarted,
    /// The router no longer holds it (found at a verify).
    RouterLost,
    /// Made through another router protocol than the one in use.
    BackendChanged,
    /// It failed because the router was silent, and the router answers again.
    RouterAnswers,
}

impl fmt::Display for RestoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestoreReason::Unconfirmed => "unconfirmed",
            RestoreReason::Expired => "lease expired",
            RestoreReason::RetryDue => "retry after failure",
            RestoreReason::RouterRestarted => "router restarted",
            RestoreReason::RouterLost => "router lost it",
            RestoreReason::BackendChanged => "made through another protocol",
            RestoreReason::RouterAnswers => "router answers again",
        })
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Request a new mapping.
    Map {
        mapping: PortMapping,
        internal: Endpoint,
    },
    /// Extend the lease of a mapping the router holds.
    Renew {
        mapping: PortMapping,
        internal: Endpoint,
    },
    /// Request an owned mapping again, with the same external port (and PCP nonce).
    Restore {
        mapping: PortMapping,
        internal: Endpoint,
        reason: RestoreReason,
    },
    /// Only the local side changed (target or service port): update nftables and the state,
    /// no router call.
    Retarget {
        mapping: PortMapping,
        previous: Endpoint,
    },
    /// Delete an owned mapping that is no longer wanted (or wanted differently).
    Unmap { record: Box<MappingRecord> },
    /// Tell the Service's owner why something is not published.
    Report { problem: Problem },
    /// Delete, through the protocol that made it, an active mapping recorded with another
    /// protocol than the one in use, before it is requested again through that one: one
    /// protocol cannot delete another's mapping. Run by the router session, not by
    /// `reconcile::execute`.
    Retire { record: Box<MappingRecord> },
    /// Delete holepunch's leftovers on a router just found (a crash left them) that neither
    /// the state nor the cluster knows. Run by the router session.
    Purge { keep: BTreeSet<MappingKey> },
    /// Record the router's new external address on an active mapping that carries another
    /// (the router said so answering an announcement): no request, the mapping stays.
    Readdress {
        key: MappingKey,
        was: Ipv4Addr,
        to: Ipv4Addr,
    },
    /// Change what nftables forwards for `key` (relay and gateway modes): from `was` to `to`
    /// (`None`: no forward), once the router actions went as planned. The loop then brings
    /// the table to the state the actions left (a failed unmap keeps its forward).
    Forward {
        key: MappingKey,
        was: Option<Endpoint>,
        to: Option<Endpoint>,
    },
}

impl Action {
    /// Whether executing this action talks to the router.
    pub fn calls_router(&self) -> bool {
        !matches!(
            self,
            Action::Retarget { .. }
                | Action::Readdress { .. }
                | Action::Report { .. }
                | Action::Forward { .. }
        )
    }

    /// Whether `reconcile::execute` runs this action (the router session runs
    /// [`Action::Retire`] and [`Action::Purge`], the loop reports problems).
    pub fn executed(&self) -> bool {
        !matches!(
            self,
            Action::Report { .. }
                | Action::Retire { .. }
                | Action::Purge { .. }
                | Action::Forward { .. }
        )
    }
}

/// A router restart the loop observed: the mappings of `backend` granted before
/// `granted_before` (all of them when `None`) are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    pub backend: Backend,
    pub granted_before: Option<Timestamp>,
}

/// What the loop learnt from the router since the last plan: inputs to [`plan_observed`], so
/// what they cause is an action like any other (saved pending-first, counted, shown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observations {
    /// The backend in use: active mappings made through another are retired and restored.
    pub backend: Option<Backend>,
    /// The router was just found: purge what a crash left on it.
    pub found: bool,
    /// The router restarted (an announcement, or an answer showed it).
    pub restart: Option<Restart>,
    /// Mappings the router no longer holds (found at a verify).
    pub lost: BTreeSet<MappingKey>,
    /// The router answers again after being silent: what failed for that is due now.
    pub answering_again: bool,
    /// The router's external address, as its answer to an announcement showed it: active
    /// mappings that record another are readdressed.
    pub external_address: Option<Ipv4Addr>,
}

impl Observations {
    /// A restart: widened when one was already observed and not yet planned.
    pub fn restarted(&mut self, restart: Restart) {
        self.restart = Some(match self.restart {
            Some(earlier) if earlier.backend == restart.backend => Restart {
                backend: restart.backend,
                granted_before: earlier
                    .granted_before
                    .zip(restart.granted_before)
                    .map(|(a, b)| a.max(b)),
            },
            _ => restart,
        });
    }

    /// Forgets what a plan just acted on; the backend in use stays.
    pub fn planned(&mut self) {
        *self = Observations {
            backend: self.backend,
            ..Observations::default()
        };
    }

    /// Why an active `record` must be requested again after what was observed, if it must.
    pub fn lost(&self, record: &MappingRecord) -> Option<RestoreReason> {
        let restarted = self.restart.is_some_and(|restart| {
            restart.backend == record.backend
                && restart.backend != Backend::None
                && restart
                    .granted_before
                    .is_none_or(|before| record.times.granted_at.is_none_or(|at| at < before))
        });
        if restarted {
            Some(RestoreReason::RouterRestarted)
        } else if self.lost.contains(&record.key()) {
            Some(RestoreReason::RouterLost)
        } else if self.backend.is_some_and(|b| b != record.backend) {
            Some(RestoreReason::BackendChanged)
        } else {
            None
        }
    }

    /// Whether `record` failed because the router was silent and it answers again.
    pub fn answers_again(&self, record: &MappingRecord) -> bool {
        self.answering_again
            && self.backend == Some(record.backend)
            && record.failure == Some(Failure::RouterSilent)
    }

    /// Whether an active `record` is to be retired through the protocol that made it.
    fn retires(&self, record: &MappingRecord) -> bool {
        record.status == MappingStatus::Active
            && record.backend != Backend::None
            && self.backend.is_some_and(|b| b != record.backend)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mapping_line =
            |f: &mut fmt::Formatter<'_>, verb: &str, m: &PortMapping, extra: &str| {
                write!(
                    f,
                    "{verb:<8} {:<11} {:<28} -> {} (service port {}){extra}",
                    m.key().to_string(),
                    m.owner.to_string(),
                    m.target.endpoint,
                    m.service_port
                )
            };
        match self {
            Action::Map { mapping, internal } => mapping_line(
                f,
                "map",
                mapping,
                &format!(", router forwards to {internal}"),
            ),
            Action::Renew { mapping, .. } => mapping_line(f, "renew", mapping, ""),
            Action::Restore {
                mapping, reason, ..
            } => mapping_line(f, "restore", mapping, &format!(", {reason}")),
            Action::Retarget { mapping, previous } => {
                mapping_line(f, "retarget", mapping, &format!(", was {previous}"))
            }
            Action::Unmap { record } => write!(
                f,
                "{:<8} {:<11} {:<28} (was -> {}, {})",
                "unmap",
                record.key().to_string(),
                record.owner.to_string(),
                record.target,
                record.backend
            ),
            // The plan is the operator's: the detail kept from the tenant's Event is shown.
            Action::Report { problem } => write!(
                f,
                "{:<8} {:<11} {:<28} {}: {}{}",
                "problem",
                "",
                problem.owner.to_string(),
                problem.kind,
                problem.message,
                problem
                    .detail
                    .as_ref()
                    .map(|d| format!(" [operator: {d}]"))
                    .unwrap_or_default()
            ),
            Action::Retire { record } => write!(
                f,
                "{:<8} {:<11} {:<28} (made through {}, deleted through it first)",
                "retire",
                record.key().to_string(),
                record.owner.to_string(),
                record.backend
            ),
            Action::Readdress { key, was, to } => write!(
                f,
                "{:<8} {:<11} {:<28} external address {to} (was {was})",
                "address",
                key.to_string(),
                ""
            ),
            Action::Forward { key, was, to } => {
                let change = match (was, to) {
                    (None, Some(to)) => format!("-> {to}"),
                    (Some(was), Some(to)) => format!("-> {to} (was -> {was})"),
                    (Some(was), None) => format!("removed (was -> {was})"),
                    (None, None) => String::new(),
                };
                write!(
                    f,
                    "{:<8} {:<11} {:<28} {change}",
                    "nftables",
                    key.to_string(),
                    ""
                )
            }
            Action::Purge { keep } => write!(
                f,
                "{:<8} {:<11} {:<28} holepunch's mappings on the router other than these {}",
                "purge",
                "",
                "",
                keep.len()
            ),
        }
    }
}

/// The actions that bring the router, nftables and the state in line with the cluster, in
/// the order to execute them: the router session's purge and retirements, unmaps (they free
/// ports), then local changes, new mappings, restores, renewals, and the problems to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The earliest future moment at which a plan would have something to do even if nothing
    /// changes (a renewal or a retry); `None` if nothing is scheduled.
    pub next_due: Option<Timestamp>,
}

impl Plan {
    pub fn router_calls(&self) -> usize {
        self.actions.iter().filter(|a| a.calls_router()).count()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.actions.is_empty() {
            writeln!(f, "nothing to do")?;
        }
        for action in &self.actions {
            writeln!(f, "{action}")?;
        }
        if let Some(next) = self.next_due {
            writeln!(f, "next renewal or retry due at {next}")?;
        }
        Ok(())
    }
}

/// How a failed unmap reads in the record's `last_error` (and how a version 1 state file,
/// which has no `failure`, says so).
pub const UNMAP_FAILED_PREFIX: &str = "could not remove the mapping";

/// When a record no longer wanted may be unmapped again, if an earlier try failed and its
/// backoff has not passed.
fn unmap_backing_off(record: &MappingRecord, now: Timestamp) -> Option<Timestamp> {
    let failed_unmap = record.failure == Some(Failure::UnmapFailed);
    record.retry_at.filter(|at| failed_unmap && *at > now)
}

/// Compares what the cluster wants with what holepunch holds, at `now`, with nothing observed
/// of the router (`holepunch plan`).
pub fn plan(desired: &Desired, state: &State, forwarding: Forwarding, now: Timestamp) -> Plan {
    plan_observed(desired, state, &Observations::default(), forwarding, now)
}

/// Compares what the cluster wants with what holepunch holds, at `now`, after what the loop
/// `observed` of the router.
pub fn plan_observed(
    desired: &Desired,
    state: &State,
    observed: &Observations,
    forwarding: Forwarding,
    now: Timestamp,
) -> Plan {
    let mut session = Vec::new();
    if observed.found {
        session.push(Action::Purge {
            keep: state
                .mappings
                .keys()
                .chain(desired.mappings.keys())
                .copied()
                .collect(),
        });
    }
    session.extend(
        state
            .mappings
            .values()
            .filter(|r| observed.retires(r))
            .map(|r| Action::Retire {
                record: Box::new(r.clone()),
            }),
    );
    let mut unmaps = Vec::new();
    let mut retargets = Vec::new();
    let mut maps = Vec::new();
    let mut restores = Vec::new();
    let mut renewals = Vec::new();
    let mut next_due: Option<Timestamp> = None;
    let mut schedule = |at: Option<Timestamp>| {
        if let Some(at) = at.filter(|at| *at > now) {
            next_due = Some(next_due.map_or(at, |due| due.min(at)));
        }
    };

    for (key, record) in &state.mappings {
        let Some(mapping) = desired.mappings.get(key) else {
            match unmap_backing_off(record, now) {
                Some(retry_at) => schedule(Some(retry_at)),
                None => unmaps.push(Action::Unmap {
                    record: Box::new(record.clone()),
                }),
            }
            continue;
        };
        let internal = forwarding.internal(mapping);
        if mapping.owner != record.owner || internal != record.internal {
            // The router must forward elsewhere or tag it for someone else: replace it.
            unmaps.push(Action::Unmap {
                record: Box::new(record.clone()),
            });
            maps.push(Action::Map {
                mapping: mapping.clone(),
                internal,
            });
            continue;
        }
        if mapping.target.endpoint != record.target
            || mapping.service_port != record.service_port
            || mapping.target.source != record.target_source
        {
            retargets.push(Action::Retarget {
                mapping: mapping.clone(),
                previous: record.target,
            });
        }
        let restore = |reason| Action::Restore {
            mapping: mapping.clone(),
            internal,
            reason,
        };
        match record.status {
            MappingStatus::Pending => restores.push(restore(RestoreReason::Unconfirmed)),
            MappingStatus::Failed if observed.answers_again(record) => {
                restores.push(restore(RestoreReason::RouterAnswers));
            }
            MappingStatus::Failed => match record.retry_at {
                Some(at) if at > now => schedule(Some(at)),
                _ => restores.push(restore(RestoreReason::RetryDue)),
            },
            MappingStatus::Active => {
                if let Some(reason) = observed.lost(record) {
                    restores.push(restore(reason));
                } else if record.times.expires_at.is_some_and(|at| at <= now) {
                    restores.push(restore(RestoreReason::Expired));
                } else if record.times.renew_at.is_some_and(|at| at <= now)
                    || observed.answers_again(record)
                {
                    renewals.push(Action::Renew {
                        mapping: mapping.clone(),
                        internal,
                    });
                } else {
                    schedule(record.times.renew_at);
                }
            }
        }
    }
    for (key, mapping) in &desired.mappings {
        if !state.mappings.contains_key(key) {
            maps.push(Action::Map {
                mapping: mapping.clone(),
                internal: forwarding.internal(mapping),
            });
        }
    }

    let readdresses = observed.external_address.into_iter().flat_map(|to| {
        state.mappings.iter().filter_map(move |(key, record)| {
            let was = record.external_address?;
            (record.status == MappingStatus::Active && was != to).then_some(Action::Readdress {
                key: *key,
                was,
                to,
            })
        })
    });
    let forwards = forward_changes(desired, state, forwarding, &unmaps);
    let reports = desired.problems.iter().map(|problem| Action::Report {
        problem: problem.clone(),
    });
    let actions = session
        .into_iter()
        .chain(unmaps)
        .chain(retargets)
        .chain(readdresses)
        .chain(maps)
        .chain(restores)
        .chain(renewals)
        .chain(forwards)
        .chain(reports)
        .collect();
    Plan { actions, next_due }
}

/// The nftables forwards (external port -> target) the state implies now and after the
/// plan's `unmaps` and maps, and the [`Action::Forward`] changes between the two. None in
/// direct mode, which needs no local rules.
fn forward_changes(
    desired: &Desired,
    state: &State,
    forwarding: Forwarding,
    unmaps: &[Action],
) -> Vec<Action> {
    if forwarding == Forwarding::Direct {
        return Vec::new();
    }
    let before: BTreeMap<MappingKey, Endpoint> = state
        .mappings
        .iter()
        .map(|(key, record)| (*key, record.target))
        .collect();
    let mut after = before.clone();
    for action in unmaps {
        if let Action::Unmap { record } = action {
            after.remove(&record.key());
        }
    }
    for (key, mapping) in &desired.mappings {
        after.insert(*key, mapping.target.endpoint);
    }
    let keys: BTreeSet<&MappingKey> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let (was, to) = (before.get(key).copied(), after.get(key).copied());
            (was != to).then_some(Action::Forward { key: *key, was, to })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Owner, ProblemKind, Protocol, Target, TargetSource};
    use std::collections::BTreeMap;

    const LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const RELAY: Forwarding = Forwarding::Relay { lan_address: LAN };

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid test timestamp")
    }

    fn mapping(owner: &str, port: u16, target: &str) -> PortMapping {
        let (address, target_port) = target.split_once(':').expect("ip:port");
        PortMapping {
            owner: owner.parse().expect("ns/name"),
            service_port: port,
            protocol: Protocol::Tcp,
            external_port: port,
            target: Target {
                endpoint: Endpoint::new(
                    address.parse().expect("ip"),
                    target_port.parse().expect("port"),
                ),
                source: TargetSource::NodePort,
            },
        }
    }

    fn record(m: &PortMapping, forwarding: Forwarding, status: MappingStatus) -> MappingRecord {
        MappingRecord {
            service_port: m.service_port,
            target: m.target.endpoint,
            target_source: m.target.source,
            router: "192.168.1.1".into(),
            times: crate::state::LeaseTimes {
                lifetime_secs: 3600,
                granted_at: Some(t(0)),
                renew_at: Some(t(1800)),
                expires_at: Some(t(3600)),
            },
            status,
            ..MappingRecord::leftover(
                m.owner.clone(),
                m.key(),
                forwarding.internal(m),
                Backend::Upnp,
            )
        }
    }

    fn desired_of(mappings: &[PortMapping]) -> Desired {
        Desired {
            mappings: mappings.iter().map(|m| (m.key(), m.clone())).collect(),
            problems: vec![],
        }
    }

    fn state_of(records: Vec<MappingRecord>) -> State {
        State {
            mappings: records
                .into_iter()
                .map(|r| (r.key(), r))
                .collect::<BTreeMap<_, _>>(),
            ..State::default()
        }
    }

    /// A short, comparable form of each action: verb, port, owner.
    fn verbs(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .filter(|a| !matches!(a, Action::Forward { .. }))
            .map(|a| match a {
                Action::Map { mapping, .. } => format!("map {}", mapping.external_port),
                Action::Renew { mapping, .. } => format!("renew {}", mapping.external_port),
                Action::Restore {
                    mapping, reason, ..
                } => {
                    format!("restore {} {reason}", mapping.external_port)
                }
                Action::Retarget { mapping, .. } => format!("retarget {}", mapping.external_port),
                Action::Unmap { record } => {
                    format!("unmap {} {}", record.external_port, record.owner)
                }
                Action::Report { problem } => format!("report {} {}", problem.owner, problem.kind),
                Action::Retire { record } => {
                    format!("retire {} {}", record.external_port, record.backend)
                }
                Action::Purge { keep } => format!("purge keeping {}", keep.len()),
                Action::Readdress { key, was, to } => {
                    format!("readdress {} {was} -> {to}", key.external_port)
                }
                Action::Forward { key, .. } => format!("forward {key}"),
            })
            .collect()
    }

    #[test]
    fn the_nftables_change_is_planned_in_relay_and_gateway_not_in_direct() {
        let web = mapping("default/web", 8080, "192.168.1.20:30080");
        let moved = mapping("default/web", 8080, "192.168.1.21:30080");
        let api = mapping("default/api", 8081, "192.168.1.20:30081");
        let gone = mapping("default/gone", 8082, "192.168.1.20:30082");
        let mut backing_off = record(&gone, RELAY, MappingStatus::Active);
        backing_off.failure = Some(Failure::UnmapFailed);
        backing_off.retry_at = Some(t(900));
        let forwards = |plan: &Plan| -> Vec<String> {
            plan.actions
                .iter()
                .filter(|a| matches!(a, Action::Forward { .. }))
                .map(|a| {
                    a.to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        };
        let state = state_of(vec![
            record(&web, RELAY, MappingStatus::Active),
            record(&gone, RELAY, MappingStatus::Active),
        ]);
        let relay = plan(
            &desired_of(&[moved.clone(), api.clone()]),
            &state,
            RELAY,
            t(100),
        );
        assert_eq!(
            forwards(&relay),
            [
                "nftables 8080/tcp -> 192.168.1.21:30080 (was -> 192.168.1.20:30080)",
                "nftables 8081/tcp -> 192.168.1.20:30081",
                "nftables 8082/tcp removed (was -> 192.168.1.20:30082)",
            ]
        );
        assert_eq!(
            relay.router_calls(),
            2,
            "map 8081, unmap 8082: no router call for nftables"
        );
        let gateway = plan(
            &desired_of(std::slice::from_ref(&web)),
            &state,
            Forwarding::Gateway,
            t(100),
        );
        assert_eq!(
            forwards(&gateway),
            ["nftables 8082/tcp removed (was -> 192.168.1.20:30082)"]
        );
        let direct = plan(
            &desired_of(std::slice::from_ref(&api)),
            &state,
            Forwarding::Direct,
            t(100),
        );
        assert!(forwards(&direct).is_empty(), "{direct}");
        // Unchanged: nothing. An unmap backing off keeps its forward.
        let kept = state_of(vec![
            record(&web, RELAY, MappingStatus::Active),
            backing_off,
        ]);
        let unchanged = plan(
            &desired_of(std::slice::from_ref(&web)),
            &kept,
            RELAY,
            t(100),
        );
        assert!(unchanged.actions.is_empty(), "{unchanged}");
    }

    #[test]
    fn router_observations_become_actions() {
        let web = mapping("default/web", 8080, "192.168.1.20:30080");
        let api = mapping("default/api", 8081, "192.168.1.20:30081");
        let gone = mapping("default/gone", 8082, "192.168.1.20:30082");
        let active = |m: &PortMapping| record(m, RELAY, MappingStatus::Active);
        let mut silent = record(&api, RELAY, MappingStatus::Failed);
        silent.failure = Some(Failure::RouterSilent);
        silent.retry_at = Some(t(900));
        let desired = desired_of(&[web.clone(), api.clone()]);
        let upnp = Some(Backend::Upnp);
        let old_address: Ipv4Addr = "11.22.33.44".parse().unwrap();
        let new_address: Ipv4Addr = "11.22.33.45".parse().unwrap();
        let at_old = |mut r: MappingRecord| {
            r.external_address = Some(old_address);
            r
        };
        let observed = |f: &dyn Fn(&mut Observations)| {
            let mut o = Observations {
                backend: upnp,
                ..Observations::default()
            };
            f(&mut o);
            o
        };
        let cases: Vec<(&str, Vec<MappingRecord>, Observations, Vec<&str>)> = vec![
            (
                "nothing observed: nothing to do, the failed one waits for its retry",
                vec![active(&web), silent.clone()],
                observed(&|_| {}),
                vec![],
            ),
            (
                "the router answers again: the silent one is retried now",
                vec![active(&web), silent.clone()],
                observed(&|o| o.answering_again = true),
                vec!["restore 8081 router answers again"],
            ),
            (
                "a restart loses what was granted before it",
                vec![active(&web), active(&api)],
                observed(&|o| {
                    o.restarted(Restart {
                        backend: Backend::Upnp,
                        granted_before: Some(t(1)),
                    })
                }),
                vec![
                    "restore 8080 router restarted",
                    "restore 8081 router restarted",
                ],
            ),
            (
                "a restart loses nothing granted after it",
                vec![active(&web), active(&api)],
                observed(&|o| {
                    o.restarted(Restart {
                        backend: Backend::Upnp,
                        granted_before: Some(t(0)),
                    })
                }),
                vec![],
            ),
            (
                "a restart of another backend loses nothing here",
                vec![active(&web), active(&api)],
                observed(&|o| {
                    o.restarted(Restart {
                        backend: Backend::Pcp,
                        granted_before: None,
                    })
                }),
                vec![],
            ),
            (
                "a new external address: active mappings that carry another are readdressed, \
                 without a request; a failed one is left to its retry",
                vec![at_old(active(&web)), at_old(silent.clone())],
                observed(&|o| o.external_address = Some(new_address)),
                vec!["readdress 8080 11.22.33.44 -> 11.22.33.45"],
            ),
            (
                "the address they already carry: nothing to do",
                vec![at_old(active(&web)), silent.clone()],
                observed(&|o| o.external_address = Some(old_address)),
                vec![],
            ),
            (
                "what verify found lost is restored",
                vec![active(&web), active(&api)],
                observed(&|o| {
                    o.lost.insert(web.key());
                }),
                vec!["restore 8080 router lost it"],
            ),
            (
                "another backend in use: retired through the old one, then restored; an \
                 unwanted one retired and unmapped",
                vec![active(&web), active(&gone)],
                observed(&|o| o.backend = Some(Backend::Pcp)),
                vec![
                    "retire 8080 upnp",
                    "retire 8082 upnp",
                    "unmap 8082 default/gone",
                    "map 8081",
                    "restore 8080 made through another protocol",
                ],
            ),
            (
                "a router just found: leftovers purged, keeping the state's and the cluster's",
                vec![active(&gone)],
                observed(&|o| o.found = true),
                vec![
                    "purge keeping 3",
                    "unmap 8082 default/gone",
                    "map 8080",
                    "map 8081",
                ],
            ),
        ];
        for (name, records, observed, expected) in cases {
            let plan = plan_observed(&desired, &state_of(records), &observed, RELAY, t(100));
            assert_eq!(verbs(&plan), expected, "{name}");
        }
        // What was planned is forgotten; the backend stays.
        let mut planned = observed(&|o| {
            o.found = true;
            o.lost.insert(web.key());
        });
        planned.planned();
        assert_eq!(
            planned,
            Observations {
                backend: upnp,
                ..Observations::default()
            }
        );
    }

    #[test]
    fn plan_table() {
        let web = mapping("default/web", 8080, "192.168.1.20:30080");
        let moved = mapping("default/web", 8080, "192.168.1.21:30080");
        let taken = mapping("other/app", 8080, "192.168.1.20:30081");
        let active = record(&web, RELAY, MappingStatus::Active);
        let with = |f: &dyn Fn(&mut MappingRecord)| {
            let mut r = active.clone();
            f(&mut r);
            r
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Vec<PortMapping>,
            Vec<MappingRecord>,
            Forwarding,
            i64,
            Vec<&str>,
            Option<i64>,
        )> = vec![
            (
                "new Service is mapped",
                vec![web.clone()],
                vec![],
                RELAY,
                0,
                vec!["map 8080"],
                None,
            ),
            (
                "valid lease: nothing, renewal scheduled",
                vec![web.clone()],
                vec![active.clone()],
                RELAY,
                100,
                vec![],
                Some(1800),
            ),
            (
                "renew at the recorded time",
                vec![web.clone()],
                vec![active.clone()],
                RELAY,
                1800,
                vec!["renew 8080"],
                None,
            ),
            (
                "expired lease is restored",
                vec![web.clone()],
                vec![active.clone()],
                RELAY,
                3600,
                vec!["restore 8080 lease expired"],
                None,
            ),
            (
                "permanent lease is never renewed",
                vec![web.clone()],
                vec![with(&|r| {
                    r.times.renew_at = None;
                    r.times.expires_at = None;
                    r.times.lifetime_secs = 0;
                })],
                RELAY,
                999_999,
                vec![],
                None,
            ),
            (
                "pending record is restored",
                vec![web.clone()],
                vec![record(&web, RELAY, MappingStatus::Pending)],
                RELAY,
                0,
                vec!["restore 8080 unconfirmed"],
                None,
            ),
            (
                "failed record waits for its backoff",
                vec![web.clone()],
                vec![with(&|r| {
                    r.status = MappingStatus::Failed;
                    r.retry_at = Some(t(60));
                })],
                RELAY,
                30,
                vec![],
                Some(60),
            ),
            (
                "failed record retried when due",
                vec![web.clone()],
                vec![with(&|r| {
                    r.status = MappingStatus::Failed;
                    r.retry_at = Some(t(60));
                })],
                RELAY,
                60,
                vec!["restore 8080 retry after failure"],
                None,
            ),
            (
                "Service gone: unmapped",
                vec![],
                vec![active.clone()],
                RELAY,
                100,
                vec!["unmap 8080 default/web"],
                None,
            ),
            (
                "relay: new target changes only local rules",
                vec![moved.clone()],
                vec![active.clone()],
                RELAY,
                100,
                vec!["retarget 8080"],
                Some(1800),
            ),
            (
                "direct: new target replaces the router mapping",
                vec![moved.clone()],
                vec![record(&web, Forwarding::Direct, MappingStatus::Active)],
                Forwarding::Direct,
                100,
                vec!["unmap 8080 default/web", "map 8080"],
                None,
            ),
            (
                "port handed to another Service: replaced",
                vec![taken.clone()],
                vec![active.clone()],
                RELAY,
                100,
                vec!["unmap 8080 default/web", "map 8080"],
                None,
            ),
            (
                "LAN address changed: replaced",
                vec![web.clone()],
                vec![active.clone()],
                Forwarding::Relay {
                    lan_address: Ipv4Addr::new(192, 168, 1, 11),
                },
                100,
                vec!["unmap 8080 default/web", "map 8080"],
                None,
            ),
        ];
        for (name, desired, records, forwarding, now, want, next_due) in cases {
            let plan = plan(
                &desired_of(&desired),
                &state_of(records),
                forwarding,
                t(now),
            );
            assert_eq!(verbs(&plan), want, "{name}");
            assert_eq!(plan.next_due, next_due.map(t), "{name}: next_due");
        }
    }

    #[test]
    fn unchanged_mappings_cost_no_router_call() {
        let mappings: Vec<_> = (0..50)
            .map(|i| mapping(&format!("ns/s{i}"), 20000 + i, "192.168.1.20:30000"))
            .collect();
        let records = mappings
            .iter()
            .map(|m| record(m, RELAY, MappingStatus::Active))
            .collect();
        let plan = plan(&desired_of(&mappings), &state_of(records), RELAY, t(10));
        assert_eq!(plan.router_calls(), 0);
        assert!(plan.actions.is_empty());
    }

    #[test]
    fn order_is_unmaps_first_and_problems_last() {
        let old = mapping("default/old", 9000, "192.168.1.20:30090");
        let new = mapping("default/new", 9001, "192.168.1.20:30091");
        let mut desired = desired_of(&[new]);
        desired.problems.push(Problem {
            owner: Owner::new("default", "bad"),
            kind: ProblemKind::DeniedPort,
            message: "port 22 is denied".into(),
            detail: None,
        });
        let plan = plan(
            &desired,
            &state_of(vec![record(&old, RELAY, MappingStatus::Active)]),
            RELAY,
            t(0),
        );
        assert_eq!(
            verbs(&plan),
            [
                "unmap 9000 default/old",
                "map 9001",
                "report default/bad denied-port"
            ]
        );
        let text = plan.to_string();
        assert!(text.contains("unmap"), "{text}");
        assert!(text.contains("port 22 is denied"), "{text}");
    }
}
