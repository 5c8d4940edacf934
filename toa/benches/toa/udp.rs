//! The UDP path's cost: a UDP echo server (a thread of this process, in the server namespace and
//! the bench's cgroup) answered by the hand-written balancer from the client namespace, one
//! datagram in flight per flow, 64 flows whose first datagram carries a UOA. Baseline: the agent
//! loaded without `--udp` (the UDP programs detached); measured: with it. Pairs alternate A B,
//! B A …; the table shows the exchange-rate ratio with a 95% confidence interval, and, from the
//! kernel's BPF run-time statistics in the `--udp` runs, the UDP programs' time per exchange (one
//! datagram each way: the ingress program also runs for the reply, delivered to the balancer's
//! socket in the same cgroup). A second comparison opens the flows with DPVS's option-protocol
//! datagrams, the converter on the server's interface: it runs for every packet that arrives
//! there, so its time per run is what it costs each packet of a host.

use std::net::{SocketAddrV4, UdpSocket};

use toa_lab::raw_udp::{balancer_addr, uoa4, Balancer};

use toa_common::udp::UdpCounter;

use super::{real_app::mean_ci, *};

const PORT: u16 = 5400;
const FLOWS: u16 = 64;

/// The echo server: answers each datagram to whoever recvfrom() names, until dropped.
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(bench: &Bench<'_>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = bench.lab.netns_path(&bench.lab.server_ns);
        let thread = std::thread::spawn(move || {
            support::in_netns(ns, move || {
                let sock = UdpSocket::bind(("198.18.0.1", PORT)).expect("bind the UDP echo server");
                sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 1500];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
        });
        ready_rx.recv().expect("the echo server started");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a run is set up: the agent's UDP path off (the baseline), on with flows opened by a UOA
/// in the IPv4 header, or on with the converter on the server's interface and flows opened by
/// DPVS's option-protocol datagrams (IP protocol 248).
#[derive(Clone, Copy, PartialEq)]
enum Arm {
    Off,
    Options,
    OptionProtocol,
}

/// Exchanges for `run_time` over `FLOWS` flows, each opened with a UOA; (exchanges, seconds).
fn exchanges(bench: &Bench<'_>, s: &Settings, first_port: u16, arm: Arm) -> (u64, f64) {
    let ns = bench.lab.netns_path(&bench.lab.client_ns);
    let run_time = s.run_time;
    support::in_netns(ns, move || {
        let server = SocketAddrV4::new([198, 18, 0, 1].into(), PORT);
        let first = Balancer::bind(balancer_addr(first_port)).expect("bind the balancer");
        let flows: Vec<(Balancer, Vec<u8>)> = (0..FLOWS)
            .map(|i| {
                let b = first.another(first_port + 1 + i).expect("bind a balancer port");
                (b, uoa4(SocketAddrV4::new([10, 0, 0, i as u8].into(), 10_000 + i)))
            })
            .collect();
        for (b, option) in &flows {
            match arm {
                Arm::OptionProtocol => b.send_opp(server, option, b"open").expect("send"),
                _ => b.send(server, option, b"open").expect("send"),
            }
            b.recv().expect("a reply to the flow's first datagram");
        }
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < run_time {
            for (b, _) in &flows {
                b.send(server, &[], b"ping").expect("send");
                b.recv().expect("a reply");
                done += 1;
            }
        }
        (done, started.elapsed().as_secs_f64())
    })
}

/// One run's figures: (exchanges per second, exchanges, BPF time of the UDP programs, each
/// program's (time, runs), the UDP counters' increments).
type Run = (f64, u64, u64, std::collections::HashMap<String, (u64, u64)>, Vec<(UdpCounter, u64)>);

pub fn udp_cost(bench: &Bench<'_>, s: &Settings) -> Value {
    println!("\nUDP path (--udp): echo exchanges over {FLOWS} flows opened with a UOA");
    let _server = EchoServer::start(bench);
    let load = |arm: Arm| {
        let (agent, cgroup) = (bench.agent.clone(), bench.cgroup.clone());
        let udp_opp_ifaces = if arm == Arm::OptionProtocol { vec!["eth0".to_owned()] } else { Vec::new() };
        let policy = Policy { udp: arm != Arm::Off, udp_opp_ifaces, ..Policy::default() };
        // In the server's namespace: the converter's interface is named there.
        support::in_netns(bench.lab.netns_path(&bench.lab.server_ns), move || agent.load(Some(&cgroup), &policy))
            .expect("load the agent");
    };
    // Each run uses fresh balancer ports: every flow starts with its UOA.
    let next_port = std::cell::Cell::new(20_000u16);
    let run = |arm: Arm| -> Run {
        load(arm);
        let port = next_port.get();
        next_port.set(port + FLOWS + 1);
        let ids: Vec<(String, u32)> =
            bench.agent.status().map(|st| st.programs.iter().map(|p| (p.name.clone(), p.id)).collect()).unwrap();
        let counters = || bench.agent.udp_stats().unwrap_or_default();
        let before = counters();
        let ((done, secs), spent) = run_time_during(&ids, || exchanges(bench, s, port, arm));
        let udp_ns: u64 = spent.iter().filter(|(n, _)| n.starts_with("toa_udp")).map(|(_, (ns, _))| ns).sum();
        let counted: Vec<(UdpCounter, u64)> = counters()
            .into_iter()
            .map(|(c, v)| (c, v - before.iter().find(|(b, _)| *b == c).map_or(0, |(_, v)| *v)))
            .collect();
        (done as f64 / secs, done, udp_ns, spent, counted)
    };
    let pairs = if s.quick { 2 } else { 8 };
    let (base, measured) = alternate(pairs, || run(Arm::Off), || run(Arm::Options));
    let mut result = summary(&base, &measured, pairs, "with --udp");
    println!("\n  The same, the flows opened by option-protocol datagrams (IP protocol 248), the converter on the server's eth0:");
    let (base, measured) = alternate(pairs, || run(Arm::Off), || run(Arm::OptionProtocol));
    result["option_protocol"] = summary(&base, &measured, pairs, "with --udp --udp-opp-iface eth0");
    bench.set_agent(false);
    result
}

/// Prints and returns what the `measured` runs cost against the `base` ones.
fn summary(base: &[Run], measured: &[Run], pairs: usize, label: &str) -> Value {
    let ratios: Vec<f64> = base.iter().zip(measured).map(|(b, m)| m.0 / b.0).collect();
    let (ratio, lo, hi) = mean_ci(&ratios);
    let exchanged: u64 = measured.iter().map(|m| m.1).sum();
    let udp_ns: u64 = measured.iter().map(|m| m.2).sum();
    let mut per_program = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for (_, _, _, spent, _) in measured {
        for (name, (ns, runs)) in spent.iter().filter(|(n, _)| n.starts_with("toa_udp")) {
            let e = per_program.entry(name.clone()).or_default();
            e.0 += ns;
            e.1 += runs;
        }
    }
    let per_exchange = udp_ns as f64 / exchanged as f64;
    println!(
        "  exchanges/s without --udp {:>8.0}, {label} {:>8.0}: ratio {ratio:.3} (95% CI {lo:.3}–{hi:.3}, {pairs} pairs)",
        base.iter().map(|b| b.0).sum::<f64>() / pairs as f64,
        measured.iter().map(|m| m.0).sum::<f64>() / pairs as f64,
    );
    println!("  UDP programs: {per_exchange:.0} ns of BPF time per exchange (one datagram each way)");
    let mut programs = Vec::new();
    for (name, (ns, runs)) in &per_program {
        let (ns_run, runs_per) = (*ns as f64 / (*runs).max(1) as f64, *runs as f64 / exchanged as f64);
        println!("    {name:<16} {ns_run:>6.0} ns per run, {runs_per:>5.2} runs per exchange");
        programs.push(json!({"program": name, "ns_per_run": ns_run, "runs_per_exchange": runs_per}));
    }
    let count = |c: UdpCounter| -> u64 {
        measured.iter().flat_map(|m| m.4.iter()).filter(|(k, _)| *k == c).map(|(_, v)| v).sum()
    };
    let (options, shown, redirected) =
        (count(UdpCounter::UdpOption), count(UdpCounter::UdpRecvClient), count(UdpCounter::UdpReplyRedirected));
    let converted = count(UdpCounter::UdpOppConverted);
    println!(
        "  counters over these runs: udp_option {options}, udp_opp_converted {converted}, udp_recv_client {shown}, udp_reply_redirected {redirected} ({} exchanges + {} flow openings)",
        exchanged,
        u64::from(FLOWS) * pairs as u64
    );
    json!({
        "flows": FLOWS,
        "pairs": pairs,
        "rate_ratio": {"mean": ratio, "ci95": [lo, hi], "ratios": ratios},
        "exchanges_measured": exchanged,
        "udp_bpf_ns_per_exchange": per_exchange,
        "programs": programs,
        "counters": {"udp_option": options, "udp_opp_converted": converted, "udp_recv_client": shown, "udp_reply_redirected": redirected},
    })
}
