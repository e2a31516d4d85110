//! In-process tests of the loop (tier 1: no root, no namespaces): [`Context::pass`] driven
//! with a scripted router, the in-memory firewall, a scripted cluster and an in-memory
//! state, under tokio's paused clock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Service;

use super::*;
use crate::config::{BackendChoice, Config, ExposureMode};
use crate::desired::tests::{node, service};
use crate::kube::report::ClusterReport;
use crate::kube::snapshot::Snapshot;
use crate::kube::watch::ClusterSource;
use crate::metrics::Metrics;
use crate::model::{Backend, Lease, MappingKey, Problem, ProblemKind, Protocol};
use crate::nft::{MemoryFirewall, Ruleset};
use crate::reconcile::Persist;
use crate::router::announce::{Check, RouterAnswer};
use crate::router::choice::NoRouterFound;
use crate::router::session::Connect;
use crate::router::{Grant, MapRequest, PortMapper, RouterError};
use crate::state::{MappingRecord, MappingStatus, State, StateError};

const LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const LEASE_SECS: u32 = 120;
/// Longer than a renewal (half the lease), so the two are told apart.
const VERIFY_SECS: u32 = 300;
const ON: (&str, &str) = ("holepunch/punch-external", "true");

mod ipv6;

/// The wall clock as tokio's (paused) clock moves it.
struct PausedClock {
    start: Timestamp,
    at: tokio::time::Instant,
}

impl PausedClock {
    fn new() -> PausedClock {
        PausedClock {
            start: Timestamp::from_second(1_800_000_000).expect("valid test timestamp"),
            at: tokio::time::Instant::now(),
        }
    }
}

impl Clock for PausedClock {
    fn now(&self) -> Timestamp {
        let elapsed = jiff::SignedDuration::try_from(self.at.elapsed()).expect("short test");
        self.start.checked_add(elapsed).expect("within range")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the scripted router holds and was asked, per backend.
#[derive(Debug, Default)]
struct Routers {
    /// Backends that answer.
    answering: BTreeSet<Backend>,
    held: BTreeMap<Backend, BTreeSet<MappingKey>>,
    /// Ports another host holds.
    taken: BTreeSet<u16>,
    /// "map 8080 pcp", "unmap 8080 natpmp", "lost 1 pcp", in order.
    calls: Vec<String>,
    /// A restart the next answer shows (PCP epoch, NAT-PMP seconds since start).
    restarted: bool,
    /// When the router's mapping table began (its epoch counts from here); `None`: a day
    /// before the test.
    booted: Option<tokio::time::Instant>,
    /// Its external address, as its answers say.
    external: Option<Ipv4Addr>,
    /// Announcement checks it answered.
    confirms: usize,
    /// The router session's other requests: "probe", "reach pcp", "purge 8090 pcp".
    asked: Vec<String>,
    /// Mappings left on the router that a purge deletes, one request each.
    leftovers: Vec<u16>,
    /// How long each purge request takes (real time).
    purge_latency: Duration,
    /// `[ha]`: after this many map requests, this host's renew deadline passes (the standing
    /// is sent with its deadline now).
    fence_after_maps: Option<(
        usize,
        tokio::sync::watch::Sender<crate::ha::runner::Standing>,
    )>,
    /// `[ha]`: the mirror each map request is checked against as it arrives.
    mirror: Option<crate::ha::role::MemoryMirror>,
    /// Per map request: its port, its nonce, and the mirror's record of that port then
    /// (status and nonce).
    mirrored_at_map: Vec<MirroredAtMap>,
}

type MirroredAtMap = (u16, Option<String>, Option<(MappingStatus, Option<String>)>);

impl Routers {
    /// Seconds since its mapping table began (RFC 6887 §8.5, RFC 6886 §3.6).
    fn epoch_secs(&self) -> u32 {
        self.booted.map_or(86_400, |at| {
            u32::try_from(at.elapsed().as_secs()).unwrap_or(u32::MAX)
        })
    }
}

#[derive(Debug, Clone, Default)]
struct Lab(Arc<Mutex<Routers>>);

impl Lab {
    fn answering(backends: &[Backend]) -> Lab {
        let lab = Lab::default();
        let mut routers = lock(&lab.0);
        routers.answering = backends.iter().copied().collect();
        routers.booted = Some(tokio::time::Instant::now());
        drop(routers);
        lab
    }

    /// The router restarts: it forgets every mapping and its epoch starts over; nothing but
    /// a check (or its announcement) tells.
    fn reboot(&self) {
        let mut routers = lock(&self.0);
        routers.held.clear();
        routers.booted = Some(tokio::time::Instant::now());
    }

    fn confirms(&self) -> usize {
        lock(&self.0).confirms
    }

    fn calls(&self) -> Vec<String> {
        lock(&self.0).calls.clone()
    }

    fn calls_since(&self, from: usize) -> Vec<String> {
        lock(&self.0).calls[from..].to_vec()
    }

    fn asked(&self) -> Vec<String> {
        lock(&self.0).asked.clone()
    }

    /// The router restarts: it forgets every mapping, and its next answer says so.
    fn restart(&self) {
        self.reboot();
        let mut routers = lock(&self.0);
        routers.restarted = true;
    }
}

/// One backend of the scripted router.
#[derive(Debug)]
struct Scripted {
    backend: Backend,
    lab: Lab,
}

impl PortMapper for Scripted {
    fn backend(&self) -> Backend {
        self.backend
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        let mut routers = lock(&self.lab.0);
        let port = request.external_port;
        routers.calls.push(format!("map {port} {}", self.backend));
        let maps = routers
            .calls
            .iter()
            .filter(|c| c.starts_with("map "))
            .count();
        if let Some((after, standing)) = &routers.fence_after_maps
            && maps == *after
        {
            standing.send_modify(|s| {
                s.role = crate::ha::election::Role::Leader {
                    until: std::time::Instant::now(),
                }
            });
        }
        if let Some(mirror) = routers.mirror.clone() {
            let key = MappingKey {
                protocol: request.protocol,
                external_port: port,
            };
            let seen = mirror
                .records()
                .and_then(|state| state.mappings.get(&key).cloned())
                .map(|r| (r.status, r.nonce));
            let nonce = request.nonce.map(|n| n.to_string());
            routers.mirrored_at_map.push((port, nonce, seen));
        }
        if !routers.answering.contains(&self.backend) {
            return Err(RouterError::silent_for_tests());
        }
        if routers.taken.contains(&port) {
            return Err(RouterError::Conflict {
                port,
                protocol: request.protocol,
                detail: "another host holds it".into(),
            });
        }
        routers
            .held
            .entry(self.backend)
            .or_default()
            .insert(MappingKey {
                protocol: request.protocol,
                external_port: port,
            });
        Ok(Grant {
            external_port: port,
            lifetime_secs: LEASE_SECS,
            renew_after: None,
            external_address: Some(EXTERNAL),
            epoch: Some(routers.epoch_secs()),
            router: "scripted".into(),
        })
    }

    async fn unmap(&mut self, record: &Lease) -> Result<(), RouterError> {
        let mut routers = lock(&self.lab.0);
        routers
            .calls
            .push(format!("unmap {} {}", record.external_port, self.backend));
        if !routers.answering.contains(&self.backend) {
            return Err(RouterError::silent_for_tests());
        }
        if let Some(held) = routers.held.get_mut(&self.backend) {
            held.remove(&record.key());
        }
        Ok(())
    }

    async fn lost(&mut self, records: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
        let mut routers = lock(&self.lab.0);
        routers
            .calls
            .push(format!("lost {} {}", records.len(), self.backend));
        if !routers.answering.contains(&self.backend) {
            return Err(RouterError::silent_for_tests());
        }
        let held = routers.held.get(&self.backend).cloned().unwrap_or_default();
        Ok(records
            .iter()
            .map(|r| r.key())
            .filter(|k| !held.contains(k))
            .collect())
    }

    fn take_restart(&mut self) -> bool {
        std::mem::take(&mut lock(&self.lab.0).restarted)
    }
}

/// Reaches the scripted router the way [`RouterConnect`](crate::router::session::RouterConnect)
/// reaches a real one.
#[derive(Debug)]
struct ScriptedConnect {
    lab: Lab,
    choice: BackendChoice,
}

impl Connect for ScriptedConnect {
    type Mapper = Scripted;

    fn uses_router(&self) -> bool {
        self.choice != BackendChoice::None
    }

    fn configured(&self) -> Option<Scripted> {
        let backend = match self.choice {
            BackendChoice::None => Backend::None,
            BackendChoice::Pcp => Backend::Pcp,
            BackendChoice::Natpmp => Backend::Natpmp,
            BackendChoice::Auto | BackendChoice::Upnp => return None,
        };
        Some(self.mapper(backend))
    }

    async fn probe(&mut self, preferred: Option<Backend>) -> Result<Scripted, NoRouterFound> {
        let mut order = vec![Backend::Pcp, Backend::Natpmp, Backend::Upnp];
        if let Some(first) = preferred {
            order.retain(|b| *b != first);
            order.insert(0, first);
        }
        let answering = {
            let mut routers = lock(&self.lab.0);
            routers.asked.push("probe".into());
            routers.answering.clone()
        };
        match order.into_iter().find(|b| answering.contains(b)) {
            Some(backend) => Ok(self.mapper(backend)),
            None => Err(NoRouterFound {
                gateway: Ipv4Addr::new(192, 168, 1, 1),
                tried: "PCP, NAT-PMP, UPnP".into(),
            }),
        }
    }

    async fn reach(&mut self, backend: Backend) -> Option<Scripted> {
        lock(&self.lab.0).asked.push(format!("reach {backend}"));
        Some(self.mapper(backend))
    }

    /// Deletes the lab's leftovers one request at a time, each taking `purge_latency`.
    async fn purge_leftovers(
        &mut self,
        mapper: &mut Scripted,
        _keep: &BTreeSet<MappingKey>,
    ) -> Result<usize, RouterError> {
        let mut purged = 0;
        loop {
            let latency = {
                let mut routers = lock(&self.lab.0);
                let Some(port) = routers.leftovers.pop() else {
                    return Ok(purged);
                };
                routers
                    .asked
                    .push(format!("purge {port} {}", mapper.backend));
                routers.purge_latency
            };
            tokio::time::sleep(latency).await;
            purged += 1;
        }
    }

    async fn confirm(&mut self, check: Check) -> Result<RouterAnswer, RouterError> {
        let mut routers = lock(&self.lab.0);
        routers.confirms += 1;
        Ok(RouterAnswer {
            check,
            epoch_secs: routers.epoch_secs(),
            external_address: (check == Check::Natpmp)
                .then_some(routers.external.unwrap_or(EXTERNAL)),
        })
    }
}

impl ScriptedConnect {
    fn mapper(&self, backend: Backend) -> Scripted {
        Scripted {
            backend,
            lab: self.lab.clone(),
        }
    }
}

/// The cluster as the test sets it; `None` until listed.
#[derive(Debug, Clone, Default)]
struct Cluster(Arc<Mutex<Option<Snapshot>>>);

impl Cluster {
    fn set(&self, services: Vec<Service>) {
        *lock(&self.0) = Some(Snapshot {
            services,
            nodes: vec![node("node-a", "192.168.1.20", true)],
            endpoint_slices: Vec::new(),
        });
    }
}

impl ClusterSource for Cluster {
    fn snapshot(&self) -> Option<Snapshot> {
        lock(&self.0).clone()
    }
}

/// Every report the loop sent: the problems of each.
#[derive(Debug, Clone, Default)]
struct Reports(Arc<Mutex<Vec<Vec<Problem>>>>);

impl ClusterReport for Reports {
    fn submit(&mut self, problems: &[Problem], _state: &State, _services: &[Service]) {
        lock(&self.0).push(problems.to_vec());
    }
}

/// Every state saved.
#[derive(Debug, Default)]
struct Saved(usize);

impl Persist for Saved {
    fn persist(&mut self, _state: &State) -> Result<(), StateError> {
        self.0 += 1;
        Ok(())
    }
}

/// What outlives a reload (the daemon's `run` keeps the same).
struct Books {
    state: State,
    store: Saved,
    observed: crate::plan::Observations,
    metrics: Arc<Metrics>,
    clock: PausedClock,
    systemd: Systemd,
}

impl Books {
    fn new() -> Books {
        Books {
            state: State::default(),
            store: Saved::default(),
            observed: crate::plan::Observations::default(),
            metrics: Metrics::new(LEASE_SECS, Duration::from_secs(60)),
            clock: PausedClock::new(),
            systemd: Systemd::default(),
        }
    }
}

/// The edges a test scripts; clones share them with the context.
#[derive(Clone, Default)]
struct World {
    lab: Lab,
    cluster: Cluster,
    reports: Reports,
    firewall: MemoryFirewall,
    /// The scripted router's IPv6 pinholes.
    holes: ipv6::Holes,
}

/// As the daemon builds it: the router session reaches the router through the HA fence
/// (always open without `[ha]`).
type TestContext<'a> = Context<
    'a,
    crate::ha::role::FencedConnect<ScriptedConnect>,
    MemoryFirewall,
    Cluster,
    Reports,
    Saved,
>;

fn config(backend: BackendChoice) -> Config {
    let mut config = Config::default();
    config.router.backend = backend;
    config.router.lease_secs = LEASE_SECS;
    config.router.verify_interval_secs = VERIFY_SECS;
    config.exposure.mode = ExposureMode::Relay;
    config.exposure.lan_address = Some(LAN);
    config
}

fn context<'a>(world: &World, books: &'a mut Books, config: Config) -> TestContext<'a> {
    fenced_context(world, books, config, crate::ha::role::Fence::default())
}

/// With `[ha]`: the session fenced by `leadership`, which every pass consults.
fn context_ha<'a>(
    world: &World,
    books: &'a mut Books,
    config: Config,
    leadership: &'a mut crate::ha::role::Leadership,
) -> TestContext<'a> {
    let fence = leadership.fence();
    fenced_context(world, books, config, fence).with_ha(Some(leadership))
}

fn fenced_context<'a>(
    world: &World,
    books: &'a mut Books,
    config: Config,
    fence: crate::ha::role::Fence,
) -> TestContext<'a> {
    let router = crate::ha::role::FencedConnect::new(
        ScriptedConnect {
            lab: world.lab.clone(),
            choice: config.router.backend,
        },
        fence,
    );
    let mut ctx = Context::new(
        config,
        Forwarding::Relay { lan_address: LAN },
        router,
        world.firewall.clone(),
        world.cluster.clone(),
        world.reports.clone(),
        &mut books.state,
        &mut books.store,
        &mut books.observed,
        &books.metrics,
        &books.clock,
        &mut books.systemd,
    );
    // Never the machine's real IPv6 router from a test.
    ctx.pinholes = world.holes.pinholes();
    ctx
}

fn web(name: &str, port: i32) -> Service {
    service(
        "default",
        name,
        1,
        &[ON],
        &[(port, "TCP", Some(30_000 + port))],
    )
}

fn record(state: &State, port: u16) -> &MappingRecord {
    state
        .mappings
        .get(&MappingKey {
            protocol: Protocol::Tcp,
            external_port: port,
        })
        .expect("a record for the port")
}

/// Waits as the daemon would until the pass the context asks for, and runs it.
async fn next_timed_pass(ctx: &mut TestContext<'_>) -> Next {
    tokio::time::sleep(ctx.sleep_for()).await;
    ctx.pass(Trigger::Timer).await
}

#[tokio::test(start_paused = true)]
async fn nothing_is_planned_until_the_cluster_is_listed_then_mappings_and_rules_follow_it() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Auto));

    let next = ctx.pass(Trigger::Timer).await;
    assert_eq!(next.served, None, "not listed yet: nothing reconciled");
    assert!(world.lab.calls().is_empty(), "no router call before a list");

    world.cluster.set(vec![web("web", 8080)]);
    let next = ctx.pass(Trigger::Cluster).await;
    assert_eq!(next.served, Some(1));
    assert_eq!(world.lab.calls(), ["map 8080 pcp"]);
    let granted = record(ctx.state, 8080);
    assert_eq!(granted.status, MappingStatus::Active);
    assert_eq!(granted.backend, Backend::Pcp);
    assert!(
        next.due
            .is_some_and(|due| due <= granted.times.renew_at.expect("renewal")),
        "the next pass is due by the renewal"
    );
    let table = world.firewall.table();
    let forwards = table
        .ruleset
        .as_ref()
        .map(Ruleset::forwards)
        .unwrap_or_default();
    assert_eq!(forwards.len(), 1, "relay: nftables carries the mapping");
    assert_eq!(forwards[0].port, 8080);

    // The Service goes: the mapping is deleted and the rule with it.
    world.cluster.set(vec![]);
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls_since(1), ["unmap 8080 pcp"]);
    assert!(ctx.state.mappings.is_empty());
    let table = world.firewall.table();
    assert_eq!(table.ruleset.map(|r| r.forwards().len()), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_lease_is_renewed_when_due_not_before_and_restored_once_it_expired() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    ctx.pass(Trigger::Cluster).await;
    let first = record(ctx.state, 8080).clone();

    // An event before the renewal is due asks the router nothing.
    tokio::time::sleep(Duration::from_secs(10)).await;
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls(), ["map 8080 pcp"]);

    // The timer wakes the loop when the renewal is due (half the 120 s lease).
    let next = next_timed_pass(&mut ctx).await;
    assert_eq!(world.lab.calls_since(1), ["map 8080 pcp"], "renewed");
    let renewed = record(ctx.state, 8080).clone();
    assert!(renewed.times.expires_at > first.times.expires_at);
    assert_eq!(
        books_now(&ctx).duration_since(first.times.granted_at.expect("granted")),
        jiff::SignedDuration::from_secs(60)
    );
    assert!(next.due.is_some());

    // The daemon sleeps through the whole lease (a stopped daemon, a suspended host): the
    // next pass requests it again as expired, on the same port.
    tokio::time::sleep(Duration::from_secs(u64::from(LEASE_SECS) + 1)).await;
    let plan = crate::plan::plan(
        &crate::desired::desired(
            &[web("web", 8080)],
            &[node("node-a", "192.168.1.20", true)],
            &[],
            &ctx.config,
            &crate::trust::HostFacts::default(),
            &crate::trust::holders(ctx.state),
        ),
        ctx.state,
        ctx.forwarding,
        books_now(&ctx),
    );
    assert!(plan.to_string().contains("lease expired"), "{plan}");
    ctx.pass(Trigger::Timer).await;
    assert_eq!(world.lab.calls_since(2), ["map 8080 pcp"]);
    let restored = record(ctx.state, 8080);
    assert_eq!(restored.status, MappingStatus::Active);
    assert!(
        restored
            .times
            .expires_at
            .is_some_and(|at| at > books_now(&ctx))
    );
}

fn books_now(ctx: &TestContext<'_>) -> Timestamp {
    ctx.clock.now()
}

#[tokio::test(start_paused = true)]
async fn a_restart_seen_in_an_answer_restores_every_mapping_on_the_same_ports() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080), web("api", 8081)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls().len(), 2);

    // The router restarts (a new epoch); the next answer (a renewal) shows it.
    world.lab.restart();
    let next = next_timed_pass(&mut ctx).await;
    assert_eq!(
        next.due,
        Some(books_now(&ctx)),
        "what the router lost is due at once"
    );
    let renewed_before_restart = world.lab.calls_since(2);
    assert_eq!(renewed_before_restart, ["map 8080 pcp", "map 8081 pcp"]);
    assert!(
        ctx.state
            .mappings
            .values()
            .all(|r| r.status == MappingStatus::Active),
        "granted in the new epoch in this very pass: nothing to restore"
    );

    // A restart seen while nothing was asked in the same pass: every mapping goes pending
    // and is requested again on its port.
    world.lab.restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let next = ctx.pass(Trigger::Timer).await;
    assert_eq!(world.lab.calls().len(), 4, "nothing was due in that pass");
    assert_eq!(
        next.due,
        Some(books_now(&ctx)),
        "the restore is due at once"
    );
    let next = ctx.pass(Trigger::Timer).await;
    assert_eq!(next.served, Some(2));
    assert_eq!(
        world.lab.calls_since(4),
        ["map 8080 pcp", "map 8081 pcp"],
        "restored on the same ports"
    );
}

#[tokio::test(start_paused = true)]
async fn an_announcement_is_checked_with_the_router_and_restores_only_what_it_lost() {
    const MOVED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    let world = World {
        lab: Lab::answering(&[Backend::Natpmp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Natpmp));
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls(), ["map 8080 natpmp"]);

    // A forged "restart" (the router did not restart): one check, nothing restored. (30 s:
    // before the renewal is due.)
    tokio::time::sleep(Duration::from_secs(30)).await;
    let forged = Announcement::Natpmp {
        epoch_secs: 0,
        external_address: EXTERNAL,
    };
    ctx.pass(Trigger::Announcement(forged)).await;
    assert_eq!(world.lab.confirms(), 1);
    assert_eq!(world.lab.calls(), ["map 8080 natpmp"], "nothing restored");

    // The router really restarts and announces: checked, restored on the same port.
    world.lab.reboot();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let real = Announcement::Natpmp {
        epoch_secs: 1,
        external_address: EXTERNAL,
    };
    ctx.pass(Trigger::Announcement(real)).await;
    assert_eq!(world.lab.confirms(), 2);
    assert_eq!(world.lab.calls_since(1), ["map 8080 natpmp"], "restored");

    // Its repeats say nothing the router's answer did not: not even a check.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let repeat = Announcement::Natpmp {
        epoch_secs: 3,
        external_address: EXTERNAL,
    };
    ctx.pass(Trigger::Announcement(repeat)).await;
    assert_eq!(world.lab.confirms(), 2);
    assert_eq!(world.lab.calls().len(), 2);

    // A new external address is checked and recorded, without a request per mapping.
    lock(&world.lab.0).external = Some(MOVED);
    let moved = Announcement::Natpmp {
        epoch_secs: 4,
        external_address: MOVED,
    };
    ctx.pass(Trigger::Announcement(moved)).await;
    assert_eq!(world.lab.confirms(), 3);
    assert_eq!(world.lab.calls().len(), 2);
    assert!(
        ctx.state
            .mappings
            .values()
            .all(|r| r.external_address == Some(MOVED))
    );
}

#[tokio::test(start_paused = true)]
async fn a_conflict_is_reported_on_its_service_and_the_others_are_mapped() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    lock(&world.lab.0).taken.insert(8081);
    world.cluster.set(vec![web("web", 8080), web("api", 8081)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    let next = ctx.pass(Trigger::Cluster).await;

    assert_eq!(next.served, Some(1));
    assert_eq!(record(ctx.state, 8080).status, MappingStatus::Active);
    let refused = record(ctx.state, 8081);
    assert_eq!(refused.status, MappingStatus::Failed);
    let retry_at = refused.retry_at.expect("a retry is scheduled");
    let reports = lock(&world.reports.0).clone();
    let last = reports.last().expect("the cluster was told");
    assert_eq!(
        last.iter()
            .map(|p| (p.owner.to_string(), p.kind))
            .collect::<Vec<_>>(),
        [("default/api".to_owned(), ProblemKind::RouterRefused)]
    );
    assert!(next.due.is_some_and(|due| due <= retry_at));

    // The other host lets go: the retry at its time maps it.
    lock(&world.lab.0).taken.clear();
    while record(ctx.state, 8081).status != MappingStatus::Active {
        assert!(books_now(&ctx) <= retry_at, "retried by its due time");
        next_timed_pass(&mut ctx).await;
    }
    assert!(lock(&world.reports.0).last().is_some_and(Vec::is_empty));
}

#[tokio::test(start_paused = true)]
async fn a_reload_to_another_protocol_retires_the_old_mappings_through_the_old_one() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp, Backend::Natpmp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080)]);
    let mut books = Books::new();
    {
        let mut ctx = context(&world, &mut books, config(BackendChoice::Natpmp));
        ctx.pass(Trigger::Cluster).await;
    }
    assert_eq!(record(&books.state, 8080).backend, Backend::Natpmp);

    // SIGHUP with router.backend = "pcp": a new context around the same state.
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    let next = ctx.pass(Trigger::Timer).await;
    assert_eq!(next.served, Some(1));
    assert_eq!(
        world.lab.calls(),
        ["map 8080 natpmp", "unmap 8080 natpmp", "map 8080 pcp"],
        "deleted through the protocol that made it, then requested through the new one"
    );
    let moved = record(ctx.state, 8080);
    assert_eq!(moved.backend, Backend::Pcp);
    assert_eq!(moved.status, MappingStatus::Active);
    assert!(lock(&world.lab.0).held[&Backend::Natpmp].is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_verify_interval_restores_what_the_router_lost_and_rules_someone_removed() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    ctx.pass(Trigger::Cluster).await;
    let applied = world.firewall.table();

    // The router drops the mapping silently (no restart seen) and someone flushes the table.
    lock(&world.lab.0).held.clear();
    world.firewall.tamper(None);
    // Before the verify interval nothing is asked and nothing is read back.
    tokio::time::sleep(Duration::from_secs(50)).await;
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls(), ["map 8080 pcp"]);
    assert_eq!(world.firewall.table().ruleset, None);

    tokio::time::sleep(Duration::from_secs(u64::from(VERIFY_SECS) - 50)).await;
    ctx.pass(Trigger::Timer).await;
    assert_eq!(
        world.lab.calls_since(1),
        ["lost 1 pcp", "map 8080 pcp"],
        "checked, then restored on the same port (and renewed, as it was due)"
    );
    assert_eq!(
        world.firewall.table().ruleset,
        applied.ruleset,
        "re-applied"
    );
}

#[tokio::test(start_paused = true)]
async fn with_no_router_answering_nothing_is_touched_and_the_probe_backs_off() {
    let world = World::default();
    world.cluster.set(vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Auto));
    let next = ctx.pass(Trigger::Cluster).await;
    assert_eq!(next.served, Some(0));
    assert!(ctx.state.mappings.is_empty());
    let due = next.due.expect("a probe is scheduled");
    assert_eq!(
        due.duration_since(books_now(&ctx)),
        jiff::SignedDuration::from_secs(crate::router::session::PROBE_RETRY_SECS as i64)
    );
    // A router that answers later is found when the backoff is over.
    lock(&world.lab.0).answering.insert(Backend::Natpmp);
    ctx.pass(Trigger::Cluster).await;
    assert!(ctx.state.mappings.is_empty(), "not before its time");
    next_timed_pass(&mut ctx).await;
    assert_eq!(world.lab.calls(), ["map 8080 natpmp"]);
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_no_longer_publishes_a_service_unmaps_it_and_its_rule() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080)]);
    let mut books = Books::new();
    {
        let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
        ctx.pass(Trigger::Cluster).await;
    }
    assert_eq!(world.lab.calls(), ["map 8080 pcp"]);

    // The same config again changes nothing on the router (and the rules are re-applied
    // once, by the fresh context).
    {
        let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
        ctx.pass(Trigger::Timer).await;
    }
    assert_eq!(world.lab.calls(), ["map 8080 pcp"]);

    // A config whose opt-in annotation the Service does not carry: unmapped, rule gone.
    let mut other = config(BackendChoice::Pcp);
    other.kubernetes.annotation = "example.org/publish".into();
    let mut ctx = context(&world, &mut books, other);
    ctx.pass(Trigger::Timer).await;
    assert_eq!(world.lab.calls_since(1), ["unmap 8080 pcp"]);
    assert!(ctx.state.mappings.is_empty());
    let table = world.firewall.table();
    assert_eq!(table.ruleset.map(|r| r.forwards().len()), Some(0));
}

#[tokio::test(start_paused = true)]
async fn an_announcement_before_the_cluster_is_listed_is_planned_after_a_reload() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080)]);
    let mut books = Books::new();
    {
        let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
        ctx.pass(Trigger::Cluster).await;
    }
    // The router restarts and announces it while the cluster cannot be listed; a reload
    // comes before the next list.
    tokio::time::sleep(Duration::from_secs(30)).await;
    world.lab.reboot();
    *lock(&world.cluster.0) = None;
    {
        let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
        let next = ctx
            .pass(Trigger::Announcement(Announcement::Pcp { epoch_secs: 0 }))
            .await;
        assert_eq!(next.served, None, "nothing planned without a list");
    }
    assert_eq!(world.lab.calls(), ["map 8080 pcp"]);
    assert!(!books.observed.lost.is_empty(), "kept across the reload");

    world.cluster.set(vec![web("web", 8080)]);
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls_since(1), ["map 8080 pcp"], "restored");
    assert_eq!(
        lock(&world.lab.0).held[&Backend::Pcp].len(),
        1,
        "the router holds it again"
    );
    assert!(ctx.observed.lost.is_empty(), "planned, then forgotten");
}

/// `[ha]`: a standby host touches nothing and says so; on becoming active it takes over the
/// mirrored records (same port, same nonce) and renews them; once it may no longer act (the
/// renew deadline passed) it stops at once, before any router request (README, "High
/// availability").
#[tokio::test(start_paused = true)]
async fn a_standby_touches_nothing_the_active_host_renews_what_it_took_over_and_fencing_stops_it() {
    use crate::ha::election::Role;
    use crate::ha::role::{Leadership, MemoryMirror};
    use crate::ha::runner::Standing;

    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world.cluster.set(vec![web("web", 8080), web("api", 8081)]);
    let follower = Standing {
        identity: "node-a".into(),
        role: Role::Follower {
            holder: "node-b".into(),
        },
        transitions: 3,
    };
    let (standing, receiver) = tokio::sync::watch::channel(follower.clone());
    let mirror = MemoryMirror::default();
    let mut leadership = Leadership::new(receiver, None, Box::new(mirror.clone()));
    let mut books = Books::new();
    let metrics = books.metrics.clone();
    let leader = |metrics: &Metrics| {
        metrics
            .encode(Timestamp::now())
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("holepunch_leader "))
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    assert_eq!(leader(&metrics), "holepunch_leader 1", "one host acts");

    // node-b is active and has mirrored 8080 (with its nonce); 8081 it has not mapped yet.
    let mut active = State::default();
    {
        let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
        ctx.pass(Trigger::Cluster).await;
        active.mappings = ctx.state.mappings.clone();
    }
    active.mappings.retain(|key, _| key.external_port == 8080);
    for record in active.mappings.values_mut() {
        record.nonce = Some("0123456789abcdef01234567".into());
        // Granted long ago by node-b: not due for renewal by its own times.
        record.times.renew_at = record
            .times
            .renew_at
            .map(|at| at + jiff::SignedDuration::from_secs(3600));
    }
    *lock(&mirror.0) = Some(active.clone());
    world.lab.0.lock().expect("lab").calls.clear();
    world.firewall.tamper(None);
    books.state = State::default();
    let reports_before = lock(&world.reports.0).len();

    let mut ctx = context_ha(
        &world,
        &mut books,
        config(BackendChoice::Pcp),
        &mut leadership,
    );
    let next = ctx.pass(Trigger::Cluster).await;
    assert_eq!(next.served, Some(0));
    assert!(
        world.lab.calls().is_empty(),
        "a standby sends nothing to the router"
    );
    assert_eq!(
        world.firewall.table().ruleset,
        None,
        "a standby installs no rules"
    );
    assert_eq!(
        lock(&world.reports.0).len(),
        reports_before,
        "a standby reports nothing"
    );
    assert!(ctx.state.mappings.is_empty());
    assert_eq!(leader(&metrics), "holepunch_leader 0");

    // This host takes the Lease: the loop wakes, loads node-b's records and renews them with
    // their nonce, and maps the one node-b had not.
    let take = async {
        tokio::task::yield_now().await;
        standing.send_replace(Standing {
            role: Role::Leader {
                until: std::time::Instant::now() + Duration::from_secs(3600),
            },
            transitions: 4,
            ..follower.clone()
        });
    };
    tokio::join!(ctx.role_changed(), take);
    let next = ctx.pass(Trigger::Timer).await;
    assert_eq!(next.served, Some(2));
    let mut calls = world.lab.calls();
    calls.sort();
    assert_eq!(
        calls,
        ["map 8080 pcp", "map 8081 pcp"],
        "renewed, not duplicated"
    );
    assert_eq!(
        record(ctx.state, 8080).nonce.as_deref(),
        Some("0123456789abcdef01234567"),
        "the same mapping, renewed with its nonce"
    );
    assert_eq!(leader(&metrics), "holepunch_leader 1");
    let forwards = world.firewall.table().ruleset.map(|r| r.forwards().len());
    assert_eq!(forwards, Some(2), "the active host installs the rules");
    assert!(lock(&world.reports.0).len() > reports_before, "and reports");
    let mirrored = mirror.records().expect("mirrored");
    assert_eq!(mirrored, *ctx.state, "the mirror follows the state");
    // The active host checks a router announcement with the router.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.pass(Trigger::Announcement(Announcement::Pcp { epoch_secs: 0 }))
        .await;
    assert_eq!(world.lab.confirms(), 1, "the active host asks the router");
    let mirrored = mirror.records().expect("mirrored");
    assert_eq!(mirrored, *ctx.state, "the mirror follows every change");

    // The renew deadline passes (the API is gone): the next pass stands by, removes the
    // rules, and no request goes out, not even one that is due.
    let calls_before = world.lab.calls().len();
    standing.send_replace(Standing {
        role: Role::Leader {
            until: std::time::Instant::now(),
        },
        transitions: 4,
        ..follower
    });
    world
        .cluster
        .set(vec![web("web", 8080), web("api", 8081), web("new", 8082)]);
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(
        world.lab.calls().len(),
        calls_before,
        "fenced: no router request"
    );
    // Nor is an announcement checked with the router.
    tokio::time::sleep(Duration::from_secs(60)).await;
    ctx.pass(Trigger::Announcement(Announcement::Pcp { epoch_secs: 0 }))
        .await;
    assert_eq!(world.lab.confirms(), 1, "fenced: no announcement check");
    assert_eq!(
        world.firewall.table().ruleset,
        None,
        "fenced: rules removed"
    );
    assert_eq!(leader(&metrics), "holepunch_leader 0");
    assert_eq!(
        mirror.records(),
        Some(mirrored),
        "fenced: the mirror is not written"
    );
}

/// A [`MemoryMirror`](crate::ha::role::MemoryMirror) whose writes the API can refuse.
struct Refusable {
    inner: crate::ha::role::MemoryMirror,
    refuse: Arc<std::sync::atomic::AtomicBool>,
    /// Writes never answer (an API server that hangs).
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl crate::ha::role::Mirror for Refusable {
    fn take_over(
        &mut self,
    ) -> futures::future::BoxFuture<'_, Result<Option<State>, crate::ha::lease::LeaseError>> {
        self.inner.take_over()
    }

    fn save(&mut self, state: &State, standing: &crate::ha::runner::Standing) {
        if !self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            self.inner.save(state, standing);
        }
    }

    fn write(
        &mut self,
        state: &State,
        standing: &crate::ha::runner::Standing,
    ) -> futures::future::BoxFuture<'_, Result<(), crate::ha::lease::LeaseError>> {
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(
                crate::ha::lease::LeaseError::Fenced {
                    at: "refused by the test".into(),
                },
            )));
        }
        self.inner.write(state, standing)
    }
}

/// `[ha]`, mirror before sent: a new mapping's pending record, with its nonce, is in the
/// mirror before the router sees the request, so a host that dies right after sending leaves
/// the nonce to the next one. While the mirror refuses writes, no new mapping goes out but a
/// renewal of a mirrored one does; the held-back one goes a few seconds after the mirror
/// answers again, with the nonce it was mirrored with (README, "High availability").
#[tokio::test(start_paused = true)]
async fn new_mappings_are_mirrored_before_they_are_sent_and_held_back_while_the_mirror_refuses() {
    use crate::ha::election::Role;
    use crate::ha::role::{Leadership, MemoryMirror};
    use crate::ha::runner::Standing;
    use crate::reconcile::UNSHARED_PREFIX;
    use crate::state::Failure;

    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    let mirror = MemoryMirror::default();
    lock(&world.lab.0).mirror = Some(mirror.clone());
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (_standing, receiver) = tokio::sync::watch::channel(Standing {
        identity: "node-a".into(),
        role: Role::Leader {
            until: std::time::Instant::now() + Duration::from_secs(24 * 3600),
        },
        transitions: 1,
    });
    let mut leadership = Leadership::new(
        receiver,
        None,
        Box::new(Refusable {
            inner: mirror.clone(),
            refuse: refuse.clone(),
            hang: hang.clone(),
        }),
    );
    let mut books = Books::new();
    world.cluster.set(vec![web("web", 8080)]);
    let mut ctx = context_ha(
        &world,
        &mut books,
        config(BackendChoice::Pcp),
        &mut leadership,
    );
    let at_map = |lab: &Lab| std::mem::take(&mut lock(&lab.0).mirrored_at_map);

    // The normal case: pending and mirrored with its nonce when the router is asked.
    let next = ctx.pass(Trigger::Cluster).await;
    assert_eq!(next.served, Some(1));
    let nonce = record(ctx.state, 8080).nonce.clone();
    assert!(nonce.is_some(), "a PCP mapping has a nonce");
    assert_eq!(
        at_map(&world.lab),
        [(8080, nonce.clone(), Some((MappingStatus::Pending, nonce)))],
        "the router saw the request after the mirror held it"
    );
    assert_eq!(
        mirror.records().as_ref(),
        Some(&*ctx.state),
        "and the result is mirrored after"
    );

    // The mirror refuses writes; a new Service comes while 8080's renewal falls due.
    refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    world.cluster.set(vec![web("web", 8080), web("new", 8081)]);
    let calls = world.lab.calls().len();
    let renewed_before = record(ctx.state, 8080).times.renew_at;
    next_timed_pass(&mut ctx).await;
    assert_eq!(
        world.lab.calls_since(calls),
        ["map 8080 pcp"],
        "the renewal of a mirrored mapping goes; the new mapping does not"
    );
    assert_ne!(
        record(ctx.state, 8080).times.renew_at,
        renewed_before,
        "renewed"
    );
    let held = record(ctx.state, 8081);
    assert_eq!(held.status, MappingStatus::Failed);
    assert_eq!(held.failure, Some(Failure::HeldBack));
    assert!(
        held.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(UNSHARED_PREFIX)),
        "{:?}",
        held.last_error
    );
    let held_nonce = held.nonce.clone();
    assert!(held_nonce.is_some());
    at_map(&world.lab);

    // The mirror answers again: the held-back mapping goes within seconds, mirrored first
    // with the nonce it keeps.
    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let calls = world.lab.calls().len();
    let next = next_timed_pass(&mut ctx).await;
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "retried after {:?}",
        started.elapsed()
    );
    assert_eq!(world.lab.calls_since(calls), ["map 8081 pcp"]);
    assert_eq!(next.served, Some(2));
    assert_eq!(
        at_map(&world.lab),
        [(
            8081,
            held_nonce.clone(),
            Some((MappingStatus::Pending, held_nonce))
        )]
    );
    assert_eq!(record(ctx.state, 8081).status, MappingStatus::Active);
    assert_eq!(mirror.records().as_ref(), Some(&*ctx.state));

    // A mirror that never answers holds the pass up for at most MIRROR_FIRST_SECS; the new
    // mapping waits.
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    world
        .cluster
        .set(vec![web("web", 8080), web("new", 8081), web("late", 8082)]);
    let calls = world.lab.calls().len();
    let started = tokio::time::Instant::now();
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(crate::ha::role::MIRROR_FIRST_SECS)
    );
    assert!(world.lab.calls_since(calls).is_empty());
    assert_eq!(record(ctx.state, 8082).failure, Some(Failure::HeldBack));
}

/// A leader until `until`, as the election publishes it.
fn leading_until(
    until: std::time::Instant,
) -> (
    tokio::sync::watch::Sender<crate::ha::runner::Standing>,
    crate::ha::role::Leadership,
) {
    let (standing, receiver) = tokio::sync::watch::channel(crate::ha::runner::Standing {
        identity: "node-a".into(),
        role: crate::ha::election::Role::Leader { until },
        transitions: 1,
    });
    let leadership = crate::ha::role::Leadership::new(
        receiver,
        None,
        Box::new(crate::ha::role::MemoryMirror::default()),
    );
    (standing, leadership)
}

/// The one fence (`FencedConnect`) covers every request the router session makes, the plan's
/// through its mapper and the session's own: after the renew deadline none of them reaches
/// the router, and none is counted as a router request; before it, each goes through.
#[tokio::test(start_paused = true)]
async fn fenced_requests_never_reach_the_router() {
    use crate::ha::role::FencedConnect;
    use crate::router::instrument::Instrumented;

    let lab = Lab::answering(&[Backend::Pcp]);
    let (standing, leadership) =
        leading_until(std::time::Instant::now() + Duration::from_secs(3600));
    let metrics = Metrics::new(LEASE_SECS, Duration::from_secs(60));
    let mut connect = FencedConnect::new(
        ScriptedConnect {
            lab: lab.clone(),
            choice: BackendChoice::Auto,
        },
        leadership.fence(),
    );
    let request = MapRequest {
        owner: crate::model::Owner::new("default", "web"),
        protocol: Protocol::Tcp,
        external_port: 8080,
        internal: crate::model::Endpoint::new(LAN, 8080),
        lifetime_secs: LEASE_SECS,
        nonce: None,
    };
    let lease = Lease {
        owner: request.owner.clone(),
        protocol: request.protocol,
        external_port: request.external_port,
        internal: request.internal,
        nonce: None,
    };
    // While this host may act, every kind of request goes through.
    let mut mapper = connect.probe(None).await.expect("found");
    {
        let mut router = Instrumented::new(&mut mapper, &*metrics);
        router.map(&request).await.expect("mapped");
        router
            .lost(std::slice::from_ref(&lease))
            .await
            .expect("checked");
        router.unmap(&lease).await.expect("unmapped");
    }
    connect.confirm(Check::Pcp).await.expect("confirmed");
    assert!(connect.reach(Backend::Natpmp).await.is_some());
    lock(&lab.0).leftovers = vec![9000];
    assert_eq!(
        connect
            .purge_leftovers(&mut mapper, &BTreeSet::new())
            .await
            .ok(),
        Some(1)
    );
    let calls = lab.calls();
    let asked = lab.asked();
    assert_eq!(calls, ["map 8080 pcp", "lost 1 pcp", "unmap 8080 pcp"]);
    assert_eq!(asked, ["probe", "reach natpmp", "purge 9000 pcp"]);
    assert_eq!(lab.confirms(), 1);
    let counted = |metrics: &Metrics| {
        let text = metrics.encode(Timestamp::now()).expect("encode");
        text.lines()
            .filter(|l| l.starts_with("holepunch_router_requests_total{"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let counted_before = counted(&metrics);
    assert_eq!(counted_before.len(), 3, "{counted_before:?}");

    // The renew deadline passes: every request is refused before it is sent.
    standing.send_modify(|s| {
        s.role = crate::ha::election::Role::Leader {
            until: std::time::Instant::now(),
        }
    });
    lock(&lab.0).leftovers = vec![9001];
    {
        let mut router = Instrumented::new(&mut mapper, &*metrics);
        assert!(matches!(
            router.map(&request).await,
            Err(RouterError::Fenced)
        ));
        assert!(matches!(
            router.lost(std::slice::from_ref(&lease)).await,
            Err(RouterError::Fenced)
        ));
        assert!(matches!(
            router.unmap(&lease).await,
            Err(RouterError::Fenced)
        ));
    }
    assert!(matches!(
        connect.confirm(Check::Pcp).await,
        Err(RouterError::Fenced)
    ));
    assert!(connect.probe(None).await.is_err());
    assert!(connect.reach(Backend::Natpmp).await.is_none());
    assert!(matches!(
        connect.purge_leftovers(&mut mapper, &BTreeSet::new()).await,
        Err(RouterError::Fenced)
    ));
    assert_eq!(lab.calls(), calls, "no request reached the router");
    assert_eq!(lab.asked(), asked, "no probe, reach or purge reached it");
    assert_eq!(lab.confirms(), 1, "no announcement check reached it");
    assert_eq!(
        counted(&metrics),
        counted_before,
        "nothing sent, nothing counted"
    );
}

/// A pass in which the renew deadline passes stops sending there: the requests before it
/// went, none after it reached the router, and what was not sent waits as a refusal.
#[tokio::test(start_paused = true)]
async fn a_pass_stops_sending_at_the_fence_deadline() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world.cluster.set(vec![
        web("a", 8080),
        web("b", 8081),
        web("c", 8082),
        web("d", 8083),
    ]);
    let (standing, mut leadership) =
        leading_until(std::time::Instant::now() + Duration::from_secs(3600));
    lock(&world.lab.0).fence_after_maps = Some((2, standing));
    let mut books = Books::new();
    let mut ctx = context_ha(
        &world,
        &mut books,
        config(BackendChoice::Pcp),
        &mut leadership,
    );
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(
        world.lab.calls(),
        ["map 8080 pcp", "map 8081 pcp"],
        "the deadline passed during the second request: nothing after it was sent"
    );
    for port in [8080, 8081] {
        assert_eq!(record(ctx.state, port).status, MappingStatus::Active);
    }
    for port in [8082, 8083] {
        let waiting = record(ctx.state, port);
        assert_eq!(waiting.status, MappingStatus::Failed, "{waiting:?}");
        assert_eq!(
            waiting.last_error.as_deref(),
            Some(RouterError::Fenced.to_string().as_str())
        );
    }
}

/// A purge (many requests: a listing, a delete each) stops at the fence deadline, not only
/// before it starts: no request after the deadline is sent, although leftovers remain.
/// Real time: the fence reads the real clock.
#[tokio::test]
async fn a_purge_stops_at_the_fence_deadline() {
    use crate::ha::role::FencedConnect;

    let lab = Lab::answering(&[Backend::Pcp]);
    {
        let mut routers = lock(&lab.0);
        routers.leftovers = (9000..9020).collect();
        routers.purge_latency = Duration::from_millis(100);
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(350);
    let (_standing, leadership) = leading_until(deadline);
    let mut connect = FencedConnect::new(
        ScriptedConnect {
            lab: lab.clone(),
            choice: BackendChoice::Pcp,
        },
        leadership.fence(),
    );
    let mut mapper = connect.configured().expect("PCP configured");
    let result = connect.purge_leftovers(&mut mapper, &BTreeSet::new()).await;
    let stopped = std::time::Instant::now();
    assert!(matches!(result, Err(RouterError::Fenced)), "{result:?}");
    assert!(stopped >= deadline);
    let sent = lab.asked().len();
    // The normal case: before the deadline the purge went on (one request each 100 ms, fewer
    // on a loaded machine); after it, nothing more, although 16 or more leftovers remain.
    assert!((1..=4).contains(&sent), "{:?}", lab.asked());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lab.asked().len(), sent, "nothing sent after the deadline");
    assert_eq!(lock(&lab.0).leftovers.len(), 20 - sent);
}

#[tokio::test(start_paused = true)]
async fn a_signal_ends_a_pass_between_two_router_requests_and_the_next_pass_sends_the_rest() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    world
        .cluster
        .set(vec![web("a", 8080), web("b", 8081), web("c", 8082)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));

    // SIGHUP: one request goes (every pass makes progress), then the pass stops, the rest
    // waits as pending and the next pass is due at once.
    ctx.interrupts.request_reload();
    let next = ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls(), ["map 8080 pcp"]);
    assert_eq!(next.due, Some(books_now(&ctx)));
    assert_eq!(record(ctx.state, 8080).status, MappingStatus::Active);
    assert_eq!(record(ctx.state, 8081).status, MappingStatus::Pending);
    assert_eq!(record(ctx.state, 8082).status, MappingStatus::Pending);

    let next = ctx.pass(Trigger::Timer).await;
    assert_eq!(world.lab.calls_since(1), ["map 8081 pcp", "map 8082 pcp"]);
    assert_eq!(next.served, Some(3));

    // SIGTERM: a stopping daemon sends nothing more; the new Service waits as pending.
    world.cluster.set(vec![
        web("a", 8080),
        web("b", 8081),
        web("c", 8082),
        web("d", 8083),
    ]);
    ctx.interrupts.request_stop();
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.lab.calls().len(), 3, "{:?}", world.lab.calls());
    assert_eq!(record(ctx.state, 8083).status, MappingStatus::Pending);
    assert!(ctx.interrupts.stopping());
}
