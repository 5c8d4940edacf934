//! The command line: one file per command. Each parses its flags (clap lives here only, not in
//! the library), calls the library, renders text or JSON, and returns an error that `main`
//! prints as `toa: error: …` with exit status 1.

mod completions;
mod conns;
mod doctor;
mod flags;
mod load;
mod man;
mod probe;
mod reader;
mod run;
mod stats;
mod status;
mod unload;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use toa::{backend::userspace::DEFAULT_TABLE, config::LogFormat, logging, programs, Places, DEFAULT_PIN_DIR};

#[derive(Parser)]
#[command(name = "toa", about = "Real client addresses behind FULLNAT load balancers (TCP Option Address, eBPF)")]
pub(crate) struct Cli {
    /// bpffs directory holding the agent's pinned programs and maps [default: /sys/fs/bpf/toa].
    #[arg(long, global = true, env = "TOA_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// Shared table of the userspace mode; libtoa.so reads the same TOA_TABLE [default: /run/toa/table].
    #[arg(long, global = true, env = "TOA_TABLE")]
    table: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    Load(load::Args),
    Run(run::Args),
    Unload(unload::Args),
    #[command(hide = true)]
    UserspaceReader(reader::Args),
    Status(status::Args),
    Stats(stats::Args),
    Conns(conns::Args),
    Doctor(doctor::Args),
    Probe(probe::Args),
    Completions(completions::Args),
    #[command(hide = true)]
    Man(man::Args),
}

/// The command line as users see it: without the hidden commands (what completions and manual
/// pages describe; clap's generators would list hidden subcommands too).
pub(crate) fn visible_command() -> clap::Command {
    let full = Cli::command();
    let visible: Vec<clap::Command> = full.get_subcommands().filter(|c| !c.is_hide_set()).cloned().collect();
    let mut cmd = clap::Command::new("toa")
        .about(full.get_about().cloned().unwrap_or_default())
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .subcommands(visible);
    for arg in full.get_arguments() {
        cmd = cmd.arg(arg.clone());
    }
    cmd
}

pub fn main() -> ExitCode {
    // The version names the embedded programs too: two builds of one version can differ.
    let version: &'static str =
        Box::leak(format!("{} (programs {})", env!("CARGO_PKG_VERSION"), programs::hash()).into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toa: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let places = Places {
        pin_dir: cli.pin_dir.clone().unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
        table: cli.table.clone().unwrap_or_else(|| DEFAULT_TABLE.into()),
    };
    if !matches!(cli.command, Command::Run(_)) {
        // `toa run` picks its log format from its settings.
        logging::init(LogFormat::Text);
    }
    match cli.command {
        Command::Load(args) => load::run(args, &places),
        Command::Run(args) => run::run(args, cli.pin_dir, cli.table),
        Command::Unload(args) => unload::run(args, cli.pin_dir, cli.table),
        Command::UserspaceReader(args) => reader::run(args, &places),
        Command::Status(args) => status::run(args, &places),
        Command::Stats(args) => stats::run(args, &places),
        Command::Conns(args) => conns::run(args, &places),
        Command::Doctor(args) => doctor::run(args, &places),
        Command::Probe(args) => probe::run(args),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => man::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks (conflicting names, bad defaults) over every command.
    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
        visible_command().debug_assert();
    }
}
