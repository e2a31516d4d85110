//! PCP (RFC 6887): codec and client; IPv6 pinholes in [`v6`].

pub mod client;
pub mod codec;
pub mod v6;
