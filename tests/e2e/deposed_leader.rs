//! A leader cut off from its peers while an `acks=all` write waits on it, replaced, and then
//! reconnected as a follower: it truncates what it wrote in its old term and copies the new
//! leader's records over those offsets, and its high watermark passes them. The waiting write
//! must then fail (the broker no longer leads), not be answered with offsets that now hold
//! other records.

use std::time::Duration;

use bytes::Bytes;
use quiver_client::{Client, ClientConfig};
use quiver_protocol::batch::{BatchBuilder, Compression};
use quiver_protocol::requests::{Acks, ProduceRequest};
use serde_json::Value;

use super::cluster_faults::FaultCluster;
use super::harness::{cli_at, json_lines, wait_for};
use super::netproxy::LinkFault;

const TOPIC: &str = "deposed";

/// `topic describe TOPIC --output json` through `bootstrap` (`--local`: that broker's copy).
fn describe(c: &FaultCluster, bootstrap: &str, local: bool) -> Option<Value> {
    let mut args = vec!["topic", "describe", TOPIC, "--output", "json"];
    if local {
        args.push("--local");
    }
    let out = cli_at(bootstrap, &c.ca(), &args, None);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

#[test]
fn an_acks_all_write_to_a_deposed_leader_is_not_acknowledged_over_the_new_leaders_records() {
    let c = FaultCluster::start();
    c.create_topic(TOPIC, 1);
    let everyone = c.bootstrap();
    let mut leader = 0;
    wait_for(60, "a leader for the topic", || {
        leader = describe(&c, &everyone, false)
            .and_then(|d| d["partitions"][0]["leader"].as_u64())
            .unwrap_or(0) as usize;
        leader >= 1
    });
    let others: Vec<String> = (1..=3)
        .filter(|id| *id != leader)
        .map(|id| c.addr_of(id))
        .collect();
    let others = others.join(",");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(Client::connect(ClientConfig {
            ca_file: Some(c.ca()),
            request_timeout: Duration::from_secs(90),
            ..ClientConfig::new(everyone.clone())
        }))
        .expect("connect");
    // Cut the leader off from its peers (clients still reach it), then write to it: the
    // write waits for followers that cannot fetch.
    c.isolate(
        leader,
        LinkFault {
            blackhole: true,
            ..LinkFault::default()
        },
    );
    let mut b = BatchBuilder::new(Compression::None);
    b.push(
        None,
        b"written-to-the-old-leader",
        quiver_core::clock::now_ms(),
        &[],
    );
    let req = ProduceRequest {
        topic: TOPIC.into(),
        partition: 0,
        acks: Acks::All,
        timeout_ms: 90_000,
    };
    let batch: Bytes = b.build();
    let waiting = {
        let client = client.clone();
        rt.spawn(async move {
            client
                .request_to_broker(leader as u32, &req, batch)
                .await
                .map(|r| r.map(|(resp, _)| resp))
        })
    };
    let at_leader = c.addr_of(leader);
    wait_for(60, "the write in the cut-off leader's log", || {
        describe(&c, &at_leader, true)
            .and_then(|d| d["partitions"][0]["log_end_offset"].as_i64())
            .is_some_and(|end| end >= 1)
    });
    // The others fence it and elect a new leader, which takes other records at the same
    // offsets.
    wait_for(90, "a new leader among the others", || {
        describe(&c, &others, false)
            .and_then(|d| d["partitions"][0]["leader"].as_u64())
            .is_some_and(|l| l >= 1 && l as usize != leader)
    });
    let out = cli_at(
        &others,
        &c.ca(),
        &["produce", TOPIC, "--acks", "all"],
        Some(b"new-1\nnew-2\nnew-3\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Reconnected, the old leader follows: it truncates its write and copies the new
    // records, and its high watermark passes the offset its waiting write got.
    c.isolate(leader, LinkFault::default());
    let answer = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), waiting).await })
        .expect("the waiting write is answered")
        .expect("the request task");
    match answer {
        Ok(Some(resp)) => {
            let out = cli_at(
                &others,
                &c.ca(),
                &["consume", TOPIC, "--from-beginning", "--output", "json"],
                None,
            );
            let stored = json_lines(&String::from_utf8_lossy(&out.stdout));
            let at = stored
                .iter()
                .find(|r| r["offset"].as_i64() == Some(resp.base_offset))
                .map(|r| r["value"].as_str().unwrap_or_default().to_string());
            assert_eq!(
                at.as_deref(),
                Some("written-to-the-old-leader"),
                "the write was acknowledged at offset {} but that offset holds something else: {stored:?}",
                resp.base_offset
            );
        }
        Ok(None) => panic!("the client does not see a cluster"),
        Err(e) => eprintln!("the deposed leader refused the waiting write: {e}"),
    }
}
