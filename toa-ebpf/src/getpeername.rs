//! cgroup getpeername4/6 hooks: answer `getpeername()` and `accept()` with the client address.
//!
//! `accept()` fills its address through the same hook, so one rewrite covers both.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::bpf_sk_storage_get,
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use toa_common::{Counter, SockState, AF_INET, AF_INET6, STATE_FOUND};

use crate::maps::{count, TOA_SOCKS};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(getpeername4)]
pub fn toa_getpeer4(ctx: SockAddrContext) -> i32 {
    if let Some(state) = client_of(ctx.sock_addr) {
        if state.client.family == AF_INET {
            // SAFETY: user_ip4 and user_port are writable in getpeername4.
            unsafe {
                (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(ipv4(&state.client.addr));
                (*ctx.sock_addr).user_port = u16::from_ne_bytes(state.client.port) as u32;
            }
            count(Counter::GetnameToaOk);
        } else {
            // An IPv6 client cannot fit in sockaddr_in (NAT64): keep the real peer.
            count(Counter::GetnameToaMismatch);
        }
    }
    // getpeername programs must allow the call.
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn toa_getpeer6(ctx: SockAddrContext) -> i32 {
    if let Some(state) = client_of(ctx.sock_addr) {
        let ip6 = if state.client.family == AF_INET6 {
            words(&state.client.addr)
        } else {
            // An IPv4 client on a dual-stack socket: ::ffff:a.b.c.d, as the kernel itself would.
            let v4 = u32::from_ne_bytes(ipv4(&state.client.addr));
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4]
        };
        // SAFETY: user_ip6 and user_port are writable in getpeername6.
        unsafe {
            (*ctx.sock_addr).user_ip6 = ip6;
            (*ctx.sock_addr).user_port = u16::from_ne_bytes(state.client.port) as u32;
        }
        count(Counter::GetnameToaOk);
    }
    1
}

/// The stored client of a TCP socket, counting why there is none.
#[inline(always)]
fn client_of(sa: *mut bpf_sock_addr) -> Option<&'static SockState> {
    // SAFETY: `sa` is the context; type, protocol and sk are readable in getpeername hooks.
    let (ty, proto, sk) = unsafe { ((*sa).type_, (*sa).protocol, (*sa).__bindgen_anon_1.sk) };
    if ty != SOCK_STREAM || proto != IPPROTO_TCP || sk.is_null() {
        count(Counter::GetnameToaBypass);
        return None;
    }
    let map = core::ptr::addr_of!(TOA_SOCKS) as *mut core::ffi::c_void;
    // SAFETY: valid map and socket; flags 0 never creates storage here.
    let state = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) };
    // SAFETY: non-null storage stays valid while the socket lives.
    match unsafe { (state as *const SockState).as_ref() } {
        Some(state) if state.state == STATE_FOUND => Some(state),
        _ => {
            count(Counter::GetnameToaEmpty);
            None
        }
    }
}

#[inline(always)]
fn ipv4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}
