//! DescribeTopic: effective config and per-partition offsets and sizes.

use bytes::Bytes;
use quiver_protocol::requests::{DescribeTopicRequest, PartitionDescription, TopicDescription};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;
use crate::topic::Topic;

/// Who holds a partition: (leader, leader epoch, replicas, ISR, online). On a cluster
/// broker from the controller's metadata; on a lone broker, this broker.
pub fn placement(
    ctx: &ServerContext,
    topic: &str,
    partition: u32,
    local_epoch: i32,
) -> (u32, u32, Vec<u32>, Vec<u32>, bool) {
    let id = ctx.config.broker_id;
    match ctx.replicas() {
        None => (id, local_epoch.max(0) as u32, vec![id], vec![id], true),
        Some(rm) => match rm.view().partition(topic, partition) {
            Some(p) => (
                p.leader.unwrap_or(0) as u32,
                p.leader_epoch as u32,
                p.replicas.iter().map(|r| *r as u32).collect(),
                p.isr.iter().map(|r| *r as u32).collect(),
                p.leader.is_some(),
            ),
            None => (0, 0, Vec::new(), Vec::new(), false),
        },
    }
}

/// Describes a topic as it is now.
pub fn describe(ctx: &ServerContext, t: &Topic) -> TopicDescription {
    let name = t.name();
    TopicDescription {
        name: name.clone(),
        config: t.config().to_map(),
        partitions: t
            .partitions
            .iter()
            .map(|p| {
                let s = p.snapshot();
                let (leader, leader_epoch, replicas, isr, led) =
                    placement(ctx, &name, p.partition, s.leader_epoch);
                let offline = p.offline_reason().or_else(|| {
                    (!led).then(|| {
                        if isr.is_empty() && !replicas.is_empty() {
                            format!("no replica is in sync: the last in-sync one lost its copy (it came back on an empty log store, or its record of the topic is damaged). To elect another replica, accepting that records only the lost copy held are gone: quiver topic alter {name} --config unclean.leader.election.enable=true")
                        } else {
                            "no in-sync replica is alive to lead it".to_string()
                        }
                    })
                });
                PartitionDescription {
                    partition: p.partition,
                    leader,
                    leader_epoch,
                    replicas,
                    isr,
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
