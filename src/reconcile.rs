//! Executes a [`Plan`] through a router backend and records every result in the [`State`].
//!
//! The order of writes follows ARCHITECTURE.md ("State lifecycle"): every request is
//! recorded as `pending` (with its PCP nonce) and saved **before** it is sent, so a crash at
//! any point leaves a state that can renew or delete what the router may hold. Failures are
//! recorded with a backoff; the plan retries them when it is due.
//!
//! When that save fails (state directory read-only or full), nothing is sent that a crash
//! would leave holepunch unable to renew or delete: new mappings and restores that needed a
//! fresh PCP nonce are held back (see [`HELD_BACK_PREFIX`]) and retried with the usual
//! backoff, while renewals of recorded mappings and unmaps still go, so serving goes on. The
//! old state file is left as it was. [`StateStore`] remembers the failure so it is logged
//! when it begins, changes or ends rather than at every pass.
//!
//! With `[ha]` those same requests are also shared before they are sent
//! ([`Persist::share_pending`]: mirrored into the cluster, README.md "High availability");
//! if that fails they are held back the same way, retried from
//! [`UNSHARED_RETRY_FLOOR_SECS`] on.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::{SignedDuration, Timestamp};
use rand::Rng;

use crate::model::{Backend, MappingKey, Nonce, PortMapping, Problem};
use crate::plan::{Action, Plan, UNMAP_FAILED_PREFIX};
use crate::router::{Grant, MapRequest, PortMapper, RouterError};
use crate::state::{
    Failure, LeaseTimes, MappingRecord, MappingStatus, Replaced, State, StateError, StateFile,
};
use crate::yielding::{self, Interrupt, Never, Saves, Yield};

/// First retry after a failure; doubles with each further failure.
pub const RETRY_FLOOR_SECS: u64 = 30;
/// Shortest wait before a renewal, whatever lease the router granted.
pub const MIN_RENEW_SECS: u64 = 30;
/// Longest wait between retries (30 s short, 30 min long; README.md, "Router protocols").
pub const RETRY_CEILING_SECS: u64 = 30 * 60;

/// What one reconcile did, for logs, Events and metrics.
#[derive(Debug, Default)]
pub struct Outcome {
    pub mapped: usize,
    pub renewed: usize,
    pub restored: usize,
    pub retargeted: usize,
    pub unmapped: usize,
    pub failed: usize,
    /// Router refusals and conflicts, to be reported on the Services.
    pub problems: Vec<Problem>,
    /// The state could not be saved; the in-memory state is still right and the next save
    /// will try again.
    pub save_error: Option<StateError>,
    /// Requests held back for an unsaved state that a save just released: due now.
    pub released: usize,
    /// When a plan will next have something to do if nothing changes: the plan's own
    /// `next_due`, or sooner a renewal or retry this execution scheduled.
    pub next_due: Option<Timestamp>,
    /// Why the pass stopped before its last router request (what was not sent is still
    /// `pending` and saved: the next pass requests it).
    pub interrupted: Option<Interrupt>,
}

/// How a request held back because the state could not be saved reads in a mapping's
/// `last_error` (and how a version 1 state file, which has no `failure`, says so). Such a
/// mapping is not on disk yet, so it stays held back until a save works.
pub const HELD_BACK_PREFIX: &str = "state file could not be saved";

/// How a request held back because the pending records could not be shared (with `[ha]`:
/// mirrored into the cluster) reads in a mapping's `last_error`.
pub const UNSHARED_PREFIX: &str = "the mapping records could not be mirrored into the cluster";

/// First retry of a request held back because it could not be shared; doubles like
/// [`RETRY_FLOOR_SECS`]. Short: the mirror usually answers again within seconds, and a host
/// that cannot reach it for longer is fenced anyway.
pub const UNSHARED_RETRY_FLOOR_SECS: u64 = 2;

/// Whether this mapping's last request was held back for an unsaved state.
fn held_back(record: &MappingRecord) -> bool {
    record.failure == Some(Failure::HeldBack)
}

/// Where the reconciler persists the state. The daemon uses a [`StateStore`] around the
/// locked [`StateFile`]; tests may keep it in memory.
pub trait Persist {
    fn persist(&mut self, state: &State) -> Result<(), StateError>;

    /// Why the last save failed (with its causes), `None` after a success. A target that
    /// does not remember answers `None`: every failure is then logged.
    fn failure(&self) -> Option<&str> {
        None
    }

    /// Shares the records about to be requested beyond this host, awaited after the pending
    /// save and before any router request that needs a new nonce or a held-back mapping
    /// (README.md, "High availability": with `[ha]`, the mirror in the cluster). An error
    /// holds those requests back like a failed save. Nothing to share by default.
    fn share_pending<'s>(&'s mut self, _state: &'s State) -> BoxFuture<'s, Result<(), ShareError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Why [`Persist::share_pending`] could not share the pending records (its own error, with
/// its causes).
pub type ShareError = Box<dyn std::error::Error + Send + Sync>;

impl Persist for StateFile {
    fn persist(&mut self, state: &State) -> Result<(), StateError> {
        self.save(state)
    }
}

/// A [`Persist`] target that remembers whether its last save failed and why. While it fails,
/// [`execute`] saves at every pass (one with nothing to send too), logs the failure only when
/// it begins or changes, and once a save works again makes what it held back due at once.
#[derive(Debug)]
pub struct StateStore<P> {
    target: P,
    failure: Option<String>,
}

impl<P: Persist> StateStore<P> {
    pub fn new(target: P) -> StateStore<P> {
        StateStore {
            target,
            failure: None,
        }
    }
}

impl<P: Persist> Persist for StateStore<P> {
    fn persist(&mut self, state: &State) -> Result<(), StateError> {
        let result = self.target.persist(state);
        self.failure = result.as_ref().err().map(|e| with_causes(e));
        result
    }

    fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    fn share_pending<'s>(&'s mut self, state: &'s State) -> BoxFuture<'s, Result<(), ShareError>> {
        self.target.share_pending(state)
    }
}

/// An error and its `source()` chain on one line (the OS error says *why*, the message what
/// to do).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

/// Applies `plan` at `now`: router calls through `mapper`, results into `state`, saved with
/// `store` before and after the router calls.
pub async fn execute<M: PortMapper>(
    plan: &Plan,
    state: &mut State,
    mapper: &mut M,
    store: &mut impl Persist,
    lease_secs: u32,
    now: Timestamp,
) -> Outcome {
    execute_until(plan, state, mapper, store, lease_secs, now, &mut Never).await
}

/// [`execute`], in the order [`yielding::order`] gives, saving the results as they come
/// ([`Saves`]) and asking `until` before each router request whether to stop there
/// (ARCHITECTURE.md, "The loop").
pub async fn execute_until<M: PortMapper>(
    plan: &Plan,
    state: &mut State,
    mapper: &mut M,
    store: &mut impl Persist,
    lease_secs: u32,
    now: Timestamp,
    until: &mut impl Yield,
) -> Outcome {
    let mut outcome = Outcome::default();
    if !plan.actions.iter().any(Action::executed) {
        // Nothing changes: no router call and no write to the disk, unless an earlier save
        // failed: the disk is behind, try again.
        if store.failure().is_some() {
            save(state, store, &mut outcome, now);
        }
        outcome.next_due = next_due(plan, state, now);
        return outcome;
    }
    let backend = mapper.backend();
    // Keys whose owned record is unmapped and then mapped again in this pass (a new owner
    // or a new internal endpoint): the unmap must leave the new record in place.
    let remapped: BTreeSet<MappingKey> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Map { mapping, .. } => Some(mapping.key()),
            _ => None,
        })
        .collect();

    // 1. Record what is about to be requested, then save: pending before sending. Requests
    // that only a successful save lets holepunch undo after a crash are noted.
    let mut unsaved: BTreeSet<MappingKey> = BTreeSet::new();
    for action in &plan.actions {
        match action {
            Action::Map { mapping, internal } => {
                let mut record = new_record(mapping, *internal, backend);
                // NOTE: RFC 6887 §11.3: a PCP server refuses a request for a mapping it holds
                // under another nonce (NOT_AUTHORIZED). The record replaced here is unmapped
                // later in this pass; until then the router knows its nonce, and a crash
                // in between must leave that nonce on disk.
                if let Some(old) = state.mappings.get(&mapping.key())
                    && old.backend == backend
                {
                    if old.nonce.is_some() {
                        record.nonce.clone_from(&old.nonce);
                    }
                    // The old owner's router mapping (and any its own handover left) is
                    // deleted later in this pass; a crash before that must not forget it, or
                    // in direct mode the router refuses the new one until that lease ends.
                    record.replaces = replaced_by_handover(old);
                }
                state.mappings.insert(mapping.key(), record);
                unsaved.insert(mapping.key());
            }
            Action::Restore { mapping, .. } => {
                if let Some(record) = state.mappings.get_mut(&mapping.key()) {
                    record.status = MappingStatus::Pending;
                    if record.backend != backend {
                        // Earlier owners' mappings made through another protocol cannot be
                        // deleted through this one; their leases run out by themselves.
                        record.replaces.clear();
                    }
                    if backend == Backend::Pcp && record.nonce.is_none() {
                        record.nonce = Some(random_nonce());
                        unsaved.insert(mapping.key());
                    }
                    if held_back(record) {
                        unsaved.insert(mapping.key());
                    }
                    record.backend = backend;
                }
            }
            Action::Retarget { mapping, .. } => {
                if let Some(record) = state.mappings.get_mut(&mapping.key()) {
                    record.target = mapping.target.endpoint;
                    record.target_source = mapping.target.source;
                    record.service_port = mapping.service_port;
                    outcome.retargeted += 1;
                }
            }
            Action::Readdress { key, to, .. } => {
                if let Some(record) = state.mappings.get_mut(key)
                    && record.status == MappingStatus::Active
                {
                    record.external_address = Some(*to);
                }
            }
            Action::Unmap { record } if record.backend == backend => {
                // Until the router answers, nobody knows whether it still holds the mapping:
                // if holepunch dies now and the Service is wanted again by the next start, the
                // mapping must be requested again, not trusted as active (found by
                // tests/daemon_crash.rs).
                if let Some(kept) = state.mappings.get_mut(&record.key()) {
                    kept.status = MappingStatus::Pending;
                }
            }
            Action::Renew { .. }
            | Action::Unmap { .. }
            | Action::Report { .. }
            | Action::Retire { .. }
            | Action::Purge { .. }
            | Action::Forward { .. } => {}
        }
    }
    let saving = std::time::Instant::now();
    save(state, store, &mut outcome, now);
    // The stamps of target holepunch::timing: README.md, "Benchmarks".
    tracing::debug!(target: "holepunch::timing", stage = "pending saved",
        took_us = saving.elapsed().as_micros(), "pending records saved");
    // 1b. Then shared (with `[ha]`: mirrored into the cluster) before any of them is sent: a
    // host that dies after sending must leave their nonces where the next host reads them.
    // NOTE: RFC 6887 §11.3: the next host's request for the same port and internal address
    // (relay mode: the floating address) under a new nonce is refused until the orphan's
    // lease ends. Renewals, restores with a known nonce and unmaps need nothing new, so they
    // go either way.
    let unshared = match &outcome.save_error {
        None if !unsaved.is_empty() => store.share_pending(state).await.err(),
        _ => None,
    };
    let not_sent: BTreeSet<MappingKey> = match (&outcome.save_error, &unshared) {
        (Some(e), _) => {
            let why = format!("{HELD_BACK_PREFIX}: {}", with_causes(e));
            let until = "the state file can be saved";
            hold_back_all(
                state,
                &unsaved,
                (&why, until),
                RETRY_FLOOR_SECS,
                &mut outcome,
                now,
            );
            unsaved
        }
        (None, Some(e)) => {
            // Held back, retried soon: the next host could not renew what this one sends
            // now, and a request it cannot renew is worse than one a few seconds late.
            let why = format!("{UNSHARED_PREFIX}: {}", with_causes(e.as_ref()));
            let until = "the mapping records can be mirrored into the cluster";
            hold_back_all(
                state,
                &unsaved,
                (&why, until),
                UNSHARED_RETRY_FLOOR_SECS,
                &mut outcome,
                now,
            );
            unsaved
        }
        (None, None) => BTreeSet::new(),
    };

    // 2. Talk to the router. Once it does not answer, the rest of this pass is not sent:
    // each request would wait out its whole retransmission schedule for nothing, holding
    // the daemon; they fail at once and are retried when the router answers again.
    let mut silent: Option<String> = None;
    // Keys whose old owner's unmap failed in this pass: the new owner's map is tried anyway
    // (with the same internal endpoint the router takes it as the same mapping), not a
    // second unmap.
    let mut unmap_failed: BTreeSet<MappingKey> = BTreeSet::new();
    let mut saves = Saves::default();
    let mut sent = 0;
    let started = tokio::time::Instant::now();
    for action in yielding::order(&plan.actions, state) {
        // Between two requests: save what came (a silent router's refusals cost nothing),
        // then stop here if asked to.
        if silent.is_none() && sends(action) {
            if saves.due() {
                save(state, store, &mut outcome, now);
                saves.saved();
            }
            if let Some(why) = until.interrupt(sent) {
                outcome.interrupted = Some(why);
                break;
            }
            saves.sending();
            sent += 1;
        }
        match action {
            Action::Unmap { record } if held_back(record) && record.replaces.is_empty() => {
                // Held back, never sent: the router holds nothing to delete. (One that
                // replaces another's mapping goes on below: that mapping must be deleted.)
                state.mappings.remove(&record.key());
                outcome.unmapped += 1;
            }
            Action::Unmap { record } if record.backend != backend => {
                // Another protocol made it: this one cannot delete it (a PCP nonce means
                // nothing to UPnP). Backend "none" holds nothing on the router; a real one's
                // lease runs out by itself.
                if !remapped.contains(&record.key()) {
                    state.mappings.remove(&record.key());
                }
                outcome.unmapped += 1;
                if record.backend != Backend::None {
                    tracing::warn!(service = %record.owner, external_port = record.external_port,
                        protocol = %record.protocol, made_with = %record.backend, using = %backend,
                        lifetime_secs = record.times.lifetime_secs,
                        "forgetting a mapping made through another router protocol; the router drops it when its lease ends");
                }
            }
            Action::Unmap { record } => {
                match unmap_with_replaced(mapper, record, &mut silent).await {
                    Ok(()) => {
                        if !remapped.contains(&record.key()) {
                            state.mappings.remove(&record.key());
                        } else if let Some(new) = state.mappings.get_mut(&record.key()) {
                            let gone = replaced_by_handover(record);
                            new.replaces.retain(|r| !gone.contains(r));
                        }
                        outcome.unmapped += 1;
                        tracing::info!(service = %record.owner, external_port = record.external_port,
                        protocol = %record.protocol, backend = %record.backend, "unmapped");
                    }
                    Err(e) => {
                        outcome.failed += 1;
                        tracing::warn!(service = %record.owner, external_port = record.external_port,
                            protocol = %record.protocol, error = %e,
                            "could not remove the mapping; will retry after a backoff");
                        // (A record re-mapped in this pass is the new one: its map decides.)
                        if remapped.contains(&record.key()) {
                            unmap_failed.insert(record.key());
                        } else if let Some(kept) = state.mappings.get_mut(&record.key()) {
                            kept.failures = kept.failures.saturating_add(1);
                            kept.failure = Some(Failure::UnmapFailed);
                            kept.last_error = Some(format!("{UNMAP_FAILED_PREFIX}: {e}"));
                            kept.retry_at = Some(after(
                                now,
                                retry_delay(
                                    kept.failures,
                                    Duration::from_secs(RETRY_FLOOR_SECS),
                                    rand::rng().random_range(0.9..1.1),
                                ),
                            ));
                        }
                    }
                }
            }
            Action::Map { mapping, .. } | Action::Restore { mapping, .. }
                if not_sent.contains(&mapping.key()) => {}
            Action::Map { mapping, .. }
            | Action::Restore { mapping, .. }
            | Action::Renew { mapping, .. } => {
                let Some(record) = state.mappings.get(&mapping.key()) else {
                    continue;
                };
                if !record.replaces.is_empty() && !unmap_failed.contains(&mapping.key()) {
                    // A handover a crash (or a failed unmap) interrupted: the earlier owners'
                    // mappings go first, or the router refuses this one.
                    let earlier = record.clone();
                    let result = unmap_replaced(mapper, &earlier, &mut silent).await;
                    let Some(record) = state.mappings.get_mut(&mapping.key()) else {
                        continue;
                    };
                    match result {
                        Ok(()) => {
                            tracing::info!(service = %record.owner, external_port = record.external_port,
                                protocol = %record.protocol, earlier_owners = record.replaces.len(),
                                "deleted the earlier owners' mappings of this port");
                            record.replaces.clear();
                        }
                        Err(e) => {
                            outcome.failed += 1;
                            tracing::warn!(service = %record.owner, external_port = record.external_port,
                                protocol = %record.protocol, error = %e,
                                "could not delete the earlier owner's mapping of this port; will retry after a backoff");
                            record_failure(
                                record,
                                &e,
                                now,
                                false,
                                rand::rng().random_range(0.9..1.1),
                            );
                            continue;
                        }
                    }
                }
                let Some(record) = state.mappings.get(&mapping.key()) else {
                    continue;
                };
                let request = MapRequest {
                    owner: record.owner.clone(),
                    protocol: record.protocol,
                    external_port: record.external_port,
                    internal: record.internal,
                    lifetime_secs: lease_secs,
                    nonce: record.nonce(),
                };
                tracing::debug!(target: "holepunch::timing", stage = "map",
                    external_port = request.external_port, "asking the router");
                let result = unless_silent(&mut silent, mapper.map(&request)).await;
                let result = match result {
                    Ok(grant) if grant.external_port != request.external_port => {
                        // NOTE: miniupnpd may grant another port even with PREFER_FAILURE
                        // (README.md, "Router protocols"): give it back and report a conflict.
                        let mut wrong = record.clone();
                        wrong.external_port = grant.external_port;
                        if let Err(e) = mapper.unmap(&wrong.lease()).await {
                            tracing::warn!(error = %e, port = grant.external_port,
                                "could not give back a mapping the router granted on another port");
                        }
                        Err(RouterError::Conflict {
                            port: request.external_port,
                            protocol: request.protocol,
                            detail: format!(
                                "the router offered port {} instead",
                                grant.external_port
                            ),
                        })
                    }
                    other => other,
                };
                let Some(record) = state.mappings.get_mut(&mapping.key()) else {
                    continue;
                };
                match result {
                    Ok(grant) => {
                        match action {
                            Action::Map { .. } => outcome.mapped += 1,
                            Action::Restore { .. } => outcome.restored += 1,
                            _ => outcome.renewed += 1,
                        }
                        // Granted now (to the second), not when the pass began: a long pass
                        // must not date its grants back.
                        let granted = Duration::from_secs(started.elapsed().as_secs());
                        record_grant(record, &grant, after(now, granted));
                        if let Some(renew_at) = record.times.renew_at {
                            until.falls_due(renew_at);
                        }
                        tracing::info!(service = %record.owner, external_port = record.external_port,
                            protocol = %record.protocol, target = %record.target, backend = %backend,
                            lifetime_secs = grant.lifetime_secs, "{}", verb(action));
                    }
                    Err(e) => {
                        outcome.failed += 1;
                        tracing::warn!(service = %record.owner, external_port = record.external_port,
                            protocol = %record.protocol, backend = %backend, error = %e,
                            "router request failed");
                        let renewing_valid_lease = matches!(action, Action::Renew { .. })
                            && record.times.expires_at.is_none_or(|at| at > now);
                        record_failure(
                            record,
                            &e,
                            now,
                            renewing_valid_lease,
                            rand::rng().random_range(0.9..1.1),
                        );
                        if e.is_refusal() {
                            outcome.problems.push(crate::router::refusal_problem(
                                &record.owner,
                                record.key(),
                                &e,
                            ));
                        }
                    }
                }
            }
            Action::Retarget { .. }
            | Action::Readdress { .. }
            | Action::Report { .. }
            | Action::Retire { .. }
            | Action::Purge { .. }
            | Action::Forward { .. } => {}
        }
    }
    save(state, store, &mut outcome, now);
    outcome.next_due = next_due(plan, state, now);
    outcome
}

/// The plan's `next_due`, or sooner the renewal or retry of a mapping the plan acted on
/// (what was just granted or failed has a new schedule; the others kept theirs).
fn next_due(plan: &Plan, state: &State, now: Timestamp) -> Option<Timestamp> {
    let key = |action: &Action| match action {
        Action::Map { mapping, .. }
        | Action::Renew { mapping, .. }
        | Action::Restore { mapping, .. }
        | Action::Retarget { mapping, .. } => Some(mapping.key()),
        Action::Unmap { record } | Action::Retire { record } => Some(record.key()),
        Action::Report { .. }
        | Action::Purge { .. }
        | Action::Forward { .. }
        | Action::Readdress { .. } => None,
    };
    plan.actions
        .iter()
        .filter_map(key)
        .filter_map(|k| state.mappings.get(&k))
        .flat_map(|r| {
            let renew = (r.status == MappingStatus::Active)
                .then_some(r.times.renew_at)
                .flatten();
            [renew, r.retry_at]
        })
        .flatten()
        .chain(plan.next_due)
        .filter(|at| *at > now)
        .min()
}

/// The router mappings a handover from `old` leaves to delete: those `old`'s own handover
/// left, then `old`'s, unless it was never sent (held back for an unsaved state).
fn replaced_by_handover(old: &MappingRecord) -> Vec<Replaced> {
    let mut replaced = old.replaces.clone();
    let own = Replaced {
        owner: old.owner.clone(),
        address: old.internal.address,
        port: old.internal.port,
    };
    if !held_back(old) && !replaced.contains(&own) {
        replaced.push(own);
    }
    replaced
}

/// Deletes the earlier owners' mappings `record` replaces, oldest first.
async fn unmap_replaced<M: PortMapper>(
    mapper: &mut M,
    record: &MappingRecord,
    silent: &mut Option<String>,
) -> Result<(), RouterError> {
    for replaced in &record.replaces {
        unless_silent(silent, mapper.unmap(&record.as_replaced(replaced).lease())).await?;
    }
    Ok(())
}

/// Deletes `record`'s router mapping, and first the earlier owners' it replaces.
async fn unmap_with_replaced<M: PortMapper>(
    mapper: &mut M,
    record: &MappingRecord,
    silent: &mut Option<String>,
) -> Result<(), RouterError> {
    unmap_replaced(mapper, record, silent).await?;
    unless_silent(silent, mapper.unmap(&record.lease())).await
}

/// Runs `call` unless the router was found silent earlier in this pass; notes a
/// failure that is not a refusal (the router did not answer usably) for the calls after it.
async fn unless_silent<T>(
    silent: &mut Option<String>,
    call: impl std::future::Future<Output = Result<T, RouterError>>,
) -> Result<T, RouterError> {
    if let Some(earlier) = silent {
        return Err(RouterError::NotSent {
            earlier: earlier.clone(),
        });
    }
    let result = call.await;
    if let Err(e) = &result
        && !e.is_refusal()
    {
        *silent = Some(e.to_string());
    }
    result
}

/// Whether `execute` may send a router request for `action`.
fn sends(action: &Action) -> bool {
    matches!(
        action,
        Action::Map { .. } | Action::Restore { .. } | Action::Renew { .. } | Action::Unmap { .. }
    )
}

fn verb(action: &Action) -> &'static str {
    match action {
        Action::Map { .. } => "mapped",
        Action::Restore { .. } => "restored",
        _ => "renewed",
    }
}

/// Saves `state`. A failure is logged when it begins or changes (not at every pass while it
/// lasts); once a save works after a failure, the requests held back for it are due now.
fn save(state: &mut State, store: &mut impl Persist, outcome: &mut Outcome, now: Timestamp) {
    let before = store.failure().map(str::to_owned);
    match store.persist(state) {
        Ok(()) => {
            outcome.save_error = None;
            if before.is_some() {
                let released = state.due_now(now, held_back);
                outcome.released += released;
                tracing::info!(
                    held_back = released,
                    "the state file is saved again; asking the router for what was held back"
                );
                if released > 0 {
                    // Their retry is recorded on disk too (this save cannot release again:
                    // the one before it worked).
                    save(state, store, outcome, now);
                }
            }
        }
        Err(e) => {
            let why = with_causes(&e);
            if before.as_deref() != Some(why.as_str()) {
                tracing::error!(error = %why,
                    "could not save the state file; the old one stays as it was, mappings already made are renewed, new ones wait until it can be saved");
            } else {
                tracing::debug!(error = %why, "the state file still cannot be saved");
            }
            outcome.save_error = Some(e);
        }
    }
}

/// Holds back every request in `keys` for `why` (see [`hold_back`]), retried from
/// `floor_secs` on; the operator's log says why and `until` what.
fn hold_back_all(
    state: &mut State,
    keys: &BTreeSet<MappingKey>,
    (why, until): (&str, &str),
    floor_secs: u64,
    outcome: &mut Outcome,
    now: Timestamp,
) {
    for key in keys {
        if let Some(record) = state.mappings.get_mut(key) {
            let jitter = rand::rng().random_range(0.9..1.1);
            hold_back(record, why, Duration::from_secs(floor_secs), now, jitter);
            outcome.failed += 1;
            tracing::warn!(service = %record.owner, external_port = record.external_port,
                protocol = %record.protocol, retry_at = ?record.retry_at, reason = why,
                "not asking the router until {until}");
        }
    }
}

/// Records a request not sent because the state holding it could not be saved (or shared):
/// it is retried with the usual backoff from `floor` (or at once when a save works again).
fn hold_back(record: &mut MappingRecord, why: &str, floor: Duration, now: Timestamp, jitter: f64) {
    record.failures = record.failures.saturating_add(1);
    record.failure = Some(Failure::HeldBack);
    record.last_error = Some(format!(
        "{why}; not asking the router for {} until it can",
        record.key()
    ));
    record.status = MappingStatus::Failed;
    record.retry_at = Some(after(now, retry_delay(record.failures, floor, jitter)));
}

fn new_record(
    mapping: &PortMapping,
    internal: crate::model::Endpoint,
    backend: Backend,
) -> MappingRecord {
    MappingRecord {
        owner: mapping.owner.clone(),
        service_port: mapping.service_port,
        protocol: mapping.protocol,
        external_port: mapping.external_port,
        internal,
        target: mapping.target.endpoint,
        target_source: mapping.target.source,
        backend,
        router: String::new(),
        nonce: (backend == Backend::Pcp).then(random_nonce),
        times: LeaseTimes::default(),
        epoch: None,
        external_address: None,
        status: MappingStatus::Pending,
        retry_at: None,
        failures: 0,
        replaces: Vec::new(),
        failure: None,
        last_error: None,
    }
}

/// 96 random bits as 24 hex digits (RFC 6887 §11.1: the nonce identifies the mapping's owner).
fn random_nonce() -> String {
    Nonce::random(&mut rand::rng()).to_string()
}

/// The kind of failure a router error records on a mapping: a refusal waits for its
/// backoff, silence is retried as soon as the router answers again.
pub(crate) fn failure_of(error: &RouterError) -> Failure {
    if error.is_refusal() {
        Failure::Refused
    } else {
        Failure::RouterSilent
    }
}

pub(crate) fn after(now: Timestamp, duration: Duration) -> Timestamp {
    SignedDuration::try_from(duration)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

fn record_grant(record: &mut MappingRecord, grant: &Grant, now: Timestamp) {
    record.status = MappingStatus::Active;
    record.times.lifetime_secs = grant.lifetime_secs;
    record.times.granted_at = Some(now);
    let lifetime = Duration::from_secs(grant.lifetime_secs.into());
    record.times.expires_at = (grant.lifetime_secs > 0).then(|| after(now, lifetime));
    record.times.renew_at = (grant.lifetime_secs > 0).then(|| {
        after(
            now,
            renew_delay(grant.renew_after.unwrap_or(lifetime / 2), lifetime),
        )
    });
    record.epoch = grant.epoch;
    record.external_address = grant.external_address.or(record.external_address);
    record.router = grant.router.clone();
    record.retry_at = None;
    record.failures = 0;
    record.failure = None;
    record.last_error = None;
    // The router gave this port to this mapping: no earlier owner's mapping holds it.
    record.replaces.clear();
}

/// When to renew: the backend's choice, but never sooner than [`MIN_RENEW_SECS`] (a router
/// granting a lease of a few seconds must not make holepunch ask every second: the floor
/// wins over the lease), and otherwise before the lease ends.
pub(crate) fn renew_delay(wanted: Duration, lifetime: Duration) -> Duration {
    wanted
        .min(lifetime.saturating_sub(Duration::from_secs(1)))
        .max(Duration::from_secs(MIN_RENEW_SECS))
}

/// Records a failed request. A failed renewal of a lease that is still valid keeps the
/// mapping active and only moves the renewal; anything else waits for its retry.
fn record_failure(
    record: &mut MappingRecord,
    error: &RouterError,
    now: Timestamp,
    renewing_valid_lease: bool,
    jitter: f64,
) {
    record.failures = record.failures.saturating_add(1);
    record.failure = Some(failure_of(error));
    record.last_error = Some(error.to_string());
    let floor = match error {
        RouterError::Refused {
            retry_after: Some(after),
            ..
        } => (*after).max(Duration::from_secs(RETRY_FLOOR_SECS)),
        _ => Duration::from_secs(RETRY_FLOOR_SECS),
    };
    let retry = after(now, retry_delay(record.failures, floor, jitter));
    if renewing_valid_lease {
        record.times.renew_at = Some(
            record
                .times
                .expires_at
                .map_or(retry, |expiry| retry.min(expiry)),
        );
    } else {
        record.status = MappingStatus::Failed;
        record.retry_at = Some(retry);
    }
}

/// Exponential backoff from `floor`, doubling per failure, capped at [`RETRY_CEILING_SECS`]
/// (or at `floor` if that is higher), scaled by `jitter` (e.g. 0.9..1.1).
pub fn retry_delay(failures: u32, floor: Duration, jitter: f64) -> Duration {
    crate::backoff::doubling(failures, floor, Duration::from_secs(RETRY_CEILING_SECS))
        .mul_f64(jitter.clamp(0.5, 1.5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Lease, MappingKey, Owner, Protocol, Target, TargetSource};
    use crate::plan::{Forwarding, plan};
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    const LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const RELAY: Forwarding = Forwarding::Relay { lan_address: LAN };

    /// The moment the tests start at.
    fn start() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("valid")
    }

    /// [`execute`] with a 120 s lease, saving into a store nobody reads.
    async fn run<M: PortMapper>(
        plan: &Plan,
        state: &mut State,
        router: &mut M,
        now: Timestamp,
    ) -> Outcome {
        execute(plan, state, router, &mut Saved::default(), 120, now).await
    }

    /// What executing `plan` saves before its first router call: what a SIGKILL right then
    /// leaves on disk.
    async fn saved_before_sending(plan: &Plan, state: &State, now: Timestamp) -> State {
        let mut saved = Saved::default();
        let mut router = ForwardingRouter::default();
        execute(plan, &mut state.clone(), &mut router, &mut saved, 120, now).await;
        saved.0.swap_remove(0)
    }

    /// Keeps every saved state, to check what was on disk when the router was asked.
    #[derive(Default)]
    struct Saved(Vec<State>);

    impl Persist for Saved {
        fn persist(&mut self, state: &State) -> Result<(), StateError> {
            self.0.push(state.clone());
            Ok(())
        }
    }

    /// A router that answers per external port from a script and records the calls.
    struct ScriptedRouter {
        grants: BTreeMap<u16, Result<u16, &'static str>>,
        calls: Vec<String>,
    }

    impl PortMapper for ScriptedRouter {
        fn backend(&self) -> Backend {
            Backend::Pcp
        }

        async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
            self.calls.push(format!(
                "map {} nonce={}",
                request.external_port,
                request.nonce.is_some()
            ));
            match self
                .grants
                .get(&request.external_port)
                .copied()
                .unwrap_or(Ok(request.external_port))
            {
                Ok(port) => Ok(Grant {
                    external_port: port,
                    lifetime_secs: 120,
                    renew_after: Some(Duration::from_secs(70)),
                    external_address: Some(Ipv4Addr::new(11, 22, 33, 44)),
                    epoch: Some(5),
                    router: "192.168.1.1".into(),
                }),
                Err("silent") => Err(RouterError::silent_for_tests()),
                Err(reason) => Err(RouterError::Refused {
                    reason: reason.into(),
                    retry_after: None,
                }),
            }
        }

        async fn unmap(&mut self, record: &Lease) -> Result<(), RouterError> {
            self.calls.push(format!("unmap {}", record.external_port));
            Ok(())
        }
    }

    fn mapping(port: u16) -> PortMapping {
        PortMapping {
            owner: Owner::new("default", format!("s{port}")),
            service_port: port,
            protocol: Protocol::Tcp,
            external_port: port,
            target: Target {
                endpoint: Endpoint::new(Ipv4Addr::new(192, 168, 1, 20), 30000),
                source: TargetSource::NodePort,
            },
        }
    }

    fn key(port: u16) -> MappingKey {
        MappingKey {
            protocol: Protocol::Tcp,
            external_port: port,
        }
    }

    #[tokio::test]
    async fn records_pending_before_sending_then_grants_conflicts_and_failures() {
        let desired = wanting_ports(&[8080, 8081, 8082]);
        let forwarding = RELAY;
        let now = start();
        let mut state = State::default();
        let first = plan(&desired, &state, forwarding, now);
        let mut router = ScriptedRouter {
            grants: BTreeMap::from([(8081, Ok(40000)), (8082, Err("NOT_AUTHORIZED"))]),
            calls: vec![],
        };
        let mut saved = Saved::default();
        let outcome = execute(&first, &mut state, &mut router, &mut saved, 120, now).await;

        // Saved once before any router call, with every request pending and its nonce.
        let before = &saved.0[0];
        assert_eq!(before.mappings.len(), 3);
        assert!(
            before
                .mappings
                .values()
                .all(|r| r.status == MappingStatus::Pending && r.nonce.is_some())
        );
        assert_eq!(
            router.calls,
            [
                "map 8080 nonce=true",
                "map 8081 nonce=true",
                "unmap 40000",
                "map 8082 nonce=true"
            ]
        );

        let granted = &state.mappings[&key(8080)];
        assert_eq!(granted.status, MappingStatus::Active);
        assert_eq!(
            granted.times.renew_at,
            Some(now + SignedDuration::from_secs(70))
        );
        assert_eq!(
            granted.times.expires_at,
            Some(now + SignedDuration::from_secs(120))
        );
        assert_eq!(
            granted.external_address,
            Some(Ipv4Addr::new(11, 22, 33, 44))
        );

        let conflict = &state.mappings[&key(8081)];
        assert_eq!(conflict.status, MappingStatus::Failed);
        assert!(
            conflict
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("40000"))
        );
        let refused = &state.mappings[&key(8082)];
        assert_eq!(refused.status, MappingStatus::Failed);
        let wait = refused
            .retry_at
            .expect("retry scheduled")
            .duration_since(now)
            .as_secs();
        assert!((27..=33).contains(&wait), "retry in {wait} s");

        assert_eq!((outcome.mapped, outcome.failed), (1, 2));
        assert_eq!(outcome.problems.len(), 2);
        assert_eq!(saved.0.len(), 2);
        assert_eq!(saved.0[1], state);

        // Nothing due: no router call, nothing written.
        let calm = plan(
            &desired,
            &state,
            forwarding,
            now + SignedDuration::from_secs(10),
        );
        let outcome = execute(&calm, &mut state, &mut router, &mut saved, 120, now).await;
        assert_eq!(
            (router.calls.len(), saved.0.len(), outcome.failed),
            (4, 2, 0)
        );
    }

    #[tokio::test]
    async fn a_mapping_made_through_another_protocol_is_forgotten_not_sent() {
        // Records from backend "none" (and from a protocol no longer in use) cannot be
        // deleted through this router: they are dropped without a router call.
        let now = start();
        let mut state = State::default();
        for (port, backend) in [
            (8080, Backend::None),
            (8081, Backend::Upnp),
            (8082, Backend::Pcp),
        ] {
            let mut record = new_record(
                &mapping(port),
                Endpoint::new(Ipv4Addr::new(192, 168, 1, 10), port),
                backend,
            );
            record.status = MappingStatus::Active;
            state.mappings.insert(key(port), record);
        }
        let nothing_wanted = crate::desired::Desired::default();
        let forwarding = RELAY;
        let unmaps = plan(&nothing_wanted, &state, forwarding, now);
        let mut router = ScriptedRouter {
            grants: BTreeMap::new(),
            calls: vec![],
        };
        let outcome = run(&unmaps, &mut state, &mut router, now).await;
        assert_eq!(
            router.calls,
            ["unmap 8082"],
            "only the PCP record goes to the PCP router"
        );
        assert_eq!(outcome.unmapped, 3);
        assert!(state.mappings.is_empty());
    }

    /// Port 8090 held (active, relay, PCP) by default/s8090, and the cluster now wants it for
    /// default/twin-b: the state, the new owner, and the plan (unmap, then map).
    fn relay_handover(now: Timestamp) -> (State, PortMapping, Plan) {
        let mut record = new_record(&mapping(8090), Endpoint::new(LAN, 8090), Backend::Pcp);
        record.status = MappingStatus::Active;
        let mut state = State::default();
        state.mappings.insert(key(8090), record);
        let mut new_owner = mapping(8090);
        new_owner.owner = Owner::new("default", "twin-b");
        let desired = crate::desired::Desired {
            mappings: [(key(8090), new_owner.clone())].into_iter().collect(),
            problems: vec![],
        };
        let handover = plan(&desired, &state, RELAY, now);
        (state, new_owner, handover)
    }

    /// A router port changes owner (the Service that held it is gone and another one wants
    /// it): the plan unmaps the old record and maps the new one on the same key. Found by
    /// tests/daemon_crash.rs: the new record must keep the old nonce (a crash before the unmap
    /// otherwise leaves a state whose nonce the router refuses with NOT_AUTHORIZED), and the
    /// unmap must not drop the new record (it was then never requested in that pass).
    #[tokio::test]
    async fn a_port_changing_owner_keeps_its_nonce_and_is_mapped_in_the_same_pass() {
        let now = start();
        let (mut state, new_owner, handover) = relay_handover(now);
        let old_nonce = state.mappings[&key(8090)].nonce.clone();
        let mut router = ScriptedRouter {
            grants: BTreeMap::new(),
            calls: vec![],
        };
        let mut saved = Saved::default();
        let outcome = execute(&handover, &mut state, &mut router, &mut saved, 120, now).await;

        let before = &saved.0[0].mappings[&key(8090)];
        assert_eq!(before.owner, new_owner.owner);
        assert_eq!(before.status, MappingStatus::Pending);
        assert_eq!(
            before.nonce, old_nonce,
            "on disk before the unmap: the nonce the router knows"
        );
        assert_eq!(router.calls, ["unmap 8090", "map 8090 nonce=true"]);
        assert_eq!((outcome.unmapped, outcome.mapped), (1, 1));
        let after = &state.mappings[&key(8090)];
        assert_eq!(
            (&after.owner, after.status),
            (&new_owner.owner, MappingStatus::Active)
        );
    }

    /// A router port's forwarding as a router keeps it: one internal endpoint per external
    /// port; a map for another endpoint is a conflict until the holder's mapping is deleted
    /// (miniupnpd in direct mode). Records the calls with owner and internal endpoint.
    #[derive(Default)]
    struct ForwardingRouter {
        forwards: BTreeMap<u16, Endpoint>,
        calls: Vec<String>,
    }

    impl PortMapper for ForwardingRouter {
        fn backend(&self) -> Backend {
            Backend::Pcp
        }

        async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
            let port = request.external_port;
            self.calls.push(format!(
                "map {port} {} -> {}",
                request.owner, request.internal
            ));
            match self.forwards.get(&port) {
                Some(held) if *held != request.internal => {
                    return Err(RouterError::Conflict {
                        port,
                        protocol: request.protocol,
                        detail: format!("{held} holds it"),
                    });
                }
                _ => self.forwards.insert(port, request.internal),
            };
            Ok(Grant {
                external_port: port,
                lifetime_secs: 120,
                renew_after: None,
                external_address: None,
                epoch: None,
                router: "192.168.1.1".into(),
            })
        }

        async fn unmap(&mut self, record: &Lease) -> Result<(), RouterError> {
            let port = record.external_port;
            self.calls.push(format!(
                "unmap {port} {} -> {}",
                record.owner, record.internal
            ));
            if self.forwards.get(&port) == Some(&record.internal) {
                self.forwards.remove(&port);
            }
            Ok(())
        }
    }

    /// Direct mode: the twins' mappings of one router port point at different targets. Killed
    /// after the handover is on disk and before the old owner's mapping is deleted, the next
    /// start must delete that mapping first; the router refused the new one until the old
    /// lease ended before `replaces` (found while reviewing tests/daemon_crash.rs).
    #[tokio::test]
    async fn a_handover_cut_short_deletes_the_old_owners_mapping_on_the_next_start() {
        let now = start();
        let target = |host: u8| Endpoint::new(Ipv4Addr::new(192, 168, 1, host), 30000);
        let owned = |name: &str, host: u8| {
            let mut m = mapping(8090);
            m.owner = Owner::new("default", name);
            m.target.endpoint = target(host);
            m
        };
        let wants = |m: &PortMapping| crate::desired::Desired {
            mappings: [(key(8090), m.clone())].into_iter().collect(),
            problems: vec![],
        };
        let (a, b, c) = (
            owned("twin-a", 21),
            owned("twin-b", 22),
            owned("twin-c", 23),
        );
        let mut router = ForwardingRouter::default();
        let mut state = State::default();
        let first = plan(&wants(&a), &state, Forwarding::Direct, now);
        run(&first, &mut state, &mut router, now).await;
        assert_eq!(router.forwards[&8090], target(21));
        let nonce = state.mappings[&key(8090)].nonce.clone();

        // twin-a unpublished: what the pass saved before it sent anything, as a SIGKILL
        // right then leaves it.
        let handover = plan(&wants(&b), &state, Forwarding::Direct, now);
        let mut on_disk = saved_before_sending(&handover, &state, now).await;
        let record = &on_disk.mappings[&key(8090)];
        assert_eq!(
            (&record.owner, record.status),
            (&b.owner, MappingStatus::Pending)
        );
        assert_eq!(record.nonce, nonce);
        let old = Replaced {
            owner: a.owner.clone(),
            address: target(21).address,
            port: target(21).port,
        };
        assert_eq!(record.replaces, std::slice::from_ref(&old));

        // The next start wants twin-c instead: twin-b's record is replaced in turn, and must
        // carry twin-a's mapping along (twin-b's was never sent).
        let to_c = plan(&wants(&c), &on_disk, Forwarding::Direct, now);
        let after_to_c = saved_before_sending(&to_c, &on_disk, now).await;
        let twin_b = Replaced {
            owner: b.owner.clone(),
            address: target(22).address,
            port: target(22).port,
        };
        assert_eq!(
            after_to_c.mappings[&key(8090)].replaces,
            [old.clone(), twin_b]
        );

        // The next start still wants twin-b: twin-a's mapping goes first, then twin-b's map.
        let restart = plan(&wants(&b), &on_disk, Forwarding::Direct, now);
        let outcome = run(&restart, &mut on_disk, &mut router, now).await;
        assert_eq!(
            router.calls[1..],
            [
                "unmap 8090 default/twin-a -> 192.168.1.21:30000",
                "map 8090 default/twin-b -> 192.168.1.22:30000"
            ]
        );
        assert_eq!((outcome.restored, outcome.failed), (1, 0));
        assert_eq!(router.forwards[&8090], target(22));
        let record = &on_disk.mappings[&key(8090)];
        assert_eq!(record.status, MappingStatus::Active);
        assert!(record.replaces.is_empty(), "{record:?}");
        assert!(outcome.problems.is_empty(), "{:?}", outcome.problems);
    }

    /// A new owner held back (the state could not be saved) while the old owner's unmap
    /// failed, then unpublished: the old owner's mapping is still deleted, not forgotten
    /// with the record that was never sent.
    #[tokio::test]
    async fn an_unsent_new_owner_that_is_unpublished_still_deletes_the_old_owners_mapping() {
        let now = start();
        let old_internal = Endpoint::new(Ipv4Addr::new(192, 168, 1, 21), 30000);
        let mut record = new_record(&mapping(8090), mapping(8090).target.endpoint, Backend::Pcp);
        hold_back(
            &mut record,
            "disk full",
            Duration::from_secs(RETRY_FLOOR_SECS),
            now,
            1.0,
        );
        record.replaces.push(Replaced {
            owner: Owner::new("default", "twin-a"),
            address: old_internal.address,
            port: old_internal.port,
        });
        let mut state = State::default();
        state.mappings.insert(key(8090), record);
        let mut router = ForwardingRouter::default();
        router.forwards.insert(8090, old_internal);
        let gone = plan(&wanting_ports(&[]), &state, Forwarding::Direct, now);
        let outcome = run(&gone, &mut state, &mut router, now).await;
        assert_eq!(
            router.calls,
            [
                "unmap 8090 default/twin-a -> 192.168.1.21:30000",
                "unmap 8090 default/s8090 -> 192.168.1.20:30000"
            ]
        );
        assert!(router.forwards.is_empty(), "{:?}", router.forwards);
        assert!(state.mappings.is_empty());
        assert_eq!(outcome.unmapped, 1);
    }

    /// The old owner's unmap fails in the handover pass: the new owner's map is still tried
    /// once (no second unmap); granted, the router forwards the port to the new owner, so
    /// nothing is left to delete.
    #[tokio::test]
    async fn a_handover_whose_unmap_fails_tries_the_map_once_and_then_forgets_the_old() {
        let now = start();
        let (mut state, new_owner, handover) = relay_handover(now);
        let mut router = RefusingUnmaps(0);
        let outcome = run(&handover, &mut state, &mut router, now).await;
        assert_eq!((router.0, outcome.failed, outcome.mapped), (1, 1, 1));
        let record = &state.mappings[&key(8090)];
        assert_eq!(
            (&record.owner, record.status, record.failure),
            (&new_owner.owner, MappingStatus::Active, None)
        );
        assert!(record.replaces.is_empty(), "{record:?}");
    }

    /// An unmap is recorded as pending before it is sent: killed before the answer, the next
    /// start must not take the mapping for granted if the Service is wanted again (the router
    /// may have deleted it already).
    #[tokio::test]
    async fn an_unmap_is_unconfirmed_on_disk_before_it_is_sent() {
        let now = start();
        let forwarding = RELAY;
        let mut record = new_record(&mapping(8081), Endpoint::new(LAN, 8081), Backend::Pcp);
        record_grant(
            &mut record,
            &Grant {
                external_port: 8081,
                lifetime_secs: 120,
                renew_after: None,
                external_address: None,
                epoch: None,
                router: "192.168.1.1".into(),
            },
            now,
        );
        let mut state = State::default();
        state.mappings.insert(key(8081), record);
        let unwanted = plan(&crate::desired::Desired::default(), &state, forwarding, now);
        let mut router = ScriptedRouter {
            grants: BTreeMap::new(),
            calls: vec![],
        };
        let mut saved = Saved::default();
        execute(&unwanted, &mut state, &mut router, &mut saved, 120, now).await;
        assert_eq!(router.calls, ["unmap 8081"]);
        assert!(
            saved.0[1].mappings.is_empty(),
            "gone once the router said so"
        );

        // What a crash right after the unmap left for the next start, which wants it again.
        let on_disk = &saved.0[0];
        assert_eq!(on_disk.mappings[&key(8081)].status, MappingStatus::Pending);
        let wanted_again = crate::desired::Desired {
            mappings: [(key(8081), mapping(8081))].into_iter().collect(),
            problems: vec![],
        };
        let next = plan(&wanted_again, on_disk, forwarding, now);
        assert!(
            matches!(
                next.actions.as_slice(),
                [Action::Restore {
                    reason: crate::plan::RestoreReason::Unconfirmed,
                    ..
                }]
            ),
            "{next}"
        );
    }

    #[tokio::test]
    async fn after_a_silent_router_the_rest_of_the_pass_is_not_sent() {
        let desired = wanting_ports(&[8080, 8081, 8082]);
        let forwarding = RELAY;
        let now = start();
        let mut state = State::default();
        let mut router = ScriptedRouter {
            grants: BTreeMap::from([(8080, Err("silent"))]),
            calls: vec![],
        };
        let first = plan(&desired, &state, forwarding, now);
        let outcome = run(&first, &mut state, &mut router, now).await;
        assert_eq!(
            router.calls,
            ["map 8080 nonce=true"],
            "one wait for a silent router, not three"
        );
        assert_eq!(outcome.failed, 3);
        assert!(state.mappings.values().all(|r| {
            r.status == MappingStatus::Failed && r.failure == Some(Failure::RouterSilent)
        }));
        assert!(
            outcome.problems.is_empty(),
            "silence is not the Services' problem"
        );
    }

    /// A router that takes `per_request` to grant each map.
    struct SlowRouter {
        per_request: Duration,
        calls: Vec<u16>,
    }

    impl PortMapper for SlowRouter {
        fn backend(&self) -> Backend {
            Backend::Pcp
        }

        async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
            tokio::time::sleep(self.per_request).await;
            self.calls.push(request.external_port);
            Ok(Grant {
                external_port: request.external_port,
                lifetime_secs: 120,
                renew_after: None,
                external_address: None,
                epoch: None,
                router: "192.168.1.1".into(),
            })
        }

        async fn unmap(&mut self, _lease: &crate::model::Lease) -> Result<(), RouterError> {
            tokio::time::sleep(self.per_request).await;
            Ok(())
        }
    }

    /// Stops the pass with `why` once `after` requests went.
    struct StopAfter(usize, Interrupt);

    impl Yield for StopAfter {
        fn interrupt(&mut self, sent: usize) -> Option<Interrupt> {
            (sent >= self.0).then_some(self.1)
        }
    }

    fn active(state: &State) -> usize {
        state
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Active)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_router_has_each_result_saved_and_a_stop_leaves_the_rest_pending_on_disk() {
        let now = start();
        let wanted = wanting_ports(&[8080, 8081, 8082, 8083, 8084]);
        let mut state = State::default();
        let mut router = SlowRouter {
            per_request: Duration::from_secs(1),
            calls: vec![],
        };
        let mut disk = Saved::default();
        let first = plan(&wanted, &state, RELAY, now);
        let outcome = execute_until(
            &first,
            &mut state,
            &mut router,
            &mut disk,
            120,
            now,
            &mut StopAfter(3, Interrupt::Stop),
        )
        .await;
        assert_eq!(
            router.calls,
            [8080, 8081, 8082],
            "stopped before the fourth"
        );
        assert_eq!(outcome.interrupted, Some(Interrupt::Stop));
        assert_eq!(outcome.mapped, 3);
        // Pending first, then each answer as it came, then the end of the pass.
        let on_disk: Vec<usize> = disk.0.iter().map(active).collect();
        assert_eq!(on_disk, [0, 1, 2, 3, 3]);
        let last = disk.0.last().expect("saved");
        assert_eq!(last, &state, "the end of the pass is on disk");
        let unsent: Vec<&MappingRecord> = last
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Pending)
            .collect();
        assert_eq!(unsent.len(), 2, "what was not sent waits as pending");
        assert!(unsent.iter().all(|r| r.nonce.is_some()));

        // The next pass requests what is left, with the nonces on disk.
        let nonces: Vec<Option<String>> = unsent.iter().map(|r| r.nonce.clone()).collect();
        let next = plan(&wanted, &state, RELAY, now);
        let outcome = execute_until(
            &next,
            &mut state,
            &mut router,
            &mut disk,
            120,
            now,
            &mut Never,
        )
        .await;
        assert_eq!(router.calls, [8080, 8081, 8082, 8083, 8084]);
        assert_eq!((outcome.restored, outcome.interrupted), (2, None));
        assert_eq!(active(&state), 5);
        assert_eq!(
            nonces,
            [
                state.mappings[&key(8083)].nonce.clone(),
                state.mappings[&key(8084)].nonce.clone()
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_longer_than_half_a_lease_stops_when_its_first_grant_is_due_for_renewal() {
        let now = start();
        let ports: Vec<u16> = (9000..9100).collect();
        let wanted = wanting_ports(&ports);
        let mut state = State::default();
        let mut router = SlowRouter {
            per_request: Duration::from_secs(1),
            calls: vec![],
        };
        let first = plan(&wanted, &state, RELAY, now);
        let mut interrupts = crate::yielding::Interrupts::default();
        interrupts.begin(now, first.next_due);
        let outcome = execute_until(
            &first,
            &mut state,
            &mut router,
            &mut Saved::default(),
            120,
            now,
            &mut interrupts,
        )
        .await;
        // Granted 1 s into the pass, renewed after half its 120 s lease.
        let earliest = &state.mappings[&key(9000)];
        assert_eq!(
            earliest.times.granted_at,
            Some(now + SignedDuration::from_secs(1))
        );
        assert_eq!(
            earliest.times.renew_at,
            Some(now + SignedDuration::from_secs(61))
        );
        assert_eq!(outcome.interrupted, Some(Interrupt::Due));
        assert_eq!(router.calls.len(), 61, "stopped when 9000 fell due");
        // The next pass renews it before requesting the rest.
        let next = plan(&wanted, &state, RELAY, now + SignedDuration::from_secs(61));
        let order: Vec<&Action> = crate::yielding::order(&next.actions, &state);
        assert!(
            matches!(order.first(), Some(Action::Renew { mapping, .. }) if mapping.external_port == 9000),
            "{next}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_router_costs_no_save_per_answer() {
        let now = start();
        let wanted = wanting_ports(&[8080, 8081, 8082, 8083, 8084]);
        let mut state = State::default();
        let mut router = SlowRouter {
            per_request: Duration::from_millis(100),
            calls: vec![],
        };
        let mut disk = Saved::default();
        let first = plan(&wanted, &state, RELAY, now);
        execute(&first, &mut state, &mut router, &mut disk, 120, now).await;
        assert_eq!(active(&state), 5);
        // 0.5 s of answers: pending first, then one save at the end.
        assert_eq!(disk.0.len(), 2);
    }

    /// A state directory that refuses writes while `error` is set (read-only: EROFS, full:
    /// ENOSPC), keeping what was saved before.
    #[derive(Default)]
    struct Refusing {
        error: Option<i32>,
        saved: Vec<State>,
    }

    impl Persist for Refusing {
        fn persist(&mut self, state: &State) -> Result<(), StateError> {
            match self.error {
                Some(errno) => Err(StateError::WriteTemp {
                    temp: "/var/lib/holepunch/.state.toml.tmp".into(),
                    source: std::io::Error::from_raw_os_error(errno),
                }),
                None => {
                    self.saved.push(state.clone());
                    Ok(())
                }
            }
        }
    }

    /// A PCP record for port `port` as a grant at `granted` left it.
    fn granted(port: u16, granted: Timestamp) -> MappingRecord {
        let mut record = new_record(
            &mapping(port),
            Endpoint::new(Ipv4Addr::new(192, 168, 1, 10), port),
            Backend::Pcp,
        );
        record_grant(
            &mut record,
            &Grant {
                external_port: port,
                lifetime_secs: 120,
                renew_after: Some(Duration::from_secs(60)),
                external_address: None,
                epoch: None,
                router: "192.168.1.1".into(),
            },
            granted,
        );
        record
    }

    /// A router that grants every map and refuses every unmap.
    struct RefusingUnmaps(usize);

    impl PortMapper for RefusingUnmaps {
        fn backend(&self) -> Backend {
            Backend::Pcp
        }

        async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
            Ok(Grant {
                external_port: request.external_port,
                lifetime_secs: 120,
                renew_after: Some(Duration::from_secs(60)),
                external_address: None,
                epoch: None,
                router: "192.168.1.1".into(),
            })
        }

        async fn unmap(&mut self, _lease: &Lease) -> Result<(), RouterError> {
            self.0 += 1;
            Err(RouterError::Refused {
                reason: "NOT_AUTHORIZED".into(),
                retry_after: None,
            })
        }
    }

    #[tokio::test]
    async fn a_failed_unmap_waits_for_its_backoff_not_the_next_reconcile() {
        let now = start();
        let forwarding = RELAY;
        let mut state = State::default();
        state.mappings.insert(
            key(8080),
            granted(8080, now - SignedDuration::from_secs(10)),
        );
        let mut router = RefusingUnmaps(0);
        let gone = wanting_ports(&[]);
        let first = plan(&gone, &state, forwarding, now);
        let outcome = run(&first, &mut state, &mut router, now).await;
        assert_eq!((router.0, outcome.failed), (1, 1));
        let record = state.mappings.get(&key(8080)).expect("kept for the retry");
        assert_eq!(record.failure, Some(Failure::UnmapFailed));
        assert!(
            record
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with(UNMAP_FAILED_PREFIX) && e.contains("NOT_AUTHORIZED")),
            "{record:?}"
        );
        let retry_at = record.retry_at.expect("a retry time");
        let wait = retry_at.duration_since(now).as_secs();
        assert!((27..=33).contains(&wait), "{wait} s");

        // The cluster changes again a second later: nothing for the router, the retry is due.
        let soon = now + SignedDuration::from_secs(1);
        let quiet = plan(&gone, &state, forwarding, soon);
        assert_eq!(quiet.router_calls(), 0, "{quiet:?}");
        assert_eq!(quiet.next_due, Some(retry_at));

        // Its time comes: sent again, and refused again the wait doubles.
        let later = retry_at + SignedDuration::from_secs(1);
        let again = plan(&gone, &state, forwarding, later);
        assert_eq!(again.router_calls(), 1);
        run(&again, &mut state, &mut router, later).await;
        let second = state.mappings[&key(8080)].retry_at.expect("retry");
        let wait = second.duration_since(later).as_secs();
        assert!((54..=66).contains(&wait), "{wait} s");

        // Wanted again meanwhile: requested at once, not left to the unmap's backoff.
        let back = plan(&wanting_ports(&[8080]), &state, forwarding, later);
        assert_eq!(back.router_calls(), 1, "{back:?}");
    }

    fn wanting_ports(ports: &[u16]) -> crate::desired::Desired {
        crate::desired::Desired {
            mappings: ports.iter().map(|p| (key(*p), mapping(*p))).collect(),
            problems: vec![],
        }
    }

    /// Runs `body` on a current-thread runtime, one such test at a time: both hit the
    /// save-failure log lines, and tracing caches a callsite's interest for every thread
    /// when it is first hit (a test capturing the log must not race another hitting them).
    fn one_at_a_time(body: impl std::future::Future<Output = ()>) {
        static SAVE_LOG: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = SAVE_LOG
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(body);
    }

    #[test]
    fn an_unsaved_state_holds_back_new_requests_and_lets_renewals_and_unmaps_go() {
        one_at_a_time(async {
            let now = start();
            let an_hour_ago = now - SignedDuration::from_hours(1);
            let mut state = State::default();
            // 8080: renewal due. 8083: restore of a recorded nonce (pending since a crash).
            // 8082: made through UPnP, to be restored through PCP (needs a fresh nonce).
            // 8090: no longer wanted. 8081: new.
            state.mappings.insert(
                key(8080),
                granted(8080, now - SignedDuration::from_secs(61)),
            );
            let mut pending = granted(8083, an_hour_ago);
            pending.status = MappingStatus::Pending;
            state.mappings.insert(key(8083), pending);
            let mut upnp = granted(8082, now - SignedDuration::from_secs(10));
            upnp.backend = Backend::Upnp;
            upnp.nonce = None;
            upnp.status = MappingStatus::Pending;
            state.mappings.insert(key(8082), upnp);
            state.mappings.insert(
                key(8090),
                granted(8090, now - SignedDuration::from_secs(10)),
            );
            let recorded_nonce = state.mappings[&key(8083)].nonce.clone();
            let forwarding = RELAY;
            let wanted = wanting_ports(&[8080, 8081, 8082, 8083]);
            let mut router = ScriptedRouter {
                grants: BTreeMap::new(),
                calls: vec![],
            };
            let mut disk = StateStore::new(Refusing {
                error: Some(libc::EROFS),
                saved: vec![],
            });
            let first = plan(&wanted, &state, forwarding, now);
            let outcome = execute(&first, &mut state, &mut router, &mut disk, 120, now).await;

            assert_eq!(
                router.calls,
                ["map 8080 nonce=true", "map 8083 nonce=true", "unmap 8090"],
                "renewals, restores of recorded nonces and unmaps go, in that order; the new ones do not"
            );
            assert_eq!(state.mappings[&key(8083)].nonce, recorded_nonce);
            assert_eq!(state.mappings[&key(8083)].status, MappingStatus::Active);
            for port in [8081, 8082] {
                let record = &state.mappings[&key(port)];
                assert_eq!(record.status, MappingStatus::Failed, "{port}");
                let error = record.last_error.as_deref().unwrap_or_default();
                assert!(
                    error.starts_with(
                        "state file could not be saved: cannot write the temporary state file"
                    ) && error.contains("Read-only file system")
                        && error.ends_with(&format!(
                            "not asking the router for {port}/tcp until it can"
                        )),
                    "{error}"
                );
                let wait = record
                    .retry_at
                    .expect("retry")
                    .duration_since(now)
                    .as_secs();
                assert!((27..=33).contains(&wait), "retry in {wait} s");
            }
            assert_eq!(
                (
                    outcome.renewed,
                    outcome.restored,
                    outcome.unmapped,
                    outcome.mapped
                ),
                (1, 1, 1, 0)
            );
            assert_eq!(outcome.failed, 2);
            assert!(outcome.save_error.is_some());
            assert!(
                disk.failure()
                    .is_some_and(|why| why.contains("Read-only file system"))
            );
            assert!(disk.target.saved.is_empty());

            // The retry is due and the directory is still read-only (now full): the nonce the
            // held-back mapping got in memory is on no disk, so it is still not sent.
            let later = now + SignedDuration::from_secs(40);
            disk.target.error = Some(libc::ENOSPC);
            let retry = plan(&wanted, &state, forwarding, later);
            assert!(retry.router_calls() >= 2, "{retry}");
            execute(&retry, &mut state, &mut router, &mut disk, 120, later).await;
            assert_eq!(router.calls.len(), 3, "{:?}", router.calls);
            let record = &state.mappings[&key(8081)];
            assert_eq!(record.failures, 2);
            let wait = record
                .retry_at
                .expect("retry")
                .duration_since(later)
                .as_secs();
            assert!((54..=66).contains(&wait), "backoff doubles: {wait} s");
            assert!(
                record
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("No space left"))
            );

            // Writable again: a pass with nothing to send saves, and what was held back is due
            // at once instead of after its backoff.
            disk.target.error = None;
            let quiet_at = later + SignedDuration::from_secs(1);
            let quiet = plan(&wanted, &state, forwarding, quiet_at);
            assert_eq!(quiet.router_calls(), 0, "{quiet}");
            let outcome = execute(&quiet, &mut state, &mut router, &mut disk, 120, quiet_at).await;
            assert!(outcome.save_error.is_none() && disk.failure().is_none());
            assert_eq!(outcome.released, 2, "8081 and 8082 are due now");
            assert_eq!(router.calls.len(), 3);
            let on_disk = disk.target.saved.last().expect("saved").clone();
            assert!(on_disk.mappings[&key(8081)].retry_at.is_none());

            let release = plan(&wanted, &state, forwarding, quiet_at);
            execute(&release, &mut state, &mut router, &mut disk, 120, quiet_at).await;
            assert_eq!(
                router.calls[3..],
                ["map 8081 nonce=true", "map 8082 nonce=true"]
            );
            for port in [8081, 8082] {
                let record = &state.mappings[&key(port)];
                assert_eq!(record.status, MappingStatus::Active, "{port}");
                assert_eq!(
                    record.nonce,
                    on_disk.mappings[&key(port)].nonce,
                    "sent with the nonce that was on disk"
                );
            }
        });
    }

    #[test]
    fn a_failing_state_directory_is_logged_when_it_begins_changes_and_ends() {
        one_at_a_time(async {
            use std::sync::{Arc, Mutex};
            #[derive(Clone, Default)]
            struct Log(Arc<Mutex<Vec<u8>>>);
            impl std::io::Write for Log {
                fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                    self.0.lock().expect("log").extend_from_slice(bytes);
                    Ok(bytes.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            let log = Log::default();
            let writer = log.clone();
            let _guard = tracing::subscriber::set_default(
                tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::INFO)
                    .with_writer(move || writer.clone())
                    .finish(),
            );

            let now = start();
            let forwarding = RELAY;
            let mut state = State::default();
            let mut router = ScriptedRouter {
                grants: BTreeMap::new(),
                calls: vec![],
            };
            let mut disk = StateStore::new(Refusing {
                error: Some(libc::EROFS),
                saved: vec![],
            });
            for (pass, error) in [
                libc::EROFS,
                libc::EROFS,
                libc::EROFS,
                libc::ENOSPC,
                libc::ENOSPC,
            ]
            .into_iter()
            .enumerate()
            {
                disk.target.error = Some(error);
                // A new Service each pass: every pass saves (twice) and fails.
                let at = now + SignedDuration::from_secs(pass as i64);
                let wanted = wanting_ports(&[8080 + pass as u16]);
                let pass = plan(&wanted, &state, forwarding, at);
                execute(&pass, &mut state, &mut router, &mut disk, 120, at).await;
            }
            disk.target.error = None;
            let idle = plan(&crate::desired::Desired::default(), &state, forwarding, now);
            execute(&idle, &mut state, &mut router, &mut disk, 120, now).await;

            let text = String::from_utf8_lossy(&log.0.lock().expect("log")).into_owned();
            let errors: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("could not save the state file"))
                .collect();
            assert_eq!(
                errors.len(),
                2,
                "once for read-only, once for full:\n{text}"
            );
            assert!(
                errors[0].contains("Read-only file system")
                    && errors[0].contains("check free space and permissions")
            );
            assert!(errors[1].contains("No space left on device"));
            assert_eq!(
                text.matches("the state file is saved again").count(),
                1,
                "{text}"
            );
            assert_eq!(
                router.calls,
                Vec::<String>::new(),
                "held back, then forgotten without a router call"
            );
            assert!(state.mappings.is_empty());
        });
    }

    #[test]
    fn renewals_wait_at_least_the_floor_and_never_past_the_lease() {
        let secs = Duration::from_secs;
        assert_eq!(
            renew_delay(secs(1), secs(2)),
            secs(30),
            "a 2 s lease is not chased"
        );
        assert_eq!(
            renew_delay(secs(200), secs(120)),
            secs(119),
            "before the lease ends"
        );
        assert_eq!(renew_delay(secs(1), secs(120)), secs(30), "floor");
        assert_eq!(renew_delay(secs(70), secs(120)), secs(70));
    }

    #[test]
    fn retry_delay_doubles_from_the_floor_and_is_capped() {
        let floor = Duration::from_secs(RETRY_FLOOR_SECS);
        let secs: Vec<u64> = (1..=8)
            .map(|n| retry_delay(n, floor, 1.0).as_secs())
            .collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1800, 1800]);
        assert_eq!(
            retry_delay(1, Duration::from_secs(3600), 1.0).as_secs(),
            3600
        );
        assert_eq!(retry_delay(1, floor, 1.1).as_millis(), 33_000);
    }
}
