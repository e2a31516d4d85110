//! The daemon's conversation with the router across passes (ARCHITECTURE.md, "The loop"):
//! finding it ([`Probe`], with backoff), checking every verify interval what it lost,
//! retiring mappings made through another protocol, and purging leftovers after a crash.
//!
//! [`Connect`] is how a session reaches routers: [`RouterConnect`] talks to the real one
//! (PCP, NAT-PMP, UPnP IGD); in-process tests script their own.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use crate::config::{BackendChoice, RouterConfig};
use crate::model::{Backend, Lease, MappingKey};
use crate::plan::{Action, Observations};
use crate::router::announce::{AnnounceGate, Check, RouterAnswer};
use crate::router::choice::{NoRouterFound, Router, RouterAddress};
use crate::router::instrument::{Instrumented, RequestLog};
use crate::router::{PortMapper, RouterError};
use crate::state::{Failure, MappingRecord, MappingStatus, State};
use crate::yielding::Progress;

/// With `router.backend = "auto"`, checks the router may miss in a row before the protocols
/// are probed again.
pub const SILENT_CHECKS_BEFORE_PROBING: u32 = 3;
/// First wait after a failed probe; doubles up to [`PROBE_RETRY_MAX_SECS`].
pub const PROBE_RETRY_SECS: u64 = 30;
/// Longest wait between probes of a router that does not answer.
pub const PROBE_RETRY_MAX_SECS: u64 = 600;

/// How a [`Session`] reaches routers.
pub trait Connect: Send {
    type Mapper: PortMapper;

    /// Whether a router is used at all (`false` in `gateway` mode and with
    /// `router.backend = "none"`).
    fn uses_router(&self) -> bool;

    /// The router's LAN address, when known.
    fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        None
    }

    /// The backend the config names, without asking the router anything (`None`: it must
    /// be found by probing or discovery).
    fn configured(&self) -> Option<Self::Mapper>;

    /// Finds the router, `preferred` (what worked before) tried first.
    fn probe(
        &mut self,
        preferred: Option<Backend>,
    ) -> impl Future<Output = Result<Self::Mapper, NoRouterFound>> + Send;

    /// A client for `backend`, to delete what was made through it; `None` when it cannot be
    /// reached.
    fn reach(&mut self, backend: Backend) -> impl Future<Output = Option<Self::Mapper>> + Send;

    /// Deletes holepunch's leftovers on the router that `keep` does not hold; how many.
    fn purge_leftovers(
        &mut self,
        mapper: &mut Self::Mapper,
        keep: &BTreeSet<MappingKey>,
    ) -> impl Future<Output = Result<usize, RouterError>> + Send;

    /// Asks the router once whether it restarted or changed its external address: the
    /// unicast check that confirms an announcement before anything is restored.
    fn confirm(
        &mut self,
        check: Check,
    ) -> impl Future<Output = Result<RouterAnswer, RouterError>> + Send;
}

/// The real router at `address` (`None`: no router is used).
#[derive(Debug, Clone)]
pub struct RouterConnect {
    pub address: Option<RouterAddress>,
    pub config: RouterConfig,
}

impl Connect for RouterConnect {
    type Mapper = Router;

    fn uses_router(&self) -> bool {
        self.address.is_some()
    }

    fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        self.address.as_ref().map(|a| a.gateway)
    }

    fn configured(&self) -> Option<Router> {
        match &self.address {
            None => Some(Router::None(crate::router::NoRouter)),
            Some(address) => Router::configured(self.config.backend, address),
        }
    }

    async fn probe(&mut self, preferred: Option<Backend>) -> Result<Router, NoRouterFound> {
        let Some(address) = &self.address else {
            return Ok(Router::None(crate::router::NoRouter));
        };
        let router = Router::probe(
            address,
            self.config.backend,
            preferred,
            self.config.igd_url.as_deref(),
        )
        .await?;
        tracing::info!(backend = %router.backend(), gateway = %address.gateway, "router found");
        Ok(router)
    }

    async fn reach(&mut self, backend: Backend) -> Option<Router> {
        match (backend, &self.address) {
            (Backend::Upnp, Some(address)) => Router::probe(
                address,
                BackendChoice::Upnp,
                None,
                self.config.igd_url.as_deref(),
            )
            .await
            .ok(),
            _ => Router::for_backend(backend, self.address.as_ref()),
        }
    }

    async fn purge_leftovers(
        &mut self,
        mapper: &mut Router,
        keep: &BTreeSet<MappingKey>,
    ) -> Result<usize, RouterError> {
        mapper.purge_leftovers(keep).await
    }

    async fn confirm(&mut self, check: Check) -> Result<RouterAnswer, RouterError> {
        match &self.address {
            Some(address) => crate::router::announce::ask(address, check).await,
            None => Err(RouterError::NoAddress),
        }
    }
}

/// `router.backend = "auto"`: probe the router, and after a failure wait (30 s doubling up
/// to 10 min) before probing again.
#[derive(Debug)]
pub struct Probe {
    pub wait: Duration,
    failures: u32,
    next: tokio::time::Instant,
    last_error: String,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            wait: Duration::ZERO,
            failures: 0,
            next: tokio::time::Instant::now(),
            last_error: String::new(),
        }
    }
}

impl Probe {
    /// Whether the router may be asked now (the backoff is over).
    pub fn is_due(&self) -> bool {
        tokio::time::Instant::now() >= self.next
    }

    /// Probe at the next pass (the router just announced itself).
    pub fn retry_now(&mut self) {
        self.next = tokio::time::Instant::now();
    }

    /// When the next probe may go, on the wall clock `now`.
    pub fn due_at(&self, now: jiff::Timestamp) -> jiff::Timestamp {
        let left = self
            .next
            .saturating_duration_since(tokio::time::Instant::now());
        jiff::SignedDuration::try_from(left)
            .ok()
            .and_then(|d| now.checked_add(d).ok())
            .unwrap_or(now)
    }

    fn failed(&mut self, error: &NoRouterFound) {
        let message = error.to_string();
        if message != self.last_error {
            tracing::error!("{message}");
            self.last_error = message;
        }
        self.failures = self.failures.saturating_add(1);
        self.wait = crate::backoff::doubling(
            self.failures,
            Duration::from_secs(PROBE_RETRY_SECS),
            Duration::from_secs(PROBE_RETRY_MAX_SECS),
        );
        self.next = tokio::time::Instant::now() + self.wait;
    }
}

/// The router as the loop knows it across passes.
#[derive(Debug)]
pub struct Session<C: Connect> {
    pub connect: C,
    /// The router in use; `None` while none was found.
    pub mapper: Option<C::Mapper>,
    pub probe: Probe,
    choice: BackendChoice,
    verify: Duration,
    last_check: tokio::time::Instant,
    silent_checks: u32,
    /// Which router announcements are worth a unicast check, and whether a check's answer
    /// may restore mappings (README, "Security model").
    pub announce_gate: AnnounceGate,
    /// Reported between the requests of a probe, a purge and the retiring of mappings, which
    /// the loop's passes do not see one by one.
    pub progress: Progress,
}

impl<C: Connect> Session<C> {
    /// A session for the router `connect` reaches, with `router.backend = choice`, checked
    /// every `verify`.
    pub fn new(connect: C, choice: BackendChoice, verify: Duration) -> Session<C> {
        Session {
            mapper: connect.configured(),
            connect,
            probe: Probe::default(),
            choice,
            verify,
            last_check: tokio::time::Instant::now(),
            silent_checks: 0,
            announce_gate: AnnounceGate::new(),
            progress: Progress::default(),
        }
    }

    /// Looks for the router when none is known and the probe's backoff is over. `true` when
    /// one was just found (so its leftovers can be purged).
    pub async fn find(&mut self, preferred: Option<Backend>, metrics: &dyn RequestLog) -> bool {
        if self.mapper.is_some() || !self.connect.uses_router() || !self.probe.is_due() {
            return false;
        }
        let started = (jiff::Timestamp::now(), tokio::time::Instant::now());
        match self.progress.during(self.connect.probe(preferred)).await {
            Ok(mapper) => {
                self.probe = Probe::default();
                self.mapper = Some(mapper);
            }
            Err(e) => self.probe.failed(&e),
        }
        metrics.probed(
            self.mapper.as_ref().map(PortMapper::backend),
            started.0,
            started.1.elapsed(),
        );
        self.mapper.is_some()
    }

    /// Deletes what a crash left on the router, known neither to the state nor wanted.
    pub async fn purge(&mut self, keep: &BTreeSet<MappingKey>) {
        let Some(mapper) = self.mapper.as_mut() else {
            return;
        };
        let purge = self.connect.purge_leftovers(mapper, keep);
        if let Err(e) = self.progress.during(purge).await {
            tracing::warn!(error = %e, "could not look for leftover mappings on the router");
        }
    }

    /// Every verify interval: asks the router what it lost (noted in `observed` for the
    /// plan). `true` when the router stopped answering and must be looked for again (the
    /// mapper is dropped; mappings stay as recorded).
    pub async fn check(
        &mut self,
        state: &State,
        metrics: &dyn RequestLog,
        observed: &mut Observations,
    ) -> bool {
        let Some(router) = self.mapper.as_mut() else {
            return false;
        };
        if self.last_check.elapsed() < self.verify {
            return false;
        }
        self.last_check = tokio::time::Instant::now();
        if check_router(&mut Instrumented::new(router, metrics), state, observed).await {
            self.silent_checks = 0;
        } else {
            self.silent_checks += 1;
        }
        // A UPnP router may come back on another control URL (discover again at once);
        // with `auto`, a router silent for three checks may have been replaced by one that
        // speaks another protocol (probe again).
        let rediscover = router.backend() == Backend::Upnp
            || (self.choice == BackendChoice::Auto
                && self.silent_checks >= SILENT_CHECKS_BEFORE_PROBING);
        if self.silent_checks > 0 && rediscover {
            tracing::warn!(backend = %router.backend(), checks = self.silent_checks,
                "the router stopped answering; looking for it again (mappings stay as recorded)");
            self.mapper = None;
            self.silent_checks = 0;
            return true;
        }
        false
    }

    /// Runs the plan's actions that belong to the session: [`Action::Purge`] (what a crash
    /// left on a router just found) and [`Action::Retire`] (deletes, through the protocol
    /// that made them, mappings recorded with another protocol than `current`, before they
    /// are requested again through it; what cannot be deleted is said, and ends with its
    /// lease).
    pub async fn run(&mut self, actions: &[Action], current: Backend) {
        let mut retire: BTreeMap<Backend, Vec<&MappingRecord>> = BTreeMap::new();
        for action in actions {
            match action {
                Action::Purge { keep } => self.purge(keep).await,
                Action::Retire { record } => retire.entry(record.backend).or_default().push(record),
                _ => {}
            }
        }
        for (old, records) in retire {
            let Some(mut router) = self.connect.reach(old).await else {
                tracing::warn!(mappings = records.len(), protocol = %old,
                    "cannot reach the router through the protocol that made these mappings; they end with their leases");
                continue;
            };
            for record in records {
                let result = router.unmap(&record.lease()).await;
                self.progress.now();
                match result {
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
}

/// Asks the router which of the mappings it granted it no longer holds, and notes those in
/// `observed` for the plan to restore (verify, restore what the router lost, re-add nothing
/// that is there). `false` when the router did not answer.
pub async fn check_router(
    router: &mut impl PortMapper,
    state: &State,
    observed: &mut Observations,
) -> bool {
    let backend = router.backend();
    let granted: Vec<&MappingRecord> = state
        .mappings
        .values()
        .filter(|r| r.backend == backend && r.status == MappingStatus::Active)
        .collect();
    let asked = granted.len();
    let silent: Vec<&MappingRecord> = state
        .mappings
        .values()
        .filter(|r| r.backend == backend && r.failure == Some(Failure::RouterSilent))
        .collect();
    // (A pending one is requested again anyway.)
    let waiting = silent
        .iter()
        .filter(|r| r.status != MappingStatus::Pending)
        .count();
    if granted.is_empty() && silent.is_empty() {
        return true;
    }
    // One request even with nothing granted: it tells whether the router answers again.
    let leases: Vec<Lease> = granted.iter().map(|r| r.lease()).collect();
    let result = router.lost(&leases).await;
    if result.is_ok() && waiting > 0 {
        // The router answers: what failed because it did not need not wait for its backoff.
        observed.answering_again = true;
        tracing::info!(mappings = waiting, %backend, "the router answers again; retrying what it missed");
    }
    match result {
        Ok(lost) if lost.is_empty() => {
            tracing::debug!(%backend, mappings = asked, "checked the router: nothing lost");
            true
        }
        Ok(lost) => {
            tracing::warn!(mappings = lost.len(), %backend,
                "the router no longer holds some mappings; restoring them on the same ports");
            observed.lost.extend(lost);
            true
        }
        Err(e) if !e.is_refusal() => {
            tracing::warn!(%backend, error = %e, "could not check the router's mappings");
            false
        }
        Err(e) => {
            tracing::warn!(%backend, error = %e, "could not check the router's mappings");
            true
        }
    }
}
