//! Deterministic tests of the coordinator: simulated members heartbeat with simulated time,
//! and every step checks that no partition has two owners.

use std::collections::{BTreeMap, BTreeSet};

use quiver_protocol::requests::{
    CommitOffsetsRequest, FetchOffsetsRequest, HeartbeatRequest, JoinGroupRequest, OffsetCommit,
    Strategy, Subscription, TopicPartition,
};

use super::coordinator::{CoordinatorConfig, GroupCoordinator, GroupError, GroupEvent};
use super::TopicSnapshot;

const G: &str = "g";

/// A well-behaved simulated member: owns what it was assigned, releases what is revoked.
struct Sim {
    id: String,
    generation: u64,
    owned: BTreeSet<TopicPartition>,
}

fn snapshot(topic: &str, n: u32) -> TopicSnapshot {
    BTreeMap::from([(topic.to_string(), n)])
}

fn coordinator() -> GroupCoordinator {
    GroupCoordinator::new(CoordinatorConfig::default())
}

fn join(c: &mut GroupCoordinator, now: u64, name: &str, snap: &TopicSnapshot) -> Sim {
    let (r, _) = c
        .join(
            now,
            &JoinGroupRequest {
                group: G.into(),
                member_id: None,
                client_id: name.into(),
                subscription: Subscription::Topics(vec!["t".into()]),
                session_timeout_ms: 3000,
                strategy: Some(Strategy::Sticky),
                auto_offset_reset: None,
            },
            snap,
        )
        .unwrap();
    assert!(c.owners_are_unique());
    Sim {
        id: r.member_id,
        generation: r.generation,
        owned: BTreeSet::new(),
    }
}

fn hb_req(m: &Sim) -> HeartbeatRequest {
    HeartbeatRequest {
        group: G.into(),
        member_id: m.id.clone(),
        generation: m.generation,
        owned: m.owned.iter().cloned().collect(),
    }
}

/// One heartbeat of `m`; applies the answer. Returns whether the answer was "ready".
fn heartbeat(c: &mut GroupCoordinator, now: u64, m: &mut Sim) -> bool {
    let a = c.heartbeat(now, &hb_req(m)).unwrap();
    assert!(c.owners_are_unique());
    m.generation = a.response.generation;
    m.owned = a.response.assignment.iter().cloned().collect();
    a.ready
}

/// Heartbeats every member in turn until a whole round needs no immediate answer; returns
/// the number of rounds.
fn settle(c: &mut GroupCoordinator, now: u64, ms: &mut [Sim]) -> usize {
    for round in 1..=50 {
        let mut any = false;
        for m in ms.iter_mut() {
            any |= heartbeat(c, now, m);
        }
        if !any {
            return round;
        }
    }
    panic!("did not settle in 50 rounds");
}

fn owned_by(ms: &[Sim]) -> BTreeMap<TopicPartition, String> {
    let mut out = BTreeMap::new();
    for m in ms {
        for tp in &m.owned {
            assert!(
                out.insert(tp.clone(), m.id.clone()).is_none(),
                "{tp} owned twice"
            );
        }
    }
    out
}

#[test]
fn a_lone_member_gets_every_partition() {
    let mut c = coordinator();
    let snap = snapshot("t", 6);
    let mut a = join(&mut c, 0, "a", &snap);
    assert!(
        heartbeat(&mut c, 10, &mut a),
        "the grant is answered at once"
    );
    assert_eq!(a.owned.len(), 6);
    assert!(
        !heartbeat(&mut c, 20, &mut a),
        "nothing new: the heartbeat may wait"
    );
}

#[test]
fn a_joining_member_only_takes_what_it_needs_and_waits_for_the_release() {
    let mut c = coordinator();
    let snap = snapshot("t", 6);
    let mut ms = vec![join(&mut c, 0, "a", &snap)];
    settle(&mut c, 0, &mut ms);
    ms.push(join(&mut c, 1, "b", &snap));
    settle(&mut c, 1, &mut ms);
    let before = owned_by(&ms);
    c.drain_events();
    ms.push(join(&mut c, 2, "c", &snap));
    // c gets nothing before the others release.
    let mut c_member = ms.pop().unwrap();
    assert!(!heartbeat(&mut c, 3, &mut c_member));
    assert!(c_member.owned.is_empty());
    ms.push(c_member);
    settle(&mut c, 3, &mut ms);
    let after = owned_by(&ms);
    assert_eq!(after.len(), 6);
    let moved: Vec<&TopicPartition> = after
        .iter()
        .filter(|(tp, m)| before.get(*tp) != Some(*m))
        .map(|(tp, _)| tp)
        .collect();
    assert_eq!(moved.len(), 2, "only the two partitions c takes move");
    assert!(moved.iter().all(|tp| after[*tp] == ms[2].id));
    // Revocation order: for every moved partition, revoking → released → granted.
    let events = c.drain_events();
    for tp in moved {
        let pos = |pred: &dyn Fn(&GroupEvent) -> bool| events.iter().position(pred);
        let revoked = pos(
            &|e| matches!(e, GroupEvent::Revoking { partitions, .. } if partitions.contains(tp)),
        );
        let released = pos(
            &|e| matches!(e, GroupEvent::Released { partitions, .. } if partitions.contains(tp)),
        );
        let granted = pos(
            &|e| matches!(e, GroupEvent::Granted { partitions, .. } if partitions.contains(tp)),
        );
        assert!(
            revoked < released && released < granted && revoked.is_some(),
            "{tp}: {revoked:?} {released:?} {granted:?}"
        );
    }
    // Members untouched by the move were never asked to revoke anything.
    let revoked_from: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match e {
            GroupEvent::Revoking { member, .. } => Some(member.clone()),
            _ => None,
        })
        .collect();
    for m in &ms[..2] {
        let kept = before.iter().filter(|(_, o)| **o == m.id).count();
        let now = after.iter().filter(|(_, o)| **o == m.id).count();
        if kept == now {
            assert!(!revoked_from.contains(&m.id));
        }
    }
}

#[test]
fn a_heartbeat_while_revoking_waits_instead_of_spinning() {
    let mut c = coordinator();
    let snap = snapshot("t", 4);
    let mut a = join(&mut c, 0, "a", &snap);
    heartbeat(&mut c, 0, &mut a);
    let _b = join(&mut c, 1, "b", &snap);
    // a learns of the revocation once.
    let r = c.heartbeat(2, &hb_req(&a)).unwrap();
    assert!(r.ready);
    assert_eq!(r.response.revoke.len(), 2);
    a.generation = r.response.generation;
    // Still holding them (committing): not ready, so the long-poll parks.
    assert!(!c.heartbeat(3, &hb_req(&a)).unwrap().ready);
}

#[test]
fn an_expired_member_loses_its_partitions_to_the_others() {
    let mut c = coordinator();
    let snap = snapshot("t", 6);
    let mut ms = vec![join(&mut c, 0, "a", &snap), join(&mut c, 0, "b", &snap)];
    settle(&mut c, 0, &mut ms);
    let dead = ms.pop().unwrap();
    // a keeps heartbeating; b goes silent.
    for now in (500..=3000).step_by(500) {
        heartbeat(&mut c, now, &mut ms[0]);
        c.tick(now, &snap);
    }
    assert_eq!(ms[0].owned.len(), 3, "3000 ms is not past the session yet");
    heartbeat(&mut c, 3001, &mut ms[0]);
    c.tick(3001, &snap);
    assert!(c
        .drain_events()
        .iter()
        .any(|e| matches!(e, GroupEvent::Expired { member, .. } if *member == dead.id)));
    settle(&mut c, 3002, &mut ms);
    assert_eq!(ms[0].owned.len(), 6);
    // The expired member is told it is unknown.
    assert!(matches!(
        c.heartbeat(3003, &hb_req(&dead)),
        Err(GroupError::UnknownMember { .. })
    ));
}

#[test]
fn leaving_frees_partitions_at_once_and_sticky_keeps_the_rest() {
    let mut c = coordinator();
    let snap = snapshot("t", 9);
    let mut ms: Vec<Sim> = ["a", "b", "c"]
        .iter()
        .map(|n| join(&mut c, 0, n, &snap))
        .collect();
    settle(&mut c, 0, &mut ms);
    let before = owned_by(&ms);
    let gone = ms.remove(1);
    c.leave(G, &gone.id, &snap).unwrap();
    settle(&mut c, 1, &mut ms);
    let after = owned_by(&ms);
    assert_eq!(after.len(), 9);
    for (tp, m) in &before {
        if *m != gone.id {
            assert_eq!(&after[tp], m, "{tp} moved though its owner stayed");
        }
    }
}

#[test]
fn a_full_group_refuses_new_members_and_changes_nothing() {
    let mut c = GroupCoordinator::new(CoordinatorConfig {
        max_members: 2,
        ..CoordinatorConfig::default()
    });
    let snap = snapshot("t", 4);
    let mut ms = vec![join(&mut c, 0, "a", &snap), join(&mut c, 0, "b", &snap)];
    settle(&mut c, 0, &mut ms);
    let none = |_: &str, _: u32| None;
    let before = c.describe(G, &snap, &none).unwrap();
    let third = JoinGroupRequest {
        group: G.into(),
        member_id: None,
        client_id: "c".into(),
        subscription: Subscription::Topics(vec!["t".into()]),
        session_timeout_ms: 3000,
        strategy: None,
        auto_offset_reset: None,
    };
    let refused = c.join(1, &third, &snap).unwrap_err();
    assert!(
        matches!(&refused, GroupError::GroupFull { members: 2, .. }),
        "{refused:?}"
    );
    assert_eq!(
        refused.code(),
        quiver_protocol::ErrorCode::GroupMaxSizeReached
    );
    assert!(refused.to_string().contains("group_max_size"), "{refused}");
    assert_eq!(
        c.describe(G, &snap, &none).unwrap(),
        before,
        "the refusal changed nothing"
    );
    // A member already in the group joins again as before.
    let again = JoinGroupRequest {
        member_id: Some(ms[0].id.clone()),
        client_id: "a".into(),
        ..third.clone()
    };
    assert_eq!(c.join(1, &again, &snap).unwrap().0.member_id, ms[0].id);
    // One leaves: a new member fits.
    c.leave(G, &ms[1].id, &snap).unwrap();
    c.join(2, &third, &snap).unwrap();
}

#[test]
fn commits_are_checked_and_a_refused_commit_changes_nothing() {
    let mut c = coordinator();
    let snap = snapshot("t", 2);
    let mut ms = vec![join(&mut c, 0, "a", &snap), join(&mut c, 0, "b", &snap)];
    settle(&mut c, 0, &mut ms);
    let mine = ms[0].owned.iter().next().unwrap().clone();
    let theirs = ms[1].owned.iter().next().unwrap().clone();
    let commit = |tp: &TopicPartition, generation: u64, id: &str| CommitOffsetsRequest {
        group: G.into(),
        member_id: id.into(),
        generation,
        offsets: vec![OffsetCommit {
            topic: tp.topic.clone(),
            partition: tp.partition,
            offset: 5,
            metadata: Some("x".into()),
        }],
    };
    let all = FetchOffsetsRequest {
        group: G.into(),
        partitions: None,
    };
    let m = &ms[0];
    assert!(matches!(
        c.commit(&commit(&mine, m.generation, "forged")),
        Err(GroupError::UnknownMember { .. })
    ));
    assert!(matches!(
        c.commit(&commit(&theirs, m.generation, &m.id)),
        Err(GroupError::NotPartitionOwner { .. })
    ));
    assert!(matches!(
        c.commit(&commit(&mine, m.generation + 100, &m.id)),
        Err(GroupError::StaleGeneration { .. })
    ));
    let mut huge = commit(&mine, m.generation, &m.id);
    huge.offsets[0].metadata = Some("m".repeat(super::coordinator::MAX_OFFSET_METADATA_BYTES + 1));
    assert!(matches!(c.commit(&huge), Err(GroupError::Invalid(e)) if e.contains("4096")));
    // The same partition many times in one commit (each entry a record, each a copy of
    // the group's name, in one batch) is refused.
    let mut repeated = commit(&mine, m.generation, &m.id);
    repeated.offsets = vec![repeated.offsets[0].clone(); 1000];
    assert!(
        matches!(c.commit(&repeated), Err(GroupError::Invalid(e)) if e.contains("more than once"))
    );
    assert!(
        c.fetch_offsets(&all).offsets.is_empty(),
        "refusals changed nothing"
    );
    let (_, recs) = c.commit(&commit(&mine, m.generation, &m.id)).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(c.fetch_offsets(&all).offsets[0].offset, Some(5));
    // A fetch naming a partition many times answers it once (its metadata is not copied
    // into the answer once per mention).
    let asked = FetchOffsetsRequest {
        group: G.into(),
        partitions: Some(vec![mine.clone(); 10_000]),
    };
    let answer = c.fetch_offsets(&asked).offsets;
    assert_eq!(answer.len(), 1);
    assert_eq!(
        (answer[0].offset, answer[0].metadata.as_deref()),
        (Some(5), Some("x"))
    );
    // A third member joins; whoever loses a partition has a stale generation until it
    // heartbeats.
    ms.push(join(&mut c, 1, "c", &snap));
    let loser = ms.iter().position(|m| {
        let r = c.poll_heartbeat(&hb_req(m)).unwrap();
        !r.response.revoke.is_empty()
    });
    if let Some(i) = loser {
        let m = &ms[i];
        let tp = m.owned.iter().next().unwrap().clone();
        assert!(matches!(
            c.commit(&commit(&tp, m.generation, &m.id)),
            Err(GroupError::StaleGeneration { .. })
        ));
        let mut m = Sim {
            id: m.id.clone(),
            generation: m.generation,
            owned: m.owned.clone(),
        };
        let a = c.heartbeat(2, &hb_req(&m)).unwrap();
        m.generation = a.response.generation;
        // Still owned while revoking: the commit before release is accepted.
        c.commit(&commit(&tp, m.generation, &m.id)).unwrap();
    }
}

#[test]
fn durable_records_replay_to_the_same_state() {
    let mut c = coordinator();
    let snap = snapshot("t", 2);
    let mut ms = vec![join(&mut c, 0, "a", &snap)];
    settle(&mut c, 0, &mut ms);
    let mut log = Vec::new();
    let (_, recs) = c
        .join(
            0,
            &JoinGroupRequest {
                group: "other".into(),
                member_id: None,
                client_id: "x".into(),
                subscription: Subscription::Pattern("t.*".into()),
                session_timeout_ms: 1000,
                strategy: Some(Strategy::Range),
                auto_offset_reset: None,
            },
            &snap,
        )
        .unwrap();
    log.extend(recs);
    let m = &ms[0];
    let (_, recs) = c
        .commit(&CommitOffsetsRequest {
            group: G.into(),
            member_id: m.id.clone(),
            generation: m.generation,
            offsets: vec![OffsetCommit {
                topic: "t".into(),
                partition: 1,
                offset: 7,
                metadata: None,
            }],
        })
        .unwrap();
    log.extend(recs);
    assert!(matches!(
        c.reset_offsets(G, "t", &[(0, 1)]),
        Err(GroupError::GroupNotEmpty { .. })
    ));
    assert!(matches!(c.delete(G), Err(GroupError::GroupNotEmpty { .. })));
    c.leave(G, &m.id, &snap).unwrap();
    log.extend(c.reset_offsets(G, "t", &[(0, 3)]).unwrap());
    log.extend(c.reset_offsets("fresh", "t", &[(0, 0)]).unwrap());
    log.extend(c.delete("fresh").unwrap().1);
    // Replay into a new coordinator: same groups, same offsets.
    let mut r = coordinator();
    for rec in &log {
        let (k, v) = rec.encode();
        r.apply(&super::records::GroupRecord::decode(&k, &v).unwrap());
    }
    let all = |c: &GroupCoordinator, g: &str| {
        c.fetch_offsets(&FetchOffsetsRequest {
            group: g.into(),
            partitions: None,
        })
    };
    assert_eq!(all(&r, G), all(&c, G));
    assert_eq!(all(&r, G).offsets.len(), 2);
    let names = |c: &GroupCoordinator| {
        c.list()
            .groups
            .into_iter()
            .map(|g| (g.group, g.strategy))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&r),
        vec![
            ("g".into(), "sticky".into()),
            ("other".into(), "range".into())
        ]
    );
    assert_eq!(names(&r), names(&c));
}

#[test]
fn a_pattern_subscription_picks_up_a_new_topic_at_the_next_tick() {
    let mut c = coordinator();
    let mut snap = snapshot("t", 1);
    let (r, _) = c
        .join(
            0,
            &JoinGroupRequest {
                group: G.into(),
                member_id: None,
                client_id: "a".into(),
                subscription: Subscription::Pattern("t|u.*".into()),
                session_timeout_ms: 1000,
                strategy: None,
                auto_offset_reset: None,
            },
            &snap,
        )
        .unwrap();
    let mut a = Sim {
        id: r.member_id,
        generation: r.generation,
        owned: BTreeSet::new(),
    };
    settle(&mut c, 0, std::slice::from_mut(&mut a));
    assert_eq!(a.owned.len(), 1);
    snap.insert("u1".into(), 2);
    snap.insert("__consumer_offsets".into(), 1);
    c.tick(10, &snap);
    settle(&mut c, 10, std::slice::from_mut(&mut a));
    assert_eq!(
        a.owned.len(),
        3,
        "t/0 and u1/0..2, never the internal topic"
    );
}

#[test]
fn ten_members_over_a_hundred_partitions_rebalance_in_a_few_round_trips() {
    let mut c = coordinator();
    let snap = snapshot("t", 100);
    let mut ms: Vec<Sim> = Vec::new();
    for i in 0..9 {
        ms.push(join(&mut c, 0, &format!("m{i}"), &snap));
    }
    settle(&mut c, 0, &mut ms);
    let before = owned_by(&ms);
    ms.push(join(&mut c, 1, "m9", &snap));
    let rounds = settle(&mut c, 1, &mut ms);
    let after = owned_by(&ms);
    assert_eq!(after.len(), 100);
    let loads: BTreeSet<usize> = ms.iter().map(|m| m.owned.len()).collect();
    assert_eq!(loads, BTreeSet::from([10]));
    let moved = after
        .iter()
        .filter(|(tp, m)| before.get(*tp) != Some(*m))
        .count();
    assert_eq!(moved, 10, "only the new member's share moves");
    // Revoke, release and grant, then a quiet round.
    assert!(rounds <= 4, "took {rounds} rounds");
}

/// A client id is part of the member id, kept for the session: a huge one is refused; so
/// is a subscription naming the broker's own offsets topic. Neither touches the group.
#[test]
fn a_huge_client_id_or_an_internal_topic_is_refused_and_changes_nothing() {
    let mut c = coordinator();
    let snap = snapshot("t", 2);
    let req = JoinGroupRequest {
        group: G.into(),
        member_id: None,
        client_id: "c".repeat(super::coordinator::MAX_CLIENT_ID_BYTES + 1),
        subscription: Subscription::Topics(vec!["t".into()]),
        session_timeout_ms: 3000,
        strategy: Some(Strategy::Sticky),
        auto_offset_reset: None,
    };
    assert!(matches!(
        c.join(0, &req, &snap),
        Err(GroupError::Invalid(_))
    ));
    let internal = JoinGroupRequest {
        client_id: "c".into(),
        subscription: Subscription::Topics(vec!["t".into(), "__consumer_offsets".into()]),
        ..req.clone()
    };
    assert!(
        matches!(c.join(0, &internal, &snap), Err(GroupError::Invalid(e)) if e.contains("internal"))
    );
    // Sizes the broker would keep and scan on every rebalance are bounded too.
    let many = JoinGroupRequest {
        client_id: "c".into(),
        subscription: Subscription::Topics(vec![
            "t".into();
            super::coordinator::MAX_SUBSCRIBED_TOPICS + 1
        ]),
        ..req.clone()
    };
    let long_pattern = JoinGroupRequest {
        client_id: "c".into(),
        subscription: Subscription::Pattern("t".repeat(super::coordinator::MAX_PATTERN_BYTES + 1)),
        ..req.clone()
    };
    let bad_name = JoinGroupRequest {
        client_id: "c".into(),
        subscription: Subscription::Topics(vec!["t".into(), String::new()]),
        ..req.clone()
    };
    for (r, needle) in [
        (many, "at most"),
        (long_pattern, "at most"),
        (bad_name, "subscription: topic name"),
    ] {
        assert!(
            matches!(c.join(0, &r, &snap), Err(GroupError::Invalid(ref e)) if e.contains(needle)),
            "{:?}",
            c.join(0, &r, &snap)
        );
    }
    assert!(c.list().groups.is_empty());
    let m = join(
        &mut c,
        0,
        &"c".repeat(super::coordinator::MAX_CLIENT_ID_BYTES),
        &snap,
    );
    // A heartbeat cannot make the coordinator build a set of millions of partitions.
    let huge = HeartbeatRequest {
        group: G.into(),
        member_id: m.id.clone(),
        generation: 0,
        owned: vec![
            TopicPartition::new("t".to_string(), 0);
            super::coordinator::MAX_OWNED_PARTITIONS + 1
        ],
    };
    assert!(matches!(c.heartbeat(0, &huge), Err(GroupError::Invalid(_))));
}

/// A subscription listing a topic many times counts it once; ticks that see the same
/// topics change nothing, and one that sees a subscribed topic grow rebalances. A heartbeat
/// listing an owned partition twice is refused.
#[test]
fn repeated_names_count_once_and_only_changed_topics_rebalance_at_a_tick() {
    let mut c = coordinator();
    let mut snap: TopicSnapshot = BTreeMap::from([
        ("t".to_string(), 2),
        ("u".to_string(), 2),
        ("v".to_string(), 1),
    ]);
    let mut topics = vec!["t".to_string(); super::coordinator::MAX_SUBSCRIBED_TOPICS - 2];
    topics.push("u".into());
    topics.push("not-yet".into());
    let mut ms: Vec<Sim> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let (r, _) = c
                .join(
                    0,
                    &JoinGroupRequest {
                        group: G.into(),
                        member_id: None,
                        client_id: name.into(),
                        subscription: Subscription::Topics(topics.clone()),
                        session_timeout_ms: 3000,
                        strategy: Some(Strategy::Sticky),
                        auto_offset_reset: None,
                    },
                    &snap,
                )
                .unwrap();
            Sim {
                id: r.member_id,
                generation: r.generation,
                owned: BTreeSet::new(),
            }
        })
        .collect();
    settle(&mut c, 0, &mut ms);
    assert_eq!(owned_by(&ms).len(), 4, "t/0, t/1, u/0, u/1");
    let generation = ms[0].generation;
    for now in 1..=5 {
        c.tick(now, &snap);
    }
    assert_eq!(settle(&mut c, 5, &mut ms), 1, "nothing to answer at once");
    assert_eq!(ms[0].generation, generation);
    snap.insert("u".into(), 4);
    snap.insert("not-yet".into(), 1);
    c.tick(6, &snap);
    settle(&mut c, 6, &mut ms);
    assert!(ms[0].generation > generation);
    assert_eq!(owned_by(&ms).len(), 7, "t/0..2, u/0..4, not-yet/0");
    let mut twice = hb_req(&ms[0]);
    twice.owned.push(twice.owned[0].clone());
    assert!(matches!(
        c.heartbeat(7, &twice),
        Err(GroupError::Invalid(e)) if e.contains("more than once")
    ));
}

/// Partitions a topic gains start at offset 0 for the groups that committed offsets of that
/// topic (all their records came after those groups began), each new partition the group
/// has no commit for; a group without commits on the topic's other partitions is left alone.
#[test]
fn new_partitions_start_at_zero_for_groups_reading_the_topic() {
    use super::records::GroupRecord;
    let mut c = coordinator();
    c.reset_offsets("reads-t", "t", &[(0, 5), (1, 7)]).unwrap();
    c.reset_offsets("reads-u", "u", &[(0, 3)]).unwrap();
    c.reset_offsets("already", "t", &[(0, 1), (2, 4)]).unwrap();
    c.reset_offsets("only-new", "t", &[(3, 9)]).unwrap();
    let records = c.prepare_start_new_partitions("t", 2..4);
    let started: Vec<(&str, u32, i64)> = records
        .iter()
        .map(|r| match r {
            GroupRecord::Offset { group, tp, value } => {
                assert_eq!((tp.topic.as_str(), value.metadata.as_deref()), ("t", None));
                (group.as_str(), tp.partition, value.offset)
            }
            other => panic!("only offsets are written: {other:?}"),
        })
        .collect();
    assert_eq!(
        started,
        [("already", 3, 0), ("reads-t", 2, 0), ("reads-t", 3, 0)],
        "a partition with a commit keeps it"
    );
    for r in &records {
        c.apply(r);
    }
    assert!(
        c.prepare_start_new_partitions("t", 2..4).is_empty(),
        "started once"
    );
    assert!(c.prepare_start_new_partitions("v", 0..2).is_empty());
}
