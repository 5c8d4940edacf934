//! A server started in a private mount namespace with `/etc/ld.so.preload`: the only way glibc
//! preloads a library into a setuid or setgid program (it ignores `LD_PRELOAD` paths there).

use super::*;

/// Starts `cmd` in a mount namespace of its own in which `/etc/ld.so.preload` names `library`,
/// and in which `suid_dir` honours setuid and setgid bits (`/run` is usually `nosuid`).
/// `/etc` there is a directory under `work` of links to this process's `/etc`, plus that file;
/// `/run/toa`, if the host has one, is hidden by an empty directory. Nothing is mounted outside
/// the child's namespace, which ends with it.
pub fn with_etc_preload(cmd: &mut Command, work: &Path, library: &Path, suid_dir: &Path) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;

    let etc = work.join("etc");
    let empty = work.join("empty");
    for dir in [&etc, &empty] {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    // Through /proc/PID/root, the links reach this process's /etc from inside the child's
    // namespace, where /etc is the view.
    let real_etc = PathBuf::from(format!("/proc/{}/root/etc", std::process::id()));
    for entry in fs::read_dir("/etc").expect("read /etc").flatten() {
        let link = etc.join(entry.file_name());
        if !link.exists() {
            std::os::unix::fs::symlink(real_etc.join(entry.file_name()), &link).expect("link into /etc");
        }
    }
    let preload = etc.join("ld.so.preload");
    let _ = fs::remove_file(&preload);
    fs::write(&preload, format!("{}\n", library.display())).expect("write ld.so.preload");

    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path");
    let (root, etc_target, etc, suid_dir) = (c(Path::new("/")), c(Path::new("/etc")), c(&etc), c(suid_dir));
    let hide = Path::new("/run/toa").is_dir().then(|| (c(&empty), c(Path::new("/run/toa"))));
    // SAFETY: between fork and exec only unshare(2) and mount(2), on strings made before the
    // fork. The namespace is private before anything is mounted, so no mount can reach the
    // host's: each step that fails stops the start.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: i32| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            let none = std::ptr::null();
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(none, root.as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, none.cast()))?;
            check(libc::mount(etc.as_ptr(), etc_target.as_ptr(), none, libc::MS_BIND, none.cast()))?;
            check(libc::mount(suid_dir.as_ptr(), suid_dir.as_ptr(), none, libc::MS_BIND, none.cast()))?;
            // A bind remount without MS_NOSUID: setuid and setgid bits count in this directory.
            check(libc::mount(none, suid_dir.as_ptr(), none, libc::MS_BIND | libc::MS_REMOUNT, none.cast()))?;
            if let Some((empty, run_toa)) = &hide {
                check(libc::mount(empty.as_ptr(), run_toa.as_ptr(), none, libc::MS_BIND, none.cast()))?;
            }
            Ok(())
        });
    }
}

/// The value of `AT_SECURE` in process `pid`'s auxiliary vector (1: secure execution).
pub fn at_secure(pid: u32) -> Option<u64> {
    const AT_SECURE: u64 = 23;
    let auxv = fs::read(format!("/proc/{pid}/auxv")).ok()?;
    auxv.chunks_exact(16)
        .map(|pair| {
            let word = |i: usize| u64::from_ne_bytes(pair[i..i + 8].try_into().unwrap());
            (word(0), word(8))
        })
        .find(|(kind, _)| *kind == AT_SECURE)
        .map(|(_, value)| value)
}
