//! Facts about the host: privileges, kernel release, bpffs, the kernel log.

use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
};

use crate::Error;

/// Fails unless running as root.
pub fn require_root(what: &'static str) -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot { what });
    }
    Ok(())
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// `(major, minor)` of a release string such as `6.1.0-41-cloud-amd64`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Fails on kernels older than 5.10 (no sock_ops header-option callbacks).
pub fn require_kernel() -> Result<(), Error> {
    let release = kernel_release();
    match parse_release(&release) {
        Some(version) if version >= crate::backend::EBPF_MIN_KERNEL => Ok(()),
        Some(_) => Err(Error::KernelTooOld { release }),
        // Unparsable release: let the kernel decide when the programs load.
        None => Ok(()),
    }
}

/// Raises the soft limit of open files to `want` (as root also the hard one, when it is lower);
/// returns the soft limit in effect. Thousands of sockets at once need it (`toa probe
/// --parallel`, the tests, the benchmark).
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < want {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                // Not allowed to raise the hard limit: up to it.
                let capped = libc::rlimit { rlim_cur: lim.rlim_max.min(want), rlim_max: lim.rlim_max };
                libc::setrlimit(libc::RLIMIT_NOFILE, &capped);
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Before 5.11 BPF maps and programs are charged to RLIMIT_MEMLOCK (often 64 KiB); from 5.11 on
/// to the memory cgroup. Lifting the limit is harmless on newer kernels; failing to lift it is
/// not fatal (a service manager may have lifted it already).
pub fn raise_memlock() {
    if matches!(parse_release(&kernel_release()), Some(v) if v >= (5, 11)) {
        return;
    }
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure `pin_dir`'s parent is on bpffs, mounting bpffs at /sys/fs/bpf when nothing is
/// mounted there yet (as systemd does on most hosts).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if parent != default {
        return Err(Error::NotBpffs { path: pin_dir.to_owned() });
    }
    // Two toa commands starting together on a host without bpffs would each mount an instance,
    // one over the other, and then pin (and lock) in different ones. The one that locks the
    // directory first mounts; the others, woken, find bpffs there (by path) and mount nothing.
    // The lock is on the directory under the mount point, opened before the mount.
    let under = fs::File::open(default).map_err(|source| Error::Bpffs { path: default.to_owned(), source })?;
    lock_exclusive(&under).map_err(|source| Error::Bpffs { path: default.to_owned(), source })?;
    if is_bpffs(parent) {
        return Ok(());
    }
    let target = CString::new("/sys/fs/bpf").expect("no NUL in a literal");
    let fstype = CString::new("bpf").expect("no NUL in a literal");
    // SAFETY: valid C strings; mount(2) has no other preconditions.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(Error::Bpffs { path: default.to_owned(), source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Writes one line to the kernel log, where operators of the classic module look
/// (`dmesg | grep TOA`). Best effort: a missing /dev/kmsg must not fail a load.
pub fn kernel_log(line: &str) {
    if let Ok(mut kmsg) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = writeln!(kmsg, "<6>{line}");
    }
}

/// Gives up every privilege this process will not need again: all capabilities (the bounding
/// set too, so no exec could regain them as root) and, with `PR_SET_NO_NEW_PRIVS`, any setuid or
/// file capability an exec would grant. What it keeps is uid 0's ownership of its own files.
pub fn drop_privileges() -> Result<(), Error> {
    let failed = |step: &str, e: &dyn std::fmt::Display| Error::Userspace { detail: format!("{step}: {e}") };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(failed("PR_SET_NO_NEW_PRIVS", &io::Error::last_os_error()));
    }
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes with the rest. A
    // process without it (a restricted container) keeps its bounding set: with no_new_privs and
    // nothing permitted, no exec can raise anything anyway.
    if caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        caps::clear(None, caps::CapSet::Bounding).map_err(|e| failed("clearing the bounding capabilities", &e))?;
    }
    // Kernels before 4.3 have no ambient set (nothing to clear).
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, caps::CapSet::Ambient).map_err(|e| failed("clearing the ambient capabilities", &e))?;
    }
    caps::clear(None, caps::CapSet::Inheritable).map_err(|e| failed("clearing the inheritable capabilities", &e))?;
    caps::clear(None, caps::CapSet::Effective).map_err(|e| failed("clearing the effective capabilities", &e))?;
    caps::clear(None, caps::CapSet::Permitted).map_err(|e| failed("clearing the permitted capabilities", &e))?;
    Ok(())
}

/// The GID of the group named `name` (`/etc/group`, or NSS where the C library has it).
pub fn group_id(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: plain C data, for which all zeroes is a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid name, a zeroed group to fill, a buffer and its length, an out pointer.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
    (rc == 0 && !found.is_null()).then_some(group.gr_gid)
}

/// Whether process `pid` exists and has not exited (a zombie has: its parent has not reaped it).
pub fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| !r.trim_start().starts_with('Z')))
}

/// Waits for an exclusive `flock(2)` on `file`, again when a signal interrupts the wait. The lock
/// is held until [`unlock`] or until the descriptor closes.
pub fn lock_exclusive(file: &fs::File) -> io::Result<()> {
    // SAFETY: a descriptor we own; flock(2) has no other precondition.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

/// Releases a lock taken with [`lock_exclusive`].
pub fn unlock(file: &fs::File) {
    // SAFETY: as above; unlocking cannot fail on a valid descriptor.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.1.0-41-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.10.0"), Some((5, 10)));
        assert_eq!(parse_release("6.18.44-fc-v509"), Some((6, 18)));
        assert_eq!(parse_release("3.10.0-1160.el7.x86_64"), Some((3, 10)));
        assert_eq!(parse_release("weird"), None);
    }
}
