//! The event loop of `holepunch run`: watch the cluster, reconcile on changes and on lease
//! timers, reload on SIGHUP, stop on SIGTERM, and keep systemd informed (`READY=1`,
//! `STATUS=`, watchdog pings, `STOPPING=1`).
//!
//! DESIGN.md, "State, lifecycle, signals": a stop leaves every mapping in place, so restarts
//! and upgrades do not cut traffic; nothing is unmapped while the cluster cannot be read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{WatchStreamExt, watcher};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

use crate::config::{self, BackendChoice, Config, ExposureMode};
use crate::desired::desired;
use crate::kube::writer::ClusterWriter;
use crate::metrics::{self, Instrumented, Metrics};
use crate::model::{Backend, MappingKey, Problem};
use crate::nft::{self, Forward, NftFirewall, Ruleset};
use crate::plan::{Forwarding, plan};
use crate::reconcile::{self, Persist};
use crate::router::announce::{self, AnnounceListener, Announcement};
use crate::router::choice::{Router, RouterAddress};
use crate::router::discover::{self, DiscoverError};
use crate::router::{NoRouter, PortMapper, RouterError};
use crate::state::{Failure, MappingRecord, MappingStatus, State, StateError, StateFile};

/// With `router.backend = "auto"`, checks the router may miss in a row before the protocols
/// are probed again.
pub const SILENT_CHECKS_BEFORE_PROBING: u32 = 3;
/// Changes that arrive within this window are reconciled together.
pub const DEBOUNCE_MS: u64 = 200;
/// How long to wait before looking for a missing kubeconfig again.
pub const KUBECONFIG_RETRY_SECS: u64 = 10;
/// First wait before a failed cluster watch is tried again; it doubles up to
/// [`WATCH_RETRY_MAX_MS`], and jitter adds up to as much again.
pub const WATCH_RETRY_FIRST_MS: u64 = 800;
/// Longest wait (before jitter) between tries of a failed cluster watch.
pub const WATCH_RETRY_MAX_MS: u64 = 5_000;
/// A watch that went this long without failing starts over at [`WATCH_RETRY_FIRST_MS`].
pub const WATCH_RETRY_RESET_SECS: u64 = 120;

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Discover(#[from] DiscoverError),
}

/// Runs until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub async fn run(config_path: PathBuf, mut config: Config) -> Result<(), DaemonError> {
    let (store, loaded) = StateFile::open(&config.state.path)?;
    let mut store = reconcile::StateStore::new(store);
    if let Some(recovery) = &loaded.recovery {
        tracing::error!(moved_to = %recovery.moved_to.display(), "{recovery}");
    }
    let mut state = loaded.state;
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    let mut ready_sent = false;
    let metrics = Metrics::new(
        config.router.lease_secs,
        Duration::from_secs(config.router.verify_interval_secs.into()),
    );
    metrics.watch_over(sd_notify::watchdog_enabled());
    // NOTE: bound once: a changed metrics.listen takes effect at the next start.
    let _metrics_server = match config.metrics.listen {
        Some(address) => match metrics::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving /metrics and /healthz");
                Some(AbortOnDrop(tokio::spawn(metrics::serve(
                    listener,
                    metrics.clone(),
                ))))
            }
            Err(e) => {
                tracing::error!("{e}");
                None
            }
        },
        None => None,
    };

    // What the state file holds counts from the start (leases from a previous run included).
    metrics.observe_state(&state, &[], None);

    'config: loop {
        metrics.configure(
            config.router.lease_secs,
            Duration::from_secs(config.router.verify_interval_secs.into()),
        );
        let forwarding = forwarding(&config, None)?;
        let address = router_address(&config, forwarding)?;
        let mut mapper: Option<Router> = match &address {
            None => Some(Router::None(NoRouter)),
            Some(address) => Router::configured(config.router.backend, address),
        };
        let mut probe = Probe::default();
        let mut announcements = address.as_ref().and_then(|address| {
            AnnounceListener::bind(address.local, address.gateway)
                .inspect_err(|e| {
                    tracing::warn!(error = %e,
                        "not listening for router restart announcements; a restart is noticed at the next verify instead");
                })
                .ok()
        });
        let mut announce_gate = announce::AnnounceGate::new();
        let mut firewall = LocalRules::default();
        if forwarding != Forwarding::Direct
            && let Err(e) = nft::check_forwarding()
        {
            tracing::error!("{e}");
        }

        // The cluster: wait for a usable kubeconfig without crash-looping.
        let client = loop {
            match crate::kube::client(&config.kubernetes).await {
                Ok(client) => break client,
                Err(e) => {
                    metrics.waiting_for_cluster(Some(&e.to_string()));
                    tracing::error!("{e}");
                    notify_status(&first_line(&e.to_string()));
                    if !ready_sent {
                        // NOTE: systemd would otherwise time the start out and restart us in
                        // a loop; "waiting for a kubeconfig" is a ready, healthy state.
                        let _ = sd_notify::notify(&[NotifyState::Ready]);
                        ready_sent = true;
                    }
                    match wait_signal_or(
                        &mut signals,
                        Duration::from_secs(KUBECONFIG_RETRY_SECS),
                        &metrics,
                    )
                    .await
                    {
                        Wake::Stop => {
                            stop();
                            return Ok(());
                        }
                        Wake::Reload => {
                            if let Some(new) = reload(&config_path) {
                                config = new;
                            }
                            continue 'config;
                        }
                        Wake::Timer => continue,
                    }
                }
            }
        };
        let cluster = ClusterWatch::start(client.clone(), &config, metrics.clone());
        let cluster_report = ClusterWriter::start(client, &config, metrics.clone());
        tracing::info!("watching the cluster");

        let mut reported: BTreeSet<Problem> = BTreeSet::new();
        let mut next_due: Option<jiff::Timestamp> = None;
        let verify = Duration::from_secs(config.router.verify_interval_secs.into());
        let mut last_check = tokio::time::Instant::now();
        let mut silent_checks: u32 = 0;
        loop {
            // Also pings the watchdog: every pass proves the loop alive.
            metrics.loop_alive();
            let now = jiff::Timestamp::now();
            let sleep_for = next_due
                .map(|due| Duration::try_from(due.duration_since(now)).unwrap_or(Duration::ZERO))
                .unwrap_or(verify)
                .min(verify);
            tokio::select! {
                () = cluster.changed.notified() => {
                    tokio::time::sleep(Duration::from_millis(DEBOUNCE_MS)).await;
                }
                () = tokio::time::sleep(sleep_for) => {}
                announcement = next_announcement(&mut announcements) => {
                    // Believed only once the router confirms it by unicast (announce.rs).
                    if let Some(address) = &address {
                        let backend = mapper.as_ref().map(|router| router.backend());
                        let response = announce::respond(&mut announce_gate, announcement, address, backend, &mut state).await;
                        if response.probe {
                            probe.retry_now();
                        }
                        if response.readdressed > 0 && let Err(e) = store.persist(&state) {
                            tracing::warn!(error = %e, "could not save the router's new external address; it is saved at the next change");
                        }
                    }
                }
                wake = wait_signal_or(&mut signals, Duration::MAX, &metrics) => match wake {
                    Wake::Stop => {
                            stop();
                            return Ok(());
                        }
                    Wake::Reload => {
                        if let Some(new) = reload(&config_path) {
                            config = new;
                            continue 'config;
                        }
                        continue;
                    }
                    Wake::Timer => continue,
                },
            }
            if !cluster.is_ready() {
                metrics.waiting_for_cluster(Some(
                    "the first list of Services, Nodes and EndpointSlices has not arrived",
                ));
                notify_status("waiting for the first list of Services, Nodes and EndpointSlices");
                continue;
            }
            crate::crashpoint::reached(crate::crashpoint::LOOP_PASS);
            metrics.waiting_for_cluster(None);
            let services = cluster.services();
            let nodes = cluster.nodes();
            let endpoint_slices = cluster.endpoint_slices();
            let host = crate::host::facts(
                address
                    .as_ref()
                    .map(|a| a.gateway)
                    .or(config.router.address),
                &state,
            );
            let holders = crate::trust::holders(&state);
            let wanted = desired(
                &services,
                &nodes,
                &endpoint_slices,
                &config,
                &host,
                &holders,
            );
            if mapper.is_none()
                && let Some(address) = &address
            {
                let probing = probe.is_due();
                let started = (jiff::Timestamp::now(), tokio::time::Instant::now());
                mapper = probe
                    .run(address, &config.router, preferred_backend(&state))
                    .await;
                if probing {
                    metrics.probed(
                        mapper.as_ref().map(PortMapper::backend),
                        started.0,
                        started.1.elapsed(),
                    );
                }
                if let Some(router) = mapper.as_mut() {
                    // What a crash left on the router, known neither to the state nor wanted.
                    let keep: BTreeSet<MappingKey> = state
                        .mappings
                        .keys()
                        .chain(wanted.mappings.keys())
                        .copied()
                        .collect();
                    if let Err(e) = router.purge_leftovers(&keep).await {
                        tracing::warn!(error = %e, "could not look for leftover mappings on the router");
                    }
                }
            }
            let Some(router) = mapper.as_mut() else {
                // No router answers yet: nothing is planned, nothing already mapped is
                // touched; the probe runs again when its backoff is over.
                report_new_problems(&mut reported, wanted.problems.iter());
                metrics.observe_state(&state, &wanted.problems, None);
                cluster_report.submit(&wanted.problems, &state, &services);
                next_due = Some(probe.due_at());
                notify_status(&format!(
                    "no router found yet; trying again in {} s",
                    probe.wait.as_secs()
                ));
                mark_ready(&mut ready_sent, 0);
                continue;
            };
            if last_check.elapsed() >= verify {
                last_check = tokio::time::Instant::now();
                if check_router(&mut Instrumented::new(router, &metrics), &mut state).await {
                    silent_checks = 0;
                } else {
                    silent_checks += 1;
                }
                // A UPnP router may come back on another control URL (discover again at
                // once); with `auto`, a router silent for three checks may have been
                // replaced by one that speaks another protocol (probe again).
                let rediscover = router.backend() == Backend::Upnp
                    || (config.router.backend == BackendChoice::Auto
                        && silent_checks >= SILENT_CHECKS_BEFORE_PROBING);
                if silent_checks > 0 && rediscover {
                    tracing::warn!(backend = %router.backend(), checks = silent_checks,
                        "the router stopped answering; looking for it again (mappings stay as recorded)");
                    mapper = None;
                    silent_checks = 0;
                    continue;
                }
            }
            let backend = router.backend();
            retire_other_protocols(&mut state, backend, address.as_ref(), &config).await;
            let moved = state.unconfirm(|r| r.backend != backend);
            if moved > 0 {
                tracing::info!(mappings = moved, %backend, "re-requesting mappings made through another router protocol");
            }
            let now = jiff::Timestamp::now();
            let plan = plan(&wanted, &state, forwarding, now);
            if plan.router_calls() > 0
                || plan
                    .actions
                    .iter()
                    .any(|a| matches!(a, crate::plan::Action::Retarget { .. }))
            {
                tracing::debug!("plan:\n{plan}");
            }
            let reconcile_started = tokio::time::Instant::now();
            let outcome = reconcile::execute(
                &plan,
                &mut state,
                &mut Instrumented::new(&mut *router, &metrics),
                &mut store,
                config.router.lease_secs,
                now,
            )
            .await;
            let check_rules = firewall.last_check.is_none_or(|at| at.elapsed() >= verify);
            firewall
                .sync(
                    Ruleset::for_state(
                        forwarding,
                        config.exposure.wan_interface.as_deref(),
                        address
                            .as_ref()
                            .map(|a| a.gateway)
                            .or(config.router.address),
                        &state,
                    ),
                    check_rules,
                )
                .await;
            let problems: Vec<Problem> = wanted
                .problems
                .iter()
                .chain(&outcome.problems)
                .cloned()
                .chain(double_nat_problems(&state))
                .collect();
            report_new_problems(&mut reported, problems.iter());
            metrics.reconciled(
                reconcile_started.elapsed(),
                &state,
                &problems,
                store.failure(),
            );
            // Ready once the router and nftables hold the mappings: telling the cluster
            // (an Event per live mapping on the first pass, 5.8 s for 1,000 Services in
            // scripts/bench) is reporting, not serving, and must not hold up READY=1.
            let up = state
                .mappings
                .values()
                .filter(|r| r.status == MappingStatus::Active)
                .count();
            notify_status(&format!(
                "{up} mappings up through {backend}, {} problems",
                reported.len()
            ));
            mark_ready(&mut ready_sent, up);
            cluster_report.submit(&problems, &state, &services);
            // Due times of what was just granted count too, not only of what was planned.
            next_due =
                crate::plan::plan(&wanted, &state, forwarding, jiff::Timestamp::now()).next_due;
            if outcome.released > 0 {
                // The state can be saved again: what waited for it goes at the next pass.
                next_due = Some(jiff::Timestamp::now());
            }
            if router.take_restart() {
                // What was granted in this pass already lives in the new epoch.
                let lost = state
                    .unconfirm(|r| r.backend == backend && r.granted_at.is_none_or(|at| at < now));
                tracing::warn!(mappings = lost, %backend,
                    "the router restarted and lost its mappings; restoring them on the same ports");
                next_due = Some(jiff::Timestamp::now());
            }
        }
    }
}

/// holepunch's nftables table, kept equal to the mappings in the state: applied when they
/// change, and every verify interval read back and re-applied if someone changed it.
#[derive(Default)]
struct LocalRules {
    /// What was last applied; `None` until the first apply succeeds (or after a failure).
    applied: Option<Option<Ruleset>>,
    last_check: Option<tokio::time::Instant>,
}

impl LocalRules {
    async fn sync(&mut self, wanted: Option<Ruleset>, check: bool) {
        if check {
            self.last_check = Some(tokio::time::Instant::now());
        }
        if self.applied.as_ref() == Some(&wanted) {
            if !check {
                return;
            }
            let expected: Vec<Forward> = wanted
                .as_ref()
                .map(|r| {
                    let mut forwards = r.forwards().to_vec();
                    forwards.sort();
                    forwards
                })
                .unwrap_or_default();
            match tokio::task::spawn_blocking(|| NftFirewall.current()).await {
                Ok(Ok(current)) if current == expected => return,
                Ok(Ok(current)) => tracing::warn!(
                    expected = expected.len(),
                    found = current.len(),
                    "the nftables table changed underneath holepunch; applying it again"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the nftables table back; applying it again")
                }
                Err(e) => tracing::warn!(error = %e, "nftables check did not finish"),
            }
        }
        let ruleset = wanted.clone();
        let result = tokio::task::spawn_blocking(move || match &ruleset {
            Some(ruleset) => NftFirewall.apply(ruleset).map(|()| true),
            None => NftFirewall.remove(),
        })
        .await;
        match result {
            Ok(Ok(changed)) => {
                match &wanted {
                    Some(ruleset) => tracing::info!(
                        forwards = ruleset.forwards().len(),
                        "nftables table applied"
                    ),
                    None if changed => tracing::info!(
                        "nftables table removed (this exposure mode needs no local rules)"
                    ),
                    None => {}
                }
                self.applied = Some(wanted);
            }
            Ok(Err(e)) => {
                tracing::error!("{e}");
                self.applied = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "nftables update did not finish");
                self.applied = None;
            }
        }
    }
}

/// A problem for every Service whose mapping the router granted on an external address the
/// Internet cannot reach: the mapping exists but does not publish anything.
pub fn double_nat_problems(state: &State) -> Vec<Problem> {
    let mut problems: Vec<Problem> = state
        .mappings
        .values()
        .filter(|r| r.status == MappingStatus::Active)
        .filter_map(|r| {
            let address = r.external_address?;
            let why = crate::model::unreachable_external_address(address)?;
            Some(Problem {
                owner: r.owner.clone(),
                kind: crate::model::ProblemKind::DoubleNat,
                message: format!(
                    "the router maps {}/{}, but its external address {address} cannot be reached \
                     from the Internet: {why}",
                    r.external_port, r.protocol
                ),
                detail: None,
            })
        })
        .collect();
    problems.sort();
    problems.dedup_by(|a, b| a.owner == b.owner);
    problems
}

/// The next announcement, or never when there is no listener.
async fn next_announcement(listener: &mut Option<AnnounceListener>) -> Announcement {
    match listener {
        Some(listener) => listener.next().await,
        None => std::future::pending().await,
    }
}

/// Deletes, through the protocol that made them, the active mappings recorded with another
/// protocol than `current` (the config changed, or `auto` found another one), before they
/// are requested again through `current`: one protocol cannot delete another's mapping, and
/// a permanent one would otherwise stay on the router for good. What cannot be deleted is
/// said, and ends with its lease.
async fn retire_other_protocols(
    state: &mut State,
    current: Backend,
    address: Option<&RouterAddress>,
    config: &Config,
) {
    let others: BTreeSet<Backend> = state
        .mappings
        .values()
        .filter(|r| r.status == MappingStatus::Active)
        .map(|r| r.backend)
        .filter(|b| *b != current && *b != Backend::None)
        .collect();
    for old in others {
        let router = match (old, address) {
            (Backend::Upnp, Some(address)) => Router::probe(
                address,
                BackendChoice::Upnp,
                None,
                config.router.igd_url.as_deref(),
            )
            .await
            .ok(),
            _ => Router::for_backend(old, address),
        };
        let records: Vec<MappingRecord> = state
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Active && r.backend == old)
            .cloned()
            .collect();
        let Some(mut router) = router else {
            tracing::warn!(mappings = records.len(), protocol = %old,
                "cannot reach the router through the protocol that made these mappings; they end with their leases");
            continue;
        };
        for record in records {
            match router.unmap(&record).await {
                Ok(()) => {
                    tracing::info!(service = %record.owner, external_port = record.external_port,
                    protocol = %record.protocol, made_with = %old, "deleted before re-requesting it through {current}")
                }
                Err(e) => {
                    tracing::warn!(service = %record.owner, external_port = record.external_port,
                    made_with = %old, error = %e, "could not delete a mapping made through another protocol; it ends with its lease")
                }
            }
        }
    }
}

/// Tells systemd the daemon is ready, once.
fn mark_ready(ready_sent: &mut bool, mappings_up: usize) {
    if !*ready_sent {
        let _ = sd_notify::notify(&[NotifyState::Ready]);
        *ready_sent = true;
        tracing::info!(mappings = mappings_up, "first reconcile done; ready");
    }
}

/// Asks the router which of the mappings it granted it no longer holds, and marks those for
/// restoring (DESIGN.md: verify, restore what the router lost, re-add nothing that is there).
/// `false` when the router did not answer.
async fn check_router(router: &mut impl PortMapper, state: &mut State) -> bool {
    let backend = router.backend();
    let granted: Vec<&MappingRecord> = state
        .mappings
        .values()
        .filter(|r| r.backend == backend && r.status == MappingStatus::Active)
        .collect();
    let asked = granted.len();
    let waiting = state
        .mappings
        .values()
        .any(|r| r.backend == backend && r.failure == Some(Failure::RouterSilent));
    if granted.is_empty() && !waiting {
        return true;
    }
    // One request even with nothing granted: it tells whether the router answers again.
    let result = router.lost(&granted).await;
    if result.is_ok() {
        // The router answers: what failed because it did not need not wait for its backoff.
        let retried = state.due_now(jiff::Timestamp::now(), |r| {
            r.backend == backend && r.failure == Some(Failure::RouterSilent)
        });
        if retried > 0 {
            tracing::info!(mappings = retried, %backend, "the router answers again; retrying what it missed");
        }
    }
    match result {
        Ok(lost) if lost.is_empty() => {
            tracing::debug!(%backend, mappings = asked, "checked the router: nothing lost");
            true
        }
        Ok(lost) => {
            let lost: BTreeSet<MappingKey> = lost.into_iter().collect();
            let marked = state.unconfirm(|r| lost.contains(&r.key()));
            tracing::warn!(mappings = marked, %backend,
                "the router no longer holds some mappings; restoring them on the same ports");
            true
        }
        Err(e @ RouterError::Unreachable(_)) => {
            tracing::warn!(%backend, error = %e, "could not check the router's mappings");
            false
        }
        Err(e) => {
            tracing::warn!(%backend, error = %e, "could not check the router's mappings");
            true
        }
    }
}

/// The backend most of the recorded mappings were made with: what worked with this router.
fn preferred_backend(state: &State) -> Option<Backend> {
    let mut counts: Vec<(usize, Backend)> = [Backend::Pcp, Backend::Natpmp, Backend::Upnp]
        .into_iter()
        .map(|b| {
            (
                state.mappings.values().filter(|r| r.backend == b).count(),
                b,
            )
        })
        .filter(|(count, _)| *count > 0)
        .collect();
    counts.sort_by_key(|(count, _)| std::cmp::Reverse(*count));
    counts.first().map(|(_, backend)| *backend)
}

/// `router.backend = "auto"`: probe the router, and after a failure wait (30 s doubling up
/// to 10 min) before probing again.
#[derive(Debug)]
struct Probe {
    wait: Duration,
    next: tokio::time::Instant,
    last_error: String,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            wait: Duration::ZERO,
            next: tokio::time::Instant::now(),
            last_error: String::new(),
        }
    }
}

/// First wait after a failed probe; doubles up to [`PROBE_RETRY_MAX_SECS`].
pub const PROBE_RETRY_SECS: u64 = 30;
pub const PROBE_RETRY_MAX_SECS: u64 = 600;

impl Probe {
    async fn run(
        &mut self,
        address: &RouterAddress,
        config: &config::RouterConfig,
        preferred: Option<Backend>,
    ) -> Option<Router> {
        if tokio::time::Instant::now() < self.next {
            return None;
        }
        match Router::probe(
            address,
            config.backend,
            preferred,
            config.igd_url.as_deref(),
        )
        .await
        {
            Ok(router) => {
                tracing::info!(backend = %router.backend(), gateway = %address.gateway, "router found");
                *self = Probe::default();
                Some(router)
            }
            Err(e) => {
                let message = e.to_string();
                if message != self.last_error {
                    tracing::error!("{message}");
                    self.last_error = message;
                }
                self.wait = (self.wait * 2).clamp(
                    Duration::from_secs(PROBE_RETRY_SECS),
                    Duration::from_secs(PROBE_RETRY_MAX_SECS),
                );
                self.next = tokio::time::Instant::now() + self.wait;
                None
            }
        }
    }

    /// Whether [`Probe::run`] would ask the router now (its backoff is over).
    fn is_due(&self) -> bool {
        tokio::time::Instant::now() >= self.next
    }

    /// Probe at the next pass (the router just announced itself).
    fn retry_now(&mut self) {
        self.next = tokio::time::Instant::now();
    }

    fn due_at(&self) -> jiff::Timestamp {
        let left = self
            .next
            .saturating_duration_since(tokio::time::Instant::now());
        jiff::SignedDuration::try_from(left)
            .ok()
            .and_then(|d| jiff::Timestamp::now().checked_add(d).ok())
            .unwrap_or_else(jiff::Timestamp::now)
    }
}

/// Where the router is and this host's address toward it; `None` when no router is used
/// (`gateway` mode, `router.backend = "none"`).
pub fn router_address(
    config: &Config,
    forwarding: Forwarding,
) -> Result<Option<RouterAddress>, DiscoverError> {
    if config.exposure.mode == ExposureMode::Gateway || config.router.backend == BackendChoice::None
    {
        return Ok(None);
    }
    let gateway = match config.router.address {
        Some(address) => address,
        None => discover::default_gateway()?,
    };
    let local = match forwarding {
        Forwarding::Relay { lan_address } => lan_address,
        Forwarding::Direct | Forwarding::Gateway => discover::source_address_toward(gateway)?,
    };
    Ok(Some(RouterAddress { gateway, local }))
}

/// Logs each problem once while it persists; a problem that went away may be logged again
/// when it comes back.
fn report_new_problems<'a>(
    reported: &mut BTreeSet<Problem>,
    current: impl Iterator<Item = &'a Problem>,
) {
    let current: BTreeSet<Problem> = current.cloned().collect();
    for problem in current.difference(reported) {
        tracing::warn!(service = %problem.owner, kind = %problem.kind,
            detail = problem.detail.as_deref().unwrap_or_default(), "{}", problem.message);
    }
    *reported = current;
}

fn stop() {
    tracing::info!("stopping; router mappings and nftables rules stay in place");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

fn notify_status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Re-reads the config; a bad one is refused and the old one kept.
fn reload(path: &Path) -> Option<Config> {
    let _ = sd_notify::notify(&[NotifyState::Reloading]);
    let result = match config::load(path) {
        Ok(new) => {
            tracing::info!(path = %path.display(), "config reloaded");
            Some(new)
        }
        Err(e) => {
            tracing::error!("config not reloaded, the running one stays: {e}");
            None
        }
    };
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    result
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Wake {
    Stop,
    Reload,
    Timer,
}

/// Waits for a signal or `timeout`; the loop is idle and alive meanwhile (which pings the
/// systemd watchdog, see `metrics`).
async fn wait_signal_or(signals: &mut Signals, timeout: Duration, metrics: &Metrics) -> Wake {
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    loop {
        let ping = metrics.alive_every();
        let sleep = match deadline {
            Some(deadline) => {
                ping.min(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
            None => ping,
        };
        tokio::select! {
            signal = signals.next() => match signal {
                Some(SIGHUP) => return Wake::Reload,
                Some(_) | None => return Wake::Stop,
            },
            () = tokio::time::sleep(sleep) => {
                metrics.loop_alive();
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Wake::Timer;
                }
            }
        }
    }
}

/// Where the router forwards, from the exposure mode (and in relay mode the LAN address:
/// `lan_override`, else `exposure.lan_address`, else this host's address toward the router).
pub fn forwarding(
    config: &Config,
    lan_override: Option<std::net::Ipv4Addr>,
) -> Result<Forwarding, DiscoverError> {
    Ok(match config.exposure.mode {
        ExposureMode::Direct => Forwarding::Direct,
        ExposureMode::Gateway => Forwarding::Gateway,
        ExposureMode::Relay => {
            let lan_address = match lan_override.or(config.exposure.lan_address) {
                Some(address) => address,
                None => {
                    let gateway = match config.router.address {
                        Some(address) => address,
                        None => discover::default_gateway()?,
                    };
                    discover::source_address_toward(gateway)?
                }
            };
            Forwarding::Relay { lan_address }
        }
    })
}

/// Reflectors for Services and Nodes; `changed` fires on every event.
struct ClusterWatch {
    /// One store per watched namespace (one for all when no allow list is set).
    services: Vec<Store<Service>>,
    nodes: Store<Node>,
    endpoint_slices: Vec<Store<EndpointSlice>>,
    changed: Arc<Notify>,
    /// Set once each watch has completed its first list.
    listed: Vec<Arc<AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl ClusterWatch {
    fn start(client: kube::Client, config: &Config, metrics: Arc<Metrics>) -> ClusterWatch {
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
/// outage; issue 3 asks that changes be reconciled within 30 s of its return. Capped at
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
