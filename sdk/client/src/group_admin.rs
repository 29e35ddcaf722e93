//! Consumer-group administration on [`Admin`]: list, describe, reset offsets, delete, and
//! read committed offsets.

use std::collections::BTreeSet;

use bytes::Bytes;
use quiver_protocol::requests::{
    CommittedOffset, DeleteGroupRequest, DescribeGroupRequest, FetchOffsetsRequest,
    GroupDescription, GroupListing, ListGroupsRequest, OffsetSpec, ResetOffsetsRequest, ResetTo,
    TopicPartition,
};

use crate::admin::list_offset;
use crate::{Admin, ClientError, Result};

impl Admin {
    /// Every consumer group, by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let (r, _) = self
            .client()
            .request(&ListGroupsRequest {}, Bytes::new())
            .await?;
        Ok(r.groups)
    }

    /// A group's members, assignment, committed offsets and lag. On a cluster the log
    /// offsets, and the lag from them, are each partition's leader's (the coordinator's own
    /// copy of a partition may lag, or be none).
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let req = DescribeGroupRequest {
            group: group.to_string(),
        };
        let (mut d, _) = self
            .client()
            .request_for_group(group, &req, Bytes::new())
            .await?;
        if !self.client().is_cluster().await? {
            return Ok(d);
        }
        let topics: BTreeSet<String> = d.partitions.iter().map(|p| p.topic.clone()).collect();
        for topic in topics {
            let (described, from_leader) = match self.describe_topic_from_leaders(&topic).await {
                Ok(t) => t,
                // Deleted since: the coordinator's figures stay.
                Err(ClientError::TopicNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            // Partitions whose leader did not answer keep the coordinator's figures.
            for p in d
                .partitions
                .iter_mut()
                .filter(|p| p.topic == topic && from_leader.contains(&p.partition))
            {
                if let Some(t) = described
                    .partitions
                    .iter()
                    .find(|t| t.partition == p.partition)
                {
                    p.set_log_offsets(t.log_start_offset, t.log_end_offset, t.high_watermark);
                }
            }
        }
        Ok(d)
    }

    /// Moves a group's committed offsets of `topic` (refused while it has members);
    /// returns the new `(partition, offset)` pairs.
    pub async fn reset_group_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<(u32, i64)>> {
        let send = |to: ResetTo| async move {
            let req = ResetOffsetsRequest {
                group: group.to_string(),
                topic: topic.to_string(),
                to,
            };
            self.client()
                .request_for_group(group, &req, Bytes::new())
                .await
                .map(|(r, _)| r.offsets)
        };
        if !self.client().is_cluster().await? {
            return send(to).await;
        }
        // On a cluster the offsets are resolved on each partition's leader: the group's
        // coordinator's own copy of a partition may lag, or be empty.
        let resolved = ResetTo::Offsets(self.resolve_reset(topic, &to).await?);
        match send(resolved).await {
            // A coordinator older than `ResetTo::Offsets` cannot decode it: ask the old way.
            Err(e)
                if e.code() == Some(quiver_protocol::ErrorCode::InvalidRequest)
                    && e.to_string().contains("could not decode") =>
            {
                send(to).await
            }
            other => other,
        }
    }

    /// The offset `to` names in each partition of `topic`, asked of the partitions' leaders
    /// (what a reset to `to` stores on a cluster); changes nothing, so it also answers
    /// "what would a reset do" (`group reset --dry-run`).
    pub async fn resolve_reset(&self, topic: &str, to: &ResetTo) -> Result<Vec<(u32, i64)>> {
        let client = self.client();
        // Partitions added since the metadata was cached are reset too.
        client.invalidate_metadata(topic);
        let mut out = Vec::new();
        for p in 0..client.partition_count(topic).await? {
            let offset = match to {
                ResetTo::Offsets(given) => return Ok(given.clone()),
                ResetTo::Earliest => list_offset(client, topic, p, OffsetSpec::Earliest).await?,
                ResetTo::Latest => list_offset(client, topic, p, OffsetSpec::Latest).await?,
                ResetTo::Timestamp(t) => {
                    list_offset(client, topic, p, OffsetSpec::Timestamp(*t)).await?
                }
                ResetTo::Offset(n) => {
                    let start = list_offset(client, topic, p, OffsetSpec::Earliest).await?;
                    let end = list_offset(client, topic, p, OffsetSpec::Latest).await?;
                    (*n).clamp(start, end.max(start))
                }
            };
            out.push((p, offset));
        }
        Ok(out)
    }

    /// Deletes a group without members; returns how many committed offsets went with it.
    pub async fn delete_group(&self, group: &str) -> Result<u32> {
        let req = DeleteGroupRequest {
            group: group.to_string(),
        };
        Ok(self
            .client()
            .request_for_group(group, &req, Bytes::new())
            .await?
            .0
            .offsets_deleted)
    }

    /// Committed offsets of a group (all of them, or of `partitions`).
    pub async fn group_offsets(
        &self,
        group: &str,
        partitions: Option<Vec<TopicPartition>>,
    ) -> Result<Vec<CommittedOffset>> {
        let req = FetchOffsetsRequest {
            group: group.to_string(),
            partitions,
        };
        Ok(self
            .client()
            .request_for_group(group, &req, Bytes::new())
            .await?
            .0
            .offsets)
    }
}
