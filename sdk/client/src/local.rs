//! [`LocalBroker`]: a broker in this process that a [`Client`](crate::Client) reaches
//! without the network. A broker's own deployed pipelines use it for the requests that go to
//! that broker: the frames are the same as on the wire, handled by the same code, but no
//! QUIC packet, TLS record or UDP datagram is made for them. Requests to other brokers, push
//! subscriptions and `acks=0` produces (which need no answer) still go over QUIC.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

/// What answers requests in process: the broker's request dispatcher.
pub trait LocalTransport: Send + Sync {
    /// The id of the broker that answers (its address in the metadata is local too).
    fn broker_id(&self) -> u32;

    /// Answers one request: `api` and the request body as on the wire (control, then
    /// payload). Returns the response body as on the wire, in two parts so the payload is
    /// never copied.
    fn call(&self, api: u16, body: Bytes) -> BoxFuture<'static, LocalAnswer>;
}

/// A response body as on the wire, in two parts: `head` (error code, control) and the
/// `payload` (record batches) that follows it.
#[derive(Debug, Clone, Default)]
pub struct LocalAnswer {
    /// The error code and the control part (or the error body).
    pub head: Bytes,
    /// The payload after the control (empty for an error).
    pub payload: Bytes,
}

impl LocalAnswer {
    /// The answer's length on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    /// True when both parts are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Bytes> for LocalAnswer {
    /// A whole response body (its payload, if any, stays inside `head`).
    fn from(head: Bytes) -> Self {
        LocalAnswer {
            head,
            payload: Bytes::new(),
        }
    }
}

/// A handle on a [`LocalTransport`], set in
/// [`ClientConfig::local`](crate::ClientConfig::local).
#[derive(Clone)]
pub struct LocalBroker(pub Arc<dyn LocalTransport>);

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LocalBroker")
            .field(&self.0.broker_id())
            .finish()
    }
}
