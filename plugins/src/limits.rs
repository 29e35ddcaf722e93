//! Per-call limits: the host's ceilings ([`HostLimits`]), what a plugin gets after its
//! manifest's requests are capped by them ([`Effective`]), and the failure streak that
//! quarantines a plugin ([`Health`]). Shared by the WASM and Lua runtimes.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::PluginError;

/// The largest WASM stack (`max_wasm_stack`) a host may allow. WASM runs on the calling
/// thread's own stack (plugin threads and the runtime's blocking threads: 2 MiB each), and
/// wasmtime's stack check only works while its limit lies within that stack: past it a deep
/// recursion would hit the thread's guard page and crash the process instead of trapping.
pub const MAX_WASM_STACK_BYTES: usize = 1024 * 1024;

/// The host's ceilings for every plugin call. A manifest's `[limits]` may ask for less,
/// never more. Zero is rejected by [`HostLimits::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimits {
    /// CPU time per call, milliseconds: the time the call's thread ran, not the time it
    /// waited for a core (see [`HostLimits::call_wall_limit`] for the wall clock).
    pub cpu_ms: u64,
    /// Memory per instance (WASM linear memories, Lua heap), MiB.
    pub memory_mb: u64,
    /// Most bytes of output (encoded records) per call.
    pub max_output_bytes: usize,
    /// WASM stack, bytes (wasmtime `max_wasm_stack`).
    pub wasm_stack_bytes: usize,
    /// Consecutive failed calls after which the plugin is quarantined.
    pub max_consecutive_failures: u32,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            cpu_ms: 100,
            memory_mb: 64,
            max_output_bytes: 16 * 1024 * 1024,
            wasm_stack_bytes: 512 * 1024,
            max_consecutive_failures: 5,
        }
    }
}

impl HostLimits {
    /// The wall time after which a call is stopped whatever CPU time it used (a call waiting
    /// off the CPU that long is not merely on a busy machine).
    pub fn call_wall_limit(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.cpu_ms.saturating_mul(crate::call_clock::WALL_BACKSTOP),
        )
    }

    /// Reject zero limits (they would fail every call) and a stack too large to keep host
    /// calls safe.
    pub fn validate(&self) -> Result<(), PluginError> {
        let zero = [
            ("cpu_ms", self.cpu_ms == 0),
            ("memory_mb", self.memory_mb == 0),
            ("max_output_bytes", self.max_output_bytes == 0),
            ("wasm_stack_bytes", self.wasm_stack_bytes == 0),
            (
                "max_consecutive_failures",
                self.max_consecutive_failures == 0,
            ),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, z)| *z) {
            return Err(PluginError::Config(format!(
                "host limit {key} must be greater than 0"
            )));
        }
        if self.wasm_stack_bytes > MAX_WASM_STACK_BYTES {
            return Err(PluginError::Config(format!(
                "host limit wasm_stack_bytes must be at most {MAX_WASM_STACK_BYTES} (1 MiB): WASM runs on the host's threads, whose stacks are 2 MiB"
            )));
        }
        Ok(())
    }
}

/// What one plugin instance runs with: its identity, merged config and capped limits.
#[derive(Debug, Clone)]
pub(crate) struct Effective {
    pub plugin: Arc<str>,
    pub config: Arc<BTreeMap<String, String>>,
    pub cpu_ms: u64,
    pub memory_mb: u64,
    pub max_output_bytes: usize,
    pub wasm_stack_bytes: usize,
    pub max_failures: u32,
}

impl Effective {
    pub fn memory_bytes(&self) -> usize {
        (self.memory_mb as usize).saturating_mul(1024 * 1024)
    }

    pub fn cpu_limit(&self) -> PluginError {
        PluginError::CpuLimit {
            plugin: self.plugin.to_string(),
            limit_ms: self.cpu_ms,
        }
    }

    pub fn memory_limit(&self) -> PluginError {
        PluginError::MemoryLimit {
            plugin: self.plugin.to_string(),
            limit_mb: self.memory_mb,
        }
    }

    pub fn output_limit(&self, bytes: usize) -> PluginError {
        PluginError::OutputLimit {
            plugin: self.plugin.to_string(),
            bytes,
            limit_bytes: self.max_output_bytes,
        }
    }

    pub fn state_error(&self, e: &crate::StateError) -> PluginError {
        PluginError::State {
            plugin: self.plugin.to_string(),
            message: e.to_string(),
        }
    }

    pub fn bad_return(&self, message: impl Into<String>) -> PluginError {
        PluginError::BadReturn {
            plugin: self.plugin.to_string(),
            message: message.into(),
        }
    }
}

/// The consecutive-failure streak of one plugin instance.
#[derive(Debug)]
pub(crate) struct Health {
    plugin: Arc<str>,
    failures: u32,
    max: u32,
}

impl Health {
    pub fn new(plugin: Arc<str>, max: u32) -> Self {
        Health {
            plugin,
            failures: 0,
            max,
        }
    }

    /// `Err(Quarantined)` once the streak reached the maximum: the plugin is not run.
    pub fn gate(&self) -> Result<(), PluginError> {
        if self.failures >= self.max {
            return Err(PluginError::Quarantined {
                plugin: self.plugin.to_string(),
                failures: self.failures,
            });
        }
        Ok(())
    }

    /// Count the outcome of one call. Returns whether the instance must be reset.
    pub fn observe<T>(&mut self, r: &Result<T, PluginError>) -> bool {
        match r {
            Ok(_) => {
                self.failures = 0;
                false
            }
            Err(e) => {
                self.failures += 1;
                tracing::warn!(plugin = %self.plugin, failures = self.failures, error = %e, "plugin call failed");
                if self.failures == self.max {
                    tracing::error!(plugin = %self.plugin, failures = self.failures, "plugin quarantined");
                }
                true
            }
        }
    }
}
