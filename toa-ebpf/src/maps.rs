//! Maps of the agent. Userspace pins all but the scratch slot under the bpffs directory and
//! writes `TOA_CONFIG` and `TOA_TRUST` to (re)configure a loaded agent.

use aya_ebpf::{
    btf_maps::{lpm_trie::Key, Array, LpmTrie, PerCpuArray, SkStorage},
    macros::btf_map,
};
use toa_common::{
    config::{v4_mapped, TRUST_ENTRIES},
    counters::COUNTERS,
    AgentConfig, Counter, OptionArea, SockState,
};

/// Per-socket state: the client address once found. Freed by the kernel with the socket.
#[btf_map]
pub static TOA_SOCKS: SkStorage<SockState> = SkStorage::new();

/// Counters, one slot per CPU (no atomics on the hot path).
#[btf_map]
pub static TOA_STATS: PerCpuArray<u64, { COUNTERS as usize }> = PerCpuArray::new();

/// Scratch space for one segment's option area: map memory, so the parser's masked indexes are
/// plain bounded map-value reads for the verifier (the 512-byte stack is left alone too).
#[btf_map]
pub static TOA_SCRATCH: PerCpuArray<OptionArea, 1> = PerCpuArray::new();

/// Which options to honour; one slot, rewritten in place by `toa load` / SIGHUP.
#[btf_map]
pub static TOA_CONFIG: Array<AgentConfig, 1> = Array::new();

/// Sources allowed to speak for the client (IPv4 as ::ffff:a.b.c.d).
#[btf_map]
pub static TOA_TRUST: LpmTrie<[u8; 16], u8, { TRUST_ENTRIES as usize }> = LpmTrie::new();

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = TOA_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot; programs on this CPU do not preempt each other.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn config() -> Option<&'static AgentConfig> {
    TOA_CONFIG.get(0)
}

/// Whether `addr` (IPv6 or v4-mapped) is in the trust list.
#[inline(always)]
pub fn trusted(addr: [u8; 16]) -> bool {
    TOA_TRUST.get(&Key::new(128, addr)).is_some()
}

/// An IPv4 address (as the context's network-order u32) in the trie's form.
#[inline(always)]
pub fn mapped(ip4: u32) -> [u8; 16] {
    v4_mapped(ip4.to_ne_bytes())
}

/// The socket storage map, for the raw helpers.
#[inline(always)]
pub fn socks() -> *mut core::ffi::c_void {
    core::ptr::addr_of!(TOA_SOCKS) as *mut core::ffi::c_void
}
