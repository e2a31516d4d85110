//! SSDP search (UPnP Device Architecture 1.1 §1.3): the M-SEARCH request for an Internet
//! Gateway Device and the fields of its unicast answers. Sans-io; the socket lives in
//! [`super::discovery`].

/// The SSDP multicast group and port (UDA 1.1 §1.3.2).
pub const MULTICAST_TARGET: &str = "239.255.255.250:1900";

/// The SSDP port.
pub const PORT: u16 = 1900;

/// Search targets: IGD v1 and v2 root devices.
// NOTE: IGD:2 devices also answer IGD:1 searches (IGD:2 §2.1 backward compatibility), but some
// only answer their own version, so both are asked for.
pub const SEARCH_TARGETS: [&str; 2] = [
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
];

/// Largest SSDP answer read; longer datagrams are truncated by the socket and then refused.
pub const MAX_ANSWER_BYTES: usize = 2048;

/// Seconds a device may wait before answering (UDA 1.1: MX between 1 and 5).
pub const MX_SECS: u32 = 1;

/// Why an SSDP answer was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsdpError {
    #[error("the SSDP answer is not text")]
    NotText,
    #[error("the SSDP answer is not an HTTP/1.1 200 response")]
    NotOk,
    #[error("the SSDP answer has no LOCATION")]
    NoLocation,
}

/// The M-SEARCH datagram for `search_target`.
pub fn search_request(search_target: &str) -> String {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {MULTICAST_TARGET}\r\nMAN: \"ssdp:discover\"\r\n\
         MX: {MX_SECS}\r\nST: {search_target}\r\n\r\n"
    )
}

/// What an answer to M-SEARCH says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchAnswer {
    /// The description URL (untrusted until checked against the gateway).
    pub location: String,
    pub search_target: Option<String>,
    pub usn: Option<String>,
    /// BOOTID.UPNP.ORG: changes when the device reboots (UDA 1.1 §1.2.2).
    pub boot_id: Option<u32>,
}

/// Reads one answer datagram.
pub fn parse_answer(datagram: &[u8]) -> Result<SearchAnswer, SsdpError> {
    let text = std::str::from_utf8(datagram).map_err(|_| SsdpError::NotText)?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) || parts.next() != Some("200") {
        return Err(SsdpError::NotOk);
    }
    let mut location = None;
    let mut answer = SearchAnswer {
        location: String::new(),
        search_target: None,
        usn: None,
        boot_id: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_owned();
        match name.trim().to_ascii_uppercase().as_str() {
            "LOCATION" => location = Some(value),
            "ST" => answer.search_target = Some(value),
            "USN" => answer.usn = Some(value),
            "BOOTID.UPNP.ORG" => answer.boot_id = value.parse().ok(),
            _ => {}
        }
    }
    answer.location = location
        .filter(|location| !location.is_empty())
        .ok_or(SsdpError::NoLocation)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_request_is_a_well_formed_m_search() {
        let request = search_request(SEARCH_TARGETS[0]);
        assert!(request.starts_with("M-SEARCH * HTTP/1.1\r\n"));
        assert!(request.contains("\r\nMAN: \"ssdp:discover\"\r\n"));
        assert!(request.contains(&format!("\r\nST: {}\r\n", SEARCH_TARGETS[0])));
        assert!(request.ends_with("\r\n\r\n"));
    }

    #[test]
    fn answers_give_location_and_boot_id() {
        let answer = parse_answer(
            b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
              USN: uuid:abc::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n\
              location:  http://192.168.77.1:5000/rootDesc.xml \r\nBOOTID.UPNP.ORG: 7\r\n\r\n",
        )
        .unwrap();
        assert_eq!(answer.location, "http://192.168.77.1:5000/rootDesc.xml");
        assert_eq!(answer.boot_id, Some(7));
        assert_eq!(
            answer.usn.as_deref(),
            Some("uuid:abc::urn:schemas-upnp-org:device:InternetGatewayDevice:1")
        );
    }

    #[test]
    fn unusable_answers_are_errors() {
        assert_eq!(parse_answer(&[0xff, 0xfe]), Err(SsdpError::NotText));
        assert_eq!(
            parse_answer(b"NOTIFY * HTTP/1.1\r\nLOCATION: http://x/\r\n\r\n"),
            Err(SsdpError::NotOk)
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 404 Not Found\r\nLOCATION: http://x/\r\n\r\n"),
            Err(SsdpError::NotOk)
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION:\r\n\r\n"),
            Err(SsdpError::NoLocation)
        );
        assert_eq!(parse_answer(b""), Err(SsdpError::NotOk));
    }
}
