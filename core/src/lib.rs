//! quiver-core: the Quiver broker.
//!
//! - [`clock`]: the wall clock in record time (ms since the epoch);
//! - [`keyed_locks`]: per-key async locks that forget idle keys;
//! - [`config`]: the broker's TOML config, defaults, environment overrides, validation;
//! - [`log`]: the sled-backed partition log (append, read, offsets, time index, retention);
//! - [`topic`]: topic config and the topic registry;
//! - [`group`]: consumer groups: coordinator state machine, assignment, committed offsets;
//! - [`plugin`]: deployed plugin bundles (sled), consume-time processor instances;
//! - [`pipelines`]: the slot for the host that runs deployed pipelines;
//! - [`server`]: the QUIC endpoint, per-stream framing and request dispatch;
//! - [`tls`]: certificates (configured, or a self-made CA under `<data_dir>/tls/`);
//! - [`metrics`]: counters and histograms, served as Prometheus text over HTTP;
//! - [`cluster`]: the controller's replicated metadata (openraft types, state machine, store);
//! - [`txn`]: the transaction coordinator (transactional ids, markers, pending offsets);
//! - [`broker`]: wires the parts together: [`Broker::start`] and [`BrokerHandle`].

// Tests may flush with sled's own flush; the broker's code flushes through
// `log::store::Database` (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod broker;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod group;
pub mod keyed_locks;
pub mod log;
pub mod metrics;
pub mod pipelines;
pub mod plugin;
pub mod replica;
pub mod server;
pub mod tls;
pub mod topic;
pub mod txn;

pub use broker::{Broker, BrokerError, BrokerHandle};
pub use config::{BrokerConfig, ConfigError};
