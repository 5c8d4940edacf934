//! sock_ops hook: find the client address on an incoming connection and remember it per socket.
//!
//! The option usually rides on the ACK that completes the handshake
//! (`PASSIVE_ESTABLISHED_CB`). If it is not there, the agent asks the kernel for the options of
//! the next segment the kernel hands over (`PARSE_HDR_OPT_CB`), where balancers that skip the
//! ACK put it, then only of segments with an option the kernel does not know, which a TOA almost
//! always is to it (see docs/ARCHITECTURE.md), until the connection has received
//! `SEARCH_SEGMENTS_IN` segments. The search keeps no state of its own (the callback flags and
//! the socket's segment count are the state), so a connection without a TOA costs no allocation
//! and, after one more segment, no more runs. With `FLAG_READ_SYN` listeners save their SYN
//! (`TCP_LISTEN_CB`) and its options are read too.
//! `TOA_CONFIG` says which layouts to read, from which sources and on which local ports.

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PARSE_HDR_OPT_CB,
        BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    helpers::generated::{bpf_setsockopt, bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use toa_common::{
    config::FLAG_READ_SYN, decide, parse::TCP_ONLY, scan_toa, AgentConfig, ClientAddr, Counter, OptionArea, Outcome,
    SockState, Verdict, AF_INET, SEARCH_SEGMENTS_IN, STATE_FOUND,
};
use toa_ebpf::packet::{copy_options, copy_syn_options};

use crate::maps::{config, count, mapped, socks, trusted, TOA_SCRATCH};

const IPPROTO_TCP: i32 = toa_common::IPPROTO_TCP as i32;
const TCP_SAVE_SYN: i32 = 27;

#[sock_ops]
pub fn toa_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // Most callbacks are none of ours: leave before any map lookup.
    if op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PARSE_HDR_OPT_CB
        && op != BPF_SOCK_OPS_TCP_LISTEN_CB
    {
        return 1;
    }
    let Some(cfg) = config() else { return 1 };
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        if cfg.has(FLAG_READ_SYN) {
            save_syns(&ctx);
        }
        return 1;
    }
    // SAFETY: `sk` is readable in every sock_ops callback; null-checked before use.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() || !cfg.port_allowed(ctx.local_port() as u16) {
        return 1;
    }
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_established(&ctx, sk, cfg);
    } else {
        on_later_segment(&ctx, sk);
    }
    1
}

/// Makes the listener keep each SYN, so its options can be read once the connection is
/// established (costs one small allocation per connection, freed at close).
fn save_syns(ctx: &SockOpsContext) {
    let mut on: i32 = 1;
    // SAFETY: a listener's context; optval is 4 bytes on the stack.
    unsafe { bpf_setsockopt(ctx.ops.cast(), IPPROTO_TCP, TCP_SAVE_SYN, (&mut on as *mut i32).cast(), 4) };
}

/// The per-CPU scratch slot the options are copied into and parsed in (index 0 of a one-slot
/// array: never absent).
#[inline(always)]
fn scratch() -> Option<&'static mut OptionArea> {
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program.
    TOA_SCRATCH.get_ptr_mut(0).map(|area| unsafe { &mut *area })
}

/// Copies the current segment's options (or the saved SYN's) into the scratch slot `area` and
/// parses them; with `Found` the client is in `area.last`.
#[inline(always)]
fn parse(ctx: &SockOpsContext, area: &mut OptionArea, syn: bool) -> Outcome {
    let copied = if syn { copy_syn_options(ctx.ops, area) } else { copy_options(ctx.ops, area) };
    if !copied {
        return Outcome::Absent;
    }
    Outcome::from_code(toa_parse_scratch())
}

/// The one place the parser runs: `scan_toa` on this CPU's scratch slot, under the loaded
/// configuration. A global function, so the kernel verifies it once, on its own, however many
/// places call it (the handshake ACK, the saved SYN, a later segment); inlined at each, the parse
/// cost the verifier ~40k instructions per call site. It takes no arguments (a global function's
/// pointer arguments need Linux 5.12) and looks up the slot and the configuration itself.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn toa_parse_scratch() -> u32 {
    let (Some(area), Some(cfg)) = (scratch(), config()) else {
        return Outcome::Absent as u32;
    };
    // Not `find_toa`: see `scan_toa` for why no `Parsed` may cross the stack.
    scan_toa::<TCP_ONLY>(area, cfg) as u32
}

/// Whether the peer (the balancer) may speak for the client.
#[inline(always)]
fn source_trusted(ctx: &SockOpsContext, cfg: &AgentConfig) -> bool {
    cfg.trusts(|| trusted(peer_address(ctx)))
}

/// The peer's address, IPv4 mapped into IPv6 (the trust trie's key).
#[inline(always)]
fn peer_address(ctx: &SockOpsContext) -> [u8; 16] {
    if ctx.family() == AF_INET as u32 {
        mapped(ctx.remote_ip4())
    } else {
        // One constant-offset load per word: the verifier refuses loads through a moved ctx
        // pointer, which copying the array would produce.
        // SAFETY: remote_ip6 is readable in every sock_ops callback.
        let w =
            |i: usize| unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).remote_ip6[i])) }.to_ne_bytes();
        let (a, b, c, d) = (w(0), w(1), w(2), w(3));
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
    }
}

/// Stores the client in the socket's storage (created here: only sockets with a client
/// address have any).
#[inline(always)]
fn remember(sk: *mut bpf_sock, client: &ClientAddr) {
    let flags = BPF_SK_STORAGE_GET_F_CREATE as u64;
    // SAFETY: a valid map and a non-null socket; a null value zero-fills a new entry.
    let state = unsafe { bpf_sk_storage_get(socks(), sk.cast(), core::ptr::null_mut(), flags) };
    // SAFETY: non-null storage stays valid while the socket lives.
    match unsafe { (state as *mut SockState).as_mut() } {
        Some(state) => {
            state.client = *client;
            state.state = STATE_FOUND;
        }
        None => count(Counter::StorageFailed),
    }
}

/// Which segments the kernel hands to `on_later_segment`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Search {
    /// Every segment the kernel's slow path handles (one, then `Unknown`).
    All,
    /// Segments with an option the kernel does not know.
    Unknown,
    Off,
}

const SEARCH_FLAGS: u32 = BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG;

fn set_search(ctx: &SockOpsContext, search: Search) {
    let flags = ctx.cb_flags() & !SEARCH_FLAGS;
    let flags = match search {
        Search::All => flags | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        Search::Unknown => flags | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG,
        Search::Off => flags,
    };
    let _ = ctx.set_cb_flags(flags as i32);
}

fn on_established(ctx: &SockOpsContext, sk: *mut bpf_sock, cfg: &AgentConfig) {
    let Some(area) = scratch() else { return };
    let mut parsed = parse(ctx, area, false);
    if parsed != Outcome::Found && cfg.has(FLAG_READ_SYN) {
        // The segment's outcome waits in map memory: read back, it is a value the verifier does
        // not know, so Absent and Malformed reach the SYN's scan as one state, not two walks.
        // SAFETY: plain fields of the scratch slot.
        unsafe { core::ptr::write_volatile(&mut area.kept, parsed as u32) };
        parsed = match parse(ctx, area, true) {
            Outcome::Absent if unsafe { core::ptr::read_volatile(&area.kept) } == Outcome::Malformed as u32 => {
                Outcome::Malformed
            }
            Outcome::Absent => Outcome::Absent,
            on_syn => on_syn,
        };
    }
    let verdict = decide(parsed, source_trusted(ctx, cfg), false);
    match verdict {
        Verdict::Remember => {
            count(Counter::SynRecvSockToa);
            remember(sk, &area.last);
            return;
        }
        Verdict::Untrusted => {
            count(Counter::UntrustedOption);
            return;
        }
        Verdict::KeepLooking | Verdict::GiveUp => {}
    }
    // One tail for both verdicts without a client: each copy would be verified once per state
    // the parse left.
    count(Counter::SynRecvSockNoToa);
    if parsed == Outcome::Malformed {
        count(Counter::OptionMalformed);
    }
    // Some balancers put the option on the first data segment: look at the next ones (GiveUp:
    // nothing from this source will be honoured).
    if verdict == Verdict::KeepLooking {
        set_search(ctx, Search::All);
    }
}

fn on_later_segment(ctx: &SockOpsContext, sk: *mut bpf_sock) {
    // SAFETY: segs_in is readable in every callback of a full socket.
    let segs_in = unsafe { (*ctx.ops).segs_in };
    let Some(area) = scratch() else { return };
    let parsed = parse(ctx, area, false);
    if parsed == Outcome::Malformed {
        count(Counter::OptionMalformed);
    }
    // Only a trusted source's connections are searched (on_established), so the trust list is
    // not asked again on every segment.
    match decide(parsed, true, segs_in >= SEARCH_SEGMENTS_IN) {
        Verdict::Remember => {
            set_search(ctx, Search::Off);
            count(Counter::DataSegmentToa);
            remember(sk, &area.last);
        }
        Verdict::GiveUp => set_search(ctx, Search::Off),
        Verdict::KeepLooking => {
            // The next segment had none either: from here on the kernel calls only for segments
            // that carry an option it does not know (no run at all for the others).
            if ctx.cb_flags() & BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG != 0 {
                count(Counter::SearchGaveUp);
                set_search(ctx, Search::Unknown);
            }
        }
        Verdict::Untrusted => {}
    }
}
