//! One module per request type: the request body, the response body, and their API key.
//!
//! The broker's handler for each lives in `quiver-core/src/server/requests/` under the
//! same name; the client's call sites use the same types.

pub mod alter_topic_config;
pub mod commit_offsets;
pub mod create_partitions;
pub mod create_topic;
pub mod delete_group;
pub mod delete_topic;
pub mod deploy_plugin;
pub mod describe_cluster;
pub mod describe_group;
pub mod describe_plugin;
pub mod describe_topic;
pub mod fetch;
pub mod fetch_offsets;
pub mod get_plugin;
pub mod group;
pub mod heartbeat;
pub mod join_group;
pub mod leave_group;
pub mod list_groups;
pub mod list_offsets;
pub mod list_plugins;
pub mod metadata;
pub mod pipeline;
pub mod plugin;
pub mod produce;
pub mod reassign_partition;
pub mod remove_plugin;
pub mod replica;
pub mod reset_offsets;
pub mod subscribe;
pub mod transaction;

pub use alter_topic_config::{AlterTopicConfigRequest, IncrementalAlterTopicConfigRequest};
pub use create_partitions::CreatePartitionsRequest;
pub use create_topic::CreateTopicRequest;
pub use delete_topic::{DeleteTopicRequest, DeleteTopicResponse};
pub use describe_topic::{DescribeTopicRequest, PartitionDescription, TopicDescription};
pub use fetch::{AbortedTxn, FetchRequest, FetchResponse, Isolation};
pub use list_offsets::{ListOffsetsRequest, ListOffsetsResponse, OffsetSpec};
pub use metadata::{
    BrokerInfo, MetadataRequest, MetadataResponse, PartitionMetadata, TopicMetadata,
};
pub use produce::{Acks, ProduceRequest, ProduceResponse};
pub use reassign_partition::{ReassignPartitionRequest, ReassignPartitionResponse};
pub use replica::{
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, ReplicaFetchRequest,
    ReplicaFetchResponse,
};
pub use subscribe::{SubscribeChunk, SubscribeRequest};
pub use transaction::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, EndTxnRequest, EndTxnResponse,
    InitTransactionsRequest, InitTransactionsResponse, TxnCommitOffsetsRequest,
    TxnCommitOffsetsResponse, VerifyTxnPartitionRequest, VerifyTxnPartitionResponse,
    WriteTxnMarkerRequest, WriteTxnMarkerResponse,
};

pub use deploy_plugin::{DeployPluginRequest, DeployPluginResponse};
pub use describe_cluster::{ClusterBrokerInfo, ClusterDescription, DescribeClusterRequest};
pub use describe_plugin::{DescribePluginRequest, DescribePluginResponse};
pub use get_plugin::{GetPluginRequest, GetPluginResponse};
pub use list_plugins::{ListPluginsRequest, ListPluginsResponse};
pub use plugin::{parse_plugin_ref, PluginInfo, ProcessorSpec};
pub use remove_plugin::{RemovePluginRequest, RemovePluginResponse};

pub use pipeline::{
    DeployPipelineRequest, DeployPipelineResponse, DescribePipelineRequest, ListPipelinesRequest,
    ListPipelinesResponse, PipelineInstance, PipelineStatus, StopPipelineRequest,
    StopPipelineResponse,
};

pub use commit_offsets::{CommitOffsetsRequest, CommitOffsetsResponse, OffsetCommit};
pub use delete_group::{DeleteGroupRequest, DeleteGroupResponse};
pub use describe_group::{
    DescribeGroupRequest, GroupDescription, GroupPartitionDescription, MemberDescription,
};
pub use fetch_offsets::{CommittedOffset, FetchOffsetsRequest, FetchOffsetsResponse};
pub use group::{
    coordinator_partition, validate_group_name, AutoOffsetReset, Strategy, Subscription,
    TopicPartition, OFFSETS_TOPIC,
};
pub use heartbeat::{HeartbeatRequest, HeartbeatResponse};
pub use join_group::{JoinGroupRequest, JoinGroupResponse};
pub use leave_group::{LeaveGroupRequest, LeaveGroupResponse};
pub use list_groups::{GroupListing, ListGroupsRequest, ListGroupsResponse};
pub use reset_offsets::{ResetOffsetsRequest, ResetOffsetsResponse, ResetTo};

/// Calls the macro `$m` with every request type of the protocol, by API key, and the type
/// the broker answers it with:
/// `$m! { Produce: ProduceRequest => ProduceResponse, Fetch: FetchRequest => FetchResponse, … }`
/// (full paths under `$crate::requests`). One list for the code that must cover every
/// message: the round-trip and truncation tests of this crate, and the fuzz targets, whose
/// `match` on [`ApiKey`](crate::ApiKey) stops compiling when a key is missing here.
#[macro_export]
macro_rules! with_all_messages {
    ($m:ident) => {
        $m! {
            Produce: $crate::requests::ProduceRequest => $crate::requests::ProduceResponse,
            Fetch: $crate::requests::FetchRequest => $crate::requests::FetchResponse,
            ListOffsets: $crate::requests::ListOffsetsRequest => $crate::requests::ListOffsetsResponse,
            Metadata: $crate::requests::MetadataRequest => $crate::requests::MetadataResponse,
            CreateTopic: $crate::requests::CreateTopicRequest => $crate::requests::TopicDescription,
            DeleteTopic: $crate::requests::DeleteTopicRequest => $crate::requests::DeleteTopicResponse,
            DescribeTopic: $crate::requests::DescribeTopicRequest => $crate::requests::TopicDescription,
            AlterTopicConfig: $crate::requests::AlterTopicConfigRequest => $crate::requests::TopicDescription,
            Subscribe: $crate::requests::SubscribeRequest => $crate::requests::SubscribeChunk,
            CreatePartitions: $crate::requests::CreatePartitionsRequest => $crate::requests::TopicDescription,
            ReassignPartition: $crate::requests::ReassignPartitionRequest => $crate::requests::ReassignPartitionResponse,
            IncrementalAlterTopicConfig: $crate::requests::IncrementalAlterTopicConfigRequest => $crate::requests::TopicDescription,
            JoinGroup: $crate::requests::JoinGroupRequest => $crate::requests::JoinGroupResponse,
            Heartbeat: $crate::requests::HeartbeatRequest => $crate::requests::HeartbeatResponse,
            LeaveGroup: $crate::requests::LeaveGroupRequest => $crate::requests::LeaveGroupResponse,
            CommitOffsets: $crate::requests::CommitOffsetsRequest => $crate::requests::CommitOffsetsResponse,
            FetchOffsets: $crate::requests::FetchOffsetsRequest => $crate::requests::FetchOffsetsResponse,
            ListGroups: $crate::requests::ListGroupsRequest => $crate::requests::ListGroupsResponse,
            DescribeGroup: $crate::requests::DescribeGroupRequest => $crate::requests::GroupDescription,
            ResetOffsets: $crate::requests::ResetOffsetsRequest => $crate::requests::ResetOffsetsResponse,
            DeleteGroup: $crate::requests::DeleteGroupRequest => $crate::requests::DeleteGroupResponse,
            DeployPlugin: $crate::requests::DeployPluginRequest => $crate::requests::DeployPluginResponse,
            ListPlugins: $crate::requests::ListPluginsRequest => $crate::requests::ListPluginsResponse,
            DescribePlugin: $crate::requests::DescribePluginRequest => $crate::requests::DescribePluginResponse,
            RemovePlugin: $crate::requests::RemovePluginRequest => $crate::requests::RemovePluginResponse,
            GetPlugin: $crate::requests::GetPluginRequest => $crate::requests::GetPluginResponse,
            DeployPipeline: $crate::requests::DeployPipelineRequest => $crate::requests::DeployPipelineResponse,
            ListPipelines: $crate::requests::ListPipelinesRequest => $crate::requests::ListPipelinesResponse,
            DescribePipeline: $crate::requests::DescribePipelineRequest => $crate::requests::PipelineStatus,
            StopPipeline: $crate::requests::StopPipelineRequest => $crate::requests::StopPipelineResponse,
            InitTransactions: $crate::requests::InitTransactionsRequest => $crate::requests::InitTransactionsResponse,
            TxnCommitOffsets: $crate::requests::TxnCommitOffsetsRequest => $crate::requests::TxnCommitOffsetsResponse,
            EndTxn: $crate::requests::EndTxnRequest => $crate::requests::EndTxnResponse,
            AddPartitionsToTxn: $crate::requests::AddPartitionsToTxnRequest => $crate::requests::AddPartitionsToTxnResponse,
            WriteTxnMarker: $crate::requests::WriteTxnMarkerRequest => $crate::requests::WriteTxnMarkerResponse,
            VerifyTxnPartition: $crate::requests::VerifyTxnPartitionRequest => $crate::requests::VerifyTxnPartitionResponse,
            DescribeCluster: $crate::requests::DescribeClusterRequest => $crate::requests::ClusterDescription,
            ReplicaFetch: $crate::requests::ReplicaFetchRequest => $crate::requests::ReplicaFetchResponse,
            OffsetForLeaderEpoch: $crate::requests::OffsetForLeaderEpochRequest => $crate::requests::OffsetForLeaderEpochResponse,
        }
    };
}

/// Checks a topic name: 1–249 bytes of `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!(
            "topic name must be 1 to 249 bytes, got {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be '.' or '..'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} has the character {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod wire_tests;

#[cfg(test)]
mod tests {
    use super::validate_topic_name;

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_x-2").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b", "é", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
