//! Quiver's plugin host: loads plugin bundles and runs them sandboxed.
//!
//! A bundle ([`Bundle`]) is a folder or `.tar.gz` with a `plugin.toml` and a Lua script or a
//! WASM component. [`PluginConfig`] combines a bundle, per-use config overrides and the host's
//! [`HostLimits`] and builds a [`Processor`] (batches of records in, records out) or a
//! [`Partitioner`] (record in, partition out). Lua and WASM are two implementations of each
//! trait. Every call is bounded in CPU time, memory and output size; a call that breaks a limit,
//! traps or errors fails with a typed [`PluginError`] naming the plugin, the next call runs on a
//! fresh instance, and a plugin that fails [`HostLimits::max_consecutive_failures`] calls in a
//! row is quarantined. The [`local`] module runs a bundle on a file or a generated load, for the
//! `quiver plugin test` and `quiver plugin bench` commands. A processor may be given a keyed
//! [`StateStore`] ([`PluginConfig::state`]); plugins reach it through `state-get`/`state-put`/
//! `state-delete` (WASM) or `state.get`/`put`/`delete` (Lua); see [`state`].
//!
//! ```no_run
//! use quiver_plugins::{Bundle, PluginConfig, Record};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bundle = Bundle::load("examples/plugins/grep")?;
//! let mut grep = PluginConfig::new(bundle).set("pattern", "ERROR").build_processor()?;
//! let out = grep.process_batch(vec![Record::from_value("ERROR disk full"), Record::from_value("ok")])?;
//! assert_eq!(out.len(), 1);
//! # Ok(()) }
//! ```

pub mod bundle;
mod call_clock;
pub mod codec;
mod config;
mod error;
mod limits;
pub mod local;
mod lua;
mod record;
pub mod state;
mod wasm;

pub use bundle::{Bundle, Kind, Manifest, ManifestLimits, Runtime};
pub use config::{check_config_keys, parse_override, PluginConfig};
pub use error::{BundleError, PluginError};
pub use limits::{HostLimits, MAX_WASM_STACK_BYTES};
pub use record::Record;
pub use state::{MemoryStateStore, StateChange, StateError, StateScope, StateStore};

/// A record processor instance. Not shared between partitions: build one per partition, so
/// that a stateful plugin keeps its state per partition.
pub trait Processor: Send {
    /// Run the plugin on one batch and return its output records, in order.
    fn process_batch(&mut self, records: Vec<Record>) -> Result<Vec<Record>, PluginError>;
}

/// A partitioner instance.
pub trait Partitioner: Send {
    /// The partition, in `0..partition_count`, for a record with this key and value.
    fn partition(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        partition_count: u32,
    ) -> Result<u32, PluginError>;
}

/// Refuses a partition count of 0 before any plugin code runs (both runtimes share it).
pub(crate) fn require_partitions(partition_count: u32) -> Result<(), PluginError> {
    if partition_count == 0 {
        return Err(PluginError::Config(
            "partition_count must be greater than 0".into(),
        ));
    }
    Ok(())
}
