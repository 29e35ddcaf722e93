//! A broker's membership in its cluster: it runs a controller node on its own QUIC endpoint
//! (Raft on the `quiver-raft/1` ALPN), the lowest-id voter forms the group on first start,
//! and the broker registers itself (a new broker epoch per start) and asks to be unfenced,
//! retrying until the controller answers; then it heartbeats every controller voter every
//! [`HEARTBEAT_INTERVAL`]. The leader fences a registered broker it has not heard from for
//! [`SESSION_TIMEOUT`] (it died without stopping) and unfences it when its heartbeats (same
//! epoch) come back after the fence. On a clean stop a broker asks to be fenced first, so partitions it leads
//! move at once instead of after the timeout.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use super::controller::{Controller, ControllerConfig};
use super::network::RaftTls;
use super::types::{BrokerId, BrokerNode, ControllerCommand, ControllerResponse};
use super::ControllerState;
use crate::config::ClusterConfig;

/// How often a broker heartbeats the controller leader.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A broker not heard from for this long is fenced (Kafka's `broker.session.timeout.ms`).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// The least time a new controller leader gives each broker to be heard before fencing it.
pub const NEW_LEADER_GRACE: Duration = Duration::from_secs(2);

/// What a broker joins its cluster with.
pub struct MemberConfig {
    /// Broker id.
    pub id: u32,
    /// The broker's data directory (the controller keeps its store in `controller/`).
    pub data_dir: PathBuf,
    /// The address the broker registers (its advertised QUIC address).
    pub advertised: String,
    /// The broker endpoint's bound address.
    pub local_addr: SocketAddr,
    /// The `[cluster]` section.
    pub cluster: ClusterConfig,
    /// Its identity towards peers.
    pub tls: RaftTls,
    /// The marker file saying the broker's log store was created empty (it holds no
    /// replica) and not yet registered so; removed once the registration is taken.
    pub empty_log: Option<PathBuf>,
}

/// A running cluster member: the controller node and its registration task.
pub struct ClusterMember {
    id: BrokerId,
    epoch: u64,
    controller: Arc<Controller>,
    task: tokio::task::JoinHandle<()>,
    monitor: tokio::task::JoinHandle<()>,
}

/// The TLS identity a cluster broker uses towards its peers.
pub fn raft_tls(
    cluster_ca: Vec<CertificateDer<'static>>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> RaftTls {
    RaftTls {
        ca: cluster_ca,
        chain: chain.to_vec(),
        key: key.clone_key(),
    }
}

impl ClusterMember {
    /// Starts the controller node on `endpoint` (the broker's), forms the group if this is
    /// the lowest-id voter, and starts registering `advertised` as broker `id`.
    pub async fn start(
        member: MemberConfig,
        endpoint: quinn::Endpoint,
        stop: watch::Receiver<bool>,
    ) -> Result<ClusterMember, String> {
        let MemberConfig {
            id,
            data_dir,
            advertised,
            local_addr,
            cluster,
            tls,
            empty_log,
        } = member;
        let config =
            ControllerConfig::new(u64::from(id), data_dir.join("controller"), local_addr, tls);
        let controller = Arc::new(
            Controller::start_shared(config, endpoint)
                .await
                .map_err(|e| format!("the controller cannot start: {e}"))?,
        );
        let voters: BTreeMap<BrokerId, BrokerNode> = cluster
            .voters
            .iter()
            .map(|v| {
                (
                    u64::from(v.id),
                    BrokerNode {
                        addr: v.addr.clone(),
                    },
                )
            })
            .collect();
        let first = voters.keys().next().copied();
        // A new epoch per start: a registration of an older process is refused as stale.
        let epoch = crate::clock::now_ms().max(1) as u64;
        let monitor = tokio::spawn(watch_brokers(controller.clone(), stop.clone()));
        let task = tokio::spawn(join(
            controller.clone(),
            (u64::from(id), epoch, empty_log),
            advertised,
            (first == Some(u64::from(id))).then_some(voters),
            stop,
        ));
        Ok(ClusterMember {
            id: u64::from(id),
            epoch,
            controller,
            task,
            monitor,
        })
    }

    /// The controller's Raft handle (to serve peers' connections).
    pub fn service(&self) -> super::RaftService {
        self.controller.service()
    }

    /// The controller node (to propose changes and read the applied metadata).
    pub fn controller(&self) -> Arc<Controller> {
        self.controller.clone()
    }

    /// The broker epoch this process registered with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The controller leader this broker knows of.
    pub fn controller_leader(&self) -> Option<BrokerId> {
        self.controller.current_leader()
    }

    /// The metadata this broker has applied.
    pub async fn state(&self) -> ControllerState {
        self.controller.state().await
    }

    /// Asks to be fenced (bounded), then stops the controller node.
    pub async fn shutdown(self) {
        self.task.abort();
        self.monitor.abort();
        let fence = self
            .controller
            .propose(ControllerCommand::FenceBroker { id: self.id });
        match tokio::time::timeout(Duration::from_secs(2), fence).await {
            Ok(Ok(_)) => tracing::info!(broker = self.id, "fenced for a clean stop"),
            Ok(Err(e)) => {
                tracing::warn!(broker = self.id, error = %e, "could not fence this broker before stopping")
            }
            Err(_) => tracing::warn!(broker = self.id, "fencing before stopping timed out"),
        }
        let _ = self.task.await;
        let _ = self.monitor.await;
        match Arc::try_unwrap(self.controller) {
            Ok(c) => c.shutdown().await,
            Err(_) => tracing::warn!("the controller is still in use at shutdown"),
        }
    }
}

/// Forms the group (when `voters` is given), then registers and unfences this broker,
/// retrying with a backoff until done or stopped.
async fn join(
    controller: Arc<Controller>,
    (id, epoch, empty_log): (BrokerId, u64, Option<PathBuf>),
    addr: String,
    voters: Option<BTreeMap<BrokerId, BrokerNode>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(100);
    if let Some(voters) = voters {
        loop {
            match controller.initialize(voters.clone()).await {
                Ok(formed) => {
                    if formed {
                        tracing::info!(voters = voters.len(), "controller group formed");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "forming the controller group failed; retrying")
                }
            }
            if pause(&mut stop, &mut delay).await {
                return;
            }
        }
    }
    for cmd in [
        ControllerCommand::RegisterBroker {
            id,
            addr: addr.clone(),
            epoch,
            empty_log: empty_log.is_some(),
        },
        ControllerCommand::UnfenceBroker { id },
    ] {
        loop {
            match controller.propose(cmd.clone()).await {
                Ok(ControllerResponse::Refused(e)) => {
                    tracing::error!(broker = id, error = %e, "the controller refused this broker");
                    return;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(broker = id, error = %e, "controller not reachable yet; retrying")
                }
            }
            if pause(&mut stop, &mut delay).await {
                return;
            }
        }
    }
    if let Some(marker) = empty_log {
        if let Err(e) = std::fs::remove_file(&marker) {
            tracing::warn!(error = %e, marker = %marker.display(), "cannot remove the empty-log marker; the next start says again that this broker's log is empty");
        }
    }
    tracing::info!(broker = id, %addr, epoch, "registered with the controller");
    // One heartbeat loop per voter, so a voter that does not answer delays no other; the set
    // is dropped (its loops aborted) with this task.
    let mut beats = tokio::task::JoinSet::new();
    let mut voters = std::collections::BTreeSet::new();
    loop {
        for voter in controller.voter_ids() {
            if voters.insert(voter) {
                beats.spawn(heartbeat_voter(controller.clone(), voter, id, epoch));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Heartbeats controller node `voter` every [`HEARTBEAT_INTERVAL`] for broker `id`.
async fn heartbeat_voter(controller: Arc<Controller>, voter: BrokerId, id: BrokerId, epoch: u64) {
    loop {
        if let Err(e) = controller.heartbeat_to(voter, id, epoch).await {
            tracing::debug!(broker = id, voter, error = %e, "heartbeat not delivered");
        }
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
    }
}

/// On the controller leader: fences registered brokers silent for [`SESSION_TIMEOUT`] and
/// unfences fenced ones heard from (with their registered epoch) since they were fenced.
///
/// Brokers heartbeat every voter, so a new leader knows when each broker was last heard
/// from, and a broker that died with the old leader is fenced [`SESSION_TIMEOUT`] after it
/// died, not a whole session after the election. A node's record of a broker may be older
/// than the broker's silence, though (this node was cut off from it, or restarted), so every
/// broker gets at least [`NEW_LEADER_GRACE`] from the moment this node leads to be heard.
async fn watch_brokers(controller: Arc<Controller>, mut stop: watch::Receiver<bool>) {
    let mut leading_since: Option<std::time::Instant> = None;
    // When this leader first saw each broker fenced: only a heartbeat after that unfences it
    // (a broker that asked to be fenced for a clean stop sends none).
    let mut fenced_seen: HashMap<BrokerId, std::time::Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL / 2) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !controller.is_leader() {
            leading_since = None;
            fenced_seen.clear();
            continue;
        }
        let since = *leading_since.get_or_insert_with(std::time::Instant::now);
        let state = controller.state().await;
        for b in state.brokers.values() {
            let heard = controller
                .liveness()
                .last(b.id)
                .filter(|(epoch, _)| *epoch == b.broker_epoch)
                .map(|(_, at)| at);
            let cmd = if b.fenced {
                let seen = *fenced_seen
                    .entry(b.id)
                    .or_insert_with(std::time::Instant::now);
                match heard {
                    Some(at) if at > seen && at.elapsed() < SESSION_TIMEOUT => {
                        ControllerCommand::UnfenceBroker { id: b.id }
                    }
                    _ => continue,
                }
            } else {
                fenced_seen.remove(&b.id);
                if silence(heard, since) < SESSION_TIMEOUT {
                    continue;
                }
                ControllerCommand::FenceBroker { id: b.id }
            };
            tracing::info!(broker = b.id, ?cmd, "broker liveness changed");
            if let Err(e) = controller.write(cmd).await {
                tracing::warn!(broker = b.id, error = %e, "cannot record a broker's liveness");
            }
        }
    }
}

/// How long a broker counts as silent for a leader that has led since `since`: since its last
/// heartbeat heard here, but never longer than what leaves it [`NEW_LEADER_GRACE`] from
/// `since`; a broker never heard from here gets a whole session from `since`.
fn silence(heard: Option<std::time::Instant>, since: std::time::Instant) -> Duration {
    let led = since.elapsed();
    match heard {
        Some(at) => at
            .elapsed()
            .min(led + SESSION_TIMEOUT.saturating_sub(NEW_LEADER_GRACE)),
        None => led,
    }
}

/// Sleeps `delay` (doubling it up to 2 s); true when the broker is stopping.
async fn pause(stop: &mut watch::Receiver<bool>, delay: &mut Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {}
        _ = stop.wait_for(|s| *s) => return true,
    }
    *delay = (*delay * 2).min(Duration::from_secs(2));
    false
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::{BrokerConfig, VoterConfig};
    use crate::{Broker, BrokerHandle};

    fn free_port() -> u16 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    }

    async fn start(dir: &std::path::Path, id: u32, ports: &[u16]) -> BrokerHandle {
        let ca_dir = dir.join("tls");
        let ca = crate::tls::cluster_ca(&ca_dir).unwrap();
        let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let broker_dir = dir.join(format!("broker-{id}"));
        let (cert, key) =
            crate::tls::issue_broker_certificate(&ca_dir, id, &sans, &broker_dir.join("tls"))
                .unwrap();
        let mut config = BrokerConfig {
            broker_id: id,
            listen: format!("127.0.0.1:{}", ports[id as usize - 1]),
            data_dir: broker_dir,
            ..BrokerConfig::default()
        };
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.cluster.ca = Some(ca);
        config.cluster.voters = ports
            .iter()
            .enumerate()
            .map(|(i, p)| VoterConfig {
                id: i as u32 + 1,
                addr: format!("127.0.0.1:{p}"),
            })
            .collect();
        Broker::start(config).await.unwrap()
    }

    /// Polls until every broker sees a leader and `check` holds on its metadata.
    async fn until(
        handles: &[&BrokerHandle],
        what: &str,
        check: impl Fn(&ControllerState) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut all = true;
            for h in handles {
                let (leader, state) = h.cluster_view().await.expect("a cluster broker");
                all &= leader.is_some() && check(&state);
            }
            if all {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn a_new_leader_counts_silence_from_the_last_heartbeat_but_gives_every_broker_a_grace() {
        let ago = |s: u64| Instant::now().checked_sub(Duration::from_secs(s)).unwrap();
        let near = |d: Duration, s: u64| {
            d >= Duration::from_secs(s) && d < Duration::from_secs(s) + Duration::from_millis(500)
        };
        // Heard a second ago: silent a second, however long this node has led.
        assert!(near(silence(Some(ago(1)), ago(30)), 1));
        // Heard 10 s ago (it died with the old leader, or this node lost touch with it), and
        // this node just became leader: it still gets the grace, not an instant fence...
        let just_led = silence(Some(ago(10)), Instant::now());
        assert!(near(just_led, 4), "{just_led:?}");
        assert!(just_led < SESSION_TIMEOUT);
        // ...which ends NEW_LEADER_GRACE after the election.
        assert!(silence(Some(ago(10)), ago(2)) >= SESSION_TIMEOUT);
        // Never heard here: a whole session from the election.
        assert!(near(silence(None, ago(3)), 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_brokers_form_a_controller_on_their_endpoints_register_and_fence_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let ports = [free_port(), free_port(), free_port()];
        let b1 = start(dir.path(), 1, &ports).await;
        let b2 = start(dir.path(), 2, &ports).await;
        let b3 = start(dir.path(), 3, &ports).await;
        let registered =
            |s: &ControllerState| (1..=3).all(|id| s.broker(id).is_some_and(|b| !b.fenced));
        until(
            &[&b1, &b2, &b3],
            "three registered, unfenced brokers",
            registered,
        )
        .await;
        // Clients still speak to a cluster broker as to any broker.
        assert!(b1.ca_path().is_some());
        // Heartbeats keep them unfenced past the session timeout.
        tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(1)).await;
        until(&[&b1, &b2, &b3], "three brokers still unfenced", registered).await;
        // A clean stop fences the broker in everyone else's metadata.
        b3.shutdown().await;
        until(&[&b1, &b2], "broker 3 fenced", |s| {
            s.broker(3).is_some_and(|b| b.fenced)
        })
        .await;
        // And it stays fenced: its last heartbeats are recent, but none came after the fence.
        let watched = Instant::now() + HEARTBEAT_INTERVAL * 3;
        while Instant::now() < watched {
            for h in [&b1, &b2] {
                let (_, s) = h.cluster_view().await.expect("a cluster broker");
                assert!(
                    s.broker(3).is_some_and(|b| b.fenced),
                    "broker 3 was unfenced after its clean stop"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b2.shutdown().await;
        b1.shutdown().await;
    }
}
