//! DPVS's "option protocol" mode for UDP (IP protocol 248): the balancer puts a small header
//! `{version 1 (4 bits), reserved (4), protocol 17, length (2 bytes, itself included)}` and then
//! IPv4-style options (the UOA) between the IPv4 and UDP headers. The stack drops such a packet
//! (no protocol 248), so `toa_udp_opp` runs at tc ingress of the interfaces the operator names
//! and turns it into the UDP datagram the IPv4 option mode would have sent, in place: the header
//! grows over the inserted bytes (its length field), the 4-byte protocol header becomes four NOP
//! options, and the protocol goes back to UDP. Nothing moves and the UDP checksum (its pseudo
//! header has no IPv4 options) stays right; `toa_udp_in` then reads the UOA as for any datagram.
//! IPv4 on Ethernet only.

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use toa_common::udp::UdpCounter;

use crate::maps::{count_udp, udp_config};

const ETH_P_IP: u16 = 0x0800;
const ETH_HLEN: usize = 14;
const IPPROTO_OPT: u8 = 248;
const IPPROTO_UDP: u8 = 17;
const OPP_HEADER: usize = 4;
/// The IPv4 header's length field counts 4-byte words up to 15.
const IPV4_WORDS_MAX: usize = 15;
const NOP: u8 = 1;

#[classifier]
pub fn toa_udp_opp(ctx: TcContext) -> i32 {
    if udp_config().is_some() {
        match convert(&ctx) {
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
    if u16::from_be(ctx.skb.protocol() as u16) != ETH_P_IP {
        return None;
    }
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
