//! What the cluster asks for: Services + Nodes + EndpointSlices + Config -> the port mappings
//! that should exist, and the problems that keep some Service ports from being published.
//!
//! Pure and synchronous (ARCHITECTURE.md, "Data flow"): no sockets, files, clocks or environment.
//! Annotations are untrusted input: every value is parsed strictly and size-limited, and a bad
//! one becomes a [`Problem`] on its Service while every other Service goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::{Config, ExposureMode, PortDenial};
use crate::model::{
    Endpoint, MappingKey, Owner, PortMapping, Problem, ProblemKind, Protocol, Target, TargetSource,
};
use crate::trust::{Holders, HostFacts, forbidden_target};

/// Prefix of the per-port remap annotation: `holepunch.port/<servicePort>: "<externalPort>"`.
pub const PORT_ANNOTATION_PREFIX: &str = "holepunch.port/";

/// Longest annotation value holepunch reads; anything longer is refused unread.
pub const MAX_ANNOTATION_VALUE_BYTES: usize = 64;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The mappings the cluster asks for, one per slot of the router's port space, and the
/// problems found on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub mappings: BTreeMap<MappingKey, PortMapping>,
    pub problems: Vec<Problem>,
}

/// Whether a mapping in `mode` can shadow a port this host (relay) or the router (gateway)
/// listens on, so that the desired state refuses it ([`HostFacts::listening`]); in direct
/// mode traffic goes to the target, never to this host.
pub fn shadows_host_listeners(mode: ExposureMode) -> bool {
    matches!(mode, ExposureMode::Relay | ExposureMode::Gateway)
}

/// Computes the desired mappings for the whole cluster at once: the router's port space is
/// shared, so conflicts between Services are decided here, deterministically.
///
/// The trust rules (README, "Security model") are applied here: a target is never an
/// address of the router or of this host (`host`), a LoadBalancer IP only inside
/// `exposure.target_cidrs` (else a Ready node's nodePort, when the Service has one), a
/// published port never one a socket on this host (relay) or on the router (gateway)
/// listens on, and the quotas of `[ports]` hold.
///
/// When two Service ports want the same external port and protocol, the one that holds it
/// (an active or pending mapping in the state, `holders`) keeps it, as long as it still asks
/// for it; between claims for a port nobody holds, the Service created first wins (ties: the
/// lower `namespace/name`, then the lower service port). Every loser gets a
/// [`ProblemKind::PortConflict`] that does not say who won (the detail does).
///
/// Quotas: each Service gets its lowest `ports.max_per_service` service ports; then, in the
/// order above (holders first), mappings are granted until `ports.max_per_namespace` or
/// `ports.max_total` is reached; the rest are refused with [`ProblemKind::OverQuota`].
///
/// A nodePort target is the Ready node with the lowest name; for a Service with
/// `externalTrafficPolicy: Local`, only among the nodes that host a ready endpoint of it
/// (from `endpoint_slices`).
pub fn desired(
    services: &[Service],
    nodes: &[Node],
    endpoint_slices: &[EndpointSlice],
    config: &Config,
    host: &HostFacts,
    holders: &Holders,
) -> Desired {
    let ready = ready_nodes(nodes);
    let hosting = nodes_hosting_ready_endpoints(endpoint_slices);
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut problems = Vec::new();

    for service in services {
        let node_target = if traffic_stays_local(service) {
            let owner = (
                service.metadata.namespace.as_deref().unwrap_or_default(),
                service.metadata.name.as_deref().unwrap_or_default(),
            );
            let hosts = hosting.get(&owner);
            NodeTarget::Local(
                ready
                    .iter()
                    .find(|(node, _)| hosts.is_some_and(|h| h.contains(node)))
                    .map(|(_, ip)| *ip),
            )
        } else {
            NodeTarget::Any(ready.first().map(|(_, ip)| *ip))
        };
        let context = Context {
            config,
            host,
            node_target,
        };
        collect_service(service, &context, &mut candidates, &mut problems);
    }

    let candidates = per_service_quota(candidates, config.ports.max_per_service, &mut problems);
    let mut sorted: Vec<(bool, Candidate)> = candidates
        .into_iter()
        .map(|c| {
            let holds = holders.get(&c.mapping.key()) == Some(&c.mapping.owner);
            (!holds, c)
        })
        .collect();
    sorted.sort_by(|(a_new, a), (b_new, b)| {
        (*a_new, a.created, &a.mapping.owner, a.order()).cmp(&(
            *b_new,
            b.created,
            &b.mapping.owner,
            b.order(),
        ))
    });
    let mut mappings: BTreeMap<MappingKey, PortMapping> = BTreeMap::new();
    let mut per_namespace: BTreeMap<String, u32> = BTreeMap::new();
    let mut over: BTreeMap<(Owner, Limit), Vec<MappingKey>> = BTreeMap::new();
    for (not_holder, candidate) in sorted {
        let key = candidate.mapping.key();
        let owner = &candidate.mapping.owner;
        if let Some(winner) = mappings.get(&key) {
            let why = if not_holder && holders.get(&key) == Some(&winner.owner) {
                "it holds the live mapping"
            } else {
                "it was created earlier"
            };
            problems.push(
                Problem::new(
                    owner.clone(),
                    ProblemKind::PortConflict,
                    format!(
                        "external port {key} is held by another Service; choose another port \
                         with the annotation {PORT_ANNOTATION_PREFIX}{}",
                        candidate.mapping.service_port
                    ),
                )
                .with_detail(format!(
                    "held by {} (service port {}): {why}",
                    winner.owner, winner.service_port
                )),
            );
            continue;
        }
        let in_namespace = per_namespace.entry(owner.namespace.clone()).or_default();
        let limit = if *in_namespace >= config.ports.max_per_namespace {
            Some(Limit::Namespace)
        } else if mappings.len() >= usize::try_from(config.ports.max_total).unwrap_or(usize::MAX) {
            Some(Limit::Total)
        } else {
            None
        };
        if let Some(limit) = limit {
            over.entry((owner.clone(), limit)).or_default().push(key);
            continue;
        }
        *in_namespace += 1;
        mappings.insert(key, candidate.mapping);
    }
    for ((owner, limit), keys) in over {
        let most = match limit {
            Limit::Service => config.ports.max_per_service,
            Limit::Namespace => config.ports.max_per_namespace,
            Limit::Total => config.ports.max_total,
        };
        problems.push(over_quota(owner, limit, most, &keys));
    }
    problems.sort();
    problems.dedup();
    Desired { mappings, problems }
}

/// Which quota of `[ports]` a mapping ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Limit {
    Service,
    Namespace,
    Total,
}

/// Keeps each Service's lowest `max` service ports; the rest become one problem per Service.
fn per_service_quota(
    mut candidates: Vec<Candidate>,
    max: u32,
    problems: &mut Vec<Problem>,
) -> Vec<Candidate> {
    candidates.sort_by(|a, b| (&a.mapping.owner, a.order()).cmp(&(&b.mapping.owner, b.order())));
    let mut kept = Vec::with_capacity(candidates.len());
    let mut over: BTreeMap<Owner, Vec<MappingKey>> = BTreeMap::new();
    let mut count = 0u32;
    let mut current: Option<Owner> = None;
    for candidate in candidates {
        if current.as_ref() != Some(&candidate.mapping.owner) {
            current = Some(candidate.mapping.owner.clone());
            count = 0;
        }
        count += 1;
        if count > max {
            over.entry(candidate.mapping.owner.clone())
                .or_default()
                .push(candidate.mapping.key());
        } else {
            kept.push(candidate);
        }
    }
    for (owner, keys) in over {
        problems.push(over_quota(owner, Limit::Service, max, &keys));
    }
    kept
}

/// Longest list of refused ports an over-quota message spells out.
const SHOWN_REFUSED_PORTS: usize = 5;

/// One problem for all the ports of `owner` refused by `limit` (`most` ports): the Event
/// names the limit and the key that raises it.
fn over_quota(owner: Owner, limit: Limit, most: u32, keys: &[MappingKey]) -> Problem {
    let mut shown: Vec<String> = keys
        .iter()
        .take(SHOWN_REFUSED_PORTS)
        .map(ToString::to_string)
        .collect();
    if keys.len() > SHOWN_REFUSED_PORTS {
        shown.push(format!("and {} more", keys.len() - SHOWN_REFUSED_PORTS));
    }
    let (rule, key) = match limit {
        Limit::Service => (
            format!("a Service gets at most {most} ports, its lowest service ports"),
            "ports.max_per_service",
        ),
        Limit::Namespace => (
            format!(
                "the Services of namespace {} get at most {most} ports together",
                owner.namespace
            ),
            "ports.max_per_namespace",
        ),
        Limit::Total => (
            format!("holepunch publishes at most {most} ports in all"),
            "ports.max_total",
        ),
    };
    Problem::new(
        owner,
        ProblemKind::OverQuota,
        format!(
            "{} external port(s) not published ({}): {rule}; publish fewer ports, or ask the \
             administrator to raise {key}",
            keys.len(),
            shown.join(", ")
        ),
    )
}

/// A mapping one Service asks for, before conflicts between Services are decided.
struct Candidate {
    /// `None` sorts first: a Service without a creation time is treated as oldest, which only
    /// happens with hand-written input (`plan --from-file`).
    created: Option<Timestamp>,
    port_index: usize,
    mapping: PortMapping,
}

impl Candidate {
    /// Order within one Service: the lowest service port first.
    fn order(&self) -> (u16, Protocol, usize) {
        (
            self.mapping.service_port,
            self.mapping.protocol,
            self.port_index,
        )
    }
}

/// The node address a Service's nodePort traffic would go to.
#[derive(Clone, Copy)]
enum NodeTarget {
    /// The first Ready node.
    Any(Option<Ipv4Addr>),
    /// `externalTrafficPolicy: Local`: the first Ready node that hosts a ready endpoint.
    Local(Option<Ipv4Addr>),
}

/// What every Service port of one Service is checked against.
struct Context<'a> {
    config: &'a Config,
    host: &'a HostFacts,
    node_target: NodeTarget,
}

/// What a tenant reads when its load balancer IP is not a target: never which rule (the
/// address may be the router's or another LAN device's; the detail says).
const LB_IP_NOT_ALLOWED: &str = "its load balancer IP is not an address holepunch may publish \
     (the administrator lists allowed networks in exposure.target_cidrs)";

fn collect_service(
    service: &Service,
    context: &Context<'_>,
    candidates: &mut Vec<Candidate>,
    problems: &mut Vec<Problem>,
) {
    let Context {
        config,
        host,
        node_target,
    } = *context;
    let (Some(namespace), Some(name)) = (&service.metadata.namespace, &service.metadata.name)
    else {
        return;
    };
    let owner = Owner::new(namespace.as_str(), name.as_str());
    // Problems that carry an operator's detail; added to `problems` at the end.
    let mut detailed: Vec<Problem> = Vec::new();
    let mut report =
        |kind, message: String| problems.push(Problem::new(owner.clone(), kind, message));

    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let spec = service.spec.clone().unwrap_or_default();
    let ours_by_class =
        spec.load_balancer_class.as_deref() == Some(config.kubernetes.load_balancer_class.as_str());

    let opted_in = match annotations.get(&config.kubernetes.annotation) {
        None => false,
        Some(value) => match value.as_str() {
            "true" => true,
            "false" => false,
            other => {
                report(
                    ProblemKind::InvalidAnnotation,
                    format!(
                        "annotation {} must be \"true\" or \"false\", not {}",
                        config.kubernetes.annotation,
                        quote_untrusted(other)
                    ),
                );
                false
            }
        },
    };
    if !(opted_in || ours_by_class) || !config.kubernetes.namespace_allowed(namespace) {
        return;
    }

    let ports = spec.ports.unwrap_or_default();
    let remaps = parse_remaps(&annotations, &ports, &mut report);
    let lb_ip = if ours_by_class {
        // NOTE: for Services of holepunch's own class, status.loadBalancer.ingress holds the
        // router's external address that holepunch wrote there: it is not a target.
        None
    } else {
        load_balancer_ip(service)
    };
    // Why the load balancer IP may not be a target, for the operator (README, "Security
    // model"): never the router or this host, and only inside exposure.target_cidrs.
    let lb_refusal = lb_ip.and_then(|ip| {
        let why = match forbidden_target(ip, host, false) {
            Some(forbidden) => forbidden.reason(),
            None if !config.exposure.target_allowed(ip) => {
                "it is outside exposure.target_cidrs (a MetalLB, kube-vip or Cilium pool must \
                 be listed there)"
            }
            None => return None,
        };
        Some(format!("load balancer IP {ip}: {why}"))
    });
    let node_ip = match node_target {
        NodeTarget::Any(ip) | NodeTarget::Local(ip) => ip,
    };
    let node_refusal = node_ip
        .and_then(|ip| forbidden_target(ip, host, true).map(|f| (ip, f)))
        .map(|(ip, forbidden)| format!("node address {ip}: {}", forbidden.reason()));
    let shadow_checked = shadows_host_listeners(config.exposure.mode);

    for (port_index, port) in ports.iter().enumerate() {
        let Ok(service_port) = u16::try_from(port.port) else {
            continue;
        };
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let protocol = match protocol_name.parse::<Protocol>() {
            Ok(protocol) => protocol,
            Err(e) => {
                report(
                    ProblemKind::UnsupportedProtocol,
                    format!("port {service_port}: {e}"),
                );
                continue;
            }
        };
        let external_port = match remaps.get(&service_port) {
            Some(Remap::To(external)) => *external,
            Some(Remap::Invalid) => continue,
            None => service_port,
        };
        if let Err(denial) = config.ports.check(external_port) {
            report(
                ProblemKind::DeniedPort,
                denial_message(external_port, denial),
            );
            continue;
        }
        if shadow_checked && host.listening.contains(&(protocol, external_port)) {
            let (who, mode) = match config.exposure.mode {
                ExposureMode::Gateway => ("the router", "gateway"),
                _ => ("the host holepunch runs on", "relay"),
            };
            detailed.push(
                Problem::new(
                    owner.clone(),
                    ProblemKind::PortInUse,
                    format!(
                        "external port {external_port}/{protocol} is in use by a program on \
                         {who}; publishing it would expose or replace that program; pick \
                         another external port with a {PORT_ANNOTATION_PREFIX}{service_port} \
                         annotation"
                    ),
                )
                .with_detail(format!(
                    "{mode} mode: a socket listens on {external_port}/{protocol} on this host \
                     (wildcard or LAN address)"
                )),
            );
            continue;
        }
        let node_port = port.node_port.and_then(|p| u16::try_from(p).ok());
        let node_endpoint = match (node_ip, node_port, &node_refusal) {
            (Some(ip), Some(node_port), None) => Some(Endpoint::new(ip, node_port)),
            _ => None,
        };
        let target = match (lb_ip, &lb_refusal) {
            (Some(ip), None) => Target {
                endpoint: Endpoint::new(ip, service_port),
                source: TargetSource::LoadBalancer,
            },
            (Some(_), Some(why)) => {
                let Some(endpoint) = node_endpoint else {
                    detailed.push(
                        Problem::new(
                            owner.clone(),
                            ProblemKind::TargetNotAllowed,
                            format!(
                                "port {service_port}: {LB_IP_NOT_ALLOWED}, and no Ready node's \
                                 nodePort can take its place; give the Service a nodePort \
                                 (type LoadBalancer or NodePort), or ask the administrator to \
                                 list the load balancer's pool in exposure.target_cidrs"
                            ),
                        )
                        .with_detail(why.clone()),
                    );
                    continue;
                };
                detailed.push(
                    Problem::new(
                        owner.clone(),
                        ProblemKind::TargetFallback,
                        format!(
                            "port {service_port}: {LB_IP_NOT_ALLOWED}; published through a \
                             Ready node's nodePort {} instead",
                            endpoint.port
                        ),
                    )
                    .with_detail(why.clone()),
                );
                Target {
                    endpoint,
                    source: TargetSource::NodePort,
                }
            }
            (None, _) => match (node_endpoint, node_ip, port.node_port) {
                (Some(endpoint), _, _) => Target {
                    endpoint,
                    source: TargetSource::NodePort,
                },
                (None, Some(_), Some(_)) => {
                    let Some(why) = &node_refusal else {
                        // A nodePort outside 0..=65535: the API server never sends one.
                        continue;
                    };
                    detailed.push(
                        Problem::new(
                            owner.clone(),
                            ProblemKind::TargetNotAllowed,
                            format!(
                                "port {service_port}: the Ready node's address is not one \
                                 holepunch may publish; ask the administrator"
                            ),
                        )
                        .with_detail(why.clone()),
                    );
                    continue;
                }
                (None, None, Some(_)) => {
                    let message = match node_target {
                        NodeTarget::Local(_) => format!(
                            "port {service_port}: externalTrafficPolicy is Local and no Ready \
                             node hosts a ready endpoint of this Service; wait for its pods to \
                             be ready, or use externalTrafficPolicy: Cluster"
                        ),
                        NodeTarget::Any(_) => format!(
                            "port {service_port}: no node is Ready to receive its nodePort \
                             traffic"
                        ),
                    };
                    report(ProblemKind::NoTarget, message);
                    continue;
                }
                (None, _, None) => {
                    report(
                        ProblemKind::NoTarget,
                        format!(
                            "port {service_port} has no load balancer IP and no nodePort; make \
                             the Service type NodePort or LoadBalancer"
                        ),
                    );
                    continue;
                }
            },
        };
        candidates.push(Candidate {
            created: service.metadata.creation_timestamp.as_ref().map(|t| t.0),
            port_index,
            mapping: PortMapping {
                owner: owner.clone(),
                service_port,
                protocol,
                external_port,
                target,
            },
        });
    }
    problems.extend(detailed);
}

/// A `holepunch.port/<servicePort>` annotation, after parsing.
enum Remap {
    To(u16),
    /// Present but unusable: the port is not published rather than published on a port the
    /// user did not ask for.
    Invalid,
}

/// Reads every `holepunch.port/*` annotation, keyed by service port number.
fn parse_remaps(
    annotations: &BTreeMap<String, String>,
    ports: &[ServicePort],
    report: &mut impl FnMut(ProblemKind, String),
) -> BTreeMap<u16, Remap> {
    let mut remaps = BTreeMap::new();
    for (key, value) in annotations {
        let Some(selector) = key.strip_prefix(PORT_ANNOTATION_PREFIX) else {
            continue;
        };
        // The selector is a port number or a port name of this Service.
        let port = ports
            .iter()
            .find(|p| selector == p.port.to_string() || p.name.as_deref() == Some(selector));
        let Some(service_port) = port.and_then(|p| u16::try_from(p.port).ok()) else {
            report(
                ProblemKind::InvalidAnnotation,
                format!(
                    "annotation {key} names no port of this Service; use one of: {}",
                    ports
                        .iter()
                        .map(|p| p.port.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        };
        let remap = match parse_port(value) {
            Ok(external) => Remap::To(external),
            Err(why) => {
                report(
                    ProblemKind::InvalidAnnotation,
                    format!(
                        "annotation {key}: {why}; write the external port as a number from 1 to \
                         65535, e.g. \"{service_port}\""
                    ),
                );
                Remap::Invalid
            }
        };
        remaps.insert(service_port, remap);
    }
    remaps
}

/// Strict port parsing: ASCII digits only, no sign, no spaces, no leading zero, 1..=65535.
fn parse_port(value: &str) -> Result<u16, String> {
    if value.len() > MAX_ANNOTATION_VALUE_BYTES {
        return Err(format!(
            "value is {} bytes long (at most {MAX_ANNOTATION_VALUE_BYTES})",
            value.len()
        ));
    }
    let valid = !value.is_empty()
        && value.len() <= 5
        && value.bytes().all(|b| b.is_ascii_digit())
        && !value.starts_with('0');
    match value.parse::<u16>() {
        Ok(port) if valid => Ok(port),
        _ => Err(format!("{} is not a port number", quote_untrusted(value))),
    }
}

/// Quotes an untrusted value for a message: escaped, and cut short if long.
fn quote_untrusted(value: &str) -> String {
    const SHOWN_CHARS: usize = 32;
    let shown: String = value.chars().take(SHOWN_CHARS).collect();
    if shown.len() < value.len() {
        format!("{shown:?}... ({} bytes)", value.len())
    } else {
        format!("{shown:?}")
    }
}

pub(crate) fn denial_message(port: u16, denial: PortDenial) -> String {
    match denial {
        PortDenial::Denied(range) => format!(
            "external port {port} is on the deny list ({range} in ports.deny): it is not safe to \
             expose; pick another external port with a {PORT_ANNOTATION_PREFIX}<port> annotation"
        ),
        PortDenial::BelowPrivileged => format!(
            "external port {port} is below 1024; the administrator must set \
             ports.allow_below_1024 = true, or pick a port from 1024 up with a \
             {PORT_ANNOTATION_PREFIX}<port> annotation"
        ),
        PortDenial::NotAllowed => format!(
            "external port {port} is outside the allowed ranges (ports.allow); pick an allowed \
             port with a {PORT_ANNOTATION_PREFIX}<port> annotation"
        ),
    }
}

/// The first address of family `A` (`Ipv4Addr` or `Ipv6Addr`) in
/// `status.loadBalancer.ingress`.
pub(crate) fn load_balancer_ip<A: std::str::FromStr>(service: &Service) -> Option<A> {
    service
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|ingress| ingress.ip.as_deref()?.parse().ok())
}

/// Whether the node's Ready condition is True.
pub(crate) fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The node's InternalIPs of family `A` (`Ipv4Addr` or `Ipv6Addr`), in the order listed.
pub(crate) fn internal_ips<A: std::str::FromStr>(node: &Node) -> impl Iterator<Item = A> + '_ {
    node.status
        .as_ref()
        .and_then(|status| status.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
}

/// Whether the Service keeps external traffic on the node it arrives at.
fn traffic_stays_local(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.external_traffic_policy.as_deref())
        == Some("Local")
}

/// For each Service, by (namespace, name), the nodes that host at least one ready endpoint.
fn nodes_hosting_ready_endpoints(
    slices: &[EndpointSlice],
) -> BTreeMap<(&str, &str), BTreeSet<&str>> {
    let mut hosting: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for slice in slices {
        let (Some(namespace), Some(service)) = (
            slice.metadata.namespace.as_deref(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        let nodes = hosting.entry((namespace, service.as_str())).or_default();
        for endpoint in &slice.endpoints {
            // NOTE: EndpointConditions (discovery.k8s.io/v1): "ready ... A nil value should be
            // interpreted as "true"".
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if let (true, Some(node)) = (ready, endpoint.node_name.as_deref()) {
                nodes.insert(node);
            }
        }
    }
    hosting
}

/// The InternalIPs of the Ready nodes, by name: the first is a stable choice that moves to
/// another node only when that one stops being Ready.
fn ready_nodes(nodes: &[Node]) -> Vec<(&str, Ipv4Addr)> {
    let mut ready: Vec<(&str, Ipv4Addr)> = nodes
        .iter()
        .filter(|node| node_ready(node))
        .filter_map(|node| Some((node.metadata.name.as_deref()?, internal_ips(node).next()?)))
        .collect();
    ready.sort();
    ready
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, NodeAddress, NodeCondition, NodeStatus,
        ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    /// A Service for tests: `ports` are (port, protocol, nodePort).
    pub(crate) fn service(
        ns: &str,
        name: &str,
        created_secs: i64,
        annotations: &[(&str, &str)],
        ports: &[(i32, &str, Option<i32>)],
    ) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                creation_timestamp: Some(Time(
                    Timestamp::from_second(created_secs).expect("valid test timestamp"),
                )),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("NodePort".into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(port, protocol, node_port)| ServicePort {
                            port: *port,
                            protocol: Some(protocol.to_string()),
                            node_port: *node_port,
                            name: Some(format!("p{port}")),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    pub(crate) fn with_lb_ip(mut service: Service, ip: &str) -> Service {
        service.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        service
    }

    fn with_class(mut service: Service, class: &str) -> Service {
        if let Some(spec) = service.spec.as_mut() {
            spec.type_ = Some("LoadBalancer".into());
            spec.load_balancer_class = Some(class.into());
        }
        service
    }

    pub(crate) fn node(name: &str, ip: &str, ready: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const ON: (&str, &str) = ("holepunch/punch-external", "true");

    /// [`desired`] on a host that knows nothing of itself and holds no port.
    fn run(
        services: &[Service],
        nodes: &[Node],
        slices: &[EndpointSlice],
        config: &Config,
    ) -> Desired {
        desired(
            services,
            nodes,
            slices,
            config,
            &HostFacts::default(),
            &Holders::new(),
        )
    }

    /// The default config, with the lab's load balancer pool 192.168.77.0/24 allowed.
    fn lb_config() -> Config {
        let mut config = Config::default();
        config.exposure.target_cidrs = vec!["192.168.77.0/24".parse().expect("test network")];
        config
    }

    fn nodes() -> Vec<Node> {
        vec![
            node("b-node", "192.168.1.21", true),
            node("a-node", "192.168.1.20", true),
        ]
    }

    /// (protocol, external port, owner, target) of every desired mapping.
    fn summary(d: &Desired) -> Vec<(Protocol, u16, String, String)> {
        d.mappings
            .values()
            .map(|m| {
                (
                    m.protocol,
                    m.external_port,
                    m.owner.to_string(),
                    m.target.endpoint.to_string(),
                )
            })
            .collect()
    }

    fn kinds(d: &Desired) -> Vec<(String, ProblemKind)> {
        d.problems
            .iter()
            .map(|p| (p.owner.to_string(), p.kind))
            .collect()
    }

    struct Case {
        name: &'static str,
        services: Vec<Service>,
        nodes: Vec<Node>,
        mappings: Vec<(Protocol, u16, &'static str, &'static str)>,
        problems: Vec<(&'static str, ProblemKind)>,
    }

    fn cases() -> Vec<Case> {
        use Protocol::{Tcp, Udp};
        let oversized = "9".repeat(100_000);
        vec![
            Case {
                name: "no annotation: not published",
                services: vec![service(
                    "default",
                    "web",
                    1,
                    &[],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: nodes(),
                mappings: vec![],
                problems: vec![],
            },
            Case {
                name: "opt-in annotation publishes on the service port via the first Ready node",
                services: vec![service(
                    "default",
                    "web",
                    1,
                    &[ON],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: nodes(),
                mappings: vec![(Tcp, 8080, "default/web", "192.168.1.20:30080")],
                problems: vec![],
            },
            Case {
                name: "annotation false: not published, no problem",
                services: vec![service(
                    "default",
                    "web",
                    1,
                    &[("holepunch/punch-external", "false")],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: nodes(),
                mappings: vec![],
                problems: vec![],
            },
            Case {
                name: "annotation neither true nor false: problem, not published",
                services: vec![service(
                    "default",
                    "web",
                    1,
                    &[("holepunch/punch-external", "yes")],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: nodes(),
                mappings: vec![],
                problems: vec![("default/web", ProblemKind::InvalidAnnotation)],
            },
            Case {
                name: "remap annotation by port number and by port name",
                services: vec![service(
                    "media",
                    "jelly",
                    1,
                    &[
                        ON,
                        ("holepunch.port/8096", "18096"),
                        ("holepunch.port/p7359", "17359"),
                    ],
                    &[(8096, "TCP", Some(30096)), (7359, "UDP", Some(30359))],
                )],
                nodes: nodes(),
                mappings: vec![
                    (Tcp, 18096, "media/jelly", "192.168.1.20:30096"),
                    (Udp, 17359, "media/jelly", "192.168.1.20:30359"),
                ],
                problems: vec![],
            },
            Case {
                name: "TCP and UDP on the same port number do not conflict",
                services: vec![service(
                    "games",
                    "mc",
                    1,
                    &[ON],
                    &[(25565, "TCP", Some(30565)), (25565, "UDP", Some(30566))],
                )],
                nodes: nodes(),
                mappings: vec![
                    (Tcp, 25565, "games/mc", "192.168.1.20:30565"),
                    (Udp, 25565, "games/mc", "192.168.1.20:30566"),
                ],
                problems: vec![],
            },
            Case {
                name: "load balancer IP wins over nodePort and uses the service port",
                services: vec![with_lb_ip(
                    service("default", "web", 1, &[ON], &[(8080, "TCP", Some(30080))]),
                    "192.168.77.100",
                )],
                nodes: nodes(),
                mappings: vec![(Tcp, 8080, "default/web", "192.168.77.100:8080")],
                problems: vec![],
            },
            Case {
                name: "holepunch's loadBalancerClass is in without annotation; its own status is no target",
                services: vec![with_lb_ip(
                    with_class(
                        service("default", "lb", 1, &[], &[(9000, "TCP", Some(30900))]),
                        "holepunch.io/router",
                    ),
                    "203.0.113.7",
                )],
                nodes: nodes(),
                mappings: vec![(Tcp, 9000, "default/lb", "192.168.1.20:30900")],
                problems: vec![],
            },
            Case {
                name: "another loadBalancerClass without annotation: not published",
                services: vec![with_class(
                    service("default", "lb", 1, &[], &[(9000, "TCP", Some(30900))]),
                    "example.com/other",
                )],
                nodes: nodes(),
                mappings: vec![],
                problems: vec![],
            },
            Case {
                name: "deny list, below 1024, and outside allow are refused per port",
                services: vec![service(
                    "default",
                    "bad",
                    1,
                    &[ON, ("holepunch.port/8443", "6443")],
                    &[
                        (22, "TCP", Some(30022)),
                        (80, "TCP", Some(30081)),
                        (8443, "TCP", Some(30443)),
                        (9090, "TCP", Some(30090)),
                    ],
                )],
                nodes: nodes(),
                mappings: vec![(Tcp, 9090, "default/bad", "192.168.1.20:30090")],
                problems: vec![
                    ("default/bad", ProblemKind::DeniedPort),
                    ("default/bad", ProblemKind::DeniedPort),
                    ("default/bad", ProblemKind::DeniedPort),
                ],
            },
            Case {
                name: "conflict: the older Service wins, the younger gets a problem",
                services: vec![
                    service("b", "young", 200, &[ON], &[(8080, "TCP", Some(30002))]),
                    service("a", "old", 100, &[ON], &[(8080, "TCP", Some(30001))]),
                    service(
                        "c",
                        "remapped",
                        300,
                        &[ON, ("holepunch.port/9000", "8080")],
                        &[(9000, "TCP", Some(30003))],
                    ),
                ],
                nodes: nodes(),
                mappings: vec![(Tcp, 8080, "a/old", "192.168.1.20:30001")],
                problems: vec![
                    ("b/young", ProblemKind::PortConflict),
                    ("c/remapped", ProblemKind::PortConflict),
                ],
            },
            Case {
                name: "malformed remap values are refused and only that port is skipped",
                services: vec![service(
                    "default",
                    "m",
                    1,
                    &[
                        ON,
                        ("holepunch.port/8001", "+8001"),
                        ("holepunch.port/8002", " 8002"),
                        ("holepunch.port/8003", "70000"),
                        ("holepunch.port/8004", "08004"),
                        ("holepunch.port/8005", "0"),
                        ("holepunch.port/9999", "9999"),
                    ],
                    &[
                        (8001, "TCP", Some(30001)),
                        (8002, "TCP", Some(30002)),
                        (8003, "TCP", Some(30003)),
                        (8004, "TCP", Some(30004)),
                        (8005, "TCP", Some(30005)),
                        (8006, "TCP", Some(30006)),
                    ],
                )],
                nodes: nodes(),
                mappings: vec![(Tcp, 8006, "default/m", "192.168.1.20:30006")],
                problems: vec![("default/m", ProblemKind::InvalidAnnotation); 6],
            },
            Case {
                name: "oversized annotation values are refused",
                services: vec![service(
                    "default",
                    "big",
                    1,
                    &[ON, ("holepunch.port/8080", &oversized)],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: nodes(),
                mappings: vec![],
                problems: vec![("default/big", ProblemKind::InvalidAnnotation)],
            },
            Case {
                name: "SCTP is refused, the TCP port goes on",
                services: vec![service(
                    "default",
                    "s",
                    1,
                    &[ON],
                    &[(3868, "SCTP", Some(30868)), (3869, "TCP", Some(30869))],
                )],
                nodes: nodes(),
                mappings: vec![(Tcp, 3869, "default/s", "192.168.1.20:30869")],
                problems: vec![("default/s", ProblemKind::UnsupportedProtocol)],
            },
            Case {
                name: "no Ready node: no target",
                services: vec![service(
                    "default",
                    "web",
                    1,
                    &[ON],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: vec![node("a-node", "192.168.1.20", false)],
                mappings: vec![],
                problems: vec![("default/web", ProblemKind::NoTarget)],
            },
            Case {
                name: "fails over to the next Ready node",
                services: vec![service(
                    "default",
                    "web",
                    1,
                    &[ON],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: vec![
                    node("a-node", "192.168.1.20", false),
                    node("b-node", "192.168.1.21", true),
                ],
                mappings: vec![(Tcp, 8080, "default/web", "192.168.1.21:30080")],
                problems: vec![],
            },
            Case {
                name: "ClusterIP Service has no target",
                services: vec![service("default", "cip", 1, &[ON], &[(8080, "TCP", None)])],
                nodes: nodes(),
                mappings: vec![],
                problems: vec![("default/cip", ProblemKind::NoTarget)],
            },
            Case {
                name: "load balancer IP outside target_cidrs falls back to the nodePort",
                services: vec![with_lb_ip(
                    service("default", "evil", 1, &[ON], &[(8080, "TCP", Some(30080))]),
                    "8.8.8.8",
                )],
                nodes: nodes(),
                mappings: vec![(Tcp, 8080, "default/evil", "192.168.1.20:30080")],
                problems: vec![("default/evil", ProblemKind::TargetFallback)],
            },
            Case {
                name: "load balancer IP outside target_cidrs without a nodePort is refused",
                services: vec![with_lb_ip(
                    service("default", "evil", 1, &[ON], &[(8080, "TCP", None)]),
                    "8.8.8.8",
                )],
                nodes: nodes(),
                mappings: vec![],
                problems: vec![("default/evil", ProblemKind::TargetNotAllowed)],
            },
        ]
    }

    #[test]
    fn desired_table() {
        let config = lb_config();
        for case in cases() {
            let d = run(&case.services, &case.nodes, &[], &config);
            let want: Vec<_> = case
                .mappings
                .iter()
                .map(|(p, port, owner, target)| (*p, *port, owner.to_string(), target.to_string()))
                .collect();
            assert_eq!(summary(&d), want, "{}: mappings", case.name);
            let want_problems: Vec<_> = case
                .problems
                .iter()
                .map(|(owner, kind)| (owner.to_string(), *kind))
                .collect();
            let mut got = kinds(&d);
            got.sort();
            let mut want_sorted = want_problems;
            want_sorted.sort();
            assert_eq!(
                got, want_sorted,
                "{}: problems {:#?}",
                case.name, d.problems
            );
        }
    }

    #[test]
    fn namespaces_allow_and_exclude() {
        let services = vec![
            service("media", "a", 1, &[ON], &[(8001, "TCP", Some(30001))]),
            service("games", "b", 1, &[ON], &[(8002, "TCP", Some(30002))]),
            service("kube-system", "c", 1, &[ON], &[(8003, "TCP", Some(30003))]),
        ];
        let mut config = Config::default();
        config
            .kubernetes
            .exclude_namespaces
            .insert("kube-system".into());
        let owners = |d: &Desired| {
            d.mappings
                .values()
                .map(|m| m.owner.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            owners(&run(&services, &nodes(), &[], &config)),
            ["media/a", "games/b"]
        );
        config.kubernetes.namespaces.insert("media".into());
        assert_eq!(owners(&run(&services, &nodes(), &[], &config)), ["media/a"]);
    }

    #[test]
    fn conflict_message_is_tenant_safe_and_deterministic_under_reordering() {
        let a = service("a", "old", 100, &[ON], &[(8080, "TCP", Some(30001))]);
        let b = service("b", "young", 200, &[ON], &[(8080, "TCP", Some(30002))]);
        let config = Config::default();
        let one = run(&[a.clone(), b.clone()], &nodes(), &[], &config);
        let two = run(&[b, a], &nodes(), &[], &config);
        assert_eq!(one, two);
        let problem = &one.problems[0];
        // The tenant's Event never names the other namespace's Service; the detail does.
        assert!(
            problem.message.contains("held by another Service"),
            "{problem}"
        );
        assert!(!problem.message.contains("old"), "{problem}");
        assert!(!problem.message.contains("a/"), "{problem}");
        assert!(
            problem
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("a/old")),
            "{problem}"
        );
        // And the winner is published.
        assert_eq!(
            one.mappings
                .values()
                .map(|m| m.owner.to_string())
                .collect::<Vec<_>>(),
            ["a/old"]
        );
    }

    #[test]
    fn below_1024_allowed_when_configured() {
        let mut config = Config::default();
        config.ports.allow_below_1024 = true;
        config.ports.allow.push(crate::config::PortRange {
            first: 80,
            last: 80,
        });
        let svc = service("default", "web", 1, &[ON], &[(80, "TCP", Some(30080))]);
        assert_eq!(run(&[svc], &nodes(), &[], &config).mappings.len(), 1);
    }

    #[test]
    fn oversized_value_is_not_echoed_whole() {
        let long = "x".repeat(10_000);
        let svc = service(
            "default",
            "web",
            1,
            &[("holepunch/punch-external", &long)],
            &[(8080, "TCP", Some(30080))],
        );
        let d = run(&[svc], &nodes(), &[], &Config::default());
        assert_eq!(d.problems.len(), 1);
        assert!(
            d.problems[0].message.len() < 300,
            "{}",
            d.problems[0].message
        );
    }

    fn local(mut service: Service) -> Service {
        if let Some(spec) = service.spec.as_mut() {
            spec.external_traffic_policy = Some("Local".into());
        }
        service
    }

    /// An EndpointSlice of `ns/svc`: endpoints are (node name, conditions.ready).
    pub(crate) fn slice(ns: &str, svc: &str, endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions};
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("{svc}-abc")),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), svc.to_owned())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: endpoints
                .iter()
                .map(|(node, ready)| SliceEndpoint {
                    addresses: vec!["10.244.0.5".into()],
                    node_name: Some((*node).into()),
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: None,
        }
    }

    #[test]
    fn external_traffic_policy_local_table() {
        struct LocalCase {
            name: &'static str,
            services: Vec<Service>,
            nodes: Vec<Node>,
            slices: Vec<EndpointSlice>,
            /// (owner, target) of each mapping.
            mappings: Vec<(&'static str, &'static str)>,
            problems: Vec<(&'static str, ProblemKind)>,
        }
        let web = || {
            local(service(
                "default",
                "web",
                1,
                &[ON],
                &[(8080, "TCP", Some(30080))],
            ))
        };
        let three_nodes = || {
            vec![
                node("a-node", "192.168.1.20", true),
                node("b-node", "192.168.1.21", true),
                node("c-node", "192.168.1.22", false),
            ]
        };
        let cases = vec![
            LocalCase {
                name: "Local: the Ready node hosting a ready endpoint, not the first Ready node",
                services: vec![web()],
                nodes: three_nodes(),
                slices: vec![slice("default", "web", &[("b-node", Some(true))])],
                mappings: vec![("default/web", "192.168.1.21:30080")],
                problems: vec![],
            },
            LocalCase {
                name: "Local: ready unset counts as ready",
                services: vec![web()],
                nodes: three_nodes(),
                slices: vec![slice("default", "web", &[("b-node", None)])],
                mappings: vec![("default/web", "192.168.1.21:30080")],
                problems: vec![],
            },
            LocalCase {
                name: "Local: an endpoint that is not ready does not count",
                services: vec![web()],
                nodes: three_nodes(),
                slices: vec![slice(
                    "default",
                    "web",
                    &[("a-node", Some(false)), ("b-node", Some(true))],
                )],
                mappings: vec![("default/web", "192.168.1.21:30080")],
                problems: vec![],
            },
            LocalCase {
                name: "Local: an endpoint on a node that is not Ready does not count",
                services: vec![web()],
                nodes: three_nodes(),
                slices: vec![slice("default", "web", &[("c-node", Some(true))])],
                mappings: vec![],
                problems: vec![("default/web", ProblemKind::NoTarget)],
            },
            LocalCase {
                name: "Local: several hosting nodes, the lowest name wins; slices add up",
                services: vec![web()],
                nodes: three_nodes(),
                slices: vec![
                    slice("default", "web", &[("b-node", Some(true))]),
                    slice("default", "web", &[("a-node", Some(true))]),
                ],
                mappings: vec![("default/web", "192.168.1.20:30080")],
                problems: vec![],
            },
            LocalCase {
                name: "Local: no slices at all means no target",
                services: vec![web()],
                nodes: three_nodes(),
                slices: vec![],
                mappings: vec![],
                problems: vec![("default/web", ProblemKind::NoTarget)],
            },
            LocalCase {
                name: "Local: slices of a same-named Service in another namespace do not count",
                services: vec![web()],
                nodes: three_nodes(),
                slices: vec![slice("other", "web", &[("a-node", Some(true))])],
                mappings: vec![],
                problems: vec![("default/web", ProblemKind::NoTarget)],
            },
            LocalCase {
                name: "Cluster policy ignores slices: first Ready node",
                services: vec![service(
                    "default",
                    "web",
                    1,
                    &[ON],
                    &[(8080, "TCP", Some(30080))],
                )],
                nodes: three_nodes(),
                slices: vec![slice("default", "web", &[("b-node", Some(true))])],
                mappings: vec![("default/web", "192.168.1.20:30080")],
                problems: vec![],
            },
            LocalCase {
                name: "Local with a load balancer IP: the IP is the target, slices do not matter",
                services: vec![with_lb_ip(web(), "192.168.77.100")],
                nodes: three_nodes(),
                slices: vec![],
                mappings: vec![("default/web", "192.168.77.100:8080")],
                problems: vec![],
            },
        ];
        let config = lb_config();
        for case in cases {
            let d = run(&case.services, &case.nodes, &case.slices, &config);
            let got: Vec<(String, String)> = d
                .mappings
                .values()
                .map(|m| (m.owner.to_string(), m.target.endpoint.to_string()))
                .collect();
            let want: Vec<(String, String)> = case
                .mappings
                .iter()
                .map(|(o, t)| (o.to_string(), t.to_string()))
                .collect();
            assert_eq!(got, want, "{}: mappings", case.name);
            let want_problems: Vec<_> = case
                .problems
                .iter()
                .map(|(o, k)| (o.to_string(), *k))
                .collect();
            assert_eq!(kinds(&d), want_problems, "{}: problems", case.name);
        }
    }

    #[test]
    fn local_without_endpoints_says_why() {
        let svc = local(service(
            "default",
            "web",
            1,
            &[ON],
            &[(8080, "TCP", Some(30080))],
        ));
        let d = run(&[svc], &nodes(), &[], &Config::default());
        assert!(
            d.problems[0]
                .message
                .contains("externalTrafficPolicy is Local"),
            "{}",
            d.problems[0].message
        );
    }

    /// The lab's LAN: the router at .1 (external 203.0.113.7), this host at .10, nodes at
    /// .20/.21; a socket on this host listens on 9100/tcp (node-exporter).
    fn lan_host() -> HostFacts {
        let ips = |list: &[&str]| list.iter().filter_map(|a| a.parse().ok()).collect();
        HostFacts {
            own_addresses: ips(&["127.0.0.1", "192.168.1.10"]),
            broadcast_addresses: ips(&["192.168.1.255"]),
            router_addresses: ips(&["192.168.1.1", "203.0.113.7"]),
            listening: [(Protocol::Tcp, 9100)].into(),
        }
    }

    fn holder(port: u16, owner: &str) -> (MappingKey, Owner) {
        (
            MappingKey {
                protocol: Protocol::Tcp,
                external_port: port,
            },
            owner.parse().expect("test owner"),
        )
    }

    /// A Service with `count` TCP ports from `first`, nodePorts from 30000 + offset.
    fn many_ports(ns: &str, name: &str, created: i64, first: i32, count: i32) -> Service {
        let ports: Vec<(i32, &str, Option<i32>)> = (0..count)
            .map(|i| (first + i, "TCP", Some(30000 + first - 8000 + i)))
            .collect();
        service(ns, name, created, &[ON], &ports)
    }

    #[test]
    fn trust_table() {
        struct TrustCase {
            name: &'static str,
            services: Vec<Service>,
            nodes: Vec<Node>,
            config: Config,
            holders: Holders,
            /// (owner, external port, target) of each mapping, by key.
            mappings: Vec<(&'static str, u16, String)>,
            problems: Vec<(&'static str, ProblemKind)>,
        }
        // Every case also asks for this one, which must be published: a refusal must not
        // pass because nothing works.
        let normal = || service("home", "normal", 50, &[ON], &[(7000, "TCP", Some(30700))]);
        let normal_mapping = ("home/normal", 7000, "192.168.1.20:30700".to_owned());
        let lb = |ip: &str, node_port: Option<i32>| {
            with_lb_ip(
                service("tenant", "evil", 1, &[ON], &[(8080, "TCP", node_port)]),
                ip,
            )
        };
        // target_cidrs covering the whole LAN: the forbidden addresses stay forbidden.
        let wide = || {
            let mut config = Config::default();
            config.exposure.target_cidrs = vec![
                "0.0.0.0/0".parse().expect("test network"),
                "::/0".parse().expect("test network"),
            ];
            config
        };
        let mode = |mode| {
            let mut config = Config::default();
            config.exposure.mode = mode;
            config
        };
        let quota = |service, namespace, total| {
            let mut config = Config::default();
            config.ports.max_per_service = service;
            config.ports.max_per_namespace = namespace;
            config.ports.max_total = total;
            config
        };
        let mut cases = Vec::new();
        for (address, what) in [
            ("192.168.1.1", "the router's LAN address"),
            ("203.0.113.7", "the router's external address"),
            ("192.168.1.10", "this host's address"),
            ("127.0.0.1", "loopback"),
            ("169.254.0.7", "link-local"),
            ("239.1.2.3", "multicast"),
            ("192.168.1.255", "the LAN broadcast"),
            ("255.255.255.255", "broadcast"),
            ("0.0.0.0", "unspecified"),
        ] {
            cases.push(TrustCase {
                name: Box::leak(
                    format!("LB IP = {what}, even inside target_cidrs: refused").into_boxed_str(),
                ),
                services: vec![normal(), lb(address, None)],
                nodes: nodes(),
                config: wide(),
                holders: Holders::new(),
                mappings: vec![normal_mapping.clone()],
                problems: vec![("tenant/evil", ProblemKind::TargetNotAllowed)],
            });
            cases.push(TrustCase {
                name: Box::leak(
                    format!("LB IP = {what} with a nodePort: the nodePort is used")
                        .into_boxed_str(),
                ),
                services: vec![normal(), lb(address, Some(30080))],
                nodes: nodes(),
                config: wide(),
                holders: Holders::new(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("tenant/evil", 8080, "192.168.1.20:30080".into()),
                ],
                problems: vec![("tenant/evil", ProblemKind::TargetFallback)],
            });
        }
        cases.extend([
            TrustCase {
                name: "LB IP of a LAN NAS with the shipped (empty) target_cidrs: nodePort instead",
                services: vec![normal(), lb("192.168.1.50", Some(30080))],
                nodes: nodes(),
                config: Config::default(),
                holders: Holders::new(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("tenant/evil", 8080, "192.168.1.20:30080".into()),
                ],
                problems: vec![("tenant/evil", ProblemKind::TargetFallback)],
            },
            TrustCase {
                name: "LB IP of a LAN NAS, no nodePort: refused",
                services: vec![normal(), lb("192.168.1.50", None)],
                nodes: nodes(),
                config: Config::default(),
                holders: Holders::new(),
                mappings: vec![normal_mapping.clone()],
                problems: vec![("tenant/evil", ProblemKind::TargetNotAllowed)],
            },
            TrustCase {
                name: "LB IP inside target_cidrs (a MetalLB pool): the LB IP is the target",
                services: vec![normal(), lb("192.168.77.5", Some(30080))],
                nodes: nodes(),
                config: lb_config(),
                holders: Holders::new(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("tenant/evil", 8080, "192.168.77.5:8080".into()),
                ],
                problems: vec![],
            },
            TrustCase {
                name: "a node on this host: its InternalIP with a nodePort is a target",
                services: vec![normal()],
                nodes: vec![node("a-node", "192.168.1.10", true)],
                config: Config::default(),
                holders: Holders::new(),
                mappings: vec![("home/normal", 7000, "192.168.1.10:30700".into())],
                problems: vec![],
            },
            TrustCase {
                name: "a node whose InternalIP is the router's: no target",
                services: vec![normal()],
                nodes: vec![node("a-node", "192.168.1.1", true)],
                config: Config::default(),
                holders: Holders::new(),
                mappings: vec![],
                problems: vec![("home/normal", ProblemKind::TargetNotAllowed)],
            },
            TrustCase {
                name: "relay: a port this host listens on is refused",
                services: vec![normal(), service("tenant", "exporter", 1, &[ON], &[(9100, "TCP", Some(30910))])],
                nodes: nodes(),
                config: mode(ExposureMode::Relay),
                holders: Holders::new(),
                mappings: vec![normal_mapping.clone()],
                problems: vec![("tenant/exporter", ProblemKind::PortInUse)],
            },
            TrustCase {
                name: "gateway: a port the router (this host) listens on is refused",
                services: vec![normal(), service("tenant", "exporter", 1, &[ON], &[(9100, "TCP", Some(30910))])],
                nodes: nodes(),
                config: mode(ExposureMode::Gateway),
                holders: Holders::new(),
                mappings: vec![normal_mapping.clone()],
                problems: vec![("tenant/exporter", ProblemKind::PortInUse)],
            },
            TrustCase {
                name: "direct: the router forwards to the target, this host's sockets are not in the way",
                services: vec![normal(), service("tenant", "exporter", 1, &[ON], &[(9100, "TCP", Some(30910))])],
                nodes: nodes(),
                config: mode(ExposureMode::Direct),
                holders: Holders::new(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("tenant/exporter", 9100, "192.168.1.20:30910".into()),
                ],
                problems: vec![],
            },
            TrustCase {
                name: "relay: the same port is fine over UDP",
                services: vec![normal(), service("tenant", "exporter", 1, &[ON], &[(9100, "UDP", Some(30910))])],
                nodes: nodes(),
                config: mode(ExposureMode::Relay),
                holders: Holders::new(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("tenant/exporter", 9100, "192.168.1.20:30910".into()),
                ],
                problems: vec![],
            },
            TrustCase {
                name: "a live port stays with its holder, even against an older Service",
                services: vec![
                    normal(),
                    service("b", "young", 200, &[ON], &[(8080, "TCP", Some(30002))]),
                    service("a", "old", 100, &[ON], &[(8080, "TCP", Some(30001))]),
                ],
                nodes: nodes(),
                config: Config::default(),
                holders: [holder(8080, "b/young"), holder(7000, "home/normal")].into(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("b/young", 8080, "192.168.1.20:30002".into()),
                ],
                problems: vec![("a/old", ProblemKind::PortConflict)],
            },
            TrustCase {
                name: "when the holder lets go, the next claimant gets the port",
                services: vec![
                    normal(),
                    service("a", "old", 100, &[ON], &[(8080, "TCP", Some(30001))]),
                    service("c", "younger", 300, &[ON], &[(8080, "TCP", Some(30003))]),
                ],
                nodes: nodes(),
                config: Config::default(),
                holders: [holder(8080, "b/young")].into(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("a/old", 8080, "192.168.1.20:30001".into()),
                ],
                problems: vec![("c/younger", ProblemKind::PortConflict)],
            },
            TrustCase {
                name: "64 ports asked, the lowest 16 published, one problem for the rest",
                services: vec![normal(), many_ports("tenant", "greedy", 1, 8000, 64)],
                nodes: nodes(),
                config: Config::default(),
                holders: Holders::new(),
                mappings: std::iter::once(normal_mapping.clone())
                    .chain((0..16).map(|i| {
                        ("tenant/greedy", 8000 + i, format!("192.168.1.20:{}", 30000 + i))
                    }))
                    .collect(),
                problems: vec![("tenant/greedy", ProblemKind::OverQuota)],
            },
            TrustCase {
                name: "namespace quota: the older Service's ports first",
                services: vec![
                    normal(),
                    many_ports("tenant", "first", 1, 8000, 3),
                    many_ports("tenant", "second", 2, 8100, 3),
                ],
                nodes: nodes(),
                config: quota(16, 4, 128),
                holders: Holders::new(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("tenant/first", 8000, "192.168.1.20:30000".into()),
                    ("tenant/first", 8001, "192.168.1.20:30001".into()),
                    ("tenant/first", 8002, "192.168.1.20:30002".into()),
                    ("tenant/second", 8100, "192.168.1.20:30100".into()),
                ],
                problems: vec![("tenant/second", ProblemKind::OverQuota)],
            },
            TrustCase {
                name: "namespace quota: a holder keeps its ports against an older Service",
                services: vec![
                    normal(),
                    many_ports("tenant", "first", 1, 8000, 3),
                    many_ports("tenant", "second", 2, 8100, 3),
                ],
                nodes: nodes(),
                config: quota(16, 4, 128),
                holders: [holder(8100, "tenant/second"), holder(8101, "tenant/second")].into(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("tenant/first", 8000, "192.168.1.20:30000".into()),
                    ("tenant/first", 8001, "192.168.1.20:30001".into()),
                    ("tenant/second", 8100, "192.168.1.20:30100".into()),
                    ("tenant/second", 8101, "192.168.1.20:30101".into()),
                ],
                problems: vec![
                    ("tenant/first", ProblemKind::OverQuota),
                    ("tenant/second", ProblemKind::OverQuota),
                ],
            },
            TrustCase {
                name: "total quota: older Services first",
                services: vec![normal(), many_ports("x", "late", 60, 8000, 2)],
                nodes: nodes(),
                config: quota(16, 32, 2),
                holders: Holders::new(),
                mappings: vec![
                    normal_mapping.clone(),
                    ("x/late", 8000, "192.168.1.20:30000".into()),
                ],
                problems: vec![("x/late", ProblemKind::OverQuota)],
            },
        ]);
        for case in cases {
            let d = desired(
                &case.services,
                &case.nodes,
                &[],
                &case.config,
                &lan_host(),
                &case.holders,
            );
            let got: Vec<(String, u16, String)> = d
                .mappings
                .values()
                .map(|m| {
                    (
                        m.owner.to_string(),
                        m.external_port,
                        m.target.endpoint.to_string(),
                    )
                })
                .collect();
            let mut want: Vec<(String, u16, String)> = case
                .mappings
                .iter()
                .map(|(o, p, t)| (o.to_string(), *p, t.clone()))
                .collect();
            want.sort_by_key(|(_, port, _)| *port);
            assert_eq!(got, want, "{}: mappings {:#?}", case.name, d.problems);
            let want_problems: Vec<_> = case
                .problems
                .iter()
                .map(|(o, k)| (o.to_string(), *k))
                .collect();
            assert_eq!(
                kinds(&d),
                want_problems,
                "{}: problems {:#?}",
                case.name,
                d.problems
            );
            for problem in &d.problems {
                // Tenant-safe: no LAN address, no other namespace's Service in the Event.
                for secret in [
                    "192.168.1.",
                    "203.0.113.7",
                    "127.0.0.1",
                    "b/young",
                    "a/old",
                    "home/",
                ] {
                    assert!(
                        !problem.message.contains(secret),
                        "{}: {secret} in {}",
                        case.name,
                        problem.message
                    );
                }
            }
        }
    }

    #[test]
    fn over_quota_names_the_limit_and_the_key() {
        let d = run(
            &[many_ports("tenant", "greedy", 1, 8000, 64)],
            &nodes(),
            &[],
            &Config::default(),
        );
        assert_eq!(d.mappings.len(), 16);
        let problem = &d.problems[0];
        assert!(
            problem
                .message
                .starts_with("48 external port(s) not published (8016/tcp"),
            "{problem}"
        );
        assert!(problem.message.contains("at most 16 ports"), "{problem}");
        assert!(
            problem.message.contains("ports.max_per_service"),
            "{problem}"
        );
        let mut config = Config::default();
        config.ports.max_per_service = 64;
        config.ports.max_per_namespace = 10;
        let d = run(
            &[many_ports("tenant", "greedy", 1, 8000, 64)],
            &nodes(),
            &[],
            &config,
        );
        assert_eq!(d.mappings.len(), 10);
        assert!(
            d.problems[0].message.contains("ports.max_per_namespace"),
            "{}",
            d.problems[0]
        );
        config.ports.max_per_namespace = 64;
        config.ports.max_total = 5;
        let d = run(
            &[many_ports("tenant", "greedy", 1, 8000, 64)],
            &nodes(),
            &[],
            &config,
        );
        assert_eq!(d.mappings.len(), 5);
        assert!(
            d.problems[0].message.contains("ports.max_total"),
            "{}",
            d.problems[0]
        );
    }

    #[test]
    fn refusals_explain_themselves_to_the_operator() {
        let d = desired(
            &[with_lb_ip(
                service("tenant", "evil", 1, &[ON], &[(8080, "TCP", Some(30080))]),
                "192.168.1.1",
            )],
            &nodes(),
            &[],
            &Config::default(),
            &lan_host(),
            &Holders::new(),
        );
        let problem = &d.problems[0];
        assert_eq!(problem.kind, ProblemKind::TargetFallback);
        assert!(problem.message.contains("nodePort 30080"), "{problem}");
        assert!(
            problem
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("192.168.1.1") && d.contains("router")),
            "{problem}"
        );
    }
}
