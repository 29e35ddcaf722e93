//! The cluster controller: the metadata every broker agrees on, replicated with openraft.
//!
//! The controller owns the registered brokers (id, address, broker epoch, fenced), the topics
//! (ids, config overrides) and every partition's assignment {replicas, leader, leader epoch,
//! partition epoch, ISR}. Changes are [`ControllerCommand`]s proposed through one Raft group;
//! each broker applies the committed log to its own [`ControllerState`] and answers metadata
//! from it. Consensus is openraft's; this module only supplies the types and the state machine,
//! and must never decide anything outside [`ControllerState::apply`], so that every copy agrees.
//!
//! - [`file`]: `cluster.toml`, the brokers `quiver cluster start` runs on one machine;
//! - [`member`]: a broker's membership: its controller node on the broker's endpoint, forming
//!   the group, registering and unfencing itself, fencing itself on a clean stop;
//! - [`types`]: the Raft type configuration, commands and responses (the log format);
//! - [`state`]: the pure, deterministic metadata state machine;
//! - [`store`]: openraft storage-v2 on the controller's own sled database (log, vote, applied
//!   state, snapshots), with the flush-before-durable rule;
//! - [`network`]: openraft's RPCs over QUIC on their own ALPN (`quiver-raft/1`), mutual TLS
//!   against the cluster CA;
//! - [`controller`]: a running node of the group ([`Controller`]): store + `openraft::Raft` +
//!   its QUIC endpoint; writes on the leader, a copy of the applied state everywhere.
//!
//! Not here yet: heartbeats (fencing a broker that died without stopping), and the brokers
//! acting on the metadata (topics, replication).

pub mod controller;
pub mod file;
pub mod member;
pub mod network;
pub mod placement;
pub mod state;
pub mod store;
pub mod types;

pub use controller::{
    raft_config, Controller, ControllerConfig, ControllerStartError, ControllerWriteError,
    RaftTimings,
};
pub use file::{ClusterBroker, ClusterFile, ClusterFileError};
pub use network::{
    serve_raft_connection, serve_raft_service, Liveness, QuicRaftNetwork, RaftService, RaftTls,
    RaftTransportError, RAFT_ALPN,
};

pub use state::{
    BrokerRecord, ControllerState, PartitionRecord, PipelineRecord, PluginRecord, TopicRecord,
    Touched,
};
pub use store::{
    open as open_store, ControllerLogStore, ControllerStateMachine, ControllerStoreError,
};
pub use types::{
    BrokerId, BrokerNode, ControllerCommand, ControllerError, ControllerResponse,
    PartitionAssignment, PluginArchive, TypeConfig,
};
