//! Where the daemon reads its kubeconfig from when systemd passes it as a credential, and
//! whether a kubeconfig file can be trusted (nobody but root and holepunch's own user may be
//! able to change it: whoever writes it chooses which API server holepunch obeys). README
//! "Packaging" describes the unit's `LoadCredential=`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::KubeError;

/// The variable systemd sets to the service's credentials directory (`LoadCredential=`).
pub const CREDENTIALS_DIRECTORY_ENV: &str = "CREDENTIALS_DIRECTORY";
/// The kubeconfig's name in that directory: the unit loads the directory `/etc/holepunch`
/// under the id `holepunch`, and systemd names each file in it `<id>_<file name>`.
pub const KUBECONFIG_CREDENTIAL: &str = "holepunch_kubeconfig";

/// The kubeconfig systemd copied into the credentials directory, if there is one.
pub fn credential_kubeconfig(credentials_directory: Option<&Path>) -> Option<PathBuf> {
    let path = credentials_directory?.join(KUBECONFIG_CREDENTIAL);
    path.is_file().then_some(path)
}

/// Why a kubeconfig file is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untrusted {
    /// Mode o+w: every local user can write it.
    WritableByEveryone,
    /// Mode g+w with a group other than root's.
    WritableByGroup { gid: u32 },
    /// Owned by a user other than root and the one holepunch runs as.
    OwnedByAnother { uid: u32 },
}

impl Untrusted {
    /// What is wrong, and the command that fixes it.
    pub fn describe(&self, path: &Path) -> (String, String) {
        let path = path.display();
        match self {
            Untrusted::WritableByEveryone => (
                "every local user can write it (mode o+w)".to_owned(),
                format!("chmod go-w {path}"),
            ),
            Untrusted::WritableByGroup { gid } => (
                format!("the members of group {gid} can write it (mode g+w)"),
                format!("chmod go-w {path}"),
            ),
            Untrusted::OwnedByAnother { uid } => (
                format!("it is owned by user {uid}, who can change it"),
                format!("chown root:root {path} && chmod 0600 {path}"),
            ),
        }
    }
}

/// Judges a file's mode and owner: pure, so every case is tested without chown.
/// `own_uid` is the user holepunch runs as (its own file is as trusted as root's).
pub fn judge(mode: u32, uid: u32, gid: u32, own_uid: u32) -> Option<Untrusted> {
    if uid != 0 && uid != own_uid {
        Some(Untrusted::OwnedByAnother { uid })
    } else if mode & 0o002 != 0 {
        Some(Untrusted::WritableByEveryone)
    } else if mode & 0o020 != 0 && gid != 0 {
        Some(Untrusted::WritableByGroup { gid })
    } else {
        None
    }
}

/// Refuses a kubeconfig that others can write. A missing file passes (the caller reports it);
/// `stat` needs no read permission, so the unprivileged service checks root's 0600 file too.
pub fn check_trusted(path: &Path) -> Result<(), KubeError> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(KubeError::KubeconfigStat {
                path: path.into(),
                source,
            });
        }
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    match judge(metadata.mode(), metadata.uid(), metadata.gid(), own_uid) {
        None => Ok(()),
        Some(untrusted) => {
            let (why, fix) = untrusted.describe(path);
            Err(KubeError::KubeconfigUntrusted {
                path: path.into(),
                why,
                fix,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u32 = 0;
    const HOLEPUNCH: u32 = 998;
    const ALICE: u32 = 1000;

    #[test]
    fn root_or_own_files_that_only_they_can_write_are_trusted() {
        assert_eq!(judge(0o100600, ROOT, ROOT, HOLEPUNCH), None);
        assert_eq!(judge(0o100644, ROOT, ROOT, HOLEPUNCH), None);
        // Group root may write (only root is in it on Debian).
        assert_eq!(judge(0o100664, ROOT, ROOT, HOLEPUNCH), None);
        // A user running holepunch with their own kubeconfig (tests, `holepunch plan`).
        assert_eq!(judge(0o100600, ALICE, ALICE, ALICE), None);
        assert_eq!(judge(0o100640, ROOT, HOLEPUNCH, HOLEPUNCH), None);
    }

    #[test]
    fn files_others_can_write_are_refused_with_the_fix() {
        assert_eq!(
            judge(0o100666, ROOT, ROOT, HOLEPUNCH),
            Some(Untrusted::WritableByEveryone)
        );
        assert_eq!(
            judge(0o100660, ROOT, 100, HOLEPUNCH),
            Some(Untrusted::WritableByGroup { gid: 100 })
        );
        assert_eq!(
            judge(0o100600, ALICE, ALICE, HOLEPUNCH),
            Some(Untrusted::OwnedByAnother { uid: ALICE })
        );
        // Owned by another user and o+w: the owner is the fix that also needs chmod.
        let (why, fix) = judge(0o100666, ALICE, ALICE, ROOT)
            .unwrap()
            .describe(Path::new("/etc/holepunch/kubeconfig"));
        assert_eq!(why, "it is owned by user 1000, who can change it");
        assert_eq!(
            fix,
            "chown root:root /etc/holepunch/kubeconfig && chmod 0600 /etc/holepunch/kubeconfig"
        );
        let (_, fix) = Untrusted::WritableByEveryone.describe(Path::new("/k"));
        assert_eq!(fix, "chmod go-w /k");
    }

    #[test]
    fn check_trusted_reads_the_real_mode_and_passes_a_missing_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        check_trusted(&path).unwrap();
        std::fs::write(&path, "apiVersion: v1\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_trusted(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o646)).unwrap();
        let refused = check_trusted(&path).unwrap_err().to_string();
        assert!(
            refused.contains("every local user can write it"),
            "{refused}"
        );
        assert!(
            refused.contains(&format!("chmod go-w {}", path.display())),
            "{refused}"
        );
    }

    #[test]
    fn the_credential_is_used_only_when_systemd_passed_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(credential_kubeconfig(None), None);
        assert_eq!(credential_kubeconfig(Some(dir.path())), None);
        std::fs::write(dir.path().join(KUBECONFIG_CREDENTIAL), "x").unwrap();
        assert_eq!(
            credential_kubeconfig(Some(dir.path())),
            Some(dir.path().join(KUBECONFIG_CREDENTIAL))
        );
    }
}
