//! A point-in-time view of the Services, Nodes and EndpointSlices holepunch reads.

use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;

use super::{KubeError, request_error};
use crate::config::KubernetesConfig;

/// Services, Nodes and EndpointSlices, as `desired` takes them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub nodes: Vec<Node>,
    /// Only `externalTrafficPolicy: Local` Services read them (which nodes host endpoints).
    pub endpoint_slices: Vec<EndpointSlice>,
}

impl Snapshot {
    /// Lists the cluster once (only the allowed namespaces when an allow list is set).
    pub async fn list(
        client: &kube::Client,
        config: &KubernetesConfig,
    ) -> Result<Snapshot, KubeError> {
        let services = list_namespaced(client, config, "services").await?;
        let endpoint_slices = list_namespaced(client, config, "endpointslices").await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let nodes = nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| request_error("list", "nodes", e))?
            .items;
        Ok(Snapshot {
            services,
            nodes,
            endpoint_slices,
        })
    }

    /// Reads `kubectl get svc,nodes -A -o yaml` (or `-o json`) output: a `List`, single
    /// objects, or several YAML documents. Objects of other kinds are skipped.
    pub fn from_text(text: &str, origin: &Path) -> Result<Snapshot, KubeError> {
        let parse_error = |detail: String| KubeError::ParseFile {
            path: origin.into(),
            detail,
        };
        // serde-saphyr (YAML 1.2, a superset of JSON) is what kube reads kubeconfigs with; its
        // default budget refuses alias bombs and deep nesting instead of running out of memory.
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(text).map_err(|e| parse_error(e.to_string()))?;
        let mut snapshot = Snapshot::default();
        for value in documents {
            snapshot.add(value).map_err(parse_error)?;
        }
        Ok(snapshot)
    }

    pub fn from_file(path: &Path) -> Result<Snapshot, KubeError> {
        let text = if path == Path::new("-") {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        }
        .map_err(|source| KubeError::ReadFile {
            path: path.into(),
            source,
        })?;
        Snapshot::from_text(&text, path)
    }

    fn add(&mut self, value: serde_json::Value) -> Result<(), String> {
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        let name = || {
            value
                .pointer("/metadata/name")
                .and_then(|n| n.as_str())
                .unwrap_or("?")
                .to_owned()
        };
        match kind.as_str() {
            "List" | "ServiceList" | "NodeList" | "EndpointSliceList" => {
                let items = value
                    .get("items")
                    .and_then(|i| i.as_array())
                    .cloned()
                    .unwrap_or_default();
                for item in items {
                    // Items of typed lists carry no kind of their own.
                    let item = match (kind.as_str(), item) {
                        ("ServiceList", serde_json::Value::Object(mut map)) => {
                            map.entry("kind").or_insert("Service".into());
                            serde_json::Value::Object(map)
                        }
                        ("NodeList", serde_json::Value::Object(mut map)) => {
                            map.entry("kind").or_insert("Node".into());
                            serde_json::Value::Object(map)
                        }
                        ("EndpointSliceList", serde_json::Value::Object(mut map)) => {
                            map.entry("kind").or_insert("EndpointSlice".into());
                            serde_json::Value::Object(map)
                        }
                        (_, item) => item,
                    };
                    self.add(item)?;
                }
            }
            "Service" => {
                let name = name();
                self.services.push(
                    serde_json::from_value(value).map_err(|e| format!("Service {name}: {e}"))?,
                );
            }
            "Node" => {
                let name = name();
                self.nodes
                    .push(serde_json::from_value(value).map_err(|e| format!("Node {name}: {e}"))?);
            }
            "EndpointSlice" => {
                let name = name();
                self.endpoint_slices.push(
                    serde_json::from_value(value)
                        .map_err(|e| format!("EndpointSlice {name}: {e}"))?,
                );
            }
            _ => {}
        }
        Ok(())
    }
}

/// Lists a namespaced kind in all namespaces, or in each allowed one.
async fn list_namespaced<K>(
    client: &kube::Client,
    config: &KubernetesConfig,
    resource: &'static str,
) -> Result<Vec<K>, KubeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let params = ListParams::default();
    let apis: Vec<Api<K>> = if config.namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        config
            .namespaces
            .iter()
            .map(|namespace| Api::namespaced(client.clone(), namespace))
            .collect()
    };
    let mut items = Vec::new();
    for api in apis {
        items.extend(
            api.list(&params)
                .await
                .map_err(|e| request_error("list", resource, e))?
                .items,
        );
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_kubectl_list_and_skips_other_kinds() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec: {ports: [{port: 80, nodePort: 30080}]}
- apiVersion: v1
  kind: Node
  metadata: {name: n1}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-abc, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.0.5], nodeName: n1, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: two, namespace: default}
"#;
        let snapshot = Snapshot::from_text(text, Path::new("x.yaml")).expect("parses");
        assert_eq!(snapshot.services.len(), 2);
        assert_eq!(snapshot.nodes.len(), 1);
        assert_eq!(snapshot.endpoint_slices.len(), 1);
        assert_eq!(
            snapshot.endpoint_slices[0].endpoints[0]
                .node_name
                .as_deref(),
            Some("n1")
        );
    }

    #[test]
    fn reads_json_and_yaml_with_empty_documents_and_refuses_what_is_not_yaml() {
        let json = r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [
            {"metadata": {"name": "web", "namespace": "default"},
             "spec": {"ports": [{"port": 80}]}}]}"#;
        let snapshot = Snapshot::from_text(json, Path::new("x.json")).expect("JSON parses");
        assert_eq!(snapshot.services.len(), 1);
        let yaml = "---\n---\nkind: Node\nmetadata: {name: n1}\n---\n";
        let snapshot = Snapshot::from_text(yaml, Path::new("x.yaml")).expect("YAML parses");
        assert_eq!(snapshot.nodes.len(), 1);
        assert_eq!(
            Snapshot::from_text("", Path::new("empty.yaml"))
                .expect("empty")
                .services
                .len(),
            0
        );
        let err = Snapshot::from_text("kind: [Service\n", Path::new("bad.yaml"))
            .expect_err("unclosed flow sequence");
        assert!(matches!(err, KubeError::ParseFile { .. }), "{err}");
        assert!(err.to_string().starts_with("bad.yaml: "), "{err}");
    }

    #[test]
    fn a_bad_object_names_itself() {
        let text = "kind: Service\nmetadata: {name: web}\nspec: {ports: 7}\n";
        let err = Snapshot::from_text(text, Path::new("x.yaml")).expect_err("bad ports");
        assert!(err.to_string().contains("Service web"), "{err}");
    }
}
