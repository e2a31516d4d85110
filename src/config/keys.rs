//! Every config key, declared once: its name, its default (which gives its TOML type), the one
//! line that documents it, and how `holepunch check-config` shows its resolved value. From these
//! declarations come the defaults the validation falls back on, the sections and keys the
//! error messages name and suggest, the `check-config` listing ([`Config::to_toml`]) and the
//! shipped, documented `etc/holepunch.toml` ([`shipped_file`]), which holepunch.toml(5) is
//! rendered from (`cli/manual.rs`). A test fails when the checked-in file drifts from this one
//! (README.md, "Configuring it").
//!
//! Adding a key: declare it here, add its field to the section's `Raw*` struct and to the
//! typed struct, and validate it in the section's `Source` method (`config.rs`).

use super::{Config, toml_array, toml_display, toml_path, toml_string};

/// A key's default, as a TOML value; its variant is the key's TOML type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// A string; `""` means unset (each key's doc says what unset means).
    Str(&'static str),
    Int(i64),
    Bool(bool),
    /// An array of strings.
    List(&'static [&'static str]),
}

/// The TOML type a key takes, for "wrong type" messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    Integer,
    Boolean,
    Strings,
}

impl Kind {
    pub fn expected(self) -> &'static str {
        match self {
            Kind::String => "a string (in double quotes)",
            Kind::Integer => "an integer (without quotes)",
            Kind::Boolean => "true or false (without quotes)",
            Kind::Strings => "an array of strings",
        }
    }
}

/// One key of a section.
pub struct Key {
    pub name: &'static str,
    pub default: Value,
    /// A valid value as TOML text, for type errors and, for a key unset by default, the
    /// shipped file; `None`: the default.
    pub example: Option<&'static str>,
    /// What the key means, in one line (the shipped file wraps it).
    pub doc: &'static str,
    /// The resolved value as TOML text; `None` when the key's section is absent.
    pub resolved: fn(&Config) -> Option<String>,
}

/// One `[section]` of the file.
pub struct Section {
    pub name: &'static str,
    /// Said once above the keys; empty for none.
    pub doc: &'static str,
    /// Absent by default: the shipped file shows it commented out.
    pub optional: bool,
    pub keys: &'static [Key],
}

const fn key(
    name: &'static str,
    default: Value,
    doc: &'static str,
    resolved: fn(&Config) -> Option<String>,
) -> Key {
    Key {
        name,
        default,
        example: None,
        doc,
        resolved,
    }
}

impl Key {
    /// The same key with a valid value other than its default to show (TOML text).
    const fn example(self, example: &'static str) -> Key {
        Key {
            example: Some(example),
            ..self
        }
    }

    pub fn kind(&self) -> Kind {
        match self.default {
            Value::Str(_) => Kind::String,
            Value::Int(_) => Kind::Integer,
            Value::Bool(_) => Kind::Boolean,
            Value::List(_) => Kind::Strings,
        }
    }

    /// Unset by default: a string key whose default is `""`.
    pub fn unset(&self) -> bool {
        self.default == Value::Str("")
    }

    /// The default of a string key (`""` for other kinds).
    pub fn text(&self) -> &'static str {
        match self.default {
            Value::Str(text) => text,
            _ => "",
        }
    }

    /// The default of an integer key (0 for other kinds).
    pub fn int(&self) -> i64 {
        match self.default {
            Value::Int(n) => n,
            _ => 0,
        }
    }

    /// The default of a boolean key (false for other kinds).
    pub fn flag(&self) -> bool {
        self.default == Value::Bool(true)
    }

    /// The default of an array key (empty for other kinds).
    pub fn list(&self) -> &'static [&'static str] {
        match self.default {
            Value::List(items) => items,
            _ => &[],
        }
    }

    /// The default as TOML text.
    pub fn default_toml(&self) -> String {
        match self.default {
            Value::Str(text) => toml_string(text),
            Value::Int(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::List(items) => toml_array(items),
        }
    }

    /// A valid line for this key, e.g. `lease_seconds = 3600`.
    pub fn example_line(&self) -> String {
        match self.example {
            Some(example) => format!("{} = {example}", self.name),
            None => format!("{} = {}", self.name, self.default_toml()),
        }
    }
}

use Value::{Bool, Int, List, Str};

pub mod kubernetes {
    use super::*;

    pub const KUBECONFIG: Key = key(
        "kubeconfig",
        Str(""),
        "Kubeconfig to reach the cluster with (unset: $KUBECONFIG, else /etc/holepunch/kubeconfig).",
        |c| Some(toml_path(c.kubernetes.kubeconfig.as_deref())),
    )
    .example(r#""/etc/holepunch/kubeconfig""#);

    pub const CONTEXT: Key = key(
        "context",
        Str(""),
        "Context in the kubeconfig to use (unset: its current-context).",
        |c| Some(toml_string(c.kubernetes.context.as_deref().unwrap_or(""))),
    )
    .example(r#""home""#);

    pub const NAMESPACES: Key = key(
        "namespaces",
        List(&[]),
        "Namespaces whose Services may be published; empty means all namespaces.",
        |c| Some(toml_array(&c.kubernetes.namespaces)),
    )
    .example(r#"["default", "media"]"#);

    pub const EXCLUDE_NAMESPACES: Key = key(
        "exclude_namespaces",
        List(&[]),
        "Namespaces whose Services are never published.",
        |c| Some(toml_array(&c.kubernetes.exclude_namespaces)),
    )
    .example(r#"["kube-system"]"#);

    pub const ANNOTATION: Key = key(
        "annotation",
        Str("holepunch/punch-external"),
        "Annotation that opts a Service in, with the value \"true\".",
        |c| Some(toml_string(&c.kubernetes.annotation)),
    );

    pub const LOAD_BALANCER_CLASS: Key = key(
        "load_balancer_class",
        Str("holepunch.io/router"),
        "Services with this spec.loadBalancerClass are published without the annotation.",
        |c| Some(toml_string(&c.kubernetes.load_balancer_class)),
    );

    pub const KEYS: &[Key] = &[
        KUBECONFIG,
        CONTEXT,
        NAMESPACES,
        EXCLUDE_NAMESPACES,
        ANNOTATION,
        LOAD_BALANCER_CLASS,
    ];
}

pub mod router {
    use super::*;

    pub const BACKEND: Key = key(
        "backend",
        Str("auto"),
        "Port mapping protocol: auto (the first that answers of PCP, NAT-PMP, UPnP) | upnp | pcp | natpmp | none.",
        |c| Some(toml_string(c.router.backend.as_str())),
    );

    pub const ADDRESS: Key = key(
        "address",
        Str(""),
        "Router IP address (unset: the next hop of the default route).",
        |c| Some(toml_display(c.router.address.as_ref())),
    )
    .example(r#""192.168.1.1""#);

    pub const IGD_URL: Key = key(
        "igd_url",
        Str(""),
        "UPnP IGD description URL; setting it skips SSDP discovery.",
        |c| Some(toml_string(c.router.igd_url.as_deref().unwrap_or(""))),
    )
    .example(r#""http://192.168.1.1:5000/rootDesc.xml""#);

    pub const LEASE_SECONDS: Key = key(
        "lease_seconds",
        Int(3600),
        "Lease asked for each mapping, in seconds (at most 604800; 0 asks for a permanent one).",
        |c| Some(c.router.lease_secs.to_string()),
    );

    pub const VERIFY_INTERVAL_SECONDS: Key = key(
        "verify_interval_seconds",
        Int(60),
        "How often to check that the router still holds the mappings, in seconds (5 to 86400).",
        |c| Some(c.router.verify_interval_secs.to_string()),
    );

    pub const KEYS: &[Key] = &[
        BACKEND,
        ADDRESS,
        IGD_URL,
        LEASE_SECONDS,
        VERIFY_INTERVAL_SECONDS,
    ];
}

pub mod exposure {
    use super::*;

    pub const MODE: Key = key(
        "mode",
        Str("relay"),
        "Traffic path: relay (via this host) | direct (router to target) | gateway (on the router).",
        |c| Some(toml_string(c.exposure.mode.as_str())),
    );

    pub const IPV6: Key = key(
        "ipv6",
        Str("auto"),
        "IPv6 pinholes beside the IPv4 mappings, for Services with an IPv6 target: auto (through PCP or UPnP IGDv2 when the router offers them; NAT-PMP has no IPv6) | off.",
        |c| Some(toml_string(c.exposure.ipv6.as_str())),
    );

    pub const LAN_ADDRESS: Key = key(
        "lan_address",
        Str(""),
        "This host's LAN address for the router to forward to (unset: the one toward the router).",
        |c| Some(toml_display(c.exposure.lan_address.as_ref())),
    )
    .example(r#""192.168.1.10""#);

    pub const WAN_INTERFACE: Key = key(
        "wan_interface",
        Str(""),
        "Gateway mode only: the router's WAN interface, as `ip link` names it.",
        |c| {
            Some(toml_string(
                c.exposure.wan_interface.as_deref().unwrap_or(""),
            ))
        },
    )
    .example(r#""eth0""#);

    pub const TARGET_CIDRS: Key = key(
        "target_cidrs",
        List(&[]),
        "Networks a Service's LoadBalancer IP must be in to be a target (IPv4 or IPv6 CIDRs). Empty: no LoadBalancer IP is a target; Services are published through a Ready node's InternalIP and nodePort instead. With MetalLB (or kube-vip, Cilium LB-IPAM), list the load balancer's address pool here, e.g. [\"192.168.1.240/28\"]. The router's addresses, this host's and loopback, link-local, multicast and broadcast addresses are never targets, whatever this list says; a unique local IPv6 address (fc00::/7) is one only if listed here.",
        |c| Some(toml_array(&c.exposure.target_cidrs)),
    )
    .example(r#"["192.168.0.0/16"]"#);

    pub const KEYS: &[Key] = &[MODE, IPV6, LAN_ADDRESS, WAN_INTERFACE, TARGET_CIDRS];
}

pub mod ports {
    use super::*;

    pub const ALLOW: Key = key(
        "allow",
        List(&["1024-65535"]),
        "External ports that may be opened, as \"N\" or \"N-M\".",
        |c| Some(toml_array(&c.ports.allow)),
    );

    pub const DENY: Key = key(
        "deny",
        List(&[
            "22",
            "23",
            "25",
            "53",
            "111",
            "135-139",
            "445",
            "1900",
            "2049",
            "2379-2380",
            "3389",
            "4789",
            "5351",
            "6081",
            "6443",
            "8472",
            "10250-10259",
        ]),
        "External ports never opened, even when allowed (4789, 8472: VXLAN; 6081: Geneve; the nodes' own overlay traffic).",
        |c| Some(toml_array(&c.ports.deny)),
    )
    .example(r#"["22", "135-139"]"#);

    pub const ALLOW_BELOW_1024: Key = key(
        "allow_below_1024",
        Bool(false),
        "Allow external ports below 1024 (they must also be in allow).",
        |c| Some(c.ports.allow_below_1024.to_string()),
    );

    pub const MAX_PER_SERVICE: Key = key(
        "max_per_service",
        Int(16),
        "Most external ports one Service gets; its lowest service ports win, the rest are refused with an Event.",
        |c| Some(c.ports.max_per_service.to_string()),
    );

    pub const MAX_PER_NAMESPACE: Key = key(
        "max_per_namespace",
        Int(32),
        "Most external ports the Services of one namespace get together.",
        |c| Some(c.ports.max_per_namespace.to_string()),
    );

    pub const MAX_TOTAL: Key = key(
        "max_total",
        Int(128),
        "Most external ports holepunch publishes in all.",
        |c| Some(c.ports.max_total.to_string()),
    );

    pub const KEYS: &[Key] = &[
        ALLOW,
        DENY,
        ALLOW_BELOW_1024,
        MAX_PER_SERVICE,
        MAX_PER_NAMESPACE,
        MAX_TOTAL,
    ];
}

pub mod state {
    use super::*;

    pub const PATH: Key = key(
        "path",
        Str("/var/lib/holepunch/state.toml"),
        "File recording every mapping holepunch owns.",
        |c| Some(toml_path(Some(&c.state.path))),
    );

    pub const KEYS: &[Key] = &[PATH];
}

pub mod metrics {
    use super::*;

    pub const LISTEN: Key = key(
        "listen",
        Str("127.0.0.1:9473"),
        "Address and port of the Prometheus metrics endpoint; \"\" turns it off.",
        |c| Some(toml_display(c.metrics.listen.as_ref())),
    );

    pub const KEYS: &[Key] = &[LISTEN];
}

pub mod log {
    use super::*;

    pub const LEVEL: Key = key(
        "level",
        Str("info"),
        "Log filter: error | warn | info | debug | trace, or directives like \"holepunch=debug,kube=info\".",
        |c| Some(toml_string(&c.log.level)),
    );

    pub const FORMAT: Key = key(
        "format",
        Str("auto"),
        "Log output: auto (journald under systemd, else text) | journald | text | json.",
        |c| Some(toml_string(c.log.format.as_str())),
    );

    pub const KEYS: &[Key] = &[LEVEL, FORMAT];
}

// NOTE: the timing defaults are shorter than client-go's 15/10/2 s, so that a takeover after a
// host dies (lease duration + up to a retry period) stays within 15 s; the holder still stops
// acting 3 s before another may start (README.md, "High availability").
pub mod ha {
    use super::*;

    pub const LEASE_NAME: Key = key(
        "lease_name",
        Str("holepunch"),
        "The Lease the hosts share; the ConfigMap \"<lease_name>-mappings\" beside it mirrors the active host's mappings.",
        |c| c.ha.as_ref().map(|ha| toml_string(&ha.lease_name)),
    );

    pub const LEASE_NAMESPACE: Key = key(
        "lease_namespace",
        Str("holepunch"),
        "Namespace of the Lease and of that ConfigMap (holepunch needs get, create and update on leases and configmaps there).",
        |c| c.ha.as_ref().map(|ha| toml_string(&ha.lease_namespace)),
    );

    pub const IDENTITY: Key = key(
        "identity",
        Str(""),
        "This host's holder identity (unset: the host name).",
        |c| {
            c.ha.as_ref()
                .map(|ha| toml_string(ha.identity.as_deref().unwrap_or("")))
        },
    )
    .example(r#""node-a""#);

    pub const ADDRESS: Key = key(
        "address",
        Str(""),
        "Relay mode: the floating address the router maps to, with its prefix; it moves with the Lease. Direct mode: leave it out.",
        |c| c.ha.as_ref().map(|ha| toml_display(ha.address.as_ref())),
    )
    .example(r#""192.168.1.250/24""#);

    pub const INTERFACE: Key = key(
        "interface",
        Str(""),
        "Interface the floating address goes on (unset: the default route's).",
        |c| {
            c.ha.as_ref()
                .map(|ha| toml_string(ha.interface.as_deref().unwrap_or("")))
        },
    )
    .example(r#""eth0""#);

    pub const LEASE_DURATION_SECONDS: Key = key(
        "lease_duration_seconds",
        Int(10),
        "Seconds after the holder's last renewal before another host may take the Lease (client-go's leaseDuration; its default is 15).",
        |c| c.ha.as_ref().map(|ha| ha.lease_duration_secs.to_string()),
    );

    pub const RENEW_DEADLINE_SECONDS: Key = key(
        "renew_deadline_seconds",
        Int(7),
        "Seconds after its last renewal at which the holder stops acting; shorter than lease_duration_seconds (client-go's renewDeadline; its default is 10).",
        |c| c.ha.as_ref().map(|ha| ha.renew_deadline_secs.to_string()),
    );

    pub const RETRY_PERIOD_SECONDS: Key = key(
        "retry_period_seconds",
        Int(2),
        "Seconds between tries to take or renew the Lease; shorter than renew_deadline_seconds (client-go's retryPeriod; its default is 2).",
        |c| c.ha.as_ref().map(|ha| ha.retry_period_secs.to_string()),
    );

    pub const KEYS: &[Key] = &[
        LEASE_NAME,
        LEASE_NAMESPACE,
        IDENTITY,
        ADDRESS,
        INTERFACE,
        LEASE_DURATION_SECONDS,
        RENEW_DEADLINE_SECONDS,
        RETRY_PERIOD_SECONDS,
    ];
}

/// The file's sections, in the order the shipped file and `check-config` list them.
pub const SECTIONS: &[Section] = &[
    section("kubernetes", kubernetes::KEYS),
    section("router", router::KEYS),
    section("exposure", exposure::KEYS),
    section("ports", ports::KEYS),
    section("state", state::KEYS),
    section("metrics", metrics::KEYS),
    section("log", log::KEYS),
    Section {
        name: "ha",
        doc: "High availability: several hosts with the same config, one active through a coordination.k8s.io/v1 Lease (README.md, \"High availability\"). The whole section is absent by default (one host). With ha.address (relay mode), link /usr/share/holepunch/holepunch-ha.conf into /etc/systemd/system/holepunch.service.d/ first: the gratuitous ARP needs CAP_NET_RAW.",
        optional: true,
        keys: ha::KEYS,
    },
];

const fn section(name: &'static str, keys: &'static [Key]) -> Section {
    Section {
        name,
        doc: "",
        optional: false,
        keys,
    }
}

/// The shipped file's opening comment.
const PREAMBLE: &[&str] = &[
    "/etc/holepunch.toml: configuration of holepunch, which publishes Kubernetes Services through the home router (UPnP IGD, PCP, NAT-PMP) and local nftables rules.",
    "Every key is optional; the values below are the defaults. Commented-out keys are unset by default (each comment says what unset means) and show an example value. Check your changes with `holepunch check-config`, then apply them with `systemctl reload holepunch` (a config that does not validate is refused and the old one keeps running).",
];

/// Longest line of the shipped file's comments.
const SHIPPED_WIDTH_CHARS: usize = 92;

/// `etc/holepunch.toml`: every section and key with its doc, set to its default, or commented
/// out with an example when it is unset by default or its section is absent by default.
pub fn shipped_file() -> String {
    let mut out = String::new();
    for (i, paragraph) in PREAMBLE.iter().enumerate() {
        if i > 0 {
            out.push_str("#\n");
        }
        push_comment(&mut out, paragraph);
    }
    for section in SECTIONS {
        let hash = if section.optional { "#" } else { "" };
        out.push_str(&format!("\n{hash}[{}]\n", section.name));
        if !section.doc.is_empty() {
            push_comment(&mut out, section.doc);
        }
        for key in section.keys {
            push_comment(&mut out, key.doc);
            let (hash, value) = match (section.optional, key.unset()) {
                (_, true) => (
                    "#",
                    key.example
                        .map_or_else(|| key.default_toml(), str::to_owned),
                ),
                (true, false) => ("#", key.default_toml()),
                (false, false) => ("", key.default_toml()),
            };
            push_value(&mut out, &format!("{hash}{} = ", key.name), &value);
        }
    }
    out
}

/// `text` as `# ` comment lines of at most [`SHIPPED_WIDTH_CHARS`].
fn push_comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.chars().count() + 1 + word.chars().count() > SHIPPED_WIDTH_CHARS {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// `start` and `value`, a long array continued on lines indented under its first element.
fn push_value(out: &mut String, start: &str, value: &str) {
    let mut line = start.to_owned();
    let indent = " ".repeat(start.len() + 1);
    let mut first = true;
    for item in value.split_inclusive(", ") {
        if !first && line.chars().count() + item.trim_end().chars().count() > SHIPPED_WIDTH_CHARS {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.clone();
        }
        line.push_str(item);
        first = false;
    }
    out.push_str(&line);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/holepunch.toml");

    /// The checked-in `etc/holepunch.toml` is what the declarations give. Regenerate it with
    /// `HOLEPUNCH_WRITE_SHIPPED=1 cargo test --lib config::keys`.
    #[test]
    fn shipped_file_is_generated_from_the_declarations() {
        let generated = shipped_file();
        if std::env::var_os("HOLEPUNCH_WRITE_SHIPPED").is_some() {
            std::fs::write(SHIPPED_PATH, &generated).expect("write etc/holepunch.toml");
        }
        let shipped = std::fs::read_to_string(SHIPPED_PATH).expect("read etc/holepunch.toml");
        if shipped != generated {
            let first = shipped
                .lines()
                .zip(generated.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(shipped.lines().count().min(generated.lines().count()));
            panic!(
                "etc/holepunch.toml differs from the declarations in src/config/keys.rs from \
                 line {}:\n  shipped:   {:?}\n  generated: {:?}\nChange the declaration, \
                 then regenerate the file with `HOLEPUNCH_WRITE_SHIPPED=1 cargo test --lib \
                 config::keys`",
                first + 1,
                shipped.lines().nth(first),
                generated.lines().nth(first)
            );
        }
        // The test proves something: a changed doc would be caught.
        assert!(generated.contains("\n# Lease asked for each mapping, in seconds"));
        assert!(generated.contains("\nlease_seconds = 3600\n"));
        assert!(generated.contains("\n#[ha]\n"));
        assert!(generated.contains("\n#lease_name = \"holepunch\"\n"));
        assert!(generated.contains("\n#address = \"192.168.1.1\"\n"));
    }

    /// Each declared default goes through the validation into the typed config and comes out
    /// of `check-config` as declared: nothing between the declaration and the daemon has a
    /// default of its own.
    #[test]
    fn check_config_shows_every_declared_default() {
        let config = super::super::parse(
            "[ha]\naddress = \"192.168.1.250/24\"\n",
            std::path::Path::new("test.toml"),
        )
        .expect("a minimal [ha] validates");
        for section in SECTIONS {
            for key in section.keys {
                let shown = (key.resolved)(&config);
                if section.name == "ha" && key.name == "address" {
                    assert_eq!(shown.as_deref(), Some("\"192.168.1.250/24\""));
                } else {
                    assert_eq!(
                        shown,
                        Some(key.default_toml()),
                        "{}.{}",
                        section.name,
                        key.name
                    );
                }
            }
        }
        // A changed value shows as changed, and an absent optional section not at all.
        let mut changed = Config::default();
        changed.router.lease_secs = 60;
        assert_eq!(
            (router::LEASE_SECONDS.resolved)(&changed).as_deref(),
            Some("60")
        );
        assert_eq!((ha::LEASE_NAME.resolved)(&changed), None);
    }

    /// A key that takes one of a few words documents every one of them.
    #[test]
    fn keyword_docs_list_every_value() {
        use super::super::{BackendChoice, ExposureMode, Ipv6Choice, LogFormat};
        let words = |doc: &str| -> Vec<String> {
            doc.split(|c: char| !c.is_ascii_alphanumeric())
                .map(str::to_owned)
                .collect()
        };
        let cases: [(&Key, Vec<&str>); 4] = [
            (
                &router::BACKEND,
                BackendChoice::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                &exposure::MODE,
                ExposureMode::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                &exposure::IPV6,
                Ipv6Choice::ALL.iter().map(|v| v.as_str()).collect(),
            ),
            (
                &log::FORMAT,
                LogFormat::ALL.iter().map(|v| v.as_str()).collect(),
            ),
        ];
        for (key, values) in cases {
            let documented = words(key.doc);
            for value in values {
                assert!(
                    documented.iter().any(|word| word == value),
                    "{}'s doc lacks {value:?}: {}",
                    key.name,
                    key.doc
                );
            }
        }
        assert!(
            !words(router::BACKEND.doc)
                .iter()
                .any(|word| word == "tr064")
        );
    }

    #[test]
    fn long_docs_and_arrays_wrap_within_the_width() {
        let file = shipped_file();
        for line in file.lines() {
            assert!(
                line.chars().count() <= SHIPPED_WIDTH_CHARS,
                "too long: {line:?}"
            );
        }
        // The deny list is one value over two lines, as TOML allows.
        assert!(file.contains("deny = [\"22\", "), "{file}");
        assert!(file.contains("\n        \"3389\""), "{file}");
    }

    #[test]
    fn names_are_unique_and_documented() {
        for (i, section) in SECTIONS.iter().enumerate() {
            assert!(SECTIONS[..i].iter().all(|s| s.name != section.name));
            for (j, key) in section.keys.iter().enumerate() {
                assert!(
                    section.keys[..j].iter().all(|k| k.name != key.name),
                    "{}.{} twice",
                    section.name,
                    key.name
                );
                assert!(
                    !key.doc.is_empty(),
                    "{}.{} has no doc",
                    section.name,
                    key.name
                );
            }
        }
    }
}
