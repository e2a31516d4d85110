//! Durations a router sends are clamped where they enter (README.md, "Security model: traffic
//! and the router"): the router is not trusted to pick holepunch's schedule. A PCP error's
//! lifetime (RFC 6887 §7.2: how long the error will last) becomes a retry floor only inside
//! [`RETRY_HINT_MIN_SECS`]..=[`RETRY_HINT_MAX_SECS`], and a granted lifetime never exceeds
//! the one asked for (RFC 6887 §15 and RFC 6886 §3.3 let the server grant less, never more).
//! Pure functions; the protocol clients call them on every answer.

use std::time::Duration;

/// The shortest wait before a retry a router's hint can ask for (DESIGN's "30 s short").
pub const RETRY_HINT_MIN_SECS: u32 = 30;
/// The longest: whatever a router says, a refused mapping is asked for again within 30 min.
pub const RETRY_HINT_MAX_SECS: u32 = 30 * 60;

/// A router's retry hint of `secs` as the wait to apply: `None` for 0 (no hint), else
/// clamped into [`RETRY_HINT_MIN_SECS`]..=[`RETRY_HINT_MAX_SECS`].
pub fn retry_hint(secs: u32) -> Option<Duration> {
    (secs > 0).then(|| {
        Duration::from_secs(u64::from(
            secs.clamp(RETRY_HINT_MIN_SECS, RETRY_HINT_MAX_SECS),
        ))
    })
}

/// A lifetime granted on a request that asked for `asked_secs`: never longer than asked.
/// `None` when the router granted 0 s, which in both protocols means no mapping (RFC 6887
/// §15, RFC 6886 §3.4): the caller reports it as a refusal instead of recording a mapping
/// that holepunch would take for permanent.
pub fn granted_lifetime(granted_secs: u32, asked_secs: u32) -> Option<u32> {
    (granted_secs > 0).then(|| granted_secs.min(asked_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_retry_hints_stay_between_30_s_and_30_min() {
        // u32::MAX seconds is 136 years.
        assert_eq!(retry_hint(u32::MAX), Some(Duration::from_secs(1800)));
        assert_eq!(retry_hint(1801), Some(Duration::from_secs(1800)));
        assert_eq!(retry_hint(1), Some(Duration::from_secs(30)));
        assert_eq!(retry_hint(29), Some(Duration::from_secs(30)));
        // The normal case passes unchanged.
        assert_eq!(retry_hint(120), Some(Duration::from_secs(120)));
        assert_eq!(retry_hint(1800), Some(Duration::from_secs(1800)));
        assert_eq!(retry_hint(0), None);
    }

    #[test]
    fn granted_lifetimes_never_exceed_what_was_asked() {
        assert_eq!(granted_lifetime(u32::MAX, 3600), Some(3600));
        assert_eq!(granted_lifetime(3601, 3600), Some(3600));
        // Less than asked is the router's right.
        assert_eq!(granted_lifetime(120, 3600), Some(120));
        assert_eq!(granted_lifetime(3600, 3600), Some(3600));
        assert_eq!(granted_lifetime(0, 3600), None);
    }
}
