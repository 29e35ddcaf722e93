//! Batches with a numbered header: what a builder writes reads back with exactly the
//! headers it was given, is smaller, passes the produce check; lying ones are refused.

use bytes::Bytes;
use proptest::prelude::*;

use super::numbered::put_preamble;
use super::produce_tests::{forge, limits, refused, RawRec, NOW};
use super::*;
use crate::varint::put_varint;

const SOURCE: &str = "quiver.source";

type Headers = Vec<(String, Vec<u8>)>;

fn build(c: Compression, numbered: bool, records: &[Headers]) -> Bytes {
    let mut b = BatchBuilder::new(c);
    b.set_numbered_header(numbered.then_some(SOURCE));
    for (i, hs) in records.iter().enumerate() {
        let hs: Vec<(&str, &[u8])> = hs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        b.push(None, format!("value {i}").as_bytes(), NOW + i as i64, &hs);
    }
    b.build()
}

fn headers_read(batch: &Bytes) -> Vec<Headers> {
    RecordIter::new(batch, 1 << 20)
        .unwrap()
        .map(|r| {
            r.unwrap()
                .headers
                .into_iter()
                .map(|h| (h.key, h.value.to_vec()))
                .collect()
        })
        .collect()
}

fn source(value: &str) -> (String, Vec<u8>) {
    (SOURCE.to_string(), value.as_bytes().to_vec())
}

#[test]
fn every_record_reads_back_with_its_headers_and_the_batch_is_smaller() {
    let records: Vec<Headers> = vec![
        vec![source("lines/3/1000")],
        vec![("trace".into(), b"t1".to_vec()), source("lines/3/1001")],
        vec![source("lines/3/999")],   // below the base
        vec![source("lines/4/1002")],  // another prefix: written whole
        vec![source("lines/3/01003")], // a leading zero: written whole
        vec![source("lines/3/1004"), ("trace".into(), b"t2".to_vec())], // not last
        vec![],                        // no header at all
        vec![source("lines/3/")],      // no number
        vec![source("lines/3/9223372036854775807")], // the largest number
        vec![("other".into(), b"lines/3/1005".to_vec())], // another key
    ];
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let plain = build(c, false, &records);
        let numbered = build(c, true, &records);
        assert!(!check_crc(&plain).unwrap().has_numbered_header());
        assert!(check_crc(&numbered).unwrap().has_numbered_header(), "{c:?}");
        assert_eq!(headers_read(&plain), records, "{c:?}");
        assert_eq!(headers_read(&numbered), records, "{c:?}");
        validate_produce(&numbered, &limits()).unwrap();
        if c == Compression::None {
            assert!(
                numbered.len() + 3 * 20 < plain.len(),
                "{} bytes numbered, {} plain",
                numbered.len(),
                plain.len()
            );
        }
    }
}

#[test]
fn a_batch_whose_first_record_lacks_the_header_is_written_plainly() {
    let records: Vec<Headers> = vec![vec![], vec![source("in/0/5")], vec![source("in/0/6")]];
    let batch = build(Compression::None, true, &records);
    assert!(!check_crc(&batch).unwrap().has_numbered_header());
    assert_eq!(headers_read(&batch), records);
    // The next batch of the same builder starts its own numbered header.
    let mut b = BatchBuilder::new(Compression::None);
    b.set_numbered_header(Some(SOURCE));
    b.push(None, b"a", NOW, &[(SOURCE, b"in/0/5")]);
    let first = b.build();
    b.push(None, b"b", NOW, &[(SOURCE, b"in/1/70")]);
    b.push(None, b"c", NOW, &[(SOURCE, b"in/1/71")]);
    let second = b.build();
    assert_eq!(headers_read(&first), vec![vec![source("in/0/5")]]);
    assert_eq!(
        headers_read(&second),
        vec![vec![source("in/1/70")], vec![source("in/1/71")]]
    );
    validate_produce(&second, &limits()).unwrap();
}

/// A records section: the preamble `key`/`prefix`/`base`, then each record flagged as
/// carrying the numbered header with the given delta.
fn numbered_section(prefix: &[u8], base: i64, deltas: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    put_preamble(&mut out, SOURCE, prefix, base);
    for (i, d) in deltas.iter().enumerate() {
        let mut tail = Vec::new();
        put_varint(&mut tail, *d);
        let mut r = RawRec::new(i as i64, 0, b"v");
        r.attributes = RECORD_ATTR_NUMBERED;
        r.tail = &tail;
        r.encode(&mut out);
    }
    out
}

#[test]
fn a_lying_numbered_batch_is_refused_and_reads_as_an_error() {
    let n = |deltas: &[i64], base: i64| {
        let body = numbered_section(b"in/0/", base, deltas);
        forge(
            Compression::None,
            deltas.len() as i32,
            NOW,
            NOW,
            ATTR_NUMBERED_HEADER,
            &body,
        )
    };
    validate_produce(&n(&[0, 1, -2], 2), &limits()).unwrap();
    refused(&n(&[0, -3], 2), &limits(), "is not a number from 0");
    refused(&n(&[i64::MAX], 1), &limits(), "is not a number from 0");
    // A record flagged in a batch without a numbered header.
    let mut body = Vec::new();
    let mut r = RawRec::new(0, 0, b"v");
    r.attributes = RECORD_ATTR_NUMBERED;
    r.tail = &[0];
    r.encode(&mut body);
    let flagged = forge(Compression::None, 1, NOW, NOW, 0, &body);
    refused(&flagged, &limits(), "the batch has none");
    // A flagged record whose delta is missing.
    let mut body = Vec::new();
    put_preamble(&mut body, SOURCE, b"p", 0);
    let mut r = RawRec::new(0, 0, b"v");
    r.attributes = RECORD_ATTR_NUMBERED;
    r.encode(&mut body);
    let missing = forge(Compression::None, 1, NOW, NOW, ATTR_NUMBERED_HEADER, &body);
    refused(&missing, &limits(), "numbered header");
    for batch in [n(&[0, -3], 2), flagged, missing] {
        let read: Result<Vec<_>, _> =
            RecordIter::new(&Bytes::from(batch), 1 << 20).and_then(|records| records.collect());
        assert!(read.is_err());
    }
}

/// Many tiny records naming a long prefix would decode to far more than the batch's bytes;
/// the decoded size counts against the same limit as decompressed bytes.
#[test]
fn a_batch_whose_headers_would_decode_past_the_limit_is_refused() {
    let prefix = [b'p'; 512];
    let deltas = vec![0; 4000];
    let body = numbered_section(&prefix, 0, &deltas);
    let batch = forge(
        Compression::None,
        4000,
        NOW,
        NOW,
        ATTR_NUMBERED_HEADER,
        &body,
    );
    assert!(batch.len() < 64 << 10, "{} bytes", batch.len());
    let e = validate_produce(&batch, &limits()).unwrap_err();
    assert!(
        matches!(e, ProtocolError::TooLarge { .. }),
        "{e:?} for {} bytes decoding to about 2 MB",
        batch.len()
    );
    let e = RecordIter::new(&Bytes::from(batch.clone()), 1 << 20).unwrap_err();
    assert!(matches!(e, ProtocolError::TooLarge { .. }), "{e:?}");
    // Under a limit that holds it, every record reads back with the whole value.
    let records: Vec<Record> = RecordIter::new(&Bytes::from(batch), 4 << 20)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(records.len(), 4000);
    assert_eq!(records[3999].headers[0].value.len(), 513);
}

fn arb_source() -> impl Strategy<Value = Option<(String, Vec<u8>)>> {
    proptest::option::of(
        (
            prop_oneof![Just("a/0/"), Just("a/1/"), Just(""), Just("b-")],
            prop_oneof![
                (0u64..40).prop_map(|n| n.to_string()),
                Just("007".to_string()),
                Just(String::new()),
                any::<u64>().prop_map(|n| n.to_string()),
            ],
            prop_oneof![Just(SOURCE), Just("other")],
        )
            .prop_map(|(p, n, k)| (k.to_string(), format!("{p}{n}").into_bytes())),
    )
}

proptest! {
    /// Whatever headers records carry, a numbered batch reads back exactly as a plain
    /// one, with every codec, and passes the produce check.
    #[test]
    fn numbered_batches_read_back_as_plain_ones(
        records in proptest::collection::vec(
            (
                proptest::collection::vec(("[a-z.]{0,4}", proptest::collection::vec(any::<u8>(), 0..6)), 0..2),
                arb_source(),
            ),
            1..40,
        ),
        codec in 0usize..3,
    ) {
        let records: Vec<Headers> = records
            .into_iter()
            .map(|(mut hs, s)| {
                hs.extend(s);
                hs
            })
            .collect();
        let c = [Compression::None, Compression::Lz4, Compression::Zstd][codec];
        let batch = build(c, true, &records);
        validate_produce(&batch, &limits()).unwrap();
        prop_assert_eq!(headers_read(&batch), records);
    }
}
