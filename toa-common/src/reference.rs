//! The option rules written the obvious way, over a slice: the oracle that the parser
//! (`find_toa`, the code the eBPF programs run) is checked against, by the fuzzer and by the
//! end-to-end test that sends random option areas through the kernel. Built for tests only
//! (feature `reference`).

use crate::{
    config::{
        FLAG_DIALECT_ALIBABA_CDN, FLAG_DIALECT_ANOLIS_VTOA, FLAG_DIALECT_BYTEDANCE, FLAG_DIALECT_TENCENT_VTOA,
        FLAG_PARTS, FLAG_PICK_LAST, FLAG_UOA_BYTEDANCE,
    },
    AgentConfig, ClientAddr, Parsed, AF_INET, AF_INET6, CLIENT_HAS_PORT, CLIENT_HAS_VIP, CLIENT_HAS_VPC,
};

/// The same rules, written the obvious way over a slice.
pub fn reference(area: &[u8], cfg: &AgentConfig) -> Parsed {
    if cfg.flags & FLAG_PARTS != 0 {
        return in_parts(area, cfg);
    }
    let (mut malformed, mut last) = (false, None);
    for opt in options(area) {
        let Ok(opt) = opt else {
            malformed = true;
            break;
        };
        match layout(opt, cfg) {
            Some(Some(client)) => {
                if cfg.flags & FLAG_PICK_LAST == 0 {
                    return Parsed::Found(client);
                }
                last = Some(client);
            }
            Some(None) => malformed = true,
            None => {}
        }
    }
    match (last, malformed) {
        (Some(c), _) => Parsed::Found(c),
        (None, true) => Parsed::Malformed,
        (None, false) => Parsed::Absent,
    }
}

/// The options of `area` in order (end-of-list ends it, no-ops are skipped); an `Err` for a
/// broken list (a length byte missing, below 2 or past the area), after which nothing is read.
fn options(area: &[u8]) -> impl Iterator<Item = Result<&[u8], ()>> {
    let (mut off, mut done) = (0usize, false);
    core::iter::from_fn(move || {
        while !done && off < area.len() {
            match area[off] {
                0 => break,
                1 => off += 1,
                _ => {
                    let len = area.get(off + 1).map(|l| usize::from(*l));
                    let Some(len) = len.filter(|l| *l >= 2 && off + l <= area.len()) else {
                        done = true;
                        return Some(Err(()));
                    };
                    off += len;
                    return Some(Ok(&area[off - len..off]));
                }
            }
        }
        done = true;
        None
    })
}

/// A dialect in parts (Tencent's, Alibaba's VTOA): every option of the area is read; the client
/// is the last client option's, with the last virtual address and VPC id read anywhere in the
/// area (a client option that carries one replaces it).
fn in_parts(area: &[u8], cfg: &AgentConfig) -> Parsed {
    let (mut malformed, mut found) = (false, false);
    let mut vip: Option<([u8; 2], [u8; 4])> = None;
    let mut vpc: Option<[u8; 4]> = None;
    let mut client = ClientAddr::default();
    for opt in options(area) {
        let Ok(opt) = opt else {
            malformed = true;
            break;
        };
        match part(opt, cfg) {
            Some(Part::Vip(port, addr)) => vip = Some((port, addr)),
            Some(Part::Vpc(id)) => vpc = Some(id),
            Some(Part::Malformed) => malformed = true,
            None => match layout(opt, cfg) {
                Some(Some(c)) => {
                    if c.flags & CLIENT_HAS_VIP != 0 {
                        vip = Some((c.vip_port, c.vip_addr));
                    }
                    if let Some(id) = vtoa_vpc(opt).filter(|_| cfg.flags & FLAG_DIALECT_ANOLIS_VTOA != 0) {
                        vpc = Some(id);
                    }
                    client = c;
                    found = true;
                }
                Some(None) => malformed = true,
                None => {}
            },
        }
    }
    if !found {
        return if malformed { Parsed::Malformed } else { Parsed::Absent };
    }
    client.flags &= CLIENT_HAS_PORT;
    if let Some((port, addr)) = vip {
        (client.vip_port, client.vip_addr) = (port, addr);
        client.flags |= CLIENT_HAS_VIP;
    }
    if let Some(id) = vpc {
        client.vpc_id = id;
        client.flags |= CLIENT_HAS_VPC;
    }
    Parsed::Found(client)
}

enum Part {
    Vip([u8; 2], [u8; 4]),
    Vpc([u8; 4]),
    Malformed,
}

/// The VTOA dialects' options that are not a client on their own.
fn part(opt: &[u8], cfg: &AgentConfig) -> Option<Part> {
    let tencent = cfg.flags & FLAG_DIALECT_TENCENT_VTOA != 0;
    let anolis = cfg.flags & FLAG_DIALECT_ANOLIS_VTOA != 0;
    let vip = || Part::Vip([opt[2], opt[3]], [opt[4], opt[5], opt[6], opt[7]]);
    match (opt[0], opt.len()) {
        (201, 6) if tencent => Some(Part::Vpc([opt[2], opt[3], opt[4], opt[5]])),
        (202, 8) if tencent => Some(vip()),
        (201 | 202, _) if tencent => Some(Part::Malformed),
        (250, 8) if anolis => Some(vip()),
        (250, _) if anolis => Some(Part::Malformed),
        _ => None,
    }
}

/// The VPC id an Alibaba VTOA client option carries (252: four bytes; 249: three, as a
/// big-endian number).
fn vtoa_vpc(opt: &[u8]) -> Option<[u8; 4]> {
    match (opt[0], opt.len()) {
        (252, 20) => Some([opt[8], opt[9], opt[10], opt[11]]),
        (249, 40) => Some([0, opt[20], opt[21], opt[22]]),
        _ => None,
    }
}

/// `None`: not a kind the configuration reads; `Some(None)`: one it reads, malformed.
fn layout(opt: &[u8], cfg: &AgentConfig) -> Option<Option<ClientAddr>> {
    let (kind, len) = (opt[0], opt.len());
    let classic = cfg.kind_enabled(kind);
    let bytedance = kind == 254 && cfg.flags & FLAG_DIALECT_BYTEDANCE != 0;
    let alibaba = kind == 28 && cfg.flags & FLAG_DIALECT_ALIBABA_CDN != 0;
    let addr = |bytes: &[u8]| {
        let mut a = [0u8; 16];
        a[..bytes.len()].copy_from_slice(bytes);
        a
    };
    // ByteDance's UOA (UDP): the operation byte says which family is inside.
    if cfg.flags & FLAG_UOA_BYTEDANCE != 0 && matches!(kind, 29..=31) {
        let op = opt.get(2).copied();
        let client = |family, port_at: usize, addr_at: usize, vip: bool| {
            let n = if family == AF_INET { 4 } else { 16 };
            let mut c = ClientAddr {
                family,
                port: [opt[port_at], opt[port_at + 1]],
                addr: addr(&opt[addr_at..addr_at + n]),
                flags: CLIENT_HAS_PORT,
                ..Default::default()
            };
            if vip {
                c.vip_port = [opt[6], opt[7]];
                c.vip_addr = [opt[12], opt[13], opt[14], opt[15]];
                c.flags |= CLIENT_HAS_VIP;
            }
            c
        };
        match (kind, len, op) {
            (30 | 31, 16, Some(0)) => return Some(Some(client(AF_INET, 4, 8, true))),
            (30 | 31, 40, Some(1)) => return Some(Some(client(AF_INET6, 4, 8, false))),
            (29, 16, Some(0)) => return Some(Some(client(AF_INET, 8, 12, false))),
            (29, 32, Some(1)) => return Some(Some(client(AF_INET6, 8, 12, false))),
            (29 | 30, _, _) => return Some(None),
            _ => {}
        }
    }
    if cfg.flags & FLAG_DIALECT_ANOLIS_VTOA != 0 {
        match (kind, len) {
            (252, 20) => {
                return Some(Some(ClientAddr {
                    family: AF_INET,
                    port: [opt[2], opt[3]],
                    addr: addr(&opt[4..8]),
                    vip_port: [opt[16], opt[17]],
                    vip_addr: [opt[12], opt[13], opt[14], opt[15]],
                    flags: CLIENT_HAS_PORT | CLIENT_HAS_VIP,
                    ..Default::default()
                }))
            }
            (249, 40) => {
                return Some(Some(ClientAddr {
                    family: AF_INET6,
                    port: [opt[2], opt[3]],
                    addr: addr(&opt[4..20]),
                    flags: CLIENT_HAS_PORT,
                    ..Default::default()
                }))
            }
            (249 | 252, _) => return Some(None),
            _ => {}
        }
    }
    if classic && (len == 8 || len == 20) {
        let family = if len == 8 { AF_INET } else { AF_INET6 };
        return Some(Some(ClientAddr {
            family,
            port: [opt[2], opt[3]],
            addr: addr(&opt[4..]),
            flags: CLIENT_HAS_PORT,
            ..Default::default()
        }));
    }
    if bytedance && len == 16 {
        return Some(Some(ClientAddr {
            family: AF_INET,
            port: [opt[2], opt[3]],
            addr: addr(&opt[4..8]),
            vip_port: [opt[10], opt[11]],
            vip_addr: [opt[12], opt[13], opt[14], opt[15]],
            flags: CLIENT_HAS_PORT | CLIENT_HAS_VIP,
            ..Default::default()
        }));
    }
    if alibaba {
        if (len == 7 || len == 19) && opt[2] == 1 {
            let family = if len == 7 { AF_INET } else { AF_INET6 };
            return Some(Some(ClientAddr { family, addr: addr(&opt[3..]), ..Default::default() }));
        }
        return Some(None);
    }
    if classic || bytedance {
        return Some(None);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{find_toa, OptionArea};

    fn same(options: &[u8], flags: u32, kinds: &[u8]) {
        let mut cfg = AgentConfig::classic();
        cfg.flags = flags;
        for k in kinds {
            cfg.enable_kind(*k);
        }
        assert_eq!(find_toa(&mut OptionArea::from_slice(options), &cfg), reference(options, &cfg), "{options:02x?}");
    }

    /// Two areas the fuzzer found while the VTOA dialects were added: a later client of another
    /// layout keeps the parts read before it (here ByteDance's virtual address, under a dialect in
    /// parts), and a 252/20 read with the classic layout (Alibaba's dialect off) has no VPC id.
    #[test]
    fn fuzzer_findings_stay_fixed() {
        let bytedance_then_v2 = [
            0x1f, 0x10, 0, 0, 0x25, 0, 0, 0, 0, 0, 0, 0, 1, 0xe7, 0x1e, 0xf7, 0x1d, 0x10, 0, 0, 0x25, 1, 0, 0, 0, 0, 0,
            0, 1, 0, 1, 0x1f,
        ];
        let parts = FLAG_DIALECT_TENCENT_VTOA | FLAG_PARTS;
        same(&bytedance_then_v2, parts | FLAG_PICK_LAST | FLAG_DIALECT_BYTEDANCE | FLAG_UOA_BYTEDANCE, &[30, 247]);
        let classic_252 = [
            6, 2, 0xfc, 0x14, 6, 0, 0, 0x1b, 0, 0x59, 0x59, 0x59, 0x59, 0x59, 0x59, 0x59, 0xfc, 0x59, 0x59, 0x59, 0xfc,
            2,
        ];
        same(&classic_252, parts, &[0xfc]);
    }
}
