//! The election loop: every retry period, and at once when a host that does not act sees the
//! Lease released, read the Lease, feed it to the pure [`Election`], write what it decides,
//! and publish where this host stands; on stop, hand the Lease back at once (README.md, "High
//! availability").
//!
//! What it publishes ([`Standing`]) carries the fencing deadline itself, not a flag: whoever
//! acts asks [`Standing::may_act`] with the current instant, so acting stops on time even when
//! this loop is stuck in a request or gone.
//!
//! A later step plugs this into the daemon: the daemon holds the floating address and writes
//! the router and nftables only while `may_act` is true.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use rand::Rng;
use tokio::sync::watch;

use super::election::{Decision, Election, Role, Timings};
use super::lease::LeaseStore;

/// Followers and candidates wait up to this fraction of the retry period more, so that hosts
/// that started together do not all write at the same instant. (client-go jitters its acquire
/// loop too, by up to 1.2 retry periods; a tenth keeps the takeover quick.)
const CANDIDATE_JITTER_FRACTION: f64 = 0.1;

/// Where this host stands, as last published by the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub identity: String,
    pub role: Role,
    /// The Lease's transitions as last seen (which holder generation we are in).
    pub transitions: i32,
}

impl Standing {
    /// Whether this host may act at `now`: it holds the Lease and its fencing deadline has not
    /// passed.
    pub fn may_act(&self, now: Instant) -> bool {
        matches!(self.role, Role::Leader { until } if now < until)
    }

    /// The current holder as far as this host knows (`None`: nobody, or unknown).
    pub fn holder(&self) -> Option<&str> {
        match &self.role {
            Role::Leader { .. } => Some(&self.identity),
            Role::Follower { holder } => Some(holder),
            Role::Candidate => None,
        }
    }
}

/// Where the kernel keeps this host's name.
const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// Why this host's identity could not be found.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read this host's name from {HOSTNAME_PATH}; set ha.identity")]
    ReadHostname {
        #[source]
        source: std::io::Error,
    },
    #[error("this host has no name ({HOSTNAME_PATH} is empty); set ha.identity")]
    EmptyHostname,
}

/// The holder identity: `ha.identity`, else the host name.
pub fn identity(ha: &crate::config::HaConfig) -> Result<String, IdentityError> {
    if let Some(identity) = &ha.identity {
        return Ok(identity.clone());
    }
    let name = std::fs::read_to_string(HOSTNAME_PATH)
        .map_err(|source| IdentityError::ReadHostname { source })?;
    let name = name.trim();
    if name.is_empty() {
        return Err(IdentityError::EmptyHostname);
    }
    Ok(name.to_owned())
}

/// One host's election loop.
pub struct Runner {
    election: Election,
    store: LeaseStore,
    standing: watch::Sender<Standing>,
}

impl Runner {
    /// A loop for `identity` over `store`, and the receiver of its [`Standing`].
    pub fn new(
        identity: impl Into<String>,
        timings: Timings,
        store: LeaseStore,
    ) -> (Runner, watch::Receiver<Standing>) {
        let election = Election::new(identity, timings);
        let (standing, receiver) = watch::channel(Standing {
            identity: election.identity().to_owned(),
            role: Role::Candidate,
            transitions: 0,
        });
        (
            Runner {
                election,
                store,
                standing,
            },
            receiver,
        )
    }

    /// The loop `[ha]` configures, for `identity` (see [`identity`]), over `client`.
    pub fn from_config(
        client: kube::Client,
        ha: &crate::config::HaConfig,
        identity: String,
    ) -> (Runner, watch::Receiver<Standing>) {
        let timings = Timings::from_config(ha);
        let store = LeaseStore::new(
            client,
            &ha.lease_namespace,
            &ha.lease_name,
            super::lease::request_timeout(&timings),
        );
        Runner::new(identity, timings, store)
    }

    /// Runs until `stop` completes, then releases the Lease if this host holds it.
    ///
    /// Besides every retry period, a host that does not act reads (and tries to take) the
    /// Lease as soon as its watch sees it released: a graceful handover then costs a watch
    /// event and two requests, not up to a retry period (README.md, "High availability").
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let releases = self.store.releases(self.election.timings().retry_period);
        tokio::pin!(releases);
        let mut watching = true;
        'run: loop {
            self.step().await;
            let next = tokio::time::Instant::now() + self.wait();
            // The watch is read while acting too (our own renewals), so that its events do not
            // pile up; only a host that does not act wakes for a release.
            let standby = !self.election.may_act(Instant::now());
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => break,
                    event = releases.next(), if watching => match event {
                        Some(()) if standby => {
                            tracing::debug!("leader election: the Lease was released; taking it");
                            break;
                        }
                        Some(()) => {}
                        None => watching = false,
                    },
                    () = &mut stop => break 'run,
                }
            }
        }
        self.release().await;
    }

    /// One read-decide-write round.
    pub async fn step(&mut self) {
        match self.store.get().await {
            Ok(lease) => self.election.observe(lease, Instant::now()),
            Err(error) => {
                tracing::warn!(error = %crate::reconcile::with_causes(&error), "leader election: cannot read the Lease");
                self.publish();
                return;
            }
        }
        let sent_at = Instant::now();
        let outcome = match self.election.decide(sent_at, Timestamp::now()) {
            Decision::Nothing => None,
            Decision::Create(record) => Some(self.store.create(&record).await),
            Decision::Update {
                record,
                resource_version,
            } => Some(self.store.replace(&record, &resource_version).await),
        };
        match outcome {
            None => {}
            Some(Ok(lease)) => self.election.written(lease, sent_at, Instant::now()),
            Some(Err(error)) => {
                self.election.write_failed(error.failure());
                tracing::debug!(error = %crate::reconcile::with_causes(&error), "leader election: write not taken");
            }
        }
        self.publish();
    }

    /// Hands the Lease back (client-go's ReleaseOnCancel), so that another host takes over
    /// on its next read instead of after the lease duration.
    pub async fn release(&mut self) {
        // Stop acting first, whatever the write below does.
        self.standing
            .send_modify(|standing| standing.role = Role::Candidate);
        for _ in 0..2 {
            let Some(Decision::Update {
                record,
                resource_version,
            }) = self.election.release(Timestamp::now())
            else {
                break;
            };
            match self.store.replace(&record, &resource_version).await {
                Ok(lease) => {
                    self.election.released(lease, Instant::now());
                    tracing::info!("leader election: released the Lease");
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = %crate::reconcile::with_causes(&error), "leader election: cannot release the Lease; the other hosts take it when it expires");
                    // A stale read (our last renewal went through unseen): read and retry.
                    match self.store.get().await {
                        Ok(lease) => self.election.observe(lease, Instant::now()),
                        Err(_) => break,
                    }
                }
            }
        }
        // Whether or not the release went through, this host no longer acts.
        self.standing
            .send_modify(|standing| standing.role = Role::Candidate);
    }

    fn publish(&self) {
        let standing = Standing {
            identity: self.election.identity().to_owned(),
            role: self.election.role(Instant::now()),
            transitions: self
                .election
                .observed()
                .map_or(0, |lease| lease.record.transitions),
        };
        self.standing.send_if_modified(|old| {
            if *old == standing {
                return false;
            }
            if old.holder() != standing.holder() {
                tracing::info!(role = ?standing.role, holder = ?standing.holder(), "leader election: standing changed");
            }
            *old = standing;
            true
        });
    }

    fn wait(&self) -> Duration {
        let retry = self.election.timings().retry_period;
        if self.election.may_act(Instant::now()) {
            return retry;
        }
        let jitter = rand::rng().random_range(0.0..CANDIDATE_JITTER_FRACTION);
        retry.mul_f64(1.0 + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ha(identity: Option<&str>) -> crate::config::HaConfig {
        crate::config::HaConfig {
            lease_name: "holepunch".into(),
            lease_namespace: "holepunch".into(),
            identity: identity.map(str::to_owned),
            address: None,
            interface: None,
            lease_duration_secs: 15,
            renew_deadline_secs: 10,
            retry_period_secs: 2,
        }
    }

    #[test]
    fn identity_is_the_configured_one_else_the_host_name() {
        assert_eq!(
            identity(&ha(Some("node-a"))).ok().as_deref(),
            Some("node-a")
        );
        let host = std::fs::read_to_string(HOSTNAME_PATH).expect("the test host has a name");
        assert_eq!(identity(&ha(None)).ok().as_deref(), Some(host.trim()));
    }

    #[test]
    fn standing_acts_only_as_leader_before_the_deadline() {
        let now = Instant::now();
        let leader = Standing {
            identity: "node-a".into(),
            role: Role::Leader {
                until: now + Duration::from_secs(1),
            },
            transitions: 0,
        };
        assert!(leader.may_act(now));
        assert!(!leader.may_act(now + Duration::from_secs(1)));
        assert_eq!(leader.holder(), Some("node-a"));
        let follower = Standing {
            role: Role::Follower {
                holder: "node-b".into(),
            },
            ..leader
        };
        assert!(!follower.may_act(now));
        assert_eq!(follower.holder(), Some("node-b"));
    }
}
