//! The one-command demo (`sudo make demo`, which runs `scripts/demo`): holepunch publishing a
//! Kubernetes Service through a home router, end to end, on a machine with neither.
//!
//! It narrates each step in plain words with the command a user would type, and asserts the
//! outcome of each, so it is also a test: the router lab (`tests/lab/router-lab`, miniupnpd
//! 2.3.1 in secure mode as the router), the in-test fake Kubernetes API with one Ready node,
//! a web server on that node's nodePort, a NodePort Service annotated
//! `holepunch/punch-external: "true"` applied with real kubectl, `holepunch run` in relay mode
//! with `router.backend = "auto"`, the router's port forward, `curl` from the lab's internet
//! to the router's public address, `holepunch status`, and a teardown that leaves no
//! namespace behind.
//!
//! Ignored by `cargo test` (it prints a lot, and the lab tests already cover the same path);
//! run it as root with `cargo test --test demo -- --ignored --nocapture`.
//! `HOLEPUNCH_DEMO_PAUSE=1` waits for Enter between steps. On failure it exits non-zero and
//! prints the daemon's log.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/daemon_lab.rs"]
mod daemon_lab;
#[path = "support/fake_api/mod.rs"]
mod fake_api;
#[path = "support/lab.rs"]
mod lab;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bin::{BIN, Daemon, status_json, text, wait_for};
use daemon_lab::{config, forwards_of, kubectl, wait_until, with_fake_cluster_at};
use lab::{LAN_IP, Lab, NODE_IP, ROUTER_WAN_IP, WAN_CLIENT_IP, python};
use serde_json::json;

/// The demo's own lab prefix: it can run beside the other lab tests.
const PREFIX: &str = "hpz-";
/// The Service's port, which holepunch also asks the router for on the public side.
const SERVICE_PORT: u16 = 8080;
/// The Service's nodePort on the lab's node host, where the web server listens.
const NODE_PORT: u16 = 30080;
/// What the web server answers.
const PAGE: &str = "Hello from a Kubernetes Service, published by holepunch!\n";
/// How long holepunch gets to make the Service reachable (it takes well under a second).
const PUBLISH_LIMIT_SECS: u64 = 20;

/// The narration: numbered steps, the command a user would type for each, and on failure
/// (a panic anywhere, on any thread) the daemon's log.
struct Demo {
    started: Instant,
    step: usize,
    title: String,
    pause: bool,
    dir: tempfile::TempDir,
}

/// How many steps [`demo_walkthrough`] has.
const STEPS: usize = 9;

impl Demo {
    fn new() -> Demo {
        Demo {
            started: Instant::now(),
            step: 0,
            title: String::new(),
            pause: std::env::var("HOLEPUNCH_DEMO_PAUSE").is_ok_and(|v| v == "1"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts step `title`, after Enter when pausing; `words` say what happens and why.
    fn step(&mut self, title: &str, words: &str) {
        if self.pause && self.step > 0 {
            print!("\n    (press Enter for the next step) ");
            let _ = std::io::stdout().flush();
            let _ = std::io::stdin().lock().read_line(&mut String::new());
        }
        self.step += 1;
        self.title = title.to_owned();
        println!(
            "\n==> Step {}/{STEPS}: {title}   [{:.1} s]",
            self.step,
            self.started.elapsed().as_secs_f64()
        );
        for line in words.lines() {
            println!("    {line}");
        }
    }

    /// Shows the command a user would type for what comes next.
    fn command(&self, command: &str) {
        println!("    $ {command}");
    }

    /// Says something between commands.
    fn say(&self, words: &str) {
        println!("    {words}");
    }

    /// Shows output, indented.
    fn show(&self, output: &str) {
        print!("{}", shown(output));
    }

    /// Shows that a check held.
    fn ok(&self, what: &str) {
        println!("    ok: {what}");
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir().join("daemon.log"))
                .unwrap_or_else(|_| "(holepunch had not started)".to_owned());
            eprintln!(
                "\nThe demo FAILED at step {}/{STEPS} ({}); the message above says what went \
                 wrong. The daemon's log:\n{log}",
                self.step, self.title
            );
        }
    }
}

/// A process in a lab namespace, killed (by its PID) when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `python3 -m http.server` on the node's nodePort, serving [`PAGE`]; its access log goes to
/// `web.log` in `dir`.
fn web_server(lab: &Lab, dir: &Path) -> (Background, PathBuf) {
    let root = dir.join("www");
    std::fs::create_dir_all(&root).expect("mkdir www");
    std::fs::write(root.join("index.html"), PAGE).expect("write index.html");
    let log_path = dir.join("web.log");
    let log = std::fs::File::create(&log_path).expect("create web.log");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("node"),
            python(),
            "-m",
            "http.server",
        ])
        .args(["--bind", NODE_IP, &NODE_PORT.to_string()])
        .arg("--directory")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start python3 -m http.server");
    (Background(child), log_path)
}

/// `curl` from namespace `ns`: the body, or the error curl printed.
fn curl(lab: &Lab, ns: &str, url: &str) -> Result<String, String> {
    let out = lab.exec(ns, &["curl", "-sS", "--max-time", "2", url]);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else if out.status.code() == Some(255) && out.stdout.is_empty() && out.stderr.is_empty() {
        Err("curl did not run: install it (scripts/dev-deps does)".to_owned())
    } else {
        Err(text(&out.stderr).trim().to_owned())
    }
}

/// `output` as [`Demo::show`] prints it: indented by six spaces, after the indentation all its
/// lines share (nft's tabs) is taken off. The indentation within stays, so YAML stays YAML.
fn shown(output: &str) -> String {
    let lines: Vec<&str> = output.trim_end().lines().map(str::trim_end).collect();
    let common = lines
        .iter()
        .filter(|line| !line.is_empty())
        .map(|line| line.len() - line.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|line| match line.get(common..) {
            Some(rest) if !rest.is_empty() => format!("      {rest}\n"),
            _ => "\n".to_owned(),
        })
        .collect()
}

/// The Service the demo publishes: a NodePort Service asking to be public.
fn service_yaml() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  annotations:
    holepunch/punch-external: \"true\"   # publish every port of this Service
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - {{name: http, port: {SERVICE_PORT}, targetPort: 80, protocol: TCP, nodePort: {NODE_PORT}}}
"
    )
}

/// holepunch's relay map on the LAN host, as `nft list map` prints it.
fn relay_map(lab: &Lab) -> String {
    text(
        &lab.exec(
            "lan",
            &["nft", "list", "map", "inet", "holepunch", "targets4"],
        )
        .stdout,
    )
}

/// The namespaces of the demo's lab that exist.
fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    text(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "the demo: run it with scripts/demo (sudo make demo)"]
fn demo_walkthrough() {
    let mut demo = Demo::new();
    let public_url = format!("http://{ROUTER_WAN_IP}:{SERVICE_PORT}/");

    demo.step(
        "a home network with a router",
        "Four network namespaces on this machine: a router running miniupnpd (UPnP IGD, PCP and\n\
         NAT-PMP, in secure mode like real home routers), a LAN host where holepunch will run,\n\
         a cluster node, and a client out on the internet. Nothing leaves this machine.",
    );
    demo.command(&format!("LAB_PREFIX={PREFIX} tests/lab/router-lab up"));
    let lab = Lab::up(PREFIX);
    let namespaces = lab_namespaces();
    for ns in ["rtr", "lan", "node", "wan"] {
        assert!(
            namespaces.contains(&lab.ns(ns)),
            "namespace {} missing: {namespaces:?}",
            lab.ns(ns)
        );
    }
    demo.show(&format!(
        "router      {}   LAN 192.168.77.1, public address {ROUTER_WAN_IP}\n\
         LAN host    {}   {LAN_IP}  (holepunch runs here)\n\
         node        {}  {NODE_IP}  (the cluster's node)\n\
         internet    {}   {WAN_CLIENT_IP}  (a client outside the home)",
        lab.ns("rtr"),
        lab.ns("lan"),
        lab.ns("node"),
        lab.ns("wan"),
    ));
    let router_log = lab.router_log();
    assert!(
        router_log.contains("HTTP listening on port 5000")
            && router_log.contains("Listening for NAT-PMP/PCP traffic on port 5351"),
        "miniupnpd is not listening:\n{router_log}"
    );
    demo.ok("the router listens: UPnP on http://192.168.77.1:5000, PCP and NAT-PMP on udp/5351");

    demo.step(
        "a Kubernetes cluster",
        "No real cluster needed: a small Kubernetes API server (the one holepunch's tests\n\
         use) runs on the LAN host, with one Ready node, node-a, at 192.168.77.20.\n\
         kubectl and holepunch talk to it through an ordinary kubeconfig.",
    );
    let dir = demo.dir().to_owned();
    // The cluster and the daemon live in the LAN host's namespace: this thread enters it, and
    // the sockets and processes it makes (kubectl, holepunch) are there too.
    with_fake_cluster_at(&lab, "lan", &dir, |fake, _, kubeconfig, _| {
        fake.apply_object(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": NODE_IP}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }));
        let kubectl_cmd = format!("kubectl --kubeconfig {}", kubeconfig.display());
        demo.command(&format!("{kubectl_cmd} get nodes -o name"));
        let nodes = kubectl(kubeconfig, &["get", "nodes", "-o", "name"]);
        demo.show(&nodes);
        assert_eq!(nodes.trim(), "node/node-a");
        demo.ok("kubectl reaches the cluster");

        demo.step(
            "a web server in the cluster",
            &format!(
                "What the Service's Pods would serve: a web server on the node's nodePort\n\
                 ({NODE_IP}:{NODE_PORT}), where kube-proxy would send the Service's traffic."
            ),
        );
        demo.command(&format!(
            "ip netns exec {} python3 -m http.server --bind {NODE_IP} {NODE_PORT} &",
            lab.ns("node")
        ));
        let (web, web_log) = web_server(&lab, demo.dir());
        let node_url = format!("http://{NODE_IP}:{NODE_PORT}/");
        wait_for("the web server to answer on the LAN", || {
            curl(&lab, "lan", &node_url).is_ok()
        });
        demo.command(&format!("curl {node_url}   # from the LAN host"));
        let body = curl(&lab, "lan", &node_url);
        demo.show(body.as_deref().unwrap_or_else(|e| e));
        assert_eq!(body.as_deref(), Ok(PAGE));
        demo.ok("it answers on the LAN");
        demo.say("... but from the internet, the router's public address leads nowhere:");
        demo.command(&format!(
            "ip netns exec {} curl {public_url}",
            lab.ns("wan")
        ));
        let before = curl(&lab, "wan", &public_url);
        demo.show(before.as_deref().unwrap_or_else(|e| e));
        assert!(
            before.is_err(),
            "reachable before holepunch ran: {before:?}"
        );
        demo.ok("not reachable from the internet (yet)");

        demo.step(
            "a Service that asks to be public",
            &format!(
                "One annotation opts a Service in: holepunch/punch-external: \"true\". Every port\n\
                 of the Service is then published on the router's public address, on the same\n\
                 port number (holepunch.port/{SERVICE_PORT}: \"<port>\" would pick another)."
            ),
        );
        let yaml = service_yaml();
        let yaml_path = demo.dir().join("web.yaml");
        std::fs::write(&yaml_path, &yaml).expect("write web.yaml");
        demo.show(&yaml);
        // NOTE: the fake API serves no OpenAPI v2 schemas; kubectl up to 1.26 (Debian 12 ships
        // 1.20) then refuses `apply` with NotFound unless validation is off. Real clusters
        // need no such flag.
        demo.say("(--validate=false: the demo's small API server has no OpenAPI schemas to validate against)");
        demo.command(&format!("{kubectl_cmd} apply --validate=false -f web.yaml"));
        let applied = kubectl(
            kubeconfig,
            &[
                "apply",
                "--validate=false",
                "-f",
                yaml_path.to_str().expect("utf-8 path"),
            ],
        );
        demo.show(&applied);
        assert!(applied.contains("service/web"), "{applied}");
        demo.ok("the Service exists, annotated");

        demo.step(
            "run holepunch",
            "holepunch runs outside the cluster, here on the LAN host. Relay mode (the default):\n\
             the router forwards the public port to this host, and holepunch's nftables rules\n\
             carry the traffic on to the node. backend = \"auto\" tries PCP, then NAT-PMP, then\n\
             UPnP, and keeps the first the router answers. Its config file:",
        );
        let config = config(demo.dir(), kubeconfig, "relay", "auto");
        demo.show(&std::fs::read_to_string(&config).expect("read the config"));
        demo.say("Relay forwards packets, so the LAN host must route:");
        demo.command(&format!(
            "ip netns exec {} sysctl -w net.ipv4.ip_forward=1",
            lab.ns("lan")
        ));
        let sysctl = lab.exec("lan", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        assert!(sysctl.status.success(), "sysctl: {}", text(&sysctl.stderr));
        demo.command(&format!("holepunch run --config {}", config.display()));
        let daemon = Daemon::start(&config);
        let took = wait_until(
            &daemon,
            "the router to forward the Service's port",
            Duration::from_secs(PUBLISH_LIMIT_SECS),
            || !forwards_of(&lab, SERVICE_PORT).is_empty(),
        );
        let log = daemon.log();
        demo.show(
            &log.lines()
                .filter(|line| line.contains(" INFO ") || line.contains(" WARN "))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        demo.ok(&format!(
            "published {:.0} ms after holepunch started",
            took.as_secs_f64() * 1000.0
        ));

        demo.step(
            "the mapping on the router",
            &format!(
                "The router now forwards {ROUTER_WAN_IP}:{SERVICE_PORT} to the LAN host; this is\n\
                 the rule miniupnpd wrote into the router's nftables:"
            ),
        );
        demo.command(&format!(
            "ip netns exec {} nft list chain inet filter prerouting_miniupnpd",
            lab.ns("rtr")
        ));
        let forwards = forwards_of(&lab, SERVICE_PORT);
        demo.show(&forwards.join("\n"));
        assert_eq!(forwards.len(), 1, "{}", lab.router_forwards());
        assert!(
            forwards[0].contains(&format!("dnat ip to {LAN_IP}:{SERVICE_PORT}")),
            "the router forwards elsewhere: {forwards:?}"
        );
        demo.say("The same mapping, as a UPnP client lists the router's port mappings:");
        demo.command(&format!(
            "ip netns exec {} upnpc -u http://192.168.77.1:5000/rootDesc.xml -l",
            lab.ns("lan")
        ));
        let listing = lab.exec(
            "lan",
            &["upnpc", "-u", "http://192.168.77.1:5000/rootDesc.xml", "-l"],
        );
        let listing = text(&listing.stdout);
        let rows: Vec<&str> = listing
            .lines()
            .filter(|line| line.contains(&format!("{LAN_IP}:{SERVICE_PORT}")))
            .collect();
        demo.show(&rows.join("\n"));
        assert_eq!(rows.len(), 1, "upnpc -l:\n{listing}");
        demo.say("And holepunch's relay rule on the LAN host (public port -> the node):");
        demo.command(&format!(
            "ip netns exec {} nft list map inet holepunch targets4",
            lab.ns("lan")
        ));
        let table = relay_map(&lab);
        let elements: Vec<&str> = table
            .lines()
            .filter(|line| line.contains(&format!("{LAN_IP} . tcp . {SERVICE_PORT}")))
            .collect();
        demo.show(&elements.join("\n"));
        assert!(
            table.contains(&format!(
                "{LAN_IP} . tcp . {SERVICE_PORT} : {NODE_IP} . {NODE_PORT}"
            )),
            "holepunch's relay map:\n{table}"
        );
        demo.ok("router and LAN host both carry the port");

        demo.step(
            "a request from the internet",
            &format!(
                "The client on the internet ({WAN_CLIENT_IP}) asks the router's public address;\n\
                 the router, then holepunch's rule, carry it to the web server."
            ),
        );
        demo.command(&format!(
            "ip netns exec {} curl {public_url}",
            lab.ns("wan")
        ));
        let answer = curl(&lab, "wan", &public_url);
        demo.show(answer.as_deref().unwrap_or_else(|e| e));
        assert_eq!(
            answer.as_deref(),
            Ok(PAGE),
            "the request from the internet failed"
        );
        let served = std::fs::read_to_string(&web_log).unwrap_or_default();
        let request_line = served
            .lines()
            .rfind(|line| line.contains("\"GET / HTTP/1.1\" 200"))
            .unwrap_or_default();
        demo.show(&format!("the web server logged: {request_line}"));
        assert!(
            request_line.starts_with(&format!("{LAN_IP} ")),
            "relayed requests come from the LAN host, the web server logged:\n{served}"
        );
        demo.ok("the internet reaches the Service (relayed through the LAN host)");

        demo.step(
            "holepunch status",
            "What holepunch keeps in its state file: each mapping, its public address, target,\n\
             router protocol and lease. It also tells the Service's owner, with an Event.",
        );
        demo.command(&format!("holepunch status --config {}", config.display()));
        let status = Command::new(BIN)
            .args(["status", "--config"])
            .arg(&config)
            .output()
            .expect("holepunch status");
        let status_text = text(&status.stdout);
        demo.show(&status_text);
        assert!(status.status.success(), "{}", text(&status.stderr));
        assert!(
            status_text.contains(&format!("{ROUTER_WAN_IP}:{SERVICE_PORT}")),
            "no public address in the status"
        );
        let mappings = status_json(&config)["mappings"].clone();
        assert_eq!(
            mappings.as_array().map(Vec::len),
            Some(1),
            "one mapping: {mappings}"
        );
        assert_eq!(mappings[0]["status"], "active", "{mappings}");
        demo.command(&format!(
            "{kubectl_cmd} get events --field-selector involvedObject.name=web"
        ));
        let published = || {
            let events = kubectl(kubeconfig, &["get", "events", "-o", "json"]);
            let events: serde_json::Value = serde_json::from_str(&events).unwrap_or_default();
            events["items"].as_array().and_then(|items| {
                items
                    .iter()
                    .find(|e| e["reason"] == "Published" && e["involvedObject"]["name"] == "web")
                    .map(|e| {
                        format!(
                            "{}  {}",
                            e["reason"].as_str().unwrap_or_default(),
                            e["message"].as_str().unwrap_or_default()
                        )
                    })
            })
        };
        wait_until(
            &daemon,
            "a Published Event on the Service",
            Duration::from_secs(10),
            || published().is_some(),
        );
        demo.show(&published().unwrap_or_default());
        demo.ok("status and Event say where the Service is published");

        demo.step(
            "tear down",
            "Deleting the Service unpublishes it: holepunch removes the router's mapping and its\n\
             own rule. Then everything the demo started stops, and the lab is taken down.",
        );
        demo.command(&format!("{kubectl_cmd} delete svc web"));
        demo.show(&kubectl(kubeconfig, &["delete", "svc", "web"]));
        wait_until(
            &daemon,
            "the router's mapping to go",
            Duration::from_secs(PUBLISH_LIMIT_SECS),
            || forwards_of(&lab, SERVICE_PORT).is_empty(),
        );
        let after = curl(&lab, "wan", &public_url);
        assert!(
            after.is_err(),
            "still reachable after the delete: {after:?}"
        );
        wait_until(
            &daemon,
            "holepunch's relay rule to go",
            Duration::from_secs(PUBLISH_LIMIT_SECS),
            || !relay_map(&lab).contains(&format!("{LAN_IP} . tcp . {SERVICE_PORT}")),
        );
        demo.ok("the router and holepunch forward nothing any more; the internet gets no answer");
        demo.command("kill -TERM <holepunch>   (or: systemctl stop holepunch)");
        let log = daemon.stop();
        assert!(
            !log.contains(" ERROR "),
            "holepunch logged an error:\n{log}"
        );
        drop(web);
    });

    demo.command(&format!("LAB_PREFIX={PREFIX} tests/lab/router-lab down"));
    drop(lab);
    demo.command(&format!("ip netns list | grep {PREFIX}"));
    let left = lab_namespaces();
    demo.show(if left.is_empty() {
        "(nothing)"
    } else {
        "(namespaces left!)"
    });
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(
        !Path::new(&format!("/run/holepunch-lab/{PREFIX}")).exists(),
        "the lab's run directory is left behind"
    );
    demo.ok("no namespace, process or rule of the demo is left");
    println!(
        "\nDone in {:.1} s. Next: README.md (Publishing a Service, Configuring it, The kubeconfig), \
         `holepunch plan --from-file` against your own cluster.",
        demo.started.elapsed().as_secs_f64()
    );
}

/// Step 4 shows the Service's YAML as the user would write it: every line keeps its
/// indentation (it used to lose it), and output indented as a whole (nft's) is moved left.
#[test]
fn the_demo_shows_yaml_with_its_indentation() {
    let yaml = service_yaml();
    let printed = shown(&yaml);
    assert!(printed.contains("\n        name: web\n"), "{printed}");
    assert!(
        printed.contains("\n          holepunch/punch-external"),
        "{printed}"
    );
    let back: Vec<&str> = printed
        .lines()
        .map(|line| line.strip_prefix("      ").unwrap_or(line))
        .collect();
    assert_eq!(back, yaml.lines().collect::<Vec<_>>());
    assert_eq!(
        shown("\t\tdnat ip to 192.168.77.10:8080\n\t\t  more\n"),
        "      dnat ip to 192.168.77.10:8080\n        more\n"
    );
}
