//! Running code and commands inside a network namespace (and a cgroup).

use super::*;

pub(crate) fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Runs `f` in a thread that entered the network namespace at `ns`.
pub fn in_netns<T: Send + 'static>(ns: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let file = fs::File::open(&ns).unwrap();
        // SAFETY: a valid namespace fd; only this thread moves.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        f()
    })
    .join()
    .unwrap()
}

/// Makes `cmd` run in a network namespace and, optionally, a cgroup, from its first
/// instruction: sockets take their cgroup and namespace when they are created.
pub fn in_netns_and_cgroup(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) {
    let ns = fs::File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
    let procs =
        cgroup.map(|c| fs::OpenOptions::new().write(true).open(c.join("cgroup.procs")).expect("open cgroup.procs"));
    // SAFETY: between fork and exec only async-signal-safe calls (write, setns) on fds opened
    // before the fork, which the closure keeps alive.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
