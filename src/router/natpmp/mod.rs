//! NAT-PMP (RFC 6886): codec and client.

pub mod client;
pub mod codec;

pub use client::NatpmpClient;
