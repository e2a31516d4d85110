//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386), and a strategic merge
//! patch that knows the merge keys of the fields holepunch's objects use. Server-side apply is
//! served with the same strategic merge of the applied fields.
//!
//! Simplifications against the real apiserver (sigs.k8s.io/structured-merge-diff):
//! - merge keys come from a short table keyed by field path (`spec.ports` by `port`,
//!   `status.conditions` and `status.addresses` by `type`, `spec.taints` by `key`,
//!   `metadata.ownerReferences` by `uid`); every other list is replaced whole;
//!   `metadata.finalizers` is merged as a set;
//! - `$patch: delete|replace` and `$deleteFromPrimitiveList/<field>` are honoured,
//!   `$setElementOrder/<field>` and `$retainKeys` are accepted and ignored;
//! - apply keeps no managedFields: fields a manager stops applying are not removed, and there
//!   are no conflicts between managers (so `force` changes nothing).

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let mime = content_type.split(';').next().unwrap_or("").trim();
        match mime {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Parses a PATCH body into JSON (apply bodies are YAML, of which JSON is a subset).
pub(crate) fn parse_body(patch_type: PatchType, body: &[u8]) -> Result<Value, String> {
    match patch_type {
        PatchType::Apply => {
            serde_saphyr::from_slice::<Value>(body).map_err(|e| format!("error decoding YAML: {e}"))
        }
        _ => {
            serde_json::from_slice::<Value>(body).map_err(|e| format!("error decoding patch: {e}"))
        }
    }
}

/// Applies `patch` to `target`; the error is the message of a 422 (JSON patch) or 400.
pub(crate) fn apply(
    patch_type: PatchType,
    target: &mut Value,
    patch: &Value,
) -> Result<(), String> {
    match patch_type {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| {
                format!("the server rejected our request due to an error in our request: {e}")
            })?;
            json_patch::patch(target, &ops).map_err(|e| e.to_string())
        }
        PatchType::Merge => {
            if !patch.is_object() {
                return Err("merge patch must be a JSON object".into());
            }
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchType::Strategic | PatchType::Apply => {
            if !patch.is_object() {
                return Err("strategic merge patch must be a JSON object".into());
            }
            strategic_merge(target, patch, &mut Vec::new());
            Ok(())
        }
    }
}

enum ListStrategy {
    Keyed(&'static str),
    Set,
    Replace,
}

fn list_strategy(path: &[String]) -> ListStrategy {
    let joined = path.join(".");
    match joined.as_str() {
        "spec.ports" => ListStrategy::Keyed("port"),
        "status.conditions" | "status.addresses" => ListStrategy::Keyed("type"),
        "spec.taints" => ListStrategy::Keyed("key"),
        "metadata.ownerReferences" => ListStrategy::Keyed("uid"),
        "metadata.finalizers" => ListStrategy::Set,
        _ => ListStrategy::Replace,
    }
}

fn is_directive(key: &str) -> bool {
    key.starts_with('$')
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !is_directive(k))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn patch_directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

fn strategic_merge(target: &mut Value, patch: &Value, path: &mut Vec<String>) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if patch_directive(patch) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(remove)) = (
                target.get_mut(field).and_then(Value::as_array_mut),
                value.as_array(),
            ) {
                list.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if is_directive(key) {
            continue;
        }
        let map = target.as_object_mut().expect("made an object above");
        if value.is_null() || patch_directive(value) == Some("delete") {
            map.remove(key);
            continue;
        }
        path.push(key.clone());
        let slot = map.entry(key.clone()).or_insert(Value::Null);
        match value {
            Value::Object(_) => strategic_merge(slot, value, path),
            Value::Array(items) => merge_list(slot, items, path),
            other => *slot = other.clone(),
        }
        path.pop();
    }
}

fn merge_list(target: &mut Value, items: &[Value], path: &mut Vec<String>) {
    if items.iter().any(|i| patch_directive(i) == Some("replace")) {
        *target = Value::Array(
            items
                .iter()
                .filter(|i| patch_directive(i) != Some("replace"))
                .map(strip_directives)
                .collect(),
        );
        return;
    }
    match list_strategy(path) {
        ListStrategy::Replace => *target = strip_directives(&Value::Array(items.to_vec())),
        ListStrategy::Set => {
            if !target.is_array() {
                *target = Value::Array(Vec::new());
            }
            let list = target.as_array_mut().expect("made an array above");
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
        }
        ListStrategy::Keyed(merge_key) => {
            if !target.is_array() {
                *target = Value::Array(Vec::new());
            }
            for item in items {
                let key_value = item.get(merge_key).cloned();
                let list = target.as_array_mut().expect("made an array above");
                let existing = key_value
                    .as_ref()
                    .and_then(|kv| list.iter().position(|e| e.get(merge_key) == Some(kv)));
                if patch_directive(item) == Some("delete") {
                    if let Some(i) = existing {
                        list.remove(i);
                    }
                    continue;
                }
                match existing {
                    Some(i) => strategic_merge(&mut list[i], item, path),
                    None => list.push(strip_directives(item)),
                }
            }
        }
    }
}
