//! Criterion bench of the record-batch codec: build, validate (CRC) and decode a batch of
//! 1000 records of 100 bytes, uncompressed and with lz4 and zstd.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quiver_protocol::batch::{validate, BatchBuilder, Compression, RecordIter};

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
}

criterion_group!(benches, codec);
criterion_main!(benches);
