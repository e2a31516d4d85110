//! The resource types the fake serves, their discovery documents, and the conversion between
//! the two representations of Events (core/v1 and events.k8s.io/v1), which the real apiserver
//! keeps in one storage.

use serde_json::{Map, Value, json};

/// One REST resource: a (group, version, plural) the fake answers for.
#[derive(Debug)]
pub(crate) struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Has a `status` subresource: the main resource ignores `.status`, the subresource
    /// changes only `.status`.
    pub status: bool,
    /// Storage bucket; two resources with the same bucket are two views of the same objects.
    pub bucket: &'static str,
    /// Field selector labels the real apiserver accepts besides metadata.name/namespace.
    pub field_labels: &'static [&'static str],
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

const EVENT_FIELDS_CORE: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];
const EVENT_FIELDS_EVENTS: &[&str] = &[
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "type",
];

pub(crate) const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        status: true,
        bucket: "services",
        field_labels: &["spec.clusterIP", "spec.type"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        categories: &[],
        status: true,
        bucket: "nodes",
        field_labels: &["spec.unschedulable"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        status: true,
        bucket: "namespaces",
        field_labels: &["status.phase"],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        status: false,
        bucket: "events",
        field_labels: EVENT_FIELDS_CORE,
    },
    ResourceDef {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        categories: &[],
        status: false,
        bucket: "endpointslices",
        field_labels: &[],
    },
    ResourceDef {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        status: false,
        bucket: "events",
        field_labels: EVENT_FIELDS_EVENTS,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        categories: &[],
        status: false,
        bucket: "configmaps",
        field_labels: &[],
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        categories: &[],
        status: false,
        bucket: "leases",
        field_labels: &[],
    },
];

/// API groups other than core, in discovery order.
const GROUPS: &[&str] = &["discovery.k8s.io", "events.k8s.io", "coordination.k8s.io"];

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `services`, `endpointslices.discovery.k8s.io`: how error messages name the resource.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Service`, `Event.events.k8s.io`: how validation messages name the kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// The representation objects are stored in (core/v1 for Events).
    pub fn canonical(&self) -> &'static ResourceDef {
        RESOURCES
            .iter()
            .find(|d| d.bucket == self.bucket)
            .expect("every bucket has a resource")
    }

    fn is_events_v1(&self) -> bool {
        self.group == "events.k8s.io"
    }

    /// Stored (canonical) object -> this resource's representation.
    pub fn present(&self, stored: &Value) -> Value {
        if self.is_events_v1() {
            core_event_to_events_v1(stored)
        } else {
            stored.clone()
        }
    }

    /// This resource's representation -> the stored (canonical) form.
    pub fn to_canonical(&self, obj: Value) -> Value {
        if self.is_events_v1() {
            events_v1_to_core_event(&obj)
        } else {
            obj
        }
    }
}

pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|d| d.group == group && d.version == version && d.plural == plural)
}

pub(crate) fn group_known(group: &str, version: &str) -> bool {
    RESOURCES
        .iter()
        .any(|d| d.group == group && d.version == version)
}

/// The resource for an object's `apiVersion` and `kind`.
pub(crate) fn for_type(api_version: &str, kind: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|d| d.api_version() == api_version && d.kind == kind)
}

/// The canonical resource for a kind name (`"Event"` is core/v1).
pub(crate) fn for_kind(kind: &str) -> Option<&'static ResourceDef> {
    RESOURCES.iter().find(|d| d.kind == kind)
}

pub(crate) fn version_doc() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-holepunch-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub(crate) fn api_versions_doc(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

fn group_doc(group: &str) -> Value {
    let gv = format!("{group}/v1");
    json!({
        "name": group,
        "versions": [{"groupVersion": gv, "version": "v1"}],
        "preferredVersion": {"groupVersion": gv, "version": "v1"}
    })
}

pub(crate) fn group_list_doc() -> Value {
    let groups: Vec<Value> = GROUPS.iter().map(|g| group_doc(g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub(crate) fn group_doc_for(group: &str) -> Option<Value> {
    GROUPS.contains(&group).then(|| {
        let mut doc = group_doc(group);
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        doc
    })
}

pub(crate) fn resource_list_doc(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for d in RESOURCES
        .iter()
        .filter(|d| d.group == group && d.version == version)
    {
        let mut r = json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": ALL_VERBS,
            "storageVersionHash": format!("fake-{}", d.plural),
        });
        if !d.short_names.is_empty() {
            r["shortNames"] = json!(d.short_names);
        }
        if !d.categories.is_empty() {
            r["categories"] = json!(d.categories);
        }
        resources.push(r);
        if d.status {
            resources.push(json!({
                "name": format!("{}/status", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources
    })
}

/// Field renames between core/v1 Event (left) and events.k8s.io/v1 Event (right); the other
/// fields (metadata, eventTime, series, reportingInstance, action, reason, related, type) keep
/// their names.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename_fields(obj: &Value, api_version: &str, forward: bool) -> Value {
    let mut out = Map::new();
    if let Some(map) = obj.as_object() {
        for (k, v) in map {
            let renamed = EVENT_RENAMES.iter().find_map(|(core, ev)| {
                if forward && k == core {
                    Some(*ev)
                } else if !forward && k == ev {
                    Some(*core)
                } else {
                    None
                }
            });
            if v.is_null() {
                continue;
            }
            out.insert(renamed.unwrap_or(k).to_owned(), v.clone());
        }
    }
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    Value::Object(out)
}

pub(crate) fn core_event_to_events_v1(core: &Value) -> Value {
    rename_fields(core, "events.k8s.io/v1", true)
}

pub(crate) fn events_v1_to_core_event(ev: &Value) -> Value {
    rename_fields(ev, "v1", false)
}

/// `/openapi/v3`: one document per group-version.
pub(crate) fn openapi_v3_root() -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<(&str, &str)> = RESOURCES.iter().map(|d| (d.group, d.version)).collect();
    gvs.dedup();
    for (group, version) in gvs {
        let path = openapi_gv_path(group, version);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=holepunch-fake")}),
        );
    }
    json!({"paths": paths})
}

fn openapi_gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3/<api|apis/group>/<version>`: no schemas, only the PATCH operations with their
/// `x-kubernetes-group-version-kind` and the `fieldValidation` parameter. That is what
/// kubectl's field-validation probe reads (k8s.io/cli-runtime, `queryParamVerifierV3`): it
/// then leaves validation to the server (`?fieldValidation=Strict`, accepted here) instead
/// of failing to download a schema.
pub(crate) fn openapi_v3_doc(gv_path: &str) -> Option<Value> {
    let mut paths = Map::new();
    for d in RESOURCES
        .iter()
        .filter(|d| openapi_gv_path(d.group, d.version) == gv_path)
    {
        let item = if d.namespaced {
            format!("/{gv_path}/namespaces/{{namespace}}/{}/{{name}}", d.plural)
        } else {
            format!("/{gv_path}/{}/{{name}}", d.plural)
        };
        let patch = json!({
            "operationId": format!("patch{}", d.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": d.group, "version": d.version, "kind": d.kind},
            "parameters": [
                {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                {"name": "force", "in": "query", "schema": {"type": "boolean"}}
            ],
            "responses": {"200": {"description": "OK"}}
        });
        paths.insert(item, json!({"patch": patch}));
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (holepunch fake)", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}}
    }))
}
