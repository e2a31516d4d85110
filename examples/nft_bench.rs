//! Benchmark (prints numbers; not a test): replacing table `inet holepunch` with 10,000
//! forwards in one batch through holepunch's netlink code vs `nft -f` of the same ruleset.
//!
//! Runs as root in a throwaway network namespace `hpf-bench` (deleted at the end):
//! `cargo run --example nft_bench [-- COUNT]`. holepunch's time includes reading the map back
//! and verifying it; `nft -f`'s includes starting the process and parsing the script, which is
//! what a daemon shelling out to nft would pay.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use holepunch::model::{Endpoint, Protocol};
use holepunch::nft::{Forward, NftFirewall, Ruleset};

const NAMESPACE: &str = "hpf-bench";
const DEFAULT_COUNT: usize = 10_000;
const ROUNDS: usize = 5;
const LAN_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);

/// Deletes the namespace when dropped, also on an early return.
struct Namespace;

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", NAMESPACE])
            .output();
    }
}

fn forwards(count: usize) -> Vec<Forward> {
    (0..count)
        .map(|i| {
            let protocol = if i % 2 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let port = 10_000 + (i / 2) as u16;
            let host = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i % 250) as u32 + 1;
            Forward {
                protocol,
                port,
                target: Endpoint::new(Ipv4Addr::from(host), 8000 + (i % 1000) as u16),
            }
        })
        .collect()
}

/// The same ruleset in nft syntax: replace the table in one transaction, as `apply` does.
fn nft_script(forwards: &[Forward], mark: u32) -> String {
    let mut script = String::from(
        "table inet holepunch\ndelete table inet holepunch\ntable inet holepunch {\n  map targets4 {\n    \
         type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n    elements = {\n",
    );
    for f in forwards {
        let proto = match f.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        script.push_str(&format!(
            "      {LAN_ADDRESS} . {proto} . {} : {} . {},\n",
            f.port, f.target.address, f.target.port
        ));
    }
    script.push_str(&format!(
        "    }}\n  }}\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         meta nfproto ipv4 ct mark set ct mark | {mark:#x} dnat ip to ip daddr . meta l4proto . th dport map @targets4\n  }}\n  \
         chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ct mark & {mark:#x} != 0 masquerade\n  }}\n}}\n"
    ));
    script
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => DEFAULT_COUNT,
    };
    let _ = Command::new("ip")
        .args(["netns", "del", NAMESPACE])
        .output();
    let added = Command::new("ip")
        .args(["netns", "add", NAMESPACE])
        .status()?;
    if !added.success() {
        return Err("ip netns add hpf-bench failed (run as root)".into());
    }
    let _cleanup = Namespace;
    let file = File::open(format!("/run/netns/{NAMESPACE}"))?;
    // SAFETY: `file` is an open namespace file; this process is single-threaded here, and
    // only its network namespace changes (children started later inherit it).
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }

    let forwards = forwards(count);
    let ruleset = Ruleset::Relay {
        lan_address: LAN_ADDRESS,
        forwards: forwards.clone(),
    };
    let script_path = std::env::temp_dir().join("hpf-bench.nft");
    File::create(&script_path)?
        .write_all(nft_script(&forwards, holepunch::nft::RELAYED_CT_MARK).as_bytes())?;

    let firewall = NftFirewall;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let started = Instant::now();
        firewall.apply(&ruleset)?;
        ours.push(started.elapsed());

        let started = Instant::now();
        let status = Command::new("nft").arg("-f").arg(&script_path).status()?;
        theirs.push(started.elapsed());
        if !status.success() {
            return Err("nft -f failed".into());
        }
    }
    let held = firewall.current()?.len();
    let _ = std::fs::remove_file(&script_path);

    let (ours, theirs) = (median(ours), median(theirs));
    println!("forwards per ruleset:                 {count} (kernel holds {held} after nft -f)");
    println!(
        "holepunch apply (batch + verify):     {:>8.1} ms (median of {ROUNDS})",
        ours.as_secs_f64() * 1e3
    );
    println!(
        "nft -f of the same ruleset:           {:>8.1} ms (median of {ROUNDS})",
        theirs.as_secs_f64() * 1e3
    );
    println!(
        "ratio holepunch / nft -f:             {:>8.2} (goal <= 1.0)",
        ours.as_secs_f64() / theirs.as_secs_f64()
    );
    Ok(())
}
