//! The floating address (`holepunch::ha::address`) in network namespaces (lab tier, prefix
//! `hpi-`): three hosts on one bridge (`hpi-br`), the address moves from host A to host B,
//! and host C's neighbour cache follows B's gratuitous ARP without C sending anything. A
//! stale floating address left on a restarted host is removed at start.
//!
//! The address code runs in-process, on a thread moved into the host's namespace with
//! setns(2): rtnetlink and AF_PACKET sockets belong to the namespace of the thread that opens
//! them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use holepunch::ha::address::{ANNOUNCE_COUNT, ANNOUNCE_INTERVAL_SECS, FloatingAddress};

const PREFIX: &str = "hpi-";
const FLOATING: &str = "192.168.99.250/24";
const FLOATING_IP: &str = "192.168.99.250";
const HOSTS: [(&str, &str, &str); 3] = [
    ("a", "192.168.99.11/24", "02:00:00:00:99:0a"),
    ("b", "192.168.99.12/24", "02:00:00:00:99:0b"),
    ("c", "192.168.99.13/24", "02:00:00:00:99:0c"),
];

fn ns(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(host: &str, args: &[&str]) -> String {
    let namespace = ns(host);
    let mut all = vec!["ip", "-n", namespace.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

/// The lab's namespaces; removed on drop. Holds the `hpi-` lock (a file lock in
/// /run/holepunch-lab, as the other labs) so that two runs take turns.
struct Bridge {
    _lock: File,
}

impl Bridge {
    fn up() -> Bridge {
        let uid = run(&["id", "-u"]);
        assert_eq!(
            uid.trim(),
            "0",
            "the HA lab needs root (network namespaces): run it with `sudo make test`"
        );
        let dir = Path::new("/run/holepunch-lab");
        std::fs::create_dir_all(dir).expect("create /run/holepunch-lab");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{PREFIX}.lock")))
            .expect("open the lab lock");
        lock.lock().expect("take the lab lock");
        let bridge = Bridge { _lock: lock };
        bridge.down();
        for name in ["br", "a", "b", "c"] {
            run(&["ip", "netns", "add", &ns(name)]);
            ip(name, &["link", "set", "lo", "up"]);
        }
        ip("br", &["link", "add", "br0", "type", "bridge"]);
        ip("br", &["link", "set", "br0", "up"]);
        for (host, address, mac) in HOSTS {
            let port = format!("v{host}");
            let peer_ns = ns(host);
            // Created inside the lab namespaces only: the bridge side in hpi-br, the host
            // side moved straight into the host's namespace.
            ip(
                "br",
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &peer_ns,
                ],
            );
            ip("br", &["link", "set", &port, "master", "br0", "up"]);
            ip(host, &["link", "set", "eth0", "address", mac]);
            ip(host, &["address", "add", address, "dev", "eth0"]);
            ip(host, &["link", "set", "eth0", "up"]);
        }
        bridge
    }

    fn down(&self) {
        for name in ["a", "b", "c", "br"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns(name)])
                .output();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.down();
    }
}

/// Runs `f` on a thread inside the namespace of `host`.
fn in_host<T: Send + 'static>(host: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns(host));
    std::thread::spawn(move || {
        let netns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on a valid namespace fd; it moves only this thread.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread did not panic")
}

fn floating() -> FloatingAddress {
    FloatingAddress::new(FLOATING.parse().expect("test address"), Some("eth0"))
        .expect("an explicit interface")
}

fn has_floating(host: &str) -> bool {
    ip(host, &["-4", "address", "show", "dev", "eth0"]).contains(&format!("{FLOATING_IP}/24"))
}

/// Host C's neighbour entry for the floating address ("" when none).
fn neighbour_of_c() -> String {
    ip("c", &["neigh", "show", FLOATING_IP, "dev", "eth0"])
}

/// Host C sends a datagram to the floating address; `holder` listens on it. Returns what the
/// holder received.
fn udp_from_c_reaches(holder: &'static str) -> String {
    use std::net::UdpSocket;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = std::thread::spawn(move || {
        in_host(holder, move || {
            let socket = UdpSocket::bind((FLOATING_IP, 9999)).expect("bind the floating address");
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            ready_tx.send(()).expect("signal ready");
            let mut buffer = [0u8; 64];
            let (n, _) = socket.recv_from(&mut buffer).expect("a datagram from C");
            String::from_utf8_lossy(&buffer[..n]).into_owned()
        })
    });
    ready_rx.recv().expect("listener ready");
    let text = format!("hello {holder}");
    in_host("c", move || {
        let socket = UdpSocket::bind(("0.0.0.0", 0)).expect("bind in C");
        for _ in 0..3 {
            socket
                .send_to(text.as_bytes(), (FLOATING_IP, 9999))
                .expect("send from C");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    listener.join().expect("listener thread")
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn floating_address_moves_and_the_neighbours_follow_the_announcement() {
    let _bridge = Bridge::up();
    let (_, _, mac_a) = HOSTS[0];
    let (_, _, mac_b) = HOSTS[1];

    // B restarted while it still had the address from an earlier term: at start it removes
    // what it has no right to; a second removal finds nothing.
    ip("b", &["address", "add", FLOATING, "dev", "eth0"]);
    assert!(has_floating("b"));
    let (first, second) = in_host("b", || (floating().remove(), floating().remove()));
    assert!(first.expect("remove the stale address"), "it was there");
    assert!(!second.expect("removing an absent address is fine"), "gone");
    assert!(!has_floating("b"));

    // A may act: it adds and announces the address. Adding twice is not an error.
    let (added, again, announced) = in_host("a", || {
        (floating().add(), floating().add(), floating().announce())
    });
    assert!(added.expect("add"), "it was new");
    assert!(!again.expect("add again"), "already there");
    announced.expect("announce (CAP_NET_RAW)");
    assert!(has_floating("a"));

    // C talks to the floating address: its neighbour cache learns A's MAC.
    assert_eq!(udp_from_c_reaches("a"), "hello a");
    let entry = neighbour_of_c();
    assert!(entry.contains(mac_a), "C's entry: {entry}");

    // Handover: A stops acting and removes the address; B adds it and announces it.
    // C sends nothing in between, so only the announcement can update its cache.
    assert!(in_host("a", || floating().remove()).expect("remove from A"));
    assert!(!has_floating("a"));
    assert!(in_host("b", || floating().add()).expect("add on B"));
    // Adding the address told C nothing: its entry still names A.
    let entry = neighbour_of_c();
    assert!(entry.contains(mac_a), "before the announcement: {entry}");
    let moved_at = Instant::now();
    let mut followed = None;
    for round in 0..ANNOUNCE_COUNT {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(ANNOUNCE_INTERVAL_SECS));
        }
        in_host("b", || floating().announce()).expect("announce from B");
        std::thread::sleep(Duration::from_millis(100));
        if neighbour_of_c().contains(mac_b) {
            followed = Some((round + 1, moved_at.elapsed()));
            break;
        }
    }
    let entry = neighbour_of_c();
    let (announcements, took) =
        followed.unwrap_or_else(|| panic!("C's entry did not follow the announcements: {entry}"));
    println!(
        "C's neighbour entry followed after {announcements} announcement(s), {} ms",
        took.as_millis()
    );
    println!("BENCH ha_garp_neighbour_follow\t{}\tms", took.as_millis());
    assert!(!entry.contains(mac_a), "{entry}");

    // And traffic from C now reaches B on the floating address.
    assert_eq!(udp_from_c_reaches("b"), "hello b");
    assert!(neighbour_of_c().contains(mac_b));

    // A's interface that does not exist is a clear error, not a panic.
    let missing = in_host("a", || {
        FloatingAddress::new(FLOATING.parse().expect("test address"), Some("nope0"))
            .expect("explicit interface")
            .add()
    });
    let message = missing.expect_err("no such interface").to_string();
    assert!(message.contains("set ha.interface"), "{message}");
}
