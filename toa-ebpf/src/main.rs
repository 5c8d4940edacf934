//! The TOA agent: reads the client address from a TCP option and gives it to `getpeername()`.
//!
//! One module per kernel hook: `sock_ops` finds the option on incoming connections and keeps the
//! address in socket storage; `getpeername` hands it to applications. `maps` holds the state both
//! share with userspace.
#![no_std]
#![no_main]

mod getpeername;
mod maps;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
