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

/// Runs `f` on this thread while three other threads spin on the same CPU, so `f` gets about
/// a quarter of a core: its wall time is several times its CPU time, as on a loaded machine.
/// Returns `f`'s result and its wall time.
#[cfg(target_os = "linux")]
pub fn on_a_loaded_cpu<R>(f: impl FnOnce() -> R) -> (R, std::time::Duration) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame; pid 0 is this thread.
    let (old, one) = unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old),
            0
        );
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|c| libc::CPU_ISSET(*c, &old))
            .expect("a CPU to run on");
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        (old, one)
    };
    let pin = move |set: &libc::cpu_set_t| {
        // SAFETY: as above.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
        assert_eq!(rc, 0, "sched_setaffinity");
    };
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin(&one);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(0u64);
                }
            })
        })
        .collect();
    pin(&one);
    let started = std::time::Instant::now();
    let r = f();
    let wall = started.elapsed();
    pin(&old);
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().expect("hog thread");
    }
    (r, wall)
}

/// CPU time this thread spends in `f`.
#[cfg(target_os = "linux")]
pub fn cpu_time_of(f: impl FnOnce()) -> std::time::Duration {
    let now = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) },
            0
        );
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let start = now();
    f();
    now() - start
}

/// How many rounds of `work(rounds)` take about `target` of CPU time on this machine
/// (measured, so the figure holds on a faster or slower one).
#[cfg(target_os = "linux")]
pub fn rounds_for(target: std::time::Duration, mut work: impl FnMut(u64)) -> u64 {
    let mut rounds = 100_000u64;
    loop {
        let t = cpu_time_of(|| work(rounds));
        if t >= std::time::Duration::from_millis(5) || rounds > 1 << 40 {
            let per_round = t.as_secs_f64() / rounds as f64;
            return ((target.as_secs_f64() / per_round.max(1e-12)) as u64).max(1);
        }
        rounds *= 4;
    }
}
