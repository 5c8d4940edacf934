//! What the end-to-end tests and the benchmarks share (a crate of its own, a dev-dependency of
//! `toa`), by concern: the lab (`lab`: two network namespaces joined
//! by a veth pair, a cgroup for the servers, a pin directory for the agent, and the servers
//! themselves; created per test and removed by `Drop`, also when the test fails), network
//! namespaces (`netns`), cgroups and what is attached to them (`cgroup`), `toa run` as a child
//! (`service`), a hand-written TCP client (`raw_tcp`), the binaries under test (`commands`), and
//! cleanup that reports what it could not undo (`cleanup`). This file keeps the addresses and the
//! small helpers every test uses.
//!
//! Server namespace: 198.18.0.1/24 and fd00::1/64; client namespace: .2 and fd00::2.

/// Runs each named case `fn case(mode: Mode)` once per mode, as `ebpf::case` and
/// `userspace::case`.
#[macro_export]
macro_rules! in_both_modes {
    ($($case:ident),* $(,)?) => {
        mod ebpf {
            $(#[test] fn $case() { super::$case($crate::Mode::Ebpf) })*
        }
        mod userspace {
            $(#[test] fn $case() { super::$case($crate::Mode::Userspace) })*
        }
    };
}

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

mod cgroup;
mod cleanup;
mod commands;
mod kernel_log;
mod lab;
mod mount_ns;
mod netns;
pub mod option_areas;
pub mod raw_tcp;
pub mod raw_udp;
mod service;

pub use cgroup::*;
pub use cleanup::*;
pub use commands::*;
pub use kernel_log::*;
pub use lab::*;
pub use mount_ns::*;
pub use netns::*;
pub use service::*;

/// How long a test waits for an event (a line, a file, a counter, a socket that accepts)
/// before it calls it a hang. It only bounds a hang: qemu guests run 10–50× slower than the
/// host, and nothing is ever measured against it.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The client the tests' probes announce.
pub const CLIENT: &str = "203.0.113.7:4242";

pub const CLIENT6: &str = "[2001:db8::7]:4242";

/// What peer_echo answers for a connection.
pub fn answer(accepted: &str, peer: &str) -> String {
    format!("accept={accepted} peer={peer}\n")
}

/// The probe's real address, from its stderr ("toa probe: from ADDR announcing …").
pub fn probe_source(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("toa probe: from "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no source in {stderr:?}"))
        .to_owned()
}

/// Bytes as the hex `toa probe --raw-option` takes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub const SERVER_V4: &str = "198.18.0.1";

pub const CLIENT_V4: &str = "198.18.0.2";

pub const SERVER_V6: &str = "fd00::1";

pub const CLIENT_V6: &str = "fd00::2";

/// The balancer's own addresses on the link (FULLNAT's local address), which no namespace owns:
/// the server namespace reaches them at the client namespace's MAC. The probe speaks TCP from
/// there where the kernel's writer is missing (before 5.10), and so does `raw_tcp`.
pub const BALANCER_V4: &str = "198.18.0.3";

pub const BALANCER_V6: &str = "fd00::3";

/// Runs a command that must succeed; panics with its output otherwise.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How the lab's agent runs: the eBPF programs, or the userspace mode (capture reader + the
/// servers started with `LD_PRELOAD=libtoa.so`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Userspace,
}

/// Waits until `cond` holds, for at most `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
