//! What one process's instances of a pipeline did: records in (processed and committed),
//! out, failed, dead-lettered (what `pipeline run` and `bench pipeline` print; `pipeline
//! status` shows the group's committed counters instead, [`crate::progress`]), the recent
//! rates `pipeline status` shows, and end-to-end latency: from an input record's timestamp
//! to the commit of the poll that processed it (its output acknowledged).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back the per-second rates look.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Counters shared by every instance of one pipeline in this process.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    records_in: AtomicU64,
    records_out: AtomicU64,
    errors: AtomicU64,
    dead_lettered: AtomicU64,
    stopping_errors: AtomicU64,
    samples: Mutex<VecDeque<(Instant, u64, u64)>>,
    /// Milliseconds from input timestamp to commit.
    latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

/// A snapshot of [`PipelineMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Input records processed and committed.
    pub records_in: u64,
    /// Records written to sinks.
    pub records_out: u64,
    /// Records a stage failed on.
    pub errors: u64,
    /// Records written to the dead-letter topic.
    pub dead_lettered: u64,
    /// Failures that stopped the pipeline (counted in `errors` too; never committed).
    pub stopping_errors: u64,
    /// Input records per second over the last few seconds.
    pub records_per_sec_in: f64,
    /// Output records per second over the last few seconds.
    pub records_per_sec_out: f64,
    /// Median end-to-end latency, ms (input timestamp → committed with its output).
    pub latency_p50_ms: f64,
    /// 99th percentile of that latency, ms.
    pub latency_p99_ms: f64,
    /// 99.9th percentile of that latency, ms.
    pub latency_p999_ms: f64,
    /// How many latencies were recorded.
    pub latency_samples: u64,
}

impl PipelineMetrics {
    /// Counts one committed batch.
    pub fn record_batch(&self, input: u64, output: u64, errors: u64, dead_lettered: u64) {
        let i = self.records_in.fetch_add(input, Ordering::Relaxed) + input;
        let o = self.records_out.fetch_add(output, Ordering::Relaxed) + output;
        self.errors.fetch_add(errors, Ordering::Relaxed);
        self.dead_lettered
            .fetch_add(dead_lettered, Ordering::Relaxed);
        self.sample(Instant::now(), i, o);
    }

    /// Counts the stage failure that stopped the pipeline (its poll is never committed, so
    /// [`record_batch`](Self::record_batch) does not count it).
    pub fn count_stopping_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.stopping_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records, for each input record of a committed poll, now − its timestamp. The
    /// timestamps come as runs of one value ([`TimestampRuns`]): a poll's records share a
    /// few milliseconds, so the histogram takes one entry per run, not per record.
    pub fn record_latencies(&self, now_ms: i64, timestamps: &TimestampRuns) {
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = h.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3)
                .expect("valid histogram bounds")
        });
        for &(t, n) in &timestamps.0 {
            let _ = h.record_n((now_ms - t).clamp(1, 3_600_000) as u64, n);
        }
    }

    fn sample(&self, now: Instant, i: u64, o: u64) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((now, i, o));
        // Keep one sample older than the window as the base of the rate.
        while s.len() > 2 && now.duration_since(s[1].0) > RATE_WINDOW {
            s.pop_front();
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> MetricsSnapshot {
        let records_in = self.records_in.load(Ordering::Relaxed);
        let records_out = self.records_out.load(Ordering::Relaxed);
        let (mut rin, mut rout) = (0.0, 0.0);
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(first), Some(last)) = (s.front(), s.back()) {
            // No batch for a whole window: the pipeline is idle now.
            if now.duration_since(last.0) <= RATE_WINDOW {
                let secs = now.duration_since(first.0).as_secs_f64().max(1.0);
                rin = (last.1 - first.1) as f64 / secs;
                rout = (last.2 - first.2) as f64 / secs;
            }
        }
        drop(s);
        let (latency_p50_ms, latency_p99_ms, latency_p999_ms, latency_samples) =
            match &*self.latency.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(h) if !h.is_empty() => (
                    h.value_at_quantile(0.5) as f64,
                    h.value_at_quantile(0.99) as f64,
                    h.value_at_quantile(0.999) as f64,
                    h.len(),
                ),
                _ => (0.0, 0.0, 0.0, 0),
            };
        MetricsSnapshot {
            latency_p50_ms,
            latency_p99_ms,
            latency_p999_ms,
            latency_samples,
            records_in,
            records_out,
            errors: self.errors.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            stopping_errors: self.stopping_errors.load(Ordering::Relaxed),
            records_per_sec_in: rin,
            records_per_sec_out: rout,
        }
    }
}

/// Input records' timestamps as runs of one value: `(timestamp, records)`, in the order
/// the records came.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TimestampRuns(Vec<(i64, u64)>);

impl TimestampRuns {
    /// Adds one record's timestamp.
    pub fn push(&mut self, timestamp: i64) {
        match self.0.last_mut() {
            Some((t, n)) if *t == timestamp => *n += 1,
            _ => self.0.push((timestamp, 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_rates_fall_to_zero_when_idle() {
        let m = PipelineMetrics::default();
        let t0 = Instant::now();
        m.sample(t0, 0, 0);
        m.records_in.store(1000, Ordering::Relaxed);
        m.records_out.store(500, Ordering::Relaxed);
        m.sample(t0 + Duration::from_secs(2), 1000, 500);
        let s = m.snapshot_at(t0 + Duration::from_secs(2));
        assert_eq!((s.records_in, s.records_out), (1000, 500));
        assert!((s.records_per_sec_in - 500.0).abs() < 1e-9, "{s:?}");
        assert!((s.records_per_sec_out - 250.0).abs() < 1e-9, "{s:?}");
        let idle = m.snapshot_at(t0 + Duration::from_secs(60));
        assert_eq!(idle.records_per_sec_in, 0.0);
        assert_eq!(idle.records_in, 1000);
    }

    #[test]
    fn record_batch_counts_errors_and_dead_letters() {
        let m = PipelineMetrics::default();
        m.record_batch(100, 99, 1, 1);
        m.record_batch(10, 10, 0, 0);
        let s = m.snapshot();
        assert_eq!(
            (s.records_in, s.records_out, s.errors, s.dead_lettered),
            (110, 109, 1, 1)
        );
    }

    #[test]
    fn latencies_count_every_record_of_a_run() {
        let mut runs = TimestampRuns::default();
        for t in [1_000, 1_000, 1_000, 1_005, 1_000] {
            runs.push(t);
        }
        assert_eq!(runs.0, [(1_000, 3), (1_005, 1), (1_000, 1)]);
        let m = PipelineMetrics::default();
        m.record_latencies(1_010, &runs);
        let s = m.snapshot();
        assert_eq!(s.latency_samples, 5);
        assert_eq!(s.latency_p50_ms, 10.0);
    }
}
