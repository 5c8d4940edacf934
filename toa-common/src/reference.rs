//! The option rules written the obvious way, over a slice: the oracle that the parser
//! (`find_toa`, the code the eBPF programs run) is checked against, by the fuzzer and by the
//! end-to-end test that sends random option areas through the kernel. Built for tests only
//! (feature `reference`).

use crate::{
    config::{FLAG_DIALECT_ALIBABA_CDN, FLAG_DIALECT_BYTEDANCE, FLAG_PICK_LAST, FLAG_UOA_BYTEDANCE},
    AgentConfig, ClientAddr, Parsed, AF_INET, AF_INET6, CLIENT_HAS_PORT, CLIENT_HAS_VIP,
};

/// The same rules, written the obvious way over a slice.
pub fn reference(area: &[u8], cfg: &AgentConfig) -> Parsed {
    let (mut off, mut malformed, mut last) = (0usize, false, None);
    while off < area.len() {
        let kind = area[off];
        match kind {
            0 => break,
            1 => {
                off += 1;
                continue;
            }
            _ => {}
        }
        let Some(&len) = area.get(off + 1) else {
            malformed = true;
            break;
        };
        let len = usize::from(len);
        if len < 2 || off + len > area.len() {
            malformed = true;
            break;
        }
        let opt = &area[off..off + len];
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
        off += len;
    }
    match (last, malformed) {
        (Some(c), _) => Parsed::Found(c),
        (None, true) => Parsed::Malformed,
        (None, false) => Parsed::Absent,
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
