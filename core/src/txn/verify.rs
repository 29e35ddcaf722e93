//! Whether a transactional batch may open a transaction in a partition of a cluster.
//!
//! A lone broker registers a transactional batch's partition with its coordinator as the
//! batch arrives. In a cluster the coordinator may be another broker, so before a leader
//! appends the first transactional batch of a producer that has no transaction open in the
//! partition, it asks the coordinator that issued the producer id (the leader of the
//! offsets partition the id names, see [`super::coordinator_partition_of`]) whether that
//! producer's open transaction added the partition. A batch no coordinator knows about
//! would otherwise hold the partition's last stable offset back forever.

use quiver_protocol::requests::VerifyTxnPartitionRequest;

use super::markers::leader_client;
use super::{coordinator_partition_of, TxnError};
use crate::group::{GroupDirectory, OFFSETS_TOPIC};
use crate::replica::ReplicaManager;

/// Asks the coordinator of `req.producer_id` (here or on its broker).
#[tracing::instrument(name = "verify_txn_partition", skip_all, fields(producer_id = req.producer_id, topic = %req.topic, partition = req.partition))]
pub async fn verify_in_cluster(
    rm: &ReplicaManager,
    groups: &GroupDirectory,
    req: &VerifyTxnPartitionRequest,
) -> Result<(), TxnError> {
    let p = coordinator_partition_of(req.producer_id).ok_or_else(|| {
        TxnError::Fenced(format!(
            "producer id {} was not issued by a transaction coordinator; a transactional producer calls InitTransactions first",
            req.producer_id
        ))
    })?;
    let partitions = rm
        .view()
        .topic(OFFSETS_TOPIC)
        .map_or(0, |t| t.partitions.len() as u32);
    if p >= partitions && partitions > 0 {
        return Err(TxnError::Fenced(format!(
            "producer id {} names a coordinator that does not exist; a transactional producer calls InitTransactions first",
            req.producer_id
        )));
    }
    match leader_client(rm, OFFSETS_TOPIC, p).await? {
        None => local(groups, p, req).map(drop),
        Some(coordinator) => coordinator.request(req).await.map(drop),
    }
}

/// Answers for the coordinator of offsets partition `p` on this broker.
pub fn local(
    groups: &GroupDirectory,
    p: u32,
    req: &VerifyTxnPartitionRequest,
) -> Result<quiver_protocol::requests::VerifyTxnPartitionResponse, TxnError> {
    groups
        .txns_at(p)
        .ok_or_else(|| TxnError::Route {
            code: quiver_protocol::ErrorCode::NotLeader,
            reason: format!("the coordinator of {OFFSETS_TOPIC}/{p} is not served here (yet)"),
        })?
        .verify(req)
}
