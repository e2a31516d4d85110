//! The domain record: every mapping holepunch owns ([`MappingRecord`]), what its last request
//! did ([`MappingStatus`], [`Failure`]), the earlier owners' router mappings a handover still
//! has to delete ([`Replaced`]), and the whole [`State`] (ARCHITECTURE.md, "State
//! lifecycle"). How it is written to disk is `file.rs`'s business.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::{Backend, Endpoint, Lease, MappingKey, Nonce, Owner, Protocol, TargetSource};

/// Why a mapping's last request did not succeed, which decides what its retry waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// The router did not answer: retried as soon as it answers again.
    RouterSilent,
    /// The router answered no (refused, conflict): retried after the backoff.
    Refused,
    /// Never sent: the state file that would have held it could not be saved. Retried as
    /// soon as a save works.
    HeldBack,
    /// Deleting it failed: the next try waits for the backoff.
    UnmapFailed,
}

/// A router mapping that an earlier owner of the same router port had, which holepunch has
/// not deleted yet. In `direct` mode the owners' mappings point at different internal
/// endpoints, and the router refuses the new one while the old one holds the port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replaced {
    pub owner: Owner,
    /// The internal endpoint the router forwards the port to for that owner.
    pub address: Ipv4Addr,
    pub port: u16,
}

impl Replaced {
    pub fn internal(&self) -> Endpoint {
        Endpoint::new(self.address, self.port)
    }
}

/// Where a recorded mapping stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingStatus {
    /// Written before the request is sent: the router may or may not hold it.
    Pending,
    /// The router granted it; valid until `expires_at`.
    Active,
    /// The last request failed; retried at `retry_at`.
    Failed,
}

/// A lease the router granted, as a mapping's and a pinhole's record keep it: flattened into
/// both (`#[serde(flatten)]`), so the state file's keys stay `lifetime_secs`, `granted_at`,
/// `renew_at` and `expires_at`, in that order, in either table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTimes {
    /// Lifetime the router granted, seconds (0: permanent, as some IGD routers insist).
    #[serde(default)]
    pub lifetime_secs: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_at: Option<Timestamp>,
    /// When to renew (chosen when granted, with the backend's jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<Timestamp>,
    /// When the router forgets it unless renewed; `None` for permanent leases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// One mapping holepunch owns (or is trying to own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingRecord {
    pub owner: Owner,
    pub service_port: u16,
    pub protocol: Protocol,
    pub external_port: u16,
    /// Earlier owners' mappings on this router port, still to be deleted (same backend and
    /// nonce as this record), oldest first. Empty once this record is granted.
    // (Before `internal`: tables are written in field order, so `target` stays the last one.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<Replaced>,
    /// What the router forwards to: this host in `relay` mode, the target in `direct` mode.
    pub internal: Endpoint,
    /// Where the traffic finally goes.
    pub target: Endpoint,
    pub target_source: TargetSource,
    pub backend: Backend,
    /// The router's identity (its address, and for UPnP its UDN), empty when unknown.
    #[serde(default)]
    pub router: String,
    /// PCP: the 96-bit mapping nonce, as 24 hex digits; reused to renew and delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// What the router granted and when to renew it.
    #[serde(flatten)]
    pub times: LeaseTimes,
    /// PCP/NAT-PMP epoch (seconds since the router's start) seen with the last response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    /// The external address the router reported for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_address: Option<Ipv4Addr>,
    pub status: MappingStatus,
    /// Failed: when to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    /// Consecutive failures, for backoff.
    #[serde(default)]
    pub failures: u32,
    /// Why the last request failed; `None` once one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl MappingRecord {
    pub fn key(&self) -> MappingKey {
        MappingKey {
            protocol: self.protocol,
            external_port: self.external_port,
        }
    }

    /// The router mapping this record stands for, as a backend needs it to check or delete
    /// it. A recorded nonce that is not 24 hex digits counts as none (PCP then refuses).
    pub fn lease(&self) -> Lease {
        Lease {
            owner: self.owner.clone(),
            protocol: self.protocol,
            external_port: self.external_port,
            internal: self.internal,
            nonce: self.nonce(),
        }
    }

    /// The recorded PCP nonce, if there is a usable one.
    pub fn nonce(&self) -> Option<Nonce> {
        self.nonce.as_deref().and_then(|text| text.parse().ok())
    }

    /// This record as the earlier owner `replaced` had it: what deleting that owner's
    /// router mapping needs (same port, protocol, backend and nonce).
    pub fn as_replaced(&self, replaced: &Replaced) -> MappingRecord {
        MappingRecord {
            owner: replaced.owner.clone(),
            internal: replaced.internal(),
            replaces: Vec::new(),
            ..self.clone()
        }
    }
}

/// The whole state: the mappings holepunch owns, keyed by their slot in the router's port space.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub mappings: BTreeMap<MappingKey, MappingRecord>,
    /// IPv6 pinholes, each beside the IPv4 mapping with the same key (README, "IPv6").
    pub pinholes: BTreeMap<MappingKey, super::PinholeRecord>,
}

impl MappingRecord {
    /// A record for a mapping found on the router but known nowhere else (a leftover), so
    /// that it can be deleted through the backend that made it.
    pub fn leftover(
        owner: Owner,
        key: MappingKey,
        internal: Endpoint,
        backend: Backend,
    ) -> MappingRecord {
        MappingRecord {
            owner,
            service_port: internal.port,
            protocol: key.protocol,
            external_port: key.external_port,
            internal,
            target: internal,
            target_source: TargetSource::NodePort,
            backend,
            router: String::new(),
            nonce: None,
            times: LeaseTimes::default(),
            epoch: None,
            external_address: None,
            status: MappingStatus::Active,
            retry_at: None,
            failures: 0,
            replaces: Vec::new(),
            failure: None,
            last_error: None,
        }
    }
}

impl State {
    /// Makes the mappings `which` selects due at `now`: a failed one is retried, an active
    /// one renewed, without waiting for its backoff (the router answers again). Returns how
    /// many.
    pub fn due_now(
        &mut self,
        now: Timestamp,
        mut which: impl FnMut(&MappingRecord) -> bool,
    ) -> usize {
        let mut due = 0;
        for record in self.mappings.values_mut().filter(|r| which(r)) {
            match record.status {
                MappingStatus::Failed => record.retry_at = None,
                MappingStatus::Active => record.times.renew_at = Some(now),
                MappingStatus::Pending => continue,
            }
            due += 1;
        }
        due
    }

    /// Marks the active mappings `which` selects as `pending`: the router may have lost them
    /// (it restarted, or said it no longer holds them), so the next plan restores them with
    /// the same external port (and PCP nonce). Returns how many were marked.
    pub fn unconfirm(&mut self, mut which: impl FnMut(&MappingRecord) -> bool) -> usize {
        let mut marked = 0;
        for record in self.mappings.values_mut() {
            if record.status == MappingStatus::Active && which(record) {
                record.status = MappingStatus::Pending;
                marked += 1;
            }
        }
        marked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn a_record_hands_the_router_its_lease_with_a_typed_nonce() {
        let mut record = MappingRecord::leftover(
            Owner::new("default", "web"),
            MappingKey {
                protocol: Protocol::Udp,
                external_port: 3478,
            },
            Endpoint::new(Ipv4Addr::new(192, 168, 1, 10), 3478),
            Backend::Pcp,
        );
        record.nonce = Some("00112233445566778899AABB".to_owned());
        let lease = record.lease();
        assert_eq!(lease.key(), record.key());
        assert_eq!(
            (&lease.owner, lease.internal),
            (&record.owner, record.internal)
        );
        assert_eq!(
            lease.nonce.map(|n| n.to_string()).as_deref(),
            Some("00112233445566778899aabb")
        );
        // A damaged nonce text reaches the router as none (PCP then refuses to send).
        record.nonce = Some("not a nonce".to_owned());
        assert_eq!(record.lease().nonce, None);
        record.nonce = None;
        assert_eq!(record.lease().nonce, None);
    }
}
