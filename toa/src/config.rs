//! `/etc/toa/toa.toml`: every `toa run` setting; flags given on the command line win.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{Error, DEFAULT_PIN_DIR};

/// Where `toa run` looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/toa/toa.toml";
/// Loopback only by default: metrics say which clients connect, which is nobody else's business.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9431";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
    pub cgroup: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub keep_loaded: Option<bool>,
    pub log_format: Option<LogFormat>,
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
    pub cgroup: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub keep_loaded: bool,
    pub log_format: Option<LogFormat>,
}

/// What `toa run` does, once file and flags are merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub metrics: SocketAddr,
    pub keep_loaded: bool,
    pub log_format: LogFormat,
}

impl Settings {
    pub fn merge(file: &ConfigFile, flags: &Overrides) -> Self {
        Self {
            cgroup: flags.cgroup.clone().or_else(|| file.cgroup.clone()),
            pin_dir: flags.pin_dir.clone().or_else(|| file.pin_dir.clone()).unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
            metrics: flags
                .metrics
                .or(file.metrics)
                .unwrap_or_else(|| DEFAULT_METRICS.parse().expect("a valid literal address")),
            keep_loaded: flags.keep_loaded || file.keep_loaded.unwrap_or(false),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
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
    fn flags_override_the_file() {
        let file = ConfigFile { metrics: Some("0.0.0.0:1".parse().unwrap()), keep_loaded: Some(true), ..Default::default() };
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
