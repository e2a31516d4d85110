//! UPnP IGD backend (UPnP Device Architecture 1.1; IGD:1 and IGD:2, WANIPConnection:1/:2 and
//! WANPPPConnection:1): discovery pinned to the gateway, then AddPortMapping,
//! DeletePortMapping, GetSpecificPortMappingEntry, GetGenericPortMappingEntry and
//! GetExternalIPAddress over SOAP. It owns the router quirks README.md lists in "Router protocols"
//! (725/402 permanent-only leases, 718 conflict vs secure mode, 606 low ports, 714 on delete)
//! and the ownership rule: it changes or deletes only mappings tagged for their owner.
//!
//! igd-next 0.18 is not used: its search takes an answer from any LAN host (LOCATION must
//! match the responder, not the configured gateway), its 1 MiB body cap and 10 s request
//! timeout are fixed, its AddPortMapping needs the service's SCPD fetched first, and it has no
//! GetSpecificPortMappingEntry. The small pieces here (a strict HTTP/1.1 client, an XML reader
//! that refuses DOCTYPE, sans-io SOAP, SSDP and description codecs) keep every limit in one
//! place and under test.

pub mod description;
pub mod discovery;
pub mod http;
pub mod pinhole;
pub mod soap;
pub mod ssdp;
pub mod xml;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use discovery::Discovery;

use crate::model::{Backend, Lease, MappingKey, Owner, Protocol};
use crate::router::{Grant, MapRequest, PortMapper, RouterError};
use http::{HttpError, HttpUrl};
use soap::{Arguments, Fault, Reply, code};

/// Most entries `list` reads (a home router holds tens; a loop that never ends is a bug).
pub const MAX_LISTED_ENTRIES: u32 = 4096;

/// Unreadable entries `list` skips in a row before it gives up.
const MAX_UNREADABLE_ENTRIES_IN_A_ROW: u32 = 3;

/// Why no usable IGD was found.
#[derive(Debug, thiserror::Error)]
pub enum UpnpError {
    #[error("router.igd_url: {0}; write it as http://<router address>:<port>/<description path>")]
    IgdUrl(#[source] HttpError),
    #[error("cannot open the SSDP socket on {address}: {source}; check exposure.lan_address")]
    Bind {
        address: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send the SSDP search to {target}: {source}")]
    Search {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no UPnP IGD answered from {gateway} within {waited_ms} ms{ignored}: enable UPnP on the \
         router, set router.address if {gateway} is not the router, set router.igd_url to its \
         description URL, or use router.backend = \"pcp\" or \"natpmp\""
    )]
    NoGateway {
        gateway: Ipv4Addr,
        waited_ms: u128,
        ignored: String,
    },
    #[error("cannot fetch the IGD description {url}: {source}")]
    FetchDescription {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error("the IGD description {url} answered HTTP {status}; check router.igd_url")]
    DescriptionStatus { url: String, status: u16 },
    #[error("the IGD description {url} is unusable: {source}")]
    ReadDescription {
        url: String,
        #[source]
        source: description::DescriptionError,
    },
    #[error(
        "the device at {url} offers no WANIPConnection or WANPPPConnection service: it is not an \
         Internet gateway, or its UPnP port forwarding is off"
    )]
    NoWanService { url: String },
    #[error("the IGD description {url} has an unusable control URL: {source}")]
    ControlUrl {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error(
        "the IGD control URL {control} is not on {pinned} (refused: answers are pinned to the router)"
    )]
    ControlElsewhere { control: String, pinned: String },
}

/// One mapping as the router lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMappingEntry {
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal_client: Ipv4Addr,
    pub internal_port: u16,
    pub enabled: bool,
    pub description: String,
    /// Seconds left (0: permanent).
    pub lease_secs: u32,
}

impl PortMappingEntry {
    /// Reads an entry from GetSpecificPortMappingEntry (`protocol` and `external_port` are the
    /// ones asked for) or GetGenericPortMappingEntry (they are in the reply).
    pub fn from_arguments(
        args: &Arguments,
        asked: Option<(Protocol, u16)>,
    ) -> Result<PortMappingEntry, String> {
        let field = |name: &str| args.get(name).ok_or_else(|| format!("no {name}"));
        let (protocol, external_port) = match asked {
            Some(asked) => asked,
            None => {
                let protocol = match field("NewProtocol")?.to_ascii_uppercase().as_str() {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    other => return Err(format!("protocol {other:?}")),
                };
                let port = field("NewExternalPort")?;
                let port = port
                    .parse()
                    .map_err(|_| format!("external port {port:?}"))?;
                (protocol, port)
            }
        };
        let client = field("NewInternalClient")?;
        let port = field("NewInternalPort")?;
        let lease = field("NewLeaseDuration").unwrap_or("0");
        Ok(PortMappingEntry {
            protocol,
            external_port,
            internal_client: client
                .parse()
                .map_err(|_| format!("internal client {client:?}"))?,
            internal_port: port
                .parse()
                .map_err(|_| format!("internal port {port:?}"))?,
            enabled: matches!(args.get("NewEnabled"), Some("1" | "true" | "yes") | None),
            description: args
                .get("NewPortMappingDescription")
                .unwrap_or_default()
                .to_owned(),
            lease_secs: lease.parse().map_err(|_| format!("lease {lease:?}"))?,
        })
    }
}

/// Longest description written: routers are known to keep 63 bytes intact (see
/// [`description_for`]).
pub const MAX_DESCRIPTION_BYTES: usize = 63;

/// The description holepunch writes on `owner`'s mappings: its tag
/// (`holepunch:<namespace>/<service>`) when that fits in [`MAX_DESCRIPTION_BYTES`], else the
/// tag's first 54 bytes, `~` and 8 hex digits of a hash of the whole tag.
// NOTE: measured on miniupnpd 2.3.1 (nftables backend): descriptions up to 63 bytes come back
// intact; longer ones come back as their first 64 bytes followed by 6 bytes of stray memory
// (a heap pointer), which a reader cannot match and may not even parse. A description that
// fits is read back as written, and the hash keeps two long tags with the same start apart.
// Compare router descriptions with this function (or [`description_matches`]), not with
// `Owner::from_tag`, which cannot read the shortened form back.
pub fn description_for(owner: &Owner) -> String {
    let tag = owner.tag();
    if tag.len() <= MAX_DESCRIPTION_BYTES {
        return tag;
    }
    // FNV-1a, 32 bits: stable across builds and platforms, unlike `DefaultHasher`.
    let hash = tag.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    let mut cut = MAX_DESCRIPTION_BYTES - 9;
    while !tag.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:08x}", &tag[..cut])
}

/// Whether a description read back from the router is the one holepunch writes for `owner`.
pub fn description_matches(stored: &str, owner: &Owner) -> bool {
    stored == description_for(owner)
}

/// When to renew a lease of `lease_secs`: at half of it; never for a permanent one.
pub fn renew_after(lease_secs: u32) -> Option<Duration> {
    (lease_secs > 0).then(|| Duration::from_secs(u64::from(lease_secs / 2).max(1)))
}

/// What a failed AddPortMapping means, once 718 has been looked into (`holder`: what the
/// router holds on that port, if anything).
pub fn add_error(
    fault: &Fault,
    request: &MapRequest,
    lan_address: Ipv4Addr,
    holder: Option<&PortMappingEntry>,
) -> RouterError {
    let (port, protocol) = (request.external_port, request.protocol);
    match fault.code {
        code::CONFLICT_IN_MAPPING_ENTRY => match holder {
            Some(entry) => RouterError::Conflict {
                port,
                protocol,
                detail: format!(
                    "{} holds it ({}:{}, description {:?})",
                    entry.internal_client,
                    entry.internal_client,
                    entry.internal_port,
                    entry.description
                ),
            },
            // NOTE: miniupnpd 2.3.1 (upnpsoap.c AddPortMapping) answers 718 when secure mode
            // refuses an InternalClient other than the caller; nothing holds the port then.
            None if request.internal.address != lan_address => RouterError::Refused {
                reason: format!(
                    "the router's UPnP secure mode maps ports only to the host that asks \
                     ({lan_address}), not to {}: set exposure.mode = \"relay\" (or turn secure \
                     mode off on the router)",
                    request.internal.address
                ),
                retry_after: None,
            },
            None => RouterError::Refused {
                reason: format!("{fault} although nothing holds port {port}/{protocol}"),
                retry_after: None,
            },
        },
        // NOTE: miniupnpd answers 606 when its permission rules refuse the ports; routers'
        // default rules allow only 1024-65535 (OpenWrt's upnpd config).
        code::ACTION_NOT_AUTHORIZED => RouterError::Refused {
            reason: format!(
                "{fault}: the router refuses to map port {port}/{protocol} (most routers refuse \
                 ports below 1024 over UPnP): map an external port of 1024 or above, or allow it \
                 in the router's UPnP settings"
            ),
            retry_after: None,
        },
        _ => RouterError::Refused {
            reason: format!("AddPortMapping {port}/{protocol}: {fault}"),
            retry_after: None,
        },
    }
}

/// A UPnP IGD client bound to one router's WAN connection service.
#[derive(Debug)]
pub struct UpnpClient {
    gateway: Ipv4Addr,
    lan_address: Ipv4Addr,
    control: HttpUrl,
    service_type: String,
    udn: Option<String>,
    boot_id: Option<u32>,
    request_timeout: Duration,
    /// The router refused finite leases (725 or 402): every lease is 0 from then on.
    permanent_only: bool,
    /// Mappings this client created or renewed, whose ownership is known.
    mapped: HashSet<(Protocol, u16)>,
    /// The router's external address as last asked (at the first grant and every verify).
    external: Option<Ipv4Addr>,
}

impl UpnpClient {
    /// SSDP M-SEARCH from `lan_address`, following only answers from `gateway` whose LOCATION
    /// points at it; or, with `igd_url`, that description (no discovery). Picks
    /// WANIPConnection:2, else :1, else WANPPPConnection:1; of several, the first whose
    /// GetStatusInfo says `Connected`.
    pub async fn discover(
        gateway: Ipv4Addr,
        lan_address: Ipv4Addr,
        igd_url: Option<&str>,
    ) -> Result<UpnpClient, UpnpError> {
        UpnpClient::discover_with(&Discovery::default(), gateway, lan_address, igd_url).await
    }

    /// [`UpnpClient::discover`] with explicit search options.
    pub async fn discover_with(
        options: &Discovery,
        gateway: Ipv4Addr,
        lan_address: Ipv4Addr,
        igd_url: Option<&str>,
    ) -> Result<UpnpClient, UpnpError> {
        let found = match igd_url.filter(|url| !url.trim().is_empty()) {
            Some(url) => {
                let location = HttpUrl::parse(url).map_err(UpnpError::IgdUrl)?;
                let pinned = location.host.clone();
                discovery::fetch(options, &location, &pinned).await?
            }
            None => discovery::search(options, gateway, lan_address).await?,
        };
        tracing::info!(
            %gateway,
            control = %found.control,
            service = %found.service_type,
            udn = found.udn.as_deref().unwrap_or(""),
            "found the UPnP IGD"
        );
        Ok(UpnpClient {
            gateway,
            lan_address,
            control: found.control,
            service_type: found.service_type,
            udn: found.udn,
            boot_id: found.boot_id,
            request_timeout: options.http_timeout,
            permanent_only: false,
            mapped: HashSet::new(),
            external: None,
        })
    }

    /// The router's identity: `upnp:<UDN>`, or `upnp:<control URL>` without a UDN.
    pub fn router_identity(&self) -> String {
        match &self.udn {
            Some(udn) => format!("upnp:{udn}"),
            None => format!("upnp:{}", self.control),
        }
    }

    /// The WAN connection service in use (e.g. `urn:schemas-upnp-org:service:WANIPConnection:2`).
    pub fn service_type(&self) -> &str {
        &self.service_type
    }

    /// The control URL the SOAP calls go to.
    pub fn control_url(&self) -> String {
        self.control.to_string()
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// BOOTID.UPNP.ORG of the SSDP answer (changes when the router reboots).
    pub fn boot_id(&self) -> Option<u32> {
        self.boot_id
    }

    /// Whether the router takes only permanent leases (it answered 725 or 402 to a finite one).
    pub fn permanent_only(&self) -> bool {
        self.permanent_only
    }

    /// One SOAP action; transport failures are [`RouterError::Http`], unreadable replies
    /// [`RouterError::Reply`].
    async fn call(&self, action: &str, arguments: &[(&str, &str)]) -> Result<Reply, RouterError> {
        self.exchange(action, arguments)
            .await?
            .map_err(|source| self.unreadable(action, source))
    }

    fn unreadable(&self, action: &str, source: soap::SoapError) -> RouterError {
        RouterError::Reply {
            action: action.to_owned(),
            control: self.control.to_string(),
            source,
        }
    }

    /// One SOAP action: transport failures are the outer error, an unreadable reply the inner.
    async fn exchange(
        &self,
        action: &str,
        arguments: &[(&str, &str)],
    ) -> Result<Result<Reply, soap::SoapError>, RouterError> {
        // README.md, "Benchmarks": the breakdown of annotated -> live.
        tracing::debug!(target: "holepunch::timing", stage = "soap", action, "request sent");
        let body = soap::envelope(&self.service_type, action, arguments);
        let header = soap::action_header(&self.service_type, action);
        let response = http::request(
            &self.control,
            "POST",
            &[
                ("Content-Type", "text/xml; charset=\"utf-8\""),
                ("SOAPAction", &header),
            ],
            &body,
            soap::MAX_REPLY_BYTES,
            self.request_timeout,
        )
        .await
        .map_err(|source| RouterError::Http {
            action: action.to_owned(),
            control: self.control.to_string(),
            source,
        })?;
        // A listing or a purge is many requests in one call: each answer is progress.
        crate::yielding::progressed();
        Ok(soap::parse_reply(response.status, &response.body, action))
    }

    fn refused(action: &str, fault: &Fault) -> RouterError {
        RouterError::Refused {
            reason: format!("{action}: {fault}"),
            retry_after: None,
        }
    }

    /// GetExternalIPAddress.
    pub async fn external_address(&mut self) -> Result<Ipv4Addr, RouterError> {
        match self.call("GetExternalIPAddress", &[]).await? {
            Reply::Success(args) => {
                let text = args.get("NewExternalIPAddress").unwrap_or_default();
                text.parse().map_err(|_| RouterError::Unusable {
                    protocol: "UPnP",
                    what: format!(
                        "GetExternalIPAddress: {:?} is not an IPv4 address",
                        text.chars().take(64).collect::<String>()
                    ),
                })
            }
            Reply::Fault(fault) => Err(Self::refused("GetExternalIPAddress", &fault)),
        }
    }

    /// GetSpecificPortMappingEntry: what the router holds for this external port/protocol.
    pub async fn specific_entry(
        &mut self,
        protocol: Protocol,
        external_port: u16,
    ) -> Result<Option<PortMappingEntry>, RouterError> {
        let port = external_port.to_string();
        let reply = self
            .call(
                "GetSpecificPortMappingEntry",
                &[
                    ("NewRemoteHost", ""),
                    ("NewExternalPort", &port),
                    ("NewProtocol", protocol.upnp_name()),
                ],
            )
            .await?;
        match reply {
            Reply::Success(args) => PortMappingEntry::from_arguments(&args, Some((protocol, external_port)))
                .map(Some)
                .map_err(|problem| {
                    RouterError::Unusable {
                        protocol: "UPnP",
                        what: format!(
                            "GetSpecificPortMappingEntry {external_port}/{protocol}: unusable entry ({problem})"
                        ),
                    }
                }),
            Reply::Fault(fault) if fault.code == code::NO_SUCH_ENTRY => Ok(None),
            Reply::Fault(fault) => Err(Self::refused("GetSpecificPortMappingEntry", &fault)),
        }
    }

    /// GetGenericPortMappingEntry from index 0 until the router says there are no more:
    /// every mapping the router lists (entries that are not IPv4 TCP/UDP are skipped).
    pub async fn list(&mut self) -> Result<Vec<PortMappingEntry>, RouterError> {
        let mut entries = Vec::new();
        let mut unreadable_in_a_row = 0;
        for index in 0..MAX_LISTED_ENTRIES {
            let index_text = index.to_string();
            let reply = match self
                .exchange(
                    "GetGenericPortMappingEntry",
                    &[("NewPortMappingIndex", &index_text)],
                )
                .await?
            {
                Ok(reply) => {
                    unreadable_in_a_row = 0;
                    reply
                }
                // NOTE: miniupnpd 2.3.1 sends long foreign descriptions with stray bytes (see
                // `description_for`), which can break the XML of that one entry: skip it, but
                // not forever.
                Err(err) if unreadable_in_a_row < MAX_UNREADABLE_ENTRIES_IN_A_ROW => {
                    unreadable_in_a_row += 1;
                    tracing::debug!(index, error = %err, "skipping an unreadable router mapping");
                    continue;
                }
                Err(err) => {
                    return Err(
                        self.unreadable(&format!("GetGenericPortMappingEntry {index}"), err)
                    );
                }
            };
            match reply {
                Reply::Success(args) => match PortMappingEntry::from_arguments(&args, None) {
                    Ok(entry) => entries.push(entry),
                    Err(problem) => {
                        tracing::debug!(index, %problem, "skipping a router mapping holepunch cannot read")
                    }
                },
                // NOTE: past the end, WANIPConnection:1 says 713 SpecifiedArrayIndexInvalid;
                // some IGDv1 firmware answers 714 or 402 instead.
                Reply::Fault(fault)
                    if matches!(
                        fault.code,
                        code::ARRAY_INDEX_INVALID | code::NO_SUCH_ENTRY | code::INVALID_ARGS
                    ) =>
                {
                    return Ok(entries);
                }
                Reply::Fault(fault) => {
                    return Err(Self::refused("GetGenericPortMappingEntry", &fault));
                }
            }
        }
        Ok(entries)
    }

    async fn add(&self, request: &MapRequest, lease_secs: u32) -> Result<Reply, RouterError> {
        let external = request.external_port.to_string();
        let internal_port = request.internal.port.to_string();
        let client = request.internal.address.to_string();
        let lease = lease_secs.to_string();
        let description = description_for(&request.owner);
        self.call(
            "AddPortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", &external),
                ("NewProtocol", request.protocol.upnp_name()),
                ("NewInternalPort", &internal_port),
                ("NewInternalClient", &client),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", &description),
                ("NewLeaseDuration", &lease),
            ],
        )
        .await
    }

    /// The cached external address, asked for when not known yet. A router that does not
    /// say is not an error here: the mapping itself was granted.
    async fn known_external_address(&mut self) -> Option<Ipv4Addr> {
        if self.external.is_none() {
            match self.external_address().await {
                Ok(address) => self.external = Some(address),
                Err(e) => tracing::debug!(error = %e, "GetExternalIPAddress failed"),
            }
        }
        self.external
    }

    /// Deletes holepunch's leftovers: mappings to this host whose description is a holepunch
    /// tag, for a port `keep` does not hold (neither recorded in the state nor desired): what
    /// a crash between the router's answer and the state file's write can leave behind.
    /// Returns how many were deleted.
    // NOTE: only tags that name their owner (`holepunch:<ns>/<name>`, up to 63 bytes) are
    // recognised; a shortened long tag cannot be told from another holepunch host's.
    pub async fn purge_leftovers(
        &mut self,
        keep: &std::collections::BTreeSet<crate::model::MappingKey>,
    ) -> Result<usize, RouterError> {
        let mut purged = 0;
        for entry in self.list().await? {
            let Some(owner) = Owner::from_tag(&entry.description) else {
                continue;
            };
            let key = crate::model::MappingKey {
                protocol: entry.protocol,
                external_port: entry.external_port,
            };
            if entry.internal_client != self.lan_address || keep.contains(&key) {
                continue;
            }
            let lease = Lease {
                owner,
                protocol: key.protocol,
                external_port: key.external_port,
                internal: crate::model::Endpoint::new(entry.internal_client, entry.internal_port),
                nonce: None,
            };
            self.unmap(&lease).await?;
            tracing::warn!(service = %lease.owner, external_port = key.external_port,
                protocol = %key.protocol, "deleted a leftover holepunch mapping the state file did not know");
            purged += 1;
        }
        Ok(purged)
    }

    /// Whether `entry` is the mapping `owner`'s tag describes, to `client`.
    fn owned_by(entry: &PortMappingEntry, owner: &Owner, client: Ipv4Addr) -> bool {
        description_matches(&entry.description, owner) && entry.internal_client == client
    }
}

impl PortMapper for UpnpClient {
    fn backend(&self) -> Backend {
        Backend::Upnp
    }

    /// GetSpecificPortMappingEntry for each mapping: gone, or held by someone else, is lost.
    /// A changed external address counts every mapping as lost, so that the restore records
    /// the new address (and the Services' status and Events follow).
    async fn lost(&mut self, leases: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
        let previous = self.external;
        let current = self.external_address().await?;
        self.external = Some(current);
        if previous.is_some_and(|p| p != current) {
            tracing::warn!(previous = ?previous, %current, "the router's external address changed");
            return Ok(leases.iter().map(Lease::key).collect());
        }
        let mut lost = Vec::new();
        for lease in leases {
            let held = self
                .specific_entry(lease.protocol, lease.external_port)
                .await?
                .is_some_and(|entry| Self::owned_by(&entry, &lease.owner, lease.internal.address));
            if !held {
                self.mapped.remove(&(lease.protocol, lease.external_port));
                lost.push(lease.key());
            }
        }
        Ok(lost)
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        let key = (request.protocol, request.external_port);
        // AddPortMapping replaces a mapping of the same host without a word, so before the
        // first add of a port, look: what is there must be this owner's, or nothing.
        if !self.mapped.contains(&key)
            && let Some(entry) = self
                .specific_entry(request.protocol, request.external_port)
                .await?
            && !Self::owned_by(&entry, &request.owner, request.internal.address)
        {
            return Err(RouterError::Conflict {
                port: request.external_port,
                protocol: request.protocol,
                detail: format!(
                    "{}:{} holds it with description {:?} (not {:?}); holepunch leaves it alone",
                    entry.internal_client,
                    entry.internal_port,
                    entry.description,
                    description_for(&request.owner)
                ),
            });
        }
        let mut lease_secs = if self.permanent_only {
            0
        } else {
            request.lifetime_secs
        };
        let mut reply = self.add(request, lease_secs).await?;
        if let Reply::Fault(fault) = &reply
            && lease_secs != 0
            && matches!(fault.code, code::ONLY_PERMANENT_LEASES | code::INVALID_ARGS)
        {
            // NOTE: WANIPConnection:1 §2.4.16: 725 OnlyPermanentLeasesSupported; some IGDv1
            // firmware says 402 instead (README.md, "Router protocols"). Remembered for this router.
            tracing::warn!(
                router = %self.router_identity(),
                %fault,
                "the router takes only permanent UPnP leases; mappings will be verified instead of renewed"
            );
            self.permanent_only = true;
            lease_secs = 0;
            reply = self.add(request, lease_secs).await?;
        }
        match reply {
            Reply::Success(_) => {
                self.mapped.insert(key);
                Ok(Grant {
                    external_port: request.external_port,
                    lifetime_secs: lease_secs,
                    renew_after: renew_after(lease_secs),
                    external_address: self.known_external_address().await,
                    epoch: None,
                    router: self.router_identity(),
                })
            }
            Reply::Fault(fault) => {
                let holder = if fault.code == code::CONFLICT_IN_MAPPING_ENTRY {
                    self.specific_entry(request.protocol, request.external_port)
                        .await?
                } else {
                    None
                };
                Err(add_error(
                    &fault,
                    request,
                    self.lan_address,
                    holder.as_ref(),
                ))
            }
        }
    }

    async fn unmap(&mut self, lease: &Lease) -> Result<(), RouterError> {
        let key = (lease.protocol, lease.external_port);
        self.mapped.remove(&key);
        match self
            .specific_entry(lease.protocol, lease.external_port)
            .await?
        {
            None => return Ok(()),
            Some(entry) if !Self::owned_by(&entry, &lease.owner, lease.internal.address) => {
                tracing::warn!(
                    port = lease.external_port,
                    protocol = %lease.protocol,
                    holder = %entry.internal_client,
                    description = %entry.description,
                    "holepunch's mapping is gone and another one holds the port; leaving it alone"
                );
                return Ok(());
            }
            Some(_) => {}
        }
        let port = lease.external_port.to_string();
        let reply = self
            .call(
                "DeletePortMapping",
                &[
                    ("NewRemoteHost", ""),
                    ("NewExternalPort", &port),
                    ("NewProtocol", lease.protocol.upnp_name()),
                ],
            )
            .await?;
        match reply {
            Reply::Success(_) => Ok(()),
            // NOTE: deleting a missing mapping answers 714 NoSuchEntryInArray (or 200): gone.
            Reply::Fault(fault) if fault.code == code::NO_SUCH_ENTRY => Ok(()),
            Reply::Fault(fault) => Err(Self::refused("DeletePortMapping", &fault)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Owner};

    fn request(address: [u8; 4]) -> MapRequest {
        MapRequest {
            owner: Owner::new("default", "web"),
            protocol: Protocol::Tcp,
            external_port: 18080,
            internal: Endpoint::new(Ipv4Addr::from(address), 8080),
            lifetime_secs: 3600,
            nonce: None,
        }
    }

    fn fault(code: u16) -> Fault {
        Fault {
            code,
            description: "x".into(),
        }
    }

    const LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);

    #[test]
    fn descriptions_are_the_tag_or_a_hashed_prefix_that_fits() {
        let short = Owner::new("default", "web");
        assert_eq!(description_for(&short), "holepunch:default/web");
        assert!(description_matches("holepunch:default/web", &short));
        assert!(!description_matches("holepunch:default/web2", &short));
        assert!(!description_matches("", &short));
        // 10 + 10 + 1 + 42 = 63 bytes: still the plain tag.
        let fits = Owner::new("production", "a".repeat(42));
        assert_eq!(description_for(&fits), fits.tag());
        let long = Owner::new("production", "a".repeat(63));
        let other = Owner::new("production", format!("{}b", "a".repeat(62)));
        let written = description_for(&long);
        assert_eq!(written.len(), MAX_DESCRIPTION_BYTES);
        assert!(
            written.starts_with("holepunch:production/aaaa"),
            "{written}"
        );
        assert_eq!(written, description_for(&long), "deterministic");
        assert_ne!(written, description_for(&other));
        assert!(description_matches(&written, &long));
        assert!(!description_matches(&written, &other));
        // What miniupnpd would have given back for the full tag: not ours.
        assert!(!description_matches(&long.tag()[..64], &long));
        // Multi-byte characters are cut on a boundary, not in the middle.
        let wide = Owner::new("ns", "é".repeat(40));
        assert!(description_for(&wide).len() <= MAX_DESCRIPTION_BYTES);
    }

    #[test]
    fn renew_at_half_the_lease() {
        assert_eq!(renew_after(3600), Some(Duration::from_secs(1800)));
        assert_eq!(renew_after(1), Some(Duration::from_secs(1)));
        assert_eq!(renew_after(0), None);
    }

    #[test]
    fn conflict_718_names_the_holder() {
        let holder = PortMappingEntry {
            protocol: Protocol::Tcp,
            external_port: 18080,
            internal_client: Ipv4Addr::new(192, 168, 77, 20),
            internal_port: 80,
            enabled: true,
            description: "upnpc".into(),
            lease_secs: 0,
        };
        match add_error(
            &fault(718),
            &request([192, 168, 77, 10]),
            LAN,
            Some(&holder),
        ) {
            RouterError::Conflict {
                port,
                protocol,
                detail,
            } => {
                assert_eq!((port, protocol), (18080, Protocol::Tcp));
                assert!(detail.contains("192.168.77.20"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn secure_mode_718_points_at_relay() {
        match add_error(&fault(718), &request([192, 168, 77, 20]), LAN, None) {
            RouterError::Refused { reason, .. } => {
                assert!(reason.contains("exposure.mode = \"relay\""), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn low_port_606_says_so() {
        match add_error(&fault(606), &request([192, 168, 77, 10]), LAN, None) {
            RouterError::Refused { reason, .. } => {
                assert!(reason.contains("below 1024"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn entries_parse_and_bad_ones_are_errors() {
        let args = |pairs: &[(&str, &str)]| {
            Arguments(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let generic = args(&[
            ("NewRemoteHost", ""),
            ("NewExternalPort", "18080"),
            ("NewProtocol", "UDP"),
            ("NewInternalPort", "8080"),
            ("NewInternalClient", "192.168.77.10"),
            ("NewEnabled", "1"),
            ("NewPortMappingDescription", "holepunch:default/web"),
            ("NewLeaseDuration", "3599"),
        ]);
        let entry = PortMappingEntry::from_arguments(&generic, None).unwrap();
        assert_eq!(
            entry,
            PortMappingEntry {
                protocol: Protocol::Udp,
                external_port: 18080,
                internal_client: LAN,
                internal_port: 8080,
                enabled: true,
                description: "holepunch:default/web".into(),
                lease_secs: 3599,
            }
        );
        for (name, value) in [
            ("NewProtocol", "GRE"),
            ("NewExternalPort", "70000"),
            ("NewInternalClient", "router.lan"),
            ("NewInternalPort", "-1"),
            ("NewLeaseDuration", "forever"),
        ] {
            let mut bad = generic.clone();
            for pair in &mut bad.0 {
                if pair.0 == name {
                    pair.1 = value.into();
                }
            }
            assert!(
                PortMappingEntry::from_arguments(&bad, None).is_err(),
                "{name}={value}"
            );
        }
        assert!(PortMappingEntry::from_arguments(&args(&[]), Some((Protocol::Tcp, 1))).is_err());
    }
}
