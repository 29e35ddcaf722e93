//! Well-formed but lying input from a raw QUIC client that builds its own frames (not the
//! SDK): batches whose headers disagree with their records, timestamps from the far future,
//! produce envelopes whose partition or batch lengths lie, numbered headers that lie or
//! would decode to far more than was sent, and writes into the broker's internal
//! `__consumer_offsets` topic. Each is refused with a clear error and changes
//! nothing; the broker stays up, consumes with and without a processor work, and after a
//! restart every consumer group is intact. And the other side of the bounds: an honest
//! batch that decodes to more than 64 MiB, on a broker whose frame limit allows it, reads
//! back with the CLI's defaults.

use std::time::Duration;

use quiver_core::group::{GroupRecord, OFFSETS_TOPIC};
use quiver_protocol::batch::{field, recompute_crc, BatchBuilder, Compression};
use quiver_protocol::requests::{Acks, ProduceRequest};
use quiver_protocol::{encode_request, ErrorCode, FRAME_HEADER_LEN};

use super::harness::{example, TestBroker};
use super::hostile_input::connect;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Produces `batch` to `topic`/0 on a new stream; returns the answer's code and message.
pub(super) async fn produce_raw(
    conn: &quinn::Connection,
    topic: &str,
    batch: &[u8],
) -> (ErrorCode, String) {
    produce_raw_to(conn, topic, 0, batch).await
}

/// Produces `batch` (any bytes) to `topic`/`partition` on a new stream; returns the answer's code
/// and message.
async fn produce_raw_to(
    conn: &quinn::Connection,
    topic: &str,
    partition: u32,
    batch: &[u8],
) -> (ErrorCode, String) {
    let req = ProduceRequest {
        topic: topic.into(),
        partition,
        acks: Acks::Leader,
        timeout_ms: 5000,
    };
    let frame = encode_request(&req, batch).encode();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 20))
        .await
        .expect("the broker answered in time")
        .expect("the broker answered the stream");
    assert!(
        answer.len() >= FRAME_HEADER_LEN + 2,
        "short answer {answer:?}"
    );
    let code = ErrorCode::from_u16(u16::from_be_bytes([
        answer[FRAME_HEADER_LEN],
        answer[FRAME_HEADER_LEN + 1],
    ]));
    (code, String::from_utf8_lossy(&answer).into_owned())
}

fn honest(values: &[&str], compression: Compression) -> Vec<u8> {
    let mut b = BatchBuilder::new(compression);
    let ts = now_ms();
    for v in values {
        b.push(None, v.as_bytes(), ts, &[]);
    }
    b.build().to_vec()
}

fn put_i32(batch: &mut [u8], at: usize, v: i32) {
    batch[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_i64(batch: &mut [u8], at: usize, v: i64) {
    batch[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn committed(b: &TestBroker, group: &str) -> Vec<(u32, Option<i64>)> {
    let d: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["group", "describe", group, "--output", "json"]))
            .expect("describe json");
    d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            (
                p["partition"].as_u64().unwrap() as u32,
                p["committed"].as_i64(),
            )
        })
        .collect()
}

#[test]
fn lying_batches_and_internal_topic_writes_are_refused_and_change_nothing() {
    let mut b = TestBroker::start();
    b.cli_ok(&["topic", "create", "victim"]);
    b.cli_stdin_ok(&["produce", "victim"], b"one\ntwo\nthree\n");
    b.cli_ok(&["plugin", "deploy", &example("noop-filter")]);
    b.cli_ok(&[
        "group",
        "reset",
        "keep",
        "--topic",
        "victim",
        "--to-offset",
        "2",
    ]);
    assert_eq!(committed(&b, "keep"), vec![(0, Some(2))]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, conn) = connect(&b, &rt);
    rt.block_on(async {
        // A valid CRC over a header that claims 2^31-1 records when one is present.
        let mut huge = honest(&["real"], Compression::None);
        put_i32(&mut huge, field::RECORD_COUNT, i32::MAX);
        put_i32(&mut huge, field::LAST_OFFSET_DELTA, i32::MAX - 1);
        recompute_crc(&mut huge);
        let (code, msg) = produce_raw(&conn, "victim", &huge).await;
        assert_eq!(code, ErrorCode::InvalidRecord, "{msg}");
        assert!(
            msg.contains("2147483647"),
            "the error names the claim: {msg}"
        );
        // The same lie inside a compressed batch.
        let mut lz = honest(&["a", "b"], Compression::Lz4);
        put_i32(&mut lz, field::RECORD_COUNT, 1000);
        put_i32(&mut lz, field::LAST_OFFSET_DELTA, 999);
        recompute_crc(&mut lz);
        let (code, msg) = produce_raw(&conn, "victim", &lz).await;
        assert_eq!(code, ErrorCode::InvalidRecord, "{msg}");
        // A max timestamp of i64::MAX (it would stop time retention forever).
        let mut forever = honest(&["late"], Compression::None);
        put_i64(&mut forever, field::MAX_TIMESTAMP, i64::MAX);
        recompute_crc(&mut forever);
        let (code, msg) = produce_raw(&conn, "victim", &forever).await;
        assert_eq!(code, ErrorCode::InvalidRecord, "{msg}");
        // An honest batch whose records are dated ten years ahead.
        let mut future = BatchBuilder::new(Compression::None);
        future.push(
            None,
            b"from the future",
            now_ms() + 10 * 365 * 86_400_000,
            &[],
        );
        let (code, msg) = produce_raw(&conn, "victim", &future.build()).await;
        assert_eq!(code, ErrorCode::InvalidRecord, "{msg}");
        assert!(msg.contains("message.timestamp.after.max.ms"), "{msg}");
        // The produce envelope lying: a partition that does not exist, no batch at all, a
        // whole batch followed by stray bytes, a batch length of -1 or one byte longer
        // than what was sent.
        let good = honest(&["fine"], Compression::None);
        let (code, msg) = produce_raw_to(&conn, "victim", 99, &good).await;
        assert_eq!(code, ErrorCode::UnknownTopicOrPartition, "{msg}");
        let mut stray = good.clone();
        stray.extend_from_slice(&[7u8; 30]);
        let mut minus_one = good.clone();
        put_i32(&mut minus_one, field::BATCH_LENGTH, -1);
        let mut longer = good.clone();
        let at = field::BATCH_LENGTH;
        let len = i32::from_be_bytes(longer[at..at + 4].try_into().unwrap());
        put_i32(&mut longer, field::BATCH_LENGTH, len + 1);
        for (what, payload, says) in [
            ("no batch", Vec::new(), "no batch in the request"),
            ("stray bytes", stray, "truncated"),
            ("length -1", minus_one, "shorter than the header"),
            ("length past the end", longer, "truncated"),
        ] {
            let (code, msg) = produce_raw(&conn, "victim", &payload).await;
            assert_eq!(code, ErrorCode::InvalidRequest, "{what}: {msg}");
            assert!(msg.contains(says), "{what}: {msg}");
        }
        // Junk, and a well-formed group record forging an offset, into __consumer_offsets.
        let junk = honest(&["not a group record"], Compression::None);
        let (code, msg) = produce_raw(&conn, OFFSETS_TOPIC, &junk).await;
        assert_eq!(code, ErrorCode::InvalidTopicName, "{msg}");
        assert!(msg.contains("internal topic"), "{msg}");
        let forged = GroupRecord::Offset {
            group: "keep".into(),
            tp: quiver_protocol::requests::TopicPartition::new("victim", 0),
            value: quiver_core::group::records::OffsetValue {
                offset: 0,
                metadata: None,
            },
        };
        let (k, v) = forged.encode();
        let mut fb = BatchBuilder::new(Compression::None);
        fb.push(Some(&k), &v, now_ms(), &[]);
        let (code, msg) = produce_raw(&conn, OFFSETS_TOPIC, &fb.build()).await;
        assert_eq!(code, ErrorCode::InvalidTopicName, "{msg}");
    });
    // Nothing was stored, and the broker serves as before.
    assert_eq!(b.describe("victim")["partitions"][0]["log_end_offset"], 3);
    assert_eq!(
        b.cli_ok(&["consume", "victim", "--from-beginning"]),
        "one\ntwo\nthree\n"
    );
    let filtered = b.cli_ok(&[
        "consume",
        "victim",
        "--from-beginning",
        "--processor",
        "noop-filter",
    ]);
    assert_eq!(filtered, "one\ntwo\nthree\n");
    // Clients cannot alter or delete internal topics either.
    let e = b.cli_err(
        &[
            "topic",
            "alter",
            OFFSETS_TOPIC,
            "--config",
            "retention.ms=1000",
        ],
        None,
    );
    assert!(e.contains("internal topic"), "{e}");
    assert_eq!(committed(&b, "keep"), vec![(0, Some(2))]);
    // A restart replays __consumer_offsets: every group is intact.
    b.terminate();
    b.spawn();
    b.wait_ready();
    assert_eq!(committed(&b, "keep"), vec![(0, Some(2))]);
    assert_eq!(
        b.cli_ok(&["consume", "victim", "--from-beginning"]),
        "one\ntwo\nthree\n"
    );
}

/// A pipeline's `quiver.source` written as the batch's numbered header, from a raw client:
/// an honest batch is stored and reads back with its headers; one whose record lies about
/// its number, one that sets the attribute without a preamble, and one whose headers would
/// decode to more than the broker's limit are refused and store nothing.
#[test]
fn numbered_headers_that_lie_are_refused_and_honest_ones_read_back() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "out"]);
    let numbered = |sources: &[&str]| -> Vec<u8> {
        let mut nb = BatchBuilder::new(Compression::None);
        nb.set_numbered_header(Some("quiver.source"));
        for s in sources {
            nb.push(None, b"v", now_ms(), &[("quiver.source", s.as_bytes())]);
        }
        nb.build().to_vec()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, conn) = connect(&b, &rt);
    rt.block_on(async {
        let batch = numbered(&["in/0/5", "in/0/6"]);
        let (code, msg) = produce_raw(&conn, "out", &batch).await;
        assert_eq!(code, ErrorCode::None, "{msg}");
        // The last record's number: 5 + (-10), below 0.
        let mut below = numbered(&["in/0/5"]);
        *below.last_mut().unwrap() = 0x13; // zigzag -10
        recompute_crc(&mut below);
        let (code, msg) = produce_raw(&conn, "out", &below).await;
        assert_eq!(code, ErrorCode::InvalidRecord, "{msg}");
        assert!(msg.contains("is not a number from 0"), "{msg}");
        // The attribute without a preamble: the first record reads as a broken one.
        let mut bare = honest(&["plain"], Compression::None);
        let attrs = quiver_protocol::batch::ATTR_NUMBERED_HEADER.to_be_bytes();
        bare[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs);
        recompute_crc(&mut bare);
        let (code, msg) = produce_raw(&conn, "out", &bare).await;
        assert_eq!(code, ErrorCode::InvalidRecord, "{msg}");
        // 130,000 records of a 512-byte prefix: about 1.3 MB sent, over 64 MiB decoded.
        let prefix = "p".repeat(511) + "/";
        let sources: Vec<String> = (0..130_000).map(|i| format!("{prefix}{i}")).collect();
        let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
        let bomb = numbered(&refs);
        assert!(bomb.len() < 2 << 20, "{} bytes", bomb.len());
        let (code, msg) = produce_raw(&conn, "out", &bomb).await;
        assert_eq!(code, ErrorCode::MessageTooLarge, "{msg}");
        assert!(msg.contains("numbered headers"), "{msg}");
    });
    assert_eq!(b.describe("out")["partitions"][0]["log_end_offset"], 2);
    let read = b.cli_ok(&["consume", "out", "--from-beginning", "--output", "json"]);
    let sources: Vec<String> = read
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["headers"]["quiver.source"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(sources, vec!["in/0/5", "in/0/6"]);
}

/// A broker whose `max_frame_bytes` is 100 MiB takes a compressed batch whose records
/// decode to 70 MiB; a consumer with the default client settings reads it (it refused
/// anything over 64 MiB decoded before).
#[test]
fn a_large_batch_the_broker_takes_is_one_its_consumers_read() {
    let b = TestBroker::start_with_config("[limits]\nmax_frame_bytes = 104857600\n");
    b.cli_ok(&["topic", "create", "big"]);
    let large = vec![b'a'; 70 << 20];
    let mut builder = BatchBuilder::with_capacity(Compression::Zstd, (70 << 20) + 1024);
    builder.push(None, &large, now_ms(), &[]);
    builder.push(None, b"after", now_ms(), &[]);
    let batch = builder.build();
    assert!(batch.len() < 1 << 20, "{} bytes compressed", batch.len());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, conn) = connect(&b, &rt);
    rt.block_on(async {
        let (code, msg) = produce_raw(&conn, "big", &batch).await;
        assert_eq!(code, ErrorCode::None, "{msg}");
    });
    let out = b.cli(&["consume", "big", "--from-beginning", "--max-messages", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&[u8]> = out.stdout.split(|c| *c == b'\n').collect();
    assert_eq!(lines.len(), 3, "two records and the end");
    assert!(lines[0] == &large[..], "{} bytes", lines[0].len());
    assert_eq!(lines[1], b"after");
}
