//! Fuzzes the option parser against the plain reference written over slices
//! (`toa_common::reference`): the same answer for every configuration and option area.
//!
//! Input: byte 0 picks the flags (pick last, ByteDance, Alibaba CDN, ByteDance's UOA; its bits 0
//! and 4, which the parser does not read, Tencent's and Alibaba's VTOA), bytes 1-2 two extra kinds
//! read with the classic layouts, the rest is the option area (the parser reads at most 40).
#![no_main]

use libfuzzer_sys::fuzz_target;
use toa_common::{
    config::{
        FLAG_DIALECT_ALIBABA_CDN, FLAG_DIALECT_ANOLIS_VTOA, FLAG_DIALECT_BYTEDANCE, FLAG_DIALECT_TENCENT_VTOA,
        FLAG_PARTS, FLAG_PICK_LAST, FLAG_UOA_BYTEDANCE,
    },
    find_toa,
    reference::reference,
    AgentConfig, OptionArea,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mut cfg = AgentConfig::classic();
    cfg.flags =
        u32::from(data[0]) & (FLAG_PICK_LAST | FLAG_DIALECT_BYTEDANCE | FLAG_DIALECT_ALIBABA_CDN | FLAG_UOA_BYTEDANCE);
    // As userspace sets them: a dialect in parts with FLAG_PARTS.
    if data[0] & 1 != 0 {
        cfg.flags |= FLAG_DIALECT_TENCENT_VTOA | FLAG_PARTS;
    }
    if data[0] & 0x10 != 0 {
        cfg.flags |= FLAG_DIALECT_ANOLIS_VTOA | FLAG_PARTS;
    }
    for k in [data[1], data[2]] {
        if k >= 2 {
            cfg.enable_kind(k);
        }
    }
    let options = &data[3..];
    let got = find_toa(&mut OptionArea::from_slice(options), &cfg);
    assert_eq!(got, reference(&options[..options.len().min(40)], &cfg), "options {options:02x?}");
});
