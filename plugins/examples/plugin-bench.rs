//! Throughput of the example plugins through [`quiver_plugins::local::run_bench`], as
//! `quiver plugin bench` reports it. Run in release:
//!
//! ```text
//! scripts/build-wasm-examples.sh
//! CARGO_TARGET_DIR=/work/target-plugins cargo run --release -p quiver-plugins --example plugin-bench -- [RECORDS] [RECORD_SIZE] [BATCH] [BUNDLE...]
//! ```

use std::path::PathBuf;

use quiver_plugins::local::run_bench;
use quiver_plugins::Bundle;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let records = num(0, 2_000_000)?;
    let size = num(1, 100)?;
    let batch = num(2, 1000)?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/plugins");
    let mut bundles: Vec<PathBuf> = args.iter().skip(3).map(PathBuf::from).collect();
    if bundles.is_empty() {
        bundles = ["noop-map", "noop-filter", "grep", "redact", "running-count"]
            .iter()
            .map(|n| root.join(n))
            .collect();
    }
    println!("{records} records of {size} bytes, batches of {batch}");
    for path in bundles {
        let bundle = Bundle::load(&path)?;
        let r = run_bench(&bundle, records, size, batch)?;
        println!(
            "{:<24} {:>12.0} records/s {:>10.1} µs/batch {:>12.0} records/CPU-s {:>10} out",
            r.plugin,
            r.records_per_sec,
            r.micros_per_batch,
            r.records_per_cpu_sec().unwrap_or(f64::NAN),
            r.output_records
        );
    }
    Ok(())
}
