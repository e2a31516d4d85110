//! Fuzz target: router announcements (PCP ANNOUNCE, NAT-PMP) arrive from anyone on the LAN
//! at 224.0.0.1:5350; their decoder must never panic.
#![no_main]

use holepunch::router::announce::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data);
});
