//! `bench pipeline`: end-to-end throughput and latency of a pipeline, in one run beside the
//! figures it should be compared with. Three measurements on the same broker, each on fresh
//! topics: plain produce of N records; a pipeline with no stage (records copied from the
//! input to the sink); and the pipeline with the given `--stage` chain. With `--repeat`,
//! each run starts its three one later in turn ([`Measured::in_turn`]). For the pipelines,
//! N records are produced into the input while the pipeline runs in this process; the run
//! ends when the pipeline has processed all N (their outputs acknowledged in the sink and
//! their offsets committed). Records/s is N over the time from the first produce to that
//! moment. Latency runs from each input record's timestamp (set when it was produced) to the
//! commit of the poll that processed it, after its output was acknowledged in the sink:
//! produced → processed → acknowledged, at saturation (so it includes queueing behind
//! earlier records), as the pipeline's own metrics record it.
//!
//! With `--backlog` the N input records are produced before the pipeline starts, and
//! records/s is how fast it drains them: the pipeline's own capacity, without the bench's
//! producer writing the input into the same broker meanwhile. Its latencies then include
//! the time a record waited in the backlog.
//!
//! Unless `--no-warmup`, the records are first produced once, unmeasured, into a topic of
//! their own: the first measurement then is not the only one made on an empty store by a
//! process that has not written yet. (On this project's virtual machines a process first
//! writes into memory the previous one freed, which costs less than memory the host has
//! to map again; without the warm-up the first measurement, always plain produce in run 1,
//! came out 2 to 2.5 times faster than the same measurement later in the run. The warm-up
//! narrows that gap without always closing it: `--repeat` and its medians still matter.)
//!
//! On an embedded broker the pipelines reach it in process, as deployed instances do inside
//! a broker (`--over-quic`: as a `pipeline run` client does); the input and the plain
//! produce always go over QUIC.

use std::time::{Duration, Instant};

use anyhow::Context;
use quiver_client::Client;
use quiver_pipeline::{Deployment, PipelineConfig, SinkCompression};
use serde::Serialize;

use super::produce::{ensure_topic, produce_into};
use super::report::{histogram, process_cpu_seconds, Report};
use super::{LoadOpts, OutputFormat};

/// The three figures and their ratios (JSON field names are a contract for scripts).
/// With `--repeat N` the ratios are the medians of the N runs, the three reports are those
/// of the run whose `no_stage_vs_produce` is nearest that median, and `runs` has every
/// run's figures.
#[derive(Debug, Serialize)]
pub struct PipelineBench {
    /// Plain produce of the same records.
    pub produce: Report,
    /// The pipeline without stages.
    pub no_stage: Report,
    /// The pipeline with the `--stage` chain.
    pub stages: Report,
    /// The `--stage` chain, as given.
    pub stage_chain: Vec<String>,
    /// `stages.records_per_sec / no_stage.records_per_sec` (the median over `runs`).
    pub stages_vs_no_stage: f64,
    /// `no_stage.records_per_sec / produce.records_per_sec` (the median over `runs`).
    pub no_stage_vs_produce: f64,
    /// True when the pipelines drained input produced before they started (`--backlog`).
    pub backlog: bool,
    /// True when the records were produced once, unmeasured, before the first
    /// measurement (unless `--no-warmup`).
    pub warmup: bool,
    /// How the pipelines reached the broker: `in-process` (as `pipeline deploy` runs them
    /// inside an embedded broker) or `quic` (as `pipeline run` does, or `--over-quic`).
    pub pipeline_transport: &'static str,
    /// The pipelines' `[sink] compression`: none, lz4 or zstd.
    pub sink_compression: &'static str,
    /// Every run's figures, in the order they ran (one unless `--repeat`).
    pub runs: Vec<RunFigures>,
}

/// One run's three throughputs (records/s) and their ratios.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    /// Plain produce.
    pub produce_records_per_sec: f64,
    /// The pipeline without stages.
    pub no_stage_records_per_sec: f64,
    /// The pipeline with the chain.
    pub stages_records_per_sec: f64,
    /// `stages_records_per_sec / no_stage_records_per_sec`.
    pub stages_vs_no_stage: f64,
    /// `no_stage_records_per_sec / produce_records_per_sec`.
    pub no_stage_vs_produce: f64,
    /// Process CPU per record (µs) of plain produce (see `Report::cpu_us_per_record`).
    pub produce_cpu_us_per_record: Option<f64>,
    /// Process CPU per record (µs) of the pipeline without stages (live: with producing
    /// its input; `--backlog`: the pipeline alone).
    pub no_stage_cpu_us_per_record: Option<f64>,
    /// Process CPU per record (µs) of the pipeline with the chain (as above).
    pub stages_cpu_us_per_record: Option<f64>,
}

impl RunFigures {
    fn of(produce: &Report, no_stage: &Report, stages: &Report) -> RunFigures {
        RunFigures {
            produce_records_per_sec: produce.records_per_sec,
            no_stage_records_per_sec: no_stage.records_per_sec,
            stages_records_per_sec: stages.records_per_sec,
            stages_vs_no_stage: stages.records_per_sec / no_stage.records_per_sec.max(1e-9),
            no_stage_vs_produce: no_stage.records_per_sec / produce.records_per_sec.max(1e-9),
            produce_cpu_us_per_record: produce.cpu_us_per_record,
            no_stage_cpu_us_per_record: no_stage.cpu_us_per_record,
            stages_cpu_us_per_record: stages.cpu_us_per_record,
        }
    }
}

/// The three measurements of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measured {
    Produce,
    NoStage,
    Chain,
}

impl Measured {
    /// The measurement at `step` (0, 1, 2) of run `run` (from 1): run 1 measures plain
    /// produce, no stage, the chain; each later run starts one further along. Within a
    /// run the broker's store grows with every measurement, and on a virtual machine a
    /// write into file pages the guest never used before can cost several times one into
    /// pages it reuses; a fixed order would make the same measurement always pay most.
    fn in_turn(run: u32, step: u32) -> Measured {
        const ORDER: [Measured; 3] = [Measured::Produce, Measured::NoStage, Measured::Chain];
        ORDER[((run.saturating_sub(1) + step) % 3) as usize]
    }
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// How the pipelines of a bench run.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Drain input produced before the pipeline starts.
    pub backlog: bool,
    /// Measure the three this many times.
    pub repeat: u32,
    /// Produce the records once, unmeasured, before the first measurement.
    pub warmup: bool,
    /// The pipelines reach the (embedded) broker in process, as deployed ones do.
    pub in_process: bool,
    /// `[sink] compression` of both pipelines.
    pub sink_compression: SinkCompression,
    /// Keep what each measurement made (else it is deleted once measured).
    pub keep_topics: bool,
}

/// Runs the three measurements `repeat` times, each time on fresh topics: the input is
/// produced through `client` (over QUIC), and the pipelines run on `pipelines`.
pub async fn run(
    client: &Client,
    pipelines: &Client,
    o: &LoadOpts,
    chain: &[String],
    how: Setup,
) -> anyhow::Result<PipelineBench> {
    let Setup {
        backlog,
        repeat,
        warmup,
        in_process,
        sink_compression,
        keep_topics,
    } = how;
    let clean = |topics: Vec<String>, group: Option<String>| async move {
        if !keep_topics {
            clean_up(client, &topics, group.as_deref()).await;
        }
    };
    let records = match o.limit() {
        super::Limit::Records(n) => n,
        super::Limit::Time(_) => anyhow::bail!("bench pipeline takes --records, not --duration"),
    };
    let base = o.topic_name();
    let mut quiet = o.clone();
    quiet.records = records;
    if warmup {
        // Whatever is measured first would otherwise be the only measurement made on an
        // empty store, in a process that has not written yet.
        eprintln!("warm-up: produce of {records} records, not measured …");
        let topic = format!("{base}-warmup");
        produce_into(client, &quiet, &topic, false).await?;
        clean(vec![topic], None).await;
    }
    let mut trios = Vec::new();
    for i in 1..=repeat {
        let base = if repeat == 1 {
            base.clone()
        } else {
            eprintln!("run {i} of {repeat}:");
            format!("{base}-r{i}")
        };
        // Each run starts one measurement later than the last: a store that only grows
        // can make later writes cost more (see `Measured`), so a fixed order would favour
        // whichever always runs first.
        let mut produce = None;
        let (mut no_stage, mut stages) = (None, None);
        for step in 0..3 {
            match Measured::in_turn(i, step) {
                Measured::Produce => {
                    eprintln!("plain produce of {records} records …");
                    let cpu_before = process_cpu_seconds();
                    let topic = format!("{base}-produce");
                    let report = produce_into(client, &quiet, &topic, false)
                        .await?
                        .measuring("produce: send to acknowledgement");
                    produce = Some(report.with_cpu(cpu_spent(cpu_before)));
                    clean(vec![topic], None).await;
                }
                Measured::NoStage => {
                    eprintln!("pipeline without stages …");
                    let name = format!("{base}-none");
                    no_stage = Some(one(client, pipelines, &quiet, &name, &[], &how).await?);
                    clean(made_by(&name, false), Some(name)).await;
                }
                Measured::Chain => {
                    eprintln!("pipeline with {} …", chain.join(" → "));
                    let name = format!("{base}-stages");
                    stages = Some(one(client, pipelines, &quiet, &name, chain, &how).await?);
                    clean(made_by(&name, true), Some(name)).await;
                }
            }
        }
        let (Some(produce), Some(no_stage), Some(stages)) = (produce, no_stage, stages) else {
            anyhow::bail!("a bench run ended without its three measurements");
        };
        trios.push((produce, no_stage, stages));
    }
    let runs: Vec<RunFigures> = trios
        .iter()
        .map(|(p, n, s)| RunFigures::of(p, n, s))
        .collect();
    let no_stage_vs_produce = median(runs.iter().map(|r| r.no_stage_vs_produce).collect());
    let stages_vs_no_stage = median(runs.iter().map(|r| r.stages_vs_no_stage).collect());
    let nearest = runs
        .iter()
        .enumerate()
        .min_by(|(_, a), (_, b)| {
            let d = |r: &RunFigures| (r.no_stage_vs_produce - no_stage_vs_produce).abs();
            d(a).total_cmp(&d(b))
        })
        .map_or(0, |(i, _)| i);
    let (produce, no_stage, stages) = trios.swap_remove(nearest);
    Ok(PipelineBench {
        stages_vs_no_stage,
        no_stage_vs_produce,
        produce,
        no_stage,
        stages,
        stage_chain: chain.to_vec(),
        backlog,
        warmup,
        pipeline_transport: if in_process { "in-process" } else { "quic" },
        sink_compression: sink_compression.name(),
        runs,
    })
}

/// The topics one pipeline measurement named `name` made: its input and output, and its
/// state changelog when it has stages.
fn made_by(name: &str, stages: bool) -> Vec<String> {
    let mut topics = vec![format!("{name}-in"), format!("{name}-out")];
    if stages {
        topics.push(quiver_pipeline::changelog::changelog_topic(name));
    }
    topics
}

/// Deletes a measurement's topics and its pipeline's group. Best effort: what cannot be
/// deleted is named, and the bench goes on; on a broker that does not delete topics it
/// says so once.
async fn clean_up(client: &Client, topics: &[String], group: Option<&str>) {
    static DELETION_DISABLED: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    let admin = quiver_client::Admin::new(client.clone());
    for t in topics {
        if DELETION_DISABLED.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        match admin.delete_topic(t).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(quiver_protocol::ErrorCode::TopicDeletionDisabled) => {
                DELETION_DISABLED.store(true, std::sync::atomic::Ordering::Relaxed);
                eprintln!("the broker does not delete topics: the bench's topics stay ({e})");
            }
            Err(e) => eprintln!("could not delete the bench topic {t}: {e}"),
        }
    }
    if let Some(g) = group {
        if let Err(e) = admin.delete_group(g).await {
            eprintln!("could not delete the bench group {g}: {e}");
        }
    }
}

/// CPU seconds this process used since `before`.
fn cpu_spent(before: Option<f64>) -> Option<f64> {
    Some(process_cpu_seconds()? - before?)
}

/// The pipeline file for a bench run: `input` → `chain` → `output`.
fn pipeline_file(
    name: &str,
    input: &str,
    output: &str,
    chain: &[String],
    codec: SinkCompression,
) -> String {
    let mut text = format!("name = \"{name}\"\n[source]\ntopics = [\"{input}\"]\n");
    for stage in chain {
        let looks_like_path = stage.contains('/') || std::path::Path::new(stage).exists();
        let key = if looks_like_path { "path" } else { "plugin" };
        text.push_str(&format!("[[stages]]\n{key} = {stage:?}\n"));
    }
    text.push_str(&format!(
        "[sink]\ntopic = \"{output}\"\ncompression = \"{}\"\n",
        codec.name()
    ));
    text
}

/// One pipeline measurement on fresh topics `<base>-in` → `<base>-out`.
async fn one(
    client: &Client,
    pipelines: &Client,
    o: &LoadOpts,
    base: &str,
    chain: &[String],
    how: &Setup,
) -> anyhow::Result<Report> {
    let backlog = how.backlog;
    let (input, output) = (format!("{base}-in"), format!("{base}-out"));
    ensure_topic(client, &input, o.partitions, o.replication_factor).await?;
    ensure_topic(client, &output, o.partitions, o.replication_factor).await?;
    if backlog {
        produce_into(client, o, &input, false).await?;
    }
    let text = pipeline_file(base, &input, &output, chain, how.sink_compression);
    let config = PipelineConfig::parse(&text, "bench pipeline")?;
    let cwd = std::env::current_dir().context("current directory")?;
    let deployment = Deployment::start(pipelines.clone(), config, &cwd, 1, 0)
        .await
        .with_context(|| format!("cannot start the pipeline {}", chain.join(" → ")))?;
    // Measure from a settled group: the first assignment is not part of the figure.
    let settle = Instant::now() + Duration::from_secs(30);
    while Instant::now() < settle
        && deployment
            .status()
            .await
            .instances
            .iter()
            .all(|i| i.partitions.is_empty())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    let cpu_before = process_cpu_seconds();
    let records = o.records;
    // Records already processed while the group settled (backlog only) are not timed.
    let before = deployment.metrics().records_in;
    if !backlog {
        produce_into(client, o, &input, false).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let m = deployment.metrics();
        if m.records_in >= records {
            break;
        }
        if let Some(reason) = deployment.state().strip_prefix("failed: ") {
            anyhow::bail!("the bench pipeline failed: {reason}");
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the pipeline processed {} of {records} records in 600 s",
                m.records_in
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_spent(cpu_before);
    let m = deployment.metrics();
    deployment.stop().await;
    if before.saturating_mul(2) > records {
        anyhow::bail!(
            "the pipeline drained {before} of the {records} backlog records while its group settled, before the clock started; measure with more --records"
        );
    }
    let kind = if chain.is_empty() {
        "pipeline (no stage)".to_string()
    } else {
        format!("pipeline ({})", chain.join(" → "))
    };
    let kind = if backlog {
        format!("{kind}, draining a backlog")
    } else {
        kind
    };
    let mut report = Report::new(
        &kind,
        records.saturating_sub(before),
        o.record_size,
        o.partitions,
        seconds,
        &histogram(),
    );
    report.p50_ms = m.latency_p50_ms;
    report.p99_ms = m.latency_p99_ms;
    report.p999_ms = m.latency_p999_ms;
    report.latency_samples = m.latency_samples;
    Ok(report.with_cpu(cpu).measuring(if backlog {
        "input record's timestamp → its output acknowledged and its offset committed (ms resolution; includes the wait in the backlog)"
    } else {
        "input record's timestamp → its output acknowledged and its offset committed (ms resolution)"
    }))
}

impl PipelineBench {
    /// Prints the three reports and the ratios.
    pub fn print(&self, format: OutputFormat) {
        match format {
            OutputFormat::Json => {
                println!("{}", serde_json::to_string(self).unwrap_or_default())
            }
            OutputFormat::Text => {
                if self.runs.len() > 1 {
                    for (i, r) in self.runs.iter().enumerate() {
                        println!(
                            "run {}: produce {:.0} rec/s, no stage {:.0} rec/s, with the chain {:.0} rec/s; chain = {:.0}% of no stage, no stage = {:.0}% of produce",
                            i + 1,
                            r.produce_records_per_sec,
                            r.no_stage_records_per_sec,
                            r.stages_records_per_sec,
                            r.stages_vs_no_stage * 100.0,
                            r.no_stage_vs_produce * 100.0,
                        );
                    }
                    println!("the run nearest the median:");
                }
                println!("{}", self.produce.line());
                println!("{}", self.no_stage.line());
                println!("{}", self.stages.line());
                println!(
                    "{}ratios: {} = {:.0}% of the no-stage pipeline; no-stage pipeline = {:.0}% of plain produce{}",
                    if self.runs.len() > 1 { "median " } else { "" },
                    self.stage_chain.join(" → "),
                    self.stages_vs_no_stage * 100.0,
                    self.no_stage_vs_produce * 100.0,
                    if self.backlog {
                        " (pipelines draining a backlog)"
                    } else {
                        ""
                    }
                );
                println!(
                    "the pipelines reached the broker {}",
                    if self.pipeline_transport == "quic" {
                        "over QUIC, as `quiver pipeline run` does"
                    } else {
                        "in process, as `quiver pipeline deploy` runs them inside it"
                    }
                );
                if self.sink_compression != "none" {
                    println!(
                        "the pipelines' sinks were compressed with {}",
                        self.sink_compression
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{median, Measured};

    #[test]
    fn each_run_starts_one_measurement_later() {
        let order = |run| {
            (0..3)
                .map(|step| Measured::in_turn(run, step))
                .collect::<Vec<_>>()
        };
        use Measured::*;
        assert_eq!(order(1), [Produce, NoStage, Chain]);
        assert_eq!(order(2), [NoStage, Chain, Produce]);
        assert_eq!(order(3), [Chain, Produce, NoStage]);
        assert_eq!(order(4), order(1));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![0.3, 0.9, 0.5]), 0.5);
        assert_eq!(median(vec![0.9, 0.3, 0.5, 0.7]), 0.6);
        assert_eq!(median(vec![0.4]), 0.4);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
