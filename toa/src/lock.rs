//! One writer at a time: the exclusive lock every command that changes the agent's state holds
//! (load, policy, relocation, upgrade, unload; in the eBPF mode on the pin directory, in the
//! userspace mode on the table's directory). A second command waits, says who it waits for,
//! and gives up after a bound (`TOA_LOCK_WAIT`, seconds) naming the holder.

use std::{
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::Error;

/// How long a command waits for another one by default. Generous: a load verifies programs,
/// which takes seconds on a busy or emulated machine.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(120);

/// After this long, the waiting command says who it waits for.
const NOTICE_AFTER: Duration = Duration::from_secs(1);

/// An exclusive `flock` on a directory (bpffs holds no regular files to lock, and a directory
/// outlives the files in it). A directory may be removed at the end of a locked section: a
/// command that waited then finds its lock on a removed directory and starts over on the one
/// now at the path.
#[derive(Debug)]
pub struct DirLock {
    _dir: fs::File,
}

impl DirLock {
    /// Waits for the lock of `dir`, creating the directory when `create`; `None` when it does
    /// not exist and `create` is false. Gives up after [`wait_bound`].
    pub fn acquire(dir: &Path, create: bool) -> Result<Option<Self>, Error> {
        let bound = wait_bound()?;
        let started = Instant::now();
        let mut told = false;
        loop {
            if create {
                fs::create_dir_all(dir)?;
            }
            let file = match fs::File::open(dir) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            if !try_lock(&file)? {
                let waited = started.elapsed();
                if waited >= bound {
                    return Err(Error::Busy { dir: dir.to_owned(), holder: holder(&file), secs: bound.as_secs() });
                }
                if waited >= NOTICE_AFTER && !told {
                    told = true;
                    tracing::warn!("waiting for {} to finish (it holds {})", holder(&file), dir.display());
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let held = file.metadata()?;
            match fs::metadata(dir) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(Some(Self { _dir: file })),
                // Removed (or replaced) while we waited.
                _ => continue,
            }
        }
    }
}

/// The bound on waiting: `TOA_LOCK_WAIT` seconds, or [`DEFAULT_WAIT`].
fn wait_bound() -> Result<Duration, Error> {
    match std::env::var("TOA_LOCK_WAIT") {
        Err(_) => Ok(DEFAULT_WAIT),
        Ok(value) => value.trim().parse::<u64>().map(Duration::from_secs).map_err(|_| Error::LockWait { value }),
    }
}

/// Takes the lock if it is free; false when another holds it.
fn try_lock(file: &fs::File) -> io::Result<bool> {
    loop {
        // SAFETY: a descriptor we own; flock(2) has no other precondition.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(false),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

/// Who holds the flock on `file`: "pid N (its command line)", from `/proc/locks`.
fn holder(file: &fs::File) -> String {
    let Ok(meta) = file.metadata() else { return "another toa command".into() };
    let pid = fs::read_to_string("/proc/locks").ok().and_then(|locks| holder_pid(&locks, meta.dev(), meta.ino()));
    match pid {
        Some(pid) => {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let words: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|w| !w.is_empty())
                .map(|w| String::from_utf8_lossy(w).into())
                .collect();
            if words.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid} ({})", words.join(" "))
            }
        }
        None => "another toa command".into(),
    }
}

/// The PID holding a FLOCK on (dev, ino) in the text of `/proc/locks` (lines like
/// `1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF`; waiters' lines have `->` and are skipped).
fn holder_pid(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let id = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == id => pid.parse().ok(),
            _ => None,
        }
    })
}

/// Where a path's lock lives when the path is a file (the userspace table): its directory.
pub fn dir_of(path: &Path) -> PathBuf {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_not_a_waiter() {
        let dev = libc::makedev(0, 0x2d);
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 4343 00:2d:1234 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 99 00:2d:1234 0 EOF\n";
        assert_eq!(holder_pid(locks, dev, 1234), Some(4242));
        assert_eq!(holder_pid(locks, dev, 1235), None);
        assert_eq!(holder_pid("", dev, 1234), None);
    }
}
