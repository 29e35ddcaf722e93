//! Error types of the plugin host: [`BundleError`] for loading and validating a bundle,
//! [`PluginError`] for building and calling a plugin. Every variant that happens while
//! running names the plugin as `name@version` so a log line or a client error is actionable.

use std::path::PathBuf;

/// A bundle could not be read, unpacked or validated.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading a file or folder failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `plugin.toml` is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("{file}: {message}")]
    Manifest {
        /// The manifest file.
        file: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// A key of `plugin.toml` has a value the host does not accept.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        /// The manifest file.
        file: PathBuf,
        /// The offending key, as a dotted path (`limits.cpu_ms`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The archive or folder is malformed or too large (path traversal, size caps, links).
    #[error("{path}: {message}")]
    Archive {
        /// The bundle path (or `<bytes>` for an in-memory archive).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Most bytes of a message a plugin chose (its error, its panic message) kept in a
/// [`PluginError`]: the message travels in logs, client errors and dead-letter headers,
/// once per failed record, so its size must not be the plugin's to choose.
pub const MAX_PLUGIN_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`MAX_PLUGIN_MESSAGE_BYTES`] (at a character boundary), saying how long
/// it was when cut.
pub(crate) fn bounded_message(mut message: String) -> String {
    if message.len() <= MAX_PLUGIN_MESSAGE_BYTES {
        return message;
    }
    let total = message.len();
    let mut end = MAX_PLUGIN_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(&format!("… (cut: {total} bytes)"));
    message
}

/// Building or calling a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The call ran longer than its CPU budget and was stopped.
    #[error("plugin {plugin}: stopped after exceeding its CPU limit of {limit_ms} ms")]
    CpuLimit {
        /// `name@version`.
        plugin: String,
        /// The limit that was enforced.
        limit_ms: u64,
    },
    /// The plugin tried to use more memory than allowed.
    #[error("plugin {plugin}: exceeded its memory limit of {limit_mb} MiB")]
    MemoryLimit {
        /// `name@version`.
        plugin: String,
        /// The limit that was enforced.
        limit_mb: u64,
    },
    /// The plugin returned more output than allowed.
    #[error("plugin {plugin}: output of {bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    OutputLimit {
        /// `name@version`.
        plugin: String,
        /// Output size (or the size reached when the host stopped counting).
        bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// The WASM guest trapped (panic, unreachable, stack overflow, out-of-bounds access, ...).
    #[error("plugin {plugin}: trapped: {message}")]
    Trap {
        /// `name@version`.
        plugin: String,
        /// The trap and, if the guest reported one, its panic message.
        message: String,
    },
    /// The Lua script raised an error (or failed to compile).
    #[error("plugin {plugin}: Lua error: {message}")]
    LuaError {
        /// `name@version`.
        plugin: String,
        /// Lua's message with its position (`main.lua:2: …`), without the traceback.
        message: String,
    },
    /// The plugin returned a value that does not follow the contract.
    #[error("plugin {plugin}: bad return value: {message}")]
    BadReturn {
        /// `name@version`.
        plugin: String,
        /// What was wrong with it.
        message: String,
    },
    /// The plugin reported an error itself (`Err` from a WASM export).
    #[error("plugin {plugin}: failed: {message}")]
    Failed {
        /// `name@version`.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin asks for something the sandbox does not allow (e.g. a WASI filesystem import).
    #[error("plugin {plugin}: forbidden: {message}")]
    Forbidden {
        /// `name@version`.
        plugin: String,
        /// What it asked for.
        message: String,
    },
    /// The plugin cannot be built: wrong kind, missing export or function, invalid module.
    #[error("plugin {plugin}: cannot load: {message}")]
    Load {
        /// `name@version`.
        plugin: String,
        /// Why.
        message: String,
    },
    /// A keyed-state call failed: no store (the processor runs without a pipeline), the
    /// scope's size limit, or the store itself. The call's state writes were not applied.
    #[error("plugin {plugin}: {message}")]
    State {
        /// `name@version`.
        plugin: String,
        /// The [`crate::StateError`] message.
        message: String,
    },
    /// The caller's configuration is invalid (bad `key=value` override, zero limit).
    #[error("invalid plugin configuration: {0}")]
    Config(String),
    /// The plugin failed too many calls in a row and is no longer called.
    #[error("plugin {plugin}: quarantined after {failures} consecutive failures")]
    Quarantined {
        /// `name@version`.
        plugin: String,
        /// Consecutive failures that led to the quarantine.
        failures: u32,
    },
    /// Bundle problem surfaced while building.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

impl PluginError {
    /// Whether this error is the quarantine short-circuit (the plugin was not run).
    pub fn is_quarantined(&self) -> bool {
        matches!(self, PluginError::Quarantined { .. })
    }
}
