//! What a bench run measured, and how it is printed (text or one JSON object).

use hdrhistogram::Histogram;
use serde::Serialize;

use super::OutputFormat;

/// One run's figures. JSON field names are a contract for scripts.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `produce` or `consume`.
    pub kind: String,
    /// Records moved.
    pub records: u64,
    /// Bytes of record values moved.
    pub bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Records per second.
    pub records_per_sec: f64,
    /// Megabytes (10^6) of record values per second.
    pub mb_per_sec: f64,
    /// Latency percentiles in milliseconds; what they measure is in `latency_measures`
    /// (0 when `latency_samples` is 0).
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Record size in bytes.
    pub record_size: usize,
    /// Partitions.
    pub partitions: u32,
    /// What the latency percentiles measure.
    pub latency_measures: String,
    /// How many latencies the percentiles are computed from.
    pub latency_samples: u64,
    /// `bench produce --rate`: the target rate in records/s (null when saturated).
    pub target_records_per_sec: Option<f64>,
    /// `bench produce --rate`: whether the run achieved at least 98% of the target rate
    /// (records acknowledged ÷ time from the first scheduled send to the last
    /// acknowledgement).
    pub kept_up: Option<bool>,
    /// `bench produce --rate`: the largest delay, in ms, between a record's scheduled send
    /// time and the moment the producer took it (a full producer buffer shows here).
    pub max_schedule_lag_ms: Option<f64>,
    /// `bench pipeline`: CPU time (user + system) this process used during the
    /// measurement, in seconds. With `--embedded` the broker runs in this process, so it
    /// counts the broker's work too: the cost of the measured path on this machine. For a
    /// pipeline measured live (without `--backlog`) that includes producing its input.
    pub cpu_seconds: Option<f64>,
    /// `cpu_seconds` per record moved, in microseconds.
    pub cpu_us_per_record: Option<f64>,
}

impl Report {
    /// Builds a report from counts, time and a latency histogram in microseconds.
    pub fn new(
        kind: &str,
        records: u64,
        record_size: usize,
        partitions: u32,
        seconds: f64,
        lat: &Histogram<u64>,
    ) -> Report {
        let bytes = records * record_size as u64;
        let q = |p: f64| {
            if lat.is_empty() {
                0.0
            } else {
                lat.value_at_quantile(p) as f64 / 1000.0
            }
        };
        Report {
            kind: kind.into(),
            records,
            bytes,
            seconds,
            records_per_sec: records as f64 / seconds.max(1e-9),
            mb_per_sec: bytes as f64 / 1e6 / seconds.max(1e-9),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            record_size,
            partitions,
            latency_measures: if lat.is_empty() {
                "not measured".into()
            } else {
                String::new()
            },
            latency_samples: lat.len(),
            target_records_per_sec: None,
            kept_up: None,
            max_schedule_lag_ms: None,
            cpu_seconds: None,
            cpu_us_per_record: None,
        }
    }

    /// Records the process CPU time the measurement took (see `cpu_seconds`).
    pub fn with_cpu(mut self, cpu_seconds: Option<f64>) -> Report {
        self.cpu_seconds = cpu_seconds;
        self.cpu_us_per_record = cpu_seconds
            .filter(|_| self.records > 0)
            .map(|s| s * 1e6 / self.records as f64);
        self
    }

    /// Says what the latency figures measure (when any were taken).
    pub fn measuring(mut self, what: &str) -> Report {
        if self.latency_samples > 0 {
            self.latency_measures = what.into();
        }
        self
    }

    /// Prints the report.
    pub fn print(&self, format: OutputFormat) {
        match format {
            OutputFormat::Json => println!("{}", serde_json::to_string(self).unwrap_or_default()),
            OutputFormat::Text => println!("{}", self.line()),
        }
    }

    /// The human summary (one line, a second for a paced run).
    pub fn line(&self) -> String {
        let latency = if self.latency_samples == 0 {
            "latency not measured".to_string()
        } else {
            format!(
                "latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms ({} samples; {})",
                self.p50_ms, self.p99_ms, self.p999_ms, self.latency_samples, self.latency_measures
            )
        };
        let mut s = format!(
            "{}: {} records of {} B in {:.2} s: {:.0} records/s, {:.1} MB/s; {latency}",
            self.kind,
            self.records,
            self.record_size,
            self.seconds,
            self.records_per_sec,
            self.mb_per_sec,
        );
        if let (Some(cpu), Some(per_record)) = (self.cpu_seconds, self.cpu_us_per_record) {
            s.push_str(&format!(
                "; process CPU {cpu:.2} s, {per_record:.2} µs per record"
            ));
        }
        if let (Some(target), Some(kept_up)) = (self.target_records_per_sec, self.kept_up) {
            s.push_str(&format!(
                "\ntarget {target:.0} records/s: achieved {:.0} records/s ({:.1}%), {}; largest lag behind the send schedule {:.1} ms",
                self.records_per_sec,
                self.records_per_sec / target * 100.0,
                if kept_up {
                    "kept up"
                } else {
                    "DID NOT keep up (latency figures include the backlog)"
                },
                self.max_schedule_lag_ms.unwrap_or(0.0)
            ));
        }
        s
    }
}

/// A latency histogram in microseconds (1 µs to 60 s).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_hist()))
}

fn unreachable_hist() -> Histogram<u64> {
    // new(3) only fails for sigfig > 5; keep a total function anyway.
    Histogram::new(2).unwrap_or_else(|_| panic!("hdrhistogram rejected 2 significant figures"))
}

/// A progress bar on stderr for `total` records (hidden when stderr is not a terminal).
pub fn progress(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let pb = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:40}} {{human_pos}}/{{human_len}} records ({{per_sec}}, eta {{eta}})"
    )) {
        pb.set_style(style);
    }
    pb
}

/// CPU time (user + system, all threads) this process has used so far, in seconds; `None`
/// where the clock cannot be read.
pub fn process_cpu_seconds() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}
