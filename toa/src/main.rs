//! The `toa` command: load, inspect and unload the TOA agent, and probe a backend.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use toa::{
    backend::userspace::{UserspaceArgs, DEFAULT_TABLE},
    config::{ConfigFile, LogFormat, Overrides, PolicyArgs},
    logging,
    probe::{self, ProbeOptions, Segment},
    programs, service, Backend, LoadRequest, Mode, Places, Status, DEFAULT_PIN_DIR,
};

#[derive(Parser)]
#[command(name = "toa", about = "Real client addresses behind FULLNAT load balancers (TCP Option Address, eBPF)")]
struct Cli {
    /// bpffs directory holding the agent's pinned programs and maps [default: /sys/fs/bpf/toa].
    #[arg(long, global = true, env = "TOA_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// Shared table of the userspace mode; libtoa.so reads the same TOA_TABLE [default: /run/toa/table].
    #[arg(long, global = true, env = "TOA_TABLE")]
    table: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the agent and attach it; it stays attached after this command exits.
    Load {
        /// eBPF (Linux ≥ 5.10) or userspace (capture reader + LD_PRELOAD libtoa.so, any kernel).
        #[arg(long, value_enum, default_value = "auto")]
        mode: Mode,
        /// cgroup v2 directory to scope the agent to (default: the root, i.e. every process).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten, next_help_heading = "Userspace mode")]
        userspace: UserspaceArgs,
    },
    /// Run as a service: load, serve metrics, reload on SIGHUP, unload on SIGTERM.
    Run {
        /// Configuration file [default: /etc/toa/toa.toml, if it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// eBPF (Linux ≥ 5.10) or userspace (capture reader + LD_PRELOAD libtoa.so) [default: auto].
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// cgroup v2 directory to scope the agent to (default: the root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Address of the metrics and health endpoint [default: 127.0.0.1:9431].
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<SocketAddr>,
        /// On SIGTERM leave the programs attached, so a restart loses no client address.
        #[arg(long)]
        keep_loaded: bool,
        /// Log lines as text or JSON [default: text].
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten, next_help_heading = "Userspace mode")]
        userspace: UserspaceArgs,
    },
    /// Detach the agent and remove everything it pinned (or stop the userspace reader).
    Unload,
    /// The userspace mode's capture reader (started by `toa load --mode userspace`).
    #[command(hide = true)]
    UserspaceReader,
    /// Show whether the agent is loaded, where, and its programs.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show the agent's counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// List the live connections that carry a client address (this network namespace).
    Conns {
        #[arg(long)]
        json: bool,
        /// Look in another network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net).
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
    },
    /// Check whether `toa load` can work on this host, and say how to fix what is missing.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Play the load balancer: connect with a TOA option, send a line, print the answer.
    Probe {
        /// The backend to connect to.
        target: SocketAddr,
        /// The client address the option announces.
        #[arg(long = "as", value_name = "IP:PORT")]
        client: SocketAddr,
        /// The segment that carries the option.
        #[arg(long, value_enum, default_value = "ack")]
        on: Segment,
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
        from: Option<std::net::IpAddr>,
    },
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("{s}: an even number of hex digits is needed"));
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("{s}: not hex"))).collect()
}

fn main() -> ExitCode {
    // The version names the embedded programs too: two builds of one version can differ.
    let version: &'static str =
        Box::leak(format!("{} (programs {})", env!("CARGO_PKG_VERSION"), programs::hash()).into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toa: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let places = Places {
        pin_dir: cli.pin_dir.clone().unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
        table: cli.table.clone().unwrap_or_else(|| DEFAULT_TABLE.into()),
    };
    if !matches!(cli.command, Command::Run { .. }) {
        logging::init(LogFormat::Text);
    }
    match cli.command {
        Command::Run { config, mode, cgroup, metrics, keep_loaded, log_format, policy, userspace } => {
            let flags = Overrides {
                mode,
                table: cli.table.clone(),
                userspace,
                cgroup,
                pin_dir: cli.pin_dir,
                metrics,
                keep_loaded,
                log_format,
                policy,
            };
            service::run(config, flags)?;
        }
        Command::Load { mode, cgroup, json, policy, userspace: args } => {
            let request = LoadRequest { cgroup, policy: policy.over(&ConfigFile::default()), tuning: args.tuning() };
            let loaded = Backend::new(mode, &places).load(&request)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&loaded)?);
            } else {
                let userspace = if loaded.status.userspace.is_some() { " in userspace mode" } else { "" };
                match (loaded.changed, loaded.load_time_ms) {
                    (true, Some(t)) if userspace.is_empty() => println!("toa loaded in {t} ms"),
                    (true, Some(t)) => println!("toa loaded{userspace} in {t:.0} ms"),
                    (true, None) => println!("toa was already loaded{userspace}; policy updated for new connections"),
                    (false, _) => println!("toa was already loaded; nothing changed"),
                }
                print_status(&loaded.status);
            }
        }
        Command::Unload => {
            let [ebpf, user] = Backend::both(&places);
            match (ebpf.unload()?, user.unload()?) {
                (false, false) => println!("toa was not loaded; nothing to do"),
                (true, _) => println!("toa unloaded"),
                (false, true) => println!("toa unloaded (userspace mode)"),
            }
        }
        Command::UserspaceReader => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(signal, std::sync::Arc::clone(&stop))?;
            }
            toa::Userspace::new(&places.table).run_reader(&stop, || {
                // `toa load` stops listening once the table is live: nothing more goes to its pipe.
                if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                    // SAFETY: replaces our own stderr descriptor.
                    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 2) };
                }
            })?;
        }
        Command::Status { json } => {
            let status = Backend::live_or_default(&places).status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        Command::Stats { json } => {
            let stats = Backend::live_or_default(&places).stats()?;
            if json {
                let map: serde_json::Map<_, _> = stats.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                for (name, value) in stats {
                    println!("{name:<24}{value}");
                }
            }
        }
        Command::Doctor { json } => {
            let checks = toa::doctor::run(&places.pin_dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    println!("{:<5} {:<15} {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
                    if let Some(fix) = &c.fix {
                        println!("{:<21} fix: {fix}", "");
                    }
                }
            }
            if checks.iter().any(|c| !c.ok) {
                anyhow::bail!("some checks failed: toa load would not work here (fixes above)");
            }
        }
        Command::Conns { json, netns } => {
            if let Some(netns) = netns {
                enter_netns(&netns)?;
            }
            let conns = Backend::live_or_default(&places).conns()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&conns)?);
            } else {
                println!("{:<8} {:<46} {:<46} {:<46} PROCESS", "STATE", "LOCAL", "BALANCER", "CLIENT");
                for c in conns {
                    let process = c.pid.map(|p| format!("{}({p})", c.process.unwrap_or_default())).unwrap_or_default();
                    println!("{:<8} {:<46} {:<46} {:<46} {process}", c.state, c.local, c.balancer, c.client);
                }
            }
        }
        Command::Probe { target, client, on, message, timeout, count, stdin, raw_options, parallel, from } => {
            let timeout = Duration::from_secs(timeout);
            let options = ProbeOptions {
                target,
                client,
                on,
                message,
                timeout,
                count,
                interactive: stdin,
                raw_options,
                parallel,
                from,
            };
            probe::run(&options, |exchange| {
                // What the backend said on stdout; what the probe did on stderr.
                if !stdin {
                    eprintln!("toa probe: from {} announcing {}", exchange.local, exchange.announced);
                    print!("{}", exchange.reply);
                }
            })?;
        }
    }
    Ok(())
}

fn enter_netns(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("--netns {}: {e}", path.display()))?;
    // SAFETY: a valid descriptor; single-threaded here, so the whole process moves.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("--netns {}: {} (is it a network namespace?)", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

fn print_status(status: &Status) {
    if !status.loaded {
        match &status.userspace {
            Some(user) => println!(
                "status:   not loaded (userspace table {} left by a reader that is gone: run `toa unload`)",
                user.table.display()
            ),
            None => println!("status:   not loaded (nothing pinned under {})", status.pin_dir.display()),
        }
    } else if let Some(user) = &status.userspace {
        println!(
            "status:   loaded, userspace mode (capture reader pid {}; applications need LD_PRELOAD=libtoa.so)",
            user.reader_pid
        );
        println!("table:    {} ({} of {} entries hold a client)", user.table.display(), user.entries, user.capacity);
        let t = &user.tuning;
        println!(
            "timing:   accept waits up to {} µs; entries kept {} s; options searched {} s",
            t.accept_wait_us, t.entry_ttl, t.search_secs
        );
    } else {
        println!("status:   loaded, eBPF mode");
        let cgroup = status.cgroup.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "unknown".into());
        println!("cgroup:   {cgroup}");
        println!("pins:     {}", status.pin_dir.display());
        for p in &status.programs {
            let insns = p.verified_insns.map(|n| format!(", {n} insns verified")).unwrap_or_default();
            println!("program:  {} (id {}{insns})", p.name, p.id);
        }
    }
    if status.loaded {
        if let Some(p) = &status.policy {
            let list = |v: Vec<String>| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.join(", ")
                }
            };
            println!("kinds:    {}", list(p.kinds.iter().map(u8::to_string).collect()));
            println!("dialects: {}", list(p.dialects.iter().map(|d| format!("{d:?}").to_lowercase()).collect()));
            println!("syn:      {}   pick: {:?}   rewrite_sockname: {}", p.syn, p.pick, p.rewrite_sockname);
            println!(
                "ports:    {}",
                if p.ports.is_empty() { "all".into() } else { list(p.ports.iter().map(ToString::to_string).collect()) }
            );
            if status.spoofable {
                println!("trust:    anyone — any client that reaches this host can claim any address (set --trust)");
            } else {
                println!("trust:    {}", list(p.trust.iter().map(ToString::to_string).collect()));
            }
        }
    }
    println!("kernel:   {}", status.kernel);
    println!("version:  {}", status.version);
}
