//! The fetch loop of one follower partition.
//!
//! Before fetching under a leader epoch it asks the leader where its own last epoch ends
//! and truncates any suffix the leader does not have (repeating until the answer is its own
//! last epoch, as KIP-279 does); then it long-polls the leader from its log end, appends the
//! batches byte for byte and takes the leader's high watermark, capped at its own log end.
//! What it appended is flushed while it fetches again: each fetch tells the leader how far
//! this log is durable (which is what the high watermark counts), and while an append is
//! not yet flushed the fetch does not wait at the leader, so the leader learns of the flush
//! with the next one. It stops when told to (the role changed) and never decides anything
//! itself: on errors it waits and tries again until the metadata moves on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::batch::split_batches;
use quiver_protocol::requests::{OffsetForLeaderEpochRequest, ReplicaFetchRequest};
use quiver_protocol::ErrorCode;
use tokio::sync::watch;

use super::peers::PeerClients;
use crate::cluster::BrokerId;
use crate::log::{Flusher, PartitionLog};

/// Largest payload asked for in one fetch.
const FETCH_MAX_BYTES: u32 = 16 * 1024 * 1024;
/// How long the leader may hold a fetch that has nothing new.
const FETCH_MAX_WAIT_MS: u32 = 500;
/// Pause after a failed exchange with the leader.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// What one follower partition copies from whom.
pub struct FollowTarget {
    /// This broker.
    pub me: BrokerId,
    /// The incarnation this broker registered with (sent with each fetch).
    pub broker_epoch: u64,
    /// The leader and its address.
    pub leader: BrokerId,
    pub leader_addr: String,
    /// The controller's leader epoch of that leadership.
    pub leader_epoch: u64,
    /// The log's role generation this loop writes under (from `become_follower`).
    pub generation: u64,
}

/// Copies the leader's log into `log` until `stop` turns true.
pub async fn follow(
    log: Arc<PartitionLog>,
    target: FollowTarget,
    peers: Arc<PeerClients>,
    flusher: Arc<Flusher>,
    max_batch_bytes: usize,
    mut stop: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("follow", topic = %log.topic, partition = log.partition, leader = target.leader, epoch = target.leader_epoch);
    let _e = span.enter();
    drop(_e);
    let mut truncated = false;
    let mut durable = Durable::default();
    // Divergences in a row: a second one at once is a log that cannot take the leader's
    // batches (deleted under the loop, or damaged); it is tried again after a pause, not in
    // a tight loop.
    let mut diverged = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let step = if truncated {
            durable.check(&flusher);
            let at = durable.fetch_position(&log);
            match fetch_once(&log, &target, &peers, at, max_batch_bytes).await {
                Ok(Fetched::Appended) => {
                    durable.appended(&log, &flusher);
                    Ok(())
                }
                Ok(Fetched::Nothing) => {
                    durable.wait(&flusher).await;
                    Ok(())
                }
                Ok(Fetched::StartedOver) => {
                    durable.flush_all(&log, &flusher).await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            match truncate_to_leader(&log, &target, &peers).await {
                Ok(()) => {
                    truncated = true;
                    durable.flush_all(&log, &flusher).await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        if step.is_ok() {
            diverged = 0;
        }
        if let Err(e) = step {
            match e {
                Step::Diverged => {
                    truncated = false;
                    diverged += 1;
                    if diverged > 1 {
                        tracing::debug!(parent: &span, diverged, "the log diverged again; pausing");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY_DELAY) => {}
                            _ = stop.wait_for(|s| *s) => return,
                        }
                    }
                }
                Step::Retry(reason) => {
                    tracing::debug!(parent: &span, %reason, "replica fetch failed; retrying");
                    if e_is_conn(&reason) {
                        peers.forget(target.leader);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_DELAY) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }
}

/// How far the follower's log is flushed, and the flushes under way.
#[derive(Default)]
struct Durable {
    /// Everything below is flushed (`None` until the first flush of this loop).
    below: Option<i64>,
    /// Flush tickets of appends not yet known flushed, oldest first, each with the log end
    /// it covers. All are kept: under steady load the newest ticket is rarely done when
    /// checked (a ticket taken during a flush needs the next one), the older ones are.
    pending: std::collections::VecDeque<(u64, i64)>,
}

/// Where one fetch reads from and what it reports durable.
struct FetchAt {
    offset: i64,
    flushed: i64,
    max_wait_ms: u32,
}

impl Durable {
    /// Takes completed flushes into account (does not wait).
    fn check(&mut self, flusher: &Flusher) {
        while let Some(&(ticket, end)) = self.pending.front() {
            if !flusher.is_done(ticket) {
                break;
            }
            self.below = Some(end);
            self.pending.pop_front();
        }
    }

    /// The next fetch: from the log end, reporting the flushed end; it waits at the leader
    /// only when nothing is waiting to be flushed here.
    fn fetch_position(&self, log: &PartitionLog) -> FetchAt {
        let offset = log.snapshot().log_end;
        FetchAt {
            offset,
            flushed: self.below.unwrap_or(-1).min(offset),
            max_wait_ms: if !self.pending.is_empty() {
                0
            } else {
                FETCH_MAX_WAIT_MS
            },
        }
    }

    /// Batches were appended: flush them (the flusher starts at once; nobody waits here).
    fn appended(&mut self, log: &PartitionLog, flusher: &Flusher) {
        self.pending
            .push_back((flusher.ticket(), log.snapshot().log_end));
    }

    /// Nothing new at the leader: wait for the flush under way, so the next fetch reports
    /// it (and may then wait at the leader).
    async fn wait(&mut self, flusher: &Flusher) {
        if let Some((ticket, end)) = self.pending.pop_back() {
            // After a failed flush nothing more is reported flushed (the flusher logged it).
            if flusher.wait(ticket).await.is_ok() {
                self.below = Some(end);
            }
            self.pending.clear();
        }
    }

    /// The log changed under its earlier positions (truncated, started over): flush it
    /// all and count from its end.
    async fn flush_all(&mut self, log: &PartitionLog, flusher: &Flusher) {
        let end = log.snapshot().log_end;
        if flusher.wait(flusher.ticket()).await.is_ok() {
            self.below = Some(end);
        }
        self.pending.clear();
    }
}

/// What one fetch did to the log.
enum Fetched {
    /// Batches were appended.
    Appended,
    /// The leader had nothing new.
    Nothing,
    /// The log was behind the leader's log start and now starts there, empty.
    StartedOver,
}

fn e_is_conn(reason: &str) -> bool {
    reason.contains("connect") || reason.contains("transport")
}

enum Step {
    /// The log may hold a suffix the leader does not: look up the epoch again.
    Diverged,
    /// Try again after a pause.
    Retry(String),
}

/// Truncates the suffix of `log` that the leader's log does not share.
async fn truncate_to_leader(
    log: &Arc<PartitionLog>,
    target: &FollowTarget,
    peers: &PeerClients,
) -> Result<(), Step> {
    let client = peers
        .get(target.leader, &target.leader_addr)
        .await
        .map_err(|e| Step::Retry(format!("connect: {e}")))?;
    for _ in 0..64 {
        let epoch = log.last_epoch();
        let snap = log.snapshot();
        if snap.log_end == snap.log_start {
            // Nothing to compare; an epoch remembered without batches (a leadership that
            // wrote nothing) must not outrank the batches about to be copied.
            log.truncate_to(snap.log_end, target.generation)
                .map_err(|e| Step::Retry(format!("truncate: {e}")))?;
            return Ok(());
        }
        if epoch < 0 {
            return Ok(());
        }
        let (answer, _) = client
            .request(
                &OffsetForLeaderEpochRequest {
                    topic: log.topic.clone(),
                    partition: log.partition,
                    replica_id: target.me as u32,
                    current_leader_epoch: target.leader_epoch,
                    epoch,
                },
                Bytes::new(),
            )
            .await
            .map_err(|e| Step::Retry(format!("transport: epoch lookup: {e}")))?;
        let cut = log.divergence_point(answer.epoch, answer.end_offset);
        log.truncate_to(cut, target.generation)
            .map_err(|e| Step::Retry(format!("truncate: {e}")))?;
        if answer.epoch == epoch {
            return Ok(());
        }
        // The leader has no epoch between its answer and the one asked about: this log's
        // later epochs are gone now, and the next lookup asks about the newest it kept.
    }
    Err(Step::Retry("epoch lookup did not converge".into()))
}

/// One fetch: append what the leader sent (unflushed), take its high watermark.
async fn fetch_once(
    log: &Arc<PartitionLog>,
    target: &FollowTarget,
    peers: &PeerClients,
    at: FetchAt,
    max_batch_bytes: usize,
) -> Result<Fetched, Step> {
    let client = peers
        .get(target.leader, &target.leader_addr)
        .await
        .map_err(|e| Step::Retry(format!("connect: {e}")))?;
    let offset = at.offset;
    let req = ReplicaFetchRequest {
        topic: log.topic.clone(),
        partition: log.partition,
        replica_id: target.me as u32,
        leader_epoch: target.leader_epoch,
        offset,
        flushed_offset: at.flushed,
        max_bytes: FETCH_MAX_BYTES,
        max_wait_ms: at.max_wait_ms,
        broker_epoch: target.broker_epoch,
    };
    let timeout = Duration::from_millis(u64::from(FETCH_MAX_WAIT_MS)) + Duration::from_secs(10);
    let (resp, payload) = match client
        .request_with_timeout(&req, Bytes::new(), timeout)
        .await
    {
        Ok(r) => r,
        // Beyond the leader's log end: this log has a suffix the leader does not.
        Err(e) if e.code() == Some(ErrorCode::OffsetOutOfRange) => return Err(Step::Diverged),
        Err(e) => return Err(Step::Retry(format!("transport: fetch: {e}"))),
    };
    if offset < resp.log_start_offset {
        tracing::warn!(
            log_end = offset,
            leader_start = resp.log_start_offset,
            "behind the leader's log start; starting over there"
        );
        return log
            .reset_to(resp.log_start_offset, target.generation)
            .map(|()| Fetched::StartedOver)
            .map_err(|e| Step::Retry(format!("reset: {e}")));
    }
    let fetched = if payload.is_empty() {
        Fetched::Nothing
    } else {
        let batches = split_batches(&payload, max_batch_bytes)
            .map_err(|e| Step::Retry(format!("the leader sent malformed batches: {e}")))?;
        let (log2, generation) = (log.clone(), target.generation);
        let appended = crate::log::partition::blocking(move || {
            for b in &batches {
                log2.append_replicated(b, generation)?;
            }
            Ok::<_, crate::log::LogError>(())
        })
        .await
        .map_err(|e| Step::Retry(e.to_string()))?;
        if let Err(e) = appended {
            if matches!(e, crate::log::LogError::Fenced(_)) {
                // The role changed under this loop: it is about to be stopped.
                return Err(Step::Retry(e.to_string()));
            }
            // A batch that does not continue this log: the logs diverged.
            tracing::warn!(error = %e, "a replicated batch does not fit this log; looking up the leader's epochs again");
            return Err(Step::Diverged);
        }
        Fetched::Appended
    };
    log.advance_high_watermark(resp.high_watermark);
    // In step with its leader, a follower's log starts where the leader's does: what
    // retention or a compaction deleted there goes here too.
    let snap = log.snapshot();
    if resp.log_start_offset > snap.log_start && snap.log_end >= resp.high_watermark {
        let (log2, start) = (log.clone(), resp.log_start_offset);
        match crate::log::partition::blocking(move || log2.trim_before(start)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, leader_start = start, "could not delete below the leader's log start; trying again after the next fetch");
            }
        }
    }
    Ok(fetched)
}
