//! NAT-PMP (RFC 6886): codec and client.

pub mod codec;
