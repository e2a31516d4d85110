//! IPv6 pinholes, the pure part (README, "IPv6"): which pinholes the cluster asks for beside
//! the IPv4 mappings ([`desired_pinholes`]), and the plan that opens, renews and closes them
//! ([`plan_pinholes`]). A pinhole belongs to the IPv4 mapping with the same key (Service port,
//! protocol, external port): it is wanted only while that mapping is, so the two are kept and
//! removed together; conflicts and quotas are decided once, on the IPv4 side.
//!
//! Pure and synchronous like `desired` and `plan` (ARCHITECTURE.md, "Data flow"); the requests
//! go out in `router::pinholes`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Service};

use crate::config::{BackendChoice, Config, ExposureMode, Ipv6Choice};
use crate::desired::{denial_message, internal_ips, load_balancer_ip, node_ready};
use crate::model::{
    Backend, Endpoint6, MappingKey, Owner, PortMapping, Problem, ProblemKind, TargetSource,
};
use crate::state::{LeaseTimes, MappingStatus, PinholeRecord, State};
use crate::trust::{HostFacts, forbidden_target6};

/// A pinhole the cluster asks for: where the traffic of one published Service port goes over
/// IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPinhole {
    pub owner: Owner,
    pub service_port: u16,
    /// The key of the IPv4 mapping it goes with.
    pub key: MappingKey,
    pub target: Endpoint6,
    pub source: TargetSource,
}

/// The pinholes the cluster asks for, by the key of their IPv4 mapping, and why some Service
/// ports get none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredPinholes {
    pub pinholes: BTreeMap<MappingKey, DesiredPinhole>,
    pub problems: Vec<Problem>,
}

/// Why IPv6 is not used at all with this config, said once (log, `check-config`); `None`
/// when it may be.
pub fn ipv6_note(config: &Config) -> Option<&'static str> {
    (config.exposure.ipv6 == Ipv6Choice::Auto && config.router.backend == BackendChoice::Natpmp)
        .then_some(NATPMP_HAS_NO_IPV6)
}

/// What holepunch says when the router speaks only NAT-PMP.
pub const NATPMP_HAS_NO_IPV6: &str = "NAT-PMP has no IPv6: Services are published over IPv4 \
only; use router.backend = \"pcp\" or \"upnp\" (or \"auto\") for IPv6 pinholes, or set \
exposure.ipv6 = \"off\" to silence this";

/// What a tenant reads when an IPv6 target is refused: never which rule (the detail says).
const IPV6_NOT_ALLOWED: &str = "no IPv6 pinhole: its IPv6 address is not one holepunch may \
publish (the administrator lists allowed networks in exposure.target_cidrs); it is published \
over IPv4 only";

/// The pinholes for the `mappings` already decided on the IPv4 side, with the trust rules of
/// README "Security model" applied to the IPv6 targets: a LoadBalancer ingress IPv6 address
/// only inside `exposure.target_cidrs`; else, for a mapping that goes to a Ready node's
/// nodePort, that node's IPv6 InternalIP with the same nodePort; never the router, this host
/// (except as a node), link-local, loopback, multicast; a unique local or site-local address
/// only if listed.
/// A Service whose IPv4 target is a load balancer IP and that has no allowed IPv6 ingress gets
/// no pinhole.
pub fn desired_pinholes(
    services: &[Service],
    nodes: &[Node],
    config: &Config,
    host: &HostFacts,
    mappings: &BTreeMap<MappingKey, PortMapping>,
) -> DesiredPinholes {
    let mut out = DesiredPinholes::default();
    if config.exposure.ipv6 == Ipv6Choice::Off {
        return out;
    }
    let node6 = node_ipv6_by_ipv4(nodes);
    let by_owner: BTreeMap<Owner, &Service> = services
        .iter()
        .filter_map(|s| {
            let owner = Owner::new(
                s.metadata.namespace.as_deref()?,
                s.metadata.name.as_deref()?,
            );
            Some((owner, s))
        })
        .collect();
    for (key, mapping) in mappings {
        let Some(service) = by_owner.get(&mapping.owner) else {
            continue;
        };
        let ours_by_class = service
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref())
            == Some(config.kubernetes.load_balancer_class.as_str());
        // NOTE: for holepunch's own class the ingress holds what holepunch wrote there (the
        // router's and this host's addresses): it is not a target, as for IPv4.
        let lb6 = (!ours_by_class)
            .then(|| load_balancer_ip::<Ipv6Addr>(service))
            .flatten();
        let node_target = match mapping.target.source {
            TargetSource::NodePort => node6
                .get(&mapping.target.endpoint.address)
                .map(|ip| Endpoint6::new(*ip, mapping.target.endpoint.port)),
            TargetSource::LoadBalancer => None,
        };
        let service_port = mapping.service_port;
        let refuse = |why: String, kind: ProblemKind, message: String| {
            Problem::new(mapping.owner.clone(), kind, message).with_detail(why)
        };
        let node_checked = node_target.map(|endpoint| {
            let listed = config.exposure.target_allowed6(endpoint.address);
            match forbidden_target6(endpoint.address, host, true, listed) {
                None => Ok(endpoint),
                Some(forbidden) => Err(format!(
                    "node IPv6 address {}: {}",
                    endpoint.address,
                    forbidden.reason()
                )),
            }
        });
        let lb_checked = lb6.map(|ip| {
            let listed = config.exposure.target_allowed6(ip);
            match forbidden_target6(ip, host, false, listed) {
                Some(forbidden) => Err(format!(
                    "load balancer IPv6 address {ip}: {}",
                    forbidden.reason()
                )),
                None if !listed => Err(format!(
                    "load balancer IPv6 address {ip}: it is outside exposure.target_cidrs"
                )),
                None => Ok(Endpoint6::new(ip, service_port)),
            }
        });
        let chosen = match (lb_checked, node_checked) {
            (Some(Ok(endpoint)), _) => Some((endpoint, TargetSource::LoadBalancer)),
            (Some(Err(why)), Some(Ok(endpoint))) => {
                out.problems.push(refuse(
                    why,
                    ProblemKind::TargetFallback,
                    format!(
                        "port {service_port}: its IPv6 load balancer address is not one \
                         holepunch may publish; the IPv6 pinhole goes to a Ready node's \
                         nodePort {} instead",
                        endpoint.port
                    ),
                ));
                Some((endpoint, TargetSource::NodePort))
            }
            (Some(Err(why)), _) | (None, Some(Err(why))) => {
                out.problems.push(refuse(
                    why,
                    ProblemKind::TargetNotAllowed,
                    format!("port {service_port}: {IPV6_NOT_ALLOWED}"),
                ));
                None
            }
            (None, Some(Ok(endpoint))) => Some((endpoint, TargetSource::NodePort)),
            (None, None) => None,
        };
        // Direct mode opens the target's own port, not the external one the port rules
        // checked: a Service remapped to an allowed port must not open a denied one (e.g. 22)
        // over IPv6.
        let chosen = chosen.filter(|(target, _)| {
            let ExposureMode::Direct = config.exposure.mode else {
                return true;
            };
            let Err(denial) = config.ports.check(target.port) else {
                return true;
            };
            out.problems.push(refuse(
                denial_message(target.port, denial),
                ProblemKind::DeniedPort,
                format!(
                    "port {service_port}: in direct mode the IPv6 pinhole opens the target's own \
                     port {}, which the port rules (ports.*) do not allow; published over IPv4 \
                     only",
                    target.port
                ),
            ));
            false
        });
        if let Some((target, source)) = chosen {
            out.pinholes.insert(
                *key,
                DesiredPinhole {
                    owner: mapping.owner.clone(),
                    service_port,
                    key: *key,
                    target,
                    source,
                },
            );
        }
    }
    out.problems.sort();
    out.problems.dedup();
    out
}

/// For each Ready node, its IPv4 InternalIP to its first IPv6 InternalIP: the IPv6 side of
/// the node the IPv4 mapping already chose.
fn node_ipv6_by_ipv4(nodes: &[Node]) -> BTreeMap<std::net::Ipv4Addr, Ipv6Addr> {
    nodes
        .iter()
        .filter(|node| node_ready(node))
        .filter_map(|node| Some((internal_ips(node).next()?, internal_ips(node).next()?)))
        .collect()
}

/// Where pinholes are asked for: the protocol and router in use and, in relay mode, the
/// address of this host they open (then traffic goes on with the ip6 DNAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinholeRoute {
    pub backend: Backend,
    pub router: Ipv6Addr,
    /// Relay mode: this host's global IPv6 address; `None` in direct and gateway mode (the
    /// pinhole opens the target's address).
    pub relay_from: Option<Ipv6Addr>,
    /// Gateway mode (holepunch runs on the router): the target's address is opened on the
    /// external port, and holepunch's own table forwards it to the target's port.
    pub on_external_port: bool,
}

/// This host's global IPv6 address on the interface toward the router, with that address's
/// prefix length: what relay mode opens, and the on-link prefix the ip6 DNAT leaves alone
/// (README, "IPv6"). Found again every pass, so that a new address or prefix moves the
/// pinholes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RelayHost {
    pub address: Ipv6Addr,
    pub prefix_len: u8,
}

/// Relay mode: the addresses that pinholes the plan `actions` close open but that are no
/// longer this host's relay address `host` (the host's address or prefix changed). Those
/// pinholes are closed from that address while the host still holds it (PCP and secure UPnP
/// take requests only from the address a pinhole opens), else left to lapse with their lease.
pub fn former_relay_addresses(
    actions: &[PinholeAction],
    state: &State,
    host: Ipv6Addr,
) -> BTreeSet<Ipv6Addr> {
    actions
        .iter()
        .filter_map(|action| match action {
            PinholeAction::Close { key } => state.pinholes.get(key).map(|r| r.address),
            _ => None,
        })
        .filter(|address| *address != host)
        .collect()
}

/// Why a pinhole is (re)opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenReason {
    New,
    /// Recorded as pending: the request may never have reached the router.
    Unconfirmed,
    Expired,
    RetryDue,
    RouterRestarted,
}

/// One step of the pinhole plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinholeAction {
    /// Save `record` as pending, then ask the router for it.
    Open {
        record: Box<PinholeRecord>,
        reason: OpenReason,
    },
    /// Renew the active pinhole with this key.
    Renew { key: MappingKey },
    /// Delete the pinhole with this key, then forget it.
    Close { key: MappingKey },
}

/// The pinhole record `wanted` asks for through `route`: pending, nothing granted yet.
pub(crate) fn record_for(wanted: &DesiredPinhole, route: &PinholeRoute) -> PinholeRecord {
    let opens = match route.relay_from {
        Some(host) => Endpoint6::new(host, wanted.key.external_port),
        None if route.on_external_port => {
            Endpoint6::new(wanted.target.address, wanted.key.external_port)
        }
        None => wanted.target,
    };
    PinholeRecord {
        owner: wanted.owner.clone(),
        service_port: wanted.service_port,
        protocol: wanted.key.protocol,
        external_port: wanted.key.external_port,
        address: opens.address,
        port: opens.port,
        target_address: wanted.target.address,
        target_port: wanted.target.port,
        target_source: wanted.source,
        backend: route.backend,
        router: route.router,
        nonce: None,
        old_unique_id: None,
        epoch: None,
        times: LeaseTimes::default(),
        status: MappingStatus::Pending,
        retry_at: None,
        failures: 0,
        failure: None,
        last_error: None,
    }
}

/// Whether `record` is the pinhole `want` describes (same owner, opening, target, router).
fn same_pinhole(record: &PinholeRecord, want: &PinholeRecord) -> bool {
    record.owner == want.owner
        && record.service_port == want.service_port
        && record.opens() == want.opens()
        && record.target() == want.target()
        && record.backend == want.backend
        && record.router == want.router
}

/// The plan for the pinholes: close what is no longer wanted (or changed), open what is new,
/// pending, expired, due for a retry or lost by the router (`lost`: a restart, or the IPv4
/// mapping with the same key lost), renew what is due. Closes come first, so that a changed
/// pinhole is deleted before its replacement is asked for.
pub fn plan_pinholes(
    wanted: &DesiredPinholes,
    state: &State,
    route: &PinholeRoute,
    lost: &BTreeSet<MappingKey>,
    now: Timestamp,
) -> Vec<PinholeAction> {
    let mut closes = Vec::new();
    let mut opens = Vec::new();
    let keys: BTreeSet<MappingKey> = wanted
        .pinholes
        .keys()
        .chain(state.pinholes.keys())
        .copied()
        .collect();
    for key in keys {
        let want = wanted.pinholes.get(&key).map(|w| record_for(w, route));
        let have = state.pinholes.get(&key);
        match (have, want) {
            // A close that failed waits for its retry; one the router never made goes now.
            (Some(have), None) => {
                if have.status != MappingStatus::Failed
                    || have.retry_at.is_none_or(|at| at <= now)
                    || never_made(have)
                {
                    closes.push(PinholeAction::Close { key });
                }
            }
            (None, Some(want)) => opens.push(PinholeAction::Open {
                record: Box::new(want),
                reason: OpenReason::New,
            }),
            (Some(have), Some(want)) if !same_pinhole(have, &want) => {
                closes.push(PinholeAction::Close { key });
                opens.push(PinholeAction::Open {
                    record: Box::new(want),
                    reason: OpenReason::New,
                });
            }
            (Some(have), Some(_)) => {
                let due = |at: Option<Timestamp>| at.is_none_or(|at| at <= now);
                let reason = match have.status {
                    MappingStatus::Pending => Some(OpenReason::Unconfirmed),
                    MappingStatus::Failed => due(have.retry_at).then_some(OpenReason::RetryDue),
                    MappingStatus::Active if lost.contains(&key) => {
                        Some(OpenReason::RouterRestarted)
                    }
                    MappingStatus::Active if have.times.expires_at.is_some_and(|at| at <= now) => {
                        Some(OpenReason::Expired)
                    }
                    MappingStatus::Active => {
                        if have.times.renew_at.is_some_and(|at| at <= now) {
                            opens.push(PinholeAction::Renew { key });
                        }
                        None
                    }
                };
                if let Some(reason) = reason {
                    opens.push(PinholeAction::Open {
                        record: Box::new(have.clone()),
                        reason,
                    });
                }
            }
            (None, None) => {}
        }
    }
    closes.extend(opens);
    closes
}

/// Whether the router refused this pinhole before ever granting it: the router holds nothing
/// to close, so an unwanted one leaves the state without a request (a close would be refused
/// again and retried for ever, e.g. miniupnpd's 606 for another host's address in direct
/// mode: README, "IPv6").
pub fn never_made(record: &PinholeRecord) -> bool {
    record.status == MappingStatus::Failed
        && record.failure == Some(crate::state::Failure::Refused)
        && record.times.granted_at.is_none()
}

/// The keys whose IPv4 mapping the IPv4 plan restores because the router lost it (restart,
/// or lost at a verify): their pinholes were lost with it (README, "IPv6").
pub fn lost_with_mappings(actions: &[crate::plan::Action]) -> BTreeSet<MappingKey> {
    use crate::plan::{Action, RestoreReason};
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Restore {
                mapping,
                reason: RestoreReason::RouterRestarted | RestoreReason::RouterLost,
                ..
            } => Some(mapping.key()),
            _ => None,
        })
        .collect()
}

/// For the double-NAT Event (README, "IPv6"): whether the Service port with `key` is still
/// reachable over IPv6 through an open pinhole, as the end of a sentence.
pub fn still_reachable_over_ipv6(state: &State, key: MappingKey) -> String {
    match state
        .pinholes
        .get(&key)
        .filter(|p| p.status == MappingStatus::Active)
    {
        Some(pinhole) => format!("; it is still reachable over IPv6 on {}", pinhole.opens()),
        None => "; no IPv6 pinhole reaches it either".to_owned(),
    }
}

/// When the pinholes next need a pass: the earliest renewal or retry.
pub fn next_due(state: &State) -> Option<Timestamp> {
    state
        .pinholes
        .values()
        .filter_map(|r| match r.status {
            MappingStatus::Active => r.times.renew_at,
            MappingStatus::Failed => r.retry_at,
            MappingStatus::Pending => None,
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::{node, service, with_lb_ip};
    use crate::desired::{Desired, desired};
    use crate::model::Protocol;
    use crate::trust::Holders;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, NodeAddress};

    const ON: (&str, &str) = ("holepunch/punch-external", "true");

    fn dual_node(name: &str, v4: &str, v6: &str) -> Node {
        let mut node = node(name, v4, true);
        if let Some(addresses) = node.status.as_mut().and_then(|s| s.addresses.as_mut()) {
            addresses.push(NodeAddress {
                type_: "InternalIP".into(),
                address: v6.into(),
            });
        }
        node
    }

    /// Adds `ip` to the Service's load balancer ingress.
    fn with_ingress(mut service: Service, ip: &str) -> Service {
        if let Some(ingress) = service
            .status
            .as_mut()
            .and_then(|s| s.load_balancer.as_mut())
            .and_then(|lb| lb.ingress.as_mut())
        {
            ingress.push(LoadBalancerIngress {
                ip: Some(ip.into()),
                ..Default::default()
            });
            service
        } else {
            with_lb_ip(service, ip)
        }
    }

    fn host() -> HostFacts {
        HostFacts {
            own_addresses: ["192.168.1.10", "2001:db8:77::10"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            router_addresses: ["192.168.1.1", "2001:db8:77::1"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            ..HostFacts::default()
        }
    }

    fn config(cidrs: &[&str]) -> Config {
        let mut config = Config::default();
        config.exposure.target_cidrs = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        config
    }

    /// The IPv4 side, then the pinholes beside it.
    fn run(services: &[Service], nodes: &[Node], config: &Config) -> (Desired, DesiredPinholes) {
        let v4 = desired(services, nodes, &[], config, &host(), &Holders::new());
        let v6 = desired_pinholes(services, nodes, config, &host(), &v4.mappings);
        (v4, v6)
    }

    /// (port, target, source) of each pinhole, and (owner, kind, detail) of each problem.
    fn summary(d: &DesiredPinholes) -> (Vec<String>, Vec<(String, ProblemKind, String)>) {
        (
            d.pinholes
                .values()
                .map(|p| format!("{} {} {:?}", p.key, p.target, p.source))
                .collect(),
            d.problems
                .iter()
                .map(|p| {
                    (
                        p.owner.to_string(),
                        p.kind,
                        p.detail.clone().unwrap_or_default(),
                    )
                })
                .collect(),
        )
    }

    fn web(ingress: &[&str]) -> Service {
        let mut s = service("default", "web", 1, &[ON], &[(8080, "TCP", Some(30080))]);
        for ip in ingress {
            s = with_ingress(s, ip);
        }
        s
    }

    #[test]
    fn a_dual_stack_node_port_gets_a_pinhole_to_the_same_nodes_ipv6_address() {
        let nodes = [
            dual_node("b", "192.168.1.21", "2001:db8:77::21"),
            dual_node("a", "192.168.1.20", "2001:db8:77::20"),
        ];
        let (v4, v6) = run(&[web(&[])], &nodes, &config(&[]));
        assert_eq!(v4.mappings.len(), 1);
        assert_eq!(
            summary(&v6),
            (
                vec!["8080/tcp [2001:db8:77::20]:30080 NodePort".into()],
                vec![]
            )
        );
        // exposure.ipv6 = "off": none.
        let mut off = config(&[]);
        off.exposure.ipv6 = Ipv6Choice::Off;
        assert!(run(&[web(&[])], &nodes, &off).1.pinholes.is_empty());
        // An IPv4-only node: none, and no problem.
        let (_, v6) = run(
            &[web(&[])],
            &[node("a", "192.168.1.20", true)],
            &config(&[]),
        );
        assert_eq!(summary(&v6), (vec![], vec![]));
    }

    #[test]
    fn a_dual_stack_load_balancer_gets_a_pinhole_to_its_ipv6_ingress_only_inside_target_cidrs() {
        let nodes = [dual_node("a", "192.168.1.20", "2001:db8:77::20")];
        let lb = web(&["192.168.77.100", "2001:db8:77::240"]);
        let listed = config(&["192.168.77.0/24", "2001:db8:77::240/124"]);
        let (v4, v6) = run(std::slice::from_ref(&lb), &nodes, &listed);
        assert_eq!(v4.mappings.len(), 1);
        assert_eq!(
            summary(&v6),
            (
                vec!["8080/tcp [2001:db8:77::240]:8080 LoadBalancer".into()],
                vec![]
            )
        );
        // An IPv6-only ingress beside a nodePort IPv4 target.
        let (_, v6) = run(
            &[web(&["2001:db8:77::240"])],
            &nodes,
            &config(&["2001:db8:77::240/124"]),
        );
        assert_eq!(
            summary(&v6).0,
            ["8080/tcp [2001:db8:77::240]:8080 LoadBalancer"]
        );
    }

    /// Direct mode opens the target's own port over IPv6: the port rules apply to it, not
    /// only to the external port of the IPv4 mapping.
    #[test]
    fn direct_mode_refuses_a_pinhole_on_a_denied_target_port_and_opens_the_allowed_one() {
        let nodes = [dual_node("a", "192.168.1.20", "2001:db8:77::20")];
        let mut direct = config(&["192.168.77.0/24", "2001:db8:77::240/124"]);
        direct.exposure.mode = ExposureMode::Direct;
        let ssh = with_ingress(
            with_ingress(
                service(
                    "default",
                    "ssh",
                    1,
                    &[ON, ("holepunch.port/22", "2222")],
                    &[(22, "TCP", Some(30022))],
                ),
                "192.168.77.101",
            ),
            "2001:db8:77::241",
        );
        let web = web(&["192.168.77.100", "2001:db8:77::240"]);
        let (v4, v6) = run(&[ssh, web], &nodes, &direct);
        assert_eq!(v4.mappings.len(), 2, "both are published over IPv4");
        let (pinholes, problems) = summary(&v6);
        assert_eq!(pinholes, ["8080/tcp [2001:db8:77::240]:8080 LoadBalancer"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].0.as_str(), problems[0].1),
            ("default/ssh", ProblemKind::DeniedPort)
        );
        assert!(problems[0].2.contains("port 22"), "{problems:?}");
    }

    /// One case per IPv6 target that must be refused, each run beside a normal Service that
    /// is published in the same run.
    #[test]
    fn refused_ipv6_targets_table() {
        // The normal Service: its IPv6 load balancer address inside target_cidrs.
        let normal = with_ingress(
            service("ok", "normal", 1, &[ON], &[(9090, "TCP", Some(30090))]),
            "2001:db8:55::5",
        );
        for (name, ingress, node6, cidrs, kind, detail) in [
            (
                "the router's IPv6 address as LB ingress",
                Some("2001:db8:77::1"),
                None,
                vec!["2001:db8:77::/64"],
                ProblemKind::TargetNotAllowed,
                "it is an address of the router",
            ),
            (
                "this host's IPv6 address as LB ingress",
                Some("2001:db8:77::10"),
                None,
                vec!["2001:db8:77::/64"],
                ProblemKind::TargetNotAllowed,
                "it is an address of the holepunch host",
            ),
            (
                "a link-local LB ingress",
                Some("fe80::5"),
                None,
                vec!["fe80::/10"],
                ProblemKind::TargetNotAllowed,
                "link-local",
            ),
            (
                "a loopback LB ingress",
                Some("::1"),
                None,
                vec!["::/0"],
                ProblemKind::TargetNotAllowed,
                "loopback",
            ),
            (
                "a multicast LB ingress",
                Some("ff05::2"),
                None,
                vec!["::/0"],
                ProblemKind::TargetNotAllowed,
                "multicast",
            ),
            (
                "an LB ingress outside target_cidrs",
                Some("2001:db8:99::5"),
                None,
                vec!["2001:db8:77::/64"],
                ProblemKind::TargetNotAllowed,
                "outside exposure.target_cidrs",
            ),
            (
                "a refused LB ingress falls back to the node's IPv6 nodePort",
                Some("2001:db8:77::1"),
                Some("2001:db8:77::20"),
                vec!["2001:db8:77::/64"],
                ProblemKind::TargetFallback,
                "it is an address of the router",
            ),
            (
                "a unique local node address not listed",
                None,
                Some("fd00:77::20"),
                vec![],
                ProblemKind::TargetNotAllowed,
                "unique local",
            ),
            (
                "a deprecated site-local node address not listed",
                None,
                Some("fec0:77::20"),
                vec![],
                ProblemKind::TargetNotAllowed,
                "site-local",
            ),
            (
                "a link-local node address",
                None,
                Some("fe80::20"),
                vec!["fe80::/10"],
                ProblemKind::TargetNotAllowed,
                "link-local",
            ),
            (
                "the router's address as a node's",
                None,
                Some("2001:db8:77::1"),
                vec![],
                ProblemKind::TargetNotAllowed,
                "it is an address of the router",
            ),
        ] {
            let refused = web(&ingress.into_iter().collect::<Vec<_>>());
            let nodes = match node6 {
                Some(v6) => vec![dual_node("n", "192.168.1.20", v6)],
                None => vec![node("n", "192.168.1.20", true)],
            };
            let mut cidrs = cidrs;
            cidrs.push("2001:db8:55::/64");
            let (v4, v6) = run(&[refused, normal.clone()], &nodes, &config(&cidrs));
            assert_eq!(v4.mappings.len(), 2, "{name}: the IPv4 side is unchanged");
            let (pinholes, problems) = summary(&v6);
            assert_eq!(problems.len(), 1, "{name}: {problems:?}");
            let (owner, got_kind, got_detail) = &problems[0];
            assert_eq!(owner, "default/web", "{name}");
            assert_eq!(*got_kind, kind, "{name}");
            assert!(got_detail.contains(detail), "{name}: {got_detail}");
            let message = &v6.problems[0].message;
            for secret in ["2001:db8", "fe80", "fd00", "fec0", "::1", "ff05"] {
                assert!(!message.contains(secret), "{name}: {message}");
            }
            assert!(
                pinholes.contains(&"9090/tcp [2001:db8:55::5]:9090 LoadBalancer".to_owned()),
                "{name}: the normal Service in the same run: {pinholes:?}"
            );
            if kind == ProblemKind::TargetFallback {
                assert_eq!(
                    pinholes[0], "8080/tcp [2001:db8:77::20]:30080 NodePort",
                    "{name}"
                );
            } else {
                assert!(
                    !pinholes.iter().any(|p| p.starts_with("8080/")),
                    "{name}: {pinholes:?}"
                );
            }
        }
        // The normal case of the same table: a listed LB ingress and a node's global address.
        let nodes = [dual_node("n", "192.168.1.20", "2001:db8:77::20")];
        let (_, v6) = run(
            &[web(&["2001:db8:77::240"]), normal],
            &nodes,
            &config(&["2001:db8:77::/64", "2001:db8:55::/64"]),
        );
        assert_eq!(
            summary(&v6),
            (
                vec![
                    "8080/tcp [2001:db8:77::240]:8080 LoadBalancer".into(),
                    "9090/tcp [2001:db8:55::5]:9090 LoadBalancer".into()
                ],
                vec![]
            )
        );
        // A unique local node address is a target once listed.
        let nodes = [dual_node("n", "192.168.1.20", "fd00:77::20")];
        let (_, v6) = run(&[web(&[])], &nodes, &config(&["fd00:77::/64"]));
        assert_eq!(summary(&v6).0, ["8080/tcp [fd00:77::20]:30080 NodePort"]);
        // So is a site-local one.
        let nodes = [dual_node("n", "192.168.1.20", "fec0:77::20")];
        let (_, v6) = run(&[web(&[])], &nodes, &config(&["fec0:77::/64"]));
        assert_eq!(summary(&v6).0, ["8080/tcp [fec0:77::20]:30080 NodePort"]);
    }

    const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);
    const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
    const RELAY: PinholeRoute = PinholeRoute {
        backend: Backend::Pcp,
        router: ROUTER6,
        relay_from: Some(HOST6),
        on_external_port: false,
    };

    fn wanted(ports: &[u16]) -> DesiredPinholes {
        DesiredPinholes {
            pinholes: ports
                .iter()
                .map(|&port| {
                    let key = MappingKey {
                        protocol: Protocol::Tcp,
                        external_port: port,
                    };
                    let pinhole = DesiredPinhole {
                        owner: Owner::new("default", "web"),
                        service_port: port,
                        key,
                        target: Endpoint6::new("2001:db8:77::20".parse().expect("ip"), 30000),
                        source: TargetSource::NodePort,
                    };
                    (key, pinhole)
                })
                .collect(),
            problems: vec![],
        }
    }

    fn verbs(actions: &[PinholeAction]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                PinholeAction::Open { record, reason } => {
                    format!(
                        "open {} {} {reason:?}",
                        record.external_port,
                        record.opens()
                    )
                }
                PinholeAction::Renew { key } => format!("renew {}", key.external_port),
                PinholeAction::Close { key } => format!("close {}", key.external_port),
            })
            .collect()
    }

    /// Records in `state` the relay pinhole the plan opens for 8080, as granted at `now`.
    fn grant_relayed_8080(
        state: &mut State,
        now: Timestamp,
        renew_at: Timestamp,
        expires_at: Timestamp,
    ) {
        let plan = plan_pinholes(&wanted(&[8080]), state, &RELAY, &BTreeSet::new(), now);
        let Some(PinholeAction::Open { record, .. }) = plan.first() else {
            panic!("open expected: {plan:?}");
        };
        let mut record = (**record).clone();
        record.status = MappingStatus::Active;
        record.times.renew_at = Some(renew_at);
        record.times.expires_at = Some(expires_at);
        state.pinholes.insert(record.key(), record);
    }

    #[test]
    fn the_plan_opens_renews_restores_and_closes_with_the_ipv4_mapping() {
        let now = Timestamp::from_second(1_000_000).expect("time");
        let later = |secs: i64| Timestamp::from_second(1_000_000 + secs).expect("time");
        let mut state = State::default();
        let none = BTreeSet::new();
        let all: BTreeSet<MappingKey> = wanted(&[8080]).pinholes.keys().copied().collect();
        // New: relay opens this host's address on the external port.
        let plan = plan_pinholes(&wanted(&[8080]), &state, &RELAY, &none, now);
        assert_eq!(verbs(&plan), ["open 8080 [2001:db8:77::10]:8080 New"]);
        // Direct opens the target.
        let direct = PinholeRoute {
            relay_from: None,
            ..RELAY
        };
        let plan = plan_pinholes(&wanted(&[8080]), &state, &direct, &none, now);
        assert_eq!(verbs(&plan), ["open 8080 [2001:db8:77::20]:30000 New"]);
        // Gateway (on the router) opens the target's address on the external port.
        let gateway = PinholeRoute {
            backend: Backend::None,
            router: Ipv6Addr::UNSPECIFIED,
            relay_from: None,
            on_external_port: true,
        };
        let plan = plan_pinholes(&wanted(&[8080]), &state, &gateway, &none, now);
        assert_eq!(verbs(&plan), ["open 8080 [2001:db8:77::20]:8080 New"]);

        grant_relayed_8080(&mut state, now, later(300), later(600));
        // Granted and not due: nothing.
        assert!(plan_pinholes(&wanted(&[8080]), &state, &RELAY, &none, now).is_empty());
        // Due: renewed; expired: opened again; router restarted: opened again.
        assert_eq!(
            verbs(&plan_pinholes(
                &wanted(&[8080]),
                &state,
                &RELAY,
                &none,
                later(300)
            )),
            ["renew 8080"]
        );
        assert_eq!(
            verbs(&plan_pinholes(
                &wanted(&[8080]),
                &state,
                &RELAY,
                &none,
                later(600)
            )),
            ["open 8080 [2001:db8:77::10]:8080 Expired"]
        );
        assert_eq!(
            verbs(&plan_pinholes(&wanted(&[8080]), &state, &RELAY, &all, now)),
            ["open 8080 [2001:db8:77::10]:8080 RouterRestarted"]
        );
        // The IPv4 mapping is no longer wanted, so neither is its pinhole: closed.
        assert_eq!(
            verbs(&plan_pinholes(&wanted(&[]), &state, &RELAY, &none, now)),
            ["close 8080"]
        );
        // A changed target: the old one closed before the new one is opened.
        assert_eq!(
            verbs(&plan_pinholes(
                &wanted(&[8080]),
                &state,
                &direct,
                &none,
                now
            )),
            ["close 8080", "open 8080 [2001:db8:77::20]:30000 New"]
        );
        assert_eq!(next_due(&state), Some(later(300)));

        // A close that failed waits for its retry, then is tried again.
        if let Some(record) = state.pinholes.values_mut().next() {
            record.status = MappingStatus::Failed;
            record.retry_at = Some(later(60));
        }
        assert!(plan_pinholes(&wanted(&[]), &state, &RELAY, &none, now).is_empty());
        assert_eq!(
            verbs(&plan_pinholes(
                &wanted(&[]),
                &state,
                &RELAY,
                &none,
                later(60)
            )),
            ["close 8080"]
        );
        // A pinhole the router refused before granting it: closed now, not at its retry.
        if let Some(record) = state.pinholes.values_mut().next() {
            record.failure = Some(crate::state::Failure::Refused);
            record.times.granted_at = None;
        }
        assert_eq!(
            verbs(&plan_pinholes(&wanted(&[]), &state, &RELAY, &none, now)),
            ["close 8080"]
        );
        // A failed open is retried when its backoff is over, not before.
        assert!(plan_pinholes(&wanted(&[8080]), &state, &RELAY, &none, now).is_empty());
        assert_eq!(
            verbs(&plan_pinholes(
                &wanted(&[8080]),
                &state,
                &RELAY,
                &none,
                later(60)
            )),
            ["open 8080 [2001:db8:77::10]:8080 RetryDue"]
        );
    }

    /// A new address of this host (the ISP renumbered): the pinhole to the former address is
    /// closed before the one to the new address is opened, and the former address is the one
    /// to close it from.
    #[test]
    fn a_new_relay_address_closes_the_old_pinhole_and_opens_one_to_the_new() {
        let now = Timestamp::from_second(1_000_000).expect("time");
        let later = Timestamp::from_second(1_000_300).expect("time");
        let none = BTreeSet::new();
        let mut state = State::default();
        grant_relayed_8080(&mut state, now, later, later);
        // The same address: nothing to do, nothing to close from elsewhere.
        let same = plan_pinholes(&wanted(&[8080]), &state, &RELAY, &none, now);
        assert!(same.is_empty());
        assert!(former_relay_addresses(&same, &state, HOST6).is_empty());
        // Renumbered into 2001:db8:88::/64.
        let new6: Ipv6Addr = "2001:db8:88::10".parse().expect("ip");
        let moved = PinholeRoute {
            relay_from: Some(new6),
            ..RELAY
        };
        let plan = plan_pinholes(&wanted(&[8080]), &state, &moved, &none, now);
        assert_eq!(
            verbs(&plan),
            ["close 8080", "open 8080 [2001:db8:88::10]:8080 New"]
        );
        assert_eq!(
            former_relay_addresses(&plan, &state, new6),
            BTreeSet::from([HOST6])
        );
    }

    #[test]
    fn natpmp_with_ipv6_auto_is_noted_and_other_backends_are_not() {
        let mut config = Config::default();
        assert_eq!(ipv6_note(&config), None);
        config.router.backend = BackendChoice::Natpmp;
        assert_eq!(ipv6_note(&config), Some(NATPMP_HAS_NO_IPV6));
        config.exposure.ipv6 = Ipv6Choice::Off;
        assert_eq!(ipv6_note(&config), None);
    }
}
