//! Hostile WASM plugins: every limit stops the call with a typed error, forbidden imports are
//! refused at load, the next call runs on a fresh instance, and repeated failures quarantine.

use std::collections::BTreeMap;
use std::path::Path;

use quiver_plugins::{Bundle, HostLimits, PluginConfig, PluginError};

use crate::support::*;

fn hostile() -> Box<dyn quiver_plugins::Processor> {
    hostile_with(tight_limits())
}

fn hostile_with(limits: HostLimits) -> Box<dyn quiver_plugins::Processor> {
    processor(example("hostile"), limits)
}

/// The CPU limit counts the CPU time a call uses, not the time it waits for a core: a call
/// that needs half its limit succeeds when a loaded CPU stretches it past its limit.
#[test]
#[cfg(target_os = "linux")]
fn a_call_waiting_for_a_busy_cpu_is_not_charged_for_the_wait() {
    let limits = HostLimits {
        cpu_ms: 200,
        ..tight_limits()
    };
    let mut p = hostile_with(limits);
    let rounds = rounds_for(std::time::Duration::from_millis(100), |n| {
        p.process_batch(vec![rec(&format!("spin:{n}"))]).unwrap();
    });
    let (out, wall) = on_a_loaded_cpu(|| p.process_batch(vec![rec(&format!("spin:{rounds}"))]));
    assert!(
        wall > std::time::Duration::from_millis(200),
        "the CPU was not loaded: the call took {wall:?}"
    );
    let out =
        out.unwrap_or_else(|e| panic!("a call within its CPU limit failed after {wall:?}: {e}"));
    assert_eq!(out.len(), 1);
}

#[test]
fn an_infinite_loop_is_stopped_by_the_cpu_limit() {
    let mut p = hostile_with(cpu_limits());
    let e = fails(&mut *p, "loop");
    assert!(
        matches!(e, PluginError::CpuLimit { limit_ms: 50, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("hostile@1.0.0"), "{e}");
    still_works(&mut *p);
}

#[test]
fn a_memory_bomb_is_stopped_at_the_memory_cap() {
    let mut p = hostile();
    let e = fails(&mut *p, "alloc");
    assert!(
        matches!(e, PluginError::MemoryLimit { limit_mb: 16, .. }),
        "{e}"
    );
    still_works(&mut *p);
}

#[test]
fn deep_recursion_hits_the_stack_limit() {
    let mut p = hostile();
    let e = fails(&mut *p, "recurse");
    // The guest overflows either wasmtime's native stack (`max_wasm_stack`) or the shadow stack
    // Rust keeps in linear memory, which then faults out of bounds: both stop the call.
    assert!(
        matches!(&e, PluginError::Trap { message, .. }
            if message.contains("stack overflow") || message.contains("out of bounds")),
        "{e}"
    );
    still_works(&mut *p);
}

#[test]
fn huge_output_is_refused() {
    let mut p = processor(
        example("hostile"),
        HostLimits {
            memory_mb: 64,
            ..tight_limits()
        },
    );
    let e = fails(&mut *p, "big:40");
    assert!(
        matches!(
            e,
            PluginError::OutputLimit {
                limit_bytes: 1048576,
                ..
            }
        ),
        "{e}"
    );
    still_works(&mut *p);
}

#[test]
fn a_panic_is_a_trap_carrying_the_panic_message() {
    let mut p = hostile();
    let e = fails(&mut *p, "panic");
    assert!(
        matches!(&e, PluginError::Trap { message, .. } if message.contains("asked to panic")),
        "{e}"
    );
    still_works(&mut *p);
}

#[test]
fn wasi_calls_outside_the_sandbox_trap() {
    // std's println! goes to wasi:cli/stdout, which is linked to a stub that traps.
    let mut p = hostile();
    let e = fails(&mut *p, "print");
    assert!(
        matches!(&e, PluginError::Trap { message, .. } if message.contains("wasi:")),
        "{e}"
    );
    still_works(&mut *p);
}

#[test]
fn a_fresh_instance_cannot_see_memory_of_the_previous_one() {
    let mut p = hostile();
    assert_eq!(
        values(&p.process_batch(recs(&["recall"])).unwrap()),
        ["nothing"]
    );
    p.process_batch(recs(&["remember"])).unwrap();
    assert_eq!(
        values(&p.process_batch(recs(&["recall"])).unwrap()),
        ["s3cr3t"],
        "state persists within an instance"
    );
    fails(&mut *p, "panic");
    assert_eq!(
        values(&p.process_batch(recs(&["recall"])).unwrap()),
        ["nothing"],
        "the replacement instance starts clean"
    );
    let mut other = hostile();
    assert_eq!(
        values(&other.process_batch(recs(&["recall"])).unwrap()),
        ["nothing"]
    );
}

#[test]
fn repeated_failures_quarantine_the_plugin() {
    let mut p = processor(
        example("hostile"),
        HostLimits {
            max_consecutive_failures: 2,
            ..cpu_limits()
        },
    );
    fails(&mut *p, "panic");
    still_works(&mut *p);
    fails(&mut *p, "panic");
    fails(&mut *p, "loop");
    let e = p.process_batch(recs(&["fine"])).unwrap_err();
    assert!(
        matches!(e, PluginError::Quarantined { failures: 2, .. }),
        "{e}"
    );
}

#[test]
fn a_component_importing_the_wasi_filesystem_is_refused_at_load() {
    let e = PluginConfig::new(example("hostile-fs"))
        .build_processor()
        .err()
        .unwrap();
    assert!(
        matches!(&e, PluginError::Forbidden { message, .. } if message.contains("wasi:filesystem")),
        "{e}"
    );
}

fn wat_bundle(wat: &str) -> Bundle {
    let wasm = wat::parse_str(wat).expect("valid wat");
    let mut files = BTreeMap::new();
    files.insert(
        "plugin.toml".to_string(),
        b"name = \"wat\"\nversion = \"0.1.0\"\nkind = \"processor\"\nruntime = \"wasm\"\nentry = \"p.wasm\"\n".to_vec(),
    );
    files.insert("p.wasm".to_string(), wasm);
    Bundle::from_files(files, Path::new("wat")).unwrap()
}

#[test]
fn components_importing_sockets_or_http_are_refused_at_load() {
    for import in ["wasi:sockets/tcp@0.2.0", "wasi:http/outgoing-handler@0.2.0"] {
        let b = wat_bundle(&format!(r#"(component (import "{import}" (instance)))"#));
        let e = PluginConfig::new(b).build_processor().err().unwrap();
        assert!(
            matches!(&e, PluginError::Forbidden { message, .. } if message.contains(import)),
            "{e}"
        );
    }
}

#[test]
fn core_modules_and_components_without_the_export_do_not_load() {
    for wat in ["(module)", "(component)"] {
        let e = PluginConfig::new(wat_bundle(wat))
            .build_processor()
            .err()
            .unwrap();
        assert!(matches!(e, PluginError::Load { .. }), "{wat}: {e}");
    }
}

/// A component whose core module has two linear memories. `process-batch` grows the second
/// memory to 75% of 16 MiB; when the first record's value starts with `a` it first grows the
/// first memory to 75% too. It returns an empty batch.
const TWO_MEMORIES: &str = r#"
(component
  (core module $m
    (memory $m0 (export "memory") 1)
    (memory $m1 0)
    (global $bump (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $r i32)
      (local.set $r (global.get $bump))
      (global.set $bump (i32.add (global.get $bump) (local.get 3)))
      (local.get $r))
    (func (export "process") (param $ptr i32) (param $len i32) (result i32)
      ;; batch: count:u32 flags:u8 value_len:u32 value... -> the value's first byte is at +9
      (if (i32.eq (i32.load8_u (i32.add (local.get $ptr) (i32.const 9))) (i32.const 97))
        (then
          (if (i32.eq (memory.grow $m0 (i32.const 191)) (i32.const -1)) (then unreachable))))
      (if (i32.eq (memory.grow $m1 (i32.const 192)) (i32.const -1)) (then unreachable))
      (i32.store (i32.const 100) (i32.const 0))
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (i32.const 100))
      (i32.store (i32.const 24) (i32.const 4))
      (i32.const 16)))
  (core instance $i (instantiate $m))
  (func (export "process-batch") (param "batch" (list u8)) (result (result (list u8) (error string)))
    (canon lift (core func $i "process") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))
"#;

#[test]
fn the_memory_cap_is_on_the_total_of_all_memories() {
    let limits = tight_limits(); // 16 MiB
                                 // One memory at 75% of the cap (plus the 64 KiB first memory) fits.
    let mut p = processor(wat_bundle(TWO_MEMORIES), limits.clone());
    assert_eq!(p.process_batch(vec![rec("b")]).unwrap(), vec![]);
    // Two memories at 75% each are 150% of the cap: refused, although each alone is within it.
    let mut p = processor(wat_bundle(TWO_MEMORIES), limits);
    let e = fails(&mut *p, "a");
    assert!(
        matches!(e, PluginError::MemoryLimit { limit_mb: 16, .. }),
        "{e}"
    );
}
