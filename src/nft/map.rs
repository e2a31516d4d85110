//! nftables maps (sets with data, `NFT_SET_MAP`) and their elements, on top of `nftnl-sys`.
//!
//! The `nftnl` crate builds sets with keys only; holepunch needs verdict-free data maps such
//! as `ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service`. This module owns the
//! `nftnl_set` object for such a map, the element messages for a batch, and the pure byte
//! layout of keys and data: every part of a concatenation takes whole 32-bit registers
//! (zero-padded), as the kernel's `nft_set_ext` and nft(8) lay them out. Type numbers are
//! nft(8)'s datatypes (`src/datatype.h`); a concatenated type is built as nft does,
//! `(outer << 6) | inner` (`TYPE_BITS`).

use std::ffi::{CStr, c_char, c_void};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::{MsgType, NlMsg, Table};

use crate::model::Protocol;

/// nft(8) datatype numbers (`enum datatypes`).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// nft(8)'s `TYPE_BITS`: each part of a concatenated type takes this many bits.
const TYPE_BITS: u32 = 6;
/// The kernel stores every part of a concatenation in whole 32-bit registers.
const REGISTER_BYTES: usize = 4;

const fn concat(outer: u32, inner: u32) -> u32 {
    (outer << TYPE_BITS) | inner
}

/// A map's key and data types: nft(8) type number and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapShape {
    pub(crate) key_type: u32,
    pub(crate) key_len: u32,
    pub(crate) data_type: u32,
    pub(crate) data_len: u32,
}

/// `ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service` (relay).
pub(crate) const RELAY_SHAPE: MapShape = MapShape {
    key_type: concat(concat(TYPE_IPADDR, TYPE_INET_PROTOCOL), TYPE_INET_SERVICE),
    key_len: 3 * REGISTER_BYTES as u32,
    data_type: concat(TYPE_IPADDR, TYPE_INET_SERVICE),
    data_len: 2 * REGISTER_BYTES as u32,
};

/// `ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service` (relay over IPv6,
/// README "IPv6").
pub(crate) const RELAY6_SHAPE: MapShape = MapShape {
    key_type: concat(concat(TYPE_IP6ADDR, TYPE_INET_PROTOCOL), TYPE_INET_SERVICE),
    key_len: 6 * REGISTER_BYTES as u32,
    data_type: concat(TYPE_IP6ADDR, TYPE_INET_SERVICE),
    data_len: 5 * REGISTER_BYTES as u32,
};

/// `inet_proto . inet_service : ipv4_addr . inet_service` (gateway).
pub(crate) const GATEWAY_SHAPE: MapShape = MapShape {
    key_type: concat(TYPE_INET_PROTOCOL, TYPE_INET_SERVICE),
    key_len: 2 * REGISTER_BYTES as u32,
    data_type: concat(TYPE_IPADDR, TYPE_INET_SERVICE),
    data_len: 2 * REGISTER_BYTES as u32,
};

/// `bytes` zero-padded to whole registers.
fn pad(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.resize(bytes.len().div_ceil(REGISTER_BYTES) * REGISTER_BYTES, 0);
    out
}

/// Relay key: `daddr . l4proto . dport`.
pub(crate) fn relay_key(address: Ipv4Addr, protocol: Protocol, port: u16) -> Vec<u8> {
    let mut key = pad(&address.octets());
    key.extend(pad(&[protocol.iana_number()]));
    key.extend(pad(&port.to_be_bytes()));
    key
}

/// IPv6 relay key: `ip6 daddr . l4proto . dport`.
pub(crate) fn relay6_key(address: Ipv6Addr, protocol: Protocol, port: u16) -> Vec<u8> {
    let mut key = address.octets().to_vec();
    key.extend(pad(&[protocol.iana_number()]));
    key.extend(pad(&port.to_be_bytes()));
    key
}

/// IPv6 map data: `addr . port`.
pub(crate) fn target6_data(address: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut data = address.octets().to_vec();
    data.extend(pad(&port.to_be_bytes()));
    data
}

/// Decode an IPv6 relay element; `None` for bytes holepunch does not write.
pub(crate) fn decode_relay6(key: &[u8], data: &[u8]) -> Option<(Protocol, u16, Ipv6Addr, u16)> {
    if key.len() != RELAY6_SHAPE.key_len as usize || data.len() != RELAY6_SHAPE.data_len as usize {
        return None;
    }
    let address: [u8; 16] = data.get(..16)?.try_into().ok()?;
    Some((
        protocol_from(*key.get(16)?)?,
        port_at(key, 20)?,
        Ipv6Addr::from(address),
        port_at(data, 16)?,
    ))
}

/// Gateway key: `l4proto . dport`.
pub(crate) fn gateway_key(protocol: Protocol, port: u16) -> Vec<u8> {
    let mut key = pad(&[protocol.iana_number()]);
    key.extend(pad(&port.to_be_bytes()));
    key
}

/// Map data: `addr . port`, what the DNAT takes from the registers.
pub(crate) fn target_data(address: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut data = pad(&address.octets());
    data.extend(pad(&port.to_be_bytes()));
    data
}

fn protocol_from(number: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .find(|protocol| protocol.iana_number() == number)
}

fn address_at(bytes: &[u8], at: usize) -> Option<Ipv4Addr> {
    let octets: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(octets))
}

fn port_at(bytes: &[u8], at: usize) -> Option<u16> {
    let port: [u8; 2] = bytes.get(at..at + 2)?.try_into().ok()?;
    Some(u16::from_be_bytes(port))
}

/// Decode a relay key; `None` for bytes holepunch does not write.
pub(crate) fn decode_relay_key(key: &[u8]) -> Option<(Ipv4Addr, Protocol, u16)> {
    if key.len() != RELAY_SHAPE.key_len as usize {
        return None;
    }
    Some((
        address_at(key, 0)?,
        protocol_from(*key.get(4)?)?,
        port_at(key, 8)?,
    ))
}

/// Decode a gateway key; `None` for bytes holepunch does not write.
pub(crate) fn decode_gateway_key(key: &[u8]) -> Option<(Protocol, u16)> {
    if key.len() != GATEWAY_SHAPE.key_len as usize {
        return None;
    }
    Some((protocol_from(*key.first()?)?, port_at(key, 4)?))
}

/// Decode map data; `None` for bytes holepunch does not write.
pub(crate) fn decode_target(data: &[u8]) -> Option<(Ipv4Addr, u16)> {
    if data.len() != RELAY_SHAPE.data_len as usize {
        return None;
    }
    Some((address_at(data, 0)?, port_at(data, 4)?))
}

/// A named map in `table`, with the elements it is created with.
pub(crate) struct Map<'a> {
    set: NonNull<sys::nftnl_set>,
    table: &'a Table,
}

impl<'a> Map<'a> {
    /// A map named `name`; `id` lets rules of the same batch refer to it before it exists.
    pub(crate) fn new(name: &CStr, id: u32, table: &'a Table, shape: MapShape) -> Map<'a> {
        // SAFETY: `nftnl_set_alloc` returns a new set or NULL (out of memory → abort, as the
        // nftnl crate does).
        let Some(set) = NonNull::new(unsafe { sys::nftnl_set_alloc() }) else {
            std::process::abort();
        };
        let flags = libc::NFT_SET_MAP as u32;
        // SAFETY: `set` is live; string attributes are copied by libnftnl; the keys are
        // NFTNL_SET_* constants with the value types libnftnl expects for them.
        unsafe {
            let raw = set.as_ptr();
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_FAMILY as u16, table.get_family() as u32);
            sys::nftnl_set_set_str(raw, sys::NFTNL_SET_TABLE as u16, table.get_name().as_ptr());
            sys::nftnl_set_set_str(raw, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_ID as u16, id);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_FLAGS as u16, flags);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_KEY_TYPE as u16, shape.key_type);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_KEY_LEN as u16, shape.key_len);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_DATA_TYPE as u16, shape.data_type);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_DATA_LEN as u16, shape.data_len);
        }
        Map { set, table }
    }

    /// Add an element `key : data` to the map's in-memory element list.
    pub(crate) fn add(&mut self, key: &[u8], data: &[u8]) {
        // SAFETY: allocation checked as above.
        let Some(elem) = NonNull::new(unsafe { sys::nftnl_set_elem_alloc() }) else {
            std::process::abort();
        };
        // SAFETY: `elem` is live; libnftnl copies `key` and `data` (their lengths are passed
        // and are at most 24 bytes, below NFT_DATA_VALUE_MAXLEN); `nftnl_set_elem_add` moves
        // the element into the set, which frees it with the set.
        unsafe {
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast::<c_void>(),
                key.len() as u32,
            );
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_DATA as u16,
                data.as_ptr().cast::<c_void>(),
                data.len() as u32,
            );
            sys::nftnl_set_elem_add(self.set.as_ptr(), elem.as_ptr());
        }
    }

    /// Add every element to `batch`, as many per message as fit (libnftnl splits them).
    pub(crate) fn add_elements_to(&self, batch: &mut nftnl::Batch) {
        // SAFETY: the iterator reads the set's element list, which lives as long as `self`;
        // it is destroyed before this function returns.
        let Some(iter) =
            NonNull::new(unsafe { sys::nftnl_set_elems_iter_create(self.set.as_ptr()) })
        else {
            std::process::abort();
        };
        // SAFETY: `iter` is live until destroyed below.
        while !unsafe { sys::nftnl_set_elems_iter_cur(iter.as_ptr()) }.is_null() {
            let message = ElementsMessage {
                map: self,
                iter,
                done: std::cell::Cell::new(false),
            };
            batch.add(&message, MsgType::Add);
            if message.done.get() {
                break;
            }
        }
        // SAFETY: created above, not used after this.
        unsafe { sys::nftnl_set_elems_iter_destroy(iter.as_ptr()) };
    }
}

// SAFETY: the set message is built by libnftnl into `buf`, which the caller (nftnl's
// `Batch::add`) guarantees holds `nft_nlmsg_maxsize()` bytes; a set header is far smaller.
unsafe impl NlMsg for Map<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let kind = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWSET,
            MsgType::Del => libc::NFT_MSG_DELSET,
        };
        let flags = libc::NLM_F_CREATE | libc::NLM_F_ACK;
        // SAFETY: see the impl; `self.set` is live.
        unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                kind as u16,
                self.table.get_family() as u16,
                flags as u16,
                seq,
            );
            sys::nftnl_set_nlmsg_build_payload(header, self.set.as_ptr());
        }
    }
}

impl Drop for Map<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once; frees the elements with it.
        unsafe { sys::nftnl_set_free(self.set.as_ptr()) };
    }
}

/// One NEWSETELEM message: the elements from the iterator's position that fit in a message.
struct ElementsMessage<'m, 'a> {
    map: &'m Map<'a>,
    iter: NonNull<sys::nftnl_set_elems_iter>,
    done: std::cell::Cell<bool>,
}

// SAFETY: `nftnl_set_elems_nlmsg_build_payload_iter` stops adding elements before the nest
// would exceed a netlink attribute's 64 KiB, and `buf` holds `nft_nlmsg_maxsize()` bytes
// (64 KiB + a page), as nftnl's `Batch::add` guarantees.
unsafe impl NlMsg for ElementsMessage<'_, '_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // NOTE: NLM_F_EXCL: two forwards with the same key in one ruleset make the kernel
        // refuse the batch (EEXIST) instead of one silently winning.
        let flags = libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK;
        // SAFETY: see the impl; `self.iter` and the map are live for the call.
        let more = unsafe {
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                libc::NFT_MSG_NEWSETELEM as u16,
                self.map.table.get_family() as u16,
                flags as u16,
                seq,
            );
            sys::nftnl_set_elems_nlmsg_build_payload_iter(header, self.iter.as_ptr())
        };
        // libnftnl returns 0 once the last element went in, 1 while more remain.
        self.done.set(more <= 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_those_nft_prints_as_concatenations() {
        // (7 << 12) | (12 << 6) | 13: ipv4_addr . inet_proto . inet_service, as nft builds it.
        assert_eq!(RELAY_SHAPE.key_type, 0x730d);
        assert_eq!(GATEWAY_SHAPE.key_type, 0x30d);
        assert_eq!(RELAY_SHAPE.data_type, 0x1cd);
    }

    #[test]
    fn relay_key_pads_every_part_to_a_register() {
        let key = relay_key(Ipv4Addr::new(192, 168, 77, 10), Protocol::Udp, 0x7530);
        assert_eq!(key, [192, 168, 77, 10, 17, 0, 0, 0, 0x75, 0x30, 0, 0]);
        assert_eq!(key.len(), RELAY_SHAPE.key_len as usize);
        assert_eq!(
            decode_relay_key(&key),
            Some((Ipv4Addr::new(192, 168, 77, 10), Protocol::Udp, 30000))
        );
    }

    #[test]
    fn gateway_key_and_target_round_trip() {
        let key = gateway_key(Protocol::Tcp, 8443);
        assert_eq!(key, [6, 0, 0, 0, 0x20, 0xfb, 0, 0]);
        assert_eq!(decode_gateway_key(&key), Some((Protocol::Tcp, 8443)));
        let data = target_data(Ipv4Addr::new(10, 0, 0, 7), 8080);
        assert_eq!(data, [10, 0, 0, 7, 0x1f, 0x90, 0, 0]);
        assert_eq!(
            decode_target(&data),
            Some((Ipv4Addr::new(10, 0, 0, 7), 8080))
        );
    }

    #[test]
    fn foreign_bytes_decode_to_none() {
        assert_eq!(decode_relay_key(&[1, 2, 3]), None);
        assert_eq!(decode_gateway_key(&[1, 0, 0, 0, 0, 80, 0, 0]), None); // ICMP
        assert_eq!(decode_target(&[0; 12]), None);
    }
}
