//! The client address of a socket, for applications, whatever the families: the NAT64 case
//! (an IPv6 client behind a balancer that talks IPv4 to this host) included, where
//! `getpeername()` cannot hold the client.
//!
//! It asks the kernel with `getsockopt(fd, IPPROTO_IP, TOA_SO_GET_LOOKUP = 4096)`, the call the
//! existing NAT64 patches of nginx/OpenResty make, which the agent's getsockopt hook answers.
//! No privileges needed; works on `std` and `tokio` sockets alike (anything `AsFd`).
//!
//! ```no_run
//! let listener = std::net::TcpListener::bind("0.0.0.0:8080")?;
//! let (stream, _) = listener.accept()?;
//! if let Some(client) = toa::client_addr(&stream)? {
//!     println!("client {client}");
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::{
    io,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsFd, AsRawFd as _},
};

/// The option number of the NAT64 lookup.
pub const TOA_SO_GET_LOOKUP: libc::c_int = 4096;

/// The client the load balancer announced for this connection, or `None` when it announced
/// none (or the agent is not loaded).
pub fn client_addr(socket: impl AsFd) -> io::Result<Option<SocketAddr>> {
    // struct toa_nat64_peer { struct in6_addr saddr; uint16_t port; } (20 bytes with padding)
    let mut peer = [0u8; 20];
    let mut len = peer.len() as libc::socklen_t;
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
        // The kernel's own answer to an option it does not know: no client address.
        return match err.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(err),
        };
    }
    if (len as usize) < 18 {
        return Ok(None);
    }
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&peer[..16]);
    let ip = Ipv6Addr::from(addr);
    let port = u16::from_be_bytes([peer[16], peer[17]]);
    Ok(Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(v4.into(), port),
        None => SocketAddrV6::new(ip, port, 0, 0).into(),
    }))
}
