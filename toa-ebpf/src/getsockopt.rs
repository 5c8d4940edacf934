//! cgroup getsockopt hook: the NAT64 lookup of the existing nginx/OpenResty patches, Alibaba's
//! VTOA lookups (`VTOA_SO_GET_VS`, and `VTOA_SO_GET_VS4RDS` as OceanBase's servers ask it: VPC
//! id and virtual address) and ByteDance's `TOA_SO_GET_VNI` (the VPC id alone).
//!
//! `getsockopt(fd, IPPROTO_IP, TOA_SO_GET_LOOKUP, &peer, &len)` with
//! `struct toa_nat64_peer { struct in6_addr saddr; uint16_t port; }` (20 bytes with padding,
//! port in network order). The kernel answers ENOPROTOOPT for this unknown option first; the
//! hook then replaces that answer when the socket has a client address. An IPv4 client comes back
//! as ::ffff:a.b.c.d, so one call serves every family.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sockopt},
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use toa_common::{
    config::FLAG_REWRITE_SOCKNAME, ClientAddr, Counter, AF_INET, CLIENT_HAS_PORT, CLIENT_HAS_VIP, CLIENT_HAS_VPC,
    IPPROTO_TCP, TOA_SO_GET_LOOKUP, TOA_SO_GET_VNI, VTOA_SO_GET_VS, VTOA_SO_GET_VS4RDS, VTOA_VS4RDS_LEN, VTOA_VS_LEN,
};

use crate::{
    getpeername::ip6_words,
    maps::{config, count, socks},
};

const SOL_IP: i32 = 0;
const PEER_LEN: usize = 20;

#[cgroup_sockopt(getsockopt)]
pub fn toa_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the context's fields are readable; sk, optval and optval_end are checked below.
    unsafe { answer(ctx.sockopt) };
    // Always allow the call (returning 0 would fail it with EPERM).
    1
}

/// Answers the lookup in place of the kernel's ENOPROTOOPT when the socket has a client.
///
/// # Safety
/// `opt` is the context the kernel passed to a cgroup getsockopt program.
#[inline(always)]
unsafe fn answer(opt: *mut bpf_sockopt) {
    // SAFETY: level, optname, sk, optval and optval_end are readable in every getsockopt call.
    let (level, optname, sk, start, end) = unsafe {
        (
            (*opt).level,
            (*opt).optname,
            (*opt).__bindgen_anon_1.sk,
            (*opt).__bindgen_anon_2.optval as usize,
            (*opt).__bindgen_anon_3.optval_end as usize,
        )
    };
    if level != SOL_IP || !matches!(optname, TOA_SO_GET_LOOKUP | VTOA_SO_GET_VS | VTOA_SO_GET_VS4RDS | TOA_SO_GET_VNI) {
        return;
    }
    if sk.is_null() {
        return;
    }
    // SAFETY: a non-null socket and our storage map; no creation (flags 0).
    let state =
        unsafe { aya_ebpf::helpers::generated::bpf_sk_storage_get(socks(), sk.cast(), core::ptr::null_mut(), 0) };
    // SAFETY: the helper returns null or a pointer to this socket's SockState.
    let Some(state) = (unsafe { (state as *const toa_common::SockState).as_ref() }) else { return };
    if state.state != toa_common::STATE_FOUND {
        return;
    }
    let client = &state.client;
    // SAFETY (each): the same context and bounds.
    match optname {
        VTOA_SO_GET_VS => return unsafe { answer_vtoa(opt, client, start, end) },
        VTOA_SO_GET_VS4RDS => return unsafe { answer_vtoa_rds(opt, client, sk, start, end) },
        TOA_SO_GET_VNI => return unsafe { answer_vni(opt, client, start, end) },
        _ => {}
    }
    if start + PEER_LEN > end {
        return;
    }
    let words = ip6_words(client.family, &client.addr);
    let out = start as *mut u32;
    let port = if client.flags & CLIENT_HAS_PORT != 0 { client.port } else { [0, 0] };
    // SAFETY: `start + PEER_LEN <= end` was checked above: the 16 address bytes and the 4 of the
    // port (with padding) are inside the caller's buffer.
    unsafe {
        for (i, w) in words.iter().enumerate() {
            *out.add(i) = *w;
        }
        *(start as *mut [u8; 4]).add(4) = [port[0], port[1], 0, 0];
    }
    // SAFETY: the context of this call.
    unsafe { succeed(opt, PEER_LEN) };
    count(Counter::Nat64Lookup);
}

/// The `struct vtoa_vs { u32 vid; __be32 vaddr; __be16 vport; }` of a connection: the VPC id and
/// the virtual address, a part without its flag zero (as the module answers a 254 + 250 pair).
#[inline(always)]
fn vtoa_vs(client: &ClientAddr) -> [[u8; 4]; 3] {
    let (vpc, vip, port) = match (client.flags & CLIENT_HAS_VPC != 0, client.flags & CLIENT_HAS_VIP != 0) {
        (true, true) => (client.vpc_id, client.vip_addr, client.vip_port),
        (true, false) => (client.vpc_id, [0; 4], [0; 2]),
        (false, _) => ([0; 4], client.vip_addr, client.vip_port),
    };
    [vpc, vip, [port[0], port[1], 0, 0]]
}

/// Tells the kernel that the call succeeded with `len` bytes in the buffer.
///
/// # Safety
/// `opt` is the context the kernel passed to a cgroup getsockopt program.
#[inline(always)]
unsafe fn succeed(opt: *mut bpf_sockopt, len: usize) {
    // Two 4-byte stores: the context refuses the 8-byte one the compiler would merge them into.
    // SAFETY: optlen and retval are writable fields of the getsockopt context.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).optlen), len as i32);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).retval), 0);
    }
}

/// `struct vtoa_get_vs { u32 vid; __be32 vaddr; __be16 vport; }` for a connection whose option
/// carried a VPC id or a virtual address (the other left zero, as Alibaba's module answers a
/// 254 + 250 pair); otherwise the kernel's ENOPROTOOPT stays, which callers read as "no VTOA".
///
/// # Safety
/// As [`answer`]; `start..end` is the caller's buffer.
#[inline(always)]
unsafe fn answer_vtoa(opt: *mut bpf_sockopt, client: &ClientAddr, start: usize, end: usize) {
    if client.flags & (CLIENT_HAS_VIP | CLIENT_HAS_VPC) == 0 || start + VTOA_VS_LEN > end {
        return;
    }
    // SAFETY: `start + 12 <= end` was checked: three 4-byte words of the caller's buffer.
    unsafe { *(start as *mut [[u8; 4]; 3]) = vtoa_vs(client) };
    // SAFETY: the context of this call.
    unsafe { succeed(opt, VTOA_VS_LEN) };
}

/// `struct vtoa_get_vs4rds`, answered as the module does for an IPv4 client that came with a VPC
/// id or a virtual address, when the caller gives exactly its 32 bytes. The module writes only the
/// `vtoa_vs` at the end and leaves the caller's own fields; the kernel gives this hook a zeroed
/// copy instead of them (its own answer failed), so they are written back as the caller filled
/// them: TCP, the client `getpeername()` returns and the address `getsockname()` returns.
///
/// # Safety
/// As [`answer`]; `sk` is the socket of the call, `start..end` the caller's buffer.
#[inline(always)]
unsafe fn answer_vtoa_rds(opt: *mut bpf_sockopt, client: &ClientAddr, sk: *mut bpf_sock, start: usize, end: usize) {
    // SAFETY: optlen is readable: the caller's length (the kernel's answer failed).
    let len = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*opt).optlen)) };
    if client.flags & (CLIENT_HAS_VIP | CLIENT_HAS_VPC) == 0
        || client.family != AF_INET
        || len != VTOA_VS4RDS_LEN as i32
        || start + VTOA_VS4RDS_LEN > end
    {
        return;
    }
    let rewrite = config().is_some_and(|c| c.has(FLAG_REWRITE_SOCKNAME)) && client.flags & CLIENT_HAS_VIP != 0;
    let (local_addr, local_port) = if rewrite {
        (client.vip_addr, client.vip_port)
    } else {
        // Volatile: one load per field at its offset (the verifier refuses arithmetic on a socket
        // pointer, which the compiler would otherwise share between the two).
        // SAFETY: a non-null socket (checked by the caller); src_ip4 (network order) and src_port
        // (host order) are readable.
        let (addr, port) = unsafe {
            (
                core::ptr::read_volatile(core::ptr::addr_of!((*sk).src_ip4)),
                core::ptr::read_volatile(core::ptr::addr_of!((*sk).src_port)),
            )
        };
        (addr.to_ne_bytes(), (port as u16).to_be_bytes())
    };
    let port = if client.flags & CLIENT_HAS_PORT != 0 { client.port } else { [0, 0] };
    let [vpc, vip, vport] = vtoa_vs(client);
    let protocol = u16::from(IPPROTO_TCP).to_ne_bytes();
    let words: [[u8; 4]; 8] = [
        [protocol[0], protocol[1], 0, 0],
        [client.addr[0], client.addr[1], client.addr[2], client.addr[3]],
        [port[0], port[1], 0, 0],
        local_addr,
        [local_port[0], local_port[1], 0, 0],
        vpc,
        vip,
        vport,
    ];
    // SAFETY: `start + 32 <= end` was checked: eight 4-byte words of the caller's buffer.
    unsafe { *(start as *mut [[u8; 4]; 8]) = words };
    // SAFETY: the context of this call.
    unsafe { succeed(opt, VTOA_VS4RDS_LEN) };
}

/// ByteDance's VNI: the VPC id as a native unsigned int (its module reads the option's
/// big-endian VNI with `ntohl`), for a connection that came with one; otherwise the kernel's
/// ENOPROTOOPT stays.
///
/// # Safety
/// As [`answer`]; `start..end` is the caller's buffer.
#[inline(always)]
unsafe fn answer_vni(opt: *mut bpf_sockopt, client: &ClientAddr, start: usize, end: usize) {
    if client.flags & CLIENT_HAS_VPC == 0 || start + 4 > end {
        return;
    }
    // SAFETY: `start + 4 <= end` was checked.
    unsafe { *(start as *mut u32) = u32::from_be_bytes(client.vpc_id) };
    // SAFETY: the context of this call.
    unsafe { succeed(opt, 4) };
}
