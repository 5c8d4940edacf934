//! The UDP path (attached only with `--udp`): DPVS's UOA in a datagram's IPv4 options, or over
//! IPv6 in a Destination Options header.
//!
//! - `toa_udp_in` (cgroup ingress) reads the options of each UDP datagram delivered to a socket
//!   of the cgroup and records the flow's client for that socket;
//! - `toa_udp_recv4/6` make `recvfrom()`/`recvmsg()` return the client instead of the balancer
//!   (on IPv4 and dual-stack sockets), and record the way back to the balancer for it;
//! - `toa_udp_send4/6` send a reply addressed to that client to its balancer instead, so an
//!   unmodified server answers through the balancer as before;
//! - `toa_udp_conn4/6` connect a socket the server connects to such a client to its balancer
//!   instead, and give it the flow (the getpeername programs then show the client for it).
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
    config::v4_mapped,
    parse::WITH_UOA,
    scan_toa,
    udp::{dstopt_uoa, DstOptUoa, Flow, FlowKey, Reply, ReplyKey, UdpCounter},
    ClientAddr, OptionArea, Outcome, AF_INET, AF_INET6, CLIENT_HAS_PORT, OPTION_AREA_MAX,
};

use crate::{
    getpeername::ipv4,
    maps::{count_udp, mapped, trusted, udp_config, TOA_UDP_FLOWS, TOA_UDP_REPLIES, TOA_UDP_SCRATCH},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV4_HEADER_MIN: usize = 20;
const IPV6_HEADER: usize = 40;
const SOCK_DGRAM: u32 = 2;

#[cgroup_skb(ingress)]
pub fn toa_udp_in(ctx: SkBuffContext) -> i32 {
    if may_carry_uoa(&ctx) {
        record(&ctx);
    }
    // Always deliver the datagram.
    1
}

/// Whether the packet may be UDP with IPv4 options or with an IPv6 Destination Options header,
/// read from its linear data with no helper call and no map lookup: this program runs for every
/// packet delivered in the cgroup, TCP included, and nearly none is one. A header that is not in
/// the linear data takes the longer way (`record` checks it all again).
#[inline(always)]
fn may_carry_uoa(ctx: &SkBuffContext) -> bool {
    // SAFETY: data and data_end are readable fields of the context (the network header on).
    let (data, end) = unsafe { ((*ctx.skb.skb).data as usize, (*ctx.skb.skb).data_end as usize) };
    match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP if data + 10 <= end => {
            // SAFETY: bytes 0 and 9 are inside the linear data (checked against data_end).
            let (version_ihl, protocol) = unsafe { (*(data as *const u8), *((data + 9) as *const u8)) };
            version_ihl >> 4 == 4 && version_ihl & 0x0f > 5 && protocol == IPPROTO_UDP
        }
        // SAFETY: byte 6 (next header) is inside the linear data (checked against data_end).
        ETH_P_IPV6 if data + 7 <= end => (unsafe { *((data + 6) as *const u8) }) == IPPROTO_DSTOPTS,
        ETH_P_IP | ETH_P_IPV6 => true,
        _ => false,
    }
}

/// Records the client of a UDP datagram that carries a UOA from a trusted balancer.
#[inline(always)]
fn record(ctx: &SkBuffContext) -> Option<()> {
    let udp = udp_config()?;
    let area = TOA_UDP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program.
    let area = unsafe { &mut *area };
    // Each family's front end copies the option list into `area` and gives the UDP ports; one
    // parse serves both. Nothing else of theirs is live across it (the family waits in the
    // area's memory): the verifier then finds the same state after either and walks the parse
    // once.
    let ports = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => ipv4_options(ctx, area)?,
        ETH_P_IPV6 => ipv6_destination_options(ctx, area)?,
        _ => return None,
    };
    // The agent's policy as the UDP parse reads it (kind 31, ByteDance's layouts), in map memory.
    let cfg = &udp.parse;
    let (peer_port, local_port) = ([ports[0], ports[1]], [ports[2], ports[3]]);
    if !cfg.port_allowed(u16::from_be_bytes(local_port)) {
        return None;
    }
    match scan_toa::<WITH_UOA>(area, cfg) {
        Outcome::Found => {}
        Outcome::Absent => return None,
        Outcome::Malformed => {
            count_udp(UdpCounter::UdpOptionMalformed);
            return None;
        }
    }
    // SAFETY: a plain field of the scratch area, written by the front end.
    let (peer, local): ([u8; 16], [u8; 16]) = if unsafe { core::ptr::read_volatile(&area.kept) } == IPV6_AREA {
        (ctx.load(8).ok()?, ctx.load(24).ok()?)
    } else {
        let (peer, local): ([u8; 4], [u8; 4]) = (ctx.load(12).ok()?, ctx.load(16).ok()?);
        (mapped(u32::from_ne_bytes(peer)), mapped(u32::from_ne_bytes(local)))
    };
    if !cfg.trusts(|| trusted(peer)) {
        count_udp(UdpCounter::UdpUntrustedOption);
        return None;
    }
    // SAFETY: on ingress the context's socket is the one the datagram is delivered to.
    let socket = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = Flow { client: area.last, local_addr: local, seen_ns: now };
    TOA_UDP_FLOWS.insert(FlowKey { peer_addr: peer, peer_port, _pad: [0; 6], socket }, flow, 0).ok()?;
    count_udp(UdpCounter::UdpOption);
    Some(())
}

/// The scratch area's `kept` after an IPv6 front end (0 after the IPv4 one).
const IPV6_AREA: u32 = 6;

/// Records in the scratch area which front end filled it.
#[inline(always)]
fn keep_family(area: &mut OptionArea, family: u32) {
    // SAFETY: a plain field of the scratch area.
    unsafe { core::ptr::write_volatile(&mut area.kept, family) };
}

/// An IPv4 UDP datagram with options: its options (into `area`) and its UDP ports.
#[inline(always)]
fn ipv4_options(ctx: &SkBuffContext, area: &mut OptionArea) -> Option<[u8; 4]> {
    // Cheapest test first: most packets carry no IPv4 options at all.
    let version_ihl: u8 = ctx.load(0).ok()?;
    let header_len = (version_ihl & 0x0f) as usize * 4;
    if version_ihl >> 4 != 4 || header_len <= IPV4_HEADER_MIN || ctx.load::<u8>(9).ok()? != IPPROTO_UDP {
        return None;
    }
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
    keep_family(area, 0);
    ctx.load(header_len).ok()
}

/// An IPv6 UDP datagram whose Destination Options header (right after the IPv6 header) starts
/// with a UOA (ByteDance's over IPv6, or DPVS's as `toa_udp_opp` wraps it): the option list the
/// IPv4 layouts give (into `area`), for the same parse, and its UDP ports.
#[inline(always)]
fn ipv6_destination_options(ctx: &SkBuffContext, area: &mut OptionArea) -> Option<[u8; 4]> {
    if ctx.load::<u8>(6).ok()? != IPPROTO_DSTOPTS {
        return None;
    }
    // Next header, header length (8-byte units after the first 8), the first option's type and
    // length.
    let head: [u8; 4] = ctx.load(IPV6_HEADER).ok()?;
    if head[0] != IPPROTO_UDP {
        return None;
    }
    let uoa = dstopt_uoa(head[2], head[3])?;
    let header_len = (head[1] as usize + 1) * 8;
    let data = head[3] as usize;
    if 4 + data > header_len {
        count_udp(UdpCounter::UdpOptionMalformed);
        return None;
    }
    // Where the option's data goes in `area`: after the IPv4 layout's header for ByteDance's.
    let at = match uoa {
        DstOptUoa::Wrapped => 0,
        DstOptUoa::ByteDance(ipv4_header) => {
            area.bytes[..4].copy_from_slice(&ipv4_header);
            4
        }
    };
    // One copy of a constant size per length dstopt_uoa accepts: the helper refuses a size the
    // verifier cannot prove non-zero, and 5.15's loses the lower bound of a range check.
    let dst = area.bytes.as_mut_ptr().wrapping_add(at).cast();
    let src = (IPV6_HEADER + 4) as u32;
    let skb = ctx.skb.skb.cast();
    // SAFETY: at most 36 bytes from offset 0 or 4 of the 96-byte buffer; the helper checks the
    // packet's bounds.
    let copied = unsafe {
        match data {
            8 => bpf_skb_load_bytes(skb, src, dst, 8),
            12 => bpf_skb_load_bytes(skb, src, dst, 12),
            20 => bpf_skb_load_bytes(skb, src, dst, 20),
            28 => bpf_skb_load_bytes(skb, src, dst, 28),
            36 => bpf_skb_load_bytes(skb, src, dst, 36),
            _ => return None,
        }
    };
    if copied != 0 {
        return None;
    }
    area.set_len(at + data);
    keep_family(area, IPV6_AREA);
    ctx.load(IPV6_HEADER + header_len).ok()
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
    show_client(ctx.sock_addr, Family::V4);
    // recvmsg programs must allow the call.
    1
}

/// Dual-stack and IPv6 sockets: an IPv4 datagram's source is `::ffff:a.b.c.d` there.
#[cgroup_sock_addr(recvmsg6)]
pub fn toa_udp_recv6(ctx: SockAddrContext) -> i32 {
    show_client(ctx.sock_addr, Family::V6);
    1
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The context's address (`user_ip4` as `::ffff:a.b.c.d`, or `user_ip6`) and port, network order.
#[inline(always)]
fn user_addr(sa: *mut bpf_sock_addr, family: Family) -> ([u8; 16], [u8; 2]) {
    // SAFETY: user_ip4/user_ip6 and user_port are readable in recvmsg and sendmsg programs; one
    // 4-byte load at a constant offset per word, the only access the verifier allows.
    unsafe {
        let port = ((*sa).user_port as u16).to_ne_bytes();
        if family == Family::V4 {
            return (mapped((*sa).user_ip4), port);
        }
        let w = |i: usize| core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[i])).to_ne_bytes();
        let (a, b, c, d) = (w(0), w(1), w(2), w(3));
        ([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]], port)
    }
}

/// Writes the context's address and port: IPv4 sockets take only an IPv4 address (false
/// otherwise, and nothing is written).
#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, family: Family, addr: &[u8; 16], port: [u8; 2]) -> bool {
    if family == Family::V4 && !is_mapped(addr) {
        return false;
    }
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // SAFETY: user_ip4/user_ip6 and user_port are writable in recvmsg and sendmsg programs.
    unsafe {
        if family == Family::V4 {
            (*sa).user_ip4 = w(12);
        } else {
            (*sa).user_ip6 = [w(0), w(4), w(8), w(12)];
        }
        (*sa).user_port = u16::from_ne_bytes(port) as u32;
    }
    true
}

/// Whether `addr` is an IPv4 address (`::ffff:a.b.c.d`).
#[inline(always)]
fn is_mapped(addr: &[u8; 16]) -> bool {
    v4_mapped([addr[12], addr[13], addr[14], addr[15]]) == *addr
}

/// A client as the socket API shows it: IPv4 as `::ffff:a.b.c.d`, IPv6 as is.
#[inline(always)]
fn shown(client: &ClientAddr) -> [u8; 16] {
    if client.family == AF_INET {
        v4_mapped(ipv4(&client.addr))
    } else {
        client.addr
    }
}

/// Replaces the balancer that sent a datagram with the flow's client, and records the way back.
#[inline(always)]
fn show_client(sa: *mut bpf_sock_addr, family: Family) -> Option<()> {
    let udp = udp_config()?;
    let local_port = local_port(sa)?;
    let (peer_addr, peer_port) = user_addr(sa, family);
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
    let client_addr = shown(&client);
    // The client is shown only where a reply to it can be sent back to the balancer: a client
    // of the balancer's own family. An IPv6 client of an IPv4 balancer does not fit an IPv4
    // socket, and on a dual-stack one the kernel refuses a reply whose IPv6 destination a
    // program turns into an IPv4-mapped one (udpv6_sendmsg: ENOTSUPP); an IPv4 client of an IPv6
    // balancer is answered through the IPv4 path, which cannot reach an IPv6 balancer. Either
    // way the application would see a client it cannot answer. (Kind 31 always carries a port.)
    if (client.family == AF_INET) != is_mapped(&peer_addr) || client.flags & CLIENT_HAS_PORT == 0 {
        count_udp(UdpCounter::UdpRecvMismatch);
        return None;
    }
    // The way back first: a reply may follow as soon as the application has the client.
    // SAFETY: the context of a sock_addr program.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let key = ReplyKey { client_addr, client_port: client.port, local_port, _pad: [0; 4], netns };
    match TOA_UDP_REPLIES.get_ptr_mut(key) {
        // SAFETY: a value of this map. The usual case: only the time to refresh, in place.
        Some(old) if unsafe { (*old).peer_addr == peer_addr && (*old).peer_port == peer_port } => unsafe {
            (*old).seen_ns = now;
        },
        old => {
            // SAFETY: a value of this map.
            if old.is_some_and(|old| udp.fresh(unsafe { (*old).seen_ns }, now)) {
                count_udp(UdpCounter::UdpReplyConflict);
            }
            TOA_UDP_REPLIES.insert(key, Reply { peer_addr, peer_port, _pad: [0; 6], seen_ns: now }, 0).ok()?;
        }
    }
    set_user_addr(sa, family, &client_addr, client.port);
    // A flow stays alive while it is used, as DPVS's module does on lookups.
    flow.seen_ns = now;
    count_udp(UdpCounter::UdpRecvClient);
    Some(())
}

#[cgroup_sock_addr(sendmsg4)]
pub fn toa_udp_send4(ctx: SockAddrContext) -> i32 {
    to_balancer(ctx.sock_addr, Family::V4);
    // 1: send (0 would fail the call with EPERM).
    1
}

/// Replies to IPv6 clients (of IPv6 balancers). A dual-stack socket's reply to `::ffff:a.b.c.d`
/// never gets here: the kernel sends it through the IPv4 path and its sendmsg4 hook.
#[cgroup_sock_addr(sendmsg6)]
pub fn toa_udp_send6(ctx: SockAddrContext) -> i32 {
    to_balancer(ctx.sock_addr, Family::V6);
    1
}

/// Sends a reply addressed to a client of a recorded flow to its balancer.
#[inline(always)]
fn to_balancer(sa: *mut bpf_sock_addr, family: Family) -> Option<()> {
    let (reply, now) = reply_to(sa, family)?;
    // A sendmsg6 program may not turn the destination into an IPv4 one (ENOTSUPP).
    if family == Family::V6 && is_mapped(&reply.peer_addr) {
        return None;
    }
    if set_user_addr(sa, family, &reply.peer_addr, reply.peer_port) {
        reply.seen_ns = now;
        count_udp(UdpCounter::UdpReplyRedirected);
    }
    Some(())
}

/// The way back to the balancer for the context's destination, when that is a client shown on
/// this socket's port in this network namespace and the record is fresh (an expired one is
/// counted and left alone); with the time.
#[inline(always)]
fn reply_to(sa: *mut bpf_sock_addr, family: Family) -> Option<(&'static mut Reply, u64)> {
    let udp = udp_config()?;
    let local_port = local_port(sa)?;
    let (client_addr, client_port) = user_addr(sa, family);
    // SAFETY: the context of a sock_addr program.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let reply = TOA_UDP_REPLIES.get_ptr_mut(ReplyKey { client_addr, client_port, local_port, _pad: [0; 4], netns })?;
    // SAFETY: a value of this map, valid for the rest of this program's run.
    let reply = unsafe { &mut *reply };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !udp.fresh(reply.seen_ns, now) {
        count_udp(UdpCounter::UdpExpired);
        return None;
    }
    Some((reply, now))
}

#[cgroup_sock_addr(connect4)]
pub fn toa_udp_conn4(ctx: SockAddrContext) -> i32 {
    connect_to_balancer(ctx.sock_addr, Family::V4);
    // 1: connect (0 would fail the call with EPERM).
    1
}

#[cgroup_sock_addr(connect6)]
pub fn toa_udp_conn6(ctx: SockAddrContext) -> i32 {
    connect_to_balancer(ctx.sock_addr, Family::V6);
    1
}

/// A UDP socket connected to a client it was shown (a server that opens a socket per client)
/// is connected to the client's balancer instead, and gets the flow as its own: `recv()` and
/// `getpeername()` on it show the client, and `send()` reaches the balancer.
#[inline(always)]
fn connect_to_balancer(sa: *mut bpf_sock_addr, family: Family) -> Option<()> {
    let (client_addr, client_port) = user_addr(sa, family);
    let (reply, now) = reply_to(sa, family)?;
    let reply = *reply;
    // The client as the flow keeps it: IPv4 in the first four bytes.
    let (family_of_client, addr) = if is_mapped(&client_addr) {
        let a = &client_addr;
        (AF_INET, [a[12], a[13], a[14], a[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    } else {
        (AF_INET6, client_addr)
    };
    let client = ClientAddr {
        family: family_of_client,
        port: client_port,
        addr,
        vip_port: [0; 2],
        vip_addr: [0; 4],
        flags: CLIENT_HAS_PORT,
        vpc_id: [0; 4],
        _pad: [0; 1],
    };
    // SAFETY: the context of a sock_addr program.
    let socket = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = FlowKey { peer_addr: reply.peer_addr, peer_port: reply.peer_port, _pad: [0; 6], socket };
    TOA_UDP_FLOWS.insert(key, Flow { client, local_addr: [0; 16], seen_ns: now }, 0).ok()?;
    if set_user_addr(sa, family, &reply.peer_addr, reply.peer_port) {
        count_udp(UdpCounter::UdpConnected);
    }
    Some(())
}

/// `getpeername()` on a UDP socket connected to a balancer (by `connect_to_balancer`): the
/// client of its flow. True when answered.
#[inline(always)]
pub fn show_udp_peer(sa: *mut bpf_sock_addr, family: Family) -> bool {
    peer_client(sa, family).is_some()
}

#[inline(always)]
fn peer_client(sa: *mut bpf_sock_addr, family: Family) -> Option<()> {
    // The socket's type first: this runs in front of every getpeername(), TCP's included.
    local_port(sa)?;
    let udp = udp_config()?;
    let (peer_addr, peer_port) = user_addr(sa, family);
    // SAFETY: the context of a sock_addr program.
    let socket = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let flow = TOA_UDP_FLOWS.get_ptr(FlowKey { peer_addr, peer_port, _pad: [0; 6], socket })?;
    // SAFETY: a value of this map.
    let flow = unsafe { *flow };
    // SAFETY: a helper without arguments.
    if !udp.fresh(flow.seen_ns, unsafe { bpf_ktime_get_ns() }) {
        return None;
    }
    set_user_addr(sa, family, &shown(&flow.client), flow.client.port).then_some(())?;
    count_udp(UdpCounter::UdpPeername);
    Some(())
}
