//! The LAN side of the relay host, for the relay DNAT's narrow match (README.md, "Security
//! model: traffic and the router"): the interface that holds the relay address (where the
//! router's forwards arrive) and the sources on it that are not the router, which the DNAT
//! must leave alone so that LAN hosts keep reaching what listens on this host.
//!
//! [`LanSide::find`] reads the interface and its IPv4 prefixes with getifaddrs(3) (netlink in
//! the calling thread's network namespace); [`excluded_sources`] is the pure rest.

use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The relay host's interface toward the router, and its IPv4 prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LanSide {
    pub(crate) interface: String,
    pub(crate) prefixes: Vec<Ipv4Net>,
}

/// One address of one interface, as getifaddrs(3) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InterfaceAddress {
    pub(crate) interface: String,
    pub(crate) address: Ipv4Addr,
    pub(crate) netmask: Ipv4Addr,
}

impl LanSide {
    /// The interface holding `address` and all its IPv4 prefixes; `None` when no interface
    /// holds it.
    pub(crate) fn from_addresses(
        address: Ipv4Addr,
        addresses: &[InterfaceAddress],
    ) -> Option<LanSide> {
        let interface = &addresses.iter().find(|a| a.address == address)?.interface;
        let mut prefixes: Vec<Ipv4Net> = addresses
            .iter()
            .filter(|a| &a.interface == interface)
            .filter_map(|a| Ipv4Net::with_netmask(a.address, a.netmask).ok())
            .map(|net| net.trunc())
            .collect();
        prefixes.sort();
        prefixes.dedup();
        Some(LanSide {
            interface: interface.clone(),
            prefixes,
        })
    }

    /// [`LanSide::from_addresses`] over this host's (this thread's namespace's) addresses.
    pub(crate) fn find(address: Ipv4Addr) -> io::Result<Option<LanSide>> {
        Ok(LanSide::from_addresses(address, &interface_addresses()?))
    }
}

/// The IPv4 addresses of every interface, from getifaddrs(3).
fn interface_addresses() -> io::Result<Vec<InterfaceAddress>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocates into `list`; it is freed
    // below with freeifaddrs, once, after the last read.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, live until freeifaddrs.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its type.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: both are AF_INET sockaddrs (the netmask has the address's family), so they
        // are sockaddr_in; ifa_name is a NUL-terminated string.
        let (address, netmask, name) = unsafe {
            let address = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
            let netmask = &*ifa.ifa_netmask.cast::<libc::sockaddr_in>();
            (
                Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)),
                Ipv4Addr::from(u32::from_be(netmask.sin_addr.s_addr)),
                CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned(),
            )
        };
        out.push(InterfaceAddress {
            interface: name,
            address,
            netmask,
        });
    }
    // SAFETY: allocated by getifaddrs above; not used after this.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The source addresses the relay DNAT must not catch, as disjoint inclusive ranges in
/// order: every address of `prefixes` (the LAN hosts beside this one) except `router`,
/// whose forwards (and hairpinned LAN traffic it NATs to its own address) are what the
/// DNAT is for.
pub(crate) fn excluded_sources(
    prefixes: &[Ipv4Net],
    router: Option<Ipv4Addr>,
) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let mut ranges: Vec<(u32, u32)> = prefixes
        .iter()
        .map(|net| (u32::from(net.network()), u32::from(net.broadcast())))
        .collect();
    ranges.sort();
    // Merge overlapping or touching prefixes.
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (from, to) in ranges {
        match merged.last_mut() {
            Some(last) if from <= last.1.saturating_add(1) => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    // Cut the router out of the range that holds it.
    if let Some(router) = router.map(u32::from) {
        merged = merged
            .into_iter()
            .flat_map(|(from, to)| {
                if router < from || router > to {
                    return vec![(from, to)];
                }
                let mut parts = Vec::new();
                if router > from {
                    parts.push((from, router - 1));
                }
                if router < to {
                    parts.push((router + 1, to));
                }
                parts
            })
            .collect();
    }
    merged
        .into_iter()
        .map(|(from, to)| (Ipv4Addr::from(from), Ipv4Addr::from(to)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    fn range(from: &str, to: &str) -> (Ipv4Addr, Ipv4Addr) {
        (ip(from), ip(to))
    }

    #[test]
    fn the_router_is_cut_out_of_its_prefix() {
        let lan = [net("192.168.77.0/24")];
        assert_eq!(
            excluded_sources(&lan, Some(ip("192.168.77.1"))),
            [
                range("192.168.77.0", "192.168.77.0"),
                range("192.168.77.2", "192.168.77.255")
            ]
        );
        // At either end of the prefix, one range is left.
        assert_eq!(
            excluded_sources(&lan, Some(ip("192.168.77.0"))),
            [range("192.168.77.1", "192.168.77.255")]
        );
        assert_eq!(
            excluded_sources(&lan, Some(ip("192.168.77.255"))),
            [range("192.168.77.0", "192.168.77.254")]
        );
        // A router outside the prefix, or none known: the whole prefix.
        for router in [Some(ip("10.0.0.1")), None] {
            assert_eq!(
                excluded_sources(&lan, router),
                [range("192.168.77.0", "192.168.77.255")]
            );
        }
    }

    #[test]
    fn several_prefixes_merge_and_stay_apart() {
        let prefixes = [
            net("10.1.0.0/16"),
            net("192.168.77.0/25"),
            net("192.168.77.128/25"),
            net("10.1.2.0/24"),
        ];
        assert_eq!(
            excluded_sources(&prefixes, Some(ip("192.168.77.1"))),
            [
                range("10.1.0.0", "10.1.255.255"),
                range("192.168.77.0", "192.168.77.0"),
                range("192.168.77.2", "192.168.77.255"),
            ]
        );
        // A /32 on its own is one address; 0.0.0.0/0 every address but the router.
        assert_eq!(
            excluded_sources(&[net("192.168.77.10/32")], None),
            [range("192.168.77.10", "192.168.77.10")]
        );
        assert_eq!(
            excluded_sources(&[net("0.0.0.0/0")], Some(ip("0.0.0.0"))),
            [range("0.0.0.1", "255.255.255.255")]
        );
        assert!(excluded_sources(&[], Some(ip("192.168.77.1"))).is_empty());
    }

    #[test]
    fn the_interface_is_the_one_holding_the_address_with_all_its_prefixes() {
        let entry = |interface: &str, address: &str, netmask: &str| InterfaceAddress {
            interface: interface.to_owned(),
            address: ip(address),
            netmask: ip(netmask),
        };
        let addresses = [
            entry("lo", "127.0.0.1", "255.0.0.0"),
            entry("cni0", "10.244.0.1", "255.255.255.0"),
            entry("lan0", "192.168.77.10", "255.255.255.0"),
            entry("lan0", "192.168.77.11", "255.255.255.0"),
            entry("lan0", "172.16.5.9", "255.255.0.0"),
        ];
        assert_eq!(
            LanSide::from_addresses(ip("192.168.77.11"), &addresses),
            Some(LanSide {
                interface: "lan0".into(),
                prefixes: vec![net("172.16.0.0/16"), net("192.168.77.0/24")],
            })
        );
        assert_eq!(
            LanSide::from_addresses(ip("192.168.77.99"), &addresses),
            None
        );
    }

    #[test]
    fn this_host_has_loopback() {
        let lo = LanSide::find(Ipv4Addr::LOCALHOST).unwrap().unwrap();
        assert_eq!(lo.interface, "lo");
        assert!(lo.prefixes.contains(&net("127.0.0.0/8")), "{lo:?}");
    }
}
