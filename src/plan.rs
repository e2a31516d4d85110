//! What to do next: desired mappings x recorded state x now -> a [`Plan`] of actions.
//!
//! Pure and synchronous: `now` is an argument, nothing is read from the clock, the router or
//! the disk. Router calls are costly (DESIGN.md: ~80-120 ms each at 50 mappings), so an
//! unchanged, valid mapping yields no action at all; renewals happen on the schedule the
//! reconciler wrote into the state when the lease was granted.

use std::fmt;
use std::net::Ipv4Addr;

use jiff::Timestamp;

use crate::desired::Desired;
use crate::model::{Endpoint, PortMapping, Problem};
use crate::state::{Failure, MappingRecord, MappingStatus, State};

/// Where the router forwards a mapping's traffic, by exposure mode (DESIGN.md, "How traffic
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
}

impl fmt::Display for RestoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestoreReason::Unconfirmed => "unconfirmed",
            RestoreReason::Expired => "lease expired",
            RestoreReason::RetryDue => "retry after failure",
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
}

impl Action {
    /// Whether executing this action talks to the router.
    pub fn calls_router(&self) -> bool {
        !matches!(self, Action::Retarget { .. } | Action::Report { .. })
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
        }
    }
}

/// The actions that bring the router, nftables and the state in line with the cluster, in
/// the order to execute them: unmaps first (they free ports), then local changes, new
/// mappings, restores, renewals, and the problems to report.
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

/// Compares what the cluster wants with what holepunch holds, at `now`.
pub fn plan(desired: &Desired, state: &State, forwarding: Forwarding, now: Timestamp) -> Plan {
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
            MappingStatus::Failed => match record.retry_at {
                Some(at) if at > now => schedule(Some(at)),
                _ => restores.push(restore(RestoreReason::RetryDue)),
            },
            MappingStatus::Active => {
                if record.expires_at.is_some_and(|at| at <= now) {
                    restores.push(restore(RestoreReason::Expired));
                } else if record.renew_at.is_some_and(|at| at <= now) {
                    renewals.push(Action::Renew {
                        mapping: mapping.clone(),
                        internal,
                    });
                } else {
                    schedule(record.renew_at);
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

    let reports = desired.problems.iter().map(|problem| Action::Report {
        problem: problem.clone(),
    });
    let actions = unmaps
        .into_iter()
        .chain(retargets)
        .chain(maps)
        .chain(restores)
        .chain(renewals)
        .chain(reports)
        .collect();
    Plan { actions, next_due }
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
            lifetime_secs: 3600,
            granted_at: Some(t(0)),
            renew_at: Some(t(1800)),
            expires_at: Some(t(3600)),
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
        }
    }

    /// A short, comparable form of each action: verb, port, owner.
    fn verbs(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
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
            })
            .collect()
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
                    r.renew_at = None;
                    r.expires_at = None;
                    r.lifetime_secs = 0;
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
