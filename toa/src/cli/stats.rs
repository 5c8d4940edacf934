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
    let stats = Backend::live_or_default(places).stats()?;
    let map: serde_json::Map<_, _> = stats.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
    args.output.print(&map, |_| print!("{}", render(&stats)))
}

/// One counter a line, names aligned.
fn render(stats: &[(&str, u64)]) -> String {
    stats.iter().map(|(name, value)| format!("{name:<24}{value}\n")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_counter_a_line() {
        assert_eq!(
            super::render(&[("syn_recv_sock_toa", 3), ("option_malformed", 0)]),
            "syn_recv_sock_toa       3\noption_malformed        0\n"
        );
    }
}
