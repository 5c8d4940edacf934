//! The TOA agent: reads the client address from a TCP option and gives it to `getpeername()`.
//!
//! One module per kernel hook: `sock_ops` finds the option on incoming connections and keeps the
//! address in socket storage; `getpeername` hands it to applications, `getsockname` the virtual
//! IP where the option carries one, `getsockopt` answers the NAT64 lookup,
//! `udp` is the UDP path (attached only with `--udp`), `udp_opp` turns DPVS's option-protocol
//! datagrams into UDP at tc ingress of chosen interfaces. `maps` holds the state they share with
//! userspace.
#![no_std]
#![no_main]

mod getpeername;
mod getsockname;
mod getsockopt;
mod maps;
mod sock_ops;
mod udp;
mod udp_opp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
