//! This host's part in a group of holepunch hosts (README.md, "High availability"): the
//! [`Leadership`] the loop consults at every pass, and the tasks beside the loop that keep the
//! Lease ([`super::runner`]), hold the floating address only while this host may act, and
//! mirror the mapping records into the cluster.
//!
//! - A **standby** host watches the cluster but sends nothing to the router, installs no
//!   nftables rules, writes no Events and no Service status ([`Gate::Standby`]).
//! - On becoming **active** it loads the records the previous holder mirrored (same ports,
//!   same PCP nonces, lease ends) into its state, due for renewal at once, and the plan
//!   renews exactly those ([`Gate::Act`] with `took_over`); the previous holder's IPv6
//!   pinholes too, where this host holds none of its own for that port: the pinhole plan
//!   renews those that open a target's address and replaces those that open the previous
//!   holder's own (README, "High availability").
//! - **Fencing**: every router request goes through [`Fenced`], which refuses it once
//!   [`Standing::may_act`] is false (the renew deadline passed); the address guard drops the
//!   address at that same deadline, whatever the loop is doing.
//! - **Graceful stop**: [`Leadership::stop`] drops the address, then hands the Lease back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use jiff::Timestamp;
use tokio::sync::{Mutex, oneshot, watch};

use super::address::{ANNOUNCE_COUNT, ANNOUNCE_INTERVAL_SECS, AddressError, FloatingAddress};
use super::election::Role;
use super::lease::{LeaseError, MirrorStore, MirrorWriter};
use super::runner::{IdentityError, Runner, Standing};
use crate::config::HaConfig;
use crate::model::{Backend, Lease, MappingKey};
use crate::reconcile::Persist;
use crate::router::announce::{Check, RouterAnswer};
use crate::router::choice::NoRouterFound;
use crate::router::session::Connect;
use crate::router::{Grant, MapRequest, PortMapper, RouterError};
use crate::state::{MappingStatus, State};

/// How long a failed address change or mirror write waits before it is tried again.
const RETRY_SECS: u64 = 1;

/// Why HA could not start.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Address(#[from] AddressError),
    /// `ha.address` is set and this process may not open a packet socket.
    #[error(
        "ha.address is set, so the host that takes the floating address announces it with a \
         gratuitous ARP on a packet socket, which needs CAP_NET_RAW and AF_PACKET; this process \
         may not open one. The package's unit grants neither unless you add its drop-in: \
         `mkdir -p /etc/systemd/system/holepunch.service.d && ln -s \
         {HA_DROP_IN} /etc/systemd/system/holepunch.service.d/ && systemctl \
         daemon-reload && systemctl restart holepunch` (README, \"High availability\")"
    )]
    NoPacketSocket {
        #[source]
        source: std::io::Error,
    },
}

/// The systemd drop-in the package ships for `[ha]` with a floating address (README,
/// "Packaging").
pub const HA_DROP_IN: &str = "/usr/share/holepunch/holepunch-ha.conf";

/// At start: with a floating address, refuses to run unless the gratuitous ARP can be sent
/// (README, "High availability"), rather than find out at the first takeover.
pub fn check_announce_allowed(ha: Option<&HaConfig>) -> Result<(), HaError> {
    if ha.is_some_and(|ha| ha.address.is_some()) {
        super::address::packet_socket_allowed()
            .map_err(|source| HaError::NoPacketSocket { source })?;
    }
    Ok(())
}

/// What the loop may do in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Act: plan, write the router and nftables, report. `took_over`: this host just became
    /// active and loaded the mirrored records (the router's leftovers are purged too).
    Act { took_over: bool },
    /// Touch nothing; `status` says why (the unit's `STATUS=`).
    Standby { status: String },
}

/// The mapping records in the cluster, as the loop sees them.
pub trait Mirror: Send {
    /// The records the previous holder left (`None`: none yet); the next save replaces them.
    fn take_over(&mut self) -> BoxFuture<'_, Result<Option<State>, LeaseError>>;
    /// Hands `state` over to be written as the records of `standing`'s holder (latest wins,
    /// never blocking the loop; a host that may no longer act writes nothing).
    fn save(&mut self, state: &State, standing: &Standing);
    /// Writes `state` as the records of `standing`'s holder now and answers when written
    /// (mirror before sent); an older save handed over and not yet written is dropped.
    fn write(
        &mut self,
        state: &State,
        standing: &Standing,
    ) -> BoxFuture<'_, Result<(), LeaseError>>;
}

/// The longest the loop waits for the mirror before sending new mappings: an API this slow
/// means the renew deadline (and the fence) is near anyway.
pub const MIRROR_FIRST_SECS: u64 = 2;

/// Why the pending records could not be mirrored before sending.
#[derive(Debug, thiserror::Error)]
pub enum MirrorFirstError {
    #[error("the write did not finish within {MIRROR_FIRST_SECS} s")]
    Timeout,
    #[error("the write failed")]
    Write {
        #[source]
        source: LeaseError,
    },
}

/// The fencing check, shared with [`Fenced`]: `None` (no `[ha]`) always acts.
#[derive(Debug, Clone, Default)]
pub struct Fence(Option<watch::Receiver<Standing>>);

impl Fence {
    /// Whether this host may write the router and nftables now.
    pub fn may_act(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|standing| standing.borrow().may_act(Instant::now()))
    }

    /// When this host stops acting unless it renews first; `None` without `[ha]` or while it
    /// does not act.
    pub fn deadline(&self) -> Option<Instant> {
        match self.0.as_ref()?.borrow().role {
            Role::Leader { until } => Some(until),
            _ => None,
        }
    }

    /// `Ok` while this host may act, else the refusal every fenced request gets.
    pub fn check(&self) -> Result<(), RouterError> {
        if self.may_act() {
            Ok(())
        } else {
            Err(RouterError::Fenced)
        }
    }
}

/// A [`PortMapper`] that refuses every request once this host may no longer act, checked
/// before each request, not once per pass. [`FencedConnect`] makes every mapper of the
/// router session one of these, so the plan's requests and the session's own pass exactly
/// one fence (ARCHITECTURE.md, "The loop").
pub struct Fenced<P> {
    inner: P,
    fence: Fence,
}

impl<P: PortMapper> Fenced<P> {
    pub fn new(inner: P, fence: Fence) -> Self {
        Fenced { inner, fence }
    }

    fn check(&self) -> Result<(), RouterError> {
        self.fence.check()
    }
}

impl<P: PortMapper> PortMapper for Fenced<P> {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        self.check()?;
        self.inner.map(request).await
    }

    async fn unmap(&mut self, lease: &Lease) -> Result<(), RouterError> {
        self.check()?;
        self.inner.unmap(lease).await
    }

    async fn lost(&mut self, leases: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
        self.check()?;
        self.inner.lost(leases).await
    }

    fn take_restart(&mut self) -> bool {
        self.inner.take_restart()
    }
}

/// A [`Connect`] whose every router request is fenced: the mappers it makes are [`Fenced`],
/// and the probe, the purge of leftovers and the announcement check ask the fence first. The
/// router session's own requests (verify, purge, retire) thus stop at the renew deadline too,
/// not only the plan's.
pub struct FencedConnect<C> {
    inner: C,
    fence: Fence,
}

impl<C: Connect> FencedConnect<C> {
    pub fn new(inner: C, fence: Fence) -> Self {
        FencedConnect { inner, fence }
    }

    fn fenced(&self) -> Result<(), RouterError> {
        self.fence.check()
    }
}

impl<C: Connect> Connect for FencedConnect<C> {
    type Mapper = Fenced<C::Mapper>;

    fn uses_router(&self) -> bool {
        self.inner.uses_router()
    }

    fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        self.inner.gateway()
    }

    fn configured(&self) -> Option<Self::Mapper> {
        let fence = self.fence.clone();
        self.inner.configured().map(|m| Fenced::new(m, fence))
    }

    async fn probe(&mut self, preferred: Option<Backend>) -> Result<Self::Mapper, NoRouterFound> {
        if self.fenced().is_err() {
            return Err(NoRouterFound {
                gateway: self
                    .inner
                    .gateway()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                tried: "nothing: this host may not act (high availability)".to_owned(),
            });
        }
        let fence = self.fence.clone();
        self.inner
            .probe(preferred)
            .await
            .map(|m| Fenced::new(m, fence))
    }

    async fn reach(&mut self, backend: Backend) -> Option<Self::Mapper> {
        self.fenced().ok()?;
        let fence = self.fence.clone();
        self.inner
            .reach(backend)
            .await
            .map(|m| Fenced::new(m, fence))
    }

    async fn purge_leftovers(
        &mut self,
        mapper: &mut Self::Mapper,
        keep: &BTreeSet<MappingKey>,
    ) -> Result<usize, RouterError> {
        self.fenced()?;
        let fence = self.fence.clone();
        // A purge is many requests (a UPnP listing, a delete each): it stops at the fencing
        // deadline, not only before it starts, or a host that lost the Lease could delete
        // what the next holder just mapped to the same floating address.
        let purge = self.inner.purge_leftovers(&mut mapper.inner, keep);
        tokio::pin!(purge);
        loop {
            let Some(until) = fence.deadline() else {
                return purge.await;
            };
            match tokio::time::timeout_at(tokio::time::Instant::from_std(until), &mut purge).await {
                Ok(result) => return result,
                // Renewed meanwhile: wait on to the new deadline; else refused.
                Err(_) => fence.check()?,
            }
        }
    }

    async fn confirm(&mut self, check: Check) -> Result<RouterAnswer, RouterError> {
        self.fenced()?;
        self.inner.confirm(check).await
    }
}

/// This host's standing as the loop consults it.
pub struct Leadership {
    standing: watch::Receiver<Standing>,
    /// Whether the floating address is on the interface (`None`: direct mode, no address).
    address_held: Option<watch::Receiver<bool>>,
    mirror: Box<dyn Mirror>,
    /// The Lease transitions of the term in which this host loaded the mirror; `None` while
    /// it does not act.
    term: Option<i32>,
    /// The records (mappings and pinholes) last handed to the mirror.
    mirrored: Option<State>,
    /// When to try again to read the mirrored records (the last read failed).
    retry_at: Option<tokio::time::Instant>,
    /// What the last [`Leadership::gate`] decided on, so that [`Leadership::changed`] also
    /// wakes for a change that came before it was called (the address added during a pass).
    gated: Option<Summary>,
    tasks: Option<Tasks>,
}

/// What the loop's decision depends on: acting, the holder, the term, the address.
type Summary = (bool, Option<String>, i32, bool);

/// The tasks beside the loop, and how to stop them.
struct Tasks {
    runner: tokio::task::JoinHandle<()>,
    stop_runner: oneshot::Sender<()>,
    guard: Option<(tokio::task::JoinHandle<()>, oneshot::Sender<()>)>,
    mirror: tokio::task::JoinHandle<()>,
    release_within: Duration,
}

impl Leadership {
    /// A leadership over `standing` (tests, and [`Leadership::start`]).
    pub fn new(
        standing: watch::Receiver<Standing>,
        address_held: Option<watch::Receiver<bool>>,
        mirror: Box<dyn Mirror>,
    ) -> Leadership {
        Leadership {
            standing,
            address_held,
            mirror,
            term: None,
            mirrored: None,
            retry_at: None,
            gated: None,
            tasks: None,
        }
    }

    /// Starts the election, the address guard (relay mode) and the mirror writer for `ha`.
    pub fn start(client: kube::Client, ha: &HaConfig) -> Result<Leadership, HaError> {
        let identity = super::runner::identity(ha)?;
        let address = ha
            .address
            .map(|address| FloatingAddress::new(address, ha.interface.as_deref()))
            .transpose()?;
        tracing::info!(%identity, lease = %format!("{}/{}", ha.lease_namespace, ha.lease_name),
            address = ?address.as_ref().map(|a| a.address), "high availability: standby until this host holds the Lease");
        let (runner, standing) = Runner::from_config(client.clone(), ha, identity);
        let timings = super::election::Timings::from_config(ha);
        let (stop_runner, stopped) = oneshot::channel();
        let runner = tokio::spawn(runner.run(async {
            let _ = stopped.await;
        }));
        let (address_held, guard) = match address {
            Some(address) => {
                let (held, receiver) = watch::channel(false);
                let (stop, stopped) = oneshot::channel();
                let task = tokio::spawn(guard(standing.clone(), address, held, stopped));
                (Some(receiver), Some((task, stop)))
            }
            None => (None, None),
        };
        let store = MirrorStore::new(
            client,
            &ha.lease_namespace,
            &ha.lease_name,
            super::lease::request_timeout(&timings),
        );
        let (mirror, task) = KubeMirror::start(store);
        let mut leadership = Leadership::new(standing, address_held, Box::new(mirror));
        leadership.tasks = Some(Tasks {
            runner,
            stop_runner,
            guard,
            mirror: task,
            // The release is one read and one write, each bounded by the request timeout.
            release_within: super::lease::request_timeout(&timings) * 3,
        });
        Ok(leadership)
    }

    /// The fencing check for [`Fenced`].
    pub fn fence(&self) -> Fence {
        Fence(Some(self.standing.clone()))
    }

    /// Whether this host may act now (holds the Lease within its renew deadline).
    pub fn may_act(&self) -> bool {
        self.standing.borrow().may_act(Instant::now())
    }

    /// Decides what this pass may do; on becoming active, loads the mirrored records into
    /// `state` (saved through `store`) with their renewals due at `now`.
    pub async fn gate(
        &mut self,
        state: &mut State,
        store: &mut dyn Persist,
        now: Timestamp,
    ) -> Gate {
        self.gated = Some(self.summary());
        let standing = self.standing.borrow().clone();
        if !standing.may_act(Instant::now()) {
            if self.term.take().is_some() {
                tracing::warn!(holder = ?standing.holder(),
                    "high availability: this host stopped acting (it no longer holds the Lease within its renew deadline)");
            }
            let status = match standing.holder() {
                Some(holder) if holder != standing.identity => {
                    format!("standby; the active host is {holder:?}")
                }
                _ => "standby; no host holds the Lease (taking it)".to_owned(),
            };
            return Gate::Standby { status };
        }
        if self
            .address_held
            .as_ref()
            .is_some_and(|held| !*held.borrow())
        {
            return Gate::Standby {
                status: "holding the Lease; adding the floating address".to_owned(),
            };
        }
        if self.term == Some(standing.transitions) {
            return Gate::Act { took_over: false };
        }
        match self.mirror.take_over().await {
            Ok(Some(mirrored)) => {
                let count = mirrored.mappings.len();
                let taken = taken_over(mirrored, now);
                state.mappings = taken.mappings;
                // IPv6 pinholes: this host's own record of a port wins (it keeps the PCP nonce
                // of what the router may still hold for this host); the previous holder's
                // fill the other ports, and the pinhole plan renews or replaces them.
                for (key, pinhole) in taken.pinholes {
                    state.pinholes.entry(key).or_insert(pinhole);
                }
                if let Err(e) = store.persist(state) {
                    tracing::warn!(error = %e, "could not save the mapping records taken over; they are saved at the next change");
                }
                tracing::info!(
                    mappings = count,
                    "high availability: this host is active; renewing the mappings the previous holder recorded"
                );
            }
            Ok(None) => tracing::info!(
                mappings = state.mappings.len(),
                "high availability: this host is active; no mapping records in the cluster yet, starting from this host's state file"
            ),
            Err(e) => {
                tracing::warn!(error = %crate::reconcile::with_causes(&e), "high availability: holding the Lease, but cannot read the mapping records; trying again");
                self.retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(RETRY_SECS));
                return Gate::Standby {
                    status: "holding the Lease; reading the mapping records".to_owned(),
                };
            }
        }
        self.term = Some(standing.transitions);
        self.mirrored = None;
        Gate::Act { took_over: true }
    }

    /// Mirrors `state` if it changed since the last call (only while acting).
    pub fn mirror(&mut self, state: &State) {
        if self.term.is_none() || self.mirrored.as_ref() == Some(state) {
            return;
        }
        let standing = self.standing.borrow().clone();
        self.mirror.save(state, &standing);
        self.mirrored = Some(state.clone());
    }

    /// Mirror before sent: writes `state` with its pending records and waits until it is
    /// written, at most [`MIRROR_FIRST_SECS`].
    pub async fn mirror_now(&mut self, state: &State) -> Result<(), MirrorFirstError> {
        let standing = self.standing.borrow().clone();
        let write = self.mirror.write(state, &standing);
        match tokio::time::timeout(Duration::from_secs(MIRROR_FIRST_SECS), write).await {
            Ok(Ok(())) => {
                self.mirrored = Some(state.clone());
                Ok(())
            }
            Ok(Err(source)) => Err(MirrorFirstError::Write { source }),
            Err(_) => Err(MirrorFirstError::Timeout),
        }
    }

    /// Waits until what the loop may do changed: acting or not (a new standing, the fencing
    /// deadline reached), another holder, or the address added or removed. A renewal alone
    /// (a later deadline) does not wake the loop.
    pub async fn changed(&mut self) {
        // NOTE: compared with what the last pass saw, not with now: the address may have been
        // added (or the standing changed) between that pass's gate and this call, and that
        // change must wake the loop too (else the new holder waited for its next timed pass,
        // up to the verify interval, holding the address without rules).
        let before = self.gated.take().unwrap_or_else(|| self.summary());
        if self.summary() != before {
            return;
        }
        loop {
            let deadline = match self.standing.borrow().role {
                Role::Leader { until } if until > Instant::now() => Some(until),
                _ => None,
            };
            let standing = async {
                if self.standing.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let held = async {
                let changed = match self.address_held.as_mut() {
                    Some(held) => held.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    std::future::pending::<()>().await;
                }
            };
            let fenced = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending::<()>().await,
                }
            };
            let retry_at = self.retry_at;
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = standing => {}
                () = held => {}
                () = fenced => {}
                () = retry => {
                    self.retry_at = None;
                    return;
                }
            }
            if self.summary() != before {
                return;
            }
        }
    }

    /// What the loop's decision depends on: acting, the holder, the term, the address.
    fn summary(&self) -> Summary {
        let standing = self.standing.borrow();
        (
            standing.may_act(Instant::now()),
            standing.holder().map(str::to_owned),
            standing.transitions,
            self.address_held
                .as_ref()
                .is_some_and(|held| *held.borrow()),
        )
    }

    /// Graceful stop: drops the floating address, then hands the Lease back so that another
    /// host takes over on its next read (README.md, "High availability").
    pub async fn stop(mut self) {
        let Some(tasks) = self.tasks.take() else {
            return;
        };
        if let Some((task, stop)) = tasks.guard {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        // The last records handed over are written while this host still holds the Lease:
        // closing the channel lets the writer finish them and end.
        self.mirror = Box::new(MemoryMirror::default());
        let mut writer = tasks.mirror;
        if tokio::time::timeout(tasks.release_within, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        let _ = tasks.stop_runner.send(());
        if tokio::time::timeout(tasks.release_within, tasks.runner)
            .await
            .is_err()
        {
            tracing::warn!(
                "high availability: the Lease was not released in time; the other hosts take it when it expires"
            );
        }
    }
}

/// The state's [`Persist`] target with `[ha]`: saves go to `store`, and the pending records
/// are mirrored before a router request creates a mapping ([`Leadership::mirror_now`]).
/// Without `[ha]` it only saves.
pub struct MirrorFirst<'a, P> {
    store: &'a mut P,
    ha: Option<&'a mut Leadership>,
}

impl<'a, P: Persist> MirrorFirst<'a, P> {
    pub fn new(store: &'a mut P, ha: Option<&'a mut Leadership>) -> Self {
        MirrorFirst { store, ha }
    }
}

impl<P: Persist> Persist for MirrorFirst<'_, P> {
    fn persist(&mut self, state: &State) -> Result<(), crate::state::StateError> {
        self.store.persist(state)
    }

    fn failure(&self) -> Option<&str> {
        self.store.failure()
    }

    fn share_pending<'s>(
        &'s mut self,
        state: &'s State,
    ) -> BoxFuture<'s, Result<(), crate::reconcile::ShareError>> {
        match self.ha.as_deref_mut() {
            Some(ha) => Box::pin(async move { Ok(ha.mirror_now(state).await?) }),
            None => self.store.share_pending(state),
        }
    }
}

/// The mirrored records as this host takes them over: the same mappings and pinholes,
/// renewed at once (with the same nonces), so that the router confirms them to the new holder.
pub fn taken_over(mut state: State, now: Timestamp) -> State {
    let mappings = state
        .mappings
        .values_mut()
        .map(|r| (r.status, &mut r.times));
    let pinholes = state
        .pinholes
        .values_mut()
        .map(|r| (r.status, &mut r.times));
    for (status, times) in mappings.chain(pinholes) {
        if status == MappingStatus::Active {
            times.renew_at = Some(times.renew_at.map_or(now, |at| at.min(now)));
        }
    }
    state
}

/// Removes the floating address at start: this host has no right to it until it holds the
/// Lease (a crash or a kill left it behind).
pub fn remove_stale_address(ha: Option<&HaConfig>) {
    let Some(address) = ha.and_then(|ha| ha.address.map(|a| (a, ha.interface.as_deref()))) else {
        return;
    };
    match FloatingAddress::new(address.0, address.1).and_then(|a| a.remove()) {
        Ok(true) => tracing::warn!(address = %address.0,
            "high availability: removed the floating address left from an earlier run; it comes back when this host holds the Lease"),
        Ok(false) => {}
        Err(e) => tracing::error!("{e}"),
    }
}

/// Holds the floating address exactly while this host may act: added (and announced) when it
/// may, removed at the fencing deadline or when the standing says so; removed on stop.
async fn guard(
    mut standing: watch::Receiver<Standing>,
    address: FloatingAddress,
    held: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut holding = false;
    loop {
        let current = standing.borrow_and_update().clone();
        let acting = current.may_act(Instant::now());
        let mut retry = None;
        if acting && !holding {
            match address.add() {
                Ok(_) => {
                    holding = true;
                    tracing::info!(address = %address.address, interface = %address.interface,
                        "high availability: holding the floating address");
                    tokio::spawn(announce(address.clone()));
                    held.send_replace(true);
                }
                Err(e) => {
                    tracing::error!("{e}");
                    retry = Some(Duration::from_secs(RETRY_SECS));
                }
            }
        } else if !acting && holding {
            drop_address(&address);
            holding = false;
            held.send_replace(false);
        }
        let deadline = match current.role {
            Role::Leader { until } if holding => Some(until),
            _ => None,
        };
        let wake = async {
            match (deadline, retry) {
                (Some(at), _) => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
                (None, Some(after)) => tokio::time::sleep(after).await,
                (None, None) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            changed = standing.changed() => if changed.is_err() { break },
            () = wake => {}
            _ = &mut stop => break,
        }
    }
    if holding {
        drop_address(&address);
        held.send_replace(false);
    }
}

fn drop_address(address: &FloatingAddress) {
    match address.remove() {
        Ok(_) => tracing::warn!(address = %address.address,
            "high availability: dropped the floating address"),
        Err(e) => tracing::error!("{e}"),
    }
}

/// RFC 5227 section 2.3 announcements, so the router's neighbour cache follows at once.
async fn announce(address: FloatingAddress) {
    for round in 0..ANNOUNCE_COUNT {
        if round > 0 {
            tokio::time::sleep(Duration::from_secs(ANNOUNCE_INTERVAL_SECS)).await;
        }
        if let Err(e) = address.announce() {
            tracing::warn!("{e}");
            return;
        }
    }
}

/// The mirror through the API server: saves go to a task of their own (latest wins).
struct KubeMirror {
    writer: Arc<Mutex<MirrorWriter>>,
    latest: watch::Sender<Option<(State, Standing)>>,
}

impl KubeMirror {
    fn start(store: MirrorStore) -> (KubeMirror, tokio::task::JoinHandle<()>) {
        let writer = Arc::new(Mutex::new(MirrorWriter::new(store)));
        let (latest, receiver) = watch::channel(None);
        let task = tokio::spawn(write_mirror(writer.clone(), receiver));
        (KubeMirror { writer, latest }, task)
    }
}

impl Mirror for KubeMirror {
    fn take_over(&mut self) -> BoxFuture<'_, Result<Option<State>, LeaseError>> {
        Box::pin(async move {
            let found = self.writer.lock().await.take_over().await?;
            Ok(found.map(|mirrored| mirrored.state))
        })
    }

    fn save(&mut self, state: &State, standing: &Standing) {
        self.latest
            .send_replace(Some((state.clone(), standing.clone())));
    }

    fn write(
        &mut self,
        state: &State,
        standing: &Standing,
    ) -> BoxFuture<'_, Result<(), LeaseError>> {
        let (state, standing) = (state.clone(), standing.clone());
        Box::pin(async move {
            self.writer.lock().await.save(&state, &standing).await?;
            // An older save the writer task still holds (one that failed and waits to be
            // tried again) must not overwrite these records.
            self.latest.send_replace(None);
            Ok(())
        })
    }
}

/// Writes the latest records handed over; a failed write is tried again unless newer
/// records came meanwhile; a fenced one is dropped.
async fn write_mirror(
    writer: Arc<Mutex<MirrorWriter>>,
    mut latest: watch::Receiver<Option<(State, Standing)>>,
) {
    while latest.changed().await.is_ok() {
        let Some((state, standing)) = latest.borrow_and_update().clone() else {
            continue;
        };
        loop {
            match writer.lock().await.save(&state, &standing).await {
                Ok(()) => {
                    tracing::debug!(mappings = state.mappings.len(), "mapping records mirrored");
                    break;
                }
                Err(e @ LeaseError::Fenced { .. }) => {
                    tracing::info!("{e}");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::reconcile::with_causes(&e), "mapping records not mirrored; trying again")
                }
            }
            tokio::time::sleep(Duration::from_secs(RETRY_SECS)).await;
            if latest.has_changed().unwrap_or(true) {
                break;
            }
        }
    }
}

/// Records in memory instead of a ConfigMap, for tests of the loop.
#[derive(Debug, Clone, Default)]
pub struct MemoryMirror(pub Arc<std::sync::Mutex<Option<State>>>);

impl MemoryMirror {
    /// What the mirror holds now.
    pub fn records(&self) -> Option<State> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Mirror for MemoryMirror {
    fn take_over(&mut self) -> BoxFuture<'_, Result<Option<State>, LeaseError>> {
        let records = self.records();
        Box::pin(async move { Ok(records) })
    }

    fn save(&mut self, state: &State, standing: &Standing) {
        if standing.may_act(Instant::now()) {
            *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(state.clone());
        }
    }

    fn write(
        &mut self,
        state: &State,
        standing: &Standing,
    ) -> BoxFuture<'_, Result<(), LeaseError>> {
        let result = if standing.may_act(Instant::now()) {
            self.save(state, standing);
            Ok(())
        } else {
            Err(LeaseError::Fenced {
                at: "memory".into(),
            })
        };
        Box::pin(std::future::ready(result))
    }
}

/// Where a host stands, as `holepunch status` tells it from the Lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HaStatus {
    /// This host's identity (`ha.identity`, else the host name).
    pub identity: String,
    /// "active" (this host holds a live Lease), "standby" (another host does, or nobody),
    /// "unknown" (the Lease could not be read).
    pub role: &'static str,
    /// The host holding a live Lease, if any.
    pub holder: Option<String>,
    /// Why the Lease could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HaStatus {
    /// From the Lease as read at `now` (wall clock: for display only; the daemons decide on
    /// their own monotonic clocks).
    pub fn of(
        identity: String,
        lease: Option<&super::election::LeaseRecord>,
        now: Timestamp,
    ) -> HaStatus {
        let holder = lease.and_then(|record| {
            let holder = record.holder.clone()?;
            let renewed = record.renew_time?;
            let duration = i64::from(record.lease_duration_secs.unwrap_or(0));
            (now.as_second() < renewed.as_second().saturating_add(duration)).then_some(holder)
        });
        let role = if holder.as_deref() == Some(identity.as_str()) {
            "active"
        } else {
            "standby"
        };
        HaStatus {
            identity,
            role,
            holder,
            error: None,
        }
    }

    /// The one line `holepunch status` prints.
    pub fn line(&self) -> String {
        match (&self.error, self.role, &self.holder) {
            (Some(error), _, _) => format!("HA: {}: cannot read the Lease: {error}", self.identity),
            (None, "active", _) => format!("HA: this host ({}) is active", self.identity),
            (None, _, Some(holder)) => {
                format!(
                    "HA: this host ({}) is standby; {holder} is active",
                    self.identity
                )
            }
            (None, _, None) => format!(
                "HA: this host ({}) is standby; no host holds the Lease",
                self.identity
            ),
        }
    }
}

/// Reads the Lease `ha` names and says where this host stands.
pub async fn status(client: kube::Client, ha: &HaConfig) -> HaStatus {
    let identity = match super::runner::identity(ha) {
        Ok(identity) => identity,
        Err(e) => {
            return HaStatus {
                identity: String::new(),
                role: "unknown",
                holder: None,
                error: Some(e.to_string()),
            };
        }
    };
    let timings = super::election::Timings::from_config(ha);
    let store = super::lease::LeaseStore::new(
        client,
        &ha.lease_namespace,
        &ha.lease_name,
        super::lease::request_timeout(&timings),
    );
    match store.get().await {
        Ok(lease) => HaStatus::of(
            identity,
            lease.as_ref().map(|l| &l.record),
            Timestamp::now(),
        ),
        Err(e) => HaStatus {
            identity,
            role: "unknown",
            holder: None,
            error: Some(crate::reconcile::with_causes(&e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_over_records_are_renewed_at_once_and_keep_their_nonces() {
        let now = Timestamp::from_second(1_800_000_000).expect("valid");
        let later = Timestamp::from_second(1_800_001_000).expect("valid");
        let mut state = State::default();
        let text = "version = 2\n[[mapping]]\nowner = \"default/web\"\nservice_port = 80\nprotocol = \"tcp\"\n\
            external_port = 8080\ninternal = { address = \"192.168.1.250\", port = 8080 }\n\
            target = { address = \"192.168.1.20\", port = 30080 }\ntarget_source = \"node-port\"\n\
            backend = \"pcp\"\nnonce = \"0123456789abcdef01234567\"\nstatus = \"active\"\n\
            renew_at = \"2027-01-15T08:16:40Z\"\n";
        if let Ok(decoded) = super::super::mirror::decode(text) {
            state = decoded;
        }
        assert_eq!(state.mappings.len(), 1);
        let record = state.mappings.values().next().expect("one");
        assert_eq!(record.times.renew_at, Some(later));
        let taken = taken_over(state.clone(), now);
        let record = taken.mappings.values().next().expect("one");
        assert_eq!(record.times.renew_at, Some(now));
        assert_eq!(record.nonce.as_deref(), Some("0123456789abcdef01234567"));
    }

    /// A mirror whose first reads fail.
    struct Flaky {
        failures: usize,
        records: Option<State>,
    }

    impl Mirror for Flaky {
        fn take_over(&mut self) -> BoxFuture<'_, Result<Option<State>, LeaseError>> {
            let result = if self.failures > 0 {
                self.failures -= 1;
                Err(LeaseError::Fenced { at: "test".into() })
            } else {
                Ok(self.records.clone())
            };
            Box::pin(async move { result })
        }

        fn save(&mut self, _state: &State, _standing: &Standing) {}

        fn write(
            &mut self,
            _state: &State,
            _standing: &Standing,
        ) -> BoxFuture<'_, Result<(), LeaseError>> {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    struct NoSave;

    impl Persist for NoSave {
        fn persist(&mut self, _state: &State) -> Result<(), crate::state::StateError> {
            Ok(())
        }
    }

    /// node-a's standing as the Lease's holder for the next hour (transitions 1).
    fn leader_for_an_hour() -> (watch::Sender<Standing>, watch::Receiver<Standing>) {
        watch::channel(Standing {
            identity: "node-a".into(),
            role: Role::Leader {
                until: Instant::now() + Duration::from_secs(3600),
            },
            transitions: 1,
        })
    }

    /// A holder that cannot read the mirrored records does not act on its own state file; it
    /// reads again a second later (the loop is woken for it) and then acts.
    #[tokio::test(start_paused = true)]
    async fn a_failed_read_of_the_records_holds_acting_back_and_is_retried() {
        let (_standing, receiver) = leader_for_an_hour();
        let mirror = Flaky {
            failures: 1,
            records: Some(State::default()),
        };
        let mut leadership = Leadership::new(receiver, None, Box::new(mirror));
        let mut state = State::default();
        let now = Timestamp::from_second(1_800_000_000).expect("valid");
        let gate = leadership.gate(&mut state, &mut NoSave, now).await;
        assert!(matches!(gate, Gate::Standby { .. }), "{gate:?}");
        let started = tokio::time::Instant::now();
        leadership.changed().await;
        assert_eq!(started.elapsed(), Duration::from_secs(RETRY_SECS));
        let gate = leadership.gate(&mut state, &mut NoSave, now).await;
        assert_eq!(gate, Gate::Act { took_over: true });
        let gate = leadership.gate(&mut state, &mut NoSave, now).await;
        assert_eq!(gate, Gate::Act { took_over: false }, "once per term");
    }

    /// The address added between a pass's gate (which saw it missing) and the loop's next
    /// wait still wakes the loop at once: the new holder does not hold the address without
    /// rules until its next timed pass.
    #[tokio::test(start_paused = true)]
    async fn the_address_added_during_a_pass_wakes_the_loop() {
        let (_standing, receiver) = leader_for_an_hour();
        let (held, held_rx) = watch::channel(false);
        let mirror = MemoryMirror::default();
        let mut leadership = Leadership::new(receiver, Some(held_rx), Box::new(mirror));
        let mut state = State::default();
        let now = Timestamp::from_second(1_800_000_000).expect("valid");
        let gate = leadership.gate(&mut state, &mut NoSave, now).await;
        assert!(matches!(gate, Gate::Standby { .. }), "{gate:?}");
        // The guard adds the address before the loop waits again.
        held.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), leadership.changed())
            .await
            .expect("the change before the wait wakes the loop");
        let gate = leadership.gate(&mut state, &mut NoSave, now).await;
        assert_eq!(gate, Gate::Act { took_over: true });
        // Nothing changed since that pass: the wait waits.
        assert!(
            tokio::time::timeout(Duration::from_secs(60), leadership.changed())
                .await
                .is_err(),
            "no change, no wake"
        );
    }

    #[test]
    fn status_names_the_holder_of_a_live_lease_only() {
        use super::super::election::LeaseRecord;
        let at = Timestamp::from_second(1_800_000_000).expect("valid");
        let held = LeaseRecord {
            holder: Some("node-b".into()),
            lease_duration_secs: Some(10),
            acquire_time: Some(at),
            renew_time: Some(at),
            transitions: 2,
        };
        let soon = at + jiff::SignedDuration::from_secs(5);
        let status = HaStatus::of("node-a".into(), Some(&held), soon);
        assert_eq!(
            (status.role, status.holder.as_deref()),
            ("standby", Some("node-b"))
        );
        assert_eq!(
            status.line(),
            "HA: this host (node-a) is standby; node-b is active"
        );
        let mine = HaStatus::of("node-b".into(), Some(&held), soon);
        assert_eq!(mine.role, "active");
        assert_eq!(mine.line(), "HA: this host (node-b) is active");
        // Expired, or nobody: standby, no holder.
        let late = at + jiff::SignedDuration::from_secs(11);
        let expired = HaStatus::of("node-b".into(), Some(&held), late);
        assert_eq!((expired.role, expired.holder), ("standby", None));
        assert!(
            HaStatus::of("node-a".into(), None, soon)
                .line()
                .contains("no host holds")
        );
    }
}
