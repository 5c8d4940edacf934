//! `toa stats`: the counters of the mode that is loaded.

use toa::{Backend, Places};
use toa_common::Counter;

use super::flags::Output;

/// Show the agent's counters.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
}

pub fn run(args: Args, places: &Places) -> anyhow::Result<()> {
    let stats = Backend::live_or_default(places).stats()?;
    let map: serde_json::Map<_, _> = stats.iter().map(|(c, v)| (c.name().to_owned(), (*v).into())).collect();
    args.output.print(&map, |_| print!("{}", render(&stats)))
}

/// One counter a line, names aligned.
fn render(stats: &[(Counter, u64)]) -> String {
    stats.iter().map(|(counter, value)| format!("{:<24}{value}\n", counter.name())).collect()
}

#[cfg(test)]
mod tests {
    use toa_common::Counter;

    #[test]
    fn one_counter_a_line() {
        assert_eq!(
            super::render(&[(Counter::SynRecvSockToa, 3), (Counter::OptionMalformed, 0)]),
            "syn_recv_sock_toa       3\noption_malformed        0\n"
        );
    }
}
