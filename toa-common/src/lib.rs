//! Types shared by the `toa` eBPF programs and userspace, and the TCP option parser.
//!
//! Everything here is `no_std` and free of allocation so that the eBPF programs and the host
//! (unit tests, fuzzing, userspace) run the very same code.
#![no_std]

pub mod config;
pub mod counters;
pub mod decide;
pub mod parse;
pub mod probe;
#[cfg(feature = "reference")]
pub mod reference;
#[cfg(not(target_arch = "bpf"))]
pub mod table;
pub mod udp;

pub use config::AgentConfig;
pub use counters::Counter;
pub use decide::{decide, Verdict};
pub use parse::{find_toa, scan_toa, OptionArea, Outcome, Parsed, OPTION_AREA_MAX, OPTION_BUF_LEN, TOA_KIND};

/// The `getsockopt(fd, IPPROTO_IP, …)` option number of the NAT64 lookup (the one the existing
/// nginx/OpenResty patches use); `toa-client` asks it, the getsockopt hook answers it.
pub const TOA_SO_GET_LOOKUP: i32 = 4096;
/// Alibaba's VTOA lookup, `getsockopt(fd, IPPROTO_IP, VTOA_SO_GET_VS, &vs, &len)` with
/// `struct vtoa_get_vs { u32 vid; __be32 vaddr; __be16 vport; }` (12 bytes with padding): the
/// VPC id (the option's four bytes as sent) and the virtual address of the connection.
pub const VTOA_SO_GET_VS: i32 = 1345;
/// Size of `struct vtoa_get_vs`.
pub const VTOA_VS_LEN: usize = 12;
/// The same lookup as OceanBase's servers ask it: `struct vtoa_get_vs4rds { u16 protocol; __be32
/// caddr; __be16 cport; __be32 daddr; __be16 dport; struct vtoa_vs entrytable; }`, which the
/// caller fills with its `getpeername()` and `getsockname()` and the module completes with the
/// `vtoa_vs` at its end (the call must give exactly [`VTOA_VS4RDS_LEN`] bytes).
pub const VTOA_SO_GET_VS4RDS: i32 = 1346;
/// Size of `struct vtoa_get_vs4rds` with its one `vtoa_vs` (20 + 12 bytes, C layout).
pub const VTOA_VS4RDS_LEN: usize = 32;
/// ByteDance's VNI lookup (its TOA module's header): `getsockopt(fd, IPPROTO_IP, TOA_SO_GET_VNI,
/// &vni, &len)` gives the client's VPC (VNI) as a native unsigned int, `len` at least 4.
pub const TOA_SO_GET_VNI: i32 = 2064;

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;

/// `AF_INET`, as the kernel and the option parser use it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// The client address carried by a TOA option, as stored per socket.
///
/// Ports and addresses stay in network byte order, exactly as on the wire; an IPv4 address
/// occupies the first four bytes of `addr` and the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientAddr {
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Port, network byte order (meaningful with `CLIENT_HAS_PORT`).
    pub port: [u8; 2],
    /// Address, network byte order.
    pub addr: [u8; 16],
    /// The virtual IP the client connected to (with `CLIENT_HAS_VIP`).
    pub vip_port: [u8; 2],
    pub vip_addr: [u8; 4],
    /// `CLIENT_*` bits.
    pub flags: u8,
    /// The VPC the client is in (Tencent's and Alibaba's VTOA; with `CLIENT_HAS_VPC`): the
    /// option's four bytes as sent (Alibaba's 3-byte IPv6 one as a big-endian number).
    pub vpc_id: [u8; 4],
    pub _pad: [u8; 1],
}

const _: () = assert!(core::mem::size_of::<ClientAddr>() == 32);

/// Equal when they say the same: a part whose flag is unset (the virtual address, the VPC id)
/// may hold bytes from an option read before, which mean nothing.
impl PartialEq for ClientAddr {
    fn eq(&self, other: &Self) -> bool {
        let vip = |c: &Self| (c.flags & CLIENT_HAS_VIP != 0).then_some((c.vip_port, c.vip_addr));
        let vpc = |c: &Self| (c.flags & CLIENT_HAS_VPC != 0).then_some(c.vpc_id);
        (self.family, self.port, self.addr, self.flags) == (other.family, other.port, other.addr, other.flags)
            && vip(self) == vip(other)
            && vpc(self) == vpc(other)
    }
}

impl Eq for ClientAddr {}

/// The option carried a port (Alibaba CDN's does not: the kernel's port stays).
pub const CLIENT_HAS_PORT: u8 = 1;
/// The virtual IP is known (ByteDance's layout; Tencent's and Alibaba's VTOA).
pub const CLIENT_HAS_VIP: u8 = 2;
/// The VPC id is known (Tencent's and Alibaba's VTOA).
pub const CLIENT_HAS_VPC: u8 = 4;

/// What the agent keeps for one socket (BPF socket storage, freed with the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    pub client: ClientAddr,
    /// `STATE_FOUND` once `client` holds the address (storage exists only then).
    pub state: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<SockState>() == 36);

/// `client` holds the address given by the load balancer.
pub const STATE_FOUND: u8 = 2;

/// The agent looks for the option until the connection has received this many segments
/// (handshake included): balancers that use data segments put it on the first one or two.
pub const SEARCH_SEGMENTS_IN: u32 = 8;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data with no padding holes and no pointers.
    unsafe impl aya::Pod for super::ClientAddr {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::probe::ProbeConfig {}
    unsafe impl aya::Pod for super::config::AgentConfig {}
    unsafe impl aya::Pod for super::udp::FlowKey {}
    unsafe impl aya::Pod for super::udp::Flow {}
    unsafe impl aya::Pod for super::udp::ReplyKey {}
    unsafe impl aya::Pod for super::udp::Reply {}
    unsafe impl aya::Pod for super::udp::UdpConfig {}
    unsafe impl aya::Pod for super::udp::OppAttachment {}
}
