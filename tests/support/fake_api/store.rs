//! Object storage with the apiserver's write semantics: one global resourceVersion, a change
//! history for watches, compaction, server-filled metadata, Service defaulting (ClusterIP and
//! NodePort allocation), the status subresource split, finalizers, and consistent paginated
//! lists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::patch::{self, PatchType};
use super::resources::ResourceDef;
use super::select::Selector;
use super::status::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed write, kept for watches (stored, canonical form).
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub bucket: &'static str,
    pub namespace: String,
    pub kind: ChangeKind,
    pub object: Value,
    /// The object before this change (Modified, Deleted).
    pub previous: Option<Value>,
}

/// Who writes: a client through the HTTP API (status subresource rules apply), or a test
/// through the handle (writes exactly what it is given, status included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Api,
    Direct,
}

/// The main resource or its `status` subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Main,
    Status,
}

type Key = (String, String);

struct ListSnapshot {
    rv: u64,
    items: Arc<Vec<Value>>,
}

pub(crate) struct Store {
    rv: u64,
    /// resourceVersions below this are compacted away (0: nothing compacted).
    compacted_below: u64,
    buckets: HashMap<&'static str, BTreeMap<Key, Value>>,
    history: Vec<Arc<Change>>,
    snapshots: HashMap<u64, ListSnapshot>,
    next_snapshot: u64,
    next_cluster_ip: u32,
    /// Allocated NodePorts and the Service holding each.
    node_ports: BTreeMap<u64, Key>,
}

const INITIAL_NAMESPACES: &[&str] = &["default", "kube-node-lease", "kube-public", "kube-system"];
const NODE_PORT_FIRST: u64 = 30000;
const NODE_PORT_LAST: u64 = 32767;
/// 10.96.0.10: the first ClusterIP handed out (10.96.0.0/12 is the usual service range).
const CLUSTER_IP_FIRST: u32 = 0x0a60_000a;

pub(crate) fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .expect("now is a valid timestamp")
        .to_string()
}

fn random_uid() -> String {
    let v: u128 = rand::random();
    let h = format!("{v:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

pub(crate) fn name_of(obj: &Value) -> Option<&str> {
    meta_str(obj, "name")
}

fn rv_of(obj: &Value) -> Option<&str> {
    meta_str(obj, "resourceVersion")
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// Everything but metadata and status: a change here bumps metadata.generation.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn without_rv(obj: &Value) -> Value {
    let mut v = obj.clone();
    meta_mut(&mut v).remove("resourceVersion");
    v
}

fn valid_dns_label(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn valid_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

fn strip_type_meta(mut obj: Value) -> Value {
    if let Some(m) = obj.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    obj
}

impl Store {
    /// An empty cluster with the namespaces every cluster has.
    pub fn new() -> Store {
        let mut store = Store {
            rv: 0,
            compacted_below: 0,
            buckets: HashMap::new(),
            history: Vec::new(),
            snapshots: HashMap::new(),
            next_snapshot: 1,
            next_cluster_ip: CLUSTER_IP_FIRST,
            node_ports: BTreeMap::new(),
        };
        for ns in INITIAL_NAMESPACES {
            store.ensure_namespace(ns);
        }
        store
    }

    /// Creates the Namespace if it does not exist (the real apiserver would refuse objects in
    /// a missing namespace; the fake creates it on first use).
    fn ensure_namespace(&mut self, namespace: &str) {
        if namespace.is_empty() || self.stored("namespaces", "", namespace).is_some() {
            return;
        }
        let def = super::resources::for_kind("Namespace").expect("Namespace is served");
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        // A valid name cannot fail to create; an invalid one is refused with the object.
        let _ = self.create(def, None, obj, Origin::Direct, false);
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted_below(&self) -> u64 {
        self.compacted_below
    }

    /// Makes every resourceVersion handed out so far too old. The global version moves on by
    /// one (as etcd's does on any write), so a fresh list gives a version that can be watched.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted_below = self.rv;
    }

    pub fn is_too_old(&self, rv: u64) -> bool {
        rv != 0 && rv < self.compacted_below
    }

    /// Changes committed after `cursor`, oldest first.
    pub fn changes_since(&self, cursor: u64) -> &[Arc<Change>] {
        let start = self.history.partition_point(|c| c.rv <= cursor);
        &self.history[start..]
    }

    pub fn stored(&self, bucket: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.buckets
            .get(bucket)?
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn objects(&self, bucket: &str) -> Vec<Value> {
        self.buckets
            .get(bucket)
            .map(|b| b.values().cloned().collect())
            .unwrap_or_default()
    }

    fn commit(
        &mut self,
        bucket: &'static str,
        key: Key,
        kind: ChangeKind,
        mut obj: Value,
        previous: Option<Value>,
    ) -> Value {
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        if bucket == "services" {
            let live = (kind != ChangeKind::Deleted).then_some(&obj);
            self.index_node_ports(&key, live);
        }
        let objects = self.buckets.entry(bucket).or_default();
        match kind {
            ChangeKind::Deleted => {
                objects.remove(&key);
            }
            _ => {
                objects.insert(key.clone(), obj.clone());
            }
        }
        self.history.push(Arc::new(Change {
            rv: self.rv,
            bucket,
            namespace: key.0,
            kind,
            object: obj.clone(),
            previous,
        }));
        obj
    }

    /// Namespace key for an object of `def` addressed in `namespace` (None for cluster scope).
    fn namespace_key(
        def: &ResourceDef,
        obj: &mut Value,
        namespace: Option<&str>,
    ) -> Result<String, ApiError> {
        if !def.namespaced {
            meta_mut(obj).remove("namespace");
            return Ok(String::new());
        }
        let in_obj = meta_str(obj, "namespace").map(str::to_owned);
        let ns = match (namespace, in_obj) {
            (Some(url), Some(body)) if url != body => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(url), _) => url.to_owned(),
            (None, Some(body)) => body,
            (None, None) => "default".to_owned(),
        };
        meta_mut(obj).insert("namespace".into(), json!(ns));
        Ok(ns)
    }

    fn check_type(def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        let api_version = def.api_version();
        match obj.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v != api_version => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )));
            }
            _ => obj["apiVersion"] = json!(api_version),
        }
        match obj.get("kind").and_then(Value::as_str) {
            Some(k) if k != def.kind => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    def.kind
                )));
            }
            _ => obj["kind"] = json!(def.kind),
        }
        Ok(())
    }

    fn validate_name(def: &ResourceDef, name: &str) -> Result<(), ApiError> {
        let ok = if def.kind == "Service" {
            valid_dns_label(name)
        } else {
            valid_dns_subdomain(name)
        };
        if ok {
            Ok(())
        } else {
            Err(ApiError::invalid(
                def,
                name,
                &[(
                    "metadata.name".into(),
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters or '-'",
                        if def.kind == "Service" {
                            "label"
                        } else {
                            "subdomain"
                        }
                    ),
                )],
            ))
        }
    }

    /// events.k8s.io/v1 validation of a new Event (the group is strict where core/v1 is not).
    fn validate_events_v1(def: &ResourceDef, name: &str, obj: &Value) -> Result<(), ApiError> {
        let mut causes = Vec::new();
        for field in [
            "eventTime",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
        ] {
            if obj.get(field).is_none_or(|v| v.is_null() || v == "") {
                causes.push((
                    field.to_owned(),
                    "FieldValueRequired",
                    "Required value".to_owned(),
                ));
            }
        }
        match obj.get("type").and_then(Value::as_str) {
            Some("Normal" | "Warning") => {}
            other => causes.push((
                "type".to_owned(),
                "FieldValueNotSupported",
                format!(
                    "Unsupported value: {:?}: supported values: \"Normal\", \"Warning\"",
                    other.unwrap_or("")
                ),
            )),
        }
        if obj
            .get("note")
            .and_then(Value::as_str)
            .is_some_and(|n| n.len() > 1024)
        {
            causes.push((
                "note".to_owned(),
                "FieldValueTooLong",
                "Too long: may not be more than 1024 bytes".to_owned(),
            ));
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(def, name, &causes))
        }
    }

    // ----- reads -----

    pub fn get(&self, def: &ResourceDef, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.stored(def.bucket, namespace, name)
            .map(|o| def.present(o))
            .ok_or_else(|| ApiError::not_found(def, name))
    }

    /// The bucket as it was at resourceVersion `at`, rebuilt from the history.
    fn bucket_at(&self, bucket: &str, at: u64) -> BTreeMap<Key, Value> {
        let mut objects = self.buckets.get(bucket).cloned().unwrap_or_default();
        for change in self.history.iter().rev().take_while(|c| c.rv > at) {
            if change.bucket != bucket {
                continue;
            }
            let key = (
                change.namespace.clone(),
                name_of(&change.object).unwrap_or("").to_owned(),
            );
            match (&change.kind, &change.previous) {
                (ChangeKind::Added, _) => {
                    objects.remove(&key);
                }
                (_, Some(prev)) => {
                    objects.insert(key, prev.clone());
                }
                (_, None) => {}
            }
        }
        objects
    }

    #[allow(clippy::too_many_arguments)]
    pub fn list(
        &mut self,
        def: &ResourceDef,
        namespace: Option<&str>,
        selector: &Selector,
        limit: Option<usize>,
        continue_token: Option<&str>,
        resource_version: Option<&str>,
        rv_match: Option<&str>,
    ) -> Result<Value, ApiError> {
        let limit = limit.filter(|l| *l > 0);
        let (items, list_rv, offset, snapshot_id) = if let Some(token) = continue_token {
            let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
            let mut parts = token.splitn(3, '.');
            let (Some(rv), Some(id), Some(offset)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            let (rv, id, offset): (u64, u64, usize) = (
                rv.parse().map_err(|_| bad())?,
                id.parse().map_err(|_| bad())?,
                offset.parse().map_err(|_| bad())?,
            );
            let expired = || {
                ApiError::expired(format!(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter. (resourceVersion {rv}, compacted below {})",
                    self.compacted_below
                ))
            };
            if self.is_too_old(rv) {
                self.snapshots.remove(&id);
                return Err(expired());
            }
            let snap = self.snapshots.get(&id).ok_or_else(expired)?;
            (snap.items.clone(), rv, offset, Some(id))
        } else {
            let exact_rv = match (resource_version, rv_match) {
                (Some(rv), Some("Exact")) => {
                    let n: u64 = rv.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                    })?;
                    if self.is_too_old(n) || n == 0 {
                        return Err(ApiError::expired(format!(
                            "too old resource version: {n} ({})",
                            self.compacted_below
                        )));
                    }
                    if n > self.rv {
                        return Err(ApiError::new(
                            504,
                            "Timeout",
                            format!("Too large resource version: {n}, current: {}", self.rv),
                        ));
                    }
                    Some(n)
                }
                (Some(rv), _) if !rv.is_empty() => {
                    rv.parse::<u64>().map_err(|_| {
                        ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                    })?;
                    None
                }
                _ => None,
            };
            let rebuilt;
            let (objects, list_rv) = match exact_rv {
                Some(n) => {
                    rebuilt = self.bucket_at(def.bucket, n);
                    (Some(&rebuilt), n)
                }
                None => (self.buckets.get(def.bucket), self.rv),
            };
            let items: Vec<Value> = objects
                .into_iter()
                .flatten()
                .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                .map(|(_, obj)| def.present(obj))
                .filter(|obj| selector.matches(obj))
                .map(strip_type_meta)
                .collect();
            (Arc::new(items), list_rv, 0, None)
        };

        let end = match limit {
            Some(l) => (offset + l).min(items.len()),
            None => items.len(),
        };
        let page: Vec<Value> = items[offset.min(end)..end].to_vec();
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if end < items.len() {
            let id = match snapshot_id {
                Some(id) => id,
                None => {
                    let id = self.next_snapshot;
                    self.next_snapshot += 1;
                    self.snapshots.insert(
                        id,
                        ListSnapshot {
                            rv: list_rv,
                            items: items.clone(),
                        },
                    );
                    id
                }
            };
            metadata["continue"] = json!(format!("{list_rv}.{id}.{end}"));
            if selector.is_empty() {
                metadata["remainingItemCount"] = json!(items.len() - end);
            }
        } else if let Some(id) = snapshot_id {
            self.snapshots.remove(&id);
        }
        // Snapshots of lists nobody finished stay until compaction makes them useless.
        let compacted_below = self.compacted_below;
        self.snapshots.retain(|_, s| s.rv >= compacted_below);

        Ok(json!({
            "kind": format!("{}List", def.kind),
            "apiVersion": def.api_version(),
            "metadata": metadata,
            "items": page,
        }))
    }

    // ----- Service defaulting -----

    /// NodePorts (and health-check NodePorts) held by Services other than `except`.
    fn used_node_ports(&self, except: &Key) -> HashSet<u64> {
        self.node_ports
            .iter()
            .filter(|(_, owner)| *owner != except)
            .map(|(port, _)| *port)
            .collect()
    }

    fn index_node_ports(&mut self, key: &Key, svc: Option<&Value>) {
        self.node_ports.retain(|_, owner| owner != key);
        let Some(svc) = svc else { return };
        let ports = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("nodePort").and_then(Value::as_u64));
        let health = svc
            .pointer("/spec/healthCheckNodePort")
            .and_then(Value::as_u64);
        for port in ports.chain(health).filter(|p| *p != 0) {
            self.node_ports.insert(port, key.clone());
        }
    }

    fn allocate_node_port(used: &mut HashSet<u64>) -> Option<u64> {
        let port = (NODE_PORT_FIRST..=NODE_PORT_LAST).find(|p| !used.contains(p))?;
        used.insert(port);
        Some(port)
    }

    /// What the real apiserver fills in on a Service: type, ClusterIP(s), IP families,
    /// traffic policies, port protocol/targetPort, NodePorts (kept across updates that omit
    /// them) and the health-check NodePort of `externalTrafficPolicy: Local` LoadBalancers.
    fn default_service(
        &mut self,
        def: &ResourceDef,
        key: &Key,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let name = key.1.clone();
        let invalid = |field: String, detail: String| {
            ApiError::invalid(def, &name, &[(field, "FieldValueInvalid", detail)])
        };
        if !svc.get("spec").is_some_and(Value::is_object) {
            svc["spec"] = json!({});
        }
        let old_spec = old.and_then(|o| o.get("spec"));
        let mut used = self.used_node_ports(key);
        let spec = svc["spec"].as_object_mut().expect("spec is an object");
        let svc_type = spec
            .entry("type")
            .or_insert(json!("ClusterIP"))
            .as_str()
            .unwrap_or("ClusterIP")
            .to_owned();
        if !matches!(
            svc_type.as_str(),
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        ) {
            return Err(invalid(
                "spec.type".into(),
                format!(
                    "Unsupported value: {svc_type:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
                ),
            ));
        }
        spec.entry("sessionAffinity").or_insert(json!("None"));

        if svc_type != "ExternalName" {
            let old_ip = old_spec
                .and_then(|s| s.get("clusterIP"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            let given = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            let ip = match (given, old_ip) {
                (Some(g), Some(o)) if g != o => {
                    return Err(invalid(
                        "spec.clusterIPs[0]".into(),
                        format!("Invalid value: {g:?}: may not change once set"),
                    ));
                }
                (Some(g), _) => g,
                (None, Some(o)) => o,
                (None, None) => {
                    let ip = std::net::Ipv4Addr::from(self.next_cluster_ip).to_string();
                    self.next_cluster_ip += 1;
                    ip
                }
            };
            spec.insert("clusterIP".into(), json!(ip));
            spec.entry("clusterIPs").or_insert(json!([ip]));
            spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
            spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
            spec.entry("internalTrafficPolicy")
                .or_insert(json!("Cluster"));
        }

        let wants_node_ports = match svc_type.as_str() {
            "NodePort" => true,
            "LoadBalancer" => {
                let alloc = spec
                    .entry("allocateLoadBalancerNodePorts")
                    .or_insert(json!(true));
                alloc.as_bool() != Some(false)
            }
            _ => false,
        };
        if matches!(svc_type.as_str(), "NodePort" | "LoadBalancer") {
            spec.entry("externalTrafficPolicy")
                .or_insert(json!("Cluster"));
        } else {
            spec.remove("externalTrafficPolicy");
        }

        let old_ports: Vec<Value> = old_spec
            .and_then(|s| s.get("ports"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut seen_node_ports = HashSet::new();
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for (i, port) in ports.iter_mut().enumerate() {
                let Some(p) = port.as_object_mut() else {
                    continue;
                };
                let number = p.get("port").and_then(Value::as_u64).unwrap_or(0);
                if number == 0 || number > 65535 {
                    return Err(invalid(
                        format!("spec.ports[{i}].port"),
                        format!("Invalid value: {number}: must be between 1 and 65535, inclusive"),
                    ));
                }
                let protocol = p
                    .entry("protocol")
                    .or_insert(json!("TCP"))
                    .as_str()
                    .unwrap_or("TCP")
                    .to_owned();
                p.entry("targetPort").or_insert(json!(number));
                if !wants_node_ports {
                    p.remove("nodePort");
                    continue;
                }
                match p
                    .get("nodePort")
                    .and_then(Value::as_u64)
                    .filter(|n| *n != 0)
                {
                    Some(given) => {
                        let was_ours = old_ports
                            .iter()
                            .any(|o| o.get("nodePort").and_then(Value::as_u64) == Some(given));
                        if !(NODE_PORT_FIRST..=NODE_PORT_LAST).contains(&given) {
                            return Err(invalid(
                                format!("spec.ports[{i}].nodePort"),
                                format!(
                                    "Invalid value: {given}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                                ),
                            ));
                        }
                        if (used.contains(&given) && !was_ours) || !seen_node_ports.insert(given) {
                            return Err(invalid(
                                format!("spec.ports[{i}].nodePort"),
                                format!(
                                    "Invalid value: {given}: provided port is already allocated"
                                ),
                            ));
                        }
                        used.insert(given);
                    }
                    None => {
                        let kept = old_ports
                            .iter()
                            .find(|o| {
                                o.get("port").and_then(Value::as_u64) == Some(number)
                                    && o.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                                        == protocol
                            })
                            .and_then(|o| o.get("nodePort").and_then(Value::as_u64));
                        let port = match kept {
                            Some(k) => k,
                            None => Self::allocate_node_port(&mut used).ok_or_else(|| {
                                ApiError::new(
                                    500,
                                    "InternalError",
                                    "range is full: no NodePort left",
                                )
                            })?,
                        };
                        seen_node_ports.insert(port);
                        p.insert("nodePort".into(), json!(port));
                    }
                }
            }
        }

        let local_lb = svc_type == "LoadBalancer"
            && spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
        if local_lb {
            if spec
                .get("healthCheckNodePort")
                .and_then(Value::as_u64)
                .is_none_or(|p| p == 0)
            {
                let port = old_spec
                    .and_then(|s| s.get("healthCheckNodePort"))
                    .and_then(Value::as_u64)
                    .or_else(|| Self::allocate_node_port(&mut used))
                    .unwrap_or(0);
                spec.insert("healthCheckNodePort".into(), json!(port));
            }
        } else {
            spec.remove("healthCheckNodePort");
        }
        Ok(())
    }

    // ----- writes -----

    /// POST (Origin::Api), or a test's `apply_object` of a new object (Origin::Direct).
    pub fn create(
        &mut self,
        def: &ResourceDef,
        namespace: Option<&str>,
        mut obj: Value,
        origin: Origin,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        Self::check_type(def, &mut obj)?;
        let ns = Self::namespace_key(def, &mut obj, namespace)?;
        let name = match (name_of(&obj), meta_str(&obj, "generateName")) {
            (Some(n), _) => n.to_owned(),
            (None, Some(prefix)) => format!("{prefix}{}", random_suffix()),
            (None, None) => {
                return Err(ApiError::invalid(
                    def,
                    "",
                    &[(
                        "metadata.name".into(),
                        "FieldValueRequired",
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
        };
        Self::validate_name(def, &name)?;
        if origin == Origin::Api && rv_of(&obj).is_some() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        if def.group == "events.k8s.io" {
            Self::validate_events_v1(def, &name, &obj)?;
        }
        let key = (ns, name.clone());
        if self.stored(def.bucket, &key.0, &key.1).is_some() {
            return Err(ApiError::already_exists(def, &name));
        }

        let mut obj = def.to_canonical(obj);
        let canonical = def.canonical();
        {
            let meta = meta_mut(&mut obj);
            meta.insert("name".into(), json!(name));
            meta.insert("uid".into(), json!(random_uid()));
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
            meta.insert("generation".into(), json!(1));
            for server_owned in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(server_owned);
            }
        }
        match canonical.kind {
            "Service" => {
                if origin == Origin::Api || obj.get("status").is_none() {
                    obj["status"] = json!({"loadBalancer": {}});
                }
                self.default_service(canonical, &key, &mut obj, None)?;
            }
            "Namespace" => {
                if origin == Origin::Api || obj.get("status").is_none() {
                    obj["status"] = json!({"phase": "Active"});
                }
                if obj.pointer("/spec/finalizers").is_none() {
                    obj["spec"] = json!({"finalizers": ["kubernetes"]});
                }
                let labels = meta_mut(&mut obj).entry("labels").or_insert(json!({}));
                if let Some(labels) = labels.as_object_mut() {
                    labels.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
            _ => {}
        }
        if dry_run {
            return Ok(def.present(&obj));
        }
        if canonical.namespaced {
            self.ensure_namespace(&key.0);
        }
        let stored = self.commit(canonical.bucket, key, ChangeKind::Added, obj, None);
        Ok(def.present(&stored))
    }

    /// PUT of the main resource or of `status`; also the second half of PATCH.
    /// `new` is in `def`'s representation; a non-empty metadata.resourceVersion in it is a
    /// precondition.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        mut new: Value,
        target: Target,
        origin: Origin,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.stored(def.bucket, namespace, name).cloned() else {
            return Err(ApiError::not_found(def, name));
        };
        Self::check_type(def, &mut new)?;
        if let Some(body_name) = name_of(&new)
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if def.namespaced
            && let Some(body_ns) = meta_str(&new, "namespace")
            && body_ns != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if let Some(want) = rv_of(&new)
            && Some(want) != rv_of(&old)
        {
            return Err(ApiError::modified(def, name));
        }

        let canonical = def.canonical();
        let new = def.to_canonical(new);
        let mut new = match target {
            Target::Status => {
                let mut merged = old.clone();
                match new.get("status") {
                    Some(status) => merged["status"] = status.clone(),
                    None => {
                        if let Some(m) = merged.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                merged
            }
            Target::Main => {
                let mut new = new;
                if def.status && origin == Origin::Api {
                    match old.get("status") {
                        Some(status) => new["status"] = status.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                new
            }
        };
        {
            let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
            let meta = meta_mut(&mut new);
            meta.insert("name".into(), json!(name));
            if def.namespaced {
                meta.insert("namespace".into(), json!(namespace));
            }
            for server_owned in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match old_meta.get(server_owned) {
                    Some(v) => meta.insert(server_owned.into(), v.clone()),
                    None => meta.remove(server_owned),
                };
            }
            meta.remove("managedFields");
            meta.remove("selfLink");
        }
        let key = (namespace.to_owned(), name.to_owned());
        if canonical.kind == "Service" {
            self.default_service(canonical, &key, &mut new, Some(&old))?;
        }
        if spec_part(&new) != spec_part(&old) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        if without_rv(&new) == without_rv(&old) {
            return Ok(def.present(&old));
        }
        if dry_run {
            return Ok(def.present(&new));
        }
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        let kind = if deleting && !has_finalizers(&new) {
            ChangeKind::Deleted
        } else {
            ChangeKind::Modified
        };
        let stored = self.commit(canonical.bucket, key, kind, new, Some(old));
        Ok(def.present(&stored))
    }

    /// PATCH; an apply patch of a missing object creates it.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        patch_type: PatchType,
        body: &Value,
        target: Target,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if patch_type == PatchType::Apply {
            let mut typed = body.clone();
            Self::check_type(def, &mut typed)?;
        }
        let Some(old) = self.stored(def.bucket, namespace, name) else {
            if patch_type == PatchType::Apply && target == Target::Main {
                let mut obj = body.clone();
                meta_mut(&mut obj).insert("name".into(), json!(name));
                let ns = def.namespaced.then_some(namespace);
                return self.create(def, ns, obj, Origin::Api, dry_run);
            }
            return Err(ApiError::not_found(def, name));
        };
        let old_presented = def.present(old);
        let mut patched = old_presented.clone();
        patch::apply(patch_type, &mut patched, body).map_err(|message| {
            if patch_type == PatchType::Json {
                ApiError::new(422, "Invalid", message)
            } else {
                ApiError::bad_request(message)
            }
        })?;
        // A resourceVersion the patch put in is a precondition; the one it kept is not.
        if rv_of(&patched) == rv_of(&old_presented) {
            meta_mut(&mut patched).remove("resourceVersion");
        }
        self.update(def, namespace, name, patched, target, Origin::Api, dry_run)
    }

    /// DELETE of one object; `options` is the DeleteOptions body (may be null).
    pub fn delete(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        options: &Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.stored(def.bucket, namespace, name).cloned() else {
            return Err(ApiError::not_found(def, name));
        };
        let preconditions = options.get("preconditions");
        if let Some(uid) = preconditions
            .and_then(|p| p.get("uid"))
            .and_then(Value::as_str)
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                def,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = preconditions
            .and_then(|p| p.get("resourceVersion"))
            .and_then(Value::as_str)
            && Some(rv) != rv_of(&old)
        {
            return Err(ApiError::conflict(
                def,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    rv_of(&old).unwrap_or("")
                ),
            ));
        }
        if dry_run {
            return Ok(def.present(&old));
        }
        let key = (namespace.to_owned(), name.to_owned());
        let bucket = def.canonical().bucket;
        if has_finalizers(&old) {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(def.present(&old));
            }
            let mut marked = old.clone();
            let meta = meta_mut(&mut marked);
            meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            let stored = self.commit(bucket, key, ChangeKind::Modified, marked, Some(old));
            return Ok(def.present(&stored));
        }
        if bucket == "namespaces" {
            self.delete_contents(name);
        }
        let stored = self.commit(bucket, key, ChangeKind::Deleted, old.clone(), Some(old));
        Ok(def.present(&stored))
    }

    /// Deletes every object in a namespace that goes away (at once: no Terminating phase).
    fn delete_contents(&mut self, namespace: &str) {
        let doomed: Vec<(&'static str, Key, Value)> = self
            .buckets
            .iter()
            .filter(|(bucket, _)| **bucket != "namespaces")
            .flat_map(|(bucket, objects)| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| ns == namespace)
                    .map(|(k, v)| (*bucket, k.clone(), v.clone()))
            })
            .collect();
        for (bucket, key, old) in doomed {
            self.commit(bucket, key, ChangeKind::Deleted, old.clone(), Some(old));
        }
    }

    /// DELETE of a collection: deletes what matches and answers the list of deleted objects.
    pub fn delete_collection(
        &mut self,
        def: &ResourceDef,
        namespace: Option<&str>,
        selector: &Selector,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let keys: Vec<Key> = self
            .buckets
            .get(def.bucket)
            .into_iter()
            .flatten()
            .filter(|((ns, _), obj)| {
                namespace.is_none_or(|want| want == ns) && selector.matches(&def.present(obj))
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut deleted = Vec::new();
        for (ns, name) in keys {
            deleted.push(strip_type_meta(self.delete(
                def,
                &ns,
                &name,
                &Value::Null,
                dry_run,
            )?));
        }
        Ok(json!({
            "kind": format!("{}List", def.kind),
            "apiVersion": def.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": deleted,
        }))
    }

    /// A test's direct removal: no finalizers, no preconditions.
    pub fn remove(&mut self, def: &ResourceDef, namespace: &str, name: &str) -> Option<Value> {
        let old = self.stored(def.bucket, namespace, name)?.clone();
        let key = (namespace.to_owned(), name.to_owned());
        if def.bucket == "namespaces" {
            self.delete_contents(name);
        }
        Some(self.commit(
            def.canonical().bucket,
            key,
            ChangeKind::Deleted,
            old.clone(),
            Some(old),
        ))
    }
}
