//! `quiver broker start|stop`: runs a broker in this process (foreground) or detached
//! (`--daemon` re-executes this binary in a new session, logging to `<data_dir>/broker.log`),
//! stops one through the pid file `<data_dir>/broker.pid`, and repairs a damaged partition
//! of a stopped broker's data directory.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::sync::Arc;

use quiver_core::{Broker, BrokerConfig, BrokerHandle};
use quiver_pipeline::BrokerPipelines;

use crate::output::{self, Format};

/// `quiver broker`.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    #[command(subcommand)]
    command: BrokerCommand,
}

#[derive(Debug, Subcommand)]
enum BrokerCommand {
    /// Start a broker (in the foreground unless --daemon).
    Start(StartArgs),
    /// Stop the broker whose pid file is in the data directory.
    Stop {
        /// Data directory of the broker [default: the data_dir of --config (or of the
        /// defaults), QUIVER_DATA_DIR overriding it as for `broker start`; ./quiver-data].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The broker's config file, to find its data directory.
        #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
        config: Option<PathBuf>,
    },
    /// Truncate a damaged partition at its first damaged batch (the broker must be stopped).
    ///
    /// A partition whose stored batches fail their CRC check is reported offline by
    /// `topic describe` and the broker log; this drops the damaged batch and everything
    /// after it, reports what was dropped, and the partition serves again at the next start.
    Repair {
        /// Data directory of the (stopped) broker [default: the data_dir of --config (or of
        /// the defaults), QUIVER_DATA_DIR overriding it as for `broker start`; ./quiver-data].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The broker's config file, to find its data directory.
        #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
        config: Option<PathBuf>,
        /// Topic of the damaged partition.
        #[arg(long)]
        topic: String,
        /// The damaged partition.
        #[arg(long)]
        partition: u32,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
}

/// `quiver broker start`.
#[derive(Debug, Args, Clone)]
pub struct StartArgs {
    /// Broker config file (TOML); built-in defaults when absent.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (overrides the config) [default: the config's data_dir,
    /// ./quiver-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on (overrides the config) [default: the config's listen,
    /// 127.0.0.1:7400].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Broker id (overrides the config) [default: the config's broker_id, 0].
    #[arg(long, value_name = "N")]
    broker_id: Option<u32>,
    /// Run detached; output goes to <data_dir>/broker.log.
    #[arg(long)]
    daemon: bool,
}

/// The line a started broker prints; `--daemon` waits for it in the log.
const READY_MARK: &str = "quiver broker listening on";

impl BrokerArgs {
    /// The start arguments when this is `broker start --daemon`.
    pub fn daemon_start(&self) -> Option<&StartArgs> {
        match &self.command {
            BrokerCommand::Start(s) if s.daemon => Some(s),
            _ => None,
        }
    }
}

/// Loads the config file (or defaults) with environment overrides, then the flags.
fn load_config(args: &StartArgs) -> anyhow::Result<BrokerConfig> {
    let mut cfg = BrokerConfig::load(args.config.as_deref(), std::env::vars())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(l) = &args.listen {
        cfg.listen = l.clone();
    }
    if let Some(id) = args.broker_id {
        cfg.broker_id = id;
    }
    cfg.validate("command line")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cfg)
}

pub(crate) fn pid_path(data_dir: &Path) -> PathBuf {
    data_dir.join("broker.pid")
}

/// Writes `pid` to the pid file atomically (a temporary file renamed over it): the daemon
/// parent and its child both write it, and a reader must never see it truncated and empty
/// (a broker starting up took that for a damaged file and exited).
pub(crate) fn write_pid(path: &Path, pid: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("pid.{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}

/// The pid in the pid file; `None` when there is none (no file, or an empty one left by a
/// crash between creating and writing it).
pub(crate) fn read_pid(path: &Path) -> anyhow::Result<Option<i32>> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => s
            .trim()
            .parse::<i32>()
            .map(Some)
            .with_context(|| format!("pid file {} does not hold a pid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Whether `pid` runs (a process that exited but was not reaped yet does not).
pub(crate) fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid)
}

/// Runs a `broker` subcommand in this process.
pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    match args.command {
        BrokerCommand::Start(start) => run_foreground(&start).await,
        BrokerCommand::Stop { data_dir, config } => {
            stop(data_dir_of(data_dir, config.as_deref())?).await
        }
        BrokerCommand::Repair {
            data_dir,
            config,
            topic,
            partition,
            output,
        } => repair(
            &data_dir_of(data_dir, config.as_deref())?,
            &topic,
            partition,
            output,
        ),
    }
}

/// The data directory a command about a local broker means: `--data-dir`, else the one
/// `broker start` would use with `--config` (its file, or the defaults, with the
/// environment's `QUIVER_*` overrides such as `QUIVER_DATA_DIR`), else `./quiver-data`.
fn data_dir_of(data_dir: Option<PathBuf>, config: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(d) = data_dir {
        return Ok(d);
    }
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    match BrokerConfig::load(config, env) {
        Ok(c) => Ok(c.data_dir),
        Err(e) if config.is_some() => Err(anyhow::Error::new(e).context("cannot read --config")),
        Err(_) => Ok(PathBuf::from("./quiver-data")),
    }
}

fn repair(data_dir: &Path, topic: &str, partition: u32, format: Format) -> anyhow::Result<()> {
    if let Some(pid) = read_pid(&pid_path(data_dir))? {
        if alive(pid) {
            bail!(
                "a broker (pid {pid}) is running with data directory {}; stop it first with `quiver broker stop --data-dir {}`",
                data_dir.display(),
                data_dir.display()
            );
        }
    }
    let report = Broker::repair(data_dir, topic, partition).with_context(|| {
        format!(
            "cannot repair {topic}/{partition} in {}",
            data_dir.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => output::json(&mut out, &report)?,
        Format::Table => {
            use std::io::Write;
            if report.metadata_rebuilt {
                writeln!(
                    out,
                    "{topic}/{partition}: the metadata record was damaged and is removed; the broker rebuilds it from the stored batches when it starts"
                )?;
                if report.log_end_before == 0 {
                    writeln!(
                        out,
                        "warning: {topic}/{partition} holds no batch, so its offsets start again at 0; consumers with committed offsets beyond it reset"
                    )?;
                }
            }
            match report.first_damaged_offset {
                None => writeln!(
                    out,
                    "{topic}/{partition}: no damaged batch found; {} (log end {})",
                    if report.metadata_rebuilt {
                        "no batch changed"
                    } else {
                        "nothing changed"
                    },
                    report.log_end_before
                )?,
                Some(at) => writeln!(
                    out,
                    "{topic}/{partition}: first damaged batch at offset {at}; dropped {} batches ({} records, {} bytes), offsets {at}..{}; the log now ends at {}",
                    report.dropped_batches,
                    report.dropped_records,
                    report.dropped_bytes,
                    report.log_end_before,
                    report.log_end_after
                )?,
            }
        }
    }
    Ok(())
}

async fn run_foreground(args: &StartArgs) -> anyhow::Result<()> {
    let cfg = load_config(args)?;
    let data_dir = cfg.data_dir.clone();
    let pid_file = pid_path(&data_dir);
    if let Some(pid) = read_pid(&pid_file)? {
        if pid != std::process::id() as i32 && alive(pid) {
            bail!(
                "a broker (pid {pid}) is already running with data directory {}; stop it with `quiver broker stop --data-dir {}`",
                data_dir.display(),
                data_dir.display()
            );
        }
    }
    let id = cfg.broker_id;
    let handle = Broker::start(cfg)
        .await
        .context("cannot start the broker")?;
    let pipelines = pipeline_host(&handle, &data_dir, id).await;
    if let Err(e) = write_pid(&pid_file, std::process::id()) {
        tracing::warn!(path = %pid_file.display(), error = %e, "cannot write the pid file");
    }
    let ca = handle
        .ca_path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(configured certificate)".into());
    println!(
        "{READY_MARK} {} (broker id {id}, data {}); CA certificate: {ca}",
        handle.local_addr(),
        data_dir.display()
    );
    // A failed disk flush stops the broker: it acknowledges nothing more, and a restart
    // (by hand or by a supervisor) recovers from what is on disk.
    let failed = tokio::select! {
        r = wait_for_signal() => { r?; None }
        f = handle.storage_failed() => Some(f),
    };
    tracing::info!("shutting down");
    // Deployed pipelines commit what they finished and leave their groups while the broker
    // still answers them.
    pipelines.shutdown().await;
    handle.shutdown().await;
    if read_pid(&pid_file).ok().flatten() == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(&pid_file);
    }
    match failed {
        Some(f) => bail!("the broker stopped: {f}"),
        None => Ok(()),
    }
}

/// Installs the host of deployed pipelines: its instances are clients of this broker,
/// reaching it in process (and other brokers over QUIC, trusting its CA). A lone broker starts the pipelines deployed before a
/// restart from its files; a cluster broker runs its share of those the controller holds.
async fn pipeline_host(handle: &BrokerHandle, data_dir: &Path, id: u32) -> Arc<BrokerPipelines> {
    // Requests to this broker skip QUIC; those to other brokers use it.
    let host = BrokerPipelines::new(
        data_dir,
        id,
        handle.in_process_client_config(),
        handle.group_max_size(),
    );
    handle.install_pipeline_host(host.clone());
    if handle.cluster_view().await.is_none() {
        let resume = host.clone();
        tokio::spawn(async move { resume.resume().await });
    } else if std::fs::read_dir(data_dir.join("pipelines")).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "toml")))
    }) {
        tracing::warn!(
            dir = %data_dir.join("pipelines").display(),
            "pipelines deployed while this broker ran alone are not resumed in a cluster, where the controller holds deployed pipelines; deploy them again (`quiver pipeline deploy FILE`)"
        );
    }
    host
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// `broker start --daemon`: re-executes this binary detached and waits until it is ready.
pub fn daemonize(args: &StartArgs) -> anyhow::Result<()> {
    let cfg = load_config(args)?;
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    if let Some(pid) = read_pid(&pid_path(&data_dir))? {
        if alive(pid) {
            bail!(
                "a broker (pid {pid}) is already running with data directory {}",
                data_dir.display()
            );
        }
    }
    let log_path = data_dir.join("broker.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let argv: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let mut cmd = Command::new(exe);
    cmd.args(argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot share the log file")?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the broker process")?;
    let pid = child.id();
    write_pid(&pid_path(&data_dir), pid)
        .with_context(|| format!("cannot write {}", pid_path(&data_dir).display()))?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let new_log = read_from(&log_path, log_start);
        if let Some(line) = new_log.lines().find(|l| l.contains(READY_MARK)) {
            println!("{line}");
            println!(
                "started in the background (pid {pid}); log: {}",
                log_path.display()
            );
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_file(pid_path(&data_dir));
            bail!(
                "the broker exited ({status}) before it was ready:\n{}",
                new_log.trim_end()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the broker (pid {pid}) is not ready after 60 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            s = String::from_utf8_lossy(&buf).into_owned();
        }
    }
    s
}

/// Stops the broker whose pid file is in `data_dir` and waits for it to exit.
pub(crate) async fn stop(data_dir: PathBuf) -> anyhow::Result<()> {
    let pid_file = pid_path(&data_dir);
    let Some(pid) = read_pid(&pid_file)? else {
        bail!(
            "no pid file at {}: is a broker running with data directory {}? Name its directory with --data-dir DIR (or its config with --config FILE); a broker started in the foreground stops with Ctrl-C",
            pid_file.display(),
            data_dir.display()
        );
    };
    if !alive(pid) {
        let _ = std::fs::remove_file(&pid_file);
        bail!("the broker (pid {pid}) is not running; removed the stale pid file");
    }
    // SAFETY: sending SIGTERM to a pid we read from our own pid file.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        bail!(
            "cannot signal pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) && !is_zombie(pid) {
        if Instant::now() > deadline {
            bail!("the broker (pid {pid}) did not stop within 30 s; kill it with `kill -9 {pid}`");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&pid_file);
    println!("stopped the broker (pid {pid})");
    Ok(())
}

/// True when `pid` has exited but was not reaped yet (its parent is still around).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod pid_file_tests {
    use super::*;

    #[test]
    fn a_pid_file_is_written_whole_and_an_empty_one_holds_no_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = pid_path(dir.path());
        assert_eq!(read_pid(&path).unwrap(), None, "no file");
        write_pid(&path, 4242).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(4242));
        write_pid(&path, 7).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(7), "replaced, not appended");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left behind"
        );
        std::fs::write(&path, "").unwrap();
        assert_eq!(read_pid(&path).unwrap(), None, "empty: a crash mid-write");
        std::fs::write(&path, "garbage").unwrap();
        assert!(read_pid(&path).is_err(), "anything else is reported");
    }
}
