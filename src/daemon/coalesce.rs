//! When a cluster change is reconciled (ARCHITECTURE.md, "The loop"): a change that arrives
//! after a quiet period goes out at once (the leading edge); changes that arrive while a pass
//! runs, or within [`COALESCE_WINDOW_MS`] after it ended, are gathered into one next pass, so
//! `kubectl apply` of 50 Services costs a handful of passes, not 50.

use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Cluster changes that arrive within this long after a pass ended wait for its end and are
/// reconciled together.
pub const COALESCE_WINDOW_MS: u64 = 200;

/// Decides when a cluster change is reconciled: at once after a quiet period, else when the
/// window after the last pass closes.
#[derive(Debug, Clone)]
pub struct Coalesce {
    window: Duration,
    /// When the last pass that reconciled ended; `None` before the first.
    last_pass_end: Option<Instant>,
}

impl Default for Coalesce {
    fn default() -> Self {
        Coalesce::new(Duration::from_millis(COALESCE_WINDOW_MS))
    }
}

impl Coalesce {
    pub fn new(window: Duration) -> Self {
        Coalesce {
            window,
            last_pass_end: None,
        }
    }

    /// A pass ended at `at`.
    pub fn passed(&mut self, at: Instant) {
        self.last_pass_end = Some(at);
    }

    /// A change arrived at `now`: `None` to reconcile it now, else when to.
    pub fn wait_until(&self, now: Instant) -> Option<Instant> {
        let open_at = self.last_pass_end?.checked_add(self.window)?;
        (now < open_at).then_some(open_at)
    }

    /// Waits for a change notified on `changed`, then until it may be reconciled. The
    /// notifications that came meanwhile are used up: the pass that follows reads them all.
    pub async fn next_change(&self, changed: &Notify) {
        changed.notified().await;
        if let Some(until) = self.wait_until(Instant::now()) {
            tokio::time::sleep_until(until).await;
        }
        // NOTE: `Notify` keeps one permit for changes that came during the wait; the
        // snapshot the pass reads holds them, so a second pass for them would find nothing new.
        let _ = changed.notified().now_or_never();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(COALESCE_WINDOW_MS);

    #[test]
    fn the_first_change_and_one_after_a_quiet_window_go_at_once() {
        let start = Instant::now();
        let mut coalesce = Coalesce::default();
        assert_eq!(coalesce.wait_until(start), None, "no pass yet");
        coalesce.passed(start);
        let quiet = start + WINDOW;
        assert_eq!(coalesce.wait_until(quiet), None);
        assert_eq!(coalesce.wait_until(quiet + Duration::from_secs(60)), None);
    }

    #[test]
    fn a_change_within_the_window_waits_for_its_end() {
        let start = Instant::now();
        let mut coalesce = Coalesce::default();
        coalesce.passed(start);
        assert_eq!(coalesce.wait_until(start), Some(start + WINDOW));
        let later = start + Duration::from_millis(150);
        assert_eq!(coalesce.wait_until(later), Some(start + WINDOW));
        // A later pass moves the window.
        coalesce.passed(later);
        assert_eq!(
            coalesce.wait_until(start + WINDOW),
            Some(later + WINDOW),
            "the window runs from the last pass"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_of_a_burst_are_gathered_into_the_pass_after_the_window() {
        let changed = Notify::new();
        let mut coalesce = Coalesce::default();
        // Quiet: the first change goes at once.
        changed.notify_one();
        let started = Instant::now();
        coalesce.next_change(&changed).await;
        assert_eq!(started.elapsed(), Duration::ZERO);

        // The pass ran (10 ms) and 49 more changes arrived meanwhile.
        tokio::time::advance(Duration::from_millis(10)).await;
        for _ in 0..49 {
            changed.notify_one();
        }
        coalesce.passed(Instant::now());
        let ended = Instant::now();
        // More arrive while the loop waits for the window.
        let notify_later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            changed.notify_one();
        };
        tokio::join!(coalesce.next_change(&changed), notify_later);
        assert_eq!(ended.elapsed(), WINDOW, "gathered until the window closed");

        // All were read by that pass: nothing is left to wake the loop.
        coalesce.passed(Instant::now());
        let woke = tokio::time::timeout(Duration::from_secs(5), coalesce.next_change(&changed));
        assert!(woke.await.is_err(), "a pass for changes already read");

        // A change after the quiet period goes at once again.
        changed.notify_one();
        let started = Instant::now();
        coalesce.next_change(&changed).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
