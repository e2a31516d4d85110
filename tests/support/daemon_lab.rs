//! The daemon in the router lab's LAN namespace with the in-test fake Kubernetes API, for
//! the lab tests that run `holepunch run` (tests/daemon_lab.rs, tests/metrics_lab.rs, ...);
//! [`with_fake_cluster_in`] is the fake cluster alone, for tests that start the daemon
//! themselves.
//!
//! Include after `bin`, `fake_api` and `lab`: `#[path = "support/daemon_lab.rs"] mod daemon_lab;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

use crate::bin::{Daemon, text};
use crate::fake_api::FakeApi;
use crate::lab::{Lab, in_netns};

pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
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

/// Whether the cluster holds an Event on Service `service` with `reason` whose message contains
/// `text` (`kind`: "Warning" or "Normal", or any when `None`), as `kubectl get events` lists it.
pub fn has_event(
    kubeconfig: &Path,
    kind: Option<&str>,
    reason: &str,
    service: &str,
    text: &str,
) -> bool {
    let events = kubectl(kubeconfig, &["get", "events", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_str(&events).unwrap_or_default();
    events["items"].as_array().is_some_and(|items| {
        items.iter().any(|e| {
            kind.is_none_or(|kind| e["type"] == kind)
                && e["reason"] == reason
                && e["involvedObject"]["name"] == service
                && e["message"].as_str().is_some_and(|m| m.contains(text))
        })
    })
}

/// Polls `condition` every 100 ms until it holds; panics after `limit` with `what` and the
/// daemon's log.
pub fn wait_until(
    daemon: &Daemon,
    what: &str,
    limit: Duration,
    condition: impl FnMut() -> bool,
) -> Duration {
    wait_until_logged(|| daemon.log(), what, limit, condition)
}

/// Waits up to `limit` for the daemon's first reconcile (its "first reconcile done; ready"
/// line, logged with READY=1).
pub fn wait_for_first_reconcile(daemon: &Daemon, limit: Duration) -> Duration {
    wait_until(daemon, "the first reconcile", limit, || {
        daemon.log().contains("first reconcile done")
    })
}

/// [`wait_until`] for a daemon started some other way: `log` reads its log for the panic.
pub fn wait_until_logged(
    log: impl Fn() -> String,
    what: &str,
    limit: Duration,
    condition: impl FnMut() -> bool,
) -> Duration {
    wait_until_logged_every(Duration::from_millis(100), log, what, limit, condition)
}

/// [`wait_until_logged`], looking every `poll`: a wait that is also a measurement (a
/// takeover's time) wants a finer step than 100 ms.
pub fn wait_until_logged_every(
    poll: Duration,
    log: impl Fn() -> String,
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}; the daemon logged:\n{}",
            log()
        );
        std::thread::sleep(poll);
    }
    start.elapsed()
}

/// The router's forwarding rules for `port`, one per mapping.
pub fn forwards_of(lab: &Lab, port: u16) -> Vec<String> {
    lab.router_forwards()
        .lines()
        .filter(|line| line.contains(&format!("dport {port} ")))
        .map(|line| line.trim().to_owned())
        .collect()
}

/// A config for the lab: `backend`, `mode`, the lab's LB IP 192.168.77.100 in `target_cidrs`
/// (as a MetalLB user lists the pool), leases of 120 s (miniupnpd's least), verify every
/// 5 s, no metrics listener.
pub fn config(dir: &Path, kubeconfig: &Path, mode: &str, backend: &str) -> std::path::PathBuf {
    config_with_metrics(dir, kubeconfig, mode, backend, "")
}

/// [`config`] with `metrics.listen = metrics_listen`.
pub fn config_with_metrics(
    dir: &Path,
    kubeconfig: &Path,
    mode: &str,
    backend: &str,
    metrics_listen: &str,
) -> std::path::PathBuf {
    let path = dir.join("holepunch.toml");
    let body = format!(
        "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n\
         [router]\nbackend = \"{backend}\"\nlease_seconds = 120\nverify_interval_seconds = 5\n\n\
         [exposure]\nmode = \"{mode}\"\ntarget_cidrs = [\"192.168.77.100/32\"]\n{wan}\n\
         [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"{metrics_listen}\"\n\n\
         [log]\nformat = \"text\"\nlevel = \"info,holepunch=debug\"\n",
        dir = dir.display(),
        kubeconfig = kubeconfig.display(),
        // The lab router's WAN side (gateway mode runs on the router).
        wan = if mode == "gateway" {
            "wan_interface = \"rwan\"\n"
        } else {
            ""
        },
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// The cluster and the daemon, inside the lab's LAN namespace: `body` gets the fake API, the
/// kubeconfig, the config path and the running daemon (`metrics_listen`: see
/// [`config_with_metrics`]).
pub fn with_daemon_in_lan(
    lab: &Lab,
    mode: &str,
    backend: &str,
    metrics_listen: &str,
    body: impl FnOnce(&FakeApi, &Path, &Path, &Daemon) + Send,
) {
    with_daemon_in(lab, "lan", mode, backend, metrics_listen, body);
}

/// [`with_daemon_in_lan`] in another of the lab's namespaces (`rtr`: on the router itself).
pub fn with_daemon_in(
    lab: &Lab,
    ns: &str,
    mode: &str,
    backend: &str,
    metrics_listen: &str,
    body: impl FnOnce(&FakeApi, &Path, &Path, &Daemon) + Send,
) {
    with_fake_cluster_in(lab, ns, |fake, dir, kubeconfig, _| {
        let config = config_with_metrics(dir, kubeconfig, mode, backend, metrics_listen);
        let daemon = Daemon::start(&config);
        body(fake, kubeconfig, &config, &daemon);
        drop(daemon);
    });
}

/// A fake cluster inside the lab's namespace `ns` (`lan`, `rtr`, ...): this thread enters it,
/// builds a 2-thread runtime, starts the fake API and writes its kubeconfig into a fresh
/// temporary directory. `body` gets the fake API, that directory, the kubeconfig and the
/// runtime (for `block_on`); after it the fake API is dropped before the runtime shuts down
/// (its server runs on that runtime).
pub fn with_fake_cluster_in<T: Send>(
    lab: &Lab,
    ns: &str,
    body: impl FnOnce(&FakeApi, &Path, &Path, &Runtime) -> T + Send,
) -> T {
    let dir = tempfile::tempdir().expect("tempdir");
    with_fake_cluster_at(lab, ns, dir.path(), body)
}

/// [`with_fake_cluster_in`] with the kubeconfig written into `dir`, which the caller owns (and
/// may use before and after).
pub fn with_fake_cluster_at<T: Send>(
    lab: &Lab,
    ns: &str,
    dir: &Path,
    body: impl FnOnce(&FakeApi, &Path, &Path, &Runtime) -> T + Send,
) -> T {
    in_netns(&lab.ns(ns), || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let fake = runtime.block_on(FakeApi::start());
        let kubeconfig = fake.write_kubeconfig(dir);
        let out = body(&fake, dir, &kubeconfig, &runtime);
        drop(fake);
        runtime.shutdown_timeout(Duration::from_secs(1));
        out
    })
}
