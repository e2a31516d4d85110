//! The cluster side: a client built from the kubeconfig (found and merged as kubectl does),
//! and the Services and Nodes holepunch reads (live, or from a `kubectl get -o yaml` file for
//! dry runs).

pub mod events;
pub mod report;
pub mod slim;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod watch;
pub mod writer;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kube::config::Kubeconfig;

use crate::config::{KubernetesConfig, defaults};

/// Why the cluster could not be reached or read.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no kubeconfig at {path}: copy a kubeconfig for holepunch there (see \
         /usr/share/holepunch/kubeconfig.md), or set kubernetes.kubeconfig in the config file"
    )]
    KubeconfigMissing { path: PathBuf },
    #[error(
        "none of the kubeconfig files in $KUBECONFIG exists ({paths}): fix KUBECONFIG, or name \
         the file with --kubeconfig FILE"
    )]
    KubeconfigEnvEmpty { paths: String },
    #[error(
        "{path} was copied in after holepunch started: the service gets it from systemd at \
         start (LoadCredential=); run systemctl restart holepunch"
    )]
    KubeconfigAfterStart { path: PathBuf },
    #[error(
        "refusing the kubeconfig {path}: {why}, so they could point holepunch at another API server; run: {fix}"
    )]
    KubeconfigUntrusted {
        path: PathBuf,
        why: String,
        fix: String,
    },
    #[error("cannot check who may change the kubeconfig {path}: {source}")]
    KubeconfigStat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client from {path}: {source}")]
    Client {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the API server refused to let holepunch {verb} {resource} ({code}): apply \
         /usr/share/holepunch/rbac.yaml (packaging/kubernetes/rbac.yaml) and use that \
         ServiceAccount's kubeconfig"
    )]
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        code: u16,
    },
    #[error("cannot {verb} {resource}: {source}")]
    Request {
        verb: &'static str,
        resource: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a Kubernetes list or object in YAML or JSON: {detail}")]
    ParseFile { path: PathBuf, detail: String },
}

/// kubectl's `--kubeconfig` and `--context`, from the command line of `run` and `plan`. They
/// win over the config file's `kubernetes.kubeconfig` and `kubernetes.context`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterFlags {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

/// The flags of this process, set once at start: they stay in force across reloads (SIGHUP
/// re-reads only the config file; README "The kubeconfig").
static CLUSTER_FLAGS: OnceLock<ClusterFlags> = OnceLock::new();

/// Sets the command line's [`ClusterFlags`] for every client this process builds; only the
/// first call counts.
pub fn set_cluster_flags(flags: ClusterFlags) {
    let _ = CLUSTER_FLAGS.set(flags);
}

/// Where the kubeconfig comes from, in kubectl's order (README "The kubeconfig").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeconfigSource {
    /// `--kubeconfig`, else `kubernetes.kubeconfig`: this file, which must exist.
    File(PathBuf),
    /// `$KUBECONFIG`: these files, merged; files that do not exist are skipped, as kubectl
    /// skips them.
    Env(Vec<PathBuf>),
    /// None of the above: [`defaults::KUBECONFIG_PATH`].
    Default(PathBuf),
}

impl KubeconfigSource {
    /// The files, in merge order.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            KubeconfigSource::File(path) | KubeconfigSource::Default(path) => {
                std::slice::from_ref(path)
            }
            KubeconfigSource::Env(paths) => paths,
        }
    }

    /// The files as `$KUBECONFIG` spells them, for messages.
    pub fn display(&self) -> PathBuf {
        let names: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        PathBuf::from(names.join(":"))
    }
}

/// Picks the kubeconfig: `--kubeconfig`, else the config file's, else `$KUBECONFIG` (a list
/// separated by `:`; empty entries ignored, as kubectl does), else the default.
pub fn kubeconfig_source(
    flags: &ClusterFlags,
    config: &KubernetesConfig,
    env_kubeconfig: Option<&OsStr>,
) -> KubeconfigSource {
    if let Some(path) = flags.kubeconfig.as_ref().or(config.kubeconfig.as_ref()) {
        return KubeconfigSource::File(path.clone());
    }
    let listed: Vec<PathBuf> = env_kubeconfig
        .map(|value| {
            std::env::split_paths(value)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if listed.is_empty() {
        KubeconfigSource::Default(PathBuf::from(defaults::KUBECONFIG_PATH))
    } else {
        KubeconfigSource::Env(listed)
    }
}

/// The first kubeconfig file holepunch would read, with no command-line flags: the
/// configured path, else the first entry of `$KUBECONFIG`, else the default.
pub fn kubeconfig_path(config: &KubernetesConfig, env_kubeconfig: Option<&str>) -> PathBuf {
    kubeconfig_source(
        &ClusterFlags::default(),
        config,
        env_kubeconfig.map(OsStr::new),
    )
    .paths()
    .first()
    .cloned()
    .unwrap_or_else(|| PathBuf::from(defaults::KUBECONFIG_PATH))
}

/// Reads the kubeconfig from `source`; the files of `$KUBECONFIG` are merged as kubectl merges
/// them (the first file to set a cluster, user, context or the current context wins:
/// [`Kubeconfig::merge`]).
pub fn read_kubeconfig(source: &KubeconfigSource) -> Result<Kubeconfig, KubeError> {
    let read = |path: &Path| {
        Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
            path: path.into(),
            source,
        })
    };
    match source {
        KubeconfigSource::File(path) | KubeconfigSource::Default(path) => {
            if !path.exists() {
                return Err(KubeError::KubeconfigMissing { path: path.clone() });
            }
            read(path)
        }
        KubeconfigSource::Env(paths) => {
            let mut merged: Option<Kubeconfig> = None;
            for path in paths.iter().filter(|p| p.exists()) {
                let next = read(path)?;
                merged = Some(match merged {
                    None => next,
                    Some(first) => first.merge(next).map_err(|source| KubeError::Kubeconfig {
                        path: path.clone(),
                        source,
                    })?,
                });
            }
            merged.ok_or_else(|| KubeError::KubeconfigEnvEmpty {
                paths: source.display().display().to_string(),
            })
        }
    }
}

/// How long a watch may stay open before it is replaced: the server is asked to end it after
/// this (`timeoutSeconds`), and a connection that stays silent for longer (half-open: the
/// server or a middlebox went away without a word) is dropped by the client's read timeout.
pub const WATCH_TIMEOUT_SECS: u32 = 290;
/// Margin of the client's read timeout over the watch timeout.
pub const READ_TIMEOUT_MARGIN_SECS: u32 = 10;
/// Overrides [`WATCH_TIMEOUT_SECS`] (5-290 s), for tests and for networks whose middleboxes
/// cut idle connections sooner.
pub const WATCH_TIMEOUT_ENV: &str = "HOLEPUNCH_WATCH_TIMEOUT_SECS";

/// The watch timeout: [`WATCH_TIMEOUT_ENV`] if set to a number in 5..=290, else
/// [`WATCH_TIMEOUT_SECS`].
pub fn watch_timeout_secs() -> u32 {
    std::env::var(WATCH_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|secs| (5..=WATCH_TIMEOUT_SECS).contains(secs))
        .unwrap_or(WATCH_TIMEOUT_SECS)
}

/// Builds a client from the kubeconfig (bearer tokens, client certificates and custom CAs
/// are all handled by kube-rs), honouring the command line's [`ClusterFlags`].
pub async fn client(config: &KubernetesConfig) -> Result<kube::Client, KubeError> {
    let flags = CLUSTER_FLAGS.get().cloned().unwrap_or_default();
    let source = kubeconfig_source(&flags, config, std::env::var_os("KUBECONFIG").as_deref());
    let context = flags.context.or_else(|| config.context.clone());
    for path in source.paths() {
        source::check_trusted(path)?;
    }
    let credentials = std::env::var_os(source::CREDENTIALS_DIRECTORY_ENV).map(PathBuf::from);
    let default = PathBuf::from(defaults::KUBECONFIG_PATH);
    if credentials.is_some() && source.paths() == std::slice::from_ref(&default) {
        // Run by the unit: the service may not read root's file, systemd copied it at start
        // (README "Packaging").
        return match source::credential_kubeconfig(credentials.as_deref()) {
            Some(copy) => client_from(&KubeconfigSource::File(copy), context).await,
            None if default.exists() => Err(KubeError::KubeconfigAfterStart { path: default }),
            None => Err(KubeError::KubeconfigMissing { path: default }),
        };
    }
    client_from(&source, context).await
}

/// Refuses a kubeconfig that users other than root (and holepunch's own) can change; for
/// `holepunch check-config`, so the unit's start and reload refuse it too. Every file of a
/// `$KUBECONFIG` list is checked.
pub fn check_kubeconfig(config: &KubernetesConfig) -> Result<(), KubeError> {
    let flags = CLUSTER_FLAGS.get().cloned().unwrap_or_default();
    let source = kubeconfig_source(&flags, config, std::env::var_os("KUBECONFIG").as_deref());
    source
        .paths()
        .iter()
        .try_for_each(|path| source::check_trusted(path))
}

/// The client configuration for `context` (`None`: the kubeconfig's current-context).
pub async fn client_config(
    source: &KubeconfigSource,
    context: Option<String>,
) -> Result<kube::Config, KubeError> {
    let kubeconfig = read_kubeconfig(source)?;
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| KubeError::Kubeconfig {
            path: source.display(),
            source: e,
        })
}

async fn client_from(
    source: &KubeconfigSource,
    context: Option<String>,
) -> Result<kube::Client, KubeError> {
    let mut client_config = client_config(source, context).await?;
    client_config.read_timeout = Some(std::time::Duration::from_secs(u64::from(
        watch_timeout_secs() + READ_TIMEOUT_MARGIN_SECS,
    )));
    kube::Client::try_from(client_config).map_err(|e| KubeError::Client {
        path: source.display(),
        source: e,
    })
}

/// Classifies a failed request: 401/403 become a message about RBAC.
pub(crate) fn request_error(
    verb: &'static str,
    resource: &'static str,
    source: kube::Error,
) -> KubeError {
    match &source {
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
            KubeError::Forbidden {
                verb,
                resource,
                code: status.code,
            }
        }
        _ => KubeError::Request {
            verb,
            resource,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_path_order_is_config_then_env_then_default() {
        let mut config = crate::config::Config::default().kubernetes;
        assert_eq!(
            kubeconfig_path(&config, None),
            PathBuf::from(defaults::KUBECONFIG_PATH)
        );
        assert_eq!(kubeconfig_path(&config, Some("/a:/b")), PathBuf::from("/a"));
        config.kubeconfig = Some("/etc/x".into());
        assert_eq!(
            kubeconfig_path(&config, Some("/a")),
            PathBuf::from("/etc/x")
        );
    }

    #[test]
    fn kubeconfig_source_is_flag_then_config_then_env_then_default() {
        let mut config = crate::config::Config::default().kubernetes;
        let none = ClusterFlags::default();
        let env = |v: &'static str| Some(OsStr::new(v));
        assert_eq!(
            kubeconfig_source(&none, &config, None),
            KubeconfigSource::Default(defaults::KUBECONFIG_PATH.into())
        );
        // Empty entries are ignored; an empty list is no list.
        assert_eq!(
            kubeconfig_source(&none, &config, env("::")),
            KubeconfigSource::Default(defaults::KUBECONFIG_PATH.into())
        );
        assert_eq!(
            kubeconfig_source(&none, &config, env("/a::/b")),
            KubeconfigSource::Env(vec!["/a".into(), "/b".into()])
        );
        config.kubeconfig = Some("/etc/x".into());
        assert_eq!(
            kubeconfig_source(&none, &config, env("/a")),
            KubeconfigSource::File("/etc/x".into())
        );
        let flag = ClusterFlags {
            kubeconfig: Some("/flag".into()),
            context: None,
        };
        assert_eq!(
            kubeconfig_source(&flag, &config, env("/a")),
            KubeconfigSource::File("/flag".into())
        );
        assert_eq!(
            KubeconfigSource::Env(vec!["/a".into(), "/b".into()]).display(),
            PathBuf::from("/a:/b")
        );
    }

    /// A kubeconfig with one cluster, user and context named `name`, current-context `name`.
    fn kubeconfig_text(name: &str, server: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n\
             users:\n- name: {name}\n  user:\n    token: t-{name}\n\
             contexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n\
             current-context: {name}\n"
        )
    }

    #[tokio::test]
    async fn env_files_merge_as_kubectl_merges_them_and_missing_ones_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home.yaml");
        let work = dir.path().join("work.yaml");
        std::fs::write(&home, kubeconfig_text("home", "https://10.0.0.1:6443")).expect("write");
        std::fs::write(&work, kubeconfig_text("work", "https://10.0.0.2:6443")).expect("write");
        let missing = dir.path().join("missing.yaml");
        let source = KubeconfigSource::Env(vec![missing.clone(), home.clone(), work.clone()]);

        let merged = read_kubeconfig(&source).expect("merged");
        // The first file to set the current context wins; both files' contexts are there.
        assert_eq!(merged.current_context.as_deref(), Some("home"));
        let contexts: Vec<&str> = merged.contexts.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(contexts, ["home", "work"]);
        let url = |config: kube::Config| config.cluster_url.to_string();
        assert_eq!(
            url(client_config(&source, None).await.expect("current context")),
            "https://10.0.0.1:6443/"
        );
        assert_eq!(
            url(client_config(&source, Some("work".into()))
                .await
                .expect("context work from the second file")),
            "https://10.0.0.2:6443/"
        );
        // The other order: the other current context.
        let reversed = KubeconfigSource::Env(vec![work.clone(), home.clone()]);
        assert_eq!(
            url(client_config(&reversed, None)
                .await
                .expect("current context")),
            "https://10.0.0.2:6443/"
        );
        // A context no file has is an error that names the files.
        let err = client_config(&source, Some("nope".into()))
            .await
            .expect_err("no such context");
        assert!(
            err.to_string()
                .contains(&source.display().display().to_string()),
            "{err}"
        );
        // Nothing listed exists: said so, with the list.
        let err =
            read_kubeconfig(&KubeconfigSource::Env(vec![missing.clone()])).expect_err("no file");
        assert!(matches!(err, KubeError::KubeconfigEnvEmpty { .. }), "{err}");
        assert!(err.to_string().contains("missing.yaml"), "{err}");
        // One named file must exist (kubectl's --kubeconfig too).
        let err = read_kubeconfig(&KubeconfigSource::File(missing)).expect_err("missing file");
        assert!(matches!(err, KubeError::KubeconfigMissing { .. }), "{err}");
    }
}
