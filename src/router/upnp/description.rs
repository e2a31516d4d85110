//! The IGD device description (UPnP Device Architecture 1.1 §2.3, IGD:1 and IGD:2): which
//! WAN connection services the router offers and where their control URLs are. Sans-io.

use super::xml::{self, XmlError};

/// Largest description read: real IGD descriptions are 3-10 KiB.
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;

/// WAN connection services in order of preference (README.md, "Router protocols").
pub const PREFERRED_SERVICES: [&str; 3] = [
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
];

/// The IGDv2 service that opens IPv6 pinholes (WANIPv6FirewallControl:1 §1).
pub const FIREWALL_CONTROL_SERVICE: &str = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1";

/// Why a description is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptionError {
    #[error("the device description is not valid XML: {0}")]
    ParseXml(#[source] XmlError),
    #[error("the device description is not a UPnP <root>")]
    NotRoot,
}

/// A service of the device tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub service_type: String,
    /// As written in the description: absolute, or relative to URLBase / the LOCATION.
    pub control_url: String,
}

/// What holepunch reads from a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The root device's UDN (`uuid:...`), which identifies the router across restarts.
    pub udn: Option<String>,
    /// UDA 1.0 URLBase (deprecated in 1.1, still sent by some routers).
    pub url_base: Option<String>,
    pub services: Vec<Service>,
}

impl Description {
    /// The preferred WAN connection service (WANIPConnection:2, :1, WANPPPConnection:1).
    pub fn wan_service(&self) -> Option<&Service> {
        self.wan_services().into_iter().next()
    }

    /// Every WAN connection service with a control URL, most preferred first (a router may
    /// list several, of which only one is connected).
    pub fn wan_services(&self) -> Vec<&Service> {
        PREFERRED_SERVICES
            .iter()
            .flat_map(|wanted| {
                self.services.iter().filter(move |service| {
                    service.service_type == *wanted && !service.control_url.is_empty()
                })
            })
            .collect()
    }

    /// The first service of `service_type` with a control URL.
    pub fn service(&self, service_type: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|service| service.service_type == service_type && !service.control_url.is_empty())
    }
}

pub fn parse(body: &str) -> Result<Description, DescriptionError> {
    let root = xml::parse(body).map_err(DescriptionError::ParseXml)?;
    if root.name != "root" {
        return Err(DescriptionError::NotRoot);
    }
    let mut found = Vec::new();
    root.descendants("service", &mut found);
    let services = found
        .into_iter()
        .filter_map(|service| {
            Some(Service {
                service_type: service.child_text("serviceType")?.to_owned(),
                control_url: service.child_text("controlURL")?.to_owned(),
            })
        })
        .collect();
    Ok(Description {
        udn: root
            .child("device")
            .and_then(|device| device.child_text("UDN"))
            .filter(|udn| !udn.is_empty())
            .map(str::to_owned),
        url_base: root
            .child_text("URLBase")
            .filter(|base| !base.is_empty())
            .map(str::to_owned),
        services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn igd(services: &[(&str, &str)]) -> String {
        let services: String = services
            .iter()
            .map(|(kind, url)| {
                format!(
                    "<service><serviceType>{kind}</serviceType><serviceId>x</serviceId>\
                     <controlURL>{url}</controlURL></service>"
                )
            })
            .collect();
        format!(
            "<?xml version=\"1.0\"?><root xmlns=\"urn:schemas-upnp-org:device-1-0\">\
             <specVersion><major>1</major><minor>1</minor></specVersion><device>\
             <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>\
             <UDN>uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b</UDN><deviceList><device>\
             <deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType><deviceList><device>\
             <serviceList>{services}</serviceList></device></deviceList></device></deviceList>\
             </device></root>"
        )
    }

    #[test]
    fn prefers_wanip2_then_wanip1_then_ppp() {
        let all = igd(&[
            (PREFERRED_SERVICES[2], "/ppp"),
            (PREFERRED_SERVICES[1], "/ip1"),
            (PREFERRED_SERVICES[0], "/ip2"),
        ]);
        let description = parse(&all).unwrap();
        assert_eq!(description.wan_service().unwrap().control_url, "/ip2");
        assert_eq!(
            description.udn.as_deref(),
            Some("uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b")
        );
        let v1 = parse(&igd(&[
            (PREFERRED_SERVICES[2], "/ppp"),
            (PREFERRED_SERVICES[1], "/ip1"),
        ]))
        .unwrap();
        assert_eq!(v1.wan_service().unwrap().control_url, "/ip1");
        let ppp = parse(&igd(&[
            ("urn:schemas-upnp-org:service:Layer3Forwarding:1", "/l3f"),
            (PREFERRED_SERVICES[2], "/ppp"),
        ]))
        .unwrap();
        assert_eq!(ppp.wan_service().unwrap().control_url, "/ppp");
        let order: Vec<&str> = description
            .wan_services()
            .iter()
            .map(|service| service.control_url.as_str())
            .collect();
        assert_eq!(order, ["/ip2", "/ip1", "/ppp"]);
        assert_eq!(description.service(FIREWALL_CONTROL_SERVICE), None);
        let v6 = parse(&igd(&[
            (PREFERRED_SERVICES[0], "/ip2"),
            (FIREWALL_CONTROL_SERVICE, "/ctl/IP6FCtl"),
        ]))
        .unwrap();
        assert_eq!(
            v6.service(FIREWALL_CONTROL_SERVICE).unwrap().control_url,
            "/ctl/IP6FCtl"
        );
        let none = parse(&igd(&[(
            "urn:schemas-upnp-org:service:Layer3Forwarding:1",
            "/l3f",
        )]))
        .unwrap();
        assert_eq!(none.wan_service(), None);
    }

    #[test]
    fn bad_descriptions_are_errors() {
        assert!(matches!(parse("<html/>"), Err(DescriptionError::NotRoot)));
        assert!(matches!(
            parse("<root><device>"),
            Err(DescriptionError::ParseXml(_))
        ));
        // A service without a control URL is skipped, not a panic.
        let partial = parse(
            "<root><device><serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType></service></serviceList></device></root>",
        )
        .unwrap();
        assert!(partial.services.is_empty());
    }
}
