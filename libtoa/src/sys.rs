//! The few system calls the library makes, issued directly: no libc symbol but
//! `__errno_location`, so the library loads into processes linked against any glibc.

use core::arch::asm;

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const ACCEPT4: usize = 288;
    pub const GETSOCKNAME: usize = 51;
    pub const GETPEERNAME: usize = 52;
    pub const GETSOCKOPT: usize = 55;
    pub const SETSOCKOPT: usize = 54;
    pub const OPENAT: usize = 257;
    pub const CLOSE: usize = 3;
    pub const READ: usize = 0;
    pub const FSTAT: usize = 5;
    pub const NEWFSTATAT: usize = 262;
    pub const MMAP: usize = 9;
    pub const CLOCK_GETTIME: usize = 228;
    pub const NANOSLEEP: usize = 35;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const ACCEPT4: usize = 242;
    pub const GETSOCKNAME: usize = 204;
    pub const GETPEERNAME: usize = 205;
    pub const GETSOCKOPT: usize = 209;
    pub const SETSOCKOPT: usize = 208;
    pub const OPENAT: usize = 56;
    pub const CLOSE: usize = 57;
    pub const READ: usize = 63;
    pub const FSTAT: usize = 80;
    pub const NEWFSTATAT: usize = 79;
    pub const MMAP: usize = 222;
    pub const CLOCK_GETTIME: usize = 113;
    pub const NANOSLEEP: usize = 101;
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for system call `n`.
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
             in("r10") a[3], in("r8") a[4], in("r9") a[5], lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for system call `n`.
    unsafe {
        asm!("svc 0", in("x8") n, inlateout("x0") a[0] as isize => ret, in("x1") a[1], in("x2") a[2],
             in("x3") a[3], in("x4") a[4], in("x5") a[5], options(nostack));
    }
    ret
}

/// A negative result is `-errno`.
pub type Ret = isize;

pub unsafe fn accept4(fd: i32, addr: *mut u8, len: *mut u32, flags: i32) -> Ret {
    // SAFETY: forwarded from the caller.
    unsafe { syscall6(nr::ACCEPT4, [fd as usize, addr as usize, len as usize, flags as usize, 0, 0]) }
}

pub unsafe fn getpeername(fd: i32, addr: *mut u8, len: *mut u32) -> Ret {
    // SAFETY: forwarded from the caller.
    unsafe { syscall6(nr::GETPEERNAME, [fd as usize, addr as usize, len as usize, 0, 0, 0]) }
}

pub unsafe fn getsockname(fd: i32, addr: *mut u8, len: *mut u32) -> Ret {
    // SAFETY: forwarded from the caller.
    unsafe { syscall6(nr::GETSOCKNAME, [fd as usize, addr as usize, len as usize, 0, 0, 0]) }
}

const IPPROTO_TCP: usize = toa_common::IPPROTO_TCP as usize;
const TCP_INFO: usize = 11;

pub unsafe fn tcp_info(fd: i32, buf: *mut u8, len: *mut u32) -> Ret {
    // SAFETY: forwarded from the caller.
    unsafe { syscall6(nr::GETSOCKOPT, [fd as usize, IPPROTO_TCP, TCP_INFO, buf as usize, len as usize, 0]) }
}

const TCP_SAVE_SYN: usize = 27;
const TCP_SAVED_SYN: usize = 28;

/// Makes listener `fd` keep the SYN of each connection it accepts from now on (Linux ≥ 4.2).
pub fn save_syns(fd: i32) -> Ret {
    let on: i32 = 1;
    // SAFETY: a 4-byte option value on our stack.
    unsafe {
        syscall6(nr::SETSOCKOPT, [fd as usize, IPPROTO_TCP, TCP_SAVE_SYN, &on as *const i32 as usize, 4, 0])
    }
}

/// The IP and TCP headers of the SYN the kernel kept for connection `fd` (and forgets once read):
/// `*len` bytes of `buf`, 0 when it kept none.
pub unsafe fn saved_syn(fd: i32, buf: *mut u8, len: *mut u32) -> Ret {
    // SAFETY: forwarded from the caller.
    unsafe { syscall6(nr::GETSOCKOPT, [fd as usize, IPPROTO_TCP, TCP_SAVED_SYN, buf as usize, len as usize, 0]) }
}

const AT_FDCWD: isize = -100;
const O_RDONLY_CLOEXEC: usize = 0o2000000;

/// Opens a NUL-terminated path read-only.
pub fn open_read(path: &[u8]) -> Ret {
    if path.last() != Some(&0) {
        return -22;
    }
    // SAFETY: a NUL-terminated path.
    unsafe { syscall6(nr::OPENAT, [AT_FDCWD as usize, path.as_ptr() as usize, O_RDONLY_CLOEXEC, 0, 0, 0]) }
}

/// Reads up to `len` bytes to `buf` (which may be uninitialized); the count, or a negative errno.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
pub unsafe fn read_raw(fd: i32, buf: *mut u8, len: usize) -> Ret {
    // SAFETY: the kernel writes at most `len` bytes at `buf`, which the caller vouches for.
    unsafe { syscall6(nr::READ, [fd as usize, buf as usize, len, 0, 0, 0]) }
}

pub fn close(fd: i32) {
    // SAFETY: closing a descriptor this library opened.
    unsafe { syscall6(nr::CLOSE, [fd as usize, 0, 0, 0, 0, 0]) };
}

/// The fields of a `struct stat` the library reads.
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
}

/// Reads them from a `struct stat` as 64-bit words: dev, ino and size sit at the same offsets on
/// x86_64 and aarch64; mode and uid do not.
fn stat_fields(st: &[u64; 32]) -> Stat {
    #[cfg(target_arch = "x86_64")]
    let (mode, uid) = (st[3] as u32, (st[3] >> 32) as u32);
    #[cfg(target_arch = "aarch64")]
    let (mode, uid) = (st[2] as u32, st[3] as u32);
    Stat { dev: st[0], ino: st[1], size: st[6], mode, uid }
}

/// What `fstat` says of an open file.
pub fn fstat(fd: i32) -> Option<Stat> {
    let mut st = [0u64; 32];
    // SAFETY: `st` is larger than any architecture's struct stat.
    let r = unsafe { syscall6(nr::FSTAT, [fd as usize, st.as_mut_ptr() as usize, 0, 0, 0, 0]) };
    (r == 0).then(|| stat_fields(&st))
}

/// (device, inode) of a NUL-terminated path.
pub fn stat(path: &[u8]) -> Option<(u64, u64)> {
    let mut st = [0u64; 32];
    // SAFETY: a NUL-terminated path (checked) and a buffer larger than struct stat.
    let r = path.last().is_some_and(|b| *b == 0).then(|| unsafe {
        syscall6(nr::NEWFSTATAT, [AT_FDCWD as usize, path.as_ptr() as usize, st.as_mut_ptr() as usize, 0, 0, 0])
    });
    (r == Some(0)).then(|| {
        let st = stat_fields(&st);
        (st.dev, st.ino)
    })
}

const PROT_READ: usize = 1;
const MAP_SHARED: usize = 1;

/// Maps `len` bytes of `fd` read-only and shared.
pub fn mmap_read(fd: i32, len: usize) -> Option<*const u8> {
    // SAFETY: a fresh mapping chosen by the kernel.
    let r = unsafe { syscall6(nr::MMAP, [0, len, PROT_READ, MAP_SHARED, fd as usize, 0]) };
    (!(-4095..0).contains(&r)).then_some(r as *const u8)
}

const CLOCK_MONOTONIC: usize = 1;

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = [0i64; 2];
    // SAFETY: a timespec-sized buffer.
    unsafe { syscall6(nr::CLOCK_GETTIME, [CLOCK_MONOTONIC, ts.as_mut_ptr() as usize, 0, 0, 0, 0]) };
    ts[0] as u64 * 1_000_000_000 + ts[1] as u64
}

pub fn sleep_us(us: u64) {
    let ts = [(us / 1_000_000) as i64, ((us % 1_000_000) * 1000) as i64];
    // SAFETY: a timespec; an interrupted sleep just ends early.
    unsafe { syscall6(nr::NANOSLEEP, [ts.as_ptr() as usize, 0, 0, 0, 0, 0]) };
}

unsafe extern "C" {
    fn __errno_location() -> *mut i32;
}

/// Returns `-1` with `errno` set from a negative system call result, else the result.
pub fn result(r: Ret) -> i32 {
    if r < 0 {
        // SAFETY: glibc's errno location is valid for the calling thread.
        unsafe { *__errno_location() = (-r) as i32 };
        -1
    } else {
        r as i32
    }
}
