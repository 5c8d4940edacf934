//! DPVS's "option protocol" mode for UDP (IP protocol 248): the balancer puts a small header
//! `{version 1 (4 bits), reserved (4), protocol 17, length (2 bytes, itself included)}` and then
//! IPv4-style options (the UOA) between the IPv4 and UDP headers. The stack drops such a packet
//! (no protocol 248), so `toa_udp_opp` runs at tc ingress of the interfaces the operator names
//! and turns it into the UDP datagram the IPv4 option mode would have sent, in place: the header
//! grows over the inserted bytes (its length field), the 4-byte protocol header becomes four NOP
//! options, and the protocol goes back to UDP. Nothing moves and the UDP checksum (its pseudo
//! header has no IPv4 options) stays right; `toa_udp_in` then reads the UOA as for any datagram.
//! Over IPv6 the header becomes a Destination Options header instead (see `convert_ipv6`).
//! Ethernet interfaces only.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_NET, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use toa_common::udp::{UdpCounter, DSTOPT_WRAPPED};

use crate::maps::{count_udp, udp_config};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_DSTOPTS: u8 = 60;
/// The IPv6 option that pads by its length byte (its data must be zeros).
const PADN: u8 = 1;
const ETH_HLEN: usize = 14;
const IPPROTO_OPT: u8 = 248;
const IPPROTO_UDP: u8 = 17;
const OPP_HEADER: usize = 4;
/// The IPv4 header's length field counts 4-byte words up to 15.
const IPV4_WORDS_MAX: usize = 15;
const NOP: u8 = 1;

#[classifier]
pub fn toa_udp_opp(ctx: TcContext) -> i32 {
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    // Every packet of the interface comes here, and nearly none is protocol 248: tell from the
    // linear data first, with no helper call and no map lookup (a header that is not there yet
    // goes the longer way).
    let protocol_at = match protocol {
        ETH_P_IP => ETH_HLEN + 9,
        ETH_P_IPV6 => ETH_HLEN + 6,
        _ => return TC_ACT_OK as i32,
    };
    let (data, end) = (ctx.data(), ctx.data_end());
    // SAFETY: the byte is inside the packet's linear data (checked against data_end).
    if data + protocol_at < end && unsafe { *((data + protocol_at) as *const u8) } != IPPROTO_OPT {
        return TC_ACT_OK as i32;
    }
    if udp_config().is_some() {
        let converted = match protocol {
            ETH_P_IP => convert(&ctx),
            ETH_P_IPV6 => convert_ipv6(&ctx),
            _ => None,
        };
        match converted {
            Some(true) => count_udp(UdpCounter::UdpOppConverted),
            Some(false) => count_udp(UdpCounter::UdpOppUnconverted),
            None => {}
        }
    }
    // Every packet goes on, converted or not.
    TC_ACT_OK as i32
}

/// `None` for any packet that is not IPv4 protocol 248; `Some(converted)` for one that is.
#[inline(always)]
fn convert(ctx: &TcContext) -> Option<bool> {
    let version_words: u8 = ctx.load(ETH_HLEN).ok()?;
    if version_words >> 4 != 4 || ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_OPT {
        return None;
    }
    let words = (version_words & 0x0f) as usize;
    let fragment: [u8; 2] = ctx.load(ETH_HLEN + 6).ok()?;
    // Only a whole datagram has both headers (more-fragments flag or an offset: a fragment).
    if words < 5 || u16::from_be_bytes(fragment) & 0x3fff != 0 {
        return Some(false);
    }
    let Ok(opp) = ctx.load::<[u8; OPP_HEADER]>(ETH_HLEN + words * 4) else { return Some(false) };
    let opp_len = u16::from_be_bytes([opp[2], opp[3]]) as usize;
    let new_words = words + opp_len / 4;
    if opp[0] >> 4 != 1
        || opp[1] != IPPROTO_UDP
        || opp_len < OPP_HEADER
        || opp_len % 4 != 0
        || new_words > IPV4_WORDS_MAX
    {
        return Some(false);
    }
    let total: [u8; 2] = ctx.load(ETH_HLEN + 2).ok()?;
    if (u16::from_be_bytes(total) as usize) < new_words * 4 + 8 {
        return Some(false);
    }
    // Every store keeps the skb's checksum state (CHECKSUM_COMPLETE) in step.
    let flags = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(ETH_HLEN + words * 4, &[NOP; OPP_HEADER], flags).ok()?;
    ctx.store(ETH_HLEN, &(0x40 | new_words as u8), flags).ok()?;
    ctx.store(ETH_HLEN + 9, &IPPROTO_UDP, flags).ok()?;
    ctx.store(ETH_HLEN + 10, &[0u8; 2], flags).ok()?;
    let mut sum = 0u32;
    for i in 0..IPV4_WORDS_MAX {
        if i >= new_words {
            break;
        }
        let word: [u8; 4] = ctx.load(ETH_HLEN + i * 4).ok()?;
        sum += u16::from_be_bytes([word[0], word[1]]) as u32 + u16::from_be_bytes([word[2], word[3]]) as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ctx.store(ETH_HLEN + 10, &(!(sum as u16)).to_be_bytes(), flags).ok()?;
    Some(true)
}

/// Over IPv6 (next header 248 right after the IPv6 header, version 2) the same header and DPVS's
/// UOA (length 8 or 20) become a Destination Options header whose first option wraps that
/// option list (`DSTOPT_WRAPPED`, "skip if unknown"), which `toa_udp_in` reads. With an IPv6
/// client the 24 bytes are rewritten in place; with an IPv4 one the 12 bytes grow by 4 (an IPv6
/// extension header is whole 8-byte units): a PadN comes last. The UDP checksum stays right
/// (IPv6's pseudo-header has the UDP length, which does not change).
#[inline(always)]
fn convert_ipv6(ctx: &TcContext) -> Option<bool> {
    const IPV6: usize = ETH_HLEN + 40;
    if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_OPT {
        return None;
    }
    let Ok(opp) = ctx.load::<[u8; OPP_HEADER]>(IPV6) else { return Some(false) };
    let opp_len = u16::from_be_bytes([opp[2], opp[3]]) as usize;
    if opp[0] >> 4 != 2 || opp[1] != IPPROTO_UDP {
        return Some(false);
    }
    let Ok(uoa) = ctx.load::<[u8; 2]>(IPV6 + OPP_HEADER) else { return Some(false) };
    let flags = BPF_F_RECOMPUTE_CSUM as u64;
    match (opp_len, uoa) {
        (24, [31, 20]) => {
            // next header, length 2 (24 bytes), the wrapping option over the old length field.
            ctx.store(IPV6, &[IPPROTO_UDP, 2, DSTOPT_WRAPPED, 20], flags).ok()?;
        }
        (12, [31, 8]) => {
            let payload: [u8; 2] = ctx.load(ETH_HLEN + 4).ok()?;
            let payload = u16::from_be_bytes(payload).checked_add(4)?;
            let option: [u8; 8] = ctx.load(IPV6 + OPP_HEADER).ok()?;
            // 4 bytes after the IPv6 header: [new 4][old header 4][UOA 8] becomes
            // [next, length 1, wrapping option: type, 8][UOA 8][PadN of 4 (zeros)]: the UOA first,
            // where toa_udp_in looks.
            ctx.adjust_room(4, BPF_ADJ_ROOM_NET, 0).ok()?;
            ctx.store(IPV6, &[IPPROTO_UDP, 1, DSTOPT_WRAPPED, 8], flags).ok()?;
            ctx.store(IPV6 + 4, &option, flags).ok()?;
            ctx.store(IPV6 + 12, &[PADN, 2, 0, 0], flags).ok()?;
            ctx.store(ETH_HLEN + 4, &payload.to_be_bytes(), flags).ok()?;
        }
        _ => return Some(false),
    }
    ctx.store(ETH_HLEN + 6, &IPPROTO_DSTOPTS, flags).ok()?;
    Some(true)
}
