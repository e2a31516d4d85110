//! A home network with a real router, for integration tests: `tests/lab/router-lab` builds
//! three network namespaces with miniupnpd (UPnP IGD, NAT-PMP, PCP) as the router.
//!
//! Every lab uses the same addresses (192.168.77.0/24 on the LAN, 11.22.33.0/24 "on the
//! internet"), so only one lab may exist at a time: [`Lab::up`] takes a process-wide lock that
//! [`Lab`]'s `Drop` releases after `down`. Keep all lab tests in one test binary
//! (`tests/router_lab.rs`) so that the lock covers them all.
//!
//! Needs root and `ip netns` (CI runs as root); without them the tests fail with a message
//! saying so, they are not skipped. The script installs its own apt packages on first use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};

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

static LAB_LOCK: Mutex<()> = Mutex::new(());

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
    // Dropped after `Drop::drop` has run `down`: the next lab starts on a clean machine.
    _guard: MutexGuard<'static, ()>,
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
        "the router lab needs root (network namespaces, nftables): run `cargo test --test \
         router_lab` as root, as CI does"
    );
    let netns = Command::new("ip").args(["netns", "list"]).output();
    assert!(
        matches!(&netns, Ok(out) if out.status.success()),
        "the router lab needs `ip netns` (iproute2) and network namespace support: {netns:?}"
    );
}

impl Lab {
    /// Build the lab with namespaces `<prefix>rtr`, `<prefix>lan`, `<prefix>wan`,
    /// `<prefix>node`, waiting for any other lab of this process to be torn down first.
    pub fn up(prefix: &str) -> Lab {
        Lab::up_with(prefix, &[])
    }

    /// [`Lab::up`] with options for the script (`--insecure`, `--lease-file`).
    pub fn up_with(prefix: &str, options: &[&str]) -> Lab {
        // A test that panicked while holding the lock still tore its lab down in `Drop`.
        let guard = LAB_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        check_prerequisites();
        let lab = Lab {
            prefix: prefix.to_owned(),
            _guard: guard,
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

    /// miniupnpd's log, for failure messages.
    pub fn router_log(&self) -> String {
        let path = format!("/run/holepunch-lab/{}/miniupnpd.log", self.prefix);
        std::fs::read_to_string(&path).unwrap_or_else(|err| format!("({path}: {err})"))
    }
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
