//! An in-test fake Kubernetes API server that speaks the real HTTP API well enough for
//! `kubectl --kubeconfig` and kube-rs clients, watchers and reflectors, with fault injection
//! for what a real apiserver does not produce on demand (dropped and half-open watches, 410
//! Gone, 5xx, restarts).
//!
//! # Using it from an integration test
//!
//! Convention: include the module by path from the test crate's root file:
//!
//! ```ignore
//! #[path = "support/fake_api/mod.rs"]
//! mod fake_api;
//! use fake_api::FakeApi;
//!
//! let fake = FakeApi::start().await;                 // https://127.0.0.1:<ephemeral>
//! let kubeconfig = fake.write_kubeconfig(dir.path()); // for kubectl or kube::Config
//! fake.apply_object(serde_json::json!({"apiVersion": "v1", "kind": "Service", ...}));
//! ```
//!
//! Each test starts its own server; nothing is shared between servers.
//!
//! # What it serves
//!
//! HTTP/1.1 on 127.0.0.1, over TLS (a CA made for each server; the kubeconfig carries it) and
//! plain on the same port (`http_url`); every request is authenticated by the bearer token of
//! the kubeconfig it writes (401 Status otherwise). TLS is there for kubectl, which sends a
//! token only to https servers (see `tls.rs`).
//!
//! Discovery in the legacy format (`/version`, `/api`, `/api/v1`, `/apis`,
//! `/apis/<group>[/<version>]`; kubectl falls back to it from aggregated discovery), and a
//! minimal `/openapi/v3` that lets kubectl leave validation to the server (see
//! `resources::openapi_v3_doc`). Resources: Services (core/v1, with `status`), Nodes and
//! Namespaces (core/v1, cluster-scoped, with `status`), EndpointSlices (discovery.k8s.io/v1),
//! Events (core/v1 and events.k8s.io/v1: one storage, two representations converted field by
//! field as the real apiserver does; events.k8s.io/v1 creates are validated), ConfigMaps
//! (core/v1) and Leases (coordination.k8s.io/v1). Verbs: list (all namespaces or one, `labelSelector`,
//! `fieldSelector` restricted to the labels the real apiserver supports, `limit`/`continue`
//! over a consistent snapshot, `resourceVersion` + `resourceVersionMatch=Exact` rebuilt from
//! history), get, create (`generateName`, 409 AlreadyExists, 422 on invalid names), PUT
//! (resourceVersion precondition, 409 Conflict), PATCH (JSON patch, merge patch, strategic
//! merge patch, server-side apply, which also creates), delete (preconditions, finalizers),
//! deletecollection, `dryRun=All`, and watch (see `watch.rs`). Errors are `kind: Status`
//! bodies worded like the real ones (see `status.rs`).
//!
//! Writes fill uid, creationTimestamp, generation (bumped on spec changes) and a global
//! resourceVersion; a write that changes nothing is not a write (no new resourceVersion, no
//! watch event). Services are defaulted as the real apiserver does: ClusterIP from 10.96.0.10
//! up, NodePorts from 30000 up (kept when an update omits them, 422 on a taken one),
//! health-check NodePort for `externalTrafficPolicy: Local` LoadBalancers, protocol,
//! targetPort, traffic policies, and status reset on create (the main resource never
//! changes status; `status` changes nothing else). Lists leave `apiVersion`/`kind` out of
//! their items, as the real apiserver does.
//!
//! Note for fault tests: kube-rs retries 429, 503 and 504 by itself, so `fail_next(n, 503)`
//! delays a kube-rs call rather than failing it; use 500 to make one call fail.
//!
//! # Simplified (on purpose)
//!
//! - Bodies are JSON (or YAML) only: client-go's typed clients send protobuf, so
//!   `kubectl create namespace|service|secret ...` get a 415 that says to use
//!   `kubectl create -f` / `kubectl apply -f` (both work). Responses are always JSON.
//! - Namespaces are created on first use (the four usual ones exist from the start); the real
//!   apiserver refuses objects in a missing namespace. Deleting one deletes its objects at
//!   once (no Terminating phase).
//! - `fieldValidation` is accepted and ignored (unknown fields are kept); no OpenAPI schemas
//!   (`kubectl explain` does not work), `/openapi/v2` answers 404.
//! - No Table output: `kubectl get` prints its default NAME/AGE columns; use `-o json`,
//!   `-o jsonpath` or `-o name` in assertions.
//! - Strategic merge and server-side apply: see `patch.rs` (merge keys from a short table,
//!   no managedFields, no field-manager conflicts).
//! - No admission, no RBAC beyond what a test forbids with [`FakeApi::forbid`], no garbage
//!   collection of owned objects, no HTTP/2, no aggregated discovery, no client
//!   certificates.
//! - `resourceVersion=N` on a list with the default `NotOlderThan` semantics is served from the
//!   current state, as the real apiserver's watch cache does; `resourceVersionMatch=Exact` and
//!   `continue` tokens older than [`FakeApi::compact`] answer HTTP 410, and watches from them
//!   an ERROR event with a 410 Status.
//! - The change history is kept whole (memory grows with writes; fine for tests and the
//!   10,000-Service benchmark).
#![allow(dead_code)]

mod patch;
mod resources;
mod select;
mod server;
mod status;
mod store;
mod tls;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use store::{Origin, Store, Target};

/// Default period of BOOKMARK events on watches that allow them.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// One request as the fake received it, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The URL path, e.g. `/api/v1/namespaces/default/services/web/status`.
    pub path: String,
    /// The raw query string (percent-encoded), "" when none.
    pub query: String,
    pub content_type: Option<String>,
    /// The body as text (Kubernetes bodies are JSON or YAML).
    pub body: String,
    /// The HTTP status the fake answered (200 for a watch, whatever its events said).
    pub status: u16,
}

impl RecordedRequest {
    /// A decoded query parameter.
    pub fn query_param(&self, key: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.query_param("watch").as_deref(), Some("true" | "1"))
    }
}

/// A failure to inject: the next `remaining` requests that match answer `code`.
struct FailRule {
    remaining: usize,
    code: u16,
    method: Option<String>,
    path_contains: Option<String>,
}

/// A delay to inject: every request that matches is answered only after `delay` (as a
/// control plane on an SD card under load, or a half-dead apiserver, answers writes).
struct DelayRule {
    delay: Duration,
    method: String,
    path_contains: String,
}

pub(crate) struct State {
    store: Store,
    fail_rules: Vec<FailRule>,
    delay_rules: Vec<DelayRule>,
    /// Requests that were held back by a delay rule (counted on arrival).
    delayed: usize,
    hang_watches: bool,
    forbidden: Vec<(String, String)>,
    requests: Vec<RecordedRequest>,
    bookmark_interval: Duration,
    /// When watches handed change events to their response bodies (not initial events nor
    /// bookmarks): the benchmarks' "the in-test API's own delay".
    watch_events_sent: Vec<std::time::SystemTime>,
}

/// What the server tasks and the test's handle share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// The latest resourceVersion, sent after every write (wakes watches).
    changes: tokio::sync::watch::Sender<u64>,
    /// Bumped by `drop_watches`: every open watch ends.
    drops: tokio::sync::watch::Sender<u64>,
    open_watches: AtomicUsize,
    token: String,
    /// PEM of the CA that signed the server certificate.
    ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake API state lock")
    }

    /// Runs a store operation and wakes the watches if it wrote anything.
    fn with_store<T>(&self, op: impl FnOnce(&mut Store) -> T) -> T {
        let (result, rv) = {
            let mut state = self.lock();
            let result = op(&mut state.store);
            (result, state.store.resource_version())
        };
        self.changes.send_if_modified(|latest| {
            let changed = *latest != rv;
            *latest = rv;
            changed
        });
        result
    }

    fn take_injected_failure(&self, method: &str, path: &str) -> Option<u16> {
        let mut state = self.lock();
        let rule = state.fail_rules.iter_mut().find(|r| {
            r.remaining > 0
                && r.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && r.path_contains.as_deref().is_none_or(|p| path.contains(p))
        })?;
        rule.remaining -= 1;
        let code = rule.code;
        state.fail_rules.retain(|r| r.remaining > 0);
        Some(code)
    }

    /// The delay for this request, if a rule matches it (counted as delayed).
    fn take_delay(&self, method: &str, path: &str) -> Option<Duration> {
        let mut state = self.lock();
        let delay = state
            .delay_rules
            .iter()
            .find(|r| r.method.eq_ignore_ascii_case(method) && path.contains(&r.path_contains))?
            .delay;
        state.delayed += 1;
        Some(delay)
    }

    fn is_forbidden(&self, verb: &str, resource: &str) -> bool {
        self.lock()
            .forbidden
            .iter()
            .any(|(v, r)| (v == verb || v == "*") && r == resource)
    }
}

struct Running {
    shutdown: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A running fake API server; dropping it stops the server.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

impl FakeApi {
    /// Starts a server on 127.0.0.1 on an ephemeral port.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API on 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        let token = format!("fake-token-{:016x}", rand::random::<u64>());
        let tls = tls::make();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store: Store::new(),
                fail_rules: Vec::new(),
                delay_rules: Vec::new(),
                delayed: 0,
                hang_watches: false,
                forbidden: Vec::new(),
                requests: Vec::new(),
                bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
                watch_events_sent: Vec::new(),
            }),
            changes: tokio::sync::watch::channel(0).0,
            drops: tokio::sync::watch::channel(0).0,
            open_watches: AtomicUsize::new(0),
            token,
            ca_pem: tls.ca_pem,
            acceptor: tls.acceptor,
        });
        let fake = FakeApi {
            shared,
            addr,
            running: Mutex::new(None),
        };
        fake.serve(listener);
        fake
    }

    fn serve(&self, listener: TcpListener) {
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(server::serve(
            listener,
            Arc::clone(&self.shared),
            self.shared.acceptor.clone(),
            shutdown_rx,
        ));
        *self.running.lock().expect("running lock") = Some(Running { shutdown, task });
    }

    /// `https://127.0.0.1:<port>`: what the kubeconfig names (kubectl sends tokens only over
    /// TLS).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>`: the same server without TLS (same port, same token check).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bearer token the server accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// PEM of the CA that signed the server's certificate (fresh for each server).
    pub fn ca_pem(&self) -> &str {
        &self.shared.ca_pem
    }

    /// The kubeconfig text: cluster `fake` (the https URL and the CA), user `fake-user` with
    /// the bearer `token`, context `fake` (namespace `default`) as current-context.
    pub fn kubeconfig_yaml(&self, token: &str) -> String {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n\
             \x20 cluster:\n\
             \x20   server: {url}\n\
             \x20   certificate-authority-data: {ca}\n\
             users:\n\
             - name: fake-user\n\
             \x20 user:\n\
             \x20   token: {token}\n\
             contexts:\n\
             - name: fake\n\
             \x20 context:\n\
             \x20   cluster: fake\n\
             \x20   user: fake-user\n\
             \x20   namespace: default\n\
             current-context: fake\n\
             preferences: {{}}\n",
            url = self.url(),
        )
    }

    /// Writes `dir/kubeconfig` for this server and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        self.write_kubeconfig_with_token(dir, &self.shared.token.clone())
    }

    /// Writes `dir/kubeconfig` with another token (e.g. a wrong one, for 401 tests).
    pub fn write_kubeconfig_with_token(&self, dir: &Path, token: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml(token)).expect("write the kubeconfig");
        path
    }

    /// A kube client for this server, built from the same kubeconfig text.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml(self.token()))
            .expect("the fake's kubeconfig parses");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("the fake's kubeconfig is usable");
        kube::Client::try_from(config).expect("a client for the fake API")
    }

    // ----- fault injection -----

    /// Ends every open watch stream now (a clean end of the chunked body).
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|n| *n += 1);
    }

    /// While on, new watches get their 200 headers and then nothing, ever (half-open).
    /// Watches already open are not affected; `drop_watches` ends hung ones too.
    pub fn set_hang_watches(&self, hang: bool) {
        self.shared.lock().hang_watches = hang;
    }

    /// The next `n` requests (of any kind, discovery included) answer `code` with a Status.
    pub fn fail_next(&self, n: usize, code: u16) {
        self.fail_next_matching(n, code, None, None);
    }

    /// The next `n` requests with this method (any if None) and a path containing
    /// `path_contains` (any if None) answer `code` with a Status.
    pub fn fail_next_matching(
        &self,
        n: usize,
        code: u16,
        method: Option<&str>,
        path_contains: Option<&str>,
    ) {
        if n == 0 {
            return;
        }
        self.shared.lock().fail_rules.push(FailRule {
            remaining: n,
            code,
            method: method.map(str::to_owned),
            path_contains: path_contains.map(str::to_owned),
        });
    }

    /// From now on every request with `method` and a path containing `path_contains` is
    /// handled (and answered) only after `delay`. A client that gives up meanwhile closes its
    /// connection, and the request may then be dropped unhandled (see `server::handle`).
    pub fn delay_matching(&self, delay: Duration, method: &str, path_contains: &str) {
        self.shared.lock().delay_rules.push(DelayRule {
            delay,
            method: method.to_owned(),
            path_contains: path_contains.to_owned(),
        });
    }

    /// Lifts every `delay_matching`.
    pub fn clear_delays(&self) {
        self.shared.lock().delay_rules.clear();
    }

    /// How many requests a `delay_matching` rule has held back so far.
    pub fn delayed_requests(&self) -> usize {
        self.shared.lock().delayed
    }

    /// Answers 403 Forbidden for `verb` (get, list, watch, create, update, patch, delete,
    /// deletecollection, or `*`) on `resource` (`services`, `services/status`, `events` ...).
    pub fn forbid(&self, verb: &str, resource: &str) {
        self.shared
            .lock()
            .forbidden
            .push((verb.to_owned(), resource.to_owned()));
    }

    /// Lifts every `forbid`.
    pub fn allow_all(&self) {
        self.shared.lock().forbidden.clear();
    }

    /// Makes every resourceVersion handed out so far too old: a watch from one gets an ERROR
    /// event with a 410 Status, an Exact list or a `continue` from one gets HTTP 410.
    /// Open watches go on (as they do over a real apiserver's watch cache).
    pub fn compact(&self) {
        self.shared.with_store(Store::compact);
    }

    /// Period of BOOKMARK events for watches opened from now on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval;
    }

    /// Number of watch streams open now (hung ones included).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Stops serving: closes the listener and every connection. State is kept.
    pub async fn stop(&self) {
        let running = self.running.lock().expect("running lock").take();
        if let Some(Running { shutdown, task }) = running {
            let _ = shutdown.send(true);
            let _ = task.await;
        }
    }

    /// Serves again on the same port with the same state (stops first if running).
    pub async fn restart(&self) {
        self.stop().await;
        let mut last_error = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.serve(listener);
                    return;
                }
                Err(e) => {
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        panic!(
            "the fake API could not bind {} again: {last_error:?}",
            self.addr
        );
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// When a watch first handed a change event to its response body at or after `since`.
    pub fn watch_event_sent_after(
        &self,
        since: std::time::SystemTime,
    ) -> Option<std::time::SystemTime> {
        let state = self.shared.lock();
        state
            .watch_events_sent
            .iter()
            .copied()
            .filter(|&at| at >= since)
            .min()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    // ----- direct manipulation (no HTTP, no auth, no faults; watches see the changes) -----

    /// Creates or replaces an object given in full (apiVersion and kind required; namespace
    /// defaults to `default`). Status is written as given; server fields (uid, timestamps,
    /// resourceVersion, Service ClusterIP/NodePorts) are filled as on the API. Returns the
    /// stored object.
    pub fn apply_object(&self, object: Value) -> Value {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let def = resources::for_type(api_version, kind).unwrap_or_else(|| {
            panic!("the fake API does not serve apiVersion {api_version:?} kind {kind:?}")
        });
        let name = store::name_of(&object)
            .expect("apply_object needs metadata.name")
            .to_owned();
        let namespace = if def.namespaced {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let mut object = object;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        self.shared
            .with_store(|store| {
                if store.stored(def.bucket, &namespace, &name).is_some() {
                    store.update(
                        def,
                        &namespace,
                        &name,
                        object,
                        Target::Main,
                        Origin::Direct,
                        false,
                    )
                } else {
                    let ns = def.namespaced.then_some(namespace.as_str());
                    store.create(def, ns, object, Origin::Direct, false)
                }
            })
            .unwrap_or_else(|e| panic!("apply_object refused: {}", e.message))
    }

    /// Deletes an object at once (finalizers ignored); `kind` is e.g. "Service", namespace ""
    /// for cluster-scoped kinds. Returns the deleted object, None if there was none.
    pub fn delete_object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let def = Self::def_for_kind(kind);
        self.shared
            .with_store(|store| store.remove(def, namespace, name))
    }

    /// Every stored object of `kind` (Events in their core/v1 form), by namespace and name.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let def = Self::def_for_kind(kind);
        self.shared.lock().store.objects(def.bucket)
    }

    /// One stored object of `kind`, if present.
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let def = Self::def_for_kind(kind);
        self.shared
            .lock()
            .store
            .stored(def.bucket, namespace, name)
            .cloned()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().store.resource_version()
    }

    fn def_for_kind(kind: &str) -> &'static resources::ResourceDef {
        resources::for_kind(kind)
            .unwrap_or_else(|| panic!("the fake API does not serve kind {kind:?}"))
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(running) = self.running.get_mut().ok().and_then(Option::take) {
            let _ = running.shutdown.send(true);
            running.task.abort();
        }
    }
}
