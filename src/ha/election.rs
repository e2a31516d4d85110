//! Leader election over a `coordination.k8s.io/v1` Lease as a pure state machine, with
//! client-go's semantics (`k8s.io/client-go/tools/leaderelection`): holderIdentity,
//! leaseDurationSeconds, acquireTime, renewTime, leaseTransitions, and the three timings
//! lease duration > renew deadline > retry period (README.md, "High availability").
//!
//! No clock, no I/O: every call takes the local monotonic instant (`now`) and, where a
//! timestamp is written, the wall-clock time (`wall`). The driver in [`super::runner`] reads
//! the Lease, feeds it to [`Election::observe`], writes what [`Election::decide`] returns, and
//! reports the outcome with [`Election::written`] or [`Election::write_failed`].
//!
//! Rules (as client-go's `tryAcquireOrRenew`):
//! - No Lease: create it, holding it.
//! - A Lease held by someone else is respected until `lease_duration` after the **local
//!   instant this host first saw its current content** (client-go's `observedTime`), never
//!   after the remote `renewTime`: the two hosts' wall clocks may disagree by any amount, their
//!   monotonic clocks only run at (almost) the same rate.
//! - An expired or released (empty holder) Lease is taken with `leaseTransitions + 1` and a
//!   fresh `acquireTime`; our own Lease is renewed keeping both.
//! - Every write is an update with the resourceVersion last read (a precondition): of two
//!   hosts writing the same version, one gets 409 Conflict and stays a follower.
//!
//! Fencing: [`Election::may_act`] is true only until `renew_deadline` after the instant the
//! last successful write was **sent** (the server stamped it later, and other hosts saw it
//! later still). Another host can take the Lease no earlier than `lease_duration` after it saw
//! that write, so the holder stops acting `lease_duration - renew_deadline` (5 s by default)
//! before anyone else may start, whatever happened to the network in between.

use std::time::{Duration, Instant};

use jiff::Timestamp;

/// The three timings of an election (client-go's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long others wait, after seeing the last change of a held Lease, before taking it.
    pub lease_duration: Duration,
    /// How long the holder may act after its last successful renewal was sent.
    pub renew_deadline: Duration,
    /// How often every host reads (and the holder renews) the Lease.
    pub retry_period: Duration,
}

impl Timings {
    /// The timings `[ha]` configures.
    pub fn from_config(ha: &crate::config::HaConfig) -> Timings {
        Timings {
            lease_duration: Duration::from_secs(u64::from(ha.lease_duration_secs)),
            renew_deadline: Duration::from_secs(u64::from(ha.renew_deadline_secs)),
            retry_period: Duration::from_secs(u64::from(ha.retry_period_secs)),
        }
    }

    /// Whole seconds of the lease duration, as `leaseDurationSeconds` holds them (at least 1).
    fn lease_duration_secs(&self) -> i32 {
        let secs = self.lease_duration.as_secs().max(1);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }
}

/// The election fields of a Lease's spec (client-go's `LeaderElectionRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRecord {
    /// `None` (or an empty string on the wire): nobody holds it.
    pub holder: Option<String>,
    pub lease_duration_secs: Option<i32>,
    pub acquire_time: Option<Timestamp>,
    pub renew_time: Option<Timestamp>,
    pub transitions: i32,
}

/// A Lease as read from (or returned by) the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedLease {
    pub record: LeaseRecord,
    /// `metadata.resourceVersion`, the precondition of the next write.
    pub resource_version: String,
}

/// What to write now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: someone else holds a live Lease.
    Nothing,
    /// The Lease does not exist: create it with this record.
    Create(LeaseRecord),
    /// Replace the Lease's record, only if it still has `resource_version`.
    Update {
        record: LeaseRecord,
        resource_version: String,
    },
}

/// Where this host stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This host holds the Lease and may act until `until` (the fencing deadline).
    Leader { until: Instant },
    /// Another host holds a live Lease.
    Follower { holder: String },
    /// Nobody holds a live Lease that this host knows of, or this host holds it but missed its
    /// renew deadline: it must not act, and tries to take (back) the Lease.
    Candidate,
}

/// Why a write failed, as far as the election cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// 409: someone wrote the Lease since we read it (or created it first).
    Conflict,
    /// Anything else (timeout, connection refused, 5xx): nothing is known.
    Other,
}

/// One host's view of the election.
#[derive(Debug, Clone)]
pub struct Election {
    identity: String,
    timings: Timings,
    /// The Lease as last read or written, and the local instant its record last changed.
    observed: Option<(ObservedLease, Instant)>,
    /// We read the Lease and it did not exist.
    missing: bool,
    /// Sent instant of the last successful write that left us holding the Lease.
    renewed_at: Option<Instant>,
}

impl Election {
    pub fn new(identity: impl Into<String>, timings: Timings) -> Election {
        Election {
            identity: identity.into(),
            timings,
            observed: None,
            missing: false,
            renewed_at: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The Lease as last seen, if any.
    pub fn observed(&self) -> Option<&ObservedLease> {
        self.observed.as_ref().map(|(lease, _)| lease)
    }

    /// Feed a read of the Lease (`None`: it does not exist), answered at `now`.
    pub fn observe(&mut self, lease: Option<ObservedLease>, now: Instant) {
        match lease {
            None => {
                self.observed = None;
                self.missing = true;
            }
            Some(lease) => {
                self.missing = false;
                // NOTE: client-go's observedTime: restart the clock only when the record
                // changed, so a host that reads every retry period does not extend a dead
                // holder's Lease.
                let since = match &self.observed {
                    Some((old, since)) if old.record == lease.record => *since,
                    _ => now,
                };
                if lease.record.holder.as_deref() != Some(self.identity.as_str()) {
                    self.renewed_at = None;
                }
                self.observed = Some((lease, since));
            }
        }
    }

    /// What to write at `now` (`wall`: the wall-clock time to stamp), given the last read.
    pub fn decide(&self, now: Instant, wall: Timestamp) -> Decision {
        let duration = Some(self.timings.lease_duration_secs());
        let Some((lease, _)) = &self.observed else {
            return if self.missing {
                Decision::Create(LeaseRecord {
                    holder: Some(self.identity.clone()),
                    lease_duration_secs: duration,
                    acquire_time: Some(wall),
                    renew_time: Some(wall),
                    transitions: 0,
                })
            } else {
                // Not read yet (or the last write conflicted): read first.
                Decision::Nothing
            };
        };
        let old = &lease.record;
        let ours = self.holds();
        if !ours && old.holder.is_some() && self.foreign_lease_live(now) {
            return Decision::Nothing;
        }
        let record = if ours {
            LeaseRecord {
                holder: Some(self.identity.clone()),
                lease_duration_secs: duration,
                acquire_time: old.acquire_time,
                renew_time: Some(wall),
                transitions: old.transitions,
            }
        } else {
            LeaseRecord {
                holder: Some(self.identity.clone()),
                lease_duration_secs: duration,
                acquire_time: Some(wall),
                renew_time: Some(wall),
                transitions: old.transitions.saturating_add(1),
            }
        };
        Decision::Update {
            record,
            resource_version: lease.resource_version.clone(),
        }
    }

    /// The write sent at `sent_at` succeeded; the server answered `lease` at `now`.
    pub fn written(&mut self, lease: ObservedLease, sent_at: Instant, now: Instant) {
        let ours = lease.record.holder.as_deref() == Some(self.identity.as_str());
        self.missing = false;
        self.observed = Some((lease, now));
        self.renewed_at = ours.then_some(sent_at);
    }

    /// The write failed. A conflict means our read is stale: forget it and read again. Other
    /// failures change nothing: the fencing deadline keeps running.
    pub fn write_failed(&mut self, failure: WriteFailure) {
        if failure == WriteFailure::Conflict {
            self.observed = None;
            self.missing = false;
        }
    }

    /// The record that hands the Lease back at once (client-go's `ReleaseOnCancel`): no
    /// holder, a duration of 1 s, the times set to now, the transitions kept. `None` when
    /// this host does not hold the Lease.
    pub fn release(&self, wall: Timestamp) -> Option<Decision> {
        let (lease, _) = self.observed.as_ref()?;
        if !self.holds() {
            return None;
        }
        Some(Decision::Update {
            record: LeaseRecord {
                holder: None,
                lease_duration_secs: Some(1),
                acquire_time: Some(wall),
                renew_time: Some(wall),
                transitions: lease.record.transitions,
            },
            resource_version: lease.resource_version.clone(),
        })
    }

    /// The release was written: this host holds nothing any more.
    pub fn released(&mut self, lease: ObservedLease, now: Instant) {
        self.observed = Some((lease, now));
        self.renewed_at = None;
    }

    /// Where this host stands at `now`.
    pub fn role(&self, now: Instant) -> Role {
        if let Some(until) = self.fence_until()
            && now < until
        {
            return Role::Leader { until };
        }
        match &self.observed {
            Some((lease, _)) if !self.holds() && self.foreign_lease_live(now) => Role::Follower {
                holder: lease.record.holder.clone().unwrap_or_default(),
            },
            _ => Role::Candidate,
        }
    }

    /// Whether this host may act (hold the address, write the router and nftables) at `now`.
    pub fn may_act(&self, now: Instant) -> bool {
        matches!(self.role(now), Role::Leader { .. })
    }

    /// The fencing deadline: last successful renewal (sent) + renew deadline.
    pub fn fence_until(&self) -> Option<Instant> {
        if !self.holds() {
            return None;
        }
        self.renewed_at
            .and_then(|at| at.checked_add(self.timings.renew_deadline))
    }

    /// The last Lease seen names this host.
    fn holds(&self) -> bool {
        self.observed.as_ref().is_some_and(|(lease, _)| {
            lease.record.holder.as_deref() == Some(self.identity.as_str())
        })
    }

    /// The last Lease seen is held by someone and was changed less than its duration ago
    /// (local clock).
    fn foreign_lease_live(&self, now: Instant) -> bool {
        let Some((lease, since)) = &self.observed else {
            return false;
        };
        if lease.record.holder.is_none() {
            return false;
        }
        // NOTE: client-go's isLeaseValid uses the observed record's leaseDurationSeconds;
        // a missing or non-positive one falls back to our own duration.
        let duration = lease
            .record
            .lease_duration_secs
            .and_then(|secs| u64::try_from(secs).ok())
            .filter(|secs| *secs > 0)
            .map_or(self.timings.lease_duration, Duration::from_secs);
        since.checked_add(duration).is_some_and(|end| now < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "node-a";
    const B: &str = "node-b";

    fn timings() -> Timings {
        Timings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn wall(offset_secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + offset_secs).expect("a valid timestamp")
    }

    fn held_by(
        holder: Option<&str>,
        transitions: i32,
        renew: Timestamp,
        rv: &str,
    ) -> ObservedLease {
        ObservedLease {
            record: LeaseRecord {
                holder: holder.map(str::to_owned),
                lease_duration_secs: Some(15),
                acquire_time: Some(wall(-100)),
                renew_time: Some(renew),
                transitions,
            },
            resource_version: rv.to_owned(),
        }
    }

    /// What the server stores and answers for a written record.
    fn stored(record: &LeaseRecord, rv: &str) -> ObservedLease {
        ObservedLease {
            record: record.clone(),
            resource_version: rv.to_owned(),
        }
    }

    fn update_record(decision: &Decision) -> &LeaseRecord {
        match decision {
            Decision::Update { record, .. } => record,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    #[test]
    fn acquire_renew_take_and_respect_table() {
        let t0 = Instant::now();
        struct Case {
            name: &'static str,
            lease: Option<ObservedLease>,
            /// Seconds between the read and the decision.
            after: u64,
            want: Decision,
        }
        let mut held_by_a = held_by(Some(A), 3, wall(-1), "7");
        held_by_a.record.acquire_time = Some(wall(-500));
        let cases = [
            Case {
                name: "no Lease: create it, holding it",
                lease: None,
                after: 0,
                want: Decision::Create(LeaseRecord {
                    holder: Some(A.into()),
                    lease_duration_secs: Some(15),
                    acquire_time: Some(wall(0)),
                    renew_time: Some(wall(0)),
                    transitions: 0,
                }),
            },
            Case {
                name: "empty Lease (released): take it at once, transitions + 1",
                lease: Some(held_by(None, 4, wall(-1), "9")),
                after: 0,
                want: Decision::Update {
                    record: LeaseRecord {
                        holder: Some(A.into()),
                        lease_duration_secs: Some(15),
                        acquire_time: Some(wall(0)),
                        renew_time: Some(wall(0)),
                        transitions: 5,
                    },
                    resource_version: "9".into(),
                },
            },
            Case {
                name: "our own Lease: renew, keep acquireTime and transitions",
                lease: Some(held_by_a),
                after: 1,
                want: Decision::Update {
                    record: LeaseRecord {
                        holder: Some(A.into()),
                        lease_duration_secs: Some(15),
                        acquire_time: Some(wall(-500)),
                        renew_time: Some(wall(0)),
                        transitions: 3,
                    },
                    resource_version: "7".into(),
                },
            },
            Case {
                name: "a live foreign Lease: leave it",
                lease: Some(held_by(Some(B), 2, wall(-1), "8")),
                after: 14,
                want: Decision::Nothing,
            },
            Case {
                name: "a foreign Lease unchanged for its duration: take it, transitions + 1",
                lease: Some(held_by(Some(B), 2, wall(-1), "8")),
                after: 15,
                want: Decision::Update {
                    record: LeaseRecord {
                        holder: Some(A.into()),
                        lease_duration_secs: Some(15),
                        acquire_time: Some(wall(0)),
                        renew_time: Some(wall(0)),
                        transitions: 3,
                    },
                    resource_version: "8".into(),
                },
            },
        ];
        for case in cases {
            let mut election = Election::new(A, timings());
            election.observe(case.lease, t0);
            let got = election.decide(t0 + secs(case.after), wall(0));
            assert_eq!(got, case.want, "{}", case.name);
        }
        // Nothing read yet: nothing to write.
        assert_eq!(
            Election::new(A, timings()).decide(t0, wall(0)),
            Decision::Nothing
        );
    }

    #[test]
    fn roles_follow_the_lease_and_the_fence() {
        let t0 = Instant::now();
        let mut a = Election::new(A, timings());
        assert_eq!(a.role(t0), Role::Candidate);
        assert!(!a.may_act(t0));

        // B holds a live Lease: A follows B, and takes over only after lease_duration.
        a.observe(Some(held_by(Some(B), 0, wall(0), "1")), t0);
        assert_eq!(a.role(t0 + secs(14)), Role::Follower { holder: B.into() });
        assert_eq!(a.role(t0 + secs(15)), Role::Candidate);

        // A takes it: the write was sent at t0+15 and answered at t0+16.
        let decision = a.decide(t0 + secs(15), wall(15));
        let record = update_record(&decision).clone();
        a.written(stored(&record, "2"), t0 + secs(15), t0 + secs(16));
        assert_eq!(
            a.role(t0 + secs(16)),
            Role::Leader {
                until: t0 + secs(25)
            }
        );
        assert!(a.may_act(t0 + secs(24)));
        // Fenced from the send, not the answer: at t0+25 A stops although it heard back at
        // t0+16.
        assert!(!a.may_act(t0 + secs(25)));
        assert_eq!(a.role(t0 + secs(25)), Role::Candidate);
    }

    #[test]
    fn a_write_conflict_leaves_the_loser_a_follower() {
        let t0 = Instant::now();
        let mut a = Election::new(A, timings());
        let mut b = Election::new(B, timings());
        let empty = held_by(None, 0, wall(0), "5");
        a.observe(Some(empty.clone()), t0);
        b.observe(Some(empty), t0);
        let from_a = a.decide(t0, wall(0));
        let from_b = b.decide(t0, wall(0));
        // Both want to write version 5; the server takes A's first.
        assert!(
            matches!(&from_b, Decision::Update { resource_version, .. } if resource_version == "5")
        );
        let won = stored(update_record(&from_a), "6");
        a.written(won.clone(), t0, t0);
        b.write_failed(WriteFailure::Conflict);
        assert!(a.may_act(t0));
        assert!(!b.may_act(t0));
        // B forgot its stale read: it writes nothing until it reads again...
        assert_eq!(b.decide(t0, wall(0)), Decision::Nothing);
        // ...and then follows A.
        b.observe(Some(won), t0 + secs(1));
        assert_eq!(b.role(t0 + secs(1)), Role::Follower { holder: A.into() });
        assert_eq!(b.decide(t0 + secs(2), wall(2)), Decision::Nothing);
    }

    #[test]
    fn fencing_ends_before_anyone_can_acquire() {
        // A renews at t0 (sent) and then loses the API. B saw A's renewal only when its read
        // came back, at t0 + 1 (never earlier than the write was sent).
        let t0 = Instant::now();
        let mut a = Election::new(A, timings());
        a.observe(Some(held_by(Some(A), 0, wall(-2), "1")), t0);
        let renewal = a.decide(t0, wall(0));
        let renewed = stored(update_record(&renewal), "2");
        a.written(renewed.clone(), t0, t0 + secs(1));
        let mut b = Election::new(B, timings());
        b.observe(Some(renewed.clone()), t0 + secs(1));
        // Every later write of A fails.
        for step in 1..=9 {
            a.write_failed(WriteFailure::Other);
            assert!(a.may_act(t0 + secs(step)), "at +{step}s");
        }
        let a_stops = t0 + secs(10);
        assert!(!a.may_act(a_stops));
        // B keeps reading the unchanged Lease: that does not extend it, and B may take it
        // only at t0 + 1 + 15, five seconds after A stopped.
        for step in 2..16 {
            b.observe(Some(renewed.clone()), t0 + secs(step));
            assert_eq!(
                b.decide(t0 + secs(step), wall(0)),
                Decision::Nothing,
                "at +{step}s"
            );
        }
        b.observe(Some(renewed), t0 + secs(16));
        let b_takes = t0 + secs(16);
        assert!(matches!(
            b.decide(b_takes, wall(16)),
            Decision::Update { .. }
        ));
        assert!(b_takes.duration_since(a_stops) >= secs(5));
    }

    #[test]
    fn a_failed_renewal_keeps_the_old_deadline_and_a_late_success_extends_it() {
        let t0 = Instant::now();
        let mut a = Election::new(A, timings());
        a.observe(None, t0);
        let Decision::Create(record) = a.decide(t0, wall(0)) else {
            panic!("expected a create");
        };
        a.written(stored(&record, "1"), t0, t0);
        a.write_failed(WriteFailure::Other);
        assert_eq!(a.fence_until(), Some(t0 + secs(10)));
        // The next renewal goes through (sent at +8): the fence moves to +18.
        let renewal = a.decide(t0 + secs(8), wall(8));
        a.written(
            stored(update_record(&renewal), "2"),
            t0 + secs(8),
            t0 + secs(9),
        );
        assert!(a.may_act(t0 + secs(17)));
        assert!(!a.may_act(t0 + secs(18)));
        // Past the deadline, A is a candidate; as the Lease still names it, it renews (the
        // precondition makes that safe) and acts again.
        assert_eq!(a.role(t0 + secs(19)), Role::Candidate);
        let again = a.decide(t0 + secs(19), wall(19));
        assert_eq!(
            update_record(&again).transitions,
            0,
            "its own Lease: no transition"
        );
        a.written(
            stored(update_record(&again), "3"),
            t0 + secs(19),
            t0 + secs(19),
        );
        assert!(a.may_act(t0 + secs(20)));
    }

    #[test]
    fn losing_the_lease_to_another_ends_acting_at_once() {
        let t0 = Instant::now();
        let mut a = Election::new(A, timings());
        a.observe(Some(held_by(Some(A), 0, wall(0), "1")), t0);
        let renewal = a.decide(t0, wall(0));
        a.written(stored(update_record(&renewal), "2"), t0, t0);
        assert!(a.may_act(t0 + secs(1)));
        // An administrator (or a host after a long partition) gave it to B.
        a.observe(Some(held_by(Some(B), 1, wall(2), "3")), t0 + secs(2));
        assert!(!a.may_act(t0 + secs(2)));
        assert_eq!(a.role(t0 + secs(2)), Role::Follower { holder: B.into() });
    }

    #[test]
    fn clock_skew_the_remote_renew_time_is_ignored() {
        let t0 = Instant::now();
        // B's wall clock is an hour behind: its renewTime looks long expired. A still waits
        // the full duration from when it saw the Lease.
        let mut a = Election::new(A, timings());
        a.observe(Some(held_by(Some(B), 0, wall(-3600), "1")), t0);
        assert_eq!(a.decide(t0, wall(0)), Decision::Nothing);
        assert_eq!(a.role(t0 + secs(14)), Role::Follower { holder: B.into() });
        // B's wall clock is an hour ahead: its renewTime lies in the future. A does not wait
        // for it: the Lease expires lease_duration after the last change A saw.
        let mut a = Election::new(A, timings());
        a.observe(Some(held_by(Some(B), 0, wall(3600), "1")), t0);
        assert_eq!(a.decide(t0 + secs(14), wall(14)), Decision::Nothing);
        assert!(matches!(
            a.decide(t0 + secs(15), wall(15)),
            Decision::Update { .. }
        ));
        // Every renewal of B (a new renewTime, whatever its clock says) restarts A's wait.
        let mut a = Election::new(A, timings());
        a.observe(Some(held_by(Some(B), 0, wall(-3600), "1")), t0);
        a.observe(Some(held_by(Some(B), 0, wall(-3598), "2")), t0 + secs(10));
        assert_eq!(a.decide(t0 + secs(24), wall(24)), Decision::Nothing);
        assert!(matches!(
            a.decide(t0 + secs(25), wall(25)),
            Decision::Update { .. }
        ));
    }

    #[test]
    fn the_observed_lease_duration_counts_not_ours() {
        let t0 = Instant::now();
        let mut a = Election::new(A, timings());
        let mut short = held_by(Some(B), 0, wall(0), "1");
        short.record.lease_duration_secs = Some(4);
        a.observe(Some(short), t0);
        assert_eq!(a.decide(t0 + secs(3), wall(3)), Decision::Nothing);
        assert!(matches!(
            a.decide(t0 + secs(4), wall(4)),
            Decision::Update { .. }
        ));
        // A nonsense duration falls back to ours.
        let mut a = Election::new(A, timings());
        let mut broken = held_by(Some(B), 0, wall(0), "1");
        broken.record.lease_duration_secs = Some(-5);
        a.observe(Some(broken), t0);
        assert_eq!(a.decide(t0 + secs(14), wall(14)), Decision::Nothing);
        assert!(matches!(
            a.decide(t0 + secs(15), wall(15)),
            Decision::Update { .. }
        ));
    }

    #[test]
    fn graceful_release_hands_over_at_once() {
        let t0 = Instant::now();
        let mut a = Election::new(A, timings());
        // Not holding: nothing to release.
        a.observe(Some(held_by(Some(B), 2, wall(0), "1")), t0);
        assert_eq!(a.release(wall(0)), None);

        a.observe(Some(held_by(Some(A), 2, wall(0), "4")), t0);
        let renewal = a.decide(t0, wall(0));
        a.written(stored(update_record(&renewal), "5"), t0, t0);
        let release = a.release(wall(1)).expect("A holds the Lease");
        assert_eq!(
            release,
            Decision::Update {
                record: LeaseRecord {
                    holder: None,
                    lease_duration_secs: Some(1),
                    acquire_time: Some(wall(1)),
                    renew_time: Some(wall(1)),
                    transitions: 2,
                },
                resource_version: "5".into(),
            }
        );
        let released = stored(update_record(&release), "6");
        a.released(released.clone(), t0 + secs(1));
        assert!(!a.may_act(t0 + secs(1)));
        // B, which followed A a moment ago, takes it on its next read.
        let mut b = Election::new(B, timings());
        b.observe(Some(held_by(Some(A), 2, wall(0), "5")), t0);
        assert_eq!(b.decide(t0 + secs(1), wall(1)), Decision::Nothing);
        b.observe(Some(released), t0 + secs(2));
        let take = b.decide(t0 + secs(2), wall(2));
        assert_eq!(update_record(&take).holder.as_deref(), Some(B));
        assert_eq!(update_record(&take).transitions, 3);
    }
}
