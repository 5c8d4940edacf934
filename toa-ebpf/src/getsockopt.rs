//! cgroup getsockopt hook: the NAT64 lookup of the existing nginx/OpenResty patches.
//!
//! `getsockopt(fd, IPPROTO_IP, TOA_SO_GET_LOOKUP, &peer, &len)` with
//! `struct toa_nat64_peer { struct in6_addr saddr; uint16_t port; }` (20 bytes with padding,
//! port in network order). The kernel answers ENOPROTOOPT for this unknown option first; the
//! hook then replaces that answer when the socket has a client address. An IPv4 client comes back
//! as ::ffff:a.b.c.d, so one call serves every family.

use aya_ebpf::{bindings::bpf_sockopt, macros::cgroup_sockopt, programs::SockoptContext};
use toa_common::{Counter, CLIENT_HAS_PORT, TOA_SO_GET_LOOKUP};

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

#[inline(always)]
unsafe fn answer(opt: *mut bpf_sockopt) {
    if (*opt).level != SOL_IP || (*opt).optname != TOA_SO_GET_LOOKUP {
        return;
    }
    let sk = (*opt).__bindgen_anon_1.sk;
    let (start, end) = ((*opt).__bindgen_anon_2.optval as usize, (*opt).__bindgen_anon_3.optval_end as usize);
    if sk.is_null() || start + PEER_LEN > end {
        return;
    }
    let state = aya_ebpf::helpers::generated::bpf_sk_storage_get(socks(), sk.cast(), core::ptr::null_mut(), 0);
    let Some(state) = (state as *const toa_common::SockState).as_ref() else { return };
    if state.state != toa_common::STATE_FOUND {
        return;
    }
    let client = &state.client;
    let words = ip6_words(client.family, &client.addr);
    let out = start as *mut u32;
    for (i, w) in words.iter().enumerate() {
        *out.add(i) = *w;
    }
    let port = if client.flags & CLIENT_HAS_PORT != 0 { client.port } else { [0, 0] };
    *(start as *mut [u8; 4]).add(4) = [port[0], port[1], 0, 0];
    // Two 4-byte stores: the context refuses the 8-byte one the compiler would merge them into.
    core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).optlen), PEER_LEN as i32);
    core::ptr::write_volatile(core::ptr::addr_of_mut!((*opt).retval), 0);
    count(Counter::Nat64Lookup);
}
