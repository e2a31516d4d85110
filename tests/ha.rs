//! The HA building blocks against the in-test API server (tier 1, loopback only): two or
//! three election loops (`holepunch::ha::runner`) share one Lease. Each loop reaches the API
//! through its own TCP relay, which the test can cut (a network partition of that host).
//!
//! A sampler reads every loop's published standing every few milliseconds and asserts that
//! never two hosts may act at once. Takeover times are printed as
//! `BENCH <key>\t<value>\t<unit>` lines.

#[path = "support/fake_api/mod.rs"]
mod fake_api;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_api::FakeApi;
use holepunch::ha::election::{LeaseRecord, Role, Timings, WriteFailure};
use holepunch::ha::lease::{LeaseError, LeaseStore, MirrorStore, MirrorWriter, request_timeout};
use holepunch::ha::runner::{Runner, Standing};
use holepunch::model::{Backend, Endpoint, Owner, Protocol, TargetSource};
use holepunch::state::{LeaseTimes, MappingRecord, MappingStatus, State};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const NAMESPACE: &str = "holepunch";
const LEASE: &str = "holepunch";

/// Scaled-down timings (same ratios as client-go's 15/10/2 s) for the quick tests.
/// Added to every upper bound a takeover is waited for: on a loaded 2-CPU machine a task
/// may run late by a second or more. The printed takeover times are the measurement; the
/// lower bounds (no takeover before the Lease could expire) carry no slack.
const SCHEDULING_SLACK: Duration = Duration::from_secs(2);

fn quick() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(400),
    }
}

/// client-go's defaults (`[ha]`'s are shorter, 10/7/2 s: README, "High availability").
fn defaults() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    }
}

/// A TCP relay to the API server that the test can cut: open connections drop, new ones are
/// closed at once.
struct Link {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Link {
    async fn start(upstream: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let (cut, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Link { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// A kube client for `fake` that goes through `link`.
async fn client_through(fake: &FakeApi, link: &Link) -> kube::Client {
    let yaml = fake
        .kubeconfig_yaml(fake.token())
        .replace(&fake.url(), &format!("https://{}", link.addr));
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&yaml).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kubeconfig usable");
    kube::Client::try_from(config).expect("client")
}

/// One host: its election loop, its link to the API, its published standing.
struct Host {
    name: String,
    link: Link,
    standing: watch::Receiver<Standing>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn start_host(fake: &FakeApi, name: &str, timings: Timings) -> Host {
    let link = Link::start(fake.addr()).await;
    let client = client_through(fake, &link).await;
    let store = LeaseStore::new(client, NAMESPACE, LEASE, request_timeout(&timings));
    let (runner, standing) = Runner::new(name, timings, store);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    Host {
        name: name.to_owned(),
        link,
        standing,
        stop: Some(stop),
        task,
    }
}

/// What the sampler saw: when each host started and stopped acting, and the most hosts that
/// acted at the same instant.
#[derive(Default)]
struct Timeline {
    /// (instant, host index, acting)
    changes: Vec<(Instant, usize, bool)>,
    max_acting: usize,
    /// Each host's last fencing deadline seen (exact, unlike the sampled changes).
    fence: Vec<Option<Instant>>,
    samples: u64,
}

impl Timeline {
    /// The first instant at or after `from` when a host other than `except` started acting.
    fn first_start_after(&self, from: Instant, except: usize) -> Option<(Instant, usize)> {
        self.changes
            .iter()
            .find(|(at, host, acting)| *acting && *host != except && *at >= from)
            .map(|(at, host, _)| (*at, *host))
    }

    /// When `host` stopped acting: its last fencing deadline, if it has passed.
    fn stopped(&self, host: usize) -> Option<Instant> {
        self.fence
            .get(host)
            .copied()
            .flatten()
            .filter(|until| *until <= Instant::now())
    }
}

/// Request timeout of the mirror writers in the handover test.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(5);

const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// Samples every host's `may_act` until the returned sender is dropped.
fn sample(
    standings: Vec<watch::Receiver<Standing>>,
) -> (Arc<Mutex<Timeline>>, oneshot::Sender<()>) {
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let (done, mut finished) = oneshot::channel::<()>();
    let shared = timeline.clone();
    tokio::spawn(async move {
        let mut last = vec![false; standings.len()];
        shared.lock().expect("timeline lock").fence = vec![None; standings.len()];
        loop {
            let now = Instant::now();
            let acting: Vec<bool> = standings
                .iter()
                .map(|standing| standing.borrow().may_act(now))
                .collect();
            {
                let mut timeline = shared.lock().expect("timeline lock");
                timeline.samples += 1;
                let count = acting.iter().filter(|a| **a).count();
                timeline.max_acting = timeline.max_acting.max(count);
                for (host, standing) in standings.iter().enumerate() {
                    if let Role::Leader { until } = standing.borrow().role {
                        timeline.fence[host] = Some(until);
                    }
                }
                for (host, (was, is)) in last.iter().zip(&acting).enumerate() {
                    if was != is {
                        timeline.changes.push((now, host, *is));
                    }
                }
            }
            last = acting;
            tokio::select! {
                () = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = &mut finished => return,
            }
        }
    });
    (timeline, done)
}

/// Waits until exactly one host acts and returns its index.
async fn wait_for_leader(hosts: &[Host], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let now = Instant::now();
        let acting: Vec<usize> = (0..hosts.len())
            .filter(|i| hosts[*i].standing.borrow().may_act(now))
            .collect();
        if let [one] = acting.as_slice() {
            return *one;
        }
        assert!(
            now < deadline,
            "no single leader within {within:?}: {acting:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until a host other than `except` acts; returns it and when.
async fn wait_for_other(hosts: &[Host], except: usize, within: Duration) -> (usize, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let now = Instant::now();
        if let Some(i) =
            (0..hosts.len()).find(|i| *i != except && hosts[*i].standing.borrow().may_act(now))
        {
            return (i, now);
        }
        assert!(now < deadline, "nobody took over within {within:?}");
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

fn lease_holder(fake: &FakeApi) -> (Option<String>, i64) {
    let lease = fake
        .object("Lease", NAMESPACE, LEASE)
        .expect("the Lease exists");
    let holder = lease
        .pointer("/spec/holderIdentity")
        .and_then(|v| v.as_str())
        .filter(|h| !h.is_empty())
        .map(str::to_owned);
    let transitions = lease
        .pointer("/spec/leaseTransitions")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    (holder, transitions)
}

fn bench(key: &str, value: Duration) {
    println!("BENCH {key}\t{}\tms", value.as_millis());
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Three hosts: exactly one leads, the others follow it; the leader is killed (its task
/// dropped, its link cut); another takes over within lease_duration + retry. Returns the
/// takeover time.
async fn kill_scenario(timings: Timings) -> Duration {
    let fake = FakeApi::start().await;
    let mut hosts = Vec::new();
    for name in ["node-a", "node-b", "node-c"] {
        hosts.push(start_host(&fake, name, timings).await);
    }
    let (timeline, done) = sample(hosts.iter().map(|h| h.standing.clone()).collect());
    let leader = wait_for_leader(&hosts, timings.lease_duration * 2).await;
    // Let a few renewals pass: the leader stays, the others follow it by name.
    tokio::time::sleep(timings.retry_period * 3).await;
    assert_eq!(wait_for_leader(&hosts, Duration::ZERO).await, leader);
    for (i, host) in hosts.iter().enumerate() {
        let standing = host.standing.borrow().clone();
        if i != leader {
            assert_eq!(
                standing.role,
                Role::Follower {
                    holder: hosts[leader].name.clone()
                },
                "{}",
                host.name
            );
        }
    }
    let (holder, transitions_before) = lease_holder(&fake);
    assert_eq!(holder.as_deref(), Some(hosts[leader].name.as_str()));

    // Kill: the process is gone and so is its network.
    let killed_at = Instant::now();
    hosts[leader].task.abort();
    hosts[leader].link.set_cut(true);
    let bound = timings.lease_duration + timings.retry_period * 2 + SCHEDULING_SLACK;
    let (next, took_at) = wait_for_other(&hosts, leader, bound).await;
    let takeover = took_at - killed_at;
    // It waited for the Lease to expire: at least lease_duration after the last renewal it
    // saw, which was at most a retry period (and a bit of jitter) before the kill.
    assert!(
        takeover >= timings.lease_duration - timings.retry_period.mul_f64(1.2),
        "took over after {:.2} s, before the Lease could have expired",
        secs(takeover)
    );
    tokio::time::sleep(timings.retry_period * 2).await;
    let (holder, transitions_after) = lease_holder(&fake);
    assert_eq!(holder.as_deref(), Some(hosts[next].name.as_str()));
    assert_eq!(transitions_after, transitions_before + 1);
    drop(done);
    let timeline = timeline.lock().expect("timeline lock");
    assert!(timeline.samples > 100, "the sampler ran");
    assert_eq!(timeline.max_acting, 1, "two hosts acted at once");
    takeover
}

/// Two hosts: the leader's link to the API is cut. It stops acting by its renew deadline,
/// before the other may acquire (lease_duration - renew_deadline earlier); the other takes
/// over; the healed host stays a follower. Returns (partition → old leader stops,
/// partition → new leader acts, gap between the two).
async fn partition_scenario(timings: Timings) -> (Duration, Duration, Duration) {
    let fake = FakeApi::start().await;
    let hosts = vec![
        start_host(&fake, "node-a", timings).await,
        start_host(&fake, "node-b", timings).await,
    ];
    let (timeline, done) = sample(hosts.iter().map(|h| h.standing.clone()).collect());
    let leader = wait_for_leader(&hosts, timings.lease_duration * 2).await;
    tokio::time::sleep(timings.retry_period * 2).await;

    let cut_at = Instant::now();
    hosts[leader].link.set_cut(true);
    let bound = timings.lease_duration + timings.retry_period * 2 + SCHEDULING_SLACK;
    let (next, took_at) = wait_for_other(&hosts, leader, bound).await;
    // The partitioned host still runs, and does not act.
    assert!(!hosts[leader].standing.borrow().may_act(Instant::now()));
    assert!(!hosts[leader].task.is_finished());

    // Healed: it learns the new holder and takes nothing back.
    hosts[leader].link.set_cut(false);
    tokio::time::sleep(timings.retry_period * 4).await;
    assert_eq!(
        hosts[leader].standing.borrow().role,
        Role::Follower {
            holder: hosts[next].name.clone()
        }
    );
    assert!(hosts[next].standing.borrow().may_act(Instant::now()));

    drop(done);
    let timeline = timeline.lock().expect("timeline lock");
    assert_eq!(timeline.max_acting, 1, "two hosts acted at once");
    let stopped_at = timeline.stopped(leader).expect("the old leader stopped");
    let (started_at, started) = timeline
        .first_start_after(cut_at, leader)
        .expect("the other started");
    assert_eq!(started, next);
    let stop = stopped_at.saturating_duration_since(cut_at);
    let gap = started_at.saturating_duration_since(stopped_at);
    assert!(
        stop <= timings.renew_deadline,
        "the partitioned leader acted {:.2} s after the cut (renew deadline {:.2} s)",
        secs(stop),
        secs(timings.renew_deadline)
    );
    // The fence: the new holder started at least lease_duration - renew_deadline after the
    // old one's deadline (a late sample only makes the gap look larger).
    let margin = timings.lease_duration - timings.renew_deadline;
    assert!(
        gap >= margin,
        "only {:.3} s between the old leader stopping and the new one starting",
        secs(gap)
    );
    (stop, took_at - cut_at, gap)
}

/// Two hosts: the leader stops gracefully and releases the Lease; the other takes over at once
/// (its watch sees the release; at worst its next read, within a retry period). Returns the
/// takeover time.
async fn graceful_scenario(timings: Timings) -> Duration {
    let fake = FakeApi::start().await;
    let mut hosts = vec![
        start_host(&fake, "node-a", timings).await,
        start_host(&fake, "node-b", timings).await,
    ];
    let (timeline, done) = sample(hosts.iter().map(|h| h.standing.clone()).collect());
    let leader = wait_for_leader(&hosts, timings.lease_duration * 2).await;
    // Stop half-way between two reads of the follower (the hosts started together, so their
    // reads are roughly in phase with the leader's renewals): an honest, not a lucky, time.
    tokio::time::sleep(timings.retry_period * 2 + timings.retry_period / 2).await;
    let (_, transitions_before) = lease_holder(&fake);

    let stopped_at = Instant::now();
    if let Some(stop) = hosts[leader].stop.take() {
        let _ = stop.send(());
    }
    // The loop ends after the release, and the host stopped acting at once.
    tokio::time::timeout(timings.retry_period * 2, &mut hosts[leader].task)
        .await
        .expect("the stopped loop ends")
        .expect("the loop did not panic");
    assert!(!hosts[leader].standing.borrow().may_act(Instant::now()));
    let (next, took_at) =
        wait_for_other(&hosts, leader, timings.lease_duration + SCHEDULING_SLACK).await;
    let takeover = took_at - stopped_at;
    // Without the release the other host would have waited for the lease duration (a few
    // milliseconds are expected; the printed time is the measurement, this bound only proves
    // the release was used, with room for a loaded machine).
    assert!(
        takeover < timings.lease_duration - timings.retry_period,
        "graceful takeover took {:.2} s",
        secs(takeover)
    );
    let (holder, transitions_after) = lease_holder(&fake);
    assert_eq!(holder.as_deref(), Some(hosts[next].name.as_str()));
    assert_eq!(transitions_after, transitions_before + 1);
    drop(done);
    assert_eq!(timeline.lock().expect("timeline lock").max_acting, 1);
    takeover
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_leader_another_takes_over_after_the_lease() {
    let t = quick();
    let takeover = kill_scenario(t).await;
    println!(
        "kill: takeover after {:.2} s (lease {} s, retry {} s)",
        secs(takeover),
        secs(t.lease_duration),
        secs(t.retry_period)
    );
    bench("ha_quick_kill_takeover", takeover);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_stops_before_another_acquires() {
    let (stop, takeover, gap) = partition_scenario(quick()).await;
    bench("ha_quick_partition_stop", stop);
    bench("ha_quick_partition_takeover", takeover);
    bench("ha_quick_partition_gap", gap);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_release_hands_over_within_a_retry_period() {
    let takeover = graceful_scenario(quick()).await;
    bench("ha_quick_graceful_takeover", takeover);
}

/// Timings whose retry period (10 s) no watch-driven takeover can be mistaken for.
fn slow_retry() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(30),
        renew_deadline: Duration::from_secs(20),
        retry_period: Duration::from_secs(10),
    }
}

/// The goal for a released Lease: taken by the standby within this of the holder's stop
/// (README, "High availability"). The assertion adds [`SCHEDULING_SLACK`].
const RELEASE_TAKEN_WITHIN: Duration = Duration::from_millis(500);

/// Two hosts; the leader stops gracefully half a retry period into the follower's wait. Returns how long after the stop the other host acted, and the Lease's
/// holder and transitions (before, after).
async fn release_takeover(fake: &FakeApi, timings: Timings) -> (Duration, i64, i64) {
    // One after the other: two first reads of a missing Lease would both create it, and the
    // loser would wait a whole (long) retry period before it reads again.
    let mut hosts = vec![start_host(fake, "node-a", timings).await];
    let leader = wait_for_leader(&hosts, SCHEDULING_SLACK * 2).await;
    hosts.push(start_host(fake, "node-b", timings).await);
    let follower = 1;
    let deadline = Instant::now() + SCHEDULING_SLACK * 2;
    while hosts[follower].standing.borrow().holder() != Some(hosts[leader].name.as_str()) {
        assert!(
            Instant::now() < deadline,
            "the other host follows the leader"
        );
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    tokio::time::sleep(timings.retry_period / 2).await;
    let (_, before) = lease_holder(fake);
    let stopped_at = Instant::now();
    if let Some(stop) = hosts[leader].stop.take() {
        let _ = stop.send(());
    }
    let (next, took_at) =
        wait_for_other(&hosts, leader, timings.retry_period * 2 + SCHEDULING_SLACK).await;
    assert_eq!(next, follower);
    let (holder, after) = lease_holder(fake);
    assert_eq!(holder.as_deref(), Some(hosts[follower].name.as_str()));
    for host in &mut hosts {
        if let Some(stop) = host.stop.take() {
            let _ = stop.send(());
        }
        host.task.abort();
    }
    (took_at - stopped_at, before, after)
}

/// A standby watches the Lease (one object, by a fieldSelector on its name) and takes it
/// as soon as it is released, not at its next retry 10 s later. With the watch refused
/// (403), the retry period still hands it over: the watch only makes it quicker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_at_once_through_the_watch() {
    let timings = slow_retry();
    let fake = FakeApi::start().await;
    let (takeover, before, after) = release_takeover(&fake, timings).await;
    bench("ha_release_watch_takeover", takeover);
    assert!(
        takeover < RELEASE_TAKEN_WITHIN + SCHEDULING_SLACK,
        "the released Lease was taken {} ms after the stop (retry period {} s)",
        takeover.as_millis(),
        timings.retry_period.as_secs()
    );
    assert_eq!(after, before + 1, "one transition");
    let watches: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.is_watch() && r.path.ends_with("/leases"))
        .collect();
    assert!(!watches.is_empty(), "the hosts watch the Lease");
    for watch in &watches {
        assert_eq!(
            watch.query_param("fieldSelector").as_deref(),
            Some(format!("metadata.name={LEASE}").as_str()),
            "{watch:?}"
        );
    }

    // The fallback: no watch allowed; the next retry takes the released Lease.
    let fake = FakeApi::start().await;
    fake.forbid("watch", "leases");
    let timings = Timings {
        retry_period: Duration::from_secs(2),
        ..timings
    };
    let (takeover, before, after) = release_takeover(&fake, timings).await;
    bench("ha_release_retry_takeover", takeover);
    assert!(
        takeover < timings.retry_period.mul_f64(1.1) + SCHEDULING_SLACK,
        "without the watch, the next retry takes it: {} ms",
        takeover.as_millis()
    );
    assert_eq!(after, before + 1, "one transition");
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.is_watch() && r.path.ends_with("/leases") && r.status == 403),
        "the watch was refused"
    );
}

/// The three scenarios side by side with client-go's default timings (15/10/2 s): about 25 s
/// of wall time, mostly waiting for Leases to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_timings_takeover_times() {
    let t = defaults();
    let (kill, (stop, partition, gap), graceful) = tokio::join!(
        kill_scenario(t),
        partition_scenario(t),
        graceful_scenario(t)
    );
    assert!(kill <= t.lease_duration + t.retry_period * 2);
    bench("ha_kill_takeover", kill);
    bench("ha_partition_stop", stop);
    bench("ha_partition_takeover", partition);
    bench("ha_partition_gap", gap);
    bench("ha_graceful_takeover", graceful);
}

fn record(external_port: u16, nonce: &str) -> MappingRecord {
    MappingRecord {
        owner: Owner::new("media", "jellyfin"),
        service_port: 443,
        protocol: Protocol::Tcp,
        external_port,
        replaces: Vec::new(),
        internal: Endpoint::new(std::net::Ipv4Addr::new(192, 168, 1, 250), external_port),
        target: Endpoint::new(std::net::Ipv4Addr::new(192, 168, 1, 40), 443),
        target_source: TargetSource::LoadBalancer,
        backend: Backend::Pcp,
        router: "192.168.1.1".to_owned(),
        nonce: Some(nonce.to_owned()),
        times: LeaseTimes {
            lifetime_secs: 3600,
            granted_at: "2026-12-05T08:00:00Z".parse().ok(),
            renew_at: "2026-12-05T08:30:00Z".parse().ok(),
            expires_at: "2026-12-05T09:00:00Z".parse().ok(),
        },
        epoch: Some(7),
        external_address: Some(std::net::Ipv4Addr::new(203, 0, 113, 7)),
        status: MappingStatus::Active,
        retry_at: None,
        failures: 0,
        failure: None,
        last_error: None,
    }
}

fn state_of(records: impl IntoIterator<Item = MappingRecord>) -> State {
    State {
        mappings: records.into_iter().map(|r| (r.key(), r)).collect(),
        ..State::default()
    }
}

#[tokio::test]
async fn mirror_and_lease_writes_carry_preconditions() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let timeout = MIRROR_TIMEOUT;

    // The mapping mirror: none yet; a create; a read gives back the same records and nonces.
    let mirror = MirrorStore::new(client.clone(), NAMESPACE, LEASE, timeout);
    assert_eq!(mirror.get().await.expect("get"), None);
    let first = state_of([record(8443, "0123456789abcdef01234567")]);
    let rv1 = mirror
        .write(&first, "node-a", 1, None)
        .await
        .expect("create the mirror");
    let read = mirror.get().await.expect("get").expect("it exists");
    assert_eq!(read.state, first);
    assert_eq!(read.resource_version, rv1);
    assert_eq!(read.holder.as_deref(), Some("node-a"));
    assert_eq!(read.transitions, Some(1));
    let stored = fake
        .object("ConfigMap", NAMESPACE, "holepunch-mappings")
        .expect("the ConfigMap is stored");
    assert!(
        stored
            .pointer("/data/mappings.toml")
            .and_then(|v| v.as_str())
            .is_some_and(|text| text.contains("0123456789abcdef01234567")),
        "{stored}"
    );

    // The next holder replaces them with the current version...
    let second = state_of([
        record(8443, "0123456789abcdef01234567"),
        record(8080, "fedcba9876543210fedcba98"),
    ]);
    let rv2 = mirror
        .write(&second, "node-b", 2, Some(&rv1))
        .await
        .expect("replace with the current version");
    assert_ne!(rv2, rv1);
    // ...and a writer with the stale version is refused (409), changing nothing.
    let stale = mirror
        .write(&first, "node-a", 1, Some(&rv1))
        .await
        .expect_err("a stale version is refused");
    assert_eq!(stale.failure(), WriteFailure::Conflict, "{stale}");
    // A second create is a conflict too.
    let again = mirror
        .write(&first, "node-a", 1, None)
        .await
        .expect_err("the mirror exists");
    assert_eq!(again.failure(), WriteFailure::Conflict, "{again}");
    let read = mirror.get().await.expect("get").expect("it exists");
    assert_eq!(read.state, second);
    assert_eq!(read.holder.as_deref(), Some("node-b"));

    // The Lease: create once, a second create conflicts; a replace with a stale version
    // conflicts, with the current one goes through.
    let leases = LeaseStore::new(client, NAMESPACE, LEASE, timeout);
    assert_eq!(leases.get().await.expect("get"), None);
    let mine = LeaseRecord {
        holder: Some("node-a".into()),
        lease_duration_secs: Some(3),
        // MicroTime: the API keeps microseconds, so the test writes whole seconds.
        acquire_time: jiff::Timestamp::from_second(1_800_000_000).ok(),
        renew_time: jiff::Timestamp::from_second(1_800_000_001).ok(),
        transitions: 0,
    };
    let created = leases.create(&mine).await.expect("create");
    assert_eq!(created.record, mine);
    let conflict = leases.create(&mine).await.expect_err("exists");
    assert_eq!(conflict.failure(), WriteFailure::Conflict, "{conflict}");
    let theirs = LeaseRecord {
        holder: Some("node-b".into()),
        transitions: 1,
        ..mine.clone()
    };
    let taken = leases
        .replace(&theirs, &created.resource_version)
        .await
        .expect("replace with the current version");
    assert_ne!(taken.resource_version, created.resource_version);
    let stale = leases
        .replace(&mine, &created.resource_version)
        .await
        .expect_err("a stale version is refused");
    assert_eq!(stale.failure(), WriteFailure::Conflict, "{stale}");
    let current = leases.get().await.expect("get").expect("exists");
    assert_eq!(current.record, theirs);
}

#[tokio::test]
async fn an_unreachable_api_fails_within_the_request_timeout() {
    let fake = FakeApi::start().await;
    let link = Link::start(fake.addr()).await;
    let client = client_through(&fake, &link).await;
    let timeout = Duration::from_millis(300);
    // Reachable: the read works (with time to spare for a loaded machine).
    let leases = LeaseStore::new(client, NAMESPACE, LEASE, MIRROR_TIMEOUT);
    assert_eq!(leases.get().await.expect("get through the link"), None);
    // A server that accepts but never answers: the request ends at the timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let yaml = fake
        .kubeconfig_yaml(fake.token())
        .replace(&fake.url(), &format!("https://{silent_addr}"));
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&yaml).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kubeconfig usable");
    let hung = LeaseStore::new(
        kube::Client::try_from(config).expect("client"),
        NAMESPACE,
        LEASE,
        timeout,
    );
    let started = Instant::now();
    let error = hung.get().await.expect_err("no answer");
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(
        std::error::Error::source(&error)
            .is_some_and(|cause| cause.to_string().contains("did not answer within 300 ms")),
        "{error}"
    );
    assert_eq!(error.failure(), WriteFailure::Other);
}

/// The mirror across a handover: the leader saves its records; a follower may not; the leader
/// is partitioned away, the next holder takes over the same records (same PCP nonce) and
/// saves its own; the old leader, healed, is refused by its clock, and even a copy of it that
/// still believed it leads is refused by the precondition (a later holder wrote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_holder_takes_over_the_mirrored_mappings() {
    let t = quick();
    let fake = FakeApi::start().await;
    let hosts = vec![
        start_host(&fake, "node-a", t).await,
        start_host(&fake, "node-b", t).await,
    ];
    let leader = wait_for_leader(&hosts, t.lease_duration * 2).await;
    let other = 1 - leader;
    let writer = |host: usize| {
        let fake = &fake;
        let link = &hosts[host].link;
        async move {
            // A generous timeout: the quick timings' 400 ms would fail a first TLS request on
            // a loaded machine, and the mirror is fenced by the Lease, not by its timeout.
            MirrorWriter::new(MirrorStore::new(
                client_through(fake, link).await,
                NAMESPACE,
                LEASE,
                MIRROR_TIMEOUT,
            ))
        }
    };
    let mut old = writer(leader).await;
    let mut new = writer(other).await;

    assert_eq!(old.take_over().await.expect("read the mirror"), None);
    let first = state_of([record(8443, "0123456789abcdef01234567")]);
    let leader_standing = hosts[leader].standing.borrow().clone();
    old.save(&first, &leader_standing)
        .await
        .expect("the leader saves its records");
    let follower_standing = hosts[other].standing.borrow().clone();
    let refused = new
        .save(&first, &follower_standing)
        .await
        .expect_err("a follower may not save");
    assert!(matches!(refused, LeaseError::Fenced { .. }), "{refused}");

    hosts[leader].link.set_cut(true);
    let (next, _) = wait_for_other(
        &hosts,
        leader,
        t.lease_duration + t.retry_period * 2 + SCHEDULING_SLACK,
    )
    .await;
    assert_eq!(next, other);
    let taken = new
        .take_over()
        .await
        .expect("read the mirror")
        .expect("the old leader's records are there");
    assert_eq!(taken.state, first);
    assert_eq!(taken.holder.as_deref(), Some(hosts[leader].name.as_str()));
    let nonce = taken
        .state
        .mappings
        .values()
        .next()
        .and_then(|r| r.nonce.clone());
    assert_eq!(nonce.as_deref(), Some("0123456789abcdef01234567"));
    let second = state_of([
        record(8443, "0123456789abcdef01234567"),
        record(8080, "fedcba9876543210fedcba98"),
    ]);
    let new_standing = hosts[other].standing.borrow().clone();
    assert!(new_standing.transitions > leader_standing.transitions);
    new.save(&second, &new_standing)
        .await
        .expect("the new leader saves");

    // Healed, the old leader no longer acts: refused before any request.
    hosts[leader].link.set_cut(false);
    let now_standing = hosts[leader].standing.borrow().clone();
    let refused = old
        .save(&first, &now_standing)
        .await
        .expect_err("the old leader is fenced");
    assert!(matches!(refused, LeaseError::Fenced { .. }), "{refused}");
    // A stale copy that still claims to lead: the write conflicts, the reread shows a later
    // holder, nothing is overwritten.
    let zombie = holepunch::ha::runner::Standing {
        role: Role::Leader {
            until: Instant::now() + Duration::from_secs(60),
        },
        ..leader_standing
    };
    let refused = old
        .save(&first, &zombie)
        .await
        .expect_err("a later holder wrote");
    assert!(matches!(refused, LeaseError::Fenced { .. }), "{refused}");
    let stored = MirrorStore::new(fake.client().await, NAMESPACE, LEASE, MIRROR_TIMEOUT)
        .get()
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(stored.state, second);
    assert_eq!(stored.holder.as_deref(), Some(hosts[other].name.as_str()));
}
