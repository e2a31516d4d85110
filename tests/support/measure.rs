//! Measuring a running daemon for the benchmarks and the soak (tests/bench.rs,
//! tests/cluster_bench.rs, tests/soak.rs): its memory and open descriptors from `/proc`, one
//! metric from its `/metrics`, and the `BENCH` lines `scripts/bench` gathers into its table.
//!
//! Include with `#[path = "support/measure.rs"] mod measure;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Prints one figure for `scripts/bench`: `BENCH <key>\t<value>\t<unit>` on stdout.
pub fn report(key: &str, value: f64, unit: &str) {
    println!("BENCH {key}\t{value:.3}\t{unit}");
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How many file descriptors `pid` holds open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// The `p` quantile (0.0-1.0) of `values` (nearest rank); `NaN` for none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// The value of the series `series` (exactly as exposed, labels included) on the daemon's
/// `/metrics` at `address`; `None` while nothing answers or the series is absent.
pub fn metric(address: &str, series: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Reconcile passes the daemon at `address` has finished.
pub fn reconcile_passes(address: &str) -> Option<f64> {
    metric(address, "holepunch_reconcile_duration_seconds_count")
}

/// A config for the router lab: the daemon in `direct` mode through `backend`, leases of
/// `lease_secs`, the router checked every `verify_secs`, metrics on `metrics_listen` (`""`:
/// none), logging at info (a benchmark should not pay for debug lines).
pub fn lab_config(
    dir: &std::path::Path,
    kubeconfig: &std::path::Path,
    backend: &str,
    lease_secs: u32,
    verify_secs: u32,
    metrics_listen: &str,
) -> std::path::PathBuf {
    let path = dir.join("holepunch.toml");
    let body = format!(
        "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n\
         [router]\nbackend = \"{backend}\"\nlease_seconds = {lease_secs}\n\
         verify_interval_seconds = {verify_secs}\n\n\
         [exposure]\nmode = \"direct\"\ntarget_cidrs = [\"{LB_IP}/32\"]\n\n\
         [state]\npath = \"{dir}/state/state.toml\"\n\n[metrics]\nlisten = \"{metrics_listen}\"\n\n\
         [log]\nformat = \"text\"\nlevel = \"info\"\n",
        dir = dir.display(),
        kubeconfig = kubeconfig.display()
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// A LoadBalancer Service `default/<name>` with one TCP port on the lab's LoadBalancer IP,
/// annotated for holepunch or not; `label` goes into `metadata.labels.rev` (a change
/// holepunch must ignore).
pub fn load_balancer(name: &str, port: u16, annotated: bool, label: &str) -> serde_json::Value {
    let annotations = if annotated {
        serde_json::json!({"holepunch/punch-external": "true"})
    } else {
        serde_json::json!({})
    };
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": "default",
            "annotations": annotations, "labels": {"rev": label}
        },
        "spec": {"type": "LoadBalancer", "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    })
}

/// The LoadBalancer IP (as MetalLB would announce it) on the lab's node host.
pub const LB_IP: &str = "192.168.77.100";
