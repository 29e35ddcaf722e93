//! Guest SDK for Quiver plugins written in Rust and compiled to a WASM component
//! (`cargo build --release --target wasm32-wasip2`).
//!
//! It owns the guest side of the plugin contract: the [`Record`] type, the batch
//! encoding shared with the host (see [`codec`] and `ENCODING.md`), the host
//! functions [`log`], [`config`] and [`state`], and the `#[processor]` / `#[partitioner]`
//! attributes that export a plain function through the `quiver:plugin` WIT world
//! (`wit/quiver-plugin.wit`). A plugin crate is a `cdylib` with one annotated function:
//!
//! ```ignore
//! use quiver_plugin_sdk::{processor, Output, Record};
//!
//! #[processor]
//! fn process(record: Record) -> Output {
//!     if record.value.starts_with(b"keep") { record.into() } else { Output::Drop }
//! }
//! ```
//!
//! State kept in `static`s survives from one call to the next within an instance;
//! the host starts a fresh instance (fresh memory) after any failed call. State that must
//! survive restarts and move with its partition goes through [`state`] instead: the host
//! keeps it per (pipeline, stage, input partition).

pub mod codec;

pub use quiver_plugin_sdk_macros::{partitioner, processor};

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        world: "sdk",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export",
    });
}

/// One record as a plugin sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The record key, if it has one.
    pub key: Option<Vec<u8>>,
    /// The record value.
    pub value: Vec<u8>,
    /// Headers, in order; names are UTF-8.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Producer timestamp, milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Offset of the input record in its partition.
    pub offset: i64,
    /// Partition of the input record.
    pub partition: i32,
}

impl Record {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// What a processor returns for one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Emit nothing (filter it out).
    Drop,
    /// Emit one record (the input, changed or not).
    One(Record),
    /// Emit several records (fan out), in order.
    Many(Vec<Record>),
}

impl From<Record> for Output {
    fn from(r: Record) -> Self {
        Output::One(r)
    }
}

impl From<Option<Record>> for Output {
    fn from(r: Option<Record>) -> Self {
        r.map_or(Output::Drop, Output::One)
    }
}

impl From<Vec<Record>> for Output {
    fn from(r: Vec<Record>) -> Self {
        Output::Many(r)
    }
}

/// Write `msg` to the host's log, tagged with this plugin's name.
pub fn log(msg: &str) {
    __bindings::quiver::plugin::host::log(msg);
}

/// This plugin's configuration value for `key`: the per-use override, else the
/// default from `plugin.toml`, else `None`. Config does not change during an instance's
/// lifetime and each call crosses into the host, so read it once (e.g. into a `OnceLock`).
pub fn config(key: &str) -> Option<String> {
    __bindings::quiver::plugin::host::config(key)
}

/// Keyed state kept by the host (WIT `quiver:plugin/host@0.2.0`: `state-get`, `state-put`,
/// `state-delete`), for processors that run in a pipeline. The host scopes it to
/// (pipeline, stage, input partition), so a key needs no partition prefix; it persists the
/// changes and restores them wherever the partition is processed next. Within one call,
/// [`state::get`] sees the call's own [`state::put`]s; if the call fails (trap, panic, `Err`,
/// a limit), none of its writes are kept.
///
/// Every function traps, failing the call with the host's state error, when state is not
/// available (a partitioner, or a processor run without a pipeline, e.g. at consume time) or,
/// for [`state::put`], when the scope's keys and values would exceed the host's state limit.
///
/// ```ignore
/// use quiver_plugin_sdk::{processor, state, Record};
///
/// #[processor]
/// fn count(mut record: Record) -> Record {
///     let n = state::get_u64(&record.value).unwrap_or(0) + 1;
///     state::put_u64(&record.value, n);
///     record.value = n.to_string().into_bytes();
///     record
/// }
/// ```
pub mod state {
    use crate::__bindings::quiver::plugin::host;

    /// The value stored under `key`, if any.
    pub fn get(key: &[u8]) -> Option<Vec<u8>> {
        host::state_get(key)
    }

    /// Store `value` under `key`.
    pub fn put(key: &[u8], value: &[u8]) {
        host::state_put(key, value)
    }

    /// Remove `key` (nothing happens if it is not set).
    pub fn delete(key: &[u8]) {
        host::state_delete(key)
    }

    /// The value under `key` read as a decimal `u64` (as [`put_u64`] writes it); `None` if
    /// the key is not set or does not hold one.
    pub fn get_u64(key: &[u8]) -> Option<u64> {
        get(key).and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
    }

    /// Store `n` under `key` as decimal text (readable in the changelog, and by Lua plugins
    /// with `tonumber(state.get(k))`).
    pub fn put_u64(key: &[u8], n: u64) {
        put(key, n.to_string().as_bytes())
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            log(&format!("panic: {info}"));
        }));
    });
}

/// Glue used by `#[processor]`: decode, call `f` per record, encode.
#[doc(hidden)]
pub fn __run_processor(
    batch: &[u8],
    mut f: impl FnMut(Record) -> Output,
) -> Result<Vec<u8>, String> {
    install_panic_hook();
    let mut reader = codec::BatchReader::new(batch).map_err(|e| e.to_string())?;
    let mut out = codec::BatchWriter::with_capacity(batch.len());
    while let Some(record) = reader.next_record().map_err(|e| e.to_string())? {
        match f(record) {
            Output::Drop => {}
            Output::One(r) => out.push(&r),
            Output::Many(rs) => rs.iter().for_each(|r| out.push(r)),
        }
    }
    Ok(out.finish())
}

/// Glue used by `#[partitioner]`.
#[doc(hidden)]
pub fn __run_partitioner(f: impl FnOnce() -> u32) -> Result<u32, String> {
    install_panic_hook();
    Ok(f())
}
