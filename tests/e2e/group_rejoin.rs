//! Group members' positions, with an in-process broker. A member whose heartbeats find it
//! gone (the coordinator restarted or forgot it) joins again under a new id on its own:
//! positions it read under the old membership are not committed under the new one (the new
//! member may own the same partitions, which another member may have processed further
//! meanwhile, and their offsets would move back). A rewound partition is read again. A
//! member dropped without closing is taken out of its group by its `GroupLeaver`, and a
//! group that starts at the latest records keeps the start its first member found.

use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_client::{
    Admin, AutoOffsetReset, Client, GroupConfig, GroupConsumer, Producer, ProducerConfig,
    ProducerRecord,
};
use quiver_core::BrokerHandle;
use quiver_protocol::requests::LeaveGroupRequest;
use quiver_protocol::ErrorCode;

use super::harness::in_process_broker;

/// An in-process broker with topic `t` (one partition) holding `records` records.
async fn broker_with_records(dir: &std::path::Path, records: usize) -> (BrokerHandle, Client) {
    let (broker, client) = in_process_broker(dir, "t").await;
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..records {
        producer
            .send(ProducerRecord::new("t", format!("v{i}")))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    (broker, client)
}

#[test]
fn a_rewound_partition_is_read_again_not_skipped_by_the_next_commit() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (broker, client) = broker_with_records(dir.path(), 20).await;
        let mut member = GroupConsumer::join(client.clone(), GroupConfig::new("g", ["t"]))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut read = 0;
        while read < 20 {
            assert!(Instant::now() < deadline, "read {read} of 20");
            read += member
                .poll_timeout(Duration::from_millis(200))
                .await
                .unwrap()
                .len();
        }
        member.rewind("t", 0, 10);
        let mut again = Vec::new();
        while again.len() < 10 {
            assert!(
                Instant::now() < deadline,
                "read again {} of 10",
                again.len()
            );
            again.extend(
                member
                    .poll_timeout(Duration::from_millis(200))
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| r.offset),
            );
        }
        assert_eq!(again, (10..20).collect::<Vec<i64>>());
        member.close().await.unwrap();
        drop(client);
        broker.shutdown().await;
    });
}

#[test]
fn positions_read_before_a_silent_rejoin_are_not_committed_by_the_new_member() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (broker, client) = broker_with_records(dir.path(), 10).await;
        let mut config = GroupConfig::new("g", ["t"]);
        config.commit_on_revoke = false;
        let mut member = GroupConsumer::join(client.clone(), config).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut read = 0;
        while read < 10 {
            assert!(Instant::now() < deadline, "read {read} of 10");
            read += member
                .poll_timeout(Duration::from_millis(200))
                .await
                .unwrap()
                .len();
        }
        // The coordinator forgets the member; its heartbeats join again under a new id.
        let first = member.member_id();
        let leave = LeaveGroupRequest {
            group: "g".into(),
            member_id: first.clone(),
        };
        client
            .request_for_group("g", &leave, Bytes::new())
            .await
            .unwrap();
        while member.member_id() == first {
            assert!(Instant::now() < deadline, "the member never joined again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e = member
            .commit()
            .await
            .expect_err("an old membership's positions were committed by the new member");
        assert_eq!(e.code(), Some(ErrorCode::UnknownMember), "{e}");
        let described = Admin::new(client.clone())
            .describe_group("g")
            .await
            .unwrap();
        assert!(
            described.partitions.iter().all(|p| p.committed.is_none()),
            "{described:?}"
        );
        drop(member);
        drop(client);
        broker.shutdown().await;
    });
}

/// Polls until the member owns a partition (or `deadline`), returning what it read.
async fn poll_until_assigned(member: &mut GroupConsumer, deadline: Instant) -> usize {
    let mut read = 0;
    while member.assignment().is_empty() {
        assert!(Instant::now() < deadline, "the member was never assigned");
        read += member
            .poll_timeout(Duration::from_millis(100))
            .await
            .unwrap()
            .len();
    }
    read
}

#[test]
fn a_member_dropped_without_closing_is_taken_out_by_its_leaver() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (broker, client) = broker_with_records(dir.path(), 0).await;
        // A session far longer than the test: only the leave can take the member out.
        let config = GroupConfig::new("g", ["t"]).session_timeout(Duration::from_secs(600));
        let mut member = GroupConsumer::join(client.clone(), config).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        poll_until_assigned(&mut member, deadline).await;
        let leaver = member.leaver();
        // As when the task running it is aborted: no close, no LeaveGroup.
        drop(member);
        let admin = Admin::new(client.clone());
        let described = admin.describe_group("g").await.unwrap();
        assert_eq!(described.members.len(), 1, "{described:?}");
        assert!(!leaver.has_left());
        leaver.leave().await.unwrap();
        assert!(leaver.has_left());
        let described = admin.describe_group("g").await.unwrap();
        assert!(described.members.is_empty(), "{described:?}");
        // Leaving twice sends nothing and is not an error.
        leaver.leave().await.unwrap();
        drop(client);
        broker.shutdown().await;
    });
}

#[test]
fn a_group_starting_at_the_latest_records_keeps_that_start_for_the_next_member() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (broker, client) = broker_with_records(dir.path(), 5).await;
        let mut config = GroupConfig::new("g", ["t"]);
        config.auto_offset_reset = Some(AutoOffsetReset::Latest);
        let deadline = Instant::now() + Duration::from_secs(60);
        // The first member starts after the 5 records there, reads nothing, and goes away
        // without a commit of its own (as when its task is aborted).
        let mut first = GroupConsumer::join(client.clone(), config.clone())
            .await
            .unwrap();
        assert_eq!(poll_until_assigned(&mut first, deadline).await, 0);
        let leaver = first.leaver();
        drop(first);
        leaver.leave().await.unwrap();
        // Records written while the group has no member are the group's to read: the next
        // member starts where the first one did, not at the end again.
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..7 {
            producer
                .send(ProducerRecord::new("t", format!("later{i}")))
                .await
                .unwrap();
        }
        producer.flush().await.unwrap();
        let mut next = GroupConsumer::join(client.clone(), config).await.unwrap();
        let mut offsets = Vec::new();
        while offsets.len() < 7 {
            assert!(
                Instant::now() < deadline,
                "the next member read {offsets:?}, not the 7 records written between them"
            );
            offsets.extend(
                next.poll_timeout(Duration::from_millis(200))
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| r.offset),
            );
        }
        assert_eq!(offsets, (5..12).collect::<Vec<i64>>());
        next.close().await.unwrap();
        drop(client);
        broker.shutdown().await;
    });
}
