//! The Lua runtime: Lua 5.4 (vendored through mlua) in a locked-down state per instance.
//!
//! It owns the sandbox (only the string, table, math and utf8 libraries; no io, os, package,
//! require, debug, dofile, loadfile, collectgarbage or string.dump; `load` of text chunks only;
//! a read-only `config` table and `log(msg)`), the per-call limits (an instruction-count hook
//! checking the call's CPU time (`call_clock.rs`), re-raised through pcall/xpcall so a script cannot swallow
//! it; `string.find`/`match`/`gmatch`/`gsub` replaced by a metered implementation of Lua's
//! pattern matching (`pattern.rs`, `strlib.rs`) and `table.insert`/`remove`/`move`/`sort`/
//! `concat` kept from looping unbounded inside C (`tablib.lua`), because no hook fires inside
//! a C function; a watchdog thread plus a post-call check for the C functions left,
//! whose work is linear in memory the limit caps; `set_memory_limit`; an output-size check) and
//! the record marshalling. Function handles and the state live across calls; a failed call
//! throws the state away and the next call builds a fresh one from the same source.
//!
//! Marshalling is the hot path: a whole batch is turned into Lua tables and read back in one
//! protected raw call, and an output record whose `value`/`key` is byte-equal to its input's
//! reuses the input's `Bytes` instead of copying.

mod pattern;
mod raw;
mod strlib;
#[cfg(test)]
mod strlib_tests;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use mlua::{ChunkMode, Function, HookTriggers, Lua, LuaOptions, StdLib, Value, VmState};

use crate::bundle::Bundle;
use crate::call_clock::CallClock;
use crate::limits::{Effective, Health};
use crate::state::{CallState, StateError};
use crate::{Partitioner, PluginError, Processor, Record, StateStore};

const PRELUDE: &str = include_str!("prelude.lua");
/// Bounded table.insert/remove/move/sort/concat (see the file's header).
const TABLIB: &str = include_str!("tablib.lua");
/// Prefix of errors the drivers raise for contract violations (mapped to `BadReturn`).
const BAD_RETURN: &str = "\u{1}quiver-bad-return: ";
const CPU_MESSAGE: &str = "CPU time limit exceeded";
const HOOK_EVERY: u32 = 1000;
/// Pattern-matching steps allowed per millisecond of a call's CPU limit: about what the
/// matcher runs in a millisecond (release build, 2-vCPU VM), so the budget is a deterministic
/// backstop near the limit; the deadline, checked every 1024 steps, is what normally stops a
/// call first on a loaded machine.
const STEPS_PER_MS: u64 = 200_000;
const MAX_LOG_LINES_PER_CALL: u32 = 64;
const MAX_LOG_LINE: usize = 4096;
const WATCHDOG_PERIOD: Duration = Duration::from_millis(10);
const STUCK_WARNING: Duration = Duration::from_millis(500);

/// The call's CPU clock and trip flag, shared with the hook, `check`, `log` and the watchdog.
struct Guard {
    plugin: Arc<str>,
    clock: CallClock,
    tripped: AtomicBool,
    running: AtomicBool,
    warned: AtomicBool,
    logs: AtomicU32,
    /// Pattern-matching steps left in the current call (see `strlib.rs`).
    steps: AtomicU64,
}

impl Guard {
    /// Starts a call on the calling thread (the one that runs it).
    fn arm(&self, cpu_ms: u64) {
        self.clock.start(cpu_ms);
        self.tripped.store(false, Ordering::Relaxed);
        self.warned.store(false, Ordering::Relaxed);
        self.logs.store(0, Ordering::Relaxed);
        self.steps
            .store(cpu_ms.saturating_mul(STEPS_PER_MS), Ordering::Relaxed);
        self.running.store(true, Ordering::Release);
    }

    fn disarm(&self) {
        self.running.store(false, Ordering::Release);
    }

    fn expired(&self) -> bool {
        self.clock.past_limit()
    }
}

impl strlib::Limits for Guard {
    fn steps_left(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    fn spend(&self, steps: u64) {
        let _ = self
            .steps
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_sub(steps))
            });
    }

    fn expired(&self) -> bool {
        self.tripped.load(Ordering::Relaxed) || Guard::expired(self)
    }

    fn trip(&self) {
        self.tripped.store(true, Ordering::Relaxed);
    }
}

/// The watchdog: one thread for all Lua instances, checking each running call's CPU clock. An
/// instruction hook cannot fire while a single C function (`string.find` with a pathological pattern, `table.concat` of a
/// huge table) runs, and nothing in-process can preempt that function; the watchdog marks such
/// a call as tripped (so it fails with `CpuLimit` as soon as control returns to Lua or to the
/// host, even if it returns normally) and tells the operator which plugin is stuck.
fn watch(guard: &Arc<Guard>) {
    static WATCHED: OnceLock<Mutex<Vec<Weak<Guard>>>> = OnceLock::new();
    let list = WATCHED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("quiver-lua-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(WATCHDOG_PERIOD);
                let Some(list) = WATCHED.get() else { continue };
                let mut list = list.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|w| w.strong_count() > 0);
                for g in list.iter().filter_map(Weak::upgrade) {
                    if !g.running.load(Ordering::Acquire) || !g.expired() {
                        continue;
                    }
                    g.tripped.store(true, Ordering::Relaxed);
                    if g.clock.overrun() > STUCK_WARNING && !g.warned.swap(true, Ordering::Relaxed)
                    {
                        tracing::warn!(plugin = %g.plugin, "plugin call is past its CPU deadline inside a Lua C function; it will fail when that function returns");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the Lua watchdog");
        }
        Mutex::new(Vec::new())
    });
    list.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::downgrade(guard));
}

/// A live Lua state with the plugin loaded.
struct State {
    lua: Lua,
    drive: Function,
    drive_batch: Function,
    process: Option<Function>,
    process_batch: Option<Function>,
    partition: Option<Function>,
}

/// What both Lua roles share: source, limits, guard, failure streak, the live state.
struct LuaInstance {
    source: Arc<str>,
    chunk_name: String,
    eff: Effective,
    guard: Arc<Guard>,
    health: Health,
    state: Option<State>,
    /// Keyed state of the current call, shared with the `state.*` functions.
    keyed: Arc<Mutex<CallState>>,
}

impl LuaInstance {
    fn new(bundle: &Bundle, eff: Effective, keyed: CallState) -> Result<Self, PluginError> {
        let source = std::str::from_utf8(bundle.entry_bytes()).map_err(|_| PluginError::Load {
            plugin: eff.plugin.to_string(),
            message: format!("{} is not UTF-8 text", bundle.manifest().entry),
        })?;
        let mut inst = LuaInstance {
            source: source.into(),
            chunk_name: format!("@{}", bundle.manifest().entry),
            guard: Arc::new(Guard {
                plugin: eff.plugin.clone(),
                running: AtomicBool::new(false),
                warned: AtomicBool::new(false),
                clock: CallClock::default(),
                tripped: AtomicBool::new(false),
                logs: AtomicU32::new(0),
                steps: AtomicU64::new(0),
            }),
            health: Health::new(eff.plugin.clone(), eff.max_failures),
            eff,
            state: None,
            keyed: Arc::new(Mutex::new(keyed)),
        };
        watch(&inst.guard);
        inst.state = Some(inst.fresh_state()?);
        Ok(inst)
    }

    fn fresh_state(&self) -> Result<State, PluginError> {
        self.guard.arm(self.eff.cpu_ms);
        let lua = Lua::new_with(
            StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
            LuaOptions::new(),
        )
        .map_err(|e| self.lua_err(e))?;
        let r = self.setup(&lua);
        self.guard.disarm();
        let r = r.and_then(|s| self.finish_call(s));
        r.map_err(|e| self.classify(e))
    }

    fn setup(&self, lua: &Lua) -> mlua::Result<State> {
        lua.set_memory_limit(self.eff.memory_bytes())?;
        // Incremental GC with Lua's default pause: measured faster than generational mode on
        // the per-batch garbage (record tables) this host creates; an allocation that would
        // break the memory limit first triggers Lua's emergency full collection.
        lua.gc_inc(200, 100, 0);
        // Before the prelude, which locks the globals down.
        let string: mlua::Table = lua.globals().raw_get("string")?;
        strlib::install(lua, &string, self.guard.clone())?;
        // Loaded without debug information: an argument error the C function raises for a
        // call the wrapper passes on then carries no position of ours (Lua would give the
        // caller's; the wrapper's own errors do).
        let tablib = lua
            .load(TABLIB)
            .set_name("=quiver-tablib")
            .set_mode(ChunkMode::Text)
            .into_function()?;
        lua.load(tablib.dump(true))
            .set_mode(ChunkMode::Binary)
            .exec()?;
        let guard = self.guard.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                if guard.tripped.load(Ordering::Relaxed) || guard.expired() {
                    guard.tripped.store(true, Ordering::Relaxed);
                    return Err(mlua::Error::runtime(CPU_MESSAGE));
                }
                Ok(VmState::Continue)
            },
        );
        let guard = self.guard.clone();
        let check = lua.create_function(move |_, args: mlua::MultiValue| {
            if guard.tripped.load(Ordering::Relaxed) {
                return Err(mlua::Error::runtime(CPU_MESSAGE));
            }
            Ok(args)
        })?;
        let guard = self.guard.clone();
        let plugin = self.eff.plugin.clone();
        let log = lua.create_function(move |_, msg: mlua::String| {
            let n = guard.logs.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= MAX_LOG_LINES_PER_CALL {
                let bytes = msg.as_bytes();
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LOG_LINE)]);
                tracing::info!(plugin = %plugin, "{text}");
            } else if n == MAX_LOG_LINES_PER_CALL + 1 {
                tracing::warn!(plugin = %plugin, "plugin log lines beyond {MAX_LOG_LINES_PER_CALL} per call are dropped");
            }
            Ok(())
        })?;
        let config = lua.create_table()?;
        for (k, v) in self.eff.config.iter() {
            config.raw_set(k.as_str(), v.as_str())?;
        }
        let (drive, drive_batch): (Function, Function) = lua
            .load(PRELUDE)
            .set_name("=quiver-prelude")
            .set_mode(ChunkMode::Text)
            .call((check, config, BAD_RETURN))?;
        lua.globals().raw_set("log", log)?;
        lua.globals()
            .raw_set("state", state_table(lua, &self.keyed)?)?;
        lua.load(&*self.source)
            .set_name(self.chunk_name.clone())
            .set_mode(ChunkMode::Text)
            .exec()?;
        let get = |name: &str| -> mlua::Result<Option<Function>> {
            match lua.globals().raw_get::<Value>(name)? {
                Value::Function(f) => Ok(Some(f)),
                _ => Ok(None),
            }
        };
        Ok(State {
            drive,
            drive_batch,
            process: get("process")?,
            process_batch: get("process_batch")?,
            partition: get("partition")?,
            lua: lua.clone(),
        })
    }

    /// A call that returned normally but overran its deadline (inside one long C function,
    /// where hooks do not fire) still fails with `CpuLimit`.
    fn finish_call<T>(&self, v: T) -> mlua::Result<T> {
        if self.guard.tripped.load(Ordering::Relaxed)
            || self.guard.clock.past(Duration::from_millis(5))
        {
            self.guard.tripped.store(true, Ordering::Relaxed);
            return Err(mlua::Error::runtime(CPU_MESSAGE));
        }
        Ok(v)
    }

    /// The error's message with its position (`main.lua:2: …`). The traceback, mostly the
    /// host's own frames, goes to the debug log: the message is what a pipeline's status
    /// and a dead letter's header show.
    fn lua_err(&self, e: mlua::Error) -> PluginError {
        let text = e.to_string();
        let message = match text.split_once("\nstack traceback:") {
            Some((message, traceback)) => {
                tracing::debug!(plugin = %self.eff.plugin, traceback, "Lua error");
                message.to_string()
            }
            None => text,
        };
        PluginError::LuaError {
            plugin: self.eff.plugin.to_string(),
            message: crate::error::bounded_message(message),
        }
    }

    fn classify(&self, e: mlua::Error) -> PluginError {
        if self.guard.tripped.load(Ordering::Relaxed) {
            return self.eff.cpu_limit();
        }
        if let Some(se) = state_error(&e) {
            return self.eff.state_error(se);
        }
        if is_memory_error(&e) {
            return self.eff.memory_limit();
        }
        let text = e.to_string();
        if let Some(i) = text.find(BAD_RETURN) {
            let rest = &text[i + BAD_RETURN.len()..];
            return self.eff.bad_return(rest.lines().next().unwrap_or_default());
        }
        self.lua_err(e)
    }

    /// Gate, arm the deadline, run `f` on a live state, count the outcome.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&State, &Effective) -> Result<mlua::Result<R>, PluginError>,
    ) -> Result<R, PluginError> {
        self.health.gate()?;
        keyed(&self.keyed).begin();
        let mut r = self.call_inner(f);
        // The call's state writes reach the store only if it succeeded.
        let mut k = keyed(&self.keyed);
        match &r {
            Ok(_) => {
                if let Err(e) = k.commit() {
                    r = Err(self.eff.state_error(&e));
                }
            }
            Err(_) => k.rollback(),
        }
        drop(k);
        if self.health.observe(&r) {
            self.state = None;
        }
        r
    }

    fn call_inner<R>(
        &mut self,
        f: impl FnOnce(&State, &Effective) -> Result<mlua::Result<R>, PluginError>,
    ) -> Result<R, PluginError> {
        if self.state.is_none() {
            self.state = Some(self.fresh_state()?);
        }
        let Some(state) = self.state.as_ref() else {
            return Err(self.lua_err(mlua::Error::runtime("no Lua state")));
        };
        self.guard.arm(self.eff.cpu_ms);
        let r = f(state, &self.eff);
        self.guard.disarm();
        r?.and_then(|v| self.finish_call(v))
            .map_err(|e| self.classify(e))
    }
}

fn keyed(k: &Mutex<CallState>) -> std::sync::MutexGuard<'_, CallState> {
    k.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `state` table: `get(k)` → string or nil, `put(k, v)`, `delete(k)`; keys and values are
/// strings (numbers are converted, as Lua does). A failure (no store, the size limit) raises a
/// Lua error carrying the [`StateError`], which fails the call with `PluginError::State` unless
/// the script catches it; the write is not made either way.
fn state_table(lua: &Lua, shared: &Arc<Mutex<CallState>>) -> mlua::Result<mlua::Table> {
    let t = lua.create_table()?;
    let k = shared.clone();
    t.raw_set(
        "get",
        lua.create_function(move |lua, key: mlua::String| {
            let v = keyed(&k)
                .get(&key.as_bytes())
                .map_err(mlua::Error::external)?;
            v.map(|v| lua.create_string(v)).transpose()
        })?,
    )?;
    let k = shared.clone();
    t.raw_set(
        "put",
        lua.create_function(move |_, (key, value): (mlua::String, mlua::String)| {
            keyed(&k)
                .put(&key.as_bytes(), &value.as_bytes())
                .map_err(mlua::Error::external)
        })?,
    )?;
    let k = shared.clone();
    t.raw_set(
        "delete",
        lua.create_function(move |_, key: mlua::String| {
            keyed(&k)
                .delete(&key.as_bytes())
                .map_err(mlua::Error::external)
        })?,
    )?;
    Ok(t)
}

/// The [`StateError`] a `state.*` function raised, if that is what failed the call.
fn state_error(e: &mlua::Error) -> Option<&StateError> {
    match e {
        mlua::Error::ExternalError(x) => x.downcast_ref::<StateError>(),
        mlua::Error::CallbackError { cause, .. } => state_error(cause),
        mlua::Error::WithContext { cause, .. } => state_error(cause),
        _ => None,
    }
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// A Lua [`Processor`]: `process(record)` per record, or `process_batch(records)` if defined.
pub(crate) struct LuaProcessor {
    inst: LuaInstance,
}

impl LuaProcessor {
    pub(crate) fn new(
        bundle: &Bundle,
        eff: Effective,
        store: Option<Arc<dyn StateStore>>,
    ) -> Result<Self, PluginError> {
        let inst = LuaInstance::new(bundle, eff, CallState::processor(store))?;
        if let Some(s) = &inst.state {
            if s.process.is_none() && s.process_batch.is_none() {
                return Err(PluginError::Load {
                    plugin: inst.eff.plugin.to_string(),
                    message:
                        "the script defines neither process(record) nor process_batch(records)"
                            .into(),
                });
            }
        }
        Ok(LuaProcessor { inst })
    }
}

impl Processor for LuaProcessor {
    fn process_batch(&mut self, records: Vec<Record>) -> Result<Vec<Record>, PluginError> {
        self.inst.call(|s, eff| {
            let (driver, func) = match (&s.process_batch, &s.process) {
                (Some(f), _) => (&s.drive_batch, f),
                (None, Some(f)) => (&s.drive, f),
                (None, None) => return Err(eff.bad_return("no process function")),
            };
            raw::run_batch(&s.lua, driver, func, &records, eff)
        })
    }
}

/// A Lua [`Partitioner`]: `partition(key, value, partition_count)`.
pub(crate) struct LuaPartitioner {
    inst: LuaInstance,
}

impl LuaPartitioner {
    pub(crate) fn new(bundle: &Bundle, eff: Effective) -> Result<Self, PluginError> {
        let inst = LuaInstance::new(bundle, eff, CallState::partitioner())?;
        if inst.state.as_ref().is_some_and(|s| s.partition.is_none()) {
            return Err(PluginError::Load {
                plugin: inst.eff.plugin.to_string(),
                message: "the script does not define partition(key, value, partition_count)".into(),
            });
        }
        Ok(LuaPartitioner { inst })
    }
}

impl Partitioner for LuaPartitioner {
    fn partition(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        partition_count: u32,
    ) -> Result<u32, PluginError> {
        crate::require_partitions(partition_count)?;
        self.inst.call(|s, eff| {
            let Some(f) = &s.partition else {
                return Err(eff.bad_return("no partition function"));
            };
            let r = (|| {
                let key = key.map(|k| s.lua.create_string(k)).transpose()?;
                let value = s.lua.create_string(value)?;
                f.call::<Value>((key, value, partition_count))
            })();
            let v = match r {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            match v {
                Value::Integer(p) if p >= 0 && (p as u64) < u64::from(partition_count) => {
                    Ok(Ok(p as u32))
                }
                Value::Integer(p) => {
                    Err(eff.bad_return(format!("partition {p} is not in 0..{partition_count}")))
                }
                other => Err(eff.bad_return(format!(
                    "partition returned a {} (want an integer)",
                    other.type_name()
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    #[test]
    fn a_call_that_returns_late_from_a_c_function_fails_with_the_cpu_limit() {
        // `slow` stands for a C function that runs past the CPU limit and then returns: no hook
        // fires inside it, so the watchdog and the post-call check must fail the call.
        let manifest = "name = \"slow\"\nversion = \"0.1.0\"\nkind = \"processor\"\nruntime = \"lua\"\nentry = \"main.lua\"\n";
        let files = BTreeMap::from([
            ("plugin.toml".to_string(), manifest.as_bytes().to_vec()),
            (
                "main.lua".to_string(),
                b"function process(r) slow() return r end".to_vec(),
            ),
        ]);
        let bundle = Bundle::from_files(files, Path::new("slow")).unwrap();
        let eff = Effective {
            plugin: "slow@0.1.0".into(),
            config: Arc::new(BTreeMap::new()),
            cpu_ms: 50,
            memory_mb: 16,
            max_output_bytes: 1 << 20,
            wasm_stack_bytes: 1 << 19,
            max_failures: 5,
        };
        let mut p = LuaProcessor::new(&bundle, eff, None).unwrap();
        let lua = p.inst.state.as_ref().unwrap().lua.clone();
        let slow = lua
            .create_function(|_, ()| {
                let start = crate::call_clock::thread_cpu_time().unwrap();
                while crate::call_clock::thread_cpu_time().unwrap() - start
                    < Duration::from_millis(150)
                {
                    std::hint::black_box(0u64);
                }
                Ok(())
            })
            .unwrap();
        lua.globals().set("slow", slow).unwrap();
        let e = p.process_batch(vec![Record::from_value("x")]).unwrap_err();
        assert!(
            matches!(e, PluginError::CpuLimit { limit_ms: 50, .. }),
            "{e}"
        );
    }
}
