//! Helpers: locating and building the example bundles, inline Lua bundles, record builders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bytes::Bytes;
use quiver_plugins::{Bundle, HostLimits, PluginConfig, PluginError, Processor, Record};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("plugins/ has a parent")
        .to_path_buf()
}

pub fn examples_dir() -> PathBuf {
    repo_root().join("examples/plugins")
}

/// Build the Rust example plugins (once per test binary) with scripts/build-wasm-examples.sh.
pub fn build_wasm_examples() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = repo_root().join("scripts/build-wasm-examples.sh");
        let status = Command::new("bash")
            .arg(&script)
            .status()
            .expect("run scripts/build-wasm-examples.sh");
        assert!(status.success(), "{} failed: {status}", script.display());
    });
}

/// Load `examples/plugins/<name>`, building the WASM examples first if needed.
pub fn example(name: &str) -> Bundle {
    let dir = examples_dir().join(name);
    if dir.join("Cargo.toml").exists() {
        build_wasm_examples();
    }
    Bundle::load(&dir).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// An in-memory Lua bundle named `test-lua` with `source` as its script.
pub fn lua_bundle(kind: &str, source: &str) -> Bundle {
    let manifest = format!(
        "name = \"test-lua\"\nversion = \"0.1.0\"\nkind = \"{kind}\"\nruntime = \"lua\"\nentry = \"main.lua\"\n[config]\nword = \"hello\"\n"
    );
    let mut files = BTreeMap::new();
    files.insert("plugin.toml".to_string(), manifest.into_bytes());
    files.insert("main.lua".to_string(), source.as_bytes().to_vec());
    Bundle::from_files(files, Path::new("test-lua")).expect("valid test bundle")
}

/// Limits small enough to make abuse tests quick. The CPU limit is generous so that memory and
/// output tests trip their own limit even on a loaded machine; CPU tests use [`cpu_limits`].
pub fn tight_limits() -> HostLimits {
    HostLimits {
        cpu_ms: 2000,
        memory_mb: 16,
        max_output_bytes: 1024 * 1024,
        ..HostLimits::default()
    }
}

pub fn processor(bundle: Bundle, limits: HostLimits) -> Box<dyn Processor> {
    PluginConfig::new(bundle)
        .limits(limits)
        .build_processor()
        .unwrap_or_else(|e| panic!("build: {e}"))
}

pub fn rec(value: &str) -> Record {
    Record::from_value(Bytes::copy_from_slice(value.as_bytes()))
}

pub fn recs(values: &[&str]) -> Vec<Record> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            offset: i as i64,
            ..rec(v)
        })
        .collect()
}

pub fn values(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

/// Run one call that must fail; return the error.
pub fn fails(p: &mut dyn Processor, value: &str) -> PluginError {
    match p.process_batch(vec![rec(value)]) {
        Ok(out) => panic!("{value:?} should have failed, returned {:?}", values(&out)),
        Err(e) => e,
    }
}

/// The next call on a good input works (the instance was replaced).
pub fn still_works(p: &mut dyn Processor) {
    let out = p
        .process_batch(recs(&["fine"]))
        .unwrap_or_else(|e| panic!("a good call after a failure must work: {e}"));
    assert_eq!(values(&out), ["fine"]);
}

/// FNV-1a 32-bit, as the example partitioners compute it.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

/// [`tight_limits`] with a 50 ms CPU limit.
pub fn cpu_limits() -> HostLimits {
    HostLimits {
        cpu_ms: 50,
        ..tight_limits()
    }
}
