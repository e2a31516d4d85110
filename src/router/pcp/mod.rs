//! PCP (RFC 6887): codec and client.

pub mod codec;
