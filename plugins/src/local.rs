//! Running a bundle locally, without a broker: `quiver plugin test` ([`run_test`]) feeds it
//! records read from a file and returns what it produced; `quiver plugin bench`
//! ([`run_bench`]) feeds it generated records and reports its throughput. Both build the
//! plugin exactly as the broker does, with the same limits. A processor gets an in-memory
//! keyed-state store for the run ([`crate::MemoryStateStore`], scope `local`, the default
//! state limit), as if it ran in a one-partition pipeline, so stateful plugins (e.g.
//! `examples/plugins/count`) can be tried without a broker.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;

use std::sync::Arc;

use crate::call_clock::thread_cpu_time;
use crate::state::DEFAULT_STATE_LIMIT_BYTES;
use crate::{
    Bundle, HostLimits, Kind, MemoryStateStore, PluginConfig, PluginError, Record, StateScope,
};

/// Why a local run failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The input file cannot be read or a line is not valid.
    #[error(
        "{}{}: {message}",
        path.display(),
        if *line > 0 { format!(":{line}") } else { String::new() }
    )]
    Input {
        /// The input file.
        path: PathBuf,
        /// 1-based line number (0 when the whole file failed).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Building or running the plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Knobs for local runs; [`LocalOptions::default`] is what the CLI uses without flags.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Records per call.
    pub batch: usize,
    /// Partition count given to a partitioner.
    pub partition_count: u32,
    /// Host limits.
    pub limits: HostLimits,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            batch: 1000,
            partition_count: 4,
            limits: HostLimits::default(),
        }
    }
}

/// The state store of a local run: empty, for one partition of a pipeline named `local`.
fn local_state(bundle: &Bundle) -> Arc<MemoryStateStore> {
    Arc::new(MemoryStateStore::new(
        StateScope::new("local", 0, bundle.id(), 0),
        DEFAULT_STATE_LIMIT_BYTES,
    ))
}

/// Run `bundle` on the records of `input_path` with `key=value` config overrides.
///
/// Each non-empty line is one record: either a JSON object
/// `{"key": "k" | null, "value": "v", "headers": {"name": "v"}, "timestamp": 0}` or, if it is
/// not such an object, the line itself as the value. Offsets are the 0-based line numbers.
/// A processor's output records are returned; for a partitioner, the input records are
/// returned with `partition` set to the plugin's choice (out of 4 partitions).
pub fn run_test(
    bundle: &Bundle,
    input_path: &Path,
    config_overrides: &[String],
) -> Result<Vec<Record>, LocalError> {
    run_test_with(
        bundle,
        input_path,
        config_overrides,
        &LocalOptions::default(),
    )
}

/// [`run_test`] with explicit options.
pub fn run_test_with(
    bundle: &Bundle,
    input_path: &Path,
    config_overrides: &[String],
    opts: &LocalOptions,
) -> Result<Vec<Record>, LocalError> {
    let text = std::fs::read_to_string(input_path).map_err(|e| LocalError::Input {
        path: input_path.to_path_buf(),
        line: 0,
        message: e.to_string(),
    })?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut r = parse_line(line).map_err(|message| LocalError::Input {
            path: input_path.to_path_buf(),
            line: i + 1,
            message,
        })?;
        r.offset = i as i64;
        records.push(r);
    }
    let config = PluginConfig::new(bundle.clone())
        .overrides(config_overrides)?
        .declared_only()?
        .limits(opts.limits.clone());
    let batch = opts.batch.max(1);
    match bundle.manifest().kind {
        Kind::Processor => {
            let mut p = config
                .clone()
                .state(local_state(bundle))
                .build_processor()?;
            let mut out = Vec::new();
            let mut it = records.into_iter().peekable();
            while it.peek().is_some() {
                let chunk: Vec<Record> = it.by_ref().take(batch).collect();
                out.extend(p.process_batch(chunk)?);
            }
            Ok(out)
        }
        Kind::Partitioner => {
            let mut p = config.build_partitioner()?;
            for r in &mut records {
                let n = p.partition(r.key.as_deref(), &r.value, opts.partition_count)?;
                r.partition = n as i32;
            }
            Ok(records)
        }
    }
}

fn parse_line(line: &str) -> Result<Record, String> {
    let trimmed = line.trim_start();
    if !trimmed.starts_with('{') {
        return Ok(Record::from_value(Bytes::copy_from_slice(line.as_bytes())));
    }
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(trimmed)
    else {
        return Ok(Record::from_value(Bytes::copy_from_slice(line.as_bytes())));
    };
    if !obj.contains_key("value") {
        return Ok(Record::from_value(Bytes::copy_from_slice(line.as_bytes())));
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Bytes::copy_from_slice(s.as_bytes()),
        other => Bytes::from(other.to_string()),
    };
    let mut r = Record::default();
    for (k, v) in &obj {
        match k.as_str() {
            "key" => r.key = (!v.is_null()).then(|| text(v)),
            "value" => r.value = text(v),
            "headers" => {
                let serde_json::Value::Object(h) = v else {
                    return Err("`headers` must be an object".into());
                };
                r.headers = h.iter().map(|(n, v)| (n.clone(), text(v))).collect();
            }
            "timestamp" => r.timestamp = v.as_i64().ok_or("`timestamp` must be an integer")?,
            "partition" => {
                r.partition = v
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                    .ok_or("`partition` must be an integer")?
            }
            other => return Err(format!("unknown field `{other}`")),
        }
    }
    Ok(r)
}

/// Throughput of a plugin on generated records.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// `name@version`.
    pub plugin: String,
    /// Input records processed.
    pub records: u64,
    /// Records the plugin returned (processors) or partitions chosen (partitioners).
    pub output_records: u64,
    /// Calls made (batches for processors, records for partitioners).
    pub calls: u64,
    /// Size of each generated value, bytes.
    pub record_size: usize,
    /// Records per call.
    pub batch: usize,
    /// Time spent in calls (building the plugin and generating records excluded).
    pub elapsed: Duration,
    /// Input records per second.
    pub records_per_sec: f64,
    /// Mean time per batch of `batch` records, microseconds.
    pub micros_per_batch: f64,
    /// CPU time the calling thread spent in the calls (unix only): on a busy machine
    /// `records / cpu_time` shows what one core does, while `records_per_sec` shows wall time.
    pub cpu_time: Option<Duration>,
}

impl BenchReport {
    /// Input records per second of CPU time of the calling thread, when known.
    pub fn records_per_cpu_sec(&self) -> Option<f64> {
        self.cpu_time
            .map(|t| self.records as f64 / t.as_secs_f64().max(1e-9))
    }
}

/// Generate `records` records with `record_size`-byte values and run them through `bundle`
/// (default config) in batches of `batch`.
pub fn run_bench(
    bundle: &Bundle,
    records: usize,
    record_size: usize,
    batch: usize,
) -> Result<BenchReport, PluginError> {
    run_bench_with(
        bundle,
        records,
        record_size,
        batch,
        &[],
        &LocalOptions::default(),
    )
}

/// [`run_bench`] with config overrides and options (`opts.batch` is ignored).
pub fn run_bench_with(
    bundle: &Bundle,
    records: usize,
    record_size: usize,
    batch: usize,
    config_overrides: &[String],
    opts: &LocalOptions,
) -> Result<BenchReport, PluginError> {
    let batch = batch.max(1);
    let config = PluginConfig::new(bundle.clone())
        .overrides(config_overrides)?
        .declared_only()?
        .limits(opts.limits.clone());
    let template: Vec<Record> = (0..batch)
        .map(|i| Record {
            key: Some(Bytes::from(format!("key-{}", i % 64))),
            value: generated_value(i, record_size),
            headers: Vec::new(),
            timestamp: 1_700_000_000_000 + i as i64,
            offset: i as i64,
            partition: 0,
        })
        .collect();
    let full_batches = records / batch;
    let rest = records % batch;
    let mut output_records = 0u64;
    let mut calls = 0u64;
    let cpu_start;
    let elapsed = match bundle.manifest().kind {
        Kind::Processor => {
            let mut p = config
                .clone()
                .state(local_state(bundle))
                .build_processor()?;
            p.process_batch(template.clone())?; // warm-up
            let mut inputs: Vec<Vec<Record>> =
                (0..full_batches).map(|_| template.clone()).collect();
            if rest > 0 {
                inputs.push(template[..rest].to_vec());
            }
            cpu_start = thread_cpu_time();
            let start = Instant::now();
            for b in inputs {
                output_records += p.process_batch(b)?.len() as u64;
                calls += 1;
            }
            start.elapsed()
        }
        Kind::Partitioner => {
            let mut p = config.build_partitioner()?;
            let n = opts.partition_count;
            cpu_start = thread_cpu_time();
            let start = Instant::now();
            for i in 0..records {
                let r = &template[i % batch];
                p.partition(r.key.as_deref(), &r.value, n)?;
                output_records += 1;
                calls += 1;
            }
            start.elapsed()
        }
    };
    let cpu_time = cpu_start
        .zip(thread_cpu_time())
        .map(|(a, b)| b.saturating_sub(a));
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(BenchReport {
        plugin: bundle.id(),
        records: records as u64,
        output_records,
        calls,
        record_size,
        batch,
        elapsed,
        records_per_sec: records as f64 / secs,
        micros_per_batch: secs * 1e6 / (records as f64 / batch as f64).max(1e-9),
        cpu_time,
    })
}

/// A printable value: a JSON-ish prefix then filler, exactly `size` bytes.
fn generated_value(i: usize, size: usize) -> Bytes {
    let level = if i.is_multiple_of(10) {
        "ERROR"
    } else {
        "INFO"
    };
    let mut v = format!("{{\"id\":{i},\"level\":\"{level}\",\"msg\":\"").into_bytes();
    while v.len() + 2 < size {
        v.push(b'a' + (v.len() % 26) as u8);
    }
    v.extend_from_slice(b"\"}");
    v.truncate(size);
    Bytes::from(v)
}
