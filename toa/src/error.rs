//! Errors that name what failed and how to fix it.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} must run as root (it loads eBPF programs into the kernel): run it with sudo")]
    NotRoot { what: &'static str },

    #[error(
        "kernel {release} is too old: toa needs Linux 5.10 or newer (TCP header-option hooks \
         for sock_ops, cgroup getpeername hooks): use `--mode userspace` (capture reader + \
         libtoa.so), or upgrade the kernel"
    )]
    KernelTooOld { release: String },

    #[error(
        "no cgroup v2 hierarchy is mounted (checked /proc/mounts): mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` (or boot with \
         systemd.unified_cgroup_hierarchy=1)"
    )]
    NoCgroup2,

    #[error(
        "--cgroup {path}: not a cgroup v2 directory (the v2 hierarchy is mounted at {mount}): \
         create it, or pass a directory under {mount}"
    )]
    NotACgroup { path: PathBuf, mount: PathBuf },

    #[error(
        "bpffs is not mounted at {path} and mounting it failed ({source}): mount it with \
         `mount -t bpf bpf {path}`"
    )]
    Bpffs { path: PathBuf, source: io::Error },

    #[error("{path} is not on a bpffs mount: pass a --pin-dir under a bpf filesystem (e.g. /sys/fs/bpf/toa)")]
    NotBpffs { path: PathBuf },

    #[error(
        "toa is already loaded and attached to {attached}; run `toa unload` first to attach it \
         to {requested}"
    )]
    LoadedElsewhere { attached: PathBuf, requested: PathBuf },

    #[error(
        "the kernel refused the eBPF programs: {detail}\ntoa needs Linux ≥ 5.10 with \
         CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and BPF socket storage; if this kernel has them, \
         please report this error with `uname -r`"
    )]
    Load { detail: String },

    #[error("attaching {program} to {cgroup} failed: {detail}")]
    Attach { program: &'static str, cgroup: PathBuf, detail: String },

    #[error("pinning under {path} failed: {detail}")]
    Pin { path: PathBuf, detail: String },

    #[error("toa is not loaded (nothing pinned under {pin_dir}): run `toa load`")]
    NotLoaded { pin_dir: PathBuf },

    #[error("{detail}")]
    Policy { detail: String },

    #[error("--udp-opp-iface {iface}: {detail}")]
    Interface { iface: String, detail: String },

    #[error("config {path}: {detail}")]
    Config { path: PathBuf, detail: String },

    #[error("cannot serve metrics on {addr}: {detail}; pick another address with --metrics")]
    Metrics { addr: std::net::SocketAddr, detail: String },

    #[error("toa probe: {detail}")]
    Probe { detail: String },

    #[error("reading {what} failed: {detail}")]
    Read { what: String, detail: String },

    #[error(
        "--cgroup applies to the eBPF mode only: in userspace mode the processes started with \
         LD_PRELOAD=libtoa.so get client addresses; drop --cgroup"
    )]
    CgroupInUserspace,

    #[error("userspace mode: {detail}")]
    Userspace { detail: String },

    #[error(
        "{holder} has held {dir} for {secs} s, and changes to toa are made one at a time: wait for \
         it to finish, or stop it (TOA_LOCK_WAIT sets how long to wait)"
    )]
    Busy { dir: PathBuf, holder: String, secs: u64 },

    #[error("TOA_LOCK_WAIT={value:?}: not a number of seconds (e.g. TOA_LOCK_WAIT=30)")]
    LockWait { value: String },

    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Renders an error and its causes on one line, as aya's errors nest the kernel's reason. A
/// verifier log (thousands of lines) is cut to its last lines, which say why it refused.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    shorten_verifier_log(&out)
}

fn shorten_verifier_log(text: &str) -> String {
    const KEEP: usize = 8;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 2 * KEEP {
        return text.to_owned();
    }
    let cut = lines.len() - 2 * KEEP;
    let mut out = lines[..KEEP].join("\n");
    out.push_str(&format!("\n  [… {cut} lines of the verifier log left out …]\n"));
    out.push_str(&lines[lines.len() - KEEP..].join("\n"));
    out
}
