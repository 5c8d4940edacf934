//! The connection table of the userspace mode (kernels without the eBPF hooks).
//!
//! One file in shared memory (tmpfs), written by one process, the capture reader, and mapped
//! read-only by `libtoa.so` in every application that wants client addresses. It maps a
//! connection's 4-tuple, as the backend sees it, to the client address its TOA carried.
//!
//! Layout: a [`Header`] of [`HEADER_SIZE`] bytes (state, policy, counters), then `buckets`
//! buckets of [`WAYS`] slots of 72 bytes. The table never grows: a full bucket gives up its
//! oldest slot, and entries older than their time to live are cleared by the writer.
//!
//! Each slot is a seqlock: the writer makes `seq` odd, writes, makes it even again; a reader
//! copies the slot and keeps the copy only if `seq` was even and unchanged. Every word is an
//! atomic, so a reader racing the writer reads stale or torn words, never undefined memory, and
//! the sequence check throws those away. Readers never write: a process that maps the table
//! cannot make another process see a wrong address.

use core::{
    cell::UnsafeCell,
    sync::atomic::{fence, AtomicU32, AtomicU64, Ordering},
};

use crate::{
    config::AgentConfig,
    counters::{Counter, ALL_COUNTERS},
};

/// Where the table lives unless `TOA_TABLE` (and the agent's `--table`) says otherwise,
/// NUL-terminated for `libtoa.so`, which opens it without an allocator.
pub const DEFAULT_TABLE_C: &[u8] = b"/run/toa/table\0";
/// [`DEFAULT_TABLE_C`] without its NUL.
pub const DEFAULT_TABLE: &str = match DEFAULT_TABLE_C.split_last() {
    Some((0, path)) => match core::str::from_utf8(path) {
        Ok(path) => path,
        Err(_) => panic!("DEFAULT_TABLE_C is UTF-8"),
    },
    _ => panic!("DEFAULT_TABLE_C ends with a NUL"),
};

/// "TOATABL1", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TOATABL1");
/// Bumped on any change of the layout.
pub const VERSION: u32 = 3;
/// Bytes before the first bucket.
pub const HEADER_SIZE: usize = 32 * 1024;
/// Slots per bucket.
pub const WAYS: usize = 8;
/// Bytes per slot.
pub const SLOT_SIZE: usize = 72;
/// Trust list entries the header holds (as many as the eBPF mode's trie).
pub const TRUST_MAX: usize = 1024;
/// The reader is running and refreshing `heartbeat`.
pub const RUNNING: u32 = 1;
/// The reader stopped: nothing in the table may be used.
pub const STOPPED: u32 = 2;
/// A reader whose heartbeat is older than this many seconds is taken for dead.
pub const HEARTBEAT_STALE_SECS: u64 = 3;

/// Slot states.
pub const EMPTY: u8 = 0;
/// The connection's SYN was seen (it is in scope), no TOA yet: `accept()` may wait for it.
pub const PENDING: u8 = 1;
/// The TOA was found on the handshake ACK or a data segment.
pub const FOUND: u8 = 2;
/// The TOA was found on the SYN; one on the handshake ACK still replaces it.
pub const FOUND_ON_SYN: u8 = 3;

/// The entry's client carries a port.
pub const ENTRY_HAS_PORT: u8 = 1;

/// One trust-list entry: IPv6 prefix (IPv4 as `::ffff:a.b.c.d/96+n`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrustEntry {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

/// The start of the table file.
#[repr(C)]
pub struct Header {
    pub magic: u64,
    pub version: u32,
    /// `RUNNING` or `STOPPED`.
    pub state: AtomicU32,
    /// Number of buckets, a power of two.
    pub buckets: u32,
    /// How long `accept()`/`getpeername()` wait for a pending entry, microseconds.
    pub wait_us: AtomicU32,
    /// Seconds an entry with a client address is kept.
    pub ttl_secs: AtomicU32,
    /// Seconds a pending entry waits for its TOA (data-segment options come late).
    pub pending_secs: AtomicU32,
    /// The reader's process id.
    pub reader_pid: AtomicU32,
    /// The `config_seq` the reader applies (`toa load` waits for it).
    pub config_applied: AtomicU32,
    /// The network namespace the reader captures in (device and inode of its nsfs file):
    /// a process in another namespace must not use the table.
    pub netns_dev: u64,
    pub netns_ino: u64,
    /// `CLOCK_MONOTONIC` seconds, refreshed by the reader at least once a second.
    pub heartbeat: AtomicU64,
    /// Inode of the reader's capture socket (its line in `/proc/net/packet`).
    pub capture_ino: AtomicU64,
    /// 1 from before the reader takes a packet off its socket until it has stored what the
    /// packets said and found the socket empty. With the socket's queue (`Rmem` in
    /// `/proc/net/packet`) at 0, a 0 here means every packet received so far is in the table.
    pub reader_busy: AtomicU32,
    pub _pad2: u32,
    /// Total size of the file, checked by every process that maps it.
    pub total_size: u64,
    /// Seqlock over `config`, `trust_len` and `trust` (written by `toa load`, read by the reader).
    pub config_seq: AtomicU32,
    pub trust_len: AtomicU32,
    pub config: UnsafeCell<AgentConfig>,
    pub trust: UnsafeCell<[TrustEntry; TRUST_MAX]>,
    /// Every [`Counter`], in slot order (the userspace mode's own last).
    pub counters: [AtomicU64; ALL_COUNTERS],
}

const _: () = assert!(core::mem::size_of::<Header>() <= HEADER_SIZE);

// SAFETY: `config` and `trust` are only written under the `config_seq` seqlock and only read
// through volatile copies that the sequence check validates; everything else is atomic.
unsafe impl Sync for Header {}

/// A connection as the backend sees it; IPv4 addresses as `::ffff:a.b.c.d`, ports host order.
#[derive(Clone, Copy, Debug, Default, Eq)]
pub struct Key {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// What a slot holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    /// `PENDING`, `FOUND` or `FOUND_ON_SYN`.
    pub state: u8,
    /// `AF_INET` or `AF_INET6` (as u8).
    pub family: u8,
    /// `ENTRY_*` bits.
    pub flags: u8,
    /// Client port, network byte order.
    pub port: [u8; 2],
    /// Client address; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// `CLOCK_MONOTONIC` seconds when written.
    pub stamp: u32,
    /// The connection's initial sequence number, its SYN's (0: the reader did not see the SYN).
    /// libtoa.so compares it with the SYN the kernel kept for the socket: an entry of an older
    /// connection on the same 4-tuple has another.
    pub isn: u32,
}

impl Entry {
    pub fn has_client(&self) -> bool {
        self.state == FOUND || self.state == FOUND_ON_SYN
    }
}

/// One slot: `seq`, `stamp` (0: empty), then 16 words of key and value (the last unused).
#[repr(C)]
pub struct Slot {
    seq: AtomicU32,
    stamp: AtomicU32,
    words: [AtomicU32; 16],
}

const _: () = assert!(core::mem::size_of::<Slot>() == SLOT_SIZE);

fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

fn unword(words: &[u32], out: &mut [u8; 16]) {
    for i in 0..4 {
        out[4 * i..4 * i + 4].copy_from_slice(&words[i].to_ne_bytes());
    }
}

impl PartialEq for Key {
    /// Compared as integers: libtoa.so must not call the C library's `bcmp`, which a derived
    /// comparison of byte arrays becomes.
    fn eq(&self, other: &Self) -> bool {
        u128::from_ne_bytes(self.local) == u128::from_ne_bytes(other.local)
            && u128::from_ne_bytes(self.remote) == u128::from_ne_bytes(other.remote)
            && self.local_port == other.local_port
            && self.remote_port == other.remote_port
    }
}

impl Key {
    fn words(&self) -> [u32; 9] {
        let l = &self.local;
        let r = &self.remote;
        [
            word(l, 0),
            word(l, 1),
            word(l, 2),
            word(l, 3),
            word(r, 0),
            word(r, 1),
            word(r, 2),
            word(r, 3),
            (self.local_port as u32) << 16 | self.remote_port as u32,
        ]
    }

    /// The bucket hash (the writer and every reader must agree on it).
    fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for w in self.words() {
            h = (h ^ w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
        h
    }
}

impl Slot {
    fn write(&self, e: &Entry) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let k = e.key.words();
        for (i, w) in k.iter().enumerate() {
            self.words[i].store(*w, Ordering::Relaxed);
        }
        for i in 0..4 {
            self.words[9 + i].store(word(&e.addr, i), Ordering::Relaxed);
        }
        let meta = u32::from_ne_bytes([e.port[0], e.port[1], e.family, (e.state & 0x0f) | (e.flags << 4)]);
        self.words[13].store(meta, Ordering::Relaxed);
        self.words[14].store(e.isn, Ordering::Relaxed);
        self.stamp.store(e.stamp, Ordering::Relaxed);
        self.seq.store((seq.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
    }

    fn clear(&self) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.stamp.store(0, Ordering::Relaxed);
        self.seq.store((seq.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
    }

    /// A consistent copy of the slot, or `None` if it is empty (or being written too often).
    fn read(&self) -> Option<Entry> {
        for _ in 0..16 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                core::hint::spin_loop();
                continue;
            }
            let stamp = self.stamp.load(Ordering::Relaxed);
            let mut w = [0u32; 16];
            for (i, slot) in self.words.iter().enumerate() {
                w[i] = slot.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            if stamp == 0 {
                return None;
            }
            let mut e = Entry { stamp, ..Entry::default() };
            unword(&w[0..4], &mut e.key.local);
            unword(&w[4..8], &mut e.key.remote);
            e.key.local_port = (w[8] >> 16) as u16;
            e.key.remote_port = w[8] as u16;
            unword(&w[9..13], &mut e.addr);
            let m = w[13].to_ne_bytes();
            e.port = [m[0], m[1]];
            e.family = m[2];
            e.state = m[3] & 0x0f;
            e.flags = m[3] >> 4;
            e.isn = w[14];
            return Some(e);
        }
        None
    }

    /// The slot's stamp without a consistent read (the writer's own view).
    fn stamp(&self) -> u32 {
        self.stamp.load(Ordering::Relaxed)
    }
}

/// Bytes of a table with `buckets` buckets.
pub const fn table_size(buckets: u32) -> usize {
    HEADER_SIZE + buckets as usize * WAYS * SLOT_SIZE
}

/// Buckets for room for at least `entries` entries (a power of two, at least 1).
pub const fn buckets_for(entries: u32) -> u32 {
    let b = entries.div_ceil(WAYS as u32);
    if b <= 1 {
        1
    } else {
        b.next_power_of_two()
    }
}

/// What the writer did with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Written into a free (or its own) slot.
    Stored,
    /// Written over the oldest entry of a full bucket.
    Evicted,
}

/// A view of a mapped table. Readers get it from read-only memory; only the capture reader may
/// call the methods that write.
#[derive(Clone, Copy)]
pub struct Table<'a> {
    pub header: &'a Header,
    slots: &'a [Slot],
}

impl<'a> Table<'a> {
    /// A view of `len` bytes at `base`, if they hold a table of this version whose size matches.
    ///
    /// # Safety
    /// `base` must point to `len` readable bytes, 8-byte aligned, mapped for `'a`.
    pub unsafe fn from_raw(base: *const u8, len: usize) -> Option<Self> {
        if len < HEADER_SIZE || base.is_null() || !(base as usize).is_multiple_of(8) {
            return None;
        }
        // SAFETY: the caller guarantees `len >= HEADER_SIZE` readable, aligned bytes.
        let header = unsafe { &*(base as *const Header) };
        let buckets = header.buckets;
        if header.magic != MAGIC
            || header.version != VERSION
            || buckets == 0
            || !buckets.is_power_of_two()
            || header.total_size != table_size(buckets) as u64
            || len < table_size(buckets)
        {
            return None;
        }
        // SAFETY: size checked above; slots are plain atomics.
        let slots =
            unsafe { core::slice::from_raw_parts(base.add(HEADER_SIZE) as *const Slot, buckets as usize * WAYS) };
        Some(Self { header, slots })
    }

    /// Writes a fresh header (the file must be zero-filled and `table_size(buckets)` long).
    ///
    /// # Safety
    /// `base` must point to `table_size(buckets)` writable bytes, 8-byte aligned, not yet shared.
    pub unsafe fn init(base: *mut u8, buckets: u32, netns: (u64, u64)) -> Self {
        // SAFETY: exclusive, zeroed and large enough per the caller; all-zero is a valid Header.
        let header = unsafe { &mut *(base as *mut Header) };
        header.magic = MAGIC;
        header.version = VERSION;
        header.buckets = buckets;
        header.total_size = table_size(buckets) as u64;
        header.netns_dev = netns.0;
        header.netns_ino = netns.1;
        *header.config.get_mut() = AgentConfig::classic();
        // SAFETY: just initialized.
        unsafe { Self::from_raw(base, table_size(buckets)) }.expect("a table just written")
    }

    fn bucket(&self, key: &Key) -> &'a [Slot] {
        let b = (key.hash() as usize) & (self.header.buckets as usize - 1);
        &self.slots[b * WAYS..(b + 1) * WAYS]
    }

    /// The entry of `key`, if any.
    pub fn lookup(&self, key: &Key) -> Option<Entry> {
        self.bucket(key).iter().filter_map(Slot::read).find(|e| e.key == *key)
    }

    /// Whether a reader may use the table: its writer runs and is alive at `now` (monotonic
    /// seconds).
    pub fn live(&self, now: u64) -> bool {
        self.header.state.load(Ordering::Acquire) == RUNNING
            && now.saturating_sub(self.header.heartbeat.load(Ordering::Acquire)) <= HEARTBEAT_STALE_SECS
    }

    /// Writer only: stores `entry` in its own slot, a free one, or the bucket's oldest.
    pub fn store(&self, entry: &Entry) -> Stored {
        let bucket = self.bucket(&entry.key);
        if let Some(own) = bucket.iter().find(|s| s.read().is_some_and(|e| e.key == entry.key)) {
            own.write(entry);
            return Stored::Stored;
        }
        if let Some(free) = bucket.iter().find(|s| s.stamp() == 0) {
            free.write(entry);
            return Stored::Stored;
        }
        // A full bucket gives up a connection still waiting for its option before one that has
        // its client: a burst of SYNs (a flood) must not push out the addresses of open
        // connections. Among equals, the oldest goes.
        let oldest =
            bucket.iter().min_by_key(|s| (s.read().is_some_and(|e| e.has_client()), s.stamp())).expect("WAYS > 0");
        oldest.write(entry);
        self.count(Counter::TableEvicted, 1);
        Stored::Evicted
    }

    /// Writer only: clears entries past their time at `now`; returns (entries with a client
    /// left, pending entries that expired without one).
    pub fn sweep(&self, now: u32) -> (u64, u64) {
        let ttl = self.header.ttl_secs.load(Ordering::Relaxed);
        let pending = self.header.pending_secs.load(Ordering::Relaxed);
        let (mut live, mut gave_up) = (0, 0);
        for s in self.slots {
            if s.stamp() == 0 {
                continue;
            }
            let Some(e) = s.read() else { continue };
            let age = now.saturating_sub(e.stamp);
            if e.has_client() {
                if age >= ttl {
                    s.clear();
                } else {
                    live += 1;
                }
            } else if age >= pending {
                s.clear();
                gave_up += 1;
            }
        }
        self.header.counters[Counter::TableEntries as usize].store(live, Ordering::Relaxed);
        (live, gave_up)
    }

    /// Writer only: clears every slot.
    pub fn clear_all(&self) {
        for s in self.slots {
            if s.stamp() != 0 {
                s.clear();
            }
        }
        self.header.counters[Counter::TableEntries as usize].store(0, Ordering::Relaxed);
    }

    pub fn count(&self, counter: Counter, n: u64) {
        self.header.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.header.counters[counter as usize].load(Ordering::Relaxed)
    }

    /// Reads the policy consistently: `(config, trust entries written into `trust`)`.
    pub fn read_config(&self, trust: &mut [TrustEntry; TRUST_MAX]) -> (AgentConfig, usize) {
        self.read_policy(|config, shared| {
            for (i, t) in trust.iter_mut().enumerate().take(shared.len) {
                *t = shared.get(i);
            }
            (*config, shared.len)
        })
    }

    /// Runs `read` on the policy until it ran on a consistent one (the `config_seq` seqlock):
    /// what it computed from a copy torn by a concurrent writer is thrown away.
    fn read_policy<T>(&self, mut read: impl FnMut(&AgentConfig, SharedTrust) -> T) -> T {
        loop {
            let s1 = self.header.config_seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                core::hint::spin_loop();
                continue;
            }
            // SAFETY: plain data; a torn copy is discarded by the sequence check below.
            let config = unsafe { core::ptr::read_volatile(self.header.config.get()) };
            let len = (self.header.trust_len.load(Ordering::Relaxed) as usize).min(TRUST_MAX);
            let out = read(&config, SharedTrust { base: self.header.trust.get() as *const TrustEntry, len });
            fence(Ordering::Acquire);
            if self.header.config_seq.load(Ordering::Relaxed) == s1 {
                return out;
            }
        }
    }

    /// Writes the policy (callers serialize with each other, e.g. with a file lock).
    ///
    /// # Safety
    /// The mapping behind `self` must be writable.
    pub unsafe fn write_config(&self, config: &AgentConfig, trust: &[TrustEntry]) {
        let seq = self.header.config_seq.load(Ordering::Relaxed);
        self.header.config_seq.store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let n = trust.len().min(TRUST_MAX);
        // SAFETY: writable per the caller; readers discard what they read while seq is odd.
        unsafe {
            core::ptr::write_volatile(self.header.config.get(), *config);
            for (i, t) in trust.iter().take(n).enumerate() {
                core::ptr::write_volatile((self.header.trust.get() as *mut TrustEntry).add(i), *t);
            }
        }
        self.header.trust_len.store(n as u32, Ordering::Relaxed);
        self.header.config_seq.store((seq.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
    }
}

/// Whether `addr` (16 bytes, IPv4 mapped) is in `trust`.
pub fn trusted(trust: &[TrustEntry], addr: &[u8; 16]) -> bool {
    trust.iter().any(|t| t.contains(addr))
}

impl TrustEntry {
    pub fn contains(&self, addr: &[u8; 16]) -> bool {
        // As integers, not slices: no call to the C library's bcmp from libtoa.so.
        let bits = self.prefix_len.min(128);
        let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
        (u128::from_be_bytes(*addr) ^ u128::from_be_bytes(self.addr)) & mask == 0
    }
}

impl Table<'_> {
    /// Whether the policy honours options for a connection to `local_port` from `remote`
    /// (what `accept()` checks before waiting for the reader), read straight from the shared
    /// header: no copy of the trust list on the caller's stack.
    pub fn in_scope(&self, local_port: u16, remote: &[u8; 16]) -> bool {
        self.read_policy(|cfg, trust| {
            cfg.port_allowed(local_port) && cfg.trusts(|| (0..trust.len).any(|i| trust.get(i).contains(remote)))
        })
    }
}

/// The trust list in the shared header, read entry by entry under `read_policy`.
struct SharedTrust {
    base: *const TrustEntry,
    len: usize,
}

impl SharedTrust {
    fn get(&self, i: usize) -> TrustEntry {
        // SAFETY: `i < len ≤ TRUST_MAX` entries of the header's array (callers iterate below
        // `len`; the index is clamped to stay inside); torn reads are discarded by the seqlock.
        unsafe { core::ptr::read_volatile(self.base.add(i.min(TRUST_MAX - 1))) }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{boxed::Box, vec, vec::Vec};

    use super::*;

    /// A zeroed, 8-byte aligned table in ordinary memory.
    fn table(buckets: u32) -> (Vec<u64>, Table<'static>) {
        let mut mem = vec![0u64; table_size(buckets) / 8];
        let t = unsafe { Table::init(mem.as_mut_ptr().cast(), buckets, (1, 2)) };
        // SAFETY: the Vec outlives every use in these tests (returned alongside, never moved).
        let t: Table<'static> = unsafe { core::mem::transmute(t) };
        (mem, t)
    }

    fn key(n: u16) -> Key {
        Key { local: [1; 16], remote: [2; 16], local_port: 80, remote_port: n }
    }

    fn found(n: u16, stamp: u32) -> Entry {
        Entry {
            key: key(n),
            state: FOUND,
            family: 2,
            flags: ENTRY_HAS_PORT,
            port: n.to_be_bytes(),
            addr: [9; 16],
            stamp,
            isn: 0x8000_0000 | n as u32,
        }
    }

    #[test]
    fn store_lookup_replace() {
        let (_m, t) = table(4);
        assert_eq!(t.lookup(&key(1)), None);
        assert_eq!(t.store(&found(1, 10)), Stored::Stored);
        assert_eq!(t.lookup(&key(1)), Some(found(1, 10)));
        assert_eq!(t.lookup(&key(2)), None, "another port is another connection");
        let mut e = found(1, 11);
        e.addr = [7; 16];
        t.store(&e);
        assert_eq!(t.lookup(&key(1)), Some(e), "the same key is replaced, not duplicated");
    }

    #[test]
    fn full_table_evicts_oldest_and_never_grows() {
        let (_m, t) = table(1);
        for n in 0..WAYS as u16 {
            assert_eq!(t.store(&found(n, 100 + n as u32)), Stored::Stored);
        }
        assert_eq!(t.store(&found(1000, 200)), Stored::Evicted);
        assert_eq!(t.lookup(&key(0)), None, "the oldest went");
        assert!(t.lookup(&key(1)).is_some() && t.lookup(&key(1000)).is_some());
        assert_eq!(t.counter(Counter::TableEvicted), 1);
    }

    #[test]
    fn a_flood_of_pending_entries_does_not_evict_clients() {
        let (_m, t) = table(1);
        t.store(&found(1, 10));
        for n in 100..100 + 3 * WAYS as u16 {
            t.store(&Entry { state: PENDING, ..found(n, 20 + n as u32) });
        }
        assert!(t.lookup(&key(1)).is_some_and(|e| e.has_client()), "the older entry with a client stays");
        // Only clients left: the oldest goes.
        for n in 0..WAYS as u16 {
            t.store(&found(200 + n, 1000 + n as u32));
        }
        assert_eq!(t.lookup(&key(1)), None);
    }

    #[test]
    fn sweep_expires_by_age() {
        let (_m, t) = table(8);
        t.header.ttl_secs.store(60, Ordering::Relaxed);
        t.header.pending_secs.store(5, Ordering::Relaxed);
        t.store(&found(1, 100));
        t.store(&Entry { state: PENDING, ..found(2, 100) });
        assert_eq!(t.sweep(104), (1, 0));
        assert!(t.lookup(&key(2)).is_some());
        assert_eq!(t.sweep(105), (1, 1), "the pending entry gave up");
        assert_eq!(t.lookup(&key(2)), None);
        assert_eq!(t.sweep(159), (1, 0));
        assert_eq!(t.sweep(160), (0, 0));
        assert_eq!(t.lookup(&key(1)), None);
        assert_eq!(t.counter(Counter::TableEntries), 0);
    }

    #[test]
    fn liveness() {
        let (_m, t) = table(1);
        assert!(!t.live(0), "a table whose reader never started");
        t.header.state.store(RUNNING, Ordering::Relaxed);
        t.header.heartbeat.store(100, Ordering::Relaxed);
        assert!(t.live(100) && t.live(103));
        assert!(!t.live(104), "stale heartbeat");
        t.header.state.store(STOPPED, Ordering::Relaxed);
        assert!(!t.live(100));
    }

    #[test]
    fn from_raw_refuses_foreign_memory() {
        let (mut m, _t) = table(2);
        let len = m.len() * 8;
        assert!(unsafe { Table::from_raw(m.as_ptr().cast(), len) }.is_some());
        assert!(unsafe { Table::from_raw(m.as_ptr().cast(), len - 1) }.is_none(), "short mapping");
        m[0] = 0;
        assert!(unsafe { Table::from_raw(m.as_ptr().cast(), len) }.is_none(), "bad magic");
    }

    #[test]
    fn config_round_trip() {
        let (_m, t) = table(1);
        let mut cfg = AgentConfig::classic();
        cfg.enable_kind(200);
        let trust = [TrustEntry { prefix_len: 120, addr: crate::config::v4_mapped([198, 18, 0, 0]) }];
        unsafe { t.write_config(&cfg, &trust) };
        let mut out = Box::new([TrustEntry::default(); TRUST_MAX]);
        let (c, n) = t.read_config(&mut out);
        assert_eq!((c, n, out[0]), (cfg, 1, trust[0]));
    }

    #[test]
    fn scope_from_the_shared_policy() {
        let (_m, t) = table(1);
        let v4 = |a, b, c, d| crate::config::v4_mapped([a, b, c, d]);
        assert!(t.in_scope(80, &v4(198, 18, 0, 2)), "classic: everything");
        let mut cfg = AgentConfig::classic();
        cfg.flags = crate::config::FLAG_TRUST_REQUIRED | crate::config::FLAG_PORTS;
        cfg.ports[0] = [80, 80];
        cfg.port_ranges = 1;
        unsafe { t.write_config(&cfg, &[TrustEntry { prefix_len: 128, addr: v4(198, 18, 0, 2) }]) };
        assert!(t.in_scope(80, &v4(198, 18, 0, 2)));
        assert!(!t.in_scope(81, &v4(198, 18, 0, 2)), "port");
        assert!(!t.in_scope(80, &v4(198, 18, 0, 3)), "source");
    }

    #[test]
    fn trust_prefixes() {
        let v4 = |a, b, c, d| crate::config::v4_mapped([a, b, c, d]);
        let list = [TrustEntry { prefix_len: 96 + 23, addr: v4(198, 18, 0, 0) }];
        assert!(trusted(&list, &v4(198, 18, 1, 255)));
        assert!(!trusted(&list, &v4(198, 18, 2, 0)));
        assert!(!trusted(&[], &v4(198, 18, 0, 1)));
        let all = [TrustEntry { prefix_len: 0, addr: [0; 16] }];
        assert!(trusted(&all, &[0xfd; 16]));
    }

    /// A reader racing the writer sees a whole entry or none, never a mix of two.
    #[test]
    fn readers_never_see_torn_entries() {
        let (_m, t) = table(1);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let seen = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                // At least 200 000 writes, and on until the reader has raced 1 000 of them: a
                // loaded machine may run this thread to its end before the reader's first look.
                // The deadline only bounds a hang.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                let mut i = 0u32;
                while i < 200_000 || (seen.load(Ordering::Relaxed) < 1_000 && std::time::Instant::now() < deadline) {
                    let b = (i % 251) as u8;
                    t.store(&Entry { addr: [b; 16], port: [b, b], ..found(7, 1 + i) });
                    i += 1;
                }
                stop.store(true, Ordering::Relaxed);
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(e) = t.lookup(&key(7)) {
                    assert!(e.addr.iter().all(|b| *b == e.addr[0]) && e.port == [e.addr[0]; 2], "torn: {e:?}");
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
            assert!(seen.load(Ordering::Relaxed) >= 1_000, "the reader found no whole entry while the writer ran");
        });
    }
}
