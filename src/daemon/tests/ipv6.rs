//! In-process tests of the IPv6 pinholes in the loop (README, "IPv6"): a scripted router's
//! pinholes beside the scripted IPv4 mappings.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Node, NodeAddress};

use super::*;
use crate::daemon::pinholes::Pinholes;
use crate::router::pinholes::{BoxFuture, Ipv6Path, Opened, PinholeConnect, PinholeRouter};
use crate::state::PinholeRecord;

const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);
const NODE6: &str = "2001:db8:77::20";

#[derive(Debug, Default)]
struct HolesInner {
    /// "8080/tcp [2001:db8:77::10]:8080" per pinhole the router holds.
    held: BTreeSet<String>,
    /// "open 8080/tcp [..]:8080", "renew ...", "close ...", in order.
    calls: Vec<String>,
    connects: usize,
    /// This host's IPv6 address toward the router, when not [`HOST6`] (a new prefix).
    host: Option<Ipv6Addr>,
    /// Addresses this host held before and still holds (deprecated after a renumbering).
    former: Vec<Ipv6Addr>,
}

/// The scripted router's IPv6 firewall; clones share it.
#[derive(Debug, Clone, Default)]
pub(super) struct Holes(Arc<Mutex<HolesInner>>);

impl Holes {
    /// The loop's pinhole part, talking to this scripted router.
    pub(super) fn pinholes(&self) -> Pinholes {
        Pinholes::new(Box::new(ScriptedConnect6(self.clone())))
    }

    fn held(&self) -> Vec<String> {
        lock(&self.0).held.iter().cloned().collect()
    }

    fn calls(&self) -> Vec<String> {
        lock(&self.0).calls.clone()
    }

    fn connects(&self) -> usize {
        lock(&self.0).connects
    }

    /// This host's address toward the router is `host` from now on (the ISP renumbered).
    fn renumber(&self, host: Ipv6Addr) {
        let mut holes = lock(&self.0);
        let old = holes.host.unwrap_or(HOST6);
        holes.former.push(old);
        holes.host = Some(host);
    }

    /// The router restarts: its IPv6 firewall forgets every pinhole.
    fn reboot(&self) {
        lock(&self.0).held.clear();
    }
}

struct ScriptedConnect6(Holes);

impl PinholeConnect for ScriptedConnect6 {
    fn path(&mut self) -> Result<Ipv6Path, String> {
        Ok(Ipv6Path {
            router: ROUTER6,
            scope_id: 0,
            host: lock(&self.0.0).host.unwrap_or(HOST6),
            prefix_len: 64,
        })
    }
    fn connect<'a>(
        &'a mut self,
        path: Ipv6Path,
        backend: Backend,
        _config: &'a Config,
    ) -> BoxFuture<'a, Result<Box<dyn PinholeRouter>, String>> {
        let mut holes = lock(&self.0.0);
        holes.connects += 1;
        // As on a real host: only from an address it holds (another HA host's is not).
        if path.host != holes.host.unwrap_or(HOST6) && !holes.former.contains(&path.host) {
            let why = format!("this host does not hold {}", path.host);
            return Box::pin(async move { Err(why) });
        }
        drop(holes);
        let router = Scripted6 {
            holes: self.0.clone(),
            backend,
            host: path.host,
        };
        Box::pin(async move { Ok(Box::new(router) as Box<dyn PinholeRouter>) })
    }
}

struct Scripted6 {
    holes: Holes,
    backend: Backend,
    host: Ipv6Addr,
}

fn name(record: &PinholeRecord) -> String {
    format!("{} {}", record.key(), record.opens())
}

impl Scripted6 {
    /// Opens or renews the pinhole (one request for both), noted as the plan asked it: a
    /// renewal sends the active record, an open the record saved as pending first.
    fn grant(&self, record: &PinholeRecord, lifetime_secs: u32) -> Opened {
        let mut holes = lock(&self.holes.0);
        holes.held.insert(name(record));
        let verb = if record.status == MappingStatus::Active {
            "renew"
        } else {
            "open"
        };
        holes.calls.push(format!("{verb} {}", name(record)));
        Opened {
            lifetime_secs,
            renew_after: None,
            epoch: Some(1),
            unique_id: None,
        }
    }
}

impl PinholeRouter for Scripted6 {
    fn backend(&self) -> Backend {
        self.backend
    }
    fn router(&self) -> Ipv6Addr {
        ROUTER6
    }
    fn host(&self) -> Ipv6Addr {
        self.host
    }
    fn open<'a>(
        &'a mut self,
        record: &'a PinholeRecord,
        lifetime_secs: u32,
    ) -> BoxFuture<'a, Result<Opened, RouterError>> {
        let opened = self.grant(record, lifetime_secs);
        Box::pin(async move { Ok(opened) })
    }
    fn close<'a>(
        &'a mut self,
        record: &'a PinholeRecord,
    ) -> BoxFuture<'a, Result<(), RouterError>> {
        let mut holes = lock(&self.holes.0);
        holes.calls.push(format!("close {}", name(record)));
        holes.held.remove(&name(record));
        Box::pin(async { Ok(()) })
    }
}

fn dual_node() -> Node {
    let mut node = node("node-a", "192.168.1.20", true);
    if let Some(addresses) = node.status.as_mut().and_then(|s| s.addresses.as_mut()) {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: NODE6.into(),
        });
    }
    node
}

/// The cluster with a dual-stack node.
fn set_dual(world: &World, services: Vec<Service>) {
    *lock(&world.cluster.0) = Some(Snapshot {
        services,
        nodes: vec![dual_node()],
        endpoint_slices: Vec::new(),
    });
}

fn pinhole(state: &State, port: u16) -> Option<&PinholeRecord> {
    state.pinholes.get(&MappingKey {
        protocol: Protocol::Tcp,
        external_port: port,
    })
}

fn held(port: u16) -> String {
    format!("{port}/tcp [{HOST6}]:{port}")
}

#[tokio::test(start_paused = true)]
async fn a_pinhole_lives_beside_its_mapping_renewed_restored_and_removed_with_it() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    set_dual(&world, vec![web("web", 8080), web("api", 8081)]);
    let mut books = Books::new();
    let mut config = config(BackendChoice::Pcp);
    config.router.verify_interval_secs = 20;
    let mut ctx = context(&world, &mut books, config);

    // Relay: each pinhole opens this host's address on the external port, beside the IPv4
    // mapping, and the traffic goes on to the node's IPv6 address and nodePort.
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.holes.held(), [held(8080), held(8081)]);
    for port in [8080, 8081] {
        assert_eq!(record(ctx.state, port).status, MappingStatus::Active);
        let hole = pinhole(ctx.state, port).expect("a pinhole record");
        assert_eq!(hole.status, MappingStatus::Active);
        assert_eq!(
            hole.target().to_string(),
            format!("[{NODE6}]:{}", 30_000 + port)
        );
        assert_eq!(hole.backend, Backend::Pcp);
        // The nonce renews and deletes it after a restart of holepunch: saved with it.
        assert_eq!(hole.nonce.as_deref().map(str::len), Some(24));
    }
    let first = pinhole(ctx.state, 8080).cloned().expect("record");
    assert!(
        first
            .times
            .renew_at
            .is_some_and(|at| at < first.times.expires_at.unwrap_or(at)),
        "{first:?}"
    );

    // The router loses everything; the verify finds the IPv4 mappings lost, and their
    // pinholes are restored with them, same nonce.
    world.lab.reboot();
    world.holes.reboot();
    let mut passes = 0;
    while world.holes.held().len() < 2 && passes < 4 {
        next_timed_pass(&mut ctx).await;
        passes += 1;
    }
    assert_eq!(world.holes.held(), [held(8080), held(8081)], "not restored");
    assert_eq!(
        pinhole(ctx.state, 8080).and_then(|h| h.nonce.clone()),
        first.nonce
    );
    assert!(
        world.lab.calls().iter().any(|c| c.starts_with("lost")),
        "{:?}",
        world.lab.calls()
    );

    // Renewed before the lease ends, as the IPv4 mapping.
    let before = world.holes.calls().len();
    for _ in 0..6 {
        next_timed_pass(&mut ctx).await;
    }
    let renewals = world.holes.calls()[before..].to_vec();
    assert!(
        renewals.contains(&format!("renew {}", held(8080))),
        "{renewals:?}"
    );
    assert!(
        pinhole(ctx.state, 8080).is_some_and(|h| h.status == MappingStatus::Active
            && h.times.expires_at.is_some_and(|at| at > ctx.clock.now())),
    );

    // One Service unpublished: its mapping and its pinhole go together, the other stays.
    set_dual(&world, vec![web("web", 8080)]);
    let before = world.holes.calls().len();
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(
        world.holes.calls()[before..],
        [format!("close {}", held(8081))]
    );
    assert_eq!(world.holes.held(), [held(8080)]);
    assert!(pinhole(ctx.state, 8081).is_none());
    assert!(!ctx.state.mappings.keys().any(|k| k.external_port == 8081));
    assert!(pinhole(ctx.state, 8080).is_some());

    // exposure.ipv6 = "off" closes the rest; the IPv4 mapping stays.
    ctx.config.exposure.ipv6 = crate::config::Ipv6Choice::Off;
    ctx.pass(Trigger::Cluster).await;
    assert!(world.holes.held().is_empty());
    assert!(ctx.state.pinholes.is_empty());
    assert_eq!(record(ctx.state, 8080).status, MappingStatus::Active);
}

/// The ISP renumbers: this host's address toward the router changes. The relay address is
/// found again at the next pass (not taken from the pinhole records): the pinhole of the
/// former address is closed from that address, one to the new address is opened, and the ip6
/// DNAT follows.
#[tokio::test(start_paused = true)]
async fn a_new_host_address_moves_the_pinholes_and_the_ip6_dnat() {
    const NEW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x88, 0, 0, 0, 0, 0x10);
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    set_dual(&world, vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    let relay6 = |world: &World| match world.firewall.table().ruleset {
        Some(crate::nft::Ruleset::Relay {
            ipv6: Some(relay6), ..
        }) => Some((relay6.host, relay6.forwards.len())),
        _ => None,
    };

    // The normal case first: the pinhole and the DNAT on the address found.
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.holes.held(), [held(8080)]);
    assert_eq!(relay6(&world), Some((HOST6, 1)));

    world.holes.renumber(NEW6);
    let before = world.holes.calls().len();
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(
        world.holes.calls()[before..],
        [
            format!("close {}", held(8080)),
            format!("open 8080/tcp [{NEW6}]:8080"),
        ]
    );
    assert_eq!(world.holes.held(), [format!("8080/tcp [{NEW6}]:8080")]);
    assert_eq!(
        pinhole(ctx.state, 8080).map(|h| (h.address, h.status)),
        Some((NEW6, MappingStatus::Active))
    );
    assert_eq!(relay6(&world), Some((NEW6, 1)));
    // Nothing more to move at the next pass.
    let before = world.holes.calls().len();
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.holes.calls()[before..], [] as [String; 0]);
}

/// Gateway mode (holepunch on the router): no router is asked for pinholes; each published
/// IPv6 target is opened on its own address at the external port in holepunch's own table
/// (DNAT to the nodePort), beside the IPv4 forward, and leaves with it.
#[tokio::test(start_paused = true)]
async fn gateway_mode_publishes_ipv6_targets_in_its_own_table_without_asking_a_router() {
    let world = World::default();
    set_dual(&world, vec![web("web", 8080), web("api", 8081)]);
    let mut books = Books::new();
    let mut config = config(BackendChoice::None);
    config.exposure.mode = crate::config::ExposureMode::Gateway;
    config.exposure.wan_interface = Some("wan0".into());
    let mut ctx = context(&world, &mut books, config);
    ctx.forwarding = Forwarding::Gateway;
    let forwards6 = |world: &World| match world.firewall.table().ruleset {
        Some(crate::nft::Ruleset::Gateway { forwards6, .. }) => forwards6
            .iter()
            .map(|f| format!("{}/{} -> {}", f.port, f.protocol, f.target))
            .collect::<Vec<_>>(),
        other => panic!("not a gateway table: {other:?}"),
    };

    ctx.pass(Trigger::Cluster).await;
    assert_eq!(
        forwards6(&world),
        [
            format!("8080/tcp -> [{NODE6}]:38080"),
            format!("8081/tcp -> [{NODE6}]:38081")
        ]
    );
    let hole = pinhole(ctx.state, 8080).expect("a pinhole record");
    assert_eq!(
        (hole.opens().to_string(), hole.backend, hole.status),
        (
            format!("[{NODE6}]:8080"),
            Backend::None,
            MappingStatus::Active
        )
    );
    assert_eq!(hole.times.renew_at, None, "nothing to renew on this router");
    assert_eq!(world.holes.connects(), 0, "no router asked");
    assert!(world.holes.calls().is_empty());

    // api unpublished: its forward goes, web's stays.
    set_dual(&world, vec![web("web", 8080)]);
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(forwards6(&world), [format!("8080/tcp -> [{NODE6}]:38080")]);
    assert!(pinhole(ctx.state, 8081).is_none());
}

#[tokio::test(start_paused = true)]
async fn natpmp_publishes_ipv4_only_and_asks_for_no_pinhole() {
    let world = World {
        lab: Lab::answering(&[Backend::Natpmp]),
        ..World::default()
    };
    set_dual(&world, vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Natpmp));
    ctx.pass(Trigger::Cluster).await;
    next_timed_pass(&mut ctx).await;
    assert_eq!(record(ctx.state, 8080).status, MappingStatus::Active);
    assert_eq!(world.holes.connects(), 0);
    assert!(ctx.state.pinholes.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_routers_ipv6_address_as_load_balancer_ingress_is_refused_while_a_normal_one_is_opened()
{
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    // A dual-stack load balancer whose IPv6 ingress is the router's address: its IPv4 side
    // (inside target_cidrs) is published, the IPv6 side refused (no nodePort to fall back on
    // for a load balancer target).
    let mut attack = crate::desired::tests::with_lb_ip(web("attack", 8090), "192.168.77.100");
    if let Some(ingress) = attack
        .status
        .as_mut()
        .and_then(|s| s.load_balancer.as_mut())
        .and_then(|lb| lb.ingress.as_mut())
    {
        ingress.push(k8s_openapi::api::core::v1::LoadBalancerIngress {
            ip: Some(ROUTER6.to_string()),
            ..Default::default()
        });
    }
    set_dual(&world, vec![web("web", 8080), attack]);
    let mut books = Books::new();
    let mut config = config(BackendChoice::Pcp);
    config.exposure.target_cidrs = ["192.168.77.0/24", "2001:db8:77::/64"]
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let mut ctx = context(&world, &mut books, config);
    ctx.pass(Trigger::Cluster).await;
    // The normal Service's pinhole, and for the attack only its IPv4 mapping.
    assert_eq!(world.holes.held(), [held(8080)]);
    assert_eq!(record(ctx.state, 8090).status, MappingStatus::Active);
    assert_eq!(
        record(ctx.state, 8090).target.to_string(),
        "192.168.77.100:8090"
    );
    let reports = lock(&world.reports.0).clone();
    let last = reports.last().expect("a report");
    let refused: Vec<&Problem> = last
        .iter()
        .filter(|p| p.owner.name == "attack" && p.kind == ProblemKind::TargetNotAllowed)
        .collect();
    assert_eq!(refused.len(), 1, "{last:?}");
    assert!(
        !refused[0].message.contains("2001:db8"),
        "{}",
        refused[0].message
    );
    assert!(
        refused[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("it is an address of the router")),
        "{:?}",
        refused[0].detail
    );
    assert!(!last.iter().any(|p| p.owner.name == "web"), "{last:?}");
}

/// Behind a carrier-grade NAT the IPv4 mapping cannot be reached: the double-NAT problem says
/// whether the pinhole still reaches the Service over IPv6.
#[tokio::test(start_paused = true)]
async fn the_double_nat_problem_says_whether_ipv6_still_reaches_the_service() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    set_dual(&world, vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    ctx.pass(Trigger::Cluster).await;
    for record in ctx.state.mappings.values_mut() {
        record.external_address = Some(Ipv4Addr::new(100, 64, 0, 7));
    }
    let problems = double_nat_problems(ctx.state);
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].message.ends_with(&format!(
            "still reachable over IPv6 on {}",
            held(8080).split_once(' ').map_or("", |(_, a)| a)
        )),
        "{}",
        problems[0].message
    );
    ctx.state.pinholes.clear();
    let problems = double_nat_problems(ctx.state);
    assert!(
        problems[0]
            .message
            .ends_with("no IPv6 pinhole reaches it either"),
        "{}",
        problems[0].message
    );
}

/// A router that restarted while holepunch was not running: the first PCP answer's epoch is
/// behind what a recorded pinhole's epoch and age say, so every pinhole granted before is
/// restored at once, not only the one whose renewal fell due (RFC 6887 §8.5).
#[tokio::test(start_paused = true)]
async fn a_recorded_epoch_shows_a_restart_the_client_never_saw() {
    let world = World {
        lab: Lab::answering(&[Backend::Pcp]),
        ..World::default()
    };
    set_dual(&world, vec![web("web", 8080), web("api", 8081)]);
    let mut books = Books::new();
    let metrics = books.metrics.clone();
    let mut ctx = context(&world, &mut books, config(BackendChoice::Pcp));
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.holes.held(), [held(8080), held(8081)]);
    // As recorded before a restart of holepunch: 8080 granted when the router's epoch was
    // far ahead of the 1 s it answers now; 8081 due for renewal.
    let now = ctx.clock.now();
    let key = |port| MappingKey {
        protocol: Protocol::Tcp,
        external_port: port,
    };
    if let Some(hole) = ctx.state.pinholes.get_mut(&key(8080)) {
        hole.epoch = Some(100_000);
    }
    if let Some(hole) = ctx.state.pinholes.get_mut(&key(8081)) {
        hole.times.renew_at = Some(now);
    }
    lock(&world.holes.0).calls.clear();
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.pass(Trigger::Timer).await;
    assert_eq!(world.holes.calls(), [format!("renew {}", held(8081))]);
    // The renewal's answer showed the restart: 8080 is restored at the next pass, due now.
    assert_eq!(ctx.sleep_for(), Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.pass(Trigger::Timer).await;
    let calls = world.holes.calls();
    assert!(calls.contains(&format!("open {}", held(8080))), "{calls:?}");
    assert_eq!(pinhole(ctx.state, 8080).and_then(|h| h.epoch), Some(1));
    // Each pinhole request is counted as the mappings' are: two opens, a renewal, a restore.
    let text = metrics.encode(ctx.clock.now()).unwrap_or_default();
    let opens =
        r#"holepunch_router_requests_total{backend="pcp",operation="pinhole_open",result="ok"} 4"#;
    assert!(text.lines().any(|l| l == opens), "{text}");
}

/// `[ha]`: this host holds the Lease from the start, and the mirror holds what the previous
/// holder left (`previous`).
fn taking_over(previous: State) -> (crate::ha::role::MemoryMirror, crate::ha::role::Leadership) {
    use crate::ha::election::Role;
    use crate::ha::runner::Standing;
    let mirror = crate::ha::role::MemoryMirror::default();
    *lock(&mirror.0) = Some(previous);
    // The sender may go: the standing stays what it was last.
    let (_, receiver) = tokio::sync::watch::channel(Standing {
        identity: "node-a".into(),
        role: Role::Leader {
            until: std::time::Instant::now() + Duration::from_secs(3600),
        },
        transitions: 4,
    });
    let leadership = crate::ha::role::Leadership::new(receiver, None, Box::new(mirror.clone()));
    (mirror, leadership)
}

/// The previous HA holder's own global address (relay mode opens pinholes to it).
const OLD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x99);

/// `[ha]`, relay mode: the host that takes over loads the previous holder's pinholes from the
/// mirror. One that opens the previous holder's own address is deleted where the router
/// allows it (UPnP) and replaced by one to this host's address; PCP deletes only the caller's
/// own, so there it is left to its lease. Either way the new host opens its own at once, and
/// mirrors it (README, "High availability").
#[tokio::test(start_paused = true)]
async fn a_host_that_takes_over_replaces_the_previous_holders_pinholes_with_its_own() {
    for (backend, choice) in [
        (Backend::Upnp, BackendChoice::Upnp),
        (Backend::Pcp, BackendChoice::Pcp),
    ] {
        let world = World {
            lab: Lab::answering(&[backend]),
            ..World::default()
        };
        set_dual(&world, vec![web("web", 8080)]);
        let mut books = Books::new();
        // What the previous holder mirrored: the mapping and its pinhole to its own address.
        let mut previous = {
            let mut ctx = context(&world, &mut books, config(choice));
            ctx.pass(Trigger::Cluster).await;
            ctx.state.clone()
        };
        assert_eq!(previous.pinholes.len(), 1, "{backend}");
        for hole in previous.pinholes.values_mut() {
            hole.address = OLD6;
        }
        let old = format!("8080/tcp [{OLD6}]:8080");
        {
            let mut holes = lock(&world.holes.0);
            holes.held.clear();
            holes.held.insert(old.clone());
            holes.calls.clear();
        }
        let (mirror, mut leadership) = taking_over(previous.clone());
        books.state = State::default();

        let mut ctx = context(&world, &mut books, config(choice)).with_ha(Some(&mut leadership));
        ctx.pass(Trigger::Cluster).await;
        let own = held(8080);
        match backend {
            Backend::Upnp => {
                assert_eq!(
                    world.holes.calls(),
                    [format!("close {old}"), format!("open {own}")],
                    "UPnP: the previous holder's deleted, then this host's opened"
                );
                assert_eq!(world.holes.held(), [own]);
            }
            _ => {
                assert_eq!(
                    world.holes.calls(),
                    [format!("open {own}")],
                    "PCP: nothing asked about another host's pinhole"
                );
                assert_eq!(world.holes.held(), [own.clone(), old.clone()]);
            }
        }
        let hole = pinhole(ctx.state, 8080).expect("this host's pinhole");
        assert_eq!(
            (hole.address, hole.status),
            (HOST6, MappingStatus::Active),
            "{backend}"
        );
        assert_eq!(
            mirror.records().map(|r| r.pinholes),
            Some(ctx.state.pinholes.clone()),
            "{backend}: this host's pinhole is mirrored for the next one"
        );
    }
}

/// `[ha]`, direct mode: a mirrored pinhole opens the target's own address, the same for every
/// host, so the host that takes over renews it instead of replacing it.
#[tokio::test(start_paused = true)]
async fn a_host_that_takes_over_renews_a_mirrored_pinhole_to_a_target() {
    let world = World {
        lab: Lab::answering(&[Backend::Upnp]),
        ..World::default()
    };
    set_dual(&world, vec![web("web", 8080)]);
    let mut books = Books::new();
    let mut direct = config(BackendChoice::Upnp);
    direct.exposure.mode = ExposureMode::Direct;
    let previous = {
        let mut ctx = context(&world, &mut books, direct.clone());
        ctx.pass(Trigger::Cluster).await;
        ctx.state.clone()
    };
    let to_target = format!("8080/tcp [{NODE6}]:38080");
    assert_eq!(world.holes.held(), std::slice::from_ref(&to_target));
    lock(&world.holes.0).calls.clear();
    let (_mirror, mut leadership) = taking_over(previous);
    books.state = State::default();
    let mut ctx = context(&world, &mut books, direct).with_ha(Some(&mut leadership));
    ctx.pass(Trigger::Cluster).await;
    assert_eq!(world.holes.calls(), [format!("renew {to_target}")]);
    assert_eq!(world.holes.held(), [to_target]);
    assert_eq!(
        pinhole(ctx.state, 8080).map(|h| h.status),
        Some(MappingStatus::Active)
    );
}
