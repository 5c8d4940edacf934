//! The UDP path's shared types: DPVS's UDP Option of Address (UOA) in a datagram's IPv4
//! options, and the flow and reply records the eBPF programs keep.
//!
//! DPVS's UOA is an IPv4 option of type 31 with the classic TOA layouts (length 8: port + IPv4,
//! length 20: port + IPv6), and IPv4 options share TCP's list format, so the TCP option parser
//! reads it: [`uoa_config`] is the agent's configuration with kind 31 as the only classic kind,
//! no TCP dialect, and ByteDance's UOA layouts (types 31, 30, 29; see `parse`) on.

use crate::{
    config::{
        AgentConfig, FLAG_DIALECT_ALIBABA_CDN, FLAG_DIALECT_ANOLIS_VTOA, FLAG_DIALECT_BYTEDANCE,
        FLAG_DIALECT_TENCENT_VTOA, FLAG_PARTS, FLAG_UOA_BYTEDANCE,
    },
    ClientAddr,
};

/// `IPOPT_UOA`: DPVS's IPv4 option type.
pub const UOA_KIND: u8 = 31;

/// How long a flow's client is kept after its last datagram, unless configured (DPVS's
/// `uoa_map_timeout`).
pub const UDP_TTL_DEFAULT_SECS: u32 = 360;
/// Flows and replies the kernel keeps at most (each an LRU map: the least recently used goes).
pub const UDP_FLOWS: u32 = 65_536;

/// The parser's configuration for a datagram's IP options (computed by userspace, kept in
/// [`UdpConfig::parse`]): the agent's, with kind 31 as the only
/// classic kind, without the TCP dialects (their kinds mean nothing in an IP header), and with
/// ByteDance's UOA layouts (their lengths differ from DPVS's: both are read side by side).
pub fn uoa_config(agent: &AgentConfig) -> AgentConfig {
    let mut cfg = *agent;
    cfg.kinds = [0; 32];
    cfg.kinds[(UOA_KIND >> 3) as usize] = 1 << (UOA_KIND & 7);
    cfg.flags &= !(FLAG_DIALECT_BYTEDANCE
        | FLAG_DIALECT_ALIBABA_CDN
        | FLAG_DIALECT_TENCENT_VTOA
        | FLAG_DIALECT_ANOLIS_VTOA
        | FLAG_PARTS);
    cfg.flags |= FLAG_UOA_BYTEDANCE;
    cfg
}

/// IPv6 has no IPv4 options: over IPv6 the UOA rides in a Destination Options header (next
/// header 60) right after the IPv6 header, as its first option. The option types below all have
/// the "skip if unknown" action bits (00), so the kernel delivers the datagram.
///
/// `toa_udp_opp` wraps DPVS's IPv6 option-protocol UOA (IPv4-style: type 31, length 8 or 20)
/// in one option of this type (RFC 3692's experimental type 0x3E: 0x1E is ByteDance's type 30).
pub const DSTOPT_WRAPPED: u8 = 0x3e;

/// How a Destination Options header's first option carries a UOA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DstOptUoa {
    /// [`DSTOPT_WRAPPED`]: its data is an IPv4-style option list, parsed as is.
    Wrapped,
    /// ByteDance's option (type 31, 30 or 29) over IPv6: its data is the IPv4 layout's after
    /// the 4-byte `{type, length, operation, pad}` header, which the parser is given in front:
    /// this header. (The data length tells the client's family: the operation byte.)
    ByteDance([u8; 4]),
}

/// The UOA carried by a Destination Options header's first option of `tlv_type` with
/// `tlv_len` data bytes, if any.
#[inline(always)]
pub fn dstopt_uoa(tlv_type: u8, tlv_len: u8) -> Option<DstOptUoa> {
    match (tlv_type, tlv_len) {
        // The converter wraps one DPVS UOA: 8 bytes with an IPv4 client, 20 with an IPv6 one.
        (DSTOPT_WRAPPED, 8 | 20) => Some(DstOptUoa::Wrapped),
        // v1: ports + two addresses (4 or 16 bytes each); v2: VNI, port, pad + one address
        // (4, or 16 and 4 of padding).
        (31 | 30, 12 | 36) | (29, 12 | 28) => {
            Some(DstOptUoa::ByteDance([tlv_type, tlv_len + 4, (tlv_len != 12) as u8, 0]))
        }
        _ => None,
    }
}

/// A flow as one socket sees it: the balancer's address and port, and the socket (its cookie).
/// The socket, not the local port: two network namespaces (containers) can receive flows from
/// the same balancer address and port on the same local port, and the local address is not
/// known at `recvmsg()` for a socket bound to the wildcard address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowKey {
    /// The balancer's address, IPv4 as `::ffff:a.b.c.d`.
    pub peer_addr: [u8; 16],
    /// Network byte order.
    pub peer_port: [u8; 2],
    pub _pad: [u8; 6],
    /// `bpf_get_socket_cookie()` of the receiving socket.
    pub socket: u64,
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 32);

/// A flow's client, from the last datagram that carried one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub client: ClientAddr,
    /// The datagram's destination, IPv4 as `::ffff:a.b.c.d`.
    pub local_addr: [u8; 16],
    /// `bpf_ktime_get_ns()` of the last datagram with the option, or of the last `recvmsg()`
    /// that showed the client.
    pub seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 56);

/// Where a reply to a client goes: the client as the application saw it, the local port it is
/// answered from and the network namespace (any socket of the service may answer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplyKey {
    /// IPv4 as `::ffff:a.b.c.d`.
    pub client_addr: [u8; 16],
    pub client_port: [u8; 2],
    pub local_port: [u8; 2],
    pub _pad: [u8; 4],
    /// `bpf_get_netns_cookie()`.
    pub netns: u64,
}

const _: () = assert!(core::mem::size_of::<ReplyKey>() == 32);

/// The balancer that forwards a client's flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reply {
    /// IPv4 as `::ffff:a.b.c.d`.
    pub peer_addr: [u8; 16],
    pub peer_port: [u8; 2],
    pub _pad: [u8; 6],
    pub seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Reply>() == 32);

/// The most interfaces `--udp-opp-iface` takes.
pub const OPP_IFACES_MAX: u32 = 8;

/// One option-protocol converter attached to an interface (a tc ingress filter, which no pin
/// holds), as `toa` records it in `TOA_UDP_OPP` to detach it later. No program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OppAttachment {
    /// Inode of the network namespace the interface is in (0: an empty slot).
    pub netns: u64,
    pub ifindex: u32,
    /// The filter's priority and handle, as the kernel chose them.
    pub priority: u32,
    pub handle: u32,
    /// The interface's name, NUL-padded.
    pub name: [u8; 16],
    /// The id of the program the filter runs, for `toa status` (0 in the records of agents
    /// before 3 December 2026, which left these bytes as padding).
    pub program: u32,
}

const _: () = assert!(core::mem::size_of::<OppAttachment>() == 40);

/// The UDP path's settings (the one slot of `TOA_UDP_CONFIG`); the trust list is the agent's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpConfig {
    /// 1: record flows and rewrite addresses (the UDP programs are attached only then).
    pub enabled: u32,
    /// Seconds a flow is honoured after its last datagram with the option.
    pub ttl_secs: u32,
    /// What the ingress program parses with: [`uoa_config`] of the agent's configuration,
    /// written here by userspace with the policy rather than derived again for every datagram.
    pub parse: AgentConfig,
}

const _: () = assert!(core::mem::size_of::<UdpConfig>() == 8 + core::mem::size_of::<AgentConfig>());

impl Default for UdpConfig {
    fn default() -> Self {
        Self { enabled: 0, ttl_secs: UDP_TTL_DEFAULT_SECS, parse: uoa_config(&AgentConfig::classic()) }
    }
}

impl UdpConfig {
    #[inline(always)]
    pub fn ttl_ns(&self) -> u64 {
        self.ttl_secs as u64 * 1_000_000_000
    }

    /// Whether a record last refreshed at `seen_ns` is still honoured at `now_ns`.
    #[inline(always)]
    pub fn fresh(&self, seen_ns: u64, now_ns: u64) -> bool {
        now_ns.wrapping_sub(seen_ns) <= self.ttl_ns()
    }
}

/// The UDP path's counters (`TOA_UDP_STATS`, one per-CPU slot each).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpCounter {
    /// A datagram's UOA recorded as its flow's client.
    UdpOption = 0,
    /// A malformed UOA or IPv4 option list (nothing recorded; the real address is kept).
    UdpOptionMalformed,
    /// A valid UOA from a source outside the trust list (ignored).
    UdpUntrustedOption,
    /// `recvfrom()`/`recvmsg()` answered with the client instead of the balancer.
    UdpRecvClient,
    /// `connect()` of a UDP socket to a client it was shown sent to the client's balancer.
    UdpConnected,
    /// `getpeername()` of such a connected socket answered with the client.
    UdpPeername,
    /// A client the socket's family cannot hold (IPv6 client, IPv4 socket): the balancer kept.
    UdpRecvMismatch,
    /// A reply to a client sent to its balancer instead.
    UdpReplyRedirected,
    /// A flow or reply found but older than the TTL: left alone.
    UdpExpired,
    /// A client's reply route changed to another balancer while its old one was fresh (two
    /// balancers forwarding the same client address and port to the same local port).
    UdpReplyConflict,
    /// A datagram of DPVS's option protocol (IP protocol 248) turned into UDP with its options
    /// in the IPv4 header, on an interface given to `--udp-opp-iface`.
    UdpOppConverted,
    /// An option-protocol datagram left as it came (malformed, a fragment, or options that the
    /// IPv4 header has no room for): the kernel drops it, as it does without the agent.
    UdpOppUnconverted,
}

pub const UDP_COUNTERS: u32 = 12;

impl UdpCounter {
    pub const ALL: [UdpCounter; UDP_COUNTERS as usize] = [
        UdpCounter::UdpOption,
        UdpCounter::UdpOptionMalformed,
        UdpCounter::UdpUntrustedOption,
        UdpCounter::UdpRecvClient,
        UdpCounter::UdpConnected,
        UdpCounter::UdpPeername,
        UdpCounter::UdpRecvMismatch,
        UdpCounter::UdpReplyRedirected,
        UdpCounter::UdpExpired,
        UdpCounter::UdpReplyConflict,
        UdpCounter::UdpOppConverted,
        UdpCounter::UdpOppUnconverted,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            UdpCounter::UdpOption => "udp_option",
            UdpCounter::UdpOptionMalformed => "udp_option_malformed",
            UdpCounter::UdpUntrustedOption => "udp_untrusted_option",
            UdpCounter::UdpRecvClient => "udp_recv_client",
            UdpCounter::UdpConnected => "udp_connected",
            UdpCounter::UdpPeername => "udp_peername",
            UdpCounter::UdpRecvMismatch => "udp_recv_mismatch",
            UdpCounter::UdpReplyRedirected => "udp_reply_redirected",
            UdpCounter::UdpExpired => "udp_expired",
            UdpCounter::UdpReplyConflict => "udp_reply_conflict",
            UdpCounter::UdpOppConverted => "udp_opp_converted",
            UdpCounter::UdpOppUnconverted => "udp_opp_unconverted",
        }
    }

    pub const fn help(self) -> &'static str {
        match self {
            UdpCounter::UdpOption => "UDP datagrams whose UOA was recorded as their flow's client",
            UdpCounter::UdpOptionMalformed => "malformed UOA or IPv4 option list seen (real address kept)",
            UdpCounter::UdpUntrustedOption => "valid UOAs from sources outside the trust list (ignored)",
            UdpCounter::UdpRecvClient => "recvfrom()/recvmsg() answered with the client",
            UdpCounter::UdpConnected => "UDP sockets connected to a client, sent to its balancer",
            UdpCounter::UdpPeername => "getpeername() of such a connected UDP socket answered with the client",
            UdpCounter::UdpRecvMismatch => "UDP client that the socket's family cannot hold (balancer kept)",
            UdpCounter::UdpReplyRedirected => "replies to a client sent to its balancer",
            UdpCounter::UdpExpired => "UDP flows or replies found older than the TTL (left alone)",
            UdpCounter::UdpReplyConflict => "clients whose reply route moved to another balancer while fresh",
            UdpCounter::UdpOppConverted => {
                "option-protocol (IP protocol 248) datagrams turned into UDP with IPv4 options"
            }
            UdpCounter::UdpOppUnconverted => {
                "option-protocol datagrams left as they came (malformed, fragments, no room)"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{FLAG_PICK_LAST, FLAG_TRUST_REQUIRED},
        find_toa, OptionArea, Parsed, AF_INET, AF_INET6, CLIENT_HAS_PORT,
    };

    const PORT: [u8; 2] = [0x30, 0x39];
    const V4: [u8; 4] = [198, 18, 0, 7];

    fn parse(options: &[u8]) -> Parsed {
        let cfg = uoa_config(&AgentConfig::classic());
        find_toa(&mut OptionArea::from_slice(options), &cfg)
    }

    fn v4(port: [u8; 2], addr: [u8; 4]) -> Parsed {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&addr);
        Parsed::Found(ClientAddr { family: AF_INET, port, addr: a, flags: CLIENT_HAS_PORT, ..Default::default() })
    }

    /// ByteDance's IPv6 option becomes the IPv4 layout the parser knows, with the same client.
    #[test]
    fn destination_options_map_to_the_ipv4_layouts() {
        let data = [[0x10, 0x92, 0, 53].as_slice(), &V4, &[198, 18, 0, 1]].concat();
        let Some(DstOptUoa::ByteDance(header)) = dstopt_uoa(31, 12) else { panic!() };
        assert_eq!(header, [31, 16, 0, 0]);
        let mut bytedance = header.to_vec();
        bytedance.extend_from_slice(&data);
        let Parsed::Found(client) = parse(&bytedance) else { panic!("not parsed") };
        assert_eq!((client.family, client.port, &client.addr[..4]), (AF_INET, [0x10, 0x92], &V4[..]));
        assert_eq!((client.vip_port, client.vip_addr), ([0, 53], [198, 18, 0, 1]));
        assert_eq!(dstopt_uoa(30, 36), Some(DstOptUoa::ByteDance([30, 40, 1, 0])));
        assert_eq!(dstopt_uoa(29, 12), Some(DstOptUoa::ByteDance([29, 16, 0, 0])));
        assert_eq!(dstopt_uoa(29, 28), Some(DstOptUoa::ByteDance([29, 32, 1, 0])));
        assert_eq!(dstopt_uoa(DSTOPT_WRAPPED, 8), Some(DstOptUoa::Wrapped));
        for (t, n) in [(31, 8), (31, 13), (29, 36), (30, 0), (DSTOPT_WRAPPED, 0), (DSTOPT_WRAPPED, 6), (1, 2)] {
            assert_eq!(dstopt_uoa(t, n), None, "type {t} length {n}");
        }
    }

    #[test]
    fn the_config_reads_kind_31_only_and_keeps_the_policy() {
        let mut agent = AgentConfig::classic();
        agent.flags = FLAG_TRUST_REQUIRED
            | FLAG_PICK_LAST
            | FLAG_DIALECT_BYTEDANCE
            | FLAG_DIALECT_ALIBABA_CDN
            | FLAG_DIALECT_TENCENT_VTOA
            | FLAG_PARTS;
        let cfg = uoa_config(&agent);
        assert!(cfg.kind_enabled(UOA_KIND));
        assert_eq!((0..=255u8).filter(|k| cfg.kind_enabled(*k)).count(), 1);
        assert_eq!(cfg.flags, FLAG_TRUST_REQUIRED | FLAG_PICK_LAST | FLAG_UOA_BYTEDANCE);
    }

    #[test]
    fn uoa_ipv4_and_ipv6() {
        let o = [UOA_KIND, 8, PORT[0], PORT[1], V4[0], V4[1], V4[2], V4[3]];
        assert_eq!(parse(&o), v4(PORT, V4));
        let mut o6 = [0u8; 20];
        o6[..4].copy_from_slice(&[UOA_KIND, 20, PORT[0], PORT[1]]);
        o6[4..].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        let Parsed::Found(c) = parse(&o6) else { panic!("{:?}", parse(&o6)) };
        assert_eq!((c.family, c.port, c.addr), (AF_INET6, PORT, o6[4..].try_into().unwrap()));
    }

    /// Other IPv4 options around it (record route, NOPs) are stepped over; the TCP kind 254 is
    /// not a UOA.
    #[test]
    fn other_ip_options_are_not_uoa() {
        let rr = [7u8, 7, 4, 0, 0, 0, 0];
        let o = [&rr[..], &[1], &[UOA_KIND, 8, PORT[0], PORT[1], V4[0], V4[1], V4[2], V4[3]]].concat();
        assert_eq!(parse(&o), v4(PORT, V4));
        assert_eq!(parse(&[254, 8, PORT[0], PORT[1], V4[0], V4[1], V4[2], V4[3]]), Parsed::Absent);
        assert_eq!(parse(&rr), Parsed::Absent);
    }

    /// ByteDance's layouts: types 31 and 30 with the virtual address, type 29 with a VNI.
    #[test]
    fn bytedance_uoas() {
        const VIP: [u8; 4] = [198, 51, 100, 9];
        for kind in [31, 30] {
            let o = [&[kind, 16, 0, 0][..], &PORT, &[0x00, 0x35], &V4, &VIP].concat();
            let Parsed::Found(c) = parse(&o) else { panic!("{o:?}: {:?}", parse(&o)) };
            assert_eq!((c.family, c.port, &c.addr[..4]), (AF_INET, PORT, &V4[..]), "type {kind}");
            assert_eq!((c.vip_port, c.vip_addr, c.flags), ([0x00, 0x35], VIP, CLIENT_HAS_PORT | crate::CLIENT_HAS_VIP));
            let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
            let o = [&[kind, 40, 1, 0][..], &PORT, &[0x00, 0x35], &v6, &[0xfd; 16]].concat();
            let Parsed::Found(c) = parse(&o) else { panic!("{o:?}") };
            assert_eq!((c.family, c.port, c.addr, c.flags), (AF_INET6, PORT, v6, CLIENT_HAS_PORT), "type {kind}");
        }
        let o = [&[29, 16, 0, 0][..], &[0, 0, 0, 42], &PORT, &[0, 0], &V4].concat();
        assert_eq!(parse(&o), v4(PORT, V4));
        let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let o = [&[29, 32, 1, 0][..], &[0, 0, 0, 42], &PORT, &[0, 0], &v6, &[0; 4]].concat();
        let Parsed::Found(c) = parse(&o) else { panic!("{o:?}") };
        assert_eq!((c.family, c.port, c.addr), (AF_INET6, PORT, v6));
    }

    #[test]
    fn malformed_uoas() {
        // Wrong lengths, a length running past the options, a missing length byte, length < 2;
        // ByteDance's lengths with the other family's operation byte, or an unknown one.
        for o in [
            &[UOA_KIND, 6, 0, 0, 0, 0][..],
            &[UOA_KIND, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[UOA_KIND, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[30, 16, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[30, 8, 0, 0, 0, 0, 0, 0],
            &[29, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[29, 8, 0, 0, 0, 0, 0, 0],
            &[UOA_KIND, 8, 0, 0, 0, 0],
            &[1, 1, 1, UOA_KIND],
            &[UOA_KIND, 0, 0, 0],
        ] {
            assert_eq!(parse(o), Parsed::Malformed, "{o:?}");
        }
    }

    #[test]
    fn freshness() {
        let cfg = UdpConfig { enabled: 1, ttl_secs: 2, ..UdpConfig::default() };
        assert!(cfg.fresh(1_000, 1_000 + 2_000_000_000));
        assert!(!cfg.fresh(1_000, 1_001 + 2_000_000_000));
    }

    #[test]
    fn counter_names_are_unique_and_in_slot_order() {
        for (i, c) in UdpCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert!(UdpCounter::ALL[i + 1..].iter().all(|d| d.name() != c.name()));
        }
    }
}
