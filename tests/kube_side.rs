//! The cluster-facing writers against the in-test fake Kubernetes API (real HTTPS, checked
//! with real `kubectl`): Events on Services (`holepunch::kube::events`) and the LoadBalancer
//! status of holepunch's own class (`holepunch::kube::status`); and `holepunch plan` reading
//! EndpointSlices for `externalTrafficPolicy: Local` Services.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/fake_api/mod.rs"]
mod fake_api;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use fake_api::FakeApi;
use holepunch::kube::KubeError;
use holepunch::kube::events::{EventKind, EventPublisher, event_for_live, event_for_problem};
use holepunch::kube::status::{StatusUpdate, status_updates, write_status};
use holepunch::model::{Backend, Endpoint, MappingKey, Owner, Problem, ProblemKind, Protocol};
use holepunch::state::MappingRecord;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

const CLASS: &str = "holepunch.io/router";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(11, 22, 33, 44);

/// Runs `kubectl --kubeconfig <kubeconfig> <args>` (private discovery cache); must succeed.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let binary = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let out = Command::new(&binary)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(kubeconfig.with_file_name("kubectl-cache"))
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("kubectl runs (Debian: apt-get install kubernetes-client)");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_json(kubeconfig: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(kubeconfig, &all)).expect("kubectl prints JSON")
}

struct Setup {
    fake: FakeApi,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    client: kube::Client,
}

async fn setup() -> Setup {
    let fake = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = fake.write_kubeconfig(dir.path());
    let client = fake.client().await;
    Setup {
        fake,
        dir,
        kubeconfig,
        client,
    }
}

fn service(name: &str, class: Option<&str>, ingress: Option<Value>) -> Value {
    let mut spec = json!({"type": "LoadBalancer", "ports": [{"name": "http", "port": 8080}]});
    if let Some(class) = class {
        spec["loadBalancerClass"] = json!(class);
    }
    let mut object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    });
    if let Some(ingress) = ingress {
        object["status"] = json!({"loadBalancer": {"ingress": ingress}});
    }
    object
}

fn live_record(owner: &str, external_port: u16) -> MappingRecord {
    MappingRecord {
        service_port: 8080,
        target: Endpoint::new(Ipv4Addr::new(192, 168, 77, 20), 30080),
        times: holepunch::state::LeaseTimes {
            lifetime_secs: 3600,
            ..Default::default()
        },
        external_address: Some(EXTERNAL_IP),
        ..MappingRecord::leftover(
            owner.parse().expect("owner"),
            MappingKey {
                protocol: Protocol::Tcp,
                external_port,
            },
            Endpoint::new(Ipv4Addr::new(192, 168, 77, 10), external_port),
            Backend::Upnp,
        )
    }
}

/// Every Event holepunch wrote, as `kubectl get events` (core/v1) shows them:
/// (involvedObject name, type, reason, message).
fn events_seen_by_kubectl(kubeconfig: &Path) -> Vec<(String, String, String, String)> {
    let list = kubectl_json(kubeconfig, &["get", "events", "-n", "default"]);
    let mut rows: Vec<_> = list["items"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["reportingComponent"] == "holepunch")
        .map(|e| {
            let field = |p: &str| {
                e.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            (
                field("/involvedObject/name"),
                field("/type"),
                field("/reason"),
                field("/message"),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn event_creates(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_published_once_and_again_after_they_come_back() {
    let s = setup().await;
    let web = s.fake.apply_object(service("web", None, None));
    s.fake.apply_object(service("young", None, None));
    let conflict = event_for_problem(&Problem {
        owner: Owner::new("default", "young"),
        kind: ProblemKind::PortConflict,
        message: "external port 8080/tcp is held by another Service; choose another port with \
                  the annotation holepunch.port/8080"
            .into(),
        detail: Some("held by default/web (service port 8080): it was created earlier".into()),
    })
    .expect("a Warning");
    let live = event_for_live(&live_record("default/web", 8080));
    let mut publisher = EventPublisher::new(s.client.clone(), "holepunch-test-host");

    assert_eq!(
        publisher
            .publish_changes(&[conflict.clone(), live.clone()])
            .await,
        2
    );
    let seen = events_seen_by_kubectl(&s.kubeconfig);
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        (seen[0].0.as_str(), seen[0].1.as_str(), seen[0].2.as_str()),
        ("web", "Normal", "Published")
    );
    assert!(seen[0].3.contains("11.22.33.44:8080"), "{}", seen[0].3);
    assert_eq!(
        (seen[1].0.as_str(), seen[1].1.as_str(), seen[1].2.as_str()),
        ("young", "Warning", "PortConflict")
    );
    assert!(
        seen[1].3.contains("held by another Service") && !seen[1].3.contains("default/web"),
        "tenant-safe, the detail stays with the operator: {}",
        seen[1].3
    );

    // As events.k8s.io/v1 has them: reporting controller and instance, and the Service's uid,
    // which `kubectl describe svc` matches on.
    let v1 = kubectl_json(
        &s.kubeconfig,
        &["get", "events.v1.events.k8s.io", "-n", "default"],
    );
    let on_web = v1["items"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|e| e["regarding"]["name"] == "web")
        .expect("the Event on web");
    assert_eq!(on_web["reportingController"], "holepunch");
    assert_eq!(on_web["reportingInstance"], "holepunch-test-host");
    assert_eq!(on_web["regarding"]["kind"], "Service");
    assert_eq!(on_web["regarding"]["uid"], web["metadata"]["uid"]);
    let described = kubectl(&s.kubeconfig, &["describe", "svc", "web"]);
    assert!(
        described.contains("Published") && described.contains("11.22.33.44:8080"),
        "kubectl describe shows the Event: {described}"
    );

    // Unchanged set: nothing new.
    let creates = event_creates(&s.fake);
    assert_eq!(
        publisher
            .publish_changes(&[live.clone(), conflict.clone()])
            .await,
        0
    );
    assert_eq!(event_creates(&s.fake), creates, "no request to create");
    assert_eq!(events_seen_by_kubectl(&s.kubeconfig).len(), 2);

    // The conflict goes away, then comes back: published again, once.
    assert_eq!(
        publisher.publish_changes(std::slice::from_ref(&live)).await,
        0
    );
    assert_eq!(
        publisher
            .publish_changes(&[live.clone(), conflict.clone()])
            .await,
        1
    );
    let seen = events_seen_by_kubectl(&s.kubeconfig);
    let conflicts = seen.iter().filter(|e| e.2 == "PortConflict").count();
    assert_eq!((seen.len(), conflicts), (3, 2), "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_is_retried_after_a_backoff_and_a_deleted_service_is_not() {
    let s = setup().await;
    s.fake.apply_object(service("web", None, None));
    let mut publisher = EventPublisher::new(s.client.clone(), "host");
    let denied = event_for_problem(&Problem {
        owner: Owner::new("default", "web"),
        kind: ProblemKind::DeniedPort,
        message: "external port 22 is on the deny list".into(),
        detail: None,
    })
    .expect("a Warning");
    let gone = event_for_live(&live_record("default/gone", 9000));

    s.fake
        .fail_next_matching(1, 500, Some("POST"), Some("/events"));
    assert_eq!(
        publisher
            .publish_changes(&[denied.clone(), gone.clone()])
            .await,
        0
    );
    assert!(events_seen_by_kubectl(&s.kubeconfig).is_empty());

    // Not at the very next reconcile: the refused Event has a backoff of its own.
    s.fake.clear_requests();
    assert_eq!(
        publisher
            .publish_changes(&[denied.clone(), gone.clone()])
            .await,
        0
    );
    assert_eq!(s.fake.requests().len(), 0, "{:#?}", s.fake.requests());

    s.fake.clear_requests();
    let later = std::time::Instant::now() + std::time::Duration::from_secs(6);
    assert_eq!(
        publisher
            .publish_changes_at(&[denied.clone(), gone.clone()], later)
            .await,
        1,
        "the failed one is retried after its backoff"
    );
    let gets_of_gone = s
        .fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/services/gone"))
        .count();
    assert_eq!(gets_of_gone, 0, "a missing Service is not asked for again");
    let seen = events_seen_by_kubectl(&s.kubeconfig);
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(
        (seen[0].1.as_str(), seen[0].2.as_str()),
        ("Warning", "DeniedPort")
    );
    assert_eq!(denied.kind, EventKind::Warning);
}

async fn list_services(client: &kube::Client) -> Vec<Service> {
    Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list services")
        .items
}

fn resource_version(fake: &FakeApi, name: &str) -> String {
    fake.object("Service", "default", name).expect("stored")["metadata"]["resourceVersion"]
        .as_str()
        .expect("a resourceVersion")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_gets_the_external_ip_with_ip_mode_proxy_and_is_cleared_when_unpublished() {
    let s = setup().await;
    s.fake.apply_object(service("lb", Some(CLASS), None));
    s.fake.apply_object(service(
        "metallb",
        Some("metallb.io/l2"),
        Some(json!([{"ip": "192.168.77.100", "ipMode": "VIP"}])),
    ));
    s.fake.apply_object(service("plain", None, None));
    let other_rv = resource_version(&s.fake, "metallb");
    let plain_rv = resource_version(&s.fake, "plain");
    let all_published: BTreeSet<(String, String)> = ["lb", "metallb", "plain"]
        .iter()
        .map(|n| ("default".to_owned(), (*n).to_owned()))
        .collect();

    let updates = status_updates(
        &list_services(&s.client).await,
        CLASS,
        Some(EXTERNAL_IP),
        &all_published,
        &std::collections::BTreeMap::new(),
    );
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(
        (updates[0].name.as_str(), updates[0].ingress_ip),
        ("lb", Some(EXTERNAL_IP))
    );
    for update in &updates {
        write_status(&s.client, update)
            .await
            .expect("status written");
    }
    let lb = kubectl_json(&s.kubeconfig, &["get", "svc", "lb"]);
    assert_eq!(
        lb["status"]["loadBalancer"]["ingress"],
        json!([{"ip": "11.22.33.44", "ipMode": "Proxy"}])
    );

    // Already correct: nothing to write.
    let again = status_updates(
        &list_services(&s.client).await,
        CLASS,
        Some(EXTERNAL_IP),
        &all_published,
        &std::collections::BTreeMap::new(),
    );
    assert_eq!(again, []);

    // Unpublished: cleared.
    let updates = status_updates(
        &list_services(&s.client).await,
        CLASS,
        Some(EXTERNAL_IP),
        &BTreeSet::new(),
        &std::collections::BTreeMap::new(),
    );
    assert_eq!(updates.len(), 1, "{updates:?}");
    write_status(&s.client, &updates[0]).await.expect("cleared");
    let lb = kubectl_json(&s.kubeconfig, &["get", "svc", "lb"]);
    let ingress = &lb["status"]["loadBalancer"]["ingress"];
    assert!(
        ingress.is_null() || ingress == &json!([]),
        "cleared: {ingress}"
    );

    // The Services of another class, or of none, were never written.
    assert_eq!(resource_version(&s.fake, "metallb"), other_rv);
    assert_eq!(resource_version(&s.fake, "plain"), plain_rv);
    let metallb = kubectl_json(&s.kubeconfig, &["get", "svc", "metallb"]);
    assert_eq!(
        metallb["status"]["loadBalancer"]["ingress"],
        json!([{"ip": "192.168.77.100", "ipMode": "VIP"}])
    );
    assert!(
        !s.fake
            .requests()
            .iter()
            .any(|r| r.method == "PATCH" && !r.path.contains("/services/lb/")),
        "only lb was patched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_changed_class_since_it_was_read_is_not_written() {
    let s = setup().await;
    s.fake.apply_object(service("lb", Some(CLASS), None));
    let read = list_services(&s.client).await;
    // Between the read and the write, someone hands the Service to another implementation.
    let mut moved = service("lb", Some("metallb.io/l2"), None);
    moved["metadata"]["annotations"] = json!({"moved": "yes"});
    s.fake.apply_object(moved);
    let moved_rv = resource_version(&s.fake, "lb");

    let updates = status_updates(
        &read,
        CLASS,
        Some(EXTERNAL_IP),
        &BTreeSet::from([("default".to_owned(), "lb".to_owned())]),
        &std::collections::BTreeMap::new(),
    );
    assert_eq!(updates.len(), 1);
    let err = write_status(&s.client, &updates[0])
        .await
        .expect_err("a stale write is refused");
    assert!(matches!(err, KubeError::Request { .. }), "{err}");
    assert_eq!(resource_version(&s.fake, "lb"), moved_rv, "untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_status_permission_says_what_to_grant() {
    let s = setup().await;
    s.fake.apply_object(service("lb", Some(CLASS), None));
    s.fake.forbid("patch", "services/status");
    let update = StatusUpdate {
        namespace: "default".into(),
        name: "lb".into(),
        ingress_ip: Some(EXTERNAL_IP),
        ingress_ip6: None,
        resource_version: None,
    };
    let err = write_status(&s.client, &update)
        .await
        .expect_err("forbidden");
    assert!(
        matches!(err, KubeError::Forbidden { code: 403, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("rbac.yaml"), "{err}");
}

fn ready_node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

fn endpoint_slice(service: &str, node: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-x1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.7"], "nodeName": node,
                       "conditions": {"ready": ready}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// `holepunch plan` against the fake: its stdout.
fn plan(config: &Path) -> String {
    let out = bin::holepunch(&["plan", "--config", config.to_str().expect("utf-8")]);
    assert!(out.status.success(), "plan: {}", bin::text(&out.stderr));
    bin::text(&out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_sends_local_traffic_only_to_a_node_hosting_a_ready_endpoint() {
    let s = setup().await;
    let config = bin::test_config(s.dir.path(), Some(&s.kubeconfig));
    s.fake.apply_object(ready_node("node-a", "192.168.77.20"));
    s.fake.apply_object(ready_node("node-b", "192.168.77.21"));
    let mut web = service("web", None, None);
    web["metadata"]["annotations"] = json!({"holepunch/punch-external": "true"});
    web["spec"]["externalTrafficPolicy"] = json!("Local");
    let web = s.fake.apply_object(web);
    let node_port = web["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("a nodePort was allocated");
    s.fake.apply_object(endpoint_slice("web", "node-b", true));

    let on_b = format!("192.168.77.21:{node_port}");
    let text = plan(&config);
    assert!(
        text.lines()
            .any(|l| l.contains("map") && l.contains("default/web") && l.contains(&on_b)),
        "node-b hosts the only endpoint, node-a comes first by name: {text}"
    );

    s.fake.apply_object(endpoint_slice("web", "node-b", false));
    let text = plan(&config);
    assert!(
        text.lines()
            .any(|l| l.contains("problem") && l.contains("default/web") && l.contains("no-target")),
        "no ready endpoint, no target: {text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("map")), "{text}");
}

/// Not a timed test: prints what 200 Events and 200 status writes cost against the fake
/// (`cargo test --test kube_side -- --ignored --nocapture measure`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn measure_200_events_and_200_status_writes() {
    const SERVICES: usize = 200;
    let s = setup().await;
    let mut events = Vec::new();
    for i in 0..SERVICES {
        let name = format!("lb{i}");
        s.fake.apply_object(service(&name, Some(CLASS), None));
        events.push(event_for_live(&live_record(
            &format!("default/{name}"),
            20000 + i as u16,
        )));
    }
    let mut publisher = EventPublisher::new(s.client.clone(), "host");
    let started = std::time::Instant::now();
    assert_eq!(publisher.publish_changes(&events).await, SERVICES);
    let first = started.elapsed();
    let started = std::time::Instant::now();
    assert_eq!(publisher.publish_changes(&events).await, 0);
    let unchanged = started.elapsed();

    let all: BTreeSet<(String, String)> = (0..SERVICES)
        .map(|i| ("default".to_owned(), format!("lb{i}")))
        .collect();
    let services = list_services(&s.client).await;
    let started = std::time::Instant::now();
    let updates = status_updates(
        &services,
        CLASS,
        Some(EXTERNAL_IP),
        &all,
        &std::collections::BTreeMap::new(),
    );
    let decide = started.elapsed();
    let started = std::time::Instant::now();
    for update in &updates {
        write_status(&s.client, update).await.expect("written");
    }
    let writes = started.elapsed();
    println!(
        "{SERVICES} Events: {first:?} (unchanged set: {unchanged:?}); status_updates over \
         {SERVICES} Services: {decide:?}; {} status writes: {writes:?}",
        updates.len()
    );
}
