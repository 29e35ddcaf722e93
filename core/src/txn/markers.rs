//! [`MarkerWriter`]: how a transaction coordinator ends a transaction in one partition.
//!
//! The marker (a control batch of the producer) goes into the partition through its leader:
//! this broker appends it when it leads the partition (a lone broker leads every
//! partition), else it sends WriteTxnMarker to the leader the controller names, retrying
//! while leadership moves. A marker counts once the partition's in-sync replicas have it.
//! A marker for a `__consumer_offsets` partition goes through that partition's group
//! service, which makes the transaction's offsets visible (commit) or drops them (abort).

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use quiver_protocol::batch::{self, Marker};
use quiver_protocol::requests::{VerifyTxnPartitionRequest, WriteTxnMarkerRequest};
use quiver_protocol::ErrorCode;

use super::TxnError;
use crate::group::{GroupDirectory, OFFSETS_TOPIC};
use crate::log::{Flusher, LogError};
use crate::replica::ReplicaManager;
use crate::topic::{TopicError, TopicRegistry};

/// One marker to write: whose transaction it ends, how, and which coordinator decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnMarker {
    /// The transaction's producer id.
    pub producer_id: i64,
    /// Its epoch.
    pub epoch: i16,
    /// Commit or abort.
    pub marker: Marker,
    /// The deciding coordinator's epoch (the leader epoch of its offsets partition), which
    /// the partition fences older ones by; `None` when a partition decided itself (an
    /// abandoned transaction's abort).
    pub coordinator_epoch: Option<u64>,
}

/// How long one marker may take, retries included.
const MARKER_TIMEOUT: Duration = Duration::from_secs(30);

/// See the module documentation.
pub struct MarkerWriter {
    topics: Arc<TopicRegistry>,
    flusher: Arc<Flusher>,
    groups: OnceLock<Weak<GroupDirectory>>,
    replicas: OnceLock<Weak<ReplicaManager>>,
}

impl MarkerWriter {
    /// A writer over this broker's topics; [`attach_groups`](Self::attach_groups) (and on a
    /// cluster broker [`attach_replicas`](Self::attach_replicas)) completes it.
    pub fn new(topics: Arc<TopicRegistry>, flusher: Arc<Flusher>) -> Arc<MarkerWriter> {
        Arc::new(MarkerWriter {
            topics,
            flusher,
            groups: OnceLock::new(),
            replicas: OnceLock::new(),
        })
    }

    /// The broker's group directory (markers into offsets partitions go through it).
    pub fn attach_groups(&self, groups: &Arc<GroupDirectory>) {
        let _ = self.groups.set(Arc::downgrade(groups));
    }

    /// A cluster broker's replica manager (markers go through partition leaders).
    pub fn attach_replicas(&self, replicas: Weak<ReplicaManager>) {
        let _ = self.replicas.set(replicas);
    }

    fn replicas(&self) -> Option<Arc<ReplicaManager>> {
        self.replicas.get().and_then(Weak::upgrade)
    }

    /// The group services of this broker (`None` before they are attached).
    pub fn groups(&self) -> Option<Arc<GroupDirectory>> {
        self.groups.get().and_then(Weak::upgrade)
    }

    /// Asks the coordinator that issued `producer_id` whether its transaction at `epoch`
    /// still holds `topic`/`partition`, open or ending (its markers on their way): `Some(true)`
    /// if so, `Some(false)` if the coordinator says it does not (or no coordinator issued
    /// the id), `None` if it could not be asked (it is moving, or unreachable).
    pub async fn coordinator_holds(
        &self,
        producer_id: i64,
        epoch: i16,
        topic: &str,
        partition: u32,
    ) -> Option<bool> {
        let groups = self.groups()?;
        let req = VerifyTxnPartitionRequest {
            producer_id,
            producer_epoch: epoch,
            topic: topic.to_string(),
            partition,
            include_ending: true,
        };
        let answer = match (groups.lone_txns(), self.replicas()) {
            (Some(txns), _) => txns.verify(&req).map(drop),
            (None, Some(rm)) => super::verify::verify_in_cluster(&rm, &groups, &req).await,
            (None, None) => return None,
        };
        match answer {
            Ok(()) => Some(true),
            Err(e)
                if matches!(
                    e.code(),
                    ErrorCode::ProducerFenced | ErrorCode::InvalidTxnState
                ) =>
            {
                Some(false)
            }
            Err(e) => {
                tracing::debug!(producer_id, %topic, partition, error = %e, "cannot ask the transaction's coordinator");
                None
            }
        }
    }

    /// Writes `m` into `topic`/`partition` through its leader, retrying retriable failures for up to 30 s while `coordinating()` holds (a
    /// coordinator that lost its partition stops, leaving the marker to its successor). A
    /// partition that no longer exists needs no marker.
    #[tracing::instrument(name = "txn_marker", skip(self, coordinating), level = "debug")]
    pub async fn write(
        &self,
        topic: &str,
        partition: u32,
        m: TxnMarker,
        coordinating: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), TxnError> {
        let deadline = tokio::time::Instant::now() + MARKER_TIMEOUT;
        let mut attempt = 0u32;
        loop {
            if !coordinating() {
                return Err(TxnError::Route {
                    code: ErrorCode::NotLeader,
                    reason: "this broker no longer coordinates the transaction".into(),
                });
            }
            let outcome = match self.replicas() {
                None => self.append_local(topic, partition, m).await.map(drop),
                Some(rm) => self.through_leader(&rm, topic, partition, m).await,
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(TxnError::Topic(TopicError::NotFound(_))) => {
                    tracing::warn!(%topic, partition, producer_id = m.producer_id, "no marker for a partition that is gone");
                    return Ok(());
                }
                Err(e) if e.code().is_retriable() && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%topic, partition, error = %e, "marker not written yet; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis((50u64 << attempt.min(5)).min(1000)))
                        .await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn through_leader(
        &self,
        rm: &ReplicaManager,
        topic: &str,
        partition: u32,
        m: TxnMarker,
    ) -> Result<(), TxnError> {
        if rm.view().topic(topic).is_none() {
            return Err(TxnError::Topic(TopicError::NotFound(topic.to_string())));
        }
        let Some(leader) = leader_client(rm, topic, partition).await? else {
            return self.append_local(topic, partition, m).await.map(drop);
        };
        let req = WriteTxnMarkerRequest {
            topic: topic.to_string(),
            partition,
            producer_id: m.producer_id,
            producer_epoch: m.epoch,
            commit: m.marker == Marker::Commit,
            coordinator_epoch: m.coordinator_epoch,
        };
        leader.request(&req).await.map(drop)
    }

    /// Appends the marker here: this broker must lead the partition. Returns its offset
    /// once it is durable (in a cluster: once the in-sync replicas have it).
    pub async fn append_local(
        &self,
        topic: &str,
        partition: u32,
        m: TxnMarker,
    ) -> Result<i64, TxnError> {
        let rm = self.replicas();
        if let Some(rm) = &rm {
            rm.leader(topic, partition).map_err(|e| TxnError::Route {
                code: e.code(),
                reason: e.to_string(),
            })?;
        }
        if topic == OFFSETS_TOPIC {
            // Through the group service, which resolves the transaction's offsets; until
            // it serves the partition (a new leader replaying it) the marker waits.
            let service = self
                .groups
                .get()
                .and_then(Weak::upgrade)
                .and_then(|g| g.service_at(partition))
                .ok_or_else(|| TxnError::Route {
                    code: ErrorCode::NotLeader,
                    reason: format!("{topic}/{partition} is not served here yet"),
                })?;
            return Ok(service.write_marker(m).await?);
        }
        let (t, log) = self.topics.partition(topic, partition)?;
        let raw = batch::control_batch(
            m.producer_id,
            m.epoch,
            m.marker,
            m.coordinator_epoch,
            crate::clock::now_ms(),
        );
        let header = batch::validate(&raw, usize::MAX).map_err(LogError::InvalidBatch)?;
        let deadline = tokio::time::Instant::now() + MARKER_TIMEOUT;
        let appended = log
            .append(
                vec![(raw, header)],
                &t.config(),
                &self.flusher,
                MARKER_TIMEOUT,
            )
            .await?;
        if let Some(rm) = &rm {
            rm.leader_flushed(&log, appended.last_offset + 1);
            rm.wait_committed_under(
                &log,
                appended.last_offset,
                Some(appended.leader_epoch as u64),
                deadline,
            )
            .await
            .map_err(|e| TxnError::Route {
                code: e.code(),
                reason: e.to_string(),
            })?;
        }
        Ok(appended.base_offset)
    }
}

/// A peer broker that leads a partition, reached with this broker's certificate.
pub(super) struct PeerLeader {
    client: quiver_client::Client,
    id: crate::cluster::BrokerId,
    addr: String,
    what: String,
}

impl PeerLeader {
    /// Sends `req`; a failure that may pass as leadership settles is `NotLeader`.
    pub(super) async fn request<M: quiver_protocol::Message>(
        &self,
        req: &M,
    ) -> Result<M::Response, TxnError> {
        self.client
            .request(req, bytes::Bytes::new())
            .await
            .map(|(r, _)| r)
            .map_err(|e| match e {
                quiver_client::ClientError::TopicNotFound(t) => {
                    TxnError::Topic(TopicError::NotFound(t))
                }
                e => peer_error(self.id, &self.addr, &self.what, e),
            })
    }
}

fn peer_error(
    id: crate::cluster::BrokerId,
    addr: &str,
    what: &str,
    e: quiver_client::ClientError,
) -> TxnError {
    TxnError::Route {
        code: if e.is_retriable() {
            ErrorCode::NotLeader
        } else {
            e.code().unwrap_or(ErrorCode::Internal)
        },
        reason: format!("broker {id} ({addr}), leader of {what}: {e}"),
    }
}

/// The leader of `topic`/`partition` as the controller names it: `None` when it is this
/// broker, else a client of it. No leader now is a retriable `NotLeader`.
pub(super) async fn leader_client(
    rm: &ReplicaManager,
    topic: &str,
    partition: u32,
) -> Result<Option<PeerLeader>, TxnError> {
    let view = rm.view();
    let what = format!("{topic}/{partition}");
    let leader = view
        .partition(topic, partition)
        .and_then(|p| p.leader)
        .ok_or_else(|| TxnError::Route {
            code: ErrorCode::NotLeader,
            reason: format!("{what} has no leader now"),
        })?;
    if leader == rm.id() {
        return Ok(None);
    }
    let addr = view
        .broker(leader)
        .map(|b| b.addr.clone())
        .ok_or_else(|| TxnError::Route {
            code: ErrorCode::NotLeader,
            reason: format!("the leader of {what}, broker {leader}, is not registered"),
        })?;
    let client = rm
        .peers()
        .get(leader, &addr)
        .await
        .map_err(|e| peer_error(leader, &addr, &what, e))?;
    Ok(Some(PeerLeader {
        client,
        id: leader,
        addr,
        what,
    }))
}
