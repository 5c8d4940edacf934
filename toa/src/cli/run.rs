//! `toa run`: the agent as a service (see `toa::service`).

use std::{net::SocketAddr, path::PathBuf};

use toa::config::Overrides;

use super::flags::{LogFormatFlag, ModeFlag, PolicyFlags, TuningFlags};

/// Run as a service: load, serve metrics, reload on SIGHUP, unload on SIGTERM.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file [default: /etc/toa/toa.toml, if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// eBPF (Linux ≥ 5.10) or userspace (capture reader + LD_PRELOAD libtoa.so) [default: auto].
    #[arg(long, value_enum)]
    mode: Option<ModeFlag>,
    /// cgroup v2 directory to scope the agent to (default: the root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Address of the metrics and health endpoint [default: 127.0.0.1:9431].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// On SIGTERM leave the programs attached, so a restart loses no client address.
    #[arg(long)]
    keep_loaded: bool,
    /// Log lines as text or JSON [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormatFlag>,
    #[command(flatten)]
    policy: PolicyFlags,
    #[command(flatten, next_help_heading = "Userspace mode")]
    tuning: TuningFlags,
}

/// `pin_dir` and `table` as given on the command line (global flags), not defaulted: the config
/// file may set them.
pub fn run(args: Args, pin_dir: Option<PathBuf>, table: Option<PathBuf>) -> anyhow::Result<()> {
    let flags = Overrides {
        mode: args.mode.map(Into::into),
        table,
        tuning: args.tuning.into(),
        cgroup: args.cgroup,
        pin_dir,
        metrics: args.metrics,
        keep_loaded: args.keep_loaded,
        log_format: args.log_format.map(Into::into),
        policy: args.policy.into(),
    };
    toa::service::run(args.config, flags)?;
    Ok(())
}
