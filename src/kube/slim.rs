//! What the daemon keeps of each watched object (ARCHITECTURE.md, "Data flow"): only the fields
//! `desired` and the status writer read, so that a cluster of 10,000 Services fits in a few
//! MiB (README, "Benchmarks"). Services holepunch never publishes are not kept at all.
//!
//! Kept of a Service that opts in (the config's annotation, set to anything) or has
//! holepunch's `loadBalancerClass`: name, namespace, uid, resourceVersion, creation time, the
//! two annotations `desired` reads (the opt-in key and `holepunch.port/*`); `spec.type`,
//! ports, loadBalancerClass, externalTrafficPolicy, IP families; `status.loadBalancer`. Of a
//! Node: name, its addresses and Ready condition. Of an EndpointSlice that names its Service
//! and has a ready endpoint on a node: name, namespace, the `kubernetes.io/service-name`
//! label and the nodes of its ready endpoints (once each); other slices are not kept.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Node, NodeCondition, NodeStatus, Service, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::config::KubernetesConfig;
use crate::desired::{PORT_ANNOTATION_PREFIX, SERVICE_NAME_LABEL};

/// The Service as holepunch reads it, or `None` when holepunch would never publish it (no
/// opt-in annotation, another class): `desired` and the status writer skip such Services.
pub fn service(service: Service, config: &KubernetesConfig) -> Option<Service> {
    let Service {
        metadata,
        spec,
        status,
    } = service;
    let opted_in = metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(&config.annotation));
    let own_class = spec.as_ref().and_then(|s| s.load_balancer_class.as_deref())
        == Some(config.load_balancer_class.as_str());
    if !(opted_in || own_class) {
        return None;
    }
    let annotations: BTreeMap<String, String> = metadata
        .annotations
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, _)| *key == config.annotation || key.starts_with(PORT_ANNOTATION_PREFIX))
        .collect();
    Some(Service {
        metadata: ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            uid: metadata.uid,
            resource_version: metadata.resource_version,
            creation_timestamp: metadata.creation_timestamp,
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: spec.map(|spec| ServiceSpec {
            type_: spec.type_,
            ports: spec.ports,
            load_balancer_class: spec.load_balancer_class,
            external_traffic_policy: spec.external_traffic_policy,
            ip_families: spec.ip_families,
            ip_family_policy: spec.ip_family_policy,
            ..ServiceSpec::default()
        }),
        status: status.map(|status| ServiceStatus {
            load_balancer: status.load_balancer,
            conditions: None,
        }),
    })
}

/// The Node as holepunch reads it: its name, addresses and Ready condition. No
/// resourceVersion and no other condition: a kubelet's status report changes those every few
/// seconds, and each change would wake the loop for nothing it reads.
pub fn node(node: Node) -> Node {
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name,
            ..ObjectMeta::default()
        },
        spec: None,
        status: node.status.map(|status| NodeStatus {
            addresses: status.addresses,
            conditions: status.conditions.map(|conditions| {
                conditions
                    .into_iter()
                    .filter(|c| c.type_ == "Ready")
                    .map(|c| NodeCondition {
                        type_: c.type_,
                        status: c.status,
                        ..NodeCondition::default()
                    })
                    .collect()
            }),
            ..NodeStatus::default()
        }),
    }
}

/// The EndpointSlice as holepunch reads it (`externalTrafficPolicy: Local`: which nodes host
/// a ready endpoint of which Service), or `None` when it tells nothing: no Service label, or
/// no ready endpoint on a node. Addresses, ports and which pod it is are not kept, so a pod
/// replaced on the same node does not wake the loop.
pub fn endpoint_slice(slice: EndpointSlice) -> Option<EndpointSlice> {
    let service = slice.metadata.labels?.remove(SERVICE_NAME_LABEL)?;
    let nodes: BTreeSet<String> = slice
        .endpoints
        .into_iter()
        // NOTE: EndpointConditions (discovery.k8s.io/v1): "ready ... A nil value should be
        // interpreted as "true"", as `desired` reads it.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.node_name)
        .collect();
    if nodes.is_empty() {
        return None;
    }
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: slice.metadata.name,
            namespace: slice.metadata.namespace,
            labels: Some([(SERVICE_NAME_LABEL.to_owned(), service)].into()),
            ..ObjectMeta::default()
        },
        address_type: String::new(),
        endpoints: nodes
            .into_iter()
            .map(|node| Endpoint {
                node_name: Some(node),
                ..Endpoint::default()
            })
            .collect(),
        ports: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::desired::desired;
    use crate::desired::tests::{
        node as ready_node, service as full_service, slice as full_slice, with_lb_ip,
    };
    use crate::trust::{Holders, HostFacts};
    use k8s_openapi::api::discovery::v1::EndpointConditions;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn config() -> KubernetesConfig {
        Config::default().kubernetes
    }

    fn test_service(ns: &str, name: &str, ports: &[i32], annotations: &[(&str, &str)]) -> Service {
        let ports: Vec<(i32, &str, Option<i32>)> = ports
            .iter()
            .map(|&port| (port, "TCP", Some(30_000 + port)))
            .collect();
        full_service(ns, name, 1_700_000_000, annotations, &ports)
    }

    /// `desired`'s mappings and problems, as text, for `services` and `slices` on three Ready
    /// nodes.
    fn desired_text(services: &[Service], slices: &[EndpointSlice]) -> (usize, String) {
        let mut config = Config::default();
        config.exposure.target_cidrs = vec!["192.168.77.0/24".parse().expect("test network")];
        let nodes = [
            ready_node("a-node", "192.168.1.10", true),
            ready_node("b-node", "192.168.1.11", true),
            ready_node("c-node", "192.168.1.12", true),
        ];
        let wanted = desired(
            services,
            &nodes,
            slices,
            &config,
            &HostFacts::default(),
            &Holders::new(),
        );
        (
            wanted.mappings.len(),
            format!("{:?} {:?}", wanted.mappings, wanted.problems),
        )
    }

    /// A Service as the API serves it: managedFields, labels, a selector, foreign
    /// annotations.
    fn heavy(mut service: Service) -> Service {
        let meta = &mut service.metadata;
        meta.managed_fields = Some(vec![ManagedFieldsEntry::default(); 3]);
        meta.labels = Some([("app".to_owned(), "web".to_owned())].into());
        meta.uid = Some("u-1".into());
        meta.resource_version = Some("42".into());
        meta.annotations.get_or_insert_default().insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{...}".into(),
        );
        let spec = service.spec.get_or_insert_default();
        spec.selector = Some([("app".to_owned(), "web".to_owned())].into());
        spec.cluster_ip = Some("10.96.0.10".into());
        service
    }

    #[test]
    fn a_published_service_keeps_what_desired_and_the_status_writer_read() {
        let config = config();
        let annotated = heavy(with_lb_ip(
            test_service(
                "default",
                "web",
                &[80, 8443],
                &[
                    (config.annotation.as_str(), "true"),
                    ("holepunch.port/80", "8080"),
                    ("holepunch/note", "read by nothing"),
                ],
            ),
            "192.168.77.100",
        ));
        let slim = service(annotated.clone(), &config).expect("an opted-in Service is kept");
        assert_eq!(slim.metadata.name, annotated.metadata.name);
        assert_eq!(slim.metadata.namespace, annotated.metadata.namespace);
        assert_eq!(slim.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(slim.metadata.resource_version.as_deref(), Some("42"));
        let kept: Vec<&str> = slim
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        // What desired reads: the opt-in key and the remaps; not another holepunch* key.
        assert_eq!(kept, ["holepunch.port/80", "holepunch/punch-external"]);
        assert_eq!(slim.metadata.managed_fields, None);
        assert_eq!(slim.metadata.labels, None);
        let (spec, full) = (
            slim.spec.as_ref().unwrap(),
            annotated.spec.as_ref().unwrap(),
        );
        assert_eq!(spec.ports, full.ports);
        assert_eq!(spec.type_, full.type_);
        assert_eq!(spec.selector, None);
        assert_eq!(spec.cluster_ip, None);
        assert_eq!(slim.status, annotated.status);

        // desired reads the slim Service exactly as the full one.
        let (mapped, full) = desired_text(&[annotated], &[]);
        assert_eq!(mapped, 2, "the case publishes both ports: {full}");
        assert_eq!(desired_text(&[slim], &[]), (mapped, full));
    }

    /// `externalTrafficPolicy: Local`: desired picks the same hosting nodes (and reports the
    /// same problems) from the slim Services and slices as from the full ones, although the
    /// slim store dropped the slices that tell nothing.
    #[test]
    fn desired_reads_slim_endpoint_slices_as_the_full_ones() {
        let config = config();
        let on = (config.annotation.as_str(), "true");
        let local = |name: &str, port: i32| {
            let mut service = heavy(test_service("default", name, &[port], &[on]));
            service.spec.get_or_insert_default().external_traffic_policy = Some("Local".into());
            service
        };
        let services = vec![
            // Ready endpoints on c-node and b-node (b wins), a not-ready one on a-node.
            local("web", 8080),
            // Only not-ready endpoints: no target, a problem.
            local("api", 8081),
            // No slice at all: no target either.
            local("idle", 8082),
            // Cluster policy: slices do not matter.
            heavy(test_service("default", "plain", &[8083], &[on])),
        ];
        let mut no_node = full_slice("default", "web", &[("x", Some(true))]);
        no_node.endpoints[0].node_name = None;
        let mut unlabelled = full_slice("default", "idle", &[("a-node", Some(true))]);
        unlabelled.metadata.labels = None;
        let slices = vec![
            full_slice(
                "default",
                "web",
                &[("c-node", Some(true)), ("a-node", Some(false))],
            ),
            full_slice(
                "default",
                "web",
                &[("b-node", None), ("b-node", Some(true))],
            ),
            no_node,
            full_slice("default", "api", &[("a-node", Some(false))]),
            unlabelled,
            // A same-named Service in another namespace.
            full_slice("other", "api", &[("a-node", Some(true))]),
        ];
        let slim_services: Vec<Service> = services
            .iter()
            .filter_map(|s| service(s.clone(), &config))
            .collect();
        let slim_slices: Vec<EndpointSlice> =
            slices.iter().cloned().filter_map(endpoint_slice).collect();
        assert_eq!(
            slim_slices.len(),
            3,
            "kept: web's two with a ready endpoint, other/api's: {slim_slices:?}"
        );
        let (mapped, full) = desired_text(&services, &slices);
        assert_eq!(mapped, 2, "web on b-node and plain: {full}");
        assert!(full.contains("192.168.1.11"), "web goes to b-node: {full}");
        assert!(
            full.contains("no Ready node hosts a ready endpoint"),
            "{full}"
        );
        assert_eq!(desired_text(&slim_services, &slim_slices), (mapped, full));
    }

    #[test]
    fn services_holepunch_never_publishes_are_not_kept_but_its_class_and_bad_values_are() {
        let config = config();
        let plain = heavy(test_service("default", "internal", &[80], &[]));
        assert_eq!(service(plain.clone(), &config), None);
        let mut classed = plain.clone();
        classed.spec.as_mut().unwrap().load_balancer_class =
            Some(config.load_balancer_class.clone());
        assert!(service(classed, &config).is_some(), "holepunch's class");
        let mut other_class = plain.clone();
        other_class.spec.as_mut().unwrap().load_balancer_class = Some("example.com/lb".into());
        assert_eq!(service(other_class, &config), None);
        // An invalid value is a problem desired reports: the Service is kept.
        let invalid = test_service(
            "default",
            "typo",
            &[80],
            &[(config.annotation.as_str(), "yes")],
        );
        assert!(service(invalid, &config).is_some());
    }

    #[test]
    fn nodes_and_endpoint_slices_keep_addresses_conditions_and_the_service_label() {
        let full = ready_node("n1", "192.168.1.10", true);
        let mut heavy_node = full.clone();
        heavy_node.metadata.labels = Some([("zone".to_owned(), "a".to_owned())].into());
        heavy_node.status.as_mut().unwrap().images = Some(vec![Default::default(); 50]);
        let slim = node(heavy_node);
        assert_eq!(slim.metadata.name, full.metadata.name);
        assert_eq!(slim.metadata.labels, None);
        let status = slim.status.as_ref().unwrap();
        assert_eq!(status.images, None);
        assert_eq!(status.addresses, full.status.as_ref().unwrap().addresses);
        let ready = status.conditions.as_ref().unwrap();
        assert!(
            ready
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );

        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("default".into()),
                labels: Some(
                    [
                        (SERVICE_NAME_LABEL.to_owned(), "web".to_owned()),
                        (
                            "endpointslice.kubernetes.io/managed-by".to_owned(),
                            "x".to_owned(),
                        ),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["10.244.0.5".into()],
                node_name: Some("n1".into()),
                hostname: Some("pod-a".into()),
                ..Endpoint::default()
            }],
            ports: Some(vec![Default::default()]),
        };
        let slim = endpoint_slice(slice.clone()).expect("a ready endpoint on a node");
        let labels = slim.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(slim.endpoints.len(), 1);
        assert_eq!(slim.endpoints[0].node_name.as_deref(), Some("n1"));
        // Which pod, at which address: not read, not kept.
        assert!(slim.endpoints[0].addresses.is_empty());
        assert_eq!(slim.endpoints[0].hostname, None);
        // Another pod on the same node is the same slim slice: nothing to wake the loop for.
        let mut replaced = slice.clone();
        replaced.endpoints[0].addresses = vec!["10.244.0.9".into()];
        replaced.endpoints[0].hostname = Some("pod-b".into());
        assert_eq!(endpoint_slice(replaced), Some(slim));

        // Slices that tell desired nothing are not kept.
        let mut unlabelled = slice.clone();
        unlabelled.metadata.labels = None;
        assert_eq!(endpoint_slice(unlabelled), None);
        let mut not_ready = slice.clone();
        not_ready.endpoints[0].conditions = Some(EndpointConditions {
            ready: Some(false),
            ..EndpointConditions::default()
        });
        assert_eq!(endpoint_slice(not_ready), None);
        let mut nowhere = slice;
        nowhere.endpoints[0].node_name = None;
        assert_eq!(endpoint_slice(nowhere), None);
    }
}
