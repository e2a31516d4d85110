//! Benchmark (prints numbers; not a test; README.md, "Benchmarks"):
//! 1. replacing table `inet holepunch` with 10,000 forwards in one batch through holepunch's
//!    netlink code vs `nft -f` of the same ruleset;
//! 2. new TCP connections per second through the relay DNAT with 1 vs 10,000 forwards.
//!
//! Runs as root in throwaway network namespaces `hpf-bench` (the relay host and the server)
//! and `hpf-benchc` (the client, joined by a veth pair), deleted at the end:
//! `cargo run --example nft_bench [-- COUNT]`. holepunch's time includes reading the map back
//! and verifying it; `nft -f`'s includes starting the process and parsing the script, which is
//! what a daemon shelling out to nft would pay. `scripts/bench` reads its `BENCH` lines.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use holepunch::model::{Endpoint, Protocol};
use holepunch::nft::{Forward, NftFirewall, Ruleset};

const NAMESPACE: &str = "hpf-bench";
const CLIENT_NAMESPACE: &str = "hpf-benchc";
const RELAY_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const RELAY_PORT: u16 = 30_000;
const SERVER_PORT: u16 = 8080;
const RATE_SECS: f64 = 1.5;
const DEFAULT_COUNT: usize = 10_000;
const ROUNDS: usize = 5;
const LAN_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
/// The client plays the router: the relay DNAT catches what comes from it (README.md,
/// "Security model: traffic and the router").
const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// Deletes the namespaces when dropped, also on an early return.
struct Namespaces;

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [NAMESPACE, CLIENT_NAMESPACE] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn ip(args: &[&str]) -> Result<(), BoxError> {
    if Command::new("ip").args(args).status()?.success() {
        Ok(())
    } else {
        Err(format!("ip {} failed (run as root)", args.join(" ")).into())
    }
}

fn join_namespace(ns: &str) -> std::io::Result<()> {
    let file = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: `file` is an open namespace file; only the calling thread's network namespace
    // changes (children it starts later inherit it).
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connections per second from the client namespace to the relay port, one at a time.
fn connection_rate() -> Result<f64, BoxError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<f64, BoxError> {
                join_namespace(CLIENT_NAMESPACE)?;
                let target = SocketAddr::from((RELAY_ADDRESS, RELAY_PORT));
                let started = Instant::now();
                let mut count = 0u64;
                while started.elapsed().as_secs_f64() < RATE_SECS {
                    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
                    // Wait for the server's close: the connection went end to end.
                    let mut byte = [0u8; 1];
                    if stream.read(&mut byte)? != 0 {
                        return Err("the server sent data instead of closing".into());
                    }
                    count += 1;
                }
                Ok(count as f64 / started.elapsed().as_secs_f64())
            })
            .join()
            .map_err(|_| BoxError::from("client thread panicked"))?
    })
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
         meta nfproto ipv4 iifname \"bs0\" ip saddr != 10.99.0.0 ip saddr != 10.99.0.2-10.99.0.255 \
         ip saddr != 192.168.77.0-192.168.77.255 \
         ct mark set ct mark | {mark:#x} dnat ip to ip daddr . meta l4proto . th dport map @targets4\n  }}\n  \
         chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ct mark & {mark:#x} != 0 masquerade\n  }}\n}}\n"
    ));
    script
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() -> Result<(), BoxError> {
    let count = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => DEFAULT_COUNT,
    };
    for ns in [NAMESPACE, CLIENT_NAMESPACE] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        ip(&["netns", "add", ns])?;
    }
    let _cleanup = Namespaces;
    ip(&[
        "link",
        "add",
        "bc0",
        "netns",
        CLIENT_NAMESPACE,
        "type",
        "veth",
        "peer",
        "name",
        "bs0",
        "netns",
        NAMESPACE,
    ])?;
    ip(&[
        "-n",
        CLIENT_NAMESPACE,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        "bc0",
    ])?;
    ip(&["-n", NAMESPACE, "addr", "add", "10.99.0.2/24", "dev", "bs0"])?;
    // The relay address of the 10,000-forward ruleset must be on an interface to be applied.
    ip(&[
        "-n",
        NAMESPACE,
        "addr",
        "add",
        "192.168.77.10/24",
        "dev",
        "bs0",
    ])?;
    for (ns, link) in [
        (CLIENT_NAMESPACE, "lo"),
        (CLIENT_NAMESPACE, "bc0"),
        (NAMESPACE, "lo"),
        (NAMESPACE, "bs0"),
    ] {
        ip(&["-n", ns, "link", "set", link, "up"])?;
    }
    // The main thread works in the relay namespace; `nft` children inherit it.
    join_namespace(NAMESPACE)?;

    let forwards = forwards(count);
    let ruleset = Ruleset::Relay {
        lan_address: LAN_ADDRESS,
        router: Some(CLIENT_ADDRESS),
        forwards: forwards.clone(),
        ipv6: None,
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
    // For scripts/bench: `BENCH <key>\t<value>\t<unit>`.
    println!("BENCH nft_forwards\t{count}\tforwards");
    println!("BENCH nft_apply_ms\t{:.3}\tms", ours.as_secs_f64() * 1e3);
    println!("BENCH nft_f_ms\t{:.3}\tms", theirs.as_secs_f64() * 1e3);

    // New connections through the DNAT to a server that accepts and closes at once.
    let listener = TcpListener::bind((RELAY_ADDRESS, SERVER_PORT))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let mapped = Forward {
        protocol: Protocol::Tcp,
        port: RELAY_PORT,
        target: Endpoint::new(RELAY_ADDRESS, SERVER_PORT),
    };
    let one = Ruleset::Relay {
        lan_address: RELAY_ADDRESS,
        router: Some(CLIENT_ADDRESS),
        forwards: vec![mapped],
        ipv6: None,
    };
    let mut others: Vec<Forward> = forwards
        .into_iter()
        .filter(|f| !(f.protocol == Protocol::Tcp && f.port == RELAY_PORT))
        .collect();
    others.truncate(count.saturating_sub(1));
    others.push(mapped);
    let many = Ruleset::Relay {
        lan_address: RELAY_ADDRESS,
        router: Some(CLIENT_ADDRESS),
        forwards: others,
        ipv6: None,
    };
    let (mut with_one, mut with_many) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        firewall.apply(&one)?;
        with_one.push(connection_rate()?);
        firewall.apply(&many)?;
        with_many.push(connection_rate()?);
    }
    let median_rate = |mut rates: Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (with_one, with_many) = (median_rate(with_one), median_rate(with_many));
    println!(
        "new TCP connections/s, 1 forward:     {with_one:>8.0} (median of {ROUNDS} x {RATE_SECS} s)"
    );
    println!("new TCP connections/s, {count} forwards: {with_many:>8.0}");
    println!(
        "ratio {count} forwards / 1 forward:    {:>8.3} (goal >= 0.95)",
        with_many / with_one
    );
    println!("BENCH conn_rate_1\t{with_one:.1}\tconn/s");
    println!("BENCH conn_rate_many\t{with_many:.1}\tconn/s");
    Ok(())
}
