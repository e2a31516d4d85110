//! What the cluster is told after a pass (ARCHITECTURE.md, "The loop"): Events on the
//! Services and the LoadBalancer status, behind the [`ClusterReport`] port. The daemon's
//! implementation is the [`ClusterWriter`](super::writer::ClusterWriter), whose own task does
//! the writes, so a pass never waits for the API; in-process tests record what they are told.

use k8s_openapi::api::core::v1::Service;

use super::writer::ClusterWriter;
use crate::model::Problem;
use crate::state::State;

/// Where the loop reports to the cluster. Never waits for the API.
pub trait ClusterReport: Send {
    /// Tells the cluster the `problems` and the live mappings of `state`.
    fn submit(&mut self, problems: &[Problem], state: &State, services: &[Service]);
}

impl ClusterReport for ClusterWriter {
    fn submit(&mut self, problems: &[Problem], state: &State, services: &[Service]) {
        ClusterWriter::submit(self, problems, state, services);
    }
}
