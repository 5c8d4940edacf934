//! Reading the TCP header that sock_ops callbacks expose as `skb_data..skb_data_end`.

use aya_ebpf::bindings::bpf_sock_ops;
use toa_common::{OptionArea, OPTION_AREA_MAX};

const TCP_HEADER_MIN: usize = 20;

/// The segment's TCP header bounds, or `None` when the kernel gave no full fixed header.
#[inline(always)]
fn header(ops: *const bpf_sock_ops) -> Option<(usize, usize)> {
    // SAFETY: `ops` is the context the kernel passed in; these fields are readable in every
    // sock_ops callback (null when the callback carries no segment).
    let (data, end) =
        unsafe { ((*ops).__bindgen_anon_3.skb_data as usize, (*ops).__bindgen_anon_4.skb_data_end as usize) };
    if data + TCP_HEADER_MIN > end {
        return None;
    }
    Some((data, end))
}

/// TCP header length from the data offset field (20..=60).
#[inline(always)]
pub fn header_len(ops: *const bpf_sock_ops) -> Option<usize> {
    let (data, _) = header(ops)?;
    // SAFETY: byte 12 lies inside the 20 bytes checked by `header`.
    let doff = unsafe { *((data + 12) as *const u8) } >> 4;
    Some(doff as usize * 4)
}

/// Copies the segment's option area into `area` (bytes and length); false when the segment has
/// no readable TCP header.
///
/// Every packet read is checked against `skb_data_end` at a constant offset: the form that the
/// strictest verifier (Linux 6.1) accepts without tracking bounds between two registers.
#[inline(always)]
pub fn copy_options(ops: *const bpf_sock_ops, area: &mut OptionArea) -> bool {
    let (Some((data, end)), Some(hdr_len)) = (header(ops), header_len(ops)) else {
        return false;
    };
    if hdr_len < TCP_HEADER_MIN {
        return false;
    }
    let opt_len = hdr_len - TCP_HEADER_MIN;
    let mut i = 0;
    while i < OPTION_AREA_MAX {
        if i >= opt_len || data + TCP_HEADER_MIN + i + 1 > end {
            break;
        }
        // SAFETY: checked against `end` just above.
        area.set(i, unsafe { *((data + TCP_HEADER_MIN + i) as *const u8) });
        i += 1;
    }
    area.set_len(i);
    true
}

const IPPROTO_TCP: i32 = toa_common::IPPROTO_TCP as i32;
const TCP_BPF_SYN: i32 = 1005;
/// A TCP header with options is at most 60 bytes.
const TCP_HEADER_MAX: usize = 60;

/// Copies the option area of the SYN that opened this connection into `area`; needs a listener
/// that saved its SYNs (`TCP_SAVE_SYN`). False when there is no saved SYN.
#[inline(always)]
pub fn copy_syn_options(ops: *mut bpf_sock_ops, area: &mut OptionArea) -> bool {
    // SAFETY: the helper writes at most TCP_HEADER_MAX bytes into the 96-byte buffer.
    let got = unsafe {
        aya_ebpf::helpers::generated::bpf_getsockopt(
            ops.cast(),
            IPPROTO_TCP,
            TCP_BPF_SYN,
            area.bytes.as_mut_ptr().cast(),
            TCP_HEADER_MAX as i32,
        )
    };
    if got < TCP_HEADER_MIN as i64 {
        return false;
    }
    let hdr_len = ((area.bytes[12] >> 4) as usize) * 4;
    if hdr_len < TCP_HEADER_MIN {
        return false;
    }
    // Move the options to the front, where the parser looks.
    let mut i = 0;
    while i < OPTION_AREA_MAX {
        let byte = area.bytes[(i + TCP_HEADER_MIN) & 63];
        area.set(i, byte);
        i += 1;
    }
    area.set_len(hdr_len - TCP_HEADER_MIN);
    true
}
