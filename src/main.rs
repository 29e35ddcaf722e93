//! `quiver`: the command-line interface. Parses arguments, sets up logging, and hands each
//! command group to its module; no command logic lives here.

mod bench;
mod broker;
mod connect;
mod consume;
mod group;
mod output;
mod plugin;
mod produce;
mod topic;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::connect::GlobalOpts;

/// Quiver: a QUIC-native streaming platform.
#[derive(Debug, Parser)]
#[command(name = "quiver", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run or stop a broker.
    Broker(broker::BrokerArgs),
    /// Create, list, describe, alter and delete topics.
    Topic(topic::TopicArgs),
    /// Write records read line by line from stdin or a file.
    Produce(produce::ProduceArgs),
    /// Read records and print them.
    Consume(consume::ConsumeArgs),
    /// List, describe, reset and delete consumer groups.
    Group(group::GroupArgs),
    /// Measure throughput and latency, and the raw limits they compare with.
    Bench(bench::BenchArgs),
    /// Deploy, list, describe and remove plugins; test and bench a bundle locally.
    Plugin(plugin::PluginArgs),
    // Later groups: `Plugin`, `Pipeline`, `Cluster`.
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Command::Broker(_) => "info",
        _ => "warn",
    };
    connect::init_logging(cli.global.log_level.as_deref(), default_level);

    // Daemonizing re-executes this binary, so it happens before any runtime exists.
    if let Command::Broker(args) = &cli.command {
        if let Some(start) = args.daemon_start() {
            return finish(broker::daemonize(start));
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return finish(Err(anyhow::anyhow!("cannot start the async runtime: {e}"))),
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Broker(args) => broker::run(args).await,
            Command::Topic(args) => topic::run(&cli.global, args).await,
            Command::Produce(args) => produce::run(&cli.global, args).await,
            Command::Consume(args) => consume::run(&cli.global, args).await,
            Command::Bench(args) => bench::run(&cli.global, args).await,
            Command::Group(args) => group::run(&cli.global, args).await,
            Command::Plugin(args) => plugin::run(&cli.global, args).await,
        }
    });
    // Do not wait for lingering background tasks (fetches in flight) on exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
