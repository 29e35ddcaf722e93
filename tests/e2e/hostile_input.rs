//! Hostile input on the wire: random bytes, truncated frames, oversized length prefixes,
//! slow senders, corrupt batches and unknown APIs each get an error or a closed stream,
//! nothing is allocated past the limit, and the broker keeps serving everyone else.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::{BatchBuilder, Compression};
use quiver_protocol::requests::{Acks, ListOffsetsRequest, OffsetSpec, ProduceRequest};
use quiver_protocol::{encode_request, ErrorCode, FRAME_HEADER_LEN};

use super::harness::TestBroker;

pub fn connect(
    b: &TestBroker,
    rt: &tokio::runtime::Runtime,
) -> (quinn::Endpoint, quinn::Connection) {
    connect_with(b, rt, quinn::TransportConfig::default())
}

/// [`connect`] with the client's own QUIC transport settings (flow-control windows, …).
pub fn connect_with(
    b: &TestBroker,
    rt: &tokio::runtime::Runtime,
    transport: quinn::TransportConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    rt.block_on(async {
        let pem = std::fs::read(b.ca()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![quiver_protocol::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(Arc::new(transport));
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(cfg);
        let conn = ep
            .connect(b.addr().parse().unwrap(), "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        (ep, conn)
    })
}

/// Sends `bytes` on a new stream (finishing it when `finish`), returns the answer's error
/// code: `Some(code)` for an error frame, `None` if the stream was closed without one.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Option<ErrorCode> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let answer = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 20))
        .await
        .expect("the broker answered or closed the stream in time");
    let answer = answer.ok()?;
    if answer.len() < FRAME_HEADER_LEN + 2 {
        return None;
    }
    let code = u16::from_be_bytes([answer[FRAME_HEADER_LEN], answer[FRAME_HEADER_LEN + 1]]);
    Some(ErrorCode::from_u16(code))
}

#[test]
fn malformed_frames_get_errors_and_the_broker_keeps_serving() {
    let b = TestBroker::start_with_config(
        "[limits]\nrequest_read_timeout_ms = 1500\nmax_frame_bytes = 1048576\n",
    );
    b.cli_ok(&["topic", "create", "safe"]);
    assert!(b
        .cli_with_stdin(&["produce", "safe"], Some(b"before\n"))
        .status
        .success());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, conn) = connect(&b, &rt);
    let rss_before = b.rss_kib();
    rt.block_on(async {
        // Random bytes, deterministic seed.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for round in 0..50 {
            let len = 1 + (round * 37) % 300;
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let code = send_raw(&conn, &junk, true).await;
            assert_ne!(code, Some(ErrorCode::None), "random bytes were accepted");
        }
        // Oversized length prefix: refused from the header alone.
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[0, 0, 0, 1]);
        assert_eq!(
            send_raw(&conn, &huge, false).await,
            Some(ErrorCode::MessageTooLarge)
        );
        // Truncated frame: the header promises more than the stream carries.
        let req = ListOffsetsRequest {
            topic: "safe".into(),
            partition: 0,
            spec: OffsetSpec::Latest,
        };
        let full = encode_request(&req, &[]).encode();
        for cut in [1, FRAME_HEADER_LEN - 1, FRAME_HEADER_LEN, full.len() - 1] {
            let code = send_raw(&conn, &full[..cut], true).await;
            assert!(
                code.is_none() || code == Some(ErrorCode::InvalidRequest),
                "cut at {cut}: {code:?}"
            );
        }
        // Unknown API and wrong version.
        let mut unknown = full.to_vec();
        unknown[4..6].copy_from_slice(&999u16.to_be_bytes());
        assert_eq!(
            send_raw(&conn, &unknown, true).await,
            Some(ErrorCode::UnsupportedApi)
        );
        let mut badver = full.to_vec();
        badver[6..8].copy_from_slice(&77u16.to_be_bytes());
        assert_eq!(
            send_raw(&conn, &badver, true).await,
            Some(ErrorCode::UnsupportedVersion)
        );
        // A produce whose batch fails its CRC changes nothing.
        let mut bb = BatchBuilder::new(Compression::None);
        bb.push(None, b"evil", 1, &[]);
        let mut batch = bb.build().to_vec();
        let last = batch.len() - 1;
        batch[last] ^= 0xff;
        let preq = ProduceRequest {
            topic: "safe".into(),
            partition: 0,
            acks: Acks::Leader,
            timeout_ms: 5000,
        };
        let frame = encode_request(&preq, &batch).encode();
        assert_eq!(
            send_raw(&conn, &frame, true).await,
            Some(ErrorCode::CorruptBatch)
        );
        // Slow senders: many streams promising a near-limit body and never finishing.
        let mut slow = Vec::new();
        for _ in 0..100 {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            let mut head = Vec::new();
            head.extend_from_slice(&(1_000_000u32).to_be_bytes());
            head.extend_from_slice(&0u16.to_be_bytes());
            head.extend_from_slice(&1u16.to_be_bytes());
            head.extend_from_slice(&[7u8; 1000]);
            send.write_all(&head).await.unwrap();
            slow.push((send, recv));
        }
        for (_send, mut recv) in slow {
            let answer = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 20))
                .await
                .expect("slow stream answered in time");
            let a = answer.expect("the broker answers a slow stream with an error frame");
            assert!(a.len() >= FRAME_HEADER_LEN + 2, "short answer {a:?}");
            let code = u16::from_be_bytes([a[FRAME_HEADER_LEN], a[FRAME_HEADER_LEN + 1]]);
            assert_eq!(ErrorCode::from_u16(code), ErrorCode::RequestTimedOut);
        }
    });
    let rss_after = b.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "broker memory grew from {rss_before} KiB to {rss_after} KiB under hostile input"
    );
    // Everyone else is still served, and the topic holds only the good record.
    let out = b.cli_ok(&["consume", "safe", "--from-beginning", "--output", "json"]);
    let recs = super::harness::json_lines(&out);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["value"], "before");
    assert!(b
        .cli_with_stdin(&["produce", "safe"], Some(b"after\n"))
        .status
        .success());
    drop(conn);
    let _ = Bytes::new();
}

#[test]
fn client_disconnecting_mid_request_changes_nothing() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "cut"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ep, conn) = connect(&b, &rt);
    rt.block_on(async {
        let mut bb = BatchBuilder::new(Compression::None);
        bb.push(None, b"half", 1, &[]);
        let preq = ProduceRequest {
            topic: "cut".into(),
            partition: 0,
            acks: Acks::Leader,
            timeout_ms: 5000,
        };
        let frame = encode_request(&preq, &bb.build()).encode();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame[..frame.len() / 2]).await.unwrap();
        conn.close(0u32.into(), b"bye");
    });
    ep.close(0u32.into(), b"bye");
    let d: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["topic", "describe", "cut", "--output", "json"])).unwrap();
    assert_eq!(d["partitions"][0]["log_end_offset"], 0);
}
