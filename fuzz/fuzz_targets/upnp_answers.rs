//! Fuzz target: what a UPnP router (or anyone answering SSDP) sends — SSDP answers, device
//! descriptions, SOAP replies — is untrusted; none of the parsers may panic.
#![no_main]

use holepunch::router::upnp::{description, soap, ssdp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ssdp::parse_answer(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = description::parse(text);
        let _ = soap::parse_reply(200, text, "GetSpecificPortMappingEntry");
        let _ = soap::parse_reply(500, text, "AddPortMapping");
    }
});
