//! The netfilter netlink socket: sending one nftables batch and reading every acknowledgement,
//! and dumping a map's elements and a table's rules.
//!
//! Follows netlink(7) and nfnetlink (`linux/netfilter/nfnetlink.h`, `nf_tables.h`). Replies
//! are decoded here in safe Rust (`messages`, `set_elements`, `rule_chain`), so the decoding
//! is unit tested without a kernel; only the socket calls are `unsafe`.

use std::collections::BTreeSet;
use std::ffi::c_void;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use nftnl::FinalizedBatch;

/// How long to wait for the kernel's answer before giving up.
const RECEIVE_TIMEOUT_SECS: libc::time_t = 5;
/// Receive buffer: larger than any one dump message (the kernel fills up to 16 KiB or a page).
const RECEIVE_BUFFER_BYTES: usize = 256 * 1024;

// NOTE: `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE` (asm-generic/socket.h, x86 and arm) and
// `NETLINK_CAP_ACK` (linux/netlink.h) are not in the libc crate for Linux.
const SO_SNDBUFFORCE: libc::c_int = 32;
const NETLINK_CAP_ACK: libc::c_int = 10;

const NLMSG_HEADER_BYTES: usize = 16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
/// `nfgenmsg`: family, version, resource id.
const NFGENMSG_BYTES: usize = 4;
/// Attribute type bits without `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `NLM_F_DUMP_INTR`: the object changed during the dump; its answer may be inconsistent.
const NLM_F_DUMP_INTR: u16 = 0x10;
/// How often a dump is restarted after an interrupted one.
const DUMP_TRIES: u32 = 3;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_CT_KEY: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netfilter netlink socket (holepunch needs CAP_NET_ADMIN)")]
    Open(#[source] io::Error),
    #[error("cannot configure the netlink socket")]
    Configure(#[source] io::Error),
    #[error("cannot send to the kernel over netlink")]
    Send(#[source] io::Error),
    #[error("cannot receive the kernel's answer over netlink")]
    Receive(#[source] io::Error),
    #[error("the kernel did not answer within {RECEIVE_TIMEOUT_SECS} s")]
    Timeout,
    #[error("the kernel refused message {seq} of the batch: {source}")]
    Refused {
        seq: u32,
        #[source]
        source: io::Error,
    },
    #[error("the kernel answered a dump with an error: {0}")]
    Dump(#[source] io::Error),
    #[error("the map changed {DUMP_TRIES} times while it was being read; try again")]
    DumpInterrupted,
    #[error("a netlink answer from the kernel is malformed: {0}")]
    Decode(&'static str),
}

/// A map element as the kernel holds it: key bytes and data bytes.
pub(crate) type RawElement = (Vec<u8>, Vec<u8>);

/// One netlink message from a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    pub(crate) kind: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) payload: &'a [u8],
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Split a receive buffer into netlink messages (`NLMSG_OK`/`NLMSG_NEXT` of netlink(3)).
pub(crate) fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HEADER_BYTES {
        let len = u32_at(buf, 0).ok_or(NetlinkError::Decode("header"))? as usize;
        if len < NLMSG_HEADER_BYTES || len > buf.len() {
            return Err(NetlinkError::Decode("message length outside the buffer"));
        }
        out.push(Message {
            kind: u16_at(buf, 4).ok_or(NetlinkError::Decode("header"))?,
            flags: u16_at(buf, 6).ok_or(NetlinkError::Decode("header"))?,
            seq: u32_at(buf, 8).ok_or(NetlinkError::Decode("header"))?,
            payload: &buf[NLMSG_HEADER_BYTES..len],
        });
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

/// The error code of an `NLMSG_ERROR` message: 0 for an acknowledgement, else a positive errno.
pub(crate) fn error_code(message: &Message<'_>) -> Result<i32, NetlinkError> {
    let raw = u32_at(message.payload, 0).ok_or(NetlinkError::Decode("short error message"))?;
    Ok((raw as i32).saturating_neg())
}

/// Netlink attributes `(type, value)` of a buffer.
pub(crate) fn attributes(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16_at(buf, 0).ok_or(NetlinkError::Decode("attribute"))? as usize;
        let kind = u16_at(buf, 2).ok_or(NetlinkError::Decode("attribute"))? & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(NetlinkError::Decode("attribute length outside the message"));
        }
        out.push((kind, &buf[4..len]));
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

fn nested_value<'a>(
    attrs: &[(u16, &'a [u8])],
    kind: u16,
) -> Result<Option<&'a [u8]>, NetlinkError> {
    let Some((_, nest)) = attrs.iter().find(|(k, _)| *k == kind) else {
        return Ok(None);
    };
    Ok(attributes(nest)?
        .into_iter()
        .find(|(k, _)| *k == NFTA_DATA_VALUE)
        .map(|(_, value)| value))
}

/// The `(key, data)` pairs of one NEWSETELEM message (payload after the netlink header).
pub(crate) fn set_elements(payload: &[u8]) -> Result<Vec<RawElement>, NetlinkError> {
    let attrs = payload
        .get(NFGENMSG_BYTES..)
        .ok_or(NetlinkError::Decode("short set element message"))?;
    let mut out = Vec::new();
    for (kind, list) in attributes(attrs)? {
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (kind, element) in attributes(list)? {
            if kind != NFTA_LIST_ELEM {
                continue;
            }
            let fields = attributes(element)?;
            let key = nested_value(&fields, NFTA_SET_ELEM_KEY)?
                .ok_or(NetlinkError::Decode("set element without a key"))?;
            let data = nested_value(&fields, NFTA_SET_ELEM_DATA)?.unwrap_or_default();
            out.push((key.to_vec(), data.to_vec()));
        }
    }
    Ok(out)
}

fn push_attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align4(out.len()), 0);
}

/// A dump request of nf_tables message `msg` (`NFT_MSG_GET*`) with string attributes.
fn dump_request(msg: i32, family: u8, attrs: &[(u16, &str)], seq: u32) -> Vec<u8> {
    let mut out = vec![0; NLMSG_HEADER_BYTES];
    out.extend_from_slice(&[family, libc::NFNETLINK_V0 as u8, 0, 0]);
    for (kind, name) in attrs {
        let mut value = name.as_bytes().to_vec();
        value.push(0);
        push_attribute(&mut out, *kind, &value);
    }
    let kind = ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | msg as u16;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&kind.to_ne_bytes());
    out[6..8].copy_from_slice(&flags.to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}

/// A NFT_MSG_GETSETELEM dump request for `set` in `table` of `family`.
pub(crate) fn get_elements_request(family: u8, table: &str, set: &str, seq: u32) -> Vec<u8> {
    let attrs = [
        (NFTA_SET_ELEM_LIST_TABLE, table),
        (NFTA_SET_ELEM_LIST_SET, set),
    ];
    dump_request(libc::NFT_MSG_GETSETELEM, family, &attrs, seq)
}

/// A NFT_MSG_GETRULE dump request for the rules of `table`.
pub(crate) fn get_rules_request(family: u8, table: &str, seq: u32) -> Vec<u8> {
    dump_request(
        libc::NFT_MSG_GETRULE,
        family,
        &[(NFTA_RULE_TABLE, table)],
        seq,
    )
}

/// The chain a NEWRULE message (payload after the netlink header) belongs to.
pub(crate) fn rule_chain(payload: &[u8]) -> Result<String, NetlinkError> {
    let attrs = payload
        .get(NFGENMSG_BYTES..)
        .ok_or(NetlinkError::Decode("short rule message"))?;
    let (_, name) = attributes(attrs)?
        .into_iter()
        .find(|(kind, _)| *kind == NFTA_RULE_CHAIN)
        .ok_or(NetlinkError::Decode("rule without a chain"))?;
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// A base chain of any table, as the kernel lists it (for the gateway's look at the host's
/// own firewall, README "IPv6").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainInfo {
    pub(crate) family: u8,
    pub(crate) table: String,
    pub(crate) name: String,
    /// The netfilter hook number; `None` for a regular chain.
    pub(crate) hook: Option<u32>,
    /// The base chain's policy verdict (NF_DROP 0, NF_ACCEPT 1).
    pub(crate) policy: Option<u32>,
}

/// What a rule does, as far as the gateway's look needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RuleInfo {
    pub(crate) family: u8,
    pub(crate) table: String,
    pub(crate) chain: String,
    /// Ends in a drop (an immediate NF_DROP verdict) or a reject.
    pub(crate) drops: bool,
    /// Reads or writes the conntrack mark.
    pub(crate) ct_mark: bool,
    /// The chains of its table it jumps or goes to.
    pub(crate) jumps: Vec<String>,
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

fn be_u32(value: &[u8]) -> Option<u32> {
    value.get(..4)?.try_into().ok().map(u32::from_be_bytes)
}

/// One NEWCHAIN message (payload after the netlink header).
pub(crate) fn chain_info(payload: &[u8]) -> Result<ChainInfo, NetlinkError> {
    let family = *payload
        .first()
        .ok_or(NetlinkError::Decode("short chain message"))?;
    let attrs = attributes(payload.get(NFGENMSG_BYTES..).unwrap_or_default())?;
    let mut chain = ChainInfo {
        family,
        table: String::new(),
        name: String::new(),
        hook: None,
        policy: None,
    };
    for (kind, value) in attrs {
        match kind {
            NFTA_CHAIN_TABLE => chain.table = text(value),
            NFTA_CHAIN_NAME => chain.name = text(value),
            NFTA_CHAIN_POLICY => chain.policy = be_u32(value),
            NFTA_CHAIN_HOOK => {
                chain.hook = attributes(value)?
                    .into_iter()
                    .find(|(k, _)| *k == NFTA_HOOK_HOOKNUM)
                    .and_then(|(_, v)| be_u32(v));
            }
            _ => {}
        }
    }
    Ok(chain)
}

/// One NEWRULE message (payload after the netlink header).
pub(crate) fn rule_info(payload: &[u8]) -> Result<RuleInfo, NetlinkError> {
    let family = *payload
        .first()
        .ok_or(NetlinkError::Decode("short rule message"))?;
    let mut rule = RuleInfo {
        family,
        ..RuleInfo::default()
    };
    for (kind, value) in attributes(payload.get(NFGENMSG_BYTES..).unwrap_or_default())? {
        match kind {
            NFTA_RULE_TABLE => rule.table = text(value),
            NFTA_RULE_CHAIN => rule.chain = text(value),
            NFTA_RULE_EXPRESSIONS => {
                for (_, expression) in attributes(value)? {
                    let fields = attributes(expression)?;
                    let name = fields
                        .iter()
                        .find(|(k, _)| *k == NFTA_EXPR_NAME)
                        .map(|(_, v)| text(v))
                        .unwrap_or_default();
                    let data = fields
                        .iter()
                        .find(|(k, _)| *k == NFTA_EXPR_DATA)
                        .map(|(_, v)| attributes(v))
                        .transpose()?
                        .unwrap_or_default();
                    match name.as_str() {
                        "reject" => rule.drops = true,
                        "immediate" => {
                            let verdict: Vec<(u16, &[u8])> = data
                                .iter()
                                .filter(|(k, _)| *k == NFTA_IMMEDIATE_DATA)
                                .flat_map(|(_, v)| attributes(v).unwrap_or_default())
                                .filter(|(k, _)| *k == NFTA_DATA_VERDICT)
                                .flat_map(|(_, v)| attributes(v).unwrap_or_default())
                                .collect();
                            let field = |key| verdict.iter().find(|(k, _)| *k == key);
                            let code = field(NFTA_VERDICT_CODE).and_then(|(_, v)| be_u32(v));
                            rule.drops |= code == Some(libc::NF_DROP as u32);
                            let jump = [libc::NFT_JUMP, libc::NFT_GOTO].map(|c| Some(c as u32));
                            if jump.contains(&code)
                                && let Some((_, chain)) = field(NFTA_VERDICT_CHAIN)
                            {
                                rule.jumps.push(text(chain));
                            }
                        }
                        "ct" => {
                            rule.ct_mark |= data
                                .iter()
                                .find(|(k, _)| *k == NFTA_CT_KEY)
                                .and_then(|(_, v)| be_u32(v))
                                == Some(libc::NFT_CT_MARK as u32);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(rule)
}

/// A blocking netfilter netlink socket in the calling thread's network namespace.
pub(crate) struct NetfilterSocket {
    socket: mnl::Socket,
    buffer: Vec<u8>,
}

fn set_option<T>(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast::<c_void>(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl NetfilterSocket {
    pub(crate) fn open() -> Result<NetfilterSocket, NetlinkError> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NetlinkError::Open)?;
        let fd = socket.as_raw_fd();
        let timeout = libc::timeval {
            tv_sec: RECEIVE_TIMEOUT_SECS,
            tv_usec: 0,
        };
        set_option(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)
            .map_err(NetlinkError::Configure)?;
        // Acknowledgements carry only the header of the message they answer, not all of it.
        set_option(fd, libc::SOL_NETLINK, NETLINK_CAP_ACK, &1 as &libc::c_int)
            .map_err(NetlinkError::Configure)?;
        Ok(NetfilterSocket {
            socket,
            buffer: vec![0; RECEIVE_BUFFER_BYTES],
        })
    }

    /// Send `batch` and wait for the kernel's verdict on all of it.
    pub(crate) fn run_batch(&mut self, batch: &FinalizedBatch) -> Result<(), NetlinkError> {
        self.send_batch(batch)?;
        self.read_acks(batch.sequence_numbers())
    }

    /// Send the whole batch in one `sendmsg`.
    // NOTE: nfnetlink handles a batch per socket buffer (`nfnetlink_rcv_batch`): a batch sent
    // in several `sendto` calls (as `mnl::Socket::send_all` does with nftnl's pages) has no
    // end message in the first buffer and is aborted. nft(8) sends all pages with one
    // `sendmsg` too (`mnl_batch_talk`), after growing the send buffer to fit.
    fn send_batch(&self, batch: &FinalizedBatch) -> Result<(), NetlinkError> {
        let pages: Vec<&[u8]> = batch.iter().collect();
        let total: usize = pages.iter().map(|page| page.len()).sum();
        let fd = self.socket.as_raw_fd();
        let wanted =
            libc::c_int::try_from(total.saturating_add(64 * 1024)).unwrap_or(libc::c_int::MAX);
        // NOTE: SO_SNDBUFFORCE needs CAP_NET_ADMIN in the initial user namespace (socket(7));
        // in a user namespace (a rootless container) it fails with EPERM, and nft(8) then
        // falls back to SO_SNDBUF, capped at net.core.wmem_max (mnl_set_sndbuffer in
        // nftables' src/mnl.c). So does holepunch.
        set_option(fd, libc::SOL_SOCKET, SO_SNDBUFFORCE, &wanted)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::EPERM) => set_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &wanted),
                _ => Err(e),
            })
            .map_err(NetlinkError::Configure)?;
        let mut iovecs: Vec<libc::iovec> = pages
            .iter()
            .map(|page| libc::iovec {
                iov_base: page.as_ptr() as *mut c_void,
                iov_len: page.len(),
            })
            .collect();
        // SAFETY: an all-zero `sockaddr_nl` is valid: pid 0 addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: an all-zero `msghdr` is valid (no name, no iovecs, no control data).
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_name = (&mut kernel as *mut libc::sockaddr_nl).cast::<c_void>();
        message.msg_namelen = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        message.msg_iov = iovecs.as_mut_ptr();
        message.msg_iovlen = iovecs.len() as _;
        // SAFETY: `message` points to `kernel` and to `iovecs`, whose entries point into the
        // batch's pages; all of them outlive the call, and the kernel only reads them.
        let sent = unsafe { libc::sendmsg(fd, &message, 0) };
        if sent < 0 {
            return Err(NetlinkError::Send(io::Error::last_os_error()));
        }
        if sent as usize != total {
            return Err(NetlinkError::Send(io::Error::other(format!(
                "sent {sent} of {total} bytes"
            ))));
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<usize, NetlinkError> {
        self.receive_with(0)
    }

    /// [`NetfilterSocket::receive`] with `recv(2)` flags (`MSG_DONTWAIT`: only what is
    /// already queued; an empty queue is [`NetlinkError::Timeout`]).
    fn receive_with(&mut self, flags: libc::c_int) -> Result<usize, NetlinkError> {
        let fd = self.socket.as_raw_fd();
        // SAFETY: the kernel writes at most `buffer.len()` bytes into `buffer`.
        let n = unsafe {
            libc::recv(
                fd,
                self.buffer.as_mut_ptr().cast::<c_void>(),
                self.buffer.len(),
                flags,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NetlinkError::Timeout,
                _ => NetlinkError::Receive(err),
            });
        }
        Ok(n as usize)
    }

    // NOTE: CRATES.md pitfall: the first acknowledgement may be a success for an early
    // message while a later one failed; read until every sequence number of the batch was
    // answered. An aborted batch never acknowledges its end message, though
    // (`nfnetlink_rcv_batch` queues every answer and delivers them all before `sendmsg`
    // returns): once an error is in, read only what is already queued, or each refused batch
    // (deleting a table that is not there, at every start in direct mode) would wait out the
    // receive timeout.
    fn read_acks(&mut self, expected: Range<u32>) -> Result<(), NetlinkError> {
        let mut pending: BTreeSet<u32> = expected.collect();
        let mut first_error: Option<NetlinkError> = None;
        while !pending.is_empty() {
            let received = match first_error {
                None => self.receive(),
                Some(_) => self.receive_with(libc::MSG_DONTWAIT),
            };
            let n = match received {
                Ok(n) => n,
                Err(NetlinkError::Timeout) if first_error.is_some() => break,
                Err(err) => return Err(err),
            };
            for message in messages(&self.buffer[..n])? {
                if message.kind != NLMSG_ERROR {
                    continue;
                }
                pending.remove(&message.seq);
                let code = error_code(&message)?;
                if code != 0 && first_error.is_none() {
                    first_error = Some(NetlinkError::Refused {
                        seq: message.seq,
                        source: io::Error::from_raw_os_error(code),
                    });
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The elements of map `set` in `table`; `None` when the table or the map does not exist.
    pub(crate) fn dump_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
    ) -> Result<Option<Vec<RawElement>>, NetlinkError> {
        let Some(payloads) = self.dump(|seq| get_elements_request(family, table, set, seq))? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for payload in payloads {
            out.extend(set_elements(&payload)?);
        }
        Ok(Some(out))
    }

    /// The chain of every rule in `table`, in order; `None` when the table does not exist.
    pub(crate) fn dump_rule_chains(
        &mut self,
        family: u8,
        table: &str,
    ) -> Result<Option<Vec<String>>, NetlinkError> {
        let Some(payloads) = self.dump(|seq| get_rules_request(family, table, seq))? else {
            return Ok(None);
        };
        payloads
            .iter()
            .map(|p| rule_chain(p))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// Every chain of every table of every family.
    pub(crate) fn dump_all_chains(&mut self) -> Result<Vec<ChainInfo>, NetlinkError> {
        let payloads = self
            .dump(|seq| dump_request(libc::NFT_MSG_GETCHAIN, libc::AF_UNSPEC as u8, &[], seq))?
            .unwrap_or_default();
        payloads.iter().map(|p| chain_info(p)).collect()
    }

    /// Every rule of every table of every family.
    pub(crate) fn dump_all_rules(&mut self) -> Result<Vec<RuleInfo>, NetlinkError> {
        let payloads = self
            .dump(|seq| dump_request(libc::NFT_MSG_GETRULE, libc::AF_UNSPEC as u8, &[], seq))?
            .unwrap_or_default();
        payloads.iter().map(|p| rule_info(p)).collect()
    }

    /// The payloads of a dump's messages; `None` when the kernel answers ENOENT.
    fn dump(
        &mut self,
        request: impl Fn(u32) -> Vec<u8>,
    ) -> Result<Option<Vec<Vec<u8>>>, NetlinkError> {
        // NOTE: netlink(7): a dump that raced with a change carries NLM_F_DUMP_INTR; its
        // answer may mix both states, so it is read again.
        for seq in 1..=DUMP_TRIES {
            self.socket
                .send(&request(seq))
                .map_err(NetlinkError::Send)?;
            match self.read_dump(seq)? {
                Dump::Interrupted => continue,
                Dump::Missing => return Ok(None),
                Dump::Payloads(payloads) => return Ok(Some(payloads)),
            }
        }
        Err(NetlinkError::DumpInterrupted)
    }

    fn read_dump(&mut self, seq: u32) -> Result<Dump, NetlinkError> {
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.receive()?;
            for message in messages(&self.buffer[..n])? {
                if message.seq != seq {
                    continue;
                }
                interrupted |= message.flags & NLM_F_DUMP_INTR != 0;
                match message.kind {
                    NLMSG_DONE if interrupted => return Ok(Dump::Interrupted),
                    NLMSG_DONE => return Ok(Dump::Payloads(out)),
                    NLMSG_ERROR => {
                        let code = error_code(&message)?;
                        if code == libc::ENOENT {
                            return Ok(Dump::Missing);
                        }
                        return Err(NetlinkError::Dump(io::Error::from_raw_os_error(code)));
                    }
                    _ => out.push(message.payload.to_vec()),
                }
            }
        }
    }
}

enum Dump {
    Payloads(Vec<Vec<u8>>),
    Missing,
    Interrupted,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HEADER_BYTES + payload.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align4(out.len()), 0);
        out
    }

    fn nest(kind: u16, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_attribute(&mut out, kind | 0x8000, inner);
        out
    }

    fn value(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_attribute(&mut out, NFTA_DATA_VALUE, bytes);
        out
    }

    #[test]
    fn acks_and_errors_are_told_apart() {
        let mut buf = header(NLMSG_ERROR, 3, &[0, 0, 0, 0, 1, 2, 3, 4]);
        buf.extend(header(NLMSG_ERROR, 4, &(-libc::EEXIST).to_ne_bytes()));
        let parsed = messages(&buf).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].seq, error_code(&parsed[0]).unwrap()), (3, 0));
        assert_eq!(
            (parsed[1].seq, error_code(&parsed[1]).unwrap()),
            (4, libc::EEXIST)
        );
    }

    #[test]
    fn a_length_beyond_the_buffer_is_an_error_not_a_panic() {
        let mut buf = header(NLMSG_DONE, 1, &[0; 4]);
        buf[0] = 200;
        assert!(matches!(messages(&buf), Err(NetlinkError::Decode(_))));
        assert!(matches!(
            attributes(&[9, 0, 1, 0]),
            Err(NetlinkError::Decode(_))
        ));
        let short = Message {
            kind: NLMSG_ERROR,
            flags: 0,
            seq: 0,
            payload: &[1],
        };
        assert!(error_code(&short).is_err());
    }

    #[test]
    fn set_elements_are_read_from_nested_attributes() {
        let mut element = nest(NFTA_SET_ELEM_KEY, &value(&[6, 0, 0, 0, 0, 80, 0, 0]));
        element.extend(nest(
            NFTA_SET_ELEM_DATA,
            &value(&[10, 0, 0, 1, 0x1f, 0x90, 0, 0]),
        ));
        let list = nest(NFTA_LIST_ELEM, &element);
        let mut payload = vec![libc::NFPROTO_INET as u8, 0, 0, 0];
        let mut table = Vec::new();
        push_attribute(&mut table, NFTA_SET_ELEM_LIST_TABLE, b"holepunch\0");
        payload.extend(table);
        payload.extend(nest(NFTA_SET_ELEM_LIST_ELEMENTS, &list));
        let elements = set_elements(&payload).unwrap();
        assert_eq!(
            elements,
            vec![(
                vec![6, 0, 0, 0, 0, 80, 0, 0],
                vec![10, 0, 0, 1, 0x1f, 0x90, 0, 0]
            )]
        );
    }

    #[test]
    fn a_rule_message_names_its_chain() {
        let mut payload = vec![libc::NFPROTO_INET as u8, 0, 0, 0];
        push_attribute(&mut payload, NFTA_RULE_TABLE, b"holepunch\0");
        push_attribute(&mut payload, NFTA_RULE_CHAIN, b"prerouting\0");
        assert_eq!(rule_chain(&payload).unwrap(), "prerouting");
        assert!(matches!(
            rule_chain(&payload[..4]),
            Err(NetlinkError::Decode(_))
        ));
        let request = get_rules_request(1, "holepunch", 2);
        let parsed = messages(&request).unwrap();
        assert_eq!(parsed[0].kind, (10 << 8) | libc::NFT_MSG_GETRULE as u16);
    }

    #[test]
    fn the_dump_request_names_table_and_set() {
        let request = get_elements_request(1, "holepunch", "targets4", 7);
        let parsed = messages(&request).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].kind, (10 << 8) | 13);
        assert_eq!(parsed[0].seq, 7);
        let attrs = attributes(&parsed[0].payload[NFGENMSG_BYTES..]).unwrap();
        assert_eq!(
            attrs,
            vec![
                (NFTA_SET_ELEM_LIST_TABLE, &b"holepunch\0"[..]),
                (NFTA_SET_ELEM_LIST_SET, &b"targets4\0"[..])
            ]
        );
    }
}
