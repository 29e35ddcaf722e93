//! DescribeTopic: effective config and per-partition offsets and sizes.

use bytes::Bytes;
use quiver_protocol::requests::{DescribeTopicRequest, PartitionDescription, TopicDescription};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;
use crate::topic::Topic;

/// Describes a topic as it is now.
pub fn describe(ctx: &ServerContext, t: &Topic) -> TopicDescription {
    let id = ctx.config.broker_id;
    TopicDescription {
        name: t.name(),
        config: t.config().to_map(),
        partitions: t
            .partitions
            .iter()
            .map(|p| {
                let s = p.snapshot();
                let offline = p.offline_reason();
                PartitionDescription {
                    partition: p.partition,
                    leader: id,
                    leader_epoch: s.leader_epoch.max(0) as u32,
                    replicas: vec![id],
                    isr: vec![id],
                    log_start_offset: s.log_start,
                    high_watermark: s.high_watermark,
                    log_end_offset: s.log_end,
                    size_bytes: s.size_bytes,
                    status: if offline.is_some() {
                        "offline"
                    } else {
                        "online"
                    }
                    .into(),
                    offline_reason: offline,
                }
            })
            .collect(),
    }
}

/// Handles a describe-topic request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<DescribeTopicRequest>(&body)?;
    let t = ctx.topics.topic(&req.name)?;
    Ok(Reply::control(&describe(ctx, &t)))
}
