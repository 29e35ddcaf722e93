//! Transactions end to end against a real broker: committed writes are visible to
//! read-committed consumers, aborted ones never (but still to read-uncommitted ones); an open
//! transaction holds read-committed readers at its first offset; initialising the id again
//! fences the old producer and aborts its transaction; a transaction's group offsets are
//! stored only if it commits; markers never show up as records; a transaction left open by a
//! crashed producer is aborted after its timeout, across a broker restart; a member waits
//! for the transaction holding its offsets without failing.

use std::time::Duration;

use quiver_client::{
    Client, Consumer, ConsumerConfig, GroupConfig, GroupConsumer, Isolation, ProducerRecord,
    SeekTo, TransactionalProducer, TxnOffsets,
};
use quiver_protocol::requests::OffsetCommit;
use quiver_protocol::ErrorCode;

use super::harness::{
    json_lines, printed_values, read_committed_args, succeeded, wait_for, TestBroker,
};

async fn connect(b: &TestBroker) -> Client {
    Client::connect(b.client_config()).await.expect("connect")
}

/// Values readable now with `isolation` (reads until the partition's end for that isolation).
async fn read_all(client: &Client, topic: &str, isolation: Isolation) -> Vec<String> {
    let mut c = Consumer::new(
        client.clone(),
        ConsumerConfig {
            isolation,
            start: SeekTo::Beginning,
            ..ConsumerConfig::default()
        },
    );
    c.assign(topic, [0]).await.unwrap();
    let end = c.end_offsets(topic).await.unwrap()[&0];
    let mut out = Vec::new();
    while c.position(topic, 0).await.unwrap() < end {
        for r in c.poll_timeout(Duration::from_millis(200)).await.unwrap() {
            out.push(String::from_utf8_lossy(&r.value).into_owned());
        }
    }
    out
}

/// The values `quiver consume --isolation read-committed` prints for `topic` (it stops at
/// the end); none when the command fails.
fn read_committed_by_cli(b: &TestBroker, topic: &str) -> Vec<String> {
    printed_values(&b.cli(&read_committed_args(topic)))
}

async fn send(tx: &mut TransactionalProducer, topic: &str, values: &[&str]) {
    tx.prepare_topic(topic).await.unwrap();
    for v in values {
        tx.send(ProducerRecord::new(topic, v.to_string()).with_partition(0))
            .unwrap();
    }
}

/// A broker with a one-partition topic `t`, and a runtime to drive the SDK.
fn broker_with_topic() -> (TestBroker, tokio::runtime::Runtime) {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "t", "--partitions", "1"]);
    (b, tokio::runtime::Runtime::new().unwrap())
}

/// A transactional producer for `id` on `client`.
async fn init(client: &Client, id: &str) -> TransactionalProducer {
    TransactionalProducer::init(client.clone(), id)
        .await
        .expect("init transactions")
}

/// `app-1`'s producer, after a transaction of `a1`, `a2` into `t` that it committed.
async fn committed_a1_a2(client: &Client) -> TransactionalProducer {
    let mut tx = init(client, "app-1").await;
    send(&mut tx, "t", &["a1", "a2"]).await;
    tx.commit(None).await.unwrap();
    tx
}

#[test]
fn committed_transactions_are_read_aborted_ones_never_and_markers_are_not_records() {
    let (b, rt) = broker_with_topic();
    rt.block_on(async {
        let client = connect(&b).await;
        let mut tx = committed_a1_a2(&client).await;
        send(&mut tx, "t", &["x1", "x2", "x3"]).await;
        tx.flush().await.unwrap();
        // Open: read-committed readers stop before it; read-uncommitted ones see it.
        assert_eq!(
            read_all(&client, "t", Isolation::ReadCommitted).await,
            ["a1", "a2"]
        );
        assert_eq!(
            read_all(&client, "t", Isolation::ReadUncommitted).await,
            ["a1", "a2", "x1", "x2", "x3"]
        );
        tx.abort().await.unwrap();
        send(&mut tx, "t", &["b1"]).await;
        tx.commit(None).await.unwrap();
        assert_eq!(
            read_all(&client, "t", Isolation::ReadCommitted).await,
            ["a1", "a2", "b1"]
        );
        assert_eq!(
            read_all(&client, "t", Isolation::ReadUncommitted).await,
            ["a1", "a2", "x1", "x2", "x3", "b1"],
            "read-uncommitted sees the aborted records, and no marker as a record"
        );
    });
    // The CLI's --isolation says the same, and stops at the end without --max-messages.
    let out = b.cli(&read_committed_args("t"));
    succeeded(&out);
    assert_eq!(printed_values(&out), ["a1", "a2", "b1"]);
    let all = json_lines(&b.cli_ok(&["consume", "t", "--from-beginning", "--output", "json"]));
    assert_eq!(all.len(), 6);
}

#[test]
fn initialising_the_id_again_fences_the_old_producer_and_aborts_its_transaction() {
    let (b, rt) = broker_with_topic();
    rt.block_on(async {
        let client = connect(&b).await;
        let mut old = init(&client, "app-1").await;
        send(&mut old, "t", &["zombie"]).await;
        old.flush().await.unwrap();
        let mut new = init(&client, "app-1").await;
        assert_eq!(new.producer().0, old.producer().0);
        assert!(new.producer().1 > old.producer().1);
        // The old producer's writes and commits are refused; its open transaction is void.
        send(&mut old, "t", &["late"]).await;
        let e = old.commit(None).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
        // Its abort fails the same way and does not take the id back (that would fence
        // the new producer): the new one's commit below still goes through.
        let before = old.producer();
        let e = old.abort().await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
        assert_eq!(
            old.producer(),
            before,
            "the fenced producer did not start over"
        );
        send(&mut new, "t", &["fresh"]).await;
        new.commit(None).await.unwrap();
        assert_eq!(
            read_all(&client, "t", Isolation::ReadCommitted).await,
            ["fresh"]
        );
    });
}

#[test]
fn a_producer_whose_transaction_timed_out_takes_its_id_back_with_abort() {
    let (b, rt) = broker_with_topic();
    let client = rt.block_on(connect(&b));
    let mut tx = rt
        .block_on(TransactionalProducer::init_with_timeout(
            client.clone(),
            "slow",
            Duration::from_secs(2),
        ))
        .unwrap();
    rt.block_on(async {
        send(&mut tx, "t", &["timed-out"]).await;
        tx.flush().await.unwrap();
    });
    b.cli_stdin_ok(&["produce", "t"], b"probe\n");
    // Read-committed readers reach the probe once the coordinator aborted the transaction
    // past its timeout.
    wait_for(30, "the timed-out transaction to be aborted", || {
        read_committed_by_cli(&b, "t") == ["probe"]
    });
    rt.block_on(async {
        let before = tx.producer();
        send(&mut tx, "t", &["late"]).await;
        let e = tx.commit(None).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
        // Fenced by its timeout, not by another producer: abort takes the id back at a new
        // epoch (Kafka's KIP-588), and the producer goes on.
        tx.abort().await.unwrap();
        assert_eq!(tx.producer().0, before.0);
        assert!(
            tx.producer().1 > before.1,
            "{:?} after {before:?}",
            tx.producer()
        );
        send(&mut tx, "t", &["again"]).await;
        tx.commit(None).await.unwrap();
        assert_eq!(
            read_all(&client, "t", Isolation::ReadCommitted).await,
            ["probe", "again"]
        );
    });
}

/// A read-committed group member's position moves past a transaction aborted after its
/// last records, though no poll hands out a record of it: its commit leaves no lag behind
/// the aborted records and their marker (as Kafka's consumer position does).
#[test]
fn a_members_commit_goes_past_an_aborted_transaction_with_no_record_for_it() {
    let (b, rt) = broker_with_topic();
    rt.block_on(async {
        let client = connect(&b).await;
        let mut tx = committed_a1_a2(&client).await;
        let mut config = GroupConfig::new("g", ["t"])
            .start_without_commit_at(quiver_client::AutoOffsetReset::Earliest);
        config.fetch.isolation = Isolation::ReadCommitted;
        let mut member = GroupConsumer::join(client.clone(), config).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(member.poll().await.unwrap());
        }
        member.commit().await.unwrap();
        let committed = || async {
            quiver_client::Admin::new(client.clone())
                .group_offsets("g", None)
                .await
                .unwrap()
                .into_iter()
                .find(|o| o.topic == "t" && o.partition == 0)
                .and_then(|o| o.offset)
        };
        assert_eq!(committed().await, Some(3), "past the commit marker");
        send(&mut tx, "t", &["x1", "x2", "x3"]).await;
        tx.flush().await.unwrap();
        tx.abort().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while committed().await != Some(7) {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit stayed at {:?}, before the aborted records",
                committed().await
            );
            assert!(member.poll().await.unwrap().is_empty(), "no aborted record");
            member.commit().await.unwrap();
        }
        member.close().await.unwrap();
    });
}

#[test]
fn a_transactions_group_offsets_are_stored_only_when_it_commits() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "in", "--partitions", "1"]);
    b.cli_ok(&["topic", "create", "out", "--partitions", "1"]);
    b.cli_stdin_ok(&["produce", "in"], b"1\n2\n3\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&b).await;
        let mut member = GroupConsumer::join(
            client.clone(),
            GroupConfig::new("g", ["in"])
                .start_without_commit_at(quiver_client::AutoOffsetReset::Earliest),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            got.extend(member.poll().await.unwrap());
        }
        let mut tx = init(&client, "g-1").await;
        let offsets = |offset: i64| TxnOffsets {
            group: "g".into(),
            member_id: member.member_id(),
            generation: member.generation(),
            offsets: vec![OffsetCommit {
                topic: "in".into(),
                partition: 0,
                offset,
                metadata: None,
            }],
        };
        send(&mut tx, "out", &["o1"]).await;
        tx.flush().await.unwrap();
        let req_offsets = offsets(2);
        let tx_req = quiver_protocol::requests::TxnCommitOffsetsRequest {
            transactional_id: "g-1".into(),
            producer_id: tx.producer().0,
            producer_epoch: tx.producer().1,
            group: req_offsets.group.clone(),
            member_id: req_offsets.member_id.clone(),
            generation: req_offsets.generation,
            offsets: req_offsets.offsets.clone(),
        };
        client.request(&tx_req, bytes::Bytes::new()).await.unwrap();
        tx.abort().await.unwrap();
        // The group's committed offset of in/0.
        let committed = |c: Client| async move {
            quiver_client::Admin::new(c)
                .group_offsets("g", None)
                .await
                .unwrap()
                .into_iter()
                .find(|o| o.topic == "in" && o.partition == 0)
                .and_then(|o| o.offset)
        };
        assert_eq!(
            committed(client.clone()).await,
            None,
            "an aborted transaction stores no offset"
        );
        send(&mut tx, "out", &["o2"]).await;
        tx.commit(Some(offsets(3))).await.unwrap();
        assert_eq!(committed(client.clone()).await, Some(3));
        assert_eq!(
            read_all(&client, "out", Isolation::ReadCommitted).await,
            ["o2"]
        );
        // Offsets refused for a generation the member does not hold (as after a rebalance
        // its heartbeats have not brought in yet): the transaction stays open with its
        // records, and the commit tried again with the member's generation goes through.
        send(&mut tx, "out", &["o3"]).await;
        let mut stale = offsets(4);
        stale.generation += 100;
        let refused = tx.commit(Some(stale)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Some(ErrorCode::StaleGeneration),
            "{refused}"
        );
        tx.commit(Some(offsets(4)))
            .await
            .expect("the commit tried again with the member's generation");
        assert_eq!(committed(client.clone()).await, Some(4));
        assert_eq!(
            read_all(&client, "out", Isolation::ReadCommitted).await,
            ["o2", "o3"]
        );
        member.close().await.unwrap();
    });
}

/// A member granted a partition whose offsets an open transaction holds waits for that
/// transaction's outcome without failing its polls: the coordinator answers "retry" after
/// its bounded wait (before a client's default request timeout), and the group consumer asks
/// again, also after a timeout of its own; once the transaction commits, it starts at the
/// committed offset.
#[test]
fn a_member_waits_for_the_transaction_holding_its_offsets_without_failing_its_polls() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "in", "--partitions", "1"]);
    b.cli_ok(&["topic", "create", "out", "--partitions", "1"]);
    b.cli_stdin_ok(&["produce", "in"], b"1\n2\n3\n4\n5\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&b).await;
        let group = || {
            GroupConfig::new("h", ["in"])
                .start_without_commit_at(quiver_client::AutoOffsetReset::Earliest)
        };
        let mut first = GroupConsumer::join(client.clone(), group()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            got.extend(first.poll().await.unwrap());
        }
        let mut tx = transaction_holding_offsets(&client, "h-1", &first, 0, 3).await;
        first.close_without_commit().await.unwrap();

        // The next member's requests time out sooner than the coordinator's wait.
        let impatient = Client::connect(quiver_client::ClientConfig {
            request_timeout: Duration::from_secs(8),
            ..b.client_config()
        })
        .await
        .unwrap();
        let mut second = GroupConsumer::join(impatient, group()).await.unwrap();
        let polling = tokio::spawn(async move {
            let (mut values, mut errors) = (Vec::new(), Vec::new());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while values.len() < 2 && tokio::time::Instant::now() < deadline {
                match second.poll_timeout(Duration::from_secs(3)).await {
                    Ok(recs) => values.extend(
                        recs.iter()
                            .map(|r| String::from_utf8_lossy(&r.value).into_owned()),
                    ),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            second.close().await.unwrap();
            (values, errors)
        });
        // Asked with the default timeout, the coordinator itself says to retry.
        let asked = quiver_client::Admin::new(client.clone())
            .group_offsets("h", None)
            .await
            .expect_err("the transaction is still open");
        assert_eq!(asked.code(), Some(ErrorCode::RequestTimedOut), "{asked}");
        tx.commit(None).await.unwrap();
        let (values, errors) = polling.await.unwrap();
        assert!(errors.is_empty(), "polls failed: {errors:?}");
        assert_eq!(values, ["4", "5"], "starts at the transaction's offset");
    });
}

/// A member granted a partition whose offsets an open transaction holds goes on reading the
/// partitions it owned before while it waits: the offsets are fetched beside its polls, not
/// inside them.
#[test]
fn a_member_waiting_for_a_transactions_offsets_goes_on_reading_its_other_partitions() {
    let b = TestBroker::start();
    b.cli_ok(&["topic", "create", "in", "--partitions", "2"]);
    b.cli_ok(&["topic", "create", "out", "--partitions", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&b).await;
        let group = || {
            GroupConfig::new("w", ["in"])
                .start_without_commit_at(quiver_client::AutoOffsetReset::Earliest)
        };
        let mut a = GroupConsumer::join(client.clone(), group()).await.unwrap();
        let mut second = GroupConsumer::join(client.clone(), group()).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while a.assignment().len() != 1 || second.assignment().len() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the two members never split the partitions"
            );
            a.poll_timeout(Duration::from_millis(100)).await.unwrap();
            second
                .poll_timeout(Duration::from_millis(100))
                .await
                .unwrap();
        }
        let held = a.assignment()[0].partition;
        let own = second.assignment()[0].partition;
        // The first member's transaction holds the offsets of its partition; it goes away
        // without committing, so the partition moves to the second member.
        let mut tx = transaction_holding_offsets(&client, "w-1", &a, held, 0).await;
        a.close_without_commit().await.unwrap();
        // Wait until the coordinator has granted the held partition to the second member
        // (it is not started: its offsets wait for the transaction).
        let admin = quiver_client::Admin::new(client.clone());
        wait_until_owned_by_one(&admin, &mut second).await;
        let own_arg = own.to_string();
        let produced = b.cli_with_stdin(
            &["produce", "in", "--partition", &own_arg],
            Some(b"x1\nx2\nx3\n"),
        );
        succeeded(&produced);
        let mut values = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while values.len() < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the member's own partition stalled while it waited for the transaction: {values:?}"
            );
            // The coordinator holds a fetch of those offsets up to 20 s: a poll that waited
            // in it would take that long, however short its own timeout.
            let started = tokio::time::Instant::now();
            let polled = second
                .poll_timeout(Duration::from_millis(500))
                .await
                .unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a 500 ms poll took {:?}: it waited for the held offsets",
                started.elapsed()
            );
            for r in polled {
                assert_eq!(
                    r.partition, own,
                    "nothing of the held partition before the outcome"
                );
                values.push(String::from_utf8_lossy(&r.value).into_owned());
            }
        }
        assert_eq!(values, ["x1", "x2", "x3"]);
        assert_eq!(
            second.assignment().len(),
            1,
            "the held partition starts only once the transaction ended"
        );
        tx.commit(None).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while second.assignment().len() != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the held partition never started"
            );
            second
                .poll_timeout(Duration::from_millis(200))
                .await
                .unwrap();
        }
        second.close().await.unwrap();
    });
}

/// An open transaction `txn_id` that wrote one record to `out` and holds `member`'s offset
/// `offset` of `in`/`partition` in its group (committed as a member would, not yet ended).
async fn transaction_holding_offsets(
    client: &Client,
    txn_id: &str,
    member: &GroupConsumer,
    partition: u32,
    offset: i64,
) -> TransactionalProducer {
    let mut tx =
        TransactionalProducer::init_with_timeout(client.clone(), txn_id, Duration::from_secs(120))
            .await
            .unwrap();
    send(&mut tx, "out", &["o1"]).await;
    tx.flush().await.unwrap();
    let held = quiver_protocol::requests::TxnCommitOffsetsRequest {
        transactional_id: txn_id.into(),
        producer_id: tx.producer().0,
        producer_epoch: tx.producer().1,
        group: member.group().into(),
        member_id: member.member_id(),
        generation: member.generation(),
        offsets: vec![OffsetCommit {
            topic: "in".into(),
            partition,
            offset,
            metadata: None,
        }],
    };
    client.request(&held, bytes::Bytes::new()).await.unwrap();
    tx
}

/// Polls `member` until the group's description shows every partition owned by it (granted,
/// even if not started yet).
async fn wait_until_owned_by_one(admin: &quiver_client::Admin, member: &mut GroupConsumer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let d = admin.describe_group("w").await.unwrap();
        if d.members.len() == 1
            && d.partitions
                .iter()
                .all(|p| p.owner.as_deref() == Some(&*member.member_id()))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partition never moved: {d:?}"
        );
        member
            .poll_timeout(Duration::from_millis(100))
            .await
            .unwrap();
    }
}

#[test]
fn a_crashed_producers_open_transaction_is_aborted_after_its_timeout_even_across_a_restart() {
    let (mut b, rt) = broker_with_topic();
    rt.block_on(async {
        let client = connect(&b).await;
        let mut tx = TransactionalProducer::init_with_timeout(
            client.clone(),
            "crashy",
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        send(&mut tx, "t", &["never"]).await;
        tx.flush().await.unwrap();
        // The producer "crashes" here: no commit, no abort.
    });
    b.kill9();
    b.spawn();
    rt.block_on(async {
        let client = connect(&b).await;
        let mut other = init(&client, "other").await;
        send(&mut other, "t", &["after"]).await;
        other.commit(None).await.unwrap();
    });
    // Read-committed readers are held at the open transaction until the broker aborts it.
    wait_for(30, "the timed-out transaction to be aborted", || {
        read_committed_by_cli(&b, "t") == ["after"]
    });
}

#[test]
fn forged_markers_and_transactional_batches_without_a_transaction_are_refused() {
    use quiver_protocol::batch::{control_batch, BatchBuilder, Compression, Marker};
    use quiver_protocol::requests::{Acks, ProduceRequest};
    let (b, rt) = broker_with_topic();
    rt.block_on(async {
        let client = connect(&b).await;
        let produce = |topic: &str, batch: bytes::Bytes| {
            let client = client.clone();
            let req = ProduceRequest {
                topic: topic.to_string(),
                partition: 0,
                acks: Acks::All,
                timeout_ms: 5_000,
            };
            async move { client.request(&req, batch).await }
        };
        let now = quiver_core::clock::now_ms();
        // A client writing a commit marker for someone's producer id.
        let e = produce("t", control_batch(1 << 62, 0, Marker::Commit, Some(0), now))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidRecord), "{e}");
        // A transactional batch under a producer id no InitTransactions handed out.
        let mut forged = BatchBuilder::new(Compression::None);
        forged.push(None, b"sneaky", now, &[]);
        forged.set_producer(777, 0, 0);
        forged.set_transactional(true);
        let e = produce("t", forged.build()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
        // Into the broker's own topic, even with a real transaction.
        let tx = init(&client, "intruder").await;
        let (pid, epoch) = tx.producer();
        let mut inside = BatchBuilder::new(Compression::None);
        inside.push(None, b"offsets?", now, &[]);
        inside.set_producer(pid, epoch, 0);
        inside.set_transactional(true);
        assert!(produce("__consumer_offsets", inside.build()).await.is_err());
        // Adding partitions that do not exist, or another internal topic, is refused.
        let add =
            |topic: &str, partition: u32| quiver_protocol::requests::AddPartitionsToTxnRequest {
                transactional_id: "intruder".into(),
                producer_id: pid,
                producer_epoch: epoch,
                partitions: vec![quiver_protocol::requests::TopicPartition::new(
                    topic, partition,
                )],
            };
        for (topic, partition, code) in [
            ("t", 7, ErrorCode::UnknownTopicOrPartition),
            ("nope", 0, ErrorCode::UnknownTopicOrPartition),
            ("__pipelines", 0, ErrorCode::InvalidTopicName),
        ] {
            let e = client
                .request(&add(topic, partition), bytes::Bytes::new())
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(code), "{topic}/{partition}: {e}");
            // The text names the topic as it is (it said `topic "t/7" does not exist;
            // create it with `quiver topic create t/7``, a command that cannot work).
            assert!(
                !e.to_string().contains(&format!("{topic}/{partition}")),
                "{e}"
            );
        }
    });
    assert_eq!(b.total_log_end("t"), 0, "nothing was stored");
}

/// Well-formed batches that lie about who writes them, each answered with a clear error
/// before anything is stored: a non-transactional batch under a transactional producer's
/// id and a far-future epoch (it fenced that producer's commit marker for good, so the
/// transaction could never end and read-committed readers stalled), and one request
/// mixing producers, or one producer's batches out of sequence (the first batch was stored
/// while the request failed). A log-append-time batch takes the broker's clock, not the
/// year-9999 time it was sent with.
#[test]
fn batches_lying_about_their_producer_are_refused_whole_and_transactions_still_commit() {
    use bytes::{Bytes, BytesMut};
    use quiver_protocol::batch::{
        set_log_append_time, BatchBuilder, Compression, MAX_TIMESTAMP_MS,
    };
    use quiver_protocol::requests::{Acks, ProduceRequest};
    let (b, rt) = broker_with_topic();
    rt.block_on(async {
        let client = connect(&b).await;
        let produce = |batch: Bytes| {
            let client = client.clone();
            let req = ProduceRequest {
                topic: "t".into(),
                partition: 0,
                acks: Acks::All,
                timeout_ms: 5_000,
            };
            async move { client.request(&req, batch).await }
        };
        let now = quiver_core::clock::now_ms();
        let batch = |value: &str, producer: (i64, i16, i32), transactional: bool| {
            let mut bb = BatchBuilder::new(Compression::None);
            bb.push(None, value.as_bytes(), now, &[]);
            bb.set_producer(producer.0, producer.1, producer.2);
            bb.set_transactional(transactional);
            bb.build()
        };
        let mut tx = init(&client, "victim").await;
        send(&mut tx, "t", &["x1"]).await;
        tx.flush().await.unwrap();
        let (pid, _) = tx.producer();
        for seq in [-1, 0] {
            let e = produce(batch("forged", (pid, i16::MAX, seq), false))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::InvalidTxnState), "{e}");
            assert!(e.to_string().contains("must be transactional"), "{e}");
        }
        tx.commit(None)
            .await
            .expect("the transaction still commits");
        assert_eq!(
            read_all(&client, "t", Isolation::ReadCommitted).await,
            ["x1"]
        );
        let end = b.total_log_end("t");

        // Mixed producers, or one producer out of sequence or epoch, in one request.
        let joined = |parts: &[Bytes]| {
            let mut all = BytesMut::new();
            for p in parts {
                all.extend_from_slice(p);
            }
            all.freeze()
        };
        for parts in [
            [
                batch("a", (-1, -1, -1), false),
                batch("b", (5, 0, 0), false),
            ],
            [batch("a", (5, 1, 0), false), batch("b", (5, 0, 1), false)],
            [batch("a", (5, 1, 0), false), batch("b", (5, 1, 7), false)],
        ] {
            let e = produce(joined(&parts)).await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
        }
        assert_eq!(
            b.total_log_end("t"),
            end,
            "nothing of a refused request was stored"
        );
        // The same producer in sequence is fine, whole.
        produce(joined(&[
            batch("a", (5, 1, 0), false),
            batch("b", (5, 1, 1), false),
        ]))
        .await
        .unwrap();
        assert_eq!(b.total_log_end("t"), end + 2);

        // Log-append time: the broker's clock, whatever the batch said.
        let mut lat = batch("stamped", (-1, -1, -1), false).to_vec();
        set_log_append_time(&mut lat, MAX_TIMESTAMP_MS);
        let before = quiver_core::clock::now_ms();
        produce(Bytes::from(lat)).await.unwrap();
        let after = quiver_core::clock::now_ms();
        let mut c = Consumer::new(
            client.clone(),
            ConsumerConfig {
                start: SeekTo::Offset(end + 2),
                ..ConsumerConfig::default()
            },
        );
        c.assign("t", [0]).await.unwrap();
        let mut got = None;
        for _ in 0..120 {
            let rs = c.poll_timeout(Duration::from_millis(500)).await.unwrap();
            got = rs.into_iter().next();
            if got.is_some() {
                break;
            }
        }
        let got = got.expect("the stamped record is readable");
        assert_eq!(&got.value[..], b"stamped");
        assert!(
            (before..=after).contains(&got.timestamp),
            "stamped at {} (sent {MAX_TIMESTAMP_MS}), produced within {before}..={after}",
            got.timestamp
        );
    });
}
