//! Prometheus metrics: the agent's counters, read from the pinned map at each scrape.

use std::path::PathBuf;

use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

use crate::{programs, system, Agent, Userspace};

/// Where the counters live.
#[derive(Clone, Debug)]
pub enum Source {
    /// The eBPF agent's pin directory.
    Ebpf(PathBuf),
    /// The userspace mode's table.
    Userspace(PathBuf),
}

impl Source {
    /// Whether the agent is serving (programs attached, or the reader alive).
    pub fn is_up(&self) -> bool {
        match self {
            Source::Ebpf(pins) => Agent::new(pins).is_attached(),
            Source::Userspace(table) => Userspace::new(table).is_running(),
        }
    }

    fn stats(&self) -> Result<Vec<(&'static str, u64)>, crate::Error> {
        match self {
            Source::Ebpf(pins) => Agent::new(pins).stats(),
            Source::Userspace(table) => Userspace::new(table).stats(),
        }
    }
}

/// Reads the counters at each scrape, so it reports whatever agent is loaded there.
#[derive(Debug)]
struct AgentCollector {
    source: Source,
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let loaded = ConstGauge::new(i64::from(self.source.is_up()));
        loaded.encode(encoder.encode_descriptor(
            "loaded",
            "1 while the programs are attached (userspace mode: while the capture reader runs)",
            None,
            loaded.metric_type(),
        )?)?;
        // No agent, no counters: an absent series is clearer than a series of zeros.
        if let Ok(stats) = self.source.stats() {
            for (name, value) in stats {
                let counter = ConstCounter::new(value);
                let help = toa_common::Counter::ALL
                    .iter()
                    .find(|c| c.name() == name)
                    .map(|c| c.help())
                    .unwrap_or_else(|| crate::userspace::table_counter_help(name));
                counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// The registry `toa run` serves.
pub fn registry(source: Source) -> Registry {
    let mut registry = Registry::with_prefix("toa");
    registry.register(
        "build",
        "version, kernel and hash of the embedded programs",
        Info::new(vec![
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
            ("kernel".to_owned(), system::kernel_release()),
            ("programs".to_owned(), programs::hash()),
        ]),
    );
    registry.register_collector(Box::new(AgentCollector { source }));
    registry
}

/// The text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
