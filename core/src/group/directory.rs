//! [`GroupDirectory`]: which [`GroupService`] coordinates a group on this broker.
//!
//! A lone broker has one service for every group. A cluster broker has one per partition of
//! `__consumer_offsets` that it leads (the replica manager opens a service when this broker
//! becomes that partition's leader, replaying the partition, and drops it when it stops
//! leading); a group's partition is [`coordinator_partition`] of its name, and a request
//! for a group coordinated elsewhere is refused with `NotLeader`, so the client refreshes
//! its metadata and goes to the partition's leader.
//!
//! Transactions live beside groups: the [`TxnCoordinator`] of an offsets partition serves
//! the transactional ids that hash to it, and stores their state in that partition.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use quiver_protocol::requests::coordinator_partition;
use tokio::sync::watch;

use super::{GroupService, GroupServiceError};
use crate::txn::{TxnCoordinator, TxnError};

struct Led {
    leader_epoch: u64,
    service: Arc<GroupService>,
    txns: Arc<TxnCoordinator>,
    /// Stops the service's ticker when the entry goes.
    _stop: watch::Sender<bool>,
}

/// See the module documentation.
pub struct GroupDirectory {
    lone: std::sync::OnceLock<(Arc<GroupService>, Arc<TxnCoordinator>)>,
    led: RwLock<BTreeMap<u32, Led>>,
    partitions: AtomicU32,
}

impl GroupDirectory {
    /// An empty directory: a cluster broker's until it leads partitions of the offsets
    /// topic; a lone broker's until [`set_lone`](Self::set_lone).
    pub fn new() -> Arc<GroupDirectory> {
        Arc::new(GroupDirectory {
            lone: std::sync::OnceLock::new(),
            led: RwLock::default(),
            partitions: AtomicU32::new(0),
        })
    }

    /// A lone broker: `service` coordinates every group and `txns` every transaction
    /// (their tickers are the caller's).
    pub fn set_lone(&self, service: Arc<GroupService>, txns: Arc<TxnCoordinator>) {
        self.partitions.store(1, Ordering::Release);
        let _ = self.lone.set((service, txns));
    }

    /// The services of offsets partition `p`, if this broker serves it.
    fn at(&self, p: u32) -> Option<(Arc<GroupService>, Arc<TxnCoordinator>)> {
        if let Some((s, t)) = self.lone.get() {
            return (p == 0).then(|| (s.clone(), t.clone()));
        }
        self.led
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p)
            .map(|l| (l.service.clone(), l.txns.clone()))
    }

    /// The services of the offsets partition `name` hashes to, if this broker leads it
    /// (else that partition).
    fn serving(&self, name: &str) -> Result<(Arc<GroupService>, Arc<TxnCoordinator>), u32> {
        let n = self.partitions.load(Ordering::Acquire);
        let p = coordinator_partition(name, n);
        self.at(p).filter(|_| n > 0).ok_or(p)
    }

    /// The service coordinating `group` here, or `NotCoordinator`.
    pub fn for_group(&self, group: &str) -> Result<Arc<GroupService>, GroupServiceError> {
        self.serving(group)
            .map(|(s, _)| s)
            .map_err(|partition| GroupServiceError::NotCoordinator {
                group: group.to_string(),
                partition,
            })
    }

    /// The coordinator of transactional id `id` here, or `NotCoordinator`.
    pub fn for_txn(&self, id: &str) -> Result<Arc<TxnCoordinator>, TxnError> {
        self.serving(id)
            .map(|(_, t)| t)
            .map_err(|partition| TxnError::NotCoordinator {
                id: id.to_string(),
                partition,
            })
    }

    /// The group service of offsets partition `p`, if this broker serves it.
    pub fn service_at(&self, p: u32) -> Option<Arc<GroupService>> {
        self.at(p).map(|(s, _)| s)
    }

    /// The transaction coordinator of offsets partition `p`, if this broker serves it.
    pub fn txns_at(&self, p: u32) -> Option<Arc<TxnCoordinator>> {
        self.at(p).map(|(_, t)| t)
    }

    /// A lone broker's transaction coordinator (`None` in a cluster).
    pub fn lone_txns(&self) -> Option<Arc<TxnCoordinator>> {
        self.lone.get().map(|(_, t)| t.clone())
    }

    /// Every service here (to list groups).
    pub fn all(&self) -> Vec<Arc<GroupService>> {
        match self.lone.get() {
            Some((s, _)) => vec![s.clone()],
            None => self
                .led
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|l| l.service.clone())
                .collect(),
        }
    }

    /// Cluster brokers: the offsets topic has `n` partitions.
    pub fn set_partitions(&self, n: u32) {
        self.partitions.store(n, Ordering::Release);
    }

    /// The leader epoch at which this broker serves partition `p`, if it does.
    pub fn led_epoch(&self, p: u32) -> Option<u64> {
        self.led
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p)
            .map(|l| l.leader_epoch)
    }

    /// Starts serving partition `p` (led at `leader_epoch`) with `service` and `txns`.
    pub fn install(
        &self,
        p: u32,
        leader_epoch: u64,
        service: Arc<GroupService>,
        txns: Arc<TxnCoordinator>,
    ) {
        service.set_led_epoch(leader_epoch);
        let (stop, rx) = watch::channel(false);
        tokio::spawn(service.clone().run_ticker(rx.clone()));
        tokio::spawn(txns.clone().run_ticker(rx));
        self.led.write().unwrap_or_else(|e| e.into_inner()).insert(
            p,
            Led {
                leader_epoch,
                service,
                txns,
                _stop: stop,
            },
        );
    }

    /// Stops serving every partition not in `keep`.
    pub fn retain(&self, keep: impl Fn(u32) -> bool) {
        self.led
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p, _| keep(*p));
    }
}
