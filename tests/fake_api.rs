//! Acceptance tests of the fake Kubernetes API server in `tests/support/fake_api`: each one
//! drives it with a real client (the `kubectl` binary, or kube-rs as holepunch uses it) and
//! asserts what a real apiserver would answer. Every test starts its own server.

#[path = "support/fake_api/mod.rs"]
mod fake_api;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use fake_api::FakeApi;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, VersionMatch,
    WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};

const STEP: Duration = Duration::from_secs(5);

// ----- helpers -----

/// Runs `kubectl --kubeconfig <kubeconfig> <args>` with a private discovery cache.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    let binary = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let cache = kubeconfig.with_file_name("kubectl-cache");
    Command::new(&binary)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {binary:?} ({e}): these tests need kubectl; install it \
                 (Debian: `apt-get install kubernetes-client`) or point $KUBECTL at one"
            )
        })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// kubectl that must succeed; returns its stdout.
fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A kube client built from the kubeconfig file, the way holepunch builds its own.
async fn client_from(kubeconfig: &Path) -> kube::Client {
    let parsed = kube::config::Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default())
        .await
        .expect("a config from the kubeconfig");
    kube::Client::try_from(config).expect("a client")
}

struct Setup {
    fake: FakeApi,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    client: kube::Client,
}

async fn setup() -> Setup {
    let fake = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = fake.write_kubeconfig(dir.path());
    let client = client_from(&kubeconfig).await;
    Setup {
        fake,
        _dir: dir,
        kubeconfig,
        client,
    }
}

fn service(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": [{"name": "http", "port": 8080}]}
    })
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a typed object")
}

fn api_error(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

/// Next item of `stream` that `pick` maps to Some, within STEP.
async fn next_where<S, T, U>(stream: &mut S, what: &str, mut pick: impl FnMut(T) -> Option<U>) -> U
where
    S: Stream<Item = T> + Unpin,
{
    let wait = async {
        while let Some(item) = stream.next().await {
            if let Some(found) = pick(item) {
                return Some(found);
            }
        }
        None
    };
    match tokio::time::timeout(STEP, wait).await {
        Ok(Some(found)) => found,
        Ok(None) => panic!("the stream ended before {what}"),
        Err(_) => panic!("no {what} within {STEP:?}"),
    }
}

fn name_of<K: kube::Resource>(obj: &K) -> String {
    obj.meta().name.clone().unwrap_or_default()
}

// ----- kubectl -----

#[tokio::test]
async fn kubectl_gets_creates_annotates_patches_and_deletes_services() {
    let s = setup().await;
    let kc = s.kubeconfig.clone();
    let manifest = s._dir.path().join("web.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  \
         type: LoadBalancer\n  selector: {app: web}\n  ports:\n  - name: http\n    port: 8080\n",
    )
    .unwrap();

    // kubectl blocks; the server needs the runtime meanwhile.
    let shown = tokio::task::spawn_blocking(move || {
        let empty = kubectl(&kc, &["get", "svc", "-A"]);
        assert!(empty.status.success(), "{}", text(&empty.stderr));
        assert!(text(&empty.stderr).contains("No resources found"));

        let created = kubectl_ok(&kc, &["create", "-f", manifest.to_str().unwrap()]);
        assert_eq!(created.trim(), "service/web created");
        let listed = kubectl_ok(&kc, &["get", "svc", "-A"]);
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with("shop ") && l.contains(" web ")),
            "{listed}"
        );

        let annotated = kubectl_ok(
            &kc,
            &["-n", "shop", "annotate", "svc", "web", "holepunch/punch-external=true"],
        );
        assert_eq!(annotated.trim(), "service/web annotated");
        kubectl_ok(
            &kc,
            &[
                "-n",
                "shop",
                "patch",
                "svc",
                "web",
                "--type",
                "merge",
                "-p",
                r#"{"metadata":{"annotations":{"holepunch.port/8080":"18080"}},"spec":{"externalTrafficPolicy":"Local"}}"#,
            ],
        );
        let shown: Value = serde_json::from_str(&kubectl_ok(
            &kc,
            &["-n", "shop", "get", "svc", "web", "-o", "json"],
        ))
        .unwrap();

        let deleted = kubectl_ok(&kc, &["-n", "shop", "delete", "svc", "web"]);
        assert_eq!(deleted.trim(), "service \"web\" deleted");
        let gone = kubectl(&kc, &["-n", "shop", "get", "svc", "web"]);
        assert!(!gone.status.success());
        assert!(
            text(&gone.stderr).contains("(NotFound): services \"web\" not found"),
            "{}",
            text(&gone.stderr)
        );
        shown
    })
    .await
    .unwrap();

    let annotations = &shown["metadata"]["annotations"];
    assert_eq!(annotations["holepunch/punch-external"], "true");
    assert_eq!(annotations["holepunch.port/8080"], "18080");
    assert_eq!(shown["spec"]["externalTrafficPolicy"], "Local");
    // Filled in by the server as a real apiserver does.
    assert_eq!(shown["spec"]["ports"][0]["nodePort"], 30000);
    assert_eq!(shown["spec"]["clusterIP"], "10.96.0.10");
    assert!(shown["spec"]["healthCheckNodePort"].as_u64().is_some());
    assert!(
        shown["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );

    let patches: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v1/namespaces/shop/services/web")
        .collect();
    assert_eq!(patches.len(), 2, "{patches:#?}");
    assert!(
        patches
            .iter()
            .all(|r| r.content_type.as_deref() == Some("application/merge-patch+json"))
    );
    assert!(s.fake.objects("Service").is_empty());
}

#[tokio::test]
async fn kubectl_apply_client_and_server_side() {
    let s = setup().await;
    let kc = s.kubeconfig.clone();
    let manifest = s._dir.path().join("web.yaml");
    let file = manifest.to_str().unwrap().to_owned();
    let write = move |port: u16| {
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - name: http\n    port: {port}\n"
            ),
        )
        .unwrap()
    };
    tokio::task::spawn_blocking(move || {
        write(8080);
        assert!(kubectl_ok(&kc, &["apply", "-f", &file]).contains("created"));
        write(9090);
        assert!(kubectl_ok(&kc, &["apply", "-f", &file]).contains("configured"));
        assert!(
            kubectl_ok(&kc, &["apply", "--server-side", "-f", &file])
                .contains("serverside-applied")
        );
    })
    .await
    .unwrap();
    let svc = s.fake.object("Service", "default", "web").unwrap();
    assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 1);
    assert_eq!(svc["spec"]["ports"][0]["port"], 9090);
    let patches: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    // Client-side apply sends a strategic merge patch; server-side apply an apply patch
    // (then kubectl updates its last-applied annotation with a second one).
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    assert_eq!(
        patches[1].content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        patches[1].query_param("fieldManager").as_deref(),
        Some("kubectl")
    );
}

#[tokio::test]
async fn kubectl_with_a_wrong_token_is_unauthorized() {
    let fake = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = fake.write_kubeconfig_with_token(dir.path(), "not-the-token");
    let (get, raw) = tokio::task::spawn_blocking(move || {
        (
            kubectl(&kc, &["get", "svc"]),
            kubectl(&kc, &["get", "--raw", "/api/v1/services"]),
        )
    })
    .await
    .unwrap();
    assert!(!get.status.success());
    assert!(
        text(&get.stderr).contains("You must be logged in to the server"),
        "{}",
        text(&get.stderr)
    );
    assert!(!raw.status.success());
    assert!(
        text(&raw.stderr).contains("Unauthorized"),
        "{}",
        text(&raw.stderr)
    );
    let requests = fake.requests();
    assert!(!requests.is_empty());
    assert!(requests.iter().all(|r| r.status == 401), "{requests:#?}");
}

// ----- kube-rs -----

#[tokio::test]
async fn kube_lists_services_in_all_namespaces() {
    let s = setup().await;
    s.fake.apply_object(service("a", "one"));
    s.fake.apply_object(service("b", "two"));
    s.fake
        .apply_object(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));

    let all = Api::<Service>::all(s.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let names: Vec<_> = all.items.iter().map(name_of).collect();
    assert_eq!(names, ["one", "two"]);
    assert_eq!(
        all.metadata.resource_version.as_deref(),
        Some(s.fake.resource_version().to_string().as_str())
    );
    let in_b = Api::<Service>::namespaced(s.client.clone(), "b")
        .list(&ListParams::default().labels("app=two"))
        .await
        .unwrap();
    assert_eq!(in_b.items.len(), 1);
    let by_name = Api::<Service>::all(s.client.clone())
        .list(&ListParams::default().fields("metadata.name=one"))
        .await
        .unwrap();
    assert_eq!(
        by_name.items.iter().map(name_of).collect::<Vec<_>>(),
        ["one"]
    );
    let nodes = Api::<Node>::all(s.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(nodes.items.len(), 1);

    // Pagination: a consistent snapshot, two pages.
    let page = Api::<Service>::all(s.client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().expect("a continue token");
    let rest = Api::<Service>::all(s.client.clone())
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.iter().map(name_of).collect::<Vec<_>>(), ["two"]);
    assert!(rest.metadata.continue_.is_none());
}

#[tokio::test]
async fn kube_crud_conflicts_and_errors_are_status_bodies() {
    let s = setup().await;
    let api = Api::<Service>::namespaced(s.client.clone(), "default");
    let svc: Service = typed(service("default", "web"));
    let created = api.create(&PostParams::default(), &svc).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let again = api_error(api.create(&PostParams::default(), &svc).await.unwrap_err());
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    // A stale resourceVersion on PUT is a Conflict.
    let mut stale = created.clone();
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    stale.metadata.labels = Some([("v".to_owned(), "3".to_owned())].into());
    let conflict = api_error(
        api.replace("web", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));

    // Strategic merge: ports merge by `port`.
    let patched = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"ports": [{"port": 9090, "name": "admin"}]}})),
        )
        .await
        .unwrap();
    let ports = patched.spec.unwrap().ports.unwrap();
    assert_eq!(
        ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [8080, 9090]
    );
    assert_eq!(patched.metadata.generation, Some(2));

    // JSON patch.
    let patched = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(
                    json!([{"op": "replace", "path": "/spec/ports/0/port", "value": 8081}]),
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().ports.unwrap()[0].port, 8081);

    let missing = api_error(api.get("nope").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "services \"nope\" not found");

    api.delete("web", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_error(api.get("web").await.unwrap_err()).code, 404);

    s.fake.forbid("patch", "services/status");
    let denied = api_error(
        api.patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((denied.code, denied.reason.as_str()), (403, "Forbidden"));
    assert!(
        denied
            .message
            .contains("cannot patch resource \"services/status\"")
    );
}

#[tokio::test]
async fn unknown_paths_answer_a_not_found_status() {
    let s = setup().await;
    let request = http::Request::get("/api/v1/widgets")
        .body(Vec::new())
        .unwrap();
    let err = api_error(s.client.request::<Value>(request).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    let version = s.client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );
}

#[tokio::test]
async fn raw_watch_streams_added_modified_deleted_and_bookmarks() {
    let s = setup().await;
    s.fake.set_bookmark_interval(Duration::from_millis(100));
    let api = Api::<Service>::namespaced(s.client.clone(), "default");
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let params = WatchParams {
        timeout: Some(3),
        ..WatchParams::default()
    };
    let mut stream = api.watch(&params, &rv).await.unwrap().boxed();

    let bookmark = next_where(&mut stream, "a BOOKMARK", |e| match e {
        Ok(WatchEvent::Bookmark(b)) => Some(b),
        _ => None,
    })
    .await;
    assert_eq!(bookmark.metadata.resource_version, rv);

    api.create(&PostParams::default(), &typed(service("default", "web")))
        .await
        .unwrap();
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"holepunch/punch-external": "true"}}})),
    )
    .await
    .unwrap();
    api.delete("web", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = next_where(&mut stream, "a change event", |e| match e.unwrap() {
            WatchEvent::Added(o) => Some(("ADDED", o)),
            WatchEvent::Modified(o) => Some(("MODIFIED", o)),
            WatchEvent::Deleted(o) => Some(("DELETED", o)),
            _ => None,
        })
        .await;
        seen.push(event);
    }
    let kinds: Vec<_> = seen.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    let rvs: Vec<u64> = seen
        .iter()
        .map(|(_, o)| {
            o.metadata
                .resource_version
                .as_ref()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");

    // timeoutSeconds ends the stream.
    let ended = tokio::time::timeout(STEP, async { while stream.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the watch outlived its timeoutSeconds");
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted() {
    let s = setup().await;
    s.fake.apply_object(service("default", "first"));
    let api = Api::<Service>::all(s.client.clone());
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let initial = next_where(&mut events, "InitApply", |e| match e {
        Ok(watcher::Event::InitApply(svc)) => Some(name_of(&svc)),
        _ => None,
    })
    .await;
    assert_eq!(initial, "first");
    next_where(&mut events, "InitDone", |e| {
        matches!(e, Ok(watcher::Event::InitDone)).then_some(())
    })
    .await;

    let ns_api = Api::<Service>::namespaced(s.client.clone(), "default");
    ns_api
        .create(&PostParams::default(), &typed(service("default", "web")))
        .await
        .unwrap();
    let added = next_where(&mut events, "Apply of web", |e| match e {
        Ok(watcher::Event::Apply(svc)) if name_of(&svc) == "web" => Some(svc),
        _ => None,
    })
    .await;
    assert!(added.metadata.annotations.is_none());

    ns_api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"holepunch/punch-external": "true"}}}),
            ),
        )
        .await
        .unwrap();
    let modified = next_where(&mut events, "Apply of the annotated web", |e| match e {
        Ok(watcher::Event::Apply(svc)) if name_of(&svc) == "web" => Some(svc),
        _ => None,
    })
    .await;
    assert_eq!(
        modified.metadata.annotations.unwrap()["holepunch/punch-external"],
        "true"
    );

    ns_api
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let deleted = next_where(&mut events, "Delete of web", |e| match e {
        Ok(watcher::Event::Delete(svc)) => Some(name_of(&svc)),
        _ => None,
    })
    .await;
    assert_eq!(deleted, "web");

    let watches: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.is_watch())
        .collect();
    assert_eq!(watches.len(), 1, "{watches:#?}");
    assert_eq!(
        watches[0].query_param("allowWatchBookmarks").as_deref(),
        Some("true")
    );
}

#[tokio::test]
async fn watcher_relists_after_compaction_and_dropped_watches() {
    let s = setup().await;
    s.fake.apply_object(service("default", "before"));
    let api = Api::<Service>::all(s.client.clone());
    let old_rv = s.fake.resource_version().to_string();
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    next_where(&mut events, "InitDone", |e| {
        matches!(e, Ok(watcher::Event::InitDone)).then_some(())
    })
    .await;
    let lists_before = count_lists(&s.fake);
    assert_eq!(lists_before, 1);

    s.fake.compact();
    s.fake.drop_watches();
    s.fake.apply_object(service("default", "after"));

    // The re-watch from the old resourceVersion gets 410 Gone; the watcher lists again.
    next_where(&mut events, "a new Init", |e| {
        matches!(e, Ok(watcher::Event::Init)).then_some(())
    })
    .await;
    let mut relisted = Vec::new();
    loop {
        match next_where(&mut events, "the relist", Some).await {
            Ok(watcher::Event::InitApply(svc)) => relisted.push(name_of(&svc)),
            Ok(watcher::Event::InitDone) => break,
            other => panic!("unexpected during relist: {other:?}"),
        }
    }
    assert_eq!(relisted, ["after", "before"]);
    assert_eq!(count_lists(&s.fake), 2);

    // The 410 as a raw watch sees it: an ERROR event inside a 200 stream.
    let mut stale = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    let status = next_where(&mut stale, "an ERROR event", |e| match e {
        Ok(WatchEvent::Error(status)) => Some(status),
        _ => None,
    })
    .await;
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    assert!(
        s.fake
            .requests()
            .iter()
            .filter(|r| r.is_watch())
            .all(|r| r.status == 200)
    );

    // A list of that exact old version is HTTP 410.
    let gone = api_error(
        api.list(
            &ListParams::default()
                .at(&old_rv)
                .matching(VersionMatch::Exact),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(gone.code, 410);
}

fn count_lists(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/services" && !r.is_watch())
        .count()
}

#[tokio::test]
async fn hung_watches_stay_silent_until_dropped() {
    let s = setup().await;
    s.fake.set_bookmark_interval(Duration::from_millis(50));
    s.fake.apply_object(service("default", "web"));
    s.fake.set_hang_watches(true);
    let api = Api::<Service>::all(s.client.clone());
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    // Not even the initial ADDED or a bookmark, and timeoutSeconds is not honoured.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), stream.next())
            .await
            .is_err()
    );
    assert_eq!(s.fake.open_watches(), 1);
    s.fake.drop_watches();
    let end = tokio::time::timeout(STEP, stream.next()).await.unwrap();
    assert!(end.is_none());
    s.fake.set_hang_watches(false);
    let mut healthy = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    next_where(&mut healthy, "the ADDED of web", |e| {
        matches!(e, Ok(WatchEvent::Added(_))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn apply_to_the_status_subresource_writes_only_status() {
    let s = setup().await;
    let api = Api::<Service>::namespaced(s.client.clone(), "default");
    api.create(&PostParams::default(), &typed(service("default", "web")))
        .await
        .unwrap();
    let before = api.get("web").await.unwrap();

    let status = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "Proxy"}]}}
    });
    let patched = api
        .patch_status(
            "web",
            &PatchParams::apply("holepunch").force(),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();
    let ingress = |svc: &Service| {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default()
    };
    assert_eq!(ingress(&patched).len(), 1);

    let after = api.get("web").await.unwrap();
    let ing = &ingress(&after)[0];
    assert_eq!(ing.ip.as_deref(), Some("203.0.113.7"));
    assert_eq!(ing.ip_mode.as_deref(), Some("Proxy"));
    assert_eq!(after.spec, before.spec);
    assert_eq!(after.metadata.generation, before.metadata.generation);

    // Applying the same status again writes nothing.
    let rv = after.metadata.resource_version.clone();
    api.patch_status(
        "web",
        &PatchParams::apply("holepunch").force(),
        &Patch::Apply(&status),
    )
    .await
    .unwrap();
    assert_eq!(api.get("web").await.unwrap().metadata.resource_version, rv);

    // The main resource ignores status; the status subresource ignores spec.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}})),
    )
    .await
    .unwrap();
    api.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"type": "NodePort"}})),
    )
    .await
    .unwrap();
    let last = api.get("web").await.unwrap();
    assert_eq!(ingress(&last)[0].ip.as_deref(), Some("203.0.113.7"));
    assert_eq!(last.spec.unwrap().type_.as_deref(), Some("LoadBalancer"));

    let status_patches: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/services/web/status"))
        .collect();
    assert_eq!(status_patches.len(), 3);
    assert_eq!(
        status_patches[0].content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        status_patches[0].query_param("fieldManager").as_deref(),
        Some("holepunch")
    );
}

#[tokio::test]
async fn events_are_served_in_both_groups() {
    let s = setup().await;
    let events = Api::<Event>::namespaced(s.client.clone(), "default");
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some("web.".into()),
            ..Default::default()
        },
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        reporting_controller: Some("holepunch".into()),
        reporting_instance: Some("holepunch-host".into()),
        action: Some("Publish".into()),
        reason: Some("Mapped".into()),
        type_: Some("Normal".into()),
        note: Some("203.0.113.7:18080 -> web:8080".into()),
        regarding: Some(k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Service".into()),
            name: Some("web".into()),
            namespace: Some("default".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = events.create(&PostParams::default(), &event).await.unwrap();
    let name = name_of(&created);
    assert!(name.starts_with("web."));

    // The same object through core/v1.
    let core = Api::<CoreEvent>::namespaced(s.client.clone(), "default");
    let listed = core
        .list(&ListParams::default().fields("involvedObject.name=web,reason=Mapped"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let as_core = &listed.items[0];
    assert_eq!(
        as_core.message.as_deref(),
        Some("203.0.113.7:18080 -> web:8080")
    );
    assert_eq!(as_core.reporting_component.as_deref(), Some("holepunch"));
    assert_eq!(s.fake.objects("Event").len(), 1);

    // A core/v1 create, seen through events.k8s.io/v1.
    let core_event: CoreEvent = typed(json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "web.warning"},
        "involvedObject": {"kind": "Service", "name": "web", "namespace": "default"},
        "reason": "PortDenied", "message": "port 22 is denied", "type": "Warning",
        "source": {"component": "holepunch"}
    }));
    core.create(&PostParams::default(), &core_event)
        .await
        .unwrap();
    let seen = events.get("web.warning").await.unwrap();
    assert_eq!(seen.note.as_deref(), Some("port 22 is denied"));
    assert_eq!(seen.regarding.unwrap().name.as_deref(), Some("web"));

    // events.k8s.io/v1 validates what core/v1 does not.
    let invalid = api_error(
        events
            .create(
                &PostParams::default(),
                &Event {
                    metadata: ObjectMeta {
                        name: Some("bad".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert!(invalid.message.contains("reportingController"));
}

#[tokio::test]
async fn fail_next_fails_exactly_that_many_requests() {
    let s = setup().await;
    s.fake.apply_object(service("default", "web"));
    let api = Api::<Service>::all(s.client.clone());
    s.fake.fail_next(1, 500);
    let err = api_error(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (500, "InternalError"));
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    // kube-rs retries 503 (and 429, 504) by itself: two injected 503s cost one call two
    // retries, not an error.
    s.fake
        .fail_next_matching(2, 503, Some("PATCH"), Some("/status"));
    s.fake.clear_requests();
    Api::<Service>::namespaced(s.client.clone(), "default")
        .patch_status("web", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap();
    let statuses: Vec<u16> = s.fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
}

#[tokio::test]
async fn restart_keeps_objects_on_the_same_port() {
    let s = setup().await;
    let api = Api::<Service>::namespaced(s.client.clone(), "default");
    api.create(&PostParams::default(), &typed(service("default", "web")))
        .await
        .unwrap();
    let mut watch = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    next_where(&mut watch, "the ADDED of web", |e| {
        matches!(e, Ok(WatchEvent::Added(_))).then_some(())
    })
    .await;
    let rv = s.fake.resource_version();

    s.fake.stop().await;
    // The open watch ends (with an error or a clean end) and the port is closed.
    let ended = tokio::time::timeout(STEP, async {
        loop {
            match watch.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch survived stop()");
    assert!(api.list(&ListParams::default()).await.is_err());

    // Same port: the same client (the kubeconfig's URL) reaches it again.
    s.fake.restart().await;
    let listed = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        listed.items.iter().map(name_of).collect::<Vec<_>>(),
        ["web"]
    );
    assert_eq!(s.fake.resource_version(), rv);
    let second = api
        .create(&PostParams::default(), &typed(service("default", "web2")))
        .await
        .unwrap();
    let second_rv: u64 = second.metadata.resource_version.unwrap().parse().unwrap();
    assert!(second_rv > rv);
}

#[tokio::test]
async fn streaming_list_watcher_ends_its_initial_events_with_a_bookmark() {
    let s = setup().await;
    s.fake.apply_object(service("default", "web"));
    let api = Api::<Service>::all(s.client.clone());
    let mut events = watcher(api, watcher::Config::default().streaming_lists()).boxed();
    let initial = next_where(&mut events, "InitApply", |e| match e {
        Ok(watcher::Event::InitApply(svc)) => Some(name_of(&svc)),
        _ => None,
    })
    .await;
    assert_eq!(initial, "web");
    next_where(&mut events, "InitDone", |e| {
        matches!(e, Ok(watcher::Event::InitDone)).then_some(())
    })
    .await;
    s.fake.delete_object("Service", "default", "web").unwrap();
    next_where(&mut events, "Delete of web", |e| {
        matches!(e, Ok(watcher::Event::Delete(_))).then_some(())
    })
    .await;
    let requests = s.fake.requests();
    assert!(requests.iter().all(|r| r.is_watch()), "{requests:#?}");
    assert_eq!(
        requests[0].query_param("sendInitialEvents").as_deref(),
        Some("true")
    );
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let s = setup().await;
    let api = Api::<Service>::namespaced(s.client.clone(), "default");
    let mut svc = service("default", "web");
    svc["metadata"]["finalizers"] = json!(["holepunch.io/unmap"]);
    api.create(&PostParams::default(), &typed(svc))
        .await
        .unwrap();
    let mut stream = api
        .watch(
            &WatchParams::default(),
            &s.fake.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();

    api.delete("web", &DeleteParams::default()).await.unwrap();
    let terminating = api.get("web").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    next_where(
        &mut stream,
        "MODIFIED with deletionTimestamp",
        |e| match e {
            Ok(WatchEvent::Modified(svc)) => svc.metadata.deletion_timestamp.map(|_| ()),
            _ => None,
        },
    )
    .await;

    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    next_where(&mut stream, "DELETED", |e| {
        matches!(e, Ok(WatchEvent::Deleted(_))).then_some(())
    })
    .await;
    assert_eq!(api_error(api.get("web").await.unwrap_err()).code, 404);
}

#[tokio::test]
async fn namespaces_endpointslices_and_leases() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    let s = setup().await;
    let namespaces = Api::<Namespace>::all(s.client.clone());
    let names: Vec<_> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"]
    );

    // A namespace is created on first use.
    Api::<Service>::namespaced(s.client.clone(), "shop")
        .create(&PostParams::default(), &typed(service("shop", "web")))
        .await
        .unwrap();
    let shop = namespaces.get("shop").await.unwrap();
    assert_eq!(shop.status.unwrap().phase.as_deref(), Some("Active"));

    let slices = Api::<EndpointSlice>::namespaced(s.client.clone(), "shop");
    let slice: EndpointSlice = typed(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "nodeName": "n1", "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }));
    slices.create(&PostParams::default(), &slice).await.unwrap();
    let found = Api::<EndpointSlice>::all(s.client.clone())
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(found.items.len(), 1);
    assert_eq!(found.items[0].endpoints[0].node_name.as_deref(), Some("n1"));

    let leases = Api::<Lease>::namespaced(s.client.clone(), "shop");
    let lease: Lease = typed(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "holepunch"},
        "spec": {"holderIdentity": "host-a", "leaseDurationSeconds": 15}
    }));
    let mut held = leases.create(&PostParams::default(), &lease).await.unwrap();
    held.spec.as_mut().unwrap().holder_identity = Some("host-b".into());
    let taken = leases
        .replace("holepunch", &PostParams::default(), &held)
        .await
        .unwrap();
    assert_eq!(
        taken.spec.unwrap().holder_identity.as_deref(),
        Some("host-b")
    );

    // Deleting the namespace deletes what is in it.
    namespaces
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    assert!(s.fake.objects("Service").is_empty());
    assert!(s.fake.objects("EndpointSlice").is_empty());
    assert!(s.fake.objects("Lease").is_empty());
}
