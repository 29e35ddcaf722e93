//! Target assignments: given the members (with the topics each subscribes to), the
//! partition counts and the previous target, which member should own each partition.
//!
//! Pure functions, deterministic for equal inputs (members and partitions are visited in
//! sorted order). They decide only the *target*; moving there safely (revoke, confirm,
//! grant) is the coordinator's job.

use std::collections::{BTreeMap, BTreeSet};

use quiver_protocol::requests::{Strategy, TopicPartition};

/// Member id → topics it subscribes to (already resolved against the existing topics).
pub type MemberTopics = BTreeMap<String, BTreeSet<String>>;

/// Partition → owning member id.
pub type Assignment = BTreeMap<TopicPartition, String>;

/// Computes the target assignment with `strategy`. `previous` matters for `sticky` only.
pub fn assign(
    strategy: Strategy,
    members: &MemberTopics,
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
) -> Assignment {
    match strategy {
        Strategy::Range => range(members, partitions),
        Strategy::RoundRobin => round_robin(members, partitions),
        Strategy::Sticky => sticky(members, partitions, previous),
    }
}

/// Topics some member subscribes to, with their partition counts.
fn subscribed_topics<'a>(
    members: &'a MemberTopics,
    partitions: &'a BTreeMap<String, u32>,
) -> impl Iterator<Item = (&'a String, u32)> + 'a {
    partitions
        .iter()
        .filter(|(t, _)| members.values().any(|s| s.contains(*t)))
        .map(|(t, n)| (t, *n))
}

fn range(members: &MemberTopics, partitions: &BTreeMap<String, u32>) -> Assignment {
    let mut out = Assignment::new();
    for (topic, count) in subscribed_topics(members, partitions) {
        let subs: Vec<&String> = members
            .iter()
            .filter(|(_, s)| s.contains(topic))
            .map(|(m, _)| m)
            .collect();
        let k = subs.len() as u32;
        let (each, extra) = (count / k, count % k);
        let mut next = 0;
        for (i, m) in subs.iter().enumerate() {
            let n = each + u32::from((i as u32) < extra);
            for p in next..next + n {
                out.insert(TopicPartition::new(topic.clone(), p), (*m).clone());
            }
            next += n;
        }
    }
    out
}

fn round_robin(members: &MemberTopics, partitions: &BTreeMap<String, u32>) -> Assignment {
    let ids: Vec<&String> = members.keys().collect();
    let mut out = Assignment::new();
    let mut cursor = 0usize;
    for (topic, count) in subscribed_topics(members, partitions) {
        for p in 0..count {
            // At least one member subscribes to `topic`, so this finds one within a lap.
            for _ in 0..ids.len() {
                let m = ids[cursor % ids.len()];
                cursor += 1;
                if members[m].contains(topic) {
                    out.insert(TopicPartition::new(topic.clone(), p), m.clone());
                    break;
                }
            }
        }
    }
    out
}

/// Keeps every partition with its previous owner while that owner is present, subscribed
/// and not above its fair share; places the rest on the least-loaded eligible members;
/// then moves partitions one at a time from the most- to the least-loaded eligible member
/// until no two eligible members differ by more than one.
fn sticky(
    members: &MemberTopics,
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
) -> Assignment {
    let mut out = Assignment::new();
    let mut counts: BTreeMap<&String, usize> = members.keys().map(|m| (m, 0)).collect();
    let mut unplaced = Vec::new();
    for (topic, count) in subscribed_topics(members, partitions) {
        for p in 0..count {
            let tp = TopicPartition::new(topic.clone(), p);
            match previous.get(&tp) {
                Some(owner) if members.get(owner).is_some_and(|s| s.contains(topic)) => {
                    if let Some(c) = counts.get_mut(owner) {
                        *c += 1;
                    }
                    out.insert(tp, owner.clone());
                }
                _ => unplaced.push(tp),
            }
        }
    }
    for tp in unplaced {
        let best = members
            .iter()
            .filter(|(_, s)| s.contains(&tp.topic))
            .min_by_key(|(m, _)| (counts[m], *m))
            .map(|(m, _)| m);
        if let Some(m) = best {
            if let Some(c) = counts.get_mut(m) {
                *c += 1;
            }
            out.insert(tp, m.clone());
        }
    }
    // Balance. Every move lowers the sum of squared loads, so this ends; the bound is a guard.
    let total = out.len();
    for _ in 0..=total * members.len().max(1) {
        let mut by_load: Vec<(&String, usize)> = counts.iter().map(|(m, c)| (*m, *c)).collect();
        by_load.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut moved = None;
        'search: for (from, load) in &by_load {
            // Give up the newest-looking partitions first: the highest ones.
            for (tp, owner) in out.iter().rev() {
                if owner != *from {
                    continue;
                }
                let to = members
                    .iter()
                    .filter(|(m, s)| s.contains(&tp.topic) && counts[m] + 1 < *load)
                    .min_by_key(|(m, _)| (counts[m], *m))
                    .map(|(m, _)| m);
                if let Some(to) = to {
                    moved = Some((tp.clone(), (*from).clone(), to.clone()));
                    break 'search;
                }
            }
        }
        let Some((tp, from, to)) = moved else { break };
        if let Some(c) = counts.get_mut(&from) {
            *c -= 1;
        }
        if let Some(c) = counts.get_mut(&to) {
            *c += 1;
        }
        out.insert(tp, to);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str], topics: &[&str]) -> MemberTopics {
        ids.iter()
            .map(|m| {
                (
                    m.to_string(),
                    topics.iter().map(|t| t.to_string()).collect(),
                )
            })
            .collect()
    }

    fn loads(a: &Assignment) -> BTreeMap<String, usize> {
        let mut l = BTreeMap::new();
        for m in a.values() {
            *l.entry(m.clone()).or_insert(0) += 1;
        }
        l
    }

    fn parts(t: &str, n: u32) -> BTreeMap<String, u32> {
        BTreeMap::from([(t.to_string(), n)])
    }

    #[test]
    fn range_gives_contiguous_blocks() {
        let a = assign(
            Strategy::Range,
            &members(&["a", "b"], &["t"]),
            &parts("t", 5),
            &Assignment::new(),
        );
        let owners: Vec<&str> = (0..5)
            .map(|p| a[&TopicPartition::new("t", p)].as_str())
            .collect();
        assert_eq!(owners, ["a", "a", "a", "b", "b"]);
    }

    #[test]
    fn round_robin_deals_in_turn() {
        let a = assign(
            Strategy::RoundRobin,
            &members(&["a", "b", "c"], &["t"]),
            &parts("t", 4),
            &Assignment::new(),
        );
        let owners: Vec<&str> = (0..4)
            .map(|p| a[&TopicPartition::new("t", p)].as_str())
            .collect();
        assert_eq!(owners, ["a", "b", "c", "a"]);
    }

    #[test]
    fn sticky_keeps_owners_and_moves_only_what_balance_needs() {
        let two = assign(
            Strategy::Sticky,
            &members(&["a", "b"], &["t"]),
            &parts("t", 6),
            &Assignment::new(),
        );
        assert_eq!(loads(&two).values().copied().collect::<Vec<_>>(), [3, 3]);
        let three = assign(
            Strategy::Sticky,
            &members(&["a", "b", "c"], &["t"]),
            &parts("t", 6),
            &two,
        );
        assert_eq!(
            loads(&three).values().copied().collect::<Vec<_>>(),
            [2, 2, 2]
        );
        let moved = three.iter().filter(|(tp, m)| two[*tp] != **m).count();
        assert_eq!(moved, 2, "only the two partitions c takes move");
        // A member leaving: only its partitions move.
        let back = assign(
            Strategy::Sticky,
            &members(&["a", "c"], &["t"]),
            &parts("t", 6),
            &three,
        );
        for (tp, m) in &three {
            if m != "b" {
                assert_eq!(&back[tp], m, "{tp} moved though its owner stayed");
            }
        }
    }

    #[test]
    fn only_subscribers_get_a_topic() {
        let mut m = members(&["a"], &["t"]);
        m.insert("b".into(), BTreeSet::from(["u".to_string()]));
        let p = BTreeMap::from([("t".to_string(), 3), ("u".to_string(), 1)]);
        for s in [Strategy::Range, Strategy::RoundRobin, Strategy::Sticky] {
            let a = assign(s, &m, &p, &Assignment::new());
            assert_eq!(a.len(), 4, "{s:?}");
            for (tp, owner) in &a {
                assert!(m[owner].contains(&tp.topic), "{s:?}: {tp} to {owner}");
            }
        }
    }

    #[test]
    fn sticky_balances_ten_members_over_a_hundred_partitions() {
        let ids: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let a = assign(
            Strategy::Sticky,
            &members(&refs, &["t"]),
            &parts("t", 100),
            &Assignment::new(),
        );
        assert!(loads(&a).values().all(|&n| n == 10));
    }
}
