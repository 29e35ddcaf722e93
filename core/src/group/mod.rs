//! Consumer groups: membership, incremental server-side assignment, committed offsets.
//!
//! # Design
//! - **Coordinator.** Each group has one coordinator broker, chosen by hashing the group
//!   name over the live brokers ([`coordinator_for`]); with one broker, it coordinates
//!   every group. The coordinator is [`GroupCoordinator`], a pure, deterministic state
//!   machine (no tokio, no sled, no clock): every method takes `now` (ms) and a request and
//!   returns an answer plus the durable records to persist; partition counts come in as a
//!   [`TopicSnapshot`]; a regex subscription is matched against that snapshot (internal
//!   `__` topics never match). [`GroupService`] is the thin tokio layer: it owns the
//!   coordinator behind a mutex, ticks it every 100 ms (session expiry, topic changes),
//!   parks heartbeat long-polls and wakes them when something changes, and persists.
//! - **Incremental (cooperative) assignment.** The group's strategy (`range`,
//!   `round-robin`, `sticky`; sticky by default, which keeps partitions where they are
//!   whenever balance allows) computes a target. A partition moves in two steps: it is put
//!   in the old owner's `revoke` set; only after the old owner's next heartbeat no longer
//!   lists it (or the old owner left or expired) is it granted to the new owner. So a
//!   partition never has two owners in a group, and members not affected keep their
//!   partitions and keep consuming.
//! - **Heartbeat long-poll.** `Heartbeat { owned }` answers at once when the member's view
//!   is out of date (a grant it does not list, a partition it lists but does not own, or a
//!   revocation newer than the generation it sent); otherwise it waits until something
//!   changes for it or `heartbeat_interval` (session timeout / 3) passes. A rebalance is a
//!   few round trips. A member silent for `session_timeout_ms` is removed at the next tick
//!   and its partitions are freed; LeaveGroup frees them at once. The generation increases
//!   on every membership change and every assignment change.
//! - **Committed offsets.** A commit is refused, changing nothing, when the member id is
//!   unknown, its generation is older than its last revocation (or newer than the group's),
//!   or it does not own a partition. Commits, group settings (strategy, auto offset reset)
//!   and deletions are records of the internal topic `__consumer_offsets` ([`records`]),
//!   appended with the `flush = batch` policy so a commit is acknowledged only once it is
//!   on disk, and replayed at start (latest record per key wins; empty values are
//!   tombstones). Once a partition's log has grown `offsets_compact_bytes`, its live
//!   records are carried forward and the older part deleted ([`compaction`]), so a restart
//!   replays state, not history. Membership is not durable:
//!   after a restart members get `UnknownMember` and join again.
//! - A member that gets a partition starts at the committed offset, else at the group's
//!   `auto_offset_reset` (earliest or latest). Lag is high watermark − committed (from the
//!   log start when nothing is committed).

pub mod assignor;
pub mod compaction;
pub mod coordinator;
pub mod directory;
pub mod records;
pub mod service;

#[cfg(test)]
mod simulation;

pub use coordinator::{
    CoordinatorConfig, GroupCoordinator, GroupError, GroupEvent, HeartbeatAnswer, TopicSnapshot,
    DEFAULT_GROUP_MAX_SIZE,
};
pub use directory::GroupDirectory;
pub use records::{GroupRecord, OFFSETS_TOPIC};
pub use service::{GroupLogLimits, GroupService, GroupServiceError};

/// The broker coordinating `group`, among `live_brokers` (ids, in any order): a stable hash
/// of the name over the sorted ids. With one broker, that broker.
pub fn coordinator_for(group: &str, live_brokers: &[u32]) -> Option<u32> {
    let mut ids = live_brokers.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return None;
    }
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Some(ids[(h % ids.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::coordinator_for;

    #[test]
    fn one_broker_coordinates_every_group_and_the_choice_is_stable() {
        assert_eq!(coordinator_for("billing", &[7]), Some(7));
        assert_eq!(coordinator_for("billing", &[]), None);
        let a = coordinator_for("billing", &[3, 1, 2]);
        assert_eq!(a, coordinator_for("billing", &[1, 2, 3]));
    }
}
