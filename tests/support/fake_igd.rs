//! In-test fake UPnP Internet Gateway Devices for router behaviour miniupnpd cannot produce:
//! real SSDP answers over UDP and real SOAP over HTTP/1.1 on loopback, each fixture named after
//! the router quirk it reproduces. The fake keeps a mapping table (enough of WANIPConnection's
//! semantics for a client to map, renew, look up, list and delete) and records every call.
//!
//! Deliberately independent of holepunch's own XML and HTTP code: requests are read with plain
//! string searches, so a bug in the client's codec cannot hide behind the same bug here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

pub const WANIP1: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
pub const WANIP2: &str = "urn:schemas-upnp-org:service:WANIPConnection:2";
pub const WANPPP1: &str = "urn:schemas-upnp-org:service:WANPPPConnection:1";
/// IGDv2's IPv6 pinhole service.
pub const WANIP6FC: &str = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1";
pub const EXTERNAL_IP: &str = "198.51.100.7";
pub const UDN: &str = "uuid:fa4e0000-0000-4000-8000-00000000fa4e";

/// How the fake answers a finite lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasePolicy {
    /// Any lease is fine.
    Any,
    /// 725 OnlyPermanentLeasesSupported for a lease other than 0.
    OnlyPermanent725,
    /// 402 Invalid Args for a lease other than 0 (older IGDv1 firmware).
    InvalidArgs402,
}

/// What makes one fake router different from a well-behaved one.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Service types in the description, each with its own control URL.
    pub services: Vec<&'static str>,
    pub lease_policy: LeasePolicy,
    /// Wait before every SOAP reply.
    pub reply_delay: Duration,
    /// LOCATION sent in SSDP answers instead of the fake's own description URL.
    pub location: Option<String>,
    /// Bytes of padding the description claims and sends (a description bomb).
    pub description_bytes: Option<usize>,
    /// Answer the description GET with a redirect to this URL.
    pub redirect_to: Option<String>,
    /// Answer SSDP from a socket on this address instead of the one searched.
    pub answer_from: Option<Ipv4Addr>,
    /// GetSpecificPortMappingEntry still shows a mapping that DeletePortMapping says is gone
    /// (714): the mapping expired between the two calls.
    pub forgets_before_delete: bool,
    /// Descriptions go out as stored, unescaped (miniupnpd 2.3.1 appends stray memory to
    /// long ones, which may hold `<` or `&`).
    pub stray_bytes_in_descriptions: bool,
    /// A URLBase in the description (UDA 1.0), against which control URLs resolve.
    pub url_base: Option<String>,
    /// Services whose GetStatusInfo says `Disconnected` (the others say `Connected`).
    pub disconnected: Vec<&'static str>,
    /// Serve HTTP on [::1] instead of 127.0.0.1 (for the IPv6 pinhole client).
    pub ipv6: bool,
    /// DeletePinhole answers 402 Invalid Args and keeps the pinhole.
    pub delete_pinhole_402: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            services: vec![WANIP1],
            lease_policy: LeasePolicy::Any,
            reply_delay: Duration::ZERO,
            location: None,
            description_bytes: None,
            redirect_to: None,
            answer_from: None,
            forgets_before_delete: false,
            stray_bytes_in_descriptions: false,
            url_base: None,
            disconnected: Vec::new(),
            ipv6: false,
            delete_pinhole_402: false,
        }
    }
}

/// One SOAP call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The SOAPAction header, e.g. `"urn:...:WANIPConnection:1#AddPortMapping"` unquoted.
    pub soap_action: String,
    pub action: String,
    pub body: String,
}

impl Call {
    pub fn arg(&self, name: &str) -> Option<String> {
        arg(&self.body, name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMapping {
    pub client: String,
    pub internal_port: String,
    pub description: String,
    pub lease: String,
}

/// A pinhole the fake holds (WANIPv6FirewallControl).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePinhole {
    pub client: String,
    pub port: String,
    pub protocol: String,
    pub lease: String,
}

#[derive(Debug, Default)]
pub struct Recorded {
    /// UniqueID -> pinhole.
    pub pinholes: BTreeMap<u16, FakePinhole>,
    pub next_unique_id: u16,
    pub calls: Vec<Call>,
    /// (protocol, external port) -> mapping.
    pub mappings: BTreeMap<(String, u16), FakeMapping>,
    /// Connections accepted by the HTTP server.
    pub connections: usize,
}

pub struct FakeIgd {
    /// Where the fake's SSDP socket listens: the client's `Discovery::ssdp_target`.
    pub ssdp: SocketAddr,
    /// The fake's HTTP server.
    pub http: SocketAddr,
    pub recorded: Arc<Mutex<Recorded>>,
    /// SSDP searches received.
    pub searches: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeIgd {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The text between `<name>` and `</name>` (or "" for `<name/>`), unescaped.
pub fn arg(body: &str, name: &str) -> Option<String> {
    if body.contains(&format!("<{name}/>")) {
        return Some(String::new());
    }
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let end = start + body[start..].find(&format!("</{name}>"))?;
    Some(
        body[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl FakeIgd {
    /// A well-behaved IGDv1 router with WANIPConnection:1.
    pub async fn well_behaved() -> FakeIgd {
        FakeIgd::start(Behaviour::default()).await
    }

    /// IGDv1 firmware that takes only permanent leases and says so with 725.
    pub async fn only_permanent_leases_725() -> FakeIgd {
        FakeIgd::start(Behaviour {
            lease_policy: LeasePolicy::OnlyPermanent725,
            ..Behaviour::default()
        })
        .await
    }

    /// IGDv1 firmware that answers a finite lease with 402 Invalid Args.
    pub async fn invalid_args_402_for_finite_leases() -> FakeIgd {
        FakeIgd::start(Behaviour {
            lease_policy: LeasePolicy::InvalidArgs402,
            ..Behaviour::default()
        })
        .await
    }

    /// An IGDv2 router that offers only WANIPConnection:2.
    pub async fn wanip_v2_only() -> FakeIgd {
        FakeIgd::start(Behaviour {
            services: vec![WANIP2],
            ..Behaviour::default()
        })
        .await
    }

    /// A DSL modem with only a PPP connection (WANPPPConnection:1).
    pub async fn wanppp_only() -> FakeIgd {
        FakeIgd::start(Behaviour {
            services: vec![WANPPP1],
            ..Behaviour::default()
        })
        .await
    }

    /// A PPPoE router that lists a disconnected WANIPConnection:1 before the connected
    /// WANPPPConnection:1 that carries the traffic.
    pub async fn ppp_connected_beside_disconnected_ip() -> FakeIgd {
        FakeIgd::start(Behaviour {
            services: vec![WANIP1, WANPPP1],
            disconnected: vec![WANIP1],
            ..Behaviour::default()
        })
        .await
    }

    /// A router whose SOAP replies take `delay` (an overloaded or hung UPnP daemon).
    pub async fn slow_to_answer(delay: Duration) -> FakeIgd {
        FakeIgd::start(Behaviour {
            reply_delay: delay,
            ..Behaviour::default()
        })
        .await
    }

    /// SSDP answers whose LOCATION points at another host.
    pub async fn location_pointing_elsewhere(location: String) -> FakeIgd {
        FakeIgd::start(Behaviour {
            location: Some(location),
            ..Behaviour::default()
        })
        .await
    }

    /// A description of `bytes` bytes (a memory bomb).
    pub async fn huge_description(bytes: usize) -> FakeIgd {
        FakeIgd::start(Behaviour {
            description_bytes: Some(bytes),
            ..Behaviour::default()
        })
        .await
    }

    /// A description URL that redirects to `to`.
    pub async fn redirecting_description(to: String) -> FakeIgd {
        FakeIgd::start(Behaviour {
            redirect_to: Some(to),
            ..Behaviour::default()
        })
        .await
    }

    /// SSDP answers that come from `from`, not from the address searched.
    pub async fn answering_from(from: Ipv4Addr) -> FakeIgd {
        FakeIgd::start(Behaviour {
            answer_from: Some(from),
            ..Behaviour::default()
        })
        .await
    }

    /// A description whose URLBase sends the control calls to another host.
    pub async fn url_base_pointing_elsewhere(base: String) -> FakeIgd {
        FakeIgd::start(Behaviour {
            url_base: Some(base),
            ..Behaviour::default()
        })
        .await
    }

    /// Descriptions sent back unescaped, as miniupnpd 2.3.1 does with its stray bytes.
    pub async fn stray_bytes_in_descriptions() -> FakeIgd {
        FakeIgd::start(Behaviour {
            stray_bytes_in_descriptions: true,
            ..Behaviour::default()
        })
        .await
    }

    /// A mapping that expires between GetSpecificPortMappingEntry and DeletePortMapping.
    pub async fn forgets_before_delete() -> FakeIgd {
        FakeIgd::start(Behaviour {
            forgets_before_delete: true,
            ..Behaviour::default()
        })
        .await
    }

    pub async fn start(behaviour: Behaviour) -> FakeIgd {
        let http_host: IpAddr = if behaviour.ipv6 {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            Ipv4Addr::LOCALHOST.into()
        };
        let listener = TcpListener::bind((http_host, 0)).await.unwrap();
        let http = listener.local_addr().unwrap();
        let ssdp_socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let ssdp = ssdp_socket.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let searches = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(behaviour);

        let answer_socket = match behaviour.answer_from {
            Some(from) => Some(UdpSocket::bind((from, 0)).await.unwrap()),
            None => None,
        };
        let location = behaviour
            .location
            .clone()
            .unwrap_or_else(|| format!("http://{http}/rootDesc.xml"));
        let ssdp_task = {
            let searches = searches.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                while let Ok((len, from)) = ssdp_socket.recv_from(&mut buf).await {
                    let text = String::from_utf8_lossy(&buf[..len]);
                    if !text.starts_with("M-SEARCH * HTTP/1.1") {
                        continue;
                    }
                    searches.fetch_add(1, Ordering::SeqCst);
                    let st = text
                        .lines()
                        .find_map(|line| line.strip_prefix("ST: "))
                        .unwrap_or("upnp:rootdevice")
                        .trim()
                        .to_owned();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {st}\r\n\
                         USN: {UDN}::{st}\r\nEXT:\r\nSERVER: fake/1 UPnP/1.1 fake-igd/1\r\n\
                         LOCATION: {location}\r\nBOOTID.UPNP.ORG: 42\r\n\r\n"
                    );
                    let socket = answer_socket.as_ref().unwrap_or(&ssdp_socket);
                    let _ = socket.send_to(answer.as_bytes(), from).await;
                }
            })
        };
        let http_task = {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    recorded.lock().unwrap().connections += 1;
                    let recorded = recorded.clone();
                    let behaviour = behaviour.clone();
                    tokio::spawn(async move {
                        let _ = serve(stream, &behaviour, &recorded).await;
                    });
                }
            })
        };
        FakeIgd {
            ssdp,
            http,
            recorded,
            searches,
            tasks: vec![ssdp_task, http_task],
        }
    }

    /// The description URL.
    pub fn description_url(&self) -> String {
        format!("http://{}/rootDesc.xml", self.http)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.recorded.lock().unwrap().calls.clone()
    }

    pub fn connections(&self) -> usize {
        self.recorded.lock().unwrap().connections
    }

    pub fn mapping(&self, protocol: &str, port: u16) -> Option<FakeMapping> {
        self.recorded
            .lock()
            .unwrap()
            .mappings
            .get(&(protocol.to_owned(), port))
            .cloned()
    }

    pub fn pinhole(&self, unique_id: u16) -> Option<FakePinhole> {
        self.recorded
            .lock()
            .unwrap()
            .pinholes
            .get(&unique_id)
            .cloned()
    }

    /// A mapping someone else made.
    pub fn insert_mapping(&self, protocol: &str, port: u16, mapping: FakeMapping) {
        self.recorded
            .lock()
            .unwrap()
            .mappings
            .insert((protocol.to_owned(), port), mapping);
    }
}

/// A plain TCP listener that counts connections and never answers (a host that is not the
/// router, to prove nothing was fetched from it).
pub async fn counting_listener(address: IpAddr) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind((address, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let task = {
        let count = count.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        })
    };
    (addr, count, task)
}

fn description(behaviour: &Behaviour) -> String {
    let services: String = behaviour
        .services
        .iter()
        .enumerate()
        .map(|(index, kind)| {
            format!(
                "<service><serviceType>{kind}</serviceType><serviceId>urn:upnp-org:serviceId:c{index}</serviceId>\
                 <controlURL>/ctl/{index}</controlURL><eventSubURL>/evt/{index}</eventSubURL>\
                 <SCPDURL>/scpd/{index}.xml</SCPDURL></service>"
            )
        })
        .collect();
    let major = if behaviour.services.contains(&WANIP2) {
        2
    } else {
        1
    };
    let url_base = behaviour
        .url_base
        .as_ref()
        .map(|base| format!("<URLBase>{base}</URLBase>"))
        .unwrap_or_default();
    format!(
        "<?xml version=\"1.0\"?>\r\n<root xmlns=\"urn:schemas-upnp-org:device-1-0\">\
         <specVersion><major>1</major><minor>1</minor></specVersion>{url_base}<device>\
         <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:{major}</deviceType>\
         <friendlyName>fake</friendlyName><UDN>{UDN}</UDN><serviceList><service>\
         <serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>\
         <serviceId>urn:upnp-org:serviceId:L3F</serviceId><controlURL>/ctl/L3F</controlURL>\
         </service></serviceList><deviceList><device>\
         <deviceType>urn:schemas-upnp-org:device:WANDevice:{major}</deviceType><deviceList><device>\
         <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:{major}</deviceType>\
         <serviceList>{services}</serviceList></device></deviceList></device></deviceList>\
         </device></root>\r\n"
    )
}

fn fault(code: u16, description: &str) -> (u16, String) {
    (
        500,
        format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><s:Fault>\
             <faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>\
             <UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{code}</errorCode>\
             <errorDescription>{description}</errorDescription></UPnPError></detail></s:Fault>\
             </s:Body></s:Envelope>\r\n"
        ),
    )
}

fn success(
    behaviour: &Behaviour,
    service: &str,
    action: &str,
    args: &[(&str, String)],
) -> (u16, String) {
    let args: String = args
        .iter()
        .map(|(name, value)| {
            if behaviour.stray_bytes_in_descriptions && *name == "NewPortMappingDescription" {
                format!("<{name}>{value}</{name}>")
            } else {
                format!("<{name}>{}</{name}>", escape(value))
            }
        })
        .collect();
    (
        200,
        format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
             <u:{action}Response xmlns:u=\"{service}\">{args}</u:{action}Response></s:Body></s:Envelope>\r\n"
        ),
    )
}

/// The fake's WANIPConnection: `(status, body)` for one action.
fn control(
    behaviour: &Behaviour,
    recorded: &Mutex<Recorded>,
    service: &str,
    action: &str,
    body: &str,
) -> (u16, String) {
    let mut recorded = recorded.lock().unwrap();
    let key = |body: &str| -> Option<(String, u16)> {
        Some((
            arg(body, "NewProtocol")?,
            arg(body, "NewExternalPort")?.parse().ok()?,
        ))
    };
    match action {
        "GetStatusInfo" => {
            let status = if behaviour.disconnected.contains(&service) {
                "Disconnected"
            } else {
                "Connected"
            };
            success(
                behaviour,
                service,
                action,
                &[
                    ("NewConnectionStatus", status.to_owned()),
                    ("NewLastConnectionError", "ERROR_NONE".to_owned()),
                    ("NewUptime", "42".to_owned()),
                ],
            )
        }
        "GetFirewallStatus" => success(
            behaviour,
            service,
            action,
            &[
                ("FirewallEnabled", "1".to_owned()),
                ("InboundPinholeAllowed", "1".to_owned()),
            ],
        ),
        "AddPinhole" => {
            let (Some(client), Some(port), Some(protocol), Some(lease)) = (
                arg(body, "InternalClient"),
                arg(body, "InternalPort"),
                arg(body, "Protocol"),
                arg(body, "LeaseTime"),
            ) else {
                return fault(402, "Invalid Args");
            };
            let pinhole = FakePinhole {
                client,
                port,
                protocol,
                lease,
            };
            let same = |held: &FakePinhole| {
                (&held.client, &held.port, &held.protocol)
                    == (&pinhole.client, &pinhole.port, &pinhole.protocol)
            };
            let unique_id = match recorded.pinholes.iter().find(|(_, held)| same(held)) {
                Some((id, _)) => *id,
                None => {
                    recorded.next_unique_id += 1;
                    recorded.next_unique_id
                }
            };
            recorded.pinholes.insert(unique_id, pinhole);
            success(
                behaviour,
                service,
                action,
                &[("UniqueID", unique_id.to_string())],
            )
        }
        "UpdatePinhole" | "DeletePinhole" | "GetPinholePackets" | "CheckPinholeWorking" => {
            let Some(unique_id) = arg(body, "UniqueID").and_then(|id| id.parse::<u16>().ok())
            else {
                return fault(402, "Invalid Args");
            };
            if !recorded.pinholes.contains_key(&unique_id) {
                return fault(704, "NoSuchEntry");
            }
            match action {
                "UpdatePinhole" => {
                    let Some(lease) = arg(body, "NewLeaseTime") else {
                        return fault(402, "Invalid Args");
                    };
                    if let Some(held) = recorded.pinholes.get_mut(&unique_id) {
                        held.lease = lease;
                    }
                    success(behaviour, service, action, &[])
                }
                "DeletePinhole" if behaviour.delete_pinhole_402 => fault(402, "Invalid Args"),
                "DeletePinhole" => {
                    recorded.pinholes.remove(&unique_id);
                    success(behaviour, service, action, &[])
                }
                "GetPinholePackets" => success(
                    behaviour,
                    service,
                    action,
                    &[("PinholePackets", "3".to_owned())],
                ),
                _ => success(behaviour, service, action, &[("IsWorking", "1".to_owned())]),
            }
        }
        "GetExternalIPAddress" => success(
            behaviour,
            service,
            action,
            &[("NewExternalIPAddress", EXTERNAL_IP.to_owned())],
        ),
        "AddPortMapping" => {
            let (Some(key), Some(client), Some(port), Some(lease)) = (
                key(body),
                arg(body, "NewInternalClient"),
                arg(body, "NewInternalPort"),
                arg(body, "NewLeaseDuration"),
            ) else {
                return fault(402, "Invalid Args");
            };
            if lease != "0" {
                match behaviour.lease_policy {
                    LeasePolicy::Any => {}
                    LeasePolicy::OnlyPermanent725 => {
                        return fault(725, "OnlyPermanentLeasesSupported");
                    }
                    LeasePolicy::InvalidArgs402 => return fault(402, "Invalid Args"),
                }
            }
            if let Some(existing) = recorded.mappings.get(&key)
                && existing.client != client
            {
                return fault(718, "ConflictInMappingEntry");
            }
            let description = arg(body, "NewPortMappingDescription").unwrap_or_default();
            recorded.mappings.insert(
                key,
                FakeMapping {
                    client,
                    internal_port: port,
                    description,
                    lease,
                },
            );
            success(behaviour, service, action, &[])
        }
        "DeletePortMapping" => {
            let Some(key) = key(body) else {
                return fault(402, "Invalid Args");
            };
            if behaviour.forgets_before_delete {
                recorded.mappings.remove(&key);
                return fault(714, "NoSuchEntryInArray");
            }
            match recorded.mappings.remove(&key) {
                Some(_) => success(behaviour, service, action, &[]),
                None => fault(714, "NoSuchEntryInArray"),
            }
        }
        "GetSpecificPortMappingEntry" => {
            let Some(key) = key(body) else {
                return fault(402, "Invalid Args");
            };
            match recorded.mappings.get(&key) {
                Some(mapping) => success(
                    behaviour,
                    service,
                    action,
                    &[
                        ("NewInternalPort", mapping.internal_port.clone()),
                        ("NewInternalClient", mapping.client.clone()),
                        ("NewEnabled", "1".to_owned()),
                        ("NewPortMappingDescription", mapping.description.clone()),
                        ("NewLeaseDuration", mapping.lease.clone()),
                    ],
                ),
                None => fault(714, "NoSuchEntryInArray"),
            }
        }
        "GetGenericPortMappingEntry" => {
            let index: usize = arg(body, "NewPortMappingIndex")
                .and_then(|index| index.parse().ok())
                .unwrap_or(usize::MAX);
            match recorded.mappings.iter().nth(index) {
                Some(((protocol, port), mapping)) => success(
                    behaviour,
                    service,
                    action,
                    &[
                        ("NewRemoteHost", String::new()),
                        ("NewExternalPort", port.to_string()),
                        ("NewProtocol", protocol.clone()),
                        ("NewInternalPort", mapping.internal_port.clone()),
                        ("NewInternalClient", mapping.client.clone()),
                        ("NewEnabled", "1".to_owned()),
                        ("NewPortMappingDescription", mapping.description.clone()),
                        ("NewLeaseDuration", mapping.lease.clone()),
                    ],
                ),
                // NOTE: past the end: 713 SpecifiedArrayIndexInvalid, as WANIPConnection:1 specifies.
                None => fault(713, "SpecifiedArrayIndexInvalid"),
            }
        }
        _ => fault(401, "Invalid Action"),
    }
}

async fn serve(
    mut stream: TcpStream,
    behaviour: &Behaviour,
    recorded: &Mutex<Recorded>,
) -> std::io::Result<()> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            return Ok(());
        }
        received.extend_from_slice(&buf[..read]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|length| length.parse().ok())
        .unwrap_or(0);
    while received.len() < head_end + length {
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            break;
        }
        received.extend_from_slice(&buf[..read]);
    }
    let body = String::from_utf8_lossy(&received[head_end..]).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let path = words.next().unwrap_or_default().to_owned();

    if method == "GET" && path == "/rootDesc.xml" {
        if let Some(to) = &behaviour.redirect_to {
            let answer = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return stream.write_all(answer.as_bytes()).await;
        }
        if let Some(bytes) = behaviour.description_bytes {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n<root>"
            );
            stream.write_all(head.as_bytes()).await?;
            let padding = vec![b' '; 64 * 1024];
            let mut sent = 6;
            while sent < bytes {
                let n = padding.len().min(bytes - sent);
                stream.write_all(&padding[..n]).await?;
                sent += n;
            }
            return Ok(());
        }
        let body = description(behaviour);
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return stream.write_all(answer.as_bytes()).await;
    }
    let service_index = path
        .strip_prefix("/ctl/")
        .and_then(|index| index.parse::<usize>().ok());
    let (status, answer) = match (method.as_str(), service_index) {
        ("POST", Some(index)) if index < behaviour.services.len() => {
            let service = behaviour.services[index];
            let soap_action = header("soapaction")
                .unwrap_or_default()
                .trim_matches('"')
                .to_owned();
            let action = soap_action
                .split_once('#')
                .map(|(_, action)| action.to_owned())
                .unwrap_or_default();
            recorded.lock().unwrap().calls.push(Call {
                soap_action: soap_action.clone(),
                action: action.clone(),
                body: body.clone(),
            });
            if !behaviour.reply_delay.is_zero() {
                tokio::time::sleep(behaviour.reply_delay).await;
            }
            if !soap_action.starts_with(service) {
                fault(401, "Invalid Action")
            } else {
                control(behaviour, recorded, service, &action, &body)
            }
        }
        _ => (404, String::new()),
    };
    let reason = if status == 200 { "OK" } else { "Error" };
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    stream.write_all(answer.as_bytes()).await
}
