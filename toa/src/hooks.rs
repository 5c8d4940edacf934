//! The agent's kernel hooks and pinned maps, in one table each. Loading, status, doctor, unload
//! and the tests derive every name and attach type from here; a unit test checks the tables
//! against the embedded object, so a program or map renamed on the eBPF side fails the build's
//! tests instead of a load in production.

/// How a program is loaded and attached (the aya program type it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// `BPF_PROG_TYPE_SOCK_OPS`.
    SockOps,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
    SockAddr,
    /// `BPF_PROG_TYPE_CGROUP_SOCKOPT` (aya 0.14 cannot attach it as a link: see `backend::ebpf::attach`).
    Sockopt,
    /// `BPF_PROG_TYPE_CGROUP_SKB`, on ingress.
    SkbIngress,
}

/// Which part of the agent a hook belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// TCP: always attached.
    Tcp,
    /// UDP: attached only when the policy turns it on (`--udp`), so that hosts without UDP
    /// balancers pay nothing for it (the ingress hook runs for every packet of the cgroup).
    Udp,
}

/// One program of the agent and the cgroup link that attaches it.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// The link's pin file under the pin directory.
    pub pin: &'static str,
    /// The program's name in the object, as the kernel shows it (at most 15 characters).
    pub program: &'static str,
    /// The `bpf_attach_type` of its cgroup link.
    pub attach_type: u32,
    pub kind: HookKind,
    /// The hook, as operators read it (`toa doctor`, test output).
    pub label: &'static str,
    pub path: Path,
}

/// Every program of the agent, in attach order (sock_ops first: it fills what the others read).
pub const HOOKS: [Hook; 13] = [
    Hook {
        pin: "link_sock_ops",
        program: "toa_sock_ops",
        attach_type: 3,
        kind: HookKind::SockOps,
        label: "sock_ops",
        path: Path::Tcp,
    },
    Hook {
        pin: "link_getpeername4",
        program: "toa_getpeer4",
        attach_type: 29,
        kind: HookKind::SockAddr,
        label: "getpeername4",
        path: Path::Tcp,
    },
    Hook {
        pin: "link_getpeername6",
        program: "toa_getpeer6",
        attach_type: 30,
        kind: HookKind::SockAddr,
        label: "getpeername6",
        path: Path::Tcp,
    },
    Hook {
        pin: "link_getsockname4",
        program: "toa_getsock4",
        attach_type: 31,
        kind: HookKind::SockAddr,
        label: "getsockname4",
        path: Path::Tcp,
    },
    Hook {
        pin: "link_getsockname6",
        program: "toa_getsock6",
        attach_type: 32,
        kind: HookKind::SockAddr,
        label: "getsockname6",
        path: Path::Tcp,
    },
    Hook {
        pin: "link_getsockopt",
        program: "toa_getsockopt",
        attach_type: 21,
        kind: HookKind::Sockopt,
        label: "getsockopt",
        path: Path::Tcp,
    },
    Hook {
        pin: "link_udp_ingress",
        program: "toa_udp_in",
        attach_type: 0,
        kind: HookKind::SkbIngress,
        label: "udp ingress",
        path: Path::Udp,
    },
    Hook {
        pin: "link_udp_recvmsg4",
        program: "toa_udp_recv4",
        attach_type: 19,
        kind: HookKind::SockAddr,
        label: "recvmsg4",
        path: Path::Udp,
    },
    Hook {
        pin: "link_udp_recvmsg6",
        program: "toa_udp_recv6",
        attach_type: 20,
        kind: HookKind::SockAddr,
        label: "recvmsg6",
        path: Path::Udp,
    },
    Hook {
        pin: "link_udp_connect4",
        program: "toa_udp_conn4",
        attach_type: 10,
        kind: HookKind::SockAddr,
        label: "connect4",
        path: Path::Udp,
    },
    Hook {
        pin: "link_udp_connect6",
        program: "toa_udp_conn6",
        attach_type: 11,
        kind: HookKind::SockAddr,
        label: "connect6",
        path: Path::Udp,
    },
    Hook {
        pin: "link_udp_sendmsg4",
        program: "toa_udp_send4",
        attach_type: 14,
        kind: HookKind::SockAddr,
        label: "sendmsg4",
        path: Path::Udp,
    },
    Hook {
        pin: "link_udp_sendmsg6",
        program: "toa_udp_send6",
        attach_type: 15,
        kind: HookKind::SockAddr,
        label: "sendmsg6",
        path: Path::Udp,
    },
];

/// The hooks that are always attached.
pub fn tcp_hooks() -> impl Iterator<Item = &'static Hook> {
    HOOKS.iter().filter(|h| h.path == Path::Tcp)
}

/// The hooks attached for a policy.
pub fn hooks_for(udp: bool) -> impl Iterator<Item = &'static Hook> {
    HOOKS.iter().filter(move |h| h.path == Path::Tcp || udp)
}

/// One map of the agent that is pinned (kept across loads, relocations and upgrades).
#[derive(Clone, Copy, Debug)]
pub struct PinnedMap {
    /// The pin file under the pin directory.
    pub pin: &'static str,
    /// The map's name in the object.
    pub name: &'static str,
}

/// Client address per socket (socket storage).
pub const SOCKS: PinnedMap = PinnedMap { pin: "socks", name: "TOA_SOCKS" };
/// The counters (per-CPU array, `Counter::ALL` order).
pub const STATS: PinnedMap = PinnedMap { pin: "stats", name: "TOA_STATS" };
/// The policy's `AgentConfig` (one slot).
pub const CONFIG: PinnedMap = PinnedMap { pin: "config", name: "TOA_CONFIG" };
/// The trust list (LPM trie).
pub const TRUST: PinnedMap = PinnedMap { pin: "trust", name: "TOA_TRUST" };

/// UDP: each flow's client (LRU hash).
pub const UDP_FLOWS: PinnedMap = PinnedMap { pin: "udp_flows", name: "TOA_UDP_FLOWS" };
/// UDP: the way back to each client's balancer (LRU hash).
pub const UDP_REPLIES: PinnedMap = PinnedMap { pin: "udp_replies", name: "TOA_UDP_REPLIES" };
/// UDP settings (one slot).
pub const UDP_CONFIG: PinnedMap = PinnedMap { pin: "udp_config", name: "TOA_UDP_CONFIG" };
/// UDP counters (per-CPU array, `UdpCounter::ALL` order).
pub const UDP_STATS: PinnedMap = PinnedMap { pin: "udp_stats", name: "TOA_UDP_STATS" };

/// UDP: the interfaces the option-protocol converter is attached to (see [`UDP_OPP_PROGRAM`]).
pub const UDP_OPP: PinnedMap = PinnedMap { pin: "udp_opp", name: "TOA_UDP_OPP" };

/// Every pinned map.
pub const MAPS: [PinnedMap; 9] = [SOCKS, STATS, CONFIG, TRUST, UDP_FLOWS, UDP_REPLIES, UDP_CONFIG, UDP_STATS, UDP_OPP];

/// The one program attached to network interfaces (tc ingress of each `--udp-opp-iface`) rather
/// than to the cgroup: it turns DPVS's option-protocol datagrams into UDP. A tc filter has no pin;
/// `UDP_OPP` records where it is.
pub const UDP_OPP_PROGRAM: &str = "toa_udp_opp";

/// The UDP path's maps sized by the policy (one entry while UDP is off: an LRU map is allocated
/// in full when created).
pub const UDP_SIZED_MAPS: [PinnedMap; 2] = [UDP_FLOWS, UDP_REPLIES];

/// Maps of the object that are deliberately not pinned: per-run scratch memory, recreated by
/// every load.
pub const UNPINNED_MAPS: [&str; 2] = ["TOA_SCRATCH", "TOA_UDP_SCRATCH"];

/// The hook with this program name.
pub fn by_program(program: &str) -> Option<&'static Hook> {
    HOOKS.iter().find(|h| h.program == program)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aya_obj::{generated::bpf_attach_type, programs::CgroupSkbAttachType, Object, ProgramSection};

    use super::*;
    use crate::programs;

    fn agent() -> Object {
        Object::parse(programs::AGENT).expect("the embedded agent object parses")
    }

    /// The tables name exactly the programs and maps the embedded object has.
    #[test]
    fn tables_match_the_embedded_object() {
        let object = agent();
        let in_object: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        let in_table: BTreeSet<&str> = HOOKS.iter().map(|h| h.program).chain([UDP_OPP_PROGRAM]).collect();
        assert_eq!(in_object, in_table, "programs in the object vs in HOOKS + UDP_OPP_PROGRAM");
        assert!(matches!(object.programs[UDP_OPP_PROGRAM].section, ProgramSection::SchedClassifier));
        for hook in HOOKS {
            assert!(hook.program.len() <= 15, "{}: the kernel keeps 15 characters of a name", hook.program);
            let section = &object.programs[hook.program].section;
            let kind = match section {
                ProgramSection::SockOps => HookKind::SockOps,
                ProgramSection::CgroupSockAddr { .. } => HookKind::SockAddr,
                ProgramSection::CgroupSockopt { .. } => HookKind::Sockopt,
                ProgramSection::CgroupSkb { attach_type: Some(CgroupSkbAttachType::Ingress) } => HookKind::SkbIngress,
                other => panic!("{}: unexpected section {other:?}", hook.program),
            };
            assert_eq!(kind, hook.kind, "{}", hook.program);
        }

        let in_object: BTreeSet<&str> = object.maps.keys().map(String::as_str).collect();
        let in_table: BTreeSet<&str> = MAPS.iter().map(|m| m.name).chain(UNPINNED_MAPS).collect();
        // The object also has sections for data (.rodata, .bss) when the compiler emits them.
        let named: BTreeSet<&str> = in_object.iter().copied().filter(|n| !n.starts_with('.')).collect();
        assert_eq!(named, in_table, "maps in the object vs MAPS + UNPINNED_MAPS");
    }

    /// Each attach type is the one of its section's hook, so status, doctor and unload query the
    /// hook the link is on.
    #[test]
    fn attach_types_are_the_sections_hooks() {
        let object = agent();
        for hook in HOOKS {
            let expected = match &object.programs[hook.program].section {
                ProgramSection::SockOps => 3,
                ProgramSection::CgroupSockAddr { attach_type } => bpf_attach_type::from(*attach_type) as u32,
                ProgramSection::CgroupSockopt { attach_type } => bpf_attach_type::from(*attach_type) as u32,
                ProgramSection::CgroupSkb { attach_type: Some(CgroupSkbAttachType::Ingress) } => {
                    bpf_attach_type::BPF_CGROUP_INET_INGRESS as u32
                }
                other => panic!("{other:?}"),
            };
            assert_eq!(hook.attach_type, expected, "{}", hook.program);
        }
        let pins: BTreeSet<&str> = HOOKS.iter().map(|h| h.pin).chain(MAPS.iter().map(|m| m.pin)).collect();
        assert_eq!(pins.len(), HOOKS.len() + MAPS.len(), "pin names are unique");
        // bpffs refuses names with dots.
        assert!(pins.iter().all(|p| !p.contains('.')));
    }
}
