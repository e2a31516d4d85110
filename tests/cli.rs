//! The `holepunch` binary as a user runs it: check-config, plan --from-file, status, and the
//! single-instance lock and state-file recovery of `run`; the kubeconfig found as kubectl
//! finds it (`--kubeconfig`, `--context`, `$KUBECONFIG` merged), against the in-test API.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/fake_api/mod.rs"]
mod fake_api;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bin::{Daemon, holepunch, repo, state_record, status_json, test_config, text, wait_for};
use fake_api::FakeApi;
use serde_json::json;

#[test]
fn check_config_accepts_the_shipped_default_and_prints_it_resolved() {
    let out = holepunch(&[
        "check-config",
        "--config",
        repo("etc/holepunch.toml").to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let printed = text(&out.stdout);
    for key in [
        "[kubernetes]",
        "lease_seconds = 3600",
        "mode = \"relay\"",
        "10250-10259",
        "target_cidrs = []",
        "max_per_service = 16",
        "max_per_namespace = 32",
        "max_total = 128",
    ] {
        assert!(printed.contains(key), "{key:?} missing from:\n{printed}");
    }
    // The shipped default takes no LoadBalancer IP: a MetalLB user is told what to set.
    let said = text(&out.stderr);
    assert!(
        said.contains("MetalLB") && said.contains("target_cidrs = [\"192.168.1.240/28\"]"),
        "{said}"
    );
    // A config that lists the pool is not told.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = holepunch(&[
        "check-config",
        "--config",
        test_config(dir.path(), None).to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("MetalLB"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_names_a_misspelt_key_with_its_line_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[router]\nbackend = \"upnp\"\nleas_seconds = 600\n").expect("write");
    let out = holepunch(&["check-config", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("leas_seconds"), "{err}");
    assert!(err.contains("lease_seconds"), "no suggestion: {err}");
    assert!(err.contains(":3:"), "no line number: {err}");
    assert!(err.contains("bad.toml"), "no file name: {err}");
}

#[test]
fn missing_config_file_is_exit_1_with_a_hint() {
    let out = holepunch(&["check-config", "--config", "/nonexistent/holepunch.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/holepunch.toml"));
}

#[test]
fn plan_from_file_sorts_out_a_mixed_cluster_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), None);
    let fixture = repo("tests/fixtures/services.yaml");
    let out = holepunch(&[
        "plan",
        "--config",
        config.to_str().expect("utf-8"),
        "--from-file",
        fixture.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let plan = text(&out.stdout);
    let lines: Vec<&str> = plan.lines().collect();
    let has = |words: &[&str]| lines.iter().any(|l| words.iter().all(|w| l.contains(w)));
    // Annotated, on its own port, through the Ready node's nodePort.
    assert!(
        has(&["map", "8080/tcp", "default/web", "192.168.77.20:30080"]),
        "{plan}"
    );
    // Remapped TCP port and plain UDP port, to the load balancer IP.
    assert!(
        has(&["map", "18096/tcp", "media/jellyfin", "192.168.77.100:8096"]),
        "{plan}"
    );
    assert!(
        has(&["map", "7359/udp", "media/jellyfin", "192.168.77.100:7359"]),
        "{plan}"
    );
    // loadBalancerClass without annotation.
    assert!(
        has(&["map", "27015/udp", "games/game", "192.168.77.20:32015"]),
        "{plan}"
    );
    // The younger Service loses the conflict; the plan (the operator's) says who won.
    assert!(
        has(&["problem", "default/copycat", "port-conflict", "default/web"]),
        "{plan}"
    );
    assert!(has(&["problem", "default/ssh", "denied-port"]), "{plan}");
    assert!(
        has(&["problem", "default/broken", "invalid-annotation", "ninety"]),
        "{plan}"
    );
    assert!(!plan.contains("default/private"), "{plan}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("map")).count(),
        4,
        "{plan}"
    );
    // Relay mode: the router forwards to this host.
    assert!(
        has(&["map", "8080/tcp", "router forwards to 192.168.77.10:8080"]),
        "{plan}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "a dry run must not create state"
    );
}

#[test]
fn status_without_state_shows_no_mappings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), None);
    let out = holepunch(&["status", "--config", config.to_str().expect("utf-8")]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("0 mappings"),
        "{}",
        text(&out.stdout)
    );
    let json = status_json(&config);
    assert_eq!(json["mappings"], serde_json::json!([]));

    // kubectl's other output formats: wide (more columns) and yaml (what json holds).
    let config = config.to_str().expect("utf-8");
    let wide = holepunch(&["status", "-o", "wide", "--config", config]);
    assert!(wide.status.success(), "stderr: {}", text(&wide.stderr));
    let wide = text(&wide.stdout);
    assert!(
        wide.starts_with("SERVICE") && wide.contains("FORWARDED TO") && wide.contains("EXPIRES"),
        "{wide}"
    );
    assert!(wide.contains("0 mappings"), "{wide}");
    let yaml = holepunch(&["status", "-o", "yaml", "--config", config]);
    assert!(yaml.status.success(), "stderr: {}", text(&yaml.stderr));
    let yaml = text(&yaml.stdout);
    assert!(yaml.contains("mappings: []"), "{yaml}");
    assert!(
        yaml.contains("summary:\n") && yaml.contains("\n  mappings: 0\n"),
        "{yaml}"
    );
    let bad = holepunch(&["status", "-o", "xml", "--config", config]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}

#[test]
fn a_second_instance_exits_non_zero_within_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), None);
    let first = Daemon::start(&config);
    let lock = dir.path().join("state/state.toml.lock");
    wait_for("the first instance to take the lock", || {
        std::fs::read_to_string(&lock).is_ok_and(|pid| pid.trim() == first.0.id().to_string())
    });

    let started = Instant::now();
    let second = holepunch(&["run", "--config", config.to_str().expect("utf-8")]);
    let elapsed = started.elapsed();
    assert_eq!(
        second.status.code(),
        Some(3),
        "stderr: {}",
        text(&second.stderr)
    );
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    let err = text(&second.stderr);
    assert!(err.contains("another holepunch"), "{err}");
    assert!(
        err.contains(&first.0.id().to_string()),
        "holder PID not named: {err}"
    );

    let log = first.stop();
    assert!(
        log.contains("no kubeconfig at"),
        "the first instance should say what to configure: {log}"
    );
}

#[test]
fn a_truncated_state_file_is_moved_aside_and_its_readable_records_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), None);
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let whole = format!(
        "version = 1\n\n{}{}",
        state_record(8080, "none"),
        state_record(8081, "none")
    );
    let truncated = &whole[..whole.len() - 60];
    std::fs::write(state_dir.join("state.toml"), truncated).expect("write state");

    let daemon = Daemon::start(&config);
    wait_for("the state file to be rewritten", || {
        std::fs::read_dir(&state_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains("corrupt"))
            })
            .unwrap_or(false)
            && state_dir.join("state.toml").exists()
            // The file is moved aside before the daemon logs it: wait for both.
            && daemon.log().contains("STATE FILE DAMAGED")
    });
    let log = daemon.stop();
    assert!(log.contains("STATE FILE DAMAGED"), "not said loudly: {log}");

    let aside = std::fs::read_dir(&state_dir)
        .expect("read dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .expect("moved-aside file");
    assert_eq!(
        std::fs::read_to_string(aside.path()).expect("read aside"),
        truncated
    );

    // The daemon did not start as if empty: the complete record is still owned.
    let out = holepunch(&["status", "--config", config.to_str().expect("utf-8")]);
    let status = text(&out.stdout);
    assert!(status.contains("default/web8080"), "{status}");
    assert!(status.contains("pending"), "{status}");
    assert!(!status.contains("default/web8081"), "{status}");
}

#[test]
fn cleanup_removes_what_it_can_and_never_forgets_a_router_mapping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), None);
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let state = format!(
        "version = 1\n\n{}{}",
        state_record(8080, "none"),
        state_record(8081, "pcp")
    );
    std::fs::write(state_dir.join("state.toml"), state).expect("write state");

    // In a network namespace of its own (a user namespace makes that possible without root),
    // holding a table inet holepunch that cleanup must remove: the machine's own nftables are
    // never touched, and the test runs as any user.
    let out = in_own_netns(
        "nft add table inet holepunch",
        &["cleanup", "--config", config.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("removed 1 mappings, 1 left"), "{stdout}");
    assert!(
        stdout.contains("removed the nftables table inet holepunch"),
        "{stdout}"
    );
    let owners: Vec<String> = status_json(&config)["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .map(|m| m["owner"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(owners, ["default/web8081"]);
}

/// Runs `holepunch <args>` in a new network namespace (inside a new user namespace, where this
/// user is root: no privileges needed) after the shell command `setup` ran there.
fn in_own_netns(setup: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-ec"])
        .arg(r#"PATH="$PATH:/usr/sbin:/sbin"; eval "$1"; shift; exec "$@""#)
        .args(["sh", setup, bin::BIN])
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("HOLEPUNCH_CONFIG")
        .output()
        .expect("unshare runs (util-linux)");
    assert!(
        !text(&out.stderr).starts_with("unshare:"),
        "this test needs user namespaces (kernel.unprivileged_userns_clone=1, or root): {}",
        text(&out.stderr)
    );
    out
}

/// A kubeconfig whose only context, `dead` (its current-context), points at a closed port.
fn write_dead_kubeconfig(dir: &Path) -> PathBuf {
    let path = dir.join("dead.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: dead\n  cluster:\n    server: \
         https://127.0.0.1:1\nusers:\n- name: dead\n  user:\n    token: none\ncontexts:\n\
         - name: dead\n  context:\n    cluster: dead\n    user: dead\ncurrent-context: dead\n",
    )
    .expect("write dead.yaml");
    path
}

/// `holepunch plan <args>` with `$KUBECONFIG` set to `kubeconfig_env` (unset if `None`), off
/// the async runtime so that the in-test API keeps answering.
async fn plan(config: &Path, args: &[&str], kubeconfig_env: Option<String>) -> Output {
    let mut command = Command::new(bin::BIN);
    command
        .args(["plan", "--config", config.to_str().expect("utf-8")])
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("HOLEPUNCH_CONFIG");
    if let Some(value) = kubeconfig_env {
        command.env("KUBECONFIG", value);
    }
    tokio::task::spawn_blocking(move || command.output().expect("holepunch runs"))
        .await
        .expect("plan finished")
}

/// kubectl's habits: `--kubeconfig` over the config file over `$KUBECONFIG`, whose files are
/// merged as kubectl merges them (the first to set the current context wins, files that do not
/// exist are skipped), and `--context` to pick another context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_finds_the_cluster_as_kubectl_does() {
    let fake = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good = fake.write_kubeconfig(dir.path()); // context "fake", its current-context
    let dead = write_dead_kubeconfig(dir.path());
    let missing = dir.path().join("missing.yaml");
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.168.77.20"}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }));
    fake.apply_object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default",
                     "annotations": {"holepunch/punch-external": "true"}},
        "spec": {"type": "NodePort",
                 "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "nodePort": 30080}]}
    }));
    // No kubernetes.kubeconfig in this config: $KUBECONFIG decides.
    let config = test_config(dir.path(), None);
    let body = std::fs::read_to_string(&config).expect("read config");
    let body: String = body
        .lines()
        .filter(|l| !l.starts_with("kubeconfig ="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, body).expect("write config");
    let list = |paths: &[&Path]| {
        Some(
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        )
    };
    let published = |out: &Output| {
        out.status.success()
            && text(&out.stdout).lines().any(|l| {
                l.starts_with("map") && l.contains("8080/tcp") && l.contains("default/web")
            })
    };

    // The good file first: its current context wins; the missing file is skipped.
    let out = plan(&config, &[], list(&[&missing, &good, &dead])).await;
    assert!(
        published(&out),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The dead file first: its current context wins, and the cluster is unreachable ...
    let out = plan(&config, &[], list(&[&dead, &good])).await;
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
    // ... unless --context picks the good file's context from the merged config.
    let out = plan(&config, &["--context", "fake"], list(&[&dead, &good])).await;
    assert!(published(&out), "stderr: {}", text(&out.stderr));

    // --kubeconfig wins over $KUBECONFIG, both ways.
    let good_flag = good.to_str().expect("utf-8");
    let dead_flag = dead.to_str().expect("utf-8");
    let out = plan(&config, &["--kubeconfig", good_flag], list(&[&dead])).await;
    assert!(published(&out), "stderr: {}", text(&out.stderr));
    let out = plan(&config, &["--kubeconfig", dead_flag], list(&[&good])).await;
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
    // A context the file does not have is named in the error.
    let out = plan(
        &config,
        &["--kubeconfig", good_flag, "--context", "nope"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nope"), "{}", text(&out.stderr));

    // Nothing in $KUBECONFIG exists: said so, with the list.
    let out = plan(&config, &[], list(&[&missing])).await;
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("none of the kubeconfig files in $KUBECONFIG exists"),
        "{}",
        text(&out.stderr)
    );

    // --kubeconfig wins over the config file's kubernetes.kubeconfig too.
    let with_dead = test_config(dir.path(), Some(&dead));
    let out = plan(&with_dead, &["--kubeconfig", good_flag], None).await;
    assert!(published(&out), "stderr: {}", text(&out.stderr));
    let out = plan(&with_dead, &[], None).await;
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
}

/// `run` takes the same flags, and keeps them: it waits for the kubeconfig named on its
/// command line, not the config file's.
#[test]
fn run_uses_the_kubeconfig_named_on_its_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), None);
    let flag = dir.path().join("from-the-flag.yaml");
    let log_path = dir.path().join("run.log");
    let log = std::fs::File::create(&log_path).expect("create run.log");
    let mut child = Command::new(bin::BIN)
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .args([
            "--kubeconfig",
            flag.to_str().expect("utf-8"),
            "--context",
            "home",
        ])
        .env_remove("KUBECONFIG")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn holepunch run");
    let said =
        |needle: &str| std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains(needle));
    wait_for("run to say which kubeconfig it waits for", || {
        said(&format!("no kubeconfig at {}", flag.display()))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !said("no-kubeconfig"),
        "the config file's kubeconfig was used"
    );
}
