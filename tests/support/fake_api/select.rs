//! Label selectors (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`) and field selectors
//! (`path=value`, `path==value`, `path!=value`), as in k8s.io/apimachinery's `labels` and
//! `fields` packages. Field labels are checked against the resource's list, like the real
//! apiserver does, so a test cannot pass here with a selector a real cluster refuses.

use serde_json::Value;

use super::resources::ResourceDef;

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone)]
struct FieldReq {
    label: String,
    value: String,
    negate: bool,
}

/// A parsed `labelSelector` + `fieldSelector` pair.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(rest: &str, raw: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: {raw}: expected a set like (a,b)"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_label_req(raw: &str) -> Result<LabelReq, String> {
    let bad = || format!("unable to parse requirement: {raw:?}");
    if let Some(key) = raw.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key)
            .then(|| LabelReq::NotExists(key.to_owned()))
            .ok_or_else(bad);
    }
    if let Some((k, v)) = raw.split_once("!=") {
        return Ok(LabelReq::NotEq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = raw.split_once("==") {
        return Ok(LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = raw.split_once('=') {
        return Ok(LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, rest)) = raw.split_once(" notin ") {
        return Ok(LabelReq::NotIn(k.trim().to_owned(), parse_set(rest, raw)?));
    }
    if let Some((k, rest)) = raw.split_once(" in ") {
        return Ok(LabelReq::In(k.trim().to_owned(), parse_set(rest, raw)?));
    }
    valid_key(raw)
        .then(|| LabelReq::Exists(raw.to_owned()))
        .ok_or_else(bad)
}

impl Selector {
    /// Parses both selectors; the error is the message of a 400 BadRequest.
    pub fn parse(
        def: &ResourceDef,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Selector, String> {
        let mut sel = Selector::default();
        for raw in split_top_level(label_selector.unwrap_or("")) {
            sel.labels.push(parse_label_req(&raw)?);
        }
        for raw in split_top_level(field_selector.unwrap_or("")) {
            let (label, value, negate) = if let Some((k, v)) = raw.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = raw.split_once("==") {
                (k, v, false)
            } else if let Some((k, v)) = raw.split_once('=') {
                (k, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{raw}'; can't understand '{raw}'"
                ));
            };
            let label = label.trim();
            let allowed = label == "metadata.name"
                || (def.namespaced && label == "metadata.namespace")
                || def.field_labels.contains(&label);
            if !allowed {
                return Err(format!("field label not supported: {label}"));
            }
            sel.fields.push(FieldReq {
                label: label.to_owned(),
                value: value.trim().to_owned(),
                negate,
            });
        }
        Ok(sel)
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// Does the object (in the representation the client asked for) match?
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self
                .fields
                .iter()
                .all(|req| (field_value(obj, &req.label) == req.value) != req.negate)
    }
}

/// The string a field label stands for; a missing field is "" (as for the real apiserver,
/// where `spec.unschedulable` of a schedulable node is "false").
fn field_value(obj: &Value, label: &str) -> String {
    let path = match label {
        // core/v1 Event's `source` label is the source's component.
        "source" => "source.component",
        other => other,
    };
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => {
                return if label == "spec.unschedulable" {
                    "false".into()
                } else {
                    String::new()
                };
            }
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
