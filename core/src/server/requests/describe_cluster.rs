//! DescribeCluster: the controller leader and registered brokers from this broker's applied
//! metadata.

use bytes::Bytes;
use quiver_protocol::requests::{ClusterBrokerInfo, ClusterDescription, DescribeClusterRequest};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles a describe-cluster request.
#[tracing::instrument(name = "describe_cluster", skip_all)]
pub async fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let _ = decode::<DescribeClusterRequest>(&body)?;
    let damaged = ctx
        .topics
        .list()
        .iter()
        .flat_map(|t| t.partitions.clone())
        .filter(|p| p.offline_reason().is_some())
        .count() as u64;
    let (under, offline) = ctx.replicas().map_or((0, 0), |rm| {
        crate::replica::ReplicaManager::health(&rm.view())
    });
    let member = ctx.cluster.lock().await;
    let description = match member.as_ref() {
        None => ClusterDescription {
            clustered: false,
            broker: ctx.config.broker_id,
            controller_leader: None,
            brokers: Vec::new(),
            under_replicated_partitions: 0,
            offline_partitions: 0,
            damaged_partitions: damaged,
        },
        Some(m) => {
            let state = m.state().await;
            ClusterDescription {
                clustered: true,
                broker: ctx.config.broker_id,
                controller_leader: m.controller_leader(),
                brokers: state
                    .brokers
                    .values()
                    .map(|b| ClusterBrokerInfo {
                        id: b.id,
                        addr: b.addr.clone(),
                        epoch: b.broker_epoch,
                        fenced: b.fenced,
                    })
                    .collect(),
                under_replicated_partitions: under,
                offline_partitions: offline,
                damaged_partitions: damaged,
            }
        }
    };
    Ok(Reply::control(&description))
}
