//! InitTransactions, AddPartitionsToTxn and EndTxn (handed to the transactional id's
//! coordinator, see [`crate::txn`]), TxnCommitOffsets (handed to the group's coordinator),
//! and WriteTxnMarker (a coordinator asking this broker, as a partition's leader, for a
//! marker; brokers only).

use bytes::Bytes;
use quiver_protocol::batch::Marker;
use quiver_protocol::requests::{
    AddPartitionsToTxnRequest, EndTxnRequest, InitTransactionsRequest, TxnCommitOffsetsRequest,
    VerifyTxnPartitionRequest, WriteTxnMarkerRequest, WriteTxnMarkerResponse,
};
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::group::OFFSETS_TOPIC;
use crate::server::dispatch::Peer;
use crate::server::ServerContext;

/// Handles InitTransactions.
#[tracing::instrument(name = "init_transactions", skip_all)]
pub async fn init(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<InitTransactionsRequest>(&body)?;
    let coordinator = ctx.groups.for_txn(&req.transactional_id)?;
    Ok(Reply::control(&coordinator.init(&req).await?))
}

/// Handles AddPartitionsToTxn: the partitions must exist (in a cluster: in the controller's
/// metadata).
#[tracing::instrument(name = "add_partitions_to_txn", skip_all)]
pub async fn add_partitions(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<AddPartitionsToTxnRequest>(&body)?;
    let coordinator = ctx.groups.for_txn(&req.transactional_id)?;
    match ctx.replicas() {
        Some(rm) => {
            let view = rm.view();
            crate::txn::check_partitions(&req, |t, p| view.partition(t, p).is_some())?
        }
        None => crate::txn::check_partitions(&req, |t, p| ctx.topics.partition(t, p).is_ok())?,
    }
    Ok(Reply::control(&coordinator.add_partitions(&req).await?))
}

/// Handles TxnCommitOffsets.
#[tracing::instrument(name = "txn_commit_offsets", skip_all)]
pub async fn commit_offsets(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<TxnCommitOffsetsRequest>(&body)?;
    let service = ctx.groups.for_group(&req.group)?;
    // A lone broker adds its offsets partition to the transaction itself (checking the
    // producer's epoch), as it does for a transactional produce.
    if let Some(txns) = ctx.groups.lone_txns() {
        txns.register_partition(req.producer_id, req.producer_epoch, OFFSETS_TOPIC, 0)
            .await?;
    } else if let Some(rm) = ctx.replicas() {
        // In a cluster the coordinator confirms that the producer's open transaction
        // added this offsets partition, as for a transactional produce.
        if !service.holds_txn(req.producer_id, req.producer_epoch) {
            let check = VerifyTxnPartitionRequest {
                producer_id: req.producer_id,
                producer_epoch: req.producer_epoch,
                topic: OFFSETS_TOPIC.to_string(),
                partition: service.partition(),
                include_ending: false,
            };
            crate::txn::verify::verify_in_cluster(rm, &ctx.groups, &check).await?;
        }
    }
    Ok(Reply::control(&service.txn_commit(&req).await?))
}

/// Handles EndTxn.
#[tracing::instrument(name = "end_txn", skip_all)]
pub async fn end(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<EndTxnRequest>(&body)?;
    let coordinator = ctx.groups.for_txn(&req.transactional_id)?;
    Ok(Reply::control(&coordinator.end(&req).await?))
}

/// Brokers-only requests need a peer of this cluster: its certificate signed by the
/// cluster CA.
fn from_a_broker(ctx: &ServerContext, peer: Peer, what: &str) -> Result<(), RequestError> {
    if ctx.replicas().is_none() || !peer.broker {
        return Err(RequestError::new(
            ErrorCode::ClusterAuthorizationFailed,
            format!("{what} is for the cluster's brokers only (a connection with a certificate signed by the cluster CA)"),
        ));
    }
    Ok(())
}

/// Handles VerifyTxnPartition (brokers only): answered by the coordinator that issued the
/// producer id, if this broker serves it.
#[tracing::instrument(name = "verify_txn_partition", skip_all)]
pub fn verify_partition(
    ctx: &ServerContext,
    peer: Peer,
    body: Bytes,
) -> Result<Reply, RequestError> {
    let (req, _) = decode::<VerifyTxnPartitionRequest>(&body)?;
    from_a_broker(ctx, peer, "VerifyTxnPartition")?;
    let p = crate::txn::coordinator_partition_of(req.producer_id).ok_or_else(|| {
        RequestError::new(
            ErrorCode::ProducerFenced,
            format!(
                "producer id {} was not issued by a transaction coordinator",
                req.producer_id
            ),
        )
    })?;
    Ok(Reply::control(&crate::txn::verify::local(
        &ctx.groups,
        p,
        &req,
    )?))
}

/// Handles WriteTxnMarker: only another broker of the cluster (its certificate signed by
/// the cluster CA) may ask, and only the partition's leader appends.
#[tracing::instrument(name = "write_txn_marker", skip_all)]
pub async fn write_marker(
    ctx: &ServerContext,
    peer: Peer,
    body: Bytes,
) -> Result<Reply, RequestError> {
    let (req, _) = decode::<WriteTxnMarkerRequest>(&body)?;
    from_a_broker(ctx, peer, "WriteTxnMarker")?;
    let marker = if req.commit {
        Marker::Commit
    } else {
        Marker::Abort
    };
    let m = crate::txn::TxnMarker {
        producer_id: req.producer_id,
        epoch: req.producer_epoch,
        marker,
        coordinator_epoch: req.coordinator_epoch,
    };
    let offset = ctx
        .txn_markers
        .append_local(&req.topic, req.partition, m)
        .await?;
    Ok(Reply::control(&WriteTxnMarkerResponse { offset }))
}
