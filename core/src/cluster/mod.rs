//! The cluster controller: the metadata every broker agrees on, replicated with openraft.
//!
//! The controller owns the registered brokers (id, address, broker epoch, fenced), the topics
//! (ids, config overrides) and every partition's assignment {replicas, leader, leader epoch,
//! partition epoch, ISR}. Changes are [`ControllerCommand`]s proposed through one Raft group;
//! each broker applies the committed log to its own [`ControllerState`] and answers metadata
//! from it. Consensus is openraft's; this module only supplies the types and the state machine,
//! and must never decide anything outside [`ControllerState::apply`], so that every copy agrees.
//!
//! - [`types`]: the Raft type configuration, commands and responses (the log format);
//! - [`state`]: the pure, deterministic metadata state machine;
//! - [`store`]: openraft storage-v2 on the controller's own sled database (log, vote, applied
//!   state, snapshots), with the flush-before-durable rule.
//!
//! Not here yet: the Raft network (RPCs over the QUIC endpoint on their own ALPN), broker
//! registration and heartbeats, and wiring into the running broker.

pub mod state;
pub mod store;
pub mod types;

pub use state::{BrokerRecord, ControllerState, PartitionRecord, TopicRecord};
pub use store::{
    open as open_store, ControllerLogStore, ControllerStateMachine, ControllerStoreError,
};
pub use types::{
    BrokerId, BrokerNode, ControllerCommand, ControllerError, ControllerResponse,
    PartitionAssignment, TypeConfig,
};
