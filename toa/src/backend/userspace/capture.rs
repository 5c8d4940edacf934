//! The capture socket of the userspace mode: AF_PACKET, cooked (network header first), with a
//! classic BPF filter so that the kernel copies to userspace only the segments that can carry a
//! TOA: incoming TCP whose option area can hold one, minus the usual timestamp-only area, plus
//! the SYNs (they tell which connections are in scope). Nothing here needs more than Linux 2.6.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Bytes of each accepted packet copied to userspace: IPv6 + a TCP header with 40 bytes of
/// options is 100; the rest of a segment is not needed.
pub const SNAP_LEN: u32 = 128;

/// A classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MSH: u16 = 0xa0;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const JGE: u16 = 0x30;
const JSET: u16 = 0x40;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const K: u16 = 0x00;
/// Ancillary loads: `skb->protocol` and `skb->pkt_type`.
const SKF_AD_PROTOCOL: u32 = 0xfffff000;
const SKF_AD_PKTTYPE: u32 = 0xfffff004;
const PACKET_HOST: u32 = 0;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const ETH_P_ALL: u16 = 0x0003;
const TCP_SYN: u32 = 0x02;
const TCP_ACK: u32 = 0x10;
/// NOP, NOP, timestamp (kind 8, length 10): the option area of most segments.
const NOP_NOP_TIMESTAMP: u32 = 0x0101_080a;

/// Jump targets of the filter being assembled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Label {
    Next,
    Accept,
    Drop,
    V6,
    Tcp,
    PortsOk,
    Range(usize),
}

/// An instruction whose targets are labels until `assemble`.
struct Op {
    code: u16,
    k: u32,
    jt: Label,
    jf: Label,
    at: Option<Label>,
}

fn op(code: u16, k: u32) -> Op {
    Op { code, k, jt: Label::Next, jf: Label::Next, at: None }
}

fn jump(code: u16, k: u32, jt: Label, jf: Label) -> Op {
    Op { code, k, jt, jf, at: None }
}

/// The filter for local port `ranges` (empty: every port).
pub fn filter(ranges: &[[u16; 2]]) -> Vec<Insn> {
    use Label::*;
    let mut p = vec![
        op(LD | W | ABS, SKF_AD_PKTTYPE),
        jump(JMP | JEQ | K, PACKET_HOST, Next, Drop),
        op(LD | W | ABS, SKF_AD_PROTOCOL),
        jump(JMP | JEQ | K, ETH_P_IPV6, V6, Next),
        jump(JMP | JEQ | K, ETH_P_IP, Next, Drop),
        // IPv4: TCP, first fragment only; X = header length.
        op(LD | B | ABS, 9),
        jump(JMP | JEQ | K, 6, Next, Drop),
        op(LD | H | ABS, 6),
        jump(JMP | JSET | K, 0x1fff, Drop, Next),
        op(LDX | B | MSH, 0),
        jump(JMP | JA, 0, Tcp, Tcp),
        // IPv6: TCP right after the fixed header (extension headers are not followed).
        Op { at: Some(V6), ..op(LD | B | ABS, 6) },
        jump(JMP | JEQ | K, 6, Next, Drop),
        op(LDX | W | IMM, 40),
        // TCP at X: the destination (local) port first.
        Op { at: Some(Tcp), ..op(LD | H | IND, 2) },
    ];
    for (i, r) in ranges.iter().enumerate() {
        let next = if i + 1 == ranges.len() { Drop } else { Range(i + 1) };
        p.push(Op { at: Some(Range(i)), ..jump(JMP | JGE | K, r[0] as u32, Next, next) });
        p.push(jump(JMP | JGT | K, r[1] as u32, next, PortsOk));
    }
    p.extend([
        Op { at: Some(PortsOk), ..op(LD | B | IND, 13) },
        op(ALU | AND | K, TCP_SYN | TCP_ACK),
        jump(JMP | JEQ | K, TCP_SYN, Accept, Next),
        jump(JMP | JSET | K, TCP_SYN, Drop, Next),
        // Header length = data offset × 4; at least 8 bytes of options.
        op(LD | B | IND, 12),
        op(ALU | AND | K, 0xf0),
        op(ALU | RSH | K, 2),
        jump(JMP | JGE | K, 28, Next, Drop),
        jump(JMP | JEQ | K, 32, Next, Accept),
        op(LD | W | IND, 20),
        jump(JMP | JEQ | K, NOP_NOP_TIMESTAMP, Drop, Accept),
        Op { at: Some(Accept), ..op(RET | K, SNAP_LEN) },
        Op { at: Some(Drop), ..op(RET | K, 0) },
    ]);
    assemble(&p)
}

fn assemble(p: &[Op]) -> Vec<Insn> {
    let find = |l: Label| p.iter().position(|o| o.at == Some(l)).expect("label placed");
    p.iter()
        .enumerate()
        .map(|(i, o)| {
            let rel = |l: Label| -> u32 {
                if l == Label::Next {
                    0
                } else {
                    (find(l) - i - 1) as u32
                }
            };
            if o.code == JMP | JA {
                Insn { code: o.code, jt: 0, jf: 0, k: rel(o.jt) }
            } else if o.code & 0x07 == JMP {
                let (jt, jf) = (rel(o.jt), rel(o.jf));
                assert!(jt < 256 && jf < 256, "filter jump too long");
                Insn { code: o.code, jt: jt as u8, jf: jf as u8, k: o.k }
            } else {
                Insn { code: o.code, jt: 0, jf: 0, k: o.k }
            }
        })
        .collect()
}

/// The capture socket; closed on drop.
pub struct Capture {
    fd: OwnedFd,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const Insn,
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Capture {
    /// Opens the socket and installs the filter before it receives anything (bound to no
    /// protocol until the filter is in place, so no unfiltered packet is ever queued).
    pub fn open(ranges: &[[u16; 2]]) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        check(fd)?;
        // SAFETY: a descriptor we just got.
        let capture = Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        capture.set_filter(ranges)?;
        // A deeper queue rides out bursts of new connections (root may exceed rmem_max).
        let size: libc::c_int = 8 << 20;
        // SAFETY: an int option.
        unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&size as *const libc::c_int).cast(), 4);
        }
        // SAFETY: sockaddr_ll is plain data.
        let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = ETH_P_ALL.to_be();
        // SAFETY: a sockaddr_ll of its own size.
        check(unsafe {
            libc::bind(fd, (&ll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        })?;
        Ok(capture)
    }

    /// Replaces the filter (the policy's ports changed).
    pub fn set_filter(&self, ranges: &[[u16; 2]]) -> io::Result<()> {
        let prog = filter(ranges);
        let fprog = SockFprog { len: prog.len() as u16, filter: prog.as_ptr() };
        // SAFETY: the program outlives the call; the kernel copies it.
        check(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const SockFprog).cast(),
                std::mem::size_of::<SockFprog>() as u32,
            )
        })
    }

    /// The socket's inode (its line in `/proc/net/packet`).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        let fd = self.fd.as_raw_fd();
        std::fs::metadata(format!("/proc/self/fd/{fd}")).map(|m| m.ino()).unwrap_or(0)
    }

    /// Waits up to `timeout_ms` for a packet; false on timeout (or a signal).
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
    }

    /// The next queued packet (its first `SNAP_LEN` bytes, network header first), if any.
    pub fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<&'b [u8]>> {
        // SAFETY: a buffer of its own length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(&buf[..n as usize]))
    }

    /// Packets the kernel dropped since the last call (the queue was full).
    pub fn drops(&self) -> u64 {
        let mut stats = [0u32; 2];
        let mut len = 8u32;
        // SAFETY: struct tpacket_stats is two u32s.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                stats.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            stats[1] as u64
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over a packet the way the kernel does (the subset used here).
    fn run(prog: &[Insn], pkt: &[u8], proto: u32, pkttype: u32) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |off: usize, size: usize| -> Option<u32> {
            pkt.get(off..off + size).map(|b| b.iter().fold(0u32, |acc, v| acc << 8 | *v as u32))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let size = match i.code & 0x18 {
                W => 4,
                H => 2,
                _ => 1,
            };
            match i.code & 0x07 {
                LD if i.code & 0xe0 == ABS && i.k >= SKF_AD_PROTOCOL => {
                    a = if i.k == SKF_AD_PROTOCOL { proto } else { pkttype }
                }
                LD if i.code & 0xe0 == ABS => match load(i.k as usize, size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD if i.code & 0xe0 == IND => match load((x + i.k) as usize, size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LDX if i.code & 0xe0 == MSH => match load(i.k as usize, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                LDX => x = i.k,
                ALU if i.code & 0xf0 == AND => a &= i.k,
                ALU if i.code & 0xf0 == RSH => a >>= i.k,
                JMP if i.code & 0xf0 == JA => pc += i.k as usize,
                JMP => {
                    let t = match i.code & 0xf0 {
                        JEQ => a == i.k,
                        JGT => a > i.k,
                        JGE => a >= i.k,
                        JSET => a & i.k != 0,
                        c => panic!("jump {c:#x}"),
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                RET => return i.k,
                c => panic!("class {c}"),
            }
        }
    }

    /// An IPv4 TCP segment to port `dport` with `flags` and `options`.
    fn v4(dport: u16, flags: u8, options: &[u8]) -> Vec<u8> {
        let doff = (20 + options.len()) / 4;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1];
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p.push((doff as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(options);
        p
    }

    fn v6(dport: u16, flags: u8, options: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
        p.extend_from_slice(&[0xfd; 32]);
        p.extend_from_slice(&v4(dport, flags, options)[20..]);
        p
    }

    const TS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    const TOA: [u8; 8] = [254, 8, 0x10, 0x92, 203, 0, 113, 7];
    const ACK: u8 = 0x10;
    const SYN: u8 = 0x02;

    #[test]
    fn passes_what_can_carry_a_toa_and_syns() {
        let f = filter(&[]);
        let pass = |p: &[u8], proto| run(&f, p, proto, PACKET_HOST) == SNAP_LEN;
        let ts_toa = [&TS[..], &TOA[..]].concat();
        assert!(pass(&v4(80, ACK, &TOA), ETH_P_IP));
        assert!(pass(&v4(80, ACK, &ts_toa), ETH_P_IP));
        assert!(pass(&v6(80, ACK, &ts_toa), ETH_P_IPV6));
        assert!(pass(&v4(80, SYN, &[2, 4, 5, 0xb4]), ETH_P_IP), "SYNs mark the connection in scope");
        assert!(!pass(&v4(80, ACK, &TS), ETH_P_IP), "timestamps alone");
        assert!(!pass(&v6(80, ACK, &TS), ETH_P_IPV6), "timestamps alone");
        assert!(!pass(&v4(80, ACK, &[]), ETH_P_IP), "no options");
        assert!(!pass(&v4(80, ACK, &[1, 1, 1, 1]), ETH_P_IP), "too short for a TOA");
        assert!(!pass(&v4(80, SYN | ACK, &ts_toa), ETH_P_IP), "SYN-ACKs answer our own connects");
        assert!(
            pass(&v4(80, ACK, &[254, 8, 0x10, 0x92, 203, 0, 113, 7, 1, 1, 1, 1]), ETH_P_IP),
            "12 bytes, not timestamps"
        );
        let mut udp = v4(80, ACK, &TOA);
        udp[9] = 17;
        assert!(!pass(&udp, ETH_P_IP));
        let mut frag = v4(80, ACK, &TOA);
        frag[7] = 1;
        assert!(!pass(&frag, ETH_P_IP), "a later fragment");
        assert_eq!(run(&f, &v4(80, ACK, &TOA), ETH_P_IP, 4), 0, "outgoing");
        assert!(!pass(&v4(80, ACK, &TOA), 0x0806), "not IP");
        assert!(!pass(&v4(80, ACK, &TOA)[..30], ETH_P_IP), "truncated");
    }

    #[test]
    fn ports_are_filtered_in_the_kernel() {
        let f = filter(&[[80, 80], [8000, 8100]]);
        let pass = |port| run(&f, &v4(port, ACK, &TOA), ETH_P_IP, PACKET_HOST) == SNAP_LEN;
        assert!(pass(80) && pass(8000) && pass(8050) && pass(8100));
        assert!(!pass(79) && !pass(81) && !pass(7999) && !pass(8101) && !pass(443));
        let syn = run(&f, &v4(443, SYN, &[2, 4, 5, 0xb4]), ETH_P_IP, PACKET_HOST);
        assert_eq!(syn, 0, "SYNs to other ports are not in scope");
    }
}
