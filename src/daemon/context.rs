//! One round of the loop (ARCHITECTURE.md, "The loop"): a [`Context`] holds what the loop
//! talks to (the router [`Session`], the [`Firewall`], the [`ClusterSource`], the
//! [`ClusterReport`], [`Persist`] and a [`Clock`]) and [`Context::pass`] does one pass for a
//! [`Trigger`]: read the cluster, find and check the router, plan, execute, sync nftables,
//! report. [`run`](super::run) only waits for triggers and signals.

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::Timestamp;

use crate::config::Config;
use crate::desired::desired;
use crate::ha::role::{Gate, Leadership, MirrorFirst};
use crate::kube::report::ClusterReport;
use crate::kube::watch::ClusterSource;
use crate::metrics::Metrics;
use crate::model::{Backend, Problem};
use crate::nft::{Firewall, LocalRules, Ruleset};
use crate::plan::{Action, Forwarding, Observations, Restart, RestoreReason, plan_observed};
use crate::reconcile::{self, Persist};
use crate::router::PortMapper;
use crate::router::announce::{self, Announcement, Verdict};
use crate::router::instrument::Instrumented;
use crate::router::session::{Connect, Session};
use crate::state::{MappingStatus, State};
use crate::yielding::Interrupts;

use super::Systemd;

/// The wall clock the state's timestamps (grants, renewals, retries) are taken from.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Why a pass runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The cluster changed (at once after a quiet period, else gathered: `Coalesce`).
    Cluster,
    /// A renewal or retry is due, or the verify interval passed.
    Timer,
    /// The router announced a restart or a new external address.
    Announcement(Announcement),
}

/// What a pass leaves for the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    /// When a pass is due even if nothing happens (a renewal, a retry, a probe).
    pub due: Option<Timestamp>,
    /// Mappings up when this pass made the daemon serve (`READY=1` may go); `None` when the
    /// pass could not reconcile (cluster not listed yet, router lost).
    pub served: Option<usize>,
}

/// Everything one pass reads and changes. Built per config: a reload builds a new one around
/// the same `state` and `store`.
pub struct Context<'a, R: Connect, F, C, T, P> {
    pub config: Config,
    pub forwarding: Forwarding,
    pub router: Session<R>,
    pub rules: LocalRules<F>,
    pub cluster: C,
    pub report: T,
    pub state: &'a mut State,
    pub store: &'a mut P,
    /// What was seen of the router and not yet planned (kept across a reload, like the
    /// state).
    pub observed: &'a mut Observations,
    pub metrics: &'a Metrics,
    pub clock: &'a dyn Clock,
    pub systemd: &'a mut Systemd,
    /// `[ha]`: whether this host acts or stands by (README.md, "High availability").
    ha: Option<&'a mut Leadership>,
    /// IPv6 pinholes beside the mappings (README, "IPv6").
    pub pinholes: crate::daemon::pinholes::Pinholes,
    /// What stops a long pass between two router requests (ARCHITECTURE.md, "The loop").
    pub interrupts: Interrupts,
    /// The problems logged, each once while it lasts.
    reported: BTreeSet<Problem>,
    next_due: Option<Timestamp>,
}

impl<'a, R, F, C, T, P> Context<'a, R, F, C, T, P>
where
    R: Connect,
    F: Firewall,
    C: ClusterSource,
    T: ClusterReport,
    P: Persist,
{
    /// A context for `config` around the `state` saved in `store`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        forwarding: Forwarding,
        router: R,
        firewall: F,
        cluster: C,
        report: T,
        state: &'a mut State,
        store: &'a mut P,
        observed: &'a mut Observations,
        metrics: &'a Metrics,
        clock: &'a dyn Clock,
        systemd: &'a mut Systemd,
    ) -> Self {
        let verify = verify_interval(&config);
        Context {
            router: Session::new(router, config.router.backend, verify),
            config,
            forwarding,
            rules: LocalRules::new(firewall),
            cluster,
            report,
            state,
            store,
            observed,
            metrics,
            clock,
            systemd,
            ha: None,
            pinholes: crate::daemon::pinholes::Pinholes::default(),
            interrupts: Interrupts::default(),
            reported: BTreeSet::new(),
            next_due: None,
        }
    }

    /// With `[ha]`: every pass asks `ha` whether this host acts.
    pub fn with_ha(mut self, ha: Option<&'a mut Leadership>) -> Self {
        self.ha = ha;
        self
    }

    /// Waits until this host's HA standing may have changed (never without `[ha]`).
    pub async fn role_changed(&mut self) {
        match self.ha.as_deref_mut() {
            Some(ha) => ha.changed().await,
            None => std::future::pending().await,
        }
    }

    /// How long the loop may wait for a trigger before the next timed pass.
    pub fn sleep_for(&self) -> Duration {
        let verify = verify_interval(&self.config);
        let now = self.clock.now();
        self.next_due
            .map(|due| Duration::try_from(due.duration_since(now)).unwrap_or(Duration::ZERO))
            .unwrap_or(verify)
            .min(verify)
    }

    /// One pass of the loop for `trigger`.
    pub async fn pass(&mut self, trigger: Trigger) -> Next {
        if let Trigger::Announcement(announcement) = &trigger
            && self.ha.as_deref().is_none_or(Leadership::may_act)
        {
            self.announced(announcement).await;
        }
        let Some(snapshot) = self.cluster.snapshot() else {
            self.metrics.waiting_for_cluster(Some(
                "the first list of Services, Nodes and EndpointSlices has not arrived",
            ));
            self.systemd
                .status("waiting for the first list of Services, Nodes and EndpointSlices");
            return self.unchanged();
        };
        crate::crashpoint::reached(crate::crashpoint::LOOP_PASS);
        tracing::debug!(target: "holepunch::timing", stage = "pass", "the cluster is read");
        self.metrics.waiting_for_cluster(None);
        if let Some(ha) = self.ha.as_deref_mut() {
            match ha
                .gate(self.state, &mut *self.store, self.clock.now())
                .await
            {
                Gate::Act { took_over } => self.observed.found |= took_over,
                Gate::Standby { status } => {
                    // A standby touches nothing: no router, no Events, no local rules.
                    self.metrics.leader(false);
                    self.rules.sync(None, false).await;
                    self.systemd.status(&status);
                    self.systemd.ready(0);
                    self.next_due = None;
                    return Next {
                        due: None,
                        served: Some(0),
                    };
                }
            }
        }
        self.metrics.leader(true);
        let host =
            crate::host::facts_for(self.config.exposure.mode, self.router_gateway(), self.state);
        let holders = crate::trust::holders(self.state);
        let wanted = desired(
            &snapshot.services,
            &snapshot.nodes,
            &snapshot.endpoint_slices,
            &self.config,
            &host,
            &holders,
        );
        tracing::debug!(target: "holepunch::timing", stage = "desired", "desired worked out");
        if self
            .router
            .find(preferred_backend(self.state), self.metrics)
            .await
        {
            // What a crash left on the router, known neither to the state nor wanted, is
            // purged by the plan.
            self.observed.found = true;
        }
        if self.router.mapper.is_none() {
            // No router answers yet: nothing is planned, nothing already mapped is touched;
            // the probe runs again when its backoff is over.
            report_new_problems(&mut self.reported, wanted.problems.iter());
            self.metrics
                .observe_state(self.state, &wanted.problems, None);
            self.report
                .submit(&wanted.problems, self.state, &snapshot.services);
            self.next_due = Some(self.router.probe.due_at(self.clock.now()));
            self.systemd.status(&format!(
                "no router found yet; trying again in {} s",
                self.router.probe.wait.as_secs()
            ));
            self.systemd.ready(0);
            return Next {
                due: self.next_due,
                served: Some(0),
            };
        }
        if self
            .router
            .check(self.state, self.metrics, self.observed)
            .await
        {
            return self.unchanged();
        }
        let Some(backend) = self.router.mapper.as_ref().map(PortMapper::backend) else {
            return self.unchanged();
        };
        self.observed.backend = Some(backend);
        let now = self.clock.now();
        let plan = plan_observed(&wanted, self.state, self.observed, self.forwarding, now);
        // The stamps of target holepunch::timing: README.md, "Benchmarks".
        tracing::debug!(target: "holepunch::timing", stage = "planned",
            router_calls = plan.router_calls(), "pass planned");
        let moved = plan
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Retire { .. }))
            .count();
        if moved > 0 {
            tracing::info!(mappings = moved, %backend, "re-requesting mappings made through another router protocol");
        }
        if plan.router_calls() > 0
            || plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::Retarget { .. } | Action::Forward { .. }))
        {
            tracing::debug!("plan:\n{plan}");
        }
        let reconcile_started = tokio::time::Instant::now();
        self.router.run(&plan.actions, backend).await;
        let Some(router) = self.router.mapper.as_mut() else {
            return self.unchanged();
        };
        self.interrupts.begin(now, plan.next_due);
        // With `[ha]`, new mappings are mirrored before they are sent, as they are saved
        // (README.md, "High availability"); the results are mirrored below.
        let outcome = reconcile::execute_until(
            &plan,
            self.state,
            // The session's mapper is fenced (`ha::role::FencedConnect`): each request is
            // checked against the renew deadline (ARCHITECTURE.md, "The loop").
            &mut Instrumented::new(&mut *router, self.metrics),
            &mut MirrorFirst::new(&mut *self.store, self.ha.as_deref_mut()),
            self.config.router.lease_secs,
            now,
            &mut self.interrupts,
        )
        .await;
        self.observed.planned();
        if let Some(ha) = self.ha.as_deref_mut() {
            ha.mirror(self.state);
        }
        if !self.ha.as_deref().is_none_or(Leadership::may_act) {
            return self.unchanged();
        }
        let pinholes = self
            .pinholes
            .pass(
                &snapshot.services,
                &snapshot.nodes,
                &self.config,
                &host,
                &wanted.mappings,
                backend,
                &crate::pinholes::lost_with_mappings(&plan.actions),
                self.state,
                self.store,
                self.metrics,
                now,
            )
            .await;
        if let Some(ha) = self.ha.as_deref_mut() {
            ha.mirror(self.state);
        }
        let check_rules = self.rules.check_due(verify_interval(&self.config));
        self.rules
            .sync(
                Ruleset::for_state(
                    self.forwarding,
                    self.config.exposure.wan_interface.as_deref(),
                    self.router_gateway(),
                    self.pinholes.relay_host(),
                    self.state,
                ),
                check_rules,
            )
            .await;
        let problems: Vec<Problem> = wanted
            .problems
            .iter()
            .chain(&outcome.problems)
            .chain(&pinholes.problems)
            .cloned()
            .chain(double_nat_problems(self.state))
            .collect();
        report_new_problems(&mut self.reported, problems.iter());
        self.metrics.reconciled(
            reconcile_started.elapsed(),
            self.state,
            &problems,
            self.store.failure(),
        );
        // Ready once the router and nftables hold the mappings: telling the cluster (an
        // Event per live mapping on the first pass, 5.8 s for 1,000 Services in
        // scripts/bench) is reporting, not serving, and must not hold up READY=1.
        let up = self
            .state
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Active)
            .count();
        self.systemd.status(&format!(
            "{up} mappings up through {backend}, {} problems",
            self.reported.len()
        ));
        self.systemd.ready(up);
        self.report
            .submit(&problems, self.state, &snapshot.services);
        // Due times of what was just granted count too, not only of what was planned.
        self.next_due = [outcome.next_due, pinholes.next_due]
            .into_iter()
            .flatten()
            .min();
        if outcome.released > 0 {
            // The state can be saved again: what waited for it goes at the next pass.
            self.next_due = Some(self.clock.now());
        }
        if let Some(why) = outcome.interrupted {
            tracing::info!(%why, "the pass stopped between two router requests; the next one plans what is left");
            self.next_due = Some(self.clock.now());
        }
        if self
            .router
            .mapper
            .as_mut()
            .is_some_and(PortMapper::take_restart)
        {
            // What was granted in this pass already lives in the new epoch.
            self.observed.restarted(Restart {
                backend,
                granted_before: Some(now),
            });
            let lost = self
                .state
                .mappings
                .values()
                .filter(|r| {
                    r.status == MappingStatus::Active
                        && self.observed.lost(r) == Some(RestoreReason::RouterRestarted)
                })
                .count();
            tracing::warn!(mappings = lost, %backend,
                "the router restarted and lost its mappings; restoring them on the same ports");
            self.next_due = Some(self.clock.now());
        }
        Next {
            due: self.next_due,
            served: Some(up),
        }
    }

    /// The router announced a restart or a new external address: believed only once the
    /// router confirms it to one unicast check, within the gate's budget (README, "Security
    /// model"). What it lost becomes an observation the plan restores.
    async fn announced(&mut self, announcement: &Announcement) {
        let session = &mut self.router;
        let now = tokio::time::Instant::now().into_std();
        let check = match session.announce_gate.on_announcement(now, announcement) {
            Verdict::Check(check) => check,
            verdict => {
                tracing::debug!(?announcement, ?verdict, "router announcement not checked");
                return;
            }
        };
        let Some(backend) = session.mapper.as_ref().map(PortMapper::backend) else {
            // No protocol chosen yet and the router spoke: probe it now.
            session.probe.retry_now();
            return;
        };
        tracing::info!(
            ?announcement,
            ?check,
            "the router announced a restart (or a new external address); asking it"
        );
        let answer = match session.connect.confirm(check).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(error = %e, "the router did not confirm its announcement; a restart is noticed at the next verify instead");
                return;
            }
        };
        let response = announce::apply_answer(
            &mut session.announce_gate,
            answer,
            tokio::time::Instant::now().into_std(),
            self.clock.now(),
            backend,
            self.state,
        );
        if !response.lost.is_empty() {
            tracing::warn!(mappings = response.lost.len(), %backend, epoch_secs = answer.epoch_secs,
                "restoring every mapping after the router's announcement: it restarted and lost them");
            self.observed.lost.extend(response.lost.iter().copied());
        }
        if response.lost.is_empty() && response.readdressed == 0 {
            tracing::info!(
                epoch_secs = answer.epoch_secs,
                "the router's answer shows no restart and no new address; nothing to do"
            );
        }
        if response.readdressed > 0 {
            tracing::warn!(mappings = response.readdressed, external_address = ?answer.external_address,
                "the router's external address changed");
            self.observed.external_address = response.external_address;
        }
    }

    /// The router's LAN address: where the router is reached, else `router.address`.
    fn router_gateway(&self) -> Option<std::net::Ipv4Addr> {
        self.router.connect.gateway().or(self.config.router.address)
    }

    /// A pass that reconciled nothing: the timers stay as they were.
    fn unchanged(&self) -> Next {
        Next {
            due: self.next_due,
            served: None,
        }
    }
}

fn verify_interval(config: &Config) -> Duration {
    Duration::from_secs(config.router.verify_interval_secs.into())
}

/// The backend most of the recorded mappings were made with: what worked with this router.
pub fn preferred_backend(state: &State) -> Option<Backend> {
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
                     from the Internet: {why}{}",
                    r.external_port,
                    r.protocol,
                    crate::pinholes::still_reachable_over_ipv6(state, r.key())
                ),
                detail: None,
            })
        })
        .collect();
    problems.sort();
    problems.dedup_by(|a, b| a.owner == b.owner);
    problems
}
