//! The eBPF objects built by build.rs, embedded so that `toa` is a single file.

/// The agent: sock_ops reader and getpeername hooks.
pub static AGENT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/toa"));
/// The test writer used by `toa probe`.
pub static PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/toa-probe"));

/// First 16 hex digits of the SHA-256 of both embedded objects: tells which programs a binary
/// carries (`toa --version`, the `toa_build_info` metric).
pub fn hash() -> String {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::new().chain_update(AGENT).chain_update(PROBE).finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The test writer's program (the agent's are in `hooks::HOOKS`).
pub const PROBE_WRITER: &str = "toa_probe";

/// Fails when this binary was built without its programs (`AYA_BUILD_SKIP=1`, for host-only
/// checks), instead of letting the ELF parser say something obscure.
pub fn require_embedded() -> Result<(), crate::Error> {
    if AGENT.is_empty() || PROBE.is_empty() {
        return Err(crate::Error::Load {
            detail: "this toa binary was built with AYA_BUILD_SKIP=1 and carries no eBPF programs; \
                     rebuild it without that variable"
                .into(),
        });
    }
    Ok(())
}
