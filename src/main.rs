//! `quiver`: the command-line interface. Parses arguments, sets up logging, and hands each
//! command group to its module; no command logic lives here.

mod bench;
mod broker;
mod cluster;
mod connect;
mod consume;
mod group;
mod malloc_tuning;
mod output;
mod pipeline;
mod plugin;
mod produce;
mod run_copies;
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
    /// Start, stop and inspect the brokers of a cluster file on this machine.
    Cluster(cluster::ClusterArgs),
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
    /// Run, deploy and manage pipelines: source topics → plugin stages → sink topics.
    Pipeline(pipeline::PipelineArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    ///
    /// bash: quiver completions bash > ~/.local/share/bash-completion/completions/quiver
    /// (or add `source <(quiver completions bash)` to ~/.bashrc)
    ///
    /// zsh: quiver completions zsh > ~/.zfunc/_quiver
    /// (with `fpath+=~/.zfunc` before `compinit` in ~/.zshrc)
    ///
    /// fish: quiver completions fish > ~/.config/fish/completions/quiver.fish
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    // Later groups: `Cluster`.
}

/// Shells `quiver completions` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CompletionShell {
    /// Bash.
    Bash,
    /// Zsh.
    Zsh,
    /// Fish.
    Fish,
}

/// Writes the completion script for `shell` to `out`.
fn write_completions(shell: CompletionShell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "quiver", out);
}

fn main() -> ExitCode {
    malloc_tuning::tune();
    let cli = Cli::parse();
    // No runtime, logging or connection: just the script.
    if let Command::Completions { shell } = &cli.command {
        // Generated in memory first: clap_complete panics on a failed write (a closed pipe).
        let mut script = Vec::new();
        write_completions(*shell, &mut script);
        let mut out = std::io::stdout().lock();
        let written = std::io::Write::write_all(&mut out, &script)
            .and_then(|()| std::io::Write::flush(&mut out));
        return match written {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                finish(Err(anyhow::anyhow!("cannot write the script: {e}")))
            }
            _ => ExitCode::SUCCESS,
        };
    }
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
            Command::Cluster(args) => cluster::run(&cli.global, args).await,
            Command::Topic(args) => topic::run(&cli.global, args).await,
            Command::Produce(args) => produce::run(&cli.global, args).await,
            Command::Consume(args) => consume::run(&cli.global, args).await,
            Command::Bench(args) => bench::run(&cli.global, args).await,
            Command::Group(args) => group::run(&cli.global, args).await,
            Command::Plugin(args) => plugin::run(&cli.global, args).await,
            Command::Pipeline(args) => pipeline::run(&cli.global, args).await,
            Command::Completions { .. } => Ok(()),
        }
    });
    // Do not wait for lingering background tasks (fetches in flight) on exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of the output went away (`| head`): not an error, as for `cat`.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap's own checks (conflicting names, bad defaults, requires of unknown args).
        Cli::command().debug_assert();
    }

    #[test]
    fn consume_with_a_group_accepts_from_beginning_and_still_refuses_offsets() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["quiver"], args].concat());
        let cli = parse(&["consume", "t", "--group", "g", "--from-beginning"])
            .expect("--group with --from-beginning parses");
        assert!(matches!(cli.command, Command::Consume(_)));
        for refused in [
            &["consume", "t", "--group", "g", "--offset", "3"][..],
            &["consume", "t", "--group", "g", "--partition", "1"][..],
            &["consume", "t", "--from-beginning", "--offset", "3"][..],
        ] {
            assert!(parse(refused).is_err(), "{refused:?} should be refused");
        }
    }

    #[test]
    fn completion_scripts_name_the_subcommands_for_each_shell() {
        for (shell, marker) in [
            (CompletionShell::Bash, "complete -F"),
            (CompletionShell::Zsh, "#compdef quiver"),
            (CompletionShell::Fish, "complete -c quiver"),
        ] {
            let mut out = Vec::new();
            write_completions(shell, &mut out);
            let script = String::from_utf8(out).expect("UTF-8 script");
            assert!(script.contains(marker), "{shell:?} script lacks {marker:?}");
            for sub in [
                "consume",
                "produce",
                "topic",
                "completions",
                "from-beginning",
            ] {
                assert!(script.contains(sub), "{shell:?} script lacks {sub:?}");
            }
        }
        let parse = |s: &str| Cli::try_parse_from(["quiver", "completions", s]);
        assert!(parse("bash").is_ok() && parse("zsh").is_ok() && parse("fish").is_ok());
        assert!(parse("tcsh").is_err());
    }
}
