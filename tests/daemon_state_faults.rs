//! Issue 8's fault rows for the daemon itself, against the router lab (miniupnpd 2.3.1 in
//! network namespaces, prefix `hpw-`) and the in-test fake Kubernetes API:
//!
//! - the state directory turns read-only, then full: the old state file keeps its bytes, the
//!   log and `/healthz` say why and what to do, the published Service keeps carrying WAN
//!   traffic (its renewal still goes), a newly annotated Service is not sent to the router
//!   (checked on the router's LAN link with tcpdump), and once the directory is writable
//!   again the new Service is mapped and saved;
//! - the daemon stopped (SIGSTOP) past its lease, then resumed: the mapping is back and
//!   carries traffic within 10 s;
//! - a denied port: zero PCP/NAT-PMP packets reach the router while it is annotated (a
//!   tcpdump capture on the router's LAN link, which does see the allowed Service's).
//!
//! The state directory is a 256 KiB tmpfs mounted in a private mount namespace that only the
//! daemon lives in (`unshare --mount`), so nothing is mounted in the host's namespace; the
//! test reaches it with `nsenter --mount`.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bin::{BIN, text};
use daemon_lab::{
    config_with_metrics, forwards_of, has_event, kubectl, wait_for_first_reconcile, wait_until,
    wait_until_logged, with_daemon_in_lan, with_fake_cluster_at,
};
use fake_api::FakeApi;
use lab::{Lab, ROUTER_WAN_IP, WAN_CLIENT_IP};
use serde_json::json;

// One prefix per test: their labs come up side by side (the SIGSTOP test alone waits 130 s).
const PREFIX: &str = "hpw-";
const STOP_PREFIX: &str = "hpv-";
const CAPTURE_PREFIX: &str = "hpy-";
/// The LoadBalancer IP (as MetalLB would announce it) on the lab's node host.
const LB_IP: &str = "192.168.77.100";
/// Where `/metrics` and `/healthz` listen, inside the lab's LAN namespace.
const METRICS: &str = "127.0.0.1:9473";
/// The router's lease (miniupnpd's `min_lifetime`, what the lab configs ask for).
const LEASE_SECS: u64 = 120;

/// A LoadBalancer Service `name` with one TCP port, on the lab's LB IP.
fn tcp_service(fake: &FakeApi, name: &str, port: u16) {
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    }));
}

fn annotate(kubeconfig: &Path, name: &str) {
    kubectl(
        kubeconfig,
        &["annotate", "svc", name, "holepunch/punch-external=true"],
    );
}

/// Whether a WAN client reaches `port` on the router's public address, and the Service answers.
fn carries(lab: &Lab, port: u16, line: &str) -> bool {
    lab.ask("wan", "tcp", ROUTER_WAN_IP, port, line).as_deref()
        == Some(format!("{WAN_CLIENT_IP} {line}").as_str())
}

/// `holepunch run` with its state directory on a small tmpfs in a mount namespace of its own.
/// Killed (by its PID) when dropped; the tmpfs goes with its namespace.
struct ConfinedDaemon {
    child: Child,
    log: PathBuf,
    state_dir: PathBuf,
}

impl ConfinedDaemon {
    fn start(config: &Path, state_dir: &Path) -> ConfinedDaemon {
        std::fs::create_dir_all(state_dir).expect("create the mount point");
        let log = config.with_file_name("daemon.log");
        let stderr = std::fs::File::create(&log).expect("create daemon.log");
        // unshare and sh exec: the child's PID is the daemon's.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=256k,mode=0700 holepunch-state "$1" && exec "$2" run --config "$3""#)
            .arg("sh")
            .arg(state_dir)
            .arg(BIN)
            .arg(config)
            .env_remove("KUBECONFIG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn unshare (util-linux)");
        ConfinedDaemon {
            child,
            log,
            state_dir: state_dir.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `cmd` in the daemon's mount namespace (where its state directory is mounted).
    fn in_mounts(&self, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.child.id().to_string(), "-m", "--"])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter (util-linux)")
    }

    fn in_mounts_ok(&self, script: &str) {
        let out = self.in_mounts(&["sh", "-c", script]);
        assert!(
            out.status.success(),
            "{script}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    /// The state file's bytes as the daemon's namespace sees them.
    fn state_bytes(&self) -> Vec<u8> {
        let path = self.state_dir.join("state.toml");
        let out = self.in_mounts(&["cat", path.to_str().expect("utf-8")]);
        assert!(out.status.success(), "cat state: {}", text(&out.stderr));
        out.stdout
    }

    fn state_text(&self) -> String {
        text(&self.state_bytes())
    }

    fn dir(&self) -> &str {
        self.state_dir.to_str().expect("utf-8")
    }

    /// Polls `condition` every 100 ms until it holds; panics after `limit` with the log.
    fn wait(&self, what: &str, limit: Duration, condition: impl FnMut() -> bool) -> Duration {
        wait_until_logged(|| self.log(), what, limit, condition)
    }
}

impl Drop for ConfinedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /healthz` from inside the LAN namespace: status code and body.
fn healthz() -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(METRICS).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: holepunch\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let code = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split("\r\n\r\n").nth(1)?.to_owned();
    Some((code, body))
}

/// tcpdump on one of the router's links, one line per packet into a file; stopped (by its
/// PID) when dropped.
struct Capture {
    child: Child,
    out: PathBuf,
}

impl Capture {
    /// Starts capturing `filter` (pcap syntax) on `link` in the lab's router namespace and
    /// returns once tcpdump listens.
    fn start(lab: &Lab, dir: &Path, name: &str, link: &str, filter: &str) -> Capture {
        let out = dir.join(format!("{name}.txt"));
        let err = dir.join(format!("{name}.err"));
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("rtr")])
            .args(["tcpdump", "-i", link, "-n", "-l", "--immediate-mode"])
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("capture file"))
            .stderr(std::fs::File::create(&err).expect("capture log"))
            .spawn()
            .expect("run tcpdump");
        let mut capture = Capture { child, out };
        let start = Instant::now();
        loop {
            let said = std::fs::read_to_string(&err).unwrap_or_default();
            if said.contains("listening on") {
                return capture;
            }
            if let Ok(Some(status)) = capture.child.try_wait() {
                panic!("tcpdump ended ({status}): {said}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "tcpdump did not start: {said}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The packets captured so far, one line each.
    fn packets(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PCP MAP requests (RFC 6887 §11.1) for external or internal port `port`: the UDP payload
/// holds the 24-byte header, then the 12-byte nonce, protocol, 3 reserved bytes, the
/// internal port (payload offset 40) and the suggested external port (42).
fn pcp_map_filter(port: u16) -> String {
    format!(
        "udp dst port 5351 and udp[8] = 2 and udp[9] = 1 and (udp[48:2] = {port} or udp[50:2] = {port})"
    )
}

/// The lines of `log` after its first `skip` bytes that contain `needle`.
fn count_after(log: &str, skip: usize, needle: &str) -> usize {
    log.get(skip..).unwrap_or_default().matches(needle).count()
}

/// Read-only, then full: the daemon keeps the old file, says why, keeps renewing what it
/// published, sends nothing for a new Service, and maps it once it can save again.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_read_only_or_full_state_directory_keeps_the_old_state_and_serving() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    let _servers = [8080, 9090, 9191].map(|port| lab.echo_server("node", LB_IP, port));
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let captures = [9090, 9191].map(|port| {
        Capture::start(
            &lab,
            dir,
            &format!("pcp-{port}"),
            "br0",
            &pcp_map_filter(port),
        )
    });

    with_fake_cluster_at(&lab, "lan", dir, |fake, dir, kubeconfig, _| {
        let config = config_with_metrics(dir, kubeconfig, "direct", "pcp", METRICS);
        let daemon = ConfinedDaemon::start(&config, &dir.join("state"));
        let state_dir = daemon.dir().to_owned();

        tcp_service(fake, "web", 8080);
        annotate(kubeconfig, "web");
        daemon.wait("web published", Duration::from_secs(20), || {
            carries(&lab, 8080, "hello") && daemon.state_text().contains("status = \"active\"")
        });
        assert!(
            daemon
                .in_mounts(&["findmnt", "-n", "-o", "FSTYPE", &state_dir])
                .stdout
                == b"tmpfs\n",
            "the state directory is the daemon's own tmpfs"
        );

        for (fault, new, port, why) in [
            ("read-only", "chat", 9090, "Read-only file system"),
            ("full", "game", 9191, "No space left on device"),
        ] {
            let capture = &captures[usize::from(port == 9191)];
            let saved = daemon.state_bytes();
            let log_at = daemon.log().len();
            let renewals_before = daemon.log().matches("reconcile: renewed").count();
            match fault {
                // NOTE: `remount,ro` of the tmpfs itself is refused (EBUSY) while the daemon
                // holds its lock file open for writing: a read-only bind mount on top has no
                // writers and turns every path under it read-only.
                "read-only" => daemon.in_mounts_ok(&format!(
                    "mount --bind {state_dir} {state_dir} && mount -o remount,bind,ro {state_dir}"
                )),
                _ => daemon.in_mounts_ok(&format!(
                    "dd if=/dev/zero of={state_dir}/filler bs=4k 2>/dev/null; test -s {state_dir}/filler"
                )),
            }
            let faulted = Instant::now();
            tcp_service(fake, new, port);
            annotate(kubeconfig, new);

            daemon.wait(
                &format!("the {fault} error in the log"),
                Duration::from_secs(20),
                || {
                    let log = daemon.log();
                    let tail = log.get(log_at..).unwrap_or_default();
                    tail.contains("could not save the state file")
                        && tail.contains(why)
                        && tail.contains("not asking the router until the state file can be saved")
                },
            );
            let log = daemon.log();
            let tail = &log[log_at..];
            assert!(
                tail.contains("check free space and permissions in the state directory")
                    && tail.contains("the old state file is unchanged"),
                "the log says what to do:\n{tail}"
            );
            let (code, body) = healthz().expect("/healthz answers");
            assert_eq!(code, 503, "{body}");
            assert!(
                body.contains("cannot save the state file") && body.contains(why),
                "{body}"
            );

            // Serving goes on: the published Service's lease is renewed while nothing can
            // be saved, and traffic flows all along.
            let renewed = daemon.wait(
                &format!("a renewal of web while the directory is {fault}"),
                Duration::from_secs(LEASE_SECS),
                || daemon.log().matches("reconcile: renewed").count() > renewals_before,
            );
            eprintln!("{fault}: web renewed {renewed:?} into the fault");
            assert!(carries(&lab, 8080, fault), "web is still published");
            assert_eq!(
                count_after(&daemon.log(), log_at, "could not save the state file"),
                1,
                "logged once, not at every pass:\n{}",
                &daemon.log()[log_at..]
            );
            assert_eq!(
                daemon.state_bytes(),
                saved,
                "the old state file is unchanged"
            );
            assert_eq!(forwards_of(&lab, port), Vec::<String>::new());
            assert_eq!(
                capture.packets(),
                Vec::<String>::new(),
                "no PCP request for {new} ({port}) reached the router in {:?}",
                faulted.elapsed()
            );
            let leftovers = daemon.in_mounts(&["ls", "-A", &state_dir]);
            assert!(
                !text(&leftovers.stdout).contains(".tmp"),
                "no temp file left: {}",
                text(&leftovers.stdout)
            );

            // Writable again: the held-back Service is mapped and saved within a verify
            // interval (5 s; a quiet pass saves again and releases it), not after its backoff.
            match fault {
                "read-only" => daemon.in_mounts_ok(&format!("umount {state_dir}")),
                _ => daemon.in_mounts_ok(&format!("rm {state_dir}/filler")),
            }
            let fixed = Instant::now();
            daemon.wait(
                &format!("{new} mapped and saved"),
                Duration::from_secs(10),
                || {
                    carries(&lab, port, new)
                        && daemon
                            .state_text()
                            .contains(&format!("external_port = {port}"))
                },
            );
            eprintln!(
                "{fault}: directory writable again -> {new} mapped and saved in {:?}",
                fixed.elapsed()
            );
            assert!(
                !capture.packets().is_empty(),
                "the capture sees PCP requests"
            );
            let (code, body) = healthz().expect("/healthz answers");
            assert_eq!(code, 200, "{body}");
            assert!(daemon.log()[log_at..].contains("the state file is saved again"));
        }
        drop(daemon);
    });
}

/// SIGSTOP for longer than the lease: the router drops the mapping; after SIGCONT the
/// daemon sees the lease ran out (wall clock) and restores it within 10 s.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_daemon_stopped_past_its_lease_restores_within_10_s_of_resuming() {
    let lab = Lab::up_with(STOP_PREFIX, &["--insecure"]);
    let _server = lab.echo_server("node", LB_IP, 8080);
    with_daemon_in_lan(
        &lab,
        "direct",
        "pcp",
        "",
        |fake, kubeconfig, _config, daemon| {
            tcp_service(fake, "web", 8080);
            annotate(kubeconfig, "web");
            wait_until(daemon, "web published", Duration::from_secs(20), || {
                carries(&lab, 8080, "hello")
            });
            let pid = daemon.pid().to_string();
            let stop = Command::new("kill").args(["-STOP", &pid]).status();
            assert!(stop.is_ok_and(|s| s.success()), "SIGSTOP {pid}");
            let stopped = Instant::now();
            wait_until(
                daemon,
                "the router to drop the mapping",
                Duration::from_secs(LEASE_SECS + 30),
                || forwards_of(&lab, 8080).is_empty(),
            );
            eprintln!(
                "router dropped the mapping {:?} after SIGSTOP",
                stopped.elapsed()
            );
            assert!(!carries(&lab, 8080, "gone"), "nothing is published");
            let past_lease = Duration::from_secs(LEASE_SECS + 10);
            std::thread::sleep(past_lease.saturating_sub(stopped.elapsed()));

            let cont = Command::new("kill").args(["-CONT", &pid]).status();
            assert!(cont.is_ok_and(|s| s.success()), "SIGCONT {pid}");
            let resumed = Instant::now();
            let back = wait_until(
                daemon,
                "the mapping back and carrying traffic",
                Duration::from_secs(10),
                || carries(&lab, 8080, "back"),
            );
            eprintln!(
                "stopped {:?} (lease {LEASE_SECS} s) -> restored and carrying traffic {back:?} after SIGCONT",
                resumed.duration_since(stopped)
            );
            assert_eq!(
                forwards_of(&lab, 8080).len(),
                1,
                "one mapping, no duplicate"
            );
            assert!(daemon.log().contains("reconcile: restored"));
        },
    );
}

/// A denied port (22, on the default deny list) sends nothing: a capture on the router's LAN
/// link sees no PCP or NAT-PMP packet while it is annotated, and does see the allowed
/// Service's requests afterwards.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_denied_port_puts_no_packet_on_the_wire_to_the_router() {
    let lab = Lab::up_with(CAPTURE_PREFIX, &["--insecure"]);
    let _server = lab.echo_server("node", LB_IP, 8080);
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path().to_owned();
    with_daemon_in_lan(
        &lab,
        "direct",
        "pcp",
        "",
        |fake, kubeconfig, _config, daemon| {
            wait_for_first_reconcile(daemon, Duration::from_secs(20));
            let capture =
                Capture::start(&lab, &dir, "pcp", "br0", "udp port 5351 or udp port 5350");
            tcp_service(fake, "shell", 22);
            annotate(kubeconfig, "shell");
            let annotated = Instant::now();
            wait_until(
                daemon,
                "a DeniedPort Warning on the Service",
                Duration::from_secs(20),
                || has_event(kubeconfig, Some("Warning"), "DeniedPort", "shell", ""),
            );
            // Watch the wire past one verify interval (5 s): the checks send nothing either.
            let window = Duration::from_secs(6);
            std::thread::sleep(window.saturating_sub(annotated.elapsed()));
            assert_eq!(
                capture.packets(),
                Vec::<String>::new(),
                "no packet to the router in {:?} with port 22 annotated",
                annotated.elapsed()
            );

            tcp_service(fake, "web", 8080);
            annotate(kubeconfig, "web");
            wait_until(daemon, "web published", Duration::from_secs(20), || {
                carries(&lab, 8080, "allowed")
            });
            let seen = capture.packets();
            eprintln!(
                "denied port: 0 packets; allowed port: {} packets",
                seen.len()
            );
            assert!(
                seen.iter().any(|p| p.contains("192.168.77.1.5351")),
                "the capture sees the allowed Service's request: {seen:?}"
            );
        },
    );
}
