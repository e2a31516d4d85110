//! A home network with a real router, for integration tests: `tests/lab/router-lab` builds
//! three network namespaces with miniupnpd (UPnP IGD, NAT-PMP, PCP) as the router.
//!
//! Every lab uses the same addresses (192.168.77.0/24 on the LAN, 11.22.33.0/24 "on the
//! internet") inside its own namespaces, named by a prefix: labs with different prefixes are
//! independent, so each test binary uses its own prefix, and [`Lab::up`] takes a lock on its
//! prefix (released by [`Lab`]'s `Drop` after `down`) so that the tests of one binary take
//! turns with theirs. The lock is also a file lock (`/run/holepunch-lab/<prefix>.lock`), so
//! that a second `cargo test` running the same binary waits instead of tearing down the
//! first one's lab.
//!
//! Needs root and `ip netns`: the second test tier (README "Tests"). Every test that builds a
//! lab carries `#[cfg_attr(not(feature = "lab"), ignore = "lab tier: ...")]`, so a plain
//! `cargo test` lists it as ignored with the command that runs it, never passes it silently;
//! `sudo make test` (`cargo test --features lab`, as root) runs it. Asked to run without root,
//! [`Lab::up`] fails with a message saying so. The script installs its own apt packages on
//! first use.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Condvar, Mutex};

/// The router's LAN address, where NAT-PMP and PCP listen (udp/5351).
pub const ROUTER_LAN_IP: &str = "192.168.77.1";
/// The router's public address.
pub const ROUTER_WAN_IP: &str = "11.22.33.44";
/// The LAN host where the daemon under test runs (namespace `lan`).
pub const LAN_IP: &str = "192.168.77.10";
/// Another LAN host (namespace `node`).
pub const NODE_IP: &str = "192.168.77.20";
/// The client on the internet (namespace `wan`).
pub const WAN_CLIENT_IP: &str = "11.22.33.1";

/// The prefixes whose lab is up in this process: a lab waits for its prefix to be free, so
/// tests with one prefix take turns while tests with different prefixes run side by side.
static LABS_UP: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static LAB_DOWN: Condvar = Condvar::new();

/// Holds `prefix` for one lab; frees it when dropped (after the lab's `down`). Also for a
/// test's own namespaces under its prefix (tests/ha_lab.rs).
pub struct PrefixHeld(String, std::fs::File);

impl PrefixHeld {
    pub fn take(prefix: &str) -> PrefixHeld {
        let held = Self::take_in_process(prefix);
        let dir = Path::new("/run/holepunch-lab");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(format!("{prefix}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        if file.try_lock().is_err() {
            eprintln!(
                "lab {prefix}: another process holds {}; waiting for it",
                path.display()
            );
            file.lock()
                .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
        }
        PrefixHeld(held, file)
    }

    /// The in-process half: tests of one binary with the same prefix take turns.
    fn take_in_process(prefix: &str) -> String {
        // A test that panicked while holding the lock still tore its lab down in `Drop`.
        let mut up = LABS_UP
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while up.contains(prefix) {
            up = LAB_DOWN
                .wait(up)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        up.insert(prefix.to_owned());
        prefix.to_owned()
    }
}

impl Drop for PrefixHeld {
    fn drop(&mut self) {
        LABS_UP
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.0);
        LAB_DOWN.notify_all();
    }
}

/// Sends one UDP datagram from a bound source address and prints the first answer that comes
/// from the address it was sent to, in hex. Retransmits twice, one second apart.
const UDP_RELAY: &str = r#"
import socket, sys
src, host, port, req = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.settimeout(1.0)
for _ in range(3):
    s.sendto(req, (host, port))
    try:
        while True:
            data, addr = s.recvfrom(2048)
            if addr == (host, port):
                print(data.hex())
                sys.exit(0)
    except socket.timeout:
        pass
sys.exit("no answer from %s:%d" % (host, port))
"#;

pub struct Lab {
    prefix: String,
    // Dropped after `Drop::drop` has run `down`: the next lab of this prefix starts clean.
    _held: PrefixHeld,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/router-lab")
}

/// The python3 the relay and the listeners run with.
pub fn python() -> &'static str {
    // NOTE: prefer the system interpreter: a pyenv shim on PATH costs ~100 ms per start.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn check_prerequisites() {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "the router lab needs root (network namespaces, nftables): run `sudo make test`, or \
         as root `cargo test --features lab --test <name>`"
    );
    let netns = Command::new("ip").args(["netns", "list"]).output();
    assert!(
        matches!(&netns, Ok(out) if out.status.success()),
        "the router lab needs `ip netns` (iproute2) and network namespace support: {netns:?}"
    );
}

impl Lab {
    /// Build the lab with namespaces `<prefix>rtr`, `<prefix>lan`, `<prefix>wan`,
    /// `<prefix>node`, waiting for another lab of this process with the same prefix to be torn
    /// down first.
    pub fn up(prefix: &str) -> Lab {
        Lab::up_with(prefix, &[])
    }

    /// [`Lab::up`] with options for the script (`--insecure`, `--lease-file`).
    pub fn up_with(prefix: &str, options: &[&str]) -> Lab {
        let held = PrefixHeld::take(prefix);
        check_prerequisites();
        let lab = Lab {
            prefix: prefix.to_owned(),
            _held: held,
        };
        // Leftovers of a run that was killed before its `Drop` would make `up` refuse.
        lab.script(&["down"]);
        let mut args = vec!["up"];
        args.extend_from_slice(options);
        let out = lab.script(&args);
        assert!(
            out.status.success(),
            "router-lab up failed ({}):\n{}{}\nrouter log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            lab.router_log()
        );
        lab
    }

    fn script(&self, args: &[&str]) -> Output {
        Command::new(script())
            .args(args)
            .env("LAB_PREFIX", &self.prefix)
            .stdin(Stdio::null())
            .output()
            .expect("run tests/lab/router-lab")
    }

    /// The full name of a lab namespace: `ns("lan")` is `<prefix>lan`.
    pub fn ns(&self, ns: &str) -> String {
        format!("{}{ns}", self.prefix)
    }

    fn command(&self, ns: &str, cmd: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(ns)]).args(cmd);
        command
    }

    /// Run `cmd` in namespace `ns` ("rtr", "lan", "wan", "node") and wait for it.
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        self.command(ns, cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("ip netns exec {} {cmd:?}: {err}", self.ns(ns)))
    }

    /// Start `cmd` in namespace `ns` with piped stdout and stderr. The caller waits for it.
    pub fn spawn(&self, ns: &str, cmd: &[&str]) -> Child {
        self.command(ns, cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("ip netns exec {} {cmd:?}: {err}", self.ns(ns)))
    }

    /// Send `request` over UDP from `src_ip` in namespace `ns` to `dst_ip:dst_port` and
    /// return the answer's bytes. Panics when no answer comes (after 3 tries, 3 s).
    pub fn udp_exchange(
        &self,
        ns: &str,
        src_ip: &str,
        dst_ip: &str,
        dst_port: u16,
        request: &[u8],
    ) -> Vec<u8> {
        let port = dst_port.to_string();
        let out = self.exec(
            ns,
            &[
                python(),
                "-c",
                UDP_RELAY,
                src_ip,
                dst_ip,
                &port,
                &hex(request),
            ],
        );
        assert!(
            out.status.success(),
            "UDP exchange {src_ip} -> {dst_ip}:{dst_port} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        unhex(String::from_utf8_lossy(&out.stdout).trim())
    }

    /// Stop miniupnpd, flush its rules and start it again: a router reboot (new epoch, no
    /// mappings).
    pub fn restart_router(&self) {
        let out = self.script(&["restart-router"]);
        assert!(
            out.status.success(),
            "router-lab restart-router failed: {}\nrouter log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.router_log()
        );
    }

    /// The ISP hands the router a new WAN address (`router-lab change-wan-ip`; the lab must be
    /// up with `--dynamic-wan`): miniupnpd keeps its mappings and announces the change.
    pub fn change_wan_ip(&self, address: &str) {
        let out = self.script(&["change-wan-ip", address]);
        assert!(
            out.status.success(),
            "router-lab change-wan-ip failed: {}\nrouter log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.router_log()
        );
    }

    /// The router's port-forwarding rules (the nft chain miniupnpd writes its DNATs into).
    pub fn router_forwards(&self) -> String {
        let out = self.exec(
            "rtr",
            &[
                "nft",
                "list",
                "chain",
                "inet",
                "filter",
                "prerouting_miniupnpd",
            ],
        );
        assert!(out.status.success(), "nft list: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// CPU time miniupnpd has used so far (user + system, from `/proc/<pid>/stat`), in
    /// seconds: what a benchmark's router time is made of, beside waiting for a CPU.
    pub fn router_cpu_secs(&self) -> f64 {
        let path = format!("/run/holepunch-lab/{}/miniupnpd.pid", self.prefix);
        let pid = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .unwrap_or_else(|e| panic!("miniupnpd's /proc stat: {e}"));
        // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i - 3).and_then(|t| t.parse::<f64>().ok());
        let (Some(user), Some(system)) = (ticks(14), ticks(15)) else {
            panic!("unreadable /proc stat: {stat}");
        };
        // USER_HZ is 100 on Linux.
        (user + system) / 100.0
    }

    /// miniupnpd's log, for failure messages.
    pub fn router_log(&self) -> String {
        let path = format!("/run/holepunch-lab/{}/miniupnpd.log", self.prefix);
        std::fs::read_to_string(&path).unwrap_or_else(|err| format!("({path}: {err})"))
    }
}

/// An echo server for TCP and UDP on one address and port (IPv4 or IPv6); each answer is
/// `<peer address> <line>`, so a test sees whose source address arrived. Killed when dropped.
pub struct EchoServer(Child);

const ECHO_SERVER: &str = r#"
import socket, sys, threading
ip, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
t = socket.socket(family, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((ip, port)); t.listen(16)
u = socket.socket(family, socket.SOCK_DGRAM)
u.bind((ip, port))
def tcp():
    while True:
        c, peer = t.accept()
        def serve(c=c, peer=peer):
            f = c.makefile('rb')
            for line in f:
                c.sendall(("%s %s\n" % (peer[0], line.decode().strip())).encode())
            c.close()
        threading.Thread(target=serve, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(("%s %s\n" % (peer[0], data.decode().strip())).encode(), peer)
"#;

/// Sends one line to `ip:port` (IPv4 or IPv6) over TCP or UDP and prints the first answer
/// line; exits 1 without an answer within two seconds (UDP: sent up to 4 times).
const ASK: &str = r#"
import socket, sys
proto, ip, port, line = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    if proto == "tcp":
        c = socket.create_connection((ip, port), timeout=2)
        c.sendall((line + "\n").encode())
        print(c.makefile('rb').readline().decode().strip())
    else:
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        for _ in range(4):
            s.sendto((line + "\n").encode(), (ip, port))
            try:
                print(s.recvfrom(2048)[0].decode().strip()); break
            except socket.timeout:
                pass
        else:
            sys.exit(1)
except OSError as e:
    sys.exit("%s" % e)
"#;

impl Lab {
    /// Starts an [`EchoServer`] on `ip:port` in namespace `ns`; returns once it listens.
    pub fn echo_server(&self, ns: &str, ip: &str, port: u16) -> EchoServer {
        let mut child = self.spawn(ns, &[python(), "-c", ECHO_SERVER, ip, &port.to_string()]);
        let mut ready = [0u8; 6];
        let read = child
            .stdout
            .as_mut()
            .map(|out| std::io::Read::read_exact(out, &mut ready));
        assert!(
            matches!(read, Some(Ok(()))) && &ready == b"ready\n",
            "echo server on {ip}:{port} in {ns} did not start"
        );
        EchoServer(child)
    }

    /// From namespace `ns`, sends `line` to `ip:port` over `proto` ("tcp" or "udp"); the
    /// answer line, or `None` when nothing answered.
    pub fn ask(&self, ns: &str, proto: &str, ip: &str, port: u16, line: &str) -> Option<String> {
        let out = self.exec(
            ns,
            &[python(), "-c", ASK, proto, ip, &port.to_string(), line],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Lab {
    /// Starts counting the UDP packets that reach the router's PCP/NAT-PMP port (5351), with
    /// a counter rule in a table of its own in the router namespace.
    pub fn count_router_pcp_packets(&self) {
        let out = self.exec(
            "rtr",
            &[
                "nft",
                "add table inet hp_pcp_count; \
                 add chain inet hp_pcp_count in { type filter hook input priority -300 ; }; \
                 add rule inet hp_pcp_count in udp dport 5351 counter",
            ],
        );
        assert!(
            out.status.success(),
            "nft counter: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Packets counted since [`Lab::count_router_pcp_packets`].
    pub fn router_pcp_packets(&self) -> u64 {
        let out = self.exec(
            "rtr",
            &["nft", "list", "chain", "inet", "hp_pcp_count", "in"],
        );
        assert!(
            out.status.success(),
            "nft list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        counted_packets(&listing).unwrap_or_else(|| panic!("no counter in {listing}"))
    }
}

/// The packets of the first `counter` in an `nft list` output.
pub fn counted_packets(listing: &str) -> Option<u64> {
    listing
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `body` on a thread that has entered network namespace `ns` (only that thread: the
/// rest of the test process stays where it is). Sockets it opens, the threads of a runtime it
/// builds, and processes it spawns all live in `ns`. A panic in `body` is the test's panic.
pub fn in_netns<T: Send>(ns: &str, body: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) with a valid, open namespace file descriptor; CLONE_NEWNET
            // changes only the calling thread's network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            body()
        });
        match handle.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.script(&["down"]);
        if !out.status.success() {
            eprintln!(
                "router-lab down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A python3 one-shot listener in namespace `ns`; returns once it listens.
pub fn listen(lab: &Lab, ns: &str, proto: &str, port: u16) -> Child {
    let script = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_{kind})
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port}))
s.settimeout(15)
{listen}
print("ready", flush=True)
{receive}
print("%s %s" % (peer[0], data.decode().strip()), flush=True)
"#,
        kind = if proto == "tcp" { "STREAM" } else { "DGRAM" },
        listen = if proto == "tcp" { "s.listen(1)" } else { "" },
        receive = if proto == "tcp" {
            "c, peer = s.accept()\nc.settimeout(10)\ndata = c.makefile('rb').readline()"
        } else {
            "data, peer = s.recvfrom(2048)"
        },
    );
    let mut child = lab.spawn(ns, &[python(), "-c", &script]);
    let mut ready = String::new();
    let stdout = child.stdout.as_mut().unwrap();
    // Byte by byte, so that nothing after "ready" is buffered away from `received`.
    let mut byte = [0u8; 1];
    while !ready.ends_with('\n') && stdout.read(&mut byte).unwrap_or(0) == 1 {
        ready.push(char::from(byte[0]));
    }
    assert_eq!(ready.trim(), "ready", "listener did not start");
    child
}

/// The line the listener received, as "<peer address> <line>".
pub fn received(mut child: Child) -> String {
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(status.success(), "listener failed: {err}");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_owned()
}

/// From the internet client: send `line` to the router's public address. TCP fails when
/// the router does not forward the port (connection refused).
pub fn send_from_wan(lab: &Lab, proto: &str, port: u16, line: &str) -> std::process::Output {
    let script = format!(
        r#"
import socket, time
if "{proto}" == "tcp":
    c = socket.create_connection(("{ROUTER_WAN_IP}", {port}), timeout=2)
    c.sendall(b"{line}\n")
    c.close()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(5):
        s.sendto(b"{line}\n", ("{ROUTER_WAN_IP}", {port}))
        time.sleep(0.1)
"#
    );
    lab.exec("wan", &[python(), "-c", &script])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd-length hex: {text:?}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex from the relay"))
        .collect()
}
