//! The one backoff of the daemon: the wait after `failures` failures in a row, doubling from a
//! floor up to a ceiling. Router retries ([`crate::reconcile::retry_delay`], with jitter),
//! refused Events ([`crate::kube::events`]) and router probes ([`crate::router::session`]) all
//! wait by it. It is a pure function of the count, so the count can live in the state file and
//! a restart keeps the backoff (ARCHITECTURE.md, "State lifecycle").

use std::time::Duration;

/// The wait after `failures` failures in a row: `floor` after the first (and for 0), doubled
/// per further failure, never above `ceiling` (or `floor`, if that is higher).
pub fn doubling(failures: u32, floor: Duration, ceiling: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    floor.saturating_mul(1 << doublings).min(ceiling.max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_floor_up_to_the_ceiling() {
        let secs = |n| doubling(n, Duration::from_secs(30), Duration::from_secs(600)).as_secs();
        let waits: Vec<u64> = (0..8).map(secs).collect();
        assert_eq!(waits, [30, 30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(secs(u32::MAX), 600);
    }

    #[test]
    fn a_floor_above_the_ceiling_wins() {
        let wait = doubling(3, Duration::from_secs(3600), Duration::from_secs(600));
        assert_eq!(wait, Duration::from_secs(3600));
    }
}
