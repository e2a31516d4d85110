//! Running the `holepunch` binary from integration tests: one-shot commands, and a daemon
//! in the background that is stopped (by its PID) when dropped.
//!
//! Include with `#[path = "support/bin.rs"] mod bin;` (not every test uses every helper).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_holepunch");

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub fn holepunch(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("HOLEPUNCH_CONFIG")
        .output()
        .expect("holepunch runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `holepunch run` in the background, killed (by its PID) when dropped. What it logs goes
/// to `daemon.log` beside its config file.
pub struct Daemon(pub Child, PathBuf);

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    /// [`Daemon::start`] with extra environment variables (e.g.
    /// `HOLEPUNCH_WATCH_TIMEOUT_SECS`).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let log_path = config.with_file_name("daemon.log");
        let log = std::fs::File::create(&log_path).expect("create daemon.log");
        let child = Command::new(BIN)
            .args(["run", "--config", config.to_str().expect("utf-8")])
            .env_remove("KUBECONFIG")
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn holepunch run");
        Daemon(child, log_path)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// The file it logs to (stdout and stderr).
    #[allow(dead_code)] // Not every test binary reads the log as it grows.
    pub fn log_path(&self) -> &std::path::Path {
        &self.1
    }

    /// Stops it with SIGTERM and returns what it logged.
    pub fn stop(mut self) -> String {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.0.wait();
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A config for tests: state in `dir`, no router, relay to 192.168.77.10, the lab's load
/// balancer pool 192.168.77.0/24 in `target_cidrs`, and `kubeconfig`
/// (or one that does not exist, so `run` waits for it and holds its lock).
pub fn test_config(dir: &Path, kubeconfig: Option<&Path>) -> PathBuf {
    let missing = dir.join("no-kubeconfig");
    let kubeconfig = kubeconfig.unwrap_or(&missing);
    let path = dir.join("holepunch.toml");
    let body = format!(
        "[kubernetes]\nkubeconfig = \"{kubeconfig}\"\n\n[router]\nbackend = \"none\"\n\n\
         [exposure]\nlan_address = \"192.168.77.10\"\ntarget_cidrs = [\"192.168.77.0/24\"]\n\n[state]\npath = \"{dir}/state/state.toml\"\n\n\
         [metrics]\nlisten = \"\"\n\n[log]\nformat = \"text\"\n",
        dir = dir.display(),
        kubeconfig = kubeconfig.display()
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// What `holepunch status -o json` prints for `config` (`null` if it printed no JSON).
pub fn status_json(config: &Path) -> serde_json::Value {
    let out = holepunch(&[
        "status",
        "-o",
        "json",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// One `[[mapping]]` record of a state file, as holepunch writes it, for `default/web<port>`.
pub fn state_record(port: u16, backend: &str) -> String {
    format!(
        "[[mapping]]\nowner = \"default/web{port}\"\nservice_port = {port}\nprotocol = \"tcp\"\n\
         external_port = {port}\ninternal = {{ address = \"192.168.77.10\", port = {port} }}\n\
         target = {{ address = \"192.168.77.20\", port = 30080 }}\ntarget_source = \"node-port\"\n\
         backend = \"{backend}\"\nstatus = \"active\"\n\n"
    )
}
