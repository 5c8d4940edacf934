//! The capture reader's system-call allow-list. Once its socket and table are open, the reader
//! runs a loop of poll, recv, stat (is the table still ours?) and memory; it never opens,
//! creates, removes or executes anything, and a call outside the list ends the process
//! (SIGSYS). Even as uid 0 without capabilities a process may write any file root owns: this,
//! not the dropped capabilities, is what keeps a parser bug from becoming a root shell.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::Error;

/// Calls allowed with any arguments. Both C libraries the binary is built with (glibc for
/// development, musl for the packages) and both architectures: the names differ (`stat` or
/// `statx` or `newfstatat`, `poll` or `ppoll`).
const ANY_ARGUMENTS: &[i64] = &[
    // The loop: wait, receive, count drops (getsockopt), is the table still ours (stat).
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_getsockopt,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_restart_syscall,
    // Logging to stderr (sent to /dev/null once `toa load` stops listening), memory, and the
    // way out.
    libc::SYS_dup3,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_dup2,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_stat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lstat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_nanosleep,
];

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

/// The filter for this architecture.
pub fn reader_filter() -> Result<BpfProgram, Error> {
    let failed = |e: &dyn std::fmt::Display| Error::Userspace { detail: format!("building the seccomp filter: {e}") };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ANY_ARGUMENTS.iter().map(|&call| (call, Vec::new())).collect();
    let rule = |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions);
    let no_exec = arg(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0).map_err(|e| failed(&e))?;
    // Memory, but never executable memory.
    for call in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(call, vec![rule(vec![no_exec.clone()]).map_err(|e| failed(&e))?]);
    }
    // A new policy with other ports: a new classic BPF filter on the capture socket, nothing else.
    let attach = vec![
        arg(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64).map_err(|e| failed(&e))?,
        arg(2, SeccompCmpOp::Eq, libc::SO_ATTACH_FILTER as u64).map_err(|e| failed(&e))?,
    ];
    rules.insert(libc::SYS_setsockopt, vec![rule(attach).map_err(|e| failed(&e))?]);
    // Rust's standard library checks a descriptor before it closes it (debug builds).
    let getfd = arg(1, SeccompCmpOp::Eq, libc::F_GETFD as u64).map_err(|e| failed(&e))?;
    rules.insert(libc::SYS_fcntl, vec![rule(vec![getfd]).map_err(|e| failed(&e))?]);
    let arch = std::env::consts::ARCH.try_into().map_err(|e| failed(&e))?;
    let filter =
        SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, arch).map_err(|e| failed(&e))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| failed(&e))
}

/// Allows this thread (the reader's only one) no call outside the list, for the rest of its
/// life. Needs no_new_privs (set by `system::drop_privileges`) or CAP_SYS_ADMIN.
pub fn confine_reader() -> Result<(), Error> {
    let filter = reader_filter()?;
    seccompiler::apply_filter(&filter).map_err(|e| Error::Userspace {
        detail: format!(
            "installing the capture reader's seccomp filter: {e}; a sandbox that denies the seccomp system call \
             must allow it (systemd: SystemCallFilter=seccomp, as deploy/systemd/userspace.conf does)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child under the filter; how the child ended.
    fn in_confined_child(f: fn()) -> (Option<i32>, Option<i32>) {
        let filter = reader_filter().unwrap();
        // SAFETY: the child makes only system calls (prctl, seccomp, and `f`'s), no allocation,
        // then _exit; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if seccompiler::apply_filter(&filter).is_err() {
                    libc::_exit(3);
                }
                f();
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            let exited = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            let signalled = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
            (exited, signalled)
        }
    }

    #[test]
    fn the_loop_runs_and_anything_else_ends_the_process() {
        // What the loop does: the child goes on and exits normally.
        assert_eq!(
            in_confined_child(|| unsafe {
                let mut now = std::mem::zeroed::<libc::timespec>();
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
                let no_wait = std::mem::zeroed::<libc::timespec>();
                libc::ppoll(std::ptr::null_mut(), 0, &no_wait, std::ptr::null());
                libc::getpid();
            }),
            (Some(0), None)
        );
        // Opening a file, making a socket, running a program, executable memory: SIGSYS.
        let forbidden: [fn(); 4] = [
            || unsafe {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY);
            },
            || unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            },
            || unsafe {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::syscall(libc::SYS_execve, argv[0], argv.as_ptr(), std::ptr::null::<*const i8>());
            },
            || unsafe {
                let (prot, flags) = (libc::PROT_READ | libc::PROT_EXEC, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
                libc::syscall(libc::SYS_mmap, 0, 4096, prot, flags, -1, 0);
            },
        ];
        for (i, f) in forbidden.into_iter().enumerate() {
            assert_eq!(in_confined_child(f), (None, Some(libc::SIGSYS)), "forbidden call {i}");
        }
    }
}
