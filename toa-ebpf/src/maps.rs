//! Maps of the agent. Userspace pins all but the scratch slot under the bpffs directory and
//! writes `TOA_CONFIG` and `TOA_TRUST` to (re)configure a loaded agent.

use aya_ebpf::{
    btf_maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use toa_common::{
    config::{v4_mapped, TRUST_ENTRIES},
    counters::COUNTERS,
    udp::{
        Flow, FlowKey, OppAttachment, Reply, ReplyKey, UdpConfig, UdpCounter, OPP_IFACES_MAX, UDP_COUNTERS, UDP_FLOWS,
    },
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

/// UDP: each flow's client (balancer address and port + local port → client), from datagrams
/// that carried a UOA. LRU: a full map drops the least recently used flow, never a new one.
#[btf_map]
pub static TOA_UDP_FLOWS: LruHashMap<FlowKey, Flow, { UDP_FLOWS as usize }> = LruHashMap::new();

/// UDP: where replies to a client go (client as the application saw it + local port → balancer).
#[btf_map]
pub static TOA_UDP_REPLIES: LruHashMap<ReplyKey, Reply, { UDP_FLOWS as usize }> = LruHashMap::new();

/// UDP settings; one slot, rewritten in place like `TOA_CONFIG`.
#[btf_map]
pub static TOA_UDP_CONFIG: Array<UdpConfig, 1> = Array::new();

/// UDP counters, one slot per CPU.
#[btf_map]
pub static TOA_UDP_STATS: PerCpuArray<u64, { UDP_COUNTERS as usize }> = PerCpuArray::new();

/// UDP: the interfaces the option-protocol converter is attached to, for `toa` to detach it
/// (tc filters have no pin). Written and read by userspace only.
#[btf_map]
pub static TOA_UDP_OPP: Array<OppAttachment, { OPP_IFACES_MAX as usize }> = Array::new();

/// A datagram's IPv4 options, parsed here. Not `TOA_SCRATCH`: the ingress hook runs in softirq
/// context and may interrupt a sock_ops program that is parsing on the same CPU.
#[btf_map]
pub static TOA_UDP_SCRATCH: PerCpuArray<OptionArea, 1> = PerCpuArray::new();

#[inline(always)]
pub fn count_udp(counter: UdpCounter) {
    if let Some(slot) = TOA_UDP_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot; programs on this CPU do not preempt each other.
        unsafe { *slot += 1 };
    }
}

/// The UDP settings, when the UDP path is on.
#[inline(always)]
pub fn udp_config() -> Option<&'static UdpConfig> {
    TOA_UDP_CONFIG.get(0).filter(|c| c.enabled != 0)
}
