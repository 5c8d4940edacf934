//! Which options the agent honours, and from where: the userspace side of `TOA_CONFIG` and
//! `TOA_TRUST`. `toa load`, `toa run` and its config file all end up in a [`Policy`].

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toa_common::{
    config::{
        v4_mapped, FLAG_DIALECT_ALIBABA_CDN, FLAG_DIALECT_ANOLIS_VTOA, FLAG_DIALECT_BYTEDANCE,
        FLAG_DIALECT_TENCENT_VTOA, FLAG_PARTS, FLAG_PICK_LAST, FLAG_PORTS, FLAG_READ_SYN, FLAG_REWRITE_SOCKNAME,
        FLAG_TRUST_REQUIRED, PORT_RANGES, TRUST_ENTRIES,
    },
    parse::{ANOLIS_TOA_V6_KIND, TENCENT_CLIENT_KIND},
    udp::{uoa_config, UdpConfig, OPP_IFACES_MAX, UDP_TTL_DEFAULT_SECS},
    AgentConfig, TOA_KIND,
};

/// The longest `--udp-ttl`: a day.
pub const UDP_TTL_MAX: u32 = 86_400;

/// A wire format that differs from the classic `port + address` layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    /// ByteDance: kind 254, length 16: client port + IPv4, 2 pad, VIP port + IPv4.
    Bytedance,
    /// Alibaba CDN: kind 28, length 7 or 19: version, IPv4 or IPv6, no port; on the SYN.
    AlibabaCdn,
    /// Tencent's VTOA: 200/8 client, 201/6 VPC id, 202/8 virtual port + IPv4.
    TencentVtoa,
    /// Alibaba's (Anolis) VTOA: 254/8, 254/20, 253/20 client; 250/8 virtual port + IPv4;
    /// 252/20 client + VPC id + virtual address; 249/40 IPv6 client + VPC id.
    AnolisVtoa,
}

/// Several options in one segment (cascaded proxies): which one wins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pick {
    /// The first valid one, as the classic modules do.
    #[default]
    First,
    /// The last valid one.
    Last,
}

/// An inclusive local port range, written `80` or `8000-8100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange(pub u16, pub u16);

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("{s}: not a port (1-65535)"));
        let range = match s.split_once('-') {
            Some((a, b)) => PortRange(port(a)?, port(b)?),
            None => PortRange(port(s)?, port(s)?),
        };
        if range.0 == 0 || range.0 > range.1 {
            return Err(format!("{s}: a range goes from a port ≥ 1 up to a port not below it"));
        }
        Ok(range)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}-{}", self.0, self.1)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Port(p) => PortRange::from_str(&p.to_string()),
            Raw::Text(t) => PortRange::from_str(&t),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// What the agent honours. The default is the classic modules' behaviour: kind 254, the first
/// valid option, from anyone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Option kinds read with the classic layouts; empty means 254.
    #[serde(default)]
    pub kinds: Vec<u8>,
    #[serde(default)]
    pub dialects: Vec<Dialect>,
    /// Also read the SYN's options (Alibaba CDN implies it).
    #[serde(default)]
    pub syn: bool,
    /// getsockname() returns the virtual IP where the option carries one.
    #[serde(default)]
    pub rewrite_sockname: bool,
    #[serde(default)]
    pub pick: Pick,
    /// Sources (the balancer's backend-facing addresses) allowed to speak for clients; empty
    /// means anyone.
    #[serde(default)]
    pub trust: Vec<IpNet>,
    /// Local ports whose connections are read; empty means all.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Read DPVS's UOA on UDP datagrams and show their clients (eBPF mode).
    #[serde(default)]
    pub udp: bool,
    /// Seconds a UDP flow's client is honoured after its last datagram (with `udp`; default 360).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_ttl: Option<u32>,
    /// Interfaces (of the network namespace `toa load` runs in) where DPVS's option-protocol
    /// datagrams (IP protocol 248) are turned into UDP (with `udp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub udp_opp_ifaces: Vec<String>,
}

impl Policy {
    /// Rejects what the kernel side cannot hold, with the fix.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(k) = self.kinds.iter().find(|k| **k < 2) {
            return Err(format!("--kind {k}: kinds 0 and 1 are the end-of-list and no-op options; use 2 to 255"));
        }
        if self.ports.len() > PORT_RANGES {
            return Err(format!(
                "{} port ranges given; at most {PORT_RANGES} fit: merge some into ranges",
                self.ports.len()
            ));
        }
        if self.trust.len() > TRUST_ENTRIES as usize {
            return Err(format!(
                "{} trusted networks given; at most {TRUST_ENTRIES}: use wider prefixes",
                self.trust.len()
            ));
        }
        if self.udp_ttl.is_some() && !self.udp {
            return Err("--udp-ttl is given without --udp: add --udp, or drop --udp-ttl".into());
        }
        if let Some(ttl) = self.udp_ttl.filter(|t| !(1..=UDP_TTL_MAX).contains(t)) {
            return Err(format!("--udp-ttl {ttl}: give 1 to {UDP_TTL_MAX} seconds"));
        }
        if !self.udp_opp_ifaces.is_empty() && !self.udp {
            return Err("--udp-opp-iface is given without --udp: add --udp, or drop --udp-opp-iface".into());
        }
        if self.udp_opp_ifaces.len() > OPP_IFACES_MAX as usize {
            return Err(format!(
                "{} interfaces given to --udp-opp-iface; at most {OPP_IFACES_MAX}",
                self.udp_opp_ifaces.len()
            ));
        }
        if let Some(bad) = self.udp_opp_ifaces.iter().find(|i| i.is_empty() || i.len() > 15 || i.contains(['/', ' '])) {
            return Err(format!(
                "--udp-opp-iface {bad:?}: not an interface name (1 to 15 characters, no '/' or space)"
            ));
        }
        Ok(())
    }

    /// The `TOA_UDP_CONFIG` slot for this policy.
    pub fn to_udp_config(&self) -> UdpConfig {
        UdpConfig {
            enabled: self.udp as u32,
            ttl_secs: self.udp_ttl.unwrap_or(UDP_TTL_DEFAULT_SECS),
            parse: uoa_config(&self.to_config()),
        }
    }

    /// The kinds in effect (254 when none is given).
    pub fn effective_kinds(&self) -> Vec<u8> {
        let mut kinds = if self.kinds.is_empty() { vec![TOA_KIND] } else { self.kinds.clone() };
        // The VTOA dialects' client options have the classic layouts under their own kinds.
        if self.dialects.contains(&Dialect::TencentVtoa) {
            kinds.push(TENCENT_CLIENT_KIND);
        }
        if self.dialects.contains(&Dialect::AnolisVtoa) {
            kinds.extend([TOA_KIND, ANOLIS_TOA_V6_KIND]);
        }
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    /// The `TOA_CONFIG` slot for this policy.
    pub fn to_config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::classic();
        cfg.kinds = [0; 32];
        for k in self.effective_kinds() {
            cfg.enable_kind(k);
        }
        let mut flag = |on: bool, f: u32| {
            if on {
                cfg.flags |= f;
            }
        };
        flag(self.pick == Pick::Last, FLAG_PICK_LAST);
        flag(self.dialects.contains(&Dialect::Bytedance), FLAG_DIALECT_BYTEDANCE);
        flag(self.dialects.contains(&Dialect::AlibabaCdn), FLAG_DIALECT_ALIBABA_CDN);
        flag(self.dialects.contains(&Dialect::TencentVtoa), FLAG_DIALECT_TENCENT_VTOA);
        flag(self.dialects.contains(&Dialect::AnolisVtoa), FLAG_DIALECT_ANOLIS_VTOA);
        flag(self.dialects.iter().any(|d| matches!(d, Dialect::TencentVtoa | Dialect::AnolisVtoa)), FLAG_PARTS);
        // Alibaba CDN's option lives in the SYN.
        flag(self.syn || self.dialects.contains(&Dialect::AlibabaCdn), FLAG_READ_SYN);
        flag(self.rewrite_sockname, FLAG_REWRITE_SOCKNAME);
        flag(!self.trust.is_empty(), FLAG_TRUST_REQUIRED);
        flag(!self.ports.is_empty(), FLAG_PORTS);
        for (i, r) in self.ports.iter().take(PORT_RANGES).enumerate() {
            cfg.ports[i] = [r.0, r.1];
        }
        cfg.port_ranges = self.ports.len().min(PORT_RANGES) as u32;
        cfg
    }

    /// Reads a policy back from the config slot and the trust entries (for `toa status`).
    pub fn from_kernel(cfg: &AgentConfig, trust: Vec<IpNet>) -> Self {
        let kinds: Vec<u8> = (0..=255u8).filter(|k| cfg.kind_enabled(*k)).collect();
        let mut dialects = Vec::new();
        if cfg.has(FLAG_DIALECT_BYTEDANCE) {
            dialects.push(Dialect::Bytedance);
        }
        if cfg.has(FLAG_DIALECT_ALIBABA_CDN) {
            dialects.push(Dialect::AlibabaCdn);
        }
        if cfg.has(FLAG_DIALECT_TENCENT_VTOA) {
            dialects.push(Dialect::TencentVtoa);
        }
        if cfg.has(FLAG_DIALECT_ANOLIS_VTOA) {
            dialects.push(Dialect::AnolisVtoa);
        }
        let ports = (0..cfg.port_ranges as usize).map(|i| PortRange(cfg.ports[i][0], cfg.ports[i][1])).collect();
        Self {
            kinds,
            dialects,
            syn: cfg.has(FLAG_READ_SYN),
            rewrite_sockname: cfg.has(FLAG_REWRITE_SOCKNAME),
            pick: if cfg.has(FLAG_PICK_LAST) { Pick::Last } else { Pick::First },
            trust,
            ports,
            udp: false,
            udp_ttl: None,
            udp_opp_ifaces: Vec::new(),
        }
    }

    /// The UDP settings read back from the kernel's slot.
    pub fn with_udp(mut self, udp: &UdpConfig) -> Self {
        self.udp = udp.enabled != 0;
        self.udp_ttl = self.udp.then_some(udp.ttl_secs);
        self
    }

    /// The same policy in canonical form (what reading it back from the kernel gives).
    pub fn normalized(&self) -> Self {
        let mut trust: Vec<IpNet> = self.trust.iter().map(IpNet::trunc).collect();
        trust.sort();
        trust.dedup();
        let mut ifaces = if self.udp { self.udp_opp_ifaces.clone() } else { Vec::new() };
        ifaces.sort();
        ifaces.dedup();
        Self { udp_opp_ifaces: ifaces, ..Self::from_kernel(&self.to_config(), trust).with_udp(&self.to_udp_config()) }
    }
}

/// A trusted network as a `TOA_TRUST` key: (prefix length, IPv6 or v4-mapped address).
pub fn trust_key(net: &IpNet) -> (u32, [u8; 16]) {
    match net.trunc().addr() {
        IpAddr::V4(a) => (u32::from(net.prefix_len()) + 96, v4_mapped(a.octets())),
        IpAddr::V6(a) => (u32::from(net.prefix_len()), a.octets()),
    }
}

/// The network a `TOA_TRUST` key stands for.
pub fn trust_net(prefix_len: u32, addr: [u8; 16]) -> Option<IpNet> {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if prefix_len >= 96 => IpNet::new(v4.into(), (prefix_len - 96) as u8).ok(),
        _ => IpNet::new(v6.into(), prefix_len as u8).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!("80".parse(), Ok(PortRange(80, 80)));
        assert_eq!("8000-8100".parse(), Ok(PortRange(8000, 8100)));
        assert!("0".parse::<PortRange>().is_err());
        assert!("9000-8000".parse::<PortRange>().is_err());
        assert!("http".parse::<PortRange>().is_err());
    }

    #[test]
    fn config_round_trips() {
        let p = Policy {
            kinds: vec![200, 254, 253],
            dialects: vec![Dialect::Bytedance],
            syn: true,
            rewrite_sockname: true,
            pick: Pick::Last,
            trust: vec!["100.125.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()],
            ports: vec![PortRange(80, 80), PortRange(8000, 8100)],
            udp: true,
            udp_ttl: Some(30),
            udp_opp_ifaces: Vec::new(),
        };
        let back = Policy::from_kernel(&p.to_config(), p.trust.clone()).with_udp(&p.to_udp_config());
        assert_eq!(back, Policy { kinds: vec![200, 253, 254], ..p.clone() });
        assert_eq!(Policy::default().normalized().kinds, vec![254]);
        // The TTL in effect is shown once UDP is on; off, neither is.
        let on = Policy { udp: true, ..Default::default() }.normalized();
        assert_eq!((on.udp, on.udp_ttl), (true, Some(360)));
        assert_eq!(Policy::default().normalized().udp_ttl, None);
    }

    #[test]
    fn alibaba_cdn_reads_the_syn() {
        let p = Policy { dialects: vec![Dialect::AlibabaCdn], ..Default::default() };
        assert!(p.to_config().has(FLAG_READ_SYN));
    }

    #[test]
    fn trust_keys() {
        let net: IpNet = "100.125.7.9/16".parse().unwrap();
        let (len, addr) = trust_key(&net);
        assert_eq!(len, 112);
        assert_eq!(&addr[10..], &[0xff, 0xff, 100, 125, 0, 0]);
        assert_eq!(trust_net(len, addr), Some("100.125.0.0/16".parse().unwrap()));
        let net6: IpNet = "fd00::/8".parse().unwrap();
        assert_eq!(trust_net(trust_key(&net6).0, trust_key(&net6).1), Some(net6));
    }

    #[test]
    fn invalid_policies_name_the_fix() {
        assert!(Policy { kinds: vec![1], ..Default::default() }.validate().unwrap_err().contains("use 2 to 255"));
        let many = vec![PortRange(1, 1); 17];
        assert!(Policy { ports: many, ..Default::default() }.validate().is_err());
        let iface = |names: &[&str]| Policy {
            udp: true,
            udp_opp_ifaces: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        assert!(iface(&["eth0"]).validate().is_ok());
        assert!(iface(&["a/b"]).validate().unwrap_err().contains("not an interface name"));
        assert!(iface(&["sixteen-letters0"]).validate().unwrap_err().contains("not an interface name"));
        assert!(iface(&["e"; 9]).validate().unwrap_err().contains("at most 8"));
        let opp_alone = Policy { udp_opp_ifaces: vec!["eth0".into()], ..Default::default() };
        assert!(opp_alone.validate().unwrap_err().contains("add --udp"));
        // Sorted and deduplicated, and dropped with UDP off.
        assert_eq!(iface(&["eth1", "eth0", "eth1"]).normalized().udp_opp_ifaces, ["eth0", "eth1"]);
        assert!(Policy { udp: false, ..iface(&["eth0"]) }.normalized().udp_opp_ifaces.is_empty());
        let ttl_alone = Policy { udp_ttl: Some(10), ..Default::default() };
        assert!(ttl_alone.validate().unwrap_err().contains("add --udp"));
        for ttl in [0, UDP_TTL_MAX + 1] {
            let p = Policy { udp: true, udp_ttl: Some(ttl), ..Default::default() };
            assert!(p.validate().unwrap_err().contains("give 1 to 86400 seconds"), "{ttl}");
        }
    }
}
