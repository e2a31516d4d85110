//! `holepunch run` against a Kubernetes API (the in-test fake, driven with real kubectl):
//! annotating a Service publishes it, removing the annotation or the Service unpublishes it.
//! No router here (`backend = "none"`): the state file is the observable result.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/fake_api/mod.rs"]
mod fake_api;

use std::path::Path;
use std::process::Command;

use bin::{Daemon, status_json, test_config, text, wait_for};
use fake_api::FakeApi;
use serde_json::json;

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs (install kubernetes-client)");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The mappings `holepunch status -o json` reports, by port: (external port, protocol, owner,
/// status).
fn mappings(config: &Path) -> Vec<(u64, String, String, String)> {
    let json = status_json(config);
    let mut rows: Vec<_> = json["mappings"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|m| {
                    (
                        m["external_port"].as_u64().unwrap_or(0),
                        m["protocol"].as_str().unwrap_or("").to_owned(),
                        m["owner"].as_str().unwrap_or("").to_owned(),
                        m["status"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort();
    rows
}

fn row(port: u64, protocol: &str, owner: &str, status: &str) -> (u64, String, String, String) {
    (port, protocol.into(), owner.into(), status.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotating_publishes_and_unannotating_or_deleting_unpublishes() {
    let fake = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = fake.write_kubeconfig(dir.path());
    let config = test_config(dir.path(), Some(&kubeconfig));
    // Direct mode: this test runs in the machine's own network namespace, where holepunch
    // must not install relay rules (tests/daemon_lab.rs covers relay inside the lab).
    let body = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(
        &config,
        body.replace("[exposure]\n", "[exposure]\nmode = \"direct\"\n"),
    )
    .expect("write config");
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.168.77.20"}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }));
    let manifest = dir.path().join("svc.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec:\n  type: NodePort\n  ports:\n  - {name: http, port: 8080, protocol: TCP}\n  \
         - {name: voice, port: 9987, protocol: UDP}\n",
    )
    .expect("write manifest");
    kubectl(
        &kubeconfig,
        &["apply", "-f", manifest.to_str().expect("utf-8")],
    );

    let daemon = Daemon::start(&config);
    let config = config.as_path();
    // Ready and reconciled: the state file exists, and holds nothing (not annotated yet).
    wait_for("the first reconcile", || {
        dir.path().join("state/state.toml.lock").exists()
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(mappings(config), []);

    kubectl(
        &kubeconfig,
        &["annotate", "svc", "web", "holepunch/punch-external=true"],
    );
    wait_for("both ports to be published", || {
        mappings(config)
            == [
                row(8080, "tcp", "default/web", "active"),
                row(9987, "udp", "default/web", "active"),
            ]
    });

    // A remap moves one port: the old external port goes, the new one comes.
    kubectl(
        &kubeconfig,
        &["annotate", "svc", "web", "holepunch.port/8080=18080"],
    );
    wait_for("the remap", || {
        mappings(config)
            == [
                row(9987, "udp", "default/web", "active"),
                row(18080, "tcp", "default/web", "active"),
            ]
    });

    kubectl(
        &kubeconfig,
        &["annotate", "svc", "web", "holepunch/punch-external-"],
    );
    wait_for("unpublishing after the annotation is removed", || {
        mappings(config).is_empty()
    });

    kubectl(
        &kubeconfig,
        &["annotate", "svc", "web", "holepunch/punch-external=true"],
    );
    wait_for("publishing again", || mappings(config).len() == 2);
    kubectl(&kubeconfig, &["delete", "svc", "web"]);
    wait_for("unpublishing after the Service is deleted", || {
        mappings(config).is_empty()
    });

    let log = daemon.stop();
    assert!(log.contains("mapped"), "{log}");
    assert!(log.contains("unmapped"), "{log}");
}

/// With an allow list of namespaces, only those are watched (so RoleBindings in them are
/// enough rights), and Services elsewhere are not published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_watches_only_its_namespaces() {
    let fake = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = fake.write_kubeconfig(dir.path());
    let config = test_config(dir.path(), Some(&kubeconfig));
    let body = std::fs::read_to_string(&config).expect("read config");
    let body = body
        .replace("[exposure]\n", "[exposure]\nmode = \"direct\"\n")
        .replace(
            "[kubernetes]\n",
            "[kubernetes]\nnamespaces = [\"media\", \"games\"]\n",
        );
    std::fs::write(&config, body).expect("write config");
    for (namespace, port) in [("media", 8096), ("games", 25565), ("private", 8443)] {
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "app", "namespace": namespace,
                "annotations": {"holepunch/punch-external": "true"}
            },
            "spec": {"type": "LoadBalancer", "ports": [{"port": port, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.168.77.100"}]}}
        }));
    }
    let daemon = Daemon::start(&config);
    let config = config.as_path();
    wait_for("the allowed namespaces' Services", || {
        mappings(config)
            == [
                row(8096, "tcp", "media/app", "active"),
                row(25565, "tcp", "games/app", "active"),
            ]
    });
    let service_paths: Vec<String> = fake
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|p| p.ends_with("/services") || p.ends_with("/endpointslices"))
        .collect();
    assert!(
        service_paths
            .iter()
            .all(|p| p.contains("/namespaces/media/") || p.contains("/namespaces/games/")),
        "{service_paths:?}"
    );
    drop(daemon);
}
