//! Crash points: named places where the crash tests (`tests/daemon_crash.rs`: SIGKILL
//! at random points) make the daemon kill itself with SIGKILL, to prove that a crash at the
//! worst moment loses nothing (ARCHITECTURE.md, "State lifecycle").
//!
//! Armed only by the environment variable [`CRASH_AT_ENV`]: `<point>` (the first time the
//! point is reached) or `<point>:<n>` (the n-th time). It is read once; when it is unset, as in
//! production, [`reached`] costs one `OnceLock` read and does nothing.
//!
//! [`FREEZE_AT_ENV`] arms a point the same way to freeze instead: the thread that reaches it
//! sleeps for good while the rest of the process goes on, as a stuck event loop would; the
//! watchdog test (`tests/daemon_slow.rs`) proves systemd's watchdog then hears nothing.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// `HOLEPUNCH_CRASH_AT=<point>[:<n>]` arms a crash point.
pub const CRASH_AT_ENV: &str = "HOLEPUNCH_CRASH_AT";
/// The state's temp file is written and synced, not yet renamed over the state file.
pub const STATE_TEMP_WRITTEN: &str = "state-temp-written";
/// The temp file was renamed over the state file; the directory is not yet synced.
pub const STATE_RENAMED: &str = "state-renamed";
/// A PCP request left the socket; its answer has not been read.
pub const PCP_SENT: &str = "pcp-sent";
/// A NAT-PMP request left the socket; its answer has not been read.
pub const NATPMP_SENT: &str = "natpmp-sent";
/// The event loop starts a pass (wakes from its wait).
pub const LOOP_PASS: &str = "loop-pass";
/// Every point above, for tests and error messages.
pub const POINTS: [&str; 5] = [
    STATE_TEMP_WRITTEN,
    STATE_RENAMED,
    PCP_SENT,
    NATPMP_SENT,
    LOOP_PASS,
];
/// `HOLEPUNCH_FREEZE_AT=<point>[:<n>]` freezes the thread that reaches the point.
pub const FREEZE_AT_ENV: &str = "HOLEPUNCH_FREEZE_AT";

/// The armed point and how often it has been reached.
#[derive(Debug)]
struct Armed {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

impl PartialEq for Armed {
    fn eq(&self, other: &Self) -> bool {
        self.point == other.point && self.nth == other.nth
    }
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
static FROZEN: OnceLock<Option<Armed>> = OnceLock::new();

impl Armed {
    /// Counts one more arrival at `point`; the count when it is the armed one's n-th.
    fn hit(&self, point: &str) -> Option<u64> {
        if self.point != point {
            return None;
        }
        let count = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        (count == self.nth).then_some(count)
    }
}

/// Marks `point` as reached; freezes this thread if [`FREEZE_AT_ENV`] armed it, or kills the
/// process with SIGKILL if [`CRASH_AT_ENV`] did, and this is the n-th time.
pub fn reached(point: &str) {
    let frozen = FROZEN.get_or_init(|| parse(std::env::var(FREEZE_AT_ENV).ok().as_deref()));
    if let Some(count) = frozen.as_ref().and_then(|f| f.hit(point)) {
        eprintln!("freeze point {point} reached (time {count}): this thread sleeps for good");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    let armed = ARMED.get_or_init(|| parse(std::env::var(CRASH_AT_ENV).ok().as_deref()));
    let Some(armed) = armed else {
        return;
    };
    if let Some(count) = armed.hit(point) {
        // Unbuffered, so the test can tell the point was reached before the process died.
        eprintln!("crash point {point} reached (time {count}): killing holepunch with SIGKILL");
        // SAFETY: raise(3) has no memory-safety preconditions; SIGKILL ends the process.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

/// `<point>` or `<point>:<n>` (n ≥ 1); anything else (unset, empty, unknown point, bad
/// count) arms nothing.
fn parse(value: Option<&str>) -> Option<Armed> {
    let value = value?.trim();
    let (point, nth) = match value.split_once(':') {
        Some((point, n)) => (point, n.parse::<u64>().ok().filter(|n| *n >= 1)?),
        None => (value, 1),
    };
    POINTS.contains(&point).then(|| Armed {
        point: point.to_owned(),
        nth,
        seen: AtomicU64::new(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(point: &str, nth: u64) -> Option<Armed> {
        Some(Armed {
            point: point.to_owned(),
            nth,
            seen: AtomicU64::new(0),
        })
    }

    #[test]
    fn parses_a_point_with_and_without_a_count() {
        assert_eq!(parse(Some("state-renamed")), armed(STATE_RENAMED, 1));
        assert_eq!(parse(Some("pcp-sent:3")), armed(PCP_SENT, 3));
        assert_eq!(parse(Some("loop-pass:3")), armed(LOOP_PASS, 3));
        assert_eq!(
            parse(Some(" state-temp-written:12 ")),
            armed(STATE_TEMP_WRITTEN, 12)
        );
    }

    #[test]
    fn anything_else_arms_nothing() {
        for value in [
            None,
            Some(""),
            Some("nowhere"),
            Some("pcp-sent:0"),
            Some("pcp-sent:x"),
            Some("pcp-sent:"),
            Some(":2"),
        ] {
            assert_eq!(parse(value), None, "{value:?}");
        }
    }

    #[test]
    fn an_unarmed_point_returns() {
        // The test process has no HOLEPUNCH_CRASH_AT: reaching a point must not kill it.
        if std::env::var_os(CRASH_AT_ENV).is_none() && std::env::var_os(FREEZE_AT_ENV).is_none() {
            reached(STATE_RENAMED);
            reached(PCP_SENT);
            reached(LOOP_PASS);
        }
    }
}
