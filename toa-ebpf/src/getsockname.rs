//! cgroup getsockname4/6 hooks: with `rewrite_sockname`, `getsockname()` returns the virtual IP
//! the client connected to, where the option carries it (ByteDance's layout).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use toa_common::{config::FLAG_REWRITE_SOCKNAME, AF_INET, CLIENT_HAS_VIP};

use crate::{
    getpeername::{client_of, ip6_words},
    maps::config,
};

#[cgroup_sock_addr(getsockname4)]
pub fn toa_getsock4(ctx: SockAddrContext) -> i32 {
    if let Some((port, addr)) = vip_of(&ctx) {
        // SAFETY: user_ip4 and user_port are writable in getsockname4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr);
            (*ctx.sock_addr).user_port = u16::from_ne_bytes(port) as u32;
        }
    }
    1
}

#[cgroup_sock_addr(getsockname6)]
pub fn toa_getsock6(ctx: SockAddrContext) -> i32 {
    if let Some((port, addr)) = vip_of(&ctx) {
        let mut full = [0u8; 16];
        full[..4].copy_from_slice(&addr);
        // SAFETY: user_ip6 and user_port are writable in getsockname6.
        unsafe {
            (*ctx.sock_addr).user_ip6 = ip6_words(AF_INET, &full);
            (*ctx.sock_addr).user_port = u16::from_ne_bytes(port) as u32;
        }
    }
    1
}

#[inline(always)]
fn vip_of(ctx: &SockAddrContext) -> Option<([u8; 2], [u8; 4])> {
    if !config()?.has(FLAG_REWRITE_SOCKNAME) {
        return None;
    }
    let state = client_of(ctx.sock_addr, false)?;
    (state.client.flags & CLIENT_HAS_VIP != 0).then_some((state.client.vip_port, state.client.vip_addr))
}
