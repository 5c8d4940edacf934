//! The TCP option parser: a pure function over the option area of one TCP header.
//!
//! The eBPF program copies the option area into a 64-byte buffer (a per-CPU map slot) and calls
//! [`find_toa`] on it; the host tests and the fuzzer call the same function. Every index is
//! masked with `OPTION_BUF_LEN - 1`, which costs nothing on the host and lets every kernel's
//! verifier see that each read stays inside the buffer.

use crate::{ClientAddr, AF_INET, AF_INET6};

/// The option kind of the classic TOA (Huawei ELB, DPVS, LVS FULLNAT, UCloud).
pub const TOA_KIND: u8 = 254;
/// Length of a TOA carrying `port + IPv4`.
pub const TOA_LEN_V4: u8 = 8;
/// Length of a TOA carrying `port + IPv6`.
pub const TOA_LEN_V6: u8 = 20;
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
}

impl OptionArea {
    pub const fn zeroed() -> Self {
        Self { bytes: [0; OPTION_BUF_LEN], len: 0, cursor: 0 }
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

const _: () = assert!(core::mem::size_of::<OptionArea>() == OPTION_BUF_LEN + 8);

/// What a segment's options say about the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The first well-formed TOA.
    Found(ClientAddr),
    /// No TOA, and the option list is well formed.
    Absent,
    /// No well-formed TOA, and a TOA of the wrong length or a broken option list was seen
    /// (length byte missing, length < 2, or an option running past the option area).
    Malformed,
}

/// Finds the first well-formed TOA in the first `area.len` bytes of `area` (at most 40).
///
/// A TOA of a wrong length is skipped by its length byte and the search goes on; a broken option
/// list ends the search, since nothing after it can be trusted to be an option boundary.
#[inline(never)]
pub fn find_toa(area: &mut OptionArea) -> Parsed {
    let mut malformed = false;
    area.set_cursor(0);
    // Every option is at least one byte long, so 40 rounds reach the end of any area.
    for _ in 0..OPTION_AREA_MAX {
        // Both re-read each round: what one round learns about them must not split the next.
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
            malformed = true;
            break;
        }
        let opt_len = area.bytes[(off + 1) & MASK] as usize;
        if opt_len < 2 || off + opt_len > len {
            malformed = true;
            break;
        }
        if kind == TOA_KIND {
            if opt_len == TOA_LEN_V4 as usize {
                return Parsed::Found(read_client(&area.bytes, off, AF_INET));
            }
            if opt_len == TOA_LEN_V6 as usize {
                return Parsed::Found(read_client(&area.bytes, off, AF_INET6));
            }
            malformed = true;
        }
        area.set_cursor(off + opt_len);
    }
    if malformed {
        Parsed::Malformed
    } else {
        Parsed::Absent
    }
}

/// Reads `port(2) + address(4 or 16)` following the kind and length bytes at `off`.
#[inline(always)]
fn read_client(area: &[u8; OPTION_BUF_LEN], off: usize, family: u16) -> ClientAddr {
    let at = |i: usize| area[(off + i) & MASK];
    let mut client = ClientAddr { family, port: [at(2), at(3)], addr: [0; 16] };
    // Straight-line copies with constant indexes: cheap for the verifier.
    if family == AF_INET {
        client.addr[..4].copy_from_slice(&[at(4), at(5), at(6), at(7)]);
    } else {
        client.addr = [
            at(4), at(5), at(6), at(7), at(8), at(9), at(10), at(11),
            at(12), at(13), at(14), at(15), at(16), at(17), at(18), at(19),
        ];
    }
    client
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

    fn v4(port: [u8; 2], ip: [u8; 4]) -> Parsed {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&ip);
        Parsed::Found(ClientAddr { family: AF_INET, port, addr })
    }

    fn parse(options: &[u8]) -> Parsed {
        find_toa(&mut OptionArea::from_slice(options))
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
        assert_eq!(parse(&toa6()), Parsed::Found(ClientAddr { family: AF_INET6, port: PORT, addr: V6 }));
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
        assert_eq!(find_toa(&mut area), Parsed::Malformed);
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
        for client in [
            ClientAddr { family: AF_INET, port: PORT, addr: [203, 0, 113, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] },
            ClientAddr { family: AF_INET6, port: PORT, addr: V6 },
        ] {
            let mut out = [0u8; 20];
            let n = encode_toa(&client, &mut out);
            assert_eq!(parse(&out[..n]), Parsed::Found(client));
        }
    }

    #[test]
    fn every_short_input_terminates_and_stays_in_bounds() {
        // Exhaustive over all 2-byte prefixes followed by a valid TOA: the parser must answer
        // (no panic, no endless loop) and never invent an address it did not read.
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let o = cat(&[&[a, b], &toa4(PORT, V4)]);
                // The prefix itself is a TOA when it reads (254, 8).
                let expected = if a == TOA_KIND && b == 8 {
                    v4([o[2], o[3]], [o[4], o[5], o[6], o[7]])
                } else {
                    v4(PORT, V4)
                };
                match parse(&o[..10]) {
                    Parsed::Found(c) => assert_eq!(Parsed::Found(c), expected, "{a} {b}"),
                    Parsed::Absent | Parsed::Malformed => {}
                }
            }
        }
    }
}
