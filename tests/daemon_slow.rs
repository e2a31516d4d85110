//! `holepunch run` the way systemd runs it (`NOTIFY_SOCKET`, `WATCHDOG_USEC`) while its peers
//! are slow, and when it must stop for good:
//!
//! - the in-test API answers every Event and status write after 25 s (a control plane on an
//!   SD card under load): the watchdog is still pinged well within `WatchdogSec` (10 s), a
//!   newly annotated Service carries traffic from the lab's internet within 10 s, and an
//!   unpublished one is unmapped within 10 s (`BENCH watchdog_silence_slow_api_max_s`);
//! - a loop frozen on purpose (`HOLEPUNCH_FREEZE_AT`, `holepunch::crashpoint`) gets no ping,
//!   so systemd's watchdog would kill it, and `/healthz` calls it stuck after the same time;
//! - a bad config and a state file of a newer format end `run` with exit 1 and 4, a `STATUS=`
//!   line that says so, and the unit's `RestartPreventExitStatus=` names exactly those codes.
//!
//! The watchdog pings are read from a Unix datagram socket the test binds as `NOTIFY_SOCKET`.
//! Real peers: the daemon on the LAN host of the router lab (prefix `hpp-`, miniupnpd 2.3.1
//! in insecure mode, PCP in direct mode), kubectl against the fake API in the same namespace.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;
#[path = "support/measure.rs"]
mod measure;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bin::{BIN, Daemon, test_config};
use daemon_lab::{forwards_of, kubectl, wait_until, with_fake_cluster_in};
use fake_api::FakeApi;
use lab::{Lab, NODE_IP, ROUTER_WAN_IP};
use measure::{LB_IP, lab_config, load_balancer};
use serde_json::json;

const PREFIX: &str = "hpp-";
/// What the slow API makes every Event and status write wait (issue: a k3s control plane on
/// an SD card under load).
const API_DELAY_SECS: u64 = 25;
/// `WatchdogSec` in the slow-API test, as `WATCHDOG_USEC`.
const WATCHDOG_SECS: u64 = 10;
/// The longest watchdog silence accepted under the slow API: "well under" `WatchdogSec`.
const SILENCE_LIMIT_SECS: u64 = 5;
/// A new Service carries traffic, and an unpublished one is gone, within this.
const CHANGE_LIMIT_SECS: u64 = 10;
/// `WatchdogSec` in the frozen-loop test (short, so the test is).
const FROZEN_WATCHDOG_SECS: u64 = 4;
/// Where the daemon serves `/metrics` and `/healthz`, inside the lab's LAN namespace.
const METRICS: &str = "127.0.0.1:9469";
/// Published from the start.
const WEB_PORT: u16 = 8080;
/// Annotated while the API is slow.
const NEW_PORT: u16 = 8081;
/// holepunch's own loadBalancerClass: its status write is slow too.
const LB_PORT: u16 = 9090;
const LB_NODE_PORT: u16 = 31090;

/// What the daemon sends to `NOTIFY_SOCKET`, one entry per line, with when it arrived.
struct NotifySocket {
    path: PathBuf,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let lines = lines.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buffer) {
                        let at = Instant::now();
                        let mut lines = lines.lock().expect("lock");
                        for line in String::from_utf8_lossy(&buffer[..n]).lines() {
                            lines.push((at, line.to_owned()));
                        }
                    }
                }
            })
        };
        NotifySocket {
            path,
            lines,
            stop,
            reader: Some(reader),
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8")
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().expect("lock").clone()
    }

    /// When the first line equal to `line` arrived.
    fn first(&self, line: &str) -> Option<Instant> {
        self.lines()
            .into_iter()
            .find(|(_, l)| l == line)
            .map(|(at, _)| at)
    }

    /// Every `WATCHDOG=1`, in order.
    fn pings(&self) -> Vec<Instant> {
        self.lines()
            .into_iter()
            .filter(|(_, l)| l == "WATCHDOG=1")
            .map(|(at, _)| at)
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The longest time without a ping between `from` and `until`.
fn longest_silence(pings: &[Instant], from: Instant, until: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for ping in pings.iter().filter(|p| **p > from && **p <= until) {
        longest = longest.max(ping.duration_since(last));
        last = *ping;
    }
    longest.max(until.duration_since(last))
}

/// `/healthz` at [`METRICS`]: the status code and the body; `None` while nothing answers.
fn healthz() -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(METRICS).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_owned();
    Some((code, body))
}

/// A Node and a Service of holepunch's own loadBalancerClass (TCP [`LB_PORT`] to the node's
/// nodePort): holepunch writes its LoadBalancer status.
fn own_class_service(fake: &FakeApi) {
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": NODE_IP}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }));
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "lb", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "holepunch.io/router",
            "ports": [{"name": "web", "port": LB_PORT, "protocol": "TCP", "nodePort": LB_NODE_PORT}]
        }
    }));
}

/// Every Event and status write answered after 25 s, the daemon under `WATCHDOG_USEC=10 s`:
/// the longest watchdog silence stays under 5 s, a newly annotated Service carries traffic
/// from the WAN within 10 s and an unpublished one leaves the router within 10 s, `/healthz`
/// stays 200, and the writes the API holds back wait in the writer's queue.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn slow_api_holds_up_neither_the_watchdog_nor_the_router() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    let _web = lab.echo_server("node", LB_IP, WEB_PORT);
    let _new = lab.echo_server("node", LB_IP, NEW_PORT);
    let _lb = lab.echo_server("node", NODE_IP, LB_NODE_PORT);
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        let delay = Duration::from_secs(API_DELAY_SECS);
        fake.delay_matching(delay, "POST", "/events");
        fake.delay_matching(delay, "PATCH", "/status");
        fake.apply_object(load_balancer("web", WEB_PORT, true, "a"));
        fake.apply_object(load_balancer("new", NEW_PORT, false, "a"));
        own_class_service(fake);
        let config = lab_config(dir, kubeconfig, "pcp", 120, 5, METRICS);
        let notify = NotifySocket::bind(dir);
        let watchdog_usec = (WATCHDOG_SECS * 1_000_000).to_string();
        let daemon = Daemon::start_with_env(
            &config,
            &[
                ("NOTIFY_SOCKET", notify.path()),
                ("WATCHDOG_USEC", &watchdog_usec),
            ],
        );
        wait_until(&daemon, "READY=1", Duration::from_secs(30), || {
            notify.first("READY=1").is_some()
        });
        let ready = notify.first("READY=1").expect("READY=1");
        wait_until(
            &daemon,
            "default/web and default/lb carry traffic from the WAN",
            Duration::from_secs(30),
            || {
                lab.ask("wan", "tcp", ROUTER_WAN_IP, WEB_PORT, "web")
                    .is_some()
                    && lab
                        .ask("wan", "tcp", ROUTER_WAN_IP, LB_PORT, "lb")
                        .is_some()
            },
        );
        wait_until(
            &daemon,
            "the first Event and status writes to reach the slow API",
            Duration::from_secs(30),
            || fake.delayed_requests() >= 2,
        );

        // A new Service while the API sits on the writes.
        kubectl(
            kubeconfig,
            &["annotate", "svc", "new", "holepunch/punch-external=true"],
        );
        let new_took = wait_until(
            &daemon,
            "default/new carrying traffic from the WAN",
            Duration::from_secs(CHANGE_LIMIT_SECS),
            || {
                lab.ask("wan", "tcp", ROUTER_WAN_IP, NEW_PORT, "new")
                    .is_some_and(|answer| answer.ends_with(" new"))
            },
        );
        // And one unpublished.
        kubectl(
            kubeconfig,
            &["annotate", "svc", "web", "holepunch/punch-external-"],
        );
        let gone_took = wait_until(
            &daemon,
            "default/web unmapped on the router",
            Duration::from_secs(CHANGE_LIMIT_SECS),
            || forwards_of(&lab, WEB_PORT).is_empty(),
        );
        assert_eq!(
            lab.ask("wan", "tcp", ROUTER_WAN_IP, WEB_PORT, "gone"),
            None,
            "unpublished: no traffic"
        );

        // Two more API delays: the writer times out, backs off and tries again meanwhile.
        let hold_until = ready + Duration::from_secs(2 * API_DELAY_SECS + 5);
        let mut health_checks = 0;
        while Instant::now() < hold_until {
            let health = healthz();
            assert!(
                health.as_ref().is_some_and(|(code, _)| *code == 200),
                "/healthz under the slow API: {health:?}\n{}",
                daemon.log()
            );
            health_checks += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        let end = Instant::now();
        let queued = measure::metric(METRICS, "holepunch_cluster_writes_queued");
        let delayed = fake.delayed_requests();
        let silence = longest_silence(&notify.pings(), ready, end);
        let log = daemon.stop();
        measure::report(
            "watchdog_silence_slow_api_max_s",
            silence.as_secs_f64(),
            "s",
        );
        eprintln!(
            "slow API ({API_DELAY_SECS} s per write): longest watchdog silence {silence:?} over \
             {:?}; annotate -> traffic {new_took:?}; unannotate -> unmapped {gone_took:?}; \
             {delayed} writes held back; {queued:?} still queued; /healthz 200 {health_checks} times",
            end.duration_since(ready)
        );
        assert!(
            silence < Duration::from_secs(SILENCE_LIMIT_SECS),
            "the watchdog went {silence:?} without a ping (WatchdogSec={WATCHDOG_SECS} s):\n{log}"
        );
        assert!(delayed >= 3, "the writer kept trying: {delayed}");
        assert!(
            queued.is_some_and(|q| q >= 1.0),
            "writes the API never took wait in the queue: {queued:?}"
        );
        assert!(
            log.contains("could not publish an Event; will retry after a backoff")
                || log.contains(
                    "could not write the LoadBalancer status; will retry after a backoff"
                ),
            "the timeouts are logged:\n{log}"
        );
    });
}

/// A loop frozen on purpose at its third pass: before, pings come steadily; after, none
/// comes in three times `WatchdogSec` (systemd would have killed it after one), and
/// `/healthz` calls the loop stuck, while the process itself lives on.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn a_frozen_loop_gets_no_watchdog_ping_and_healthz_calls_it_stuck() {
    let lab = Lab::up_with(PREFIX, &["--insecure"]);
    let _web = lab.echo_server("node", LB_IP, WEB_PORT);
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        fake.apply_object(load_balancer("web", WEB_PORT, true, "a"));
        let config = lab_config(dir, kubeconfig, "pcp", 120, 5, METRICS);
        let notify = NotifySocket::bind(dir);
        let watchdog_usec = (FROZEN_WATCHDOG_SECS * 1_000_000).to_string();
        let mut daemon = Daemon::start_with_env(
            &config,
            &[
                ("NOTIFY_SOCKET", notify.path()),
                ("WATCHDOG_USEC", &watchdog_usec),
                (holepunch::crashpoint::FREEZE_AT_ENV, "loop-pass:3"),
            ],
        );
        wait_until(
            &daemon,
            "default/web carrying traffic from the WAN",
            Duration::from_secs(30),
            || {
                lab.ask("wan", "tcp", ROUTER_WAN_IP, WEB_PORT, "web")
                    .is_some()
            },
        );
        wait_until(
            &daemon,
            "the loop to freeze at its third pass",
            Duration::from_secs(30),
            || daemon.log().contains("freeze point loop-pass reached"),
        );
        let frozen = Instant::now();
        let ready = notify.first("READY=1").expect("READY=1 before the freeze");
        let before = longest_silence(&notify.pings(), ready, frozen);
        assert!(
            before < Duration::from_secs(FROZEN_WATCHDOG_SECS / 2),
            "the working loop pinged steadily: longest silence {before:?}"
        );

        std::thread::sleep(Duration::from_secs(3 * FROZEN_WATCHDOG_SECS));
        // The pass's own ping may arrive just after its freeze line was read.
        let late: Vec<Duration> = notify
            .pings()
            .into_iter()
            .filter(|p| *p > frozen + Duration::from_millis(500))
            .map(|p| p.duration_since(frozen))
            .collect();
        let health = healthz();
        assert!(
            daemon.0.try_wait().expect("wait").is_none(),
            "the frozen daemon still runs"
        );
        // SIGTERM would wait for the frozen loop: SIGKILL, as systemd's watchdog does.
        let log = daemon.log();
        drop(daemon);
        eprintln!(
            "frozen loop: longest silence before {before:?}; pings after the freeze: {late:?}; \
             /healthz: {health:?}"
        );
        assert!(late.is_empty(), "a frozen loop was pinged: {late:?}\n{log}");
        assert!(
            health
                .as_ref()
                .is_some_and(|(code, body)| *code == 503 && body.contains("no progress")),
            "/healthz calls the frozen loop stuck after WatchdogSec: {health:?}"
        );
    });
}

/// The `RestartPreventExitStatus=` codes of the shipped unit.
fn unit_prevented_codes() -> Vec<u8> {
    let unit = std::fs::read_to_string(bin::repo("systemd/holepunch.service")).expect("unit");
    unit.lines()
        .filter_map(|line| line.strip_prefix("RestartPreventExitStatus="))
        .flat_map(|codes| codes.split_whitespace().map(|c| c.parse().expect("a code")))
        .collect()
}

/// `holepunch run` with `NOTIFY_SOCKET`, until it ends (or `limit`): its exit code and what it
/// sent; `None` when it was still running at `limit` (then it is stopped).
fn run_until_end(config: &Path, dir: &Path, limit: Duration) -> (Option<i32>, Vec<String>, String) {
    let notify = NotifySocket::bind(dir);
    let log = dir.join("run.log");
    let mut child = Command::new(BIN)
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .env_remove("KUBECONFIG")
        .env("NOTIFY_SOCKET", notify.path())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn holepunch run");
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let the reader take the last datagrams.
    std::thread::sleep(Duration::from_millis(200));
    let lines = notify.lines().into_iter().map(|(_, l)| l).collect();
    std::fs::remove_file(notify.path()).expect("remove the socket");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    (code, lines, log)
}

/// A bad config ends `run` with exit 1 and a state file of a newer format with exit 4, each
/// with a `STATUS=` line saying it is for good and why; the unit does not restart on exactly
/// those codes. The same config with a good state file runs (READY=1, waiting for its
/// kubeconfig) until stopped.
#[test]
fn permanent_errors_end_run_with_a_status_line_and_no_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), None);

    let (code, lines, log) = run_until_end(&config, dir.path(), Duration::from_secs(3));
    assert_eq!(code, None, "the normal case runs until stopped:\n{log}");
    assert!(lines.iter().any(|l| l == "READY=1"), "{lines:?}");

    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    std::fs::write(
        dir.path().join("state/state.toml"),
        "version = 99\n\n[[mapping]]\nfrom_the_future = true\n",
    )
    .expect("write a newer state file");
    let (code, lines, log) = run_until_end(&config, dir.path(), Duration::from_secs(20));
    assert_eq!(code, Some(4), "{log}");
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= line: {lines:?}"));
    assert!(
        status.contains("stopped for good (exit 4")
            && status.contains("newer holepunch")
            && status.contains("systemctl restart holepunch"),
        "{status}"
    );
    assert!(log.contains("newer holepunch"), "{log}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[router]\nbackend = \"carrier-pigeon\"\n").expect("write");
    let (code, lines, log) = run_until_end(&bad, dir.path(), Duration::from_secs(20));
    assert_eq!(code, Some(1), "{log}");
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= line: {lines:?}"));
    assert!(
        status.contains("stopped for good (exit 1") && status.contains("carrier-pigeon"),
        "{status}"
    );

    let prevented = unit_prevented_codes();
    assert_eq!(prevented, [1, 4], "the unit's RestartPreventExitStatus=");
    for code in 0..=6u8 {
        assert_eq!(
            holepunch::cli::restart_helps(code),
            !prevented.contains(&code),
            "exit {code}: the unit and `holepunch run` disagree"
        );
    }
}
