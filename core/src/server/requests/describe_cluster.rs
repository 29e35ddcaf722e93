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
    let member = ctx.cluster.lock().await;
    let description = match member.as_ref() {
        None => ClusterDescription {
            clustered: false,
            broker: ctx.config.broker_id,
            controller_leader: None,
            brokers: Vec::new(),
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
            }
        }
    };
    Ok(Reply::control(&description))
}
