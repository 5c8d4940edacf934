//! `toa userspace-reader` (hidden): the userspace mode's capture reader, as `toa load` starts it.

use std::sync::{atomic::AtomicBool, Arc};

use toa::{Places, Userspace};

/// The userspace mode's capture reader (started by `toa load --mode userspace`).
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, places: &Places) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    // Opened now: the confined reader may open nothing.
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    Userspace::new(places).run_reader(&stop, || {
        // `toa load` stops listening once the table is live: nothing more goes to its pipe.
        // SAFETY: replaces our own stderr descriptor.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 2) };
    })?;
    Ok(())
}
