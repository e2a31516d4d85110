//! The [`Firewall`] port of the daemon's loop: what it needs from the local packet filter
//! (apply a ruleset, read it back, remove it), its two implementations (the kernel's nftables
//! over netlink, [`NftFirewall`]; an in-memory [`MemoryFirewall`] for in-process tests), and
//! [`LocalRules`], which keeps the table equal to the state (ARCHITECTURE.md, "The loop").

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Forward, NftError, NftFirewall, Ruleset};

/// Why a firewall call failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(transparent)]
    Nft(#[from] NftError),
    /// The blocking netlink call panicked or was cancelled.
    #[error("the nftables call did not finish")]
    Interrupted(#[source] tokio::task::JoinError),
}

/// The local packet filter, as the loop uses it. Idempotent like the router backends:
/// applying what is there changes nothing, removing what is gone is success.
pub trait Firewall: Send {
    /// Makes holepunch's table hold exactly `ruleset` (one atomic change).
    fn apply(
        &mut self,
        ruleset: &Ruleset,
    ) -> impl Future<Output = Result<(), FirewallError>> + Send;

    /// The forwards the table holds now, sorted; empty when there is no table.
    fn current(&mut self) -> impl Future<Output = Result<Vec<Forward>, FirewallError>> + Send;

    /// Deletes holepunch's table; `false` when there was none.
    fn remove(&mut self) -> impl Future<Output = Result<bool, FirewallError>> + Send;
}

impl Firewall for NftFirewall {
    async fn apply(&mut self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        let ruleset = ruleset.clone();
        // NOTE: netlink sockets block; keep them off the runtime's worker threads.
        tokio::task::spawn_blocking(move || NftFirewall.apply(&ruleset))
            .await
            .map_err(FirewallError::Interrupted)?
            .map_err(FirewallError::from)
    }

    async fn current(&mut self) -> Result<Vec<Forward>, FirewallError> {
        tokio::task::spawn_blocking(|| NftFirewall.current())
            .await
            .map_err(FirewallError::Interrupted)?
            .map_err(FirewallError::from)
    }

    async fn remove(&mut self) -> Result<bool, FirewallError> {
        tokio::task::spawn_blocking(|| NftFirewall.remove())
            .await
            .map_err(FirewallError::Interrupted)?
            .map_err(FirewallError::from)
    }
}

/// What a [`MemoryFirewall`] holds; shared with the test that owns a clone, which can read it
/// and change it underneath the loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryTable {
    /// The table, `None` when absent.
    pub ruleset: Option<Ruleset>,
    /// How many times it was applied or removed (a write to the kernel).
    pub writes: usize,
}

/// An in-memory [`Firewall`] for in-process tests (no root, no kernel). Clones share one
/// table.
#[derive(Debug, Default, Clone)]
pub struct MemoryFirewall {
    table: Arc<Mutex<MemoryTable>>,
}

impl MemoryFirewall {
    /// A copy of the table now.
    pub fn table(&self) -> MemoryTable {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes the table as someone else would (`nft flush table`, another tool).
    pub fn tamper(&self, ruleset: Option<Ruleset>) {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ruleset = ruleset;
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryTable) -> T) -> T {
        f(&mut self.table.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Firewall for MemoryFirewall {
    async fn apply(&mut self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        self.with(|table| {
            table.ruleset = Some(ruleset.clone());
            table.writes += 1;
        });
        Ok(())
    }

    async fn current(&mut self) -> Result<Vec<Forward>, FirewallError> {
        Ok(self.with(|table| {
            let mut forwards = table
                .ruleset
                .as_ref()
                .map(|r| r.forwards().to_vec())
                .unwrap_or_default();
            forwards.sort();
            forwards
        }))
    }

    async fn remove(&mut self) -> Result<bool, FirewallError> {
        Ok(self.with(|table| {
            table.writes += 1;
            table.ruleset.take().is_some()
        }))
    }
}

/// holepunch's nftables table, kept equal to the mappings in the state: applied when they
/// change, and every verify interval read back and re-applied if someone changed it.
#[derive(Debug, Default)]
pub struct LocalRules<F> {
    firewall: F,
    /// What was last applied; `None` until the first apply succeeds (or after a failure).
    applied: Option<Option<Ruleset>>,
    last_check: Option<tokio::time::Instant>,
}

impl<F: Firewall> LocalRules<F> {
    pub fn new(firewall: F) -> LocalRules<F> {
        LocalRules {
            firewall,
            applied: None,
            last_check: None,
        }
    }

    /// Whether the table was last read back at least `every` ago (or never).
    pub fn check_due(&self, every: std::time::Duration) -> bool {
        self.last_check.is_none_or(|at| at.elapsed() >= every)
    }

    /// Whether `wanted` differs from what was last applied (or nothing was applied yet):
    /// the next [`LocalRules::sync`] writes to the kernel.
    pub fn changes(&self, wanted: &Option<Ruleset>) -> bool {
        self.applied.as_ref() != Some(wanted)
    }

    /// Brings the table to `wanted`; with `check`, reads it back first even if nothing
    /// changed, and applies it again if someone changed it.
    pub async fn sync(&mut self, wanted: Option<Ruleset>, check: bool) {
        if check {
            self.last_check = Some(tokio::time::Instant::now());
        }
        if self.applied.as_ref() == Some(&wanted) {
            if !check {
                return;
            }
            let expected: Vec<Forward> = wanted
                .as_ref()
                .map(|r| {
                    let mut forwards = r.forwards().to_vec();
                    forwards.sort();
                    forwards
                })
                .unwrap_or_default();
            match self.firewall.current().await {
                Ok(current) if current == expected => return,
                Ok(current) => tracing::warn!(
                    expected = expected.len(),
                    found = current.len(),
                    "the nftables table changed underneath holepunch; applying it again"
                ),
                Err(e @ FirewallError::Interrupted(_)) => {
                    tracing::warn!(error = %e, "nftables check did not finish")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the nftables table back; applying it again")
                }
            }
        }
        let result = match &wanted {
            Some(ruleset) => self.firewall.apply(ruleset).await.map(|()| true),
            None => self.firewall.remove().await,
        };
        match result {
            Ok(changed) => {
                match &wanted {
                    Some(ruleset) => tracing::info!(
                        forwards = ruleset.forwards().len(),
                        "nftables table applied"
                    ),
                    None if changed => tracing::info!(
                        "nftables table removed (this exposure mode needs no local rules)"
                    ),
                    None => {}
                }
                self.applied = Some(wanted);
            }
            Err(e @ FirewallError::Interrupted(_)) => {
                tracing::error!(error = %e, "nftables update did not finish");
                self.applied = None;
            }
            Err(e) => {
                tracing::error!("{e}");
                self.applied = None;
            }
        }
    }
}
