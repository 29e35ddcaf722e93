//! Clients that ask for more than they take: a reader that stops reading its answer has
//! its stream reset after `limits.response_write_timeout_ms`; a client that goes away
//! leaves no long-poll parked behind it; requests whose numbers lie (a topic named
//! thousands of times, `min_bytes` above `max_bytes`) cost no more than honest ones. The
//! broker's `quiver_requests_in_flight` gauge shows what it still holds, and a connection
//! holds at most its budget of answer bytes (twice `limits.max_frame_bytes`). Compression
//! bombs sent at once share the broker's decompression memory
//! (`limits.max_decompression_bytes`) instead of each taking its own. A group's offsets
//! are answered and stored once per partition, however often a request repeats one.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_client::{Client, GroupConfig, GroupConsumer};
use quiver_protocol::batch::{field, recompute_crc, BatchBuilder, Compression};
use quiver_protocol::requests::{
    CommitOffsetsRequest, FetchOffsetsRequest, FetchRequest, MetadataRequest, OffsetCommit,
    TopicPartition,
};
use quiver_protocol::{encode_request, ErrorCode};

use super::harness::TestBroker;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One line's value of the broker's metrics (`prefix` up to the value).
fn metric(metrics_port: u16, prefix: &str) -> Option<i64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The broker's `quiver_requests_in_flight` gauge.
fn in_flight(metrics_port: u16) -> i64 {
    metric(metrics_port, "quiver_requests_in_flight ").expect("an in-flight gauge")
}

/// Polls until the broker holds no request (the metrics scrape itself is not one).
fn until_no_request_in_flight(metrics_port: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let n = in_flight(metrics_port);
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {n} requests still held");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw QUIC client whose streams take at most `window` bytes before their reader reads.
fn connect_small_window(
    b: &TestBroker,
    rt: &tokio::runtime::Runtime,
    window: u32,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(window));
    t.receive_window(quinn::VarInt::from_u32(window * 4));
    super::hostile_input::connect_with(b, rt, t)
}

fn fetch(
    topic: &str,
    offset: i64,
    max_bytes: u32,
    min_bytes: u32,
    max_wait_ms: u32,
) -> FetchRequest {
    FetchRequest {
        topic: topic.into(),
        partition: 0,
        offset,
        max_bytes,
        max_wait_ms,
        min_bytes,
        processor: None,
        isolation: Default::default(),
    }
}

#[test]
fn a_client_that_stops_reading_or_goes_away_leaves_nothing_held() {
    let mport = free_port();
    let b = TestBroker::start_with_config(&format!(
        "metrics_listen = \"127.0.0.1:{mport}\"\n[limits]\nresponse_write_timeout_ms = 1000\n"
    ));
    b.cli_ok(&["topic", "create", "big", "--partitions", "1"]);
    let line = format!("{}\n", "x".repeat(1000));
    b.cli_stdin_ok(&["produce", "big"], line.repeat(2000).as_bytes());
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A fetch of ~2 MB whose reader never reads past its 64 KiB window.
    let (_ep, conn) = connect_small_window(&b, &rt, 64 * 1024);
    let frame = encode_request(&fetch("big", 0, 4 << 20, 1, 0), &[]).encode();
    let (mut send, mut recv) = rt.block_on(async {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        (send, recv)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_flight(mport) < 1 {
        assert!(Instant::now() < deadline, "the fetch never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    until_no_request_in_flight(mport, Duration::from_secs(30), "an unread answer");
    // What the stream holds ends in a reset, not in the whole answer.
    let read = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(8 << 20)).await
    });
    assert!(
        matches!(
            read,
            Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))) if code.into_inner() == 2
        ),
        "{read:?}"
    );
    let _ = send.finish();

    // Twenty long-polls at the end of the log, then the client goes away: none of them
    // waits out its 30 s.
    let end = 2000;
    let parked: Vec<quinn::RecvStream> = rt.block_on(async {
        let mut parked = Vec::new();
        for _ in 0..20 {
            let frame = encode_request(&fetch("big", end, 1 << 20, 1, 30_000), &[]).encode();
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&frame).await.unwrap();
            send.finish().unwrap();
            parked.push(recv);
        }
        parked
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_flight(mport) < 20 {
        assert!(Instant::now() < deadline, "the long-polls never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    conn.close(0u32.into(), b"gone");
    until_no_request_in_flight(
        mport,
        Duration::from_secs(15),
        "long-polls of a closed client",
    );
    drop(parked);

    // The broker serves everyone else as before.
    let out = b.cli_ok(&["consume", "big", "--from-beginning", "--max-messages", "3"]);
    assert_eq!(out.lines().count(), 3, "{out}");
}

#[test]
fn requests_whose_numbers_lie_cost_no_more_than_honest_ones() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "m", "--partitions", "3"]);
    b.cli_stdin_ok(
        &["produce", "m", "--partition", "0"],
        "a\n".repeat(50).as_bytes(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        // One topic named 5,000 times is answered once.
        let (md, _) = client
            .request(
                &MetadataRequest {
                    topics: Some(vec!["m".to_string(); 5000]),
                },
                Bytes::new(),
            )
            .await
            .expect("metadata");
        assert_eq!(md.topics.len(), 1);
        assert_eq!(md.topics[0].partitions.len(), 3);
        // Past the cap: refused, with what to do instead.
        let e = client
            .request(
                &MetadataRequest {
                    topics: Some(vec!["m".to_string(); 10_001]),
                },
                Bytes::new(),
            )
            .await
            .expect_err("10,001 names are refused")
            .to_string();
        assert!(e.contains("at most 10000"), "{e}");
        // min_bytes above max_bytes can never be met: the fetch answers with what fits
        // instead of re-reading the log on every append until its 30 s are up.
        let started = Instant::now();
        let (_, payload) = client
            .request_for_partition(
                "m",
                0,
                &fetch("m", 0, 200, u32::MAX, 30_000),
                Bytes::new(),
                Duration::from_secs(60),
            )
            .await
            .expect("fetch");
        assert!(!payload.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the fetch waited {:?} for a min_bytes it could never reach",
            started.elapsed()
        );
    });
    assert_eq!(
        b.cli_ok(&["consume", "m", "--from-beginning", "--partition", "0"])
            .lines()
            .count(),
        50
    );
}

#[test]
fn a_connection_holds_at_most_its_budget_of_unread_answers() {
    let mport = free_port();
    // Frames of at most 8 MiB: a connection's answers may hold 16 MiB.
    let b = TestBroker::start_with_config(&format!(
        "metrics_listen = \"127.0.0.1:{mport}\"\n[limits]\nmax_frame_bytes = 8388608\nresponse_write_timeout_ms = 120000\n"
    ));
    b.cli_ok(&["topic", "create", "wide", "--partitions", "1"]);
    let line = format!("{}\n", "y".repeat(1000));
    b.cli_stdin_ok(&["produce", "wide"], line.repeat(9000).as_bytes());
    let bytes_out = || metric(mport, "quiver_bytes_out_total{topic=\"wide\"} ").unwrap_or(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rss_before = b.rss_kib();
    // 48 fetches of 8 MiB each, never read: 384 MiB if each held its answer.
    let (_ep, conn) = connect_small_window(&b, &rt, 64 * 1024);
    let streams: Vec<(quinn::SendStream, quinn::RecvStream)> = rt.block_on(async {
        let mut streams = Vec::new();
        for _ in 0..48 {
            let frame = encode_request(&fetch("wide", 0, 8 << 20, 1, 0), &[]).encode();
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&frame).await.unwrap();
            send.finish().unwrap();
            streams.push((send, recv));
        }
        streams
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight(mport) < 48 || bytes_out() < 2 * 8_000_000 {
        assert!(
            Instant::now() < deadline,
            "the fetches never arrived or never read"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The two that fit are read and stuck unread; the rest wait for room, reading nothing.
    std::thread::sleep(Duration::from_secs(1));
    let out = bytes_out();
    assert!(
        out < 3 * 8_400_000,
        "{out} bytes read for a client that reads nothing: more than its budget"
    );
    let grew_mib = b.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grew_mib < 200, "the broker grew by {grew_mib} MiB");
    // Everyone else is served meanwhile.
    let other = b.cli_ok(&["consume", "wide", "--from-beginning", "--max-messages", "2"]);
    assert_eq!(other.lines().count(), 2, "{other}");
    conn.close(0u32.into(), b"gone");
    until_no_request_in_flight(mport, Duration::from_secs(15), "fetches of a closed client");
    drop(streams);
}

#[test]
fn a_slow_but_steady_reader_gets_its_whole_answer() {
    let b = TestBroker::start_with_config("[limits]\nresponse_write_timeout_ms = 1000\n");
    b.cli_ok(&["topic", "create", "slow", "--partitions", "1"]);
    let line = format!("{}\n", "z".repeat(1000));
    b.cli_stdin_ok(&["produce", "slow"], line.repeat(1000).as_bytes());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, conn) = connect_small_window(&b, &rt, 64 * 1024);
    // About 1 MB through a 64 KiB window, a window every 250 ms: 4 s in all, four times
    // the stall limit, yet never a whole second without progress.
    let got = rt.block_on(async {
        let frame = encode_request(&fetch("slow", 0, 4 << 20, 1, 0), &[]).encode();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        let mut got = 0usize;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            // Take one window's worth: what has arrived, up to 64 KiB.
            let mut taken = 0;
            while taken < 64 * 1024 {
                let next = tokio::time::timeout(
                    Duration::from_millis(50),
                    recv.read_chunk(64 * 1024 - taken, true),
                );
                match next.await {
                    Ok(Ok(Some(c))) => taken += c.bytes.len(),
                    Ok(Ok(None)) => return got + taken,
                    Ok(Err(e)) => panic!("the stream broke after {} bytes: {e}", got + taken),
                    Err(_) => break,
                }
            }
            got += taken;
        }
    });
    assert!(got > 1_000_000, "only {got} bytes");
}

#[test]
fn compression_bombs_sent_at_once_share_the_brokers_decompression_memory() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "bombed"]);
    // One record of 60 MiB of zeros, zstd: a few KB on the wire. Its header claims a
    // second record, so the broker refuses the batch, but only after inflating it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut builder = BatchBuilder::new(Compression::Zstd);
    builder.push(None, &vec![0u8; 60 << 20], now, &[]);
    let mut bomb = builder.build().to_vec();
    assert!(bomb.len() < 64 * 1024, "a bomb of {} bytes", bomb.len());
    bomb[field::RECORD_COUNT..field::RECORD_COUNT + 4].copy_from_slice(&2i32.to_be_bytes());
    bomb[field::LAST_OFFSET_DELTA..field::LAST_OFFSET_DELTA + 4]
        .copy_from_slice(&1i32.to_be_bytes());
    recompute_crc(&mut bomb);
    let bomb = Arc::new(bomb);
    let before = b.peak_rss_kib();
    assert!(before > 0, "the broker's peak memory is readable");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, conn) = super::hostile_input::connect(&b, &rt);
    let answers: Vec<(ErrorCode, String)> = rt.block_on(async {
        let tasks: Vec<_> = (0..48)
            .map(|_| {
                let (conn, bomb) = (conn.clone(), bomb.clone());
                tokio::spawn(async move {
                    super::forged_input::produce_raw(&conn, "bombed", &bomb).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        answers
    });
    // Each is refused for its lie (or, on a slow machine, timed out waiting for room).
    for (code, msg) in &answers {
        assert!(
            matches!(code, ErrorCode::InvalidRecord | ErrorCode::RequestTimedOut),
            "{code:?}: {msg}"
        );
    }
    assert!(
        answers.iter().any(|(c, _)| *c == ErrorCode::InvalidRecord),
        "some bomb was inflated and refused"
    );
    // 48 × 60 MiB inflating at once would be 2.8 GiB; the default budget is 256 MiB.
    let grew = b.peak_rss_kib().saturating_sub(before);
    assert!(
        grew < 768 * 1024,
        "48 bombs of 60 MiB raised the broker's peak memory by {grew} KiB"
    );
    assert_eq!(b.total_log_end("bombed"), 0, "nothing was stored");
    b.cli_stdin_ok(&["produce", "bombed", "--compression", "zstd"], b"fine\n");
    assert_eq!(b.total_log_end("bombed"), 1);
}

#[test]
fn answers_a_processor_made_larger_hold_room_for_their_own_size() {
    let mport = free_port();
    // Frames of at most 8 MiB: a connection's answers may hold 16 MiB. The 64 fetches'
    // processor calls take turns on one instance, and one waits for its turn at most 20
    // times the CPU limit before it is refused as busy: a generous limit keeps the first
    // answers coming on a loaded machine (plugin threads run at a lower priority).
    let b = TestBroker::start_with_config(&format!(
        "metrics_listen = \"127.0.0.1:{mport}\"\n[limits]\nmax_frame_bytes = 8388608\nresponse_write_timeout_ms = 120000\n[plugins]\ncpu_ms = 3000\n"
    ));
    b.cli_ok(&["topic", "create", "words", "--partitions", "1"]);
    b.cli_ok(&["plugin", "deploy", &super::harness::example("split-words")]);
    // 1,000-byte lines of 500 one-letter words: split into words, a read grows ~5 times.
    let line = format!("{}\n", "a ".repeat(500));
    b.cli_stdin_ok(&["produce", "words"], line.repeat(2000).as_bytes());
    let bytes_out = || metric(mport, "quiver_bytes_out_total{topic=\"words\"} ").unwrap_or(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // 64 fetches of 128 KiB through the processor, never read: 8 MiB of reads fit the
    // budget, but the answers are about 45 MB.
    let (_ep, conn) = connect_small_window(&b, &rt, 64 * 1024);
    let streams: Vec<(quinn::SendStream, quinn::RecvStream)> = rt.block_on(async {
        let mut streams = Vec::new();
        for _ in 0..64 {
            let mut req = fetch("words", 0, 128 * 1024, 1, 0);
            req.processor =
                Some(quiver_protocol::requests::ProcessorSpec::parse("split-words").unwrap());
            let frame = encode_request(&req, &[]).encode();
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&frame).await.unwrap();
            send.finish().unwrap();
            streams.push((send, recv));
        }
        streams
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while bytes_out() < 8_000_000 {
        assert!(
            Instant::now() < deadline,
            "the processed answers never came: {} bytes",
            bytes_out()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Answers stuck unread hold the budget; the rest wait for room.
    std::thread::sleep(Duration::from_secs(2));
    let out = bytes_out();
    assert!(
        out < 24_000_000,
        "{out} bytes of processed answers for a client that reads nothing: more than its budget"
    );
    conn.close(0u32.into(), b"gone");
    until_no_request_in_flight(mport, Duration::from_secs(15), "fetches of a closed client");
    drop(streams);
}

#[test]
fn repeated_partitions_do_not_multiply_a_groups_offsets() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "o", "--partitions", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(b.client_config()).await.expect("connect");
        let mut member = GroupConsumer::join(client.clone(), GroupConfig::new("greedy", ["o"]))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while member.assignment().is_empty() {
            assert!(Instant::now() < deadline, "no assignment in 30 s");
            member
                .poll_timeout(Duration::from_millis(50))
                .await
                .unwrap();
        }
        let entry = |metadata: &str| OffsetCommit {
            topic: "o".into(),
            partition: 0,
            offset: 7,
            metadata: Some(metadata.into()),
        };
        let commit = |offsets: Vec<OffsetCommit>| CommitOffsetsRequest {
            group: "greedy".into(),
            member_id: member.member_id(),
            generation: member.generation(),
            offsets,
        };
        let big = "m".repeat(4096);
        client
            .request(&commit(vec![entry(&big)]), Bytes::new())
            .await
            .expect("a commit with the largest metadata");
        // The same partition 100,000 times in one commit: refused, nothing stored.
        let e = client
            .request(&commit(vec![entry("x"); 100_000]), Bytes::new())
            .await
            .expect_err("a repeated partition is refused")
            .to_string();
        assert!(e.contains("more than once"), "{e}");
        // Asked for 100,000 times, the partition (with its 4 KiB of metadata) is answered
        // once, and the commit above changed nothing.
        let fetch = |n: usize| FetchOffsetsRequest {
            group: "greedy".into(),
            partitions: Some(vec![TopicPartition::new("o", 0); n]),
        };
        let (answer, _) = client
            .request(&fetch(100_000), Bytes::new())
            .await
            .expect("fetch offsets");
        assert_eq!(answer.offsets.len(), 1);
        assert_eq!(answer.offsets[0].offset, Some(7));
        assert_eq!(answer.offsets[0].metadata.as_deref(), Some(big.as_str()));
        let e = client
            .request(&fetch(100_001), Bytes::new())
            .await
            .expect_err("past the cap")
            .to_string();
        assert!(e.contains("at most 100000"), "{e}");
        member.close().await.unwrap();
    });
}
