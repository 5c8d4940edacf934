//! `toa load`: load the agent in the mode this kernel gets (or the one asked for).

use std::path::PathBuf;

use toa::{config::ConfigFile, Backend, LoadRequest, Loaded, Places};

use super::{
    flags::{ModeFlag, Output, PolicyFlags, TuningFlags},
    status::render_status,
};

/// Load the agent and attach it; it stays attached after this command exits.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// eBPF (Linux ≥ 5.10) or userspace (capture reader + LD_PRELOAD libtoa.so, any kernel).
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeFlag,
    /// cgroup v2 directory to scope the agent to (default: the root, i.e. every process).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    output: Output,
    #[command(flatten)]
    policy: PolicyFlags,
    #[command(flatten, next_help_heading = "Userspace mode")]
    tuning: TuningFlags,
}

pub fn run(args: Args, places: &Places) -> anyhow::Result<()> {
    let policy = toa::config::PolicyOverrides::from(args.policy).over(&ConfigFile::default());
    let tuning = toa::backend::userspace::TuningOverrides::from(args.tuning).tuning();
    let request = LoadRequest { cgroup: args.cgroup, policy, tuning };
    let loaded = Backend::new(args.mode.into(), places).load(&request)?;
    args.output.print(&loaded, |loaded| print!("{}", render(loaded)))
}

/// What a load did, then the status.
fn render(loaded: &Loaded) -> String {
    let userspace = if loaded.status.userspace.is_some() { " in userspace mode" } else { "" };
    let said = match (loaded.changed, loaded.load_time_ms) {
        (true, Some(t)) if userspace.is_empty() => format!("toa loaded in {t} ms"),
        (true, Some(t)) => format!("toa loaded{userspace} in {t:.0} ms"),
        (true, None) => format!("toa was already loaded{userspace}; policy updated for new connections"),
        (false, _) => "toa was already loaded; nothing changed".to_owned(),
    };
    format!("{said}\n{}", render_status(&loaded.status))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser as _;
    use toa::{policy::Dialect, Status};

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Args {
        match Cli::try_parse_from([&["toa", "load"], args].concat()).expect("parses").command {
            Command::Load(args) => args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn flags_become_the_librarys_request() {
        let args =
            parse(&["--mode", "userspace", "--dialect", "alibaba-cdn", "--kind", "253", "--accept-wait-us", "7"]);
        assert_eq!(args.mode, ModeFlag::Userspace);
        let policy = toa::config::PolicyOverrides::from(args.policy).over(&ConfigFile::default());
        assert_eq!((policy.kinds, policy.dialects), (vec![253], vec![Dialect::AlibabaCdn]));
        assert_eq!(toa::backend::userspace::TuningOverrides::from(args.tuning).tuning().accept_wait_us, 7);
    }

    #[test]
    fn out_of_range_tuning_is_refused_by_the_parser() {
        let err = Cli::try_parse_from(["toa", "load", "--accept-wait-us", "1000001"]).err().expect("refused");
        assert!(err.to_string().contains("1000001"), "{err}");
    }

    #[test]
    fn says_what_it_did_in_each_mode() {
        let status = Status { loaded: true, ..Status::not_loaded(Path::new("/sys/fs/bpf/toa")) };
        let fresh = Loaded { changed: true, status: status.clone(), load_time_ms: Some(12.5) };
        assert!(render(&fresh).starts_with("toa loaded in 12.5 ms\n"));
        let same = Loaded { changed: false, status, load_time_ms: None };
        assert!(render(&same).starts_with("toa was already loaded; nothing changed\n"));
    }
}
