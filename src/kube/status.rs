//! holepunch as the LoadBalancer implementation of its own `loadBalancerClass`: the router's
//! external IP goes into `status.loadBalancer.ingress` (with `ipMode: Proxy`) of the
//! Services of that class that are published, and comes out again when they are not.
//!
//! Follows the Service API's contract for `spec.loadBalancerClass` (KEP-1959): only the
//! implementation of a class writes the status of Services of that class, so Services of
//! any other class (or of none) are never written. `ipMode` (KEP-1860, Kubernetes 1.30+)
//! says `Proxy` because traffic reaches the Service through the router and this host, not
//! by the IP being routed to a node: kube-proxy must not short-cut it inside the cluster.
//!
//! Writes are JSON merge patches of `services/status` (see [`write_status`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::{KubeError, request_error};

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "holepunch";

/// The `ipMode` holepunch writes: traffic must go the long way, through the router.
pub const IP_MODE_PROXY: &str = "Proxy";

/// One status write: the ingress a Service of holepunch's class should show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub namespace: String,
    pub name: String,
    /// `Some(ip)`: ingress `[{ip, ipMode: Proxy}]`; `None`: no ingress.
    pub ingress_ip: Option<Ipv4Addr>,
    /// The IPv6 address it is reachable on through its pinhole (README, "IPv6"), listed after
    /// the IPv4 one.
    pub ingress_ip6: Option<Ipv6Addr>,
    /// The Service's resourceVersion when it was read: the write is refused (409) if the
    /// Service changed since, e.g. moved to another class, and is decided again next time.
    pub resource_version: Option<String>,
}

/// Which Services need a status write: holepunch's own class only. Published ones (by
/// `(namespace, name)`) get ingress `[{ip: external_ip, ipMode: "Proxy"}]`, and their IPv6
/// address from `reachable6` after it; unpublished ones, or all when no address is known, get
/// their ingress cleared; already-correct ones are skipped (no write).
pub fn status_updates(
    services: &[Service],
    class: &str,
    external_ip: Option<Ipv4Addr>,
    published: &BTreeSet<(String, String)>,
    reachable6: &BTreeMap<(String, String), Ipv6Addr>,
) -> Vec<StatusUpdate> {
    let mut updates = Vec::new();
    for service in services {
        let own_class = service
            .spec
            .as_ref()
            .and_then(|spec| spec.load_balancer_class.as_deref())
            == Some(class);
        let (Some(namespace), Some(name)) = (&service.metadata.namespace, &service.metadata.name)
        else {
            continue;
        };
        if !own_class {
            continue;
        }
        let key = (namespace.clone(), name.clone());
        let wanted = external_ip.filter(|_| published.contains(&key));
        let wanted6 = reachable6
            .get(&key)
            .copied()
            .filter(|_| published.contains(&key));
        if shows(service, wanted, wanted6) {
            continue;
        }
        updates.push(StatusUpdate {
            namespace: namespace.clone(),
            name: name.clone(),
            ingress_ip: wanted,
            ingress_ip6: wanted6,
            resource_version: service.metadata.resource_version.clone(),
        });
    }
    updates
}

/// Whether the Service's status already shows exactly what holepunch would write.
fn shows(service: &Service, wanted: Option<Ipv4Addr>, wanted6: Option<Ipv6Addr>) -> bool {
    let ingress: &[LoadBalancerIngress] = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let ips = wanted_ips(wanted, wanted6);
    ingress.len() == ips.len()
        && ingress.iter().zip(&ips).all(|(entry, ip)| {
            entry.ip.as_deref() == Some(ip.as_str())
                && entry.ip_mode.as_deref() == Some(IP_MODE_PROXY)
                && entry.hostname.is_none()
                && entry.ports.as_ref().is_none_or(Vec::is_empty)
        })
}

/// The ingress addresses, IPv4 first.
fn wanted_ips(wanted: Option<Ipv4Addr>, wanted6: Option<Ipv6Addr>) -> Vec<String> {
    wanted
        .map(|ip| ip.to_string())
        .into_iter()
        .chain(wanted6.map(|ip| ip.to_string()))
        .collect()
}

/// The merge patch body for one update.
fn patch_body(update: &StatusUpdate) -> serde_json::Value {
    let ingress: Vec<serde_json::Value> = wanted_ips(update.ingress_ip, update.ingress_ip6)
        .into_iter()
        .map(|ip| json!({"ip": ip, "ipMode": IP_MODE_PROXY}))
        .collect();
    let mut body = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    if let Some(rv) = &update.resource_version {
        body["metadata"] = json!({"resourceVersion": rv});
    }
    body
}

/// Writes one update with a JSON merge patch of `services/status`.
///
/// Why a merge patch and not server-side apply: for a Service of its class holepunch is the
/// only writer of `status.loadBalancer` (the class contract), so field ownership buys
/// nothing, while a merge patch replaces the `ingress` list whole (a changed external IP
/// leaves no old entry behind), clears it with `[]`, and takes `metadata.resourceVersion` as
/// a precondition: a Service that changed class between the read and the write is not
/// touched (409, decided again on the next reconcile). It needs only `patch` on
/// `services/status`.
pub async fn write_status(client: &kube::Client, update: &StatusUpdate) -> Result<(), KubeError> {
    let services: Api<Service> = Api::namespaced(client.clone(), &update.namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    services
        .patch_status(&update.name, &params, &Patch::Merge(patch_body(update)))
        .await
        .map_err(|e| request_error("patch", "services/status", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{LoadBalancerStatus, ServiceSpec, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const CLASS: &str = "holepunch.io/router";
    const IP: Ipv4Addr = Ipv4Addr::new(11, 22, 33, 44);

    fn service(name: &str, class: Option<&str>, ingress: &[(&str, Option<&str>)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: class.map(Into::into),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        ingress
                            .iter()
                            .map(|(ip, mode)| LoadBalancerIngress {
                                ip: Some((*ip).into()),
                                ip_mode: mode.map(Into::into),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
                ..Default::default()
            }),
        }
    }

    fn published(names: &[&str]) -> BTreeSet<(String, String)> {
        names
            .iter()
            .map(|n| ("default".to_owned(), (*n).to_owned()))
            .collect()
    }

    /// (name, ingress ip) of each update.
    fn summary(updates: &[StatusUpdate]) -> Vec<(&str, Option<Ipv4Addr>)> {
        updates
            .iter()
            .map(|u| (u.name.as_str(), u.ingress_ip))
            .collect()
    }

    #[test]
    fn status_updates_table() {
        struct Case {
            name: &'static str,
            services: Vec<Service>,
            external_ip: Option<Ipv4Addr>,
            published: &'static [&'static str],
            want: Vec<(&'static str, Option<Ipv4Addr>)>,
        }
        let cases = [
            Case {
                name: "published, empty status: gets the IP",
                services: vec![service("lb", Some(CLASS), &[])],
                external_ip: Some(IP),
                published: &["lb"],
                want: vec![("lb", Some(IP))],
            },
            Case {
                name: "already correct: no write",
                services: vec![service(
                    "lb",
                    Some(CLASS),
                    &[("11.22.33.44", Some("Proxy"))],
                )],
                external_ip: Some(IP),
                published: &["lb"],
                want: vec![],
            },
            Case {
                name: "right IP without ipMode Proxy: rewritten",
                services: vec![service("lb", Some(CLASS), &[("11.22.33.44", None)])],
                external_ip: Some(IP),
                published: &["lb"],
                want: vec![("lb", Some(IP))],
            },
            Case {
                name: "external IP changed: rewritten",
                services: vec![service("lb", Some(CLASS), &[("11.22.33.1", Some("Proxy"))])],
                external_ip: Some(IP),
                published: &["lb"],
                want: vec![("lb", Some(IP))],
            },
            Case {
                name: "no longer published: cleared",
                services: vec![service(
                    "lb",
                    Some(CLASS),
                    &[("11.22.33.44", Some("Proxy"))],
                )],
                external_ip: Some(IP),
                published: &[],
                want: vec![("lb", None)],
            },
            Case {
                name: "external IP unknown: cleared",
                services: vec![service(
                    "lb",
                    Some(CLASS),
                    &[("11.22.33.44", Some("Proxy"))],
                )],
                external_ip: None,
                published: &["lb"],
                want: vec![("lb", None)],
            },
            Case {
                name: "unpublished and empty: no write",
                services: vec![service("lb", Some(CLASS), &[])],
                external_ip: Some(IP),
                published: &[],
                want: vec![],
            },
            Case {
                name: "other class or no class: never touched, even when published",
                services: vec![
                    service(
                        "metallb",
                        Some("metallb.io/l2"),
                        &[("192.168.77.100", None)],
                    ),
                    service("plain", None, &[]),
                ],
                external_ip: Some(IP),
                published: &["metallb", "plain"],
                want: vec![],
            },
        ];
        for case in cases {
            let updates = status_updates(
                &case.services,
                CLASS,
                case.external_ip,
                &published(case.published),
                &BTreeMap::new(),
            );
            assert_eq!(summary(&updates), case.want, "{}", case.name);
        }
    }

    #[test]
    fn a_published_service_with_a_pinhole_lists_its_ipv6_address_after_the_ipv4_one() {
        let v6: Ipv6Addr = "2001:db8:77::10".parse().expect("ip");
        let reachable6: BTreeMap<(String, String), Ipv6Addr> =
            [(("default".to_owned(), "lb".to_owned()), v6)]
                .into_iter()
                .collect();
        let services = [service("lb", Some(CLASS), &[])];
        let updates = status_updates(&services, CLASS, Some(IP), &published(&["lb"]), &reachable6);
        assert_eq!(updates.len(), 1);
        assert_eq!(
            patch_body(&updates[0])["status"]["loadBalancer"]["ingress"],
            json!([
                {"ip": "11.22.33.44", "ipMode": "Proxy"},
                {"ip": "2001:db8:77::10", "ipMode": "Proxy"}
            ])
        );
        // A Service that shows both already needs no write; one that shows only IPv4 does;
        // an unpublished one gets neither.
        let both = service(
            "lb",
            Some(CLASS),
            &[
                ("11.22.33.44", Some("Proxy")),
                ("2001:db8:77::10", Some("Proxy")),
            ],
        );
        let only4 = service("lb", Some(CLASS), &[("11.22.33.44", Some("Proxy"))]);
        assert!(
            status_updates(&[both], CLASS, Some(IP), &published(&["lb"]), &reachable6).is_empty()
        );
        assert_eq!(
            status_updates(&[only4], CLASS, Some(IP), &published(&["lb"]), &reachable6).len(),
            1
        );
        let gone = status_updates(&services, CLASS, Some(IP), &published(&[]), &reachable6);
        assert_eq!(gone.len(), 0, "no ingress shown, none wanted");
    }

    #[test]
    fn the_patch_replaces_the_ingress_and_carries_the_precondition() {
        let set = StatusUpdate {
            namespace: "default".into(),
            name: "lb".into(),
            ingress_ip: Some(IP),
            ingress_ip6: None,
            resource_version: Some("7".into()),
        };
        assert_eq!(
            patch_body(&set),
            json!({
                "metadata": {"resourceVersion": "7"},
                "status": {"loadBalancer": {"ingress": [{"ip": "11.22.33.44", "ipMode": "Proxy"}]}}
            })
        );
        let clear = StatusUpdate {
            ingress_ip: None,
            resource_version: None,
            ..set
        };
        assert_eq!(
            patch_body(&clear),
            json!({"status": {"loadBalancer": {"ingress": []}}})
        );
    }
}
