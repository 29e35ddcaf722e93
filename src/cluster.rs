//! `quiver cluster start|stop|status --config FILE`, `quiver cluster describe`: the brokers of a `cluster.toml`
//! (documented in `config/cluster.toml`) on this machine. `start` makes the cluster CA on
//! first use, signs each broker's certificate with it, writes each broker's `broker.toml`
//! (its overrides, id, listen address, data directory, certificate, and the `[cluster]`
//! section naming the CA and every broker as a controller voter), starts as a daemon every
//! broker that is not running yet, and waits until a controller leader exists and every
//! broker is registered. `stop` stops them cleanly; `status` reports each one and the
//! controller's view. `describe` asks any broker (`--bootstrap`) for its view, from any
//! machine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use quiver_client::{Client, ClientConfig};
use quiver_core::cluster::ClusterFile;
use quiver_core::config::VoterConfig;
use quiver_protocol::requests::{ClusterDescription, DescribeClusterRequest};
use serde::Serialize;

use crate::broker::{alive, pid_path, read_pid};
use crate::connect::GlobalOpts;
use crate::output::{self, Format};

/// How long `cluster start` waits for the controller and the registrations.
const START_WAIT: Duration = Duration::from_secs(90);

/// `quiver cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start every broker of the file that is not running (as daemons), with certificates
    /// from the cluster CA, and wait for the controller leader and every registration.
    Start {
        /// The cluster file (see config/cluster.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Stop every running broker of the file cleanly.
    Stop {
        /// The cluster file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// The cluster as the broker at --bootstrap sees it, from any machine: the controller
    /// leader, every registered broker (id, address, epoch, fenced) and partition health.
    /// JSON: {"clustered", "broker", "controller_leader", "brokers": [{"id", "addr",
    /// "epoch", "fenced"}], "under_replicated_partitions", "offline_partitions",
    /// "damaged_partitions"}.
    Describe {
        /// Output format.
        #[arg(long, default_value = "table")]
        output: Format,
    },
    /// Each broker (pid, alive, fenced) and the controller leader.
    Status {
        /// The cluster file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// Runs a `cluster` subcommand.
pub async fn run(global: &GlobalOpts, args: ClusterArgs) -> anyhow::Result<()> {
    match args.command {
        ClusterCommand::Describe { output } => {
            let client = global.connect().await?;
            let (d, _) = client
                .request(&DescribeClusterRequest {}, Bytes::new())
                .await
                .context("describing the cluster")?;
            let mut out = std::io::stdout().lock();
            match output {
                Format::Json => output::json(&mut out, &d)?,
                Format::Table => describe_table(&mut out, &d)?,
            }
            Ok(())
        }
        ClusterCommand::Start { config } => start(&config).await,
        ClusterCommand::Stop { config } => stop(&config).await,
        ClusterCommand::Status { config, output } => {
            let file = load(&config)?;
            let s = status(&file).await;
            let mut out = std::io::stdout().lock();
            match output {
                Format::Json => output::json(&mut out, &s)?,
                Format::Table => status_table(&mut out, &s)?,
            }
            Ok(())
        }
    }
}

/// The file, with `data_root` made absolute (daemons run elsewhere).
fn load(path: &Path) -> anyhow::Result<ClusterFile> {
    let mut file = ClusterFile::load(path)?;
    if file.data_root.is_relative() {
        file.data_root = std::env::current_dir()
            .context("current directory")?
            .join(&file.data_root);
    }
    Ok(file)
}

/// The pid of the broker running in `dir` (a killed one not yet reaped does not count).
fn running_pid(dir: &Path) -> Option<i32> {
    read_pid(&pid_path(dir))
        .ok()
        .flatten()
        .filter(|p| alive(*p))
}

async fn start(path: &Path) -> anyhow::Result<()> {
    let file = load(path)?;
    let tls_dir = file.data_root.join("tls");
    let ca = quiver_core::tls::cluster_ca(&tls_dir)
        .with_context(|| format!("cannot make the cluster CA in {}", tls_dir.display()))?;
    // Voters are reached at each broker's advertised address (its listen address unless
    // the file overrides `advertised_addr`).
    let mut voters = Vec::with_capacity(file.brokers.len());
    for b in &file.brokers {
        let cfg = file
            .broker_config(b)
            .map_err(|e| anyhow::anyhow!("broker {}: {e}", b.id))?;
        voters.push(VoterConfig {
            id: b.id,
            addr: cfg.advertised(),
        });
    }
    let exe = std::env::current_exe().context("cannot find the quiver binary")?;
    for b in &file.brokers {
        let dir = file.broker_dir(b.id);
        if let Some(pid) = running_pid(&dir) {
            println!("broker {} is already running (pid {pid})", b.id);
            continue;
        }
        let mut cfg = file
            .broker_config(b)
            .map_err(|e| anyhow::anyhow!("broker {}: {e}", b.id))?;
        let mut sans = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            b.listen.ip().to_string(),
        ];
        sans.dedup();
        let (cert, key) = quiver_core::tls::issue_broker_certificate(
            &tls_dir,
            b.id,
            &sans,
            &dir.join("cluster-tls"),
        )
        .with_context(|| format!("cannot issue broker {}'s certificate", b.id))?;
        cfg.tls.cert = Some(cert);
        cfg.tls.key = Some(key);
        cfg.cluster.ca = Some(ca.clone());
        cfg.cluster.voters = voters.clone();
        let config_path = dir.join("broker.toml");
        std::fs::write(
            &config_path,
            toml::to_string(&cfg).context("cannot write the broker config")?,
        )
        .with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut start = std::process::Command::new(&exe);
        start
            .args(["broker", "start", "--daemon", "--config"])
            .arg(&config_path);
        // The cluster file decides each broker's config: a `QUIVER_LISTEN` or
        // `QUIVER_DATA_DIR` exported in this shell would otherwise give every broker the
        // same address or directory.
        for (var, _) in std::env::vars_os() {
            if var.to_str().is_some_and(quiver_core::config::is_config_var) {
                start.env_remove(var);
            }
        }
        let out = start
            .output()
            .with_context(|| format!("cannot start broker {}", b.id))?;
        if !out.status.success() {
            bail!(
                "broker {} did not start: {}",
                b.id,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        println!("started broker {} on {}", b.id, b.listen);
    }
    let deadline = Instant::now() + START_WAIT;
    loop {
        let s = status(&file).await;
        let ready = s.controller_leader.is_some()
            && s.all_views_ready
            && s.brokers.iter().all(|b| b.alive && !b.fenced);
        if ready {
            println!(
                "cluster of {} brokers running; controller leader: broker {}",
                s.brokers.len(),
                s.controller_leader.unwrap_or_default()
            );
            println!(
                "CA certificate: {} (e.g. quiver --bootstrap {} --ca {} topic list)",
                ca.display(),
                file.brokers[0].listen,
                ca.display()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not come up within {} s: controller leader {:?}, brokers {}; see each <data_root>/broker-N/broker.log",
                START_WAIT.as_secs(),
                s.controller_leader,
                s.brokers
                    .iter()
                    .map(|b| format!("{} (alive {}, fenced {})", b.id, b.alive, b.fenced))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn stop(path: &Path) -> anyhow::Result<()> {
    let file = load(path)?;
    let mut failures = Vec::new();
    for b in &file.brokers {
        let dir = file.broker_dir(b.id);
        if running_pid(&dir).is_none() {
            println!("broker {} is not running", b.id);
            continue;
        }
        if let Err(e) = crate::broker::stop(dir).await {
            failures.push(format!("broker {}: {e}", b.id));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// One broker in `cluster status`.
#[derive(Debug, Serialize)]
pub struct BrokerStatus {
    /// Broker id.
    pub id: u32,
    /// Its listen address.
    pub addr: String,
    /// Its process id, when its pid file names a live process.
    pub pid: Option<i32>,
    /// Whether that process runs.
    pub alive: bool,
    /// Fenced in the controller's metadata (true when not registered).
    pub fenced: bool,
}

/// `cluster status --output json`.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    /// The controller leader's broker id.
    pub controller_leader: Option<u64>,
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// Every broker of the file.
    pub brokers: Vec<BrokerStatus>,
    /// Partitions with fewer in-sync replicas than replicas.
    pub under_replicated_partitions: u64,
    /// Partitions that serve nothing (no leader, or damaged storage).
    pub offline_partitions: u64,
    /// Every running broker's own view has every broker registered and unfenced (what
    /// `start` waits for, so the next command sees the whole cluster wherever it lands).
    #[serde(skip)]
    pub all_views_ready: bool,
}

async fn connect(addr: &str, ca: &Path) -> Option<Client> {
    let config = ClientConfig {
        ca_file: Some(ca.to_path_buf()),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..ClientConfig::new(addr)
    };
    Client::connect(config).await.ok()
}

async fn status(file: &ClusterFile) -> ClusterStatus {
    let ca = file.ca_path();
    let mut view: Option<ClusterDescription> = None;
    let mut damaged = 0u64;
    let mut all_views_ready = true;
    let mut brokers = Vec::with_capacity(file.brokers.len());
    for b in &file.brokers {
        let pid = running_pid(&file.broker_dir(b.id));
        if pid.is_some() {
            if let Some(client) = connect(&b.listen.to_string(), &ca).await {
                if let Ok((d, _)) = client
                    .request(&DescribeClusterRequest {}, Bytes::new())
                    .await
                {
                    damaged += d.damaged_partitions;
                    all_views_ready &= d.controller_leader.is_some()
                        && d.brokers.len() == file.brokers.len()
                        && d.brokers.iter().all(|b| !b.fenced);
                    // The view with a leader wins; any view beats none.
                    if view.as_ref().is_none_or(|v| v.controller_leader.is_none()) {
                        view = Some(d);
                    }
                }
            }
        }
        brokers.push(BrokerStatus {
            id: b.id,
            addr: b.listen.to_string(),
            pid,
            alive: pid.is_some(),
            fenced: true,
        });
    }
    if let Some(v) = &view {
        for b in &mut brokers {
            b.fenced = v
                .brokers
                .iter()
                .find(|r| r.id == u64::from(b.id))
                .is_none_or(|r| r.fenced);
        }
    }
    ClusterStatus {
        controller_leader: view.as_ref().and_then(|v| v.controller_leader),
        ca,
        brokers,
        under_replicated_partitions: view.as_ref().map_or(0, |v| v.under_replicated_partitions),
        offline_partitions: view.as_ref().map_or(0, |v| v.offline_partitions) + damaged,
        all_views_ready,
    }
}

fn describe_table(out: &mut impl Write, d: &ClusterDescription) -> anyhow::Result<()> {
    if !d.clustered {
        writeln!(
            out,
            "broker {} runs alone (no [cluster] in its config); damaged partitions: {}",
            d.broker, d.damaged_partitions
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "seen by broker {}; controller leader: {}; under-replicated partitions: {}; offline partitions: {}; damaged partitions here: {}",
        d.broker,
        leader_label(d.controller_leader),
        d.under_replicated_partitions,
        d.offline_partitions,
        d.damaged_partitions
    )?;
    let rows: Vec<Vec<String>> = d
        .brokers
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.addr.clone(),
                b.epoch.to_string(),
                b.fenced.to_string(),
            ]
        })
        .collect();
    output::table(out, &["ID", "ADDR", "EPOCH", "FENCED"], &rows)?;
    Ok(())
}

/// `broker N`, or `none` while the controller has no leader.
fn leader_label(leader: Option<u64>) -> String {
    leader.map_or("none".to_string(), |l| format!("broker {l}"))
}

fn status_table(out: &mut impl Write, s: &ClusterStatus) -> anyhow::Result<()> {
    writeln!(
        out,
        "controller leader: {}; CA: {}; under-replicated partitions: {}; offline partitions: {}",
        leader_label(s.controller_leader),
        s.ca.display(),
        s.under_replicated_partitions,
        s.offline_partitions
    )?;
    let rows: Vec<Vec<String>> = s
        .brokers
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.addr.clone(),
                b.pid.map_or("-".into(), |p| p.to_string()),
                b.alive.to_string(),
                b.fenced.to_string(),
            ]
        })
        .collect();
    output::table(out, &["ID", "ADDR", "PID", "ALIVE", "FENCED"], &rows)?;
    Ok(())
}
