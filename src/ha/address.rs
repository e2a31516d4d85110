//! The floating relay address (`ha.address` on `ha.interface`): added by the host that may
//! act, announced with gratuitous ARP so that the router's neighbour cache follows at once,
//! removed when the host stops acting, and removed at start when this host has no right to it
//! (README.md, "High availability").
//!
//! Adding and removing go through rtnetlink (`RTM_NEWADDR` / `RTM_DELADDR`, rtnetlink(7)),
//! which needs `CAP_NET_ADMIN`; the announcement is an ARP packet on an `AF_PACKET` socket
//! (packet(7)), which needs `CAP_NET_RAW`. Both act in the calling thread's network namespace.
//! The messages are built and the answers decoded in safe Rust (unit tested without a
//! kernel); only the socket calls are `unsafe`.

use std::ffi::{CString, c_void};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ipnet::Ipv4Net;

/// RFC 5227 section 1.1: ANNOUNCE_NUM announcements, ANNOUNCE_INTERVAL apart.
pub const ANNOUNCE_COUNT: u32 = 2;
pub const ANNOUNCE_INTERVAL_SECS: u64 = 2;

const PROC_ROUTE: &str = "/proc/net/route";

// NOTE: linux/netlink.h and linux/rtnetlink.h values.
const NLMSG_HEADER_BYTES: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
/// linux/if_addr.h: `IFA_ADDRESS` (the peer, equal to the local address on a broadcast
/// link) and `IFA_LOCAL`.
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFADDRMSG_BYTES: usize = 8;
const RT_SCOPE_UNIVERSE: u8 = 0;
const ACK_BUFFER_BYTES: usize = 8192;

// NOTE: RFC 826 ARP over Ethernet: hardware type 1, protocol IPv4 (0x0800), 6- and 4-byte
// addresses; RFC 5227 section 2.3: an announcement is a request whose sender and target
// protocol addresses are both the announced address, target hardware address zero.
const ARP_PACKET_BYTES: usize = 28;
const ARPHRD_ETHER: u16 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ARPOP_REQUEST: u16 = 1;
const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Why the floating address could not be handled. The OS error is the source.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error(
        "cannot read the routing table {PROC_ROUTE} to find the default route's interface; set ha.interface"
    )]
    ReadRoutes {
        #[source]
        source: io::Error,
    },
    #[error("no IPv4 default route to take the interface from; set ha.interface")]
    NoDefaultRoute,
    #[error(
        "there is no interface {name:?} for the floating address; set ha.interface to one `ip link` shows"
    )]
    Interface {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a netlink socket to change addresses")]
    OpenNetlink {
        #[source]
        source: io::Error,
    },
    #[error(
        "the kernel refused to add {address} to {interface}; holepunch needs CAP_NET_ADMIN for the floating address"
    )]
    Add {
        address: Ipv4Net,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the kernel refused to remove {address} from {interface}; remove it by hand (`ip address del {address} dev {interface}`) before another host takes it"
    )]
    Remove {
        address: Ipv4Net,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot announce {address} on {interface} (gratuitous ARP); holepunch needs CAP_NET_RAW for it, or the router finds the new host only when its ARP entry expires"
    )]
    Announce {
        address: Ipv4Addr,
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// The interface of the IPv4 default route with the lowest metric, from `/proc/net/route`.
pub fn default_route_interface() -> Result<String, AddressError> {
    let table = std::fs::read_to_string(PROC_ROUTE)
        .map_err(|source| AddressError::ReadRoutes { source })?;
    parse_default_interface(&table).ok_or(AddressError::NoDefaultRoute)
}

/// The interface column of the default route with the lowest metric.
pub fn parse_default_interface(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let destination = u32::from_str_radix(fields.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?;
            let metric: u32 = fields.get(6)?.parse().ok()?;
            (destination == 0 && mask == 0).then(|| (metric, fields[0].to_owned()))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, name)| name)
}

/// An `RTM_NEWADDR` (add, refused if present) or `RTM_DELADDR` request for `address` on the
/// interface `index`, asking for an acknowledgement.
pub fn address_message(add: bool, sequence: u32, index: u32, address: Ipv4Net) -> Vec<u8> {
    let (kind, flags) = if add {
        (
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK)
    };
    let mut body = Vec::with_capacity(IFADDRMSG_BYTES + 16);
    // struct ifaddrmsg: family, prefix length, flags, scope, interface index.
    body.push(libc::AF_INET as u8);
    body.push(address.prefix_len());
    body.push(0);
    body.push(RT_SCOPE_UNIVERSE);
    body.extend_from_slice(&index.to_ne_bytes());
    for attribute in [IFA_LOCAL, IFA_ADDRESS] {
        // struct rtattr: length (header + 4 bytes of address, already aligned), type.
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&attribute.to_ne_bytes());
        body.extend_from_slice(&address.addr().octets());
    }
    let length = u32::try_from(NLMSG_HEADER_BYTES + body.len()).unwrap_or(u32::MAX);
    let mut message = Vec::with_capacity(NLMSG_HEADER_BYTES + body.len());
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&body);
    message
}

/// The errno of the acknowledgement for `sequence` in `buffer` (0: success), if there is one.
pub fn acknowledgement(buffer: &[u8], sequence: u32) -> Option<i32> {
    let mut rest = buffer;
    while rest.len() >= NLMSG_HEADER_BYTES {
        let length = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        if length < NLMSG_HEADER_BYTES || length > rest.len() {
            return None;
        }
        if kind == NLMSG_ERROR && seq == sequence && length >= NLMSG_HEADER_BYTES + 4 {
            let error = i32::from_ne_bytes(
                rest[NLMSG_HEADER_BYTES..NLMSG_HEADER_BYTES + 4]
                    .try_into()
                    .ok()?,
            );
            return Some(-error);
        }
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        let next = length.div_ceil(4) * 4;
        rest = rest.get(next..)?;
    }
    None
}

/// An RFC 5227 ARP announcement of `address` from `mac`.
pub fn arp_announcement(mac: [u8; 6], address: Ipv4Addr) -> [u8; ARP_PACKET_BYTES] {
    let mut packet = [0u8; ARP_PACKET_BYTES];
    packet[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    packet[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    packet[4] = 6;
    packet[5] = 4;
    packet[6..8].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    packet[8..14].copy_from_slice(&mac);
    packet[14..18].copy_from_slice(&address.octets());
    // Target hardware address: zero (18..24).
    packet[24..28].copy_from_slice(&address.octets());
    packet
}

/// The index of the interface `name` in this thread's network namespace.
pub fn interface_index(name: &str) -> Result<u32, AddressError> {
    let error = |source| AddressError::Interface {
        name: name.to_owned(),
        source,
    };
    let c_name =
        CString::new(name).map_err(|_| error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(error(io::Error::last_os_error()));
    }
    Ok(index)
}

/// The floating address on one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatingAddress {
    pub address: Ipv4Net,
    pub interface: String,
}

impl FloatingAddress {
    /// `ha.address` on `ha.interface` (`None`: the default route's).
    pub fn new(address: Ipv4Net, interface: Option<&str>) -> Result<Self, AddressError> {
        let interface = match interface {
            Some(name) => name.to_owned(),
            None => default_route_interface()?,
        };
        Ok(FloatingAddress { address, interface })
    }

    /// Adds the address. `Ok(false)`: it was there already.
    pub fn add(&self) -> Result<bool, AddressError> {
        let error = |source| AddressError::Add {
            address: self.address,
            interface: self.interface.clone(),
            source,
        };
        let index = interface_index(&self.interface)?;
        match rtnetlink_request(&address_message(true, 1, index, self.address)) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(err) => Err(error(err)),
        }
    }

    /// Removes the address. `Ok(false)`: it was not there. Used at start too: a host that
    /// restarts has no right to the address until it holds the Lease again.
    pub fn remove(&self) -> Result<bool, AddressError> {
        let error = |source| AddressError::Remove {
            address: self.address,
            interface: self.interface.clone(),
            source,
        };
        let index = interface_index(&self.interface)?;
        match rtnetlink_request(&address_message(false, 1, index, self.address)) {
            Ok(()) => Ok(true),
            // NOTE: the kernel answers EADDRNOTAVAIL for an address the interface lacks
            // (inet_rtm_deladdr).
            Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(err) => Err(error(err)),
        }
    }

    /// Sends one gratuitous ARP announcement of the address from the interface's MAC.
    /// Callers send [`ANNOUNCE_COUNT`] of them [`ANNOUNCE_INTERVAL_SECS`] apart: Linux
    /// neighbours ignore a second change of an entry within `locktime` (1 s by default).
    pub fn announce(&self) -> Result<(), AddressError> {
        let address = self.address.addr();
        let error = |source| AddressError::Announce {
            address,
            interface: self.interface.clone(),
            source,
        };
        let index = interface_index(&self.interface)?;
        let index = i32::try_from(index)
            .map_err(|_| error(io::Error::from(io::ErrorKind::InvalidInput)))?;
        send_arp(&self.interface, index, address).map_err(error)
    }
}

/// One rtnetlink request, and its acknowledgement.
fn rtnetlink_request(message: &[u8]) -> io::Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Route)?;
    let sent = socket.send(message)?;
    if sent != message.len() {
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            message.len()
        )));
    }
    let mut buffer = vec![0u8; ACK_BUFFER_BYTES];
    // NOTE: rtnetlink handles a request inside sendmsg (netlink_unicast_kernel), so the
    // acknowledgement is already queued: read without waiting.
    // SAFETY: the kernel writes at most `buffer.len()` bytes into `buffer`.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast::<c_void>(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    let sequence = message
        .get(8..12)
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u32::from_ne_bytes);
    match acknowledgement(&buffer[..n], sequence) {
        Some(0) => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        None => Err(io::Error::other("no acknowledgement from the kernel")),
    }
}

/// The MAC address of `interface`.
fn hardware_address(socket: &OwnedFd, interface: &str) -> io::Result<[u8; 6]> {
    // SAFETY: an all-zero `ifreq` is valid (empty name, zero union).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= request.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name from and writes a `sockaddr` into `request`,
    // which lives across the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (slot, byte) in mac.iter_mut().zip(data.iter()) {
        *slot = *byte as u8;
    }
    Ok(mac)
}

/// Whether this process may open the packet socket [`FloatingAddress::announce`] needs
/// (`CAP_NET_RAW`, and `AF_PACKET` allowed): opened and closed at once, nothing sent.
pub fn packet_socket_allowed() -> io::Result<()> {
    // SAFETY: plain socket(2); protocol 0 receives nothing; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened socket owned by nobody else; dropping it closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

fn send_arp(interface: &str, index: i32, address: Ipv4Addr) -> io::Result<()> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened socket owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mac = hardware_address(&socket, interface)?;
    let packet = arp_announcement(mac, address);
    // SAFETY: an all-zero `sockaddr_ll` is valid; the fields that matter are set below.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as libc::c_ushort;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = index;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&BROADCAST_MAC);
    // SAFETY: `packet` and `to` live across the call; the kernel only reads them.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast::<c_void>(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start check opens a packet socket exactly when this process holds CAP_NET_RAW
    /// (root in CI; a plain user's `cargo test` sees the refusal), and sends nothing.
    #[test]
    fn a_packet_socket_opens_exactly_with_cap_net_raw() {
        let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
        let effective = status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .expect("CapEff");
        // CAP_NET_RAW is capability 13 (capability.h).
        let net_raw = effective & (1 << 13) != 0;
        match packet_socket_allowed() {
            Ok(()) => assert!(net_raw, "opened without CAP_NET_RAW"),
            Err(e) => {
                assert!(!net_raw, "refused with CAP_NET_RAW: {e}");
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
            }
        }
    }

    #[test]
    fn default_route_interface_has_the_lowest_metric() {
        let table = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
wlan0\t00000000\t01FEA8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
";
        assert_eq!(parse_default_interface(table).as_deref(), Some("wlan0"));
        let only_lan = "h\neth0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_default_interface(only_lan), None);
        assert_eq!(parse_default_interface(""), None);
    }

    #[test]
    fn address_messages_are_what_ip_address_sends() {
        let net: Ipv4Net = "192.168.1.250/24".parse().expect("test address");
        let add = address_message(true, 7, 3, net);
        assert_eq!(add.len(), 16 + 8 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(add[0..4].try_into().unwrap()), 40);
        assert_eq!(
            u16::from_ne_bytes(add[4..6].try_into().unwrap()),
            RTM_NEWADDR
        );
        assert_eq!(
            u16::from_ne_bytes(add[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32::from_ne_bytes(add[8..12].try_into().unwrap()), 7);
        assert_eq!(&add[16..20], &[libc::AF_INET as u8, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes(add[20..24].try_into().unwrap()), 3);
        assert_eq!(&add[28..32], &[192, 168, 1, 250]);
        assert_eq!(&add[36..40], &[192, 168, 1, 250]);
        let del = address_message(false, 8, 3, net);
        assert_eq!(
            u16::from_ne_bytes(del[4..6].try_into().unwrap()),
            RTM_DELADDR
        );
        assert_eq!(
            u16::from_ne_bytes(del[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_ACK
        );
    }

    fn error_message(sequence: u32, errno: i32) -> Vec<u8> {
        let mut message = Vec::new();
        message.extend_from_slice(&36u32.to_ne_bytes());
        message.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        message.extend_from_slice(&0u16.to_ne_bytes());
        message.extend_from_slice(&sequence.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&(-errno).to_ne_bytes());
        message.extend_from_slice(&[0u8; 16]);
        message
    }

    #[test]
    fn acknowledgements_are_matched_by_sequence() {
        assert_eq!(acknowledgement(&error_message(7, 0), 7), Some(0));
        assert_eq!(
            acknowledgement(&error_message(7, libc::EEXIST), 7),
            Some(libc::EEXIST)
        );
        let both = [error_message(6, libc::EPERM), error_message(7, 0)].concat();
        assert_eq!(acknowledgement(&both, 7), Some(0));
        assert_eq!(acknowledgement(&error_message(6, 0), 7), None);
        // Garbage and cut messages give nothing, never a panic.
        assert_eq!(acknowledgement(&[0xff; 40], 7), None);
        assert_eq!(acknowledgement(&error_message(7, 0)[..20], 7), None);
        assert_eq!(acknowledgement(&[], 7), None);
    }

    #[test]
    fn arp_announcement_layout() {
        let mac = [0x02, 0, 0, 0, 0, 0x0b];
        let packet = arp_announcement(mac, Ipv4Addr::new(192, 168, 1, 250));
        assert_eq!(
            packet,
            [
                0, 1, 8, 0, 6, 4, 0, 1, // Ethernet, IPv4, lengths, request
                2, 0, 0, 0, 0, 11, 192, 168, 1, 250, // sender
                0, 0, 0, 0, 0, 0, 192, 168, 1, 250, // target: same address, no MAC
            ]
        );
    }
}
