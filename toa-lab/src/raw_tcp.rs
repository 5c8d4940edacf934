//! A TCP client written by hand, for option areas the kernel's own stack would never send
//! (end-of-list, a length below 2, an option running past the area). It speaks from 198.18.0.3,
//! an address no namespace owns: the server namespace is told which MAC it lives at, and the
//! client namespace, not owning it, neither answers nor resets, while an AF_PACKET socket there
//! sees the server's segments.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Instant,
};

pub const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const RST: u8 = 0x04;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// One IPv4 + TCP segment from SPOOFED:sport to dst:dport, built as the probe's own TCP
/// builds its segments.
#[allow(clippy::too_many_arguments)]
fn segment(
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "the option area is whole 32-bit words");
    let to = std::net::SocketAddr::new(dst.into(), dport);
    let tcp = toa::probe::raw::tcp_segment(SPOOFED.into(), to, sport, seq, ack, flags, options, payload);
    toa::probe::raw::ipv4_packet(SPOOFED.octets(), dst.octets(), &tcp)
}

struct Seen {
    flags: u8,
    seq: u32,
    payload: Vec<u8>,
}

/// The SYN's usual option area: an MSS of 1460.
pub const MSS_ONLY: [u8; 4] = [2, 4, 0x05, 0xb4];

/// The option areas of the client's segments: SYN, handshake ACK, pure ACKs sent between it
/// and the data (usually none), and the segment that carries the data.
#[derive(Clone, Debug)]
pub struct Areas {
    pub syn: Vec<u8>,
    pub ack: Vec<u8>,
    pub between: Vec<Vec<u8>>,
    pub data: Vec<u8>,
}

/// Connects with `options` on the handshake ACK, sends `line`, and returns what the server
/// answered. Must run on a thread inside the client namespace.
pub fn exchange(dst: Ipv4Addr, dport: u16, sport: u16, options: &[u8], line: &[u8]) -> io::Result<String> {
    let areas = Areas { syn: MSS_ONLY.to_vec(), ack: options.to_vec(), between: Vec::new(), data: Vec::new() };
    exchange_with(dst, dport, sport, &areas, line)
}

/// [`exchange`] with the option areas of all three segments.
pub fn exchange_with(dst: Ipv4Addr, dport: u16, sport: u16, areas: &Areas, line: &[u8]) -> io::Result<String> {
    // SAFETY: plain socket calls; the descriptors are owned at once.
    let (send, recv) = unsafe {
        let send = OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW))?);
        let proto = (libc::ETH_P_IP as u16).to_be() as libc::c_int;
        let recv = OwnedFd::from_raw_fd(check(libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto))?);
        (send, recv)
    };
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    // SAFETY: setsockopt with a timeval we own.
    unsafe {
        check(libc::setsockopt(
            recv.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        ))?;
    }
    let send_seg = |seg: Vec<u8>| -> io::Result<()> {
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        // SAFETY: sendto with a buffer and address we own.
        check(unsafe {
            libc::sendto(
                send.as_raw_fd(),
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        } as libc::c_int)?;
        Ok(())
    };
    // The server's next segment to us that satisfies `want`.
    let wait = |want: &dyn Fn(&Seen) -> bool| -> io::Result<Seen> {
        let deadline = Instant::now() + super::DEADLINE;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: recv into our buffer.
            let n = unsafe { libc::recv(recv.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 40 {
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p[9] != libc::IPPROTO_TCP as u8 || p[16..20] != SPOOFED.octets() || p.len() < ihl + 20 {
                continue;
            }
            let t = &p[ihl..];
            if u16::from_be_bytes([t[2], t[3]]) != sport {
                continue;
            }
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            let doff = usize::from(t[12] >> 4) * 4;
            let seen = Seen {
                flags: t[13],
                seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                payload: p[ihl + doff..total].to_vec(),
            };
            if want(&seen) {
                return Ok(seen);
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no answer from the server"))
    };
    // A new ISN for each connection, as real stacks choose them (RFC 6528): the userspace mode
    // tells a connection from an older one on the same 4-tuple by it.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let isn = 0x1000_0000u32 ^ nanos ^ (u32::from(sport) << 16);
    send_seg(segment(dst, sport, dport, isn, 0, SYN, &areas.syn, &[]))?;
    let synack = wait(&|s| s.flags & (SYN | ACK) == SYN | ACK)?;
    let (seq, ack) = (isn + 1, synack.seq.wrapping_add(1));
    send_seg(segment(dst, sport, dport, seq, ack, ACK, &areas.ack, &[]))?;
    for area in &areas.between {
        send_seg(segment(dst, sport, dport, seq, ack, ACK, area, &[]))?;
    }
    send_seg(segment(dst, sport, dport, seq, ack, PSH | ACK, &areas.data, line))?;
    let answer = wait(&|s| !s.payload.is_empty())?;
    // Leave nothing behind on the server.
    send_seg(segment(dst, sport, dport, seq + line.len() as u32, 0, RST, &[], &[]))?;
    Ok(String::from_utf8_lossy(&answer.payload).into_owned())
}
