//! `toa unload`: remove what either mode left loaded.

use std::path::PathBuf;

use toa::{
    config::{ConfigFile, Overrides, Settings},
    Backend,
};

/// Detach the agent and remove everything it pinned (or stop the userspace reader).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unload what `toa run --config FILE` loaded: its pin_dir and table (the global flags
    /// still win), e.g. /etc/toa/toa.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// `pin_dir` and `table` as given on the command line (global flags), not defaulted.
pub fn run(args: Args, pin_dir: Option<PathBuf>, table: Option<PathBuf>) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => ConfigFile::read(path, true)?,
        None => ConfigFile::default(),
    };
    let places = Settings::merge(&file, &Overrides { pin_dir, table, ..Default::default() }).places();
    let [ebpf, user] = Backend::both(&places);
    println!("{}", said(ebpf.unload()?, user.unload()?));
    Ok(())
}

/// What to say, from what each mode had loaded (eBPF, userspace).
fn said(ebpf: bool, userspace: bool) -> &'static str {
    match (ebpf, userspace) {
        (false, false) => "toa was not loaded; nothing to do",
        (true, _) => "toa unloaded",
        (false, true) => "toa unloaded (userspace mode)",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn says_which_mode_it_unloaded() {
        assert_eq!(super::said(false, false), "toa was not loaded; nothing to do");
        assert_eq!(super::said(true, false), "toa unloaded");
        assert_eq!(super::said(false, true), "toa unloaded (userspace mode)");
    }
}
