//! `toa probe`: play the load balancer against a backend (see `toa::probe`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use toa::probe::{self, ProbeOptions};

use super::flags::SegmentFlag;

/// Play the load balancer: connect with a TOA option, send a line, print the answer.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backend to connect to.
    target: SocketAddr,
    /// The client address the option announces.
    #[arg(long = "as", value_name = "IP:PORT")]
    client: SocketAddr,
    /// The segment that carries the option.
    #[arg(long, value_enum, default_value = "ack")]
    on: SegmentFlag,
    /// The line to send.
    #[arg(long, default_value = "hello from toa probe")]
    message: String,
    /// Seconds to wait for the connection and the answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
    /// Connections to make; connection N announces the client port plus N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    count: u32,
    /// One connection: send each line of stdin, print each answer, until stdin ends.
    #[arg(long, conflicts_with_all = ["message", "count"])]
    stdin: bool,
    /// Write this option (hex, e.g. fe06000a0102) instead of the TOA; repeatable. For
    /// testing how a backend copes with malformed options.
    #[arg(long = "raw-option", value_name = "HEX", value_parser = parse_hex, hide = true)]
    raw_options: Vec<Vec<u8>>,
    /// Open the --count connections all at once; each announces the --as IPv4 address with
    /// its own source port.
    #[arg(long, conflicts_with = "stdin")]
    parallel: bool,
    /// Speak TCP from this address, the balancer's own (one this host does not own, which the
    /// backend reaches at this host's MAC), instead of through the kernel: for kernels older
    /// than 5.10, where the probe's eBPF writer cannot load.
    #[arg(long, value_name = "IP")]
    from: Option<IpAddr>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let interactive = args.stdin;
    let options = ProbeOptions {
        target: args.target,
        client: args.client,
        on: args.on.into(),
        message: args.message,
        timeout: Duration::from_secs(args.timeout),
        count: args.count,
        interactive,
        raw_options: args.raw_options,
        parallel: args.parallel,
        from: args.from,
    };
    probe::run(&options, |exchange| {
        // What the backend said on stdout; what the probe did on stderr.
        if !interactive {
            eprintln!("toa probe: from {} announcing {}", exchange.local, exchange.announced);
            print!("{}", exchange.reply);
        }
    })?;
    Ok(())
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("{s}: an even number of hex digits is needed"));
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("{s}: not hex"))).collect()
}

#[cfg(test)]
mod tests {
    use super::parse_hex;

    #[test]
    fn hex_options() {
        assert_eq!(parse_hex("fe0800"), Ok(vec![0xfe, 0x08, 0x00]));
        assert!(parse_hex("fe0").unwrap_err().contains("even number"));
        assert!(parse_hex("zz").unwrap_err().contains("not hex"));
    }
}
