//! InitTransactions, TxnCommitOffsets and EndTxn: handed to the transaction coordinator
//! (see [`crate::txn`]).

use bytes::Bytes;
use quiver_protocol::requests::{EndTxnRequest, InitTransactionsRequest, TxnCommitOffsetsRequest};

use super::{decode, Reply, RequestError};
use crate::server::ServerContext;

/// Handles InitTransactions.
#[tracing::instrument(name = "init_transactions", skip_all)]
pub async fn init(ctx: &ServerContext, body: Bytes) -> Result<Reply, RequestError> {
    let (req, _) = decode::<InitTransactionsRequest>(&body)?;
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
