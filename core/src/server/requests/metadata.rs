//! Metadata: this broker and the placement of the topics asked for.

use bytes::Bytes;
use quiver_protocol::requests::{
    BrokerInfo, MetadataRequest, MetadataResponse, PartitionMetadata, TopicMetadata,
};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;
use crate::topic::Topic;

/// The placement of one topic (one broker: it leads every partition).
pub fn topic_metadata(ctx: &ServerContext, t: &Topic) -> TopicMetadata {
    let id = ctx.config.broker_id;
    TopicMetadata {
        name: t.name(),
        partitions: t
            .partitions
            .iter()
            .map(|p| PartitionMetadata {
                partition: p.partition,
                leader: id,
                leader_epoch: p.snapshot().leader_epoch.max(0) as u32,
                replicas: vec![id],
                isr: vec![id],
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
        brokers: vec![BrokerInfo {
            id: ctx.config.broker_id,
            addr: ctx.config.advertised(),
        }],
        topics: topics.iter().map(|t| topic_metadata(ctx, t)).collect(),
    }))
}
