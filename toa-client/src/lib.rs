//! The client address of a TCP connection behind a FULLNAT load balancer, for applications.
//!
//! With the `toa` agent loaded, `getpeername()` and `accept()` already return the client, and
//! most applications need nothing else. This crate is for the case they cannot carry: NAT64,
//! an IPv6 client behind a balancer that talks IPv4 to this host, where an IPv4 socket cannot
//! hold the client's address. It asks the kernel with
//! `getsockopt(fd, IPPROTO_IP, TOA_SO_GET_LOOKUP = 4096)`, the call the existing NAT64 patches of
//! nginx/OpenResty make, which the agent's getsockopt hook answers. It needs no privileges and
//! depends on `libc` alone.
//!
//! Any socket that is `AsFd` works: `std::net::TcpStream`, `tokio::net::TcpStream`, and a raw
//! descriptor through `BorrowedFd::borrow_raw`.
//!
//! Connections through a VTOA balancer (`--dialect tencent-vtoa` / `anolis-vtoa`) also carry the
//! client's VPC id and the virtual address it connected to: [`virtual_server`] asks for them
//! with `getsockopt(fd, IPPROTO_IP, VTOA_SO_GET_VS = 1345)`, the call Alibaba's VTOA module
//! answers.
//!
//! ```no_run
//! let listener = std::net::TcpListener::bind("0.0.0.0:8080")?;
//! let (stream, _) = listener.accept()?;
//! if let Some(client) = toa_client::client_addr(&stream)? {
//!     println!("client {client}");
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::{
    io,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsFd, AsRawFd as _},
};

/// The `getsockopt` option number of the lookup (level `IPPROTO_IP`).
pub const TOA_SO_GET_LOOKUP: libc::c_int = 4096;

/// `struct toa_nat64_peer { struct in6_addr saddr; uint16_t port; }`: 18 bytes, 20 with padding.
const PEER_LEN: usize = 20;
const PEER_MIN: usize = 18;

/// The client the load balancer announced for this connection, or `None` when it announced
/// none or no agent answers (the kernel's own `ENOPROTOOPT`).
pub fn client_addr(socket: impl AsFd) -> io::Result<Option<SocketAddr>> {
    let mut peer = [0u8; PEER_LEN];
    let mut len = PEER_LEN as libc::socklen_t;
    // SAFETY: the buffer and its length are ours and outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_IP,
            TOA_SO_GET_LOOKUP,
            peer.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(decode(&peer[..(len as usize).min(PEER_LEN)]))
}

/// `getsockopt` option number of Alibaba's VTOA lookup (level `IPPROTO_IP`), which the agent
/// answers too: `struct vtoa_get_vs { u32 vid; __be32 vaddr; __be16 vport; }`.
pub const VTOA_SO_GET_VS: libc::c_int = 1345;
const VS_LEN: usize = 12;

/// What a VTOA balancer (Tencent's, Alibaba's) said of a connection besides the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    /// The client's VPC id: the option's four bytes read as a big-endian number (`toa conns`
    /// shows the same); 0 when the balancer sent none.
    pub vpc_id: u32,
    /// The virtual address the client connected to; `None` when the balancer sent none.
    pub vip: Option<std::net::SocketAddrV4>,
}

/// The VPC id and virtual address the balancer announced for this connection (`--dialect
/// tencent-vtoa` or `anolis-vtoa`), or `None` when it announced neither or no agent answers.
pub fn virtual_server(socket: impl AsFd) -> io::Result<Option<VirtualServer>> {
    let mut vs = [0u8; VS_LEN];
    let mut len = VS_LEN as libc::socklen_t;
    // SAFETY: the buffer and its length are ours and outlive the call.
    let rc = unsafe {
        libc::getsockopt(socket.as_fd().as_raw_fd(), libc::IPPROTO_IP, VTOA_SO_GET_VS, vs.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOPROTOOPT) | Some(libc::ESRCH) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(decode_vs(&vs[..(len as usize).min(VS_LEN)]))
}

fn decode_vs(vs: &[u8]) -> Option<VirtualServer> {
    if vs.len() < 10 {
        return None;
    }
    let vpc_id = u32::from_be_bytes([vs[0], vs[1], vs[2], vs[3]]);
    let ip = std::net::Ipv4Addr::new(vs[4], vs[5], vs[6], vs[7]);
    let port = u16::from_be_bytes([vs[8], vs[9]]);
    let vip = (!ip.is_unspecified()).then(|| std::net::SocketAddrV4::new(ip, port));
    Some(VirtualServer { vpc_id, vip })
}

/// The address in a `toa_nat64_peer` answer; an IPv4-mapped address is returned as IPv4.
fn decode(peer: &[u8]) -> Option<SocketAddr> {
    if peer.len() < PEER_MIN {
        return None;
    }
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&peer[..16]);
    let ip = Ipv6Addr::from(addr);
    let port = u16::from_be_bytes([peer[16], peer[17]]);
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(v4.into(), port),
        None => SocketAddrV6::new(ip, port, 0, 0).into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_mapped_and_plain_ipv6() {
        let mut peer = [0u8; PEER_LEN];
        peer[10] = 0xff;
        peer[11] = 0xff;
        peer[12..16].copy_from_slice(&[203, 0, 113, 7]);
        peer[16..18].copy_from_slice(&4242u16.to_be_bytes());
        assert_eq!(decode(&peer), Some("203.0.113.7:4242".parse().unwrap()));

        let mut peer = [0u8; PEER_LEN];
        peer[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        peer[15] = 7;
        peer[16..18].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(decode(&peer), Some("[2001:db8::7]:80".parse().unwrap()));
    }

    #[test]
    fn decodes_a_virtual_server() {
        let vs = [0, 1, 0xe2, 0x40, 192, 0, 2, 10, 0x01, 0xbb, 0, 0];
        let expected = VirtualServer { vpc_id: 123_456, vip: Some("192.0.2.10:443".parse().unwrap()) };
        assert_eq!(decode_vs(&vs), Some(expected));
        assert_eq!(decode_vs(&[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap().vip, None);
        assert_eq!(decode_vs(&vs[..9]), None);
    }

    #[test]
    fn short_answer_is_no_client() {
        assert_eq!(decode(&[0u8; PEER_MIN - 1]), None);
    }

    /// Not a socket: an error, never a made-up client.
    #[test]
    fn not_a_socket_is_an_error() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = client_addr(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
