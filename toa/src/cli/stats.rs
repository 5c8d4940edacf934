//! `toa stats`: the counters of the mode that is loaded.

use toa::{Backend, Places};

use super::flags::Output;

/// Show the agent's counters.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
}

pub fn run(args: Args, places: &Places) -> anyhow::Result<()> {
    let backend = Backend::live_or_default(places);
    let mut stats: Vec<(&str, u64)> = backend.stats()?.iter().map(|(c, v)| (c.name(), *v)).collect();
    stats.extend(backend.udp_stats()?.iter().map(|(c, v)| (c.name(), *v)));
    let map: serde_json::Map<_, _> = stats.iter().map(|(name, v)| ((*name).to_owned(), (*v).into())).collect();
    args.output.print(&map, |_| print!("{}", render(&stats)))
}

/// One counter a line, names aligned.
fn render(stats: &[(&str, u64)]) -> String {
    stats.iter().map(|(name, value)| format!("{name:<24}{value}\n")).collect()
}

#[cfg(test)]
mod tests {
    use toa_common::{udp::UdpCounter, Counter};

    #[test]
    fn one_counter_a_line() {
        let (a, b) = (Counter::SynRecvSockToa.name(), Counter::OptionMalformed.name());
        assert_eq!(
            super::render(&[(a, 3), (b, 0), (UdpCounter::UdpRecvClient.name(), 2)]),
            "syn_recv_sock_toa       3\noption_malformed        0\nudp_recv_client         2\n"
        );
    }
}
