//! `bench baseline`: in one run and on one data directory, measures the raw limits under
//! Quiver — one QUIC stream over loopback (same TLS and transport settings as the broker),
//! and sled appends of the same batches the producer sends (with a flush per batch, as
//! `flush = "batch"` acknowledges, and without) — then runs Quiver's produce and consume on
//! an embedded broker and prints each as a ratio of its limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use quiver_core::config::BrokerConfig;
use quiver_protocol::batch::BatchBuilder;
use serde::Serialize;

use super::consume::consume_from;
use super::embedded::EmbeddedBroker;
use super::produce::produce_into;
use super::report::Report;
use super::{LoadOpts, OutputFormat};

/// How long each raw measurement runs at most.
const RAW_TIME: Duration = Duration::from_secs(5);

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
}

/// The batch the producer would build for `o`.
fn sample_batch(o: &LoadOpts) -> (Bytes, usize) {
    let value: Vec<u8> = (0..o.record_size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut b = BatchBuilder::with_capacity(o.compression, o.batch_size + 1024);
    let mut n = 0;
    while b.size_bytes() + o.record_size + 16 <= o.batch_size || n == 0 {
        b.push(None, &value, 1_700_000_000_000, &[]);
        n += 1;
    }
    (b.build(), n)
}

/// Raw sled: insert the batch under increasing keys; `flush` after each when asked.
fn sled_appends(dir: &std::path::Path, batch: &Bytes, flush: bool) -> anyhow::Result<(f64, u64)> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(512 * 1024 * 1024)
        .mode(sled::Mode::HighThroughput)
        .open()
        .with_context(|| format!("opening {}", dir.display()))?;
    let tree = db.open_tree("baseline")?;
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < RAW_TIME && n < 100_000 {
        tree.insert(n.to_be_bytes(), batch.as_ref())?;
        if flush {
            db.flush()?;
        }
        n += 1;
    }
    db.flush()?;
    let secs = start.elapsed().as_secs_f64();
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Ok((secs, n))
}

/// Raw QUIC: the server writes `chunk` repeatedly on one stream; the client reads it all.
async fn quic_stream(dir: &std::path::Path, chunk: Bytes) -> anyhow::Result<f64> {
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
    let total_bytes: u64 = 4 * 1024 * 1024 * 1024;
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut go = [0u8; 1];
        recv.read_exact(&mut go).await?;
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total_bytes && start.elapsed() < RAW_TIME {
            if send.write_chunk(chunk.clone()).await.is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        let _ = send.finish();
        let _ = send.stopped().await;
        Ok::<_, anyhow::Error>(())
    });
    let client_ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
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
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[1]).await?;
    let start = Instant::now();
    let mut got = 0u64;
    while let Some(c) = recv.read_chunk(usize::MAX, true).await? {
        got += c.bytes.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = srv.await;
    conn.close(0u32.into(), b"done");
    Ok(got as f64 / 1e6 / secs)
}

/// Runs the baseline and prints it.
pub async fn run(o: &LoadOpts) -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(o.data_dir.clone()).await?;
    let (batch, per_batch) = sample_batch(o);
    eprintln!("measuring one QUIC stream over loopback ...");
    let quic = quic_stream(&broker.data_dir.join("baseline-quic"), batch.clone()).await?;
    eprintln!(
        "measuring sled appends of {} B batches ({per_batch} records each) ...",
        batch.len()
    );
    let dir = broker.data_dir.join("baseline-sled");
    let b2 = batch.clone();
    let (fsecs, fn_) = tokio::task::spawn_blocking(move || sled_appends(&dir, &b2, true)).await??;
    let dir = broker.data_dir.join("baseline-sled-noflush");
    let b3 = batch.clone();
    let (nsecs, nn) = tokio::task::spawn_blocking(move || sled_appends(&dir, &b3, false)).await??;
    let mb = |n: u64, s: f64| n as f64 * batch.len() as f64 / 1e6 / s;
    let rps = |n: u64, s: f64| (n * per_batch as u64) as f64 / s;
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
    let wire_per_record = batch.len() as f64 / per_batch as f64;
    let consume_wire_mb = consume.records_per_sec * wire_per_record / 1e6;
    let b = Baseline {
        quic_stream_mb_per_sec: quic,
        sled_append_flush_mb_per_sec: mb(fn_, fsecs),
        sled_append_flush_records_per_sec: rps(fn_, fsecs),
        sled_append_mb_per_sec: mb(nn, nsecs),
        sled_append_records_per_sec: rps(nn, nsecs),
        batch_bytes: batch.len(),
        records_per_batch: per_batch,
        produce_vs_sled: produce.records_per_sec / rps(fn_, fsecs),
        consume_vs_quic: consume_wire_mb / quic,
        produce,
        consume,
    };
    match o.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&b)?),
        OutputFormat::Text => {
            println!(
                "raw QUIC stream (1 stream, loopback, TLS):      {:>10.1} MB/s",
                b.quic_stream_mb_per_sec
            );
            println!(
                "raw sled append + flush per {} B batch:      {:>10.1} MB/s = {:.0} records/s",
                b.batch_bytes, b.sled_append_flush_mb_per_sec, b.sled_append_flush_records_per_sec
            );
            println!(
                "raw sled append, no flush:                      {:>10.1} MB/s = {:.0} records/s",
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
                "consume = {:.0}% of the raw QUIC stream limit ({consume_wire_mb:.1} MB/s on the wire)",
                b.consume_vs_quic * 100.0
            );
        }
    }
    Ok(())
}
