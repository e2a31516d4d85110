//! What the cluster is told after a pass (ARCHITECTURE.md, "The loop"): Events on the
//! Services and the LoadBalancer status, behind the [`ClusterReport`] port (in-process tests
//! record what they are told).

use std::collections::BTreeSet;
use std::future::Future;

use k8s_openapi::api::core::v1::Service;

use super::events::{self, EventPublisher};
use super::status;
use crate::config::Config;
use crate::model::Problem;
use crate::state::{MappingStatus, State};

/// Where the loop reports to the cluster.
pub trait ClusterReport: Send {
    /// Tells the cluster the `problems` and the live mappings of `state`.
    fn send(
        &mut self,
        problems: &[Problem],
        state: &State,
        services: &[Service],
    ) -> impl Future<Output = ()> + Send;
}

/// What the cluster is told after a reconcile: Events on the Services (each once while it
/// holds) and, for Services of holepunch's loadBalancerClass, the external IP in their status.
pub struct KubeReport {
    client: kube::Client,
    events: EventPublisher,
    load_balancer_class: String,
}

impl KubeReport {
    pub fn new(client: kube::Client, config: &Config) -> KubeReport {
        let instance = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "holepunch".to_owned());
        KubeReport {
            events: EventPublisher::new(client.clone(), &instance),
            client,
            load_balancer_class: config.kubernetes.load_balancer_class.clone(),
        }
    }
}

impl ClusterReport for KubeReport {
    async fn send(&mut self, problems: &[Problem], state: &State, services: &[Service]) {
        let live = state
            .mappings
            .values()
            .filter(|r| r.status == MappingStatus::Active);
        let events: Vec<_> = problems
            .iter()
            .filter_map(events::event_for_problem)
            .chain(live.clone().map(events::event_for_live))
            .collect();
        self.events.publish_changes(&events).await;

        let published: BTreeSet<(String, String)> = live
            .clone()
            .map(|r| (r.owner.namespace.clone(), r.owner.name.clone()))
            .collect();
        // The router's public address: the most recently granted mapping knows it best.
        let external_ip = live
            .filter(|r| r.external_address.is_some())
            .max_by_key(|r| r.granted_at)
            .and_then(|r| r.external_address);
        for update in
            status::status_updates(services, &self.load_balancer_class, external_ip, &published)
        {
            match status::write_status(&self.client, &update).await {
                Ok(()) => {
                    tracing::info!(service = %format!("{}/{}", update.namespace, update.name),
                    ingress = ?update.ingress_ip, "LoadBalancer status written")
                }
                Err(e) => {
                    tracing::warn!(service = %format!("{}/{}", update.namespace, update.name),
                    error = %e, "could not write the LoadBalancer status; trying again at the next reconcile")
                }
            }
        }
    }
}
