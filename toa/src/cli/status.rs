//! `toa status`: whether the agent is loaded, in which mode, where, and with which policy.

use std::fmt::Write as _;

use toa::{Backend, Places, Status};

use super::flags::Output;

/// Show whether the agent is loaded, where, and its programs.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
}

pub fn run(args: Args, places: &Places) -> anyhow::Result<()> {
    let status = Backend::live_or_default(places).status()?;
    args.output.print(&status, |status| print!("{}", render_status(status)))
}

/// The text form of a status (also printed after `toa load`).
pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    if !status.loaded {
        match &status.userspace {
            Some(user) => line(format!(
                "status:   not loaded (userspace table {} left by a reader that is gone: run `toa unload`)",
                user.table.display()
            )),
            None => line(format!("status:   not loaded (nothing pinned under {})", status.pin_dir.display())),
        }
    } else if let Some(user) = &status.userspace {
        line(format!(
            "status:   loaded, userspace mode (capture reader pid {}; applications need LD_PRELOAD=libtoa.so)",
            user.reader_pid
        ));
        line(format!(
            "table:    {} ({} of {} entries hold a client)",
            user.table.display(),
            user.entries,
            user.capacity
        ));
        let t = &user.tuning;
        line(format!(
            "timing:   accept waits up to {} µs; entries kept {} s; options searched {} s",
            t.accept_wait_us, t.entry_ttl, t.search_secs
        ));
    } else {
        line("status:   loaded, eBPF mode".to_owned());
        let cgroup = status.cgroup.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "unknown".into());
        line(format!("cgroup:   {cgroup}"));
        line(format!("pins:     {}", status.pin_dir.display()));
        for p in &status.programs {
            let insns = p.verified_insns.map(|n| format!(", {n} insns verified")).unwrap_or_default();
            line(format!("program:  {} (id {}{insns})", p.name, p.id));
        }
    }
    if let Some(p) = status.policy.as_ref().filter(|_| status.loaded) {
        let list = |v: Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
        line(format!("kinds:    {}", list(p.kinds.iter().map(u8::to_string).collect())));
        line(format!("dialects: {}", list(p.dialects.iter().map(|d| format!("{d:?}").to_lowercase()).collect())));
        line(format!("syn:      {}   pick: {:?}   rewrite_sockname: {}", p.syn, p.pick, p.rewrite_sockname));
        line(format!(
            "ports:    {}",
            if p.ports.is_empty() { "all".into() } else { list(p.ports.iter().map(ToString::to_string).collect()) }
        ));
        if status.spoofable {
            line("trust:    anyone — any client that reaches this host can claim any address (set --trust)".to_owned());
        } else {
            line(format!("trust:    {}", list(p.trust.iter().map(ToString::to_string).collect())));
        }
        if p.udp {
            let opp = list(p.udp_opp_ifaces.clone());
            line(format!("udp:      on, ttl {} s   option protocol on: {opp}", p.udp_ttl.unwrap_or_default()));
        }
    }
    line(format!("kernel:   {}", status.kernel));
    line(format!("version:  {}", status.version));
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use toa::policy::Policy;

    use super::*;

    #[test]
    fn not_loaded_names_the_pin_directory() {
        let text = render_status(&Status::not_loaded(Path::new("/sys/fs/bpf/toa")));
        assert!(text.starts_with("status:   not loaded (nothing pinned under /sys/fs/bpf/toa)\nkernel:   "), "{text}");
    }

    #[test]
    fn loaded_without_trust_says_anyone_may_claim() {
        let status = Status {
            loaded: true,
            spoofable: true,
            policy: Some(Policy { kinds: vec![254], ..Policy::default() }),
            ..Status::not_loaded(Path::new("/sys/fs/bpf/toa"))
        };
        let text = render_status(&status);
        assert!(text.starts_with("status:   loaded, eBPF mode\ncgroup:   unknown\npins:     /sys/fs/bpf/toa\n"));
        assert!(text.contains("\nkinds:    254\n"), "{text}");
        assert!(text.contains("\ntrust:    anyone — "), "{text}");
    }
}
