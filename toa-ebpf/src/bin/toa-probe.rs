//! The test writer behind `toa probe`: plays the load balancer by putting the configured TCP
//! options on the handshake ACK or on the first data segment of outgoing connections.
//!
//! Attached only to a temporary cgroup holding the probe process, so it touches nothing else.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    btf_maps::{Array, PerCpuArray, SkStorage},
    helpers::generated::{bpf_reserve_hdr_opt, bpf_sk_storage_get, bpf_store_hdr_opt},
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use toa_common::probe::{
    ProbeConfig, PROBE_CLIENT_FROM_SERIAL, PROBE_ON_DATA, PROBE_ON_MASK, PROBE_ON_SYN, PROBE_OPTIONS, PROBE_OPTION_MAX,
    PROBE_PORT_FROM_SOURCE,
};

const TCP_FLAG_SYN: u32 = 0x02;
use toa_ebpf::packet::header_len;

/// What to write, set by userspace before attaching.
#[btf_map]
static TOA_PROBE: Array<ProbeConfig, 1> = Array::new();

#[sock_ops]
pub fn toa_probe(ctx: SockOpsContext) -> u32 {
    let Some(config) = TOA_PROBE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: the map slot outlives the program; only this probe's connection uses it.
    let config = unsafe { &mut *config };
    if config.count == 0 {
        // Nothing to write: ask for no header callbacks either.
        return 1;
    }
    let on = config.on & PROBE_ON_MASK;
    let on_syn = on == PROBE_ON_SYN;
    match ctx.op() {
        // Ask for the header callbacks from the SYN on, or from the segment after the SYN-ACK.
        BPF_SOCK_OPS_TCP_CONNECT_CB if on_syn => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB if !on_syn => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            // SAFETY: the context of a HDR_OPT_LEN callback.
            unsafe { bpf_reserve_hdr_opt(ctx.ops, config.total_len() as u32, 0) };
        }
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => {
            if on == PROBE_ON_DATA && !carries_data(ctx.ops) {
                return 1;
            }
            // SAFETY: skb_tcp_flags is readable in the header callbacks.
            if on_syn && unsafe { (*ctx.ops).skb_tcp_flags } & TCP_FLAG_SYN == 0 {
                return 1;
            }
            write_options(ctx.ops, config);
            // Once is enough: later segments go out untouched.
            let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        _ => {}
    }
    1
}

/// Returns at once. The benchmark attaches these next to the agent: what the kernel's run-time
/// statistics charge them per run is the floor of any program on the same hook (the clock reads
/// of the statistics themselves and the call), measured in the same run as the agent.
#[sock_ops]
pub fn toa_floor_sockops(_ctx: SockOpsContext) -> u32 {
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn toa_floor_getpeer4(_ctx: SockAddrContext) -> i32 {
    1
}

/// Socket storage of the agent's record size, for `toa_floor_storage`.
#[btf_map]
static TOA_PROBE_STORAGE: SkStorage<toa_common::SockState> = SkStorage::new();

/// Creates a socket-storage record on every passive connection and does nothing else: what the
/// kernel charges for the one storage write the agent makes per connection with a client.
#[sock_ops]
pub fn toa_floor_storage(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // SAFETY: `sk` is readable in every sock_ops callback; null-checked below.
        let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
        if !sk.is_null() {
            let map = core::ptr::addr_of!(TOA_PROBE_STORAGE) as *mut core::ffi::c_void;
            // SAFETY: a valid map and a non-null socket; a null value zero-fills the record.
            unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE as u64) };
        }
    }
    1
}

/// sock_ops callbacks seen, by `op` (the benchmark's breakdown of the runs per connection).
#[btf_map]
static TOA_PROBE_CALLBACKS: PerCpuArray<u64, 32> = PerCpuArray::new();

#[sock_ops]
pub fn toa_count_callbacks(ctx: SockOpsContext) -> u32 {
    if let Some(slot) = TOA_PROBE_CALLBACKS.get_ptr_mut(ctx.op() & 31) {
        // SAFETY: a per-CPU slot; programs on this CPU do not preempt each other.
        unsafe { *slot += 1 };
    }
    1
}

#[inline(always)]
fn carries_data(ops: *mut bpf_sock_ops) -> bool {
    // SAFETY: skb_len is readable in the header callbacks.
    let skb_len = unsafe { (*ops).skb_len } as usize;
    matches!(header_len(ops), Some(hdr) if skb_len > hdr)
}

#[inline(always)]
fn write_options(ops: *mut bpf_sock_ops, config: &mut ProbeConfig) {
    if config.on & PROBE_PORT_FROM_SOURCE != 0 {
        // Parallel connections share the slot: each builds its own option on the stack.
        let mut opt = [0u8; 8];
        let mut j = 0;
        while j < 8 {
            opt[j] = config.options[0][j];
            j += 1;
        }
        // SAFETY: local_port (host byte order) is readable in the header callbacks.
        let port = (unsafe { (*ops).local_port } as u16).to_be_bytes();
        opt[2] = port[0];
        opt[3] = port[1];
        if config.on & PROBE_CLIENT_FROM_SERIAL != 0 {
            let serial = config.serial.to_be_bytes();
            opt[5] = serial[1];
            opt[6] = serial[2];
            opt[7] = serial[3];
        }
        // SAFETY: 8 bytes on the stack.
        let rc = unsafe { bpf_store_hdr_opt(ops, opt.as_ptr().cast(), 8, 0) };
        if rc == 0 {
            config.written = config.written.wrapping_add(1);
            config.serial = config.serial.wrapping_add(1);
        } else {
            config.refused = config.refused.wrapping_add(1);
        }
        return;
    }
    let mut i = 0;
    while i < PROBE_OPTIONS {
        if i >= config.count as usize {
            break;
        }
        // Clamp, then test the lower bound, on the very register passed to the helper: written
        // as one range check, LLVM tests a copy and the verifier cannot see the bound.
        let len = (config.lens[i] as u32).min(PROBE_OPTION_MAX as u32);
        if len >= 2 {
            // SAFETY: `len` (2..=40) bytes of the 40-byte slot are readable.
            let rc = unsafe { bpf_store_hdr_opt(ops, config.options[i].as_ptr().cast(), len, 0) };
            // Reported back so that `toa probe` fails instead of silently sending less.
            if rc == 0 {
                config.written += 1;
            } else {
                config.refused += 1;
            }
        }
        i += 1;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
