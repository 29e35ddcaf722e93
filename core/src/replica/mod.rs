//! Data replication on a cluster broker (Kafka's ISR model; Raft is only for metadata).
//!
//! - [`leader`]: the pure rules a partition leader follows (high watermark, ISR changes);
//! - [`manager`]: [`ReplicaManager`] applies the controller's metadata to this broker —
//!   makes its copies of topics, takes the leader or follower role of each partition it
//!   holds a replica of, proposes ISR changes, and answers what handlers ask (am I the
//!   leader, record a follower's position, wait for the high watermark);
//! - [`follower`]: the fetch loop of one follower partition: epoch lookup and truncation,
//!   then long-poll fetches from the leader, appending and flushing what arrives;
//! - [`peers`]: connections to other brokers, authenticated with this broker's certificate;
//! - [`plugins`]: the broker's plugin store follows the plugins the controller holds.

pub mod follower;
pub mod leader;
pub mod manager;
pub mod peers;
pub mod plugins;

pub use leader::LeaderState;
pub use manager::{ReplicaError, ReplicaManager};
