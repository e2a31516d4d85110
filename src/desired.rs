//! What the cluster asks for: Services + Nodes + EndpointSlices + Config -> the port mappings
//! that should exist, and the problems that keep some Service ports from being published.
//!
//! Pure and synchronous (DESIGN.md, "Code layout"): no sockets, files, clocks or environment.
//! Annotations are untrusted input: every value is parsed strictly and size-limited, and a bad
//! one becomes a [`Problem`] on its Service while every other Service goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::{Config, PortDenial};
use crate::model::{
    Endpoint, MappingKey, Owner, PortMapping, Problem, ProblemKind, Protocol, Target, TargetSource,
};

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

/// Computes the desired mappings for the whole cluster at once: the router's port space is
/// shared, so conflicts between Services are decided here, deterministically.
///
/// When two Service ports want the same external port and protocol, the Service created first
/// wins (ties: the lower `namespace/name`, then the earlier port in `spec.ports`); every loser
/// gets a [`ProblemKind::PortConflict`] naming the winner.
///
/// A nodePort target is the Ready node with the lowest name; for a Service with
/// `externalTrafficPolicy: Local`, only among the nodes that host a ready endpoint of it
/// (from `endpoint_slices`).
pub fn desired(
    services: &[Service],
    nodes: &[Node],
    endpoint_slices: &[EndpointSlice],
    config: &Config,
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
        collect_service(service, node_target, config, &mut candidates, &mut problems);
    }

    candidates.sort_by(|a, b| {
        (a.created, &a.mapping.owner, a.port_index).cmp(&(
            b.created,
            &b.mapping.owner,
            b.port_index,
        ))
    });
    let mut mappings: BTreeMap<MappingKey, PortMapping> = BTreeMap::new();
    for candidate in candidates {
        let key = candidate.mapping.key();
        if let Some(winner) = mappings.get(&key) {
            problems.push(Problem {
                owner: candidate.mapping.owner.clone(),
                kind: ProblemKind::PortConflict,
                message: format!(
                    "external port {key} is already published by {} (service port {}), which \
                     was created earlier; choose another port with the annotation \
                     {PORT_ANNOTATION_PREFIX}{}",
                    winner.owner, winner.service_port, candidate.mapping.service_port
                ),
            });
        } else {
            mappings.insert(key, candidate.mapping);
        }
    }
    problems.sort();
    problems.dedup();
    Desired { mappings, problems }
}

/// A mapping one Service asks for, before conflicts between Services are decided.
struct Candidate {
    /// `None` sorts first: a Service without a creation time is treated as oldest, which only
    /// happens with hand-written input (`plan --from-file`).
    created: Option<Timestamp>,
    port_index: usize,
    mapping: PortMapping,
}

/// The node address a Service's nodePort traffic would go to.
#[derive(Clone, Copy)]
enum NodeTarget {
    /// The first Ready node.
    Any(Option<Ipv4Addr>),
    /// `externalTrafficPolicy: Local`: the first Ready node that hosts a ready endpoint.
    Local(Option<Ipv4Addr>),
}

fn collect_service(
    service: &Service,
    node_target: NodeTarget,
    config: &Config,
    candidates: &mut Vec<Candidate>,
    problems: &mut Vec<Problem>,
) {
    let (Some(namespace), Some(name)) = (&service.metadata.namespace, &service.metadata.name)
    else {
        return;
    };
    let owner = Owner::new(namespace.as_str(), name.as_str());
    let mut report = |kind, message: String| {
        problems.push(Problem {
            owner: owner.clone(),
            kind,
            message,
        })
    };

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
        let node_ip = match node_target {
            NodeTarget::Any(ip) | NodeTarget::Local(ip) => ip,
        };
        let target = match (lb_ip, node_ip, port.node_port) {
            (Some(ip), _, _) => Target {
                endpoint: Endpoint::new(ip, service_port),
                source: TargetSource::LoadBalancer,
            },
            (None, Some(ip), Some(node_port)) => match u16::try_from(node_port) {
                Ok(node_port) => Target {
                    endpoint: Endpoint::new(ip, node_port),
                    source: TargetSource::NodePort,
                },
                Err(_) => continue,
            },
            (None, None, Some(_)) => {
                let message = match node_target {
                    NodeTarget::Local(_) => format!(
                        "port {service_port}: externalTrafficPolicy is Local and no Ready node \
                         hosts a ready endpoint of this Service; wait for its pods to be \
                         ready, or use externalTrafficPolicy: Cluster"
                    ),
                    NodeTarget::Any(_) => format!(
                        "port {service_port}: no node is Ready to receive its nodePort traffic"
                    ),
                };
                report(ProblemKind::NoTarget, message);
                continue;
            }
            (None, _, None) => {
                report(
                    ProblemKind::NoTarget,
                    format!(
                        "port {service_port} has no load balancer IP and no nodePort; make the \
                         Service type NodePort or LoadBalancer"
                    ),
                );
                continue;
            }
        };
        if !config.exposure.target_allowed(target.endpoint.address) {
            report(
                ProblemKind::TargetNotAllowed,
                format!(
                    "port {service_port}: target {} is outside exposure.target_cidrs; add its \
                     network there if it is really a cluster address",
                    target.endpoint.address
                ),
            );
            continue;
        }
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

fn denial_message(port: u16, denial: PortDenial) -> String {
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

/// The first IPv4 address in `status.loadBalancer.ingress`.
fn load_balancer_ip(service: &Service) -> Option<Ipv4Addr> {
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
        .filter_map(|node| {
            let status = node.status.as_ref()?;
            let is_ready = status
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = status
                .addresses
                .as_ref()?
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .find_map(|a| a.address.parse().ok())?;
            is_ready.then_some((node.metadata.name.as_deref()?, ip))
        })
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
                name: "target outside target_cidrs is refused",
                services: vec![with_lb_ip(
                    service("default", "evil", 1, &[ON], &[(8080, "TCP", Some(30080))]),
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
        let config = Config::default();
        for case in cases() {
            let d = desired(&case.services, &case.nodes, &[], &config);
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
            owners(&desired(&services, &nodes(), &[], &config)),
            ["media/a", "games/b"]
        );
        config.kubernetes.namespaces.insert("media".into());
        assert_eq!(
            owners(&desired(&services, &nodes(), &[], &config)),
            ["media/a"]
        );
    }

    #[test]
    fn conflict_message_names_the_winner_and_is_deterministic_under_reordering() {
        let a = service("a", "old", 100, &[ON], &[(8080, "TCP", Some(30001))]);
        let b = service("b", "young", 200, &[ON], &[(8080, "TCP", Some(30002))]);
        let config = Config::default();
        let one = desired(&[a.clone(), b.clone()], &nodes(), &[], &config);
        let two = desired(&[b, a], &nodes(), &[], &config);
        assert_eq!(one, two);
        assert!(
            one.problems[0].message.contains("a/old"),
            "{}",
            one.problems[0].message
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
        assert_eq!(desired(&[svc], &nodes(), &[], &config).mappings.len(), 1);
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
        let d = desired(&[svc], &nodes(), &[], &Config::default());
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
    fn slice(ns: &str, svc: &str, endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
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
        let config = Config::default();
        for case in cases {
            let d = desired(&case.services, &case.nodes, &case.slices, &config);
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
        let d = desired(&[svc], &nodes(), &[], &Config::default());
        assert!(
            d.problems[0]
                .message
                .contains("externalTrafficPolicy is Local"),
            "{}",
            d.problems[0].message
        );
    }
}
