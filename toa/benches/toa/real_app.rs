//! The real-application arm: Debian's nginx, unmodified (one worker, `return 200`), loaded by
//! Debian's wrk from the client namespace (`-t1 -c16`, `Connection: close`: every request is a
//! new connection). The writer plays the balancer and gives every connection a client of its
//! own: 10.x.y.z, where x.y.z counts the connections written, and the connection's source port.
//! nginx logs `$remote_addr $remote_port`, and every line of its access log is checked: the
//! client the writer gave (a 10.x address, seen once), the connection's real address (lost), or
//! anything else, such as a client seen twice (wrong).
//!
//! eBPF mode: the same nginx with and without the agent. Userspace mode: plain nginx without a
//! reader against a second nginx started with libtoa.so preloaded, its reader running. Pairs
//! alternate A B, B A …; each pair gives one ratio; the table shows their mean with a 95%
//! confidence interval, and the server's CPU per connection (the run time of its worker and, in
//! the userspace mode, of the capture reader, from `/proc/PID/task/*/schedstat`) next to the
//! rate.

use std::{
    collections::HashSet,
    path::Path,
    process::{Child, Stdio},
};

use super::*;

const PLAIN_PORT: u16 = 8091;
const PRELOADED_PORT: u16 = 8092;

/// nginx in the server namespace (in the bench's cgroup, where the agent is attached).
struct Nginx {
    child: Child,
    prefix: PathBuf,
    port: u16,
}

impl Nginx {
    fn binary() -> PathBuf {
        let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/nginx/usr/sbin/nginx");
        [PathBuf::from("/usr/sbin/nginx"), unpacked]
            .into_iter()
            .find(|p| p.exists())
            .expect("nginx is needed: `cargo xtask setup` unpacks it into target/test-tools")
    }

    /// With `table`, started with libtoa.so preloaded, reading that table.
    fn start(bench: &Bench<'_>, port: u16, table: Option<&Path>) -> Self {
        // Found before anything is made, so that its absence leaves nothing behind.
        let mut cmd = Command::new(Self::binary());
        let prefix = PathBuf::from(format!("/tmp/toa-bench-{}-nginx-{port}", std::process::id()));
        fs::create_dir_all(prefix.join("tmp")).unwrap();
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; pid {p}/nginx.pid; error_log stderr warn;
             events {{ worker_connections 4096; }}
             http {{
               log_format toa '$remote_addr $remote_port';
               access_log {p}/access.log toa;
               client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp;
               uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;
               server {{
                 listen 198.18.0.1:{port} backlog=4096;
                 location / {{ default_type text/plain; return 200 \"ok\\n\"; }}
               }}
             }}",
            p = prefix.display()
        );
        fs::write(prefix.join("nginx.conf"), conf).unwrap();
        cmd.arg("-p").arg(&prefix).arg("-c").arg(prefix.join("nginx.conf")).args(["-e", "stderr"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        if let Some(table) = table {
            cmd.env("LD_PRELOAD", support::libtoa()).env("TOA_TABLE", table);
        }
        support::in_netns_and_cgroup(&mut cmd, &bench.lab.netns_path(&bench.lab.server_ns), None);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&prefix);
                panic!("{cmd:?}: {e}");
            }
        };
        let nginx = Self { child, prefix, port };
        let up = support::eventually(support::DEADLINE, || {
            bench.in_server(move || TcpStream::connect(("198.18.0.1", port)).is_ok()) && nginx.worker().is_some()
        });
        assert!(up, "nginx did not start listening on port {port}");
        nginx.take_log();
        nginx
    }

    /// The worker's PID (the master's only child).
    fn worker(&self) -> Option<u32> {
        let pid = self.child.id();
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// The worker's CPU time so far, in ns.
    fn cpu_ns(&self) -> u64 {
        cpu_ns(self.worker().expect("nginx's worker"))
    }

    /// The access log so far; empties it (nginx appends, so the next line starts it again).
    fn take_log(&self) -> String {
        let path = self.prefix.join("access.log");
        let text = fs::read_to_string(&path).unwrap_or_default();
        fs::write(&path, "").unwrap();
        text
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker before it exits.
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.prefix);
    }
}

/// CPU time of every thread of process `pid` so far, in ns (`/proc/PID/task/*/schedstat`: time
/// spent on a CPU).
fn cpu_ns(pid: u32) -> u64 {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"));
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// What the access log of one run says, line by line.
#[derive(Default, Debug, Clone, Copy)]
struct LogCheck {
    lines: u64,
    /// The client the writer gave, each seen once.
    with_client: u64,
    /// The connection's real address (the client namespace's).
    lost: u64,
    /// Anything else: a client seen twice, an address nobody sent.
    wrong: u64,
}

fn check_log(text: &str) -> LogCheck {
    let mut seen = HashSet::new();
    let mut check = LogCheck::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        check.lines += 1;
        let (addr, port) = line.split_once(' ').unwrap_or((line, ""));
        if addr.starts_with("10.") && seen.insert((addr.to_owned(), port.to_owned())) {
            check.with_client += 1;
        } else if addr == support::CLIENT_V4 {
            check.lost += 1;
        } else {
            check.wrong += 1;
        }
    }
    check
}

/// One wrk run of `secs` seconds against `port`: requests per second as wrk reports them.
fn wrk(bench: &Bench<'_>, port: u16, secs: u64) -> f64 {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{secs}s"), "--timeout", "30s", "-H", "Connection: close"])
        .arg(format!("http://198.18.0.1:{port}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    support::in_netns_and_cgroup(&mut cmd, &bench.lab.netns_path(&bench.lab.client_ns), None);
    let out = cmd.output().unwrap_or_else(|e| panic!("wrk: {e} (`cargo xtask setup` installs it)"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output: {text}"))
}

/// One measured run: rate, the server's CPU per connection, what the access log says.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    cpu_ns: f64,
    log: LogCheck,
}

/// With `reader`, the server's CPU includes that process's (the userspace mode's capture reader).
fn run(bench: &Bench<'_>, nginx: &Nginx, secs: u64, reader: Option<u32>) -> Run {
    nginx.take_log();
    let server_cpu = || nginx.cpu_ns() + reader.map_or(0, cpu_ns);
    let cpu = server_cpu();
    let rate = wrk(bench, nginx.port, secs);
    let cpu = server_cpu() - cpu;
    let log = check_log(&nginx.take_log());
    Run { rate, cpu_ns: cpu as f64 / log.lines.max(1) as f64, log }
}

/// Mean and 95% confidence interval (Student's t) of `v`.
pub(super) fn mean_ci(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, mean, mean);
    }
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    // Two-sided 97.5% quantiles for 1..=11 degrees of freedom, then the normal's.
    const T: [f64; 11] = [12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201];
    let t = T.get(v.len() - 2).copied().unwrap_or(1.96);
    let half = t * sd / n.sqrt();
    (mean, mean - half, mean + half)
}

/// `pairs` alternating pairs of `a` (baseline) and `b`; prints and returns the comparison.
fn compare_runs(label: &str, pairs: usize, a: impl FnMut() -> Run, b: impl FnMut() -> Run) -> Value {
    let (base, measured) = alternate(pairs, a, b);
    let rates: Vec<f64> = base.iter().zip(&measured).map(|(x, y)| y.rate / x.rate).collect();
    let cpus: Vec<f64> = base.iter().zip(&measured).map(|(x, y)| y.cpu_ns / x.cpu_ns).collect();
    let (rate, rate_lo, rate_hi) = mean_ci(&rates);
    let (cpu, cpu_lo, cpu_hi) = mean_ci(&cpus);
    let sum = |runs: &[Run], f: fn(&LogCheck) -> u64| runs.iter().map(|r| f(&r.log)).sum::<u64>();
    let avg = |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    let (lines, with_client, lost, wrong) = (
        sum(&measured, |l| l.lines),
        sum(&measured, |l| l.with_client),
        sum(&measured, |l| l.lost),
        sum(&measured, |l| l.wrong),
    );
    println!(
        "  {label}: {:.0} vs {:.0} requests/s, ratio {rate:.3} (95% CI {rate_lo:.3}–{rate_hi:.3}, {pairs} pairs); \
         server CPU per connection {:.1} vs {:.1} µs, ratio {cpu:.3} ({cpu_lo:.3}–{cpu_hi:.3}); \
         access log: {with_client} of {lines} connections with their own client, {lost} lost, {wrong} wrong",
        avg(&base, |r| r.rate),
        avg(&measured, |r| r.rate),
        avg(&base, |r| r.cpu_ns) / 1e3,
        avg(&measured, |r| r.cpu_ns) / 1e3,
    );
    json!({
        "baseline_rate": avg(&base, |r| r.rate), "measured_rate": avg(&measured, |r| r.rate),
        "rate_ratio": {"mean": rate, "ci95": [rate_lo, rate_hi], "pairs": rates},
        "baseline_cpu_ns_per_connection": avg(&base, |r| r.cpu_ns), "measured_cpu_ns_per_connection": avg(&measured, |r| r.cpu_ns),
        "cpu_ratio": {"mean": cpu, "ci95": [cpu_lo, cpu_hi], "pairs": cpus},
        "access_log": {"lines": lines, "with_client": with_client, "lost": lost, "wrong": wrong,
                       "baseline_lines": sum(&base, |l| l.lines)},
    })
}

/// The writer's configuration here: a client of its own for every connection.
fn serial_clients() -> toa_common::probe::ProbeConfig {
    let mut cfg = toa_config(true);
    cfg.options[0][4..8].copy_from_slice(&[10, 0, 0, 0]);
    cfg.on |= toa_common::probe::PROBE_PORT_FROM_SOURCE | toa_common::probe::PROBE_CLIENT_FROM_SERIAL;
    cfg
}

/// Seconds per run and pairs of runs: 8 pairs unless `TOA_BENCH_PAIRS` says otherwise.
fn shape(s: &Settings) -> (u64, usize) {
    let pairs = std::env::var("TOA_BENCH_PAIRS").ok().and_then(|p| p.parse().ok());
    if s.quick {
        (1, pairs.unwrap_or(2))
    } else {
        (5, pairs.unwrap_or(8))
    }
}

/// eBPF mode against no agent, the same nginx: the rate and CPU comparison.
fn compare_ebpf(bench: &Bench<'_>, plain: &Nginx, secs: u64, pairs: usize) -> Value {
    let baseline = || {
        bench.set_agent(false);
        let r = run(bench, plain, secs, None);
        assert_eq!(r.log.with_client + r.log.wrong, 0, "without an agent every line shows the real address: {r:?}");
        r
    };
    compare_runs("eBPF mode vs no agent", pairs, baseline, || {
        bench.set_agent(true);
        run(bench, plain, secs, None)
    })
}

/// Only the eBPF rate comparison (`TOA_BENCH_ONLY=real_app_ebpf`, with `TOA_BENCH_PAIRS`).
pub(super) fn ebpf_rate(bench: &Bench<'_>, s: &Settings) -> Value {
    let (secs, pairs) = shape(s);
    println!(
        "\nreal application, eBPF mode only: nginx, wrk -t1 -c16 with Connection: close ({pairs} pairs of {secs} s)"
    );
    bench.writer.lock().unwrap().set(serial_clients()).expect("configure the writer");
    let plain = Nginx::start(bench, PLAIN_PORT, None);
    let ebpf = compare_ebpf(bench, &plain, secs, pairs);
    bench.set_agent(false);
    drop(plain);
    bench.writer.lock().unwrap().set(toa_config(true)).expect("configure the writer");
    ebpf
}

pub(super) fn real_app(bench: &Bench<'_>, s: &Settings) -> Value {
    println!("\nreal application: nginx, wrk -t1 -c16 with Connection: close, a client of its own on every connection");
    let (secs, pairs) = shape(s);
    let long_secs = if s.quick { 2 } else { 60 };
    bench.writer.lock().unwrap().set(serial_clients()).expect("configure the writer");
    let plain = Nginx::start(bench, PLAIN_PORT, None);

    // eBPF mode: the same nginx, agent unloaded / loaded.
    let ebpf = compare_ebpf(bench, &plain, secs, pairs);
    // Where the agent's time goes on these connections: one more run, with the kernel's BPF
    // statistics on (they cost time of their own, so not during the rate runs).
    bench.set_agent(true);
    let ids: Vec<(String, u32)> =
        bench.agent.status().map(|st| st.programs.iter().map(|p| (p.name.clone(), p.id)).collect()).unwrap();
    let (r, spent) = run_time_during(&ids, || run(bench, &plain, secs, None));
    bench.set_agent(false);
    let agent_ns = spent.values().map(|(ns, _)| *ns as f64).sum::<f64>() / r.log.lines as f64;
    println!("  agent BPF time per accepted connection (kernel statistics, one run): {agent_ns:.0} ns");

    // Userspace mode: plain nginx, no reader / preloaded nginx with its reader.
    let table = PathBuf::from(format!("/run/toa-bench-{}/table", std::process::id()));
    // nginx's worker runs as nobody: the table is given its group (nogroup) to read.
    let reader = |on: bool| -> Option<u32> {
        let mut cmd = Command::new(support::toa_bin());
        cmd.env("TOA_TABLE", &table);
        if on {
            cmd.args(["load", "--mode", "userspace", "--table-group", "65534"]);
        } else {
            cmd.arg("unload");
        }
        support::in_netns_and_cgroup(&mut cmd, &bench.lab.netns_path(&bench.lab.server_ns), None);
        support::run(&mut cmd);
        let places = toa::Places { pin_dir: PathBuf::new(), table: table.clone() };
        on.then(|| {
            toa::Userspace::new(&places).status().expect("userspace status").userspace.expect("a reader").reader_pid
        })
    };
    reader(true);
    let preloaded = Nginx::start(bench, PRELOADED_PORT, Some(&table));
    reader(false);
    let userspace = compare_runs(
        "userspace mode vs plain nginx",
        pairs,
        || run(bench, &plain, secs, None),
        || {
            let pid = reader(true);
            let r = run(bench, &preloaded, secs, pid);
            reader(false);
            r
        },
    );
    // Loss over one long run at the rate wrk reaches.
    let pid = reader(true);
    let long = run(bench, &preloaded, long_secs, pid);
    reader(false);
    println!(
        "  userspace mode, one {long_secs} s run: {:.0} requests/s; {} of {} connections with their own client, {} lost, {} wrong",
        long.rate, long.log.with_client, long.log.lines, long.log.lost, long.log.wrong
    );
    drop(preloaded);
    drop(plain);
    let _ = fs::remove_dir(table.parent().unwrap());
    bench.writer.lock().unwrap().set(toa_config(true)).expect("configure the writer");
    json!({
        "ebpf": ebpf,
        "agent_bpf_ns_per_connection": agent_ns,
        "userspace": userspace,
        "userspace_long_run": {"seconds": long_secs, "rate": long.rate, "lines": long.log.lines,
                                "with_client": long.log.with_client, "lost": long.log.lost, "wrong": long.log.wrong},
    })
}
