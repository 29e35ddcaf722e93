//! Guest SDK for Quiver plugins written in Rust and compiled to a WASM component
//! (`cargo build --release --target wasm32-wasip2`).
//!
//! It owns the guest side of the plugin contract: the [`Record`] type, the batch
//! encoding shared with the host (see [`codec`] and `ENCODING.md`), the host
//! functions [`log`] and [`config`], and the `#[processor]` / `#[partitioner]`
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
//! the host starts a fresh instance (fresh memory) after any failed call.

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
