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
    // The virtual address and VPC id only where some connection has one (VTOA, ByteDance).
    let parts = conns.iter().any(|c| c.vip.is_some() || c.vpc_id.is_some());
    let mut out = format!("{:<8} {:<46} {:<46} {:<46} ", "STATE", "LOCAL", "BALANCER", "CLIENT");
    if parts {
        out.push_str(&format!("{:<22} {:<10} ", "VIP", "VPC"));
    }
    out.push_str("PROCESS\n");
    for c in conns {
        let process = c.pid.map(|p| format!("{}({p})", c.process.clone().unwrap_or_default())).unwrap_or_default();
        out.push_str(&format!("{:<8} {:<46} {:<46} {:<46} ", c.state, c.local, c.balancer, c.client));
        if parts {
            let vip = c.vip.map_or("-".to_owned(), |v| v.to_string());
            let vpc = c.vpc_id.map_or("-".to_owned(), |v| v.to_string());
            out.push_str(&format!("{vip:<22} {vpc:<10} "));
        }
        out.push_str(&format!("{process}\n"));
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
        assert!(!super::render(&[]).contains("VPC"));
    }

    #[test]
    fn virtual_address_and_vpc_id_where_known() {
        let conn = toa::conns::Conn {
            proto: "tcp",
            local: "198.18.0.1:8080".parse().unwrap(),
            balancer: "198.18.0.2:40000".parse().unwrap(),
            client: "203.0.113.7:4242".parse().unwrap(),
            vip: Some("192.0.2.10:443".parse().unwrap()),
            vpc_id: Some(123456),
            state: "ESTAB",
            pid: None,
            process: None,
        };
        let text = super::render(&[conn.clone(), toa::conns::Conn { vip: None, vpc_id: None, ..conn }]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("VIP") && lines[0].contains("VPC"), "{text}");
        assert!(lines[1].contains("192.0.2.10:443") && lines[1].contains("123456"), "{text}");
        assert!(lines[2].contains(" - "), "{text}");
    }

    #[test]
    fn a_file_that_is_no_namespace_is_refused() {
        let err = super::enter_netns(std::path::Path::new("/dev/null")).unwrap_err().to_string();
        assert!(err.starts_with("--netns /dev/null: "), "{err}");
    }
}
