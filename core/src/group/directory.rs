//! [`GroupDirectory`]: which [`GroupService`] coordinates a group on this broker.
//!
//! A lone broker has one service for every group. A cluster broker has one per partition of
//! `__consumer_offsets` that it leads (the replica manager opens a service when this broker
//! becomes that partition's leader, replaying the partition, and drops it when it stops
//! leading); a group's partition is [`coordinator_partition`] of its name, and a request
//! for a group coordinated elsewhere is refused with `NotLeader`, so the client refreshes
//! its metadata and goes to the partition's leader.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use quiver_protocol::requests::coordinator_partition;
use tokio::sync::watch;

use super::{GroupService, GroupServiceError};

struct Led {
    leader_epoch: u64,
    service: Arc<GroupService>,
    /// Stops the service's ticker when the entry goes.
    _stop: watch::Sender<bool>,
}

/// See the module documentation.
pub struct GroupDirectory {
    lone: Option<Arc<GroupService>>,
    led: RwLock<BTreeMap<u32, Led>>,
    partitions: AtomicU32,
}

impl GroupDirectory {
    /// A lone broker's directory: `service` coordinates every group.
    pub fn lone(service: Arc<GroupService>) -> Arc<GroupDirectory> {
        Arc::new(GroupDirectory {
            lone: Some(service),
            led: RwLock::default(),
            partitions: AtomicU32::new(1),
        })
    }

    /// A cluster broker's directory, empty until it leads partitions of the offsets topic.
    pub fn cluster() -> Arc<GroupDirectory> {
        Arc::new(GroupDirectory {
            lone: None,
            led: RwLock::default(),
            partitions: AtomicU32::new(0),
        })
    }

    /// The service coordinating `group` here, or `NotCoordinator`.
    pub fn for_group(&self, group: &str) -> Result<Arc<GroupService>, GroupServiceError> {
        if let Some(s) = &self.lone {
            return Ok(s.clone());
        }
        let n = self.partitions.load(Ordering::Acquire);
        let p = coordinator_partition(group, n);
        self.led
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p)
            .filter(|_| n > 0)
            .map(|l| l.service.clone())
            .ok_or_else(|| GroupServiceError::NotCoordinator {
                group: group.to_string(),
                partition: p,
            })
    }

    /// Every service here (to list groups).
    pub fn all(&self) -> Vec<Arc<GroupService>> {
        match &self.lone {
            Some(s) => vec![s.clone()],
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

    /// Starts serving partition `p` (led at `leader_epoch`) with `service`.
    pub fn install(&self, p: u32, leader_epoch: u64, service: Arc<GroupService>) {
        let (stop, rx) = watch::channel(false);
        tokio::spawn(service.clone().run_ticker(rx));
        self.led.write().unwrap_or_else(|e| e.into_inner()).insert(
            p,
            Led {
                leader_epoch,
                service,
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
