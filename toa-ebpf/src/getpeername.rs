//! cgroup getpeername4/6 hooks: answer `getpeername()` and `accept()` with the client address.
//!
//! `accept()` fills its address through the same hook, so one rewrite covers both.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_sk_storage_get, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use toa_common::{Counter, SockState, AF_INET, AF_INET6, CLIENT_HAS_PORT, STATE_FOUND};

use crate::{
    maps::{count, socks},
    udp,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = toa_common::IPPROTO_TCP as u32;

#[cgroup_sock_addr(getpeername4)]
pub fn toa_getpeer4(ctx: SockAddrContext) -> i32 {
    if udp::show_udp_peer(ctx.sock_addr, udp::Family::V4) {
        return 1;
    }
    if let Some(state) = client_of(ctx.sock_addr, true) {
        let client = &state.client;
        if client.family == AF_INET {
            // SAFETY: user_ip4 and user_port are writable in getpeername4.
            unsafe {
                (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(ipv4(&client.addr));
                if client.flags & CLIENT_HAS_PORT != 0 {
                    (*ctx.sock_addr).user_port = u16::from_ne_bytes(client.port) as u32;
                }
            }
            count(Counter::GetnameToaOk);
        } else {
            // An IPv6 client cannot fit in sockaddr_in (NAT64): keep the real peer; the
            // application can ask with getsockopt(TOA_SO_GET_LOOKUP).
            count(Counter::GetnameToaMismatch);
        }
    }
    // getpeername programs must allow the call.
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn toa_getpeer6(ctx: SockAddrContext) -> i32 {
    if udp::show_udp_peer(ctx.sock_addr, udp::Family::V6) {
        return 1;
    }
    if let Some(state) = client_of(ctx.sock_addr, true) {
        let client = &state.client;
        // SAFETY: user_ip6 and user_port are writable in getpeername6.
        unsafe {
            (*ctx.sock_addr).user_ip6 = ip6_words(client.family, &client.addr);
            if client.flags & CLIENT_HAS_PORT != 0 {
                (*ctx.sock_addr).user_port = u16::from_ne_bytes(client.port) as u32;
            }
        }
        count(Counter::GetnameToaOk);
    }
    1
}

/// The stored client of a TCP socket; with `counted`, says why there is none in the counters.
#[inline(always)]
pub fn client_of(sa: *mut bpf_sock_addr, counted: bool) -> Option<&'static SockState> {
    // SAFETY: `sa` is the context; type, protocol and sk are readable in these hooks.
    let (ty, proto, sk) = unsafe { ((*sa).type_, (*sa).protocol, (*sa).__bindgen_anon_1.sk) };
    if ty != SOCK_STREAM || proto != IPPROTO_TCP || sk.is_null() {
        if counted {
            count(Counter::GetnameToaBypass);
        }
        return None;
    }
    // SAFETY: valid map and socket; flags 0 never creates storage here.
    let state = unsafe { bpf_sk_storage_get(socks(), sk.cast(), core::ptr::null_mut(), 0) };
    // SAFETY: non-null storage stays valid while the socket lives.
    match unsafe { (state as *const SockState).as_ref() } {
        Some(state) if state.state == STATE_FOUND => Some(state),
        _ => {
            if counted {
                count(Counter::GetnameToaEmpty);
            }
            None
        }
    }
}

#[inline(always)]
pub fn ipv4(addr: &[u8]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

/// An address as the four network-order words of `user_ip6`: IPv6 as is, IPv4 as
/// `::ffff:a.b.c.d` (what the kernel itself shows on a dual-stack socket).
#[inline(always)]
pub fn ip6_words(family: u16, addr: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    if family == AF_INET6 {
        [w(0), w(4), w(8), w(12)]
    } else {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), w(0)]
    }
}
