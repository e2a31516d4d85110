//! The loop's part for IPv6 pinholes (README, "IPv6"; ARCHITECTURE.md, "The loop"): one
//! [`Pinholes::pass`] after the IPv4 mappings are reconciled runs the pinhole plan of
//! [`crate::pinholes`] against the router's pinhole client ([`crate::router::pinholes`]), each
//! result recorded in the state as for IPv4 (ARCHITECTURE.md, "State lifecycle"): saved as
//! pending before the request, then active with its renewal time, or failed with its retry
//! time. It finds the path to the router again at every pass (a new address of this host moves
//! the pinholes), builds the client for the backend the IPv4 side uses, and says once why IPv6
//! is not used when it cannot be (NAT-PMP, no IPv6 default route, no global address on its
//! interface). [`close_all`] is `holepunch cleanup`'s part.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv6Addr;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Service};

use crate::config::{Config, ExposureMode, Ipv6Choice};
use crate::model::{Backend, MappingKey, Nonce, PortMapping, Problem};
use crate::pinholes::{
    NATPMP_HAS_NO_IPV6, PinholeAction, PinholeRoute, RelayHost, desired_pinholes,
    former_relay_addresses, next_due, plan_pinholes,
};
use crate::reconcile::{Persist, RETRY_FLOOR_SECS, after, renew_delay, retry_delay};
use crate::router::RouterError;
use crate::router::instrument::{Operation, RequestLog, result_label};
use crate::router::pinholes::{
    Ipv6Path, OnThisRouter, Opened, PinholeConnect, PinholeRouter, RouterPinholes,
};
use crate::state::{Failure, MappingStatus, PinholeRecord, State};
use crate::trust::HostFacts;

/// What a pinhole pass leaves.
#[derive(Debug, Default)]
pub struct PinholeOutcome {
    /// Why some Service ports get no pinhole (trust rules, router refusals).
    pub problems: Vec<Problem>,
    /// The next renewal or retry.
    pub next_due: Option<Timestamp>,
}

/// The loop's part for IPv6 pinholes (ARCHITECTURE.md, "The loop").
pub struct Pinholes {
    connect: Box<dyn PinholeConnect>,
    router: Option<Box<dyn PinholeRouter>>,
    /// Why IPv6 was not used, said once each.
    said: BTreeSet<String>,
    /// The pinhole client saw the router restart in the pass that began then: restore every
    /// pinhole granted before it at the next pass.
    restarted: Option<Timestamp>,
    /// The last connect that failed, for which backend and path: tried again after a verify
    /// interval, or at once on another path.
    failed: Option<(Backend, Ipv6Path, Timestamp)>,
    /// Where pinholes were last asked (found again every pass; kept when it cannot be).
    path: Option<Ipv6Path>,
}

impl Default for Pinholes {
    fn default() -> Self {
        Pinholes::new(Box::new(RouterPinholes))
    }
}

impl Pinholes {
    pub fn new(connect: Box<dyn PinholeConnect>) -> Pinholes {
        Pinholes {
            connect,
            router: None,
            said: BTreeSet::new(),
            restarted: None,
            failed: None,
            path: None,
        }
    }

    /// This host's relay address and prefix as last found: what the ip6 DNAT matches (README,
    /// "IPv6"). `None` until a pass found a path.
    pub fn relay_host(&self) -> Option<RelayHost> {
        self.path.map(|path| path.relay_host())
    }

    /// Says `why` IPv6 is not used, once while it holds.
    fn say_once(&mut self, why: &str) {
        if self.said.insert(why.to_owned()) {
            tracing::warn!("IPv6 pinholes: {why}");
        }
    }

    /// One pass for the pinholes, after the IPv4 mappings of `mappings` were reconciled
    /// through `backend`. `lost`: keys whose IPv4 mapping the router lost (a restart, or
    /// found lost at a verify): their pinholes are restored too.
    #[allow(clippy::too_many_arguments)]
    pub async fn pass(
        &mut self,
        services: &[Service],
        nodes: &[Node],
        config: &Config,
        host: &HostFacts,
        mappings: &BTreeMap<MappingKey, PortMapping>,
        backend: Backend,
        lost: &BTreeSet<MappingKey>,
        state: &mut State,
        store: &mut impl Persist,
        log: &dyn RequestLog,
        now: Timestamp,
    ) -> PinholeOutcome {
        if config.exposure.ipv6 == Ipv6Choice::Off && state.pinholes.is_empty() {
            return PinholeOutcome::default();
        }
        // Once per pass, with the router known from earlier passes (again only in the pass
        // that reaches a new one: the trust rules need its address).
        let known = router_identity(self.router.as_deref());
        let mut wanted = desired_pinholes(
            services,
            nodes,
            config,
            &with_router(host, self.router.as_deref()),
            mappings,
        );
        // Nothing wanted and nothing held: no router is asked anything (not even found); a
        // refused IPv6 target is still reported.
        if state.pinholes.is_empty() && wanted.pinholes.is_empty() {
            return PinholeOutcome {
                problems: wanted.problems,
                next_due: None,
            };
        }
        let gateway = config.exposure.mode == ExposureMode::Gateway;
        if gateway {
            if self.router.as_ref().map(|r| r.backend()) != Some(Backend::None) {
                self.router = Some(Box::new(OnThisRouter));
            }
        } else if matches!(backend, Backend::Natpmp | Backend::None) {
            // NOTE: RFC 6886 has no IPv6; NAT-PMP routers get IPv4 mappings only.
            if backend == Backend::Natpmp && config.exposure.ipv6 == Ipv6Choice::Auto {
                self.say_once(NATPMP_HAS_NO_IPV6);
            }
            return PinholeOutcome::default();
        }
        let path = if gateway {
            None
        } else {
            // The path is found again every pass: a new address or prefix of this host (the ISP
            // renumbered) moves the pinholes and the ip6 DNAT to it (README, "IPv6").
            let path = match (self.connect.path(), self.path) {
                (Ok(path), _) => path,
                (Err(why), Some(last)) => {
                    self.say_once(&format!("{why}; going on with {}", last.host));
                    last
                }
                (Err(why), None) => {
                    self.say_once(&why);
                    return PinholeOutcome::default();
                }
            };
            if let Some(last) = self.path.filter(|last| last.host != path.host) {
                tracing::warn!(was = %last.host, now = %path.host,
                    "this host's IPv6 address toward the router changed; moving the pinholes to it");
            }
            self.path = Some(path);
            if router_identity(self.router.as_deref()) != Some((backend, path.router, path.host)) {
                let verify =
                    jiff::SignedDuration::from_secs(config.router.verify_interval_secs.into());
                if let Some((failed, on, at)) = self.failed
                    && failed == backend
                    && on == path
                    && at.checked_add(verify).is_ok_and(|again| again > now)
                {
                    return PinholeOutcome::default();
                }
                self.router = match self.connect.connect(path, backend, config).await {
                    Ok(router) => {
                        tracing::info!(router = %router.router(), host = %router.host(), %backend,
                            "IPv6 pinholes go through the router's IPv6 address");
                        self.said.clear();
                        Some(router)
                    }
                    Err(why) => {
                        self.router = None;
                        self.failed = Some((backend, path, now));
                        self.say_once(&why);
                        return PinholeOutcome {
                            problems: Vec::new(),
                            next_due: None,
                        };
                    }
                };
            }
            Some(path)
        };
        if router_identity(self.router.as_deref()) != known {
            wanted = desired_pinholes(
                services,
                nodes,
                config,
                &with_router(host, self.router.as_deref()),
                mappings,
            );
        }
        let Some(router) = self.router.as_mut() else {
            return PinholeOutcome::default();
        };
        let route = PinholeRoute {
            backend: router.backend(),
            router: router.router(),
            relay_from: (config.exposure.mode == ExposureMode::Relay).then(|| router.host()),
            on_external_port: gateway,
        };
        let mut lost = lost.clone();
        // A restart seen while restoring from the last one waits the retry floor: a router
        // that claims a restart in every answer costs a restore per floor, not a busy loop.
        let restoring = self.restarted.is_some();
        if let Some(pass_began) = self.restarted.take() {
            // What was granted in that pass already lives in the router's new epoch.
            lost.extend(
                state
                    .pinholes
                    .iter()
                    .filter(|(_, r)| r.times.granted_at.is_none_or(|at| at < pass_began))
                    .map(|(key, _)| *key),
            );
        }
        let actions = plan_pinholes(&wanted, state, &route, &lost, now);
        let mut problems = wanted.problems;
        // Relay pinholes that open an address this host no longer uses toward the router are
        // closed from that address while the host still holds it.
        let mut former = BTreeMap::new();
        if let Some(path) = path.filter(|_| route.relay_from.is_some()) {
            for address in former_relay_addresses(&actions, state, path.host) {
                let from = Ipv6Path {
                    host: address,
                    ..path
                };
                match self.connect.connect(from, backend, config).await {
                    Ok(client) => {
                        former.insert(address, client);
                    }
                    Err(why) => {
                        tracing::info!(%address, %why, "cannot ask the router from this host's former IPv6 address; its pinholes lapse with their lease")
                    }
                }
            }
        }
        let Some(router) = self.router.as_mut() else {
            return PinholeOutcome::default();
        };
        let epoch = execute(
            &actions,
            Clients {
                current: router.as_mut(),
                former: &mut former,
                relay: route.relay_from.is_some(),
            },
            Some(log),
            state,
            store,
            config.router.lease_secs,
            now,
            &mut problems,
        )
        .await;
        // The client sees a restart between two of its own answers; the recorded epochs also
        // show one that happened while holepunch was not running.
        let restarted_unseen = epoch.is_some_and(|epoch| {
            // Only active ones: a failed one keeps the epoch of a grant it has since lost,
            // and would claim a restart at every pass.
            state.pinholes.values().any(|r| {
                r.status == MappingStatus::Active
                    && r.backend == Backend::Pcp
                    && r.router == route.router
                    && lost_by_restart(r, epoch, now)
            })
        });
        if router.take_restart() || restarted_unseen {
            tracing::warn!(%backend, "the router restarted and lost its IPv6 pinholes; restoring them");
            self.restarted = Some(now);
        }
        PinholeOutcome {
            problems,
            next_due: if self.restarted.is_some() {
                Some(if restoring {
                    after(now, Duration::from_secs(RETRY_FLOOR_SECS))
                } else {
                    now
                })
            } else {
                next_due(state)
            },
        }
    }
}

/// The pinhole clients of one pass: the one on the current path and, in relay mode, one from
/// each former address of this host that pinholes still open.
struct Clients<'a> {
    current: &'a mut dyn PinholeRouter,
    former: &'a mut BTreeMap<Ipv6Addr, Box<dyn PinholeRouter>>,
    relay: bool,
}

/// Which router `router` is (backend, its address, this host's address toward it).
fn router_identity(router: Option<&dyn PinholeRouter>) -> Option<(Backend, Ipv6Addr, Ipv6Addr)> {
    router.map(|r| (r.backend(), r.router(), r.host()))
}

/// `host` with the pinhole router's address and this host's address toward it, for the trust
/// rules (README, "Security model").
fn with_router(host: &HostFacts, router: Option<&dyn PinholeRouter>) -> HostFacts {
    let mut host = host.clone();
    if let Some(router) = router {
        host.router_addresses.insert(router.router().into());
        host.own_addresses.insert(router.host().into());
    }
    host
}

/// Whether the router's PCP epoch `epoch_secs`, answered at `now`, shows that it restarted
/// (and lost `record`) since it granted `record` with the epoch recorded then: the epoch
/// went back, or did not advance with the wall clock (RFC 6887 §8.5).
fn lost_by_restart(record: &PinholeRecord, epoch_secs: u32, now: Timestamp) -> bool {
    let (Some(epoch), Some(granted_at)) = (record.epoch, record.times.granted_at) else {
        return false;
    };
    match Duration::try_from(now.duration_since(granted_at)) {
        Ok(since) => !crate::router::pcp::client::epoch_is_consistent(epoch, epoch_secs, since),
        Err(_) => false,
    }
}

/// Deletes every recorded pinhole of `router`'s backend (`holepunch cleanup`), each through
/// the same step as the daemon's closes (one made through another router is forgotten: it
/// ends with its lease), saved as it goes. Returns how many were deleted or forgotten.
pub async fn close_all(
    router: &mut dyn PinholeRouter,
    state: &mut State,
    store: &mut impl Persist,
    now: Timestamp,
) -> usize {
    let before = state.pinholes.len();
    let closes: Vec<PinholeAction> = state
        .pinholes
        .iter()
        .filter(|(_, r)| r.backend == router.backend())
        .map(|(key, _)| PinholeAction::Close { key: *key })
        .collect();
    let clients = Clients {
        current: router,
        former: &mut BTreeMap::new(),
        relay: false,
    };
    execute(
        &closes,
        clients,
        None,
        state,
        store,
        0,
        now,
        &mut Vec::new(),
    )
    .await;
    before - state.pinholes.len()
}

/// `request` to the router, counted in `log` (`holepunch_router_requests_total` and its
/// duration, as for mappings: README, "Monitoring").
async fn counted<T>(
    log: Option<&dyn RequestLog>,
    backend: Backend,
    operation: Operation,
    request: impl Future<Output = Result<T, RouterError>>,
) -> Result<T, RouterError> {
    let started = (Timestamp::now(), std::time::Instant::now());
    let result = request.await;
    if let Some(log) = log {
        let took = started.1.elapsed();
        log.router_request(backend, operation, result_label(&result), started.0, took);
    }
    result
}

/// Runs the pinhole plan: each request saved as pending first, each result recorded. Returns
/// the router's PCP epoch with the last grant, if any.
#[allow(clippy::too_many_arguments)]
async fn execute(
    actions: &[PinholeAction],
    clients: Clients<'_>,
    log: Option<&dyn RequestLog>,
    state: &mut State,
    store: &mut impl Persist,
    lease_secs: u32,
    now: Timestamp,
    problems: &mut Vec<Problem>,
) -> Option<u32> {
    let Clients {
        current: router,
        former,
        relay,
    } = clients;
    let mut epoch = None;
    for action in actions {
        match action {
            PinholeAction::Close { key } => {
                let Some(record) = state.pinholes.get(key).cloned() else {
                    continue;
                };
                let expired = record.times.expires_at.is_some_and(|at| at <= now)
                    && record.status != MappingStatus::Pending;
                let result = if expired || crate::pinholes::never_made(&record) {
                    // The router dropped it when its lease ended, or never made it: nothing
                    // to ask.
                    Ok(())
                } else if record.backend == router.backend() && record.router == router.router() {
                    // In relay mode, a pinhole to a former address of this host is closed
                    // from that address while the host still holds it.
                    let from_former = (relay && record.address != router.host())
                        .then(|| former.get_mut(&record.address))
                        .flatten();
                    match from_former {
                        Some(former) => {
                            let backend = former.backend();
                            counted(log, backend, Operation::PinholeClose, former.close(&record))
                                .await
                        }
                        None if record.backend == Backend::Pcp
                            && record.address != router.host() =>
                        {
                            // NOTE: RFC 6887 §13.1: PCP deletes only the caller's own pinholes
                            // (another address needs THIRD_PARTY): one a previous HA holder
                            // opened to its own address, or one to an address this host no
                            // longer holds, ends with its lease (README, "High availability").
                            tracing::info!(service = %record.owner, pinhole = %record.opens(), expires_at = ?record.times.expires_at,
                                "this host cannot delete a PCP pinhole that opens another address; it closes when its lease ends");
                            Ok(())
                        }
                        None => {
                            let backend = router.backend();
                            counted(log, backend, Operation::PinholeClose, router.close(&record))
                                .await
                        }
                    }
                } else {
                    // Made through another protocol or router: this one cannot delete it; it
                    // closes when its lease ends.
                    Ok(())
                };
                match result {
                    Ok(()) => {
                        tracing::info!(service = %record.owner, pinhole = %record.opens(), "IPv6 pinhole closed");
                        state.pinholes.remove(key);
                    }
                    Err(error) => {
                        tracing::warn!(service = %record.owner, pinhole = %record.opens(), %error, "could not close the IPv6 pinhole; trying again later");
                        if let Some(r) = state.pinholes.get_mut(key) {
                            failed(r, &error, now);
                            r.failure = Some(Failure::UnmapFailed);
                        }
                    }
                }
                save(store, state);
            }
            PinholeAction::Open { record, .. } => {
                let mut record = (**record).clone();
                if record.backend == Backend::Pcp && record.nonce.is_none() {
                    record.nonce = Some(Nonce::random(&mut rand::rng()).to_string());
                }
                record.status = MappingStatus::Pending;
                let key = record.key();
                state.pinholes.insert(key, record.clone());
                if !save(store, state) {
                    if let Some(r) = state.pinholes.get_mut(&key) {
                        r.status = MappingStatus::Failed;
                        r.failure = Some(Failure::HeldBack);
                        r.retry_at = Some(after(now, Duration::from_secs(RETRY_FLOOR_SECS)));
                    }
                    continue;
                }
                let backend = router.backend();
                let open = router.open(&record, lease_secs);
                let result = counted(log, backend, Operation::PinholeOpen, open).await;
                epoch = result.as_ref().ok().and_then(|o| o.epoch).or(epoch);
                record_result(state, key, result, now, problems);
                save(store, state);
            }
            PinholeAction::Renew { key } => {
                let Some(record) = state.pinholes.get(key).cloned() else {
                    continue;
                };
                let backend = router.backend();
                let open = router.open(&record, lease_secs);
                let result = counted(log, backend, Operation::PinholeOpen, open).await;
                epoch = result.as_ref().ok().and_then(|o| o.epoch).or(epoch);
                record_result(state, *key, result, now, problems);
                save(store, state);
            }
        }
    }
    epoch
}

/// Saves the state; `false` (logged) when it cannot be saved.
fn save(store: &mut impl Persist, state: &State) -> bool {
    match store.persist(state) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "could not save the IPv6 pinholes in the state file");
            false
        }
    }
}

fn record_result(
    state: &mut State,
    key: MappingKey,
    result: Result<Opened, RouterError>,
    now: Timestamp,
    problems: &mut Vec<Problem>,
) {
    let Some(record) = state.pinholes.get_mut(&key) else {
        return;
    };
    match result {
        Ok(opened) => {
            let lifetime = Duration::from_secs(opened.lifetime_secs.into());
            let renew = renew_delay(opened.renew_after.unwrap_or(lifetime / 2), lifetime);
            // A lifetime of 0 is permanent (gateway mode: no router, nothing to renew).
            let lasts = opened.lifetime_secs > 0;
            tracing::info!(service = %record.owner, pinhole = %record.opens(),
                target = %record.target(), lifetime_secs = opened.lifetime_secs, "IPv6 pinhole open");
            record.status = MappingStatus::Active;
            record.times.lifetime_secs = opened.lifetime_secs;
            record.times.granted_at = Some(now);
            record.times.renew_at = lasts.then(|| after(now, renew));
            record.times.expires_at = lasts.then(|| after(now, lifetime));
            record.epoch = opened.epoch.or(record.epoch);
            record.retry_at = None;
            record.failures = 0;
            record.failure = None;
            record.last_error = None;
        }
        Err(error) => {
            tracing::warn!(service = %record.owner, pinhole = %record.opens(), %error, "the router refused the IPv6 pinhole");
            problems.push(
                Problem::new(
                    record.owner.clone(),
                    crate::model::ProblemKind::RouterRefused,
                    format!(
                        "the router refused the IPv6 pinhole for external port {}; it is \
                         published over IPv4 only; holepunch's log on the host says why",
                        record.key()
                    ),
                )
                .with_detail(error.to_string()),
            );
            failed(record, &error, now);
        }
    }
}

fn failed(record: &mut PinholeRecord, error: &RouterError, now: Timestamp) {
    record.failures = record.failures.saturating_add(1);
    record.failure = Some(crate::reconcile::failure_of(error));
    record.last_error = Some(error.to_string());
    record.status = MappingStatus::Failed;
    let delay = retry_delay(
        record.failures,
        Duration::from_secs(RETRY_FLOOR_SECS),
        rand::random_range(0.9..1.1),
    );
    record.retry_at = Some(after(now, delay));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_epoch_shows_a_router_restart_that_happened_while_holepunch_was_down() {
        let at = |text: &str| text.parse::<Timestamp>().expect("time");
        let mut record = PinholeRecord {
            epoch: Some(5000),
            times: crate::state::LeaseTimes {
                granted_at: Some(at("2026-12-05T10:00:00Z")),
                ..PinholeRecord::example(8096).times
            },
            ..PinholeRecord::example(8096)
        };
        let hour_later = at("2026-12-05T11:00:00Z");
        // The router ran on: its epoch advanced with the clock.
        assert!(!lost_by_restart(&record, 8600, hour_later));
        // It restarted 10 minutes ago, or its epoch went back.
        assert!(lost_by_restart(&record, 600, hour_later));
        assert!(lost_by_restart(&record, 4000, at("2026-12-05T10:00:30Z")));
        // Without a recorded epoch or grant (UPnP, never granted) nothing can be told.
        record.epoch = None;
        assert!(!lost_by_restart(&record, 600, hour_later));
    }
}
