//! What the agent reads, per connection, from its `TOA_CONFIG` map: which options to honour and
//! from where. Userspace rewrites it in place to reconfigure a loaded agent.

/// Honour only options whose source (the balancer) is in the trust list.
pub const FLAG_TRUST_REQUIRED: u32 = 1 << 0;
/// Several options in one segment: the last valid one wins (default: the first).
pub const FLAG_PICK_LAST: u32 = 1 << 1;
/// ByteDance: kind 254, length 16: client port, client IPv4, 2 pad, VIP port, VIP IPv4.
pub const FLAG_DIALECT_BYTEDANCE: u32 = 1 << 2;
/// Alibaba CDN: kind 28, length 7 or 19: version byte, IPv4 or IPv6, no port; on the SYN.
pub const FLAG_DIALECT_ALIBABA_CDN: u32 = 1 << 3;
/// Also read the options of the SYN (the listener saves it).
pub const FLAG_READ_SYN: u32 = 1 << 4;
/// getsockname() returns the virtual IP where the option carries it.
pub const FLAG_REWRITE_SOCKNAME: u32 = 1 << 5;
/// Honour options only on the local ports in `ports`.
pub const FLAG_PORTS: u32 = 1 << 6;
/// UDP only (set by `udp::uoa_config`, never by a policy): ByteDance's UOA layouts, IPv4 option
/// types 31 and 30 (length 16 or 40) and 29 (length 16 or 32), beside DPVS's under type 31.
pub const FLAG_UOA_BYTEDANCE: u32 = 1 << 7;
/// Tencent's VTOA: kind 200 (length 8) is the client, 201 (length 6) the VPC id and 202 (length
/// 8: port, IPv4) the virtual address, in any order (userspace also enables kind 200's classic
/// layouts and sets `FLAG_PARTS`).
pub const FLAG_DIALECT_TENCENT_VTOA: u32 = 1 << 8;
/// Alibaba's (Anolis) VTOA: 254/8, 254/20, 253/20 (classic layouts, enabled by userspace), 250/8
/// the virtual address, 252/20 client + VPC id + virtual address, 249/40 IPv6 client + VPC id
/// (with `FLAG_PARTS`).
pub const FLAG_DIALECT_ANOLIS_VTOA: u32 = 1 << 9;
/// Set (by userspace) with either VTOA dialect, whose options come in parts: the whole area is
/// read and a client option keeps the parts read before it (the last client option wins). Two
/// bits: shifted down by 16 they are the `CLIENT_*` bits a client keeps (`CLIENT_HAS_VIP |
/// CLIENT_HAS_VPC`), so the parser masks with them instead of branching on a flag.
pub const FLAG_PARTS: u32 = 6 << 16;

/// Local port ranges that can be listed.
pub const PORT_RANGES: usize = 16;
/// Entries of the trust list.
pub const TRUST_ENTRIES: u32 = 1024;

/// The single slot of `TOA_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Bit `k` set: option kind `k` carries the classic layouts (length 8: port + IPv4,
    /// length 20: port + IPv6).
    pub kinds: [u8; 32],
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Ranges in use in `ports`.
    pub port_ranges: u32,
    /// Inclusive local port ranges, host byte order.
    pub ports: [[u16; 2]; PORT_RANGES],
}

const _: () = assert!(core::mem::size_of::<AgentConfig>() == 32 + 8 + 4 * PORT_RANGES);

impl AgentConfig {
    /// Classic kind 254 only, first valid option, no trust list: what the classic modules do.
    pub const fn classic() -> Self {
        let mut kinds = [0u8; 32];
        kinds[254 / 8] = 1 << (254 % 8);
        Self { kinds, flags: 0, port_ranges: 0, ports: [[0; 2]; PORT_RANGES] }
    }

    #[inline(always)]
    pub fn kind_enabled(&self, kind: u8) -> bool {
        self.kinds[(kind as usize >> 3) & 31] & (1 << (kind & 7)) != 0
    }

    pub fn enable_kind(&mut self, kind: u8) {
        self.kinds[kind as usize >> 3] |= 1 << (kind & 7);
    }

    #[inline(always)]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Whether options from a source may be honoured: always without a trust list, else only
    /// when `listed()` (the source is in it: the LPM trie in the kernel, the table's list in the
    /// userspace mode). The one trust rule of both modes; `listed` runs only when it matters.
    #[inline(always)]
    pub fn trusts(&self, listed: impl FnOnce() -> bool) -> bool {
        !self.has(FLAG_TRUST_REQUIRED) || listed()
    }

    /// Whether options arriving on local port `port` are honoured.
    #[inline(always)]
    pub fn port_allowed(&self, port: u16) -> bool {
        if !self.has(FLAG_PORTS) {
            return true;
        }
        let mut i = 0;
        while i < PORT_RANGES {
            if (i as u32) < self.port_ranges && self.ports[i][0] <= port && port <= self.ports[i][1] {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// The `TOA_TRUST` LPM trie holds IPv4 sources as `::ffff:a.b.c.d` (prefix + 96), so that one
/// trie answers for IPv4, IPv6 and dual-stack sockets alike.
/// `::ffff:a.b.c.d` for an IPv4 address.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let mut c = AgentConfig::classic();
        assert!(c.kind_enabled(254));
        assert!(!c.kind_enabled(200) && !c.kind_enabled(253) && !c.kind_enabled(0));
        c.enable_kind(200);
        c.enable_kind(255);
        assert!(c.kind_enabled(200) && c.kind_enabled(255) && c.kind_enabled(254));
    }

    #[test]
    fn ports() {
        let mut c = AgentConfig::classic();
        assert!(c.port_allowed(1) && c.port_allowed(65535));
        c.flags |= FLAG_PORTS;
        assert!(!c.port_allowed(80), "an empty list with FLAG_PORTS honours nothing");
        c.ports[0] = [80, 80];
        c.ports[1] = [8000, 8100];
        c.port_ranges = 2;
        assert!(c.port_allowed(80) && c.port_allowed(8000) && c.port_allowed(8100));
        assert!(!c.port_allowed(81) && !c.port_allowed(7999) && !c.port_allowed(8101));
        // Slots past port_ranges are ignored even if stale.
        c.ports[2] = [1, 65535];
        assert!(!c.port_allowed(443));
    }
}
