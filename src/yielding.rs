//! How a long pass stays responsive (ARCHITECTURE.md, "The loop"; README.md, "Monitoring"):
//! the order in which `reconcile::execute` sends a plan's router requests ([`order`]), how
//! often it saves their results ([`Saves`]), and when it stops between two requests
//! ([`Yield`]) so the loop can handle a signal, a newer cluster change or a renewal that fell
//! due; the next pass plans what is left.
//!
//! One router call can hold many requests too (a probe tries each protocol, a UPnP purge lists
//! every mapping): run under [`Progress::during`], each answer inside it counts as progress
//! ([`progressed`]) and pings the watchdog, as the answers of a pass do.
//!
//! Stopping early loses nothing: every request was saved as `pending` before it was sent
//! (ARCHITECTURE.md, "State lifecycle"), so what was not sent is requested again by the next
//! pass, and every result is saved before the pass returns.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use jiff::Timestamp;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::model::MappingKey;
use crate::plan::Action;
use crate::state::State;

/// The results of a pass are saved at least this often, and at its end: a router that
/// answers slowly has each answer saved as it comes; a fast one does not pay two fsyncs per
/// answer.
pub const SAVE_EVERY_MS: u64 = 1_000;
/// A pass runs at least this long before it yields to a newer cluster change or a renewal
/// falling due, so neither a busy cluster nor a stream of renewals cuts every pass down to
/// one request.
pub const YIELD_AFTER_MS: u64 = 1_000;

/// Why a pass stopped before its last router request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// SIGTERM or SIGINT: the daemon stops.
    Stop,
    /// SIGHUP: the config is reloaded.
    Reload,
    /// The cluster changed after the pass was planned.
    ClusterChanged,
    /// A renewal or retry the plan did not hold fell due.
    Due,
}

impl std::fmt::Display for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interrupt::Stop => "a stop signal",
            Interrupt::Reload => "a reload signal",
            Interrupt::ClusterChanged => "a newer cluster change",
            Interrupt::Due => "a renewal that fell due",
        })
    }
}

/// Asked by `reconcile::execute` before each router request.
pub trait Yield {
    /// Whether the pass stops here; `sent` requests went already in this pass.
    fn interrupt(&mut self, sent: usize) -> Option<Interrupt>;

    /// A grant of this pass is to be renewed at `at`: a pass still running then stops.
    fn falls_due(&mut self, _at: Timestamp) {}
}

/// Never stops a pass (`holepunch cleanup`, tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct Never;

impl Yield for Never {
    fn interrupt(&mut self, _sent: usize) -> Option<Interrupt> {
        None
    }
}

/// What stops the daemon's passes: the signals (flags set by their handlers), changes of the
/// cluster, and the plan's next due time.
///
/// A stop signal stops a pass before any request (a stopping daemon sends nothing more); the
/// others only after the pass sent one, so every pass makes progress.
#[derive(Debug, Clone)]
pub struct Interrupts {
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    changed: Option<Arc<Notify>>,
    planned_at: Timestamp,
    started: Instant,
    due: Option<Instant>,
}

impl Default for Interrupts {
    fn default() -> Self {
        Interrupts {
            stop: Arc::default(),
            reload: Arc::default(),
            changed: None,
            planned_at: Timestamp::UNIX_EPOCH,
            started: Instant::now(),
            due: None,
        }
    }
}

impl Interrupts {
    /// Flags raised by SIGTERM and SIGINT (stop) and SIGHUP (reload), alongside the loop's
    /// own handling of those signals.
    pub fn signals() -> std::io::Result<Interrupts> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let interrupts = Interrupts::default();
        signal_hook::flag::register(SIGTERM, interrupts.stop.clone())?;
        signal_hook::flag::register(SIGINT, interrupts.stop.clone())?;
        signal_hook::flag::register(SIGHUP, interrupts.reload.clone())?;
        Ok(interrupts)
    }

    /// Also stops a pass when `changed` is notified (the cluster watch's notification).
    pub fn watching(mut self, changed: Arc<Notify>) -> Interrupts {
        self.changed = Some(changed);
        self
    }

    /// A pass planned at `now` begins; `due` is when something it did not plan falls due.
    pub fn begin(&mut self, now: Timestamp, due: Option<Timestamp>) {
        self.started = Instant::now();
        self.planned_at = now;
        self.due = None;
        if let Some(due) = due {
            self.falls_due(due);
        }
    }

    /// Whether a stop signal came.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Raises the stop flag as SIGTERM does (tests).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The loop handled a reload: a pass after it is not cut short for it.
    pub fn reloaded(&self) {
        self.reload.store(false, Ordering::SeqCst);
    }

    /// Raises the reload flag as SIGHUP does (tests).
    pub fn request_reload(&self) {
        self.reload.store(true, Ordering::SeqCst);
    }
}

impl Yield for Interrupts {
    fn interrupt(&mut self, sent: usize) -> Option<Interrupt> {
        if self.stopping() {
            return Some(Interrupt::Stop);
        }
        if sent == 0 {
            return None;
        }
        // (Taken once: a SIGHUP the loop already handled costs at most one short pass.)
        if self.reload.swap(false, Ordering::SeqCst) {
            return Some(Interrupt::Reload);
        }
        if self.started.elapsed() < Duration::from_millis(YIELD_AFTER_MS) {
            return None;
        }
        if self.due.is_some_and(|due| Instant::now() >= due) {
            return Some(Interrupt::Due);
        }
        // Taking the notification is safe: the loop runs the next pass at once.
        if let Some(changed) = &self.changed
            && changed.notified().now_or_never().is_some()
        {
            return Some(Interrupt::ClusterChanged);
        }
        None
    }

    fn falls_due(&mut self, at: Timestamp) {
        let wait = Duration::try_from(at.duration_since(self.planned_at)).unwrap_or(Duration::ZERO);
        let at = self.started.checked_add(wait).unwrap_or(self.started);
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }
}

/// When the results of a pass are saved: after a router answer, once [`SAVE_EVERY_MS`]
/// passed since the last save.
#[derive(Debug)]
pub struct Saves {
    last: Instant,
    unsaved: bool,
}

impl Default for Saves {
    fn default() -> Self {
        Saves {
            last: Instant::now(),
            unsaved: false,
        }
    }
}

impl Saves {
    /// A request is about to be sent: its result is not saved yet.
    pub fn sending(&mut self) {
        self.unsaved = true;
    }

    /// Whether results wait to be saved and the last save is long enough ago.
    pub fn due(&self) -> bool {
        self.unsaved && self.last.elapsed() >= Duration::from_millis(SAVE_EVERY_MS)
    }

    /// The state was just saved.
    pub fn saved(&mut self) {
        self.last = Instant::now();
        self.unsaved = false;
    }
}

tokio::task_local! {
    static PROGRESS: Progress;
}

/// What a router answer inside a long call reports: the loop is alive (the daemon pings the
/// watchdog with it; the default does nothing).
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<dyn Fn() + Send + Sync>>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(reported)"
        } else {
            "Progress(none)"
        })
    }
}

impl Progress {
    /// Progress reported through `alive`.
    pub fn new(alive: impl Fn() + Send + Sync + 'static) -> Progress {
        Progress(Some(Arc::new(alive)))
    }

    /// Reports progress now (between two requests the caller sends itself).
    pub fn now(&self) {
        if let Some(alive) = &self.0 {
            alive();
        }
    }

    /// Runs `call`; every router answer inside it ([`progressed`]) reports progress.
    pub async fn during<F: Future>(&self, call: F) -> F::Output {
        PROGRESS.scope(self.clone(), call).await
    }
}

/// A router answer came (called by the router clients between their requests): progress, if
/// the call runs under [`Progress::during`]; nothing otherwise.
pub fn progressed() {
    let _ = PROGRESS.try_with(Progress::now);
}

/// The order in which a plan's router requests go: renewals first, the lease nearest expiry
/// first (a lease that runs out cuts the Service off); then restores (Services already cut
/// off); then new mappings (with a port changing owner, the old owner's mapping is deleted
/// just before); then removals. Within each group the plan's order stays.
pub fn order<'a>(actions: &'a [Action], state: &State) -> Vec<&'a Action> {
    let remapped: std::collections::BTreeSet<MappingKey> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Map { mapping, .. } => Some(mapping.key()),
            _ => None,
        })
        .collect();
    let rank = |action: &Action| -> (u8, Timestamp, Option<MappingKey>, u8) {
        match action {
            Action::Renew { mapping, .. } => {
                let expires = state
                    .mappings
                    .get(&mapping.key())
                    .and_then(|r| r.times.expires_at)
                    .unwrap_or(Timestamp::MAX);
                (1, expires, None, 0)
            }
            Action::Restore { .. } => (2, Timestamp::MAX, None, 0),
            Action::Unmap { record } if remapped.contains(&record.key()) => {
                (3, Timestamp::MAX, Some(record.key()), 0)
            }
            Action::Map { mapping, .. } => (3, Timestamp::MAX, Some(mapping.key()), 1),
            Action::Unmap { .. } => (4, Timestamp::MAX, None, 0),
            // No router request from `execute`: first, their order does not matter.
            Action::Retarget { .. }
            | Action::Report { .. }
            | Action::Retire { .. }
            | Action::Purge { .. }
            | Action::Readdress { .. }
            | Action::Forward { .. } => (0, Timestamp::MAX, None, 0),
        }
    };
    let mut ordered: Vec<&Action> = actions.iter().collect();
    ordered.sort_by_key(|a| rank(a));
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Endpoint, Owner, PortMapping, Protocol, Target, TargetSource};
    use crate::plan::RestoreReason;
    use crate::state::{MappingRecord, MappingStatus};
    use std::net::Ipv4Addr;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid test timestamp")
    }

    fn mapping(owner: &str, port: u16) -> PortMapping {
        PortMapping {
            owner: owner.parse().expect("ns/name"),
            service_port: port,
            protocol: Protocol::Tcp,
            external_port: port,
            target: Target {
                endpoint: Endpoint::new(Ipv4Addr::new(192, 168, 1, 20), 30_000 + port),
                source: TargetSource::NodePort,
            },
        }
    }

    fn internal(port: u16) -> Endpoint {
        Endpoint::new(Ipv4Addr::new(192, 168, 1, 10), port)
    }

    fn record(owner: &str, port: u16, expires: i64) -> MappingRecord {
        let owner: Owner = owner.parse().expect("ns/name");
        let key = mapping("x/y", port).key();
        MappingRecord {
            status: MappingStatus::Active,
            times: crate::state::LeaseTimes {
                expires_at: Some(t(expires)),
                ..Default::default()
            },
            ..MappingRecord::leftover(owner, key, internal(port), Backend::Upnp)
        }
    }

    fn describe(action: &Action) -> String {
        match action {
            Action::Map { mapping, .. } => format!("map {}", mapping.external_port),
            Action::Renew { mapping, .. } => format!("renew {}", mapping.external_port),
            Action::Restore { mapping, .. } => format!("restore {}", mapping.external_port),
            Action::Unmap { record } => format!("unmap {} {}", record.external_port, record.owner),
            other => format!("other {other}"),
        }
    }

    #[test]
    fn renewals_nearest_expiry_first_then_restores_new_mappings_and_removals() {
        let state = State {
            mappings: [
                record("default/a", 1, 900),
                record("default/b", 2, 300),
                record("default/c", 3, 600),
                record("default/gone", 4, 100),
                record("default/old", 5, 100),
                record("default/lost", 6, 100),
            ]
            .into_iter()
            .map(|r| (r.key(), r))
            .collect(),
            ..State::default()
        };
        let renew = |port| Action::Renew {
            mapping: mapping("default/x", port),
            internal: internal(port),
        };
        let actions = vec![
            // A port changing owner: the old owner's unmap, as the plan lists it, first.
            Action::Unmap {
                record: Box::new(record("default/old", 5, 100)),
            },
            Action::Unmap {
                record: Box::new(record("default/gone", 4, 100)),
            },
            Action::Map {
                mapping: mapping("default/new", 7),
                internal: internal(7),
            },
            Action::Map {
                mapping: mapping("default/heir", 5),
                internal: internal(5),
            },
            Action::Restore {
                mapping: mapping("default/lost", 6),
                internal: internal(6),
                reason: RestoreReason::RouterRestarted,
            },
            renew(1),
            renew(2),
            renew(3),
        ];
        let ordered: Vec<String> = order(&actions, &state).into_iter().map(describe).collect();
        assert_eq!(
            ordered,
            [
                "renew 2",
                "renew 3",
                "renew 1",
                "restore 6",
                "unmap 5 default/old",
                "map 5",
                "map 7",
                "unmap 4 default/gone",
            ]
        );
        // Nothing is lost or repeated.
        assert_eq!(ordered.len(), actions.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_interrupts_at_once_the_others_only_after_one_request() {
        let mut nothing = Interrupts::default();
        assert_eq!(nothing.interrupt(0), None);
        assert_eq!(nothing.interrupt(5), None, "nothing asked the pass to stop");

        let mut stop = Interrupts::default();
        stop.request_stop();
        assert_eq!(stop.interrupt(0), Some(Interrupt::Stop));
        assert_eq!(stop.interrupt(3), Some(Interrupt::Stop), "a stop stays");

        let mut reload = Interrupts::default();
        reload.request_reload();
        assert_eq!(
            reload.interrupt(0),
            None,
            "a pass sends one request at least"
        );
        assert_eq!(reload.interrupt(1), Some(Interrupt::Reload));
        assert_eq!(reload.interrupt(2), None, "a reload is taken once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_falling_due_interrupts_when_its_time_comes() {
        let mut interrupts = Interrupts::default();
        interrupts.begin(t(0), Some(t(10)));
        assert_eq!(interrupts.interrupt(1), None);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(interrupts.interrupt(1), None, "not due yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(interrupts.interrupt(1), Some(Interrupt::Due));
        // A grant of the pass itself, renewed sooner than what the plan left.
        interrupts.begin(t(0), Some(t(100)));
        interrupts.falls_due(t(40));
        tokio::time::advance(Duration::from_secs(39)).await;
        assert_eq!(interrupts.interrupt(1), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(interrupts.interrupt(1), Some(Interrupt::Due));
        // Something already due waits until the pass ran a second.
        interrupts.begin(t(0), Some(t(0)));
        assert_eq!(interrupts.interrupt(1), None);
        tokio::time::advance(Duration::from_millis(YIELD_AFTER_MS)).await;
        assert_eq!(interrupts.interrupt(1), Some(Interrupt::Due));
        // Planned with nothing else due: never.
        interrupts.begin(t(0), None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(interrupts.interrupt(1), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_change_interrupts_a_pass_that_ran_a_while() {
        let changed = Arc::new(Notify::new());
        let mut interrupts = Interrupts::default().watching(changed.clone());
        interrupts.begin(t(0), None);
        assert_eq!(interrupts.interrupt(1), None, "no change");
        changed.notify_one();
        assert_eq!(
            interrupts.interrupt(1),
            None,
            "a change right after the pass began waits"
        );
        tokio::time::advance(Duration::from_millis(YIELD_AFTER_MS)).await;
        assert_eq!(interrupts.interrupt(1), Some(Interrupt::ClusterChanged));
        assert_eq!(interrupts.interrupt(1), None, "the change was taken");
    }

    #[tokio::test]
    async fn answers_inside_a_long_call_report_progress_only_under_during() {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        let progress = Progress::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let three_answers = || async {
            for _ in 0..3 {
                tokio::task::yield_now().await;
                progressed();
            }
        };
        three_answers().await;
        assert_eq!(count.load(Ordering::SeqCst), 0, "outside a call: nothing");
        progress.during(three_answers()).await;
        assert_eq!(count.load(Ordering::SeqCst), 3);
        progress.now();
        assert_eq!(count.load(Ordering::SeqCst), 4);
        Progress::default().during(three_answers()).await;
        assert_eq!(
            count.load(Ordering::SeqCst),
            4,
            "the default reports nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn results_are_saved_at_most_once_a_second_and_only_when_there_are_some() {
        let mut saves = Saves::default();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!saves.due(), "nothing sent, nothing to save");
        saves.sending();
        assert!(saves.due());
        saves.saved();
        saves.sending();
        tokio::time::advance(Duration::from_millis(SAVE_EVERY_MS - 1)).await;
        assert!(!saves.due(), "saved less than a second ago");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(saves.due());
    }
}
