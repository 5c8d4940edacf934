//! The probe's writer for kernels without the sock_ops header-option hooks (before 5.10),
//! where the eBPF writer cannot load: the probe speaks TCP itself, from the balancer's own
//! address (`--from`, as a FULLNAT balancer speaks from its local address).
//!
//! This host does not own that address, so its kernel neither answers the backend nor resets
//! the connection; the backend reaches it at this host's MAC (a neighbour entry, as it would
//! for a balancer on its link). Segments leave through a raw IP socket, so the kernel routes
//! them and resolves the backend's MAC; the backend's segments come back through a packet
//! socket. A small state machine per connection sends, acknowledges and retransmits; it does
//! no more TCP than a probe needs (no window, no congestion control, one line at a time).

use std::{
    collections::HashMap,
    io::{self, BufRead as _},
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{Exchange, ProbeOptions, Segment};
use crate::error::Error;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const IPPROTO_TCP: u8 = 6;
const MSS: [u8; 4] = [2, 4, 0x05, 0xb4];
/// First retransmission after this; doubled each time up to `RESEND_MAX`.
const RESEND_FIRST: Duration = Duration::from_millis(200);
const RESEND_MAX: Duration = Duration::from_secs(2);
/// How often the loop looks at its timers when nothing arrives.
const TICK: Duration = Duration::from_millis(20);

/// Runs the probe's connections (as `super::run` does with the eBPF writer), from `from`.
pub(super) fn run(options: &ProbeOptions, from: IpAddr, mut on_reply: impl FnMut(&Exchange)) -> Result<(), Error> {
    let bad = |detail: String| Error::Probe { detail: format!("{}: {detail}", options.target) };
    if from.is_ipv4() != options.target.is_ipv4() {
        return Err(bad(format!("--from {from} and the backend must be of the same family")));
    }
    let mut wire = Wire::open(from, options.target).map_err(|e| bad(format!("raw sockets: {e}")))?;
    // Source ports: consecutive from a base chosen by the process id, so that probes started one
    // after another (a held connection, then more) use different ports.
    let base = 20_000 + (std::process::id() % 2_000) as u16 * 16;
    let announced = |i: u32, port: u16| {
        let mut client = options.client;
        client.set_port(if options.parallel { port } else { options.client.port().wrapping_add(i as u16) });
        client
    };
    let mut next_port = base;
    let mut new_conn = |i: u32| {
        let port = next_port;
        next_port = next_port.wrapping_add(1).max(1024);
        let announce = announced(i, port);
        let options_bytes = super::option_list(options, announce)?;
        Ok::<_, Error>(Conn::new(port, announce, pad(&options_bytes), options))
    };
    if options.interactive {
        let conn = new_conn(0)?;
        return interact(&mut wire, conn, options).map_err(|e| bad(e.to_string()));
    }
    let mut conns = HashMap::new();
    let batch = if options.parallel { options.count } else { 1 };
    let mut i = 0;
    while i < options.count {
        conns.clear();
        for j in i..(i + batch).min(options.count) {
            let conn = new_conn(j)?;
            conns.insert(conn.port, conn);
        }
        i += batch;
        wire.converse(&mut conns, options).map_err(|e| bad(e.to_string()))?;
        let mut done: Vec<&Conn> = conns.values().collect();
        done.sort_by_key(|c| c.port.wrapping_sub(base));
        for c in done {
            let local = SocketAddr::new(from, c.port);
            on_reply(&Exchange {
                local,
                announced: c.announced,
                reply: String::from_utf8_lossy(&c.reply).into_owned(),
            });
        }
    }
    Ok(())
}

/// One connection, and how far it got.
struct Conn {
    port: u16,
    announced: SocketAddr,
    /// The option area to write (whole words), and on which segment.
    options: Vec<u8>,
    on: Segment,
    isn: u32,
    /// Our next sequence number; the backend's next one once known.
    snd_nxt: u32,
    rcv_nxt: u32,
    established: bool,
    /// What is still to send (a line, then the FIN unless interactive).
    to_send: Vec<u8>,
    fin_wanted: bool,
    /// The last segment sent that the backend has not acknowledged: (seq, flags, payload).
    unacked: Option<(u32, u8, Vec<u8>)>,
    first_data_sent: bool,
    resend_at: Instant,
    backoff: Duration,
    reply: Vec<u8>,
    peer_fin: bool,
}

impl Conn {
    fn new(port: u16, announced: SocketAddr, options: Vec<u8>, probe: &ProbeOptions) -> Conn {
        let isn =
            0x1000_0000u32.wrapping_add(u32::from(port).wrapping_mul(0x0101_0101)).wrapping_add(std::process::id());
        let mut to_send = Vec::new();
        if !probe.interactive {
            to_send.extend_from_slice(probe.message.as_bytes());
            to_send.push(b'\n');
        }
        Conn {
            port,
            announced,
            options,
            on: probe.on,
            isn,
            snd_nxt: isn,
            rcv_nxt: 0,
            established: false,
            to_send,
            fin_wanted: !probe.interactive,
            unacked: None,
            first_data_sent: false,
            resend_at: Instant::now(),
            backoff: RESEND_FIRST,
            reply: Vec::new(),
            peer_fin: false,
        }
    }

    /// The exchange is over: the backend closed after answering and has everything we sent.
    fn done(&self) -> bool {
        self.peer_fin && self.unacked.is_none() && self.to_send.is_empty() && !self.fin_wanted
    }
}

/// The sockets: a raw IP socket to send, a packet socket to receive.
struct Wire {
    from: IpAddr,
    target: SocketAddr,
    send: OwnedFd,
    recv: OwnedFd,
    buf: Vec<u8>,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: T) -> io::Result<()> {
    // SAFETY: a value of its own size, read by the kernel only during the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

impl Wire {
    fn open(from: IpAddr, target: SocketAddr) -> io::Result<Wire> {
        let (family, ethertype) = match from {
            IpAddr::V4(_) => (libc::AF_INET, libc::ETH_P_IP),
            IpAddr::V6(_) => (libc::AF_INET6, libc::ETH_P_IPV6),
        };
        // SAFETY: plain socket calls; each descriptor is owned at once.
        let recv = unsafe {
            OwnedFd::from_raw_fd(check(libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                (ethertype as u16).to_be() as i32,
            ))?)
        };
        // Open before the first SYN leaves, so that no answer is missed; room for a thousand.
        let _ = setsockopt(&recv, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20 as libc::c_int);
        let tick = libc::timeval { tv_sec: 0, tv_usec: TICK.as_micros() as _ };
        setsockopt(&recv, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tick)?;
        let send = match from {
            // IPPROTO_RAW: we write the IPv4 header, the spoofed source included.
            IpAddr::V4(_) => unsafe {
                // SAFETY: as above.
                OwnedFd::from_raw_fd(check(libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW))?)
            },
            // IPv6 raw sockets take the header from the kernel (IPV6_HDRINCL is 4.5+); each
            // segment names the balancer's address as its source (IPV6_PKTINFO in `send`),
            // which IPV6_TRANSPARENT allows although this host does not own it.
            IpAddr::V6(_) => {
                // SAFETY: as above.
                let fd =
                    unsafe { OwnedFd::from_raw_fd(check(libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_TCP))?) };
                setsockopt(&fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1 as libc::c_int)?;
                // Never read: it would otherwise queue a copy of every TCP segment for this host.
                setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 0 as libc::c_int)?;
                fd
            }
        };
        Ok(Wire { from, target, send, recv, buf: vec![0; 65536] })
    }

    /// Sends one segment of `conn` (options where `with_options`).
    fn send(&self, conn: &Conn, seq: u32, flags: u8, payload: &[u8], with_options: bool) -> io::Result<()> {
        let mut options = Vec::new();
        if flags & SYN != 0 && (!with_options || conn.options.len() + MSS.len() <= 40) {
            options.extend_from_slice(&MSS);
        }
        if with_options {
            options.extend_from_slice(&conn.options);
        }
        let ack = if conn.established || flags & SYN == 0 { conn.rcv_nxt } else { 0 };
        let flags = if flags & SYN != 0 { flags } else { flags | ACK };
        let tcp = tcp_segment(self.from, self.target, conn.port, seq, ack, flags, &options, payload);
        let sent = match (self.from, self.target) {
            (IpAddr::V4(from), SocketAddr::V4(to)) => {
                let packet = ipv4_packet(from.octets(), to.ip().octets(), &tcp);
                // SAFETY: zeroed sockaddr_in is valid; filled below.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
                // SAFETY: sendto with a buffer and address we own.
                unsafe {
                    libc::sendto(
                        self.send.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                }
            }
            (IpAddr::V6(from), SocketAddr::V6(to)) => {
                // SAFETY: zeroed sockaddr_in6 is valid; filled below.
                let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sa.sin6_family = libc::AF_INET6 as u16;
                sa.sin6_addr.s6_addr = to.ip().octets();
                // The source address rides in an IPV6_PKTINFO control message.
                // SAFETY: zeroed in6_pktinfo is valid; filled below.
                let mut info: libc::in6_pktinfo = unsafe { std::mem::zeroed() };
                info.ipi6_addr.s6_addr = from.octets();
                const SPACE: usize = 64;
                let mut control = [0u8; SPACE];
                let mut iov = libc::iovec { iov_base: tcp.as_ptr() as *mut libc::c_void, iov_len: tcp.len() };
                // SAFETY: zeroed msghdr is valid; every pointer in it points at locals that
                // outlive the sendmsg call, and the cmsg macros stay inside `control`.
                unsafe {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_name = (&mut sa as *mut libc::sockaddr_in6).cast();
                    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
                    msg.msg_iov = &mut iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = control.as_mut_ptr().cast();
                    let len = libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                    assert!(len <= SPACE, "room for one in6_pktinfo");
                    msg.msg_controllen = len as _;
                    let cmsg = libc::CMSG_FIRSTHDR(&msg);
                    (*cmsg).cmsg_level = libc::SOL_IPV6;
                    (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>(), info);
                    libc::sendmsg(self.send.as_raw_fd(), &msg, 0)
                }
            }
            _ => unreachable!("families checked in run"),
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next segment from the backend to one of our ports, or `None` after a tick.
    fn receive(&mut self) -> io::Result<Option<Seen>> {
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(self.recv.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(parse(&self.buf[..n as usize], self.from, self.target))
    }

    /// Runs `conns` until each has had its exchange (all at once: every connection is open
    /// before any sends its line, as the eBPF writer's `--parallel` does).
    fn converse(&mut self, conns: &mut HashMap<u16, Conn>, options: &ProbeOptions) -> io::Result<()> {
        let deadline = Instant::now() + options.timeout;
        for c in conns.values_mut() {
            self.start(c)?;
        }
        loop {
            let all_open = conns.values().all(|c| c.established);
            for c in conns.values_mut() {
                if c.established && all_open {
                    self.push(c)?;
                }
                self.resend_due(c)?;
            }
            if conns.values().all(Conn::done) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let stuck = conns.values().filter(|c| !c.done()).count();
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{stuck} connection(s) did not finish")));
            }
            if let Some(seen) = self.receive()? {
                if let Some(c) = conns.get_mut(&seen.dport) {
                    self.on_segment(c, &seen)?;
                }
            }
        }
    }

    /// Sends the SYN.
    fn start(&self, c: &mut Conn) -> io::Result<()> {
        let with = c.on == Segment::Syn;
        self.send(c, c.isn, SYN, &[], with)?;
        c.snd_nxt = c.isn.wrapping_add(1);
        c.unacked = Some((c.isn, SYN, Vec::new()));
        c.resend_at = Instant::now() + c.backoff;
        Ok(())
    }

    /// Sends what is queued, once the previous segment is acknowledged.
    fn push(&self, c: &mut Conn) -> io::Result<()> {
        if c.unacked.is_some() || (c.to_send.is_empty() && !c.fin_wanted) {
            return Ok(());
        }
        let payload = std::mem::take(&mut c.to_send);
        let flags = if c.fin_wanted { PSH | FIN } else { PSH };
        c.fin_wanted = false;
        let with = c.on == Segment::Data && !c.first_data_sent;
        c.first_data_sent = true;
        let seq = c.snd_nxt;
        self.send(c, seq, flags, &payload, with)?;
        c.snd_nxt = seq.wrapping_add(payload.len() as u32 + u32::from(flags & FIN != 0));
        c.unacked = Some((seq, flags, payload));
        c.backoff = RESEND_FIRST;
        c.resend_at = Instant::now() + c.backoff;
        Ok(())
    }

    fn resend_due(&self, c: &mut Conn) -> io::Result<()> {
        let Some((seq, flags, payload)) = c.unacked.clone() else { return Ok(()) };
        if Instant::now() < c.resend_at {
            return Ok(());
        }
        let with = match c.on {
            Segment::Syn => flags & SYN != 0,
            Segment::Data => !payload.is_empty() && seq == c.isn.wrapping_add(1),
            Segment::Ack => false,
        };
        self.send(c, seq, flags, &payload, with)?;
        c.backoff = (c.backoff * 2).min(RESEND_MAX);
        c.resend_at = Instant::now() + c.backoff;
        Ok(())
    }

    fn on_segment(&self, c: &mut Conn, s: &Seen) -> io::Result<()> {
        if s.flags & RST != 0 {
            // After its FIN, a reset only answers a segment of ours that came too late.
            if c.peer_fin {
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!(
                    "the backend reset the connection from port {} ({}, {} bytes received, {})",
                    c.port,
                    if c.established { "established" } else { "handshake" },
                    c.reply.len(),
                    if c.unacked.is_some() { "a segment unacknowledged" } else { "all acknowledged" }
                ),
            ));
        }
        if s.flags & SYN != 0 && s.flags & ACK != 0 && s.ack == c.isn.wrapping_add(1) {
            // The SYN-ACK (again, if our ACK was lost or dropped): ACK it, with the options
            // where they ride on the ACK.
            c.rcv_nxt = s.seq.wrapping_add(1);
            if !c.established {
                c.established = true;
                c.unacked = None;
                c.backoff = RESEND_FIRST;
            }
            return self.send(c, c.snd_nxt, ACK, &[], c.on == Segment::Ack);
        }
        if !c.established || s.flags & ACK == 0 {
            return Ok(());
        }
        if let Some((seq, flags, payload)) = &c.unacked {
            let end = seq.wrapping_add(payload.len() as u32 + u32::from(flags & FIN != 0));
            if s.ack.wrapping_sub(end) as i32 >= 0 {
                c.unacked = None;
                c.backoff = RESEND_FIRST;
            }
        }
        let mut advance = false;
        if !s.payload.is_empty() && s.seq == c.rcv_nxt {
            c.reply.extend_from_slice(&s.payload);
            c.rcv_nxt = c.rcv_nxt.wrapping_add(s.payload.len() as u32);
            advance = true;
        }
        if s.flags & FIN != 0 && s.seq.wrapping_add(s.payload.len() as u32) == c.rcv_nxt && !c.peer_fin {
            c.peer_fin = true;
            c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
            advance = true;
        }
        if advance || !s.payload.is_empty() || s.flags & FIN != 0 {
            // Acknowledge what arrived (or repeat where we are, for a duplicate).
            self.send(c, c.snd_nxt, ACK, &[], false)?;
        }
        Ok(())
    }
}

/// `--stdin`: one connection; each line read is sent and its answer line printed; at the end
/// of stdin, a FIN.
fn interact(wire: &mut Wire, mut c: Conn, options: &ProbeOptions) -> io::Result<()> {
    eprintln!("toa probe: from {} announcing {}", SocketAddr::new(wire.from, c.port), c.announced);
    let (lines, from_stdin) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines.send(Some(line)).is_err() {
                return;
            }
        }
        let _ = lines.send(None);
    });
    let deadline = Instant::now() + options.timeout;
    wire.start(&mut c)?;
    let (mut printed, mut awaiting, mut closing) = (0, false, false);
    loop {
        if !c.established && Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the backend did not answer the SYN"));
        }
        if c.established && !awaiting && !closing && c.unacked.is_none() {
            match from_stdin.recv_timeout(TICK) {
                Ok(Some(line)) => {
                    c.to_send = format!("{line}\n").into_bytes();
                    awaiting = true;
                }
                Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    c.fin_wanted = true;
                    closing = true;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            wire.push(&mut c)?;
        }
        wire.resend_due(&mut c)?;
        if let Some(seen) = wire.receive()? {
            if seen.dport == c.port {
                wire.on_segment(&mut c, &seen)?;
            }
        }
        while let Some(end) = c.reply[printed..].iter().position(|b| *b == b'\n') {
            print!("{}", String::from_utf8_lossy(&c.reply[printed..printed + end + 1]));
            std::io::Write::flush(&mut std::io::stdout())?;
            printed += end + 1;
            awaiting = false;
        }
        // Our FIN acknowledged, or the backend closed: done.
        if (closing && c.unacked.is_none()) || (c.peer_fin && !awaiting) {
            return Ok(());
        }
    }
}

/// A segment from the backend.
struct Seen {
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

/// The backend's TCP segment to `from` in an IP packet, if that is what `p` is.
fn parse(p: &[u8], from: IpAddr, target: SocketAddr) -> Option<Seen> {
    let (src, dst, proto, l4, total): (IpAddr, IpAddr, u8, usize, usize) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let src = IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?);
            (src, dst, p[9], ihl, usize::from(u16::from_be_bytes([p[2], p[3]])))
        }
        6 if p.len() >= 40 => {
            let src = IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?);
            (src, dst, p[6], 40, 40 + usize::from(u16::from_be_bytes([p[4], p[5]])))
        }
        _ => return None,
    };
    if proto != IPPROTO_TCP || src != target.ip() || dst != from || p.len() < l4 + 20 {
        return None;
    }
    let t = &p[l4..total.min(p.len())];
    if t.len() < 20 || u16::from_be_bytes([t[0], t[1]]) != target.port() {
        return None;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    Some(Seen {
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        flags: t[13],
        payload: t.get(doff..)?.to_vec(),
    })
}

/// Options padded with NOPs to whole 32-bit words, as the kernel pads what its writer stores.
fn pad(options: &[u8]) -> Vec<u8> {
    let mut out = options.to_vec();
    while !out.len().is_multiple_of(4) {
        out.push(1);
    }
    out
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment with its checksum (over the IPv4 or IPv6 pseudo-header). The tests' own
/// hand-written client builds its segments with it too.
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    from: IpAddr,
    to: SocketAddr,
    sport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let len = 20 + options.len() + payload.len();
    let mut tcp = Vec::with_capacity(len);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&to.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push((((20 + options.len()) / 4) as u8) << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(options);
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(40 + len);
    match (from, to.ip()) {
        (IpAddr::V4(f), IpAddr::V4(t)) => {
            pseudo.extend_from_slice(&f.octets());
            pseudo.extend_from_slice(&t.octets());
            pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
            pseudo.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (f, t) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            pseudo.extend_from_slice(&v6(f));
            pseudo.extend_from_slice(&v6(t));
            pseudo.extend_from_slice(&(len as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
        }
    }
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo, 0);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

/// An IPv4 packet (no options, DF, TTL 64) around `tcp`, with its header checksum.
pub fn ipv4_packet(from: [u8; 4], to: [u8; 4], tcp: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
    ip.extend_from_slice(&from);
    ip.extend_from_slice(&to);
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(tcp);
    ip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_parse_back() {
        let from: IpAddr = "198.18.0.3".parse().unwrap();
        let target: SocketAddr = "198.18.0.1:8080".parse().unwrap();
        // A segment from the backend to us, built with the same helpers.
        let back = tcp_segment(target.ip(), SocketAddr::new(from, 20001), 8080, 7, 9, ACK | PSH, &[1, 1, 1, 1], b"hi");
        let [a, b, c, d] = match from {
            IpAddr::V4(a) => a.octets(),
            _ => unreachable!(),
        };
        let packet = ipv4_packet([198, 18, 0, 1], [a, b, c, d], &back);
        assert_eq!(checksum(&packet[..20], 0), 0, "IPv4 header checksum");
        let seen = parse(&packet, from, target).expect("ours");
        assert_eq!((seen.dport, seen.seq, seen.ack, seen.flags), (20001, 7, 9, ACK | PSH));
        assert_eq!(seen.payload, b"hi");
        // Not from the backend: ignored.
        assert!(parse(&packet, "198.18.0.9".parse().unwrap(), target).is_none());
    }

    #[test]
    fn options_are_padded_with_nops() {
        assert_eq!(pad(&[254, 6, 0, 1, 2, 3]), [254, 6, 0, 1, 2, 3, 1, 1]);
        assert_eq!(pad(&[254, 8, 0, 1, 2, 3, 4, 5]).len(), 8);
    }
}
