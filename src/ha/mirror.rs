//! The mapping records the active host mirrors into the cluster, so that the next active host
//! renews the same router mappings with the same PCP nonces (README.md, "High
//! availability").
//!
//! The text is the state file's own format (see [`crate::state`]): `version = 2`, then one
//! `[[mapping]]` table per [`MappingRecord`], with the same serde definition, so a record
//! reads the same from the file and from the ConfigMap. It lives under [`DATA_KEY`] in a
//! ConfigMap named [`configmap_name`]. The IPv6 pinholes, if any, are beside it under
//! [`PINHOLES_KEY`] (`version = 3`, one `[[pinhole]]` per [`PinholeRecord`]): a host of an
//! earlier build reads the mappings as before and never sees them. Pure: no I/O.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use serde::{Deserialize, Serialize};

use crate::state::{MappingRecord, PINHOLE_STATE_VERSION, PinholeRecord, STATE_VERSION, State};

/// The ConfigMap key that holds the records.
pub const DATA_KEY: &str = "mappings.toml";

/// The ConfigMap key that holds the IPv6 pinholes' records, when there are any.
pub const PINHOLES_KEY: &str = "pinholes.toml";

/// Annotation naming the holder that wrote the ConfigMap.
pub const HOLDER_ANNOTATION: &str = "holepunch.io/holder";

/// Annotation with the Lease's `leaseTransitions` when the ConfigMap was written: a later
/// holder writes a larger number.
pub const TRANSITIONS_ANNOTATION: &str = "holepunch.io/lease-transitions";

/// The ConfigMap beside the Lease `lease_name`.
pub fn configmap_name(lease_name: &str) -> String {
    format!("{lease_name}-mappings")
}

/// Why the mirrored records could not be encoded or read.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot encode the mapping records for the cluster (a bug: please report it)")]
    Encode {
        #[source]
        source: toml::ser::Error,
    },
    #[error(
        "the mapping records in the cluster are not valid; the active host rewrites them from its own state on its next save"
    )]
    Decode {
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "the mapping records in the cluster have format version {found}, newer than this holepunch reads ({STATE_VERSION}); upgrade holepunch on this host"
    )]
    NewerVersion { found: i64 },
    #[error(
        "the mapping records in the cluster hold {key} twice; the active host rewrites them from its own state on its next save"
    )]
    Duplicate { key: crate::model::MappingKey },
    #[error(
        "the IPv6 pinhole records in the cluster are not valid; the active host rewrites them from its own state on its next save"
    )]
    DecodePinholes {
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "the IPv6 pinhole records in the cluster have format version {found}, newer than this holepunch reads ({PINHOLE_STATE_VERSION}); upgrade holepunch on this host"
    )]
    NewerPinholeVersion { found: i64 },
}

#[derive(Serialize)]
struct MirrorOut<'a> {
    version: u32,
    mapping: Vec<&'a MappingRecord>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorIn {
    version: i64,
    #[serde(default)]
    mapping: Vec<MappingRecord>,
}

#[derive(Serialize)]
struct PinholesOut<'a> {
    version: u32,
    pinhole: Vec<&'a PinholeRecord>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinholesIn {
    version: i64,
    #[serde(default)]
    pinhole: Vec<PinholeRecord>,
}

/// The ConfigMap's data for `state`: the mappings under [`DATA_KEY`], the pinholes (if any)
/// under [`PINHOLES_KEY`].
pub fn encode_data(state: &State) -> Result<BTreeMap<String, String>, MirrorError> {
    let mut data = BTreeMap::from([(DATA_KEY.to_owned(), encode(state)?)]);
    if !state.pinholes.is_empty() {
        let out = PinholesOut {
            version: PINHOLE_STATE_VERSION,
            pinhole: state.pinholes.values().collect(),
        };
        let text = toml::to_string(&out).map_err(|source| MirrorError::Encode { source })?;
        data.insert(PINHOLES_KEY.to_owned(), text);
    }
    Ok(data)
}

/// The records from the ConfigMap's data.
pub fn decode_data(data: Option<&BTreeMap<String, String>>) -> Result<State, MirrorError> {
    let text = |key: &str| data.and_then(|d| d.get(key)).map_or("", String::as_str);
    let mut state = decode(text(DATA_KEY))?;
    let pinholes = text(PINHOLES_KEY);
    if pinholes.is_empty() {
        return Ok(state);
    }
    let file: PinholesIn =
        toml::from_str(pinholes).map_err(|source| MirrorError::DecodePinholes { source })?;
    if file.version > i64::from(PINHOLE_STATE_VERSION) {
        return Err(MirrorError::NewerPinholeVersion {
            found: file.version,
        });
    }
    for record in file.pinhole {
        match state.pinholes.entry(record.key()) {
            Entry::Vacant(slot) => {
                slot.insert(record);
            }
            Entry::Occupied(slot) => return Err(MirrorError::Duplicate { key: *slot.key() }),
        }
    }
    Ok(state)
}

/// The mapping records as the ConfigMap holds them under [`DATA_KEY`].
pub fn encode(state: &State) -> Result<String, MirrorError> {
    let out = MirrorOut {
        version: STATE_VERSION,
        mapping: state.mappings.values().collect(),
    };
    toml::to_string(&out).map_err(|source| MirrorError::Encode { source })
}

/// The mapping records from the ConfigMap's text under [`DATA_KEY`].
pub fn decode(text: &str) -> Result<State, MirrorError> {
    let file: MirrorIn = toml::from_str(text).map_err(|source| MirrorError::Decode { source })?;
    if file.version > i64::from(STATE_VERSION) {
        return Err(MirrorError::NewerVersion {
            found: file.version,
        });
    }
    let mut state = State::default();
    for record in file.mapping {
        match state.mappings.entry(record.key()) {
            Entry::Vacant(slot) => {
                slot.insert(record);
            }
            Entry::Occupied(slot) => return Err(MirrorError::Duplicate { key: *slot.key() }),
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;

    use crate::model::{Backend, Endpoint, Owner, Protocol, TargetSource};
    use crate::state::MappingStatus;

    /// A PCP record with a nonce and a lease end, as the active host holds it.
    fn sample() -> State {
        let at = |text: &str| text.parse().ok();
        let record = MappingRecord {
            owner: Owner::new("media", "jellyfin"),
            service_port: 443,
            protocol: Protocol::Tcp,
            external_port: 8443,
            replaces: Vec::new(),
            internal: Endpoint::new(Ipv4Addr::new(192, 168, 1, 250), 8443),
            target: Endpoint::new(Ipv4Addr::new(192, 168, 1, 40), 443),
            target_source: TargetSource::LoadBalancer,
            backend: Backend::Pcp,
            router: "192.168.1.1".to_owned(),
            nonce: Some("0123456789abcdef01234567".to_owned()),
            times: crate::state::LeaseTimes {
                lifetime_secs: 3600,
                granted_at: at("2026-12-05T08:00:00Z"),
                renew_at: at("2026-12-05T08:30:00Z"),
                expires_at: at("2026-12-05T09:00:00Z"),
            },
            epoch: Some(1234),
            external_address: Some(Ipv4Addr::new(203, 0, 113, 7)),
            status: MappingStatus::Active,
            retry_at: None,
            failures: 0,
            failure: None,
            last_error: None,
        };
        State {
            mappings: [(record.key(), record)].into_iter().collect(),
            ..State::default()
        }
    }

    #[test]
    fn records_round_trip_with_nonce_and_lease_end() {
        let state = sample();
        assert_eq!(state.mappings.len(), 1);
        let text = encode(&state).expect("encodes");
        assert!(text.starts_with("version = 2\n"), "{text}");
        assert!(
            text.contains("nonce = \"0123456789abcdef01234567\""),
            "{text}"
        );
        let back = decode(&text).expect("decodes");
        assert_eq!(back, state);
        let record = back.mappings.values().next().expect("one record");
        assert_eq!(record.nonce.as_deref(), Some("0123456789abcdef01234567"));
        assert!(record.times.expires_at.is_some());
        // The state file's own text reads the same: one format for both.
        let file_text = state.to_toml().expect("the state file encodes");
        assert_eq!(
            decode(&file_text).expect("the state file's text decodes"),
            state
        );
        // No records: still a valid document.
        assert_eq!(
            decode(&encode(&State::default()).expect("encodes")).ok(),
            Some(State::default())
        );
    }

    /// The pinholes ride beside the mappings under their own key: the mappings' text is what
    /// an earlier build wrote and reads (version 2, no pinhole in it).
    #[test]
    fn pinholes_are_mirrored_beside_the_mappings_which_an_earlier_build_still_reads() {
        let mut state = sample();
        let data = encode_data(&state).expect("encodes");
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            [DATA_KEY],
            "no pinhole, no key"
        );
        assert_eq!(decode_data(Some(&data)).ok(), Some(state.clone()));
        let pinhole = PinholeRecord::example(8443);
        state.pinholes.insert(pinhole.key(), pinhole);
        let data = encode_data(&state).expect("encodes");
        assert_eq!(data.get(DATA_KEY), encode(&sample()).ok().as_ref());
        let pinholes = data.get(PINHOLES_KEY).expect("the pinholes' key");
        assert!(
            pinholes.starts_with("version = 3\n\n[[pinhole]]"),
            "{pinholes}"
        );
        assert_eq!(decode_data(Some(&data)).ok(), Some(state.clone()));
        // The earlier build's read: the mappings' key only.
        assert_eq!(
            decode(&data[DATA_KEY])
                .ok()
                .map(|s| (s.mappings, s.pinholes.len())),
            Some((state.mappings.clone(), 0))
        );
        // Damaged, newer and duplicate pinhole records are refused like mappings.
        let with = |text: String| {
            let mut data = data.clone();
            data.insert(PINHOLES_KEY.to_owned(), text);
            decode_data(Some(&data))
        };
        assert!(matches!(
            with(pinholes.replace("version = 3", "version = 9")),
            Err(MirrorError::NewerPinholeVersion { found: 9 })
        ));
        assert!(matches!(
            with(pinholes.replace("nonce", "noncе")),
            Err(MirrorError::DecodePinholes { .. })
        ));
        let block = pinholes.split_once("[[pinhole]]").map_or("", |(_, b)| b);
        assert!(matches!(
            with(format!("{pinholes}\n[[pinhole]]{block}")),
            Err(MirrorError::Duplicate { .. })
        ));
    }

    #[test]
    fn damaged_newer_and_duplicate_records_are_refused() {
        let text = encode(&sample()).expect("encodes");
        assert!(decode(&text).is_ok());
        assert!(matches!(
            decode(&text.replace("version = 2", "version = 99")),
            Err(MirrorError::NewerVersion { found: 99 })
        ));
        assert!(matches!(
            decode(&text.replace("nonce", "noncе")),
            Err(MirrorError::Decode { .. })
        ));
        let block = text.split_once("[[mapping]]").map(|(_, b)| b).unwrap_or("");
        let twice = format!("{text}\n[[mapping]]{block}");
        assert!(matches!(decode(&twice), Err(MirrorError::Duplicate { .. })));
        assert_eq!(configmap_name("holepunch"), "holepunch-mappings");
    }
}
