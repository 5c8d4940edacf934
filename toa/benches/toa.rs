//! What toa costs, measured side by side in one run (`cargo xtask bench`, as root).
//!
//! Everything runs in this process, which moves itself into a cgroup of its own: the agent is
//! attached there (it acts on the server's, passive, sockets) and so is the writer that plays
//! the load balancer (it acts on the client's, active, sockets). Server threads live in one
//! network namespace, client threads in another, joined by a veth pair. Every figure is a ratio
//! to a baseline measured in the same run, interleaved A B A B …, with the spread over repeats.
//! The real-application arm (`real_app`) runs Debian's nginx and wrk as separate processes in
//! the same namespaces and cgroup. `TOA_BENCH_ONLY=agent_cpu|real_app|udp|faults` runs one part;
//! `TOA_BENCH_ONLY=real_app_ebpf TOA_BENCH_PAIRS=N` only the eBPF rate comparison of the
//! real-application arm, with N pairs (to narrow its confidence interval).
//!
//! `--quick` (or TOA_BENCH_QUICK=1) runs every measurement briefly: the CI smoke run, no
//! thresholds. Results: a table on stdout, `target/bench/results.json`, `target/bench/*.svg`.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use toa::{cgroup::TempCgroup, policy::Policy, probe, Agent, Backend};
use toa_lab::{self as support, Lab};

#[path = "toa/real_app.rs"]
mod real_app;
#[path = "toa/udp.rs"]
mod udp;

struct Settings {
    quick: bool,
    repeats: usize,
    run_time: Duration,
    clients: usize,
    churn: u64,
    held_max: usize,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("TOA_BENCH_QUICK").is_some();
    let s = if quick {
        Settings { quick, repeats: 2, run_time: Duration::from_millis(300), clients: 2, churn: 2_000, held_max: 1_000 }
    } else {
        Settings { quick, repeats: 6, run_time: Duration::from_secs(2), clients: 2, churn: 100_000, held_max: 10_000 }
    };
    let nofile = raise_nofile();
    // Two descriptors per held connection, and room for the rest.
    let s = Settings { held_max: s.held_max.min((nofile.saturating_sub(2_000) / 2) as usize), ..s };
    let lab = Lab::new();
    let cgroup = TempCgroup::enter(&format!("toa-bench-{}", std::process::id())).expect("enter a cgroup of our own");
    let bench = Bench::new(&lab, cgroup.path().to_owned());
    let mut results = serde_json::Map::new();
    results.insert("machine".into(), machine());
    results.insert("settings".into(), json!({"quick": quick, "repeats": s.repeats, "run_ms": s.run_time.as_millis() as u64, "client_threads": s.clients}));

    let load = bench.load_once();
    println!(
        "load + attach: {:.1} ms; verifier: {}",
        load.0,
        load.1.iter().map(|(n, i)| format!("{n} {i}")).collect::<Vec<_>>().join(", ")
    );
    results.insert("load".into(), json!({"load_time_ms": load.0, "verified_insns": load.1.iter().map(|(n, i)| json!({"program": n, "insns": i})).collect::<Vec<_>>()}));

    if std::env::var("TOA_BENCH_ONLY").as_deref() == Ok("faults") {
        // Just the fault table (what docs/reliability.md quotes).
        results.insert("faults".into(), bench.faults(&s));
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        fs::create_dir_all(&out).expect("create target/bench");
        fs::write(out.join("faults.json"), serde_json::to_string_pretty(&Value::Object(results)).unwrap()).unwrap();
        return;
    }
    match std::env::var("TOA_BENCH_ONLY").as_deref() {
        // One part, for development.
        Ok("agent_cpu") => return drop(bench.agent_cpu(&s)),
        Ok("real_app") => return drop(real_app::real_app(&bench, &s)),
        Ok("real_app_ebpf") => return drop(real_app::ebpf_rate(&bench, &s)),
        Ok("udp") => return drop(udp::udp_cost(&bench, &s)),
        _ => {}
    }
    let rates = bench.connection_rates(&s);
    results.insert("connection_rate".into(), rates);
    results.insert("modes".into(), bench.modes(&s));
    results.insert("agent_cpu".into(), bench.agent_cpu(&s));
    results.insert("real_app".into(), real_app::real_app(&bench, &s));
    results.insert("udp".into(), udp::udp_cost(&bench, &s));
    results.insert("getpeername".into(), bench.getpeername_cost(&s));
    results.insert("proxy_protocol_v2".into(), bench.proxy_v2(&s));
    results.insert("scaling".into(), bench.scaling(&s));
    results.insert("memory".into(), bench.memory(&s));
    results.insert("faults".into(), bench.faults(&s));

    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out).expect("create target/bench");
    let results = Value::Object(results);
    fs::write(out.join("results.json"), serde_json::to_string_pretty(&results).unwrap()).unwrap();
    fs::write(out.join("scaling.svg"), scaling_chart(&results["scaling"])).unwrap();
    println!("\nwrote {}", out.join("results.json").display());
    drop(bench);
    drop(cgroup);
}

/// The lab, the agent on our cgroup, the writer, and the two servers.
struct Bench<'a> {
    lab: &'a Lab,
    cgroup: PathBuf,
    agent: Agent,
    writer: std::sync::Mutex<probe::Writer>,
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        let _ = self.agent.unload();
    }
}

const CLIENT: &str = "203.0.113.7:4242";

impl<'a> Bench<'a> {
    fn new(lab: &'a Lab, cgroup: PathBuf) -> Self {
        // Hundreds of thousands of short connections: let the client reuse ports in TIME_WAIT
        // and use the whole port range, or connect() spends its time looking for a free port
        // (these sysctls are per network namespace: only the lab's change).
        for ns in [&lab.client_ns, &lab.server_ns] {
            support::in_netns(lab.netns_path(ns), || {
                fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").unwrap();
                fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").unwrap();
            });
        }
        let writer = probe::Writer::attach(&cgroup, toa_config(true)).expect("attach the writer");
        Self { lab, agent: Agent::new(&lab.pin_dir), cgroup, writer: std::sync::Mutex::new(writer) }
    }

    fn set_agent(&self, loaded: bool) {
        if loaded {
            self.agent.load(Some(&self.cgroup), &Policy::default()).expect("load the agent");
        } else {
            self.agent.unload().expect("unload the agent");
        }
    }

    fn set_option(&self, on: bool) {
        self.writer.lock().unwrap().set(toa_config(on)).expect("configure the writer");
    }

    fn load_once(&self) -> (f64, Vec<(String, u32)>) {
        let _ = self.agent.unload();
        let started = Instant::now();
        self.set_agent(true);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let status = self.agent.status().expect("status");
        self.set_agent(false);
        (ms, status.programs.iter().map(|p| (p.name.clone(), p.verified_insns.unwrap_or(0))).collect())
    }

    fn in_server<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        support::in_netns(self.lab.netns_path(&self.lab.server_ns), f)
    }

    /// Connections per second, `clients` threads of short connections for `run_time`, against a
    /// server that does accept() + read + getpeername() + reply + close.
    fn rate(&self, s: &Settings, port: u16, proxy_v2: bool) -> f64 {
        let (done, elapsed) = self.connections(s, port, proxy_v2);
        done as f64 / elapsed.as_secs_f64()
    }

    /// Connections made in `s.repeats` runs of [`Bench::connections`].
    fn connections_repeated(&self, s: &Settings, port: u16) -> u64 {
        (0..s.repeats).map(|_| self.connections(s, port, false).0).sum()
    }

    /// Connections made by `clients` threads for `run_time`, and how long they ran.
    fn connections(&self, s: &Settings, port: u16, proxy_v2: bool) -> (u64, Duration) {
        let target: SocketAddr = format!("198.18.0.1:{port}").parse().unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let counter = done.clone();
        let header = proxy_header();
        let elapsed = self.clients_while(
            s,
            move || {
                if exchange(target, proxy_v2.then_some(&header[..])) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            },
            || std::thread::sleep(s.run_time),
        );
        (done.load(Ordering::Relaxed), elapsed)
    }

    /// `s.clients` threads in the client namespace, each calling `one` over and over while
    /// `meanwhile` runs on this thread; returns how long they ran.
    fn clients_while(
        &self,
        s: &Settings,
        one: impl Fn() + Clone + Send + 'static,
        meanwhile: impl FnOnce(),
    ) -> Duration {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..s.clients)
            .map(|_| {
                let (ns, one, stop) = (self.lab.netns_path(&self.lab.client_ns), one.clone(), stop.clone());
                std::thread::spawn(move || {
                    support::in_netns(ns, move || {
                        while !stop.load(Ordering::Relaxed) {
                            one();
                        }
                    })
                })
            })
            .collect();
        let started = Instant::now();
        meanwhile();
        stop.store(true, Ordering::Relaxed);
        let elapsed = started.elapsed();
        for t in threads {
            t.join().unwrap();
        }
        elapsed
    }

    /// Interleaved runs of `a` and `b`; the ratio b/a per repeat, summarised.
    fn compare(&self, s: &Settings, label: &str, a: impl FnMut() -> f64, b: impl FnMut() -> f64) -> Value {
        let (ra, rb) = alternate(s.repeats, a, b);
        let ratios: Vec<f64> = ra.iter().zip(&rb).map(|(x, y)| y / x).collect();
        let summary = spread(&ratios);
        println!(
            "{label:<58} {:>10.0} vs {:>10.0}   ratio {:.3} (min {:.3}, max {:.3})",
            median(&ra),
            median(&rb),
            summary["median"].as_f64().unwrap(),
            summary["min"].as_f64().unwrap(),
            summary["max"].as_f64().unwrap()
        );
        json!({"baseline": ra, "measured": rb, "ratio": summary})
    }

    fn connection_rates(&self, s: &Settings) -> Value {
        println!("\nconnection rate (connections/s: baseline vs measured)");
        let _server = start_server(self, 8080, Server::Echo);
        let toa = self.compare(
            s,
            "TOA on every connection: agent unloaded vs loaded",
            || {
                self.set_option(true);
                self.set_agent(false);
                self.rate(s, 8080, false)
            },
            || {
                self.set_option(true);
                self.set_agent(true);
                self.rate(s, 8080, false)
            },
        );
        let plain = self.compare(
            s,
            "no option: agent unloaded vs loaded",
            || {
                self.set_option(false);
                self.set_agent(false);
                self.rate(s, 8080, false)
            },
            || {
                self.set_option(false);
                self.set_agent(true);
                self.rate(s, 8080, false)
            },
        );
        self.set_agent(false);
        self.set_option(true);
        json!({"toa_on_every_connection": toa, "no_option": plain})
    }

    /// Both modes against one baseline: an unmodified server process (examples/peer_echo), no
    /// agent. The eBPF mode rewrites for that same server; the userspace mode needs a second
    /// copy started with libtoa.so preloaded, and its capture reader running.
    fn modes(&self, s: &Settings) -> Value {
        println!("\nmodes against one baseline (connections/s: no agent vs the mode)");
        let table = PathBuf::from(format!("/run/toa-bench-{}/table", std::process::id()));
        let _plain = ExternalServer::start(self, 8095, None);
        let _preloaded = ExternalServer::start(self, 8096, Some(&table));
        let reader = |on: bool, args: &[&str]| {
            let mut cmd = Command::new(support::toa_bin());
            cmd.env("TOA_TABLE", &table);
            if on {
                cmd.args(["load", "--mode", "userspace"]).args(args);
            } else {
                cmd.arg("unload");
            }
            support::in_netns_and_cgroup(&mut cmd, &self.lab.netns_path(&self.lab.server_ns), None);
            support::run(&mut cmd);
        };
        let baseline = || {
            self.set_agent(false);
            self.rate(s, 8095, false)
        };
        // One run against the preloaded server with a reader started with `args`; with
        // `options_seen`, checks that the reader recorded the connections' options, i.e. that
        // what is measured is the reader at work.
        let with_reader = |args: &[&str], options_seen: bool| {
            reader(true, args);
            let r = self.rate(s, 8096, false);
            if options_seen {
                let stats = toa::Userspace::new(&toa::Places { pin_dir: PathBuf::new(), table: table.clone() })
                    .stats()
                    .expect("userspace stats");
                assert!(stats.iter().any(|(c, v)| *c == toa_common::Counter::SynRecvSockToa && *v > 0), "{stats:?}");
            }
            reader(false, &[]);
            r
        };
        self.set_option(true);
        let ebpf = self.compare(s, "TOA on every connection: no agent vs eBPF mode", baseline, || {
            self.set_agent(true);
            self.rate(s, 8095, false)
        });
        let userspace = self.compare(s, "TOA on every connection: no agent vs userspace mode", baseline, || {
            self.set_agent(false);
            with_reader(&[], true)
        });
        self.set_option(false);
        let waits = self.compare(
            s,
            "no option, in scope (waits for the reader to catch up): no agent vs userspace",
            baseline,
            || with_reader(&[], false),
        );
        let untrusted = self.compare(s, "no option, source outside --trust: no agent vs userspace", baseline, || {
            with_reader(&["--trust", "100.125.0.0/16"], false)
        });
        self.set_option(true);
        let _ = fs::remove_dir(table.parent().unwrap());
        json!({"ebpf": ebpf, "userspace": userspace, "userspace_no_option_waits": waits, "userspace_no_option_untrusted": untrusted})
    }

    /// Faults under load: connections at the client threads' full rate, each announcing its own
    /// source port as the client's (so a client given to the wrong connection shows), while a
    /// fault is applied. Every answer is counted: the client (ok), the connection's real address
    /// (the balancer shown), anything else (wrong), or none (failed). Wrong and failed must be 0
    /// always; the balancer shown too where the mode promises continuity.
    fn faults(&self, s: &Settings) -> Value {
        println!("\nfaults under load: connections ok / showed the balancer / wrong / failed");
        let rewrites = if s.quick { 3 } else { 20 };
        let table = PathBuf::from(format!("/run/toa-bench-{}/faults", std::process::id()));
        let places = toa::Places { pin_dir: self.lab.pin_dir.clone(), table: table.clone() };
        let _echo = start_server(self, 8097, Server::Echo);
        let _preloaded = ExternalServer::start(self, 8098, Some(&table));
        let toa = |args: &[&str]| {
            let mut cmd = Command::new(support::toa_bin());
            cmd.env("TOA_TABLE", &table).env("TOA_PIN_DIR", &self.lab.pin_dir).args(args);
            support::in_netns_and_cgroup(&mut cmd, &self.lab.netns_path(&self.lab.server_ns), None);
            support::run(&mut cmd);
        };
        // Whatever happens below (a failed assertion too), the reader goes: left running, it
        // would also keep our cgroup from being removed.
        let _unload = OnDrop({
            let table = table.clone();
            move || {
                let _ = Command::new(support::toa_bin()).env("TOA_TABLE", &table).arg("unload").output();
                let _ = fs::remove_dir(table.parent().unwrap());
            }
        });
        let policy = |i: usize| {
            // Both trust the clients' namespace: nothing may change for them.
            let trust = if i.is_multiple_of(2) { "198.18.0.0/15" } else { "198.18.0.2/32" };
            Policy { trust: vec![trust.parse().unwrap()], ..Policy::default() }
        };
        let mut cfg = toa_config(true);
        cfg.on |= toa_common::probe::PROBE_PORT_FROM_SOURCE;
        self.writer.lock().unwrap().set(cfg).expect("configure the writer");
        let mut rows = Vec::new();
        let mut row = |mode: &str, fault: &str, continuity: bool, port: u16, apply: &mut dyn FnMut()| -> [u64; 4] {
            let c = self.under_load(s, port, apply);
            println!(
                "  {mode:<9} {fault:<66} {:>7} ok {:>6} balancer {:>3} wrong {:>3} failed",
                c[0], c[1], c[2], c[3]
            );
            assert_eq!((c[2], c[3]), (0, 0), "{mode}, {fault}: wrong or failed connections");
            if continuity {
                assert_eq!(c[1], 0, "{mode}, {fault}: the mode promises continuity");
                assert!(c[0] > 0, "{mode}, {fault}: no connection got through");
            }
            rows.push(
                json!({"mode": mode, "fault": fault, "ok": c[0], "balancer": c[1], "wrong": c[2], "failed": c[3]}),
            );
            c
        };

        self.set_agent(true);
        row("ebpf", "none", true, 8097, &mut || {});
        row("ebpf", &format!("policy rewritten {rewrites} times"), true, 8097, &mut || {
            for i in 0..rewrites {
                self.agent.apply_policy(&policy(i)).expect("apply a policy");
            }
        });
        row("ebpf", "programs replaced in place 3 times (upgrade)", true, 8097, &mut || {
            for _ in 0..3 {
                self.agent.upgrade().expect("upgrade");
            }
        });
        row("ebpf", "unloaded, then loaded", false, 8097, &mut || {
            self.set_agent(false);
            self.set_agent(true);
        });
        // The service restarted as systemd restarts it: with keep_loaded the programs stay
        // attached while no service runs, and each start adopts them and puts its own in place.
        // The last start is another binary, as a package upgrade installs one (here a copy of
        // this build: what is exercised is the hand-over, not a change of programs).
        let cgroup = self.cgroup.to_string_lossy().into_owned();
        let next = self.lab.table.parent().expect("the lab's directory").join("toa-next");
        fs::create_dir_all(next.parent().unwrap()).unwrap();
        fs::copy(support::toa_bin(), &next).expect("copy toa");
        row("ebpf", "toa run --keep-loaded restarted 3 times (last: another binary)", true, 8097, &mut || {
            for bin in [support::toa_bin(), support::toa_bin(), next.clone()] {
                let mut service = self.lab.start_service_from(&bin, 9431, &["--cgroup", &cgroup, "--keep-loaded"]);
                let (ok, log) = service.stop();
                assert!(ok, "toa run: {log}");
            }
        });
        let failed_before = self.storage_failed();
        if let Some(optmem) = self.refuse_socket_storage() {
            let c =
                row("ebpf", "socket storage refused (optmem_max 0 in the server's namespace)", false, 8097, &mut || {});
            optmem.restore();
            let failed = self.storage_failed() - failed_before;
            println!("  {:<76} storage_failed +{failed}", "");
            // Each connection refused storage is counted, and shows its real address.
            assert_eq!(failed, c[1], "storage_failed against connections that showed the balancer");
        }
        self.set_agent(false);
        match MemoryCgroup::create(&format!("toa-bench-mem-{}", std::process::id())) {
            Some(memcg) => {
                // The maps (socket storage too) are charged to the memory cgroup of the process
                // that created them: `toa load` run in one held at its usage.
                let mut load = self.lab.toa();
                load.args(["load", "--cgroup", &cgroup]);
                support::in_netns_and_cgroup(&mut load, &self.lab.netns_path(&self.lab.server_ns), Some(&memcg.path));
                support::run(&mut load);
                memcg.limit_to_usage();
                let failed_before = self.storage_failed();
                row("ebpf", "the maps' memory cgroup at its limit", false, 8097, &mut || {});
                let (failed, hits) = (self.storage_failed() - failed_before, memcg.limit_hits());
                println!("  {:<76} storage_failed +{failed}, limit reached {hits} times", "");
                self.set_agent(false);
            }
            None => println!("  ebpf      memory cgroup: skipped (no memory controller to limit here)"),
        }

        // The longest wait allowed: what is measured is the fault, not a reader lagging on a busy
        // machine (the wait's bound is measured in `modes`).
        toa(&["load", "--mode", "userspace", "--accept-wait-us", "1000000"]);
        self.until_client_shown(8098);
        row("userspace", "none", true, 8098, &mut || {});
        row("userspace", &format!("policy rewritten {rewrites} times"), true, 8098, &mut || {
            for i in 0..rewrites {
                let trust = policy(i).trust[0].to_string();
                toa(&["load", "--mode", "userspace", "--accept-wait-us", "1000000", "--trust", &trust]);
            }
        });
        row("userspace", "reader killed (SIGKILL), then loaded again", false, 8098, &mut || {
            let status = Backend::live_or_default(&places).status().expect("status");
            let pid = status.userspace.map(|u| u.reader_pid).expect("a reader");
            // SAFETY: SIGKILL to the reader this benchmark started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            // As a supervisor would: once it is gone (or a zombie), load again.
            let deadline = Instant::now() + Duration::from_secs(60);
            while toa::system::process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            toa(&["load", "--mode", "userspace", "--accept-wait-us", "1000000"]);
        });
        // The reader `toa load` started is adopted by each start, and left serving by each stop.
        row("userspace", "toa run --keep-loaded restarted 3 times (last: another binary)", true, 8098, &mut || {
            let table = table.to_string_lossy();
            for bin in [support::toa_bin(), support::toa_bin(), next.clone()] {
                let args = ["--mode", "userspace", "--table", &table, "--accept-wait-us", "1000000", "--keep-loaded"];
                let mut service = self.lab.start_service_from(&bin, 9432, &args);
                let (ok, log) = service.stop();
                assert!(ok, "toa run: {log}");
            }
        });
        row("userspace", "toa run stopped and started (no keep_loaded)", false, 8098, &mut || {
            let table = table.to_string_lossy();
            let args = ["--mode", "userspace", "--table", &table, "--accept-wait-us", "1000000"];
            let (ok, log) = self.lab.start_service(9432, &args).stop();
            assert!(ok, "toa run: {log}");
            toa(&["load", "--mode", "userspace", "--accept-wait-us", "1000000"]);
        });
        toa(&["unload"]);
        toa(&["load", "--mode", "userspace", "--accept-wait-us", "1000000", "--table-entries", "64"]);
        self.until_client_shown(8098);
        row("userspace", "table of 64 entries, always full", false, 8098, &mut || {});
        toa(&["unload"]);
        let _ = fs::remove_dir(table.parent().unwrap());
        self.set_option(true);
        Value::Array(rows)
    }

    /// The agent's `storage_failed` counter.
    fn storage_failed(&self) -> u64 {
        let stats = self.agent.stats().expect("stats");
        stats.iter().find(|(c, _)| *c == toa_common::counters::Counter::StorageFailed).map_or(0, |(_, n)| *n)
    }

    /// Sets net.core.optmem_max to 0 in the server's namespace, where the kernel has one per
    /// namespace (it bounds the option memory of each socket, socket storage included); None
    /// where it is the host's.
    fn refuse_socket_storage(&self) -> Option<Optmem> {
        let ns = self.lab.netns_path(&self.lab.server_ns);
        let path = "/proc/sys/net/core/optmem_max";
        // A sysctl that is not per namespace is not shown inside one.
        let old = support::in_netns(ns.clone(), move || fs::read_to_string(path).ok())?;
        support::in_netns(ns.clone(), move || fs::write(path, "0").expect("set optmem_max"));
        Some(Optmem { ns, old })
    }

    /// Waits until a connection to `port` shows its client: a preloaded server maps a new
    /// table at its next lookup, at most once a second.
    fn until_client_shown(&self, port: u16) {
        let target: SocketAddr = format!("198.18.0.1:{port}").parse().unwrap();
        let ns = self.lab.netns_path(&self.lab.client_ns);
        let shown = support::in_netns(ns, move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if classified_exchange(target) == 0 {
                    return true;
                }
            }
            false
        });
        assert!(shown, "no connection to port {port} showed its client");
    }

    /// Runs `apply` while client threads make connections to `port`, then `run_time` more;
    /// the connections counted [ok, showed the balancer, wrong, failed].
    fn under_load(&self, s: &Settings, port: u16, apply: &mut dyn FnMut()) -> [u64; 4] {
        let target: SocketAddr = format!("198.18.0.1:{port}").parse().unwrap();
        let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let counter = counts.clone();
        self.clients_while(
            s,
            move || {
                counter[classified_exchange(target) as usize].fetch_add(1, Ordering::Relaxed);
            },
            || {
                apply();
                std::thread::sleep(s.run_time);
            },
        );
        [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed))
    }

    /// Where the time goes: the kernel's own accounting of the agent's programs
    /// (BPF_ENABLE_STATS, held only for this measurement), with and without a TOA on the
    /// connections. Programs that return at once ride along on the same hooks: their cost per
    /// run is what the statistics charge any program (the clock reads and the call), and the
    /// agent's cost is also given above that floor.
    fn agent_cpu(&self, s: &Settings) -> Value {
        println!("\nagent CPU per connection (kernel BPF run-time statistics)");
        let _server = start_server(self, 8087, Server::Echo);
        self.set_agent(true);
        let floor = probe::Floor::attach(&self.cgroup, false).expect("attach the floor programs");
        let mut arms = serde_json::Map::new();
        for (arm, option) in [("toa", true), ("no_option", false)] {
            self.set_option(option);
            let mut ids: Vec<(String, u32)> =
                self.agent.status().map(|st| st.programs.iter().map(|p| (p.name.clone(), p.id)).collect()).unwrap();
            ids.extend(floor.programs());
            let counter = probe::CallbackCounter::attach(&self.cgroup).expect("attach the callback counter");
            let (made, spent) = run_time_during(&ids, || self.connections_repeated(s, 8087));
            let callbacks = callbacks_per_connection(&counter, made);
            drop(counter);
            let made = made as f64;
            let per = |name: &str| -> (f64, f64) {
                let (ns, calls) = spent[name];
                let calls = calls as f64;
                (if calls > 0.0 { ns as f64 / calls } else { 0.0 }, calls / made)
            };
            let floor_of =
                |name: &str| per(if name == "toa_sock_ops" { "toa_floor_sockops" } else { "toa_floor_getpeer4" }).0;
            // The segments the agent asks to read (PARSE_HDR_OPT) are runs it causes: charged in full.
            let asked = callbacks.1.get("PARSE_HDR_OPT").and_then(Value::as_f64).unwrap_or(0.0);
            println!("  {}:", if option { "TOA on every connection" } else { "no option" });
            println!("    sock_ops callbacks per connection (client and server sockets): {}", callbacks.0);
            let (mut total, mut above) = (0.0, 0.0);
            let mut programs = Vec::new();
            for (name, _) in ids.iter().filter(|(n, _)| !n.starts_with("toa_floor")) {
                let (ns, runs) = per(name);
                if runs == 0.0 {
                    continue;
                }
                let anyway = if name == "toa_sock_ops" { runs - asked } else { runs };
                total += ns * runs;
                above += ns * runs - floor_of(name) * anyway;
                println!(
                    "    {name:<16} {ns:>6.0} ns per run (floor {:>4.0}), {runs:>5.2} runs per connection",
                    floor_of(name)
                );
                programs.push(json!({"program": name, "ns_per_run": ns, "floor_ns_per_run": floor_of(name), "runs_per_connection": runs}));
            }
            println!(
                "    = {total:.0} ns of agent BPF time per connection; {above:.0} ns above what a program that returns at once costs on the callbacks the kernel makes anyway"
            );
            arms.insert(arm.into(), json!({"connections": made, "callbacks_per_connection": callbacks.1, "programs": programs, "ns_per_connection": total, "ns_above_floor_per_connection": above}));
        }
        drop(floor);
        self.set_option(true);
        self.set_agent(false);
        let storage = self.storage_cost(s);
        json!({"arms": arms, "storage_create_ns": storage})
    }

    /// What the kernel charges for creating one socket-storage record (the agent's one write
    /// per connection with a client), agent unloaded: a program that does only that, against
    /// one that returns at once, on the same connections.
    fn storage_cost(&self, s: &Settings) -> f64 {
        let plain = probe::Floor::attach(&self.cgroup, false).expect("attach the floor programs");
        let storing = probe::Floor::attach(&self.cgroup, true).expect("attach the storage floor");
        let mut ids = plain.programs();
        ids.extend(storing.programs().into_iter().filter(|(n, _)| n == "toa_floor_storage"));
        let (made, spent) = run_time_during(&ids, || self.connections_repeated(s, 8087));
        let (floor_ns, floor_runs) = spent["toa_floor_sockops"];
        let (store_ns, store_runs) = spent["toa_floor_storage"];
        let per_conn = (store_ns as f64 - floor_ns as f64 / floor_runs as f64 * store_runs as f64) / made as f64;
        println!("  creating one socket-storage record (kernel, no agent): {per_conn:.0} ns per connection");
        per_conn
    }

    /// ns per getpeername() on one accepted socket: the agent rewriting it vs no agent.
    fn getpeername_cost(&self, s: &Settings) -> Value {
        println!("\ngetpeername() (calls/s: baseline vs measured)");
        let calls = if s.quick { 20_000 } else { 1_000_000 };
        let measure = |loaded: bool| {
            self.set_agent(loaded);
            let listener = self.in_server(|| TcpListener::bind("198.18.0.1:8090").unwrap());
            let client = std::thread::spawn({
                let ns = self.lab.netns_path(&self.lab.client_ns);
                move || support::in_netns(ns, || TcpStream::connect("198.18.0.1:8090").unwrap())
            });
            let (conn, _) = listener.accept().unwrap();
            let _client = client.join().unwrap();
            let expected: SocketAddr = CLIENT.parse().unwrap();
            assert_eq!(conn.peer_addr().unwrap() == expected, loaded, "the rewrite is what is measured");
            let started = Instant::now();
            for _ in 0..calls {
                std::hint::black_box(conn.peer_addr().unwrap());
            }
            calls as f64 / started.elapsed().as_secs_f64()
        };
        let v =
            self.compare(s, "getpeername(): no agent vs rewritten by the agent", || measure(false), || measure(true));
        self.set_agent(false);
        let per_call = |r: f64| 1e9 / r;
        let ns = json!({
            "no_agent_ns": per_call(median(&floats(&v["baseline"]))),
            "rewritten_ns": per_call(median(&floats(&v["measured"]))),
            "cost_ratio": 1.0 / v["ratio"]["median"].as_f64().unwrap(),
        });
        println!(
            "  = {:.0} ns vs {:.0} ns per call ({:.2}x)",
            ns["no_agent_ns"].as_f64().unwrap(),
            ns["rewritten_ns"].as_f64().unwrap(),
            ns["cost_ratio"].as_f64().unwrap()
        );
        json!({"calls_per_run": calls, "rate": v, "per_call": ns})
    }

    /// The alternative: the same server reading a PROXY v2 header (ppp crate) instead of TOA.
    fn proxy_v2(&self, s: &Settings) -> Value {
        println!("\nPROXY protocol v2 vs TOA (connections/s)");
        let _echo = start_server(self, 8081, Server::Echo);
        let _proxy = start_server(self, 8082, Server::ProxyV2);
        let base = self.compare(
            s,
            "no client address at all vs PROXY v2 header",
            || {
                self.set_agent(false);
                self.set_option(false);
                self.rate(s, 8081, false)
            },
            || {
                self.set_agent(false);
                self.set_option(false);
                self.rate(s, 8082, true)
            },
        );
        let toa = self.compare(
            s,
            "no client address at all vs TOA (agent loaded)",
            || {
                self.set_agent(false);
                self.set_option(false);
                self.rate(s, 8081, false)
            },
            || {
                self.set_agent(true);
                self.set_option(true);
                self.rate(s, 8081, false)
            },
        );
        self.set_agent(false);
        self.set_option(true);
        json!({"proxy_v2": base, "toa": toa})
    }

    /// The rate of new TOA connections with 1, 100, … connections already open (with TOA),
    /// agent loaded vs not at each level: the cost per new connection must not grow with the
    /// number of open ones.
    fn scaling(&self, s: &Settings) -> Value {
        println!("\nscaling: new TOA connections/s while N connections stay open (no agent vs agent)");
        let _echo = start_server(self, 8083, Server::Echo);
        self.set_option(true);
        let mut points = Vec::new();
        let mut levels = vec![1usize, 100, 1_000];
        if s.held_max > 1_000 {
            levels.push(s.held_max);
        }
        // (the holding server, the client ends): a fresh server each time, so that the server
        // ends of the previous set are closed too.
        let held = std::cell::RefCell::new((None::<Running>, Vec::<TcpStream>::new()));
        let open = |n: usize| {
            *held.borrow_mut() = (None, Vec::new());
            let server = start_server(self, 8084, Server::Hold);
            let conns = support::in_netns(self.lab.netns_path(&self.lab.client_ns), move || {
                (0..n).map(|_| TcpStream::connect("198.18.0.1:8084").expect("hold a connection")).collect::<Vec<_>>()
            });
            *held.borrow_mut() = (Some(server), conns);
        };
        for level in levels {
            let mut with_client = Vec::new();
            let v = self.compare(
                s,
                &format!("{level:>6} open"),
                || {
                    self.set_agent(false);
                    if held.borrow().1.len() != level {
                        open(level);
                    }
                    self.rate(s, 8083, false)
                },
                || {
                    // Unloading dropped the stored addresses: open the N again, each with one.
                    self.set_agent(true);
                    open(level);
                    std::thread::sleep(Duration::from_millis(100));
                    with_client.push(self.live_with_client());
                    self.rate(s, 8083, false)
                },
            );
            println!("         (open connections with a client address in the agent's runs: {with_client:?})");
            points.push(json!({"open": level, "open_with_client": with_client, "comparison": v}));
        }
        drop(held);
        self.set_agent(false);
        json!({"points": points})
    }

    /// Storage per connection, and whether churn leaves anything behind.
    fn memory(&self, s: &Settings) -> Value {
        println!("\nmemory");
        self.set_option(true);

        // Churn first, on a quiet system: many short TOA connections, without and with the agent;
        // what the agent adds must go back to nothing.
        let echo = start_server(self, 8086, Server::Echo);
        let churn = s.churn;
        let mut churn_delta = [0i64; 2];
        let mut made = 0;
        for (i, loaded) in [false, true].into_iter().enumerate() {
            self.set_agent(loaded);
            settle();
            let before = kmalloc_bytes();
            let target: SocketAddr = "198.18.0.1:8086".parse().unwrap();
            let threads: Vec<_> = (0..s.clients)
                .map(|_| {
                    let ns = self.lab.netns_path(&self.lab.client_ns);
                    let per = churn / s.clients as u64;
                    std::thread::spawn(move || {
                        support::in_netns(ns, move || (0..per).filter(|_| exchange(target, None)).count())
                    })
                })
                .collect();
            made = threads.into_iter().map(|t| t.join().unwrap()).sum();
            settle();
            churn_delta[i] = kmalloc_bytes() - before;
        }
        let live = self.live_with_client();
        drop(echo);
        let leak = (churn_delta[1] - churn_delta[0]) as f64 / made as f64;
        println!(
            "  after {made} TOA connections opened and closed: {live} sockets keep a client address; kmalloc caches {:+} bytes without the agent, {:+} with it ({leak:+.2} bytes per connection)",
            churn_delta[0], churn_delta[1]
        );

        // The same n held connections without and with the agent: the difference is its storage.
        let n = s.held_max;
        let mut per_conn = Vec::new();
        for _ in 0..s.repeats.min(3) {
            let mut deltas = [0i64; 2];
            for (i, loaded) in [false, true].into_iter().enumerate() {
                self.set_agent(loaded);
                let hold = start_server(self, 8085, Server::Hold);
                settle();
                let before = kmalloc_bytes();
                let held = support::in_netns(self.lab.netns_path(&self.lab.client_ns), move || {
                    (0..n).map(|_| TcpStream::connect("198.18.0.1:8085").expect("hold")).collect::<Vec<_>>()
                });
                std::thread::sleep(Duration::from_millis(300));
                deltas[i] = kmalloc_bytes() - before;
                drop(held);
                drop(hold);
            }
            per_conn.push((deltas[1] - deltas[0]) as f64 / n as f64);
        }
        self.set_agent(false);
        let storage = median(&per_conn);
        println!(
            "  {n} open connections: {storage:.0} bytes of kernel memory per connection for its client address (spread {:.0}-{:.0}; the stored struct is {} bytes)",
            min(&per_conn),
            max(&per_conn),
            std::mem::size_of::<toa_common::SockState>()
        );
        json!({
            "churn": {"connections": made, "live_with_client_after": live, "kmalloc_delta_bytes_without_agent": churn_delta[0], "kmalloc_delta_bytes_with_agent": churn_delta[1], "agent_bytes_per_connection": leak},
            "held": n,
            "storage_bytes_per_connection": spread(&per_conn),
        })
    }

    fn live_with_client(&self) -> usize {
        support::in_netns(self.lab.netns_path(&self.lab.server_ns), {
            let pins = self.lab.pin_dir.clone();
            move || toa::conns::list(&pins).map(|c| c.len()).unwrap_or(usize::MAX)
        })
    }
}

/// `pairs` pairs of runs of `a` (the baseline) and `b`, alternating A B, then B A, so that a
/// drift within a pair does not always favour the same side: (the a results, the b results).
fn alternate<T>(pairs: usize, mut a: impl FnMut() -> T, mut b: impl FnMut() -> T) -> (Vec<T>, Vec<T>) {
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for r in 0..pairs {
        let (x, y) = if r % 2 == 0 {
            let x = a();
            (x, b())
        } else {
            let y = b();
            (a(), y)
        };
        ra.push(x);
        rb.push(y);
    }
    (ra, rb)
}

/// Runs `work` with the kernel's BPF run-time statistics on (only then: they cost time of their
/// own); returns its result and the (run time in ns, runs) each program of `ids` spent in it,
/// by name.
fn run_time_during<T>(
    ids: &[(String, u32)],
    work: impl FnOnce() -> T,
) -> (T, std::collections::HashMap<String, (u64, u64)>) {
    let totals = || -> std::collections::HashMap<String, (u64, u64)> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| {
                let (name, _) = ids.iter().find(|(_, id)| *id == p.id())?;
                Some((name.clone(), (p.run_time().as_nanos() as u64, p.run_count())))
            })
            .collect()
    };
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time statistics");
    let before = totals();
    let result = work();
    let after = totals();
    drop(stats);
    let spent = after.into_iter().map(|(name, (ns, runs))| {
        let (ns0, runs0) = before[&name];
        (name, (ns - ns0, runs - runs0))
    });
    (result, spent.collect())
}

/// The sock_ops callbacks `counter` saw per connection, by kind: a line to print and the JSON.
fn callbacks_per_connection(counter: &probe::CallbackCounter, made: u64) -> (String, Value) {
    let counts = counter.counts().expect("read the callback counts");
    let mut out = serde_json::Map::new();
    let mut line = Vec::new();
    for (op, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
        let per = *n as f64 / made as f64;
        out.insert(callback_name(op).into(), json!(per));
        line.push(format!("{} {per:.2}", callback_name(op)));
    }
    (line.join(", "), Value::Object(out))
}

/// The name of a `BPF_SOCK_OPS_*_CB` value (include/uapi/linux/bpf.h).
fn callback_name(op: usize) -> &'static str {
    const NAMES: [&str; 16] = [
        "VOID",
        "TIMEOUT_INIT",
        "RWND_INIT",
        "TCP_CONNECT",
        "ACTIVE_ESTABLISHED",
        "PASSIVE_ESTABLISHED",
        "NEEDS_ECN",
        "BASE_RTT",
        "RTO",
        "RETRANS",
        "STATE",
        "TCP_LISTEN",
        "RTT",
        "PARSE_HDR_OPT",
        "HDR_OPT_LEN",
        "WRITE_HDR_OPT",
    ];
    NAMES.get(op).copied().unwrap_or("?")
}

fn toa_config(on: bool) -> toa_common::probe::ProbeConfig {
    let options = probe::ProbeOptions {
        target: "198.18.0.1:1".parse().unwrap(),
        client: CLIENT.parse().unwrap(),
        on: probe::Segment::Ack,
        message: String::new(),
        timeout: Duration::from_secs(5),
        count: 1,
        interactive: false,
        raw_options: Vec::new(),
        parallel: false,
        from: None,
    };
    let mut cfg = probe::config(&options, options.client).expect("a valid option");
    if !on {
        cfg.count = 0;
    }
    cfg
}

fn proxy_header() -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let src: SocketAddr = CLIENT.parse().unwrap();
    let dst: SocketAddr = "198.18.0.1:8082".parse().unwrap();
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
        .build()
        .expect("a PROXY v2 header")
}

/// One short connection: optional PROXY header, a line, read the answer, close.
fn exchange(target: SocketAddr, header: Option<&[u8]>) -> bool {
    let Ok(mut s) = TcpStream::connect(target) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let mut msg = header.map(<[u8]>::to_vec).unwrap_or_default();
    msg.extend_from_slice(b"hello\n");
    if s.write_all(&msg).is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
        return false;
    }
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).is_ok() && !reply.is_empty()
}

/// The server namespace's optmem_max, set back by [`Optmem::restore`].
struct Optmem {
    ns: PathBuf,
    old: String,
}

impl Optmem {
    fn restore(self) {
        support::in_netns(self.ns, move || fs::write("/proc/sys/net/core/optmem_max", self.old.trim()).unwrap());
    }
}

/// A memory cgroup of our own (v2, or v1 where the memory controller is there), removed on drop.
struct MemoryCgroup {
    path: PathBuf,
    v1: bool,
}

impl MemoryCgroup {
    /// A child of this process's memory cgroup (v1) or of the v2 root (where it delegates the
    /// memory controller); None where neither can be had.
    fn create(name: &str) -> Option<Self> {
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let v1 = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()));
        let (path, v1) = match v1 {
            Some(p) => (PathBuf::from("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')).join(name), true),
            None => {
                let root = support::cgroup2_mount_if_any()?;
                let delegated = fs::read_to_string(root.join("cgroup.subtree_control")).ok()?;
                if !delegated.split_whitespace().any(|c| c == "memory") {
                    return None;
                }
                (root.join(name), false)
            }
        };
        fs::create_dir(&path).ok()?;
        Some(Self { path, v1 })
    }

    fn file(&self, v1: &str, v2: &str) -> PathBuf {
        self.path.join(if self.v1 { v1 } else { v2 })
    }

    /// Allows it no more than it uses now.
    fn limit_to_usage(&self) {
        let usage = fs::read_to_string(self.file("memory.usage_in_bytes", "memory.current")).unwrap();
        fs::write(self.file("memory.limit_in_bytes", "memory.max"), usage.trim()).expect("set the memory limit");
    }

    /// How many times a charge found it at its limit.
    fn limit_hits(&self) -> u64 {
        let text = fs::read_to_string(self.file("memory.failcnt", "memory.events")).unwrap_or_default();
        if self.v1 {
            text.trim().parse().unwrap_or(0)
        } else {
            text.lines().find_map(|l| l.strip_prefix("max ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.file("memory.limit_in_bytes", "memory.max"), if self.v1 { "-1" } else { "max" });
        // Empty once `toa load` has exited; the maps it charged are gone with the unload.
        let deadline = Instant::now() + Duration::from_secs(60);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs a closure when dropped (cleanup that must happen on a panic too).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// What one connection showed: 0 its client, 1 its real address (the balancer), 2 another
/// address (wrong), 3 nothing (failed). The client announced is 203.0.113.7 with the
/// connection's own source port.
fn classified_exchange(target: SocketAddr) -> u8 {
    let Ok(mut s) = TcpStream::connect(target) else {
        return 3;
    };
    let Ok(local) = s.local_addr() else { return 3 };
    if s.write_all(b"hello\n").is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
        return 3;
    }
    let mut reply = String::new();
    if s.read_to_string(&mut reply).is_err() {
        return 3;
    }
    // "peer=ADDR" (the in-process server) or "accept=ADDR peer=ADDR" (peer_echo): both must be
    // the same one of the two.
    let shown: Vec<&str> = reply
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("accept=").or_else(|| w.strip_prefix("peer=")))
        .collect();
    let (client, real) = (format!("203.0.113.7:{}", local.port()), local.to_string());
    if shown.is_empty() {
        3
    } else if shown.iter().all(|a| *a == client) {
        0
    } else if shown.iter().all(|a| *a == real) {
        1
    } else if shown.iter().all(|a| *a == client || *a == real) {
        // accept() before the option was known, getpeername() after: not wrong, not whole.
        1
    } else {
        2
    }
}

#[derive(Clone, Copy)]
enum Server {
    /// accept, read a line, getpeername, answer, close.
    Echo,
    /// The same, reading a PROXY v2 header first (the address comes from it).
    ProxyV2,
    /// accept and keep every connection open.
    Hold,
}

/// A server in the server namespace (threads of this process, so in our cgroup).
struct Running {
    stop: Arc<AtomicBool>,
    port: u16,
    ns: PathBuf,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptors.
        for _ in 0..self.threads.len() {
            let port = self.port;
            support::in_netns(self.ns.clone(), move || drop(TcpStream::connect(("198.18.0.1", port))));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn start_server(bench: &Bench<'_>, port: u16, kind: Server) -> Running {
    let ns = bench.lab.netns_path(&bench.lab.server_ns);
    let listener = support::in_netns(ns.clone(), move || TcpListener::bind(("198.18.0.1", port)).expect("bind"));
    // A deep accept queue: thousands of connections arrive faster than one thread accepts.
    // SAFETY: listen(2) on a listening socket we own only changes its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let acceptors = if matches!(kind, Server::Hold) { 1 } else { 2 };
    let threads = (0..acceptors)
        .map(|_| {
            let (listener, stop) = (listener.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while let Ok((conn, _)) = listener.accept() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match kind {
                        Server::Hold => held.push(conn),
                        Server::Echo => serve(conn, false),
                        Server::ProxyV2 => serve(conn, true),
                    }
                }
            })
        })
        .collect();
    Running { stop, port, ns, threads }
}

fn serve(conn: TcpStream, proxy_v2: bool) {
    let mut reader = BufReader::new(&conn);
    let peer = if proxy_v2 {
        let mut head = [0u8; 16];
        if reader.read_exact(&mut head).is_err() {
            return;
        }
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut full = head.to_vec();
        full.resize(16 + len, 0);
        if reader.read_exact(&mut full[16..]).is_err() {
            return;
        }
        match ppp::v2::Header::try_from(&full[..]) {
            Ok(h) => format!("{:?}", h.addresses),
            Err(_) => return,
        }
    } else {
        String::new()
    };
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let peer = if proxy_v2 { peer } else { conn.peer_addr().map(|a| a.to_string()).unwrap_or_default() };
    let _ = writeln!(&conn, "peer={peer}");
}

/// examples/peer_echo as a process of its own in the server namespace (and our cgroup, where
/// the eBPF agent is attached), optionally preloaded with libtoa.so; killed on drop.
struct ExternalServer(std::process::Child);

impl ExternalServer {
    fn start(bench: &Bench<'_>, port: u16, table: Option<&std::path::Path>) -> Self {
        let mut cmd = Command::new(support::example_bin("peer_echo"));
        cmd.arg(format!("198.18.0.1:{port}")).stdout(std::process::Stdio::piped());
        if let Some(table) = table {
            cmd.env("LD_PRELOAD", support::libtoa()).env("TOA_TABLE", table);
        }
        support::in_netns_and_cgroup(&mut cmd, &bench.lab.netns_path(&bench.lab.server_ns), None);
        let mut child = cmd.spawn().expect("start examples/peer_echo (cargo xtask bench builds it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("listening on"), "{line:?}");
        Self(child)
    }
}

impl Drop for ExternalServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Raises the open-file limit as far as allowed; returns it (held connections need two
/// descriptors each, the client's and the server's, both in this process).
fn raise_nofile() -> u64 {
    toa::system::raise_nofile(65_536)
}

/// Bytes held by the kernel's general-purpose kmalloc caches (where socket storage lives).
fn kmalloc_bytes() -> i64 {
    fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        // All of them: socket storage is charged to the memory cgroup (kmalloc-cg-*).
        .filter(|l| l.starts_with("kmalloc-"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(f.get(1)?.parse::<i64>().ok()? * f.get(3)?.parse::<i64>().ok()?)
        })
        .sum()
}

/// Lets freed sockets and RCU-deferred frees finish.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)).map(|s| s.trim().to_owned()))
        .unwrap_or_default();
    json!({
        "kernel": toa::system::kernel_release(),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn spread(v: &[f64]) -> Value {
    json!({"median": median(v), "min": min(v), "max": max(v), "values": v})
}

/// Connection rate against open connections, as a small SVG bar chart.
fn scaling_chart(scaling: &Value) -> String {
    let points = scaling["points"].as_array().cloned().unwrap_or_default();
    let rate = |p: &Value, arm: &str| median(&floats(&p["comparison"][arm]));
    let top = points.iter().map(|p| rate(p, "baseline").max(rate(p, "measured"))).fold(1.0, f64::max);
    let (w, h, bar) = (140.0 * points.len() as f64 + 80.0, 320.0, 50.0);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='10' y='18'>new TOA connections/s while N connections stay open</text>\
         <rect x='10' y='28' width='10' height='10' fill='#999'/><text x='24' y='37'>no agent</text>\
         <rect x='90' y='28' width='10' height='10' fill='#3b7dd8'/><text x='104' y='37'>agent loaded</text>"
    );
    for (i, p) in points.iter().enumerate() {
        for (j, (arm, color)) in [("baseline", "#999"), ("measured", "#3b7dd8")].into_iter().enumerate() {
            let r = rate(p, arm);
            let bh = 200.0 * r / top;
            let x = 40.0 + 140.0 * i as f64 + j as f64 * (bar + 4.0);
            svg.push_str(&format!(
                "<rect x='{x}' y='{}' width='{bar}' height='{bh}' fill='{color}'/><text x='{x}' y='{}'>{r:.0}</text>",
                270.0 - bh,
                265.0 - bh
            ));
        }
        svg.push_str(&format!("<text x='{}' y='300'>{} open</text>", 40.0 + 140.0 * i as f64, p["open"]));
    }
    svg.push_str("</svg>\n");
    svg
}
