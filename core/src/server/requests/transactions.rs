//! InitTransactions, TxnCommitOffsets and EndTxn: handed to the transaction coordinator
//! (see [`crate::txn`]).

use bytes::Bytes;
use quiver_protocol::requests::{EndTxnRequest, InitTransactionsRequest, TxnCommitOffsetsRequest};
use quiver_protocol::ErrorCode;

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles InitTransactions. A cluster of more than one broker refuses it: its coordinator
/// is this broker alone, and the leaders of a transaction's partitions on other brokers
/// could not take part, so the transaction would fail at its first produce there.
#[tracing::instrument(name = "init_transactions", skip_all)]
pub async fn init(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<InitTransactionsRequest>(&body)?;
    if let Some(rm) = ctx.replicas() {
        let brokers = rm.view().brokers.len();
        if brokers > 1 {
            return Err(RequestError::new(
                ErrorCode::UnsupportedApi,
                format!(
                    "transactions are not available in a cluster of {brokers} brokers yet: a transaction's coordinator is the broker its producer connects to, and partition leaders on other brokers cannot take part; use an idempotent producer with acks=all (a pipeline's guarantee = \"at-least-once\"), or a single broker"
                ),
            ));
        }
    }
    Ok(Reply::control(&ctx.txns.init(&req).await?))
}

/// Handles TxnCommitOffsets.
#[tracing::instrument(name = "txn_commit_offsets", skip_all)]
pub async fn commit_offsets(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<TxnCommitOffsetsRequest>(&body)?;
    Ok(Reply::control(&ctx.txns.commit_offsets(&req).await?))
}

/// Handles EndTxn.
#[tracing::instrument(name = "end_txn", skip_all)]
pub async fn end(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<EndTxnRequest>(&body)?;
    Ok(Reply::control(&ctx.txns.end(&req).await?))
}
