//! The TCP option parser: a pure function over the option area of one TCP header.
//!
//! The eBPF program copies the option area into a 64-byte buffer (a per-CPU map slot) and calls
//! [`scan_toa`] on it; the host tests and the fuzzer call [`find_toa`], the same search. Every
//! index is masked with `OPTION_BUF_LEN - 1`, which costs nothing on the host and lets every
//! kernel's verifier see that each read stays inside the buffer.

use crate::{
    config::{
        AgentConfig, FLAG_DIALECT_ALIBABA_CDN, FLAG_DIALECT_ANOLIS_VTOA, FLAG_DIALECT_BYTEDANCE,
        FLAG_DIALECT_TENCENT_VTOA, FLAG_PARTS, FLAG_PICK_LAST, FLAG_UOA_BYTEDANCE,
    },
    ClientAddr, AF_INET, AF_INET6, CLIENT_HAS_PORT, CLIENT_HAS_VIP, CLIENT_HAS_VPC,
};

/// The option kind of the classic TOA (Huawei ELB, DPVS, LVS FULLNAT, UCloud).
pub const TOA_KIND: u8 = 254;
/// Length of a TOA carrying `port + IPv4`.
pub const TOA_LEN_V4: u8 = 8;
/// Length of a TOA carrying `port + IPv6`.
pub const TOA_LEN_V6: u8 = 20;
/// ByteDance's TOA: client port + IPv4, 2 pad, VIP port + IPv4 (under kind 254).
pub const BYTEDANCE_LEN: u8 = 16;
/// Alibaba CDN's option kind, with a version byte then IPv4 (length 7) or IPv6 (length 19).
pub const ALIBABA_CDN_KIND: u8 = 28;
pub const ALIBABA_CDN_LEN_V4: u8 = 7;
pub const ALIBABA_CDN_LEN_V6: u8 = 19;
/// The only version of Alibaba CDN's layout.
pub const ALIBABA_CDN_VERSION: u8 = 1;
/// ByteDance's UOA (IPv4 options of UDP datagrams): types 31 and 30 with `type, length,
/// operation (0: IPv4 inside, 1: IPv6), pad, client port, virtual port, client address, virtual
/// address` (length 16, or 40 with IPv6 addresses); type 29 ("v2") with `type, length, operation,
/// pad, VNI (4), client port, 2 pad, client address` (length 16, or 32 with IPv6 and 4 pad).
pub const UOA_BYTEDANCE_KIND: u8 = 31;
pub const UOA_BYTEDANCE_ASYM_KIND: u8 = 30;
pub const UOA_BYTEDANCE_V2_KIND: u8 = 29;
pub const UOA_BYTEDANCE_LEN_V4: u8 = 16;
pub const UOA_BYTEDANCE_LEN_V6: u8 = 40;
pub const UOA_BYTEDANCE_V2_LEN_V6: u8 = 32;
/// Tencent's VTOA: the client under kind 200 (classic IPv4 layout), the VPC id under 201
/// (length 6: four bytes), the virtual port and IPv4 under 202 (length 8).
pub const TENCENT_CLIENT_KIND: u8 = 200;
pub const TENCENT_VPC_KIND: u8 = 201;
pub const TENCENT_VPC_LEN: u8 = 6;
pub const TENCENT_VIP_KIND: u8 = 202;
/// Alibaba's (Anolis) VTOA: the virtual port and IPv4 under 250 (length 8); 252 (length 20):
/// client port, client IPv4, VPC id, virtual IPv4, virtual port, 2 pad; 249 (length 40): client
/// port, client IPv6, VPC id (3 bytes), 1 reserved, virtual IPv6 (not kept: `ClientAddr` holds an
/// IPv4 one).
pub const ANOLIS_VIP_KIND: u8 = 250;
/// Alibaba's IPv6 client option (classic IPv6 layout), beside 254/20.
pub const ANOLIS_TOA_V6_KIND: u8 = 253;
pub const ANOLIS_VTOA_KIND: u8 = 252;
pub const ANOLIS_VTOA_LEN: u8 = 20;
pub const ANOLIS_V6VTOA_KIND: u8 = 249;
pub const ANOLIS_V6VTOA_LEN: u8 = 40;
/// Length of the virtual-address options (Tencent's 202, Alibaba's 250): port + IPv4.
pub const VIP_LEN: u8 = 8;
/// A TCP header has at most 40 bytes of options (data offset 15 × 4 − 20).
pub const OPTION_AREA_MAX: usize = 40;
/// Every offset the parser computes is masked into `0..64`.
const MASK: usize = 63;
/// Size of the buffer the parser reads: the masked range plus room for the 20 bytes of a TOA
/// read at the largest masked offset. The compiler may fold `(off + i) & MASK` into
/// `(off & MASK) + i` where it can prove the two equal; 6.1's verifier cannot, and must still
/// see every read inside the buffer.
pub const OPTION_BUF_LEN: usize = MASK + 1 + 32;

const KIND_EOL: u8 = 0;
const KIND_NOP: u8 = 1;

/// The option area of one segment, plus the parser's cursor.
///
/// `len` and `cursor` are read and written with volatile accesses. In the kernel this memory
/// is a per-CPU map slot, so each read gives the verifier a fresh bounded unknown instead of
/// the exact value it tracked on one path: the states at the head of the parse loop then
/// become equal and are pruned. Kept in registers instead, the same loop made the verifier
/// walk a million instructions and give up. On the host the volatile accesses change nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OptionArea {
    pub bytes: [u8; OPTION_BUF_LEN],
    /// Bytes of `bytes` that are options (at most 40 are read).
    pub len: u32,
    /// Offset of the option being parsed.
    pub cursor: u32,
    /// With `FLAG_PICK_LAST`: 1 once `last` holds a valid option. Kept here, not in a register,
    /// for the same reason as the cursor.
    pub has_last: u32,
    /// 1 once a malformed option was seen (same reason).
    pub malformed: u32,
    pub last: ClientAddr,
    /// Not used by the parser: the eBPF program keeps the current segment's outcome here while it
    /// parses the saved SYN (see `on_established` there).
    pub kept: u32,
}

impl OptionArea {
    pub const fn zeroed() -> Self {
        Self {
            bytes: [0; OPTION_BUF_LEN],
            len: 0,
            cursor: 0,
            has_last: 0,
            malformed: 0,
            last: ClientAddr {
                family: 0,
                port: [0; 2],
                addr: [0; 16],
                vip_port: [0; 2],
                vip_addr: [0; 4],
                flags: 0,
                vpc_id: [0; 4],
                _pad: [0; 1],
            },
            kept: 0,
        }
    }

    /// The client's `CLIENT_*` bits, read and written in memory only: kept in a register
    /// across the parse loop (which the compiler does for a field written before it), each of
    /// their values would be another state of every round for the verifier (6.1's walked
    /// 947,546 instructions instead of 61,410).
    #[inline(always)]
    fn flags(&self) -> u8 {
        // SAFETY: a plain field of `self`.
        unsafe { core::ptr::read_volatile(&self.last.flags) }
    }

    #[inline(always)]
    fn set_flags(&mut self, flags: u8) {
        // SAFETY: a plain field of `self`.
        unsafe { core::ptr::write_volatile(&mut self.last.flags, flags) };
    }

    /// Stores byte `i` (masked into the buffer, which the verifier needs to see).
    #[inline(always)]
    pub fn set(&mut self, i: usize, byte: u8) {
        self.bytes[i & MASK] = byte;
    }

    #[inline(always)]
    pub fn set_len(&mut self, len: usize) {
        // SAFETY: a plain field of `self`.
        unsafe { core::ptr::write_volatile(&mut self.len, len as u32) };
    }

    #[inline(always)]
    fn len(&self) -> usize {
        // SAFETY: a plain field of `self`.
        unsafe { core::ptr::read_volatile(&self.len) as usize }
    }

    #[inline(always)]
    fn cursor(&self) -> usize {
        // SAFETY: a plain field of `self`.
        (unsafe { core::ptr::read_volatile(&self.cursor) } as usize) & MASK
    }

    #[inline(always)]
    fn word(&self, w: Word) -> u32 {
        let field = match w {
            Word::HasLast => &self.has_last,
            Word::Malformed => &self.malformed,
        };
        // SAFETY: a plain field of `self`.
        unsafe { core::ptr::read_volatile(field) }
    }

    #[inline(always)]
    fn set_word(&mut self, w: Word, value: u32) {
        let field = match w {
            Word::HasLast => &mut self.has_last,
            Word::Malformed => &mut self.malformed,
        };
        // SAFETY: a plain field of `self`.
        unsafe { core::ptr::write_volatile(field, value) };
    }

    #[inline(always)]
    fn set_cursor(&mut self, off: usize) {
        // SAFETY: a plain field of `self`.
        unsafe { core::ptr::write_volatile(&mut self.cursor, off as u32) };
    }

    /// Builds an area from a slice (host side: tests, fuzzing); bytes past 40 are dropped.
    pub fn from_slice(options: &[u8]) -> Self {
        let mut area = Self::zeroed();
        let len = if options.len() > OPTION_AREA_MAX { OPTION_AREA_MAX } else { options.len() };
        area.bytes[..len].copy_from_slice(&options[..len]);
        area.set_len(len);
        area
    }
}

const _: () = assert!(core::mem::size_of::<OptionArea>() == OPTION_BUF_LEN + 16 + 32 + 4);

/// The parser's state words kept in `OptionArea`.
#[derive(Clone, Copy)]
enum Word {
    HasLast,
    Malformed,
}

/// What a segment's options say about the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The first (or, with `FLAG_PICK_LAST`, the last) well-formed option.
    Found(ClientAddr),
    /// No option the configuration asks for, and the option list is well formed.
    Absent,
    /// None well formed, and an option of a configured kind with a wrong length (or version),
    /// or a broken option list was seen (length byte missing, length < 2, or an option running
    /// past the option area).
    Malformed,
}

/// Finds the client address in the first `area.len` bytes of `area` (at most 40), reading the
/// layouts `cfg` enables: the classic ones under each enabled kind, ByteDance's, Alibaba CDN's.
///
/// An option of a configured kind with a wrong length is skipped by its length byte and the
/// search goes on; a broken option list ends the search, since nothing after it can be trusted
/// to be an option boundary.
pub fn find_toa(area: &mut OptionArea, cfg: &AgentConfig) -> Parsed {
    match scan_toa::<ALL_LAYOUTS>(area, cfg) {
        Outcome::Found => Parsed::Found(area.last),
        Outcome::Absent => Parsed::Absent,
        Outcome::Malformed => Parsed::Malformed,
    }
}

/// Which layouts a copy of the parser has (a const generic of [`scan_toa`]): each costs the
/// verifier a copy routine (about 3k instructions apiece on 6.18) in every program it is in.
/// ByteDance's UDP layouts:
const UOA_LAYOUTS: u8 = 1;
/// The TCP dialects' layouts in parts (Tencent's and Alibaba's VTOA):
const PART_LAYOUTS: u8 = 2;
/// The TCP program's copy.
pub const TCP_ONLY: u8 = PART_LAYOUTS;
/// The UDP program's copy.
pub const WITH_UOA: u8 = UOA_LAYOUTS;
/// Every layout: `find_toa` (the userspace reader, the tests, the fuzzer).
pub const ALL_LAYOUTS: u8 = UOA_LAYOUTS | PART_LAYOUTS;

/// [`Parsed`] without the address, which [`scan_toa`] leaves in `area.last`. As a number
/// (`as u32`, [`Outcome::from_code`]) it is what a global BPF function can return.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Found = 0,
    Absent = 1,
    Malformed = 2,
}

impl Outcome {
    /// The outcome a number (`outcome as u32`) stands for; anything else reads as `Absent`.
    #[inline(always)]
    pub const fn from_code(code: u32) -> Self {
        match code {
            0 => Outcome::Found,
            2 => Outcome::Malformed,
            _ => Outcome::Absent,
        }
    }
}

/// [`find_toa`] for the eBPF programs: the same search, but the result comes back in a register
/// and the client stays in `area.last` (map memory). A returned [`Parsed`] lives on the stack,
/// where Linux 5.15's verifier keeps no value for its 2-byte tag: after `Absent` or `Malformed` it
/// also walks the `Found` branch and rejects the read of address bytes that were never written
/// ("invalid read from stack"). Kernels from 5.16 track such narrow stores.
///
/// `LAYOUTS`: which layout families this copy reads ([`TCP_ONLY`], [`WITH_UOA`], [`ALL_LAYOUTS`]):
/// the TCP program's copy has no UDP layout and the UDP program's no TCP dialect in parts, each
/// of which would cost the other's verifier for options its configuration never asks for.
#[inline(never)]
pub fn scan_toa<const LAYOUTS: u8>(area: &mut OptionArea, cfg: &AgentConfig) -> Outcome {
    area.set_cursor(0);
    area.set_word(Word::HasLast, 0);
    area.set_word(Word::Malformed, 0);
    // The parts an option may add to the client start absent (the area is reused; a part's
    // bytes mean nothing without its flag).
    area.set_flags(0);
    // Every option is at least one byte long, so 40 rounds reach the end of any area. Nothing
    // lives in registers from one round to the next: see `OptionArea`.
    for _ in 0..OPTION_AREA_MAX {
        let len = area.len();
        let len = if len > OPTION_AREA_MAX { OPTION_AREA_MAX } else { len };
        let off = area.cursor();
        if off >= len {
            break;
        }
        let kind = area.bytes[off & MASK];
        if kind == KIND_EOL {
            break;
        }
        if kind == KIND_NOP {
            area.set_cursor(off + 1);
            continue;
        }
        if off + 1 >= len {
            area.set_word(Word::Malformed, 1);
            break;
        }
        let opt_len = area.bytes[(off + 1) & MASK] as usize;
        if opt_len < 2 || off + opt_len > len {
            area.set_word(Word::Malformed, 1);
            break;
        }
        match read_option::<LAYOUTS>(area, off, kind, opt_len, cfg) {
            Read::Found => {
                area.set_word(Word::HasLast, 1);
                // SAFETY: a plain field of the config; volatile so that it is not hoisted out of
                // the loop into a register that would split the verifier's states.
                let flags = unsafe { core::ptr::read_volatile(&cfg.flags) };
                // Dialects in parts read on: a part may follow its client.
                if flags & (FLAG_PICK_LAST | FLAG_PARTS) == 0 {
                    // One way out of the loop for every outcome: the compiler then has no reason
                    // to duplicate the loop, which would double the verifier's walk.
                    break;
                }
            }
            Read::Malformed => area.set_word(Word::Malformed, 1),
            Read::NotOurs => {}
        }
        area.set_cursor(off + opt_len);
    }
    if area.word(Word::HasLast) != 0 {
        Outcome::Found
    } else if area.word(Word::Malformed) != 0 {
        Outcome::Malformed
    } else {
        Outcome::Absent
    }
}

/// What one option is to the parser.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// A kind the configuration does not ask for.
    NotOurs,
    /// A layout the configuration asks for: the client is in `area.last`.
    Found,
    /// A kind it asks for, but not in any layout read under that kind.
    Malformed,
}

/// The layouts [`toa_classify_option`] tells apart.
const LAYOUT_NONE: u32 = 0;
const LAYOUT_MALFORMED: u32 = 1;
const LAYOUT_CLASSIC_V4: u32 = 2;
const LAYOUT_CLASSIC_V6: u32 = 3;
const LAYOUT_BYTEDANCE: u32 = 4;
const LAYOUT_ALIBABA_V4: u32 = 5;
const LAYOUT_ALIBABA_V6: u32 = 6;
const LAYOUT_UOA_BYTEDANCE_V4: u32 = 7;
const LAYOUT_UOA_BYTEDANCE_V6: u32 = 8;
const LAYOUT_UOA_BYTEDANCE_V2_V4: u32 = 9;
const LAYOUT_UOA_BYTEDANCE_V2_V6: u32 = 10;
const LAYOUT_VIP: u32 = 11;
const LAYOUT_TENCENT_VPC: u32 = 12;
const LAYOUT_ANOLIS_VTOA: u32 = 13;
const LAYOUT_ANOLIS_V6VTOA: u32 = 14;

/// Which layout an option of `kind` and `len` is under a configuration whose `FLAG_*` bits are
/// `flags` and whose kind bitmap byte for `kind` is `kinds_byte` (`cfg.kinds[kind / 8]`).
///
/// Out of line on purpose: eBPF has no "set on condition" instruction, so every comparison that
/// yields a bool is a branch, and the booleans combined here would multiply the paths the
/// verifier walks through the rest of the parse loop. As a separate function only its result,
/// one of eleven values, reaches the caller. In the kernel it is a global function, which the
/// verifier checks once on its own instead of at each of the parse loop's rounds; global
/// functions may take only numbers (pointers need Linux 5.12), hence the byte of the bitmap.
#[cfg_attr(target_arch = "bpf", unsafe(no_mangle))]
#[inline(never)]
pub extern "C" fn toa_classify_option(kind: u8, len: u8, version: u8, kinds_byte: u8, flags: u32) -> u32 {
    let enabled = kinds_byte & (1 << (kind & 7)) != 0;
    let has = |flag: u32| flags & flag != 0;
    // UDP only: the operation byte (`version` here) says which family is inside. DPVS's lengths
    // under type 31 (8, 20) are not ByteDance's, so both are read side by side.
    if has(FLAG_UOA_BYTEDANCE) {
        if kind == UOA_BYTEDANCE_KIND || kind == UOA_BYTEDANCE_ASYM_KIND {
            if len == UOA_BYTEDANCE_LEN_V4 && version == 0 {
                return LAYOUT_UOA_BYTEDANCE_V4;
            }
            if len == UOA_BYTEDANCE_LEN_V6 && version == 1 {
                return LAYOUT_UOA_BYTEDANCE_V6;
            }
        }
        if kind == UOA_BYTEDANCE_V2_KIND {
            if len == UOA_BYTEDANCE_LEN_V4 && version == 0 {
                return LAYOUT_UOA_BYTEDANCE_V2_V4;
            }
            if len == UOA_BYTEDANCE_V2_LEN_V6 && version == 1 {
                return LAYOUT_UOA_BYTEDANCE_V2_V6;
            }
        }
        if kind == UOA_BYTEDANCE_ASYM_KIND || kind == UOA_BYTEDANCE_V2_KIND {
            return LAYOUT_MALFORMED;
        }
    }
    // The VTOA dialects' own kinds, before the classic layouts (a kind of theirs also listed
    // with --kind is theirs). Not in UDP's configuration, which has no TCP dialect.
    if has(FLAG_DIALECT_TENCENT_VTOA) {
        if kind == TENCENT_VPC_KIND {
            return if len == TENCENT_VPC_LEN { LAYOUT_TENCENT_VPC } else { LAYOUT_MALFORMED };
        }
        if kind == TENCENT_VIP_KIND {
            return if len == VIP_LEN { LAYOUT_VIP } else { LAYOUT_MALFORMED };
        }
    }
    if has(FLAG_DIALECT_ANOLIS_VTOA) {
        if kind == ANOLIS_VIP_KIND {
            return if len == VIP_LEN { LAYOUT_VIP } else { LAYOUT_MALFORMED };
        }
        if kind == ANOLIS_VTOA_KIND {
            return if len == ANOLIS_VTOA_LEN { LAYOUT_ANOLIS_VTOA } else { LAYOUT_MALFORMED };
        }
        if kind == ANOLIS_V6VTOA_KIND {
            return if len == ANOLIS_V6VTOA_LEN { LAYOUT_ANOLIS_V6VTOA } else { LAYOUT_MALFORMED };
        }
    }
    if enabled {
        if len == TOA_LEN_V4 {
            return LAYOUT_CLASSIC_V4;
        }
        if len == TOA_LEN_V6 {
            return LAYOUT_CLASSIC_V6;
        }
    }
    if kind == TOA_KIND && has(FLAG_DIALECT_BYTEDANCE) && len == BYTEDANCE_LEN {
        return LAYOUT_BYTEDANCE;
    }
    if kind == ALIBABA_CDN_KIND && has(FLAG_DIALECT_ALIBABA_CDN) {
        if version == ALIBABA_CDN_VERSION && len == ALIBABA_CDN_LEN_V4 {
            return LAYOUT_ALIBABA_V4;
        }
        if version == ALIBABA_CDN_VERSION && len == ALIBABA_CDN_LEN_V6 {
            return LAYOUT_ALIBABA_V6;
        }
        return LAYOUT_MALFORMED;
    }
    if enabled || (kind == TOA_KIND && has(FLAG_DIALECT_BYTEDANCE)) {
        return LAYOUT_MALFORMED;
    }
    LAYOUT_NONE
}

/// Reads the option at `off`. The client goes straight into `area.last` (map memory in the
/// kernel) rather than through registers and stack, which would differ from path to path and
/// keep the verifier from merging the loop's states.
#[inline(always)]
fn read_option<const LAYOUTS: u8>(area: &mut OptionArea, off: usize, kind: u8, len: usize, cfg: &AgentConfig) -> Read {
    let (uoa, parts) = (LAYOUTS & UOA_LAYOUTS != 0, LAYOUTS & PART_LAYOUTS != 0);
    let version = area.bytes[(off + 2) & MASK];
    let kinds_byte = cfg.kinds[(kind as usize >> 3) & 31];
    // SAFETY: a plain field of the config; volatile for the reason given in `scan_toa`.
    let flags = unsafe { core::ptr::read_volatile(&cfg.flags) };
    // With a dialect in parts a client keeps the parts already read; otherwise it comes alone.
    // A mask taken from the configuration, not a comparison: the compiler makes a branch of any
    // boolean, and a branch here was one more path through every store for the verifier (6.1's
    // walked 20 times the instructions).
    let keep = ((flags & FLAG_PARTS) >> 16) as u8;
    match toa_classify_option(kind, len as u8, version, kinds_byte, flags) {
        LAYOUT_CLASSIC_V4 => store(area, off, AF_INET, Some(2), 4, None, keep),
        LAYOUT_CLASSIC_V6 => store(area, off, AF_INET6, Some(2), 4, None, keep),
        LAYOUT_BYTEDANCE => store(area, off, AF_INET, Some(2), 4, Some((10, 12)), keep),
        // No port in this layout: the kernel's stays.
        LAYOUT_ALIBABA_V4 => store(area, off, AF_INET, None, 3, None, keep),
        LAYOUT_ALIBABA_V6 => store(area, off, AF_INET6, None, 3, None, keep),
        LAYOUT_UOA_BYTEDANCE_V4 if uoa => store(area, off, AF_INET, Some(4), 8, Some((6, 12)), keep),
        // The virtual address is IPv6 here: more than a `ClientAddr` keeps.
        LAYOUT_UOA_BYTEDANCE_V6 if uoa => store(area, off, AF_INET6, Some(4), 8, None, keep),
        LAYOUT_UOA_BYTEDANCE_V2_V4 if uoa => store(area, off, AF_INET, Some(8), 12, None, keep),
        LAYOUT_UOA_BYTEDANCE_V2_V6 if uoa => store(area, off, AF_INET6, Some(8), 12, None, keep),
        // The parts: kept with whichever client the area has (or gets).
        LAYOUT_VIP if parts => {
            store_vip(area, off, 2, 4);
            return Read::NotOurs;
        }
        LAYOUT_TENCENT_VPC if parts => {
            let b = |i: usize| area.bytes[(off + i) & MASK];
            area.last.vpc_id = [b(2), b(3), b(4), b(5)];
            area.set_flags(area.flags() | CLIENT_HAS_VPC);
            return Read::NotOurs;
        }
        LAYOUT_ANOLIS_VTOA if parts => {
            store(area, off, AF_INET, Some(2), 4, Some((16, 12)), keep);
            let b = |i: usize| area.bytes[(off + i) & MASK];
            area.last.vpc_id = [b(8), b(9), b(10), b(11)];
            area.set_flags(area.flags() | CLIENT_HAS_VPC);
        }
        LAYOUT_ANOLIS_V6VTOA if parts => {
            store(area, off, AF_INET6, Some(2), 4, None, keep);
            // A 24-bit VPC id: as a big-endian number in four bytes.
            let b = |i: usize| area.bytes[(off + i) & MASK];
            area.last.vpc_id = [0, b(20), b(21), b(22)];
            area.set_flags(area.flags() | CLIENT_HAS_VPC);
        }
        LAYOUT_MALFORMED => return Read::Malformed,
        _ => return Read::NotOurs,
    }
    Read::Found
}

/// Writes a virtual port and IPv4 address (at these offsets of the option at `off`).
#[inline(always)]
fn store_vip(area: &mut OptionArea, off: usize, port: usize, addr: usize) {
    let at = |area: &OptionArea, i: usize| area.bytes[(off + i) & MASK];
    area.last.vip_port = [at(area, port), at(area, port + 1)];
    area.last.vip_addr = [at(area, addr), at(area, addr + 1), at(area, addr + 2), at(area, addr + 3)];
    area.set_flags(area.flags() | CLIENT_HAS_VIP);
}

const _: () = assert!(FLAG_PARTS >> 16 == (CLIENT_HAS_VIP | CLIENT_HAS_VPC) as u32);

/// Writes the client of the option at `off` into `area.last`, field by field (a temporary
/// struct's stack slots would differ from path to path): the port at `port_at`, the address at
/// `addr_at`, and with `vip` the virtual port and IPv4 address at these offsets. The flags of
/// the parts already read survive as `keep` says (`FLAG_PARTS`); the bytes of a part whose
/// flag is gone mean nothing (the scan zeroes them when it starts).
#[inline(always)]
fn store(
    area: &mut OptionArea,
    off: usize,
    family: u16,
    port_at: Option<usize>,
    addr_at: usize,
    vip: Option<(usize, usize)>,
    keep: u8,
) {
    let at = |area: &OptionArea, i: usize| area.bytes[(off + i) & MASK];
    area.last.family = family;
    area.last.port = [0, 0];
    area.set_flags(area.flags() & keep);
    if let Some(p) = port_at {
        area.last.port = [at(area, p), at(area, p + 1)];
        area.set_flags(area.flags() | CLIENT_HAS_PORT);
    }
    if let Some((port, addr)) = vip {
        store_vip(area, off, port, addr);
    }
    let mut i = 0;
    while i < 16 {
        area.last.addr[i] = if i < 4 || family == AF_INET6 { at(area, addr_at + i) } else { 0 };
        i += 1;
    }
}

/// Writes a classic TOA (`kind, len, port, address`) for `client` into `out`; returns its
/// length (8 or 20). Used by the test writer (`toa probe`) and the tests.
pub fn encode_toa(client: &ClientAddr, out: &mut [u8; TOA_LEN_V6 as usize]) -> usize {
    let (len, addr_len) = if client.family == AF_INET { (TOA_LEN_V4, 4) } else { (TOA_LEN_V6, 16) };
    out[0] = TOA_KIND;
    out[1] = len;
    out[2..4].copy_from_slice(&client.port);
    out[4..4 + addr_len].copy_from_slice(&client.addr[..addr_len]);
    len as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FLAG_DIALECT_ANOLIS_VTOA, FLAG_DIALECT_TENCENT_VTOA};

    const PORT: [u8; 2] = [0x10, 0x92]; // 4242
    const V4: [u8; 4] = [203, 0, 113, 7];
    const V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

    fn toa4(port: [u8; 2], ip: [u8; 4]) -> [u8; 8] {
        [TOA_KIND, 8, port[0], port[1], ip[0], ip[1], ip[2], ip[3]]
    }

    fn toa6() -> [u8; 20] {
        let mut o = [0u8; 20];
        o[0] = TOA_KIND;
        o[1] = 20;
        o[2..4].copy_from_slice(&PORT);
        o[4..].copy_from_slice(&V6);
        o
    }

    fn client(family: u16, port: [u8; 2], ip: &[u8]) -> ClientAddr {
        let mut addr = [0; 16];
        addr[..ip.len()].copy_from_slice(ip);
        ClientAddr { family, port, addr, flags: CLIENT_HAS_PORT, ..ClientAddr::default() }
    }

    fn v4(port: [u8; 2], ip: [u8; 4]) -> Parsed {
        Parsed::Found(client(AF_INET, port, &ip))
    }

    fn parse(options: &[u8]) -> Parsed {
        parse_with(options, &AgentConfig::classic())
    }

    fn parse_with(options: &[u8], cfg: &AgentConfig) -> Parsed {
        find_toa(&mut OptionArea::from_slice(options), cfg)
    }

    fn cat(parts: &[&[u8]]) -> [u8; 64] {
        let mut out = [0u8; 64];
        let mut n = 0;
        for p in parts {
            out[n..n + p.len()].copy_from_slice(p);
            n += p.len();
        }
        out
    }

    #[test]
    fn ipv4_alone() {
        assert_eq!(parse(&toa4(PORT, V4)), v4(PORT, V4));
    }

    #[test]
    fn ipv6_alone() {
        assert_eq!(parse(&toa6()), Parsed::Found(client(AF_INET6, PORT, &V6)));
    }

    #[test]
    fn after_timestamps_and_nops() {
        // What Linux puts on a handshake ACK: NOP NOP TS(10), then the balancer's TOA.
        let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let o = cat(&[&ts, &toa4(PORT, V4)]);
        assert_eq!(parse(&o[..20]), v4(PORT, V4));
    }

    #[test]
    fn nop_padding_everywhere() {
        let o = cat(&[&[1, 1, 1], &toa4(PORT, V4), &[1]]);
        assert_eq!(parse(&o[..12]), v4(PORT, V4));
    }

    #[test]
    fn port_63881_is_not_fast_open() {
        // 0xF989 is the Fast Open experimental magic; for TOA it is just a port.
        let port = 63881u16.to_be_bytes();
        assert_eq!(parse(&toa4(port, V4)), v4(port, V4));
    }

    #[test]
    fn no_options_and_no_toa() {
        assert_eq!(parse(&[]), Parsed::Absent);
        assert_eq!(parse(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]), Parsed::Absent);
    }

    #[test]
    fn length_below_two() {
        assert_eq!(parse(&[TOA_KIND, 1, 0, 0, 0, 0, 0, 0]), Parsed::Malformed);
        assert_eq!(parse(&[TOA_KIND, 0, 0, 0, 0, 0, 0, 0]), Parsed::Malformed);
        // A zero length must not loop forever on the same byte.
        assert_eq!(parse(&[30, 0, 30, 0]), Parsed::Malformed);
    }

    #[test]
    fn length_runs_past_the_area() {
        let o = toa4(PORT, V4);
        assert_eq!(parse(&o[..7]), Parsed::Malformed);
        assert_eq!(parse(&[1, 1, TOA_KIND, 20, 0, 0]), Parsed::Malformed);
    }

    #[test]
    fn length_byte_missing() {
        assert_eq!(parse(&[1, 1, 1, TOA_KIND]), Parsed::Malformed);
    }

    #[test]
    fn wrong_length_for_the_kind() {
        for len in [2u8, 6, 7, 9, 10, 16, 19, 21] {
            let mut o = [0u8; 24];
            o[0] = TOA_KIND;
            o[1] = len;
            assert_eq!(parse(&o[..len as usize]), Parsed::Malformed, "len {len}");
        }
    }

    #[test]
    fn wrong_length_then_valid_one_wins() {
        let o = cat(&[&[TOA_KIND, 6, 0, 0, 0, 0], &toa4(PORT, V4)]);
        assert_eq!(parse(&o[..14]), v4(PORT, V4));
    }

    #[test]
    fn option_after_eol_is_ignored() {
        let o = cat(&[&[0], &toa4(PORT, V4)]);
        assert_eq!(parse(&o[..9]), Parsed::Absent);
    }

    #[test]
    fn full_forty_byte_area_with_toa_last() {
        // 32 bytes of other options, then the TOA in the last 8 bytes of 40.
        let o = cat(&[&[1; 2], &[30, 30], &[0xAA; 28], &toa4(PORT, V4)]);
        assert_eq!(parse(&o[..40]), v4(PORT, V4));
    }

    #[test]
    fn bytes_past_forty_are_never_read() {
        let o = cat(&[&[1; 36], &toa4(PORT, V4)]);
        // The TOA straddles byte 40: only its first 4 bytes are inside the area.
        let mut area = OptionArea::from_slice(&o[..44]);
        area.bytes[40..44].copy_from_slice(&V4); // stale bytes beyond the area
        area.len = 44; // a length beyond 40 is clamped
        assert_eq!(find_toa(&mut area, &AgentConfig::classic()), Parsed::Malformed);
    }

    #[test]
    fn several_toas_first_valid_wins() {
        let second = [198, 51, 100, 1];
        let o = cat(&[&toa4(PORT, V4), &toa4([0, 80], second)]);
        assert_eq!(parse(&o[..16]), v4(PORT, V4));
    }

    #[test]
    fn other_kinds_are_not_toa() {
        let o = [253, 8, PORT[0], PORT[1], V4[0], V4[1], V4[2], V4[3]];
        assert_eq!(parse(&o), Parsed::Absent);
    }

    #[test]
    fn encode_round_trips() {
        for c in [client(AF_INET, PORT, &V4), client(AF_INET6, PORT, &V6)] {
            let mut out = [0u8; 20];
            let n = encode_toa(&c, &mut out);
            assert_eq!(parse(&out[..n]), Parsed::Found(c));
        }
    }

    /// Tencent's VTOA: client, VPC id and virtual address in any order, each kept; malformed
    /// parts are counted and the client kept.
    #[test]
    fn tencent_vtoa() {
        let cfg = with(FLAG_DIALECT_TENCENT_VTOA | FLAG_PARTS, &[254, 200]);
        let client = [200, 8, 0x10, 0x92, 203, 0, 113, 7];
        let vpc = [1, 1, 201, 6, 0, 1, 0xe2, 0x40];
        let vip = [202, 8, 0, 80, 198, 18, 0, 1];
        for area in [[client, vpc, vip].concat(), [vip, vpc, client].concat(), [vpc, client, vip].concat()] {
            let Parsed::Found(c) = parse_with(&area, &cfg) else { panic!("{area:?}") };
            assert_eq!((c.family, c.port, &c.addr[..4]), (AF_INET, PORT, &V4[..]), "{area:?}");
            assert_eq!((c.vpc_id, c.vip_port, c.vip_addr), ([0, 1, 0xe2, 0x40], [0, 80], [198, 18, 0, 1]));
            assert_eq!(c.flags, CLIENT_HAS_PORT | CLIENT_HAS_VIP | CLIENT_HAS_VPC);
        }
        // The client alone; parts alone are no client.
        assert_eq!(parse_with(&client, &cfg), v4(PORT, V4));
        assert_eq!(parse_with(&[vpc, vip].concat(), &cfg), Parsed::Absent);
        // Without the dialect 201 and 202 are other options.
        let plain = with(0, &[254, 200]);
        assert_eq!(parse_with(&[client, vpc, vip].concat(), &plain), v4(PORT, V4));
        // Wrong lengths: malformed parts, the client still found (without them).
        let bad = [client.as_slice(), &[201, 5, 0, 1, 0], &[202, 6, 0, 80, 198, 18], &[1]].concat();
        assert_eq!(parse_with(&bad, &cfg), v4(PORT, V4));
        assert_eq!(parse_with(&[201, 5, 0, 1, 0, 1, 1, 1], &cfg), Parsed::Malformed);
    }

    /// Alibaba's VTOA: 254/8 then 250/8; 252/20; 249/40 with its 24-bit VPC id; 253/20.
    #[test]
    fn anolis_vtoa() {
        let cfg = with(FLAG_DIALECT_ANOLIS_VTOA | FLAG_PARTS, &[254, 253]);
        let pair = [254, 8, 0x10, 0x92, 203, 0, 113, 7, 250, 8, 0, 80, 198, 18, 0, 1];
        let Parsed::Found(c) = parse_with(&pair, &cfg) else { panic!() };
        assert_eq!((c.port, &c.addr[..4], c.vip_port, c.vip_addr), (PORT, &V4[..], [0, 80], [198, 18, 0, 1]));
        assert_eq!(c.flags, CLIENT_HAS_PORT | CLIENT_HAS_VIP);
        let vtoa = [252, 20, 0x10, 0x92, 203, 0, 113, 7, 0, 0, 0x30, 0x39, 198, 18, 0, 1, 0, 80, 0, 0];
        let Parsed::Found(c) = parse_with(&vtoa, &cfg) else { panic!() };
        assert_eq!((c.family, c.port, &c.addr[..4]), (AF_INET, PORT, &V4[..]));
        assert_eq!((c.vpc_id, c.vip_port, c.vip_addr), ([0, 0, 0x30, 0x39], [0, 80], [198, 18, 0, 1]));
        assert_eq!(c.flags, CLIENT_HAS_PORT | CLIENT_HAS_VIP | CLIENT_HAS_VPC);
        let mut v6 = [0u8; 40];
        v6[..4].copy_from_slice(&[249, 40, 0x10, 0x92]);
        v6[4..20].copy_from_slice(&V6);
        v6[20..24].copy_from_slice(&[0x12, 0x34, 0x56, 0xff]);
        v6[24..].copy_from_slice(&V6);
        let Parsed::Found(c) = parse_with(&v6, &cfg) else { panic!() };
        assert_eq!((c.family, c.port, c.addr), (AF_INET6, PORT, V6));
        assert_eq!((c.vpc_id, c.flags), ([0, 0x12, 0x34, 0x56], CLIENT_HAS_PORT | CLIENT_HAS_VPC));
        let mut toa6 = toa6();
        toa6[0] = 253;
        assert_eq!(parse_with(&toa6, &cfg), Parsed::Found(client(AF_INET6, PORT, &V6)));
        // Wrong lengths of its own kinds are malformed.
        let mut short = vtoa;
        short[1] = 16;
        assert_eq!(parse_with(&short[..16], &cfg), Parsed::Malformed);
        assert_eq!(parse_with(&[250, 6, 0, 80, 198, 18], &cfg), Parsed::Malformed);
        let mut v6_short = v6;
        v6_short[1] = 36;
        assert_eq!(parse_with(&v6_short[..36], &cfg), Parsed::Malformed);
    }

    /// Huawei's anti-DDoS balancers stack up to three 254/8 options, the client's last: `--pick
    /// last` reads it.
    #[test]
    fn stacked_options_huawei_anti_ddos() {
        let hops = [toa4([0, 1], [198, 18, 0, 10]), toa4([0, 2], [198, 18, 0, 11]), toa4(PORT, V4)].concat();
        assert_eq!(parse_with(&hops, &with(FLAG_PICK_LAST, &[])), v4(PORT, V4));
        assert_eq!(parse(&hops), v4([0, 1], [198, 18, 0, 10]), "the first without --pick last");
    }

    fn with(flags: u32, kinds: &[u8]) -> AgentConfig {
        let mut cfg = AgentConfig::classic();
        cfg.flags = flags;
        for k in kinds {
            cfg.enable_kind(*k);
        }
        cfg
    }

    #[test]
    fn other_kinds_when_enabled() {
        let o200 = [200, 8, PORT[0], PORT[1], V4[0], V4[1], V4[2], V4[3]];
        assert_eq!(parse(&o200), Parsed::Absent);
        assert_eq!(parse_with(&o200, &with(0, &[200])), v4(PORT, V4));
        let mut o253 = toa6();
        o253[0] = 253;
        assert_eq!(parse_with(&o253, &with(0, &[253])), Parsed::Found(client(AF_INET6, PORT, &V6)));
        // An enabled kind with a wrong length is malformed; a disabled one is someone else's.
        assert_eq!(parse_with(&[200, 6, 0, 0, 0, 0], &with(0, &[200])), Parsed::Malformed);
        assert_eq!(parse(&[200, 6, 0, 0, 0, 0]), Parsed::Absent);
    }

    #[test]
    fn pick_last() {
        let second = [198, 51, 100, 1];
        let o = cat(&[&toa4(PORT, V4), &[1, 1], &toa4([0, 80], second)]);
        assert_eq!(parse(&o[..18]), v4(PORT, V4));
        assert_eq!(parse_with(&o[..18], &with(FLAG_PICK_LAST, &[])), v4([0, 80], second));
        // The last valid one, even when a malformed one follows it.
        let o = cat(&[&toa4(PORT, V4), &[254, 6, 0, 0, 0, 0]]);
        assert_eq!(parse_with(&o[..14], &with(FLAG_PICK_LAST, &[])), v4(PORT, V4));
        assert_eq!(parse_with(&[254, 6, 0, 0, 0, 0], &with(FLAG_PICK_LAST, &[])), Parsed::Malformed);
    }

    #[test]
    fn bytedance() {
        let o = [254, 16, 0x10, 0x92, 203, 0, 113, 7, 0, 0, 0x01, 0xbb, 192, 0, 2, 10];
        assert_eq!(parse(&o), Parsed::Malformed, "length 16 is no classic TOA");
        let Parsed::Found(c) = parse_with(&o, &with(FLAG_DIALECT_BYTEDANCE, &[])) else { panic!() };
        assert_eq!((c.family, c.port, &c.addr[..4]), (AF_INET, PORT, &V4[..]));
        assert_eq!((c.vip_port, c.vip_addr), ([0x01, 0xbb], [192, 0, 2, 10]));
        assert_eq!(c.flags, CLIENT_HAS_PORT | CLIENT_HAS_VIP);
        // Classic layouts under 254 still read with the dialect on.
        assert_eq!(parse_with(&toa4(PORT, V4), &with(FLAG_DIALECT_BYTEDANCE, &[])), v4(PORT, V4));
        assert_eq!(parse_with(&o[..12], &with(FLAG_DIALECT_BYTEDANCE, &[])), Parsed::Malformed);
    }

    #[test]
    fn alibaba_cdn() {
        let cfg = with(FLAG_DIALECT_ALIBABA_CDN, &[]);
        let o = [28, 7, 1, 203, 0, 113, 7];
        assert_eq!(parse(&o), Parsed::Absent, "kind 28 is not read unless asked");
        let Parsed::Found(c) = parse_with(&o, &cfg) else { panic!() };
        assert_eq!((c.family, &c.addr[..4], c.flags), (AF_INET, &V4[..], 0), "no port");
        let mut o6 = [0u8; 19];
        o6[..3].copy_from_slice(&[28, 19, 1]);
        o6[3..].copy_from_slice(&V6);
        let Parsed::Found(c) = parse_with(&o6, &cfg) else { panic!() };
        assert_eq!((c.family, c.addr), (AF_INET6, V6));
        assert_eq!(parse_with(&[28, 7, 2, 203, 0, 113, 7], &cfg), Parsed::Malformed, "unknown version");
        assert_eq!(parse_with(&[28, 8, 1, 203, 0, 113, 7, 0], &cfg), Parsed::Malformed);
    }

    #[test]
    fn every_short_input_terminates_and_stays_in_bounds() {
        // Exhaustive over all 2-byte prefixes followed by a valid TOA: the parser must answer
        // (no panic, no endless loop) and never invent an address it did not read.
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let o = cat(&[&[a, b], &toa4(PORT, V4)]);
                // The prefix itself is a TOA when it reads (254, 8).
                let expected =
                    if a == TOA_KIND && b == 8 { v4([o[2], o[3]], [o[4], o[5], o[6], o[7]]) } else { v4(PORT, V4) };
                match parse(&o[..10]) {
                    Parsed::Found(c) => assert_eq!(Parsed::Found(c), expected, "{a} {b}"),
                    Parsed::Absent | Parsed::Malformed => {}
                }
            }
        }
    }
}
