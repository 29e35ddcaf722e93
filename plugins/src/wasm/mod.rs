//! The WASM runtime: plugin components run by wasmtime (Cranelift), one store per instance.
//!
//! It owns the engines (one per stack size, with a shared epoch ticker thread), the compile
//! cache (by bundle digest), the import policy (only `quiver:plugin/host` is provided; other
//! WASI imports a standard library pulls in are trap stubs; `wasi:filesystem`, `wasi:sockets`
//! and `wasi:http` are refused at load) and the per-call limits: CPU time through epoch
//! deadlines (each deadline reached checks the call's CPU clock, `call_clock.rs`: past the
//! limit it traps, else the deadline moves to the next checkpoint), a [`ResourceLimiter`]
//! capping the total of the instance's memories and tables, `max_wasm_stack` for the stack,
//! and an output-size check. A failed call drops the store; the next call instantiates afresh
//! from the cached [`InstancePre`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{Component, ComponentExportIndex, Func, InstancePre, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store, StoreContextMut, Trap, UpdateDeadline};

use crate::bundle::{Bundle, Kind};
use crate::call_clock::CallClock;
use crate::limits::{Effective, Health};
use crate::state::{CallState, StateError};
use crate::{codec, Partitioner, PluginError, Processor, Record, StateStore};

/// The interface every plugin may import, in each version the host provides: 0.1.0 (`log`,
/// `config`) for components built before keyed state, 0.2.0 (adds `state-get`, `state-put`,
/// `state-delete`). A component imports only the functions it uses, and a version only
/// matches itself under semver 0.x, so both are linked.
pub(crate) const HOST_INTERFACES: [(&str, bool); 2] = [
    ("quiver:plugin/host@0.1.0", false),
    ("quiver:plugin/host@0.2.0", true),
];
/// Import prefixes that make the host refuse a component.
const FORBIDDEN_IMPORTS: [&str; 3] = ["wasi:filesystem", "wasi:sockets", "wasi:http"];
/// Epoch tick; CPU limits are enforced with this granularity.
const TICK: Duration = Duration::from_millis(1);
/// Log lines a plugin may write per call; the rest are counted and dropped.
const MAX_LOG_LINES_PER_CALL: u32 = 64;
const MAX_LOG_LINE: usize = 4096;
/// Compiled components kept for fast instantiation, keyed by bundle digest.
const MAX_CACHED_COMPONENTS: usize = 64;

struct WasmRuntime {
    engines: Mutex<HashMap<usize, Engine>>,
    compiled: Mutex<HashMap<(String, usize, Kind), Arc<Loaded>>>,
}

fn runtime() -> &'static WasmRuntime {
    static RT: OnceLock<WasmRuntime> = OnceLock::new();
    RT.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("quiver-wasm-epoch".into())
            .spawn(|| loop {
                std::thread::sleep(TICK);
                let engines: Vec<Engine> = runtime()
                    .engines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect();
                engines.iter().for_each(Engine::increment_epoch);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the WASM epoch ticker; CPU limits will not fire");
        }
        WasmRuntime {
            engines: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
        }
    })
}

fn engine(stack: usize) -> Result<Engine, PluginError> {
    let mut engines = runtime().engines.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = engines.get(&stack) {
        return Ok(e.clone());
    }
    let mut cfg = Config::new();
    cfg.wasm_component_model(true)
        .epoch_interruption(true)
        // Wasmtime's default, stated: the memory cap is on the instance's total (`Limiter`).
        .wasm_multi_memory(true)
        .max_wasm_stack(stack)
        .strategy(wasmtime::Strategy::Cranelift);
    let engine = Engine::new(&cfg)
        .map_err(|e| PluginError::Config(format!("cannot create the WASM engine: {e:#}")))?;
    engines.insert(stack, engine.clone());
    Ok(engine)
}

/// A compiled, linked component ready to instantiate.
struct Loaded {
    engine: Engine,
    pre: InstancePre<State>,
    export: ComponentExportIndex,
}

fn load(bundle: &Bundle, eff: &Effective, kind: Kind) -> Result<Arc<Loaded>, PluginError> {
    let key = (bundle.digest(), eff.wasm_stack_bytes, kind);
    if let Some(l) = runtime()
        .compiled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
    {
        return Ok(l.clone());
    }
    let plugin = eff.plugin.to_string();
    let load_err = |message: String| PluginError::Load {
        plugin: plugin.clone(),
        message,
    };
    let engine = engine(eff.wasm_stack_bytes)?;
    let component = Component::new(&engine, bundle.entry_bytes()).map_err(|e| {
        load_err(format!(
            "{} is not a valid WASM component (build with --target wasm32-wasip2): {e:#}",
            bundle.manifest().entry
        ))
    })?;
    let ty = component.component_type();
    for (name, _) in ty.imports(&engine) {
        if FORBIDDEN_IMPORTS.iter().any(|p| name.starts_with(p)) {
            return Err(PluginError::Forbidden {
                plugin,
                message: format!("imports {name}; plugins get no filesystem, network or HTTP"),
            });
        }
    }
    let export_name = match kind {
        Kind::Processor => "process-batch",
        Kind::Partitioner => "partition",
    };
    let export = component
        .get_export_index(None, export_name)
        .ok_or_else(|| load_err(format!("the component does not export `{export_name}`")))?;
    let mut linker: Linker<State> = Linker::new(&engine);
    let link = |e: wasmtime::Error| load_err(format!("cannot link: {e:#}"));
    for (name, with_state) in HOST_INTERFACES {
        link_host(&mut linker, name, with_state).map_err(link)?;
    }
    // Rust's std seeds `HashMap` from `wasi:random/insecure-seed`; give it a fixed seed so that
    // ordinary collections work (plugins are deterministic; there is no other randomness).
    let seeds: Vec<String> = ty
        .imports(&engine)
        .map(|(name, _)| name.to_string())
        .filter(|name| name.starts_with("wasi:random/insecure-seed@"))
        .collect();
    for name in seeds {
        linker
            .instance(&name)
            .and_then(|mut i| {
                i.func_wrap(
                    "insecure-seed",
                    |_cx: StoreContextMut<'_, State>, (): ()| {
                        Ok(((0x243f_6a88_85a3_08d3u64, 0x1319_8a2e_0370_7344u64),))
                    },
                )
            })
            .map_err(link)?;
    }
    linker
        .define_unknown_imports_as_traps(&component)
        .map_err(link)?;
    let pre = linker.instantiate_pre(&component).map_err(link)?;
    let loaded = Arc::new(Loaded {
        engine,
        pre,
        export,
    });
    let mut cache = runtime().compiled.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= MAX_CACHED_COMPONENTS {
        // Rare (many versions deployed): start over rather than track recency.
        cache.clear();
    }
    cache.insert(key, loaded.clone());
    Ok(loaded)
}

/// Define one version of the `host` interface. Time spent in host functions is CPU time of
/// the call's thread, so it counts against the call's limit (checked at the next deadline
/// the guest reaches).
fn link_host(linker: &mut Linker<State>, name: &str, with_state: bool) -> wasmtime::Result<()> {
    let mut host = linker.instance(name)?;
    host.func_wrap(
        "log",
        |mut cx: StoreContextMut<'_, State>, (msg,): (String,)| {
            cx.data_mut().log(&msg);
            Ok(())
        },
    )?;
    host.func_wrap(
        "config",
        |cx: StoreContextMut<'_, State>, (key,): (String,)| {
            Ok((cx.data().config.get(&key).cloned(),))
        },
    )?;
    if !with_state {
        return Ok(());
    }
    // A state error traps the guest with the `StateError` as the error, which `classify`
    // turns into `PluginError::State`; the call's writes are then rolled back.
    host.func_wrap(
        "state-get",
        |cx: StoreContextMut<'_, State>, (key,): (Vec<u8>,)| {
            Ok((cx.data().keyed.get(&key).map_err(wasmtime::Error::new)?,))
        },
    )?;
    host.func_wrap(
        "state-put",
        |mut cx: StoreContextMut<'_, State>, (key, value): (Vec<u8>, Vec<u8>)| {
            cx.data_mut()
                .keyed
                .put(&key, &value)
                .map_err(wasmtime::Error::new)
        },
    )?;
    host.func_wrap(
        "state-delete",
        |mut cx: StoreContextMut<'_, State>, (key,): (Vec<u8>,)| {
            cx.data_mut()
                .keyed
                .delete(&key)
                .map_err(wasmtime::Error::new)
        },
    )?;
    Ok(())
}

/// Per-store data: limits bookkeeping and what host functions need.
struct State {
    plugin: Arc<str>,
    config: Arc<BTreeMap<String, String>>,
    limiter: Limiter,
    logs: u32,
    last_panic: Option<String>,
    /// Keyed state of the current call.
    keyed: CallState,
    /// The current call's CPU clock.
    clock: CallClock,
}

impl State {
    fn log(&mut self, msg: &str) {
        let msg = truncate(msg, MAX_LOG_LINE);
        if let Some(p) = msg.strip_prefix("panic: ") {
            self.last_panic = Some(crate::error::bounded_message(p.to_string()));
        }
        self.logs += 1;
        if self.logs <= MAX_LOG_LINES_PER_CALL {
            tracing::info!(plugin = %self.plugin, "{msg}");
        } else if self.logs == MAX_LOG_LINES_PER_CALL + 1 {
            tracing::warn!(plugin = %self.plugin, "plugin log lines beyond {MAX_LOG_LINES_PER_CALL} per call are dropped");
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bytes a table element is counted as (a function reference is a pointer).
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

/// Caps the **total** of every linear memory and table (elements counted as
/// [`TABLE_ELEMENT_BYTES`]) of a store, which holds one plugin instance: a component may hold
/// several core instances and a core module several memories (multi-memory is enabled), and a
/// cap per memory would let N memories take N times the limit. Remembers that the cap was hit,
/// so the guest's resulting trap or abort maps to `MemoryLimit`.
#[derive(Debug)]
struct Limiter {
    cap_bytes: usize,
    /// Bytes of memories and tables granted so far in this store (they never shrink).
    used_bytes: usize,
    /// The last growth granted, returned if the growth then failed.
    pending_bytes: usize,
    hit_memory: bool,
}

impl Limiter {
    fn new(cap_bytes: usize) -> Self {
        Limiter {
            cap_bytes,
            used_bytes: 0,
            pending_bytes: 0,
            hit_memory: false,
        }
    }

    fn grow(&mut self, delta: usize) -> bool {
        match self.used_bytes.checked_add(delta) {
            Some(total) if total <= self.cap_bytes => {
                self.used_bytes = total;
                self.pending_bytes = delta;
                true
            }
            _ => {
                self.hit_memory = true;
                false
            }
        }
    }

    fn grow_failed(&mut self) {
        self.used_bytes = self.used_bytes.saturating_sub(self.pending_bytes);
        self.pending_bytes = 0;
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(desired.saturating_sub(current)))
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.grow_failed();
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = desired
            .saturating_sub(current)
            .saturating_mul(TABLE_ELEMENT_BYTES);
        Ok(self.grow(delta))
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.grow_failed();
        Ok(())
    }

    fn instances(&self) -> usize {
        100
    }

    fn tables(&self) -> usize {
        100
    }

    /// A component's modules (its own, adapters) need one memory each, seldom two. Each
    /// memory reserves about 4 GiB of address space however little it uses, so 100 per
    /// instance let a few hundred live instances exhaust the process's address space.
    fn memories(&self) -> usize {
        MAX_MEMORIES_PER_INSTANCE
    }
}

/// Most linear memories one instance may create (see [`ResourceLimiter::memories`]).
const MAX_MEMORIES_PER_INSTANCE: usize = 8;

struct Live {
    store: Store<State>,
    func: Func,
}

/// One instance of a component plus its limits and failure streak; shared by both roles.
struct WasmInstance {
    loaded: Arc<Loaded>,
    eff: Effective,
    health: Health,
    live: Option<Live>,
    /// The processor's state store (`None`: no pipeline), handed to each new store's data.
    state_store: Option<Arc<dyn StateStore>>,
    kind: Kind,
}

impl WasmInstance {
    fn new(
        bundle: &Bundle,
        eff: Effective,
        kind: Kind,
        state_store: Option<Arc<dyn StateStore>>,
    ) -> Result<Self, PluginError> {
        let loaded = load(bundle, &eff, kind)?;
        let mut inst = WasmInstance {
            health: Health::new(eff.plugin.clone(), eff.max_failures),
            loaded,
            eff,
            live: None,
            state_store,
            kind,
        };
        // Instantiate now so that a plugin that cannot start fails the build, not the first call.
        inst.live = Some(inst.instantiate()?);
        Ok(inst)
    }

    fn instantiate(&self) -> Result<Live, PluginError> {
        let mut store = Store::new(
            &self.loaded.engine,
            State {
                plugin: self.eff.plugin.clone(),
                config: self.eff.config.clone(),
                limiter: Limiter::new(self.eff.memory_bytes()),
                logs: 0,
                last_panic: None,
                keyed: match self.kind {
                    Kind::Processor => CallState::processor(self.state_store.clone()),
                    Kind::Partitioner => CallState::partitioner(),
                },
                clock: CallClock::default(),
            },
        );
        store.limiter(|s| &mut s.limiter);
        // A deadline reached is a checkpoint of the call's CPU clock, not the end of the call.
        store.epoch_deadline_callback(|cx| {
            let clock = &cx.data().clock;
            Ok(if clock.past_limit() {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Continue(ticks(clock.until_checkpoint()))
            })
        });
        start_call(&mut store, self.eff.cpu_ms);
        let instance = match self.loaded.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => return Err(classify(e, store.data(), &self.eff)),
        };
        let func = instance
            .get_func(&mut store, self.loaded.export)
            .ok_or_else(|| PluginError::Load {
                plugin: self.eff.plugin.to_string(),
                message: "export is not a function".into(),
            })?;
        Ok(Live { store, func })
    }

    /// Run `f` on a live instance with fresh per-call limits; count the outcome.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Live, &Effective) -> Result<R, PluginError>,
    ) -> Result<R, PluginError> {
        self.health.gate()?;
        let mut r = self.call_inner(f);
        // The call's state writes reach the store only if it succeeded.
        if let Some(live) = self.live.as_mut() {
            let keyed = &mut live.store.data_mut().keyed;
            match &r {
                Ok(_) => {
                    if let Err(e) = keyed.commit() {
                        r = Err(self.eff.state_error(&e));
                    }
                }
                Err(_) => keyed.rollback(),
            }
        }
        if self.health.observe(&r) {
            self.live = None;
        }
        r
    }

    fn call_inner<R>(
        &mut self,
        f: impl FnOnce(&mut Live, &Effective) -> Result<R, PluginError>,
    ) -> Result<R, PluginError> {
        if self.live.is_none() {
            self.live = Some(self.instantiate()?);
        }
        let Some(live) = self.live.as_mut() else {
            return Err(PluginError::Load {
                plugin: self.eff.plugin.to_string(),
                message: "no instance".into(),
            });
        };
        start_call(&mut live.store, self.eff.cpu_ms);
        let data = live.store.data_mut();
        data.logs = 0;
        data.last_panic = None;
        data.limiter.hit_memory = false;
        data.keyed.begin();
        f(live, &self.eff)
    }
}

/// Epoch ticks that cover `d` (at least one).
fn ticks(d: Duration) -> u64 {
    (d.as_micros() as u64 / TICK.as_micros().max(1) as u64).saturating_add(1)
}

/// Starts a call's CPU clock on this thread (the one that runs the call), with the first
/// deadline where the limit would end if the call had a core to itself.
fn start_call(store: &mut Store<State>, cpu_ms: u64) {
    store.data().clock.start(cpu_ms);
    store.set_epoch_deadline(ticks(Duration::from_millis(cpu_ms)));
}

/// Map a wasmtime error to the limit or trap that caused it.
fn classify(e: wasmtime::Error, state: &State, eff: &Effective) -> PluginError {
    if state.limiter.hit_memory {
        return eff.memory_limit();
    }
    if let Some(se) = e.downcast_ref::<StateError>() {
        return eff.state_error(se);
    }
    let message = match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return eff.cpu_limit(),
        Some(Trap::StackOverflow) => {
            format!("stack overflow (limit {} bytes)", eff.wasm_stack_bytes)
        }
        Some(trap) => trap.to_string(),
        None => crate::error::bounded_message(e.root_cause().to_string()),
    };
    let message = match &state.last_panic {
        Some(p) => format!("{message}; guest panicked: {p}"),
        None => message,
    };
    PluginError::Trap {
        plugin: eff.plugin.to_string(),
        message,
    }
}

fn signature_err(eff: &Effective, e: wasmtime::Error) -> PluginError {
    PluginError::Load {
        plugin: eff.plugin.to_string(),
        message: format!("export has the wrong signature: {e:#}"),
    }
}

/// A WASM [`Processor`]: one encoded batch in, one encoded batch out, per call.
pub(crate) struct WasmProcessor {
    inst: WasmInstance,
    buf: Vec<u8>,
}

impl WasmProcessor {
    pub(crate) fn new(
        bundle: &Bundle,
        eff: Effective,
        store: Option<Arc<dyn StateStore>>,
    ) -> Result<Self, PluginError> {
        Ok(WasmProcessor {
            inst: WasmInstance::new(bundle, eff, Kind::Processor, store)?,
            buf: Vec::new(),
        })
    }
}

impl Processor for WasmProcessor {
    fn process_batch(&mut self, records: Vec<Record>) -> Result<Vec<Record>, PluginError> {
        self.buf.clear();
        codec::encode_batch_into(&records, &mut self.buf);
        drop(records);
        let input = &self.buf;
        self.inst.call(|live, eff| {
            let typed = live
                .func
                .typed::<(&[u8],), (Result<Vec<u8>, String>,)>(&live.store)
                .map_err(|e| signature_err(eff, e))?;
            let (out,) = typed
                .call(&mut live.store, (input.as_slice(),))
                .map_err(|e| classify(e, live.store.data(), eff))?;
            let out = out.map_err(|message| PluginError::Failed {
                plugin: eff.plugin.to_string(),
                message: crate::error::bounded_message(message),
            })?;
            if out.len() > eff.max_output_bytes {
                return Err(eff.output_limit(out.len()));
            }
            codec::decode_batch(Bytes::from(out)).map_err(|m| eff.bad_return(m))
        })
    }
}

/// A WASM [`Partitioner`].
pub(crate) struct WasmPartitioner {
    inst: WasmInstance,
}

impl WasmPartitioner {
    pub(crate) fn new(bundle: &Bundle, eff: Effective) -> Result<Self, PluginError> {
        Ok(WasmPartitioner {
            inst: WasmInstance::new(bundle, eff, Kind::Partitioner, None)?,
        })
    }
}

impl Partitioner for WasmPartitioner {
    fn partition(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        partition_count: u32,
    ) -> Result<u32, PluginError> {
        crate::require_partitions(partition_count)?;
        self.inst.call(|live, eff| {
            let typed = live
                .func
                .typed::<(Option<&[u8]>, &[u8], u32), (Result<u32, String>,)>(&live.store)
                .map_err(|e| signature_err(eff, e))?;
            let (out,) = typed
                .call(&mut live.store, (key, value, partition_count))
                .map_err(|e| classify(e, live.store.data(), eff))?;
            let p = out.map_err(|message| PluginError::Failed {
                plugin: eff.plugin.to_string(),
                message: crate::error::bounded_message(message),
            })?;
            if p >= partition_count {
                return Err(eff.bad_return(format!("partition {p} is not in 0..{partition_count}")));
            }
            Ok(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_caps_the_total_of_memories_and_tables() {
        let mut l = Limiter::new(100);
        assert!(l.grow(60));
        assert!(
            !l.grow(60),
            "a second memory may not take the rest of the cap again"
        );
        assert!(l.hit_memory);
        assert!(l.grow(40));
        assert!(!l.grow(1));
        let mut l = Limiter::new(1000);
        assert!(l.memory_growing(0, 600, None).unwrap());
        l.memory_grow_failed(wasmtime::Error::msg("no")).unwrap();
        assert!(
            l.memory_growing(0, 600, None).unwrap(),
            "a failed growth is given back"
        );
        assert!(
            !l.table_growing(0, 100, None).unwrap(),
            "100 elements of 8 bytes"
        );
        assert!(l.table_growing(0, 50, None).unwrap());
        assert!(!l.grow(usize::MAX));
    }
}
