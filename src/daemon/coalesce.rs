//! When a cluster change is reconciled (ARCHITECTURE.md, "The loop"): a change that arrives
//! after a quiet period goes out at once (the leading edge); changes that arrive while a pass
//! runs, or within [`COALESCE_WINDOW_MS`] of the change before them, are gathered into one
//! next pass that starts when the window after the last pass closes, so `kubectl apply` of 50
//! Services costs a handful of passes, not 50.
//!
//! Quiet means no cluster change, not no pass: a lone change that comes shortly after a pass
//! (the grant of the change before it, a renewal) is not held for the window (README.md,
//! "Benchmarks": the window was most of the UPnP runs' latency).

use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Cluster changes that arrive within this long of the one before them (or during a pass)
/// are gathered: they wait until this long after the last pass ended.
pub const COALESCE_WINDOW_MS: u64 = 200;

/// Decides when a cluster change is reconciled: at once after a quiet period, else when the
/// window after the last pass closes.
#[derive(Debug, Clone)]
pub struct Coalesce {
    window: Duration,
    /// When the last pass that reconciled ended; `None` before the first.
    last_pass_end: Option<Instant>,
    /// When the loop last took a cluster change; `None` before the first.
    last_change: Option<Instant>,
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
            last_change: None,
        }
    }

    /// A pass ended at `at`.
    pub fn passed(&mut self, at: Instant) {
        self.last_pass_end = Some(at);
    }

    /// A change was taken at `now`, found already waiting when the loop came back from a pass
    /// (`during_pass`) or waking the idle loop: `None` to reconcile it now, else when to.
    pub fn wait_until(&self, now: Instant, during_pass: bool) -> Option<Instant> {
        let quiet = self
            .last_change
            .is_none_or(|last| now.saturating_duration_since(last) >= self.window);
        if quiet && !during_pass {
            return None;
        }
        let open_at = self.last_pass_end?.checked_add(self.window)?;
        (now < open_at).then_some(open_at)
    }

    /// Waits for a change notified on `changed`, then until it may be reconciled. The
    /// notifications that came meanwhile are used up: the pass that follows reads them all.
    pub async fn next_change(&mut self, changed: &Notify) {
        let during_pass = changed.notified().now_or_never().is_some();
        if !during_pass {
            changed.notified().await;
        }
        let now = Instant::now();
        let held = self.wait_until(now, during_pass);
        self.last_change = Some(now);
        if let Some(until) = held {
            tokio::time::sleep_until(until).await;
        }
        // README.md, "Benchmarks": the breakdown of annotated -> live.
        tracing::debug!(target: "holepunch::timing", stage = "woke", gathered = held.is_some(),
            "a cluster change wakes the loop");
        // NOTE: `Notify` keeps one permit for changes that came during the wait; the
        // snapshot the pass reads holds them, so a second pass for them would find nothing new.
        // They are the latest changes the loop took: the quiet period starts after them.
        if changed.notified().now_or_never().is_some() {
            self.last_change = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const WINDOW: Duration = Duration::from_millis(COALESCE_WINDOW_MS);

    #[test]
    fn the_first_change_and_one_after_a_quiet_window_go_at_once() {
        let start = Instant::now();
        let mut coalesce = Coalesce::default();
        assert_eq!(coalesce.wait_until(start, false), None, "no pass yet");
        coalesce.last_change = Some(start);
        coalesce.passed(start);
        let quiet = start + WINDOW;
        assert_eq!(coalesce.wait_until(quiet, false), None);
        assert_eq!(
            coalesce.wait_until(quiet + Duration::from_secs(60), false),
            None
        );
    }

    #[test]
    fn a_lone_change_soon_after_a_pass_goes_at_once_but_not_one_close_behind_another() {
        let start = Instant::now();
        // A change, its pass (150 ms: the router's answer), then the next change 100 ms
        // after the pass: quiet since the change before, so at once.
        let mut coalesce = Coalesce {
            last_change: Some(start),
            ..Coalesce::default()
        };
        let ended = start + Duration::from_millis(150);
        coalesce.passed(ended);
        let lone = ended + Duration::from_millis(100);
        assert_eq!(coalesce.wait_until(lone, false), None);
        // One 50 ms behind it: gathered until the window after the pass closes.
        coalesce.last_change = Some(lone);
        let close = lone + Duration::from_millis(50);
        assert_eq!(coalesce.wait_until(close, false), Some(ended + WINDOW));
    }

    #[test]
    fn a_change_that_came_during_a_pass_waits_for_the_window_after_it() {
        let start = Instant::now();
        let mut coalesce = Coalesce {
            last_change: Some(start - Duration::from_secs(60)),
            ..Coalesce::default()
        };
        coalesce.passed(start);
        assert_eq!(coalesce.wait_until(start, true), Some(start + WINDOW));
        let later = start + Duration::from_millis(150);
        assert_eq!(coalesce.wait_until(later, true), Some(start + WINDOW));
        // A later pass moves the window.
        coalesce.passed(later);
        assert_eq!(
            coalesce.wait_until(start + WINDOW, true),
            Some(later + WINDOW),
            "the window runs from the last pass"
        );
        // Once it closed, nothing to wait for.
        assert_eq!(coalesce.wait_until(later + WINDOW, true), None);
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

    #[tokio::test(start_paused = true)]
    async fn a_trickle_of_changes_costs_one_pass_per_window_not_one_per_change() {
        let changed = Arc::new(Notify::new());
        let mut coalesce = Coalesce::default();
        // A change every 50 ms for 1 s (kubectl writing one object after another), each
        // pass 10 ms: the idle loop is woken within the window of the change before.
        let writer = {
            let changed = Arc::clone(&changed);
            tokio::spawn(async move {
                for _ in 0..20 {
                    changed.notify_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let started = Instant::now();
        let mut passes = 0;
        while started.elapsed() < Duration::from_millis(1_100) {
            let next =
                tokio::time::timeout(Duration::from_millis(300), coalesce.next_change(&changed));
            if next.await.is_err() {
                break;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
            passes += 1;
            coalesce.passed(Instant::now());
        }
        writer.await.expect("writer");
        assert!(
            (2..=7).contains(&passes),
            "{passes} passes for 20 changes in 1 s"
        );
    }
}
