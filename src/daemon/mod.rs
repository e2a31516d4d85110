//! The event loop of `holepunch run`: watch the cluster, reconcile on changes and on lease
//! timers, reload on SIGHUP, stop on SIGTERM, and keep systemd informed (`READY=1`,
//! `STATUS=`, watchdog pings, `STOPPING=1`).
//!
//! [`run`] tells the story (ARCHITECTURE.md, "The loop"): it builds a [`Context`] per config,
//! waits for a [`Trigger`] and hands it to [`Context::pass`]. A stop leaves every mapping in
//! place, so restarts and upgrades do not cut traffic; nothing is unmapped while the cluster
//! cannot be read (ARCHITECTURE.md, "State lifecycle").

mod coalesce;
mod context;
pub mod pinholes;
#[cfg(test)]
mod tests;

pub use coalesce::{COALESCE_WINDOW_MS, Coalesce};
pub use context::{
    Clock, Context, Next, SystemClock, Trigger, double_nat_problems, preferred_backend,
};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use crate::config::{self, BackendChoice, Config, ExposureMode};
use crate::ha::role::{FencedConnect, Leadership};
use crate::kube::KubeError;
use crate::kube::watch::ClusterWatch;
use crate::kube::writer::ClusterWriter;
use crate::metrics::{self, Metrics};
use crate::nft::{self, NftFirewall};
use crate::plan::{Forwarding, Observations};
use crate::reconcile::StateStore;
use crate::router::announce::{AnnounceListener, Announcement};
use crate::router::choice::RouterAddress;
use crate::router::discover::{self, DiscoverError};
use crate::router::session::RouterConnect;
use crate::state::{State, StateError, StateFile};
use crate::yielding::{Interrupts, Progress};

/// How long to wait before looking for a missing kubeconfig again.
pub const KUBECONFIG_RETRY_SECS: u64 = 10;

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Discover(#[from] DiscoverError),
    #[error(transparent)]
    Kubeconfig(KubeError),
    #[error(transparent)]
    Ha(#[from] crate::ha::role::HaError),
}

/// Runs until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub async fn run(config_path: PathBuf, mut config: Config) -> Result<(), DaemonError> {
    let (mut state, mut store) = open_state(&config.state.path)?;
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    // The same signals, seen by a long pass between two router requests.
    let interrupts = Interrupts::signals().map_err(DaemonError::Signals)?;
    let mut systemd = Systemd::default();
    let metrics = Metrics::new(config.router.lease_secs, verify_interval(&config));
    // The watchdog is pinged by progress only (metrics: each pass, each router answer, an
    // idle wait), never by a timer of its own: a loop stuck for WatchdogSec is killed.
    metrics.watch_over(sd_notify::watchdog_enabled());
    // NOTE: bound once: a changed metrics.listen takes effect at the next start.
    let _metrics_server = serve_metrics(config.metrics.listen, &metrics).await;
    // What the state file holds counts from the start (leases from a previous run included).
    metrics.observe_state(&state, &[], None);
    let mut observed = Observations::default();
    // [ha] (README, "High availability"): started once, kept across reloads.
    crate::ha::role::check_announce_allowed(config.ha.as_ref())?;
    crate::ha::role::remove_stale_address(config.ha.as_ref());
    let mut leadership: Option<Leadership> = None;

    'config: loop {
        metrics.configure(config.router.lease_secs, verify_interval(&config));
        let (forwarding, address) = network(&config)?;
        let mut announcements = listen_for_announcements(address.as_ref());
        let client = match wait_for_cluster(&config, &mut signals, &mut systemd, &metrics).await {
            Ok(client) => client,
            Err(ClusterWait::Refused(e)) => return Err(DaemonError::Kubeconfig(e)),
            Err(ClusterWait::Woken(Wake::Stop)) => return stop(leadership).await,
            Err(ClusterWait::Woken(Wake::Reload | Wake::Timer)) => {
                if let Some(new) = reload(&config_path) {
                    config = new;
                }
                continue 'config;
            }
        };
        if let (None, Some(ha)) = (&leadership, &config.ha) {
            leadership = Some(Leadership::start(client.clone(), ha)?);
        }
        let cluster = ClusterWatch::start(client.clone(), &config, metrics.clone());
        let changed = cluster.changed.clone();
        let report = ClusterWriter::start(client, &config, metrics.clone());
        tracing::info!("watching the cluster");
        let router = router_connect(&config, address, leadership.as_ref());
        let mut ctx = Context::new(
            config.clone(),
            forwarding,
            router,
            NftFirewall,
            cluster,
            report,
            &mut state,
            &mut store,
            &mut observed,
            &metrics,
            &SystemClock,
            &mut systemd,
        )
        .with_ha(leadership.as_mut());
        ctx.interrupts = interrupts.clone().watching(changed.clone());
        let alive = metrics.clone();
        ctx.router.progress = Progress::new(move || alive.loop_alive());
        let mut coalesce = Coalesce::default();
        loop {
            // Every pass through the loop proves it alive (and pings the watchdog), however
            // busy the cluster is.
            metrics.loop_alive();
            let sleep = ctx.sleep_for();
            let role = ctx.role_changed();
            let changes = coalesce.next_change(&changed);
            let event = next_event(
                changes,
                sleep,
                &mut announcements,
                &mut signals,
                &metrics,
                role,
            );
            match event.await {
                Event::Pass(trigger) => {
                    if ctx.pass(trigger).await.served.is_some() {
                        coalesce.passed(tokio::time::Instant::now());
                    }
                }
                Event::Reload => {
                    if let Some(new) = reload_keeping_ha(&config_path, &config) {
                        interrupts.reloaded();
                        config = new;
                        continue 'config;
                    }
                }
                Event::Stop => {
                    drop(ctx);
                    return stop(leadership).await;
                }
            }
        }
    }
}

/// The state file, locked, and what it holds (a damaged one is moved aside and said loudly).
fn open_state(path: &Path) -> Result<(State, StateStore<StateFile>), DaemonError> {
    let (file, loaded) = StateFile::open(path)?;
    if let Some(recovery) = &loaded.recovery {
        tracing::error!(moved_to = %recovery.moved_to.display(), "{recovery}");
    }
    Ok((loaded.state, StateStore::new(file)))
}

/// What the loop handles next.
enum Event {
    Pass(Trigger),
    Reload,
    Stop,
}

/// Waits for the next trigger of a pass (a cluster change, once [`Coalesce`] lets it go; the
/// timer after `sleep`; a router announcement) or a signal, pinging the watchdog meanwhile.
async fn next_event(
    changes: impl Future<Output = ()>,
    sleep: Duration,
    announcements: &mut Option<AnnounceListener>,
    signals: &mut Signals,
    metrics: &Metrics,
    role: impl Future<Output = ()>,
) -> Event {
    tokio::select! {
        // Signals first: a pass cut short by one left the next pass due at once.
        biased;
        wake = wait_signal_or(signals, Duration::MAX, metrics) => match wake {
            Wake::Reload => Event::Reload,
            Wake::Stop => Event::Stop,
            // (Without a deadline the wait ends only with a signal.)
            Wake::Timer => Event::Pass(Trigger::Timer),
        },
        // This host's HA standing changed (README, "High availability").
        () = role => Event::Pass(Trigger::Timer),
        () = changes => Event::Pass(Trigger::Cluster),
        () = tokio::time::sleep(sleep) => Event::Pass(Trigger::Timer),
        announcement = next_announcement(announcements) => {
            Event::Pass(Trigger::Announcement(announcement))
        }
    }
}

/// Why [`wait_for_cluster`] returned without a client.
enum ClusterWait {
    /// A signal came first.
    Woken(Wake),
    /// The kubeconfig can be changed by others: waiting would not help.
    Refused(KubeError),
}

/// The cluster client, once a usable kubeconfig exists: waits (and says why) without
/// crash-looping, while it is missing or unusable; a kubeconfig others may change is refused.
async fn wait_for_cluster(
    config: &Config,
    signals: &mut Signals,
    systemd: &mut Systemd,
    metrics: &Metrics,
) -> Result<kube::Client, ClusterWait> {
    loop {
        match crate::kube::client(&config.kubernetes).await {
            Ok(client) => return Ok(client),
            Err(e @ KubeError::KubeconfigUntrusted { .. }) => return Err(ClusterWait::Refused(e)),
            Err(e) => {
                metrics.waiting_for_cluster(Some(&e.to_string()));
                tracing::error!("{e}");
                systemd.status(&first_line(&e.to_string()));
                // NOTE: systemd would otherwise time the start out and restart us in a loop;
                // "waiting for a kubeconfig" is a ready, healthy state.
                systemd.ready_quietly();
                let retry = Duration::from_secs(KUBECONFIG_RETRY_SECS);
                match wait_signal_or(signals, retry, metrics).await {
                    Wake::Timer => continue,
                    wake => return Err(ClusterWait::Woken(wake)),
                }
            }
        }
    }
}

/// Serves `/metrics` and `/healthz` on `listen`, if set, until the returned guard drops.
async fn serve_metrics(listen: Option<SocketAddr>, metrics: &Arc<Metrics>) -> Option<AbortOnDrop> {
    let address = listen?;
    match metrics::bind(address).await {
        Ok(listener) => {
            tracing::info!(%address, "serving /metrics and /healthz");
            Some(AbortOnDrop(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
            ))))
        }
        Err(e) => {
            tracing::error!("{e}");
            None
        }
    }
}

/// Listens for the router's restart announcements (PCP, NAT-PMP), when a router is used.
fn listen_for_announcements(address: Option<&RouterAddress>) -> Option<AnnounceListener> {
    let address = address?;
    AnnounceListener::bind(address.local, address.gateway)
        .inspect_err(|e| {
            tracing::warn!(error = %e,
                "not listening for router restart announcements; a restart is noticed at the next verify instead");
        })
        .ok()
}

fn verify_interval(config: &Config) -> Duration {
    Duration::from_secs(config.router.verify_interval_secs.into())
}

/// What systemd is told: `READY=1` once and `STATUS=` (the watchdog is pinged through
/// [`Metrics::loop_alive`]). Without `NOTIFY_SOCKET` (tests, a shell) every call does
/// nothing.
#[derive(Debug, Default)]
pub struct Systemd {
    ready_sent: bool,
}

impl Systemd {
    /// `STATUS=`: what `systemctl status` shows.
    pub fn status(&self, status: &str) {
        // One line: a newline in a text from the cluster (a Lease's holder) or a router would
        // otherwise start another notify assignment (`WATCHDOG=`, `MAINPID=`).
        let line: String = status
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
    }

    /// `READY=1` once, after the first reconcile (`mappings_up` is logged).
    pub fn ready(&mut self, mappings_up: usize) {
        if !self.ready_sent {
            self.ready_quietly();
            tracing::info!(mappings = mappings_up, "first reconcile done; ready");
        }
    }

    /// `READY=1` once, without a reconcile (waiting for a kubeconfig is a healthy state).
    fn ready_quietly(&mut self) {
        if !self.ready_sent {
            let _ = sd_notify::notify(&[NotifyState::Ready]);
            self.ready_sent = true;
        }
    }
}

/// The next announcement, or never when there is no listener.
async fn next_announcement(listener: &mut Option<AnnounceListener>) -> Announcement {
    match listener {
        Some(listener) => listener.next().await,
        None => std::future::pending().await,
    }
}

/// Where the router is and this host's address toward it; `None` when no router is used
/// (`gateway` mode, `router.backend = "none"`).
pub fn router_address(
    config: &Config,
    forwarding: Forwarding,
) -> Result<Option<RouterAddress>, DiscoverError> {
    if config.exposure.mode == ExposureMode::Gateway || config.router.backend == BackendChoice::None
    {
        return Ok(None);
    }
    let gateway = match config.router.address {
        Some(address) => address,
        None => discover::default_gateway()?,
    };
    let local = match forwarding {
        Forwarding::Relay { lan_address } => lan_address,
        Forwarding::Direct | Forwarding::Gateway => discover::source_address_toward(gateway)?,
    };
    Ok(Some(RouterAddress { gateway, local }))
}

/// Where the router forwards (per exposure mode) and where the router is, for this config;
/// warns when the kernel does not forward IPv4 and the mode needs it.
fn network(config: &Config) -> Result<(Forwarding, Option<RouterAddress>), DaemonError> {
    let floating = config
        .ha
        .as_ref()
        .and_then(|ha| ha.address.map(|a| a.addr()));
    let forwarding = forwarding(config, floating)?;
    let address = router_address(config, forwarding)?;
    if forwarding != Forwarding::Direct
        && let Err(e) = nft::check_forwarding()
    {
        tracing::error!("{e}");
    }
    Ok((forwarding, address))
}

/// The router session's connection. With [ha], every request it makes is fenced (README,
/// "High availability"); without it, the fence never closes.
fn router_connect(
    config: &Config,
    address: Option<RouterAddress>,
    leadership: Option<&Leadership>,
) -> FencedConnect<RouterConnect> {
    let fence = leadership.map(Leadership::fence).unwrap_or_default();
    FencedConnect::new(
        RouterConnect {
            address,
            config: config.router.clone(),
        },
        fence,
    )
}

/// Hands the Lease over (with [ha]) and tells systemd the daemon is stopping; `run`'s end.
async fn stop(leadership: Option<Leadership>) -> Result<(), DaemonError> {
    if let Some(ha) = leadership {
        ha.stop().await;
    }
    tracing::info!("stopping; router mappings and nftables rules stay in place");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    Ok(())
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

/// Re-reads the config at SIGHUP (see [`reload`]); `[ha]` keeps its running value, since a
/// changed one takes effect at the next start only.
fn reload_keeping_ha(path: &Path, running: &Config) -> Option<Config> {
    let mut new = reload(path)?;
    if new.ha != running.ha {
        tracing::error!(
            "[ha] changed in the config file: it takes effect at the next start (systemctl restart holepunch); the running [ha] stays"
        );
        new.ha = running.ha.clone();
    }
    Some(new)
}

/// Re-reads the config; a bad one is refused and the old one kept.
fn reload(path: &Path) -> Option<Config> {
    let _ = sd_notify::notify(&[NotifyState::Reloading]);
    let result = match config::load(path) {
        Ok(new) => {
            tracing::info!(path = %path.display(), "config reloaded");
            Some(new)
        }
        Err(e) => {
            tracing::error!("config not reloaded, the running one stays: {e}");
            None
        }
    };
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    result
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Wake {
    Stop,
    Reload,
    Timer,
}

/// Waits for a signal or `timeout`; the loop is idle and alive meanwhile, which pings the
/// systemd watchdog (see [`Metrics::loop_alive`]).
async fn wait_signal_or(signals: &mut Signals, timeout: Duration, metrics: &Metrics) -> Wake {
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    loop {
        let ping = metrics.alive_every();
        let sleep = match deadline {
            Some(deadline) => {
                ping.min(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
            None => ping,
        };
        tokio::select! {
            signal = signals.next() => match signal {
                Some(SIGHUP) => return Wake::Reload,
                Some(_) | None => return Wake::Stop,
            },
            () = tokio::time::sleep(sleep) => {
                metrics.loop_alive();
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Wake::Timer;
                }
            }
        }
    }
}

/// Where the router forwards, from the exposure mode (and in relay mode the LAN address:
/// `lan_override`, else `exposure.lan_address`, else this host's address toward the router).
pub fn forwarding(
    config: &Config,
    lan_override: Option<std::net::Ipv4Addr>,
) -> Result<Forwarding, DiscoverError> {
    Ok(match config.exposure.mode {
        ExposureMode::Direct => Forwarding::Direct,
        ExposureMode::Gateway => Forwarding::Gateway,
        ExposureMode::Relay => {
            let lan_address = match lan_override.or(config.exposure.lan_address) {
                Some(address) => address,
                None => {
                    let gateway = match config.router.address {
                        Some(address) => address,
                        None => discover::default_gateway()?,
                    };
                    discover::source_address_toward(gateway)?
                }
            };
            Forwarding::Relay { lan_address }
        }
    })
}
