//! The config file `/etc/holepunch.toml`: a raw serde layer that mirrors the TOML exactly
//! (`deny_unknown_fields`), and the validated, typed [`Config`] the rest of the program uses.
//!
//! The section and key names are a public interface (README.md, "Configuring it"). Each key
//! is declared once, with its default and doc, in [`keys`]; the shipped `etc/holepunch.toml`
//! and the `check-config` listing are generated from there. Every [`ConfigError`] names the
//! file, line, column and dotted key, and says what to change.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

pub mod keys;

use keys::{Key, Section};

/// Paths the program falls back on; the keys' defaults are declared in [`keys`].
pub mod defaults {
    pub const CONFIG_PATH: &str = "/etc/holepunch.toml";
    /// What an unset `kubernetes.kubeconfig` means when `$KUBECONFIG` is unset too.
    pub const KUBECONFIG_PATH: &str = "/etc/holepunch/kubeconfig";
}

/// Longest lease holepunch asks a router for: one week. 0 asks for a permanent mapping.
pub const MAX_LEASE_SECS: u32 = 604_800;
/// Bounds of `router.verify_interval_seconds`: often enough to notice a router reboot, rarely
/// enough not to load it (every router call costs, see README.md "Benchmarks").
pub const MIN_VERIFY_INTERVAL_SECS: u32 = 5;
pub const MAX_VERIFY_INTERVAL_SECS: u32 = 86_400;
/// Upper bound of the `ports.max_*` quotas: every TCP and every UDP port.
pub const MAX_PORTS_QUOTA: u32 = 2 * 65_535;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub kubernetes: KubernetesConfig,
    pub router: RouterConfig,
    pub exposure: ExposureConfig,
    pub ports: PortPolicy,
    pub state: StateConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// `None` (no `[ha]` section): one host, no Lease.
    pub ha: Option<HaConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// `None`: `$KUBECONFIG`, else [`defaults::KUBECONFIG_PATH`].
    pub kubeconfig: Option<PathBuf>,
    /// `None`: the kubeconfig's current-context.
    pub context: Option<String>,
    /// Allow list; empty means every namespace.
    pub namespaces: BTreeSet<String>,
    pub exclude_namespaces: BTreeSet<String>,
    /// The opt-in annotation key; its value must be `"true"`.
    pub annotation: String,
    /// Services with this `spec.loadBalancerClass` are published without an annotation.
    pub load_balancer_class: String,
}

impl KubernetesConfig {
    /// Whether Services in `namespace` may be published at all.
    pub fn namespace_allowed(&self, namespace: &str) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(namespace))
            && !self.exclude_namespaces.contains(namespace)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Upnp,
    Pcp,
    Natpmp,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    pub backend: BackendChoice,
    /// `None`: the next hop of the default route.
    pub address: Option<Ipv4Addr>,
    /// `Some`: use this UPnP description URL, no SSDP discovery.
    pub igd_url: Option<String>,
    pub lease_secs: u32,
    pub verify_interval_secs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExposureMode {
    Relay,
    Direct,
    Gateway,
}

/// `exposure.ipv6`: whether Services with an IPv6 target also get a pinhole (README, "IPv6").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Choice {
    /// Pinholes through PCP or UPnP when the router offers them; never through NAT-PMP.
    Auto,
    /// IPv4 only.
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposureConfig {
    pub mode: ExposureMode,
    pub ipv6: Ipv6Choice,
    /// `None`: this host's source address toward the router.
    pub lan_address: Option<Ipv4Addr>,
    /// Gateway mode: the router's WAN interface.
    pub wan_interface: Option<String>,
    /// Networks a LoadBalancer IP must be in to be a target (IPv4 and IPv6); also the only
    /// way a unique local IPv6 address (fc00::/7) becomes a target. Empty: no LoadBalancer IP
    /// is a target.
    pub target_cidrs: Vec<IpNet>,
}

impl ExposureConfig {
    /// Whether a LoadBalancer IP lies inside `target_cidrs`.
    pub fn target_allowed(&self, address: Ipv4Addr) -> bool {
        let address = std::net::IpAddr::V4(address);
        self.target_cidrs.iter().any(|net| net.contains(&address))
    }

    /// Whether an IPv6 address lies inside `target_cidrs`.
    pub fn target_allowed6(&self, address: std::net::Ipv6Addr) -> bool {
        let address = std::net::IpAddr::V6(address);
        self.target_cidrs.iter().any(|net| net.contains(&address))
    }
}

/// An inclusive range of ports, written `"N"` or `"N-M"` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Which external ports may be opened on the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    pub allow: Vec<PortRange>,
    pub deny: Vec<PortRange>,
    /// Ports below 1024 are refused unless this is set (and they are in `allow`).
    pub allow_below_1024: bool,
    /// Most mappings one Service gets (`ports.max_per_service`).
    pub max_per_service: u32,
    /// Most mappings the Services of one namespace get together (`ports.max_per_namespace`).
    pub max_per_namespace: u32,
    /// Most mappings in all (`ports.max_total`).
    pub max_total: u32,
}

/// Why an external port may not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortDenial {
    Denied(PortRange),
    BelowPrivileged,
    NotAllowed,
}

impl PortPolicy {
    pub fn check(&self, port: u16) -> Result<(), PortDenial> {
        if let Some(range) = self.deny.iter().find(|r| r.contains(port)) {
            return Err(PortDenial::Denied(*range));
        }
        if port < 1024 && !self.allow_below_1024 {
            return Err(PortDenial::BelowPrivileged);
        }
        if !self.allow.iter().any(|r| r.contains(port)) {
            return Err(PortDenial::NotAllowed);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `None`: no metrics listener.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Journald,
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter directive, e.g. `info` or `holepunch=debug,kube=info`.
    pub level: String,
    pub format: LogFormat,
}

/// `[ha]`: several hosts, one active through a `coordination.k8s.io/v1` Lease (README.md,
/// "High availability").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    pub lease_name: String,
    pub lease_namespace: String,
    /// `None`: this host's name.
    pub identity: Option<String>,
    /// The floating relay address with its prefix; `None` in direct mode.
    pub address: Option<Ipv4Net>,
    /// `None`: the interface of the default route.
    pub interface: Option<String>,
    pub lease_duration_secs: u32,
    pub renew_deadline_secs: u32,
    pub retry_period_secs: u32,
}

/// Bounds of the `[ha]` timings, seconds: a Lease shorter than 2 s leaves no room for a retry,
/// one longer than an hour is no failover.
pub const MIN_HA_SECS: u32 = 1;
pub const MAX_HA_SECS: u32 = 3600;

/// The config-file spelling of each enum value, and the list of them for error messages.
macro_rules! keywords {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in the order the docs list them.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The spelling in the config file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keywords!(BackendChoice {
    Auto => "auto",
    Upnp => "upnp",
    Pcp => "pcp",
    Natpmp => "natpmp",
    None => "none",
});
keywords!(ExposureMode {
    Relay => "relay",
    Direct => "direct",
    Gateway => "gateway",
});
keywords!(Ipv6Choice {
    Auto => "auto",
    Off => "off",
});
keywords!(LogFormat {
    Auto => "auto",
    Journald => "journald",
    Text => "text",
    Json => "json",
});

impl Default for Config {
    /// The configuration an empty file gives: every key's declared default.
    fn default() -> Self {
        // NOTE: the declared defaults are constants, and `tests::defaults_equal_empty_file`
        // proves they validate (`keys::tests::check_config_shows_every_declared_default`
        // that they come through unchanged), so this cannot fail in a build whose tests pass.
        parse("", Path::new(defaults::CONFIG_PATH)).expect("the declared defaults validate")
    }
}

impl Config {
    /// The resolved configuration as TOML, with the file's section and key names: what
    /// `holepunch check-config` prints, and a valid config file in its own right.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for section in keys::SECTIONS {
            let lines: Vec<String> = section
                .keys
                .iter()
                .filter_map(|key| Some(format!("{} = {}\n", key.name, (key.resolved)(self)?)))
                .collect();
            if lines.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("[{}]\n", section.name));
            out.extend(lines);
        }
        out
    }
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn toml_path(path: Option<&Path>) -> String {
    toml_string(&path.map(|p| p.to_string_lossy()).unwrap_or_default())
}

fn toml_display<T: fmt::Display>(value: Option<&T>) -> String {
    toml_string(&value.map(T::to_string).unwrap_or_default())
}

fn toml_array<'a, T: fmt::Display + 'a>(items: impl IntoIterator<Item = &'a T>) -> String {
    let items: Vec<String> = items
        .into_iter()
        .map(|item| toml_string(&item.to_string()))
        .collect();
    format!("[{}]", items.join(", "))
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Where in which config file something is wrong. Line and column are 1-based (the column
/// counts characters); they are `None` when the problem is not at one place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

impl Location {
    fn new(path: &Path, text: &str, span: Option<Range<usize>>) -> Self {
        let (line, column) = match span {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                (u32::try_from(line).ok(), u32::try_from(column).ok())
            }
            None => (None, None),
        };
        Location {
            path: path.to_owned(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of a byte offset into `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Why a config file was refused. The message names the file, line, column and dotted key
/// and says what to change, e.g.
/// ``/etc/holepunch.toml:12:1: router.leas_seconds: unknown key `leas_seconds` in [router]; did you mean `lease_seconds`?``
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}; {}", .path.display(), read_fix(.source))]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    // NOTE: the TOML parser's own error is translated into `detail`, not kept as a source:
    // its Display repeats the same message with a multi-line excerpt.
    #[error("{at}: not valid TOML: {detail}; fix the syntax there (see https://toml.io)")]
    ParseToml { at: Location, detail: String },
    #[error("{at}: {name}: unknown section [{name}]; {hint}")]
    UnknownSection {
        at: Location,
        name: String,
        hint: String,
    },
    #[error(
        "{at}: {key}: unknown key `{}` in [{}]; {hint}",
        split_key(.key).1,
        split_key(.key).0
    )]
    UnknownKey {
        at: Location,
        /// `section.name`, the name as written.
        key: String,
        hint: String,
    },
    #[error("{at}: {key}: expected {expected}, found {found}; write it like `{example}`")]
    WrongType {
        at: Location,
        key: String,
        expected: &'static str,
        found: String,
        /// A valid line for the key (boxed: keeps `ConfigError` small).
        example: Box<str>,
    },
    #[error("{at}: {key}: {problem}; {fix}")]
    InvalidValue {
        at: Location,
        key: String,
        problem: String,
        fix: String,
    },
}

/// `("router", "lease_seconds")` from `"router.lease_seconds"`.
fn split_key(key: &str) -> (&str, &str) {
    key.split_once('.').unwrap_or(("", key))
}

fn read_fix(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => "create it or pass --config PATH",
        std::io::ErrorKind::PermissionDenied => {
            "make it readable by the user holepunch runs as, or pass --config PATH"
        }
        std::io::ErrorKind::InvalidData => "save it as UTF-8 text",
        _ => "check that it is a readable file, or pass --config PATH",
    }
}

impl ConfigError {
    /// The config file concerned.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::ReadFile { path, .. } => path,
            ConfigError::ParseToml { at, .. }
            | ConfigError::UnknownSection { at, .. }
            | ConfigError::UnknownKey { at, .. }
            | ConfigError::WrongType { at, .. }
            | ConfigError::InvalidValue { at, .. } => &at.path,
        }
    }

    fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::ReadFile { .. } => None,
            ConfigError::ParseToml { at, .. }
            | ConfigError::UnknownSection { at, .. }
            | ConfigError::UnknownKey { at, .. }
            | ConfigError::WrongType { at, .. }
            | ConfigError::InvalidValue { at, .. } => Some(at),
        }
    }

    /// 1-based line of the offending text, when the problem is at one place in the file.
    pub fn line(&self) -> Option<usize> {
        self.location()
            .and_then(|at| at.line)
            .map(|line| line as usize)
    }

    /// 1-based column (in characters) of the offending text.
    pub fn column(&self) -> Option<usize> {
        self.location()
            .and_then(|at| at.column)
            .map(|column| column as usize)
    }

    /// The dotted key concerned, e.g. `router.lease_seconds` (a section name for sections).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::ReadFile { .. } | ConfigError::ParseToml { .. } => None,
            ConfigError::UnknownSection { name, .. } => Some(name),
            ConfigError::UnknownKey { key, .. }
            | ConfigError::WrongType { key, .. }
            | ConfigError::InvalidValue { key, .. } => Some(key),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading and parsing

/// Read and validate the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parse and validate config text; `origin` is the file it came from, for messages.
pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let source = Source { origin, text };
    let raw: RawConfig = toml::from_str(text).map_err(|error| source.decode_error(&error))?;
    source.validate(&raw)
}

// ---------------------------------------------------------------------------------------------
// The raw layer: the file exactly as written. Every key is optional; values that get validated
// keep their span so that errors can point at them.

type RawString = Option<Spanned<String>>;
type RawInteger = Option<Spanned<i64>>;
type RawBool = Option<Spanned<bool>>;
type RawStrings = Option<Spanned<Vec<Spanned<String>>>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    kubernetes: RawKubernetes,
    router: RawRouter,
    exposure: RawExposure,
    ports: RawPorts,
    state: RawState,
    metrics: RawMetrics,
    log: RawLog,
    /// Absent: one host. Spanned, so that a mode conflict can point at the section.
    ha: Option<Spanned<RawHa>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKubernetes {
    kubeconfig: RawString,
    context: RawString,
    namespaces: RawStrings,
    exclude_namespaces: RawStrings,
    annotation: RawString,
    load_balancer_class: RawString,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRouter {
    backend: RawString,
    address: RawString,
    igd_url: RawString,
    lease_seconds: RawInteger,
    verify_interval_seconds: RawInteger,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawExposure {
    mode: RawString,
    ipv6: RawString,
    lan_address: RawString,
    wan_interface: RawString,
    target_cidrs: RawStrings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPorts {
    allow: RawStrings,
    deny: RawStrings,
    allow_below_1024: RawBool,
    max_per_service: RawInteger,
    max_per_namespace: RawInteger,
    max_total: RawInteger,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawState {
    path: RawString,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: RawString,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: RawString,
    format: RawString,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHa {
    lease_name: RawString,
    lease_namespace: RawString,
    identity: RawString,
    address: RawString,
    interface: RawString,
    lease_duration_seconds: RawInteger,
    renew_deadline_seconds: RawInteger,
    retry_period_seconds: RawInteger,
}

fn section_spec(name: &str) -> Option<&'static Section> {
    keys::SECTIONS.iter().find(|section| section.name == name)
}

/// The known word closest to `word`, if one is close enough to be a likely misspelling.
fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_lowercase().replace('-', "_");
    candidates
        .into_iter()
        .map(|candidate| (strsim::damerau_levenshtein(&word, candidate), candidate))
        .filter(|&(distance, candidate)| {
            distance <= (candidate.chars().count() / 3).max(1)
                || (word.chars().count() >= 3 && candidate.starts_with(word.as_str()))
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// `` `a`, `b`, `c` ``
fn backticked<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    words
        .into_iter()
        .map(|word| format!("`{word}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A user-written value for a message: escaped, and cut short if long.
fn shown(value: &str) -> String {
    const MAX_CHARS: usize = 80;
    let escaped: String = value.escape_debug().collect();
    if escaped.chars().count() > MAX_CHARS {
        let cut: String = escaped.chars().take(MAX_CHARS).collect();
        format!("`{cut}...`")
    } else {
        format!("`{escaped}`")
    }
}

fn with_article(type_name: &str) -> String {
    match type_name.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {type_name}"),
        _ => format!("a {type_name}"),
    }
}

/// The key path of the innermost entry whose key or value lies at `span`, and the TOML type
/// of the value found there.
struct Found {
    path: Vec<String>,
    type_name: &'static str,
}

fn locate(table: &DeTable<'_>, span: &Range<usize>) -> Option<Found> {
    for (key, value) in table.iter() {
        let name = key.get_ref().to_string();
        if key.span() == *span {
            return Some(Found {
                path: vec![name],
                type_name: value.get_ref().type_str(),
            });
        }
        let inner = match value.get_ref() {
            DeValue::Table(table) => locate(table, span),
            DeValue::Array(array) => locate_in_array(array, span),
            _ => None,
        };
        if let Some(mut found) = inner {
            found.path.insert(0, name);
            return Some(found);
        }
        if contains(&value.span(), span) {
            return Some(Found {
                path: vec![name],
                type_name: value.get_ref().type_str(),
            });
        }
    }
    None
}

fn locate_in_array(array: &DeArray<'_>, span: &Range<usize>) -> Option<Found> {
    array.iter().find_map(|element| {
        let inner = match element.get_ref() {
            DeValue::Table(table) => locate(table, span),
            DeValue::Array(array) => locate_in_array(array, span),
            _ => None,
        };
        inner.or_else(|| {
            contains(&element.span(), span).then(|| Found {
                path: Vec::new(),
                type_name: element.get_ref().type_str(),
            })
        })
    })
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// A port number or range as written in `[ports]`: `"N"` or `"N-M"`, 1 ≤ N ≤ M ≤ 65535.
fn parse_port_range(text: &str) -> Result<PortRange, String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let first = parse_port(first, text)?;
    let last = parse_port(last, text)?;
    if first > last {
        return Err(format!(
            "the range {} runs backwards (the lower port comes first: \"{last}-{first}\")",
            shown(text)
        ));
    }
    Ok(PortRange { first, last })
}

fn parse_port(digits: &str, whole: &str) -> Result<u16, String> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{} is not a port or a port range", shown(whole)));
    }
    match digits.parse::<u16>() {
        Ok(port) if port >= 1 => Ok(port),
        _ => Err(format!(
            "{} is outside the port numbers 1-65535",
            shown(whole)
        )),
    }
}

/// Why `name` is not a DNS-1123 label (a namespace name), if it is not.
fn dns_label_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 63 {
        Some("it is longer than 63 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("it may hold only lowercase letters, digits and '-'")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("it must start and end with a letter or digit")
    } else {
        None
    }
}

/// Why `key` is not a Kubernetes qualified name (`[prefix/]name`, as annotation and label keys
/// and `loadBalancerClass` are), if it is not.
fn qualified_name_problem(key: &str, prefix_required: bool) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    match prefix {
        None if prefix_required => {
            return Some("it has no domain prefix (the part before '/')".to_owned());
        }
        Some(prefix) => {
            if prefix.len() > 253 {
                return Some("its prefix is longer than 253 characters".to_owned());
            }
            if let Some(problem) = prefix.split('.').find_map(dns_label_problem) {
                return Some(format!(
                    "its prefix {} is not a DNS name: {problem}",
                    shown(prefix)
                ));
            }
        }
        None => {}
    }
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() {
        Some("its name (after the '/') is empty".to_owned())
    } else if name.len() > 63 {
        Some("its name (after the '/') is longer than 63 characters".to_owned())
    } else if !name.chars().all(valid_char) {
        Some("its name may hold only letters, digits, '-', '_', '.' and one '/'".to_owned())
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        Some("its name must start and end with a letter or digit".to_owned())
    } else {
        None
    }
}

/// Why `name` cannot be a Linux network interface name, if it cannot.
fn ifname_problem(name: &str) -> Option<&'static str> {
    // NOTE: the kernel's dev_valid_name(): shorter than IFNAMSIZ (16), not "." or "..",
    // no '/', ':' or whitespace.
    if name.len() > 15 {
        Some("Linux interface names are at most 15 characters")
    } else if name == "." || name == ".." {
        Some("`.` and `..` are not interface names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("interface names hold no '/', ':' or spaces")
    } else {
        None
    }
}

/// The text being parsed and where it came from: turns spans into located errors.
struct Source<'a> {
    origin: &'a Path,
    text: &'a str,
}

/// A string value as written (with its span), or its default (no span).
type Entry<'a> = (&'a str, Option<Range<usize>>);

fn string<'a>(raw: &'a RawString, default: &'a str) -> Entry<'a> {
    match raw {
        Some(value) => (value.get_ref().as_str(), Some(value.span())),
        None => (default, None),
    }
}

/// An integer value as written (with its span), or the key's default (no span).
fn integer(raw: &RawInteger, key: &Key) -> (i64, Option<Range<usize>>) {
    match raw {
        Some(value) => (*value.get_ref(), Some(value.span())),
        None => (key.int(), None),
    }
}

/// The entries of a string array, and the span of the whole array.
fn strings<'a>(raw: &'a RawStrings, default: &[&'a str]) -> (Vec<Entry<'a>>, Option<Range<usize>>) {
    match raw {
        Some(list) => (
            list.get_ref()
                .iter()
                .map(|item| (item.get_ref().as_str(), Some(item.span())))
                .collect(),
            Some(list.span()),
        ),
        None => (default.iter().map(|item| (*item, None)).collect(), None),
    }
}

impl Source<'_> {
    fn at(&self, span: Option<Range<usize>>) -> Location {
        Location::new(self.origin, self.text, span)
    }

    fn invalid(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError::InvalidValue {
            at: self.at(span),
            key: key.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Explain a failure of the raw layer: bad syntax, an unknown section or key, a wrong type.
    fn decode_error(&self, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let tree = match DeTable::parse(self.text) {
            Ok(tree) => tree,
            Err(syntax) => return self.syntax_error(&syntax),
        };
        let found = span.as_ref().and_then(|span| locate(tree.get_ref(), span));
        let Some(Found { path, type_name }) = found else {
            return self.syntax_error(error);
        };
        let at = self.at(span);
        let found = with_article(type_name);
        match path.as_slice() {
            [] => self.syntax_error(error),
            [section] => match section_spec(section) {
                // NOTE: the type of the section's own value, not of the innermost one: for
                // `[[router]]` that is the array, not the table in it.
                Some(spec) => ConfigError::WrongType {
                    at,
                    key: section.clone(),
                    expected: "a table (a section)",
                    found: tree
                        .get_ref()
                        .get(section.as_str())
                        .map_or(found, |value| with_article(value.get_ref().type_str())),
                    example: format!("[{}]", spec.name).into(),
                },
                None => ConfigError::UnknownSection {
                    at,
                    name: section.clone(),
                    hint: unknown_section_hint(section),
                },
            },
            [section, name, ..] => {
                let Some(spec) = section_spec(section) else {
                    return ConfigError::UnknownSection {
                        at,
                        name: section.clone(),
                        hint: unknown_section_hint(section),
                    };
                };
                match spec.keys.iter().find(|key| key.name == name) {
                    Some(key) => ConfigError::WrongType {
                        at,
                        key: format!("{section}.{name}"),
                        expected: key.kind().expected(),
                        found,
                        example: key.example_line().into(),
                    },
                    None => ConfigError::UnknownKey {
                        at,
                        key: format!("{section}.{name}"),
                        hint: unknown_key_hint(spec, name),
                    },
                }
            }
        }
    }

    fn syntax_error(&self, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let excerpt = span
            .clone()
            .and_then(|span| self.text.get(span))
            .filter(|text| !text.is_empty() && text.len() <= 40 && !text.contains('\n'));
        let detail = match excerpt {
            Some(excerpt) => format!("{} (at {})", error.message(), shown(excerpt)),
            None => error.message().to_owned(),
        };
        ConfigError::ParseToml {
            at: self.at(span),
            detail,
        }
    }

    fn validate(&self, raw: &RawConfig) -> Result<Config, ConfigError> {
        let router = self.router(&raw.router)?;
        let exposure = self.exposure(&raw.exposure)?;
        let mode = exposure.mode;
        self.check_gateway(raw, &router, &exposure)?;
        Ok(Config {
            kubernetes: self.kubernetes(&raw.kubernetes)?,
            router,
            exposure,
            ports: self.ports(&raw.ports)?,
            state: self.state(&raw.state)?,
            metrics: self.metrics(&raw.metrics)?,
            log: self.log(&raw.log)?,
            ha: self.ha(raw.ha.as_ref(), &raw.exposure, mode)?,
        })
    }

    fn kubernetes(&self, raw: &RawKubernetes) -> Result<KubernetesConfig, ConfigError> {
        let (kubeconfig, _) = string(&raw.kubeconfig, keys::kubernetes::KUBECONFIG.text());
        let (context, _) = string(&raw.context, keys::kubernetes::CONTEXT.text());
        let namespaces = self.namespaces(
            &raw.namespaces,
            "kubernetes.namespaces",
            &keys::kubernetes::NAMESPACES,
        )?;
        let exclude_namespaces = self.namespaces(
            &raw.exclude_namespaces,
            "kubernetes.exclude_namespaces",
            &keys::kubernetes::EXCLUDE_NAMESPACES,
        )?;
        if let Some(both) = raw.exclude_namespaces.as_ref().and_then(|list| {
            list.get_ref()
                .iter()
                .find(|name| namespaces.contains(name.get_ref()))
        }) {
            return Err(self.invalid(
                Some(both.span()),
                "kubernetes.exclude_namespaces",
                format!(
                    "namespace {} is both allowed (kubernetes.namespaces) and excluded",
                    shown(both.get_ref())
                ),
                "remove it from one of the two lists",
            ));
        }

        let (annotation, span) = string(&raw.annotation, keys::kubernetes::ANNOTATION.text());
        if let Some(problem) = qualified_name_problem(annotation, false) {
            return Err(self.invalid(
                span,
                "kubernetes.annotation",
                format!("{} is not a valid annotation key: {problem}", shown(annotation)),
                format!(
                    "write an annotation key like \"{}\" (an optional DNS prefix, '/', and a name of at most 63 letters, digits, '-', '_' or '.')",
                    keys::kubernetes::ANNOTATION.text()
                ),
            ));
        }

        let (class, span) = string(
            &raw.load_balancer_class,
            keys::kubernetes::LOAD_BALANCER_CLASS.text(),
        );
        if let Some(problem) = qualified_name_problem(class, true) {
            return Err(self.invalid(
                span,
                "kubernetes.load_balancer_class",
                format!(
                    "{} is not a valid loadBalancerClass: {problem}",
                    shown(class)
                ),
                format!(
                    "Kubernetes requires a domain-prefixed name like \"{}\"",
                    keys::kubernetes::LOAD_BALANCER_CLASS.text()
                ),
            ));
        }

        Ok(KubernetesConfig {
            kubeconfig: (!kubeconfig.is_empty()).then(|| PathBuf::from(kubeconfig)),
            context: (!context.is_empty()).then(|| context.to_owned()),
            namespaces,
            exclude_namespaces,
            annotation: annotation.to_owned(),
            load_balancer_class: class.to_owned(),
        })
    }

    fn namespaces(
        &self,
        raw: &RawStrings,
        key: &str,
        spec: &Key,
    ) -> Result<BTreeSet<String>, ConfigError> {
        let (entries, _) = strings(raw, spec.list());
        entries
            .into_iter()
            .map(|(name, span)| match dns_label_problem(name) {
                None => Ok(name.to_owned()),
                Some(problem) => Err(self.invalid(
                    span,
                    key,
                    format!("{} is not a namespace name: {problem}", shown(name)),
                    "write namespace names as `kubectl get namespaces` shows them (1-63 lowercase letters, digits and '-')",
                )),
            })
            .collect()
    }

    fn keyword<K: Copy + 'static>(
        &self,
        raw: &RawString,
        key: &str,
        spec: &Key,
        all: &'static [K],
        name: fn(K) -> &'static str,
    ) -> Result<K, ConfigError> {
        let (value, span) = string(raw, spec.text());
        if let Some(found) = all.iter().copied().find(|k| name(*k) == value) {
            return Ok(found);
        }
        let names = all.iter().map(|k| name(*k));
        let fix = match closest(value, names.clone()) {
            Some(close) => format!("did you mean `{close}`? (one of {})", backticked(names)),
            None => format!("use one of {}", backticked(names)),
        };
        Err(self.invalid(span, key, format!("unknown value {}", shown(value)), fix))
    }

    fn ipv4(
        &self,
        raw: &RawString,
        key: &str,
        spec: &Key,
    ) -> Result<Option<Ipv4Addr>, ConfigError> {
        let (text, span) = string(raw, spec.text());
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            self.invalid(
                span,
                key,
                format!("{} is not an IPv4 address", shown(text)),
                "write a dotted IPv4 address like \"192.168.1.1\", or \"\" to detect it",
            )
        })
    }

    fn seconds(
        &self,
        raw: &RawInteger,
        key: &str,
        spec: &Key,
        bounds: Range<u32>,
        fix: &str,
    ) -> Result<u32, ConfigError> {
        let (value, span) = integer(raw, spec);
        let (min, max) = (bounds.start, bounds.end);
        u32::try_from(value)
            .ok()
            .filter(|secs| (min..=max).contains(secs))
            .ok_or_else(|| {
                self.invalid(span, key, format!("{value} is outside {min}..={max}"), fix)
            })
    }

    fn router(&self, raw: &RawRouter) -> Result<RouterConfig, ConfigError> {
        let backend = self.keyword(
            &raw.backend,
            "router.backend",
            &keys::router::BACKEND,
            BackendChoice::ALL,
            BackendChoice::as_str,
        )?;
        let address = self.ipv4(&raw.address, "router.address", &keys::router::ADDRESS)?;

        let (igd_url, span) = string(&raw.igd_url, keys::router::IGD_URL.text());
        let host = igd_url
            .strip_prefix("http://")
            .and_then(|rest| rest.split(['/', '?', '#']).next());
        if !igd_url.is_empty()
            && (host.is_none_or(str::is_empty) || igd_url.contains(char::is_whitespace))
        {
            return Err(self.invalid(
                span,
                "router.igd_url",
                format!("{} is not an http:// URL", shown(igd_url)),
                "write the router's UPnP description URL, like \"http://192.168.1.1:5000/rootDesc.xml\" (UPnP uses plain http), or \"\" to discover it",
            ));
        }

        let lease_secs = self.seconds(
            &raw.lease_seconds,
            "router.lease_seconds",
            &keys::router::LEASE_SECONDS,
            0..MAX_LEASE_SECS,
            "use a lease of at most one week (604800 s); 0 asks for a permanent mapping",
        )?;
        let verify_interval_secs = self.seconds(
            &raw.verify_interval_seconds,
            "router.verify_interval_seconds",
            &keys::router::VERIFY_INTERVAL_SECONDS,
            MIN_VERIFY_INTERVAL_SECS..MAX_VERIFY_INTERVAL_SECS,
            "check the router every 5 s to 1 day (86400 s); 60 is a good choice",
        )?;
        Ok(RouterConfig {
            backend,
            address,
            igd_url: (!igd_url.is_empty()).then(|| igd_url.to_owned()),
            lease_secs,
            verify_interval_secs,
        })
    }

    fn exposure(&self, raw: &RawExposure) -> Result<ExposureConfig, ConfigError> {
        let mode = self.keyword(
            &raw.mode,
            "exposure.mode",
            &keys::exposure::MODE,
            ExposureMode::ALL,
            ExposureMode::as_str,
        )?;
        let ipv6 = self.keyword(
            &raw.ipv6,
            "exposure.ipv6",
            &keys::exposure::IPV6,
            Ipv6Choice::ALL,
            Ipv6Choice::as_str,
        )?;
        let lan_address = self.ipv4(
            &raw.lan_address,
            "exposure.lan_address",
            &keys::exposure::LAN_ADDRESS,
        )?;

        let (wan_interface, span) =
            string(&raw.wan_interface, keys::exposure::WAN_INTERFACE.text());
        if let Some(problem) = ifname_problem(wan_interface) {
            return Err(self.invalid(
                span,
                "exposure.wan_interface",
                format!(
                    "{} is not an interface name: {problem}",
                    shown(wan_interface)
                ),
                "write the name `ip link` shows, like \"eth0\" or \"ppp0\"",
            ));
        }

        let (entries, _) = strings(&raw.target_cidrs, keys::exposure::TARGET_CIDRS.list());
        let target_cidrs = entries
            .into_iter()
            .map(|(text, span)| self.cidr(text, span))
            .collect::<Result<_, _>>()?;

        Ok(ExposureConfig {
            mode,
            ipv6,
            lan_address,
            wan_interface: (!wan_interface.is_empty()).then(|| wan_interface.to_owned()),
            target_cidrs,
        })
    }

    fn cidr(&self, text: &str, span: Option<Range<usize>>) -> Result<IpNet, ConfigError> {
        const KEY: &str = "exposure.target_cidrs";
        match text.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => Ok(net),
            Ok(net) => Err(self.invalid(
                span,
                KEY,
                format!(
                    "{} has host bits set beyond its /{} prefix",
                    shown(text),
                    net.prefix_len()
                ),
                format!("write the network address: \"{}\"", net.trunc()),
            )),
            Err(_) if text.parse::<std::net::IpAddr>().is_ok() => Err(self.invalid(
                span,
                KEY,
                format!("{} has no prefix length", shown(text)),
                format!(
                    "write \"{text}/32\" for one address, or a network like \"192.168.0.0/16\""
                ),
            )),
            Err(_) => Err(self.invalid(
                span,
                KEY,
                format!("{} is not an IP network", shown(text)),
                "write networks in CIDR notation, like \"192.168.1.240/28\" or \"fd00:1::/64\"",
            )),
        }
    }

    /// Gateway mode forwards on the router itself: it needs the WAN interface and makes no
    /// router mappings.
    fn check_gateway(
        &self,
        raw: &RawConfig,
        router: &RouterConfig,
        exposure: &ExposureConfig,
    ) -> Result<(), ConfigError> {
        if exposure.mode != ExposureMode::Gateway {
            return Ok(());
        }
        let mode_span = raw.exposure.mode.as_ref().map(Spanned::span);
        if exposure.wan_interface.is_none() {
            return Err(self.invalid(
                raw.exposure
                    .wan_interface
                    .as_ref()
                    .map(Spanned::span)
                    .or(mode_span),
                "exposure.wan_interface",
                "exposure.mode = \"gateway\" needs the router's WAN interface, and none is set",
                "set exposure.wan_interface to it, like \"eth0\" or \"ppp0\"",
            ));
        }
        if !matches!(router.backend, BackendChoice::Auto | BackendChoice::None) {
            return Err(self.invalid(
                raw.router.backend.as_ref().map(Spanned::span).or(mode_span),
                "router.backend",
                format!(
                    "exposure.mode = \"gateway\" forwards with nftables on this machine (the router) and asks no router for mappings, so router.backend = \"{}\" would never be used",
                    router.backend
                ),
                "set router.backend = \"none\" (or \"auto\"), or use exposure.mode = \"relay\" if holepunch runs on a host behind the router",
            ));
        }
        Ok(())
    }

    fn ports(&self, raw: &RawPorts) -> Result<PortPolicy, ConfigError> {
        let allow_below_1024 = raw
            .allow_below_1024
            .as_ref()
            .map_or(keys::ports::ALLOW_BELOW_1024.flag(), |value| {
                *value.get_ref()
            });
        let allow = self.port_ranges(&raw.allow, "ports.allow", keys::ports::ALLOW.list())?;
        let deny = self.port_ranges(&raw.deny, "ports.deny", keys::ports::DENY.list())?;
        if !allow_below_1024 {
            let (entries, _) = strings(&raw.allow, keys::ports::ALLOW.list());
            if let Some((range, (_, span))) = allow
                .iter()
                .zip(entries)
                .find(|(range, _)| range.first < 1024)
            {
                return Err(self.invalid(
                    span,
                    "ports.allow",
                    format!(
                        "{range} includes ports below 1024, which are refused unless ports.allow_below_1024 = true"
                    ),
                    "set allow_below_1024 = true in [ports] to open them, or start the range at 1024",
                ));
            }
        }
        let max_per_service = self.quota(
            &raw.max_per_service,
            "ports.max_per_service",
            &keys::ports::MAX_PER_SERVICE,
        )?;
        let max_per_namespace = self.quota(
            &raw.max_per_namespace,
            "ports.max_per_namespace",
            &keys::ports::MAX_PER_NAMESPACE,
        )?;
        let max_total = self.quota(&raw.max_total, "ports.max_total", &keys::ports::MAX_TOTAL)?;
        Ok(PortPolicy {
            allow,
            deny,
            allow_below_1024,
            max_per_service,
            max_per_namespace,
            max_total,
        })
    }

    /// A `ports.max_*` quota: 1 to every TCP and UDP port.
    fn quota(&self, raw: &RawInteger, key: &str, spec: &Key) -> Result<u32, ConfigError> {
        let (value, span) = integer(raw, spec);
        u32::try_from(value)
            .ok()
            .filter(|n| (1..=MAX_PORTS_QUOTA).contains(n))
            .ok_or_else(|| {
                self.invalid(
                    span,
                    key,
                    format!("{value} is outside 1..={MAX_PORTS_QUOTA}"),
                    format!("write a number of ports from 1 up, like {}; to publish nothing, remove the Services' annotation instead", spec.int()),
                )
            })
    }

    fn port_ranges(
        &self,
        raw: &RawStrings,
        key: &str,
        default: &[&str],
    ) -> Result<Vec<PortRange>, ConfigError> {
        let (entries, _) = strings(raw, default);
        entries
            .into_iter()
            .map(|(text, span)| {
                parse_port_range(text).map_err(|problem| {
                    self.invalid(
                        span,
                        key,
                        problem,
                        "write a port as \"8080\" or a range as \"8000-8099\", with ports from 1 to 65535",
                    )
                })
            })
            .collect()
    }

    fn state(&self, raw: &RawState) -> Result<StateConfig, ConfigError> {
        let (path, span) = string(&raw.path, keys::state::PATH.text());
        if !Path::new(path).is_absolute() {
            return Err(self.invalid(
                span,
                "state.path",
                format!("{} is not an absolute path", shown(path)),
                format!("write a full path, like \"{}\"", keys::state::PATH.text()),
            ));
        }
        Ok(StateConfig {
            path: PathBuf::from(path),
        })
    }

    fn metrics(&self, raw: &RawMetrics) -> Result<MetricsConfig, ConfigError> {
        let (listen, span) = string(&raw.listen, keys::metrics::LISTEN.text());
        if listen.is_empty() {
            return Ok(MetricsConfig { listen: None });
        }
        let address = listen.parse().map_err(|_| {
            self.invalid(
                span,
                "metrics.listen",
                format!("{} is not an address and port", shown(listen)),
                format!(
                    "write it like \"{}\" (or \"[::1]:9473\"), or \"\" to turn metrics off",
                    keys::metrics::LISTEN.text()
                ),
            )
        })?;
        Ok(MetricsConfig {
            listen: Some(address),
        })
    }

    fn log(&self, raw: &RawLog) -> Result<LogConfig, ConfigError> {
        const LEVEL_FIX: &str = "use a level (error, warn, info, debug, trace) or directives like \"holepunch=debug,kube=info\"";
        let (level, span) = string(&raw.level, keys::log::LEVEL.text());
        if level.trim().is_empty() {
            return Err(self.invalid(span, "log.level", "the level is empty", LEVEL_FIX));
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(level) {
            return Err(self.invalid(
                span,
                "log.level",
                format!("{} is not a log filter: {error}", shown(level)),
                LEVEL_FIX,
            ));
        }
        let format = self.keyword(
            &raw.format,
            "log.format",
            &keys::log::FORMAT,
            LogFormat::ALL,
            LogFormat::as_str,
        )?;
        Ok(LogConfig {
            level: level.to_owned(),
            format,
        })
    }
}

impl Source<'_> {
    /// `[ha]`: names the Kubernetes objects, timings in client-go's order (retry < renew
    /// deadline < lease duration), and the floating address the exposure mode needs.
    fn ha(
        &self,
        raw: Option<&Spanned<RawHa>>,
        exposure: &RawExposure,
        mode: ExposureMode,
    ) -> Result<Option<HaConfig>, ConfigError> {
        let Some(spanned) = raw else {
            return Ok(None);
        };
        let raw = spanned.get_ref();
        if mode == ExposureMode::Gateway {
            return Err(self.invalid(
                exposure
                    .mode
                    .as_ref()
                    .map(Spanned::span)
                    .or(Some(spanned.span())),
                "exposure.mode",
                "[ha] is not available in gateway mode: holepunch runs on the router itself, and there is only one router",
                "remove the [ha] section, or use exposure.mode = \"relay\" or \"direct\" on hosts behind the router",
            ));
        }

        let (lease_name, span) = string(&raw.lease_name, keys::ha::LEASE_NAME.text());
        if let Some(problem) = dns_subdomain_problem(lease_name) {
            return Err(self.invalid(
                span,
                "ha.lease_name",
                format!("{} is not a Lease name: {problem}", shown(lease_name)),
                format!(
                    "write a DNS name like \"{}\" (lowercase letters, digits, '-' and '.')",
                    keys::ha::LEASE_NAME.text()
                ),
            ));
        }
        let (namespace, span) = string(&raw.lease_namespace, keys::ha::LEASE_NAMESPACE.text());
        if let Some(problem) = dns_label_problem(namespace) {
            return Err(self.invalid(
                span,
                "ha.lease_namespace",
                format!("{} is not a namespace name: {problem}", shown(namespace)),
                "write the namespace holepunch's RBAC grants Leases and ConfigMaps in, as `kubectl get namespaces` shows it",
            ));
        }
        let (identity, span) = string(&raw.identity, keys::ha::IDENTITY.text());
        if identity.len() > MAX_HA_IDENTITY_LEN
            || identity
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(self.invalid(
                span,
                "ha.identity",
                format!(
                    "{} is not a holder identity: at most {MAX_HA_IDENTITY_LEN} characters, no spaces",
                    shown(identity)
                ),
                "write a name unique to this host, like \"node-a\", or \"\" for the host name",
            ));
        }

        let (address, span) = string(&raw.address, keys::ha::ADDRESS.text());
        let address = if address.is_empty() {
            None
        } else {
            match address.parse::<Ipv4Net>() {
                Ok(net)
                    if net.prefix_len() < 31
                        && (net.addr() == net.network() || net.addr() == net.broadcast()) =>
                {
                    return Err(self.invalid(
                        span,
                        "ha.address",
                        format!("{} is the network's own or broadcast address", shown(address)),
                        "write a free host address of the LAN with its prefix, like \"192.168.1.250/24\"",
                    ));
                }
                Ok(net) => Some(net),
                Err(_) => {
                    return Err(self.invalid(
                        span,
                        "ha.address",
                        format!("{} is not an IPv4 address with a prefix", shown(address)),
                        "write a free host address of the LAN with its prefix, like \"192.168.1.250/24\"",
                    ));
                }
            }
        };
        match (mode, address) {
            (ExposureMode::Relay, None) => {
                return Err(self.invalid(
                    span.or(Some(spanned.span())),
                    "ha.address",
                    "relay mode with [ha] needs a floating address: the router maps to it, and it moves with the Lease",
                    "set ha.address to a free LAN address with its prefix, like \"192.168.1.250/24\"",
                ));
            }
            (ExposureMode::Direct, Some(_)) => {
                return Err(self.invalid(
                    span,
                    "ha.address",
                    "direct mode needs no floating address: the router maps to the Services' targets, not to a host",
                    "remove ha.address (or set it to \"\"), or use exposure.mode = \"relay\"",
                ));
            }
            _ => {}
        }

        let (interface, span) = string(&raw.interface, keys::ha::INTERFACE.text());
        if let Some(problem) = ifname_problem(interface) {
            return Err(self.invalid(
                span,
                "ha.interface",
                format!("{} is not an interface name: {problem}", shown(interface)),
                "write the LAN interface as `ip link` names it, like \"eth0\", or \"\" for the default route's",
            ));
        }

        const TIMING_FIX: &str = "keep retry_period_seconds < renew_deadline_seconds < lease_duration_seconds (the defaults: 2, 7, 10)";
        let bounds = MIN_HA_SECS..MAX_HA_SECS;
        let duration = self.seconds(
            &raw.lease_duration_seconds,
            "ha.lease_duration_seconds",
            &keys::ha::LEASE_DURATION_SECONDS,
            bounds.clone(),
            TIMING_FIX,
        )?;
        let renew = self.seconds(
            &raw.renew_deadline_seconds,
            "ha.renew_deadline_seconds",
            &keys::ha::RENEW_DEADLINE_SECONDS,
            bounds.clone(),
            TIMING_FIX,
        )?;
        let retry = self.seconds(
            &raw.retry_period_seconds,
            "ha.retry_period_seconds",
            &keys::ha::RETRY_PERIOD_SECONDS,
            bounds,
            TIMING_FIX,
        )?;
        let span_of = |value: &RawInteger| value.as_ref().map(Spanned::span);
        if renew >= duration {
            return Err(self.invalid(
                span_of(&raw.renew_deadline_seconds)
                    .or(span_of(&raw.lease_duration_seconds))
                    .or(Some(spanned.span())),
                "ha.renew_deadline_seconds",
                format!(
                    "the renew deadline ({renew} s) is not shorter than the lease duration ({duration} s): a host that lost the Lease could still be acting when another takes it"
                ),
                TIMING_FIX,
            ));
        }
        if retry >= renew {
            return Err(self.invalid(
                span_of(&raw.retry_period_seconds)
                    .or(span_of(&raw.renew_deadline_seconds))
                    .or(Some(spanned.span())),
                "ha.retry_period_seconds",
                format!(
                    "the retry period ({retry} s) is not shorter than the renew deadline ({renew} s): the holder would get no second try before it must step down"
                ),
                TIMING_FIX,
            ));
        }

        Ok(Some(HaConfig {
            lease_name: lease_name.to_owned(),
            lease_namespace: namespace.to_owned(),
            identity: (!identity.is_empty()).then(|| identity.to_owned()),
            address,
            interface: (!interface.is_empty()).then(|| interface.to_owned()),
            lease_duration_secs: duration,
            renew_deadline_secs: renew,
            retry_period_secs: retry,
        }))
    }
}

/// Longest `ha.identity`; client-go's holderIdentity has no limit, a host name has 253.
const MAX_HA_IDENTITY_LEN: usize = 253;

/// Why `name` is not a DNS-1123 subdomain (a Lease or ConfigMap name), if it is not.
fn dns_subdomain_problem(name: &str) -> Option<&'static str> {
    if name.len() > 253 {
        Some("it is longer than 253 characters")
    } else {
        name.split('.').find_map(dns_label_problem)
    }
}

fn unknown_section_hint(name: &str) -> String {
    let sections = keys::SECTIONS.iter().map(|section| section.name);
    if let Some(close) = closest(name, sections.clone()) {
        return format!("did you mean [{close}]?");
    }
    if let Some(home) = keys::SECTIONS
        .iter()
        .find(|section| section.keys.iter().any(|key| key.name == name))
    {
        return format!(
            "`{name}` is a key of [{}]: put it under that section header",
            home.name
        );
    }
    let all: Vec<String> = sections.map(|section| format!("[{section}]")).collect();
    format!("the sections are {}", all.join(", "))
}

fn unknown_key_hint(section: &Section, name: &str) -> String {
    let keys = section.keys.iter().map(|key| key.name);
    if let Some(home) = keys::SECTIONS
        .iter()
        .find(|other| other.keys.iter().any(|key| key.name == name))
    {
        return format!("`{name}` belongs in [{}]: move it there", home.name);
    }
    if let Some(close) = closest(name, keys.clone()) {
        return format!("did you mean `{close}`?");
    }
    format!("the keys of [{}] are {}", section.name, backticked(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/holepunch.toml";

    fn parse_ok(text: &str) -> Config {
        match parse(text, Path::new(ORIGIN)) {
            Ok(config) => config,
            Err(error) => panic!("expected {text:?} to parse, got: {error}"),
        }
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text, Path::new(ORIGIN)) {
            Ok(config) => panic!("expected {text:?} to be refused, got {config:?}"),
            Err(error) => error,
        }
    }

    /// 1-based line and column where `needle` first occurs in `text`.
    fn position_of(text: &str, needle: &str) -> (usize, usize) {
        let offset = text
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in {text:?}"));
        line_column(text, offset)
    }

    #[test]
    fn misspelt_key_names_line_column_key_and_suggestion() {
        let text = "[router]\nbackend = \"auto\"\nleas_seconds = 60\n";
        let error = parse_err(text);
        assert_eq!(
            error.to_string(),
            "/etc/holepunch.toml:3:1: router.leas_seconds: unknown key `leas_seconds` in [router]; did you mean `lease_seconds`?"
        );
        assert_eq!(error.line(), Some(3));
        assert_eq!(error.column(), Some(1));
        assert_eq!(error.key(), Some("router.leas_seconds"));
        assert_eq!(error.path(), Path::new(ORIGIN));
        assert!(matches!(error, ConfigError::UnknownKey { .. }));
    }

    struct Case {
        name: &'static str,
        toml: &'static str,
        key: Option<&'static str>,
        /// Where the error must point: the first occurrence of this text.
        at: &'static str,
        /// Fragments the message must contain.
        says: &'static [&'static str],
    }

    const fn case(
        name: &'static str,
        toml: &'static str,
        key: &'static str,
        at: &'static str,
        says: &'static [&'static str],
    ) -> Case {
        Case {
            name,
            toml,
            key: Some(key),
            at,
            says,
        }
    }

    fn check_cases(cases: &[Case]) {
        for case in cases {
            let error = parse_err(case.toml);
            let message = error.to_string();
            assert_eq!(error.key(), case.key, "{}: {message}", case.name);
            let (line, column) = position_of(case.toml, case.at);
            assert_eq!(
                (error.line(), error.column()),
                (Some(line), Some(column)),
                "{}: {message}",
                case.name
            );
            assert!(
                message.starts_with(&format!("{ORIGIN}:{line}:{column}: ")),
                "{}: {message}",
                case.name
            );
            for fragment in case.says {
                assert!(
                    message.contains(fragment),
                    "{}: {message:?} lacks {fragment:?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn unknown_sections_and_keys() {
        check_cases(&[
            case(
                "key with nothing close lists the section's keys",
                "[router]\nfrobnicate = 1\n",
                "router.frobnicate",
                "frobnicate",
                &[
                    "unknown key `frobnicate` in [router]",
                    "the keys of [router] are `backend`, `address`, `igd_url`, `lease_seconds`, `verify_interval_seconds`",
                ],
            ),
            case(
                "key of another section",
                "[exposure]\nmode = \"relay\"\nbackend = \"upnp\"\n",
                "exposure.backend",
                "backend",
                &["`backend` belongs in [router]"],
            ),
            case(
                "kebab-case key",
                "[exposure]\ntarget-cidrs = []\n",
                "exposure.target-cidrs",
                "target-cidrs",
                &["did you mean `target_cidrs`?"],
            ),
            case(
                "dotted key outside its header",
                "router.leaseseconds = 5\n",
                "router.leaseseconds",
                "leaseseconds",
                &["did you mean `lease_seconds`?"],
            ),
            case(
                "misspelt section",
                "[rooter]\nbackend = \"upnp\"\n",
                "rooter",
                "rooter",
                &["unknown section [rooter]; did you mean [router]?"],
            ),
            case(
                "unknown section lists the sections",
                "[log]\nlevel = \"info\"\n\n[tls]\ncert = \"x\"\n",
                "tls",
                "tls",
                &[
                    "the sections are [kubernetes], [router], [exposure], [ports], [state], [metrics], [log]",
                ],
            ),
            case(
                "key outside any section",
                "lease_seconds = 60\n",
                "lease_seconds",
                "lease_seconds",
                &["`lease_seconds` is a key of [router]: put it under that section header"],
            ),
        ]);
    }

    #[test]
    fn wrong_types() {
        check_cases(&[
            case(
                "quoted integer",
                "[router]\nlease_seconds = \"3600\"\n",
                "router.lease_seconds",
                "\"3600\"",
                &[
                    "expected an integer (without quotes), found a string; write it like `lease_seconds = 3600`",
                ],
            ),
            case(
                "float for integer",
                "[router]\nverify_interval_seconds = 1.5\n",
                "router.verify_interval_seconds",
                "1.5",
                &["found a float"],
            ),
            case(
                "array element",
                "[kubernetes]\nnamespaces = [\"default\", 3]\n",
                "kubernetes.namespaces",
                "3]",
                &[
                    "expected an array of strings, found an integer",
                    "namespaces = [\"default\", \"media\"]",
                ],
            ),
            case(
                "string for array",
                "[ports]\nallow = \"1024-65535\"\n",
                "ports.allow",
                "\"1024",
                &["expected an array of strings, found a string"],
            ),
            case(
                "string for boolean",
                "[ports]\nallow_below_1024 = \"yes\"\n",
                "ports.allow_below_1024",
                "\"yes\"",
                &["expected true or false", "allow_below_1024 = false"],
            ),
            case(
                "array of tables for a section",
                "[[router]]\nbackend = \"upnp\"\n",
                "router",
                "[[router]]",
                &["expected a table (a section), found an array; write it like `[router]`"],
            ),
            case(
                "value for a section",
                "router = \"upnp\"\n",
                "router",
                "\"upnp\"",
                &["expected a table (a section), found a string; write it like `[router]`"],
            ),
        ]);
    }

    #[test]
    fn toml_syntax_errors_point_at_the_problem() {
        for (text, at) in [
            ("[router]\nbackend = \n", "\n"),
            (
                "[router]\nbackend = \"a\"\nbackend = \"b\"\n",
                "backend = \"b\"",
            ),
        ] {
            let error = parse_err(text);
            let message = error.to_string();
            assert!(matches!(error, ConfigError::ParseToml { .. }), "{message}");
            assert_eq!(error.key(), None);
            let (line, _) = position_of(text.trim_end_matches('\n'), at.trim_end_matches('\n'));
            let line = if at == "\n" { 2 } else { line };
            assert_eq!(error.line(), Some(line), "{message}");
            assert!(message.contains("not valid TOML"), "{message}");
        }
    }

    #[test]
    fn kubernetes_rules() {
        check_cases(&[
            case(
                "namespace not a DNS label",
                "[kubernetes]\nnamespaces = [\"default\", \"Media\"]\n",
                "kubernetes.namespaces",
                "\"Media\"",
                &[
                    "`Media` is not a namespace name: it may hold only lowercase letters, digits and '-'",
                ],
            ),
            case(
                "excluded namespace with a leading dash",
                "[kubernetes]\nexclude_namespaces = [\"-x\"]\n",
                "kubernetes.exclude_namespaces",
                "\"-x\"",
                &["must start and end with a letter or digit"],
            ),
            case(
                "namespace both allowed and excluded",
                "[kubernetes]\nexclude_namespaces = [\"media\"]\nnamespaces = [\"default\", \"media\"]\n",
                "kubernetes.exclude_namespaces",
                "\"media\"",
                &[
                    "namespace `media` is both allowed",
                    "remove it from one of the two lists",
                ],
            ),
            case(
                "annotation with a space",
                "[kubernetes]\nannotation = \"holepunch/punch external\"\n",
                "kubernetes.annotation",
                "\"holepunch/",
                &["not a valid annotation key", "write an annotation key like"],
            ),
            case(
                "annotation with an upper-case prefix",
                "[kubernetes]\nannotation = \"Holepunch/x\"\n",
                "kubernetes.annotation",
                "\"Holepunch",
                &["its prefix `Holepunch` is not a DNS name"],
            ),
            case(
                "annotation name too long",
                "[kubernetes]\nannotation = \"a/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\n",
                "kubernetes.annotation",
                "\"a/",
                &["longer than 63 characters"],
            ),
            case(
                "load balancer class without a prefix",
                "[kubernetes]\nload_balancer_class = \"router\"\n",
                "kubernetes.load_balancer_class",
                "\"router\"",
                &[
                    "has no domain prefix",
                    "domain-prefixed name like \"holepunch.io/router\"",
                ],
            ),
            case(
                "empty load balancer class",
                "[kubernetes]\nload_balancer_class = \"\"\n",
                "kubernetes.load_balancer_class",
                "\"\"",
                &["not a valid loadBalancerClass"],
            ),
        ]);
    }

    #[test]
    fn router_rules() {
        check_cases(&[
            case(
                "misspelt backend",
                "[router]\nbackend = \"upnpp\"\n",
                "router.backend",
                "\"upnpp\"",
                &[
                    "unknown value `upnpp`; did you mean `upnp`? (one of `auto`, `upnp`, `pcp`, `natpmp`, `none`)",
                ],
            ),
            case(
                "unknown backend",
                "[router]\nbackend = \"stun\"\n",
                "router.backend",
                "\"stun\"",
                &["use one of `auto`, `upnp`, `pcp`, `natpmp`, `none`"],
            ),
            case(
                "router address",
                "[router]\naddress = \"192.168.1.300\"\n",
                "router.address",
                "\"192",
                &["`192.168.1.300` is not an IPv4 address"],
            ),
            case(
                "IPv6 router address",
                "[router]\naddress = \"fe80::1\"\n",
                "router.address",
                "\"fe80",
                &["not an IPv4 address"],
            ),
            case(
                "https IGD URL",
                "[router]\nigd_url = \"https://192.168.1.1/rootDesc.xml\"\n",
                "router.igd_url",
                "\"https",
                &["is not an http:// URL", "UPnP uses plain http"],
            ),
            case(
                "IGD URL without a host",
                "[router]\nigd_url = \"http:///rootDesc.xml\"\n",
                "router.igd_url",
                "\"http",
                &["is not an http:// URL"],
            ),
            case(
                "lease over a week",
                "[router]\nlease_seconds = 604801\n",
                "router.lease_seconds",
                "604801",
                &["604801 is outside 0..=604800", "at most one week"],
            ),
            case(
                "negative lease",
                "[router]\nlease_seconds = -1\n",
                "router.lease_seconds",
                "-1",
                &["-1 is outside 0..=604800"],
            ),
            case(
                "verify too often",
                "[router]\nverify_interval_seconds = 4\n",
                "router.verify_interval_seconds",
                "4",
                &["4 is outside 5..=86400"],
            ),
            case(
                "verify too rarely",
                "[router]\nverify_interval_seconds = 86401\n",
                "router.verify_interval_seconds",
                "86401",
                &["86401 is outside 5..=86400"],
            ),
        ]);
    }

    #[test]
    fn exposure_rules() {
        check_cases(&[
            case(
                "misspelt mode",
                "[exposure]\nmode = \"gatway\"\n",
                "exposure.mode",
                "\"gatway\"",
                &["did you mean `gateway`? (one of `relay`, `direct`, `gateway`)"],
            ),
            case(
                "gateway without a WAN interface",
                "[exposure]\nmode = \"gateway\"\n",
                "exposure.wan_interface",
                "\"gateway\"",
                &[
                    "needs the router's WAN interface",
                    "set exposure.wan_interface",
                ],
            ),
            case(
                "gateway with a router backend",
                "[router]\nbackend = \"upnp\"\n[exposure]\nmode = \"gateway\"\nwan_interface = \"eth0\"\n",
                "router.backend",
                "\"upnp\"",
                &[
                    "router.backend = \"upnp\" would never be used",
                    "set router.backend = \"none\"",
                ],
            ),
            case(
                "WAN interface name too long",
                "[exposure]\nmode = \"gateway\"\nwan_interface = \"enx0123456789abcdef\"\n",
                "exposure.wan_interface",
                "\"enx",
                &["at most 15 characters"],
            ),
            case(
                "WAN interface name with a space",
                "[exposure]\nwan_interface = \"eth 0\"\n",
                "exposure.wan_interface",
                "\"eth 0\"",
                &["no '/', ':' or spaces"],
            ),
            case(
                "LAN address",
                "[exposure]\nlan_address = \"192.168.1\"\n",
                "exposure.lan_address",
                "\"192",
                &["not an IPv4 address"],
            ),
            case(
                "target network with host bits",
                "[exposure]\ntarget_cidrs = [\"10.0.0.0/8\", \"192.168.1.0/16\"]\n",
                "exposure.target_cidrs",
                "\"192",
                &["host bits set beyond its /16 prefix", "\"192.168.0.0/16\""],
            ),
            case(
                "target address without a prefix",
                "[exposure]\ntarget_cidrs = [\"192.168.1.10\"]\n",
                "exposure.target_cidrs",
                "\"192",
                &["has no prefix length", "\"192.168.1.10/32\""],
            ),
            case(
                "IPv6 target network with host bits",
                "[exposure]\ntarget_cidrs = [\"fd00::1/8\"]\n",
                "exposure.target_cidrs",
                "\"fd00",
                &["host bits set beyond its /8 prefix", "\"fd00::/8\""],
            ),
            case(
                "target network that is no network",
                "[exposure]\ntarget_cidrs = [\"lan\"]\n",
                "exposure.target_cidrs",
                "\"lan",
                &["not an IP network"],
            ),
        ]);
    }

    #[test]
    fn ports_rules() {
        check_cases(&[
            case(
                "port zero",
                "[ports]\nallow = [\"0-100\"]\nallow_below_1024 = true\n",
                "ports.allow",
                "\"0-100\"",
                &["outside the port numbers 1-65535"],
            ),
            case(
                "port too large",
                "[ports]\nallow = [\"1024-70000\"]\n",
                "ports.allow",
                "\"1024-70000\"",
                &["outside the port numbers 1-65535"],
            ),
            case(
                "backwards range",
                "[ports]\ndeny = [\"22\", \"139-135\"]\n",
                "ports.deny",
                "\"139-135\"",
                &["runs backwards (the lower port comes first: \"135-139\")"],
            ),
            case(
                "not a number",
                "[ports]\ndeny = [\"ssh\"]\n",
                "ports.deny",
                "\"ssh\"",
                &["`ssh` is not a port or a port range", "\"8000-8099\""],
            ),
            case(
                "spaces in a range",
                "[ports]\nallow = [\"2000 - 3000\"]\n",
                "ports.allow",
                "\"2000",
                &["is not a port or a port range"],
            ),
            case(
                "allow below 1024 without the switch",
                "[ports]\nallow = [\"1024-65535\", \"80-443\"]\n",
                "ports.allow",
                "\"80-443\"",
                &[
                    "80-443 includes ports below 1024",
                    "set allow_below_1024 = true in [ports]",
                    "start the range at 1024",
                ],
            ),
            case(
                "a quota of zero",
                "[ports]\nmax_per_service = 0\n",
                "ports.max_per_service",
                "0",
                &["0 is outside 1..=131070", "like 16"],
            ),
            case(
                "a negative quota",
                "[ports]\nmax_per_namespace = -1\n",
                "ports.max_per_namespace",
                "-1",
                &["-1 is outside 1..=131070"],
            ),
            case(
                "a quota beyond every port",
                "[ports]\nmax_total = 200000\n",
                "ports.max_total",
                "200000",
                &["200000 is outside 1..=131070", "like 128"],
            ),
        ]);
    }

    #[test]
    fn empty_and_ipv6_target_networks_and_quotas_are_accepted() {
        let config = parse_ok(
            "[exposure]\ntarget_cidrs = []\n[ports]\nmax_per_service = 4\nmax_per_namespace = 8\nmax_total = 131070\n",
        );
        assert!(config.exposure.target_cidrs.is_empty());
        assert_eq!(
            (
                config.ports.max_per_service,
                config.ports.max_per_namespace,
                config.ports.max_total
            ),
            (4, 8, 131_070)
        );
        let config =
            parse_ok("[exposure]\ntarget_cidrs = [\"192.168.1.240/28\", \"fd00:1::/64\"]\n");
        assert_eq!(config.exposure.target_cidrs.len(), 2);
        assert!(
            config
                .exposure
                .target_allowed(Ipv4Addr::new(192, 168, 1, 241))
        );
        assert!(
            !config
                .exposure
                .target_allowed(Ipv4Addr::new(192, 168, 1, 50))
        );
        // The shipped default: no LoadBalancer IP is a target.
        assert!(
            !Config::default()
                .exposure
                .target_allowed(Ipv4Addr::new(192, 168, 1, 50))
        );
        for port in [4789, 6081, 8472] {
            assert!(
                Config::default().ports.check(port).is_err(),
                "{port} is an overlay port"
            );
        }
    }

    #[test]
    fn state_metrics_log_rules() {
        check_cases(&[
            case(
                "relative state path",
                "[state]\npath = \"state.toml\"\n",
                "state.path",
                "\"state.toml\"",
                &["not an absolute path", "/var/lib/holepunch/state.toml"],
            ),
            case(
                "metrics host name",
                "[metrics]\nlisten = \"localhost:9473\"\n",
                "metrics.listen",
                "\"localhost",
                &["not an address and port", "\"\" to turn metrics off"],
            ),
            case(
                "metrics without a port",
                "[metrics]\nlisten = \"127.0.0.1\"\n",
                "metrics.listen",
                "\"127",
                &["not an address and port"],
            ),
            case(
                "log level the filter refuses",
                "[log]\nlevel = \"holepunch=loud\"\n",
                "log.level",
                "\"holepunch=loud\"",
                &["is not a log filter", "holepunch=debug,kube=info"],
            ),
            case(
                "empty log level",
                "[log]\nlevel = \"\"\n",
                "log.level",
                "\"\"",
                &["the level is empty"],
            ),
            case(
                "upper-case log format",
                "[log]\nformat = \"JSON\"\n",
                "log.format",
                "\"JSON\"",
                &["did you mean `json`? (one of `auto`, `journald`, `text`, `json`)"],
            ),
        ]);
    }

    #[test]
    fn accepted_values() {
        let config = parse_ok(
            r#"
[kubernetes]
kubeconfig = "/root/.kube/config"
context = ""
namespaces = ["default", "media", "media"]
exclude_namespaces = ["kube-system"]
annotation = "punch"

[router]
backend = "none"
address = "192.168.1.1"
igd_url = "http://192.168.1.1:5000/rootDesc.xml"
lease_seconds = 0

[exposure]
mode = "gateway"
wan_interface = "ppp0"
lan_address = ""

[ports]
allow = ["80", "443", "1024-65535"]
allow_below_1024 = true
deny = []

[metrics]
listen = ""

[log]
level = "holepunch=debug,kube=info"
format = "json"
"#,
        );
        let k = &config.kubernetes;
        assert_eq!(k.kubeconfig, Some(PathBuf::from("/root/.kube/config")));
        assert_eq!(k.context, None);
        assert_eq!(k.namespaces.len(), 2);
        assert!(k.namespace_allowed("media"));
        assert!(!k.namespace_allowed("kube-system"));
        assert!(!k.namespace_allowed("other"));
        assert_eq!(config.router.backend, BackendChoice::None);
        assert_eq!(config.router.address, Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(config.router.lease_secs, 0);
        assert_eq!(config.exposure.mode, ExposureMode::Gateway);
        assert_eq!(config.exposure.wan_interface.as_deref(), Some("ppp0"));
        assert_eq!(config.exposure.lan_address, None);
        assert_eq!(
            config.ports.allow[0],
            PortRange {
                first: 80,
                last: 80
            }
        );
        assert!(config.ports.deny.is_empty());
        assert_eq!(config.metrics.listen, None);
        assert_eq!(config.log.format, LogFormat::Json);

        // Gateway mode also works with the backend left on auto.
        let config = parse_ok("[exposure]\nmode = \"gateway\"\nwan_interface = \"eth0\"\n");
        assert_eq!(config.router.backend, BackendChoice::Auto);
    }

    #[test]
    fn defaults_equal_empty_file() {
        let config = parse_ok("");
        assert_eq!(config, Config::default());
        // Nothing was dropped while building the default from the constants.
        assert_eq!(
            config.exposure.target_cidrs.len(),
            keys::exposure::TARGET_CIDRS.list().len()
        );
        assert_eq!(config.ports.allow.len(), keys::ports::ALLOW.list().len());
        assert_eq!(config.ports.deny.len(), keys::ports::DENY.list().len());
        assert!(config.metrics.listen.is_some());
        assert_eq!(
            i64::from(config.router.lease_secs),
            keys::router::LEASE_SECONDS.int()
        );
        assert!(!config.ports.allow_below_1024);
        assert_eq!(parse_ok("[router]\n[log]\n"), Config::default());
    }

    #[test]
    fn shipped_file_is_the_defaults() {
        let text = include_str!("../etc/holepunch.toml");
        let config = match parse(text, Path::new("etc/holepunch.toml")) {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(config, Config::default());
        for section in keys::SECTIONS {
            // [ha] is documented commented out: its absence means one host.
            let header = format!("[{}]", section.name);
            assert!(
                text.lines()
                    .any(|line| line == header || line == format!("#{header}")),
                "etc/holepunch.toml lacks [{}]",
                section.name
            );
            for key in section.keys {
                let documented = text.lines().any(|line| {
                    line.trim_start_matches('#')
                        .starts_with(&format!("{} = ", key.name))
                });
                assert!(
                    documented,
                    "etc/holepunch.toml lacks {}.{}",
                    section.name, key.name
                );
            }
        }
    }

    #[test]
    fn schema_matches_the_raw_layer() {
        // Every example line is accepted where the schema puts it...
        let mut all = String::new();
        for section in keys::SECTIONS {
            all.push_str(&format!("[{}]\n", section.name));
            for key in section.keys {
                all.push_str(&format!("{}\n", key.example_line()));
            }
        }
        parse_ok(&all);
        // ...and a value of another type is refused with that key's expected type.
        for section in keys::SECTIONS {
            for key in section.keys {
                let wrong = match key.kind() {
                    keys::Kind::String | keys::Kind::Boolean | keys::Kind::Strings => "1",
                    keys::Kind::Integer => "\"1\"",
                };
                let text = format!("[{}]\n{} = {wrong}\n", section.name, key.name);
                match parse_err(&text) {
                    ConfigError::WrongType {
                        key: got, expected, ..
                    } => {
                        assert_eq!(got, format!("{}.{}", section.name, key.name));
                        assert_eq!(expected, key.kind().expected());
                    }
                    other => panic!("{text:?}: {other}"),
                }
            }
        }
        // ...and the raw layer has no key the declarations lack: serde names every field it
        // takes when it refuses an unknown one.
        for section in keys::SECTIONS {
            let text = format!("[{}]\nno_such_key = 1\n", section.name);
            let refusal = match toml::from_str::<RawConfig>(&text) {
                Ok(_) => panic!("{text:?} was accepted"),
                Err(error) => error.message().to_owned(),
            };
            let named: Vec<&str> = refusal.split('`').skip(3).step_by(2).collect();
            let declared: Vec<&str> = section.keys.iter().map(|key| key.name).collect();
            assert_eq!(
                named, declared,
                "[{}]: the Raw struct and src/config/keys.rs differ: {refusal}",
                section.name
            );
        }
    }

    /// Every dotted key the validation names in a message (`"router.lease_seconds"`) is a
    /// declared key: the messages cannot name a key that does not exist.
    #[test]
    fn messages_name_declared_keys() {
        let source = include_str!("config.rs");
        let validation = source
            .split("#[cfg(test)]\nmod tests {")
            .next()
            .unwrap_or(source);
        let mut named = 0;
        for section in keys::SECTIONS {
            let opening = format!("\"{}.", section.name);
            for (at, _) in validation.match_indices(&opening) {
                let rest = &validation[at + opening.len()..];
                let Some(name) = rest.split('"').next() else {
                    continue;
                };
                if !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    continue;
                }
                assert!(
                    section.keys.iter().any(|key| key.name == name),
                    "config.rs names {}.{name}, which src/config/keys.rs does not declare",
                    section.name
                );
                named += 1;
            }
        }
        assert!(
            named >= 40,
            "only {named} dotted keys found: the scan is broken"
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let default = Config::default();
        assert_eq!(parse_ok(&default.to_toml()), default);

        let custom = parse_ok(
            r#"
[kubernetes]
kubeconfig = "/etc/holepunch/other \"kube\"config"
context = "home"
namespaces = ["default", "media"]
exclude_namespaces = ["kube-system"]
annotation = "example.com/expose"
load_balancer_class = "example.com/lb"

[router]
backend = "none"
address = "192.168.1.1"
igd_url = "http://192.168.1.1:5000/rootDesc.xml"
lease_seconds = 0
verify_interval_seconds = 300

[exposure]
mode = "gateway"
lan_address = "192.168.1.2"
wan_interface = "ppp0"
target_cidrs = ["192.168.77.0/24"]

[ports]
allow = ["80", "443", "8000-8099"]
deny = ["8080"]
allow_below_1024 = true

[state]
path = "/srv/holepunch/state.toml"

[metrics]
listen = "[::1]:9000"

[log]
level = "holepunch=debug,kube=info"
format = "journald"
"#,
        );
        assert_ne!(custom, default);
        let printed = custom.to_toml();
        assert_eq!(parse_ok(&printed), custom, "{printed}");
        assert!(
            printed.starts_with("[kubernetes]\nkubeconfig = "),
            "{printed}"
        );
        assert!(
            printed.contains("\n[ports]\nallow = [\"80\", \"443\", \"8000-8099\"]\n"),
            "{printed}"
        );
        assert!(printed.contains("lease_seconds = 0\n"), "{printed}");
    }

    const HA_MINIMAL: &str = "[ha]\naddress = \"192.168.1.250/24\"\n";

    #[test]
    fn ha_rules() {
        check_cases(&[
            case(
                "relay mode without a floating address",
                "[ha]\nlease_name = \"holepunch\"\n",
                "ha.address",
                "[ha]",
                &["needs a floating address", "192.168.1.250/24"],
            ),
            case(
                "address without a prefix",
                "[ha]\naddress = \"192.168.1.250\"\n",
                "ha.address",
                "\"192.168.1.250\"",
                &["not an IPv4 address with a prefix"],
            ),
            case(
                "network address",
                "[ha]\naddress = \"192.168.1.0/24\"\n",
                "ha.address",
                "\"192.168.1.0/24\"",
                &["network's own or broadcast address"],
            ),
            case(
                "floating address in direct mode",
                "[exposure]\nmode = \"direct\"\n[ha]\naddress = \"192.168.1.250/24\"\n",
                "ha.address",
                "\"192.168.1.250/24\"",
                &["direct mode needs no floating address"],
            ),
            case(
                "gateway mode",
                "[exposure]\nmode = \"gateway\"\nwan_interface = \"eth0\"\n[ha]\n",
                "exposure.mode",
                "\"gateway\"",
                &["not available in gateway mode", "remove the [ha] section"],
            ),
            case(
                "renew deadline not below the lease duration",
                "[ha]\naddress = \"192.168.1.250/24\"\nlease_duration_seconds = 12\nrenew_deadline_seconds = 13\n",
                "ha.renew_deadline_seconds",
                "13",
                &[
                    "is not shorter than the lease duration",
                    "the defaults: 2, 7, 10",
                ],
            ),
            case(
                "lease duration below the default renew deadline",
                "[ha]\naddress = \"192.168.1.250/24\"\nlease_duration_seconds = 6\n",
                "ha.renew_deadline_seconds",
                "6\n",
                &["the renew deadline (7 s) is not shorter than the lease duration (6 s)"],
            ),
            case(
                "retry period not below the renew deadline",
                "[ha]\naddress = \"192.168.1.250/24\"\nretry_period_seconds = 7\n",
                "ha.retry_period_seconds",
                "7",
                &["the retry period (7 s) is not shorter than the renew deadline (7 s)"],
            ),
            case(
                "zero lease duration",
                "[ha]\naddress = \"192.168.1.250/24\"\nlease_duration_seconds = 0\n",
                "ha.lease_duration_seconds",
                "0\n",
                &["outside 1..=3600"],
            ),
            case(
                "upper-case Lease name",
                "[ha]\naddress = \"192.168.1.250/24\"\nlease_name = \"HolePunch\"\n",
                "ha.lease_name",
                "\"HolePunch\"",
                &["is not a Lease name"],
            ),
            case(
                "namespace with a dot",
                "[ha]\naddress = \"192.168.1.250/24\"\nlease_namespace = \"a.b\"\n",
                "ha.lease_namespace",
                "\"a.b\"",
                &["is not a namespace name"],
            ),
            case(
                "identity with a space",
                "[ha]\naddress = \"192.168.1.250/24\"\nidentity = \"node a\"\n",
                "ha.identity",
                "\"node a\"",
                &["is not a holder identity"],
            ),
            case(
                "interface with a slash",
                "[ha]\naddress = \"192.168.1.250/24\"\ninterface = \"eth0/1\"\n",
                "ha.interface",
                "\"eth0/1\"",
                &["is not an interface name"],
            ),
            case(
                "misspelt key",
                "[ha]\nlease_duration = 15\n",
                "ha.lease_duration",
                "lease_duration",
                &["did you mean `lease_duration_seconds`?"],
            ),
        ]);
    }

    #[test]
    fn ha_accepted_values() {
        // Absent: one host, exactly as before.
        assert_eq!(parse_ok("").ha, None);
        let ha = parse_ok(HA_MINIMAL).ha.expect("[ha] parses");
        assert_eq!(
            ha,
            HaConfig {
                lease_name: keys::ha::LEASE_NAME.text().to_owned(),
                lease_namespace: keys::ha::LEASE_NAMESPACE.text().to_owned(),
                identity: None,
                address: "192.168.1.250/24".parse().ok(),
                interface: None,
                lease_duration_secs: 10,
                renew_deadline_secs: 7,
                retry_period_secs: 2,
            }
        );
        let direct = parse_ok(
            "[exposure]\nmode = \"direct\"\n[ha]\nidentity = \"node-a\"\ninterface = \"br0\"\nlease_name = \"hp.lease\"\nlease_duration_seconds = 4\nrenew_deadline_seconds = 3\nretry_period_seconds = 1\n",
        );
        let ha = direct.ha.expect("[ha] in direct mode parses");
        assert_eq!(ha.address, None);
        assert_eq!(ha.identity.as_deref(), Some("node-a"));
        assert_eq!(ha.interface.as_deref(), Some("br0"));
        assert_eq!(ha.lease_name, "hp.lease");
        assert_eq!(
            (
                ha.lease_duration_secs,
                ha.renew_deadline_secs,
                ha.retry_period_secs
            ),
            (4, 3, 1)
        );

        // check-config prints it, and the print reads back the same.
        let config = parse_ok(HA_MINIMAL);
        let printed = config.to_toml();
        assert!(
            printed.ends_with(
                "\n[ha]\nlease_name = \"holepunch\"\nlease_namespace = \"holepunch\"\nidentity = \"\"\naddress = \"192.168.1.250/24\"\ninterface = \"\"\nlease_duration_seconds = 10\nrenew_deadline_seconds = 7\nretry_period_seconds = 2\n"
            ),
            "{printed}"
        );
        assert_eq!(parse_ok(&printed), config);
        assert!(!Config::default().to_toml().contains("[ha]"));
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holepunch.toml");
        std::fs::write(&path, "[router]\nlease_seconds = 600\n").unwrap();
        assert_eq!(load(&path).unwrap().router.lease_secs, 600);

        let missing = dir.path().join("missing.toml");
        let error = load(&missing).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(
            message.contains("create it or pass --config PATH"),
            "{message}"
        );
        assert_eq!(
            (error.line(), error.column(), error.key()),
            (None, None, None)
        );
        assert!(std::error::Error::source(&error).is_some());

        std::fs::write(&path, "[router]\nlease_seconds = 600\nbackend = \"x\"\n").unwrap();
        let error = load(&path).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("{}:3:11: ", path.display()))
        );
    }

    #[test]
    fn port_policy_check() {
        let policy = Config::default().ports;
        let privileged = PortPolicy {
            allow: vec![
                PortRange {
                    first: 80,
                    last: 80,
                },
                PortRange {
                    first: 1024,
                    last: 65535,
                },
            ],
            allow_below_1024: true,
            ..policy.clone()
        };
        let cases: &[(&PortPolicy, u16, Result<(), PortDenial>)] = &[
            (&policy, 8080, Ok(())),
            (&policy, 65535, Ok(())),
            (
                &policy,
                22,
                Err(PortDenial::Denied(PortRange {
                    first: 22,
                    last: 22,
                })),
            ),
            (
                &policy,
                137,
                Err(PortDenial::Denied(PortRange {
                    first: 135,
                    last: 139,
                })),
            ),
            (
                &policy,
                6443,
                Err(PortDenial::Denied(PortRange {
                    first: 6443,
                    last: 6443,
                })),
            ),
            (&policy, 80, Err(PortDenial::BelowPrivileged)),
            (&privileged, 80, Ok(())),
            (&privileged, 443, Err(PortDenial::NotAllowed)),
            (
                &privileged,
                22,
                Err(PortDenial::Denied(PortRange {
                    first: 22,
                    last: 22,
                })),
            ),
        ];
        for (policy, port, expected) in cases {
            assert_eq!(policy.check(*port), *expected, "port {port}");
        }
        let narrow = PortPolicy {
            allow: vec![PortRange {
                first: 30000,
                last: 30100,
            }],
            deny: Vec::new(),
            allow_below_1024: false,
            ..Config::default().ports
        };
        assert_eq!(narrow.check(8080), Err(PortDenial::NotAllowed));
        assert_eq!(narrow.check(30000), Ok(()));
    }

    #[test]
    fn closest_suggests_only_near_words() {
        let keys = [
            "backend",
            "address",
            "igd_url",
            "lease_seconds",
            "verify_interval_seconds",
        ];
        for (word, expected) in [
            ("leas_seconds", Some("lease_seconds")),
            ("Lease-Seconds", Some("lease_seconds")),
            ("lease", Some("lease_seconds")),
            ("backnd", Some("backend")),
            ("verify_interval", Some("verify_interval_seconds")),
            ("timeout", None),
            ("x", None),
        ] {
            assert_eq!(closest(word, keys), expected, "{word}");
        }
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "a = \"é\"\nbé = 1\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, text.find("1").unwrap()), (2, 6));
        assert_eq!(line_column(text, text.len()), (3, 1));
    }
}
