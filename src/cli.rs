//! The command line: `holepunch run | plan | status | check-config | cleanup | version`.
//!
//! The help text is the first manual most users read: every command says what it touches.

pub mod manual;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;

use crate::config::{self, Config, defaults};
use crate::daemon::{self, DaemonError};
use crate::desired::{Desired, desired};
use crate::kube::snapshot::Snapshot;
use crate::logging;
use crate::model::Backend;
use crate::plan::{Action, Forwarding, plan};
use crate::reconcile;
use crate::router::choice::Router;
use crate::state::{MappingRecord, MappingStatus, State, StateError, StateFile, read_state};

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  the config file is missing or invalid (the message gives file, line, column and the fix),
     or the kubeconfig can be changed by users other than root (the message says what to run)
  2  the command line is wrong
  3  another holepunch holds the state file's lock (only one instance may run per state file)
  4  the state file cannot be used (written by a newer holepunch, or its directory is unusable)
     (the systemd unit does not restart `holepunch run` after 1 or 4: fix it, then restart)
  5  the cluster or the router could not be reached for a one-shot command (plan, cleanup)
  6  any other failure (the message says which step failed)";

/// Exit code: config missing or invalid.
pub const EXIT_CONFIG: u8 = 1;
/// Exit code: another instance holds the lock.
pub const EXIT_LOCKED: u8 = 3;
/// Exit code: the state file cannot be used.
pub const EXIT_STATE: u8 = 4;
/// Exit code: the cluster or router was unreachable for a one-shot command.
pub const EXIT_UNREACHABLE: u8 = 5;
/// Exit code: anything else.
pub const EXIT_OTHER: u8 = 6;

/// Publish Kubernetes Services on the Internet through your home router.
///
/// holepunch watches a cluster through a kubeconfig and keeps the router's port mappings
/// (UPnP IGD, PCP, NAT-PMP), this host's nftables rules and its own state file in sync with
/// the Services that ask to be public: annotate a Service with
/// `holepunch/punch-external: "true"` (and optionally `holepunch.port/<port>: "<external>"`),
/// or give it `spec.loadBalancerClass: holepunch.io/router`.
#[derive(Debug, Parser)]
#[command(name = "holepunch", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// The config file (see holepunch.toml(5); every key is optional).
    #[arg(long, short = 'c', global = true, env = "HOLEPUNCH_CONFIG", default_value = defaults::CONFIG_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (what systemd starts): watch the cluster and keep mappings in sync.
    ///
    /// Takes the state file's lock (a second instance exits with code 3), reconciles once,
    /// then follows changes, renews leases and restores what the router loses. SIGHUP reloads
    /// the config (a bad one is refused and the old one kept); SIGTERM stops and leaves every
    /// mapping in place, so restarts and upgrades do not cut traffic.
    Run {
        #[command(flatten)]
        cluster: ClusterArgs,
    },

    /// Show what holepunch would do now, and change nothing.
    ///
    /// Reads the Services and Nodes from the cluster (or from --from-file) and the state
    /// file (read-only), and prints the actions: map, renew, restore, retarget, unmap, and
    /// the problems each Service would be told about. Sends nothing to the router.
    Plan {
        /// Read Services and Nodes from this file instead of the cluster: the output of
        /// `kubectl get svc,nodes -A -o yaml` (or JSON). `-` reads standard input.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["kubeconfig", "context"])]
        from_file: Option<PathBuf>,

        #[command(flatten)]
        cluster: ClusterArgs,

        /// Address the router forwards to in relay mode, if exposure.lan_address is not set
        /// (default: this host's source address toward the router).
        #[arg(long, value_name = "IPV4")]
        lan_address: Option<std::net::Ipv4Addr>,
    },

    /// Show the mappings holepunch holds, from the state file (works without the daemon).
    Status {
        /// Output format, as kubectl's `-o`: a table, a wider one, or every recorded field.
        #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },

    /// Validate the config file and print it with every default filled in.
    ///
    /// On an error, prints the file, line and column, the key, and what to change, and exits 1.
    CheckConfig,

    /// Remove every router mapping, IPv6 pinhole and the nftables table holepunch owns (used on
    /// purge).
    ///
    /// Only mappings (tagged holepunch:<namespace>/<service>) and pinholes recorded in the
    /// state file are touched. Takes the state file's lock, so stop the daemon first.
    Cleanup,

    /// Print the version.
    Version,

    /// Write the manual pages or the shell completions into a directory (package builds).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
        directory: PathBuf,
    },
}

/// What `holepunch generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Generated {
    /// holepunch.8 and holepunch.toml.5.
    Man,
    /// bash (`holepunch`), zsh (`_holepunch`) and fish (`holepunch.fish`) completions.
    Completions,
}

/// How to reach the cluster, with kubectl's flags (README "The kubeconfig").
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct ClusterArgs {
    /// The kubeconfig file to use, instead of kubernetes.kubeconfig, $KUBECONFIG (files
    /// separated by ':', merged as kubectl merges them) or /etc/holepunch/kubeconfig.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use, instead of kubernetes.context or the kubeconfig's
    /// current-context.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

impl From<ClusterArgs> for crate::kube::ClusterFlags {
    fn from(args: ClusterArgs) -> Self {
        crate::kube::ClusterFlags {
            kubeconfig: args.kubeconfig,
            context: args.context,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One row per mapping and a summary line.
    Table,
    /// The table with what the router forwards to, the router, and when the lease ends.
    Wide,
    /// Every recorded field, and the summary.
    Json,
    /// The same as json, in YAML.
    Yaml,
}

/// Runs one command and turns its outcome into the documented exit code.
pub fn execute(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Version => {
            println!("holepunch {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::CheckConfig => check_config(&cli.config),
        Command::Run { cluster } => {
            crate::kube::set_cluster_flags(cluster.into());
            run(&cli.config)
        }
        Command::Plan {
            from_file,
            cluster,
            lan_address,
        } => {
            crate::kube::set_cluster_flags(cluster.into());
            dry_run(&cli.config, from_file.as_deref(), lan_address)
        }
        Command::Status { output } => status(&cli.config, output),
        Command::Cleanup => cleanup(&cli.config),
        Command::Generate { what, directory } => match what {
            Generated::Man => manual::write_manuals(&directory),
            Generated::Completions => manual::write_completions(&directory),
        }
        .map(|files| files.iter().for_each(|file| println!("{}", file.display())))
        .map_err(|e| Failure::new(EXIT_OTHER, e)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("holepunch: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

/// An error on its way out, with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code,
            error: error.into(),
        }
    }
}

fn state_failure(error: StateError) -> Failure {
    let code = if matches!(error, StateError::Lock { .. }) {
        EXIT_LOCKED
    } else {
        EXIT_STATE
    };
    Failure::new(code, error)
}

fn load_config(path: &Path) -> Result<Config, Failure> {
    config::load(path).map_err(|e| Failure::new(EXIT_CONFIG, e))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            Failure::new(
                EXIT_OTHER,
                anyhow::Error::new(e).context("cannot start the async runtime"),
            )
        })
}

/// What `check-config` tells an operator whose LoadBalancer IPs are not targets (README,
/// "Security model").
pub const TARGET_CIDRS_NOTE: &str = "note: exposure.target_cidrs is empty, so no LoadBalancer \
IP is a target: Services are published through a Ready node's InternalIP and nodePort. With \
MetalLB (or kube-vip, Cilium LB-IPAM), list the load balancer's address pool there, e.g. \
target_cidrs = [\"192.168.1.240/28\"]";

fn check_config(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    crate::kube::check_kubeconfig(&config.kubernetes).map_err(|e| Failure::new(EXIT_CONFIG, e))?;
    print!("{}", config.to_toml());
    eprintln!("{}: the config is valid", path.display());
    if config.exposure.target_cidrs.is_empty() {
        eprintln!("{TARGET_CIDRS_NOTE}");
    }
    if let Some(note) = crate::pinholes::ipv6_note(&config) {
        eprintln!("note: {note}");
    }
    Ok(())
}

fn run(path: &Path) -> Result<(), Failure> {
    let config = load_config(path).inspect_err(tell_systemd)?;
    logging::init(&config.log);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "holepunch starting");
    let result = runtime()?.block_on(daemon::run(path.to_owned(), config));
    result
        .map_err(|e| match e {
            DaemonError::State(e) => {
                tracing::error!("{e}");
                state_failure(e)
            }
            // A kubeconfig others may change: a restart cannot fix it, the operator must.
            DaemonError::Kubeconfig(e) => {
                tracing::error!("{e}");
                Failure::new(EXIT_CONFIG, e)
            }
            // [ha] without CAP_NET_RAW: the unit needs the drop-in; a restart cannot fix it.
            e @ DaemonError::Ha(crate::ha::role::HaError::NoPacketSocket { .. }) => {
                tracing::error!("{e}");
                Failure::new(EXIT_CONFIG, e)
            }
            other => {
                tracing::error!("{other}");
                Failure::new(EXIT_OTHER, other)
            }
        })
        .inspect_err(tell_systemd)
}

/// Whether systemd should start `holepunch run` again after it ended with `code`: not after
/// a bad config or an unusable state file, which a restart cannot fix (the unit's
/// `RestartPreventExitStatus=`, README "Commands").
pub fn restart_helps(code: u8) -> bool {
    !matches!(code, EXIT_CONFIG | EXIT_STATE)
}

/// Says why `holepunch run` ends in its systemd status line (`systemctl status holepunch`),
/// and whether systemd restarts it.
fn tell_systemd(failure: &Failure) {
    let what = format!("{:#}", failure.error);
    let what = what.lines().next().unwrap_or_default();
    let status = if restart_helps(failure.code) {
        format!("stopped (exit {}): {what}", failure.code)
    } else {
        format!(
            "stopped for good (exit {}; systemd does not restart it): {what}; fix it, then systemctl restart holepunch",
            failure.code
        )
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
}

/// Where the router would forward, for a dry run: as the daemon decides, but with
/// `0.0.0.0` (and a note) when this host's address cannot be found, since a dry run must not
/// fail for it.
fn dry_run_forwarding(config: &Config, lan_address: Option<Ipv4Addr>) -> Forwarding {
    daemon::forwarding(config, lan_address).unwrap_or_else(|e| {
        eprintln!("note: {e}; showing 0.0.0.0 as this host's address (use --lan-address)");
        Forwarding::Relay {
            lan_address: Ipv4Addr::UNSPECIFIED,
        }
    })
}

fn dry_run(
    path: &Path,
    from_file: Option<&Path>,
    lan_address: Option<Ipv4Addr>,
) -> Result<(), Failure> {
    let config = load_config(path)?;
    let snapshot = match from_file {
        Some(file) => Snapshot::from_file(file).map_err(|e| Failure::new(EXIT_OTHER, e))?,
        None => runtime()?
            .block_on(async {
                let client = crate::kube::client(&config.kubernetes).await?;
                Snapshot::list(&client, &config.kubernetes).await
            })
            .map_err(|e| Failure::new(EXIT_UNREACHABLE, e))?,
    };
    let state = read_state_or_empty(&config.state.path)?;
    let gateway = config
        .router
        .address
        .or_else(|| crate::router::discover::default_gateway().ok());
    let host = crate::host::facts(gateway, &state);
    let wanted = desired(
        &snapshot.services,
        &snapshot.nodes,
        &snapshot.endpoint_slices,
        &config,
        &host,
        &crate::trust::holders(&state),
    );
    let now = Timestamp::now();
    let plan = plan(
        &wanted,
        &state,
        dry_run_forwarding(&config, lan_address),
        now,
    );
    print!("{plan}");
    let route = dry_run_route(&config, &state);
    let mut host = host;
    if let Some((route, _)) = &route {
        host.router_addresses.insert(route.router.into());
        host.own_addresses
            .extend(route.relay_from.map(std::net::IpAddr::from));
    }
    let pinholes = crate::pinholes::desired_pinholes(
        &snapshot.services,
        &snapshot.nodes,
        &config,
        &host,
        &wanted.mappings,
    );
    if let Some((route, note)) = &route {
        let actions =
            crate::pinholes::plan_pinholes(&pinholes, &state, route, &Default::default(), now);
        if let (Some(note), false) = (note, actions.is_empty()) {
            eprintln!("{note}");
        }
        for action in &actions {
            println!("{}", pinhole_action_line(action, &state));
        }
    }
    for problem in &pinholes.problems {
        println!(
            "{}",
            Action::Report {
                problem: problem.clone()
            }
        );
    }
    eprintln!(
        "{} Services read, {} mappings wanted, {} problems; nothing was changed",
        snapshot.services.len(),
        wanted.mappings.len(),
        wanted.problems.len()
    );
    Ok(())
}

/// Where `plan` shows the IPv6 pinholes asked: the backend configured (with `auto`, the one
/// the recorded mappings use, else PCP), the router and this host's address found as the
/// daemon finds them (README, "IPv6"; read locally, nothing sent), and a note when they could
/// not be found. `None` when the daemon would ask for no pinhole.
fn dry_run_route(
    config: &Config,
    state: &State,
) -> Option<(crate::pinholes::PinholeRoute, Option<String>)> {
    use crate::config::{BackendChoice, ExposureMode, Ipv6Choice};
    if config.exposure.mode == ExposureMode::Gateway
        || (config.exposure.ipv6 == Ipv6Choice::Off && state.pinholes.is_empty())
    {
        return None;
    }
    let backend = match config.router.backend {
        BackendChoice::Pcp => Backend::Pcp,
        BackendChoice::Upnp => Backend::Upnp,
        BackendChoice::Natpmp | BackendChoice::None => return None,
        BackendChoice::Auto => match StatusSummary::of(state).backend {
            Some(Backend::Upnp) => Backend::Upnp,
            Some(Backend::Natpmp) => return None,
            _ => Backend::Pcp,
        },
    };
    let recorded = state.pinholes.values().next();
    let (router, host, note) = match crate::router::pinholes::ipv6_path() {
        Ok(path) => (path.router, path.host, None),
        Err(why) => {
            let unknown = std::net::Ipv6Addr::UNSPECIFIED;
            (
                recorded.map_or(unknown, |r| r.router),
                recorded.map_or(unknown, |r| r.address),
                Some(format!(
                    "note: {why}; IPv6 pinholes are shown with the recorded router and address"
                )),
            )
        }
    };
    let route = crate::pinholes::PinholeRoute {
        backend,
        router,
        relay_from: (config.exposure.mode == ExposureMode::Relay).then_some(host),
        on_external_port: config.exposure.mode == ExposureMode::Gateway,
    };
    Some((route, note))
}

/// One line of `plan` for a pinhole action, in the columns of the IPv4 actions.
fn pinhole_action_line(action: &crate::pinholes::PinholeAction, state: &State) -> String {
    use crate::pinholes::{OpenReason, PinholeAction};
    let line = |verb: &str, record: &crate::state::PinholeRecord, extra: String| {
        format!(
            "{verb:<8} {:<11} {:<28} {} -> {}{extra}",
            format!("{}6", record.key()),
            record.owner.to_string(),
            record.opens(),
            record.target(),
        )
    };
    match action {
        PinholeAction::Open { record, reason } => {
            let reason = match reason {
                OpenReason::New => "new",
                OpenReason::Unconfirmed => "unconfirmed",
                OpenReason::Expired => "lease expired",
                OpenReason::RetryDue => "retry after failure",
                OpenReason::RouterRestarted => "router restarted",
            };
            line(
                "open",
                record,
                format!(", IPv6 pinhole through {} ({reason})", record.backend),
            )
        }
        PinholeAction::Renew { key } | PinholeAction::Close { key } => {
            let verb = match action {
                PinholeAction::Renew { .. } => "renew",
                _ => "close",
            };
            match state.pinholes.get(key) {
                Some(record) => line(
                    verb,
                    record,
                    format!(", IPv6 pinhole through {}", record.backend),
                ),
                None => format!("{verb:<8} {key}6"),
            }
        }
    }
}

/// The recorded state, read-only; no state file yet means no mappings.
fn read_state_or_empty(path: &Path) -> Result<State, Failure> {
    if !path.exists() {
        return Ok(State::default());
    }
    read_state(path).map_err(state_failure)
}

fn status(path: &Path, output: OutputFormat) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let config = load_config(path)?;
    let state = read_state_or_empty(&config.state.path)?;
    let now = Timestamp::now();
    // NOTE: https://no-color.org: a set, non-empty NO_COLOR turns colours off.
    let colour = || {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    };
    // [ha]: where this host stands, from the Lease (README, "High availability").
    let ha = config.ha.as_ref().map(|ha| ha_status(&config, ha));
    let mut json = status_json(&state, now);
    if let (Some(ha), Some(fields)) = (&ha, json.as_object_mut()) {
        fields.insert("ha".to_owned(), serde_json::json!(ha));
    }
    let mut text = match output {
        OutputFormat::Json => {
            let mut text =
                serde_json::to_string_pretty(&json).map_err(|e| Failure::new(EXIT_OTHER, e))?;
            text.push('\n');
            text
        }
        OutputFormat::Yaml => {
            serde_saphyr::to_string(&json).map_err(|e| Failure::new(EXIT_OTHER, e))?
        }
        OutputFormat::Table => status_table(&state, now, colour()),
        OutputFormat::Wide => status_table_wide(&state, now, colour()),
    };
    if let (Some(ha), OutputFormat::Table | OutputFormat::Wide) = (&ha, output) {
        text.push_str(&ha.line());
        text.push('\n');
    }
    print_out(&text)
}

/// Where this host stands in the HA group (the Lease read once; an unreachable cluster is
/// said, not a failure of `status`).
fn ha_status(config: &Config, ha: &crate::config::HaConfig) -> crate::ha::role::HaStatus {
    let read = async {
        let client = crate::kube::client(&config.kubernetes)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(crate::ha::role::status(client, ha).await)
    };
    let unknown = |error: String| crate::ha::role::HaStatus {
        identity: crate::ha::runner::identity(ha).unwrap_or_default(),
        role: "unknown",
        holder: None,
        error: Some(error),
    };
    match runtime() {
        Ok(runtime) => runtime.block_on(read).unwrap_or_else(unknown),
        Err(e) => unknown(format!("{:#}", e.error)),
    }
}

/// Writes to standard output; a reader that went away (`status | head`) is no failure.
fn print_out(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::new(
            EXIT_OTHER,
            anyhow::Error::new(e).context("cannot write to standard output"),
        )),
        _ => Ok(()),
    }
}

/// The line under the table: how many mappings stand where, and which router holds them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatusSummary {
    pub mappings: usize,
    pub active: usize,
    pub pending: usize,
    pub failed: usize,
    /// The router that granted the latest mapping (its address, for UPnP with its UDN).
    pub router: Option<String>,
    pub external_address: Option<Ipv4Addr>,
    /// The backend of the latest grant: the one in use.
    pub backend: Option<Backend>,
}

impl StatusSummary {
    pub fn of(state: &State) -> StatusSummary {
        let count = |status| {
            state
                .mappings
                .values()
                .filter(|r| r.status == status)
                .count()
        };
        let latest = state
            .mappings
            .values()
            .filter(|r| r.times.granted_at.is_some())
            .max_by_key(|r| r.times.granted_at);
        StatusSummary {
            mappings: state.mappings.len(),
            active: count(MappingStatus::Active),
            pending: count(MappingStatus::Pending),
            failed: count(MappingStatus::Failed),
            router: latest.map(|r| r.router.clone()).filter(|r| !r.is_empty()),
            external_address: latest.and_then(|r| r.external_address),
            backend: latest.map(|r| r.backend),
        }
    }
}

impl std::fmt::Display for StatusSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} mappings: {} active, {} pending, {} failed; router {}, external IP {}, backend {}",
            self.mappings,
            self.active,
            self.pending,
            self.failed,
            self.router.as_deref().unwrap_or("unknown"),
            self.external_address
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            self.backend
                .map_or_else(|| "unknown".to_owned(), |b| b.to_string()),
        )
    }
}

/// Seconds until the lease runs out (negative: it ran out); `None` for permanent leases and
/// mappings not granted.
pub fn lease_left_secs(times: &crate::state::LeaseTimes, now: Timestamp) -> Option<i64> {
    times.expires_at.map(|at| at.as_second() - now.as_second())
}

/// The lease as a person reads it: `59m12s`, `permanent`, `expired`, `-` (not granted).
pub fn lease_left(times: &crate::state::LeaseTimes, now: Timestamp) -> String {
    match lease_left_secs(times, now) {
        None if times.lifetime_secs == 0 && times.granted_at.is_some() => "permanent".to_owned(),
        None => "-".to_owned(),
        Some(left) if left <= 0 => "expired".to_owned(),
        Some(left) if left >= 86400 => format!("{}d{:02}h", left / 86400, left % 86400 / 3600),
        Some(left) if left >= 3600 => format!("{}h{:02}m", left / 3600, left % 3600 / 60),
        Some(left) if left >= 60 => format!("{}m{:02}s", left / 60, left % 60),
        Some(left) => format!("{left}s"),
    }
}

/// `status -o json`: the summary, and every record as the state file holds it plus
/// `lease_left_secs`.
pub fn status_json(state: &State, now: Timestamp) -> serde_json::Value {
    let mappings: Vec<serde_json::Value> = state
        .mappings
        .values()
        .map(|record| with_lease_left(record, record.times.expires_at, now))
        .collect();
    let pinholes: Vec<serde_json::Value> = state
        .pinholes
        .values()
        .map(|record| with_lease_left(record, record.times.expires_at, now))
        .collect();
    serde_json::json!({
        "summary": StatusSummary::of(state),
        "mappings": mappings,
        "pinholes": pinholes,
    })
}

/// A record as the state file holds it, plus `lease_left_secs` (from `expires_at`).
fn with_lease_left(
    record: &impl serde::Serialize,
    expires_at: Option<Timestamp>,
    now: Timestamp,
) -> serde_json::Value {
    let mut value = serde_json::to_value(record).unwrap_or(serde_json::Value::Null);
    if let Some(fields) = value.as_object_mut() {
        fields.insert(
            "lease_left_secs".to_owned(),
            serde_json::json!(expires_at.map(|at| at.as_second() - now.as_second())),
        );
    }
    value
}

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// One row per mapping: owner, protocol, public `ip:port`, target, backend, lease left,
/// status, last error; then the summary. `colour`: status and errors in ANSI colours (only
/// for a terminal).
pub fn status_table(state: &State, now: Timestamp, colour: bool) -> String {
    table(state, now, colour, false)
}

/// [`status_table`] with three more columns (`-o wide`): what the router forwards to (this
/// host in relay mode), the router, and when the lease ends.
pub fn status_table_wide(state: &State, now: Timestamp, colour: bool) -> String {
    table(state, now, colour, true)
}

fn table(state: &State, now: Timestamp, colour: bool, wide: bool) -> String {
    use std::fmt::Write;
    let paint = |text: String, code: &str| {
        if colour && !text.trim().is_empty() {
            format!("{code}{text}{RESET}")
        } else {
            text
        }
    };
    let summary = StatusSummary::of(state);
    let mut out = if wide {
        format!(
            "{:<32} {:<5} {:<21} {:<21} {:<21} {:<7} {:<21} {:<10} {:<20} {:<8} {}\n",
            "SERVICE",
            "PROTO",
            "PUBLIC",
            "FORWARDED TO",
            "TARGET",
            "BACKEND",
            "ROUTER",
            "LEASE",
            "EXPIRES",
            "STATUS",
            "LAST ERROR"
        )
    } else {
        format!(
            "{:<32} {:<5} {:<21} {:<21} {:<7} {:<10} {:<8} {}\n",
            "SERVICE", "PROTO", "PUBLIC", "TARGET", "BACKEND", "LEASE", "STATUS", "LAST ERROR"
        )
    };
    for record in state.mappings.values() {
        let address = record.external_address.or(summary.external_address);
        let public = match address {
            Some(address) => format!("{address}:{}", record.external_port),
            None => format!("?:{}", record.external_port),
        };
        let row = Row {
            service: record.owner.to_string(),
            proto: record.protocol.to_string(),
            public,
            forwarded_to: record.internal.to_string(),
            target: record.target.to_string(),
            backend: record.backend.to_string(),
            router: record.router.clone(),
            times: &record.times,
            status: record.status,
            note: note_for(record),
        };
        let _ = writeln!(out, "{}", row.render(now, wide, &paint).trim_end());
        // An IPv6 pinhole, under its IPv4 mapping's (README, "IPv6"): PUBLIC is the address
        // and port the internet reaches over IPv6, which is also what the router forwards to.
        if let Some(pinhole) = state.pinholes.get(&record.key()) {
            let row = Row {
                service: pinhole.owner.to_string(),
                proto: format!("{}6", pinhole.protocol),
                public: pinhole.opens().to_string(),
                forwarded_to: pinhole.opens().to_string(),
                target: pinhole.target().to_string(),
                backend: pinhole.backend.to_string(),
                router: pinhole.router.to_string(),
                times: &pinhole.times,
                status: pinhole.status,
                note: pinhole.last_error.clone().unwrap_or_default(),
            };
            let _ = writeln!(out, "{}", row.render(now, wide, &paint).trim_end());
        }
    }
    let _ = writeln!(out, "{summary}");
    out
}

/// One row of the `status` table: a mapping's or a pinhole's cells.
struct Row<'a> {
    service: String,
    proto: String,
    public: String,
    forwarded_to: String,
    target: String,
    backend: String,
    router: String,
    times: &'a crate::state::LeaseTimes,
    status: MappingStatus,
    note: String,
}

impl Row<'_> {
    /// The row as `status` prints it; `wide` adds what the router forwards to, the router
    /// and the lease's end.
    fn render(&self, now: Timestamp, wide: bool, paint: &dyn Fn(String, &str) -> String) -> String {
        let (status, code) = match self.status {
            MappingStatus::Pending => ("pending", YELLOW),
            MappingStatus::Active => ("active", GREEN),
            MappingStatus::Failed => ("failed", RED),
        };
        let status = paint(format!("{status:<8}"), code);
        let note = paint(self.note.clone(), RED);
        let lease = lease_left(self.times, now);
        if wide {
            let dash = |text: &str| {
                if text.is_empty() {
                    "-".to_owned()
                } else {
                    text.to_owned()
                }
            };
            format!(
                "{:<32} {:<5} {:<21} {:<21} {:<21} {:<7} {:<21} {:<10} {:<20} {} {}",
                self.service,
                self.proto,
                self.public,
                self.forwarded_to,
                self.target,
                self.backend,
                dash(&self.router),
                lease,
                self.times
                    .expires_at
                    .map_or_else(|| "-".to_owned(), |at| at.to_string()),
                status,
                note,
            )
        } else {
            format!(
                "{:<32} {:<5} {:<21} {:<21} {:<7} {:<10} {} {}",
                self.service,
                self.proto,
                self.public,
                self.target,
                self.backend,
                lease,
                status,
                note,
            )
        }
    }
}

/// The last column of `status`: the last error, and an unfinished port handover.
fn note_for(record: &MappingRecord) -> String {
    use std::fmt::Write;
    let mut note = record.last_error.clone().unwrap_or_default();
    for replaced in &record.replaces {
        if !note.is_empty() {
            note.push_str("; ");
        }
        let _ = write!(
            note,
            "still to delete {}'s mapping to {}",
            replaced.owner,
            replaced.internal()
        );
    }
    note
}

fn cleanup(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    logging::init(&config.log);
    let (mut store, loaded) = StateFile::open(&config.state.path).map_err(state_failure)?;
    if let Some(recovery) = &loaded.recovery {
        tracing::error!("{recovery}");
    }
    let mut state = loaded.state;
    // The router is found as the daemon finds it; without it only mappings that have no
    // router side can be removed, and the others stay recorded (never forgotten while the
    // router may still hold them).
    let address = daemon::forwarding(&config, None)
        .and_then(|forwarding| daemon::router_address(&config, forwarding))
        .unwrap_or_else(|e| {
            tracing::warn!("cannot find the router: {e}");
            None
        });
    let runtime = runtime()?;
    let mut unmapped = 0;
    for backend in [Backend::None, Backend::Pcp, Backend::Natpmp, Backend::Upnp] {
        if !state.mappings.values().any(|r| r.backend == backend) {
            continue;
        }
        let router = match (backend, &address) {
            (Backend::Upnp, Some(address)) => runtime
                .block_on(Router::probe(
                    address,
                    config::BackendChoice::Upnp,
                    None,
                    config.router.igd_url.as_deref(),
                ))
                .inspect_err(|e| tracing::warn!("{e}"))
                .ok(),
            _ => Router::for_backend(backend, address.as_ref()),
        };
        let Some(mut router) = router else {
            continue;
        };
        // Nothing is wanted: the plan unmaps every recorded mapping of this backend.
        let now = Timestamp::now();
        let mut plan = plan(&Desired::default(), &state, Forwarding::Gateway, now);
        plan.actions
            .retain(|a| matches!(a, Action::Unmap { record } if record.backend == backend));
        if plan.actions.is_empty() {
            continue;
        }
        let outcome = runtime.block_on(reconcile::execute(
            &plan,
            &mut state,
            &mut router,
            &mut store,
            0,
            now,
        ));
        unmapped += outcome.unmapped;
        if let Some(e) = outcome.save_error {
            return Err(state_failure(e));
        }
    }
    println!("removed {unmapped} mappings, {} left", state.mappings.len());
    if !state.pinholes.is_empty() {
        let closed = runtime.block_on(close_pinholes(&config, &mut state, &mut store));
        println!(
            "removed {closed} IPv6 pinholes, {} left",
            state.pinholes.len()
        );
    }
    match crate::nft::NftFirewall.remove() {
        Ok(true) => println!("removed the nftables table inet {}", crate::nft::TABLE_NAME),
        Ok(false) => {}
        Err(e) => {
            return Err(Failure::new(
                EXIT_OTHER,
                anyhow::Error::new(e).context(
                    "cannot remove the nftables table (holepunch cleanup needs root, or \
                     CAP_NET_ADMIN)",
                ),
            ));
        }
    }
    if !state.mappings.is_empty() || !state.pinholes.is_empty() {
        return Err(Failure::new(
            EXIT_UNREACHABLE,
            anyhow::anyhow!(
                "{} mappings and {} IPv6 pinholes could not be removed; run holepunch cleanup again when the router answers",
                state.mappings.len(),
                state.pinholes.len()
            ),
        ));
    }
    Ok(())
}

/// `cleanup`'s IPv6 part: every recorded pinhole deleted at the router it was asked of, as
/// the daemon deletes one (README, "IPv6"), not left to run out. Returns how many went;
/// those whose router cannot be reached stay recorded.
async fn close_pinholes(config: &Config, state: &mut State, store: &mut StateFile) -> usize {
    use crate::daemon::pinholes::close_all;
    use crate::router::pinholes::{PinholeConnect, RouterPinholes};
    // Gateway mode's are forwards in holepunch's own table, which cleanup deletes.
    let before = state.pinholes.len();
    state.pinholes.retain(|_, r| r.backend != Backend::None);
    let mut closed = before - state.pinholes.len();
    if closed > 0
        && let Err(e) = crate::reconcile::Persist::persist(store, state)
    {
        tracing::warn!(error = %e, "could not save the state file");
    }
    if state.pinholes.is_empty() {
        return closed;
    }
    let path = match RouterPinholes.path() {
        Ok(path) => path,
        Err(why) => {
            tracing::warn!("cannot reach the router for IPv6 pinholes: {why}");
            return closed;
        }
    };
    for backend in [Backend::Pcp, Backend::Upnp] {
        if !state.pinholes.values().any(|r| r.backend == backend) {
            continue;
        }
        match RouterPinholes.connect(path, backend, config).await {
            Ok(mut router) => {
                closed += close_all(router.as_mut(), state, store, Timestamp::now()).await;
            }
            Err(why) => tracing::warn!("cannot reach the router for IPv6 pinholes: {why}"),
        }
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, MappingKey, Owner, Protocol};
    use crate::state::MappingRecord;
    use clap::CommandFactory;

    fn record(port: u16, status: MappingStatus, granted: Option<&str>) -> MappingRecord {
        let internal = Endpoint {
            address: "192.168.77.10".parse().expect("ip"),
            port,
        };
        let mut record = MappingRecord::leftover(
            Owner {
                namespace: "default".into(),
                name: format!("web{port}"),
            },
            MappingKey {
                protocol: Protocol::Tcp,
                external_port: port,
            },
            internal,
            Backend::Pcp,
        );
        record.status = status;
        record.router = "192.168.77.1".into();
        record.times.lifetime_secs = 3600;
        record.times.granted_at = granted.map(|g| g.parse().expect("timestamp"));
        record.times.expires_at = record
            .times
            .granted_at
            .map(|g| g + jiff::SignedDuration::from_secs(3600));
        record.external_address = granted.map(|_| "11.22.33.44".parse().expect("ip"));
        record
    }

    fn sample() -> State {
        let mut state = State::default();
        let mut failed = record(8082, MappingStatus::Failed, None);
        failed.last_error = Some("the router refused: NOT_AUTHORIZED".into());
        let mut handover = record(8081, MappingStatus::Pending, None);
        handover.replaces.push(crate::state::Replaced {
            owner: "default/old".parse().expect("owner"),
            address: "192.168.77.21".parse().expect("ip"),
            port: 31000,
        });
        for r in [
            record(8080, MappingStatus::Active, Some("2025-01-01T00:00:00Z")),
            handover,
            failed,
        ] {
            state.mappings.insert(r.key(), r);
        }
        state
    }

    #[test]
    fn status_shows_the_ipv6_pinhole_under_its_mapping() {
        use crate::state::PinholeRecord;
        let now: Timestamp = "2025-01-01T00:20:30Z".parse().expect("timestamp");
        let mut state = sample();
        let mapping = state.mappings.values().next().expect("a mapping").clone();
        let pinhole = PinholeRecord {
            owner: mapping.owner.clone(),
            service_port: mapping.service_port,
            protocol: mapping.protocol,
            external_port: mapping.external_port,
            address: "2001:db8:77::10".parse().expect("ip"),
            port: mapping.external_port,
            target_address: "2001:db8:77::20".parse().expect("ip"),
            target_port: 31080,
            target_source: crate::model::TargetSource::NodePort,
            backend: crate::model::Backend::Pcp,
            router: "2001:db8:77::1".parse().expect("ip"),
            nonce: None,
            old_unique_id: None,
            epoch: None,
            times: crate::state::LeaseTimes {
                lifetime_secs: 120,
                granted_at: Some(now),
                renew_at: None,
                expires_at: Some("2025-01-01T00:22:30Z".parse().expect("timestamp")),
            },
            status: MappingStatus::Active,
            retry_at: None,
            failures: 0,
            failure: None,
            last_error: None,
        };
        state.pinholes.insert(pinhole.key(), pinhole);
        let table = status_table(&state, now, false);
        let lines: Vec<&str> = table.lines().collect();
        // The IPv4 row, then its pinhole's: the address the internet reaches over IPv6.
        assert!(lines[1].contains("11.22.33.44:8080"), "{table}");
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "default/web8080",
                "tcp6",
                "[2001:db8:77::10]:8080",
                "[2001:db8:77::20]:31080",
                "pcp",
                "2m00s",
                "active"
            ],
            "{table}"
        );
        let json = status_json(&state, now);
        assert_eq!(json["pinholes"][0]["address"], "2001:db8:77::10");
        assert_eq!(json["pinholes"][0]["lease_left_secs"], 120);
    }

    #[test]
    fn status_table_tells_each_mapping_and_sums_up() {
        let now: Timestamp = "2025-01-01T00:20:30Z".parse().expect("timestamp");
        let table = status_table(&sample(), now, false);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[0].starts_with("SERVICE"), "{table}");
        let active: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            active,
            [
                "default/web8080",
                "tcp",
                "11.22.33.44:8080",
                "192.168.77.10:8080",
                "pcp",
                "39m30s",
                "active"
            ]
        );
        // Not granted: the router's address from the summary, no lease.
        assert!(lines[2].contains("11.22.33.44:8081"), "{table}");
        assert!(
            lines[2].ends_with("still to delete default/old's mapping to 192.168.77.21:31000"),
            "{table}"
        );
        assert!(
            lines[3].contains("failed") && lines[3].ends_with("NOT_AUTHORIZED"),
            "{table}"
        );
        assert_eq!(
            lines[4],
            "3 mappings: 1 active, 1 pending, 1 failed; router 192.168.77.1, \
             external IP 11.22.33.44, backend pcp"
        );
        assert!(!table.contains('\x1b'), "no colours off a terminal");

        let coloured = status_table(&sample(), now, true);
        assert!(coloured.contains("\x1b[32mactive  \x1b[0m"), "{coloured}");
        assert!(
            coloured.contains("\x1b[31mthe router refused"),
            "{coloured}"
        );
    }

    #[test]
    fn an_empty_state_says_so() {
        let table = status_table(&State::default(), Timestamp::now(), false);
        assert!(
            table.ends_with(
                "0 mappings: 0 active, 0 pending, 0 failed; router unknown, \
                 external IP unknown, backend unknown\n"
            ),
            "{table}"
        );
    }

    #[test]
    fn plan_shows_pinhole_actions_in_the_columns_of_the_ipv4_ones() {
        use crate::pinholes::{OpenReason, PinholeAction};
        use crate::state::PinholeRecord;
        let pinhole = PinholeRecord::example(8096);
        let mut state = State::default();
        state.pinholes.insert(pinhole.key(), pinhole.clone());
        let close = pinhole_action_line(&PinholeAction::Close { key: pinhole.key() }, &state);
        assert_eq!(
            close,
            "close    8096/tcp6   media/jellyfin               [2001:db8:77::10]:8096 -> \
             [2001:db8:77::20]:31096, IPv6 pinhole through pcp"
        );
        let open = pinhole_action_line(
            &PinholeAction::Open {
                record: Box::new(pinhole.clone()),
                reason: OpenReason::RouterRestarted,
            },
            &State::default(),
        );
        assert!(
            open.starts_with("open     8096/tcp6   media/jellyfin"),
            "{open}"
        );
        assert!(open.ends_with("through pcp (router restarted)"), "{open}");
        let renew = pinhole_action_line(&PinholeAction::Renew { key: pinhole.key() }, &state);
        assert!(renew.starts_with("renew    8096/tcp6"), "{renew}");
        // A key the state does not hold (never planned so) still says which one.
        let gone = pinhole_action_line(
            &PinholeAction::Close { key: pinhole.key() },
            &State::default(),
        );
        assert_eq!(
            gone.split_whitespace().collect::<Vec<_>>(),
            ["close", "8096/tcp6"]
        );
    }

    #[test]
    fn lease_left_reads_like_a_clock() {
        let granted = "2025-01-01T00:00:00Z";
        let at = |t: &str| t.parse::<Timestamp>().expect("timestamp");
        let r = record(8080, MappingStatus::Active, Some(granted));
        assert_eq!(lease_left(&r.times, at("2025-01-01T00:00:00Z")), "1h00m");
        assert_eq!(lease_left(&r.times, at("2024-12-30T00:00:00Z")), "2d01h");
        assert_eq!(lease_left(&r.times, at("2025-01-01T00:59:15Z")), "45s");
        assert_eq!(lease_left(&r.times, at("2025-01-01T01:00:00Z")), "expired");
        let mut permanent = r.clone();
        permanent.times.expires_at = None;
        permanent.times.lifetime_secs = 0;
        assert_eq!(lease_left(&permanent.times, at(granted)), "permanent");
        assert_eq!(
            lease_left(&record(1, MappingStatus::Pending, None).times, at(granted)),
            "-"
        );
    }

    #[test]
    fn status_json_has_the_summary_and_lease_left() {
        let now: Timestamp = "2025-01-01T00:20:30Z".parse().expect("timestamp");
        let json = status_json(&sample(), now);
        assert_eq!(json["summary"]["active"], 1);
        assert_eq!(json["summary"]["failed"], 1);
        assert_eq!(json["summary"]["external_address"], "11.22.33.44");
        assert_eq!(json["summary"]["backend"], "pcp");
        assert_eq!(json["mappings"][0]["owner"], "default/web8080");
        assert_eq!(json["mappings"][0]["lease_left_secs"], 2370);
        assert_eq!(
            json["mappings"][1]["lease_left_secs"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn status_wide_adds_where_the_router_forwards_the_router_and_the_expiry() {
        let now: Timestamp = "2025-01-01T00:20:30Z".parse().expect("timestamp");
        let mut state = sample();
        for record in state.mappings.values_mut() {
            record.target = Endpoint {
                address: "192.168.77.20".parse().expect("ip"),
                port: 30000 + record.external_port % 1000,
            };
        }
        let wide = status_table_wide(&state, now, false);
        let lines: Vec<&str> = wide.lines().collect();
        assert_eq!(lines.len(), 5, "{wide}");
        for column in ["FORWARDED TO", "TARGET", "ROUTER", "EXPIRES", "LAST ERROR"] {
            assert!(lines[0].contains(column), "{wide}");
        }
        let active: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            active,
            [
                "default/web8080",
                "tcp",
                "11.22.33.44:8080",
                "192.168.77.10:8080",
                "192.168.77.20:30080",
                "pcp",
                "192.168.77.1",
                "39m30s",
                "2025-01-01T01:00:00Z",
                "active"
            ]
        );
        assert!(lines[3].ends_with("NOT_AUTHORIZED"), "{wide}");
        assert_eq!(
            lines[4],
            status_table(&state, now, false)
                .lines()
                .last()
                .expect("summary")
        );
        // The plain table keeps its columns.
        let table = status_table(&state, now, false);
        assert!(
            !table.contains("FORWARDED TO") && !table.contains("EXPIRES"),
            "{table}"
        );
        assert!(table.contains("192.168.77.20:30080"), "{table}");
    }

    #[test]
    fn status_yaml_holds_what_status_json_holds() {
        let now: Timestamp = "2025-01-01T00:20:30Z".parse().expect("timestamp");
        let json = status_json(&sample(), now);
        let yaml = serde_saphyr::to_string(&json).expect("yaml");
        assert!(yaml.contains("lease_left_secs: 2370"), "{yaml}");
        let back: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml parses");
        assert_eq!(back, json, "{yaml}");
    }

    #[test]
    fn kubeconfig_and_context_are_taken_where_the_cluster_is_read() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        let cluster = ClusterArgs {
            kubeconfig: Some("/k".into()),
            context: Some("home".into()),
        };
        match parse(&[
            "holepunch",
            "run",
            "--kubeconfig",
            "/k",
            "--context",
            "home",
        ]) {
            Ok(Cli {
                command: Command::Run { cluster: got },
                ..
            }) => assert_eq!(got, cluster),
            other => panic!("{other:?}"),
        }
        match parse(&[
            "holepunch",
            "plan",
            "--context",
            "home",
            "--kubeconfig",
            "/k",
        ]) {
            Ok(Cli {
                command: Command::Plan { cluster: got, .. },
                ..
            }) => assert_eq!(got, cluster),
            other => panic!("{other:?}"),
        }
        // Commands that do not read the cluster refuse them; so does plan from a file.
        for args in [
            &["holepunch", "status", "--context", "home"][..],
            &["holepunch", "cleanup", "--kubeconfig", "/k"],
            &[
                "holepunch",
                "plan",
                "--from-file",
                "f.yaml",
                "--context",
                "home",
            ],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
        assert!(parse(&["holepunch", "plan", "--from-file", "f.yaml"]).is_ok());
        for output in ["table", "wide", "json", "yaml"] {
            assert!(
                parse(&["holepunch", "status", "-o", output]).is_ok(),
                "{output}"
            );
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_teaches_exit_codes_and_commands() {
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "check-config",
            "plan",
            "cleanup",
            "Exit codes:",
            "another holepunch",
        ] {
            assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
        }
    }
}
