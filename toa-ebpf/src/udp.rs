//! The UDP path (attached only with `--udp`): DPVS's UOA in a datagram's IPv4 options.
//!
//! - `toa_udp_in` (cgroup ingress) reads the options of each UDP datagram delivered to a socket
//!   of the cgroup and records the flow's client for that socket;
//! - `toa_udp_recv4` makes `recvfrom()`/`recvmsg()` return the client instead of the balancer,
//!   and records the way back to the balancer for that client;
//! - `toa_udp_send4` sends a reply addressed to that client to its balancer instead, so an
//!   unmodified server answers through the balancer as before.
//!
//! The datagram itself is never changed: the kernel ignores an IP option it does not know.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skb_load_bytes},
    },
    macros::{cgroup_skb, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext},
};
use toa_common::{
    scan_toa,
    udp::{uoa_config, Flow, FlowKey, Reply, ReplyKey, UdpCounter},
    Outcome, AF_INET, CLIENT_HAS_PORT, OPTION_AREA_MAX,
};

use crate::{
    getpeername::ipv4,
    maps::{config, count_udp, mapped, trusted, udp_config, TOA_UDP_FLOWS, TOA_UDP_REPLIES, TOA_UDP_SCRATCH},
};

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const IPV4_HEADER_MIN: usize = 20;
const SOCK_DGRAM: u32 = 2;

#[cgroup_skb(ingress)]
pub fn toa_udp_in(ctx: SkBuffContext) -> i32 {
    record(&ctx);
    // Always deliver the datagram.
    1
}

/// Records the client of a UDP datagram that carries a UOA from a trusted balancer.
#[inline(always)]
fn record(ctx: &SkBuffContext) -> Option<()> {
    udp_config()?;
    if u16::from_be(ctx.skb.protocol() as u16) != ETH_P_IP {
        return None;
    }
    // Cheapest test first: most packets carry no IPv4 options at all.
    let version_ihl: u8 = ctx.load(0).ok()?;
    let header_len = (version_ihl & 0x0f) as usize * 4;
    if version_ihl >> 4 != 4 || header_len <= IPV4_HEADER_MIN || ctx.load::<u8>(9).ok()? != IPPROTO_UDP {
        return None;
    }
    let cfg = config()?;
    let ports: [u8; 4] = ctx.load(header_len).ok()?;
    let (peer_port, local_port) = ([ports[0], ports[1]], [ports[2], ports[3]]);
    if !cfg.port_allowed(u16::from_be_bytes(local_port)) {
        return None;
    }
    let area = TOA_UDP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program.
    let area = unsafe { &mut *area };
    let options = header_len - IPV4_HEADER_MIN;
    if options == 0 || options > OPTION_AREA_MAX {
        return None;
    }
    // SAFETY: at most 40 bytes into the 96-byte buffer; the helper checks the packet's bounds.
    let copied = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb.cast(), IPV4_HEADER_MIN as u32, area.bytes.as_mut_ptr().cast(), options as u32)
    };
    if copied != 0 {
        return None;
    }
    area.set_len(options);
    let ucfg = uoa_config(cfg);
    match scan_toa(area, &ucfg) {
        Outcome::Found => {}
        Outcome::Absent => return None,
        Outcome::Malformed => {
            count_udp(UdpCounter::UdpOptionMalformed);
            return None;
        }
    }
    let peer: [u8; 4] = ctx.load(12).ok()?;
    let local: [u8; 4] = ctx.load(16).ok()?;
    let peer = mapped(u32::from_ne_bytes(peer));
    if !ucfg.trusts(|| trusted(peer)) {
        count_udp(UdpCounter::UdpUntrustedOption);
        return None;
    }
    // SAFETY: on ingress the context's socket is the one the datagram is delivered to.
    let socket = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = Flow { client: area.last, local_addr: mapped(u32::from_ne_bytes(local)), seen_ns: now };
    TOA_UDP_FLOWS.insert(FlowKey { peer_addr: peer, peer_port, _pad: [0; 6], socket }, flow, 0).ok()?;
    count_udp(UdpCounter::UdpOption);
    Some(())
}

/// The local port of a UDP socket (network byte order), if bound.
#[inline(always)]
fn local_port(sa: *mut bpf_sock_addr) -> Option<[u8; 2]> {
    // SAFETY: `sa` is the context; type and sk are readable in these hooks.
    let (ty, sk) = unsafe { ((*sa).type_, (*sa).__bindgen_anon_1.sk) };
    if ty != SOCK_DGRAM || sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket of the context; src_port (host order) is readable.
    let port = unsafe { (*(sk as *const bpf_sock)).src_port } as u16;
    (port != 0).then(|| port.to_be_bytes())
}

#[cgroup_sock_addr(recvmsg4)]
pub fn toa_udp_recv4(ctx: SockAddrContext) -> i32 {
    show_client(ctx.sock_addr);
    // recvmsg programs must allow the call.
    1
}

/// Replaces the balancer that sent a datagram with the flow's client, and records the way back.
#[inline(always)]
fn show_client(sa: *mut bpf_sock_addr) -> Option<()> {
    let udp = udp_config()?;
    let local_port = local_port(sa)?;
    // SAFETY: user_ip4 and user_port (the datagram's source) are readable in recvmsg4.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let (peer_addr, peer_port) = (mapped(ip), (port as u16).to_ne_bytes());
    // SAFETY: the context of a sock_addr program.
    let socket = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let flow = TOA_UDP_FLOWS.get_ptr_mut(FlowKey { peer_addr, peer_port, _pad: [0; 6], socket })?;
    // SAFETY: a value of this map.
    let flow = unsafe { &mut *flow };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !udp.fresh(flow.seen_ns, now) {
        count_udp(UdpCounter::UdpExpired);
        return None;
    }
    let client = flow.client;
    if client.family != AF_INET || client.flags & CLIENT_HAS_PORT == 0 {
        count_udp(UdpCounter::UdpRecvMismatch);
        return None;
    }
    // The way back first: a reply may follow as soon as the application has the client.
    // SAFETY: the context of a sock_addr program.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let client_addr = mapped(u32::from_ne_bytes(ipv4(&client.addr)));
    let key = ReplyKey { client_addr, client_port: client.port, local_port, _pad: [0; 4], netns };
    if let Some(old) = TOA_UDP_REPLIES.get_ptr(key) {
        // SAFETY: a value of this map.
        let old = unsafe { &*old };
        if (old.peer_addr != peer_addr || old.peer_port != peer_port) && udp.fresh(old.seen_ns, now) {
            count_udp(UdpCounter::UdpReplyConflict);
        }
    }
    TOA_UDP_REPLIES.insert(key, Reply { peer_addr, peer_port, _pad: [0; 6], seen_ns: now }, 0).ok()?;
    // SAFETY: user_ip4 and user_port are writable in recvmsg4.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(ipv4(&client.addr));
        (*sa).user_port = u16::from_ne_bytes(client.port) as u32;
    }
    // A flow stays alive while it is used, as DPVS's module does on lookups.
    flow.seen_ns = now;
    count_udp(UdpCounter::UdpRecvClient);
    Some(())
}

#[cgroup_sock_addr(sendmsg4)]
pub fn toa_udp_send4(ctx: SockAddrContext) -> i32 {
    to_balancer(ctx.sock_addr);
    // 1: send (0 would fail the call with EPERM).
    1
}

/// Sends a reply addressed to a client of a recorded flow to its balancer.
#[inline(always)]
fn to_balancer(sa: *mut bpf_sock_addr) -> Option<()> {
    let udp = udp_config()?;
    let local_port = local_port(sa)?;
    // SAFETY: user_ip4 and user_port (the destination) are readable in sendmsg4.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    // SAFETY: the context of a sock_addr program.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let key =
        ReplyKey { client_addr: mapped(ip), client_port: (port as u16).to_ne_bytes(), local_port, _pad: [0; 4], netns };
    let reply = TOA_UDP_REPLIES.get_ptr_mut(key)?;
    // SAFETY: a value of this map.
    let reply = unsafe { &mut *reply };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !udp.fresh(reply.seen_ns, now) {
        count_udp(UdpCounter::UdpExpired);
        return None;
    }
    let peer = reply.peer_addr;
    // SAFETY: user_ip4 and user_port are writable in sendmsg4.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes([peer[12], peer[13], peer[14], peer[15]]);
        (*sa).user_port = u16::from_ne_bytes(reply.peer_port) as u32;
    }
    reply.seen_ns = now;
    count_udp(UdpCounter::UdpReplyRedirected);
    Some(())
}
