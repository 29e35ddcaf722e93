//! quiver-client: the async QUIC client SDK of Quiver.
//!
//! - [`Client`]: connections (one per broker, re-made with backoff), metadata cache, and the
//!   generic request/response exchange every other part uses;
//! - [`Admin`]: topic management;
//! - [`Producer`]: per-partition batching, idempotent retries, Kafka-compatible partitioning;
//! - [`Consumer`]: pipelined per-partition fetching (long-poll or push) as batches or a stream;
//! - [`GroupConsumer`]: a consumer-group member: server-assigned partitions, commits, rebalance callbacks.
//!
//! Cargo feature `plugins` (off by default): runs a topic's partitioner plugin (WASM or Lua,
//! through `quiver-plugins`, hence wasmtime and mlua) in the producer, on a thread of its
//! own, and loads and verifies bundles in [`PluginAdmin`]. Without it the SDK depends on no
//! plugin runtime; sending a record without an explicit partition to a topic that has a
//! partitioner plugin fails with [`ClientError::PartitionerUnavailable`].
//!
//! ```no_run
//! # async fn demo() -> quiver_client::Result<()> {
//! use quiver_client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7400")).await?;
//! let producer = Producer::new(client, ProducerConfig::default());
//! let md = producer.send(ProducerRecord::new("orders", "hello")).await?.await?;
//! println!("offset {}", md.offset);
//! # Ok(()) }
//! ```

mod admin;
mod backoff;
mod client;
mod config;
mod consumer;
mod error;
mod group;
mod group_admin;
mod local;
mod plugins;
mod producer;
mod tls;
mod transaction;
pub mod udp;

pub use admin::Admin;
pub use backoff::Backoff;
pub use client::{Client, Subscription};
pub use config::{ClientConfig, ClientIdentity};
pub use consumer::{ConsumeMode, ConsumedRecord, Consumer, ConsumerConfig, OffsetReset, SeekTo};
pub use error::{ClientError, Result};
pub use group::{GroupConfig, GroupConsumer, GroupLeaver, RebalanceListener};
pub use local::{LocalAnswer, LocalBroker, LocalTransport};
pub use plugins::PluginAdmin;
#[cfg(feature = "plugins")]
pub use plugins::TopicPartitioner;
pub use producer::{
    murmur2, partition_for_key, DefaultPartitioner, DeliveryFuture, Partitioner, Producer,
    ProducerConfig, ProducerRecord, ProducerStats, RecordMetadata, RecordRef, RefsQueued,
    ValuesQueued,
};
pub use quiver_protocol::batch::{Compression, Header};
pub use quiver_protocol::requests::OffsetCommit;
pub use quiver_protocol::requests::{Acks, Isolation};
pub use quiver_protocol::requests::{
    AutoOffsetReset, GroupDescription, GroupListing, ResetTo, Strategy,
    Subscription as GroupSubscription, TopicPartition,
};
pub use quiver_protocol::requests::{PluginInfo, ProcessorSpec};
pub use transaction::{Landed, TransactionalProducer, TxnOffsets, DEFAULT_TXN_TIMEOUT};
