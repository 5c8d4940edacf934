//! Maps of the agent. Userspace pins `TOA_SOCKS` and `TOA_STATS` under the bpffs directory.

use aya_ebpf::{
    btf_maps::{PerCpuArray, SkStorage},
    macros::btf_map,
};
use toa_common::{counters::COUNTERS, Counter, OptionArea, SockState};

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

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = TOA_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot; programs on this CPU do not preempt each other.
        unsafe { *slot += 1 };
    }
}
