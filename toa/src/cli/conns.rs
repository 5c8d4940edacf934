//! `toa conns`: the live connections that carry a client address.

use std::{os::fd::AsRawFd as _, path::Path, path::PathBuf};

use toa::{conns::Conn, Backend, Places};

use super::flags::Output;

/// List the live connections that carry a client address (this network namespace).
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
    /// Look in another network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
}

pub fn run(args: Args, places: &Places) -> anyhow::Result<()> {
    if let Some(netns) = &args.netns {
        enter_netns(netns)?;
    }
    let conns = Backend::live_or_default(places).conns()?;
    args.output.print(&conns, |conns| print!("{}", render(conns)))
}

fn render(conns: &[Conn]) -> String {
    let mut out = format!("{:<8} {:<46} {:<46} {:<46} PROCESS\n", "STATE", "LOCAL", "BALANCER", "CLIENT");
    for c in conns {
        let process = c.pid.map(|p| format!("{}({p})", c.process.clone().unwrap_or_default())).unwrap_or_default();
        out.push_str(&format!("{:<8} {:<46} {:<46} {:<46} {process}\n", c.state, c.local, c.balancer, c.client));
    }
    out
}

fn enter_netns(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("--netns {}: {e}", path.display()))?;
    // SAFETY: a valid descriptor; single-threaded here, so the whole process moves.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("--netns {}: {} (is it a network namespace?)", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_even_without_connections() {
        assert!(super::render(&[]).starts_with("STATE    LOCAL"));
    }

    #[test]
    fn a_file_that_is_no_namespace_is_refused() {
        let err = super::enter_netns(std::path::Path::new("/dev/null")).unwrap_err().to_string();
        assert!(err.starts_with("--netns /dev/null: "), "{err}");
    }
}
