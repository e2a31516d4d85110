//! The state file: every mapping holepunch owns, so nothing is leaked or forgotten across
//! restarts, crashes and upgrades (ARCHITECTURE.md, "State lifecycle"). This module owns
//! the format (serde, versions, migration, lock, atomic save); the record is `record.rs`.
//!
//! Format version 2 is TOML: `version = 2` first, then one `[[mapping]]` table per
//! [`MappingRecord`], in key order (protocol, then external port), timestamps as RFC 3339
//! strings. Each record ends with its `internal` and `target` sub-tables, whose fields are all
//! required, and the file ends with a newline: a file that does not was cut short, so a record
//! cut anywhere never reads as a complete one (not even `port = 80` cut from `port = 8096`).
//!
//! Version 3 is version 2 with one `[[pinhole]]` table per IPv6 [`PinholeRecord`] after the
//! mappings; it is written only while there is a pinhole (else the file stays version 2), so
//! version 2 files are read as they are and an older holepunch refuses a file with pinholes.
//!
//! Version 2 added what version 1 kept only in words: why the last request failed
//! ([`Failure`], version 1 had only the `last_error` text) and the earlier owners' router
//! mappings a record still has to delete ([`Replaced`]). A version 1 file is read (its
//! failures recognised from their text) and written back as version 2; an older holepunch
//! refuses a version 2 file without touching it.
//!
//! [`StateFile`] is the running daemon's handle. It holds an exclusive, non-blocking `flock`
//! on the sibling `<name>.lock` (our PID written inside, so a second instance can name us),
//! saves atomically (temp file in the same directory, fsync, rename, fsync the directory),
//! refuses a newer `version` without touching the file, and moves a file that does not parse
//! aside to `<name>.corrupt-<unix seconds>`, keeping every record that still parses on its
//! own. [`read_state`] is the lock-free, read-only view for `holepunch status`.
//!
//! [`StateError`] messages say what to do; the OS or TOML cause is their `source()`, so log
//! the whole chain.

use std::collections::btree_map::Entry;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::pinhole::PinholeRecord;
use super::record::{Failure, MappingRecord, MappingStatus, State};
use crate::model::MappingKey;

/// The state file format this build writes while it holds no IPv6 pinhole (and the one the
/// HA mirror writes).
pub const STATE_VERSION: u32 = 2;
/// The format of a file with `[[pinhole]]` tables (version 2 plus pinholes), and the newest
/// this build reads. Written only when there is a pinhole, so an older holepunch refuses
/// such a file (and leaves it as it is) instead of moving it aside as damaged and forgetting
/// the pinholes.
pub const PINHOLE_STATE_VERSION: u32 = 3;
/// The oldest format this build reads.
const OLDEST_READ_VERSION: i64 = 1;

/// Permissions of a state directory holepunch creates.
const STATE_DIR_MODE: u32 = 0o700;

/// Permissions of the state, temp and lock files (they hold PCP nonces).
const STATE_FILE_MODE: u32 = 0o600;

/// How many `<name>.corrupt-<secs>-<n>` names to try before giving up.
const MAX_ASIDE_ATTEMPTS: u32 = 1000;

/// Why the state file could not be opened, loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state path {path} does not name a file; set [state] path to a file such as /var/lib/holepunch/state.toml"
    )]
    Path { path: PathBuf },

    #[error(
        "cannot create the state directory {dir}; create it (mode 0700, writable by the user holepunch runs as) or set [state] path to another place"
    )]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot open the lock file {lock}; check that the state directory is writable by the user holepunch runs as, or set [state] path to another place"
    )]
    OpenLock {
        lock: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "the state file {path} is in use by another holepunch (PID {holder}, recorded in {lock}); stop the other holepunch (systemctl stop holepunch) or use another [state] path",
        holder = .holder.map_or_else(|| "unknown".to_owned(), |pid| pid.to_string())
    )]
    Lock {
        path: PathBuf,
        lock: PathBuf,
        /// The PID the holder wrote into the lock file, if it could be read.
        holder: Option<u32>,
    },

    #[error(
        "cannot lock {lock}; put the state file on a local file system that supports flock ([state] path)"
    )]
    TakeLock {
        lock: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot write this process's PID into the lock file {lock}; check free space and permissions in the state directory"
    )]
    WritePid {
        lock: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot read the state file {path}; check its permissions, or move it away to start with no recorded mappings"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "the state file {path} was written by a newer holepunch (format version {found}, this holepunch reads up to version {supported}); upgrade holepunch or move the file away. The file was left untouched"
    )]
    NewerVersion {
        path: PathBuf,
        found: i64,
        supported: u32,
    },

    #[error(
        "the state file {path} is not UTF-8 text (bad byte at offset {offset}); holepunch moves it aside and keeps what it can read when it next starts, or move it away yourself"
    )]
    NotUtf8 {
        path: PathBuf,
        offset: usize,
        #[source]
        source: std::str::Utf8Error,
    },

    #[error(
        "the state file {path} does not parse; holepunch moves it aside and keeps what it can read when it next starts, or fix or move it away yourself"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },

    #[error(
        "the state file {path} does not end with a newline, so it was cut short; holepunch moves it aside and keeps the complete records when it next starts (if you edited it by hand, add the final newline)"
    )]
    Truncated { path: PathBuf },

    #[error(
        "the state file {path} has format version {found}, which no holepunch writes; holepunch moves it aside and keeps what it can read when it next starts, or fix the version line yourself"
    )]
    UnknownVersion { path: PathBuf, found: i64 },

    #[error(
        "the state file {path} records router port {key} twice; holepunch moves it aside and keeps the first record when it next starts, or delete one of them yourself"
    )]
    DuplicateMapping { path: PathBuf, key: MappingKey },

    #[error(
        "cannot move the damaged state file {path} aside to {to}; check permissions in the state directory, or move the file away yourself"
    )]
    MoveAside {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot encode the state as TOML; this is a bug in holepunch, please report it")]
    Encode {
        #[source]
        source: toml::ser::Error,
    },

    #[error(
        "cannot write the temporary state file {temp}; check free space and permissions in the state directory (the old state file is unchanged)"
    )]
    WriteTemp {
        temp: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot flush the temporary state file {temp} to disk; check the disk (the old state file is unchanged)"
    )]
    Sync {
        temp: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot rename {temp} over the state file {path}; check permissions in the state directory (the old state file is unchanged)"
    )]
    Rename {
        temp: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot flush the state directory {dir} to disk, so the new state file may not survive a power loss; check the disk"
    )]
    SyncDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl State {
    /// The state as the file holds it: `version = 2`, then one `[[mapping]]` per record.
    pub fn to_toml(&self) -> Result<String, StateError> {
        let file = FileOut {
            version: if self.pinholes.is_empty() {
                STATE_VERSION
            } else {
                PINHOLE_STATE_VERSION
            },
            mapping: self.mappings.values().collect(),
            pinhole: self.pinholes.values().collect(),
        };
        toml::to_string(&file).map_err(|source| StateError::Encode { source })
    }
}

/// What a loaded state file held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub state: State,
    /// Set when the file did not parse and was moved aside; log it at error level.
    pub recovery: Option<Recovery>,
}

/// A damaged state file that was moved aside, and what could be kept from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the damaged file now is, bytes unchanged.
    pub moved_to: PathBuf,
    /// Why it was considered damaged, e.g. `line 41: invalid string`.
    pub reason: String,
    /// Records that parsed on their own; kept with status `pending`.
    pub salvaged: usize,
    /// `[[mapping]]` records that did not parse (or repeated a port) and were dropped.
    pub lost: usize,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "STATE FILE DAMAGED: the state file did not parse ({}). It was moved aside to {} \
             with its bytes unchanged, and a new state file was written with the {} mapping \
             record(s) that could still be read, marked pending so that each is checked with \
             the router again. ",
            self.reason,
            self.moved_to.display(),
            self.salvaged,
        )?;
        if self.lost == 0 {
            f.write_str("No damaged record was found, but the damage may have hidden some. ")?;
        } else {
            write!(
                f,
                "{} damaged record(s) were dropped: holepunch no longer tracks those router \
                 mappings, which stay on the router until their lease ends (look for \
                 holepunch-tagged mappings there; permanent ones must be deleted by hand). ",
                self.lost,
            )?;
        }
        write!(
            f,
            "Compare it with the new state file, and delete {} once done.",
            self.moved_to.display()
        )
    }
}

/// The state file of a running daemon: open, locked against a second instance, saved
/// atomically. Dropping it releases the lock.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    dir: PathBuf,
    temp: PathBuf,
    lock_path: PathBuf,
    /// Holds the `flock`; closing it releases the lock.
    _lock: File,
}

impl StateFile {
    /// Creates the directory if missing (mode 0700), takes the lock without waiting, and loads
    /// the state: empty when the file is missing; a file that does not parse is moved aside,
    /// its readable records kept as `pending` and written back, and reported in
    /// [`Loaded::recovery`]; a newer `version` is an error and the file is left untouched.
    pub fn open(path: &Path) -> Result<(StateFile, Loaded), StateError> {
        let name = path.file_name().ok_or_else(|| StateError::Path {
            path: path.to_owned(),
        })?;
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(&dir)
            .map_err(|source| StateError::CreateDir {
                dir: dir.clone(),
                source,
            })?;
        let path = dir.join(name);
        let lock_path = dir.join(with_affixes("", name, ".lock"));
        let lock = take_lock(&path, &lock_path)?;
        let temp_prefix = with_affixes(".", name, ".tmp-");
        remove_stale_temps(&dir, &temp_prefix);
        let mut temp = temp_prefix;
        temp.push(std::process::id().to_string());
        let file = StateFile {
            temp: dir.join(temp),
            path,
            dir,
            lock_path,
            _lock: lock,
        };
        let loaded = file.load()?;
        Ok((file, loaded))
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file's path (`<name>.lock` next to the state file).
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }

    /// Replaces the file with `state`, atomically: on error the old file is unchanged (or,
    /// for [`StateError::SyncDir`], already replaced but maybe not yet on disk) and no temp
    /// file is left behind.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let text = state.to_toml()?;
        let result = self.replace_with(text.as_bytes());
        if result.is_err() {
            // Already gone after a successful rename; nothing more to do if removal fails.
            let _ = fs::remove_file(&self.temp);
        }
        result
    }

    fn replace_with(&self, bytes: &[u8]) -> Result<(), StateError> {
        let write_temp = |source| StateError::WriteTemp {
            temp: self.temp.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(STATE_FILE_MODE)
            .open(&self.temp)
            .map_err(write_temp)?;
        file.write_all(bytes).map_err(write_temp)?;
        file.sync_all().map_err(|source| StateError::Sync {
            temp: self.temp.clone(),
            source,
        })?;
        drop(file);
        crate::crashpoint::reached(crate::crashpoint::STATE_TEMP_WRITTEN);
        fs::rename(&self.temp, &self.path).map_err(|source| StateError::Rename {
            temp: self.temp.clone(),
            path: self.path.clone(),
            source,
        })?;
        crate::crashpoint::reached(crate::crashpoint::STATE_RENAMED);
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| StateError::SyncDir {
                dir: self.dir.clone(),
                source,
            })
    }

    fn load(&self) -> Result<Loaded, StateError> {
        let Some(bytes) = read_bytes(&self.path)? else {
            return Ok(Loaded {
                state: State::default(),
                recovery: None,
            });
        };
        match decode(&bytes) {
            Ok(state) => Ok(Loaded {
                state,
                recovery: None,
            }),
            Err(Unreadable::Newer(found)) => Err(newer_version(&self.path, found)),
            Err(damage) => self.recover(&bytes, &damage),
        }
    }

    /// Keeps the damaged file under another name, then writes what could be salvaged in its
    /// place. The file stays where it was until the salvaged state is written (a hard link
    /// keeps the old bytes), so a crash in between loses nothing.
    fn recover(&self, bytes: &[u8], damage: &Unreadable) -> Result<Loaded, StateError> {
        let (state, lost) = salvage(&String::from_utf8_lossy(bytes));
        let aside = self.move_aside()?;
        if let Err(err) = self.save(&state) {
            aside.undo(&self.path);
            return Err(err);
        }
        let recovery = Recovery {
            moved_to: aside.path().to_owned(),
            reason: damage.reason(),
            salvaged: state.mappings.len(),
            lost,
        };
        Ok(Loaded {
            state,
            recovery: Some(recovery),
        })
    }

    fn move_aside(&self) -> Result<Aside, StateError> {
        let name = self.path.file_name().unwrap_or_default();
        let stamp = format!(".corrupt-{}", Timestamp::now().as_second());
        let mut attempt = 0;
        loop {
            let suffix = match attempt {
                0 => stamp.clone(),
                n => format!("{stamp}-{n}"),
            };
            let to = self.dir.join(with_affixes("", name, &suffix));
            match fs::hard_link(&self.path, &to) {
                Ok(()) => return Ok(Aside::Linked(to)),
                Err(source)
                    if source.kind() == io::ErrorKind::AlreadyExists
                        && attempt < MAX_ASIDE_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(source) if source.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(StateError::MoveAside {
                        path: self.path.clone(),
                        to,
                        source,
                    });
                }
                // No hard links on this file system: rename it (`to` does not exist).
                Err(_) => {
                    return match fs::rename(&self.path, &to) {
                        Ok(()) => Ok(Aside::Renamed(to)),
                        Err(source) => Err(StateError::MoveAside {
                            path: self.path.clone(),
                            to,
                            source,
                        }),
                    };
                }
            }
        }
    }
}

/// Reads the state without locking or changing anything (for `holepunch status` while the
/// daemon runs). A missing file is an empty state; a damaged one is an error.
pub fn read_state(path: &Path) -> Result<State, StateError> {
    match read_bytes(path)? {
        None => Ok(State::default()),
        Some(bytes) => decode(&bytes).map_err(|damage| damage.into_error(path)),
    }
}

/// The damaged file's new name, and how it got there.
enum Aside {
    /// A second name for the same file; the original name is replaced by the salvaged state.
    Linked(PathBuf),
    /// Renamed (file systems without hard links).
    Renamed(PathBuf),
}

impl Aside {
    fn path(&self) -> &Path {
        match self {
            Aside::Linked(to) | Aside::Renamed(to) => to,
        }
    }

    /// Puts things back as they were, as far as possible, after the salvaged state could not be
    /// written.
    fn undo(&self, path: &Path) {
        let undone = match self {
            Aside::Linked(to) => fs::remove_file(to),
            Aside::Renamed(to) => fs::rename(to, path),
        };
        if let Err(err) = undone {
            tracing::warn!(
                aside = %self.path().display(),
                error = %err,
                "cannot undo moving the damaged state file aside"
            );
        }
    }
}

/// The file as written.
#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mapping: Vec<&'a MappingRecord>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pinhole: Vec<&'a PinholeRecord>,
}

/// The file as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    version: i64,
    #[serde(default)]
    mapping: Vec<MappingRecord>,
    #[serde(default)]
    pinhole: Vec<PinholeRecord>,
}

/// One `[[mapping]]` block on its own, when salvaging a damaged file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockIn {
    mapping: Vec<MappingRecord>,
}

/// One `[[pinhole]]` block on its own, when salvaging a damaged file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinholeBlockIn {
    pinhole: Vec<PinholeRecord>,
}

/// Why a state file's bytes are not a state.
enum Unreadable {
    /// Not damaged, but this build must not read it (nor replace it).
    Newer(i64),
    NotUtf8(std::str::Utf8Error),
    Syntax(Box<toml::de::Error>, Option<usize>),
    Truncated,
    UnknownVersion(i64),
    DuplicateMapping(MappingKey),
}

impl Unreadable {
    fn into_error(self, path: &Path) -> StateError {
        let path = path.to_owned();
        match self {
            Unreadable::Newer(found) => newer_version(&path, found),
            Unreadable::NotUtf8(source) => StateError::NotUtf8 {
                path,
                offset: source.valid_up_to(),
                source,
            },
            Unreadable::Syntax(source, _) => StateError::Parse { path, source },
            Unreadable::Truncated => StateError::Truncated { path },
            Unreadable::UnknownVersion(found) => StateError::UnknownVersion { path, found },
            Unreadable::DuplicateMapping(key) => StateError::DuplicateMapping { path, key },
        }
    }

    /// One line for [`Recovery::reason`].
    fn reason(&self) -> String {
        match self {
            Unreadable::Newer(found) => format!("format version {found} is newer than this build"),
            Unreadable::NotUtf8(err) => {
                format!("not UTF-8 text, bad byte at offset {}", err.valid_up_to())
            }
            Unreadable::Syntax(err, line) => {
                let message = err
                    .message()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                match line {
                    Some(line) => format!("line {line}: {message}"),
                    None => message,
                }
            }
            Unreadable::Truncated => "no newline at the end: the file was cut short".to_owned(),
            Unreadable::UnknownVersion(found) => {
                format!("format version {found}, which no holepunch writes")
            }
            Unreadable::DuplicateMapping(key) => format!("router port {key} recorded twice"),
        }
    }
}

fn newer_version(path: &Path, found: i64) -> StateError {
    StateError::NewerVersion {
        path: path.to_owned(),
        found,
        supported: PINHOLE_STATE_VERSION,
    }
}

/// The file's bytes, or `None` when there is no file.
fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn decode(bytes: &[u8]) -> Result<State, Unreadable> {
    // A newer file is refused even when the rest of it means nothing to this build.
    if let Some(found) = header_version(&String::from_utf8_lossy(bytes))
        && found > i64::from(PINHOLE_STATE_VERSION)
    {
        return Err(Unreadable::Newer(found));
    }
    let text = std::str::from_utf8(bytes).map_err(Unreadable::NotUtf8)?;
    let file: FileIn = toml::from_str(text).map_err(|err| {
        let line = err
            .span()
            .and_then(|span| text.get(..span.start))
            .map(|before| before.matches('\n').count() + 1);
        Unreadable::Syntax(Box::new(err), line)
    })?;
    if !text.ends_with('\n') {
        return Err(Unreadable::Truncated);
    }
    if file.version > i64::from(PINHOLE_STATE_VERSION) {
        return Err(Unreadable::Newer(file.version));
    }
    if file.version < OLDEST_READ_VERSION {
        return Err(Unreadable::UnknownVersion(file.version));
    }
    let mut state = State::default();
    for mut record in file.mapping {
        if file.version == 1 {
            record.failure = failure_in_words(&record);
        }
        match state.mappings.entry(record.key()) {
            Entry::Vacant(slot) => {
                slot.insert(record);
            }
            Entry::Occupied(slot) => return Err(Unreadable::DuplicateMapping(*slot.key())),
        }
    }
    for record in file.pinhole {
        match state.pinholes.entry(record.key()) {
            Entry::Vacant(slot) => {
                slot.insert(record);
            }
            Entry::Occupied(slot) => return Err(Unreadable::DuplicateMapping(*slot.key())),
        }
    }
    Ok(state)
}

/// How version 1 files worded a router that did not answer (frozen: the format of files on
/// disk, whatever the messages say today).
pub const V1_UNREACHABLE_PREFIX: &str = "the router did not answer";
/// How version 1 files worded a request held back because the state could not be saved.
pub const V1_HELD_BACK_PREFIX: &str = "state file could not be saved";
/// How version 1 files worded a failed unmap.
pub const V1_UNMAP_FAILED_PREFIX: &str = "could not remove the mapping";

/// Why a record's last request failed, read from its `last_error` text: all a version 1
/// file says (and all a salvaged record may have kept).
fn failure_in_words(record: &MappingRecord) -> Option<Failure> {
    let text = record.last_error.as_deref()?;
    Some(if text.starts_with(V1_UNREACHABLE_PREFIX) {
        Failure::RouterSilent
    } else if text.starts_with(V1_HELD_BACK_PREFIX) {
        Failure::HeldBack
    } else if text.starts_with(V1_UNMAP_FAILED_PREFIX) {
        Failure::UnmapFailed
    } else {
        Failure::Refused
    })
}

/// `version` from the top-level keys before the first table header, if they parse.
fn header_version(text: &str) -> Option<i64> {
    let mut end = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            break;
        }
        end += line.len();
    }
    let header: toml::Table = toml::from_str(&text[..end]).ok()?;
    header.get("version")?.as_integer()
}

/// Every `[[mapping]]` block of a damaged file that parses on its own, as `pending`, and how
/// many blocks did not (or repeated a key already kept).
fn salvage(text: &str) -> (State, usize) {
    let mut state = State::default();
    let mut lost = 0;
    for block in mapping_blocks(text) {
        if !is_mapping_header(block.lines().next().unwrap_or_default()) {
            // A `[[pinhole]]` block.
            let record = toml::from_str::<PinholeBlockIn>(block)
                .ok()
                .filter(|_| !block.contains(char::REPLACEMENT_CHARACTER))
                .and_then(|block| <[PinholeRecord; 1]>::try_from(block.pinhole).ok());
            match record {
                Some([mut record]) if !state.pinholes.contains_key(&record.key()) => {
                    record.status = MappingStatus::Pending;
                    state.pinholes.insert(record.key(), record);
                }
                _ => lost += 1,
            }
            continue;
        }
        let record = toml::from_str::<BlockIn>(block)
            .ok()
            .filter(|_| !block.contains(char::REPLACEMENT_CHARACTER))
            .and_then(|block| <[MappingRecord; 1]>::try_from(block.mapping).ok());
        let Some([mut record]) = record else {
            lost += 1;
            continue;
        };
        record.status = MappingStatus::Pending;
        if record.failure.is_none() {
            record.failure = failure_in_words(&record);
        }
        match state.mappings.entry(record.key()) {
            Entry::Vacant(slot) => {
                slot.insert(record);
            }
            Entry::Occupied(_) => lost += 1,
        }
    }
    (state, lost)
}

/// The text from each `[[mapping]]` header to the next one. A text that does not end in a
/// newline was cut inside its last line, which is left out.
fn mapping_blocks(text: &str) -> Vec<&str> {
    let text = match text.rfind('\n') {
        Some(last) => &text[..=last],
        None => "",
    };
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if is_mapping_header(line) || is_pinhole_header(line) {
            starts.push(offset);
        }
        offset += line.len();
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, &start)| &text[start..starts.get(i + 1).copied().unwrap_or(text.len())])
        .collect()
}

fn is_pinhole_header(line: &str) -> bool {
    let code = line.split('#').next().unwrap_or_default();
    code.split_whitespace().collect::<String>() == "[[pinhole]]"
}

fn is_mapping_header(line: &str) -> bool {
    let code = line.split('#').next().unwrap_or_default();
    code.split_whitespace().collect::<String>() == "[[mapping]]"
}

/// `<prefix><name><suffix>`, for the lock, temp and aside files next to the state file.
fn with_affixes(prefix: &str, name: &OsStr, suffix: &str) -> OsString {
    let mut out = OsString::from(prefix);
    out.push(name);
    out.push(suffix);
    out
}

/// Takes the lock without waiting and writes our PID into the lock file.
fn take_lock(path: &Path, lock_path: &Path) -> Result<File, StateError> {
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(STATE_FILE_MODE)
        .open(lock_path)
        .map_err(|source| StateError::OpenLock {
            lock: lock_path.to_owned(),
            source,
        })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(StateError::Lock {
                path: path.to_owned(),
                lock: lock_path.to_owned(),
                holder: fs::read_to_string(lock_path)
                    .ok()
                    .and_then(|text| text.trim().parse().ok()),
            });
        }
        Err(TryLockError::Error(source)) => {
            return Err(StateError::TakeLock {
                lock: lock_path.to_owned(),
                source,
            });
        }
    }
    let pid = format!("{}\n", std::process::id());
    lock.set_len(0)
        .and_then(|()| lock.write_all_at(pid.as_bytes(), 0))
        .map_err(|source| StateError::WritePid {
            lock: lock_path.to_owned(),
            source,
        })?;
    Ok(lock)
}

/// Removes temp files a crashed holepunch left behind. Only called with the lock held.
fn remove_stale_temps(dir: &Path, prefix: &OsStr) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = prefix.as_encoded_bytes();
    for entry in entries.flatten() {
        if entry.file_name().as_encoded_bytes().starts_with(prefix) {
            let stale = entry.path();
            match fs::remove_file(&stale) {
                Ok(()) => {
                    tracing::info!(path = %stale.display(), "removed a stale temporary state file")
                }
                Err(err) => {
                    tracing::warn!(path = %stale.display(), error = %err, "cannot remove a stale temporary state file")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::model::{Backend, Endpoint, Owner, Protocol, TargetSource};
    use crate::state::{LeaseTimes, Replaced};

    fn at(text: &str) -> Timestamp {
        text.parse().expect("test timestamp")
    }

    /// A record with every optional field set.
    fn full_record(external_port: u16) -> MappingRecord {
        MappingRecord {
            owner: Owner::new("media", "jellyfin"),
            service_port: 8096,
            protocol: Protocol::Tcp,
            external_port,
            internal: Endpoint::new(Ipv4Addr::new(192, 168, 77, 10), external_port),
            target: Endpoint::new(Ipv4Addr::new(192, 168, 77, 100), 8096),
            target_source: TargetSource::LoadBalancer,
            backend: Backend::Pcp,
            router: "192.168.77.1".to_owned(),
            nonce: Some("00112233445566778899aabb".to_owned()),
            times: LeaseTimes {
                lifetime_secs: 3600,
                granted_at: Some(at("2025-01-02T03:04:05Z")),
                renew_at: Some(at("2025-01-02T03:34:05Z")),
                expires_at: Some(at("2025-01-02T04:04:05Z")),
            },
            epoch: Some(1234),
            external_address: Some(Ipv4Addr::new(203, 0, 113, 7)),
            status: MappingStatus::Active,
            retry_at: Some(at("2025-01-02T03:05:05.5Z")),
            failures: 2,
            replaces: vec![Replaced {
                owner: Owner::new("media", "old-jellyfin"),
                address: Ipv4Addr::new(192, 168, 77, 21),
                port: 31096,
            }],
            failure: Some(Failure::Refused),
            last_error: Some("router said \"no\"\nthen hung up".to_owned()),
        }
    }

    /// A record with every optional field unset.
    fn minimal_record(external_port: u16) -> MappingRecord {
        MappingRecord {
            owner: Owner::new("games", "minecraft"),
            service_port: 25565,
            protocol: Protocol::Udp,
            external_port,
            internal: Endpoint::new(Ipv4Addr::new(192, 168, 77, 10), external_port),
            target: Endpoint::new(Ipv4Addr::new(192, 168, 77, 21), 31000),
            target_source: TargetSource::NodePort,
            backend: Backend::Upnp,
            router: String::new(),
            nonce: None,
            times: LeaseTimes::default(),
            epoch: None,
            external_address: None,
            status: MappingStatus::Pending,
            retry_at: None,
            failures: 0,
            replaces: Vec::new(),
            failure: None,
            last_error: None,
        }
    }

    fn pinhole(external_port: u16) -> PinholeRecord {
        PinholeRecord {
            owner: Owner::new("media", "jellyfin"),
            service_port: 8096,
            protocol: Protocol::Tcp,
            external_port,
            address: "2001:db8:77::10".parse().expect("ip"),
            port: external_port,
            target_address: "2001:db8:77::20".parse().expect("ip"),
            target_port: 31096,
            target_source: TargetSource::NodePort,
            backend: Backend::Pcp,
            router: "2001:db8:77::1".parse().expect("ip"),
            nonce: Some("00112233445566778899aabb".to_owned()),
            old_unique_id: None,
            epoch: Some(1234),
            times: LeaseTimes {
                lifetime_secs: 3600,
                granted_at: Some(at("2025-01-02T03:04:05Z")),
                renew_at: Some(at("2025-01-02T03:34:05Z")),
                expires_at: Some(at("2025-01-02T04:04:05Z")),
            },
            status: MappingStatus::Active,
            retry_at: None,
            failures: 0,
            failure: None,
            last_error: None,
        }
    }

    /// A file with pinholes is version 3 and reads back; without them the file stays
    /// version 2, byte for byte what this build wrote before pinholes existed.
    #[test]
    fn pinholes_make_version_3_and_a_file_without_them_stays_version_2() {
        let plain = state_of([full_record(8096), minimal_record(25565)]);
        let text = plain.to_toml().expect("encode");
        assert!(text.starts_with("version = 2\n"), "{text}");
        assert!(!text.contains("pinhole"), "{text}");
        assert!(matches!(decode(text.as_bytes()), Ok(read) if read == plain));

        let mut with = plain.clone();
        let record = pinhole(8096);
        with.pinholes.insert(record.key(), record);
        let text = with.to_toml().expect("encode");
        assert!(text.starts_with("version = 3\n"), "{text}");
        assert!(text.contains("[[pinhole]]"), "{text}");
        assert!(!text.contains("unique_id"), "{text}");
        assert!(matches!(decode(text.as_bytes()), Ok(read) if read == with));

        // A damaged file keeps its readable pinholes, as pending.
        let damaged = text.replacen("version = 3", "version = 3\n[[broken", 1);
        let (salvaged, lost) = salvage(&damaged);
        assert_eq!(lost, 0);
        assert_eq!(salvaged.mappings.len(), 2);
        assert_eq!(
            salvaged
                .pinholes
                .values()
                .map(|p| p.status)
                .collect::<Vec<_>>(),
            [MappingStatus::Pending]
        );
    }

    /// Files written by the build before the lease fields were shared between mappings and
    /// pinholes (tests/fixtures/state-v2.toml: every optional mapping field set and none;
    /// state-v3.toml: the same with a full and a bare pinhole) still load, and are written
    /// back byte for byte, but for the pinhole's UniqueID: read, no longer written (see
    /// `PinholeRecord`), which the previous build reads as well.
    #[test]
    fn files_of_the_previous_build_load_and_round_trip_byte_for_byte() {
        for (name, text, version, pinholes) in [
            (
                "state-v2.toml",
                include_str!("../../tests/fixtures/state-v2.toml"),
                "version = 2\n",
                0,
            ),
            (
                "state-v3.toml",
                include_str!("../../tests/fixtures/state-v3.toml"),
                "version = 3\n",
                2,
            ),
        ] {
            let state = match decode(text.as_bytes()) {
                Ok(state) => state,
                Err(damage) => panic!("{name} does not load: {}", damage.reason()),
            };
            assert!(text.starts_with(version), "{name}");
            assert_eq!(state.mappings.len(), 2, "{name}");
            assert_eq!(state.pinholes.len(), pinholes, "{name}");
            let written = state.to_toml().expect("encode");
            assert_eq!(written, text.replace("unique_id = 7\n", ""), "{name}");
            let again = decode(written.as_bytes())
                .ok()
                .and_then(|s| s.to_toml().ok());
            assert_eq!(again.as_ref(), Some(&written), "{name}");
        }
        // The fixtures hold every lease field set and unset, on mappings and on pinholes.
        let v3 = include_str!("../../tests/fixtures/state-v3.toml");
        let state = decode(v3.as_bytes()).ok().unwrap_or_default();
        let full = state
            .pinholes
            .values()
            .find(|p| p.times.granted_at.is_some());
        assert_eq!(
            full.map(|p| (p.times.lifetime_secs, p.epoch)),
            Some((3600, Some(1234)))
        );
        let bare = state.pinholes.values().find(|p| p.failure.is_some());
        assert_eq!(
            bare.map(|p| (p.status, p.failures, p.times.renew_at)),
            Some((MappingStatus::Failed, 3, None))
        );
        // A field no build wrote is still refused, in a mapping and in a pinhole.
        let unknown = v3.replacen("lifetime_secs = 0", "lifetime_secs = 0\nlifetime_ms = 0", 1);
        assert!(decode(unknown.as_bytes()).is_err());
        let unknown = v3.replacen("failures = 3", "failures = 3\nsomething_new = 1", 1);
        assert!(decode(unknown.as_bytes()).is_err());
    }

    fn state_of(records: impl IntoIterator<Item = MappingRecord>) -> State {
        State {
            mappings: records.into_iter().map(|r| (r.key(), r)).collect(),
            ..State::default()
        }
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read test dir")
            .map(|entry| {
                let entry = entry.expect("test dir entry");
                entry.file_name().to_string_lossy().into_owned()
            })
            .collect();
        names.sort();
        names
    }

    fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = names_in(dir)
            .into_iter()
            .filter(|name| name.starts_with("state.toml.corrupt-"))
            .map(|name| dir.join(name))
            .collect();
        found.sort();
        found
    }

    fn open(path: &Path) -> (StateFile, Loaded) {
        StateFile::open(path).expect("open state file")
    }

    #[test]
    fn due_now_retries_failed_and_renews_active_records_at_once() {
        let now = at("2025-01-02T03:10:00Z");
        let mut failed = full_record(4000);
        failed.status = MappingStatus::Failed;
        let mut state = state_of([full_record(30080), minimal_record(5000), failed]);
        assert_eq!(
            state.due_now(now, |_| true),
            2,
            "the pending one is due anyway"
        );
        let record = |port| {
            state
                .mappings
                .values()
                .find(|r| r.external_port == port)
                .cloned()
        };
        assert_eq!(record(4000).and_then(|r| r.retry_at), None);
        assert_eq!(record(30080).and_then(|r| r.times.renew_at), Some(now));
    }

    #[test]
    fn unconfirm_marks_only_selected_active_records() {
        let mut failed = full_record(4000);
        failed.status = MappingStatus::Failed;
        let mut state = state_of([
            full_record(30080),
            full_record(30081),
            minimal_record(5000),
            failed,
        ]);
        let marked = state.unconfirm(|r| r.external_port != 30081);
        assert_eq!(marked, 1, "only the selected active record");
        let status = |port| {
            state
                .mappings
                .values()
                .find(|r| r.external_port == port)
                .map(|r| r.status)
        };
        assert_eq!(status(30080), Some(MappingStatus::Pending));
        assert_eq!(status(30081), Some(MappingStatus::Active));
        assert_eq!(
            status(5000),
            Some(MappingStatus::Pending),
            "was pending already"
        );
        assert_eq!(
            status(4000),
            Some(MappingStatus::Failed),
            "keeps its backoff"
        );
    }

    #[test]
    fn save_then_open_keeps_every_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        let state = state_of([full_record(30080), minimal_record(5000)]);
        {
            let (file, loaded) = open(&path);
            assert_eq!(loaded.state, State::default());
            assert_eq!(loaded.recovery, None);
            file.save(&state).expect("save");
        }
        let (_file, loaded) = open(&path);
        assert_eq!(loaded.state, state);
        assert_eq!(loaded.recovery, None);
        assert_eq!(read_state(&path).expect("read_state"), state);
    }

    #[test]
    fn file_format_is_version_first_then_records_in_key_order() {
        // Inserted out of order: the file lists tcp before udp, lower ports first.
        let state = state_of([minimal_record(5000), full_record(30081), full_record(30080)]);
        let text = state.to_toml().expect("encode");
        assert!(text.starts_with("version = 2\n"), "{text}");
        assert!(text.ends_with('\n'));
        let ports: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("external_port = "))
            .collect();
        assert_eq!(
            ports,
            [
                "external_port = 30080",
                "external_port = 30081",
                "external_port = 5000"
            ]
        );
        let expected_minimal = r#"[[mapping]]
owner = "games/minecraft"
service_port = 25565
protocol = "udp"
external_port = 5000
target_source = "node-port"
backend = "upnp"
router = ""
lifetime_secs = 0
status = "pending"
failures = 0

[mapping.internal]
address = "192.168.77.10"
port = 5000

[mapping.target]
address = "192.168.77.21"
port = 31000
"#;
        assert!(text.ends_with(expected_minimal), "{text}");
        assert!(
            text.contains("granted_at = \"2025-01-02T03:04:05Z\"\n"),
            "{text}"
        );
        assert_eq!(State::default().to_toml().expect("encode"), "version = 2\n");
    }

    #[test]
    fn second_open_fails_at_once_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        let (_held, _) = open(&path);
        let started = Instant::now();
        let err = StateFile::open(&path).expect_err("second open must fail");
        assert!(started.elapsed() < Duration::from_secs(1));
        let pid = std::process::id();
        assert!(
            matches!(&err, StateError::Lock { holder: Some(holder), .. } if *holder == pid),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&format!("PID {pid}")), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains(
                "stop the other holepunch (systemctl stop holepunch) or use another [state] path"
            ),
            "{message}"
        );
    }

    #[test]
    fn lock_is_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        let (held, _) = open(&path);
        assert!(StateFile::open(&path).is_err());
        drop(held);
        let (reopened, _) = open(&path);
        let pid = fs::read_to_string(reopened.lock_path()).expect("read lock file");
        assert_eq!(pid.trim(), std::process::id().to_string());
    }

    #[test]
    fn newer_version_is_refused_and_left_untouched() {
        for text in [
            "version = 4\n\n[[mapping]]\nsomething_new = true\n",
            // Newer and also unreadable to this build: still refused, not moved aside.
            "version = 7\n[[mapping\x00garbage",
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("state.toml");
            fs::write(&path, text).expect("write");
            let err = StateFile::open(&path).expect_err("newer version must be refused");
            assert!(
                matches!(
                    err,
                    StateError::NewerVersion {
                        supported: PINHOLE_STATE_VERSION,
                        ..
                    }
                ),
                "{err:?}"
            );
            let message = err.to_string();
            assert!(message.contains("newer holepunch"), "{message}");
            assert!(message.contains("upgrade holepunch or move the file away"));
            assert_eq!(fs::read(&path).expect("read back"), text.as_bytes());
            assert!(corrupt_files(dir.path()).is_empty());
            assert!(matches!(
                read_state(&path),
                Err(StateError::NewerVersion { .. })
            ));
        }
    }

    fn three_records() -> ([MappingRecord; 3], String) {
        let records = [full_record(30080), full_record(30081), full_record(30082)];
        let text = state_of(records.clone()).to_toml().expect("encode");
        (records, text)
    }

    fn first_two_pending(records: &[MappingRecord; 3]) -> State {
        let mut state = state_of(records[..2].iter().cloned());
        for record in state.mappings.values_mut() {
            record.status = MappingStatus::Pending;
        }
        state
    }

    #[test]
    fn a_record_ends_with_its_target_even_while_it_replaces_another() {
        let text = state_of([full_record(30080)]).to_toml().expect("encode");
        let tables: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
        assert_eq!(
            tables,
            [
                "[[mapping]]",
                "[[mapping.replaces]]",
                "[mapping.internal]",
                "[mapping.target]"
            ],
            "{text}"
        );
        assert!(text.contains("failure = \"refused\"\n"), "{text}");
        assert_eq!(
            decode(text.as_bytes()).ok(),
            Some(state_of([full_record(30080)]))
        );
    }

    /// A version 1 file (written by holepunch before `failure` and `replaces`) is read, its
    /// failures recognised from their words, and written back as version 2.
    #[test]
    fn a_version_1_file_is_read_and_its_failures_recognised_from_their_text() {
        let v1 = |port: u16, last_error: &str| {
            format!(
                "[[mapping]]\nowner = \"games/minecraft\"\nservice_port = 25565\nprotocol = \"tcp\"\n\
                 external_port = {port}\ntarget_source = \"node-port\"\nbackend = \"pcp\"\n\
                 status = \"failed\"\nfailures = 1\nlast_error = {last_error:?}\n\n\
                 [mapping.internal]\naddress = \"192.168.77.10\"\nport = {port}\n\n\
                 [mapping.target]\naddress = \"192.168.77.21\"\nport = 31000\n\n"
            )
        };
        let text = format!(
            "version = 1\n\n{}{}{}{}",
            v1(1, "the router did not answer: no answer after 9 tries"),
            v1(
                2,
                "state file could not be saved: disk full; not asking the router"
            ),
            v1(3, "could not remove the mapping: NOT_AUTHORIZED"),
            v1(4, "the router refused: CANNOT_PROVIDE_EXTERNAL")
        );
        let state = decode(text.as_bytes()).unwrap_or_else(|_| panic!("{text}"));
        let failures: Vec<Option<Failure>> = state.mappings.values().map(|r| r.failure).collect();
        assert_eq!(
            failures,
            [
                Some(Failure::RouterSilent),
                Some(Failure::HeldBack),
                Some(Failure::UnmapFailed),
                Some(Failure::Refused)
            ]
        );
        let written = state.to_toml().expect("encode");
        assert!(written.starts_with("version = 2\n"), "{written}");
        assert_eq!(decode(written.as_bytes()).ok(), Some(state));
    }

    #[test]
    fn a_cut_anywhere_in_the_last_record_is_damage_and_spares_the_others() {
        let (records, original) = three_records();
        let expected = first_two_pending(&records);
        let third = original.rfind("[[mapping]]").expect("third record");
        let header_end = third + "[[mapping]]\n".len();
        for cut in third + 1..original.len() {
            let damaged = &original[..cut];
            assert!(
                decode(damaged.as_bytes()).is_err(),
                "cut at {cut} reads as a complete file"
            );
            let (salvaged, lost) = salvage(damaged);
            assert_eq!(salvaged, expected, "cut at {cut}");
            // Cut inside the header line: the third record is not even seen.
            let expected_lost = usize::from(cut >= header_end);
            assert_eq!(lost, expected_lost, "cut at {cut}");
        }
    }

    #[test]
    fn truncated_file_is_moved_aside_and_the_complete_records_are_kept() {
        let (records, original) = three_records();
        let third = original.rfind("[[mapping]]").expect("third record");
        let damaged = &original[..third + (original.len() - third) / 2];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        fs::write(&path, damaged).expect("write");

        let (_file, loaded) = open(&path);
        let recovery = loaded.recovery.expect("a cut file is recovered");
        let expected = first_two_pending(&records);
        assert_eq!(loaded.state, expected);
        assert_eq!((recovery.salvaged, recovery.lost), (2, 1));
        assert_eq!(
            corrupt_files(dir.path()),
            std::slice::from_ref(&recovery.moved_to)
        );
        assert_eq!(
            fs::read(&recovery.moved_to).expect("moved aside"),
            damaged.as_bytes()
        );
        // The salvaged state replaced the damaged file.
        assert_eq!(read_state(&path).expect("read_state"), expected);
    }

    #[test]
    fn recovery_message_is_loud_and_says_where_the_file_went() {
        let original = state_of([full_record(30080), full_record(30081)])
            .to_toml()
            .expect("encode");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        fs::write(&path, &original[..original.len() - 20]).expect("write");
        let (_file, loaded) = open(&path);
        let recovery = loaded.recovery.expect("recovered");
        let moved = recovery
            .moved_to
            .file_name()
            .expect("name")
            .to_string_lossy();
        assert!(moved.starts_with("state.toml.corrupt-"), "{moved}");
        let message = recovery.to_string();
        assert!(message.starts_with("STATE FILE DAMAGED: "), "{message}");
        assert!(message.contains(&recovery.moved_to.display().to_string()));
        assert!(message.contains("1 mapping record(s)"), "{message}");
        assert!(
            message.contains("1 damaged record(s) were dropped"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn garbage_is_moved_aside_and_nothing_is_salvaged() {
        let garbage: &[u8] = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe not a state file [[[";
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        fs::write(&path, garbage).expect("write");
        let (_file, loaded) = open(&path);
        let recovery = loaded.recovery.expect("garbage is recovered");
        assert_eq!(loaded.state, State::default());
        assert_eq!((recovery.salvaged, recovery.lost), (0, 0));
        assert!(recovery.reason.contains("UTF-8"), "{}", recovery.reason);
        assert_eq!(fs::read(&recovery.moved_to).expect("moved aside"), garbage);
        assert_eq!(
            fs::read_to_string(&path).expect("new file"),
            "version = 2\n"
        );
    }

    #[test]
    fn bad_field_moves_the_file_aside_and_keeps_the_other_records() {
        let original = state_of([full_record(30080), full_record(30081), full_record(30082)])
            .to_toml()
            .expect("encode");
        let damaged = original.replacen("external_port = 30081", "external_port = \"x\"", 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        fs::write(&path, &damaged).expect("write");
        let (_file, loaded) = open(&path);
        let recovery = loaded.recovery.expect("recovered");
        assert_eq!((recovery.salvaged, recovery.lost), (2, 1));
        assert!(recovery.reason.starts_with("line "), "{}", recovery.reason);
        let ports: Vec<u16> = loaded
            .state
            .mappings
            .keys()
            .map(|k| k.external_port)
            .collect();
        assert_eq!(ports, [30080, 30082]);
        assert!(
            loaded
                .state
                .mappings
                .values()
                .all(|r| r.status == MappingStatus::Pending)
        );
    }

    #[test]
    fn duplicate_ports_keep_the_first_record() {
        let mut second = full_record(30080);
        second.owner = Owner::new("other", "svc");
        let text = format!(
            "{}{}",
            state_of([full_record(30080)]).to_toml().expect("encode"),
            state_of([second])
                .to_toml()
                .expect("encode")
                .trim_start_matches("version = 2\n")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        fs::write(&path, &text).expect("write");
        assert!(matches!(
            read_state(&path),
            Err(StateError::DuplicateMapping { .. })
        ));
        let (_file, loaded) = open(&path);
        let recovery = loaded.recovery.expect("recovered");
        assert_eq!((recovery.salvaged, recovery.lost), (1, 1));
        let kept = loaded.state.mappings.values().next().expect("one record");
        assert_eq!(kept.owner, Owner::new("media", "jellyfin"));
    }

    #[test]
    fn each_damaged_file_gets_its_own_aside_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        for garbage in ["first {", "second {"] {
            fs::write(&path, garbage).expect("write");
            let (_file, loaded) = open(&path);
            assert!(loaded.recovery.is_some());
        }
        let aside = corrupt_files(dir.path());
        assert_eq!(aside.len(), 2, "{aside:?}");
        let contents: Vec<String> = aside
            .iter()
            .map(|p| fs::read_to_string(p).expect("aside file"))
            .collect();
        assert!(contents.contains(&"first {".to_owned()));
        assert!(contents.contains(&"second {".to_owned()));
    }

    #[test]
    fn save_into_a_removed_directory_fails_and_leaves_the_state_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("holepunch");
        let path = sub.join("state.toml");
        let (file, _) = open(&path);
        let state = state_of([full_record(30080)]);
        let before = state.clone();

        fs::remove_dir_all(&sub).expect("remove state dir");
        let err = file.save(&state).expect_err("no directory to save into");
        assert!(matches!(err, StateError::WriteTemp { .. }), "{err:?}");
        assert_eq!(state, before);

        fs::write(&sub, "a file where the directory was").expect("replace dir with file");
        let err = file.save(&state).expect_err("no directory to save into");
        assert!(matches!(err, StateError::WriteTemp { .. }), "{err:?}");
        assert_eq!(state, before);
    }

    #[test]
    fn failed_rename_removes_the_temp_file_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        let (file, _) = open(&path);
        // A non-empty directory in the file's place: the temp file is written, the rename fails.
        fs::create_dir(&path).expect("dir in the file's place");
        fs::write(path.join("keep"), "old").expect("write");
        let err = file
            .save(&state_of([full_record(30080)]))
            .expect_err("rename must fail");
        assert!(matches!(err, StateError::Rename { .. }), "{err:?}");
        assert_eq!(names_in(dir.path()), ["state.toml", "state.toml.lock"]);
        assert_eq!(fs::read_to_string(path.join("keep")).expect("read"), "old");
    }

    #[test]
    fn save_leaves_no_temp_files_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        let (file, _) = open(&path);
        for port in [30080, 30081, 30082] {
            file.save(&state_of([full_record(port)])).expect("save");
        }
        assert_eq!(names_in(dir.path()), ["state.toml", "state.toml.lock"]);
        assert_eq!(
            read_state(&path).expect("read_state"),
            state_of([full_record(30082)])
        );
    }

    #[test]
    fn open_removes_temp_files_of_a_crashed_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        fs::write(dir.path().join(".state.toml.tmp-999999"), "half").expect("write");
        fs::write(dir.path().join("unrelated"), "keep").expect("write");
        let (_file, _) = open(&path);
        assert_eq!(names_in(dir.path()), ["state.toml.lock", "unrelated"]);
    }

    #[test]
    fn open_creates_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("var/lib/holepunch");
        let (file, loaded) = open(&sub.join("state.toml"));
        assert_eq!(loaded.state, State::default());
        let mode = fs::metadata(&sub).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(file.path(), sub.join("state.toml"));
    }

    #[test]
    fn read_state_reports_damage_and_moves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        fs::write(&path, "this is = not [ toml").expect("write");
        let err = read_state(&path).expect_err("garbage is an error");
        assert!(matches!(err, StateError::Parse { .. }), "{err:?}");
        assert_eq!(names_in(dir.path()), ["state.toml"]);
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "this is = not [ toml"
        );

        fs::write(&path, "version = 0\n").expect("write");
        assert!(matches!(
            read_state(&path),
            Err(StateError::UnknownVersion { found: 0, .. })
        ));
        fs::write(&path, "version = 1").expect("write");
        assert!(matches!(
            read_state(&path),
            Err(StateError::Truncated { .. })
        ));
    }

    #[test]
    fn read_state_works_while_the_daemon_holds_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        assert_eq!(read_state(&path).expect("missing file"), State::default());
        let (file, _) = open(&path);
        let state = state_of([minimal_record(5000)]);
        file.save(&state).expect("save");
        assert_eq!(read_state(&path).expect("read_state"), state);
    }
}
