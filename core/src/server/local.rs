//! The broker's in-process door ([`InProcess`]): the requests of its own deployed pipelines
//! to this broker are handed straight to the dispatcher, as the same frames, without QUIC,
//! TLS or UDP. As on a connection, each request runs in a task of its own (a caller that
//! gives up never cuts a handler short), is counted in flight for a graceful shutdown, and
//! is refused when larger than `max_frame_bytes`.

use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use quiver_client::LocalAnswer;
use quiver_protocol::{encode_error, ApiKey, ErrorCode, PROTOCOL_VERSION};

use super::connection::answer;
use super::dispatch::{Outcome, Peer};
use super::requests::RequestError;
use super::ServerContext;

/// Answers requests from this process (see the module doc).
pub struct InProcess {
    /// Weak: the broker's context holds its pipeline host, whose clients hold this.
    ctx: Weak<ServerContext>,
    broker_id: u32,
}

impl InProcess {
    /// The door of the broker whose handlers `ctx` reaches.
    pub fn new(ctx: &Arc<ServerContext>) -> Self {
        InProcess {
            ctx: Arc::downgrade(ctx),
            broker_id: ctx.config.broker_id,
        }
    }
}

impl quiver_client::LocalTransport for InProcess {
    fn broker_id(&self) -> u32 {
        self.broker_id
    }

    fn call(&self, api: u16, body: Bytes) -> BoxFuture<'static, LocalAnswer> {
        let Some(ctx) = self.ctx.upgrade() else {
            let gone = encode_error(
                api,
                ErrorCode::BrokerShuttingDown,
                "the broker has stopped; retry after restart",
            );
            return Box::pin(async move { gone.body.into() });
        };
        let task = tokio::spawn(async move {
            let start = std::time::Instant::now();
            let _inflight = ctx.begin_request();
            let limit = ctx.config.limits.max_frame_bytes as usize;
            let outcome = if body.len() > limit {
                Err(RequestError::new(
                    ErrorCode::MessageTooLarge,
                    format!(
                        "a request of {} bytes exceeds the limit of {limit} bytes",
                        body.len()
                    ),
                ))
            } else {
                // A pipeline's client is the broker acting for a user, not a peer broker.
                let peer = Peer { broker: false };
                answer(&ctx, peer, api, PROTOCOL_VERSION, body, None).await
            };
            let (answer, ok) = match outcome {
                // The payload (record batches) is handed over as it is, never copied.
                Ok(Outcome::Reply(reply)) => {
                    let mut head = BytesMut::with_capacity(6 + reply.control.len());
                    head.put_u16(ErrorCode::None as u16);
                    head.put_u32(reply.control.len() as u32);
                    head.put_slice(&reply.control);
                    let answer = LocalAnswer {
                        head: head.freeze(),
                        payload: reply.payload,
                    };
                    (answer, true)
                }
                Err(e) => (encode_error(api, e.code, &e.message).body.into(), false),
                Ok(Outcome::Streamed) => (LocalAnswer::default(), true),
            };
            ctx.metrics
                .observe_request(ApiKey::from_u16(api).ok(), start.elapsed(), ok);
            answer
        });
        Box::pin(async move {
            task.await.unwrap_or_else(|e| {
                encode_error(
                    api,
                    ErrorCode::Internal,
                    &format!("request task failed: {e}"),
                )
                .body
                .into()
            })
        })
    }
}
