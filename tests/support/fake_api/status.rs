//! `kind: Status` error bodies, worded like k8s.io/apimachinery's `api/errors` so that kubectl
//! and kube-rs report them as they would a real apiserver's.

use serde_json::{Value, json};

use super::resources::ResourceDef;

#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

fn details(def: &ResourceDef, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": def.plural});
    if !def.group.is_empty() {
        d["group"] = json!(def.group);
    }
    d
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// The reason the real apiserver gives with a bare status code.
    pub fn from_code(code: u16) -> ApiError {
        let (reason, message) = match code {
            400 => (
                "BadRequest",
                "the server rejected our request for an unknown reason",
            ),
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "forbidden"),
            404 => (
                "NotFound",
                "the server could not find the requested resource",
            ),
            405 => (
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
            409 => ("Conflict", "the server reported a conflict"),
            410 => ("Expired", "the resource version is too old"),
            422 => (
                "Invalid",
                "the server rejected our request due to an error in our request",
            ),
            429 => (
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            500 => (
                "InternalError",
                "an error on the server (\"injected by the fake API\") has prevented the request from succeeding",
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still be processing the request",
            ),
            _ => ("", "injected failure"),
        };
        ApiError::new(code, reason, message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn not_found_path() -> ApiError {
        ApiError::from_code(404)
    }

    pub fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError {
            details: Some(details(def, name)),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", def.qualified_plural()),
            )
        }
    }

    pub fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError {
            details: Some(details(def, name)),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", def.qualified_plural()),
            )
        }
    }

    pub fn conflict(def: &ResourceDef, name: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(details(def, name)),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    def.qualified_plural()
                ),
            )
        }
    }

    pub fn modified(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::conflict(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::from_code(405)
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"
            ),
        )
    }

    /// 422 with one cause per `(field, reason, detail)`, e.g.
    /// `("spec.ports[0].nodePort", "FieldValueInvalid", "Invalid value: 30080: provided port is already allocated")`.
    pub fn invalid(def: &ResourceDef, name: &str, causes: &[(String, &str, String)]) -> ApiError {
        let parts: Vec<String> = causes.iter().map(|(f, _, d)| format!("{f}: {d}")).collect();
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let mut d = json!({"name": name, "kind": def.kind});
        if !def.group.is_empty() {
            d["group"] = json!(def.group);
        }
        d["causes"] = causes
            .iter()
            .map(|(f, r, m)| json!({"reason": r, "message": m, "field": f}))
            .collect();
        ApiError {
            details: Some(d),
            ..ApiError::new(
                422,
                "Invalid",
                format!("{} \"{name}\" is invalid: {joined}", def.qualified_kind()),
            )
        }
    }

    pub fn forbidden(
        def: &ResourceDef,
        verb: &str,
        resource: &str,
        name: Option<&str>,
        namespace: Option<&str>,
        user: &str,
    ) -> ApiError {
        let subject = match name {
            Some(n) => format!("{} \"{n}\"", def.qualified_plural()),
            None => def.qualified_plural(),
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        ApiError {
            details: Some(details(def, name.unwrap_or(""))),
            ..ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
                    def.group
                ),
            )
        }
    }

    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}
