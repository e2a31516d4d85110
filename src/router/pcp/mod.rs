//! PCP (RFC 6887): codec and client.

pub mod client;
pub mod codec;
