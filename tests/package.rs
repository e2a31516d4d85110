//! The Debian package, tested the way users run it: built by `packaging/build-deb` (which also
//! runs lintian), installed with apt into a fresh Debian 12 booted with a real systemd
//! (`tests/lab/systemd-box`, systemd-nspawn), driven with systemctl and read with journalctl.
//!
//! The box tests are lab tier (root; CI runs as root): the first run installs
//! systemd-container, debootstrap and the package build tools, and caches the box's base
//! system. Boxes are named `hpk<pid>`, `hpk<pid>up` (the upgrade from 0.1.0) and `hpk<pid>lab`
//! (the one in the router lab, prefix `hpk-`). The unit's exposure score, debian/copyright and
//! the shipped examples are checked without root.

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
/// The most `systemd-analyze security` may score the unit (README "Packaging").
const MAX_EXPOSURE: f64 = 1.5;
/// The same with the [ha] drop-in (CAP_NET_RAW and AF_PACKET for the gratuitous ARP).
const MAX_HA_EXPOSURE: f64 = 1.8;
/// Where the package ships the [ha] drop-in (README, "High availability").
const HA_DROP_IN: &str = "/usr/share/holepunch/holepunch-ha.conf";
/// CAP_NET_ADMIN's bit in /proc/PID/status's capability masks.
const CAP_NET_ADMIN_BIT: u64 = 1 << 12;
/// The user the unit runs as (debian/holepunch.sysusers).
const SERVICE_USER: &str = "holepunch";
/// Where the unit takes the kubeconfig from (LoadCredential=holepunch:/etc/holepunch).
const KUBECONFIG: &str = "/etc/holepunch/kubeconfig";
/// The copy the service reads ($CREDENTIALS_DIRECTORY/holepunch_kubeconfig).
const KUBECONFIG_CREDENTIAL: &str = "/run/credentials/holepunch.service/holepunch_kubeconfig";

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
fn poll<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    poll_for(what, Duration::from_secs(POLL_TIMEOUT_SECS), probe)
}

/// [`poll`] with its own limit.
fn poll_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {} s waiting for {what}",
            limit.as_secs()
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

    /// [`SystemdBox::exec`] that must succeed; a failure shows holepunch's last journal lines.
    fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        if !out.status.success() {
            let journal = self.exec(&["journalctl", "-u", "holepunch", "-n", "30", "--no-pager"]);
            panic!(
                "{args:?} failed in the box ({}):\n{}\n{}\njournal:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
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

    /// `user comm` of the service's main process, as `ps` names them.
    fn main_process(&self) -> String {
        let pid = self.property("MainPID");
        assert_ne!(pid, "0", "holepunch.service has no main process");
        self.exec_ok(&["ps", "-o", "user:32=,comm=", "-p", &pid])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `systemctl restart holepunch`, which must succeed. One failed restart is retried after
    /// 3 s, with what systemd said printed: under CI's load the box's systemd has failed a
    /// start once with no line from holepunch in its journal (its cgroup writes answer EIO in
    /// systemd-nspawn); a failure of holepunch's own fails both tries.
    fn restart_ok(&self) {
        let first = self.exec(&["systemctl", "restart", "holepunch"]);
        if first.status.success() {
            return;
        }
        let why = self.exec_ok(&[
            "systemctl",
            "show",
            "-p",
            "Result,ExecMainCode,ExecMainStatus,ActiveState",
            "holepunch",
        ]);
        let journal = self.exec(&["journalctl", "-n", "40", "--no-pager"]);
        eprintln!(
            "systemctl restart holepunch failed once ({}): {}\n{why}\n{}",
            first.status,
            String::from_utf8_lossy(&first.stderr),
            String::from_utf8_lossy(&journal.stdout)
        );
        std::thread::sleep(Duration::from_secs(3));
        self.exec_ok(&["systemctl", "restart", "holepunch"]);
    }

    /// `systemctl restart holepunch` fails (`why` it must) with a permanent error (exit 1),
    /// which the unit does not restart every RestartSec= (5 s).
    fn refuses_to_start(&self, why: &str) {
        let restarts_before = self.property("NRestarts");
        let restart = self.exec(&["systemctl", "restart", "holepunch"]);
        assert!(!restart.status.success(), "started {why}");
        std::thread::sleep(Duration::from_secs(8));
        assert_eq!(self.property("ActiveState"), "failed", "{why}");
        assert_eq!(self.property("ExecMainStatus"), "1", "{why}");
        assert_eq!(
            self.property("NRestarts"),
            restarts_before,
            "restarted in a loop {why}"
        );
    }

    /// The main process's effective capabilities (CapEff in /proc/PID/status).
    fn main_capabilities(&self) -> u64 {
        let pid = self.property("MainPID");
        let status = self.exec_ok(&["cat", &format!("/proc/{pid}/status")]);
        status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no CapEff in /proc/{pid}/status:\n{status}"))
    }

    /// Owner of a file in the box, as `stat` names it.
    fn owner(&self, path: &str) -> String {
        self.exec_ok(&["stat", "-c", "%U", path]).trim().to_owned()
    }

    /// The MESSAGE of every journal entry of holepunch.service (its own and systemd's).
    fn messages(&self) -> Vec<String> {
        self.journal()
            .iter()
            .map(|e| field(e, "MESSAGE").to_owned())
            .collect()
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

/// The overall exposure level in `systemd-analyze security` output.
fn exposure_of(report: &str) -> f64 {
    report
        .lines()
        .find_map(|line| line.split("holepunch.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"))
}

fn timed<T>(what: &str, costs: &mut Vec<(String, f64)>, step: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = step();
    note_cost(costs, what, start);
    value
}

/// Notes what the step `what`, begun at `since`, cost.
fn note_cost(costs: &mut Vec<(String, f64)>, what: &str, since: Instant) {
    costs.push((what.to_owned(), since.elapsed().as_secs_f64()));
}

/// Prints what each step of the box test `test` cost, and the whole since `started`
/// (README, "Packaging").
fn print_costs(test: &str, costs: &[(String, f64)], started: Instant) {
    let summary: Vec<String> = costs
        .iter()
        .map(|(what, secs)| format!("{what} {secs:.1}s"))
        .collect();
    println!(
        "{test} test cost: {}, total {:.1}s",
        summary.join(", "),
        started.elapsed().as_secs_f64()
    );
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
    // Native source format: the crate's version, or it plus +N for a packaging change.
    assert!(
        name.starts_with(&format!("holepunch_{VERSION}")) && name.ends_with("_amd64.deb"),
        "build-deb printed {deb:?}"
    );
    // `dpkg-buildpackage -S` works: build-deb made the source package beside it.
    let version = name
        .trim_start_matches("holepunch_")
        .trim_end_matches("_amd64.deb");
    for source in [
        format!("holepunch_{version}.dsc"),
        format!("holepunch_{version}.tar.xz"),
    ] {
        assert!(deb.with_file_name(&source).is_file(), "no {source}");
    }
    assert!(deb.is_file(), "{deb:?} was not built");
    deb
}

/// Contents, conffiles and dependencies, read with dpkg-deb from the built file.
fn check_package_contents(deb: &Path) {
    let listing = run_ok(Command::new("dpkg-deb").arg("--contents").arg(deb));
    for path in [
        "./usr/bin/holepunch",
        "./usr/lib/systemd/system/holepunch.service",
        "./usr/lib/sysusers.d/holepunch.conf",
        "./usr/lib/sysctl.d/60-holepunch.conf",
        "./etc/holepunch.toml",
        "./etc/holepunch/",
        "./usr/share/man/man8/holepunch.8.gz",
        "./usr/share/man/man5/holepunch.toml.5.gz",
        "./usr/share/bash-completion/completions/holepunch",
        "./usr/share/zsh/vendor-completions/_holepunch",
        "./usr/share/fish/vendor_completions.d/holepunch.fish",
        "./usr/share/doc/holepunch/examples/prometheus-scrape.yml",
        "./usr/share/doc/holepunch/examples/holepunch-alerts.yml",
        "./usr/share/holepunch/rbac.yaml",
        "./usr/share/holepunch/kubeconfig.md",
        "./usr/share/holepunch/holepunch-ha.conf",
        "./usr/share/doc/holepunch/copyright",
        "./usr/share/doc/holepunch/changelog.gz",
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
    assert!(
        !listing.contains(" ./lib/"),
        "nothing stays in /lib:\n{listing}"
    );

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
fn unit_is_unprivileged_and_hardened_to_an_exposure_of_at_most_1_5() {
    let unit = repo().join("systemd/holepunch.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "RestartSec=5s",
        // check-config first: a bad config fails the reload before the daemon is signalled.
        "ExecReload=/usr/bin/holepunch check-config --config /etc/holepunch.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StandardError=journal",
        "User=holepunch",
        "Group=holepunch",
        "StateDirectory=holepunch",
        "LoadCredential=holepunch:/etc/holepunch",
        "LimitCORE=0",
        "MemoryMax=256M",
        "TasksMax=64",
        // CAP_NET_RAW and AF_PACKET only with the [ha] drop-in (README, "High availability").
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallFilter=@system-service",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let reloads: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ExecReload="))
        .collect();
    assert!(reloads[0].contains("check-config"), "{reloads:?}");
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
    let exposure = exposure_of(&report);
    println!("systemd-analyze security --offline=true: exposure {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    );
    // The same unit as root scores worse: the number measures what User= buys.
    let as_root = tempfile::tempdir().unwrap();
    let root_unit = as_root.path().join("holepunch.service");
    let root_text: String = text
        .lines()
        .filter(|l| !l.starts_with("User=") && !l.starts_with("Group="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&root_unit, root_text).unwrap();
    let root_report = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&root_unit),
    );
    assert!(exposure_of(&root_report) > MAX_EXPOSURE, "{root_report}");
}

/// The [ha] drop-in adds CAP_NET_RAW and AF_PACKET to the unit, no more, and says how to
/// install it; with it the unit scores at most 1.8 (README, "Packaging").
#[test]
fn ha_drop_in_adds_only_the_packet_socket_and_scores_at_most_1_8() {
    let drop_in = std::fs::read_to_string(repo().join("systemd/holepunch-ha.conf")).unwrap();
    let settings: Vec<&str> = drop_in
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(
        settings,
        [
            "[Service]",
            "CapabilityBoundingSet=CAP_NET_RAW",
            "AmbientCapabilities=CAP_NET_RAW",
            "RestrictAddressFamilies=AF_PACKET",
        ]
    );
    assert!(
        drop_in.contains(&format!(
            "ln -s {HA_DROP_IN} /etc/systemd/system/holepunch.service.d/"
        )),
        "{drop_in}"
    );
    let rules = std::fs::read_to_string(repo().join("debian/rules")).unwrap();
    assert!(rules.contains("systemd/holepunch-ha.conf"), "not packaged");

    // The unit as systemd reads it on an HA host: the shipped unit and the drop-in beside it.
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(units.join("holepunch.service.d")).unwrap();
    std::fs::copy(
        repo().join("systemd/holepunch.service"),
        units.join("holepunch.service"),
    )
    .unwrap();
    let score = |root: &Path| {
        exposure_of(&run_ok(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(format!("--root={}", root.display()))
                .arg("holepunch.service"),
        ))
    };
    let plain = score(root.path());
    std::fs::write(
        units.join("holepunch.service.d/holepunch-ha.conf"),
        &drop_in,
    )
    .unwrap();
    let ha = score(root.path());
    println!(
        "systemd-analyze security --offline=true: exposure {plain}, with the [ha] drop-in {ha}"
    );
    assert!(plain <= MAX_EXPOSURE, "{plain}");
    assert!(ha > plain, "the drop-in is read: {ha}");
    assert!(ha <= MAX_HA_EXPOSURE, "{ha}");
}

/// debian/copyright is what packaging/copyright generates from `cargo metadata` (every crate
/// linked into the binary, under a license on the allow list), and a crate under a license
/// not on the list fails the check with what to do.
#[test]
fn copyright_lists_every_linked_crate_under_an_allowed_license() {
    let script = repo().join("packaging/copyright");
    run_ok(&mut Command::new(&script));
    let copyright = std::fs::read_to_string(repo().join("debian/copyright")).unwrap();
    for crate_line in [" ring ", " kube-client ", " tokio ", " foldhash "] {
        assert!(
            copyright.contains(crate_line),
            "no{crate_line}in debian/copyright"
        );
    }
    // Proc macros and build-only crates are not linked, so not listed.
    for absent in [" serde_derive ", " cc "] {
        assert!(!copyright.contains(absent), "{absent} is not linked");
    }

    let allowed = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("packaging/licenses")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "Zlib" {
            std::fs::copy(entry.path(), allowed.path().join(entry.file_name())).unwrap();
        }
    }
    let refused = output(Command::new(&script).env("HOLEPUNCH_LICENSE_DIR", allowed.path()));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("is licensed under Zlib, which is not on the allow list")
            && said.contains("packaging/licenses/Zlib"),
        "{said}"
    );
}

/// The Prometheus examples the package ships are the README's, which tests/metrics_lab.rs
/// runs through promtool.
#[test]
fn shipped_prometheus_examples_are_the_readme_ones() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let monitoring = readme
        .split("## Monitoring")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Monitoring section");
    let blocks: Vec<&str> = monitoring
        .split("```yaml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .collect();
    assert_eq!(blocks.len(), 2, "{monitoring}");
    for (block, file) in blocks
        .iter()
        .zip(["prometheus-scrape.yml", "holepunch-alerts.yml"])
    {
        let shipped =
            std::fs::read_to_string(repo().join("packaging/examples").join(file)).unwrap();
        assert_eq!(
            &shipped, block,
            "packaging/examples/{file} differs from README"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
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
    let said = timed("install", &mut costs, || machine.apt(&["install", &in_box]));
    // This box shares the host's network namespace, where nspawn keeps /proc/sys read-only:
    // postinst cannot enable forwarding (the lab test sees it enabled) and says so.
    assert!(
        said.contains("could not enable IPv4 forwarding here; relay mode needs it"),
        "{said}"
    );
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
        "/usr/lib/systemd/system/holepunch.service",
    ]);

    // Unprivileged: its own system user, no capability beyond CAP_NET_ADMIN (this box's
    // bounding set lacks even that; the lab test sees it granted), the state directory its
    // own.
    assert_eq!(machine.main_process(), format!("{SERVICE_USER} holepunch"));
    let capabilities = machine.main_capabilities();
    assert_eq!(
        capabilities & !CAP_NET_ADMIN_BIT,
        0,
        "CapEff {capabilities:#x}"
    );
    assert_eq!(machine.owner("/var/lib/holepunch"), SERVICE_USER);
    assert_eq!(
        machine.owner("/var/lib/holepunch/state.toml.lock"),
        SERVICE_USER
    );
    // The running unit, as systemd itself judges it.
    let report = machine.exec_ok(&["systemd-analyze", "security", "--no-pager", "holepunch"]);
    let exposure = exposure_of(&report);
    println!("systemd-analyze security in the box: exposure {exposure}");
    assert!(exposure <= MAX_EXPOSURE, "{report}");
    // TasksMax=64 leaves room: the daemon's threads, counted (the box keeps no TasksCurrent).
    let pid = machine.property("MainPID");
    let threads = machine
        .exec_ok(&["ls", &format!("/proc/{pid}/task")])
        .split_whitespace()
        .count();
    println!("holepunch threads: {threads} (TasksMax=64)");
    assert!((1..32).contains(&threads), "{threads} threads");

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
    // ExecReload's check-config does not dump the whole config into the journal.
    assert_eq!(machine.property("StandardOutput"), "null");
    let messages: Vec<&str> = journal.iter().map(|e| field(e, "MESSAGE")).collect();
    assert!(!messages.contains(&"[kubernetes]"), "{messages:?}");

    note_cost(&mut costs, "start+journal", step);
    step = Instant::now();

    // A broken config fails `systemctl reload` (check-config runs first, as ExecReload), with
    // file:line:column in the journal; the daemon is never signalled, so it keeps running the
    // config it has (no reload line from it, same process).
    machine.sh("printf '[router]\\nlease_seconds = \"soon\"\\n' >/etc/holepunch.toml");
    let reload = machine.exec(&["systemctl", "reload", "holepunch"]);
    assert!(!reload.status.success(), "a bad config was reloaded");
    let refused = poll("check-config's refusal in the journal", || {
        machine
            .messages()
            .into_iter()
            .find(|m| m.starts_with("holepunch: /etc/holepunch.toml:2:17"))
    });
    println!(
        "systemctl reload with a bad config: {}; journal: {refused}",
        reload.status
    );
    let messages = machine.messages();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Reload failed for holepunch.service")),
        "{messages:?}"
    );
    assert!(
        !messages
            .iter()
            .any(|m| m.starts_with("config not reloaded")),
        "the daemon was signalled: {messages:?}"
    );
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

    note_cost(&mut costs, "reloads", step);
    step = Instant::now();

    // A kubeconfig others can write is refused, by check-config and so at start, with the
    // command that fixes it; root's 0600 file is read through the credential systemd copies.
    machine.sh(&format!(
        "printf 'apiVersion: v1\\nkind: Config\\n' >{KUBECONFIG} && chmod 0666 {KUBECONFIG}"
    ));
    let checked = machine.exec(&["holepunch", "check-config"]);
    let said = String::from_utf8_lossy(&checked.stderr).into_owned();
    assert_eq!(checked.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "refusing the kubeconfig {KUBECONFIG}: every local user can write it"
        )) && said.contains(&format!("run: chmod go-w {KUBECONFIG}")),
        "{said}"
    );
    machine.refuses_to_start("with a world-writable kubeconfig");
    poll("the refusal at start in the journal", || {
        machine
            .messages()
            .iter()
            .any(|m| m.contains("refusing the kubeconfig") && m.contains("chmod go-w"))
            .then_some(())
    });
    machine.sh(&format!(
        "chmod 0600 {KUBECONFIG} && chown nobody {KUBECONFIG}"
    ));
    let checked = machine.exec(&["holepunch", "check-config"]);
    let said = String::from_utf8_lossy(&checked.stderr).into_owned();
    assert_eq!(checked.status.code(), Some(1), "{said}");
    assert!(
        said.contains("it is owned by user 65534") && said.contains("chown root:root"),
        "{said}"
    );
    machine.sh(&format!("chown root:root {KUBECONFIG}"));
    machine.exec_ok(&["holepunch", "check-config"]);
    machine.restart_ok();
    // The kubeconfig has no context: the daemon read the copy, and says why it cannot use it.
    let status = poll("the daemon to read the credential", || {
        let status = machine.property("StatusText");
        status.contains(KUBECONFIG_CREDENTIAL).then_some(status)
    });
    assert!(status.starts_with("cannot use the kubeconfig"), "{status}");
    assert_eq!(machine.property("ActiveState"), "active");
    // One copied in after the start is not in the credentials: the daemon says to restart.
    machine.exec_ok(&["mv", KUBECONFIG, "/root/kubeconfig"]);
    machine.restart_ok();
    poll("the daemon to wait for a kubeconfig", || {
        let status = machine.property("StatusText");
        status.starts_with("no kubeconfig at").then_some(())
    });
    machine.exec_ok(&["mv", "/root/kubeconfig", KUBECONFIG]);
    let status = poll("the daemon to notice the late kubeconfig", || {
        let status = machine.property("StatusText");
        status
            .contains("copied in after holepunch started")
            .then_some(status)
    });
    assert!(status.contains("systemctl restart holepunch"), "{status}");
    machine.exec_ok(&["rm", KUBECONFIG]);
    machine.restart_ok();

    note_cost(&mut costs, "kubeconfig", step);
    step = Instant::now();

    // [ha] with a floating address needs CAP_NET_RAW, which the default unit does not grant:
    // `run` refuses at start, naming the drop-in (exit 1: no restart loop). With the drop-in
    // linked as README says, systemd grants CAP_NET_RAW and AF_PACKET. (Not started with it:
    // this box shares the host's network namespace, where no floating address may go.)
    machine.sh(
        "cp /etc/holepunch.toml /root/holepunch.toml && \
         printf '\\n[ha]\\naddress = \"192.0.2.250/24\"\\ninterface = \"lo\"\\n' >>/etc/holepunch.toml",
    );
    machine.exec_ok(&["holepunch", "check-config"]);
    machine.refuses_to_start("with [ha] and no CAP_NET_RAW");
    poll("the [ha] refusal in the journal", || {
        machine
            .messages()
            .iter()
            .any(|m| m.contains("CAP_NET_RAW") && m.contains(HA_DROP_IN))
            .then_some(())
    });
    machine.sh(&format!(
        "mkdir -p /etc/systemd/system/holepunch.service.d && \
         ln -s {HA_DROP_IN} /etc/systemd/system/holepunch.service.d/ && systemctl daemon-reload"
    ));
    let granted = machine.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "CapabilityBoundingSet",
        "-p",
        "AmbientCapabilities",
        "-p",
        "RestrictAddressFamilies",
        "holepunch",
    ]);
    for line in granted.lines() {
        assert!(
            line.contains("cap_net_admin") && line.contains("cap_net_raw")
                || line.contains("AF_NETLINK") && line.contains("AF_PACKET"),
            "{granted}"
        );
    }
    let report = machine.exec_ok(&["systemd-analyze", "security", "--no-pager", "holepunch"]);
    let exposure = exposure_of(&report);
    println!("systemd-analyze security in the box with the [ha] drop-in: exposure {exposure}");
    assert!(exposure <= MAX_HA_EXPOSURE, "{report}");
    // Back to a host without [ha] for the rest.
    machine.sh(
        "rm -r /etc/systemd/system/holepunch.service.d && mv /root/holepunch.toml /etc/holepunch.toml && \
         systemctl daemon-reload && systemctl reset-failed holepunch",
    );
    machine.restart_ok();
    poll("holepunch.service active again without [ha]", || {
        (machine.property("ActiveState") == "active").then_some(())
    });

    note_cost(&mut costs, "ha refusal+drop-in", step);
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

    note_cost(&mut costs, "remove+purge", step);
    timed("down", &mut costs, || drop(machine));
    print_costs("package", &costs, started);
}

/// A mapping the root-run 0.1.0 recorded (the state file's documented hand-written format).
const OLD_STATE: &str = r#"version = 1

[[mapping]]
owner = "media/jellyfin"
service_port = 8096
protocol = "tcp"
external_port = 30080
internal = { address = "192.168.77.10", port = 30080 }
target = { address = "192.168.77.100", port = 8096 }
target_source = "load-balancer"
backend = "pcp"
nonce = "00112233445566778899aabb"
lifetime_secs = 3600
expires_at = "2025-01-02T04:04:05Z"
status = "active"
"#;

/// The 0.1.0 package, as far as an upgrade can tell: main's unit, which ran holepunch as root
/// (tests/fixtures/holepunch-0.1.0.service), in /lib/systemd/system where 0.1.0 put it, no
/// system user, no sysctl file, version 0.1.0-1. Repacked from the new build rather than built
/// from main (which would cost a second compile of the crate): the binary is the new one, which
/// reads the state file 0.1.0 wrote.
fn old_package(deb: &Path, dir: &Path) -> PathBuf {
    let tree = dir.join("old");
    run_ok(
        Command::new("dpkg-deb")
            .arg("--raw-extract")
            .arg(deb)
            .arg(&tree),
    );
    for path in [
        "usr/lib/systemd/system/holepunch.service",
        "usr/lib/sysusers.d/holepunch.conf",
        "usr/lib/sysctl.d/60-holepunch.conf",
        "DEBIAN/md5sums",
    ] {
        std::fs::remove_file(tree.join(path)).unwrap();
    }
    std::fs::create_dir_all(tree.join("lib/systemd/system")).unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/holepunch-0.1.0.service"),
        tree.join("lib/systemd/system/holepunch.service"),
    )
    .unwrap();
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let text: String = text
        .lines()
        .map(|line| match line.strip_prefix("Version: ") {
            Some(_) => "Version: 0.1.0-1\n".to_owned(),
            None => format!("{line}\n"),
        })
        .collect();
    std::fs::write(&control, text).unwrap();
    // 0.1.0's postinst made no user: drop dh_installsysusers' snippet.
    let postinst = tree.join("DEBIAN/postinst");
    let text = std::fs::read_to_string(&postinst).unwrap();
    let start = text
        .find("# Automatically added by dh_installsysusers")
        .expect("postinst has the sysusers snippet");
    let end = start
        + text[start..]
            .find("# End automatically added section\n")
            .unwrap()
        + "# End automatically added section\n".len();
    std::fs::write(&postinst, format!("{}{}", &text[..start], &text[end..])).unwrap();
    let old = dir.join("holepunch_0.1.0-1_amd64.deb");
    run_ok(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&tree)
            .arg(&old),
    );
    old
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upgrade_from_the_root_run_0_1_0_keeps_state_and_mappings() {
    require_root();
    let started = Instant::now();
    let mut costs = Vec::new();
    let deb = build_package(&mut costs);
    let dir = tempfile::tempdir().unwrap();
    let old = old_package(&deb, dir.path());
    let machine = timed("create", &mut costs, || {
        SystemdBox::create(&format!("hpk{}up", std::process::id()))
    });
    timed("boot", &mut costs, || machine.boot());
    machine.copy(&old, "/root/old.deb");
    machine.copy(&deb, "/root/new.deb");

    // 0.1.0 runs as root, with a mapping in its state file.
    let state = dir.path().join("state.toml");
    std::fs::write(&state, OLD_STATE).unwrap();
    machine.copy(&state, "/var/lib/holepunch/state.toml");
    machine.sh("chmod 0700 /var/lib/holepunch && chmod 0600 /var/lib/holepunch/state.toml");
    let step = Instant::now();
    machine.apt(&["install", "/root/old.deb"]);
    poll("0.1.0 to become active", || {
        (machine.property("ActiveState") == "active").then_some(())
    });
    assert_eq!(machine.main_process(), "root holepunch");
    let old_pid = machine.property("MainPID");
    let before = machine.exec_ok(&["holepunch", "status"]);
    assert!(before.contains("media/jellyfin"), "{before}");
    for path in [
        "/var/lib/holepunch/state.toml",
        "/var/lib/holepunch/state.toml.lock",
    ] {
        assert_eq!(machine.owner(path), "root", "{path}");
    }

    // The upgrade: dpkg moves the unit to /usr/lib (the same file on merged /usr: it must
    // survive), sysusers makes the user, systemd hands it the state directory at restart.
    machine.apt(&["install", "/root/new.deb"]);
    let version = machine.exec_ok(&["dpkg-query", "-W", "-f", "${Version}", "holepunch"]);
    assert!(
        version.starts_with(VERSION) && version != "0.1.0-1",
        "{version}"
    );
    assert!(machine.exists("/usr/lib/systemd/system/holepunch.service"));
    assert_eq!(
        machine.property("LoadState"),
        "loaded",
        "systemd lost the unit"
    );
    poll("the new daemon to be active", || {
        let pid = machine.property("MainPID");
        (machine.property("ActiveState") == "active" && pid != "0" && pid != old_pid).then_some(())
    });
    assert_eq!(machine.main_process(), format!("{SERVICE_USER} holepunch"));
    for path in [
        "/var/lib/holepunch",
        "/var/lib/holepunch/state.toml",
        "/var/lib/holepunch/state.toml.lock",
    ] {
        assert_eq!(machine.owner(path), SERVICE_USER, "{path}");
    }
    let after = machine.exec_ok(&["holepunch", "status"]);
    let mapping = |status: &str| {
        status
            .lines()
            .find(|l| l.starts_with("media/jellyfin"))
            .map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" "))
    };
    assert_eq!(mapping(&after), mapping(&before), "{after}");
    assert!(mapping(&after).is_some());
    // A second start as the new user takes the lock again (it can write the directory).
    machine.restart_ok();
    poll("the new daemon to be active again", || {
        (machine.property("ActiveState") == "active").then_some(())
    });
    assert_eq!(machine.property("NRestarts"), "0");
    note_cost(&mut costs, "0.1.0 and upgrade", step);

    timed("down", &mut costs, || drop(machine));
    print_costs("upgrade", &costs, started);
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
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn package_in_the_lab_keeps_traffic_flowing_across_a_restart_and_purge_removes_everything() {
    require_root();
    let started = Instant::now();
    let mut costs = Vec::new();
    let deb = build_package(&mut costs);

    let lab = timed("lab up", &mut costs, || Lab::up(LAB_PREFIX));
    let _echo = lab.echo_server("node", LB_IP, LB_PORT);
    // Forwarding on the LAN host is left to the package (postinst applies its sysctl.d file).
    let forwarding = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
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
        let forwarding = machine.exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
        assert_eq!(forwarding.trim(), "1", "postinst did not enable forwarding");
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
        // The package started the daemon with the shipped config: the change takes effect
        // the way a user applies it.
        machine.exec_ok(&["systemctl", "reload-or-restart", "holepunch"]);
        machine.exec_ok(&["systemctl", "enable", "--now", "holepunch"]);
        poll("holepunch.service to become active", || {
            (machine.property("ActiveState") == "active").then_some(())
        });
        // Its own user, with CAP_NET_ADMIN (this box's bounding set has it) and nothing else.
        assert_eq!(machine.main_process(), format!("{SERVICE_USER} holepunch"));
        let capabilities = machine.main_capabilities();
        assert_eq!(
            capabilities, CAP_NET_ADMIN_BIT,
            "CapEff {capabilities:#x} is not CAP_NET_ADMIN alone"
        );
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
        note_cost(&mut costs, "start+publish", step);

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
        machine.restart_ok();
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
        note_cost(&mut costs, "restart under load", step);

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
        note_cost(&mut costs, "purge", step);

        timed("down", &mut costs, || drop(machine));
    });
    drop(lab);
    print_costs("package-in-lab", &costs, started);
}

/// What the slow API makes every Event and status write wait (a control plane on an SD card
/// under load).
const SLOW_API_DELAY_SECS: u64 = 25;
/// How long the shipped unit runs against the slow API.
const SLOW_API_RUN_SECS: u64 = 120;

/// The shipped unit (`WatchdogSec=30s`) in the booted box, in the router lab, while the API
/// answers every Event and status write after 25 s: for 2 minutes the service stays active
/// and `NRestarts` stays 0 while the Service is served from the WAN. Then a loop frozen on
/// purpose (`HOLEPUNCH_FREEZE_AT=loop-pass:3` in a drop-in) is killed by systemd's watchdog:
/// the journal says "Watchdog timeout" and `NRestarts` grows.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn shipped_unit_outlives_a_slow_api_and_its_watchdog_kills_a_frozen_loop() {
    require_root();
    let started = Instant::now();
    let mut costs = Vec::new();
    let deb = build_package(&mut costs);
    let lab = timed("lab up", &mut costs, || Lab::up(LAB_PREFIX));
    let _echo = lab.echo_server("node", LB_IP, LB_PORT);
    with_fake_cluster_in(&lab, "lan", |fake, _dir, kubeconfig, _| {
        let delay = Duration::from_secs(SLOW_API_DELAY_SECS);
        fake.delay_matching(delay, "POST", "/events");
        fake.delay_matching(delay, "PATCH", "/status");
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": lab::NODE_IP}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }));
        // Published (an Event) and of holepunch's own class (a status write): both slow.
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "game", "namespace": "default",
                         "annotations": {"holepunch/punch-external": "true"}},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": LB_PORT, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
        }));
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "own", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer", "loadBalancerClass": "holepunch.io/router",
                "ports": [{"name": "web", "port": 9090, "protocol": "TCP", "nodePort": 31090}]
            }
        }));

        let machine = timed("create", &mut costs, || {
            SystemdBox::create(&format!("hpk{}slow", std::process::id()))
        });
        timed("boot in lan", &mut costs, || {
            machine.boot_in(&lab.ns("lan"))
        });
        let in_box = format!("/root/{}", deb.file_name().unwrap().to_string_lossy());
        machine.copy(&deb, &in_box);
        machine.copy(kubeconfig, "/etc/holepunch/kubeconfig");
        timed("install", &mut costs, || machine.apt(&["install", &in_box]));
        machine.sh(&format!(
            "sed -i 's|^target_cidrs = \\[\\]|target_cidrs = [\"{LB_IP}/32\"]|' /etc/holepunch.toml"
        ));
        machine.exec_ok(&["systemctl", "reload-or-restart", "holepunch"]);
        poll("holepunch.service to become active", || {
            (machine.property("ActiveState") == "active").then_some(())
        });
        let answer = poll("11.22.33.44:8080 to answer from the internet", || {
            lab.ask("wan", "tcp", ROUTER_WAN_IP, LB_PORT, "hello")
        });
        assert!(answer.ends_with(" hello"), "{answer}");

        // Two minutes of the slow API: never restarted, always active.
        let slow = Instant::now();
        let restarts_at_start = machine.property("NRestarts");
        let mut checks = 0;
        while slow.elapsed() < Duration::from_secs(SLOW_API_RUN_SECS) {
            assert_eq!(machine.property("ActiveState"), "active");
            assert_eq!(
                machine.property("NRestarts"),
                restarts_at_start,
                "restarted under the slow API:\n{:?}",
                machine.messages()
            );
            checks += 1;
            std::thread::sleep(Duration::from_secs(5));
        }
        let delayed = fake.delayed_requests();
        let restarts = machine.property("NRestarts");
        let served = lab.ask("wan", "tcp", ROUTER_WAN_IP, LB_PORT, "still");
        println!(
            "slow API in the box: {SLOW_API_RUN_SECS} s, NRestarts={restarts}, {delayed} writes \
             held back by the API, {checks} checks, served from the WAN afterwards: {}",
            served.is_some()
        );
        assert_eq!(restarts, "0", "NRestarts under the slow API");
        assert!(
            delayed >= 2,
            "the API held back Event and status writes: {delayed}"
        );
        assert!(served.is_some(), "the Service is still served");
        note_cost(&mut costs, "slow API", slow);

        // A loop frozen on purpose: systemd's watchdog kills it and the unit restarts it.
        let step = Instant::now();
        machine.exec_ok(&["mkdir", "-p", "/etc/systemd/system/holepunch.service.d"]);
        machine.sh(
            "printf '[Service]\\nEnvironment=HOLEPUNCH_FREEZE_AT=loop-pass:3\\n' \
             > /etc/systemd/system/holepunch.service.d/freeze.conf",
        );
        machine.exec_ok(&["systemctl", "daemon-reload"]);
        machine.restart_ok();
        let before = machine.property("NRestarts");
        let watchdog = Instant::now();
        // The third pass comes from a cluster change or the timer (at most the 60 s verify
        // interval; Node heartbeats no longer wake the loop), then WatchdogSec (30 s) runs out.
        let killed = poll_for(
            "the watchdog to kill the frozen loop",
            Duration::from_secs(2 * 60 + 30 + 90),
            || {
                machine
                    .messages()
                    .into_iter()
                    .find(|m| m.contains("Watchdog timeout"))
            },
        );
        let took = watchdog.elapsed();
        let after = poll_for("the unit to restart it", Duration::from_secs(60), || {
            let now = machine.property("NRestarts");
            (now != before).then_some(now)
        });
        println!(
            "frozen loop: \"{killed}\" {took:?} after the restart; NRestarts {before} -> {after}"
        );
        assert!(
            machine
                .messages()
                .iter()
                .any(|m| m.contains("freeze point loop-pass reached")),
            "the loop froze on purpose"
        );
        note_cost(&mut costs, "frozen loop", step);
        timed("down", &mut costs, || drop(machine));
    });
    drop(lab);
    print_costs("slow-API box", &costs, started);
}
