//! The cluster side: a client built from the configured kubeconfig, and the Services and
//! Nodes holepunch reads (live, or from a `kubectl get -o yaml` file for dry runs).

pub mod events;
pub mod report;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod watch;
pub mod writer;

use std::path::{Path, PathBuf};

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

/// The kubeconfig to use: the configured path, else `$KUBECONFIG`, else the default.
pub fn kubeconfig_path(config: &KubernetesConfig, env_kubeconfig: Option<&str>) -> PathBuf {
    if let Some(path) = &config.kubeconfig {
        return path.clone();
    }
    match env_kubeconfig.and_then(|v| v.split(':').find(|p| !p.is_empty())) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(defaults::KUBECONFIG_PATH),
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
/// are all handled by kube-rs).
pub async fn client(config: &KubernetesConfig) -> Result<kube::Client, KubeError> {
    let path = kubeconfig_path(config, std::env::var("KUBECONFIG").ok().as_deref());
    source::check_trusted(&path)?;
    let credentials = std::env::var_os(source::CREDENTIALS_DIRECTORY_ENV).map(PathBuf::from);
    if credentials.is_some() && path == Path::new(defaults::KUBECONFIG_PATH) {
        // Run by the unit: the service may not read root's file, systemd copied it at start
        // (README "Packaging").
        return match source::credential_kubeconfig(credentials.as_deref()) {
            Some(copy) => client_from(&copy, config.context.clone()).await,
            None if path.exists() => Err(KubeError::KubeconfigAfterStart { path }),
            None => Err(KubeError::KubeconfigMissing { path }),
        };
    }
    client_from(&path, config.context.clone()).await
}

/// Refuses a kubeconfig that users other than root (and holepunch's own) can change; for
/// `holepunch check-config`, so the unit's start and reload refuse it too.
pub fn check_kubeconfig(config: &KubernetesConfig) -> Result<(), KubeError> {
    source::check_trusted(&kubeconfig_path(
        config,
        std::env::var("KUBECONFIG").ok().as_deref(),
    ))
}

async fn client_from(path: &Path, context: Option<String>) -> Result<kube::Client, KubeError> {
    if !path.exists() {
        return Err(KubeError::KubeconfigMissing { path: path.into() });
    }
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
            path: path.into(),
            source,
        })?;
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    let client_config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| KubeError::Kubeconfig {
            path: path.into(),
            source,
        })?;
    let mut client_config = client_config;
    client_config.read_timeout = Some(std::time::Duration::from_secs(u64::from(
        watch_timeout_secs() + READ_TIMEOUT_MARGIN_SECS,
    )));
    kube::Client::try_from(client_config).map_err(|source| KubeError::Client {
        path: path.into(),
        source,
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
}
