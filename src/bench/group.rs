//! `bench consume --group G --members N`: N group members (each on its own connection)
//! share the topic's partitions and read it from the start with auto-commit; reports the
//! group's records/s. `bench rebalance --members N --partitions P`: how long N members take
//! to join and settle over P partitions, and how long adding one more member takes until
//! the group is balanced again (the incremental rebalance).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quiver_client::{Admin, AutoOffsetReset, Client, GroupConfig, GroupConsumer, ResetTo};

use super::consume::prepare;
use super::report::{histogram, Report};
use super::{Limit, LoadOpts};

/// Reads `topic` with `members` members of `group`; returns the report.
pub async fn consume(
    client: &Client,
    o: &LoadOpts,
    topic: &str,
    group: &str,
    members: usize,
) -> anyhow::Result<Report> {
    let want = prepare(client, o, topic).await?;
    // Start from the beginning whatever an earlier run committed (refused if members run).
    let admin = Admin::new(client.clone());
    if let Err(e) = admin
        .reset_group_offsets(group, topic, ResetTo::Earliest)
        .await
    {
        bail!("cannot reset group {group:?} to the start of {topic}: {e}");
    }
    let total = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let time_limit = match o.limit() {
        Limit::Time(d) => Some(d),
        Limit::Records(_) => None,
    };
    let mut tasks = Vec::new();
    for i in 0..members.max(1) {
        let member_client = Client::connect(client.config().clone())
            .await
            .context("connecting a group member")?;
        let mut cfg = GroupConfig::new(group, [topic]).auto_commit(Duration::from_secs(1));
        cfg.auto_offset_reset = Some(AutoOffsetReset::Earliest);
        cfg.client_id = format!("bench-{i}");
        cfg.fetch.buffer_chunks = 32;
        let (total, bytes, done) = (total.clone(), bytes.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut m = GroupConsumer::join(member_client, cfg).await?;
            while !done.load(Ordering::Relaxed) {
                let got = m.poll_timeout(Duration::from_millis(100)).await?;
                bytes.fetch_add(
                    got.iter().map(|r| r.value.len() as u64).sum(),
                    Ordering::Relaxed,
                );
                total.fetch_add(got.len() as u64, Ordering::Relaxed);
            }
            m.close().await?;
            anyhow::Ok(())
        }));
    }
    let mut last = total.load(Ordering::Relaxed);
    let mut idle = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let n = total.load(Ordering::Relaxed);
        if n >= want || time_limit.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if n != last {
            last = n;
            idle = Instant::now();
        } else if idle.elapsed() > Duration::from_secs(10) {
            done.store(true, Ordering::Relaxed);
            bail!("no records for 10 s after {n} of {want}");
        }
        if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
            let _ = t;
            done.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await??;
            }
            bail!("a member stopped early");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let records = total.load(Ordering::Relaxed);
    let record_size = bytes
        .load(Ordering::Relaxed)
        .checked_div(records)
        .map_or(o.record_size, |s| s as usize);
    let mut r = Report::new(
        "group-consume",
        records,
        record_size,
        o.partitions,
        seconds,
        &histogram(),
    );
    r.kind = format!("group-consume ({members} members)");
    Ok(r)
}

/// Measures joining and rebalancing `members` members over the topic's partitions.
pub async fn rebalance(client: &Client, o: &LoadOpts, members: usize) -> anyhow::Result<()> {
    let topic = o.topic_name();
    let admin = Admin::new(client.clone());
    if admin.describe_topic(&topic).await.is_err() {
        admin
            .create_topic(&topic, o.partitions, BTreeMap::new())
            .await
            .context("creating the bench topic")?;
    }
    let group = format!("{topic}-rebalance");
    let counts: Arc<Mutex<BTreeMap<usize, usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let spawn = |i: usize| {
        let (counts, stop, config, group, topic) = (
            counts.clone(),
            stop.clone(),
            client.config().clone(),
            group.clone(),
            topic.clone(),
        );
        tokio::spawn(async move {
            let c = Client::connect(config).await?;
            let mut cfg = GroupConfig::new(&group, [topic.as_str()]);
            cfg.client_id = format!("m{i}");
            let mut m = GroupConsumer::join(c, cfg).await?;
            while !stop.load(Ordering::Relaxed) {
                m.poll_timeout(Duration::from_millis(10)).await?;
                if let Ok(mut c) = counts.lock() {
                    c.insert(i, m.assignment().len());
                }
            }
            m.close().await?;
            anyhow::Ok(())
        })
    };
    let balanced = |n: usize| {
        let c = counts.lock().map(|c| c.clone()).unwrap_or_default();
        let total: usize = c.values().sum();
        let (lo, hi) = (
            c.values().min().copied().unwrap_or(0),
            c.values().max().copied().unwrap_or(0),
        );
        c.len() == n && total == o.partitions as usize && hi - lo <= 1
    };
    let wait_balanced = |n: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !balanced(n) {
            if Instant::now() > deadline {
                bail!("the group did not balance in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::Ok(())
    };
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for i in 0..members.saturating_sub(1) {
        tasks.push(spawn(i));
    }
    wait_balanced(members.saturating_sub(1)).await?;
    let settle = t0.elapsed();
    let t1 = Instant::now();
    tasks.push(spawn(members - 1));
    wait_balanced(members).await?;
    let join_one = t1.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    println!(
        "rebalance: {} members joined and settled over {} partitions in {:.0} ms; member {} joined and the group was balanced again in {:.0} ms",
        members - 1,
        o.partitions,
        settle.as_secs_f64() * 1000.0,
        members,
        join_one.as_secs_f64() * 1000.0
    );
    Ok(())
}
