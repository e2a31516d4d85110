//! The `holepunch` binary as a user runs it: check-config, plan --from-file, status, and the
//! single-instance lock and state-file recovery of `run`.

#[path = "support/bin.rs"]
mod bin;

use std::time::{Duration, Instant};

use bin::{Daemon, holepunch, repo, state_record, status_json, test_config, text, wait_for};

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

    let out = holepunch(&["cleanup", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(5), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("removed 1 mappings, 1 left"),
        "{}",
        text(&out.stdout)
    );
    let owners: Vec<String> = status_json(&config)["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .map(|m| m["owner"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(owners, ["default/web8081"]);
}
