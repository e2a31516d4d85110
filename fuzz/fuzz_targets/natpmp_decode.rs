//! Fuzz target: the NAT-PMP response decoder (RFC 6886) must never panic.
#![no_main]

use holepunch::router::natpmp::codec::decode_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_response(data);
});
