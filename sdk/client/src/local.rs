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
    /// payload). Returns the response body as on the wire (error code, control, payload).
    fn call(&self, api: u16, body: Bytes) -> BoxFuture<'static, Bytes>;
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
