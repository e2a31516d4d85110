//! Every router request reported to whoever counts them, without the router knowing who:
//! [`Instrumented`] wraps a [`PortMapper`] and tells a [`RequestLog`] (the daemon's
//! `metrics::Metrics`) what each request was for, how it ended and how long it took.

use std::time::{Duration, Instant};

use jiff::Timestamp;

use crate::model::{Backend, Lease, MappingKey};
use crate::router::{Grant, MapRequest, PortMapper, RouterError};

/// What a router request was for (the `operation` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Create, renew or restore a mapping.
    Map,
    Unmap,
    /// Ask which mappings the router lost (every verify interval).
    Verify,
    /// Find which protocol the router speaks (`router.backend = "auto"` or `"upnp"`).
    Probe,
    /// Create, renew or restore an IPv6 pinhole (README, "IPv6").
    PinholeOpen,
    PinholeClose,
}

/// Where router requests are reported.
pub trait RequestLog: Sync {
    /// One request through `backend` ended with `result` (see [`result_label`]).
    fn router_request(
        &self,
        backend: Backend,
        operation: Operation,
        result: &'static str,
        started: Timestamp,
        took: Duration,
    );

    /// A probe for the router's protocol finished: `found` is what answered, `None` when
    /// nothing did.
    fn probed(&self, found: Option<Backend>, started: Timestamp, took: Duration);
}

/// How a router request ended (the `result` label).
pub fn result_label<T>(result: &Result<T, RouterError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(RouterError::Conflict { .. }) => "conflict",
        Err(RouterError::Refused { .. }) => "refused",
        Err(_) => "unreachable",
    }
}

/// A [`PortMapper`] that reports every request to a [`RequestLog`].
pub struct Instrumented<'a, P> {
    inner: &'a mut P,
    log: &'a dyn RequestLog,
}

impl<'a, P: PortMapper> Instrumented<'a, P> {
    pub fn new(inner: &'a mut P, log: &'a dyn RequestLog) -> Self {
        Instrumented { inner, log }
    }

    fn record<T>(
        &self,
        backend: Backend,
        operation: Operation,
        result: &Result<T, RouterError>,
        started: (Timestamp, Instant),
    ) {
        self.log.router_request(
            backend,
            operation,
            result_label(result),
            started.0,
            started.1.elapsed(),
        );
    }
}

impl<P: PortMapper> PortMapper for Instrumented<'_, P> {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
        let started = (Timestamp::now(), Instant::now());
        let backend = self.inner.backend();
        let result = self.inner.map(request).await;
        self.record(backend, Operation::Map, &result, started);
        result
    }

    async fn unmap(&mut self, lease: &Lease) -> Result<(), RouterError> {
        let started = (Timestamp::now(), Instant::now());
        let backend = self.inner.backend();
        let result = self.inner.unmap(lease).await;
        self.record(backend, Operation::Unmap, &result, started);
        result
    }

    async fn lost(&mut self, leases: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
        let started = (Timestamp::now(), Instant::now());
        let backend = self.inner.backend();
        let result = self.inner.lost(leases).await;
        // NOTE: with nothing to ask about, backends send nothing: not a request.
        if !leases.is_empty() {
            self.record(backend, Operation::Verify, &result, started);
        }
        result
    }

    fn take_restart(&mut self) -> bool {
        self.inner.take_restart()
    }
}
