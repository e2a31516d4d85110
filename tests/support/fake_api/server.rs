//! The HTTP side: an HTTP/1.1 server on 127.0.0.1, bearer-token authentication, injected
//! faults, the request log, and the REST routes (discovery, collections, objects, `status`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::patch::{self, PatchType};
use super::resources::{self, ResourceDef};
use super::select::Selector;
use super::status::ApiError;
use super::store::{Origin, Target};
use super::watch::{self as watch_stream, WatchRequest};
use super::{RecordedRequest, Shared};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// The user name 403 messages give (the token's identity).
pub(crate) const USER: &str = "system:serviceaccount:holepunch:holepunch";

/// Accepts connections until `shutdown` changes; then closes the listener and every
/// connection (open watches included) at once. A connection whose first byte is a TLS
/// handshake record (0x16) is served over TLS, any other as plain HTTP, on the same port.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let mut first = [0u8; 1];
                    match stream.peek(&mut first).await {
                        Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                serve_connection(tls, shared).await;
                            }
                        }
                        Ok(1) => serve_connection(stream, shared).await,
                        _ => {}
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn serve_connection<I>(io: I, shared: Arc<Shared>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("a JSON value serializes");
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a valid response")
}

fn error_response(err: &ApiError) -> Response<Body> {
    let mut resp = json_response(err.code, &err.to_status());
    if err.code == 429 {
        resp.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
    }
    resp
}

/// What one request carries, read once.
struct Call {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    content_type: String,
    authorization: Option<String>,
    body: Bytes,
    host: String,
}

impl Call {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.param(key), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.param("dryRun").is_some_and(|v| v == "All")
    }

    fn body_json(&self) -> Result<Value, ApiError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        if self.content_type.contains("protobuf") || self.content_type.contains("cbor") {
            // NOTE: client-go's typed clients (`kubectl create namespace|service|secret ...`)
            // send protobuf; kubectl's resource builder (`create -f`, `apply -f`, patches)
            // sends JSON, which is all the fake decodes.
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the fake API server decodes JSON and YAML bodies only, not {:?}: write the object to a file and use `kubectl create -f` or `kubectl apply -f`",
                    self.content_type
                ),
            ));
        }
        if self.content_type.contains("yaml") {
            serde_saphyr::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        } else {
            serde_json::from_slice(&self.body).map_err(|e| {
                ApiError::bad_request(format!(
                    "the body of the request was in an unknown format: {e}"
                ))
            })
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type").unwrap_or_default();
    let authorization = header("authorization");
    let host = header("host").unwrap_or_default();
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let call = Call {
        query: form_urlencoded::parse(raw_query.as_bytes())
            .into_owned()
            .collect(),
        method,
        path,
        content_type,
        authorization,
        body,
        host,
    };
    if let Some(delay) = shared.take_delay(&call.method, &call.path) {
        // Runs on the connection's task: a client that gives up and closes the connection
        // may make hyper drop this future, so the request is never handled.
        tokio::time::sleep(delay).await;
    }
    let response = respond(&shared, &call);
    let mut state = shared.state.lock().expect("fake API state lock");
    state.requests.push(RecordedRequest {
        method: call.method.clone(),
        path: call.path.clone(),
        query: raw_query,
        content_type: (!call.content_type.is_empty()).then(|| call.content_type.clone()),
        body: String::from_utf8_lossy(&call.body).into_owned(),
        status: response.status().as_u16(),
    });
    response
}

fn respond(shared: &Arc<Shared>, call: &Call) -> Response<Body> {
    if let Some(code) = shared.take_injected_failure(&call.method, &call.path) {
        return error_response(&ApiError::from_code(code));
    }
    let path = call.path.trim_end_matches('/');
    if matches!(path, "/healthz" | "/livez" | "/readyz") && call.authorization.is_none() {
        return Response::builder()
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"ok")).boxed())
            .expect("a valid response");
    }
    let expected = format!("Bearer {}", shared.token);
    if call.authorization.as_deref() != Some(expected.as_str()) {
        return error_response(&ApiError::unauthorized());
    }
    match route(shared, call, path) {
        Ok(resp) => resp,
        Err(err) => error_response(&err),
    }
}

fn route(shared: &Arc<Shared>, call: &Call, path: &str) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get_only = || {
        if call.method == "GET" {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match segments.as_slice() {
        ["version"] => {
            get_only()?;
            Ok(json_response(200, &resources::version_doc()))
        }
        ["healthz" | "livez" | "readyz"] => {
            get_only()?;
            Ok(Response::builder()
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from_static(b"ok")).boxed())
                .expect("a valid response"))
        }
        ["api"] => {
            get_only()?;
            Ok(json_response(200, &resources::api_versions_doc(&call.host)))
        }
        ["apis"] => {
            get_only()?;
            Ok(json_response(200, &resources::group_list_doc()))
        }
        ["api", "v1"] => {
            get_only()?;
            Ok(json_response(200, &resources::resource_list_doc("", "v1")))
        }
        ["apis", group] => {
            get_only()?;
            let doc = resources::group_doc_for(group).ok_or_else(ApiError::not_found_path)?;
            Ok(json_response(200, &doc))
        }
        ["apis", group, version] if resources::group_known(group, version) => {
            get_only()?;
            Ok(json_response(
                200,
                &resources::resource_list_doc(group, version),
            ))
        }
        ["openapi", "v3"] => {
            get_only()?;
            Ok(json_response(200, &resources::openapi_v3_root()))
        }
        ["openapi", "v3", gv @ ..] => {
            get_only()?;
            let doc =
                resources::openapi_v3_doc(&gv.join("/")).ok_or_else(ApiError::not_found_path)?;
            Ok(json_response(200, &doc))
        }
        ["api", "v1", rest @ ..] => resource_route(shared, call, "", "v1", rest),
        ["apis", group, version, rest @ ..] => resource_route(shared, call, group, version, rest),
        _ => Err(ApiError::not_found_path()),
    }
}

/// A parsed resource path.
struct Address<'a> {
    def: &'static ResourceDef,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    target: Target,
}

fn parse_address<'a>(group: &str, version: &str, rest: &[&'a str]) -> Option<Address<'a>> {
    let (namespace, rest) = match rest {
        // A Namespace's own status, not a resource named "status" inside it.
        ["namespaces", _, "status"] => (None, rest),
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(*ns), tail),
        _ => (None, rest),
    };
    let (plural, name, target) = match rest {
        [plural] => (*plural, None, Target::Main),
        [plural, name] => (*plural, Some(*name), Target::Main),
        [plural, name, "status"] => (*plural, Some(*name), Target::Status),
        _ => return None,
    };
    let def = resources::find(group, version, plural)?;
    if namespace.is_some() && !def.namespaced {
        return None;
    }
    if target == Target::Status && !def.status {
        return None;
    }
    // A namespaced object is addressed inside its namespace; a cluster-wide path is only a
    // collection (list/watch across namespaces).
    if def.namespaced && namespace.is_none() && name.is_some() {
        return None;
    }
    Some(Address {
        def,
        namespace,
        name,
        target,
    })
}

fn verb_for(call: &Call, addr: &Address) -> &'static str {
    match (call.method.as_str(), addr.name) {
        ("GET", None) if call.flag("watch") => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", None) => "deletecollection",
        ("DELETE", Some(_)) => "delete",
        _ => "unknown",
    }
}

fn resource_route(
    shared: &Arc<Shared>,
    call: &Call,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    let addr = parse_address(group, version, rest).ok_or_else(ApiError::not_found_path)?;
    let def = addr.def;
    let verb = verb_for(call, &addr);
    let resource = match addr.target {
        Target::Main => def.plural.to_owned(),
        Target::Status => format!("{}/status", def.plural),
    };
    if shared.is_forbidden(verb, &resource) {
        return Err(ApiError::forbidden(
            def,
            verb,
            &resource,
            addr.name,
            addr.namespace,
            USER,
        ));
    }
    let namespace = addr.namespace.unwrap_or("");
    let selector = || {
        Selector::parse(
            def,
            call.param("labelSelector"),
            call.param("fieldSelector"),
        )
        .map_err(ApiError::bad_request)
    };

    let result = match (call.method.as_str(), addr.name) {
        ("GET", None) if call.flag("watch") => {
            let req = WatchRequest {
                def,
                namespace: addr.namespace.map(str::to_owned),
                selector: selector()?,
                resource_version: call.param("resourceVersion").map(str::to_owned),
                bookmarks: call.flag("allowWatchBookmarks"),
                timeout: call
                    .param("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .filter(|t| *t > 0)
                    .map(std::time::Duration::from_secs),
                send_initial_events: call.flag("sendInitialEvents"),
            };
            let body = watch_stream::start(shared, req)?;
            return Ok(Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .header("cache-control", "no-cache, private")
                .body(body)
                .expect("a valid response"));
        }
        ("GET", None) => {
            let selector = selector()?;
            let limit = call.param("limit").and_then(|l| l.parse::<usize>().ok());
            shared.with_store(|store| {
                store.list(
                    def,
                    addr.namespace,
                    &selector,
                    limit,
                    call.param("continue").filter(|c| !c.is_empty()),
                    call.param("resourceVersion"),
                    call.param("resourceVersionMatch"),
                )
            })
        }
        ("GET", Some(name)) => shared.with_store(|store| store.get(def, namespace, name)),
        ("POST", None) => {
            let body = call.body_json()?;
            shared.with_store(|store| {
                store.create(def, addr.namespace, body, Origin::Api, call.dry_run())
            })
        }
        ("PUT", Some(name)) => {
            let body = call.body_json()?;
            shared.with_store(|store| {
                store.update(
                    def,
                    namespace,
                    name,
                    body,
                    addr.target,
                    Origin::Api,
                    call.dry_run(),
                )
            })
        }
        ("PATCH", Some(name)) => {
            let patch_type = PatchType::from_content_type(&call.content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(&call.content_type))?;
            if patch_type == PatchType::Apply && call.param("fieldManager").is_none() {
                return Err(ApiError::bad_request(
                    "PATCH, application/apply-patch+yaml requires fieldManager parameter",
                ));
            }
            let body = patch::parse_body(patch_type, &call.body).map_err(ApiError::bad_request)?;
            shared.with_store(|store| {
                store.patch(
                    def,
                    namespace,
                    name,
                    patch_type,
                    &body,
                    addr.target,
                    call.dry_run(),
                )
            })
        }
        ("DELETE", Some(name)) if addr.target == Target::Main => {
            let options = call.body_json().unwrap_or(Value::Null);
            shared.with_store(|store| store.delete(def, namespace, name, &options, call.dry_run()))
        }
        ("DELETE", None) => {
            let selector = selector()?;
            shared.with_store(|store| {
                store.delete_collection(def, addr.namespace, &selector, call.dry_run())
            })
        }
        _ => Err(ApiError::method_not_allowed()),
    };
    let code = if call.method == "POST" { 201 } else { 200 };
    result.map(|v| json_response(code, &v))
}
