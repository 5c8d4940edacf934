//! cgroup getsockopt hook: the NAT64 lookup of the existing nginx/OpenResty patches, and
//! Alibaba's VTOA lookup (`VTOA_SO_GET_VS`: VPC id and virtual address, as OceanBase, obproxy
//! and others ask it).
//!
//! `getsockopt(fd, IPPROTO_IP, TOA_SO_GET_LOOKUP, &peer, &len)` with
//! `struct toa_nat64_peer { struct in6_addr saddr; uint16_t port; }` (20 bytes with padding,
//! port in network order). The kernel answers ENOPROTOOPT for this unknown option first; the
//! hook then replaces that answer when the socket has a client address. An IPv4 client comes back
//! as ::ffff:a.b.c.d, so one call serves every family.

use aya_ebpf::{bindings::bpf_sockopt, macros::cgroup_sockopt, programs::SockoptContext};
use toa_common::{
    ClientAddr, Counter, CLIENT_HAS_PORT, CLIENT_HAS_VIP, CLIENT_HAS_VPC, TOA_SO_GET_LOOKUP, VTOA_SO_GET_VS,
    VTOA_VS_LEN,
};

use crate::{
    getpeername::ip6_words,
    maps::{count, socks},
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
    if level != SOL_IP || (optname != TOA_SO_GET_LOOKUP && optname != VTOA_SO_GET_VS) {
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
    if optname == VTOA_SO_GET_VS {
        // SAFETY: the same context and bounds.
        unsafe { answer_vtoa(opt, client, start, end) };
        return;
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
    // Two 4-byte stores: the context refuses the 8-byte one the compiler would merge them into.
    // SAFETY: optlen and retval are writable fields of the getsockopt context.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).optlen), PEER_LEN as i32);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).retval), 0);
    }
    count(Counter::Nat64Lookup);
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
    let out = start as *mut [u8; 4];
    // A part without its flag holds nothing meaningful: zero, as the module answers.
    let (vpc, vip, port) = match (client.flags & CLIENT_HAS_VPC != 0, client.flags & CLIENT_HAS_VIP != 0) {
        (true, true) => (client.vpc_id, client.vip_addr, client.vip_port),
        (true, false) => (client.vpc_id, [0; 4], [0; 2]),
        (false, _) => ([0; 4], client.vip_addr, client.vip_port),
    };
    // SAFETY: `start + 12 <= end` was checked: three 4-byte words of the caller's buffer.
    unsafe {
        *out = vpc;
        *out.add(1) = vip;
        *out.add(2) = [port[0], port[1], 0, 0];
    }
    // SAFETY: optlen and retval are writable fields of the getsockopt context.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).optlen), VTOA_VS_LEN as i32);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).retval), 0);
    }
}
