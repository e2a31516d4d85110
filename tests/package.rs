//! The Debian package, tested the way users run it: built by `packaging/build-deb` (which also
//! runs lintian), installed with apt into a fresh Debian 12 booted with a real systemd
//! (`tests/lab/systemd-box`, systemd-nspawn), driven with systemctl and read with journalctl.
//!
//! Needs root (CI runs as root); the first run installs systemd-container, debootstrap and the
//! package build tools, and caches the box's base system. Boxes are named `hpk<pid>` and
//! `hpk<pid>lab` (the one in the router lab, prefix `hpk-`).

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use daemon_lab::{forwards_of, kubectl, with_fake_cluster_in};
use lab::{Lab, ROUTER_WAN_IP};
use serde_json::json;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const POLL_TIMEOUT_SECS: u64 = 30;
const POLL_INTERVAL_MS: u64 = 200;
/// Where prerm keeps the binary and config for a later purge (debian/prerm).
const STASH: &str = "/var/lib/holepunch/purge";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/package.rs needs root (systemd-nspawn, apt-get); run it as root like CI does"
    );
}

fn output(command: &mut Command) -> Output {
    match command.output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run {command:?}: {e}"),
    }
}

/// Runs `command`, asserts it succeeded, returns its standard output.
fn run_ok(command: &mut Command) -> String {
    let out = output(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `probe` until it returns `Some`, or fails naming `what` after the deadline.
fn poll<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(POLL_TIMEOUT_SECS);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {POLL_TIMEOUT_SECS} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
}

/// A booted Debian 12 box; powered off and deleted when dropped.
struct SystemdBox {
    name: String,
}

impl SystemdBox {
    fn script(&self) -> Command {
        let mut command = Command::new(repo().join("tests/lab/systemd-box"));
        command.env("BOX_NAME", &self.name);
        command
    }

    fn create(name: &str) -> SystemdBox {
        let machine = SystemdBox {
            name: name.to_owned(),
        };
        // A box left by a crashed run of this process id would block `create`.
        let _ = output(machine.script().arg("down"));
        run_ok(machine.script().arg("create"));
        machine
    }

    fn boot(&self) {
        run_ok(self.script().arg("boot"));
    }

    /// Boots the box inside network namespace `netns` (with CAP_NET_ADMIN there).
    fn boot_in(&self, netns: &str) {
        run_ok(self.script().args(["boot", "--netns", netns]));
    }

    fn copy(&self, source: &Path, destination: &str) {
        run_ok(self.script().arg("copy").arg(source).arg(destination));
    }

    fn exec(&self, args: &[&str]) -> Output {
        output(self.script().arg("exec").args(args))
    }

    fn exec_ok(&self, args: &[&str]) -> String {
        run_ok(self.script().arg("exec").args(args))
    }

    fn sh(&self, script: &str) -> String {
        self.exec_ok(&["sh", "-c", script])
    }

    /// `systemctl show -p <property>` of holepunch.service.
    fn property(&self, property: &str) -> String {
        let text = self.exec_ok(&["systemctl", "show", "-p", property, "holepunch"]);
        text.trim()
            .strip_prefix(&format!("{property}="))
            .unwrap_or_default()
            .to_owned()
    }

    /// holepunch.service's journal, one JSON object per entry.
    fn journal(&self) -> Vec<serde_json::Value> {
        self.exec_ok(&["journalctl", "-u", "holepunch", "-o", "json", "--no-pager"])
            .lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(entry) => entry,
                Err(e) => panic!("journalctl printed a line that is not JSON ({e}): {line}"),
            })
            .collect()
    }

    /// `apt-get -y <args>`, asserted to succeed; returns what it printed (both streams).
    fn apt(&self, args: &[&str]) -> String {
        let mut command = vec![
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "-y",
            "-q",
        ];
        command.extend_from_slice(args);
        let out = self.exec(&command);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "apt-get {args:?} failed:\n{said}");
        said
    }

    fn exists(&self, path: &str) -> bool {
        self.exec(&["test", "-e", path]).status.success()
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        let _ = output(self.script().arg("down"));
    }
}

fn field<'a>(entry: &'a serde_json::Value, name: &str) -> &'a str {
    entry.get(name).and_then(|v| v.as_str()).unwrap_or("")
}

fn timed<T>(what: &str, costs: &mut Vec<(String, f64)>, step: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = step();
    costs.push((what.to_owned(), start.elapsed().as_secs_f64()));
    value
}

/// The package, built once per test process: two `build-deb` runs in one tree at the same
/// time clean each other's files (tests run in parallel).
fn build_package(costs: &mut Vec<(String, f64)>) -> PathBuf {
    static BUILT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(deb) = built.as_ref() {
        return deb.clone();
    }
    let deb = build_package_now(costs);
    *built = Some(deb.clone());
    deb
}

fn build_package_now(costs: &mut Vec<(String, f64)>) -> PathBuf {
    // The debug build `cargo test` made is packaged; a release build would cost minutes more.
    // Without the variables cargo sets for a test: build scripts (ring's) watch some of them,
    // and a change would rebuild half the tree twice (here, and in the next `cargo test`).
    let mut build = Command::new(repo().join("packaging/build-deb"));
    build.args(["--profile", "dev"]).current_dir(repo());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&name.as_ref())
        {
            build.env_remove(name.as_ref());
        }
    }
    let stdout = timed("build+lintian", costs, || run_ok(&mut build));
    let deb = repo().join(stdout.lines().last().unwrap_or_default());
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("holepunch_{VERSION}-")) && name.ends_with(".deb"),
        "build-deb printed {deb:?}"
    );
    assert!(deb.is_file(), "{deb:?} was not built");
    deb
}

/// Contents, conffiles and dependencies, read with dpkg-deb from the built file.
fn check_package_contents(deb: &Path) {
    let listing = run_ok(Command::new("dpkg-deb").arg("--contents").arg(deb));
    for path in [
        "./usr/bin/holepunch",
        "./lib/systemd/system/holepunch.service",
        "./etc/holepunch.toml",
        "./usr/share/man/man8/holepunch.8.gz",
        "./usr/share/man/man5/holepunch.toml.5.gz",
        "./usr/share/bash-completion/completions/holepunch",
        "./usr/share/zsh/vendor-completions/_holepunch",
        "./usr/share/holepunch/rbac.yaml",
        "./usr/share/holepunch/kubeconfig.md",
        "./usr/share/doc/holepunch/copyright",
        "./usr/share/doc/holepunch/changelog.Debian.gz",
    ] {
        assert!(
            listing.lines().any(|line| line.ends_with(path)),
            "the package lacks {path}:\n{listing}"
        );
    }
    let control = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(deb)
            .arg(control.path()),
    );
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/holepunch.toml");

    // Every shared library the binary needs is a dependency of the package (shlibs): once
    // nftables support links libnftnl and libmnl, they must show up here too.
    let depends = run_ok(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(deb)
            .arg("Depends"),
    );
    let unpacked = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("dpkg-deb")
            .arg("--extract")
            .arg(deb)
            .arg(unpacked.path()),
    );
    let binary = unpacked.path().join("usr/bin/holepunch");
    let dynamic = run_ok(Command::new("objdump").arg("-p").arg(&binary));
    let needed: Vec<&str> = dynamic
        .lines()
        .filter_map(|line| line.trim().strip_prefix("NEEDED"))
        .map(str::trim)
        .collect();
    assert!(
        needed.iter().any(|lib| lib.starts_with("libc.so")),
        "{dynamic}"
    );
    for soname in needed {
        // "libnftnl11:amd64: /usr/lib/x86_64-linux-gnu/libnftnl.so.11"
        let owners = run_ok(Command::new("dpkg").args(["-S", &format!("*/{soname}")]));
        let packages: Vec<&str> = owners
            .lines()
            .filter_map(|line| line.rsplit_once(": ").map(|(packages, _)| packages))
            .flat_map(|packages| packages.split(", "))
            .map(|package| package.split(':').next().unwrap_or_default())
            .collect();
        assert!(
            packages
                .iter()
                .any(|package| depends
                    .split(',')
                    .any(|dep| dep.trim().split([' ', '(']).next() == Some(package))),
            "{soname} (from {packages:?}) is needed but Depends is {depends}"
        );
    }
}

#[test]
fn unit_is_hardened_to_an_exposure_of_at_most_2_0() {
    let unit = repo().join("systemd/holepunch.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "RestartSec=5s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStartPre=/usr/bin/holepunch check-config --config /etc/holepunch.toml",
        "StateDirectory=holepunch",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallFilter=@system-service",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // SSDP and PCP ANNOUNCE arrive by multicast: no IP address filter may drop them.
    assert!(
        !text.contains("IPAddressDeny"),
        "IPAddressDeny would block multicast"
    );

    let report = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit),
    );
    let exposure: f64 = report
        .lines()
        .find_map(|line| line.split("holepunch.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    println!("systemd-analyze security --offline=true: exposure {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{report}");
}

#[test]
fn package_installs_runs_reloads_and_purges_in_a_booted_debian() {
    require_root();
    let started = Instant::now();
    let mut costs = Vec::new();
    let deb = build_package(&mut costs);
    check_package_contents(&deb);

    let machine = timed("create", &mut costs, || {
        SystemdBox::create(&format!("hpk{}", std::process::id()))
    });
    timed("boot", &mut costs, || machine.boot());
    let in_box = format!("/root/{}", deb.file_name().unwrap().to_string_lossy());
    machine.copy(&deb, &in_box);
    // The box has holepunch's libraries already, so apt installs the file without a network.
    timed("install", &mut costs, || machine.apt(&["install", &in_box]));
    let mut step = Instant::now();
    machine.exec_ok(&["systemctl", "enable", "--now", "holepunch"]);

    // Type=notify: "active" means the daemon sent READY=1. Without a kubeconfig it waits,
    // saying what to configure, instead of crash-looping.
    let status = poll("holepunch.service to become active", || {
        let state = machine.property("ActiveState");
        (state == "active").then(|| machine.property("StatusText"))
    });
    assert!(
        status.contains("no kubeconfig at /etc/holepunch/kubeconfig"),
        "STATUS= does not say what to configure: {status:?}"
    );
    let shown = machine.exec_ok(&["systemctl", "status", "--no-pager", "holepunch"]);
    assert!(shown.contains(&format!("Status: \"{status}\"")), "{shown}");
    let main_pid = machine.property("MainPID");
    assert_ne!(main_pid, "0");
    machine.exec_ok(&[
        "systemd-analyze",
        "verify",
        // The box has no man-db; lintian checks the pages.
        "--man=no",
        "/lib/systemd/system/holepunch.service",
    ]);

    // journald gets holepunch's structured fields, and the same line as STATUS=.
    let journal = poll("the kubeconfig message in the journal", || {
        let journal = machine.journal();
        journal
            .iter()
            .any(|e| field(e, "MESSAGE") == status)
            .then_some(journal)
    });
    let starting = journal
        .iter()
        .find(|e| field(e, "MESSAGE") == "holepunch starting")
        .expect("no 'holepunch starting' entry");
    assert_eq!(field(starting, "SYSLOG_IDENTIFIER"), "holepunch");
    assert_eq!(field(starting, "F_VERSION"), VERSION, "{starting}");
    assert_eq!(field(starting, "F_CONFIG"), "/etc/holepunch.toml");
    assert!(
        field(starting, "TARGET").starts_with("holepunch"),
        "{starting}"
    );
    // ExecStartPre's check-config does not dump the whole config into the journal.
    assert_eq!(machine.property("StandardOutput"), "null");
    let messages: Vec<&str> = journal.iter().map(|e| field(e, "MESSAGE")).collect();
    assert!(!messages.contains(&"[kubernetes]"), "{messages:?}");

    costs.push(("start+journal".to_owned(), step.elapsed().as_secs_f64()));
    step = Instant::now();

    // A broken config on reload is refused with file:line:column, and the daemon keeps running.
    machine.sh("printf '[router]\\nlease_seconds = \"soon\"\\n' >/etc/holepunch.toml");
    machine.exec_ok(&["systemctl", "reload", "holepunch"]);
    let refused = poll("the refused reload in the journal", || {
        machine
            .journal()
            .into_iter()
            .map(|e| field(&e, "MESSAGE").to_owned())
            .find(|m| m.starts_with("config not reloaded"))
    });
    assert!(refused.contains("/etc/holepunch.toml:2:17"), "{refused}");
    assert_eq!(machine.property("ActiveState"), "active");
    assert_eq!(
        machine.property("MainPID"),
        main_pid,
        "the daemon was restarted"
    );
    assert_eq!(machine.property("NRestarts"), "0");

    // A good config is taken.
    machine.sh("printf '[router]\\nlease_seconds = 7200\\n' >/etc/holepunch.toml");
    machine.exec_ok(&["systemctl", "reload", "holepunch"]);
    poll("the accepted reload in the journal", || {
        machine
            .journal()
            .iter()
            .any(|e| field(e, "MESSAGE") == "config reloaded")
            .then_some(())
    });

    costs.push(("reloads".to_owned(), step.elapsed().as_secs_f64()));
    step = Instant::now();

    // remove keeps the state directory, the config and a copy for purge; reinstalling drops
    // the copy and starts the daemon again.
    machine.apt(&["remove", "holepunch"]);
    for kept in ["/var/lib/holepunch", "/etc/holepunch.toml", STASH] {
        assert!(machine.exists(kept), "remove deleted {kept}");
    }
    assert_ne!(machine.property("ActiveState"), "active");
    machine.apt(&["install", &in_box]);
    assert!(!machine.exists(STASH), "reinstalling kept {STASH}");
    poll("holepunch.service to be active again", || {
        (machine.property("ActiveState") == "active").then_some(())
    });

    // purge runs cleanup and removes the state directory and the config; a config that went
    // bad meanwhile does not stop cleanup (it falls back to the defaults).
    machine.sh("printf '[router]\\nlease_seconds = \"soon\"\\n' >/etc/holepunch.toml");
    machine.apt(&["remove", "holepunch"]);
    let said = machine.apt(&["purge", "holepunch"]);
    assert!(
        said.contains("the config is invalid; cleaning up with the default settings"),
        "{said}"
    );
    assert!(
        said.contains("removed 0 mappings, 0 left"),
        "purge did not run cleanup:\n{said}"
    );
    for gone in ["/var/lib/holepunch", "/etc/holepunch.toml"] {
        assert!(!machine.exists(gone), "purge left {gone}");
    }

    // The same straight from installed, with the shipped config.
    machine.apt(&["install", &in_box]);
    let said = machine.apt(&["purge", "holepunch"]);
    assert!(
        said.contains("removed 0 mappings, 0 left"),
        "purge did not run cleanup:\n{said}"
    );
    assert!(!said.contains("invalid"), "{said}");
    for gone in [
        "/var/lib/holepunch",
        "/etc/holepunch.toml",
        "/usr/bin/holepunch",
    ] {
        assert!(!machine.exists(gone), "purge left {gone}");
    }
    assert_eq!(machine.property("LoadState"), "not-found");

    costs.push(("remove+purge".to_owned(), step.elapsed().as_secs_f64()));
    timed("down", &mut costs, || drop(machine));
    let summary: Vec<String> = costs
        .iter()
        .map(|(what, secs)| format!("{what} {secs:.1}s"))
        .collect();
    println!(
        "package test cost: {}, total {:.1}s",
        summary.join(", "),
        started.elapsed().as_secs_f64()
    );
}

/// The router lab's prefix for the package test; its box is `hpk<pid>lab`.
const LAB_PREFIX: &str = "hpk-";
/// The LoadBalancer IP on the lab's node host, as MetalLB would announce it.
const LB_IP: &str = "192.168.77.100";
const LB_PORT: u16 = 8080;

/// From the lab's internet side: a request over a new TCP connection every 200 ms until the
/// file argv[3] exists; prints "started" after the first, "fail N reason" for each failure,
/// and "sent S failed F" at the end.
const REQUEST_LOOP: &str = r#"
import os, socket, sys, time
ip, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sent = failed = 0
while not os.path.exists(stop):
    sent += 1
    try:
        s = socket.create_connection((ip, port), timeout=2)
        s.settimeout(2)
        s.sendall(b"r%d\n" % sent)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        s.close()
        if not data.endswith(b"\n"):
            raise OSError("connection closed without an answer")
    except OSError as e:
        failed += 1
        print("fail", sent, e, flush=True)
    if sent == 1:
        print("started", flush=True)
    time.sleep(0.2)
print("sent", sent, "failed", failed, flush=True)
"#;

#[test]
fn package_in_the_lab_keeps_traffic_flowing_across_a_restart_and_purge_removes_everything() {
    require_root();
    let started = Instant::now();
    let mut costs = Vec::new();
    let deb = build_package(&mut costs);

    let lab = timed("lab up", &mut costs, || Lab::up(LAB_PREFIX));
    let _echo = lab.echo_server("node", LB_IP, LB_PORT);
    let forwarding = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    assert!(forwarding.status.success(), "{forwarding:?}");

    // The fake API listens on 127.0.0.1 of the LAN namespace, which the box shares; kubectl
    // runs from this thread, inside that namespace too.
    with_fake_cluster_in(&lab, "lan", |fake, dir, kubeconfig, _| {
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "game", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": LB_PORT, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
        }));

        let machine = timed("create", &mut costs, || {
            SystemdBox::create(&format!("hpk{}lab", std::process::id()))
        });
        timed("boot in lan", &mut costs, || {
            machine.boot_in(&lab.ns("lan"))
        });
        // The capability nft needs, in the box's bounding set (bit 12 of CapBnd).
        let status = machine.exec_ok(&["grep", "CapBnd", "/proc/1/status"]);
        let bounding = status
            .split_whitespace()
            .nth(1)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or(0);
        assert_ne!(
            bounding & (1 << 12),
            0,
            "the box lacks CAP_NET_ADMIN: {status}"
        );

        let in_box = format!("/root/{}", deb.file_name().unwrap().to_string_lossy());
        machine.copy(&deb, &in_box);
        machine.copy(kubeconfig, "/etc/holepunch/kubeconfig");
        // /etc/holepunch.toml as shipped (relay mode, backend auto), plus what a MetalLB user
        // sets: the load balancer's pool in target_cidrs (the shipped list is empty).
        timed("install", &mut costs, || machine.apt(&["install", &in_box]));
        machine.sh(&format!(
            "sed -i 's|^target_cidrs = \\[\\]|target_cidrs = [\"{LB_IP}/32\"]|' /etc/holepunch.toml"
        ));
        assert!(
            machine
                .exec_ok(&["cat", "/etc/holepunch.toml"])
                .contains(&format!("target_cidrs = [\"{LB_IP}/32\"]")),
            "the pool was not listed"
        );
        let step = Instant::now();
        machine.exec_ok(&["systemctl", "enable", "--now", "holepunch"]);
        poll("holepunch.service to become active", || {
            (machine.property("ActiveState") == "active").then_some(())
        });
        kubectl(
            kubeconfig,
            &["annotate", "svc", "game", "holepunch/punch-external=true"],
        );
        // Relay: the router forwards to the box (192.168.77.10), whose nft DNATs to the LB IP.
        let answer = poll("11.22.33.44:8080 to answer from the internet", || {
            lab.ask("wan", "tcp", ROUTER_WAN_IP, LB_PORT, "hello")
        });
        assert!(answer.ends_with(" hello"), "{answer}");
        assert!(!forwards_of(&lab, LB_PORT).is_empty());
        let tables = machine.exec_ok(&["nft", "list", "tables"]);
        assert!(tables.contains("table inet holepunch"), "{tables}");
        costs.push(("start+publish".to_owned(), step.elapsed().as_secs_f64()));

        // A restart under load: no request from the internet may fail.
        let step = Instant::now();
        let stop = dir.join("stop-requests");
        let stop_arg = stop.to_string_lossy().into_owned();
        let port = LB_PORT.to_string();
        let mut client = lab.spawn(
            "wan",
            &[
                lab::python(),
                "-c",
                REQUEST_LOOP,
                ROUTER_WAN_IP,
                &port,
                &stop_arg,
            ],
        );
        let mut lines = std::io::BufReader::new(client.stdout.take().unwrap()).lines();
        let mut said = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let first = line == "started";
            said.push(line);
            if first {
                break;
            }
        }
        let main_pid = machine.property("MainPID");
        machine.exec_ok(&["systemctl", "restart", "holepunch"]);
        poll("holepunch.service to be active with a new process", || {
            let pid = machine.property("MainPID");
            (machine.property("ActiveState") == "active" && pid != "0" && pid != main_pid)
                .then_some(())
        });
        // Keep asking for a while after the new process is up (it re-applies its rules).
        std::thread::sleep(Duration::from_secs(3));
        std::fs::write(&stop, b"").unwrap();
        said.extend(lines.map_while(Result::ok));
        let _ = client.wait();
        let summary = said.last().cloned().unwrap_or_default();
        let numbers: Vec<u64> = summary
            .split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect();
        assert!(
            summary.starts_with("sent ") && numbers.len() == 2,
            "the request loop said: {said:?}"
        );
        println!(
            "across systemctl restart: {} requests sent, {} failed",
            numbers[0], numbers[1]
        );
        assert!(numbers[0] >= 10, "too few requests: {said:?}");
        assert_eq!(
            numbers[1], 0,
            "requests failed across the restart: {said:?}"
        );
        costs.push((
            "restart under load".to_owned(),
            step.elapsed().as_secs_f64(),
        ));

        // purge removes the router's forward, the box's table and the state.
        let step = Instant::now();
        machine.apt(&["purge", "holepunch"]);
        poll("the router to stop forwarding 8080", || {
            forwards_of(&lab, LB_PORT).is_empty().then_some(())
        });
        let tables = machine.exec_ok(&["nft", "list", "tables"]);
        assert!(!tables.contains("table inet holepunch"), "{tables}");
        assert!(
            !machine.exists("/var/lib/holepunch"),
            "purge left /var/lib/holepunch"
        );
        costs.push(("purge".to_owned(), step.elapsed().as_secs_f64()));

        timed("down", &mut costs, || drop(machine));
    });
    drop(lab);
    let summary: Vec<String> = costs
        .iter()
        .map(|(what, secs)| format!("{what} {secs:.1}s"))
        .collect();
    println!(
        "package-in-lab test cost: {}, total {:.1}s",
        summary.join(", "),
        started.elapsed().as_secs_f64()
    );
}
