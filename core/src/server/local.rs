//! The broker's in-process door ([`InProcess`]): the requests of its own deployed pipelines
//! to this broker are handed straight to the dispatcher, as the same frames, without QUIC,
//! TLS or UDP. They count as in flight for a graceful shutdown like a connection's.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use quiver_protocol::{encode_error, PROTOCOL_VERSION};

use super::connection::{answer, Answer};
use super::dispatch::Peer;
use super::ServerContext;

/// Answers requests from this process (see the module doc).
pub struct InProcess {
    ctx: Arc<ServerContext>,
}

impl InProcess {
    /// The door of the broker whose handlers `ctx` reaches.
    pub fn new(ctx: Arc<ServerContext>) -> Self {
        InProcess { ctx }
    }
}

impl quiver_client::LocalTransport for InProcess {
    fn broker_id(&self) -> u32 {
        self.ctx.config.broker_id
    }

    fn call(&self, api: u16, body: Bytes) -> BoxFuture<'static, Bytes> {
        let ctx = self.ctx.clone();
        Box::pin(async move {
            let start = std::time::Instant::now();
            let guard = ctx.begin_request();
            // A pipeline's client is the broker acting for a user, not a peer broker.
            let peer = Peer { broker: false };
            let (bytes, ok) = match answer(&ctx, peer, api, PROTOCOL_VERSION, body, None).await {
                Answer::Reply(reply) => {
                    let mut b =
                        BytesMut::with_capacity(6 + reply.control.len() + reply.payload.len());
                    b.put_u16(quiver_protocol::ErrorCode::None as u16);
                    b.put_u32(reply.control.len() as u32);
                    b.put_slice(&reply.control);
                    b.put_slice(&reply.payload);
                    (b.freeze(), true)
                }
                Answer::Refused(e) => (encode_error(api, e.code, &e.message).body, false),
                Answer::Streamed => (Bytes::new(), true),
            };
            drop(guard);
            let api = quiver_protocol::ApiKey::from_u16(api).ok();
            ctx.metrics.observe_request(api, start.elapsed(), ok);
            bytes
        })
    }
}
