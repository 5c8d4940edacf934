//! `/etc/toa/toa.toml`: every `toa run` setting; flags given on the command line win.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    backend::{
        userspace::{Tuning, TuningOverrides, DEFAULT_TABLE},
        LoadRequest, Mode, Places,
    },
    policy::{Dialect, Pick, Policy, PortRange},
    Error, DEFAULT_PIN_DIR,
};

/// Where `toa run` looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/toa/toa.toml";
/// Loopback only by default: metrics say which clients connect, which is nobody else's business.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9431";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The file's contents; every key is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `auto`, `ebpf` or `userspace`.
    pub mode: Option<Mode>,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub keep_loaded: Option<bool>,
    pub log_format: Option<LogFormat>,
    /// Policy keys, named like the flags of `toa load`.
    #[serde(default)]
    pub kind: Vec<u8>,
    #[serde(default)]
    pub dialect: Vec<Dialect>,
    pub syn: Option<bool>,
    pub rewrite_sockname: Option<bool>,
    pub pick: Option<Pick>,
    #[serde(default)]
    pub trust: Vec<IpNet>,
    /// Ports or ranges: `port = [80, "8000-8100"]`.
    #[serde(default)]
    pub port: Vec<PortRange>,
    pub udp: Option<bool>,
    pub udp_ttl: Option<u32>,
    #[serde(default)]
    pub udp_opp_interfaces: Vec<String>,
    /// The userspace mode's keys, named like the flags.
    pub table: Option<PathBuf>,
    pub table_entries: Option<u32>,
    pub accept_wait_us: Option<u32>,
    pub entry_ttl: Option<u32>,
    pub search_secs: Option<u32>,
    pub table_group: Option<crate::backend::userspace::TableReaders>,
}

/// The policy as given on the command line (flags of `toa load` and `toa run`); each key given
/// wins over the config file's.
#[derive(Clone, Debug, Default)]
pub struct PolicyOverrides {
    /// Option kinds read with the classic layouts.
    pub kinds: Vec<u8>,
    pub dialects: Vec<Dialect>,
    pub syn: bool,
    pub rewrite_sockname: bool,
    pub pick: Option<Pick>,
    /// Sources whose options are honoured (empty: any).
    pub trust: Vec<IpNet>,
    /// Local ports whose connections are served (both lists empty: all).
    pub ports: Vec<u16>,
    pub port_ranges: Vec<PortRange>,
    pub udp: bool,
    pub udp_ttl: Option<u32>,
    pub udp_opp_ifaces: Vec<String>,
}

impl PolicyOverrides {
    /// The policy these flags describe, on top of `file` (flags win key by key).
    pub fn over(&self, file: &ConfigFile) -> Policy {
        let mut ports: Vec<PortRange> = self.ports.iter().map(|p| PortRange(*p, *p)).collect();
        ports.extend(self.port_ranges.iter().copied());
        Policy {
            kinds: pick(&self.kinds, &file.kind),
            dialects: pick(&self.dialects, &file.dialect),
            syn: self.syn || file.syn.unwrap_or(false),
            rewrite_sockname: self.rewrite_sockname || file.rewrite_sockname.unwrap_or(false),
            pick: self.pick.or(file.pick).unwrap_or_default(),
            trust: pick(&self.trust, &file.trust),
            ports: pick(&ports, &file.port),
            udp: self.udp || file.udp.unwrap_or(false),
            udp_ttl: self.udp_ttl.or(file.udp_ttl),
            udp_opp_ifaces: pick(&self.udp_opp_ifaces, &file.udp_opp_interfaces),
        }
    }
}

/// The flag's list if any was given, else the file's.
fn pick<T: Clone>(flag: &[T], file: &[T]) -> Vec<T> {
    if flag.is_empty() {
        file.to_vec()
    } else {
        flag.to_vec()
    }
}

impl ConfigFile {
    /// Reads `path`; a missing file is an error only when `required` (given with --config).
    pub fn read(path: &Path, required: bool) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Self::default()),
            Err(e) => {
                return Err(Error::Config { path: path.to_owned(), detail: format!("{e}: create it or fix --config") });
            }
        };
        Self::parse(&text).map_err(|detail| Error::Config { path: path.to_owned(), detail })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }
}

/// Settings given on the command line (they override the file).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub mode: Option<Mode>,
    pub table: Option<PathBuf>,
    pub tuning: TuningOverrides,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub keep_loaded: bool,
    pub log_format: Option<LogFormat>,
    pub policy: PolicyOverrides,
}

/// What `toa run` does, once file and flags are merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// As configured (`auto` is resolved when loading).
    pub mode: Mode,
    pub table: PathBuf,
    pub tuning: Tuning,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub metrics: SocketAddr,
    pub keep_loaded: bool,
    pub log_format: LogFormat,
    pub policy: Policy,
}

impl Settings {
    /// Where each mode keeps its state.
    pub fn places(&self) -> Places {
        Places { pin_dir: self.pin_dir.clone(), table: self.table.clone() }
    }

    /// What the backend is asked to load.
    pub fn request(&self) -> LoadRequest {
        LoadRequest { cgroup: self.cgroup.clone(), policy: self.policy.clone(), tuning: self.tuning }
    }

    pub fn merge(file: &ConfigFile, flags: &Overrides) -> Self {
        let u = &flags.tuning;
        let tuning = TuningOverrides {
            table_entries: u.table_entries.or(file.table_entries),
            accept_wait_us: u.accept_wait_us.or(file.accept_wait_us),
            entry_ttl: u.entry_ttl.or(file.entry_ttl),
            search_secs: u.search_secs.or(file.search_secs),
            table_group: u.table_group.or(file.table_group),
        }
        .tuning();
        Self {
            mode: flags.mode.or(file.mode).unwrap_or_default(),
            table: flags.table.clone().or_else(|| file.table.clone()).unwrap_or_else(|| DEFAULT_TABLE.into()),
            tuning,
            cgroup: flags.cgroup.clone().or_else(|| file.cgroup.clone()),
            pin_dir: flags.pin_dir.clone().or_else(|| file.pin_dir.clone()).unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
            metrics: flags
                .metrics
                .or(file.metrics)
                .unwrap_or_else(|| DEFAULT_METRICS.parse().expect("a valid literal address")),
            keep_loaded: flags.keep_loaded || file.keep_loaded.unwrap_or(false),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            policy: flags.policy.over(file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses() {
        let file = ConfigFile::parse(
            "cgroup = \"/sys/fs/cgroup/web\"\npin_dir = \"/sys/fs/bpf/t\"\nmetrics = \"0.0.0.0:9431\"\nkeep_loaded = true\nlog_format = \"json\"\n",
        )
        .unwrap();
        assert_eq!(file.cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/web")));
        assert_eq!(file.metrics, Some("0.0.0.0:9431".parse().unwrap()));
        assert_eq!(file.keep_loaded, Some(true));
        assert_eq!(file.log_format, Some(LogFormat::Json));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(ConfigFile::parse("cgrup = \"/x\"").unwrap_err().contains("cgrup"));
        assert!(ConfigFile::parse("metrics = \"localhost\"").is_err());
        assert!(ConfigFile::parse("log_format = \"xml\"").is_err());
    }

    #[test]
    fn policy_keys() {
        let file = ConfigFile::parse(
            "kind = [254, 200]\ndialect = [\"bytedance\"]\ntrust = [\"100.125.0.0/16\"]\nport = [80, \"8000-8100\"]\npick = \"last\"\n",
        )
        .unwrap();
        let p = PolicyOverrides::default().over(&file);
        assert_eq!(p.kinds, vec![254, 200]);
        assert_eq!(p.dialects, vec![Dialect::Bytedance]);
        assert_eq!(p.ports, vec![PortRange(80, 80), PortRange(8000, 8100)]);
        assert_eq!(p.pick, Pick::Last);
        let flags = PolicyOverrides { trust: vec!["10.0.0.0/8".parse().unwrap()], ..Default::default() };
        assert_eq!(flags.over(&file).trust, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert!(ConfigFile::parse("port = [\"90-80\"]").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let file =
            ConfigFile { metrics: Some("0.0.0.0:1".parse().unwrap()), keep_loaded: Some(true), ..Default::default() };
        let flags = Overrides { metrics: Some("127.0.0.1:2".parse().unwrap()), ..Default::default() };
        let s = Settings::merge(&file, &flags);
        assert_eq!(s.metrics, "127.0.0.1:2".parse().unwrap());
        assert!(s.keep_loaded);
        assert_eq!(s.pin_dir, Path::new(DEFAULT_PIN_DIR));
        let s = Settings::merge(&ConfigFile::default(), &Overrides::default());
        assert_eq!(s.metrics, DEFAULT_METRICS.parse().unwrap());
        assert!(!s.keep_loaded);
    }
}
