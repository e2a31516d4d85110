//! Finding the router: the next hop of the default route (from the kernel's routing table),
//! and this host's source address toward it (the address the router must forward to in
//! `relay` mode, and the one PCP requires in its client-IP field).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

/// Why the router or the LAN address could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot read the routing table {path}: {source}")]
    ReadRoutes {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no IPv4 default route: set router.address in the config file to the router's LAN address"
    )]
    NoDefaultRoute,
    #[error("cannot find this host's address toward {gateway}: {source}; set exposure.lan_address")]
    SourceAddress {
        gateway: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
}

const PROC_ROUTE: &str = "/proc/net/route";

/// The next hop of the IPv4 default route with the lowest metric.
pub fn default_gateway() -> Result<Ipv4Addr, DiscoverError> {
    let table =
        std::fs::read_to_string(PROC_ROUTE).map_err(|source| DiscoverError::ReadRoutes {
            path: PROC_ROUTE,
            source,
        })?;
    parse_default_gateway(&table).ok_or(DiscoverError::NoDefaultRoute)
}

/// Parses `/proc/net/route`: whitespace-separated columns, addresses as host-order hex of
/// the little-endian in-memory value.
pub fn parse_default_gateway(table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let destination = u32::from_str_radix(fields.get(1)?, 16).ok()?;
            let gateway = u32::from_str_radix(fields.get(2)?, 16).ok()?;
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let metric: u32 = fields.get(6)?.parse().ok()?;
            let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?;
            let is_default = destination == 0
                && mask == 0
                && flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY;
            is_default.then(|| (metric, Ipv4Addr::from(gateway.to_ne_bytes())))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gateway)| gateway)
}

/// This host's source address toward `gateway`. Connecting a UDP socket sends nothing; it
/// only asks the kernel which route and address it would use.
pub fn source_address_toward(gateway: Ipv4Addr) -> Result<Ipv4Addr, DiscoverError> {
    let error = |source| DiscoverError::SourceAddress { gateway, source };
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).map_err(error)?;
    socket
        .connect(SocketAddrV4::new(gateway, 9))
        .map_err(error)?;
    match socket.local_addr().map_err(error)? {
        std::net::SocketAddr::V4(addr) => Ok(*addr.ip()),
        std::net::SocketAddr::V6(_) => {
            Err(error(std::io::Error::other("got an IPv6 source address")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_default_route_with_the_lowest_metric() {
        let table = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
wlan0\t00000000\t01FEA8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
";
        assert_eq!(
            parse_default_gateway(table),
            Some(Ipv4Addr::new(192, 168, 254, 1))
        );
    }

    #[test]
    fn no_default_route_and_garbage_give_none() {
        assert_eq!(parse_default_gateway(""), None);
        assert_eq!(parse_default_gateway("header\neth0 zz yy\n"), None);
        let only_lan = "h\neth0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_default_gateway(only_lan), None);
    }

    #[test]
    fn source_address_toward_loopback_is_loopback() {
        assert_eq!(
            source_address_toward(Ipv4Addr::LOCALHOST).ok(),
            Some(Ipv4Addr::LOCALHOST)
        );
    }
}
