//! nftables expressions with explicit registers, built on `nftnl-sys`.
//!
//! The `nftnl` crate's expressions always load into and read from `NFT_REG_1`; a concatenated
//! map key (`ip daddr . meta l4proto . th dport`) needs each part in its own 32-bit register,
//! and a map lookup needs a destination register (`dreg`), which the crate does not offer.
//! [`RawExpr`] is plain data (an expression name and its attributes), so the rules holepunch
//! builds can be checked in unit tests without a kernel; it becomes an `nftnl_expr` only when a
//! rule is put into a batch. Attribute names and register numbers follow
//! `linux/netfilter/nf_tables.h` and libnftnl's `include/libnftnl/expr.h`.

use std::ffi::{CStr, CString, c_void};
use std::ptr::NonNull;

use nftnl::Rule;
use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;

/// A 32-bit data register (`NFT_REG32_00` ..). Concatenations use consecutive ones.
pub(crate) type Register = u32;

/// The first 32-bit register; a 128-bit `NFT_REG_1` overlaps registers 8 to 11.
pub(crate) const REG32_00: Register = libc::NFT_REG32_00 as Register;
/// The legacy 128-bit register 1, for single-value matches.
pub(crate) const REG_1: Register = libc::NFT_REG_1 as Register;

/// One attribute of an expression, as `nftnl_expr_set_*` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attr {
    U32(u32, u32),
    Str(u32, CString),
    Bytes(u32, Vec<u8>),
}

/// An nftables expression as data: its kernel name (`payload`, `lookup`, ...) and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawExpr {
    pub(crate) name: &'static CStr,
    pub(crate) attrs: Vec<Attr>,
}

impl RawExpr {
    /// The value of a u32 attribute, for tests and checks.
    #[cfg(test)]
    pub(crate) fn u32_attr(&self, key: u32) -> Option<u32> {
        self.attrs.iter().find_map(|attr| match attr {
            Attr::U32(k, value) if *k == key => Some(*value),
            _ => None,
        })
    }
}

impl Expression for RawExpr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: `nftnl_expr_alloc` takes a NUL-terminated name and returns a new expression
        // or NULL (out of memory), which we turn into an abort as the nftnl crate does.
        let raw = unsafe { sys::nftnl_expr_alloc(self.name.as_ptr()) };
        let Some(expr) = NonNull::new(raw) else {
            std::process::abort();
        };
        for attr in &self.attrs {
            // SAFETY: `expr` is the live expression allocated above. libnftnl copies string
            // and byte attributes into the expression, so the borrowed buffers only need to
            // live for the call; lengths are those of the buffers passed. Attribute keys are
            // libnftnl's NFTNL_EXPR_* constants for this expression type (unknown keys are
            // ignored by libnftnl, never read out of bounds).
            let rc = unsafe {
                match attr {
                    Attr::U32(key, value) => {
                        sys::nftnl_expr_set_u32(expr.as_ptr(), *key as u16, *value);
                        0
                    }
                    Attr::Str(key, value) => {
                        sys::nftnl_expr_set_str(expr.as_ptr(), *key as u16, value.as_ptr())
                    }
                    Attr::Bytes(key, value) => sys::nftnl_expr_set(
                        expr.as_ptr(),
                        *key as u16,
                        value.as_ptr().cast::<c_void>(),
                        value.len() as u32,
                    ),
                }
            };
            // libnftnl fails only when it cannot allocate or the data exceeds its 16-byte
            // registers; holepunch's attributes are at most 16 bytes, so this is out of memory.
            if rc < 0 {
                std::process::abort();
            }
        }
        // The rule takes ownership of the expression (`nftnl_rule_add_expr`).
        expr
    }
}

/// `meta <key>` loaded into `dreg`.
pub(crate) fn meta(key: i32, dreg: Register) -> RawExpr {
    RawExpr {
        name: c"meta",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_META_KEY, key as u32),
            Attr::U32(sys::NFTNL_EXPR_META_DREG, dreg),
        ],
    }
}

/// `len` bytes at `offset` of the header at `base` loaded into `dreg`.
pub(crate) fn payload(base: i32, offset: u32, len: u32, dreg: Register) -> RawExpr {
    RawExpr {
        name: c"payload",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_DREG, dreg),
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_BASE, base as u32),
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset),
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_LEN, len),
        ],
    }
}

/// `ct <key>` (no direction) loaded into `dreg`.
pub(crate) fn ct_load(key: i32, dreg: Register) -> RawExpr {
    RawExpr {
        name: c"ct",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_CT_KEY, key as u32),
            Attr::U32(sys::NFTNL_EXPR_CT_DREG, dreg),
        ],
    }
}

/// `ct <key> set` from `sreg`.
pub(crate) fn ct_set(key: i32, sreg: Register) -> RawExpr {
    RawExpr {
        name: c"ct",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_CT_KEY, key as u32),
            Attr::U32(sys::NFTNL_EXPR_CT_SREG, sreg),
        ],
    }
}

/// `reg = (reg & mask) ^ xor` over `mask.len()` bytes.
pub(crate) fn bitwise(reg: Register, mask: &[u8], xor: &[u8]) -> RawExpr {
    RawExpr {
        name: c"bitwise",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_BITWISE_SREG, reg),
            Attr::U32(sys::NFTNL_EXPR_BITWISE_DREG, reg),
            Attr::U32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32),
            Attr::Bytes(sys::NFTNL_EXPR_BITWISE_MASK, mask.to_vec()),
            Attr::Bytes(sys::NFTNL_EXPR_BITWISE_XOR, xor.to_vec()),
        ],
    }
}

/// Compare `sreg` with `data`; the rule stops here when the comparison fails.
pub(crate) fn cmp(op: i32, sreg: Register, data: &[u8]) -> RawExpr {
    RawExpr {
        name: c"cmp",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_CMP_SREG, sreg),
            Attr::U32(sys::NFTNL_EXPR_CMP_OP, op as u32),
            Attr::Bytes(sys::NFTNL_EXPR_CMP_DATA, data.to_vec()),
        ],
    }
}

/// Compare `sreg` with the inclusive range `from..=to` (`op`: `NFT_RANGE_EQ` or
/// `NFT_RANGE_NEQ`); the rule stops here when the comparison fails.
pub(crate) fn range(op: i32, sreg: Register, from: &[u8], to: &[u8]) -> RawExpr {
    RawExpr {
        name: c"range",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_RANGE_SREG, sreg),
            Attr::U32(sys::NFTNL_EXPR_RANGE_OP, op as u32),
            Attr::Bytes(sys::NFTNL_EXPR_RANGE_FROM_DATA, from.to_vec()),
            Attr::Bytes(sys::NFTNL_EXPR_RANGE_TO_DATA, to.to_vec()),
        ],
    }
}

/// Look the key in `sreg..` up in map `set` (created in the same batch with `set_id`) and
/// store the element's data in `dreg..`; the rule stops here when the key is not in the map.
pub(crate) fn map_lookup(set: &CStr, set_id: u32, sreg: Register, dreg: Register) -> RawExpr {
    RawExpr {
        name: c"lookup",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_LOOKUP_SREG, sreg),
            Attr::U32(sys::NFTNL_EXPR_LOOKUP_DREG, dreg),
            Attr::Str(sys::NFTNL_EXPR_LOOKUP_SET, set.to_owned()),
            Attr::U32(sys::NFTNL_EXPR_LOOKUP_SET_ID, set_id),
        ],
    }
}

/// `dnat ip to <addr_reg>:<port_reg>`.
pub(crate) fn dnat_ipv4(addr_reg: Register, port_reg: Register) -> RawExpr {
    RawExpr {
        name: c"nat",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32),
            Attr::U32(sys::NFTNL_EXPR_NAT_FAMILY, libc::NFPROTO_IPV4 as u32),
            Attr::U32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, addr_reg),
            Attr::U32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, port_reg),
        ],
    }
}

/// `dnat ip6 to` the address in `addr_reg` (four registers) and the port in `port_reg`.
pub(crate) fn dnat_ipv6(addr_reg: Register, port_reg: Register) -> RawExpr {
    RawExpr {
        name: c"nat",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32),
            Attr::U32(sys::NFTNL_EXPR_NAT_FAMILY, libc::NFPROTO_IPV6 as u32),
            Attr::U32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, addr_reg),
            Attr::U32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, port_reg),
        ],
    }
}

/// `accept`: the verdict ends this chain's evaluation of the packet (only this chain's: other
/// base chains on the same hook still see it).
pub(crate) fn accept() -> RawExpr {
    RawExpr {
        name: c"immediate",
        attrs: vec![
            Attr::U32(sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32),
            Attr::U32(sys::NFTNL_EXPR_IMM_VERDICT, libc::NF_ACCEPT as u32),
        ],
    }
}

/// `masquerade`.
pub(crate) fn masquerade() -> RawExpr {
    RawExpr {
        name: c"masq",
        attrs: Vec::new(),
    }
}
