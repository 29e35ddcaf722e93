//! In-process controller groups on 127.0.0.1: election, replication, failover, catch-up.
//! Every outcome is polled for within a generous bound; no test asserts an intermediate moment.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::PrivateKeyDer;

use super::*;
use crate::cluster::network::RaftTls;
use crate::cluster::types::{ControllerError, PartitionAssignment};

const BOUND: Duration = Duration::from_secs(30);

struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A node certificate for 127.0.0.1, usable as server and client.
    fn node(&self, id: BrokerId) -> RaftTls {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("quiver-broker-{id}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        RaftTls {
            ca: vec![self.cert.der().clone()],
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }
}

/// Polls `f` until it answers `Some`, failing after [`BOUND`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a controller, retrying while the previous incarnation's port or store is still
/// being released.
async fn start(id: BrokerId, dir: &Path, listen: SocketAddr, tls: &RaftTls) -> Controller {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let config = ControllerConfig::new(id, dir, listen, tls.clone());
        match Controller::start(config).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(id, error = %e, "controller start, retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("controller {id} did not start: {e}"),
        }
    }
}

struct Group {
    _tmp: tempfile::TempDir,
    ca: TestCa,
    dirs: BTreeMap<BrokerId, PathBuf>,
    addrs: BTreeMap<BrokerId, SocketAddr>,
    nodes: BTreeMap<BrokerId, Controller>,
}

impl Group {
    /// `n` controllers on ephemeral ports, the group initialized (from node 1) with all of
    /// them as voters.
    async fn start(n: u64) -> Self {
        Self::start_without(n, &[]).await
    }

    /// Like [`Self::start`], but the nodes in `absent` are voters that never run: their
    /// address is a UDP port nobody listens on.
    async fn start_without(n: u64, absent: &[BrokerId]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ca = TestCa::new("test cluster CA");
        let mut group = Group {
            dirs: BTreeMap::new(),
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            _tmp: tmp,
            ca,
        };
        let mut voters = BTreeMap::new();
        for id in 1..=n {
            let addr = if absent.contains(&id) {
                let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                sock.local_addr().unwrap()
            } else {
                let dir = group._tmp.path().join(format!("controller-{id}"));
                let c = start(id, &dir, "127.0.0.1:0".parse().unwrap(), &group.ca.node(id)).await;
                let addr = c.local_addr();
                group.addrs.insert(id, addr);
                group.dirs.insert(id, dir);
                group.nodes.insert(id, c);
                addr
            };
            voters.insert(
                id,
                BrokerNode {
                    addr: addr.to_string(),
                },
            );
        }
        assert!(group.nodes[&1].initialize(voters.clone()).await.unwrap());
        // Again: harmless.
        assert!(!group.nodes[&1].initialize(voters).await.unwrap());
        group
    }

    /// Waits until every running node names the same leader, and that node is leader.
    async fn agreed_leader(&self) -> BrokerId {
        let nodes = &self.nodes;
        eventually("one agreed leader", || async move {
            let leaders: Vec<_> = nodes.values().map(|c| c.current_leader()).collect();
            let first = leaders[0]?;
            let agreed = leaders.iter().all(|l| *l == Some(first));
            (agreed && nodes.get(&first).is_some_and(|c| c.is_leader())).then_some(first)
        })
        .await
    }

    /// Writes `cmd` through whichever node is leader, retrying through elections.
    async fn write(&self, cmd: ControllerCommand) -> ControllerResponse {
        let nodes = &self.nodes;
        eventually("a committed write", || {
            let cmd = cmd.clone();
            async move {
                let leader = nodes.values().find(|c| c.is_leader())?;
                match leader.write(cmd).await {
                    Ok(resp) => Some(resp),
                    Err(e) => {
                        tracing::debug!(error = %e, "write, retrying");
                        None
                    }
                }
            }
        })
        .await
    }

    /// Waits until every running node has applied a state satisfying `check`.
    async fn all_applied(&self, what: &str, check: impl Fn(&ControllerState) -> bool) {
        for (id, c) in &self.nodes {
            let check = &check;
            eventually(&format!("{what} on node {id}"), || async move {
                check(&c.state().await).then_some(())
            })
            .await;
        }
    }

    async fn stop(&mut self, id: BrokerId) {
        self.nodes.remove(&id).unwrap().shutdown().await;
    }

    /// Restarts node `id` on its old directory and address.
    async fn restart(&mut self, id: BrokerId) {
        let c = start(id, &self.dirs[&id], self.addrs[&id], &self.ca.node(id)).await;
        self.nodes.insert(id, c);
    }

    async fn shutdown(self) {
        for (_, c) in self.nodes {
            c.shutdown().await;
        }
    }
}

fn register(id: BrokerId) -> ControllerCommand {
    ControllerCommand::RegisterBroker {
        id,
        addr: format!("127.0.0.1:{}", 7400 + id),
        epoch: 1,
        empty_log: false,
    }
}

fn create_topic(name: &str, topic_id: u64, replicas: &[BrokerId]) -> ControllerCommand {
    ControllerCommand::CreateTopic {
        name: name.into(),
        topic_id,
        partitions: vec![PartitionAssignment {
            replicas: replicas.to_vec(),
        }],
        config: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_elect_a_leader_and_replicate_a_write() {
    let group = Group::start(2).await;
    let leader = group.agreed_leader().await;
    assert!([1, 2].contains(&leader));
    assert_eq!(group.write(register(1)).await, ControllerResponse::Ok);
    group
        .all_applied("broker 1 registered", |s| s.broker(1).is_some())
        .await;
    // A follower refuses writes and names the leader.
    let follower = group.nodes.values().find(|c| c.id() != leader).unwrap();
    match follower.write(register(2)).await {
        Err(ControllerWriteError::NotLeader {
            leader_id,
            leader_addr,
        }) => {
            assert_eq!(leader_id, Some(leader));
            assert_eq!(leader_addr, Some(group.addrs[&leader].to_string()));
        }
        other => panic!("a follower accepted a write: {other:?}"),
    }
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_forwards_proposals_to_the_leader_and_refusals_come_back() {
    let group = Group::start(3).await;
    let leader = group.agreed_leader().await;
    let follower = group.nodes.values().find(|c| c.id() != leader).unwrap();
    // Written through the follower: the leader proposes it, every node applies it.
    assert_eq!(
        follower.propose(register(3)).await.unwrap(),
        ControllerResponse::Ok
    );
    group
        .all_applied("broker 3 registered", |s| s.broker(3).is_some())
        .await;
    // The state machine's refusal travels back unchanged.
    let stale = ControllerCommand::RegisterBroker {
        id: 3,
        addr: "127.0.0.1:7403".into(),
        epoch: 0,
        empty_log: false,
    };
    match follower.propose(stale).await.unwrap() {
        ControllerResponse::Refused(ControllerError::StaleBrokerEpoch { .. }) => {}
        other => panic!("a stale registration was not refused: {other:?}"),
    }
    // On the leader itself, propose is a plain write.
    let l = &group.nodes[&leader];
    assert_eq!(
        l.propose(register(1)).await.unwrap(),
        ControllerResponse::Ok
    );
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_controllers_replicate_fail_over_and_a_restarted_node_catches_up() {
    let mut group = Group::start(3).await;

    // Exactly one leader, agreed on by all three.
    let first_leader = group.agreed_leader().await;

    // Brokers and a topic written on the leader are applied on every node.
    for id in 1..=3 {
        assert_eq!(group.write(register(id)).await, ControllerResponse::Ok);
    }
    assert_eq!(
        group.write(create_topic("t1", 1, &[1, 2, 3])).await,
        ControllerResponse::Ok
    );
    group
        .all_applied("brokers and t1", |s| {
            s.brokers.len() == 3
                && s.partition("t1", 0)
                    .is_some_and(|p| p.replicas == [1, 2, 3])
        })
        .await;

    // The leader stops: the other two elect one of themselves and writes continue.
    group.stop(first_leader).await;
    let second_leader = group.agreed_leader().await;
    assert_ne!(second_leader, first_leader);
    assert_eq!(
        group.write(create_topic("t2", 2, &[1, 2, 3])).await,
        ControllerResponse::Ok
    );
    group
        .all_applied("t2 on the survivors", |s| s.topic("t2").is_some())
        .await;

    // The old leader comes back on its directory and catches up on what it missed.
    group.restart(first_leader).await;
    group
        .all_applied("t2 on every node after the restart", |s| {
            s.topic("t1").is_some() && s.topic("t2").is_some()
        })
        .await;
    let leader = group.agreed_leader().await;
    assert_eq!(
        group.write(create_topic("t3", 3, &[3, 2, 1])).await,
        ControllerResponse::Ok
    );
    group
        .all_applied("t3 everywhere", |s| s.topic("t3").is_some())
        .await;
    // Every node applied the same log to the same state.
    let states: Vec<_> = {
        let mut v = Vec::new();
        for c in group.nodes.values() {
            v.push(c.state().await);
        }
        v
    };
    assert!(states.windows(2).all(|w| w[0] == w[1]), "states differ");
    tracing::debug!(first_leader, second_leader, leader, "done");
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster CA");
    let c = start(
        1,
        &tmp.path().join("c1"),
        "127.0.0.1:0".parse().unwrap(),
        &ca.node(1),
    )
    .await;
    let addr = c.local_addr();

    // A node of another cluster: its certificate chains to a different CA, and it trusts that
    // CA only. Either side refuses the handshake.
    let other = TestCa::new("other CA").node(2);
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connect = endpoint
        .connect_with(other.client_config().unwrap(), addr, "127.0.0.1")
        .unwrap();
    let res = tokio::time::timeout(BOUND, connect).await.unwrap();
    assert!(
        res.is_err(),
        "handshake with a foreign certificate succeeded"
    );

    // The cluster's own CA signs a node it trusts, but this node's certificate is foreign to
    // the server: a client trusting the right CA but presenting a foreign certificate.
    let mut mixed = ca.node(3);
    let foreign = TestCa::new("another CA").node(3);
    mixed.chain = foreign.chain.clone();
    mixed.key = foreign.key.clone_key();
    let connect = endpoint
        .connect_with(mixed.client_config().unwrap(), addr, "127.0.0.1")
        .unwrap();
    let refused = match tokio::time::timeout(BOUND, connect).await.unwrap() {
        Err(_) => true,
        // TLS 1.3: the client may finish before the server checks its certificate; the
        // server then closes the connection.
        Ok(conn) => tokio::time::timeout(BOUND, conn.closed()).await.is_ok(),
    };
    assert!(refused);
    endpoint.close(0u32.into(), b"");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_learner_added_after_the_log_was_purged_receives_a_snapshot() {
    let mut group = Group::start(2).await;
    let leader = group.agreed_leader().await;
    for id in 1..=3 {
        assert_eq!(group.write(register(id)).await, ControllerResponse::Ok);
    }
    assert_eq!(
        group.write(create_topic("s", 1, &[3, 1])).await,
        ControllerResponse::Ok
    );
    group
        .all_applied("the topic on both", |s| s.topic("s").is_some())
        .await;

    // Snapshot on the leader and purge its log up to the snapshot.
    let raft = group.nodes[&leader].raft().clone();
    raft.trigger().snapshot().await.unwrap();
    let snap = eventually("a snapshot on the leader", || {
        let m = raft.metrics().borrow().clone();
        async move {
            m.snapshot
                .filter(|s| Some(s.index) >= m.last_applied.map(|l| l.index))
        }
    })
    .await;
    raft.trigger().purge_log(snap.index).await.unwrap();
    eventually("the leader's log purged", || {
        let purged = raft.metrics().borrow().purged;
        async move { (purged.map(|p| p.index) >= Some(snap.index)).then_some(()) }
    })
    .await;

    // A new node can only be brought up to date with the snapshot (chunks over QUIC).
    let dir = group._tmp.path().join("controller-3");
    let c = start(3, &dir, "127.0.0.1:0".parse().unwrap(), &group.ca.node(3)).await;
    let node = BrokerNode {
        addr: c.local_addr().to_string(),
    };
    group.addrs.insert(3, c.local_addr());
    group.dirs.insert(3, dir);
    group.nodes.insert(3, c);
    eventually("the learner added", || {
        let raft = raft.clone();
        let node = node.clone();
        async move { raft.add_learner(3, node, true).await.ok() }
    })
    .await;
    let learner = &group.nodes[&3];
    eventually("the snapshot installed on the learner", || async move {
        let m = learner.raft().metrics().borrow().clone();
        let s = learner.state().await;
        (m.snapshot.is_some() && s.topic("s").is_some() && s.brokers.len() == 3).then_some(())
    })
    .await;
    // And it keeps following after the snapshot.
    assert_eq!(
        group.write(create_topic("after", 2, &[1, 2])).await,
        ControllerResponse::Ok
    );
    group
        .all_applied("the next write everywhere", |s| s.topic("after").is_some())
        .await;
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_of_three_voters_make_progress_while_the_third_is_unreachable() {
    let group = Group::start_without(3, &[3]).await;
    let leader = group.agreed_leader().await;
    assert_ne!(leader, 3);
    for id in 1..=3 {
        assert_eq!(group.write(register(id)).await, ControllerResponse::Ok);
    }
    group
        .all_applied("three brokers on the two running nodes", |s| {
            s.brokers.len() == 3
        })
        .await;
    // Heartbeats to the missing voter keep failing; writes keep committing meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        group.write(create_topic("t", 1, &[1, 2])).await,
        ControllerResponse::Ok
    );
    group
        .all_applied("the topic on the two running nodes", |s| {
            s.topic("t").is_some()
        })
        .await;
    group.shutdown().await;
}
