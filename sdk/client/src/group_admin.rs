//! Consumer-group administration on [`Admin`]: list, describe, reset offsets, delete, and
//! read committed offsets.

use bytes::Bytes;
use quiver_protocol::requests::{
    CommittedOffset, DeleteGroupRequest, DescribeGroupRequest, FetchOffsetsRequest,
    GroupDescription, GroupListing, ListGroupsRequest, ResetOffsetsRequest, ResetTo,
    TopicPartition,
};

use crate::{Admin, Result};

impl Admin {
    /// Every consumer group, by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let (r, _) = self
            .client()
            .request(&ListGroupsRequest {}, Bytes::new())
            .await?;
        Ok(r.groups)
    }

    /// A group's members, assignment, committed offsets and lag.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let req = DescribeGroupRequest {
            group: group.to_string(),
        };
        Ok(self
            .client()
            .request_for_group(group, &req, Bytes::new())
            .await?
            .0)
    }

    /// Moves a group's committed offsets of `topic` (refused while it has members);
    /// returns the new `(partition, offset)` pairs.
    pub async fn reset_group_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<(u32, i64)>> {
        let req = ResetOffsetsRequest {
            group: group.to_string(),
            topic: topic.to_string(),
            to,
        };
        Ok(self
            .client()
            .request_for_group(group, &req, Bytes::new())
            .await?
            .0
            .offsets)
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
