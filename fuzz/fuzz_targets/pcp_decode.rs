//! Fuzz target: the PCP response decoder (RFC 6887) and the nonce text parser must never
//! panic, and what they accept must survive a round trip.
#![no_main]

use holepunch::router::pcp::codec::{Nonce, ResponseBody, decode_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(response) = decode_response(data)
        && let ResponseBody::Map(map) = &response.body
    {
        assert_eq!(map.nonce.to_string().parse::<Nonce>(), Ok(map.nonce));
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(nonce) = text.parse::<Nonce>()
    {
        assert!(nonce.to_string().eq_ignore_ascii_case(text));
    }
});
