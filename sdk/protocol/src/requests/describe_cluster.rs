//! DescribeCluster: the controller as this broker sees it — the leader and every registered
//! broker (id, address, epoch, fenced). A lone broker answers `clustered: false`.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Asks for the cluster's controller view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribeClusterRequest {}

/// One registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterBrokerInfo {
    /// Broker id.
    pub id: u64,
    /// The address it registered.
    pub addr: String,
    /// Its incarnation (a new one per start).
    pub epoch: u64,
    /// A fenced broker leads nothing (stopped, or not caught up).
    pub fenced: bool,
}

/// The answering broker's view of its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDescription {
    /// False for a lone broker (no `[cluster]`).
    pub clustered: bool,
    /// The answering broker's id.
    pub broker: u32,
    /// The controller leader it knows of.
    pub controller_leader: Option<u64>,
    /// Registered brokers, by id.
    pub brokers: Vec<ClusterBrokerInfo>,
    /// Partitions whose ISR is smaller than their replica set (controller view).
    pub under_replicated_partitions: u64,
    /// Partitions with no leader (controller view).
    pub offline_partitions: u64,
    /// Partitions whose storage on the answering broker is damaged (see `topic describe`).
    pub damaged_partitions: u64,
}

impl Message for DescribeClusterRequest {
    const API: ApiKey = ApiKey::DescribeCluster;
    type Response = ClusterDescription;
}
