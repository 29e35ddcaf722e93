//! Keyed state: a counting processor keeps its counts in the store it was given, across calls
//! and across instances; stores of two partitions are independent; the size limit fails the
//! call with a clear error and none of the call's writes are applied; changes are drained;
//! without a store the state functions fail clearly. For Lua and for WASM.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use quiver_plugins::{
    Bundle, MemoryStateStore, PluginConfig, PluginError, Processor, Record, StateScope, StateStore,
};

use quiver_plugins::state::ENTRY_OVERHEAD_BYTES;

use crate::support::*;

/// Counts words: the key, or the value when there is no key; emits `word → count`.
const LUA_COUNT: &str = r#"
function process(r)
  local word = r.key or r.value
  local n = tonumber(state.get(word) or "0") + 1
  state.put(word, n)
  if r.value == "fail" then error("asked to fail") end
  return { key = word, value = tostring(n) }
end
"#;

fn mem_store(partition: i32, limit: usize) -> Arc<MemoryStateStore> {
    Arc::new(MemoryStateStore::new(
        StateScope::new("wordcount", 1, "words", partition),
        limit,
    ))
}

fn with_store(bundle: Bundle, store: Arc<MemoryStateStore>) -> Box<dyn Processor> {
    PluginConfig::new(bundle)
        .limits(tight_limits())
        .state(store)
        .build_processor()
        .unwrap_or_else(|e| panic!("build: {e}"))
}

fn words(ws: &[&str]) -> Vec<Record> {
    recs(ws)
}

/// `key=value` of each output record.
fn pairs(out: &[Record]) -> Vec<String> {
    out.iter()
        .map(|r| {
            format!(
                "{}={}",
                String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
                String::from_utf8_lossy(&r.value)
            )
        })
        .collect()
}

fn get(store: &MemoryStateStore, key: &str) -> Option<String> {
    store
        .get(key.as_bytes())
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap())
}

fn lua_count() -> Bundle {
    lua_bundle("processor", LUA_COUNT)
}

fn wasm_count() -> Bundle {
    example("count")
}

fn counts_persist_across_calls_and_instances(bundle: fn() -> Bundle) {
    let store = mem_store(0, 1 << 20);
    let mut p = with_store(bundle(), store.clone());
    let out = p.process_batch(words(&["a", "b", "a"])).unwrap();
    assert_eq!(pairs(&out), ["a=1", "b=1", "a=2"]);
    let out = p.process_batch(words(&["a", "c"])).unwrap();
    assert_eq!(pairs(&out), ["a=3", "c=1"]);
    assert_eq!(get(&store, "a").as_deref(), Some("3"));
    // A new instance on the same store (a restart, a new version) continues the counts.
    drop(p);
    let mut p = with_store(bundle(), store.clone());
    let out = p.process_batch(words(&["a"])).unwrap();
    assert_eq!(pairs(&out), ["a=4"]);
    // Keys take precedence over values as the word.
    let keyed = Record {
        key: Some(Bytes::from_static(b"b")),
        ..rec("ignored")
    };
    assert_eq!(pairs(&p.process_batch(vec![keyed]).unwrap()), ["b=2"]);
}

fn two_partitions_are_independent(bundle: fn() -> Bundle) {
    let (s0, s1) = (mem_store(0, 1 << 20), mem_store(1, 1 << 20));
    let mut p0 = with_store(bundle(), s0.clone());
    let mut p1 = with_store(bundle(), s1.clone());
    assert_eq!(
        pairs(&p0.process_batch(words(&["x", "x"])).unwrap()),
        ["x=1", "x=2"]
    );
    assert_eq!(pairs(&p1.process_batch(words(&["x"])).unwrap()), ["x=1"]);
    assert_eq!(pairs(&p0.process_batch(words(&["x"])).unwrap()), ["x=3"]);
    assert_eq!(get(&s0, "x").as_deref(), Some("3"));
    assert_eq!(get(&s1, "x").as_deref(), Some("1"));
}

fn the_limit_fails_the_call_and_applies_nothing(bundle: fn() -> Bundle) {
    // "a" + "1" = 2 bytes per word, and an entry's overhead: three words fit, a fourth does
    // not.
    let word = 2 + ENTRY_OVERHEAD_BYTES;
    let store = mem_store(2, 3 * word);
    let mut p = with_store(bundle(), store.clone());
    p.process_batch(words(&["a", "b"])).unwrap();
    let e = p.process_batch(words(&["a", "c", "d"])).unwrap_err();
    assert!(matches!(e, PluginError::State { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("state limit exceeded for pipeline wordcount stage 1 input words/2")
            && msg.contains(&format!("the limit is {} bytes", 3 * word)),
        "{msg}"
    );
    // Nothing of the failed call reached the store: "a" is still 1, "c" is not there.
    assert_eq!(get(&store, "a").as_deref(), Some("1"));
    assert_eq!(get(&store, "c"), None);
    assert_eq!(store.used_bytes(), 2 * word);
    // The next call works on the state the last good call left.
    assert_eq!(
        pairs(&p.process_batch(words(&["a", "c"])).unwrap()),
        ["a=2", "c=1"]
    );
}

fn changes_are_drained(bundle: fn() -> Bundle) {
    let store = mem_store(0, 1 << 20);
    let mut p = with_store(bundle(), store.clone());
    p.process_batch(words(&["b", "a", "b"])).unwrap();
    assert_eq!(
        store.drain_changes(),
        vec![
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"b".to_vec(), Some(b"2".to_vec()))
        ]
    );
    assert!(store.drain_changes().is_empty());
    p.process_batch(words(&["a"])).unwrap();
    assert_eq!(
        store.drain_changes(),
        vec![(b"a".to_vec(), Some(b"2".to_vec()))]
    );
}

fn without_a_store_state_fails_clearly(bundle: fn() -> Bundle) {
    let mut p = processor(bundle(), tight_limits());
    let e = p.process_batch(words(&["a"])).unwrap_err();
    assert!(matches!(e, PluginError::State { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("state is not available: this processor runs without a pipeline"),
        "{e}"
    );
}

#[test]
fn lua_counts_persist_across_calls_and_instances() {
    counts_persist_across_calls_and_instances(lua_count);
}

#[test]
fn lua_two_partitions_are_independent() {
    two_partitions_are_independent(lua_count);
}

#[test]
fn lua_the_limit_fails_the_call_and_applies_nothing() {
    the_limit_fails_the_call_and_applies_nothing(lua_count);
}

#[test]
fn lua_changes_are_drained() {
    changes_are_drained(lua_count);
}

#[test]
fn lua_without_a_store_state_fails_clearly() {
    without_a_store_state_fails_clearly(lua_count);
}

#[test]
fn lua_a_failed_call_applies_none_of_its_writes() {
    let store = mem_store(0, 1 << 20);
    let mut p = with_store(lua_count(), store.clone());
    p.process_batch(words(&["a"])).unwrap();
    store.drain_changes();
    let e = p.process_batch(words(&["a", "b", "fail"])).unwrap_err();
    assert!(matches!(e, PluginError::LuaError { .. }), "{e}");
    assert_eq!(get(&store, "a").as_deref(), Some("1"));
    assert_eq!(get(&store, "b"), None);
    assert!(store.drain_changes().is_empty());
}

#[test]
fn lua_state_functions_take_strings_and_a_caught_limit_error_skips_the_write() {
    let src = r#"
function process(r)
  state.put("k", r.value)
  local ok, err = pcall(state.put, "big", string.rep("x", 100))
  local had = state.get("k")
  state.delete("k")
  return { value = had .. "|" .. tostring(state.get("k")) .. "|" .. tostring(state.get("big")),
           key = tostring(ok) .. " " .. tostring(err) }
end
"#;
    // Room for "k" = "v", not for "big" = 100 bytes beside it.
    let store = mem_store(0, 80 + ENTRY_OVERHEAD_BYTES);
    let mut p = with_store(lua_bundle("processor", src), store.clone());
    let out = p.process_batch(words(&["v"])).unwrap();
    assert_eq!(values(&out), ["v|nil|nil"]);
    assert_eq!(get(&store, "k"), None);
    let err = String::from_utf8_lossy(out[0].key.as_deref().unwrap()).into_owned();
    assert!(
        err.starts_with("false ") && err.contains("state limit exceeded"),
        "{err}"
    );
}

#[test]
fn lua_partitioners_have_no_state() {
    let src = "function partition(k, v, n) state.get('x') return 0 end";
    let mut p = PluginConfig::new(lua_bundle("partitioner", src))
        .build_partitioner()
        .unwrap();
    let e = p.partition(None, b"v", 2).unwrap_err();
    assert!(
        e.to_string()
            .contains("state is not available: only processors have state"),
        "{e}"
    );
    let e = PluginConfig::new(lua_bundle("partitioner", src))
        .state(mem_store(0, 10))
        .build_partitioner()
        .err()
        .unwrap();
    assert!(matches!(e, PluginError::Config(_)), "{e}");
}

#[test]
fn wasm_counts_persist_across_calls_and_instances() {
    counts_persist_across_calls_and_instances(wasm_count);
}

#[test]
fn wasm_two_partitions_are_independent() {
    two_partitions_are_independent(wasm_count);
}

#[test]
fn wasm_the_limit_fails_the_call_and_applies_nothing() {
    the_limit_fails_the_call_and_applies_nothing(wasm_count);
}

#[test]
fn wasm_changes_are_drained() {
    changes_are_drained(wasm_count);
}

#[test]
fn wasm_without_a_store_state_fails_clearly() {
    without_a_store_state_fails_clearly(wasm_count);
}

/// `examples/plugins/noop-map` as built by the SDK against `quiver:plugin@0.1.0`, before keyed
/// state existed (it imports `quiver:plugin/host@0.1.0` `log`): it must still load and run,
/// with or without a store.
#[test]
fn a_component_built_against_wit_0_1_0_still_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/noop-map-wit-0.1.0");
    let bundle = Bundle::load(&dir).unwrap();
    let input = words(&["a", "b"]);
    let mut p = processor(bundle.clone(), tight_limits());
    assert_eq!(values(&p.process_batch(input.clone()).unwrap()), ["a", "b"]);
    let store = mem_store(0, 100);
    let mut p = with_store(bundle, store.clone());
    assert_eq!(values(&p.process_batch(input).unwrap()), ["a", "b"]);
    assert!(store.drain_changes().is_empty());
}

/// A hand-written component importing `quiver:plugin/host@0.1.0` exactly as 0.1.0 defined it
/// (`log` and `config`), calling `log`, and returning its input.
const HOST_0_1_0: &str = r#"
(component
  (import "quiver:plugin/host@0.1.0" (instance $host
    (export "log" (func (param "msg" string)))
    (export "config" (func (param "key" string) (result (option string))))))
  (core module $mem
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $r i32)
      (local.set $r (global.get $bump))
      (global.set $bump (i32.add (global.get $bump) (local.get 3)))
      (local.get $r)))
  (core instance $mi (instantiate $mem))
  (core func $log (canon lower (func $host "log") (memory (core memory $mi "memory"))))
  (core module $m
    (import "host" "log" (func $log (param i32 i32)))
    (import "mem" "memory" (memory 1))
    (data (i32.const 0) "hello")
    (func (export "process") (param $ptr i32) (param $len i32) (result i32)
      (call $log (i32.const 0) (i32.const 5))
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $ptr))
      (i32.store (i32.const 24) (local.get $len))
      (i32.const 16)))
  (core instance $i (instantiate $m
    (with "host" (instance (export "log" (func $log))))
    (with "mem" (instance $mi))))
  (func (export "process-batch") (param "batch" (list u8)) (result (result (list u8) (error string)))
    (canon lift (core func $i "process") (memory (core memory $mi "memory")) (realloc (core func $mi "realloc")))))
"#;

#[test]
fn a_component_importing_the_whole_0_1_0_host_interface_still_loads() {
    let mut files = BTreeMap::new();
    files.insert(
        "plugin.toml".to_string(),
        b"name = \"old\"\nversion = \"0.1.0\"\nkind = \"processor\"\nruntime = \"wasm\"\nentry = \"p.wasm\"\n".to_vec(),
    );
    files.insert("p.wasm".to_string(), wat::parse_str(HOST_0_1_0).unwrap());
    let bundle = Bundle::from_files(files, Path::new("old")).unwrap();
    let mut p = processor(bundle, tight_limits());
    assert_eq!(
        values(&p.process_batch(words(&["x", "y"])).unwrap()),
        ["x", "y"]
    );
}
