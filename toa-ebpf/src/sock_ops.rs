//! sock_ops hook: find the TOA on an incoming connection and remember the client per socket.
//!
//! The option usually rides on the ACK that completes the handshake
//! (`PASSIVE_ESTABLISHED_CB`). If it is not there, the agent asks the kernel for the options of
//! the next segments (`PARSE_HDR_OPT_CB`) and stops after `SEARCH_SEGMENTS`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use toa_common::{
    find_toa, Counter, Parsed, SockState, SEARCH_SEGMENTS, STATE_FOUND, STATE_SEARCHING,
};
use toa_ebpf::packet::copy_options;

use crate::maps::{count, TOA_SCRATCH, TOA_SOCKS};

#[sock_ops]
pub fn toa_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PARSE_HDR_OPT_CB {
        return 1;
    }
    // SAFETY: `sk` is readable in every sock_ops callback; null-checked before use.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_established(&ctx, sk, parse_segment(&ctx));
    } else {
        on_later_segment(&ctx, sk);
    }
    1
}

/// Parses the current segment's options.
#[inline(always)]
fn parse_segment(ctx: &SockOpsContext) -> Parsed {
    let Some(area) = TOA_SCRATCH.get_ptr_mut(0) else {
        return Parsed::Absent;
    };
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program.
    let area = unsafe { &mut *area };
    if !copy_options(ctx.ops, area) {
        return Parsed::Absent;
    }
    find_toa(area)
}

fn socks() -> *mut c_void {
    core::ptr::addr_of!(TOA_SOCKS) as *mut c_void
}

/// The socket's storage, created on demand.
#[inline(always)]
fn storage(sk: *mut bpf_sock, create: bool) -> Option<&'static mut SockState> {
    let flags = if create { BPF_SK_STORAGE_GET_F_CREATE as u64 } else { 0 };
    // SAFETY: a valid map and a non-null socket; a null value zero-fills a new entry.
    let state = unsafe { bpf_sk_storage_get(socks(), sk.cast(), core::ptr::null_mut(), flags) };
    // SAFETY: non-null storage stays valid while the socket lives.
    unsafe { (state as *mut SockState).as_mut() }
}

fn set_search(ctx: &SockOpsContext, on: bool) {
    let flags = ctx.cb_flags();
    let flags = if on {
        flags | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG
    } else {
        flags & !BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG
    };
    let _ = ctx.set_cb_flags(flags as i32);
}

fn on_established(ctx: &SockOpsContext, sk: *mut bpf_sock, parsed: Parsed) {
    if let Parsed::Found(client) = parsed {
        count(Counter::SynRecvSockToa);
        match storage(sk, true) {
            Some(state) => {
                state.client = client;
                state.state = STATE_FOUND;
            }
            None => count(Counter::StorageFailed),
        }
        return;
    }
    count(Counter::SynRecvSockNoToa);
    if parsed == Parsed::Malformed {
        count(Counter::OptionMalformed);
    }
    // Look at the next segments: some balancers put the option on the first data segment.
    let Some(state) = storage(sk, true) else {
        count(Counter::StorageFailed);
        return;
    };
    state.state = STATE_SEARCHING;
    state.segments_left = SEARCH_SEGMENTS;
    set_search(ctx, true);
}

fn on_later_segment(ctx: &SockOpsContext, sk: *mut bpf_sock) {
    let state = match storage(sk, false) {
        Some(state) if state.state == STATE_SEARCHING => state,
        _ => {
            set_search(ctx, false);
            return;
        }
    };
    match parse_segment(ctx) {
        Parsed::Found(client) => {
            state.client = client;
            state.state = STATE_FOUND;
            count(Counter::DataSegmentToa);
            set_search(ctx, false);
        }
        parsed => {
            if parsed == Parsed::Malformed {
                count(Counter::OptionMalformed);
            }
            state.segments_left = state.segments_left.saturating_sub(1);
            if state.segments_left == 0 {
                count(Counter::SearchGaveUp);
                set_search(ctx, false);
                // Nothing to remember: give the memory back now rather than at close.
                // SAFETY: a valid map and a non-null socket.
                unsafe { bpf_sk_storage_delete(socks(), sk.cast()) };
            }
        }
    }
}
