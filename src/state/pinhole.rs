//! The record of one IPv6 pinhole holepunch owns (README, "IPv6"): what it opens, where the
//! traffic goes, and what renewing or deleting it needs across restarts (the PCP nonce and
//! the router's epoch, the UPnP UniqueID). A pinhole shares its key with the IPv4 mapping of
//! the same Service port and lives and goes with it.

use std::net::Ipv6Addr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::record::{Failure, LeaseTimes, MappingStatus};
use crate::model::{Backend, Endpoint6, MappingKey, Owner, Protocol, TargetSource};

/// One pinhole holepunch owns (or is trying to own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinholeRecord {
    pub owner: Owner,
    pub service_port: u16,
    pub protocol: Protocol,
    /// The external port of the IPv4 mapping it goes with (the key they share).
    pub external_port: u16,
    /// The address the pinhole opens: this host's in `relay` mode, the target's in `direct`.
    pub address: Ipv6Addr,
    /// The port the pinhole opens (no translation in IPv6: the port the internet uses).
    pub port: u16,
    /// Where the traffic finally goes.
    pub target_address: Ipv6Addr,
    pub target_port: u16,
    pub target_source: TargetSource,
    pub backend: Backend,
    /// The router's IPv6 address the pinhole was asked of.
    pub router: Ipv6Addr,
    /// PCP: the pinhole's 96-bit nonce, as 24 hex digits; reused to renew and delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// UPnP: the UniqueID an earlier build recorded. Read, never used and no longer written:
    /// miniupnpd numbers pinholes from 1 again after a restart, so a stored one may name
    /// another host's pinhole (README, "IPv6"); renewing and deleting learn the current one.
    #[serde(default, rename = "unique_id", skip_serializing)]
    pub old_unique_id: Option<u16>,
    /// PCP: the router's epoch (seconds since its start) with the last answer; an answer
    /// whose epoch is behind it plus the time since the grant shows the router restarted
    /// and lost the pinhole (RFC 6887 §8.5), also across a restart of holepunch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    #[serde(flatten)]
    pub times: LeaseTimes,
    pub status: MappingStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    #[serde(default)]
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl PinholeRecord {
    pub fn key(&self) -> MappingKey {
        MappingKey {
            protocol: self.protocol,
            external_port: self.external_port,
        }
    }

    /// What the pinhole opens.
    pub fn opens(&self) -> Endpoint6 {
        Endpoint6::new(self.address, self.port)
    }

    /// Where its traffic finally goes.
    pub fn target(&self) -> Endpoint6 {
        Endpoint6::new(self.target_address, self.target_port)
    }
}

#[cfg(test)]
impl PinholeRecord {
    /// An active PCP pinhole for tests: this host's 2001:db8:77::10 on `external_port`
    /// (TCP), to a node's 2001:db8:77::20, granted at 2025-01-02T03:04:05Z for an hour.
    pub(crate) fn example(external_port: u16) -> PinholeRecord {
        let at = |text: &str| text.parse().ok();
        PinholeRecord {
            owner: Owner::new("media", "jellyfin"),
            service_port: 8096,
            protocol: Protocol::Tcp,
            external_port,
            address: Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10),
            port: external_port,
            target_address: Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x20),
            target_port: 31096,
            target_source: TargetSource::NodePort,
            backend: Backend::Pcp,
            router: Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1),
            nonce: Some("00112233445566778899aabb".to_owned()),
            old_unique_id: None,
            epoch: Some(1234),
            times: LeaseTimes {
                lifetime_secs: 3600,
                granted_at: at("2025-01-02T03:04:05Z"),
                renew_at: at("2025-01-02T03:34:05Z"),
                expires_at: at("2025-01-02T04:04:05Z"),
            },
            status: MappingStatus::Active,
            retry_at: None,
            failures: 0,
            failure: None,
            last_error: None,
        }
    }
}
