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

/// The most topic names one metadata request may ask for (all topics: ask for none).
pub const MAX_METADATA_TOPICS: usize = 10_000;

/// Handles a metadata request.
pub fn handle(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (mut req, _) = decode::<MetadataRequest>(&body)?;
    if let Some(names) = req.topics.as_mut() {
        if names.len() > MAX_METADATA_TOPICS {
            return Err(RequestError::new(
                quiver_protocol::ErrorCode::InvalidRequest,
                format!(
                    "a metadata request names {} topics; at most {MAX_METADATA_TOPICS} (ask for none to list every topic)",
                    names.len()
                ),
            ));
        }
        // A name asked twice is answered once: repeats must not multiply the answer.
        names.sort_unstable();
        names.dedup();
    }
    if let Some(rm) = ctx.replicas() {
        return Ok(Reply::control(&cluster_metadata(
            ctx,
            &rm.view(),
            req.topics.as_deref(),
        )));
    }
    let topics: Vec<_> = match &req.topics {
        // Listing every topic leaves out internal ones (`__consumer_offsets`); asking by
        // name still finds them.
        None => ctx
            .topics
            .list()
            .into_iter()
            .filter(|t| !t.name().starts_with("__"))
            .collect(),
        // A topic asked for by name whose stored record is damaged fails the request with
        // what to do; one that does not exist is left out.
        Some(names) => {
            let mut found = Vec::with_capacity(names.len());
            for n in names {
                match ctx.topics.topic(n) {
                    Ok(t) => found.push(t),
                    Err(e @ crate::topic::TopicError::Damaged { .. }) => return Err(e.into()),
                    Err(_) => {}
                }
            }
            found
        }
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

/// `names` come sorted and without repeats (see [`handle`]).
/// A cluster broker answers from the controller's metadata (topics this broker has not
/// created locally yet included), so clients find leaders wherever they ask.
fn cluster_metadata(
    ctx: &ServerContext,
    view: &crate::cluster::ControllerState,
    names: Option<&[String]>,
) -> MetadataResponse {
    let wanted = |n: &str| match names {
        None => !n.starts_with("__"),
        Some(names) => names.binary_search_by(|w| w.as_str().cmp(n)).is_ok(),
    };
    MetadataResponse {
        brokers: view
            .brokers
            .values()
            .map(|b| BrokerInfo {
                id: b.id as u32,
                addr: b.addr.clone(),
            })
            .collect(),
        topics: view
            .topics
            .values()
            .filter(|t| wanted(&t.name))
            .map(|t| TopicMetadata {
                name: t.name.clone(),
                partitions: t
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| PartitionMetadata {
                        partition: i as u32,
                        leader: p.leader.unwrap_or(0) as u32,
                        leader_epoch: p.leader_epoch as u32,
                        replicas: p.replicas.iter().map(|r| *r as u32).collect(),
                        isr: p.isr.iter().map(|r| *r as u32).collect(),
                    })
                    .collect(),
                partitioner: ctx
                    .topics
                    .get(&t.name)
                    .and_then(|local| local.config().partitioner),
            })
            .collect(),
    }
}
