//! Prometheus metrics: the agent's counters, read from the pinned map (or the userspace table)
//! at each scrape.

use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

use toa_common::counters::Kind;

use crate::{programs, system, Backend};

/// Reads the counters at each scrape, so it reports whatever agent is loaded there.
#[derive(Debug)]
struct AgentCollector {
    backend: Backend,
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let loaded = ConstGauge::new(i64::from(self.backend.is_up()));
        loaded.encode(encoder.encode_descriptor(
            "loaded",
            "1 while the programs are attached (userspace mode: while the capture reader runs)",
            None,
            loaded.metric_type(),
        )?)?;
        // No agent, no counters: an absent series is clearer than a series of zeros.
        if let Ok(stats) = self.backend.stats() {
            for (counter, value) in stats {
                let (name, help) = (counter.name(), counter.help());
                match counter.kind() {
                    Kind::Counter => {
                        let metric = ConstCounter::new(value);
                        metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
                    }
                    Kind::Gauge => {
                        let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                        metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
                    }
                }
            }
        }
        for (counter, value) in self.backend.udp_stats().unwrap_or_default() {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(counter.name(), counter.help(), None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

/// The registry `toa run` serves.
pub fn registry(backend: Backend) -> Registry {
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
    registry.register_collector(Box::new(AgentCollector { backend }));
    registry
}

/// The text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
