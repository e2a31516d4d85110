//! Facts about the holepunch host, gathered at the edge for the pure trust rules
//! ([`crate::trust::HostFacts`]): its interface addresses (getifaddrs) and the ports its
//! sockets listen on (`/proc/net/{tcp,tcp6,udp,udp6}`, in the daemon's own network namespace).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::Protocol;
use crate::trust::HostFacts;

/// Why a fact about the host could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot list this host's interface addresses (getifaddrs)")]
    ListAddresses(#[source] std::io::Error),
}

/// TCP state `LISTEN` as `/proc/net/tcp` writes it (include/net/tcp_states.h: TCP_LISTEN = 10).
const TCP_LISTEN_STATE: &str = "0A";

/// Everything the trust rules need to know about this host and the router: this host's
/// facts ([`gather`]), the router's LAN address `gateway`, and the external addresses the
/// state recorded. If this host's addresses cannot be listed, the router's are still known
/// and the error is logged.
pub fn facts(gateway: Option<Ipv4Addr>, state: &crate::state::State) -> HostFacts {
    facts_with(gateway, state, Listeners::Read)
}

/// Whether [`gather`] reads the ports this host listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listeners {
    Read,
    /// Left empty: nothing will read them. Reading `/proc/net/tcp` and `tcp6` walks the
    /// kernel's whole TCP hash table, whatever the namespace holds: 2-15 ms on every pass
    /// (README.md, "Benchmarks").
    Skip,
}

/// [`facts`] for a pass in `mode`: the listening ports only where the desired state reads
/// them ([`crate::desired::shadows_host_listeners`]).
pub fn facts_for(
    mode: crate::config::ExposureMode,
    gateway: Option<Ipv4Addr>,
    state: &crate::state::State,
) -> HostFacts {
    let listeners = if crate::desired::shadows_host_listeners(mode) {
        Listeners::Read
    } else {
        Listeners::Skip
    };
    facts_with(gateway, state, listeners)
}

fn facts_with(
    gateway: Option<Ipv4Addr>,
    state: &crate::state::State,
    listeners: Listeners,
) -> HostFacts {
    gather(listeners)
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "this host's own addresses are unknown; only the router's are refused as targets");
            HostFacts::default()
        })
        .with_router(gateway, state)
}

/// This host's addresses and (unless skipped) listening ports. A `/proc/net` file that
/// cannot be read counts as no listener (logged): the other rules still hold.
pub fn gather(read: Listeners) -> Result<HostFacts, HostError> {
    let (own_addresses, broadcast_addresses) = interface_addresses()?;
    let mut listening = BTreeSet::new();
    let tables = match read {
        Listeners::Read => &[
            ("/proc/net/tcp", Protocol::Tcp),
            ("/proc/net/tcp6", Protocol::Tcp),
            ("/proc/net/udp", Protocol::Udp),
            ("/proc/net/udp6", Protocol::Udp),
        ][..],
        Listeners::Skip => &[],
    };
    for &(file, protocol) in tables {
        match std::fs::read_to_string(file) {
            Ok(table) => listening.extend(
                listeners(&table, protocol, &own_addresses)
                    .into_iter()
                    .map(|port| (protocol, port)),
            ),
            Err(e) => tracing::debug!(file, error = %e, "cannot read the host's sockets"),
        }
    }
    Ok(HostFacts {
        own_addresses,
        broadcast_addresses,
        router_addresses: BTreeSet::new(),
        listening,
    })
}

/// Every interface address, and every broadcast address, of this host.
fn interface_addresses() -> Result<(BTreeSet<IpAddr>, BTreeSet<IpAddr>), HostError> {
    let mut own = BTreeSet::new();
    let mut broadcast = BTreeSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(HostError::ListAddresses(std::io::Error::last_os_error()));
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        let address = socket_address(ifa.ifa_addr);
        if let Some(address) = address {
            own.insert(address);
        }
        // The directed broadcast, from the address and its netmask (ifa_broadaddr is not
        // reliable: glibc fills it from IFA_ADDRESS when the kernel reports no broadcast).
        if let (Some(IpAddr::V4(address)), Some(IpAddr::V4(mask))) =
            (address, socket_address(ifa.ifa_netmask))
            && let Some(directed) = directed_broadcast(address, mask)
        {
            broadcast.insert(IpAddr::V4(directed));
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok((own, broadcast))
}

/// The broadcast address of `address`'s network; `None` for /31 and /32 (RFC 3021: no
/// broadcast there).
pub fn directed_broadcast(address: Ipv4Addr, mask: Ipv4Addr) -> Option<Ipv4Addr> {
    let mask = u32::from(mask);
    (mask.leading_ones() < 31).then(|| Ipv4Addr::from(u32::from(address) | !mask))
}

/// The IP address in a `sockaddr`, if it is IPv4 or IPv6.
fn socket_address(address: *const libc::sockaddr) -> Option<IpAddr> {
    if address.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr from getifaddrs; its family says which struct it is.
    unsafe {
        match i32::from((*address).sa_family) {
            libc::AF_INET => {
                let v4 = &*(address as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*(address as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

/// The local ports of the sockets in a `/proc/net/{tcp,udp}[6]` table that listen where the
/// router's forwarded traffic arrives: on the wildcard address or on one of `own` that is not
/// loopback. TCP: sockets in LISTEN; UDP: unconnected sockets (remote port 0).
pub fn listeners(table: &str, protocol: Protocol, own: &BTreeSet<IpAddr>) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            let (address, port) = proc_endpoint(local)?;
            let (_, remote_port) = proc_endpoint(remote)?;
            let listening = match protocol {
                Protocol::Tcp => *state == TCP_LISTEN_STATE,
                Protocol::Udp => remote_port == 0,
            };
            let reachable =
                address.is_unspecified() || (!address.is_loopback() && own.contains(&address));
            (listening && reachable && port != 0).then_some(port)
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:port` (IPv6), as the kernel prints them: the
/// address in host byte order per 32-bit word (little-endian on every platform holepunch
/// ships for), the port in hex. IPv4-mapped IPv6 addresses come back as IPv4.
fn proc_endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..address.len() / 8)
        .map(|i| {
            address
                .get(i * 8..i * 8 + 8)
                .and_then(|w| u32::from_str_radix(w, 16).ok())
        })
        .collect::<Option<_>>()?;
    let address = match words.as_slice() {
        [word] if address.len() == 8 => IpAddr::V4(Ipv4Addr::from(word.swap_bytes())),
        [a, b, c, d] if address.len() == 32 => {
            let mut octets = [0u8; 16];
            for (i, word) in [a, b, c, d].into_iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            let v6 = Ipv6Addr::from(octets);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some((address, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0A01A8C0:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
   3: 1401A8C0:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
   4: 0A01A8C0:A5C2 1401A8C0:0050 01 00000000:00000000 00:00000000 00000000     0        0 5 1 0000000000000000 100 0 0 10 0
";

    const TCP6: &str =
        "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 0
   1: 0000000000000000FFFF00000A01A8C0:2328 00000000000000000000000000000000:0000 0A 0
   2: 00000000000000000000000001000000:2329 00000000000000000000000000000000:0000 0A 0
";

    const UDP: &str = "  sl  local_address rem_address   st
   0: 00000000:12B5 00000000:0000 07 0
   1: 0A01A8C0:9C40 0101A8C0:14EB 01 0
";

    fn own() -> BTreeSet<IpAddr> {
        ["127.0.0.1", "192.168.1.10", "::1"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    #[test]
    fn tcp_listeners_on_the_wildcard_and_the_lan_address_count() {
        // 9090 (wildcard) and 22 (192.168.1.10) count; 8080 on loopback, 80 on another
        // host's address and an established connection do not.
        assert_eq!(
            listeners(TCP, Protocol::Tcp, &own())
                .into_iter()
                .collect::<Vec<_>>(),
            [22, 9090]
        );
    }

    #[test]
    fn tcp6_wildcard_and_mapped_addresses_count_loopback_does_not() {
        assert_eq!(
            listeners(TCP6, Protocol::Tcp, &own())
                .into_iter()
                .collect::<Vec<_>>(),
            [8000, 9000]
        );
    }

    #[test]
    fn unconnected_udp_sockets_count_connected_ones_do_not() {
        // 4789 (VXLAN on the wildcard) counts; the PCP client's connected socket does not.
        assert_eq!(
            listeners(UDP, Protocol::Udp, &own())
                .into_iter()
                .collect::<Vec<_>>(),
            [4789]
        );
    }

    #[test]
    fn directed_broadcast_of_a_network_but_not_of_a_31_or_32() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("test address");
        assert_eq!(
            directed_broadcast(ip("192.168.77.10"), ip("255.255.255.0")),
            Some(ip("192.168.77.255"))
        );
        assert_eq!(
            directed_broadcast(ip("10.1.2.3"), ip("255.255.0.0")),
            Some(ip("10.1.255.255"))
        );
        assert_eq!(
            directed_broadcast(ip("10.0.0.0"), ip("255.255.255.254")),
            None
        );
        assert_eq!(
            directed_broadcast(ip("10.0.0.1"), ip("255.255.255.255")),
            None
        );
    }

    #[test]
    fn gather_reads_this_host() {
        let facts = gather(Listeners::Read).expect("getifaddrs works in tests");
        assert!(
            facts
                .own_addresses
                .contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{:?}",
            facts.own_addresses
        );
    }

    #[test]
    fn listeners_are_read_only_where_a_mapping_could_shadow_them() {
        use crate::config::ExposureMode;
        // A listener of this test process on every address, as a host service would be.
        let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let state = crate::state::State::default();
        for mode in [ExposureMode::Relay, ExposureMode::Gateway] {
            let facts = facts_for(mode, None, &state);
            assert!(facts.listening.contains(&(Protocol::Tcp, port)), "{mode:?}");
        }
        let direct = facts_for(ExposureMode::Direct, None, &state);
        assert!(direct.listening.is_empty(), "{:?}", direct.listening);
        assert!(
            direct
                .own_addresses
                .contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "the addresses are still read"
        );
    }
}
