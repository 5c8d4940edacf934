//! `libtoa.so`: toa's userspace mode for kernels without the eBPF hooks (< 5.10).
//!
//! Preloaded into an application (`LD_PRELOAD=/usr/local/lib/toa/libtoa.so`), it wraps
//! `accept`, `accept4` and `getpeername`: when toa's capture reader has recorded a client
//! address for the connection in the shared table, the application sees the client instead of
//! the load balancer. Anything else (no table, another network namespace, a socket that is not
//! an incoming TCP connection, no entry) leaves the kernel's answer untouched.
//!
//! The library is `no_std` and makes its system calls itself: its only libc symbol is
//! `__errno_location`, so it loads into processes linked against any glibc (a test in
//! `toa/tests/userspace.rs` checks the symbols). The table's path comes from `TOA_TABLE`
//! (default `/run/toa/table`), read once when the library is loaded, and not from a process in
//! secure-execution mode (setuid, setcap). Only a regular file owned by root that no one else can
//! write is mapped: anything else leaves every answer to the kernel.
//!
//! It counts what its lookups did in this process (`toa_libtoa_counter`), so that waits and
//! lost clients are counted, never guessed from timings.
#![no_std]

mod sys;

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use toa_common::{
    config::v4_mapped,
    table::{Entry, Key, Table, DEFAULT_TABLE_C, ENTRY_HAS_PORT},
    Counter, AF_INET, AF_INET6,
};

const PATH_MAX: usize = 256;

/// The table's path, NUL-terminated (set by `init` before `main`).
static mut TABLE_PATH: [u8; PATH_MAX] = [0; PATH_MAX];
/// The mapped table, or null.
static MAPPED: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
/// Inode of the mapped file: the same file is never mapped twice.
static MAPPED_INO: AtomicU64 = AtomicU64::new(0);
/// Monotonic second before which no new attempt to map the table is made.
static NEXT_TRY: AtomicU64 = AtomicU64::new(0);
/// When (monotonic ns) a thread started mapping the table; 0 when none is. A claim older than
/// 10 ms is taken over: its thread may be gone (a fork() in the middle leaves it set).
static MAPPING: AtomicU64 = AtomicU64::new(0);
const MAPPING_STALE_NS: u64 = 10_000_000;

/// This process's lookups, by what they did (the index `toa_libtoa_counter` takes).
#[derive(Clone, Copy)]
#[repr(u32)]
enum Count {
    /// A connection's peer was looked up (accept, accept4 or getpeername on a TCP socket).
    Lookup = 0,
    /// No live table: none there, another namespace's, or its reader is dead or stopped.
    NoTable = 1,
    /// The client was found and returned.
    Found = 2,
    /// A young connection in scope was looked up: a bounded wait for the reader to catch up began
    /// (it ends at once when the reader already has).
    Wait = 3,
    /// The wait ended because the reader had caught up (no entry was coming).
    WaitCaughtUp = 4,
    /// The wait ran to its bound (`accept_wait_us`): a reader lagging that much may lose a client.
    WaitTimedOut = 5,
}
const COUNTS: usize = 6;
static COUNTERS: [AtomicU64; COUNTS] = [const { AtomicU64::new(0) }; COUNTS];

fn count(c: Count) {
    COUNTERS[c as usize].fetch_add(1, Ordering::Relaxed);
}

/// This process's counter `index` (see `Count`: 0 lookups, 1 no live table, 2 found, 3 waits,
/// 4 waits ended by the reader catching up, 5 waits that ran to their bound); 0 past the end.
/// Found with `dlsym(RTLD_DEFAULT, "toa_libtoa_counter")` in a preloaded process.
#[unsafe(no_mangle)]
pub extern "C" fn toa_libtoa_counter(index: u32) -> u64 {
    COUNTERS.get(index as usize).map_or(0, |c| c.load(Ordering::Relaxed))
}

/// Whether this process runs in secure-execution mode (`AT_SECURE` in its auxiliary vector:
/// setuid, setgid, file capabilities). When that cannot be read, it is assumed.
fn secure_execution() -> bool {
    const AT_NULL: u64 = 0;
    const AT_SECURE: u64 = 23;
    let fd = sys::open_read(b"/proc/self/auxv\0");
    if fd < 0 {
        return true;
    }
    let fd = fd as i32;
    // (type, value) pairs of 64-bit words, a few dozen of them. Left uninitialized: zeroing
    // would call the C library's memset, and only what the kernel wrote is read.
    let mut auxv = core::mem::MaybeUninit::<[u64; 128]>::uninit();
    // SAFETY: `auxv` is valid for writes of its size in bytes.
    let n = unsafe { sys::read_raw(fd, auxv.as_mut_ptr().cast(), core::mem::size_of_val(&auxv)) };
    sys::close(fd);
    if n <= 0 {
        return true;
    }
    let words = (n as usize / 8).min(128);
    let base = auxv.as_ptr().cast::<u64>();
    for i in (0..words.saturating_sub(1)).step_by(2) {
        // SAFETY: words below `words` were written by read(2).
        let (kind, value) = unsafe { (base.add(i).read(), base.add(i + 1).read()) };
        match kind {
            AT_SECURE => return value != 0,
            AT_NULL => break,
            _ => {}
        }
    }
    true
}

/// Runs when the library is loaded, before `main`: glibc passes `argc, argv, envp` to
/// `.init_array` functions, so the environment is read without any libc call.
#[unsafe(link_section = ".init_array")]
#[used]
static INIT: unsafe extern "C" fn(i32, *const *const u8, *const *const u8) = init;

unsafe extern "C" fn init(_argc: i32, _argv: *const *const u8, envp: *const *const u8) {
    let mut path = DEFAULT_TABLE_C;
    // A setuid or setcap program takes no path from its caller's environment: it would map
    // whatever file the caller names.
    let mut env = if secure_execution() { core::ptr::null() } else { envp };
    // SAFETY: envp is the NULL-terminated array of NUL-terminated strings the loader passes.
    unsafe {
        while !env.is_null() && !(*env).is_null() {
            let var = *env;
            let name = b"TOA_TABLE=";
            let mut i = 0;
            while i < name.len() && *var.add(i) == name[i] {
                i += 1;
            }
            if i == name.len() {
                let mut n = 0;
                while *var.add(i + n) != 0 && n < PATH_MAX - 1 {
                    n += 1;
                }
                if n > 0 && n < PATH_MAX - 1 {
                    path = core::slice::from_raw_parts(var.add(i), n + 1);
                }
            }
            env = env.add(1);
        }
        let dst = &mut *core::ptr::addr_of_mut!(TABLE_PATH);
        for (d, s) in dst.iter_mut().zip(path) {
            *d = *s;
        }
    }
}

/// accept(2), answering with the client where the table has one.
///
/// # Safety
/// As for accept(2): `addr`/`len` null, or valid for the lengths they say.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: i32, addr: *mut u8, len: *mut u32) -> i32 {
    // SAFETY: the caller's arguments, as for accept(2).
    unsafe { accept4(fd, addr, len, 0) }
}

/// accept4(2), answering with the client where the table has one.
///
/// # Safety
/// As for accept4(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(fd: i32, addr: *mut u8, len: *mut u32, flags: i32) -> i32 {
    let given = if addr.is_null() || len.is_null() { 0 } else { unsafe { *len } };
    // SAFETY: the caller's arguments, as for accept4(2).
    let conn = sys::result(unsafe { sys::accept4(fd, addr, len, flags) });
    if conn >= 0 && given > 0 {
        // SAFETY: the kernel just wrote the peer there (up to `given` bytes).
        unsafe { rewrite(conn, addr, len, given, Some(fd)) };
    }
    conn
}

/// getpeername(2), answering with the client where the table has one.
///
/// # Safety
/// As for getpeername(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(fd: i32, addr: *mut u8, len: *mut u32) -> i32 {
    let given = if addr.is_null() || len.is_null() { 0 } else { unsafe { *len } };
    // SAFETY: the caller's arguments, as for getpeername(2).
    let r = sys::result(unsafe { sys::getpeername(fd, addr, len) });
    if r == 0 && given > 0 {
        // SAFETY: as in accept4.
        unsafe { rewrite(fd, addr, len, given, None) };
    }
    r
}

/// A socket address read from or written to the caller's buffer.
struct SockAddr {
    family: u16,
    port: u16,
    /// IPv4 as `::ffff:a.b.c.d`.
    addr: [u8; 16],
}

const SOCKADDR_IN: u32 = 16;
const SOCKADDR_IN6: u32 = 28;

/// Reads a `sockaddr_in`/`sockaddr_in6` of `len` valid bytes.
unsafe fn read_sockaddr(p: *const u8, len: u32) -> Option<SockAddr> {
    // SAFETY: `len` bytes are readable; each read is checked against it.
    unsafe {
        if len < 2 {
            return None;
        }
        let family = u16::from_ne_bytes([*p, *p.add(1)]);
        let port = u16::from_be_bytes([*p.add(2), *p.add(3)]);
        let mut addr = [0u8; 16];
        if family == AF_INET && len >= SOCKADDR_IN {
            addr = v4_mapped([*p.add(4), *p.add(5), *p.add(6), *p.add(7)]);
        } else if family == AF_INET6 && len >= SOCKADDR_IN6 {
            for (i, b) in addr.iter_mut().enumerate() {
                *b = *p.add(8 + i);
            }
        } else {
            return None;
        }
        Some(SockAddr { family, port, addr })
    }
}

/// Replaces the peer the kernel wrote at `addr` (caller's buffer of `given` bytes) with the
/// connection's client, when the table has one. `listener`: the socket `fd` was just accepted
/// from.
unsafe fn rewrite(fd: i32, addr: *mut u8, len: *mut u32, given: u32, listener: Option<i32>) {
    // SAFETY: the kernel wrote min(given, *len) bytes; a truncated address is left alone.
    let full = unsafe { *len };
    if full > given {
        return;
    }
    let Some(peer) = (unsafe { read_sockaddr(addr, full) }) else {
        return;
    };
    count(Count::Lookup);
    let Some(table) = table() else {
        count(Count::NoTable);
        return;
    };
    let mut local = [0u8; 128];
    let mut local_len = local.len() as u32;
    // SAFETY: a local buffer and its length.
    if unsafe { sys::getsockname(fd, local.as_mut_ptr(), &mut local_len) } != 0 {
        return;
    }
    let Some(local) = (unsafe { read_sockaddr(local.as_ptr(), local_len) }) else {
        return;
    };
    let key = Key { local: local.addr, remote: peer.addr, local_port: local.port, remote_port: peer.port };
    let isn = listener.and_then(|listener| syn_isn(fd, listener));
    let Some(client) = find(&table, &key, fd, isn) else {
        return;
    };
    count(Count::Found);
    // SAFETY: `full` bytes of the caller's buffer hold the peer of this family.
    unsafe { write_client(addr, peer.family, &client) };
}

/// The entry of `key` with a client. A young connection in the policy's scope is answered from
/// an entry that carries its ISN (`isn`, from the SYN the kernel kept), or else only once the
/// reader has caught up, within a bounded wait. Its segments reached the reader's queue before
/// it could be accepted (packet taps see a segment before TCP does), so the caught-up table is
/// right about it: its option, none, or, where an older connection on the same 4-tuple (a port
/// reused by the client or the balancer) left a client, the SYN that replaced it. Taken before
/// the reader has seen that SYN, the older connection's client would be given to this one.
fn find(table: &Table<'_>, key: &Key, fd: i32, isn: Option<u32>) -> Option<Entry> {
    // An entry that names another ISN than this connection's SYN is an older connection's.
    let ours = |e: &Entry| !matches!(isn, Some(isn) if e.isn != 0 && e.isn != isn);
    let found = || table.lookup(key).filter(|e| e.has_client() && ours(e));
    if !table.in_scope(key.local_port, &key.remote) || !young(fd) {
        return found();
    }
    if let (Some(isn), Some(entry)) = (isn, found()) {
        if entry.isn == isn {
            return Some(entry);
        }
    }
    count(Count::Wait);
    // The bound runs from the reader's last progress: a reader working through a backlog is
    // waited for (up to `MAX_BOUNDS` bounds in all), a stuck one only one bound.
    let bound = table.header.wait_us.load(Ordering::Relaxed) as u64 * 1000;
    let start = sys::monotonic_ns();
    let (mut deadline, cap) = (start + bound, start + MAX_BOUNDS * bound);
    let mut packets = table.counter(Counter::TablePackets);
    loop {
        if caught_up(table) {
            count(Count::WaitCaughtUp);
            return found();
        }
        sys::sleep_us(20);
        let now = sys::monotonic_ns();
        let read = table.counter(Counter::TablePackets);
        if read != packets {
            packets = read;
            deadline = (now + bound).min(cap);
        }
        if now >= deadline {
            count(Count::WaitTimedOut);
            return None;
        }
    }
}

/// A wait that sees the reader progress lasts at most this many `accept_wait_us`.
const MAX_BOUNDS: u64 = 8;

/// Set once the kernel has refused `TCP_SAVE_SYN` (before Linux 4.2): never asked again.
static NO_SAVED_SYN: AtomicU64 = AtomicU64::new(0);

/// The initial sequence number of connection `fd`, from the SYN its listener kept (which the
/// kernel then forgets: the application reading `TCP_SAVED_SYN` itself gets nothing). When there
/// is none, asks `listener` to keep the SYNs of the connections it accepts from now on.
fn syn_isn(fd: i32, listener: i32) -> Option<u32> {
    if NO_SAVED_SYN.load(Ordering::Relaxed) != 0 {
        return None;
    }
    let mut buf = core::mem::MaybeUninit::<[u8; 256]>::uninit();
    let base = buf.as_mut_ptr() as *mut u8;
    let mut len = 256u32;
    // SAFETY: a 256-byte buffer and its length.
    let r = unsafe { sys::saved_syn(fd, base, &mut len) };
    if r < 0 {
        // ENOPROTOOPT: a kernel without saved SYNs.
        NO_SAVED_SYN.store(1, Ordering::Relaxed);
        return None;
    }
    if len == 0 {
        if sys::save_syns(listener) < 0 {
            NO_SAVED_SYN.store(1, Ordering::Relaxed);
        }
        return None;
    }
    // SAFETY: the kernel wrote the first `len` (≤ 256) bytes.
    let syn = unsafe { core::slice::from_raw_parts(base, (len as usize).min(256)) };
    let tcp = match syn.first()? >> 4 {
        4 => (syn[0] & 0x0f) as usize * 4,
        // A SYN carries no IPv6 extension header we would need to skip in practice; one that
        // does is not read (the bounded wait decides).
        6 if syn.get(6) == Some(&6) => 40,
        _ => return None,
    };
    let seq = syn.get(tcp + 4..tcp + 8)?;
    Some(u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]))
}

/// Whether the reader has stored everything its socket received: its queue is empty (`Rmem` of
/// its line in `/proc/net/packet`, read first) and it is not busy (read second: it turns busy
/// before taking a packet off the queue, idle only after storing it).
fn caught_up(table: &Table<'_>) -> bool {
    let ino = table.header.capture_ino.load(Ordering::Relaxed);
    ino != 0 && packet_queue(ino) == Some(0) && table.header.reader_busy.load(Ordering::SeqCst) == 0
}

/// Bytes queued on the packet socket with inode `ino`, from `/proc/net/packet` (columns: sk
/// RefCnt Type Proto Iface R Rmem User Inode, the same since Linux 2.6).
fn packet_queue(ino: u64) -> Option<u64> {
    let fd = sys::open_read(b"/proc/net/packet\0");
    if fd < 0 {
        return None;
    }
    // Not zero-filled (that would call the C library's memset): only what read() wrote is used.
    let mut buf = core::mem::MaybeUninit::<[u8; 8192]>::uninit();
    let base = buf.as_mut_ptr() as *mut u8;
    let mut len = 0;
    while len < 8192 {
        // SAFETY: `base + len .. base + 8192` lies inside `buf`.
        let n = unsafe { sys::read_raw(fd as i32, base.wrapping_add(len), 8192 - len) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    sys::close(fd as i32);
    // SAFETY: read() initialized the first `len` bytes.
    let text = unsafe { core::slice::from_raw_parts(base, len) };
    text.split(|b| *b == b'\n').skip(1).find_map(|line| {
        let mut cols = line.split(|b| *b == b' ').filter(|c| !c.is_empty());
        let rmem = cols.nth(6).and_then(decimal)?;
        (cols.nth(1).and_then(decimal)? == ino).then_some(rmem)
    })
}

fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| d.is_ascii_digit().then(|| n * 10 + (d - b'0') as u64))
}

/// Whether the connection has received no more segments than a TOA can arrive on (as the eBPF
/// mode searches): older connections never wait. Kernels whose `tcp_info` lacks the count
/// (before 4.2) count as young.
fn young(fd: i32) -> bool {
    let mut info = [0u32; 64];
    let mut len = (info.len() * 4) as u32;
    // SAFETY: a buffer larger than struct tcp_info and its length.
    if unsafe { sys::tcp_info(fd, info.as_mut_ptr().cast(), &mut len) } != 0 {
        return false;
    }
    const SEGS_IN: usize = 140;
    len < (SEGS_IN + 4) as u32 || info[SEGS_IN / 4] <= toa_common::SEARCH_SEGMENTS_IN
}

/// Writes the client into a `sockaddr_in`/`sockaddr_in6` of `family` (an IPv6 client stays out
/// of an IPv4 socket's address: the real peer is kept).
unsafe fn write_client(p: *mut u8, family: u16, e: &Entry) {
    let client_v4 = e.family as u16 == AF_INET;
    // SAFETY: the buffer holds a whole sockaddr of `family` (checked by read_sockaddr).
    unsafe {
        if family == AF_INET {
            if !client_v4 {
                return;
            }
            for i in 0..4 {
                *p.add(4 + i) = e.addr[i];
            }
        } else {
            let addr = if client_v4 { v4_mapped([e.addr[0], e.addr[1], e.addr[2], e.addr[3]]) } else { e.addr };
            for (i, b) in addr.iter().enumerate() {
                *p.add(8 + i) = *b;
            }
        }
        if e.flags & ENTRY_HAS_PORT != 0 {
            *p.add(2) = e.port[0];
            *p.add(3) = e.port[1];
        }
    }
}

/// The table, if it is there, belongs to this network namespace and its reader is alive.
fn table() -> Option<Table<'static>> {
    let now = sys::monotonic_ns() / 1_000_000_000;
    if let Some(table) = mapped(now) {
        return Some(table);
    }
    // Absent or stopped: one thread looks for a (new) table, at most once a second; the others
    // wait for it rather than miss a connection while it maps.
    let start = sys::monotonic_ns();
    let claimed = MAPPING.load(Ordering::Acquire);
    if claimed != 0 && start.saturating_sub(claimed) < MAPPING_STALE_NS {
        while MAPPING.load(Ordering::Acquire) == claimed
            && sys::monotonic_ns().saturating_sub(claimed) < MAPPING_STALE_NS
        {
            sys::sleep_us(1);
        }
        return mapped(now);
    }
    if MAPPING.compare_exchange(claimed, start, Ordering::Acquire, Ordering::Relaxed).is_err() {
        // Another thread claimed it this instant.
        return mapped(now);
    }
    let next = NEXT_TRY.load(Ordering::Relaxed);
    let table = if now >= next {
        NEXT_TRY.store(now + 1, Ordering::Relaxed);
        map_table(now)
    } else {
        None
    };
    MAPPING.store(0, Ordering::Release);
    table
}

/// The table already mapped, if its reader is alive.
fn mapped(now: u64) -> Option<Table<'static>> {
    let base = MAPPED.load(Ordering::Acquire);
    if !base.is_null() {
        // SAFETY: validated (size included) when mapped; mappings are never removed, and the
        // header's size never changes.
        let size = unsafe { (*(base as *const toa_common::table::Header)).total_size } as usize;
        // SAFETY: as above.
        if let Some(table) = unsafe { Table::from_raw(base, size) }.filter(|t| t.live(now)) {
            return Some(table);
        }
    }
    None
}

/// Whether a table file can be believed: a regular file that only root can write (the agent
/// creates it so). Anything else could be made by a local user to hand out client addresses.
fn trustworthy(st: &sys::Stat) -> bool {
    const S_IFMT: u32 = 0o170_000;
    const S_IFREG: u32 = 0o100_000;
    st.mode & S_IFMT == S_IFREG && st.uid == 0 && st.mode & 0o022 == 0
}

/// Maps the table file if it is a table of this namespace and not the one already mapped.
fn map_table(now: u64) -> Option<Table<'static>> {
    // SAFETY: written once by `init`, before any thread exists.
    let path = unsafe { &*core::ptr::addr_of!(TABLE_PATH) };
    let end = path.iter().position(|b| *b == 0)?;
    let fd = sys::open_read(&path[..=end]);
    if fd < 0 {
        return None;
    }
    let fd = fd as i32;
    let mapped = (|| {
        let st = sys::fstat(fd)?;
        if !trustworthy(&st) || st.ino == MAPPED_INO.load(Ordering::Relaxed) {
            return None;
        }
        let (ino, size) = (st.ino, st.size);
        let base = sys::mmap_read(fd, size as usize)?;
        // SAFETY: `size` bytes mapped, page aligned, kept for the life of the process.
        let table = unsafe { Table::from_raw(base, size as usize) }?;
        let netns = sys::stat(b"/proc/self/ns/net\0")?;
        if (table.header.netns_dev, table.header.netns_ino) != netns {
            // Another namespace's connections: never use it.
            return None;
        }
        MAPPED_INO.store(ino, Ordering::Relaxed);
        // A previous mapping stays (a thread may still read it): a few pages per reader restart.
        MAPPED.store(base as *mut u8, Ordering::Release);
        Some(table)
    })();
    sys::close(fd);
    mapped.filter(|t| t.live(now))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // Nothing here can panic by design; if it ever did, fail loudly rather than return garbage.
    loop {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: raises SIGILL.
        unsafe {
            core::arch::asm!("ud2")
        };
        #[cfg(target_arch = "aarch64")]
        // SAFETY: raises SIGILL.
        unsafe {
            core::arch::asm!("udf #0")
        };
    }
}
