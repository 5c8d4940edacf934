//! A UDP balancer written by hand: datagrams with IPv4 options (DPVS's UOA), sent through a raw
//! socket from the client namespace's own address, and a plain UDP socket on the same address
//! and port that receives the server's replies, as the balancer would.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::Arc,
};

use crate::DEADLINE;

/// DPVS's UOA for an IPv4 client: type 31, length 8, port, address.
pub fn uoa4(client: SocketAddrV4) -> Vec<u8> {
    let p = client.port().to_be_bytes();
    let a = client.ip().octets();
    vec![31, 8, p[0], p[1], a[0], a[1], a[2], a[3]]
}

/// DPVS's UOA for an IPv6 client (in an IPv4 header): type 31, length 20, port, address.
pub fn uoa6(client: std::net::SocketAddrV6) -> Vec<u8> {
    let p = client.port().to_be_bytes();
    [&[31, 20, p[0], p[1]][..], &client.ip().octets()].concat()
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP header and `payload`, with the checksum over the pseudo header of `from`'s family
/// (`from` and `to` are of one family).
fn udp_segment(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut udp =
        [&from.port().to_be_bytes()[..], &to.port().to_be_bytes(), &(len as u16).to_be_bytes(), &[0, 0]].concat();
    udp.extend_from_slice(payload);
    let pseudo = match (from.ip(), to.ip()) {
        (IpAddr::V4(f), IpAddr::V4(t)) => {
            [&f.octets()[..], &t.octets(), &[0, 17], &(len as u16).to_be_bytes()].concat()
        }
        (IpAddr::V6(f), IpAddr::V6(t)) => {
            [&f.octets()[..], &t.octets(), &(len as u32).to_be_bytes(), &[0, 0, 0, 17]].concat()
        }
        _ => panic!("{from} and {to} are of different families"),
    };
    // Zero means "no checksum" (IPv4) or is invalid (IPv6): its complement stands for it.
    let sum = match checksum(&[pseudo, udp.clone()].concat()) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    udp
}

/// Sends a whole IP `packet` (header included) through the raw socket `raw` to `to`.
fn send_raw(raw: &OwnedFd, to: IpAddr, packet: &[u8]) -> io::Result<()> {
    // SAFETY: both are plain data; zero is a valid value of each field.
    let (mut v4, mut v6): (libc::sockaddr_in, libc::sockaddr_in6) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let (dst, len) = match to {
        IpAddr::V4(a) => {
            v4.sin_family = libc::AF_INET as libc::sa_family_t;
            v4.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            ((&v4 as *const libc::sockaddr_in).cast::<libc::sockaddr>(), std::mem::size_of_val(&v4))
        }
        IpAddr::V6(a) => {
            v6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            v6.sin6_addr.s6_addr = a.octets();
            ((&v6 as *const libc::sockaddr_in6).cast::<libc::sockaddr>(), std::mem::size_of_val(&v6))
        }
    };
    // SAFETY: the buffer and the address outlive the call.
    let sent =
        unsafe { libc::sendto(raw.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0, dst, len as libc::socklen_t) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A raw socket of `family` that sends whole IP packets, header included (IPPROTO_RAW).
fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The UDP socket on a balancer's address that receives the server's replies.
struct Replies(UdpSocket);

impl Replies {
    fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(DEADLINE))?;
        Ok(Self(socket))
    }

    /// The next reply: who sent it and what it says (an error after `DEADLINE` without one).
    fn recv(&self) -> io::Result<(SocketAddr, String)> {
        let mut buf = [0u8; 2048];
        let (n, from) = self.0.recv_from(&mut buf)?;
        Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
    }

    /// The reply to `payload`, which was just sent (a panic after `DEADLINE` without one).
    fn expect(&self, payload: &str) -> (SocketAddr, String) {
        self.recv().unwrap_or_else(|e| panic!("no reply to {payload:?} within {DEADLINE:?}: {e}"))
    }
}

/// An IPv4 datagram from `from` to `to` whose header carries `options` (padded with
/// end-of-list bytes to whole words), with both checksums.
pub fn datagram(from: SocketAddrV4, to: SocketAddrV4, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    assert!(opts.len() <= 40, "an IPv4 header has at most 40 bytes of options");
    let udp = udp_segment(from.into(), to.into(), payload);
    let udp_len = udp.len();

    let header_len = 20 + opts.len();
    let mut ip = vec![0x40 | (header_len / 4) as u8, 0];
    ip.extend_from_slice(&((header_len + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&from.ip().octets());
    ip.extend_from_slice(&to.ip().octets());
    ip.extend_from_slice(&opts);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&udp);
    ip
}

/// The same datagram as DPVS's "option protocol" mode sends it: IPv4 protocol 248, then the
/// option-protocol header `{version 1, reserved, protocol 17, length}` and `options` (not padded:
/// a test may give a length that is not whole words), then the UDP header; `version` and
/// `protocol` as given, to make malformed ones.
pub fn opp_datagram(
    from: SocketAddrV4,
    to: SocketAddrV4,
    options: &[u8],
    payload: &[u8],
    version: u8,
    protocol: u8,
) -> Vec<u8> {
    let mut packet = datagram(from, to, &[], payload);
    let opp_len = 4 + options.len();
    let mut opp = vec![version << 4, protocol];
    opp.extend_from_slice(&(opp_len as u16).to_be_bytes());
    opp.extend_from_slice(options);
    packet.splice(20..20, opp);
    packet[9] = 248;
    let total = packet.len() as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// The balancer: sends from `addr` (an address of the namespace it is made in) and receives the
/// replies sent to it.
pub struct Balancer {
    pub addr: SocketAddrV4,
    replies: Replies,
    raw: Arc<OwnedFd>,
}

impl Balancer {
    /// Binds `addr`; call it in the namespace that owns the address.
    pub fn bind(addr: SocketAddrV4) -> io::Result<Self> {
        Ok(Self { addr, replies: Replies::bind(addr.into())?, raw: Arc::new(raw_socket(libc::AF_INET)?) })
    }

    /// Another port of the same balancer (sharing its raw socket).
    pub fn another(&self, port: u16) -> io::Result<Self> {
        let addr = SocketAddrV4::new(*self.addr.ip(), port);
        Ok(Self { addr, replies: Replies::bind(addr.into())?, raw: Arc::clone(&self.raw) })
    }

    /// Sends one datagram to `to` carrying `options` in its IPv4 header.
    pub fn send(&self, to: SocketAddrV4, options: &[u8], payload: &[u8]) -> io::Result<()> {
        self.send_packet(to, &datagram(self.addr, to, options, payload))
    }

    /// Sends one datagram to `to` in DPVS's option-protocol form with `options` ([`opp_datagram`]).
    pub fn send_opp(&self, to: SocketAddrV4, options: &[u8], payload: &[u8]) -> io::Result<()> {
        self.send_packet(to, &opp_datagram(self.addr, to, options, payload, 1, 17))
    }

    /// Sends an IPv4 packet this balancer made (from its address) to `to`.
    pub fn send_packet(&self, to: SocketAddrV4, packet: &[u8]) -> io::Result<()> {
        send_raw(&self.raw, IpAddr::V4(*to.ip()), packet)
    }

    /// The next reply: who sent it and what it says (an error after `DEADLINE` without one).
    pub fn recv(&self) -> io::Result<(SocketAddr, String)> {
        self.replies.recv()
    }

    /// [`Balancer::send_opp`] and waits for the reply.
    pub fn ask_opp(&self, to: SocketAddrV4, options: &[u8], payload: &str) -> (SocketAddr, String) {
        self.send_opp(to, options, payload.as_bytes()).expect("send a datagram");
        self.replies.expect(payload)
    }

    /// Sends and waits for the reply.
    pub fn ask(&self, to: SocketAddrV4, options: &[u8], payload: &str) -> (SocketAddr, String) {
        self.send(to, options, payload.as_bytes()).expect("send a datagram");
        self.replies.expect(payload)
    }
}

/// An IPv6 datagram from `from` to `to` with `extension` between the IPv6 and UDP headers
/// (`next` is the IPv6 header's next header then: 60 for Destination Options, 248 for DPVS's
/// option protocol; 17 and nothing for plain UDP); the UDP checksum is IPv6's (mandatory).
pub fn datagram6(from: SocketAddrV6, to: SocketAddrV6, next: u8, extension: &[u8], payload: &[u8]) -> Vec<u8> {
    let udp = udp_segment(from.into(), to.into(), payload);
    let udp_len = udp.len();
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&((extension.len() + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[next, 64]);
    ip.extend_from_slice(&from.ip().octets());
    ip.extend_from_slice(&to.ip().octets());
    ip.extend_from_slice(extension);
    ip.extend_from_slice(&udp);
    ip
}

/// ByteDance's UOA over IPv6: a Destination Options header (next header UDP) whose one option
/// (type 31) holds the client's and the virtual ports and addresses, both IPv4 or both IPv6.
pub fn bytedance_dstopts(client: SocketAddr, vip: SocketAddr) -> Vec<u8> {
    let octets = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    };
    let data = [&client.port().to_be_bytes()[..], &vip.port().to_be_bytes(), &octets(client), &octets(vip)].concat();
    let total = 4 + data.len();
    assert!(total.is_multiple_of(8), "ByteDance's layouts fill whole 8-byte units");
    [&[17, (total / 8 - 1) as u8, 31, data.len() as u8][..], &data].concat()
}

/// DPVS's option-protocol header over IPv6 (version 2, UDP inside) in front of `options`.
pub fn opp6(options: &[u8]) -> Vec<u8> {
    let len = (4 + options.len()) as u16;
    [&[0x20, 17][..], &len.to_be_bytes(), options].concat()
}

/// A balancer that reaches the server over IPv6: sends whole IPv6 packets it made from its
/// address and receives the replies sent to it.
pub struct Balancer6 {
    pub addr: SocketAddrV6,
    replies: Replies,
    raw: OwnedFd,
}

impl Balancer6 {
    /// Binds `addr`; call it in the namespace that owns the address.
    pub fn bind(addr: SocketAddrV6) -> io::Result<Self> {
        Ok(Self { addr, replies: Replies::bind(addr.into())?, raw: raw_socket(libc::AF_INET6)? })
    }

    /// Sends a datagram to `to` with `extension` behind next header `next` ([`datagram6`]).
    pub fn send(&self, to: SocketAddrV6, next: u8, extension: &[u8], payload: &[u8]) -> io::Result<()> {
        send_raw(&self.raw, IpAddr::V6(*to.ip()), &datagram6(self.addr, to, next, extension, payload))
    }

    /// Sends and waits for the reply: who sent it and what it says.
    pub fn ask(&self, to: SocketAddrV6, next: u8, extension: &[u8], payload: &str) -> (SocketAddr, String) {
        self.send(to, next, extension, payload.as_bytes()).expect("send a datagram");
        self.replies.expect(payload)
    }
}

/// An address of the client namespace, which the balancer sends from.
pub fn balancer_addr(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(crate::CLIENT_V4.parse::<Ipv4Addr>().expect("an IPv4 address"), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_check_out() {
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);
        let to = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 5353);
        let p = datagram(from, to, &uoa4("203.0.113.7:4242".parse().unwrap()), b"hi");
        assert_eq!(p[0], 0x47, "IHL 7: 8 bytes of options");
        assert_eq!(checksum(&p[..28]), 0, "IPv4 header checksum");
        assert_eq!(&p[20..28], &[31, 8, 0x10, 0x92, 203, 0, 113, 7]);
        // A 6-byte option is padded with end-of-list bytes.
        assert_eq!(&datagram(from, to, &[31, 6, 0, 0, 0, 0], b"")[20..28], &[31, 6, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn udp_checksums_check_out_in_both_families() {
        // A segment whose checksum is right sums to zero with its pseudo header.
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);
        let to = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 5353);
        let p = datagram(from, to, &[], b"odd");
        let pseudo = [&p[12..20], &[0, 17], &11u16.to_be_bytes()[..]].concat();
        assert_eq!(checksum(&[&pseudo[..], &p[20..]].concat()), 0);

        let from: SocketAddrV6 = "[fd00::2]:40000".parse().unwrap();
        let to: SocketAddrV6 = "[fd00::1]:5353".parse().unwrap();
        let ext = opp6(&[]);
        let p = datagram6(from, to, 248, &ext, b"odd");
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 4 + 11, "payload length counts the extension");
        let pseudo = [&p[8..40], &11u32.to_be_bytes()[..], &[0, 0, 0, 17]].concat();
        assert_eq!(checksum(&[&pseudo[..], &p[44..]].concat()), 0);
    }
}
