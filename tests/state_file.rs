//! The state file seen from outside the crate: the single-instance lock between two real
//! processes (this test binary runs itself as the second one), and a file written by hand in
//! the documented format.

use std::env;
use std::fs;
use std::path::Path;
use std::process::Command;

use holepunch::model::{Owner, Protocol};
use holepunch::state::{MappingStatus, StateError, StateFile, read_state};

/// Set to a state file path when this binary runs as the second process.
const CHILD_STATE_PATH: &str = "HOLEPUNCH_TEST_CHILD_STATE_PATH";
/// `locked` or `free`: what the second process must find.
const CHILD_EXPECTS: &str = "HOLEPUNCH_TEST_CHILD_EXPECTS";

fn run_child(path: &Path, expects: &str) -> String {
    let exe = env::current_exe().expect("test binary path");
    let output = Command::new(exe)
        .args(["--exact", "child_opens_the_state_file", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_STATE_PATH, path)
        .env(CHILD_EXPECTS, expects)
        .output()
        .expect("run the second process");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "second process failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn a_second_process_is_refused_with_the_holders_pid_until_the_first_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.toml");
    let (held, _) = StateFile::open(&path).expect("first open");

    let stdout = run_child(&path, "locked");
    assert!(
        stdout.contains(&format!("(PID {},", std::process::id())),
        "{stdout}"
    );

    drop(held);
    run_child(&path, "free");
}

/// The second process; does nothing when run as an ordinary test.
#[test]
fn child_opens_the_state_file() {
    let Some(path) = env::var_os(CHILD_STATE_PATH) else {
        return;
    };
    let result = StateFile::open(Path::new(&path));
    match env::var(CHILD_EXPECTS).as_deref() {
        Ok("locked") => {
            let err = result.expect_err("the first process holds the lock");
            assert!(matches!(err, StateError::Lock { .. }), "{err:?}");
            println!("LOCK ERROR: {err}");
        }
        _ => {
            result.expect("the lock was released");
        }
    }
}

#[test]
fn a_hand_written_file_in_the_documented_format_loads() {
    let text = r#"version = 1

# Written by hand: inline endpoints, comments and any key order are fine.
[[mapping]]
owner = "media/jellyfin"
service_port = 8096
protocol = "tcp"
external_port = 30080
internal = { address = "192.168.77.10", port = 30080 }
target = { address = "192.168.77.100", port = 8096 }
target_source = "load-balancer"
backend = "pcp"
nonce = "00112233445566778899aabb"
lifetime_secs = 3600
expires_at = "2025-01-02T04:04:05Z"
status = "active"
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.toml");
    fs::write(&path, text).expect("write");

    let state = read_state(&path).expect("read_state");
    let record = state.mappings.values().next().expect("one record");
    assert_eq!(record.owner, Owner::new("media", "jellyfin"));
    assert_eq!(record.protocol, Protocol::Tcp);
    assert_eq!(record.internal.port, 30080);
    assert_eq!(record.status, MappingStatus::Active);

    let (file, loaded) = StateFile::open(&path).expect("open");
    assert_eq!(loaded.recovery, None);
    assert_eq!(loaded.state, state);
    file.save(&loaded.state).expect("save");
    assert_eq!(read_state(&path).expect("read back"), state);
}
