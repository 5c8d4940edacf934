//! The eBPF objects built by build.rs, embedded so that `toa` is a single file.

/// The agent: sock_ops reader and getpeername hooks.
pub static AGENT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/toa"));
/// The test writer used by `toa probe`.
pub static PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/toa-probe"));

/// Program names, as the kernel shows them (at most 15 characters).
pub const SOCK_OPS: &str = "toa_sock_ops";
pub const GETPEERNAME4: &str = "toa_getpeer4";
pub const GETPEERNAME6: &str = "toa_getpeer6";
pub const PROBE_WRITER: &str = "toa_probe";
