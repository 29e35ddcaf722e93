//! `bench baseline`: in one run, Quiver's produce and consume on an embedded broker, then the
//! raw limits under them measured with the **same volume and the same concurrency**:
//!
//! - sled: the number of records the produce run stored, as full batches of the producer's
//!   batch size, written by one thread per partition into a `Db` opened like the broker's,
//!   in the broker's own layout (`log::keyspace`: one partition slice each, large batches in
//!   slots), with a flush after every batch (what `flush = "batch"` waits for; sled's own
//!   flush, without the `fdatasync` the broker adds to it, so the limit is an upper bound)
//!   and, separately, with one flush at the end. sled slows as its log grows, so a raw run
//!   shorter than the produce run would flatter the ratio. The layout is what the broker
//!   stores with, so the ratio is the broker's cost over its storage: plain inserts of whole
//!   batches under their keys are written about three times by sled, and the broker beat
//!   that "limit".
//! - QUIC: the bytes the consume run moved (record batches as they travel), over one
//!   loopback connection with the broker's TLS and transport settings, one stream per
//!   partition (the consumer keeps a fetch in flight per partition).
//!
//! Each Quiver figure is then printed as a ratio of its limit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use quiver_core::config::BrokerConfig;
use quiver_protocol::batch::BatchBuilder;
use serde::Serialize;

use super::consume::consume_from;
use super::embedded::EmbeddedBroker;
use super::payload::Payloads;
use super::produce::produce_into;
use super::report::Report;
use super::{LoadOpts, OutputFormat};

/// What `bench baseline` prints (JSON field names are a contract for scripts).
#[derive(Debug, Serialize)]
struct Baseline {
    quic_stream_mb_per_sec: f64,
    sled_append_flush_mb_per_sec: f64,
    sled_append_flush_records_per_sec: f64,
    sled_append_mb_per_sec: f64,
    sled_append_records_per_sec: f64,
    batch_bytes: usize,
    records_per_batch: usize,
    produce: Report,
    consume: Report,
    /// Quiver produce records/s ÷ sled append+flush records/s.
    produce_vs_sled: f64,
    /// Quiver consume wire MB/s ÷ raw QUIC stream MB/s.
    consume_vs_quic: f64,
    /// Records written by the raw sled runs (= records the produce run stored).
    sled_records: u64,
    /// Bytes written by each raw sled run.
    sled_bytes: u64,
    /// Batches written by each raw sled run.
    sled_batches: u64,
    /// Concurrent sled writers (= the topic's partitions).
    sled_writers: u32,
    /// Bytes moved by the raw QUIC run (= the consume run's batches on the wire).
    quic_bytes: u64,
    /// Concurrent QUIC streams (= the topic's partitions).
    quic_streams: u32,
}

/// A batch as the producer builds it for `o` with `records` records (the full batch when
/// `records` is `None`), and how many records it holds.
fn sample_batch(o: &LoadOpts, records: Option<usize>) -> (Bytes, usize) {
    let values = Payloads::new(o.payload, o.record_size);
    let mut b = BatchBuilder::with_capacity(o.compression, o.batch_size + 1024);
    let mut n = 0;
    loop {
        let full = b.size_bytes() + o.record_size + 16 > o.batch_size && n > 0;
        if records.map_or(full, |want| n >= want) {
            break;
        }
        b.push(None, values.nth(n as u64), 1_700_000_000_000, &[]);
        n += 1;
    }
    (b.build(), n)
}

/// One raw sled run: `writers` threads, writer `w` appending `per_writer[w]` records as
/// full batches (`full`, holding `per_batch` records) plus one `tail`-style last batch, each
/// into a partition slice of its own; `flush` after every batch when asked, and once at the
/// end always.
struct SledRun<'a> {
    dir: &'a Path,
    full: &'a Bytes,
    per_batch: usize,
    o: &'a LoadOpts,
    per_writer: Vec<u64>,
    flush: bool,
}

/// What a raw sled run did: seconds, batches, bytes.
fn sled_appends(run: SledRun<'_>) -> anyhow::Result<(f64, u64, u64)> {
    let db = quiver_core::log::store::open(run.dir)
        .with_context(|| format!("opening {}", run.dir.display()))?;
    // Each writer's work: its tree and its batches (the last one may hold fewer records).
    let mut plans = Vec::new();
    let tree = db.open_tree(quiver_core::log::keyspace::BATCHES_TREE)?;
    for (w, &records) in run.per_writer.iter().enumerate() {
        let tree = quiver_core::log::keyspace::PartitionKeys::new(tree.clone(), w as u64, 0);
        let full_batches = records / run.per_batch as u64;
        let rest = (records % run.per_batch as u64) as usize;
        let tail = (rest > 0).then(|| sample_batch(run.o, Some(rest)).0);
        plans.push((tree, full_batches, tail));
    }
    let start = Instant::now();
    let (batches, bytes) = std::thread::scope(|s| {
        let handles: Vec<_> = plans
            .into_iter()
            .map(|(tree, full_batches, tail)| {
                let db = &db;
                let full = run.full;
                let flush = run.flush;
                s.spawn(move || -> anyhow::Result<(u64, u64)> {
                    let (mut key, mut batches, mut bytes) = (0u64, 0u64, 0u64);
                    let all = (0..full_batches)
                        .map(|_| full)
                        .chain(tail.as_ref())
                        .collect::<Vec<&Bytes>>();
                    for batch in all {
                        tree.insert(&key.to_be_bytes(), batch.as_ref())?;
                        if flush {
                            // sled's own flush, without the fdatasync Quiver's flushes add:
                            // the raw limit stays an upper bound.
                            #[allow(clippy::disallowed_methods)]
                            db.sled().flush()?;
                        }
                        key += 1;
                        batches += 1;
                        bytes += batch.len() as u64;
                    }
                    Ok((batches, bytes))
                })
            })
            .collect();
        let mut total = (0u64, 0u64);
        for h in handles {
            let (b, n) = h
                .join()
                .map_err(|_| anyhow::anyhow!("a sled writer panicked"))??;
            total.0 += b;
            total.1 += n;
        }
        anyhow::Ok(total)
    })?;
    db.flush()?;
    let secs = start.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_dir_all(run.dir);
    Ok((secs, batches, bytes))
}

/// Raw QUIC: `streams` streams on one loopback connection; the server writes `chunk`
/// repeatedly on each until `total_bytes / streams` have gone; the client reads them all.
async fn quic_streams(
    dir: &Path,
    chunk: Bytes,
    total_bytes: u64,
    streams: u32,
) -> anyhow::Result<f64> {
    let cfg = BrokerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        ..BrokerConfig::default()
    };
    let id = quiver_core::tls::load_or_create(&cfg).context("making TLS material")?;
    let ca = id.ca_path.clone().context("no CA")?;
    let crypto = quiver_core::tls::server_crypto(id)?;
    let server = quiver_core::server::endpoint::bind("127.0.0.1:0".parse()?, crypto, &cfg.limits)?;
    let addr = server.local_addr()?;
    let per_stream: Vec<u64> = (0..streams)
        .map(|i| {
            total_bytes / u64::from(streams)
                + u64::from(u64::from(i) < total_bytes % u64::from(streams))
        })
        .collect();
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut writers = Vec::new();
        for share in per_stream {
            let (mut send, mut recv) = conn.accept_bi().await?;
            let chunk = chunk.clone();
            writers.push(tokio::spawn(async move {
                let mut go = [0u8; 1];
                recv.read_exact(&mut go).await?;
                let mut sent = 0u64;
                while sent < share {
                    let n = (share - sent).min(chunk.len() as u64) as usize;
                    send.write_chunk(chunk.slice(..n)).await?;
                    sent += n as u64;
                }
                let _ = send.finish();
                let _ = send.stopped().await;
                anyhow::Ok(())
            }));
        }
        for w in writers {
            w.await??;
        }
        Ok::<_, anyhow::Error>(())
    });
    let client_ep = quiver_client::udp::endpoint("127.0.0.1:0".parse()?, None)?;
    let pem = std::fs::read(&ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![quiver_protocol::ALPN.to_vec()];
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    client_cfg.transport_config(Arc::new(t));
    let conn = client_ep
        .connect_with(client_cfg, addr, "127.0.0.1")?
        .await?;
    let mut opened = Vec::new();
    for _ in 0..streams {
        opened.push(conn.open_bi().await?);
    }
    let start = Instant::now();
    let mut readers = Vec::new();
    for (mut send, mut recv) in opened {
        readers.push(tokio::spawn(async move {
            send.write_all(&[1]).await?;
            let mut got = 0u64;
            while let Some(c) = recv.read_chunk(usize::MAX, true).await? {
                got += c.bytes.len() as u64;
            }
            anyhow::Ok(got)
        }));
    }
    let mut got = 0u64;
    for r in readers {
        got += r.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    srv.await??;
    conn.close(0u32.into(), b"done");
    Ok(got as f64 / 1e6 / secs)
}

/// A directory for the raw runs on the same file system as the broker's data.
fn raw_dir(o: &LoadOpts) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match &o.data_dir {
        Some(d) => (d.join("baseline-raw"), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("quiver-baseline-")
                .tempdir_in(std::env::current_dir().unwrap_or_else(|_| std::env::temp_dir()))
                .or_else(|_| tempfile::tempdir())
                .context("creating a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    })
}

/// Runs the baseline and prints it.
pub async fn run(o: &LoadOpts) -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(o.data_dir.clone()).await?;
    let client = quiver_client::Client::connect(quiver_client::ClientConfig {
        ca_file: broker.ca.clone(),
        ..quiver_client::ClientConfig::new(broker.addr.to_string())
    })
    .await
    .context("connecting to the embedded broker")?;
    let topic = o.topic_name();
    eprintln!("quiver produce ...");
    let produce = produce_into(&client, o, &topic, true).await?;
    eprintln!("quiver consume ...");
    let mut co = o.clone();
    co.records = produce.records;
    co.duration = None;
    let consume = consume_from(&client, &co, &topic, true).await?;
    drop(client);
    broker.stop().await;

    let (dir, _tmp) = raw_dir(o)?;
    let (batch, per_batch) = sample_batch(o, None);
    let writers = o.partitions;
    let per_writer: Vec<u64> = (0..writers as u64)
        .map(|w| {
            produce.records / u64::from(writers)
                + u64::from(w < produce.records % u64::from(writers))
        })
        .collect();
    eprintln!(
        "raw sled, same volume and concurrency as the produce run: {} records in {} B batches \
         ({per_batch} records each), {writers} writer thread(s), one per partition ...",
        produce.records,
        batch.len()
    );
    let sled_run = |sub: &str, flush: bool| {
        let (dir, batch, per_writer, o) =
            (dir.join(sub), batch.clone(), per_writer.clone(), o.clone());
        tokio::task::spawn_blocking(move || {
            sled_appends(SledRun {
                dir: &dir,
                full: &batch,
                per_batch,
                o: &o,
                per_writer,
                flush,
            })
        })
    };
    let (fsecs, sled_batches, sled_bytes) = sled_run("sled-flush", true).await??;
    let (nsecs, _, _) = sled_run("sled-noflush", false).await??;
    let wire_per_record = batch.len() as f64 / per_batch as f64;
    let quic_bytes = (consume.records as f64 * wire_per_record) as u64;
    eprintln!(
        "raw QUIC, same volume and concurrency as the consume run: {quic_bytes} B over {writers} stream(s) ..."
    );
    let quic = quic_streams(&dir.join("quic"), batch.clone(), quic_bytes.max(1), writers).await?;

    let rps = |s: f64| produce.records as f64 / s;
    let consume_wire_mb = consume.records_per_sec * wire_per_record / 1e6;
    let b = Baseline {
        quic_stream_mb_per_sec: quic,
        sled_append_flush_mb_per_sec: sled_bytes as f64 / 1e6 / fsecs,
        sled_append_flush_records_per_sec: rps(fsecs),
        sled_append_mb_per_sec: sled_bytes as f64 / 1e6 / nsecs,
        sled_append_records_per_sec: rps(nsecs),
        batch_bytes: batch.len(),
        records_per_batch: per_batch,
        produce_vs_sled: produce.records_per_sec / rps(fsecs),
        consume_vs_quic: consume_wire_mb / quic,
        sled_records: produce.records,
        sled_bytes,
        sled_batches,
        sled_writers: writers,
        quic_bytes,
        quic_streams: writers,
        produce,
        consume,
    };
    match o.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&b)?),
        OutputFormat::Text => {
            println!(
                "raw limits measured in this run with the same volume and concurrency as Quiver's runs below:"
            );
            println!(
                "  raw QUIC, {} stream(s) on 1 loopback TLS connection, {:.1} MB:  {:>10.1} MB/s",
                b.quic_streams,
                b.quic_bytes as f64 / 1e6,
                b.quic_stream_mb_per_sec
            );
            println!(
                "  raw sled, {} records = {:.1} MB in {} batches of {} B, {} writer(s) (one per partition):",
                b.sled_records,
                b.sled_bytes as f64 / 1e6,
                b.sled_batches,
                b.batch_bytes,
                b.sled_writers
            );
            println!(
                "    append + flush per batch:  {:>10.1} MB/s = {:.0} records/s",
                b.sled_append_flush_mb_per_sec, b.sled_append_flush_records_per_sec
            );
            println!(
                "    append, one flush at end:  {:>10.1} MB/s = {:.0} records/s",
                b.sled_append_mb_per_sec, b.sled_append_records_per_sec
            );
            println!("{}", b.produce.line());
            println!("{}", b.consume.line());
            println!(
                "produce = {:.0}% of the sled append+flush limit ({:.0}% of append without flush)",
                b.produce_vs_sled * 100.0,
                b.produce.records_per_sec / b.sled_append_records_per_sec * 100.0
            );
            println!(
                "consume = {:.0}% of the raw QUIC limit ({consume_wire_mb:.1} MB/s on the wire)",
                b.consume_vs_quic * 100.0
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Opts {
        #[command(flatten)]
        o: LoadOpts,
    }

    fn opts(args: &[&str]) -> LoadOpts {
        Opts::parse_from([&["bench"], args].concat()).o
    }

    #[test]
    fn sample_batches_fill_the_batch_size_or_hold_what_is_asked() {
        let o = opts(&["--record-size", "1000", "--batch-size", "10240"]);
        let (full, n) = sample_batch(&o, None);
        assert!(
            n >= 9 && full.len() <= 10240 + 1024,
            "{n} records, {} B",
            full.len()
        );
        let (part, m) = sample_batch(&o, Some(3));
        assert_eq!(m, 3);
        assert!(part.len() < full.len());
    }

    #[test]
    fn raw_sled_writes_exactly_the_records_asked_with_one_writer_per_partition() {
        let o = opts(&["--record-size", "100", "--batch-size", "4096"]);
        let (full, per_batch) = sample_batch(&o, None);
        let dir = tempfile::tempdir().unwrap();
        let per_writer = vec![per_batch as u64 * 2 + 5, per_batch as u64 * 2 + 4, 0];
        let (_, batches, bytes) = sled_appends(SledRun {
            dir: &dir.path().join("s"),
            full: &full,
            per_batch,
            o: &o,
            per_writer,
            flush: true,
        })
        .unwrap();
        // Two full batches and one partial per non-empty writer.
        assert_eq!(batches, 6);
        let (tail5, _) = sample_batch(&o, Some(5));
        let (tail4, _) = sample_batch(&o, Some(4));
        assert_eq!(
            bytes,
            4 * full.len() as u64 + tail5.len() as u64 + tail4.len() as u64
        );
    }
}
