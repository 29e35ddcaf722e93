//! [`Admin`]: topic management (create, delete, list, describe, alter config) over a
//! [`Client`]. Each call goes to the bootstrap broker, except that on a cluster a
//! partition's offsets are asked of its leader; nothing is cached here except the client's
//! metadata, which each call keeps fresh.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::requests::{
    AlterTopicConfigRequest, CreatePartitionsRequest, CreateTopicRequest, DeleteTopicRequest,
    DescribeTopicRequest, IncrementalAlterTopicConfigRequest, ListOffsetsRequest, OffsetSpec,
    TopicDescription, TopicMetadata,
};

use crate::backoff::Backoff;
use crate::{Client, Result};

/// Topic administration.
///
/// ```no_run
/// # async fn demo(client: quiver_client::Client) -> quiver_client::Result<()> {
/// use std::collections::BTreeMap;
/// use quiver_client::Admin;
///
/// let admin = Admin::new(client);
/// let config = BTreeMap::from([("retention.ms".to_string(), "3600000".to_string())]);
/// let created = admin.create_topic("orders", 3, config).await?;
/// assert_eq!(created.partitions.len(), 3);
/// for t in admin.list_topics().await? {
///     println!("{} ({} partitions)", t.name, t.partitions.len());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    /// Topic administration over `client`.
    pub fn new(client: Client) -> Self {
        Admin { client }
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates `name` with `partitions` partitions (0: the broker's
    /// `topic_defaults.partitions`) and config overrides (replication factor 1).
    #[tracing::instrument(skip(self, config), level = "debug")]
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        config: BTreeMap<String, String>,
    ) -> Result<TopicDescription> {
        self.create_replicated_topic(name, partitions, 1, config)
            .await
    }

    /// Creates a topic whose partitions have `replication_factor` copies (refused by a
    /// broker that cannot place that many).
    pub async fn create_replicated_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        config: BTreeMap<String, String>,
    ) -> Result<TopicDescription> {
        let req = CreateTopicRequest {
            name: name.to_string(),
            partitions,
            replication_factor,
            config,
        };
        let (d, _) = self.client.request(&req, Bytes::new()).await?;
        self.client.invalidate_metadata(name);
        Ok(d)
    }

    /// Deletes `name`; returns how many partitions were removed.
    #[tracing::instrument(skip(self), level = "debug")]
    pub async fn delete_topic(&self, name: &str) -> Result<u32> {
        let req = DeleteTopicRequest {
            name: name.to_string(),
        };
        let (r, _) = self.client.request(&req, Bytes::new()).await?;
        self.client.invalidate_metadata(name);
        Ok(r.partitions_deleted)
    }

    /// Every topic with its partitions' placement, sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<TopicMetadata>> {
        let mut topics = self.client.metadata(None).await?.topics;
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    /// Config and per-partition offsets and sizes of `name`: on a cluster, each partition's
    /// offsets, size and status as its leader holds them (a follower's copy may lag, and a
    /// broker without a replica holds none). A leader that does not answer (or no longer
    /// leads) leaves the bootstrap broker's own figures for its partitions.
    #[tracing::instrument(skip(self), level = "debug")]
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        Ok(self.describe_topic_from_leaders(name).await?.0)
    }

    /// [`describe_topic`](Self::describe_topic), and which partitions' figures came from
    /// their leader (all of them on a lone broker).
    pub(crate) async fn describe_topic_from_leaders(
        &self,
        name: &str,
    ) -> Result<(TopicDescription, BTreeSet<u32>)> {
        let mut d = self.describe_topic_local(name).await?;
        if !self.client.is_cluster().await? {
            let all = d.partitions.iter().map(|p| p.partition).collect();
            return Ok((d, all));
        }
        let req = DescribeTopicRequest {
            name: name.to_string(),
        };
        let leaders: BTreeSet<u32> = d
            .partitions
            .iter()
            .map(|p| p.leader)
            .filter(|l| *l != 0)
            .collect();
        let mut from_leader = BTreeSet::new();
        for leader in leaders {
            let theirs = match self
                .client
                .request_to_broker(leader, &req, Bytes::new())
                .await
            {
                Ok(Some((t, _))) => t,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(topic = name, leader, error = %e, "the leader did not describe its partitions");
                    continue;
                }
            };
            for p in d.partitions.iter_mut().filter(|p| p.leader == leader) {
                // Only a broker that still leads the partition has its figures.
                let Some(lp) = theirs
                    .partitions
                    .iter()
                    .find(|x| x.partition == p.partition && x.leader == leader)
                else {
                    continue;
                };
                p.log_start_offset = lp.log_start_offset;
                p.high_watermark = lp.high_watermark;
                p.log_end_offset = lp.log_end_offset;
                p.size_bytes = lp.size_bytes;
                p.status = lp.status.clone();
                p.offline_reason = lp.offline_reason.clone();
                from_leader.insert(p.partition);
            }
        }
        Ok((d, from_leader))
    }

    /// [`describe_topic`](Self::describe_topic) as the bootstrap broker sees it: the
    /// offsets of its own copy of each partition (zero where it holds no replica).
    pub async fn describe_topic_local(&self, name: &str) -> Result<TopicDescription> {
        let req = DescribeTopicRequest {
            name: name.to_string(),
        };
        Ok(self.client.request(&req, Bytes::new()).await?.0)
    }

    /// Sets config keys of `name`; returns the topic as it is now.
    #[tracing::instrument(skip(self, set), level = "debug")]
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
    ) -> Result<TopicDescription> {
        let req = AlterTopicConfigRequest {
            name: name.to_string(),
            set,
        };
        Ok(self.client.request(&req, Bytes::new()).await?.0)
    }

    /// Sets config keys of `name` and removes the overrides of `remove` (back to the
    /// broker's defaults), all or nothing; returns the topic as it is now. Brokers older
    /// than this SDK answer that they do not know the request.
    #[tracing::instrument(skip(self, set), level = "debug")]
    pub async fn alter_topic_config_incremental(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<TopicDescription> {
        let req = IncrementalAlterTopicConfigRequest {
            name: name.to_string(),
            set,
            remove,
        };
        Ok(self.client.request(&req, Bytes::new()).await?.0)
    }

    /// Grows `name` to `total` partitions (the new ones start empty); returns the topic.
    #[tracing::instrument(skip(self), level = "debug")]
    pub async fn create_partitions(&self, name: &str, total: u32) -> Result<TopicDescription> {
        let req = CreatePartitionsRequest {
            name: name.to_string(),
            total,
        };
        let (d, _) = self.client.request(&req, Bytes::new()).await?;
        self.client.invalidate_metadata(name);
        Ok(d)
    }

    /// Starts moving `topic`/`partition` to `replicas` (cluster brokers); the move finishes
    /// in the background once the new replicas caught up (see [`Admin::describe_topic`]).
    pub async fn reassign_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: Vec<u32>,
    ) -> Result<quiver_protocol::requests::ReassignPartitionResponse> {
        let req = quiver_protocol::requests::ReassignPartitionRequest {
            topic: topic.to_string(),
            partition,
            replicas,
        };
        let (r, _) = self.client.request(&req, Bytes::new()).await?;
        self.client.invalidate_metadata(topic);
        Ok(r)
    }

    /// Looks up one offset of `topic`/`partition` (earliest, latest, or by timestamp).
    pub async fn list_offset(&self, topic: &str, partition: u32, spec: OffsetSpec) -> Result<i64> {
        list_offset(&self.client, topic, partition, spec).await
    }
}

/// Looks up one offset of a partition on its leader, retrying retriable failures (the
/// leader moving, metadata not yet caught up) with fresh metadata; a new attempt starts
/// only within `request_timeout` of the first.
pub(crate) async fn list_offset(
    client: &Client,
    topic: &str,
    partition: u32,
    spec: OffsetSpec,
) -> Result<i64> {
    let req = ListOffsetsRequest {
        topic: topic.to_string(),
        partition,
        spec,
    };
    let timeout = client.config().request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        match client
            .request_for_partition(topic, partition, &req, Bytes::new(), timeout)
            .await
        {
            Ok((r, _)) => return Ok(r.offset),
            Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(topic, partition, error = %e, "list offsets failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}
