//! Metadata: this broker and the placement of the topics asked for.

use bytes::Bytes;
use quiver_protocol::requests::{
    BrokerInfo, MetadataRequest, MetadataResponse, PartitionMetadata, TopicMetadata,
};

use super::describe_topic::placement;
use super::{decode, Reply, RequestError};
use crate::server::ServerContext;
use crate::topic::Topic;

/// The placement of one topic (one broker: it leads every partition).
pub fn topic_metadata(ctx: &ServerContext, t: &Topic) -> TopicMetadata {
    let name = t.name();
    TopicMetadata {
        name: name.clone(),
        partitions: t
            .partitions
            .iter()
            .map(|p| {
                let (leader, leader_epoch, replicas, isr, _) =
                    placement(ctx, &name, p.partition, p.snapshot().leader_epoch);
                PartitionMetadata {
                    partition: p.partition,
                    leader,
                    leader_epoch,
                    replicas,
                    isr,
                }
            })
            .collect(),
        partitioner: t.config().partitioner,
    }
}

/// Handles a metadata request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<MetadataRequest>(&body)?;
    let topics: Vec<_> = match &req.topics {
        // Listing every topic leaves out internal ones (`__consumer_offsets`); asking by
        // name still finds them.
        None => ctx
            .topics
            .list()
            .into_iter()
            .filter(|t| !t.name().starts_with("__"))
            .collect(),
        Some(names) => names.iter().filter_map(|n| ctx.topics.get(n)).collect(),
    };
    Ok(Reply::control(&MetadataResponse {
        brokers: match ctx.replicas() {
            Some(rm) => rm
                .view()
                .brokers
                .values()
                .map(|b| BrokerInfo {
                    id: b.id as u32,
                    addr: b.addr.clone(),
                })
                .collect(),
            None => vec![BrokerInfo {
                id: ctx.config.broker_id,
                addr: ctx.config.advertised(),
            }],
        },
        topics: topics.iter().map(|t| topic_metadata(ctx, t)).collect(),
    }))
}
