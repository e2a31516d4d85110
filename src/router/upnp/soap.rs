//! SOAP 1.1 as UPnP control uses it (UPnP Device Architecture 1.1 §3.2): building an action's
//! request envelope and reading the reply, either the action's out-arguments or a `UPnPError`
//! fault. Sans-io: strings in, strings out. Error codes are those of WANIPConnection:2 §2.5.

use super::xml::{self, Element, XmlError};

/// Largest SOAP reply read (a GetGenericPortMappingEntry reply is under 1 KiB).
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// UPnP error codes holepunch acts on.
pub mod code {
    /// Invalid Args; also what some IGDv1 routers answer a non-zero lease with.
    // NOTE: some IGDv1 routers answer a finite lease with 402 instead of 725 (README.md,
    // "Router protocols"): treated as 725.
    pub const INVALID_ARGS: u16 = 402;
    /// Action not authorized (miniupnpd: the permission rules refuse the ports, e.g. < 1024).
    pub const ACTION_NOT_AUTHORIZED: u16 = 606;
    /// SpecifiedArrayIndexInvalid: GetGenericPortMappingEntry past the end.
    pub const ARRAY_INDEX_INVALID: u16 = 713;
    /// NoSuchEntryInArray: GetSpecificPortMappingEntry / DeletePortMapping of a missing mapping.
    pub const NO_SUCH_ENTRY: u16 = 714;
    /// ConflictInMappingEntry: held by another client, or secure mode refusing another host.
    pub const CONFLICT_IN_MAPPING_ENTRY: u16 = 718;
    /// OnlyPermanentLeasesSupported.
    pub const ONLY_PERMANENT_LEASES: u16 = 725;
}

/// Why a reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SoapError {
    #[error("the SOAP reply is not valid XML: {0}")]
    ParseReply(#[source] XmlError),
    #[error("the SOAP reply has no {action}Response element")]
    MissingResponse { action: String },
    #[error("HTTP status {status} without a UPnP fault")]
    HttpStatus { status: u16 },
    #[error("the UPnP fault has no usable errorCode")]
    FaultCode,
}

/// A UPnP error the router answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub code: u16,
    pub description: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UPnP error {} ({})", self.code, self.description)
    }
}

/// The out-arguments of a successful action, in reply order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Arguments(pub Vec<(String, String)>);

impl Arguments {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What the router answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Success(Arguments),
    Fault(Fault),
}

/// The value of the `SOAPAction` header for `action` of `service_type`.
pub fn action_header(service_type: &str, action: &str) -> String {
    format!("\"{service_type}#{action}\"")
}

/// The request envelope for `action` of `service_type` with `arguments` in order (UPnP
/// requires the order of the service description; callers pass them that way).
pub fn envelope(service_type: &str, action: &str, arguments: &[(&str, &str)]) -> String {
    let mut body = String::new();
    for (name, value) in arguments {
        body.push_str(&format!("<{name}>{}</{name}>", xml::escape(value)));
    }
    format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{}\">{body}</u:{action}></s:Body></s:Envelope>\r\n",
        xml::escape(service_type)
    )
}

fn fault(root: &Element) -> Result<Option<Fault>, SoapError> {
    let Some(error) = root.find("UPnPError") else {
        return Ok(None);
    };
    let code = error
        .child_text("errorCode")
        .and_then(|text| text.parse().ok())
        .ok_or(SoapError::FaultCode)?;
    let description = error
        .child_text("errorDescription")
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    Ok(Some(Fault { code, description }))
}

/// Reads the reply to `action` that came with HTTP `status`.
pub fn parse_reply(status: u16, body: &str, action: &str) -> Result<Reply, SoapError> {
    let root = match xml::parse(body) {
        Ok(root) => root,
        Err(_) if status != 200 => return Err(SoapError::HttpStatus { status }),
        Err(err) => return Err(SoapError::ParseReply(err)),
    };
    // NOTE: UDA 1.1 §3.2.2 says faults come with HTTP 500; some routers send them with 200.
    if let Some(fault) = fault(&root)? {
        return Ok(Reply::Fault(fault));
    }
    if status != 200 {
        return Err(SoapError::HttpStatus { status });
    }
    let response_name = format!("{action}Response");
    let response = root
        .find(&response_name)
        .ok_or_else(|| SoapError::MissingResponse {
            action: action.to_owned(),
        })?;
    Ok(Reply::Success(Arguments(
        response
            .children
            .iter()
            .map(|child| (child.name.clone(), child.text.trim().to_owned()))
            .collect(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANIP1: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";

    #[test]
    fn envelope_carries_escaped_arguments_in_order() {
        let body = envelope(
            WANIP1,
            "AddPortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "8080"),
                ("NewPortMappingDescription", "holepunch:a&b/<c>"),
            ],
        );
        let root = xml::parse(&body).unwrap();
        let action = root.find("AddPortMapping").unwrap();
        let names: Vec<&str> = action.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "NewRemoteHost",
                "NewExternalPort",
                "NewPortMappingDescription"
            ]
        );
        assert_eq!(
            action.child_text("NewPortMappingDescription"),
            Some("holepunch:a&b/<c>")
        );
        assert!(body.contains(&format!("xmlns:u=\"{WANIP1}\"")));
        assert_eq!(
            action_header(WANIP1, "AddPortMapping"),
            format!("\"{WANIP1}#AddPortMapping\"")
        );
    }

    #[test]
    fn success_reply_gives_out_arguments() {
        let body = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">
<NewExternalIPAddress>11.22.33.44</NewExternalIPAddress>
</u:GetExternalIPAddressResponse></s:Body></s:Envelope>"#;
        let Reply::Success(args) = parse_reply(200, body, "GetExternalIPAddress").unwrap() else {
            panic!("not a success");
        };
        assert_eq!(args.get("NewExternalIPAddress"), Some("11.22.33.44"));
        assert_eq!(args.get("Missing"), None);
    }

    #[test]
    fn fault_reply_gives_the_upnp_error() {
        let body = r#"<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>
<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>
<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError>
</detail></s:Fault></s:Body></s:Envelope>"#;
        let expected = Reply::Fault(Fault {
            code: code::CONFLICT_IN_MAPPING_ENTRY,
            description: "ConflictInMappingEntry".into(),
        });
        assert_eq!(parse_reply(500, body, "AddPortMapping").unwrap(), expected);
        // Some routers send the fault with 200.
        assert_eq!(parse_reply(200, body, "AddPortMapping").unwrap(), expected);
    }

    #[test]
    fn unusable_replies_are_errors() {
        assert_eq!(
            parse_reply(500, "<html>oops", "AddPortMapping"),
            Err(SoapError::HttpStatus { status: 500 })
        );
        assert!(matches!(
            parse_reply(200, "<html>oops", "AddPortMapping"),
            Err(SoapError::ParseReply(_))
        ));
        assert_eq!(
            parse_reply(200, "<Envelope><Body/></Envelope>", "AddPortMapping"),
            Err(SoapError::MissingResponse {
                action: "AddPortMapping".into()
            })
        );
        assert_eq!(
            parse_reply(
                500,
                "<e><UPnPError><errorCode>99999999</errorCode></UPnPError></e>",
                "X"
            ),
            Err(SoapError::FaultCode)
        );
        assert_eq!(
            parse_reply(404, "<e/>", "X"),
            Err(SoapError::HttpStatus { status: 404 })
        );
    }
}
