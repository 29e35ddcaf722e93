//! Every request and response of the protocol, from the one list in
//! [`with_all_messages!`](crate::with_all_messages): round trip through a frame, every strict
//! prefix of the frame and of the body refused, random and mutated bytes never a panic.
//!
//! What a truncated prefix can and cannot do: a body is `u32 control_len | control |
//! payload`, and the payload (record batches, a plugin archive) is raw bytes running to the
//! end of the body with no length of its own. A prefix that cuts the length or the control
//! fails (the control length points past the body); a prefix that keeps the whole control
//! and cuts only the payload decodes, to the same control and a shorter payload, so for the
//! messages that carry one (Produce and DeployPlugin requests; Fetch, Subscribe and GetPlugin
//! responses) the tests assert exactly that: the decoded value differs (shorter payload),
//! it is never a panic. The frame's own length makes every strict prefix of a frame
//! "incomplete" (`Frame::decode` answers `None`), so over the wire the cut is always seen.
//! Messages with an empty control (`ListGroupsRequest {}` …) have only the 4 length bytes
//! to cut. Bytes after a control's value are ignored on purpose (see `decode_control`).

use std::collections::BTreeMap;
use std::fmt::Debug;

use bytes::Bytes;
use proptest::prelude::{any, proptest};

use super::*;
use crate::batch::{BatchBuilder, Compression};
use crate::control::decode_control;
use crate::message::ErrorBody;
use crate::{
    decode_request, decode_response, encode_control, encode_error, encode_request, encode_response,
    ApiKey, ErrorCode, Frame, Limits, Message, ProtocolError,
};

/// Example values of a message (covering each enum variant and `Option` both ways), and
/// the payload that travels with it.
trait Sample: Sized {
    fn samples() -> Vec<Self>;
    fn payload() -> Bytes {
        Bytes::new()
    }
}

fn s(v: &str) -> String {
    v.to_string()
}

fn config() -> BTreeMap<String, String> {
    [(s("retention.ms"), s("60000")), (s("flush"), s("batch"))]
        .into_iter()
        .collect()
}

fn batches() -> Bytes {
    let mut b = BatchBuilder::new(Compression::Lz4);
    b.push(Some(b"k"), b"v", 1_700_000_000_000, &[("h", b"x")]);
    let mut out = b.build().to_vec();
    let mut b = BatchBuilder::new(Compression::None);
    b.push(None, b"second batch", 1_700_000_000_001, &[]);
    out.extend_from_slice(&b.build());
    Bytes::from(out)
}

fn tp(t: &str, p: u32) -> TopicPartition {
    TopicPartition::new(t, p)
}

fn processor() -> ProcessorSpec {
    ProcessorSpec {
        name: s("grep"),
        version: Some(s("1.2.3")),
        config: config(),
    }
}

fn plugin_info() -> PluginInfo {
    PluginInfo {
        name: s("grep"),
        version: s("1.2.3"),
        kind: s("processor"),
        runtime: s("lua"),
        description: s("keeps matching records"),
        digest: "ab".repeat(32),
        deployed_ms: 1_700_000_000_000,
        size_bytes: 4096,
        config: config(),
        used_by: vec![s("consume orders/0")],
    }
}

fn topic_description() -> TopicDescription {
    TopicDescription {
        name: s("orders"),
        config: config(),
        partitions: vec![
            PartitionDescription {
                partition: 0,
                leader: 1,
                leader_epoch: 3,
                replicas: vec![1, 2, 3],
                isr: vec![1, 2],
                log_start_offset: 10,
                high_watermark: 200,
                log_end_offset: 201,
                size_bytes: 1 << 30,
                status: s("online"),
                offline_reason: None,
            },
            PartitionDescription {
                partition: 1,
                leader: 0,
                leader_epoch: 0,
                replicas: vec![],
                isr: vec![],
                log_start_offset: 0,
                high_watermark: 0,
                log_end_offset: 0,
                size_bytes: 0,
                status: s("offline"),
                offline_reason: Some(s("the stored batch at offset 7 is damaged")),
            },
        ],
    }
}

impl Sample for ProduceRequest {
    fn samples() -> Vec<Self> {
        [Acks::None, Acks::Leader, Acks::All]
            .into_iter()
            .map(|acks| ProduceRequest {
                topic: s("orders"),
                partition: 7,
                acks,
                timeout_ms: 30_000,
            })
            .collect()
    }
    fn payload() -> Bytes {
        batches()
    }
}

impl Sample for ProduceResponse {
    fn samples() -> Vec<Self> {
        vec![ProduceResponse {
            base_offset: 100,
            last_offset: 109,
            append_time_ms: 1_700_000_000_000,
        }]
    }
}

impl Sample for FetchRequest {
    fn samples() -> Vec<Self> {
        [
            (None, Isolation::ReadUncommitted),
            (Some(processor()), Isolation::ReadCommitted),
        ]
        .into_iter()
        .map(|(processor, isolation)| FetchRequest {
            topic: s("orders"),
            partition: 1,
            offset: 42,
            max_bytes: 1 << 20,
            max_wait_ms: 500,
            min_bytes: 1,
            processor,
            isolation,
        })
        .collect()
    }
}

impl Sample for FetchResponse {
    fn samples() -> Vec<Self> {
        vec![
            FetchResponse {
                high_watermark: 99,
                log_start_offset: 3,
                log_end_offset: 100,
                last_stable_offset: 99,
                aborted: vec![],
            },
            FetchResponse {
                high_watermark: 99,
                log_start_offset: 3,
                log_end_offset: 100,
                last_stable_offset: 50,
                aborted: vec![AbortedTxn {
                    producer_id: 7,
                    first_offset: 10,
                    last_offset: 20,
                }],
            },
        ]
    }
    fn payload() -> Bytes {
        batches()
    }
}

impl Sample for ListOffsetsRequest {
    fn samples() -> Vec<Self> {
        [
            OffsetSpec::Earliest,
            OffsetSpec::Latest,
            OffsetSpec::Timestamp(1_700_000_000_000),
            OffsetSpec::LastStable,
        ]
        .into_iter()
        .map(|spec| ListOffsetsRequest {
            topic: s("orders"),
            partition: 2,
            spec,
        })
        .collect()
    }
}

impl Sample for ListOffsetsResponse {
    fn samples() -> Vec<Self> {
        vec![ListOffsetsResponse {
            offset: 5,
            timestamp: -1,
        }]
    }
}

impl Sample for MetadataRequest {
    fn samples() -> Vec<Self> {
        vec![
            MetadataRequest { topics: None },
            MetadataRequest {
                topics: Some(vec![s("a"), s("b")]),
            },
            MetadataRequest {
                topics: Some(vec![]),
            },
        ]
    }
}

impl Sample for MetadataResponse {
    fn samples() -> Vec<Self> {
        vec![MetadataResponse {
            brokers: vec![BrokerInfo {
                id: 1,
                addr: s("127.0.0.1:7800"),
            }],
            topics: vec![TopicMetadata {
                name: s("orders"),
                partitions: vec![PartitionMetadata {
                    partition: 0,
                    leader: 1,
                    leader_epoch: 2,
                    replicas: vec![1],
                    isr: vec![1],
                }],
                partitioner: Some(s("by-region@1.0.0")),
            }],
        }]
    }
}

impl Sample for CreateTopicRequest {
    fn samples() -> Vec<Self> {
        vec![CreateTopicRequest {
            name: s("orders"),
            partitions: 12,
            replication_factor: 1,
            config: config(),
        }]
    }
}

impl Sample for TopicDescription {
    fn samples() -> Vec<Self> {
        vec![topic_description()]
    }
}

impl Sample for DeleteTopicRequest {
    fn samples() -> Vec<Self> {
        vec![DeleteTopicRequest { name: s("orders") }]
    }
}

impl Sample for DeleteTopicResponse {
    fn samples() -> Vec<Self> {
        vec![DeleteTopicResponse {
            partitions_deleted: 12,
        }]
    }
}

impl Sample for DescribeTopicRequest {
    fn samples() -> Vec<Self> {
        vec![DescribeTopicRequest { name: s("orders") }]
    }
}

impl Sample for AlterTopicConfigRequest {
    fn samples() -> Vec<Self> {
        vec![AlterTopicConfigRequest {
            name: s("orders"),
            set: config(),
        }]
    }
}

impl Sample for IncrementalAlterTopicConfigRequest {
    fn samples() -> Vec<Self> {
        vec![
            IncrementalAlterTopicConfigRequest {
                name: s("orders"),
                set: config(),
                remove: vec![s("retention.ms"), s("partitioner")],
            },
            IncrementalAlterTopicConfigRequest {
                name: s("orders"),
                set: BTreeMap::new(),
                remove: Vec::new(),
            },
        ]
    }
}

impl Sample for SubscribeRequest {
    fn samples() -> Vec<Self> {
        [None, Some(processor())]
            .into_iter()
            .map(|processor| SubscribeRequest {
                topic: s("orders"),
                partition: 0,
                offset: -1,
                max_bytes: 65536,
                processor,
            })
            .collect()
    }
}

impl Sample for SubscribeChunk {
    fn samples() -> Vec<Self> {
        vec![SubscribeChunk {
            high_watermark: 10,
            log_start_offset: 0,
        }]
    }
    fn payload() -> Bytes {
        batches()
    }
}

impl Sample for JoinGroupRequest {
    fn samples() -> Vec<Self> {
        vec![
            JoinGroupRequest {
                group: s("billing"),
                member_id: None,
                client_id: s("svc-1"),
                subscription: Subscription::Topics(vec![s("orders"), s("refunds")]),
                session_timeout_ms: 10_000,
                strategy: None,
                auto_offset_reset: None,
            },
            JoinGroupRequest {
                group: s("billing"),
                member_id: Some(s("m-1")),
                client_id: s("svc-2"),
                subscription: Subscription::Pattern(s("orders\\..*")),
                session_timeout_ms: 0,
                strategy: Some(Strategy::Range),
                auto_offset_reset: Some(AutoOffsetReset::Latest),
            },
            JoinGroupRequest {
                group: s("g"),
                member_id: None,
                client_id: s(""),
                subscription: Subscription::Topics(vec![]),
                session_timeout_ms: u32::MAX,
                strategy: Some(Strategy::RoundRobin),
                auto_offset_reset: Some(AutoOffsetReset::Earliest),
            },
        ]
    }
}

impl Sample for JoinGroupResponse {
    fn samples() -> Vec<Self> {
        vec![JoinGroupResponse {
            member_id: s("m-1"),
            generation: 4,
            heartbeat_interval_ms: 3000,
            strategy: Strategy::Sticky,
            auto_offset_reset: AutoOffsetReset::Earliest,
        }]
    }
}

impl Sample for HeartbeatRequest {
    fn samples() -> Vec<Self> {
        vec![HeartbeatRequest {
            group: s("billing"),
            member_id: s("m-1"),
            generation: 4,
            owned: vec![tp("orders", 0), tp("orders", 1)],
        }]
    }
}

impl Sample for HeartbeatResponse {
    fn samples() -> Vec<Self> {
        vec![HeartbeatResponse {
            generation: 5,
            assignment: vec![tp("orders", 0)],
            revoke: vec![tp("orders", 1)],
        }]
    }
}

impl Sample for LeaveGroupRequest {
    fn samples() -> Vec<Self> {
        vec![LeaveGroupRequest {
            group: s("billing"),
            member_id: s("m-1"),
        }]
    }
}

impl Sample for LeaveGroupResponse {
    fn samples() -> Vec<Self> {
        vec![LeaveGroupResponse { generation: 6 }]
    }
}

impl Sample for CommitOffsetsRequest {
    fn samples() -> Vec<Self> {
        vec![CommitOffsetsRequest {
            group: s("billing"),
            member_id: s("m-1"),
            generation: 4,
            offsets: vec![
                OffsetCommit {
                    topic: s("orders"),
                    partition: 0,
                    offset: 1000,
                    metadata: None,
                },
                OffsetCommit {
                    topic: s("orders"),
                    partition: 1,
                    offset: 0,
                    metadata: Some(s("checkpoint 7")),
                },
            ],
        }]
    }
}

impl Sample for CommitOffsetsResponse {
    fn samples() -> Vec<Self> {
        vec![CommitOffsetsResponse { committed: 2 }]
    }
}

impl Sample for FetchOffsetsRequest {
    fn samples() -> Vec<Self> {
        vec![
            FetchOffsetsRequest {
                group: s("billing"),
                partitions: None,
            },
            FetchOffsetsRequest {
                group: s("billing"),
                partitions: Some(vec![tp("orders", 3)]),
            },
        ]
    }
}

impl Sample for FetchOffsetsResponse {
    fn samples() -> Vec<Self> {
        vec![FetchOffsetsResponse {
            offsets: vec![
                CommittedOffset {
                    topic: s("orders"),
                    partition: 3,
                    offset: Some(77),
                    metadata: Some(s("m")),
                },
                CommittedOffset {
                    topic: s("orders"),
                    partition: 4,
                    offset: None,
                    metadata: None,
                },
            ],
        }]
    }
}

impl Sample for ListGroupsRequest {
    fn samples() -> Vec<Self> {
        vec![ListGroupsRequest {}]
    }
}

impl Sample for ListGroupsResponse {
    fn samples() -> Vec<Self> {
        vec![ListGroupsResponse {
            groups: vec![GroupListing {
                group: s("billing"),
                state: s("stable"),
                members: 3,
                strategy: s("sticky"),
            }],
        }]
    }
}

impl Sample for DescribeGroupRequest {
    fn samples() -> Vec<Self> {
        vec![DescribeGroupRequest {
            group: s("billing"),
        }]
    }
}

impl Sample for GroupDescription {
    fn samples() -> Vec<Self> {
        vec![GroupDescription {
            group: s("billing"),
            state: s("rebalancing"),
            generation: 9,
            strategy: s("range"),
            auto_offset_reset: s("latest"),
            members: vec![MemberDescription {
                member_id: s("m-1"),
                client_id: s("svc-1"),
                assigned: vec![tp("orders", 0)],
                revoking: vec![tp("orders", 1)],
            }],
            partitions: vec![
                GroupPartitionDescription {
                    topic: s("orders"),
                    partition: 0,
                    owner: Some(s("m-1")),
                    committed: Some(5),
                    log_start_offset: 0,
                    log_end_offset: 10,
                    high_watermark: 10,
                    lag: 5,
                },
                GroupPartitionDescription {
                    topic: s("orders"),
                    partition: 1,
                    owner: None,
                    committed: None,
                    log_start_offset: 2,
                    log_end_offset: 2,
                    high_watermark: 2,
                    lag: 0,
                },
            ],
        }]
    }
}

impl Sample for ResetOffsetsRequest {
    fn samples() -> Vec<Self> {
        [
            ResetTo::Earliest,
            ResetTo::Latest,
            ResetTo::Offset(12),
            ResetTo::Timestamp(1_700_000_000_000),
            ResetTo::Offsets(vec![(0, 7), (2, 0)]),
        ]
        .into_iter()
        .map(|to| ResetOffsetsRequest {
            group: s("billing"),
            topic: s("orders"),
            to,
        })
        .collect()
    }
}

impl Sample for ResetOffsetsResponse {
    fn samples() -> Vec<Self> {
        vec![ResetOffsetsResponse {
            offsets: vec![(0, 10), (1, i64::MAX), (u32::MAX, -1)],
        }]
    }
}

impl Sample for DeleteGroupRequest {
    fn samples() -> Vec<Self> {
        vec![DeleteGroupRequest {
            group: s("billing"),
        }]
    }
}

impl Sample for DeleteGroupResponse {
    fn samples() -> Vec<Self> {
        vec![DeleteGroupResponse { offsets_deleted: 4 }]
    }
}

impl Sample for DeployPluginRequest {
    fn samples() -> Vec<Self> {
        vec![DeployPluginRequest {}]
    }
    fn payload() -> Bytes {
        Bytes::from_static(b"a plugin archive's bytes")
    }
}

impl Sample for DeployPluginResponse {
    fn samples() -> Vec<Self> {
        [false, true]
            .into_iter()
            .map(|already_deployed| DeployPluginResponse {
                plugin: plugin_info(),
                already_deployed,
            })
            .collect()
    }
}

impl Sample for ListPluginsRequest {
    fn samples() -> Vec<Self> {
        vec![ListPluginsRequest {}]
    }
}

impl Sample for ListPluginsResponse {
    fn samples() -> Vec<Self> {
        vec![
            ListPluginsResponse {
                plugins: vec![plugin_info()],
            },
            ListPluginsResponse { plugins: vec![] },
        ]
    }
}

impl Sample for DescribePluginRequest {
    fn samples() -> Vec<Self> {
        vec![
            DescribePluginRequest {
                name: s("grep"),
                version: None,
            },
            DescribePluginRequest {
                name: s("grep"),
                version: Some(s("1.0.0")),
            },
        ]
    }
}

impl Sample for DescribePluginResponse {
    fn samples() -> Vec<Self> {
        vec![DescribePluginResponse {
            plugin: plugin_info(),
        }]
    }
}

impl Sample for RemovePluginRequest {
    fn samples() -> Vec<Self> {
        vec![RemovePluginRequest {
            name: s("grep"),
            version: s("1.0.0"),
        }]
    }
}

impl Sample for RemovePluginResponse {
    fn samples() -> Vec<Self> {
        vec![RemovePluginResponse {
            digest: "cd".repeat(32),
            blob_deleted: true,
        }]
    }
}

impl Sample for GetPluginRequest {
    fn samples() -> Vec<Self> {
        vec![GetPluginRequest {
            name: s("grep"),
            version: None,
        }]
    }
}

impl Sample for GetPluginResponse {
    fn samples() -> Vec<Self> {
        vec![GetPluginResponse {
            plugin: plugin_info(),
        }]
    }
    fn payload() -> Bytes {
        Bytes::from_static(b"the archive")
    }
}

impl Sample for InitTransactionsRequest {
    fn samples() -> Vec<Self> {
        vec![
            InitTransactionsRequest {
                transactional_id: s("pipeline.wc.1"),
                timeout_ms: 60_000,
                held: None,
            },
            InitTransactionsRequest {
                transactional_id: s("pipeline.wc.1"),
                timeout_ms: 60_000,
                held: Some((1 << 62 | 7, 3)),
            },
        ]
    }
}

impl Sample for InitTransactionsResponse {
    fn samples() -> Vec<Self> {
        vec![InitTransactionsResponse {
            producer_id: 1 << 62,
            producer_epoch: 3,
        }]
    }
}

impl Sample for TxnCommitOffsetsRequest {
    fn samples() -> Vec<Self> {
        vec![TxnCommitOffsetsRequest {
            transactional_id: s("pipeline.wc.1"),
            producer_id: 1 << 62,
            producer_epoch: 3,
            group: s("wc"),
            member_id: s("m-1"),
            generation: 4,
            offsets: vec![OffsetCommit {
                topic: s("words"),
                partition: 2,
                offset: 99,
                metadata: Some(s("{}")),
            }],
        }]
    }
}

impl Sample for TxnCommitOffsetsResponse {
    fn samples() -> Vec<Self> {
        vec![TxnCommitOffsetsResponse { pending: 1 }]
    }
}

impl Sample for EndTxnRequest {
    fn samples() -> Vec<Self> {
        [true, false]
            .into_iter()
            .map(|commit| EndTxnRequest {
                transactional_id: s("pipeline.wc.1"),
                producer_id: 1 << 62,
                producer_epoch: 3,
                commit,
            })
            .collect()
    }
}

impl Sample for EndTxnResponse {
    fn samples() -> Vec<Self> {
        vec![EndTxnResponse {
            partitions: 3,
            committed: true,
        }]
    }
}

impl Sample for AddPartitionsToTxnRequest {
    fn samples() -> Vec<Self> {
        vec![AddPartitionsToTxnRequest {
            transactional_id: s("pipeline.wc.1"),
            producer_id: 1 << 62,
            producer_epoch: 3,
            partitions: vec![
                TopicPartition {
                    topic: s("counts"),
                    partition: 1,
                },
                TopicPartition {
                    topic: s("__consumer_offsets"),
                    partition: 4,
                },
            ],
        }]
    }
}

impl Sample for AddPartitionsToTxnResponse {
    fn samples() -> Vec<Self> {
        vec![AddPartitionsToTxnResponse { partitions: 2 }]
    }
}

impl Sample for WriteTxnMarkerRequest {
    fn samples() -> Vec<Self> {
        [(true, Some(4)), (false, None)]
            .into_iter()
            .map(|(commit, coordinator_epoch)| WriteTxnMarkerRequest {
                topic: s("counts"),
                partition: 1,
                producer_id: 1 << 62,
                producer_epoch: 3,
                commit,
                coordinator_epoch,
            })
            .collect()
    }
}

impl Sample for WriteTxnMarkerResponse {
    fn samples() -> Vec<Self> {
        vec![WriteTxnMarkerResponse { offset: 812 }]
    }
}

impl Sample for VerifyTxnPartitionRequest {
    fn samples() -> Vec<Self> {
        vec![VerifyTxnPartitionRequest {
            producer_id: 1 << 62,
            producer_epoch: 3,
            topic: s("counts"),
            partition: 1,
            include_ending: true,
        }]
    }
}

impl Sample for VerifyTxnPartitionResponse {
    fn samples() -> Vec<Self> {
        vec![VerifyTxnPartitionResponse {
            transactional_id: s("pipeline.wc.1"),
        }]
    }
}

impl Sample for DescribeClusterRequest {
    fn samples() -> Vec<Self> {
        vec![DescribeClusterRequest {}]
    }
}

impl Sample for ClusterDescription {
    fn samples() -> Vec<Self> {
        vec![
            ClusterDescription {
                clustered: true,
                broker: 2,
                controller_leader: Some(1),
                brokers: vec![ClusterBrokerInfo {
                    id: 1,
                    addr: s("127.0.0.1:7401"),
                    epoch: 1_700_000_000_000,
                    fenced: false,
                }],
                under_replicated_partitions: 2,
                offline_partitions: 1,
                damaged_partitions: 0,
            },
            ClusterDescription {
                clustered: false,
                broker: 0,
                controller_leader: None,
                brokers: vec![],
                under_replicated_partitions: 0,
                offline_partitions: 0,
                damaged_partitions: 0,
            },
        ]
    }
}

impl Sample for CreatePartitionsRequest {
    fn samples() -> Vec<Self> {
        vec![CreatePartitionsRequest {
            name: s("orders"),
            total: 12,
        }]
    }
}

impl Sample for ReassignPartitionRequest {
    fn samples() -> Vec<Self> {
        vec![ReassignPartitionRequest {
            topic: s("orders"),
            partition: 3,
            replicas: vec![2, 3, 4],
        }]
    }
}

impl Sample for ReassignPartitionResponse {
    fn samples() -> Vec<Self> {
        vec![ReassignPartitionResponse {
            replicas: vec![1, 2, 3, 4],
            target: vec![2, 3, 4],
        }]
    }
}

impl Sample for ReplicaFetchRequest {
    fn samples() -> Vec<Self> {
        vec![ReplicaFetchRequest {
            topic: s("orders"),
            partition: 5,
            replica_id: 2,
            leader_epoch: 7,
            offset: 1 << 40,
            flushed_offset: (1 << 40) - 7,
            max_bytes: 1 << 20,
            max_wait_ms: 500,
            broker_epoch: 1_764_000_000_123,
        }]
    }
}

impl Sample for ReplicaFetchResponse {
    fn samples() -> Vec<Self> {
        vec![ReplicaFetchResponse {
            high_watermark: 10,
            log_start_offset: 0,
            log_end_offset: 12,
        }]
    }
}

impl Sample for OffsetForLeaderEpochRequest {
    fn samples() -> Vec<Self> {
        vec![OffsetForLeaderEpochRequest {
            topic: s("orders"),
            partition: 0,
            replica_id: 3,
            current_leader_epoch: 4,
            epoch: 2,
        }]
    }
}

impl Sample for OffsetForLeaderEpochResponse {
    fn samples() -> Vec<Self> {
        vec![
            OffsetForLeaderEpochResponse {
                epoch: 2,
                end_offset: 1000,
            },
            OffsetForLeaderEpochResponse {
                epoch: -1,
                end_offset: -1,
            },
        ]
    }
}

impl Sample for DeployPipelineRequest {
    fn samples() -> Vec<Self> {
        vec![DeployPipelineRequest {
            config_toml: s("name = \"p\"\n[source]\ntopics = [\"in\"]\n[sink]\ntopic = \"out\"\n"),
        }]
    }
}

impl Sample for DeployPipelineResponse {
    fn samples() -> Vec<Self> {
        [false, true]
            .into_iter()
            .map(|replaced| DeployPipelineResponse {
                name: s("p"),
                instances: 3,
                replaced,
            })
            .collect()
    }
}

impl Sample for ListPipelinesRequest {
    fn samples() -> Vec<Self> {
        vec![ListPipelinesRequest {}]
    }
}

fn pipeline_status() -> PipelineStatus {
    PipelineStatus {
        name: s("p"),
        state: s("running"),
        guarantee: s("at-least-once"),
        group: s("p"),
        instances: vec![PipelineInstance {
            id: s("p-1"),
            broker: 1,
            partitions: vec![s("in/0"), s("in/2")],
        }],
        records_in: 10_000,
        records_out: 9_900,
        records_per_sec_in: 1234.5,
        records_per_sec_out: 1200.25,
        lag: 7,
        errors: 100,
        dead_lettered: 100,
        latency_p50_ms: 12.0,
        latency_p99_ms: 40.5,
    }
}

impl Sample for ListPipelinesResponse {
    fn samples() -> Vec<Self> {
        vec![
            ListPipelinesResponse {
                pipelines: vec![pipeline_status()],
            },
            ListPipelinesResponse { pipelines: vec![] },
        ]
    }
}

impl Sample for DescribePipelineRequest {
    fn samples() -> Vec<Self> {
        vec![
            DescribePipelineRequest {
                name: s("p"),
                local: false,
            },
            DescribePipelineRequest {
                name: s("p"),
                local: true,
            },
        ]
    }
}

impl Sample for PipelineStatus {
    fn samples() -> Vec<Self> {
        vec![pipeline_status()]
    }
}

impl Sample for StopPipelineRequest {
    fn samples() -> Vec<Self> {
        vec![StopPipelineRequest { name: s("p") }]
    }
}

impl Sample for StopPipelineResponse {
    fn samples() -> Vec<Self> {
        vec![StopPipelineResponse { instances: 2 }]
    }
}

/// Every strict prefix of an encoded frame is "incomplete", and the whole one decodes back.
fn frame_round_trip(f: &Frame) -> Frame {
    let wire = f.encode();
    for n in 0..wire.len() {
        assert_eq!(
            Frame::decode(&wire[..n], &Limits::default()).unwrap(),
            None,
            "frame prefix of {n} of {} bytes decoded",
            wire.len()
        );
    }
    let (d, used) = Frame::decode(&wire, &Limits::default()).unwrap().unwrap();
    assert_eq!(used, wire.len());
    assert_eq!(&d, f);
    d
}

/// Messages whose last fields were appended after the first release, with defaults (see
/// `control`): a control that ends where those fields begin is an older peer's, and decodes.
const WITH_APPENDED_FIELDS: &[&str] = &[
    "FetchRequest",
    "SubscribeRequest",
    "InitTransactionsRequest",
    "VerifyTxnPartitionRequest",
    "ReplicaFetchRequest",
];

/// The postcard control alone: every strict prefix fails (decoding is deterministic, so a
/// prefix always runs out of bytes before the value is complete), except, for the messages
/// with appended fields, one that ends before them: it decodes to a value agreeing with
/// every byte sent.
fn control_prefixes_fail<T: serde::Serialize + serde::de::DeserializeOwned + Debug>(v: &T) {
    let control = encode_control(v);
    let name = std::any::type_name::<T>().rsplit("::").next().unwrap_or("");
    for n in 0..control.len() {
        if let Ok(got) = decode_control::<T>(&control[..n], "test") {
            assert!(
                WITH_APPENDED_FIELDS.contains(&name),
                "{n}-byte prefix of the control of {v:?} decoded"
            );
            assert!(
                encode_control(&got).starts_with(&control[..n]),
                "{n}-byte prefix of the control of {v:?} decoded as {got:?}"
            );
        }
    }
}

/// An older client's requests, without the fields appended since: each decodes, with the
/// appended fields at the defaults that mean what the older client meant.
#[test]
fn an_older_clients_requests_decode_with_the_appended_fields_absent() {
    let fetch = (s("t"), 3u32, 42i64, 1024u32, 500u32, 1u32);
    let r: FetchRequest = decode_control(&encode_control(&fetch), "fetch").unwrap();
    assert_eq!((r.topic.as_str(), r.partition, r.offset), ("t", 3, 42));
    assert_eq!((r.max_bytes, r.max_wait_ms, r.min_bytes), (1024, 500, 1));
    assert_eq!(r.processor, None);
    assert_eq!(r.isolation, Isolation::ReadUncommitted);
    // One release later: the processor sent, isolation not yet.
    let fetch = (
        s("t"),
        3u32,
        42i64,
        1024u32,
        500u32,
        1u32,
        Some(processor()),
    );
    let r: FetchRequest = decode_control(&encode_control(&fetch), "fetch").unwrap();
    assert_eq!(r.processor, Some(processor()));
    assert_eq!(r.isolation, Isolation::ReadUncommitted);

    let subscribe = (s("t"), 0u32, 7i64, 4096u32);
    let r: SubscribeRequest = decode_control(&encode_control(&subscribe), "subscribe").unwrap();
    assert_eq!((r.offset, r.max_bytes, r.processor), (7, 4096, None));

    let init = (s("tx"), 60_000u32);
    let r: InitTransactionsRequest = decode_control(&encode_control(&init), "init").unwrap();
    assert_eq!((r.transactional_id.as_str(), r.timeout_ms), ("tx", 60_000));
    assert_eq!(r.held, None);

    let verify = (1i64 << 62, 3i16, s("counts"), 1u32);
    let r: VerifyTxnPartitionRequest = decode_control(&encode_control(&verify), "verify").unwrap();
    assert_eq!((r.producer_id, r.partition), (1 << 62, 1));
    assert!(!r.include_ending);

    // A follower from before broker epochs: its positions are taken as before (epoch 0).
    let replica = (s("t"), 2u32, 2u32, 5u64, 100i64, 1024u32, 500u32, 90i64);
    let r: ReplicaFetchRequest =
        decode_control(&encode_control(&replica), "replica fetch").unwrap();
    assert_eq!((r.offset, r.flushed_offset, r.broker_epoch), (100, 90, 0));

    // A field that was never optional stays required: a fetch without `min_bytes` fails.
    let cut = (s("t"), 3u32, 42i64, 1024u32, 500u32);
    assert!(decode_control::<FetchRequest>(&encode_control(&cut), "fetch").is_err());
}

/// Checks a body prefix's decode: an error, or (only when it keeps the whole control and
/// cuts the payload) the same control with the payload cut at the same place.
fn check_prefix<T: PartialEq + Debug>(
    r: Result<(T, Bytes), ProtocolError>,
    want: &T,
    payload: &Bytes,
    body_len: usize,
    n: usize,
) {
    let payload_start = body_len - payload.len();
    match r {
        Err(ProtocolError::Remote { .. }) => panic!("prefix {n} decoded as a remote error"),
        Err(_) => assert!(
            n < payload_start,
            "prefix of {n} bytes keeps the control ({payload_start} bytes) but failed"
        ),
        Ok((got, p)) => {
            assert!(
                n >= payload_start,
                "prefix of {n} bytes cuts the control ({payload_start} bytes) but decoded {got:?}"
            );
            assert_eq!(&got, want);
            assert_eq!(&p[..], &payload[..n - payload_start]);
            assert!(p.len() < payload.len());
        }
    }
}

fn check_request<M: Message + Sample + PartialEq + Debug>() {
    for payload in [Bytes::new(), M::payload()] {
        for req in M::samples() {
            let f = frame_round_trip(&encode_request(&req, &payload));
            assert_eq!(f.api, M::API as u16);
            let (d, p) = decode_request::<M>(&f.body).unwrap();
            assert_eq!(d, req);
            assert_eq!(p, payload);
            for n in 0..f.body.len() {
                let r = decode_request::<M>(&f.body.slice(..n));
                check_prefix(r, &req, &payload, f.body.len(), n);
            }
            control_prefixes_fail(&req);
        }
    }
}

fn check_response<M: Message>()
where
    M::Response: Sample + PartialEq + Debug,
{
    for payload in [Bytes::new(), M::Response::payload()] {
        for resp in M::Response::samples() {
            let f = frame_round_trip(&encode_response(M::API, &resp, &payload));
            let (d, p) = decode_response::<M::Response>(M::API.name(), &f.body).unwrap();
            assert_eq!(d, resp);
            assert_eq!(p, payload);
            for n in 0..f.body.len() {
                let r = decode_response::<M::Response>(M::API.name(), &f.body.slice(..n));
                check_prefix(r, &resp, &payload, f.body.len(), n);
            }
            control_prefixes_fail(&resp);
        }
    }
    // The error form of the same response: round trip, and every strict prefix fails
    // without being mistaken for the broker's error.
    let f = frame_round_trip(&encode_error(
        M::API as u16,
        ErrorCode::InvalidRecord,
        "header says 2 records, the batch holds 1",
    ));
    match decode_response::<M::Response>(M::API.name(), &f.body) {
        Err(ProtocolError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::InvalidRecord);
            assert_eq!(message, "header says 2 records, the batch holds 1");
        }
        other => panic!("error response decoded as {other:?}"),
    }
    for n in 0..f.body.len() {
        let r = decode_response::<M::Response>(M::API.name(), &f.body.slice(..n));
        assert!(
            matches!(&r, Err(e) if !matches!(e, ProtocolError::Remote { .. })),
            "{n}-byte prefix of an error response: {r:?}"
        );
    }
    control_prefixes_fail(&ErrorBody {
        message: "x".repeat(200),
    });
}

/// Decodes `body` as the request and the response of `api`; only a panic can fail.
fn decode_any(api: ApiKey, body: &Bytes) {
    macro_rules! dispatch {
        ($($key:ident: $req:ty => $resp:ty,)*) => {
            match api {
                $(ApiKey::$key => {
                    let _ = decode_request::<$req>(body);
                    let _ = decode_response::<$resp>(stringify!($key), body);
                })*
            }
        };
    }
    crate::with_all_messages!(dispatch);
}

/// All valid encodings (requests and responses, with and without payload).
fn valid_bodies() -> Vec<(ApiKey, Bytes)> {
    let mut out = Vec::new();
    macro_rules! collect {
        ($($key:ident: $req:ty => $resp:ty,)*) => {$(
            for req in <$req as Sample>::samples() {
                out.push((ApiKey::$key, encode_request(&req, &<$req as Sample>::payload()).body));
            }
            for resp in <$resp as Sample>::samples() {
                let payload = <$resp as Sample>::payload();
                out.push((ApiKey::$key, encode_response(ApiKey::$key, &resp, &payload).body));
            }
        )*};
    }
    crate::with_all_messages!(collect);
    out
}

macro_rules! per_message_tests {
    ($($key:ident: $req:ty => $resp:ty,)*) => {
        #[allow(non_snake_case)]
        mod round_trip_and_every_prefix {
            use super::*;
            $(
                #[test]
                fn $key() {
                    assert_eq!(<$req as Message>::API, ApiKey::$key);
                    check_request::<$req>();
                    check_response::<$req>();
                }
            )*
        }

        #[test]
        fn the_message_list_covers_every_api_key() {
            let listed = [$(ApiKey::$key),*];
            assert_eq!(&listed[..], ApiKey::ALL);
        }
    };
}

crate::with_all_messages!(per_message_tests);

#[test]
fn a_lying_sequence_length_allocates_by_the_bytes_present() {
    // postcard: a sequence whose length is larger than the bytes left gets no capacity up
    // front (postcard's size hint is then None); within the bytes left, serde caps it at
    // 1 MiB. Either way a short body with a huge count fails fast.
    let mut control = Vec::new();
    control.push(1u8); // Some(
    control.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // u32::MAX topics
    control.extend_from_slice(&[1, b'a']);
    let mut body = (control.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(&control);
    let e = decode_request::<MetadataRequest>(&Bytes::from(body)).unwrap_err();
    assert!(matches!(e, ProtocolError::Body { .. }), "{e:?}");
    // A control length past the body is refused before the control is looked at.
    let mut body = u32::MAX.to_be_bytes().to_vec();
    body.push(0);
    assert!(matches!(
        decode_request::<MetadataRequest>(&Bytes::from(body)),
        Err(ProtocolError::Malformed { .. })
    ));
    // A string length past the bytes present.
    let mut control = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    control.extend_from_slice(b"abc");
    let mut body = (control.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(&control);
    assert!(decode_request::<DeleteTopicRequest>(&Bytes::from(body)).is_err());
}

proptest! {
    #[test]
    fn random_bodies_never_panic(
        api in 0usize..ApiKey::ALL.len(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        decode_any(ApiKey::ALL[api], &Bytes::from(body));
    }

    #[test]
    fn mutated_valid_bodies_never_panic(
        pick in any::<proptest::sample::Index>(),
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<proptest::sample::Index>(),
    ) {
        let bodies = valid_bodies();
        let (api, body) = &bodies[pick.index(bodies.len())];
        let mut b = body.to_vec();
        for (at, v) in &flips {
            let i = at.index(b.len());
            b[i] = *v;
        }
        b.truncate(cut.index(b.len() + 1));
        decode_any(*api, &Bytes::from(b));
    }
}

/// Writes seed inputs for the fuzz targets (`scripts/fuzz.sh` runs this): every sample
/// message as a body (`request`: API index byte + body) and as a frame (`frame`), honest
/// batches (`batch`), and honest records sections behind the `produce` target's 8 control
/// bytes. Ignored unless asked for; the directory comes from `QUIVER_FUZZ_SEEDS`.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("QUIVER_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let write = |target: &str, name: String, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    for (i, (api, body)) in valid_bodies().into_iter().enumerate() {
        let index = ApiKey::ALL.iter().position(|k| *k == api).unwrap() as u8;
        let mut seed = vec![index];
        seed.extend_from_slice(&body);
        write("request", format!("seed-{i:03}"), &seed);
        let frame = Frame {
            api: api as u16,
            version: crate::PROTOCOL_VERSION,
            body,
        };
        write("frame", format!("seed-{i:03}"), &frame.encode());
    }
    const NOW: i64 = 1_700_000_000_000;
    for (i, c) in [Compression::None, Compression::Lz4, Compression::Zstd]
        .into_iter()
        .enumerate()
    {
        let mut b = BatchBuilder::new(c);
        b.push(Some(b"key"), b"value", NOW, &[("h", b"v")]);
        b.push(None, b"", NOW + 3, &[]);
        b.push(Some(b""), b"third", NOW + 1, &[("a", b""), ("b", b"xyz")]);
        let batch = b.build();
        let mut two = batch.to_vec();
        two.extend_from_slice(&batch);
        write("batch", format!("seed-{i}"), &two);
        let mut p = BatchBuilder::new(Compression::None);
        p.push(Some(b"key"), b"value", NOW, &[("h", b"v")]);
        p.push(None, b"", NOW + 3, &[]);
        p.push(Some(b""), b"third", NOW + 1, &[("a", b""), ("b", b"xyz")]);
        let plain = p.build();
        // codec index | "compress it" bit, count 3, first_ts delta 0, max - first 3.
        let mut seed = vec![i as u8 | 0x40, 3, 0, 0, 0, 3, 0, 0];
        seed.extend_from_slice(&plain[crate::batch::BATCH_HEADER_LEN..]);
        write("produce", format!("seed-{i}"), &seed);
        write("produce", format!("whole-{i}"), &batch);
        // A pipeline's output: `quiver.source` written as the batch's numbered header.
        let mut n = BatchBuilder::new(Compression::None);
        n.set_numbered_header(Some("quiver.source"));
        n.push(None, b"one", NOW, &[("quiver.source", b"in/0/41")]);
        n.push(
            Some(b"k"),
            b"two",
            NOW + 2,
            &[("h", b"v"), ("quiver.source", b"in/0/42")],
        );
        n.push(None, b"three", NOW + 1, &[("quiver.source", b"in/1/7")]);
        let numbered = n.build();
        let mut seed = vec![i as u8 | 0x60, 3, 0, 0, 0, 2, 0, 0];
        seed.extend_from_slice(&numbered[crate::batch::BATCH_HEADER_LEN..]);
        write("produce", format!("numbered-{i}"), &seed);
        write("produce", format!("numbered-whole-{i}"), &numbered);
    }
}
