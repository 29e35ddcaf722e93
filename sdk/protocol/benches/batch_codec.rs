//! Criterion bench of the record-batch codec: build, validate (CRC) and decode a batch of
//! 1000 records of 100 bytes, uncompressed and with lz4 and zstd; and the broker's produce
//! check of 1000 records shaped like a pipeline's output (100 bytes and a `quiver.source`
//! header).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quiver_protocol::batch::{
    validate, validate_produce, BatchBuilder, Compression, ProduceLimits, RecordIter,
};

fn build(c: Compression) -> bytes::Bytes {
    let value = [b'x'; 100];
    let mut b = BatchBuilder::with_capacity(c, 128 * 1024);
    for i in 0..1000 {
        b.push(None, &value, 1_700_000_000_000 + i, &[]);
    }
    b.build()
}

fn codec(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("batch_1000x100B");
    g.throughput(Throughput::Elements(1000));
    for (name, c) in [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        g.bench_function(format!("build/{name}"), |b| b.iter(|| build(c)));
        let batch = build(c);
        g.bench_function(format!("validate/{name}"), |b| {
            b.iter(|| validate(&batch, 1 << 24).map(|h| h.record_count))
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| RecordIter::new(&batch, 1 << 24).map(|it| it.filter(|r| r.is_ok()).count()))
        });
    }
    g.finish();

    // A pipeline's output: every record carries `quiver.source`, written whole or as the
    // batch's numbered header.
    let mut g = cr.benchmark_group("produce_check_1000x100B_with_header");
    g.throughput(Throughput::Elements(1000));
    let limits = ProduceLimits {
        max_batch_bytes: 1 << 24,
        max_decompressed_bytes: 1 << 24,
        now_ms: 1_700_000_000_500,
        max_timestamp_skew_ms: i64::MAX,
    };
    for (name, numbered) in [("", None), ("numbered_", Some("quiver.source"))] {
        let batch = with_source_headers(numbered);
        g.bench_function(format!("{name}build"), |b| {
            b.iter(|| with_source_headers(numbered))
        });
        g.bench_function(format!("{name}validate_produce"), |b| {
            b.iter(|| validate_produce(&batch, &limits).map(|h| h.record_count))
        });
        g.bench_function(format!("{name}decode"), |b| {
            b.iter(|| RecordIter::new(&batch, 1 << 24).map(|it| it.filter(|r| r.is_ok()).count()))
        });
    }
    g.finish();
}

/// 1000 records of 100 bytes, each with a `quiver.source` header, written compactly when
/// `numbered` names it.
fn with_source_headers(numbered: Option<&str>) -> bytes::Bytes {
    let value = [b'x'; 100];
    let mut b = BatchBuilder::with_capacity(Compression::None, 160 * 1024);
    b.set_numbered_header(numbered);
    for i in 0..1000 {
        let source = format!("bench-input-topic/0/{}", 1_000_000 + i);
        b.push(
            None,
            &value,
            1_700_000_000_000 + i,
            &[("quiver.source", source.as_bytes())],
        );
    }
    b.build()
}

criterion_group!(benches, codec);
criterion_main!(benches);
