//! IPv6 pinholes through UPnP IGDv2 (WANIPv6FirewallControl:1): with IPv6 there is no NAT to
//! map, only the router's firewall to open for one internal address and port. GetFirewallStatus,
//! AddPinhole, UpdatePinhole (renewal), DeletePinhole, CheckPinholeWorking and
//! GetPinholePackets over SOAP, to the router's IPv6 address and from this host's own (README,
//! "IPv6"). Building arguments and reading answers is sans-io and unit-tested;
//! [`PinholeClient`] owns the HTTP exchanges.
//!
//! Not used by the daemon yet: the state file does not keep UniqueIDs.
//!
//! A UniqueID names a pinhole only until the router restarts: miniupnpd 2.3.1 numbers them
//! from 1 again after a restart (measured in the lab), so a stored UniqueID may then name
//! another pinhole of this host. Renew with [`PinholeClient::update`] only while the router's
//! boot (BOOTID.UPNP.ORG) is the one the pinhole was added in; after a restart, add it again
//! ([`PinholeClient::add`] of the same pinhole returns its UniqueID).

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use super::description::{self, DescriptionError, FIREWALL_CONTROL_SERVICE};
use super::http::{self, HttpError, HttpUrl};
use super::soap::{self, Arguments, Fault, Reply, SoapError};
use crate::model::Protocol;

/// Longest lease asked for, and what a "permanent" one becomes: WANIPv6FirewallControl:1 has
/// no permanent pinholes, LeaseTime is 1 to 86400 seconds.
pub const MAX_LEASE_SECS: u32 = 86_400;

/// UPnP error codes of WANIPv6FirewallControl:1 (§2.4, the actions' error tables) and the
/// UDA ones it uses.
pub mod code {
    /// Invalid Args (UDA 1.1 §3.2.2).
    pub const INVALID_ARGS: u16 = 402;
    /// Action not authorized: secure mode (another host's address, or a port below 1024).
    pub const ACTION_NOT_AUTHORIZED: u16 = 606;
    pub const PINHOLE_SPACE_EXHAUSTED: u16 = 701;
    pub const FIREWALL_DISABLED: u16 = 702;
    pub const INBOUND_PINHOLE_NOT_ALLOWED: u16 = 703;
    pub const NO_SUCH_ENTRY: u16 = 704;
    pub const PROTOCOL_NOT_SUPPORTED: u16 = 705;
    pub const INTERNAL_PORT_WILDCARDING_NOT_ALLOWED: u16 = 706;
    pub const PROTOCOL_WILDCARDING_NOT_ALLOWED: u16 = 707;
    pub const WILDCARD_NOT_PERMITTED_IN_SRC_IP: u16 = 708;
    /// CheckPinholeWorking: no packet has used the pinhole yet.
    pub const NO_TRAFFIC_RECEIVED: u16 = 709;
}

/// Why a pinhole call failed.
#[derive(Debug, thiserror::Error)]
pub enum PinholeError {
    #[error(
        "the IGD description URL {url} does not name the router by an IPv6 address; IPv6 \
         pinholes are asked for over IPv6"
    )]
    DescriptionNotIpv6 { url: String },
    #[error("cannot fetch the IGD description {url}: {source}")]
    FetchDescription {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error("the IGD description {url} answered HTTP {status}")]
    DescriptionStatus { url: String, status: u16 },
    #[error("the IGD description {url} is unusable: {source}")]
    ReadDescription {
        url: String,
        #[source]
        source: DescriptionError,
    },
    #[error(
        "the router at {url} offers no WANIPv6FirewallControl:1 service (UPnP IGDv2 IPv6 \
         pinholes): use PCP over IPv6, or open the port in the router's IPv6 firewall by hand"
    )]
    NoFirewallService { url: String },
    #[error("the IGD description {url} has an unusable control URL: {source}")]
    ControlUrl {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error(
        "the WANIPv6FirewallControl control URL {control} is not on {pinned} (refused: answers \
         are pinned to the router)"
    )]
    ControlElsewhere { control: String, pinned: String },
    #[error("UPnP {action}: {source}")]
    Transport {
        action: &'static str,
        #[source]
        source: HttpError,
    },
    #[error("UPnP {action}: unreadable reply: {source}")]
    ReadReply {
        action: &'static str,
        #[source]
        source: SoapError,
    },
    #[error("UPnP {action}: unusable answer: {detail}")]
    UnusableAnswer {
        action: &'static str,
        detail: String,
    },
    #[error(
        "{action}: the router refused ({fault}): it opens IPv6 pinholes only to the host that \
         asks ({lan_address}) and only to ports 1024 and above (miniupnpd does so whatever its \
         secure mode); use exposure.mode = \"relay\", which asks for this host's own address"
    )]
    NotAuthorized {
        action: &'static str,
        fault: Fault,
        lan_address: Ipv6Addr,
    },
    #[error(
        "AddPinhole: the router has no room for another pinhole ({fault}); remove unused ones on the router"
    )]
    SpaceExhausted { fault: Fault },
    #[error("{action}: the router's IPv6 firewall is off ({fault}), so there is nothing to open")]
    FirewallDisabled { action: &'static str, fault: Fault },
    #[error(
        "{action}: the router does not allow inbound IPv6 pinholes ({fault}): allow them in the \
         router's IPv6 firewall settings, or use PCP"
    )]
    InboundNotAllowed { action: &'static str, fault: Fault },
    #[error("{action}: the router holds no pinhole with UniqueID {unique_id}")]
    NoSuchEntry {
        action: &'static str,
        unique_id: u16,
    },
    #[error("AddPinhole: the router does not open pinholes for {protocol} ({fault})")]
    ProtocolNotSupported { protocol: Protocol, fault: Fault },
    #[error("UPnP {action}: {fault}")]
    Refused { action: &'static str, fault: Fault },
}

/// A pinhole to ask for: any remote host and port may reach `internal_address`,
/// `internal_port` over `protocol`, for `lease_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinholeRequest {
    pub protocol: Protocol,
    pub internal_address: Ipv6Addr,
    pub internal_port: u16,
    /// 0 ("permanent") and anything above [`MAX_LEASE_SECS`] ask for [`MAX_LEASE_SECS`].
    pub lease_secs: u32,
}

/// A pinhole the router opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinhole {
    /// The router's name for it, valid until the router restarts (see the module doc).
    pub unique_id: u16,
    /// The lease asked for (the router does not say what it granted).
    pub lease_secs: u32,
}

impl Pinhole {
    /// When to renew: at half the lease.
    pub fn renew_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_secs / 2).max(1))
    }
}

/// GetFirewallStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirewallStatus {
    pub enabled: bool,
    pub inbound_pinhole_allowed: bool,
}

/// What CheckPinholeWorking says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinholeHealth {
    /// Traffic has passed through the pinhole.
    Working,
    /// The pinhole exists and no packet has used it yet (709).
    NoTrafficYet,
    /// The router did not say (no such action, an error, no answer): not a failure.
    Unknown(String),
}

/// The lease actually asked for `wanted` (see [`PinholeRequest::lease_secs`]).
pub fn lease_for(wanted: u32) -> u32 {
    match wanted {
        0 => MAX_LEASE_SECS,
        secs => secs.min(MAX_LEASE_SECS),
    }
}

/// AddPinhole's in-arguments, in the order of the service description.
// NOTE: Protocol is the IANA protocol number (WANIPv6FirewallControl:1, ui2): miniupnpd 2.3.1
// answers 705 ProtocolNotSupported to "TCP". InternalClient is written in RFC 5952 form:
// miniupnpd compares it as text with the caller's address (upnpsoap.c PinholeVerification),
// so `2001:0db8:77:0::10` for the caller 2001:db8:77::10 gets 606 (measured in the lab).
pub fn add_arguments(request: &PinholeRequest) -> Vec<(&'static str, String)> {
    vec![
        // An empty RemoteHost and RemotePort 0 are the wildcards: anyone may connect.
        ("RemoteHost", String::new()),
        ("RemotePort", "0".to_owned()),
        ("InternalClient", request.internal_address.to_string()),
        ("InternalPort", request.internal_port.to_string()),
        ("Protocol", request.protocol.iana_number().to_string()),
        ("LeaseTime", lease_for(request.lease_secs).to_string()),
    ]
}

/// The UniqueID of an AddPinhole answer.
pub fn unique_id(args: &Arguments) -> Result<u16, String> {
    let text = args.get("UniqueID").ok_or("no UniqueID")?;
    text.parse()
        .map_err(|_| format!("UniqueID {:?} is not a number from 0 to 65535", short(text)))
}

/// A GetFirewallStatus answer.
pub fn firewall_status(args: &Arguments) -> Result<FirewallStatus, String> {
    let flag = |name: &str| match args.get(name) {
        Some("1" | "true" | "yes") => Ok(true),
        Some("0" | "false" | "no") => Ok(false),
        Some(other) => Err(format!("{name} {:?} is not a boolean", short(other))),
        None => Err(format!("no {name}")),
    };
    Ok(FirewallStatus {
        enabled: flag("FirewallEnabled")?,
        inbound_pinhole_allowed: flag("InboundPinholeAllowed")?,
    })
}

/// What a CheckPinholeWorking reply says.
pub fn health(reply: &Reply) -> PinholeHealth {
    match reply {
        Reply::Success(args) => match args.get("IsWorking") {
            Some("1" | "true" | "yes") => PinholeHealth::Working,
            Some("0" | "false" | "no") => PinholeHealth::NoTrafficYet,
            other => PinholeHealth::Unknown(format!("IsWorking {:?}", other.map(short))),
        },
        // NOTE: miniupnpd 2.3.1 answers 709 (as "NoPacketSent") while no packet has passed;
        // with nftables it never counts any (GetPinholePackets 0 and 709 after traffic went
        // through, measured in the lab), so "no traffic yet" is no sign of a broken pinhole.
        Reply::Fault(fault) if fault.code == code::NO_TRAFFIC_RECEIVED => {
            PinholeHealth::NoTrafficYet
        }
        Reply::Fault(fault) => PinholeHealth::Unknown(fault.to_string()),
    }
}

/// The error a fault to `action` means; `protocol` is the one asked for (AddPinhole).
pub fn fault_error(
    action: &'static str,
    fault: Fault,
    unique_id: Option<u16>,
    protocol: Option<Protocol>,
    lan_address: Ipv6Addr,
) -> PinholeError {
    match (fault.code, unique_id, protocol) {
        (code::ACTION_NOT_AUTHORIZED, _, _) => PinholeError::NotAuthorized {
            action,
            fault,
            lan_address,
        },
        (code::PINHOLE_SPACE_EXHAUSTED, _, _) => PinholeError::SpaceExhausted { fault },
        (code::FIREWALL_DISABLED, _, _) => PinholeError::FirewallDisabled { action, fault },
        (code::INBOUND_PINHOLE_NOT_ALLOWED, _, _) => {
            PinholeError::InboundNotAllowed { action, fault }
        }
        (code::NO_SUCH_ENTRY, Some(unique_id), _) => {
            PinholeError::NoSuchEntry { action, unique_id }
        }
        (code::PROTOCOL_NOT_SUPPORTED, _, Some(protocol)) => {
            PinholeError::ProtocolNotSupported { protocol, fault }
        }
        _ => PinholeError::Refused { action, fault },
    }
}

fn short(text: &str) -> String {
    text.chars().take(64).collect()
}

/// A client of one router's WANIPv6FirewallControl:1 service, calling from `lan_address`.
#[derive(Debug, Clone)]
pub struct PinholeClient {
    control: HttpUrl,
    lan_address: Ipv6Addr,
    /// The interface index when the router's address is link-local, else 0.
    scope_id: u32,
    timeout: Duration,
}

impl PinholeClient {
    /// Reads the IGD description at `description` (whose host must be the router's IPv6
    /// address: see [`HttpUrl::with_host`] for the URL IPv4 discovery found) and finds the
    /// WANIPv6FirewallControl:1 service; every call goes from `lan_address`, the address the
    /// pinholes are for, and only to that same router address.
    pub async fn discover(
        description: &HttpUrl,
        lan_address: Ipv6Addr,
        timeout: Duration,
    ) -> Result<PinholeClient, PinholeError> {
        Self::discover_scoped(description, lan_address, 0, timeout).await
    }

    /// [`PinholeClient::discover`] for a router at a link-local address (README, "IPv6"): every
    /// connection is dialled on the interface with index `scope_id`.
    pub async fn discover_scoped(
        description: &HttpUrl,
        lan_address: Ipv6Addr,
        scope_id: u32,
        timeout: Duration,
    ) -> Result<PinholeClient, PinholeError> {
        let url = description.to_string();
        if description.ipv6().is_none() {
            return Err(PinholeError::DescriptionNotIpv6 { url });
        }
        let response = http::request_scoped(
            Some(IpAddr::V6(lan_address)),
            scope_id,
            description,
            "GET",
            &[],
            "",
            description::MAX_DESCRIPTION_BYTES,
            timeout,
        )
        .await
        .map_err(|source| PinholeError::FetchDescription {
            url: url.clone(),
            source,
        })?;
        if response.status != 200 {
            return Err(PinholeError::DescriptionStatus {
                url,
                status: response.status,
            });
        }
        let parsed =
            description::parse(&response.body).map_err(|source| PinholeError::ReadDescription {
                url: url.clone(),
                source,
            })?;
        let service = parsed
            .service(FIREWALL_CONTROL_SERVICE)
            .ok_or_else(|| PinholeError::NoFirewallService { url: url.clone() })?;
        let base = match &parsed.url_base {
            Some(base) => HttpUrl::parse(base).unwrap_or_else(|_| description.clone()),
            None => description.clone(),
        };
        let control =
            base.join(&service.control_url)
                .map_err(|source| PinholeError::ControlUrl {
                    url: url.clone(),
                    source,
                })?;
        if control.host != description.host || control.port != description.port {
            return Err(PinholeError::ControlElsewhere {
                control: control.to_string(),
                pinned: description.host.clone(),
            });
        }
        Ok(PinholeClient {
            control,
            lan_address,
            scope_id,
            timeout,
        })
    }

    /// The control URL the SOAP calls go to.
    pub fn control_url(&self) -> String {
        self.control.to_string()
    }

    /// The address the calls come from (and the only one secure-mode routers open).
    pub fn lan_address(&self) -> Ipv6Addr {
        self.lan_address
    }

    /// One SOAP action.
    async fn call(
        &self,
        action: &'static str,
        arguments: &[(&str, &str)],
    ) -> Result<Reply, PinholeError> {
        let body = soap::envelope(FIREWALL_CONTROL_SERVICE, action, arguments);
        let header = soap::action_header(FIREWALL_CONTROL_SERVICE, action);
        let response = http::request_scoped(
            Some(IpAddr::V6(self.lan_address)),
            self.scope_id,
            &self.control,
            "POST",
            &[
                ("Content-Type", "text/xml; charset=\"utf-8\""),
                ("SOAPAction", &header),
            ],
            &body,
            soap::MAX_REPLY_BYTES,
            self.timeout,
        )
        .await
        .map_err(|source| PinholeError::Transport { action, source })?;
        soap::parse_reply(response.status, &response.body, action)
            .map_err(|source| PinholeError::ReadReply { action, source })
    }

    /// GetFirewallStatus: whether the firewall is on and takes inbound pinholes.
    pub async fn firewall_status(&self) -> Result<FirewallStatus, PinholeError> {
        const ACTION: &str = "GetFirewallStatus";
        match self.call(ACTION, &[]).await? {
            Reply::Success(args) => {
                firewall_status(&args).map_err(|detail| PinholeError::UnusableAnswer {
                    action: ACTION,
                    detail,
                })
            }
            Reply::Fault(fault) => Err(fault_error(ACTION, fault, None, None, self.lan_address)),
        }
    }

    /// AddPinhole. Adding a pinhole the router holds already renews it and returns its
    /// UniqueID (WANIPv6FirewallControl:1, AddPinhole).
    // NOTE: miniupnpd 2.3.1 (upnppinhole.c upnp_add_inboundpinhole) counts the time twice when
    // it renews through AddPinhole: the lease then ends at 2 x uptime + LeaseTime (measured:
    // ts-1788 for LeaseTime 400 at uptime 694). Renew with `update`, which it gets right; fixed
    // in later miniupnpd.
    pub async fn add(&self, request: &PinholeRequest) -> Result<Pinhole, PinholeError> {
        const ACTION: &str = "AddPinhole";
        let arguments = add_arguments(request);
        let borrowed: Vec<(&str, &str)> = arguments
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        match self.call(ACTION, &borrowed).await? {
            Reply::Success(args) => Ok(Pinhole {
                unique_id: unique_id(&args).map_err(|detail| PinholeError::UnusableAnswer {
                    action: ACTION,
                    detail,
                })?,
                lease_secs: lease_for(request.lease_secs),
            }),
            Reply::Fault(fault) => Err(fault_error(
                ACTION,
                fault,
                None,
                Some(request.protocol),
                self.lan_address,
            )),
        }
    }

    /// UpdatePinhole: a new lease for the pinhole `unique_id`, counted from now.
    pub async fn update(&self, unique_id: u16, lease_secs: u32) -> Result<Pinhole, PinholeError> {
        const ACTION: &str = "UpdatePinhole";
        let lease_secs = lease_for(lease_secs);
        let (id, lease) = (unique_id.to_string(), lease_secs.to_string());
        match self
            .call(ACTION, &[("UniqueID", &id), ("NewLeaseTime", &lease)])
            .await?
        {
            Reply::Success(_) => Ok(Pinhole {
                unique_id,
                lease_secs,
            }),
            Reply::Fault(fault) if self.missing(&fault, unique_id).await => {
                Err(PinholeError::NoSuchEntry {
                    action: ACTION,
                    unique_id,
                })
            }
            Reply::Fault(fault) => Err(fault_error(
                ACTION,
                fault,
                Some(unique_id),
                None,
                self.lan_address,
            )),
        }
    }

    /// DeletePinhole; a pinhole that is already gone is success.
    pub async fn delete(&self, unique_id: u16) -> Result<(), PinholeError> {
        const ACTION: &str = "DeletePinhole";
        let id = unique_id.to_string();
        match self.call(ACTION, &[("UniqueID", &id)]).await? {
            Reply::Success(_) => Ok(()),
            Reply::Fault(fault) if self.missing(&fault, unique_id).await => Ok(()),
            Reply::Fault(fault) => Err(fault_error(
                ACTION,
                fault,
                Some(unique_id),
                None,
                self.lan_address,
            )),
        }
    }

    /// Whether `fault`, answered to a call about `unique_id`, means the router holds no such
    /// pinhole.
    // NOTE: miniupnpd 2.3.1 (nftables) answers 402 Invalid Args, not 704 NoSuchEntry, for a
    // UniqueID it does not hold: it reads the missing pinhole's address from uninitialised
    // memory and fails to resolve it (log: "Failed to convert hostname '...' to IP address").
    // A 402 to a well-formed call is therefore checked with GetPinholePackets, which answers
    // for a pinhole that exists.
    async fn missing(&self, fault: &Fault, unique_id: u16) -> bool {
        match fault.code {
            code::NO_SUCH_ENTRY => true,
            code::INVALID_ARGS => matches!(
                self.packets_reply(unique_id).await,
                Ok(Reply::Fault(Fault {
                    code: code::NO_SUCH_ENTRY | code::INVALID_ARGS,
                    ..
                }))
            ),
            _ => false,
        }
    }

    async fn packets_reply(&self, unique_id: u16) -> Result<Reply, PinholeError> {
        let id = unique_id.to_string();
        self.call("GetPinholePackets", &[("UniqueID", &id)]).await
    }

    /// CheckPinholeWorking: whether traffic has used the pinhole; anything the router does not
    /// say is [`PinholeHealth::Unknown`], not a failure (the action is optional).
    pub async fn check_working(&self, unique_id: u16) -> PinholeHealth {
        let id = unique_id.to_string();
        match self.call("CheckPinholeWorking", &[("UniqueID", &id)]).await {
            Ok(reply) => health(&reply),
            Err(err) => PinholeHealth::Unknown(err.to_string()),
        }
    }

    /// GetPinholePackets: how many packets have used the pinhole; `None` when the router does
    /// not say (the action is optional).
    pub async fn packets(&self, unique_id: u16) -> Option<u64> {
        match self.packets_reply(unique_id).await {
            Ok(Reply::Success(args)) => args.get("PinholePackets")?.parse().ok(),
            Ok(Reply::Fault(fault)) => {
                tracing::debug!(unique_id, %fault, "GetPinholePackets: no answer");
                None
            }
            Err(err) => {
                tracing::debug!(unique_id, error = %err, "GetPinholePackets failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);

    fn args(pairs: &[(&str, &str)]) -> Arguments {
        Arguments(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn fault(code: u16) -> Fault {
        Fault {
            code,
            description: "x".into(),
        }
    }

    #[test]
    fn add_arguments_are_wildcard_remote_canonical_client_and_iana_protocol() {
        let request = PinholeRequest {
            protocol: Protocol::Udp,
            internal_address: "2001:0db8:0077:0000::0010".parse().unwrap(),
            internal_port: 18600,
            lease_secs: 3600,
        };
        let expected: Vec<(&str, String)> = vec![
            ("RemoteHost", "".into()),
            ("RemotePort", "0".into()),
            ("InternalClient", "2001:db8:77::10".into()),
            ("InternalPort", "18600".into()),
            ("Protocol", "17".into()),
            ("LeaseTime", "3600".into()),
        ];
        assert_eq!(add_arguments(&request), expected);
        let tcp = PinholeRequest {
            protocol: Protocol::Tcp,
            ..request
        };
        assert_eq!(add_arguments(&tcp)[4].1, "6");
        // The envelope carries them in that order.
        let borrowed: Vec<(&str, &str)> = expected.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = soap::envelope(FIREWALL_CONTROL_SERVICE, "AddPinhole", &borrowed);
        let at = |name: &str| body.find(&format!("<{name}>")).unwrap();
        assert!(at("RemoteHost") < at("InternalClient") && at("Protocol") < at("LeaseTime"));
    }

    #[test]
    fn leases_are_one_day_at_most_and_never_permanent() {
        assert_eq!(lease_for(3600), 3600);
        assert_eq!(lease_for(1), 1);
        assert_eq!(lease_for(0), MAX_LEASE_SECS);
        assert_eq!(lease_for(MAX_LEASE_SECS + 1), MAX_LEASE_SECS);
        let pinhole = Pinhole {
            unique_id: 1,
            lease_secs: 3600,
        };
        assert_eq!(pinhole.renew_after(), Duration::from_secs(1800));
    }

    #[test]
    fn answers_parse_and_bad_ones_are_errors() {
        assert_eq!(unique_id(&args(&[("UniqueID", "7")])), Ok(7));
        for bad in ["", "-1", "65536", "x"] {
            assert!(unique_id(&args(&[("UniqueID", bad)])).is_err(), "{bad:?}");
        }
        assert!(unique_id(&args(&[])).is_err());
        assert_eq!(
            firewall_status(&args(&[
                ("FirewallEnabled", "1"),
                ("InboundPinholeAllowed", "0")
            ])),
            Ok(FirewallStatus {
                enabled: true,
                inbound_pinhole_allowed: false
            })
        );
        assert!(firewall_status(&args(&[("FirewallEnabled", "1")])).is_err());
        assert!(
            firewall_status(&args(&[
                ("FirewallEnabled", "maybe"),
                ("InboundPinholeAllowed", "1")
            ]))
            .is_err()
        );
    }

    #[test]
    fn health_is_working_no_traffic_or_unknown() {
        let ok = |value: &str| Reply::Success(args(&[("IsWorking", value)]));
        assert_eq!(health(&ok("1")), PinholeHealth::Working);
        assert_eq!(health(&ok("0")), PinholeHealth::NoTrafficYet);
        assert!(matches!(health(&ok("?")), PinholeHealth::Unknown(_)));
        assert_eq!(
            health(&Reply::Fault(fault(code::NO_TRAFFIC_RECEIVED))),
            PinholeHealth::NoTrafficYet
        );
        assert!(matches!(
            health(&Reply::Fault(fault(401))),
            PinholeHealth::Unknown(_)
        ));
    }

    #[test]
    fn faults_become_typed_errors() {
        let error =
            |code: u16| fault_error("AddPinhole", fault(code), Some(3), Some(Protocol::Tcp), LAN);
        match error(606) {
            err @ PinholeError::NotAuthorized { .. } => {
                let text = err.to_string();
                assert!(text.contains("2001:db8:77::10"), "{text}");
                assert!(text.contains("exposure.mode = \"relay\""), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(error(701), PinholeError::SpaceExhausted { .. }));
        assert!(matches!(error(702), PinholeError::FirewallDisabled { .. }));
        assert!(matches!(error(703), PinholeError::InboundNotAllowed { .. }));
        assert!(matches!(
            error(704),
            PinholeError::NoSuchEntry { unique_id: 3, .. }
        ));
        assert!(matches!(
            error(705),
            PinholeError::ProtocolNotSupported {
                protocol: Protocol::Tcp,
                ..
            }
        ));
        for other in [402, 501, 706, 707, 708] {
            assert!(
                matches!(error(other), PinholeError::Refused { fault, .. } if fault.code == other),
                "{other}"
            );
        }
    }
}
