//! One client connection: accept request streams, and for each read exactly one frame
//! (header first, length checked against the limit before the body is read, the whole
//! request within `request_read_timeout_ms`), dispatch it and write the answer (taken off
//! the stream by a reader that does not stall for `response_write_timeout_ms`, or the
//! stream is reset). A request that
//! only reads or waits is dropped when its client goes away.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{RecvStream, SendStream, VarInt};
use quiver_protocol::{
    encode_error, response_prefix, ApiKey, ErrorCode, FrameHeader, Limits, FRAME_HEADER_LEN,
    PROTOCOL_VERSION,
};
use tracing::Instrument;

use super::budget::Budget;
use super::dispatch::{dispatch, Outcome, Peer};
use super::requests::RequestError;
use super::ServerContext;

/// Application error code used when the broker stops reading a stream.
const STOP_BAD_FRAME: u32 = 1;
/// Application error code of a stream reset because its client did not read the answer.
pub(super) const RESET_SLOW_READER: u32 = 2;

/// Requests that change nothing, only read or wait (long-polls): when the client goes
/// away their handler is dropped at once instead of waiting out its long-poll. Requests
/// that change state always run to the end, so nothing is left half done.
fn only_reads(api: Option<ApiKey>) -> bool {
    matches!(
        api,
        Some(
            ApiKey::Fetch
                | ApiKey::Subscribe
                | ApiKey::Heartbeat
                | ApiKey::FetchOffsets
                | ApiKey::ListOffsets
                | ApiKey::Metadata
                | ApiKey::DescribeTopic
                | ApiKey::DescribeGroup
                | ApiKey::ListGroups
        )
    )
}

/// Writes `chunks`, resetting the stream when the reader takes none of their bytes for
/// `stall` (a slow but steady reader is never cut off). True when everything was written.
pub(super) async fn write_within(
    send: &mut SendStream,
    mut chunks: &mut [Bytes],
    stall: Duration,
) -> bool {
    while !chunks.is_empty() {
        // `write_chunks` is cancellation safe: a timeout loses no byte.
        match tokio::time::timeout(stall, send.write_chunks(chunks)).await {
            Ok(Ok(written)) => chunks = &mut chunks[written.chunks..],
            Ok(Err(_)) => return false,
            Err(_) => {
                tracing::debug!("client took none of its answer in time; stream reset");
                let _ = send.reset(VarInt::from_u32(RESET_SLOW_READER));
                return false;
            }
        }
    }
    true
}

/// Serves one connection until it closes or the broker stops.
pub async fn serve_connection(conn: quinn::Connection, ctx: Arc<ServerContext>) {
    ctx.metrics.connections.fetch_add(1, Ordering::Relaxed);
    tracing::debug!("client connected");
    // During shutdown the connection keeps accepting streams (each answered at once with
    // `BrokerShuttingDown`) until every in-flight request has its answer; only then does it
    // close, so no request the broker received is left to time out.
    let drained = async {
        ctx.stopped().await;
        ctx.drain(Duration::from_millis(ctx.config.shutdown_timeout_ms))
            .await
    };
    tokio::pin!(drained);
    // With a cluster's TLS config, a client certificate is only accepted when the cluster
    // CA signed it: a peer that presented one is a broker of this cluster.
    let peer = Peer {
        broker: conn.peer_identity().is_some(),
    };
    // Twice the largest frame: one answer of any size always fits.
    let budget = Budget::new(2 * ctx.config.limits.max_frame_bytes as usize);
    loop {
        let stream = tokio::select! {
            s = conn.accept_bi() => s,
            _ = &mut drained => break,
        };
        match stream {
            Ok((send, recv)) => {
                let ctx2 = ctx.clone();
                let guard = ctx.begin_request();
                let conn2 = conn.clone();
                let budget = budget.clone();
                tokio::spawn(async move {
                    budget
                        .scope(serve_stream(ctx2, &conn2, peer, send, recv))
                        .await;
                    drop(guard);
                });
            }
            Err(e) => {
                tracing::debug!(reason = %e, "client connection ended");
                break;
            }
        }
    }
    if ctx.is_stopping() {
        conn.close(VarInt::from_u32(0), b"broker shutting down");
    }
    ctx.metrics.connections.fetch_sub(1, Ordering::Relaxed);
}

enum ReadFail {
    /// The stream ended or reset before a whole frame arrived.
    Gone,
    /// The bytes broke a rule; answer with this error.
    Bad(RequestError),
}

async fn read_request(
    recv: &mut RecvStream,
    limits: &Limits,
) -> Result<(u16, u16, Bytes), ReadFail> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut head)
        .await
        .map_err(|_| ReadFail::Gone)?;
    let h = FrameHeader::parse(&head, limits).map_err(|e| ReadFail::Bad(e.into()))?;
    // read_to_end grows its buffer with the bytes that actually arrive, so a large
    // length prefix with no data behind it allocates nothing.
    let body = recv
        .read_to_end(h.body_len as usize)
        .await
        .map_err(|e| match e {
            quinn::ReadToEndError::TooLong => ReadFail::Bad(RequestError::new(
                ErrorCode::InvalidRequest,
                "bytes after the end of the frame; send one frame per stream",
            )),
            quinn::ReadToEndError::Read(_) => ReadFail::Gone,
        })?;
    if body.len() != h.body_len as usize {
        return Err(ReadFail::Bad(RequestError::new(
            ErrorCode::InvalidRequest,
            format!(
                "stream ended after {} of {} body bytes",
                body.len(),
                h.body_len
            ),
        )));
    }
    Ok((h.api, h.version, Bytes::from(body)))
}

async fn send_error(send: &mut SendStream, api: u16, err: &RequestError) {
    let frame = encode_error(api, err.code, &err.message).encode();
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
}

async fn serve_stream(
    ctx: Arc<ServerContext>,
    conn: &quinn::Connection,
    peer: Peer,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let start = Instant::now();
    let limits = Limits {
        max_frame_bytes: ctx.config.limits.max_frame_bytes,
        ..Limits::default()
    };
    let read_timeout = Duration::from_millis(ctx.config.limits.request_read_timeout_ms);
    let (api_raw, version, body) =
        match tokio::time::timeout(read_timeout, read_request(&mut recv, &limits)).await {
            Ok(Ok(r)) => r,
            Ok(Err(ReadFail::Gone)) => {
                tracing::debug!("client closed the stream mid-request");
                return;
            }
            Ok(Err(ReadFail::Bad(e))) => {
                tracing::debug!(error = %e.message, "bad frame");
                let _ = recv.stop(VarInt::from_u32(STOP_BAD_FRAME));
                send_error(&mut send, 0, &e).await;
                ctx.metrics.observe_request(None, start.elapsed(), false);
                return;
            }
            Err(_) => {
                let _ = recv.stop(VarInt::from_u32(STOP_BAD_FRAME));
                let e = RequestError::new(
                    ErrorCode::RequestTimedOut,
                    format!(
                        "the request did not arrive within {} ms",
                        read_timeout.as_millis()
                    ),
                );
                send_error(&mut send, 0, &e).await;
                return;
            }
        };
    let api = ApiKey::from_u16(api_raw).ok();
    let answered = tokio::select! {
        a = answer(&ctx, peer, api_raw, version, body, Some(&mut send)) => a,
        _ = conn.closed(), if only_reads(api) => {
            tracing::debug!("client went away while its request waited; dropped");
            return;
        }
    };
    let write_timeout = Duration::from_millis(ctx.config.limits.response_write_timeout_ms);
    let streamed = matches!(answered, Ok(Outcome::Streamed));
    let ok = match answered {
        Ok(Outcome::Reply(reply)) => {
            let prefix = response_prefix(api_raw, &reply.control, reply.payload.len());
            let mut chunks = [prefix, reply.payload];
            let written = write_within(&mut send, &mut chunks, write_timeout).await;
            drop(reply.hold);
            let _ = send.finish();
            written
        }
        Ok(Outcome::Streamed) => true,
        Err(e) => {
            send_error(&mut send, api_raw, &e).await;
            false
        }
    };
    ctx.metrics.observe_request(api, start.elapsed(), ok);
    if !streamed {
        until_delivered(&mut send, write_timeout).await;
    }
}

/// Waits (at most `bound`) until the client acknowledged every byte of the answer. The
/// request counts as in flight until then: a shutdown closes each connection once no
/// request is in flight, and closing a QUIC connection discards stream data not yet sent,
/// so without this wait an answer written just before (a produce refused because a disk
/// flush failed, say) could be lost.
async fn until_delivered(send: &mut SendStream, bound: Duration) {
    let _ = tokio::time::timeout(bound, send.stopped()).await;
}

/// Checks the frame's api and version, then runs its handler (`send` is the stream of a
/// push request; `None` in process, where push requests are refused).
pub(super) async fn answer(
    ctx: &Arc<ServerContext>,
    peer: Peer,
    api_raw: u16,
    version: u16,
    body: Bytes,
    send: Option<&mut SendStream>,
) -> Result<Outcome, RequestError> {
    let api = match ApiKey::from_u16(api_raw) {
        Ok(a) => a,
        Err(e) => return Err(e.into()),
    };
    if version != PROTOCOL_VERSION {
        return Err(RequestError::new(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {version} is not supported; this broker speaks {PROTOCOL_VERSION}"),
        ));
    }
    if ctx.is_stopping() {
        return Err(RequestError::new(
            ErrorCode::BrokerShuttingDown,
            "the broker is shutting down; retry on another broker or after restart",
        ));
    }
    let span = tracing::debug_span!("request", api = api.name());
    let outcome = dispatch(ctx, peer, api, body, send).instrument(span).await;
    if let Err(e) = &outcome {
        if e.code == ErrorCode::Internal || e.code == ErrorCode::StorageError {
            tracing::warn!(api = api.name(), code = ?e.code, error = %e.message, "request failed");
        } else {
            tracing::debug!(api = api.name(), code = ?e.code, error = %e.message, "request refused");
        }
    }
    outcome
}
