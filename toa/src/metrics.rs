//! Prometheus metrics: the agent's counters, read from the pinned map at each scrape.

use std::path::PathBuf;

use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

use crate::{programs, system, Agent};

/// Reads the counters through the pins, so it reports whatever agent is loaded there.
#[derive(Debug)]
struct AgentCollector {
    pin_dir: PathBuf,
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let agent = Agent::new(&self.pin_dir);
        let loaded = ConstGauge::new(i64::from(agent.is_attached()));
        loaded.encode(encoder.encode_descriptor(
            "loaded",
            "1 while the programs are attached",
            None,
            loaded.metric_type(),
        )?)?;
        // No agent, no counters: an absent series is clearer than a series of zeros.
        if let Ok(stats) = agent.stats() {
            for (name, value) in stats {
                let counter = ConstCounter::new(value);
                let help = toa_common::Counter::ALL.iter().find(|c| c.name() == name).map(|c| c.help()).unwrap_or("");
                counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// The registry `toa run` serves.
pub fn registry(pin_dir: PathBuf) -> Registry {
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
    registry.register_collector(Box::new(AgentCollector { pin_dir }));
    registry
}

/// The text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
