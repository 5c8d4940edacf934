//! The flags several commands share, and the command line's names for the library's enums.
//! The library has no clap: these types parse and convert into its plain ones.

use clap::ValueEnum;
use ipnet::IpNet;
use toa::{
    backend::userspace::TuningOverrides,
    config::{LogFormat, PolicyOverrides},
    policy::{Dialect, Pick, PortRange},
    probe::Segment,
    Mode,
};

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeFlag {
    /// eBPF on Linux ≥ 5.10, userspace below.
    Auto,
    /// sock_ops + cgroup getpeername programs: every process, nothing to preload.
    Ebpf,
    /// A capture reader and libtoa.so preloaded into applications (any kernel).
    Userspace,
}

impl From<ModeFlag> for Mode {
    fn from(flag: ModeFlag) -> Self {
        match flag {
            ModeFlag::Auto => Mode::Auto,
            ModeFlag::Ebpf => Mode::Ebpf,
            ModeFlag::Userspace => Mode::Userspace,
        }
    }
}

/// `--dialect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DialectFlag {
    /// ByteDance: kind 254, length 16: client port + IPv4, 2 pad, VIP port + IPv4.
    Bytedance,
    /// Alibaba CDN: kind 28, length 7 or 19: version, IPv4 or IPv6, no port; on the SYN.
    AlibabaCdn,
    /// Tencent's VTOA: 200/8 client, 201/6 VPC id, 202/8 virtual port + IPv4.
    TencentVtoa,
    /// Alibaba's (Anolis) VTOA: 254/8, 254/20, 253/20 client, 250/8 virtual address, 252/20
    /// client + VPC id + virtual address, 249/40 IPv6 client + VPC id.
    AnolisVtoa,
}

impl From<DialectFlag> for Dialect {
    fn from(flag: DialectFlag) -> Self {
        match flag {
            DialectFlag::Bytedance => Dialect::Bytedance,
            DialectFlag::AlibabaCdn => Dialect::AlibabaCdn,
            DialectFlag::TencentVtoa => Dialect::TencentVtoa,
            DialectFlag::AnolisVtoa => Dialect::AnolisVtoa,
        }
    }
}

/// `--pick`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PickFlag {
    /// The first valid one, as the classic modules do.
    First,
    /// The last valid one.
    Last,
}

impl From<PickFlag> for Pick {
    fn from(flag: PickFlag) -> Self {
        match flag {
            PickFlag::First => Pick::First,
            PickFlag::Last => Pick::Last,
        }
    }
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormatFlag {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatFlag> for LogFormat {
    fn from(flag: LogFormatFlag) -> Self {
        match flag {
            LogFormatFlag::Text => LogFormat::Text,
            LogFormatFlag::Json => LogFormat::Json,
        }
    }
}

/// `toa probe --on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SegmentFlag {
    /// The ACK that completes the handshake (what most balancers do).
    Ack,
    /// The first segment that carries data.
    Data,
    /// The SYN (older DPVS/LVS, Alibaba CDN).
    Syn,
}

impl From<SegmentFlag> for Segment {
    fn from(flag: SegmentFlag) -> Self {
        match flag {
            SegmentFlag::Ack => Segment::Ack,
            SegmentFlag::Data => Segment::Data,
            SegmentFlag::Syn => Segment::Syn,
        }
    }
}

/// The policy flags of `toa load` and `toa run`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct PolicyFlags {
    /// Read the classic layouts (length 8: port + IPv4, 20: port + IPv6) under option kind N;
    /// repeatable [default: 254].
    #[arg(long = "kind", value_name = "N")]
    pub kinds: Vec<u8>,
    /// Also read a layout that differs from the classic one; repeatable.
    #[arg(long = "dialect", value_enum)]
    pub dialects: Vec<DialectFlag>,
    /// Also read the options of the SYN (older DPVS/LVS); costs memory per connection.
    #[arg(long)]
    pub syn: bool,
    /// Make getsockname() return the virtual IP where the option carries it (ByteDance).
    #[arg(long)]
    pub rewrite_sockname: bool,
    /// Several options in one segment: which valid one wins [default: first].
    #[arg(long, value_enum)]
    pub pick: Option<PickFlag>,
    /// Honour options only from these sources (the balancer's backend-facing range);
    /// repeatable. Without it, any client that reaches the host can claim any address.
    #[arg(long = "trust", value_name = "CIDR")]
    pub trust: Vec<IpNet>,
    /// Honour options only on this local port; repeatable.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Honour options only on these local ports; repeatable.
    #[arg(long = "port-range", value_name = "FIRST-LAST")]
    pub port_ranges: Vec<PortRange>,
    /// Also read DPVS's UOA (IPv4 option 31) on UDP datagrams: recvfrom() shows the client and
    /// replies to it go back through the balancer (eBPF mode).
    #[arg(long)]
    pub udp: bool,
    /// Seconds a UDP flow's client is honoured after its last datagram [default: 360].
    #[arg(long, value_name = "SECS")]
    pub udp_ttl: Option<u32>,
    /// Turn DPVS's "option protocol" datagrams (IP protocol 248) arriving on this interface into
    /// UDP, so their UOA is read too (with --udp; IPv4, Ethernet); repeatable.
    #[arg(long = "udp-opp-iface", value_name = "IFACE")]
    pub udp_opp_ifaces: Vec<String>,
}

impl From<PolicyFlags> for PolicyOverrides {
    fn from(f: PolicyFlags) -> Self {
        PolicyOverrides {
            kinds: f.kinds,
            dialects: f.dialects.into_iter().map(Into::into).collect(),
            syn: f.syn,
            rewrite_sockname: f.rewrite_sockname,
            pick: f.pick.map(Into::into),
            trust: f.trust,
            ports: f.ports,
            port_ranges: f.port_ranges,
            udp: f.udp,
            udp_ttl: f.udp_ttl,
            udp_opp_ifaces: f.udp_opp_ifaces,
        }
    }
}

/// The userspace mode's settings (flags of `toa load` and `toa run`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TuningFlags {
    /// Entries the shared table holds; it never grows (72 bytes each) [default: 65536].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(8..=16_777_216))]
    pub table_entries: Option<u32>,
    /// How many microseconds accept()/getpeername() wait for the reader to catch up with a new
    /// connection after it last made progress (it usually takes tens; 8 times this in all at
    /// most) [default: 5000].
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub accept_wait_us: Option<u32>,
    /// Seconds a client address stays in the table for getpeername() [default: 300].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    pub entry_ttl: Option<u32>,
    /// Seconds to look for an option on the segments after the handshake [default: 10].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    pub search_secs: Option<u32>,
    /// Group that may read the table, besides root: give it to the services that preload
    /// libtoa.so (a name or a GID; `all` lets every user read every client address)
    /// [default: root only].
    #[arg(long, value_name = "GROUP", value_parser = toa::backend::userspace::TableReaders::parse)]
    pub table_group: Option<toa::backend::userspace::TableReaders>,
}

impl From<TuningFlags> for TuningOverrides {
    fn from(f: TuningFlags) -> Self {
        TuningOverrides {
            table_entries: f.table_entries,
            accept_wait_us: f.accept_wait_us,
            entry_ttl: f.entry_ttl,
            search_secs: f.search_secs,
            table_group: f.table_group,
        }
    }
}

/// `--json` of the commands that report.
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct Output {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Output {
    /// Prints `value` as JSON, or runs `text`.
    pub fn print<T: serde::Serialize>(self, value: &T, text: impl FnOnce(&T)) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            text(value);
        }
        Ok(())
    }
}
