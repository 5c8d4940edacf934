//! `toa probe`: play the load balancer. Connects to a backend with a TOA option naming a chosen
//! client, sends one line and returns the backend's answer. The writer program is attached to a
//! cgroup made for this process alone and everything is removed before returning. Where that
//! program cannot load (before 5.10), `--from` makes the probe speak TCP itself (`raw`).

pub mod raw;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use aya::{
    maps::Array,
    programs::{CgroupAttachMode, SockOps},
    EbpfLoader,
};
use toa_common::{
    parse::encode_toa,
    probe::{
        ProbeConfig, PROBE_ON_ACK, PROBE_ON_DATA, PROBE_ON_SYN, PROBE_OPTIONS, PROBE_OPTION_MAX, PROBE_PORT_FROM_SOURCE,
    },
    ClientAddr, AF_INET, AF_INET6,
};

use crate::{
    cgroup::TempCgroup,
    error::{chain, Error},
    programs, system,
};

/// Which outgoing segment carries the options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// The ACK that completes the handshake (what most balancers do).
    Ack,
    /// The first segment that carries data.
    Data,
    /// The SYN (older DPVS/LVS, Alibaba CDN).
    Syn,
}

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub target: SocketAddr,
    /// The client address to announce; ignored when `raw_options` is not empty.
    pub client: SocketAddr,
    pub on: Segment,
    pub message: String,
    pub timeout: Duration,
    /// Connections to make, one after the other; connection `i` announces the client port
    /// plus `i`, so that each one can be told apart.
    pub count: u32,
    /// Instead of `message`: one connection that sends each line read from stdin and prints
    /// each answer line, until stdin ends.
    pub interactive: bool,
    /// Options written as given, instead of a TOA for `client` (tests of malformed input).
    pub raw_options: Vec<Vec<u8>>,
    /// Open the `count` connections all at once; each announces the client IPv4 address with
    /// its own source port.
    pub parallel: bool,
    /// Speak TCP from this address (the balancer's own, not this host's) instead of through
    /// the kernel's writer: for kernels without the sock_ops header-option hooks.
    pub from: Option<std::net::IpAddr>,
}

/// The classic TOA announcing `client`.
pub fn toa_option(client: SocketAddr) -> Vec<u8> {
    let mut addr = [0u8; 16];
    let family = match client {
        SocketAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.ip().octets());
            AF_INET
        }
        SocketAddr::V6(a) => {
            addr.copy_from_slice(&a.ip().octets());
            AF_INET6
        }
    };
    let client = ClientAddr { family, port: client.port().to_be_bytes(), addr, ..ClientAddr::default() };
    let mut out = [0u8; 20];
    let n = encode_toa(&client, &mut out);
    out[..n].to_vec()
}

/// What the writer puts on the wire for `options`, announcing `client`.
pub fn config(options: &ProbeOptions, client: SocketAddr) -> Result<ProbeConfig, Error> {
    let list = if options.raw_options.is_empty() { vec![toa_option(client)] } else { options.raw_options.clone() };
    let bad = |detail: String| Error::Probe { detail };
    if list.len() > PROBE_OPTIONS {
        return Err(bad(format!("at most {PROBE_OPTIONS} options can be written")));
    }
    let mut cfg = ProbeConfig {
        on: match options.on {
            Segment::Ack => PROBE_ON_ACK,
            Segment::Data => PROBE_ON_DATA,
            Segment::Syn => PROBE_ON_SYN,
        },
        count: list.len() as u8,
        lens: [0; PROBE_OPTIONS],
        written: 0,
        refused: 0,
        options: [[0; PROBE_OPTION_MAX]; PROBE_OPTIONS],
        serial: 0,
    };
    for (i, opt) in list.iter().enumerate() {
        // The kernel writes an option only if its length byte matches what it is given.
        if opt.len() < 2 || opt.len() > PROBE_OPTION_MAX || opt[1] as usize != opt.len() {
            return Err(bad(format!("option {} ({:02x?}): its second byte must be its length (2..=40)", i + 1, opt)));
        }
        cfg.lens[i] = opt.len() as u8;
        cfg.options[i][..opt.len()].copy_from_slice(opt);
    }
    if cfg.total_len() > 40 {
        return Err(bad("the options exceed the 40 bytes a TCP header can hold".into()));
    }
    Ok(cfg)
}

/// The option bytes to write for a connection announcing `client`, checked as the kernel's
/// writer would check them.
pub fn option_list(options: &ProbeOptions, client: SocketAddr) -> Result<Vec<u8>, Error> {
    let cfg = config(options, client)?;
    Ok((0..cfg.count as usize).flat_map(|i| cfg.options[i][..cfg.lens[i] as usize].to_vec()).collect())
}

/// One connection of a probe.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The probe's real address, as the backend's kernel sees it.
    pub local: SocketAddr,
    /// The client address announced in the option.
    pub announced: SocketAddr,
    /// What the backend answered.
    pub reply: String,
}

/// Runs the probe, calling `on_reply` after each connection.
pub fn run(options: &ProbeOptions, mut on_reply: impl FnMut(&Exchange)) -> Result<(), Error> {
    system::require_root("toa probe")?;
    if let Some(from) = options.from {
        if options.parallel
            && (!options.client.is_ipv4() || !options.raw_options.is_empty() || options.on == Segment::Syn)
        {
            return Err(Error::Probe {
                detail: "--parallel announces IPv4 clients on the ACK or data segment, without --raw-option".into(),
            });
        }
        return raw::run(options, from, on_reply);
    }
    system::require_kernel().map_err(|_| Error::Probe {
        detail: format!(
            "kernel {} is older than 5.10: the probe's kernel writer needs the sock_ops header-option hooks. \
             Give --from ADDR (the balancer's address on this link, one this host does not own, which the \
             backend reaches at this host's MAC): the probe then speaks TCP itself",
            system::kernel_release()
        ),
    })?;
    programs::require_embedded()?;
    system::raise_memlock();
    let announced = |i: u32| {
        let mut client = options.client;
        client.set_port(options.client.port().wrapping_add(i as u16));
        client
    };
    let first = config(options, announced(0))?;
    if options.parallel {
        return run_parallel(options, first, on_reply);
    }

    // Declared before the writer so that it is dropped after it: detach, then leave.
    let cgroup = TempCgroup::enter(&format!("toa-probe-{}", std::process::id()))?;
    let mut writer = Writer::attach(cgroup.path(), first)?;
    for i in 0..options.count {
        let client = announced(i);
        let cfg = config(options, client)?;
        writer.set(cfg)?;
        let exchange =
            exchange(options, client).map_err(|e| Error::Probe { detail: format!("{}: {e}", options.target) })?;
        let done = writer.get()?;
        if done.refused > 0 || done.written != cfg.count {
            return Err(Error::Probe {
                detail: format!(
                    "the kernel wrote {} of the {} options (it refuses, e.g., kind 253/254 shorter \
                     than 4 bytes, and the same kind twice with the same first two data bytes)",
                    done.written, cfg.count
                ),
            });
        }
        on_reply(&exchange);
    }
    Ok(())
}

/// The writer program attached to a cgroup: outgoing connections of its processes carry the
/// configured options. Dropping it detaches it.
pub struct Writer {
    ebpf: aya::Ebpf,
}

impl Writer {
    pub fn attach(cgroup: &std::path::Path, first: ProbeConfig) -> Result<Self, Error> {
        let mut writer = Self { ebpf: load_probe_object()? };
        writer.set(first)?;
        attach_sock_ops(&mut writer.ebpf, programs::PROBE_WRITER, cgroup)?;
        Ok(writer)
    }

    fn array(&mut self) -> Result<Array<&mut aya::maps::MapData, ProbeConfig>, Error> {
        let map =
            self.ebpf.map_mut("TOA_PROBE").ok_or_else(|| Error::Load { detail: "map TOA_PROBE missing".into() })?;
        Array::try_from(map).map_err(|e| Error::Load { detail: chain(&e) })
    }

    /// What to write on the next connections.
    pub fn set(&mut self, cfg: ProbeConfig) -> Result<(), Error> {
        self.array()?.set(0, cfg, 0).map_err(|e| Error::Load { detail: chain(&e) })
    }

    /// The slot as the writer left it (`written`, `refused`).
    pub fn get(&mut self) -> Result<ProbeConfig, Error> {
        self.array()?.get(&0, 0).map_err(|e| Error::Load { detail: chain(&e) })
    }
}

/// Programs of the probe object that return at once, attached to a cgroup next to the agent:
/// the kernel's run-time statistics of these are the per-run floor of the hooks (benchmarks).
/// Dropping it detaches them.
pub struct Floor {
    ebpf: aya::Ebpf,
}

impl Floor {
    /// With `storage`, the sock_ops program also creates a socket-storage record of the agent's
    /// size on each passive connection (`toa_floor_storage`): the kernel's price of that write.
    pub fn attach(cgroup: &std::path::Path, storage: bool) -> Result<Self, Error> {
        let mut ebpf = load_probe_object()?;
        attach_sock_ops(&mut ebpf, if storage { "toa_floor_storage" } else { "toa_floor_sockops" }, cgroup)?;
        let program: &mut aya::programs::CgroupSockAddr = ebpf
            .program_mut("toa_floor_getpeer4")
            .ok_or_else(|| Error::Load { detail: "program toa_floor_getpeer4 missing".into() })?
            .try_into()
            .map_err(|e| Error::Load { detail: chain(&e) })?;
        program.load().map_err(|e| Error::Load { detail: chain(&e) })?;
        let dir = std::fs::File::open(cgroup)?;
        program.attach(&dir, CgroupAttachMode::Single).map_err(|e| Error::Attach {
            program: "toa_floor_getpeer4",
            cgroup: cgroup.to_owned(),
            detail: chain(&e),
        })?;
        Ok(Self { ebpf })
    }

    /// (program name, kernel id) of the attached programs.
    pub fn programs(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_owned(), p.info().ok()?.id())))
            .filter(|(name, _)| name.starts_with("toa_floor"))
            .collect()
    }
}

/// Counts the sock_ops callbacks of a cgroup's sockets by `op` (benchmarks). Dropping it
/// detaches it.
pub struct CallbackCounter {
    ebpf: aya::Ebpf,
}

impl CallbackCounter {
    pub fn attach(cgroup: &std::path::Path) -> Result<Self, Error> {
        let mut ebpf = load_probe_object()?;
        attach_sock_ops(&mut ebpf, "toa_count_callbacks", cgroup)?;
        Ok(Self { ebpf })
    }

    /// Callbacks seen so far, indexed by `BPF_SOCK_OPS_*_CB`, summed over CPUs.
    pub fn counts(&self) -> Result<[u64; 32], Error> {
        let map = self
            .ebpf
            .map("TOA_PROBE_CALLBACKS")
            .ok_or_else(|| Error::Load { detail: "map TOA_PROBE_CALLBACKS missing".into() })?;
        let slots: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(map).map_err(|e| Error::Load { detail: chain(&e) })?;
        let mut out = [0u64; 32];
        for (op, total) in out.iter_mut().enumerate() {
            let per_cpu = slots.get(&(op as u32), 0).map_err(|e| Error::Load { detail: chain(&e) })?;
            *total = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

fn load_probe_object() -> Result<aya::Ebpf, Error> {
    programs::require_embedded()?;
    system::raise_memlock();
    EbpfLoader::new().load(programs::PROBE).map_err(|e| Error::Load { detail: chain(&e) })
}

fn attach_sock_ops(ebpf: &mut aya::Ebpf, name: &'static str, cgroup: &std::path::Path) -> Result<(), Error> {
    let load_err = |e: &dyn std::error::Error| Error::Load { detail: chain(e) };
    let program: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Load { detail: format!("program {name} missing") })?
        .try_into()
        .map_err(|e| load_err(&e))?;
    program.load().map_err(|e| load_err(&e))?;
    let dir = std::fs::File::open(cgroup)?;
    program.attach(&dir, CgroupAttachMode::Single).map_err(|e| Error::Attach {
        program: name,
        cgroup: cgroup.to_owned(),
        detail: chain(&e),
    })?;
    Ok(())
}

/// `count` connections open at the same time, each announcing its own source port.
fn run_parallel(
    options: &ProbeOptions,
    mut cfg: ProbeConfig,
    mut on_reply: impl FnMut(&Exchange),
) -> Result<(), Error> {
    let bad = |detail: String| Error::Probe { detail: format!("{}: {detail}", options.target) };
    if !options.client.is_ipv4() || !options.raw_options.is_empty() || options.on == Segment::Syn {
        return Err(bad("--parallel announces IPv4 clients on the ACK or data segment, without --raw-option".into()));
    }
    cfg.on |= PROBE_PORT_FROM_SOURCE;
    // Thousands of sockets at once (one descriptor each, plus a few of our own).
    crate::system::raise_nofile(u64::from(options.count) + 64);
    let cgroup = TempCgroup::enter(&format!("toa-probe-{}", std::process::id()))?;
    let _writer = Writer::attach(cgroup.path(), cfg)?;
    let mut streams = Vec::with_capacity(options.count as usize);
    for _ in 0..options.count {
        let stream = TcpStream::connect_timeout(&options.target, options.timeout).map_err(|e| bad(e.to_string()))?;
        streams.push(stream);
    }
    // Every connection is open before any is used.
    for s in &mut streams {
        s.set_write_timeout(Some(options.timeout)).map_err(|e| bad(e.to_string()))?;
        s.write_all(format!("{}\n", options.message).as_bytes()).map_err(|e| bad(e.to_string()))?;
        s.shutdown(std::net::Shutdown::Write).map_err(|e| bad(e.to_string()))?;
    }
    for mut s in streams {
        s.set_read_timeout(Some(options.timeout)).map_err(|e| bad(e.to_string()))?;
        let local = s.local_addr().map_err(|e| bad(e.to_string()))?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|e| bad(e.to_string()))?;
        let announced = SocketAddr::new(options.client.ip(), local.port());
        on_reply(&Exchange { local, announced, reply });
    }
    Ok(())
}

fn exchange(options: &ProbeOptions, announced: SocketAddr) -> std::io::Result<Exchange> {
    let mut stream = TcpStream::connect_timeout(&options.target, options.timeout)?;
    let local = stream.local_addr()?;
    stream.set_write_timeout(Some(options.timeout))?;
    if options.interactive {
        return interact(stream, local, announced);
    }
    stream.set_read_timeout(Some(options.timeout))?;
    stream.write_all(options.message.as_bytes())?;
    stream.write_all(b"\n")?;
    // Half-close: the backend sees the end of what we send and can close its side.
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(Exchange { local, announced, reply })
}

/// One line from stdin, one answer line from the backend, printed at once; the connection stays
/// open between lines (tests use it to look at a live connection).
fn interact(stream: TcpStream, local: SocketAddr, announced: SocketAddr) -> std::io::Result<Exchange> {
    use std::io::BufRead as _;
    eprintln!("toa probe: from {local} announcing {announced}");
    let mut from_backend = std::io::BufReader::new(&stream);
    for line in std::io::stdin().lock().lines() {
        (&stream).write_all(format!("{}\n", line?).as_bytes())?;
        let mut answer = String::new();
        if from_backend.read_line(&mut answer)? == 0 {
            break;
        }
        print!("{answer}");
        std::io::Write::flush(&mut std::io::stdout())?;
    }
    Ok(Exchange { local, announced, reply: String::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(raw: Vec<Vec<u8>>) -> ProbeOptions {
        ProbeOptions {
            target: "198.18.0.1:80".parse().unwrap(),
            client: "203.0.113.7:4242".parse().unwrap(),
            on: Segment::Ack,
            message: String::new(),
            timeout: Duration::from_secs(1),
            count: 1,
            interactive: false,
            raw_options: raw,
            parallel: false,
            from: None,
        }
    }

    fn config_of(o: &ProbeOptions) -> Result<ProbeConfig, Error> {
        config(o, o.client)
    }

    #[test]
    fn classic_options() {
        assert_eq!(toa_option("203.0.113.7:4242".parse().unwrap()), [254, 8, 0x10, 0x92, 203, 0, 113, 7]);
        let v6 = toa_option("[2001:db8::7]:4242".parse().unwrap());
        assert_eq!(v6.len(), 20);
        assert_eq!(&v6[..4], &[254, 20, 0x10, 0x92]);
    }

    #[test]
    fn raw_options_need_a_matching_length_byte() {
        assert!(config_of(&opts(vec![vec![254, 6, 0, 0, 0, 0]])).is_ok());
        assert!(config_of(&opts(vec![vec![254, 8, 0]])).is_err());
        assert!(config_of(&opts(vec![vec![254]])).is_err());
        let long = |len: u8| {
            let mut v = vec![30, len];
            v.resize(len as usize, 0);
            v
        };
        assert!(config_of(&opts(vec![long(20), long(20)])).is_ok());
        assert!(config_of(&opts(vec![long(20), long(21)])).is_err(), "41 bytes do not fit");
    }
}
