//! A Jepsen-style checker of a replicated log (modelled on Jepsen's Kafka checker, written
//! here): values are unique; a send is *acknowledged* with an offset, or failed. Given every
//! send and a final read of every partition after the faults healed, it counts:
//! - `lost`: acknowledged values that the final read does not hold;
//! - `duplicated`: values read at more than one offset;
//! - `inconsistent_offsets`: an acknowledged offset holding another value (or the value at
//!   another offset than acknowledged);
//! - `nonmonotonic_send`: per producer and partition, acknowledged offsets that go down in
//!   send order (reordered);
//! - `unacknowledged_seen`: failed sends that were written anyway (allowed: informational).

use std::collections::{BTreeMap, HashMap};

/// One send and what the producer was told.
#[derive(Debug, Clone)]
pub struct Send {
    pub producer: u32,
    pub partition: u32,
    /// Position in the producer's send order.
    pub seq: u64,
    pub value: String,
    /// The acknowledged offset; `None` when the send failed.
    pub acked: Option<i64>,
}

/// The checker's counts; any non-zero field but `unacknowledged_seen` fails a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub acknowledged: u64,
    pub read: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub inconsistent_offsets: u64,
    pub nonmonotonic_send: u64,
    pub unacknowledged_seen: u64,
}

impl Verdict {
    /// True when nothing acknowledged was lost, doubled, moved or reordered.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.inconsistent_offsets == 0
            && self.nonmonotonic_send == 0
    }
}

/// Checks `sends` against `reads` (partition → offset → value of the final read).
pub fn check(sends: &[Send], reads: &BTreeMap<u32, BTreeMap<i64, String>>) -> Verdict {
    let mut v = Verdict::default();
    let mut where_read: HashMap<&str, Vec<(u32, i64)>> = HashMap::new();
    for (p, offsets) in reads {
        for (o, value) in offsets {
            v.read += 1;
            where_read.entry(value.as_str()).or_default().push((*p, *o));
        }
    }
    v.duplicated = where_read.values().filter(|at| at.len() > 1).count() as u64;
    let mut per_producer: BTreeMap<(u32, u32), Vec<(u64, i64)>> = BTreeMap::new();
    for s in sends {
        match s.acked {
            Some(offset) => {
                v.acknowledged += 1;
                per_producer
                    .entry((s.producer, s.partition))
                    .or_default()
                    .push((s.seq, offset));
                match where_read.get(s.value.as_str()) {
                    None => v.lost += 1,
                    Some(at) => {
                        if !at.contains(&(s.partition, offset)) {
                            v.inconsistent_offsets += 1;
                        }
                    }
                }
            }
            None => {
                if where_read.contains_key(s.value.as_str()) {
                    v.unacknowledged_seen += 1;
                }
            }
        }
    }
    for acks in per_producer.values_mut() {
        acks.sort_unstable();
        v.nonmonotonic_send += acks.windows(2).filter(|w| w[1].1 <= w[0].1).count() as u64;
    }
    v
}

/// Each reordered pair, with the producer's sends to that partition around it (failed ones
/// too), for the report of a failed run.
pub fn describe_reorders(sends: &[Send]) -> Vec<String> {
    let mut per: BTreeMap<(u32, u32), Vec<&Send>> = BTreeMap::new();
    for s in sends {
        per.entry((s.producer, s.partition)).or_default().push(s);
    }
    let mut out = Vec::new();
    for ((producer, partition), mut list) in per {
        list.sort_by_key(|s| s.seq);
        let acked: Vec<(usize, i64)> = list
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.acked.map(|o| (i, o)))
            .collect();
        for w in acked.windows(2) {
            if w[1].1 <= w[0].1 {
                let (from, to) = (w[0].0.saturating_sub(3), (w[1].0 + 4).min(list.len()));
                let around: Vec<String> = list[from..to]
                    .iter()
                    .map(|s| format!("seq {} {} -> {:?}", s.seq, s.value, s.acked))
                    .collect();
                out.push(format!(
                    "producer {producer} partition {partition}: {}",
                    around.join("; ")
                ));
            }
        }
    }
    out
}

/// Counts `error` in `failures` by its text without numbers (the first 90 characters), so
/// a soak's summary groups failures of one kind.
pub fn tally_failure(failures: &mut BTreeMap<String, u64>, error: &quiver_client::ClientError) {
    let text: String = error
        .to_string()
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(90)
        .collect();
    *failures.entry(text).or_default() += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(producer: u32, seq: u64, value: &str, acked: Option<i64>) -> Send {
        Send {
            producer,
            partition: 0,
            seq,
            value: value.into(),
            acked,
        }
    }

    fn read(pairs: &[(i64, &str)]) -> BTreeMap<u32, BTreeMap<i64, String>> {
        BTreeMap::from([(0, pairs.iter().map(|(o, v)| (*o, v.to_string())).collect())])
    }

    #[test]
    fn a_clean_history_passes() {
        let sends = [
            send(1, 0, "a", Some(0)),
            send(1, 1, "b", Some(1)),
            send(2, 0, "c", None),
        ];
        let v = check(&sends, &read(&[(0, "a"), (1, "b"), (2, "c")]));
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.acknowledged, v.read, v.unacknowledged_seen), (2, 3, 1));
    }

    #[test]
    fn every_anomaly_is_counted() {
        let sends = [
            send(1, 0, "a", Some(0)),
            send(1, 1, "b", Some(1)),
            send(1, 2, "c", Some(2)),
            send(2, 0, "d", Some(5)),
            send(2, 1, "e", Some(4)),
        ];
        // "b" lost, "c" at another offset, "a" twice, producer 2 reordered.
        let v = check(
            &sends,
            &read(&[(0, "a"), (3, "a"), (6, "c"), (5, "d"), (4, "e")]),
        );
        assert_eq!(
            v,
            Verdict {
                acknowledged: 5,
                read: 5,
                lost: 1,
                duplicated: 1,
                inconsistent_offsets: 1,
                nonmonotonic_send: 1,
                unacknowledged_seen: 0,
            }
        );
        assert!(!v.ok());
    }
}
