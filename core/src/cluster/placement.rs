//! Where a deployed pipeline's instances run: [`rebalance`] moves as few instances as it can
//! so that every live broker runs its share (shares differ by at most one) and no instance is
//! left on a broker that is gone. The lowest live broker proposes the result
//! (`ControllerCommand::PlacePipeline`) whenever the placement in the metadata is not
//! balanced over the live brokers, so an instance moves only when its broker left or another
//! broker has too few.

use std::collections::BTreeMap;

use super::types::BrokerId;

/// Instance number (1-based) → the broker that runs it.
pub type Placement = BTreeMap<u32, BrokerId>;

/// The placement of `instances` instances over the `live` brokers (ids, any order) closest
/// to `current`: an instance stays where it is while its broker is live and under its
/// share; the others (on brokers that left, past a broker's share, or not placed yet) go to
/// the brokers with room, lowest instance number to lowest broker id first. Brokers that
/// already run the most instances keep the larger shares. Empty when no broker is live.
pub fn rebalance(current: &Placement, instances: u32, live: &[BrokerId]) -> Placement {
    let mut live = live.to_vec();
    live.sort_unstable();
    live.dedup();
    if live.is_empty() {
        return Placement::new();
    }
    let n = live.len() as u32;
    let (base, extra) = (instances / n, instances % n);
    let mut kept: BTreeMap<BrokerId, Vec<u32>> = live.iter().map(|b| (*b, Vec::new())).collect();
    for (k, b) in current.range(1..=instances) {
        if let Some(list) = kept.get_mut(b) {
            list.push(*k);
        }
    }
    // The `extra` larger shares go to the brokers running the most now (then lowest id).
    let mut by_load: Vec<BrokerId> = live.clone();
    by_load.sort_by_key(|b| (std::cmp::Reverse(kept[b].len()), *b));
    let share: BTreeMap<BrokerId, u32> = by_load
        .iter()
        .enumerate()
        .map(|(i, b)| (*b, base + u32::from((i as u32) < extra)))
        .collect();
    let mut placed = Placement::new();
    for (b, list) in &kept {
        for k in list.iter().take(share[b] as usize) {
            placed.insert(*k, *b);
        }
    }
    let homeless: Vec<u32> = (1..=instances)
        .filter(|k| !placed.contains_key(k))
        .collect();
    let mut homeless = homeless.into_iter();
    for b in &live {
        let room = share[b] as usize - placed.values().filter(|p| *p == b).count();
        for k in homeless.by_ref().take(room) {
            placed.insert(k, *b);
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(p: &Placement, live: &[BrokerId]) -> Vec<usize> {
        live.iter()
            .map(|b| p.values().filter(|x| *x == b).count())
            .collect()
    }

    fn moved(a: &Placement, b: &Placement) -> usize {
        a.iter().filter(|(k, v)| b.get(k) != Some(v)).count()
    }

    #[test]
    fn a_fresh_pipeline_is_spread_evenly() {
        let p = rebalance(&Placement::new(), 3, &[3, 1, 2]);
        assert_eq!(p, Placement::from([(1, 1), (2, 2), (3, 3)]));
        let p = rebalance(&Placement::new(), 4, &[1, 2, 3]);
        assert_eq!(loads(&p, &[1, 2, 3]), vec![2, 1, 1]);
        assert_eq!(p.len(), 4);
        assert!(rebalance(&Placement::new(), 3, &[]).is_empty());
    }

    #[test]
    fn only_the_instances_of_a_broker_that_left_move_and_one_moves_back_when_it_returns() {
        let start = rebalance(&Placement::new(), 3, &[1, 2, 3]);
        let without_2 = rebalance(&start, 3, &[1, 3]);
        assert_eq!(moved(&start, &without_2), 1, "{without_2:?}");
        assert_eq!(without_2[&1], 1);
        assert_eq!(without_2[&3], 3);
        assert!(without_2.values().all(|b| *b != 2));
        let back = rebalance(&without_2, 3, &[1, 2, 3]);
        assert_eq!(moved(&without_2, &back), 1, "{back:?}");
        assert_eq!(loads(&back, &[1, 2, 3]), vec![1, 1, 1]);
        // Balanced already: nothing moves.
        assert_eq!(rebalance(&back, 3, &[1, 2, 3]), back);
    }

    #[test]
    fn many_instances_stay_balanced_and_sticky_as_brokers_come_and_go() {
        let mut p = rebalance(&Placement::new(), 10, &[1, 2, 3, 4]);
        assert_eq!(loads(&p, &[1, 2, 3, 4]), vec![3, 3, 2, 2]);
        let next = rebalance(&p, 10, &[1, 2, 4]);
        // Broker 3's two instances move; at most one more to even out the shares.
        assert!(moved(&p, &next) <= 3, "{p:?} → {next:?}");
        let mut l = loads(&next, &[1, 2, 4]);
        l.sort_unstable();
        assert_eq!(l, vec![3, 3, 4]);
        p = next;
        // Fewer instances: the ones past the new count go, the rest stay where they are.
        let fewer = rebalance(&p, 4, &[1, 2, 4]);
        assert_eq!(fewer.len(), 4);
        let mut l = loads(&fewer, &[1, 2, 4]);
        l.sort_unstable();
        assert_eq!(l, vec![1, 1, 2]);
        assert!(fewer.iter().filter(|(k, b)| p[k] != **b).count() <= 1);
    }
}
