//! [`LeaderState`]: what the leader of one partition decides about its replicas, as a pure
//! function of what it is told (its own flushed log end, each follower's fetch position,
//! and `now`). No clock, disk or network here, so every rule is unit-tested directly.
//!
//! Rules (Kafka's ISR model):
//! - the high watermark is the smallest flushed log end among the ISR, and it only moves
//!   while the ISR has at least `min.insync.replicas` members;
//! - a follower is caught up at a fetch that asks for the leader's log end (or beyond); one
//!   not caught up for `replica.lag.max.ms` leaves the ISR;
//! - a follower outside the ISR rejoins once its log end reaches the high watermark and the
//!   start of the current leader epoch;
//! - a position counts only for the broker incarnation that reported it (Kafka's KIP-903):
//!   a restarted broker may have lost its log (a wiped or restored data directory), so its
//!   first fetch replaces what the earlier incarnation reported, and a replica is proposed
//!   back into the ISR only on a position of the incarnation the cluster has registered.

use std::collections::BTreeMap;

use crate::cluster::{BrokerId, PartitionRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FollowerPosition {
    /// The follower's flushed log end (as its last fetch reported it); `None` before its
    /// first fetch.
    end: Option<i64>,
    /// The last time (ms) it was caught up: it fetched at or beyond the leader's log end
    /// then, or (Kafka's rule) a later fetch reached the end the leader had then.
    caught_up_ms: i64,
    /// The leader's log end and the time at the follower's previous fetch.
    previous_fetch: Option<(i64, i64)>,
    /// The broker incarnation whose fetches set this position (0: not known, a follower
    /// from before broker epochs, or none fetched yet).
    broker_epoch: u64,
}

impl FollowerPosition {
    fn new(now_ms: i64) -> Self {
        FollowerPosition {
            end: None,
            caught_up_ms: now_ms,
            previous_fetch: None,
            broker_epoch: 0,
        }
    }
}

/// The leader's view of one partition's replicas.
#[derive(Debug, Clone)]
pub struct LeaderState {
    me: BrokerId,
    /// The controller's leader epoch this leadership belongs to.
    pub leader_epoch: u64,
    /// The controller's partition epoch of the ISR below.
    pub partition_epoch: u64,
    /// All replicas.
    pub replicas: Vec<BrokerId>,
    /// The in-sync replicas as the controller last recorded them.
    pub isr: Vec<BrokerId>,
    /// Replicas this leader proposed to add to the ISR, not yet seen recorded: they count
    /// for the high watermark already (Kafka's "maximal ISR"), since the controller may
    /// record them, and elect one, before this broker's view shows it.
    pending: Vec<BrokerId>,
    min_isr: usize,
    /// The log end at which this leader's epoch starts.
    epoch_start: i64,
    /// The leader's own flushed log end.
    leader_end: i64,
    followers: BTreeMap<BrokerId, FollowerPosition>,
}

impl LeaderState {
    /// A new leadership of `record` by broker `me`, whose log ends (flushed) at `log_end`.
    pub fn new(
        me: BrokerId,
        record: &PartitionRecord,
        min_isr: u32,
        log_end: i64,
        now_ms: i64,
    ) -> Self {
        let followers = record
            .replicas
            .iter()
            .filter(|r| **r != me)
            .map(|r| (*r, FollowerPosition::new(now_ms)))
            .collect();
        LeaderState {
            me,
            leader_epoch: record.leader_epoch,
            partition_epoch: record.partition_epoch,
            replicas: record.replicas.clone(),
            isr: record.isr.clone(),
            pending: Vec::new(),
            min_isr: min_isr.max(1) as usize,
            epoch_start: log_end,
            leader_end: log_end,
            followers,
        }
    }

    /// The controller accepted a change of the ISR (same leader epoch) or the topic's
    /// `min.insync.replicas` changed.
    pub fn update(&mut self, record: &PartitionRecord, min_isr: u32, now_ms: i64) {
        if record.partition_epoch != self.partition_epoch {
            // The proposal was recorded (or another change won): the record says who is in.
            self.pending.clear();
        }
        self.partition_epoch = record.partition_epoch;
        self.isr = record.isr.clone();
        self.min_isr = min_isr.max(1) as usize;
        for r in &record.replicas {
            if *r != self.me {
                self.followers
                    .entry(*r)
                    .or_insert_with(|| FollowerPosition::new(now_ms));
            }
        }
        self.followers.retain(|id, _| record.replicas.contains(id));
        self.replicas = record.replicas.clone();
    }

    /// The log end at which this leadership began: until the high watermark reaches it,
    /// the watermark this broker holds is the one it had as a follower, possibly behind.
    pub fn epoch_start(&self) -> i64 {
        self.epoch_start
    }

    /// The leader flushed its log up to `end`.
    pub fn leader_flushed(&mut self, end: i64) {
        self.leader_end = self.leader_end.max(end);
    }

    /// Follower `id`, in its incarnation `broker_epoch`, fetched from `offset`, with
    /// everything below `flushed` durable on it, while the leader's log ended at
    /// `leader_log_end`. The flushed position is what counts for the high watermark; the
    /// fetch offset, for being caught up. A later incarnation's fetch replaces the position
    /// of an earlier one (which may describe a log that is gone); an earlier one's fetch,
    /// arriving late, changes nothing. False for a broker that is not a replica.
    pub fn follower_position(
        &mut self,
        id: BrokerId,
        broker_epoch: u64,
        offset: i64,
        flushed: i64,
        leader_log_end: i64,
        now_ms: i64,
    ) -> bool {
        let Some(f) = self.followers.get_mut(&id) else {
            return false;
        };
        if broker_epoch == 0 {
            // A follower from before broker epochs (a downgraded broker): its positions
            // are taken as they come, and proposed without an epoch.
            f.broker_epoch = 0;
        } else if broker_epoch < f.broker_epoch {
            return true;
        } else if broker_epoch > f.broker_epoch {
            // The earlier incarnation's position no longer counts, for the high watermark
            // or for rejoining the ISR: this fetch's replaces it below, and Kafka's rule of
            // a fetch keeping up with the previous one applies only within one incarnation.
            f.previous_fetch = None;
            f.broker_epoch = broker_epoch;
        }
        f.end = Some(flushed.min(offset));
        if offset >= leader_log_end {
            f.caught_up_ms = now_ms;
        } else if let Some((end_then, at)) = f.previous_fetch {
            // Under steady appends every fetch starts a round trip behind the leader's end;
            // one that reaches where the end was at the previous fetch kept up until then.
            if offset >= end_then {
                f.caught_up_ms = f.caught_up_ms.max(at);
            }
        }
        f.previous_fetch = Some((leader_log_end, now_ms));
        true
    }

    /// [`follower_position`](Self::follower_position) of a follower whose log is flushed up
    /// to its fetch offset.
    pub fn follower_fetched(
        &mut self,
        id: BrokerId,
        offset: i64,
        leader_log_end: i64,
        now_ms: i64,
    ) -> bool {
        self.follower_position(id, 0, offset, offset, leader_log_end, now_ms)
    }

    /// True when the ISR is large enough for the high watermark to move.
    pub fn enough_replicas(&self) -> bool {
        self.isr.len() >= self.min_isr
    }

    /// How many in-sync replicas can confirm a write now, and how many are needed: the
    /// recorded ISR minus followers that have not caught up for `lag_max_ms`. Those are
    /// about to leave the ISR; while the controller cannot record that (no quorum), an
    /// `acks=all` write is refused rather than left waiting for replicas that are gone.
    pub fn isr_size(&self, now_ms: i64, lag_max_ms: i64) -> (usize, usize) {
        let live = self
            .isr
            .iter()
            .filter(|id| {
                **id == self.me
                    || self
                        .followers
                        .get(id)
                        .is_some_and(|f| now_ms - f.caught_up_ms <= lag_max_ms)
            })
            .count();
        (live, self.min_isr)
    }

    /// The high watermark the ISR allows now; `None` while the ISR is too small or a member
    /// has not reported its position yet.
    pub fn high_watermark(&self) -> Option<i64> {
        if !self.enough_replicas() {
            return None;
        }
        let mut hw = self.leader_end;
        for id in self.isr.iter().chain(&self.pending) {
            if *id == self.me {
                continue;
            }
            hw = hw.min(self.followers.get(id)?.end?);
        }
        Some(hw)
    }

    /// The proposal was refused or not delivered: additions no longer count.
    pub fn proposal_failed(&mut self) {
        self.pending.clear();
    }

    /// This leader proposes `isr`: the replicas it adds count for the high watermark from
    /// now on, beside those of earlier proposals, until the controller's answer reaches this
    /// broker's view (`update`) or the proposal is known refused (`proposal_failed`). An
    /// earlier proposal may be recorded already: its additions never stop counting before.
    pub fn proposing(&mut self, isr: &[BrokerId]) {
        for id in isr {
            if !self.isr.contains(id) && !self.pending.contains(id) {
                self.pending.push(*id);
            }
        }
    }

    /// The ISR this leader should propose now, if it differs from the recorded one:
    /// lagging followers out, caught-up ones in. `hw` is the current high watermark;
    /// `registered` gives a broker's incarnation as this broker's view of the cluster has
    /// it: a follower is proposed in only on a position its fetches in that incarnation set
    /// (or one from a follower that sends no epoch).
    pub fn wanted_isr(
        &self,
        now_ms: i64,
        hw: i64,
        lag_max_ms: i64,
        registered: impl Fn(BrokerId) -> Option<u64>,
    ) -> Option<Vec<BrokerId>> {
        let mut isr: Vec<BrokerId> = self
            .isr
            .iter()
            .copied()
            .filter(|id| {
                *id == self.me
                    || self
                        .followers
                        .get(id)
                        .is_some_and(|f| now_ms - f.caught_up_ms <= lag_max_ms)
            })
            .collect();
        if !isr.contains(&self.me) {
            isr.insert(0, self.me);
        }
        for (id, f) in &self.followers {
            let caught_up = f
                .end
                .is_some_and(|end| end >= hw && end >= self.epoch_start);
            let this_incarnation =
                f.broker_epoch == 0 || registered(*id).is_some_and(|e| e == f.broker_epoch);
            if !isr.contains(id)
                && caught_up
                && this_incarnation
                && now_ms - f.caught_up_ms <= lag_max_ms
            {
                isr.push(*id);
            }
        }
        let mut sorted_new = isr.clone();
        sorted_new.sort_unstable();
        let mut sorted_old = self.isr.clone();
        sorted_old.sort_unstable();
        (sorted_new != sorted_old).then_some(isr)
    }

    /// The incarnations whose fetches set the positions of the replicas `isr` adds to the
    /// recorded ISR (those known): the controller refuses the change if any has registered
    /// again since.
    pub fn added_broker_epochs(&self, isr: &[BrokerId]) -> BTreeMap<BrokerId, u64> {
        isr.iter()
            .filter(|id| !self.isr.contains(id))
            .filter_map(|id| {
                let f = self.followers.get(id)?;
                (f.broker_epoch != 0).then_some((*id, f.broker_epoch))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(replicas: &[u64], isr: &[u64]) -> PartitionRecord {
        PartitionRecord {
            replicas: replicas.to_vec(),
            leader: Some(replicas[0]),
            leader_epoch: 1,
            partition_epoch: 1,
            isr: isr.to_vec(),
            target: None,
            lost: vec![],
        }
    }

    #[test]
    fn high_watermark_is_the_smallest_flushed_end_in_the_isr() {
        let mut l = LeaderState::new(1, &record(&[1, 2, 3], &[1, 2, 3]), 1, 0, 0);
        l.leader_flushed(100);
        assert_eq!(l.high_watermark(), None, "followers have not reported yet");
        l.follower_fetched(2, 80, 100, 10);
        assert_eq!(l.high_watermark(), None);
        l.follower_fetched(3, 60, 100, 10);
        assert_eq!(l.high_watermark(), Some(60));
        l.follower_fetched(3, 100, 100, 20);
        assert_eq!(l.high_watermark(), Some(80));
        l.follower_fetched(2, 120, 100, 20);
        assert_eq!(
            l.high_watermark(),
            Some(100),
            "never above the leader's own flushed end"
        );
        assert!(!l.follower_fetched(9, 1, 100, 20), "not a replica");
    }

    /// Under appends that never pause, each fetch asks from where the previous one ended,
    /// which the leader has passed by then: such a follower keeps up (Kafka's rule: caught
    /// up as of its previous fetch when it reaches the leader's end at that fetch), and
    /// stays in the ISR; one that falls further behind each time leaves it.
    #[test]
    fn a_follower_a_round_trip_behind_under_steady_appends_stays_in_sync() {
        let lag_max = 1_000;
        let mut l = LeaderState::new(1, &record(&[1, 2, 3], &[1, 2, 3]), 1, 0, 0);
        let mut leader_end = 0;
        for step in 1..=50 {
            let now = step * 100;
            // Follower 2 fetches from the leader's end at its previous fetch; follower 3
            // from half of it.
            let (two, three) = (leader_end, leader_end / 2);
            leader_end += 1_000;
            l.leader_flushed(leader_end);
            l.follower_fetched(2, two, leader_end, now);
            l.follower_fetched(3, three, leader_end, now);
        }
        let now = 5_000;
        assert_eq!(l.isr_size(now, lag_max), (2, 1), "follower 2 in, 3 out");
        assert_eq!(
            l.wanted_isr(now, l.high_watermark().unwrap_or(0), lag_max, |_| None),
            Some(vec![1, 2])
        );
    }

    #[test]
    fn a_follower_counts_for_the_high_watermark_only_as_far_as_it_flushed() {
        let mut l = LeaderState::new(1, &record(&[1, 2], &[1, 2]), 1, 0, 0);
        l.leader_flushed(100);
        // Fetched everything (caught up), flushed only the first 70.
        l.follower_position(2, 0, 100, 70, 100, 10);
        assert_eq!(l.high_watermark(), Some(70));
        assert_eq!(
            l.isr_size(10, 1_000),
            (2, 1),
            "caught up by its fetch offset"
        );
        // A flushed position beyond the fetch offset is not believed.
        l.follower_position(2, 0, 90, 95, 100, 20);
        assert_eq!(l.high_watermark(), Some(90));
        l.follower_position(2, 0, 100, 100, 100, 30);
        assert_eq!(l.high_watermark(), Some(100));
    }

    #[test]
    fn the_high_watermark_holds_while_the_isr_is_below_min_insync() {
        let mut l = LeaderState::new(1, &record(&[1, 2, 3], &[1]), 2, 0, 0);
        l.leader_flushed(50);
        assert!(!l.enough_replicas());
        assert_eq!(l.isr_size(0, 10_000), (1, 2));
        assert_eq!(l.high_watermark(), None);
        let mut r = record(&[1, 2, 3], &[1, 2]);
        r.partition_epoch = 2;
        l.update(&r, 2, 0);
        l.follower_fetched(2, 50, 50, 5);
        assert_eq!(l.high_watermark(), Some(50));
        assert_eq!(l.partition_epoch, 2);
    }

    #[test]
    fn lagging_followers_leave_and_caught_up_ones_rejoin() {
        let mut l = LeaderState::new(1, &record(&[1, 2, 3], &[1, 2, 3]), 1, 0, 0);
        l.leader_flushed(100);
        l.follower_fetched(2, 100, 100, 1_000);
        l.follower_fetched(3, 40, 100, 1_000);
        assert_eq!(
            l.wanted_isr(5_000, 40, 10_000, |_| None),
            None,
            "within the lag limit"
        );
        // Broker 3 keeps fetching but never reaches the log end for longer than the limit.
        l.follower_fetched(2, 100, 100, 11_500);
        l.follower_fetched(3, 70, 100, 11_500);
        assert_eq!(l.wanted_isr(11_500, 70, 10_000, |_| None), Some(vec![1, 2]));
        l.update(&record(&[1, 2, 3], &[1, 2]), 1, 11_500);
        assert_eq!(l.high_watermark(), Some(100), "the ISR {{1, 2}} is at 100");
        // Broker 3 catches up: it rejoins.
        l.follower_fetched(3, 100, 100, 12_000);
        assert_eq!(
            l.wanted_isr(12_000, 100, 10_000, |_| None),
            Some(vec![1, 2, 3])
        );
    }

    #[test]
    fn a_proposed_addition_holds_the_high_watermark_until_recorded() {
        let mut l = LeaderState::new(1, &record(&[1, 2, 3], &[1, 2]), 1, 0, 0);
        l.leader_flushed(100);
        l.follower_fetched(2, 100, 100, 0);
        l.follower_fetched(3, 60, 100, 0);
        assert_eq!(l.high_watermark(), Some(100));
        // Broker 3 is proposed back into the ISR: the controller may record it, and even
        // elect it, before this leader sees that, so nothing beyond its position commits.
        l.proposing(&[1, 2, 3]);
        l.leader_flushed(150);
        l.follower_fetched(2, 150, 150, 1);
        assert_eq!(l.high_watermark(), Some(60));
        l.follower_fetched(3, 150, 150, 2);
        assert_eq!(l.high_watermark(), Some(150));
        let mut r = record(&[1, 2, 3], &[1, 2, 3]);
        r.partition_epoch = 2;
        l.update(&r, 1, 3);
        assert_eq!(l.high_watermark(), Some(150));
    }

    #[test]
    fn a_later_proposal_does_not_drop_the_additions_of_one_still_in_flight() {
        let mut l = LeaderState::new(1, &record(&[1, 2, 3], &[1, 2]), 1, 0, 0);
        l.leader_flushed(100);
        l.follower_fetched(2, 100, 100, 0);
        l.follower_fetched(3, 60, 100, 0);
        l.proposing(&[1, 2, 3]);
        // The next pass wants a smaller ISR (both followers seem behind) before the answer
        // to the first came: 3 may be recorded in already, so it still counts.
        l.proposing(&[1]);
        l.leader_flushed(150);
        l.follower_fetched(2, 150, 150, 1);
        assert_eq!(l.high_watermark(), Some(60));
        l.proposal_failed();
        assert_eq!(l.high_watermark(), Some(150));
    }

    #[test]
    fn a_follower_rejoins_only_past_the_epoch_start() {
        let mut l = LeaderState::new(1, &record(&[1, 2], &[1]), 1, 500, 0);
        l.leader_flushed(500);
        // At the high watermark but below where this leader's epoch began.
        l.follower_fetched(2, 400, 500, 0);
        assert_eq!(l.wanted_isr(0, 400, 10_000, |_| None), None);
        l.follower_fetched(2, 500, 500, 1);
        assert_eq!(l.wanted_isr(1, 500, 10_000, |_| None), Some(vec![1, 2]));
    }

    /// A broker restarted with a wiped or restored data directory (a new incarnation) must
    /// not be taken back into the ISR on the position its earlier incarnation reported.
    #[test]
    fn a_restarted_brokers_earlier_position_does_not_count() {
        let mut l = LeaderState::new(1, &record(&[1, 2, 3], &[1, 3]), 1, 0, 0);
        l.leader_flushed(100);
        l.follower_position(3, 7, 100, 100, 100, 10);
        // Broker 2 (incarnation 5) is caught up, but out of the ISR (say it was fenced).
        l.follower_position(2, 5, 100, 100, 100, 10);
        assert_eq!(
            l.wanted_isr(10, 100, 10_000, |_| Some(5)),
            Some(vec![1, 3, 2])
        );
        // It registered again as incarnation 6: its position from 5 no longer proposes it.
        assert_eq!(l.wanted_isr(20, 100, 10_000, |_| Some(6)), None);
        assert_eq!(l.added_broker_epochs(&[1, 3, 2]), BTreeMap::from([(2, 5)]));
        // Incarnation 6 fetches from an empty log: that is its position now.
        l.follower_position(2, 6, 0, 0, 100, 30);
        assert_eq!(l.wanted_isr(30, 100, 10_000, |_| Some(6)), None);
        // A late fetch of incarnation 5 changes nothing.
        l.follower_position(2, 5, 100, 100, 100, 40);
        assert_eq!(l.wanted_isr(40, 100, 10_000, |_| Some(6)), None);
        // Caught up again in incarnation 6: proposed, with that epoch.
        l.follower_position(2, 6, 100, 100, 100, 50);
        assert_eq!(
            l.wanted_isr(50, 100, 10_000, |_| Some(6)),
            Some(vec![1, 3, 2])
        );
        assert_eq!(l.added_broker_epochs(&[1, 3, 2]), BTreeMap::from([(2, 6)]));
    }

    /// An ISR member whose broker restarted is still in the leader's recorded ISR until
    /// the controller's change arrives: its new, shorter log holds the high watermark.
    #[test]
    fn a_restarted_isr_members_new_position_holds_the_high_watermark() {
        let mut l = LeaderState::new(1, &record(&[1, 2], &[1, 2]), 1, 0, 0);
        l.leader_flushed(100);
        l.follower_position(2, 5, 100, 100, 100, 10);
        assert_eq!(l.high_watermark(), Some(100));
        l.leader_flushed(150);
        l.follower_position(2, 6, 0, 0, 150, 20);
        assert_eq!(l.high_watermark(), Some(0), "not the 100 of incarnation 5");
        // A fetch of incarnation 5 that arrives late does not bring its position back.
        l.follower_position(2, 5, 150, 150, 150, 30);
        assert_eq!(l.high_watermark(), Some(0));
    }
}
