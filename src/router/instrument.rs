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
        // A request the HA fence refused was never sent (README, "High availability").
        if matches!(result, Err(RouterError::Fenced)) {
            return;
        }
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
        // Every verify is a request, also one with no lease to ask about: each backend still
        // asks the router something (PCP ANNOUNCE, NAT-PMP's external address, UPnP's
        // GetExternalIPAddress), and the session sends one to learn whether a silent router
        // answers again (ARCHITECTURE.md, "The loop", step 5).
        self.record(backend, Operation::Verify, &result, started);
        result
    }

    fn take_restart(&mut self) -> bool {
        self.inner.take_restart()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::model::{Endpoint, Owner, Protocol};
    use crate::router::NoRouter;

    /// Remembers every request reported, as (operation, result).
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(Operation, &'static str)>>);

    impl RequestLog for Recorded {
        fn router_request(
            &self,
            _backend: Backend,
            operation: Operation,
            result: &'static str,
            _started: Timestamp,
            _took: Duration,
        ) {
            self.0
                .lock()
                .expect("not poisoned")
                .push((operation, result));
        }

        fn probed(&self, _found: Option<Backend>, _started: Timestamp, _took: Duration) {}
    }

    /// A router that answers every verify with "nothing lost" and counts the asks.
    #[derive(Default)]
    struct Answers {
        asked: usize,
    }

    impl PortMapper for Answers {
        fn backend(&self) -> Backend {
            Backend::Pcp
        }

        async fn map(&mut self, request: &MapRequest) -> Result<Grant, RouterError> {
            NoRouter.map(request).await
        }

        async fn unmap(&mut self, _lease: &Lease) -> Result<(), RouterError> {
            Ok(())
        }

        async fn lost(&mut self, _leases: &[Lease]) -> Result<Vec<MappingKey>, RouterError> {
            self.asked += 1;
            Ok(Vec::new())
        }
    }

    fn lease() -> Lease {
        Lease {
            owner: Owner {
                namespace: "default".into(),
                name: "web".into(),
            },
            protocol: Protocol::Tcp,
            external_port: 8080,
            internal: Endpoint {
                address: "192.168.77.10".parse().expect("ip"),
                port: 8080,
            },
            nonce: None,
        }
    }

    #[tokio::test]
    async fn every_verify_is_counted_also_one_with_no_lease_and_nothing_lost() {
        let log = Recorded::default();
        let mut router = Answers::default();
        let mut instrumented = Instrumented::new(&mut router, &log);
        // With a lease (the usual verify) and without one (the session asking whether a
        // silent router answers again): both reach the router, both are counted.
        assert!(
            instrumented
                .lost(&[lease()])
                .await
                .expect("answers")
                .is_empty()
        );
        assert!(instrumented.lost(&[]).await.expect("answers").is_empty());
        assert_eq!(router.asked, 2);
        assert_eq!(
            *log.0.lock().expect("not poisoned"),
            vec![(Operation::Verify, "ok"), (Operation::Verify, "ok")]
        );
    }
}
