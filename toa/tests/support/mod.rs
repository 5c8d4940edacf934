//! A lab for end-to-end tests: two network namespaces joined by a veth pair, a cgroup for the
//! servers, a pin directory for the agent, and the servers themselves. Everything is created
//! per test and removed by `Drop`, also when the test fails.
//!
//! Server namespace: 198.18.0.1/24 and fd00::1/64; client namespace: .2 and fd00::2.
#![allow(dead_code)]

/// Runs each named case `fn case(mode: Mode)` once per mode, as `ebpf::case` and
/// `userspace::case`.
#[allow(unused_macros)]
macro_rules! in_both_modes {
    ($($case:ident),* $(,)?) => {
        mod ebpf {
            $(#[test] fn $case() { super::$case(super::Mode::Ebpf) })*
        }
        mod userspace {
            $(#[test] fn $case() { super::$case(super::Mode::Userspace) })*
        }
    };
}

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How long a test waits for an event (a line, a file, a counter, a socket that accepts)
/// before it calls it a hang. It only bounds a hang: qemu guests run 10–50× slower than the
/// host, and nothing is ever measured against it.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The client the tests' probes announce.
pub const CLIENT: &str = "203.0.113.7:4242";
pub const CLIENT6: &str = "[2001:db8::7]:4242";

/// What peer_echo answers for a connection.
pub fn answer(accepted: &str, peer: &str) -> String {
    format!("accept={accepted} peer={peer}\n")
}

/// The probe's real address, from its stderr ("toa probe: from ADDR announcing …").
pub fn probe_source(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("toa probe: from "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no source in {stderr:?}"))
        .to_owned()
}

/// Bytes as the hex `toa probe --raw-option` takes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub const SERVER_V4: &str = "198.18.0.1";
pub const CLIENT_V4: &str = "198.18.0.2";
pub const SERVER_V6: &str = "fd00::1";
pub const CLIENT_V6: &str = "fd00::2";
/// The balancer's own addresses on the link (FULLNAT's local address), which no namespace owns:
/// the server namespace reaches them at the client namespace's MAC. The probe speaks TCP from
/// there where the kernel's writer is missing (before 5.10), and so does `raw_tcp`.
pub const BALANCER_V4: &str = "198.18.0.3";
pub const BALANCER_V6: &str = "fd00::3";

/// The addresses the probe's connections come from: the client namespace's own, or the
/// balancer's where the probe speaks TCP itself.
pub fn probe_sources() -> (&'static str, &'static str) {
    if kernel_has_writer() {
        (CLIENT_V4, CLIENT_V6)
    } else {
        (BALANCER_V4, BALANCER_V6)
    }
}

/// Whether this kernel can run the probe's eBPF writer (sock_ops header options, 5.10).
/// `TOA_TEST_RAW_PROBE=1` takes the older kernels' path on any kernel.
pub fn kernel_has_writer() -> bool {
    if std::env::var_os("TOA_TEST_RAW_PROBE").is_some_and(|v| v == "1") {
        return false;
    }
    toa::system::parse_release(&toa::system::kernel_release()).is_some_and(|v| v >= (5, 10))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn toa_bin() -> &'static str {
    env!("CARGO_BIN_EXE_toa")
}

/// Runs a command that must succeed; panics with its output otherwise.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// The cgroup v2 mount point, from /proc/mounts. Privileged tests fail loudly without it.
pub fn cgroup2_mount() -> PathBuf {
    cgroup2_mount_if_any().expect("these tests need a cgroup v2 hierarchy mounted")
}

/// The cgroup v2 mount point, if there is one (there is none before Linux 4.5).
pub fn cgroup2_mount_if_any() -> Option<PathBuf> {
    toa::cgroup::v2_mount().ok()
}

/// How the lab's agent runs: the eBPF programs, or the userspace mode (capture reader + the
/// servers started with `LD_PRELOAD=libtoa.so`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Userspace,
}

/// libtoa.so, built by `cargo xtask test` (`TOA_LIBTOA` may name another).
pub fn libtoa() -> PathBuf {
    if let Some(path) = std::env::var_os("TOA_LIBTOA") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libtoa.so");
    assert!(
        path.exists(),
        "{} missing: build it first (`cargo build --release --manifest-path libtoa/Cargo.toml --target-dir target`; \
         `cargo xtask test` does)",
        path.display()
    );
    path
}

pub struct Lab {
    pub name: String,
    pub mode: Mode,
    /// The userspace mode's table (under /run, removed with the lab).
    pub table: PathBuf,
    pub server_ns: String,
    pub client_ns: String,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    servers: Vec<Child>,
}

impl Lab {
    pub fn new() -> Self {
        Self::with_mode(Mode::Ebpf)
    }

    pub fn with_mode(mode: Mode) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the end-to-end tests must run as root");
        // An agent on the cgroup root rewrites the test servers' addresses too, which would
        // make "the real address is kept" untestable. (The userspace mode runs where there may
        // be no cgroup v2 at all: before 4.5.)
        let v2 = match mode {
            Mode::Ebpf => Some(cgroup2_mount()),
            Mode::Userspace => cgroup2_mount_if_any(),
        };
        if let Some(v2) = &v2 {
            let root_hooks = cgroup_attachments(v2);
            assert!(
                !root_hooks.contains("toa_sock_ops"),
                "toa is loaded on the cgroup v2 root of this host; the end-to-end tests need it \
                 unloaded: run `toa unload` first\n{root_hooks}"
            );
        }
        let name = format!("toa-t{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let lab = Lab {
            mode,
            table: PathBuf::from("/run/toa-tests").join(&name).join("table"),
            server_ns: format!("{name}-s"),
            client_ns: format!("{name}-c"),
            // The userspace mode needs no cgroup: its lab makes none.
            cgroup: v2.filter(|_| mode == Mode::Ebpf).map(|v2| v2.join(&name)).unwrap_or_default(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            name,
            servers: Vec::new(),
        };
        // From here on `Drop` cleans up whatever was made, should a step fail.
        ip(&["netns", "add", &lab.server_ns]);
        ip(&["netns", "add", &lab.client_ns]);
        ip(&[
            "-n",
            &lab.server_ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &lab.client_ns,
        ]);
        for (ns, v4, v6) in [(&lab.server_ns, SERVER_V4, SERVER_V6), (&lab.client_ns, CLIENT_V4, CLIENT_V6)] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ip(&["-n", ns, "-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        if mode == Mode::Ebpf {
            fs::create_dir(&lab.cgroup).expect("create the test cgroup");
        }
        // Room for a thousand connections at once in the listeners' queues (the default
        // was 128 before 5.4): an overflowing queue drops handshakes, whatever the agent does.
        in_netns(lab.netns_path(&lab.server_ns), || fs::write("/proc/sys/net/core/somaxconn", "4096"))
            .expect("set somaxconn in the server namespace");
        // The server namespace reaches the balancer's addresses at the client's MAC.
        let link = run(Command::new("ip").args(["-n", &lab.client_ns, "-o", "link", "show", "eth0"]));
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        let mac = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).expect("the client's MAC");
        for balancer in [BALANCER_V4, BALANCER_V6] {
            ip(&["-n", &lab.server_ns, "neigh", "replace", balancer, "lladdr", mac, "dev", "eth0", "nud", "permanent"]);
        }
        lab
    }

    /// `toa` with this lab's pin directory and table.
    pub fn toa(&self) -> Command {
        let mut cmd = Command::new(toa_bin());
        cmd.env("TOA_PIN_DIR", &self.pin_dir).env("TOA_TABLE", &self.table);
        cmd
    }

    /// `toa` run as nobody (uid 65534), for the "not root" cases. It runs a copy of the binary in
    /// the lab's directory under /run (removed with the lab): the checkout it was built in may
    /// not be readable by others (a clone in a `mktemp -d` directory is 0700).
    pub fn toa_as_nobody(&self) -> Command {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.table.parent().expect("the lab's directory");
        fs::create_dir_all(dir).expect("create the lab's directory");
        for d in [dir, dir.parent().expect("/run/toa-tests")] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("open the lab's directory to all");
        }
        let copy = dir.join("toa-as-nobody");
        fs::copy(toa_bin(), &copy).expect("copy toa for nobody");
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("make the copy executable");
        let mut cmd = Command::new(copy);
        cmd.env("TOA_PIN_DIR", &self.pin_dir).env("TOA_TABLE", &self.table);
        // SAFETY: setuid between fork and exec, async-signal-safe.
        unsafe {
            cmd.pre_exec(|| if libc::setuid(65534) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
        }
        cmd
    }

    /// Loads the agent on this lab's cgroup.
    pub fn load(&self) -> Output {
        self.load_with(&[])
    }

    /// `toa load` with policy flags (again on a loaded agent: reconfigures it in place).
    pub fn load_with(&self, args: &[&str]) -> Output {
        run(&mut self.load_cmd(args))
    }

    /// `toa load` as this lab's mode does it: eBPF on the lab's cgroup, or the userspace reader
    /// started in the server namespace.
    pub fn load_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.toa();
        match self.mode {
            Mode::Ebpf => {
                cmd.arg("load").arg("--cgroup").arg(&self.cgroup).args(args);
            }
            Mode::Userspace => {
                cmd.args(["load", "--mode", "userspace"]).args(args);
                // The longest wait allowed, unless the test sets its own: a reader that lags on
                // a loaded machine or in a slow guest must not cost a client here. The default
                // bound is the benchmark's business.
                if !args.contains(&"--accept-wait-us") {
                    cmd.args(["--accept-wait-us", "1000000"]);
                }
                in_netns_and_cgroup(&mut cmd, &self.netns_path(&self.server_ns), None);
            }
        }
        cmd
    }

    /// The userspace reader's PID, from `toa status`.
    pub fn reader_pid(&self) -> i32 {
        let status = self.status_json();
        status["userspace"]["reader_pid"].as_i64().unwrap_or_else(|| panic!("no reader in {status}")) as i32
    }

    pub fn unload(&self) -> Output {
        run(self.toa().arg("unload"))
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = run(self.toa().args(["status", "--json"]));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// `toa conns --json` in the server namespace.
    pub fn conns(&self) -> Vec<serde_json::Value> {
        let out = run(self.toa().args(["conns", "--json", "--netns"]).arg(self.netns_path(&self.server_ns)));
        let conns: serde_json::Value = serde_json::from_slice(&out.stdout).expect("conns --json is JSON");
        conns.as_array().expect("a list").clone()
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = run(self.toa().args(["stats", "--json"]));
        serde_json::from_slice(&out.stdout).expect("stats --json is JSON")
    }

    /// Starts the Python server (knows nothing of TOA) on `host`:`port` in the server namespace
    /// and the lab's cgroup; returns once it listens.
    pub fn python_server(&mut self, host: &str, port: u16) {
        self.script_server("peer_echo.py", host, port, &[]);
    }

    /// Starts `tests/SCRIPT HOST PORT ARGS` with python3.
    pub fn script_server(&mut self, script: &str, host: &str, port: u16, args: &[&str]) {
        let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new("python3");
        cmd.arg(path).args([host, &port.to_string()]).args(args);
        self.start_server(cmd);
    }

    /// Starts the Rust server (examples/peer_echo.rs, std only) on `addr`.
    pub fn rust_server(&mut self, addr: &str) {
        self.example_server("peer_echo", addr);
    }

    /// Starts examples/NAME on `addr`.
    pub fn example_server(&mut self, name: &str, addr: &str) {
        let mut cmd = Command::new(example_bin(name));
        cmd.arg(addr);
        self.start_server(cmd);
    }

    fn start_server(&mut self, mut cmd: Command) {
        self.server_env(&mut cmd);
        in_netns_and_cgroup(&mut cmd, &self.netns_path(&self.server_ns), self.server_cgroup());
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        self.servers.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the server's first line");
        assert!(line.starts_with("listening on"), "server did not start: {line:?}");
    }

    /// In userspace mode a server gets libtoa.so preloaded and the lab's table.
    pub fn server_env(&self, cmd: &mut Command) {
        if self.mode == Mode::Userspace {
            cmd.env("LD_PRELOAD", libtoa()).env("TOA_TABLE", &self.table);
        }
    }

    pub fn netns_path(&self, ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(ns)
    }

    /// Runs `toa probe` from the client namespace; returns (stdout, stderr).
    pub fn probe(&self, target: &str, args: &[&str]) -> (String, String) {
        let out = run(&mut self.probe_cmd(target, args));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    }

    /// `toa probe` from the client namespace. Before 5.10 it speaks TCP itself from the
    /// balancer's address (`--from`), as the kernel's writer is missing there.
    pub fn probe_cmd(&self, target: &str, args: &[&str]) -> Command {
        let mut cmd = self.toa();
        cmd.arg("probe").arg(target).args(args);
        if !args.contains(&"--timeout") {
            cmd.args(["--timeout", &DEADLINE.as_secs().to_string()]);
        }
        if !kernel_has_writer() && !args.contains(&"--from") {
            cmd.args(["--from", if target.starts_with('[') { BALANCER_V6 } else { BALANCER_V4 }]);
        }
        in_netns_and_cgroup(&mut cmd, &self.netns_path(&self.client_ns), None);
        cmd
    }

    /// Runs `f` in a thread that has entered the client namespace (setns(CLONE_NEWNET) changes
    /// only the calling thread; /proc/sys/net then shows that namespace too).
    pub fn in_client_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(self.netns_path(&self.client_ns), f)
    }

    pub fn in_server_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(self.netns_path(&self.server_ns), f)
    }

    /// An HTTP GET on the server namespace's loopback: (status code, body).
    pub fn http_get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let path = path.to_owned();
        self.in_server_ns(move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(DEADLINE)).ok()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let code = text.split_whitespace().nth(1)?.parse().ok()?;
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            Some((code, body))
        })
    }

    /// Starts `toa run ARGS` in the server namespace (metrics on its loopback); returns once
    /// /readyz answers 200.
    pub fn start_service(&self, port: u16, args: &[&str]) -> Service {
        let mut cmd = self.toa();
        cmd.arg("run").args(["--metrics", &format!("127.0.0.1:{port}")]).args(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        in_netns_and_cgroup(&mut cmd, &self.netns_path(&self.server_ns), None);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let mut service = Service::new(child);
        let ready = eventually(DEADLINE, || {
            assert!(service.running(), "toa run exited early: {}", service.stderr());
            matches!(self.http_get(port, "/readyz"), Some((200, _)))
        });
        assert!(ready, "toa run never became ready");
        service
    }

    /// Sends `options` on the handshake ACK from a hand-written client (see `raw_tcp`) and
    /// returns (the client's address, the server's answer to one line).
    pub fn raw_exchange(&self, port: u16, sport: u16, options: &[u8]) -> (String, String) {
        let options = options.to_vec();
        let reply = self.in_client_ns(move || {
            raw_tcp::exchange("198.18.0.1".parse().unwrap(), port, sport, &options, b"raw\n").expect("raw exchange")
        });
        (format!("{}:{sport}", raw_tcp::SPOOFED), reply)
    }

    /// The cgroup the servers run in: the lab's in eBPF mode, none in userspace mode.
    pub fn server_cgroup(&self) -> Option<&Path> {
        (self.mode == Mode::Ebpf).then_some(self.cgroup.as_path())
    }

    /// A second cgroup inside the lab's, removed with the lab.
    pub fn sub_cgroup(&self, name: &str) -> PathBuf {
        let dir = self.cgroup.join(name);
        fs::create_dir(&dir).expect("create a sub-cgroup");
        dir
    }

    /// A plain connection (no option at all) from the client namespace: sends a line, returns
    /// (the client's own address, the server's answer).
    pub fn plain_exchange(&self, target: &str) -> (String, String) {
        use std::io::{Read as _, Write as _};
        let target: std::net::SocketAddr = target.parse().unwrap();
        self.in_client_ns(move || {
            let mut s = std::net::TcpStream::connect_timeout(&target, DEADLINE).unwrap();
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            s.write_all(b"plain\n").unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            (s.local_addr().unwrap().to_string(), reply)
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.pin_dir.exists() || self.table.exists() {
            let _ = self.toa().arg("unload").output();
        }
        if let Some(dir) = self.table.parent() {
            let _ = fs::remove_dir_all(dir);
            let _ = fs::remove_dir("/run/toa-tests");
        }
        if self.mode == Mode::Ebpf {
            if let Ok(subs) = fs::read_dir(&self.cgroup) {
                for sub in subs.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                    let _ = fs::remove_dir(sub.path());
                }
            }
            let _ = fs::remove_dir(&self.cgroup);
        }
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// One connection from `toa probe --stdin` (announcing `CLIENT`), held open: each `ask` sends
/// a line and returns the server's answer.
pub struct LiveConn {
    child: Child,
    reader: BufReader<std::process::ChildStdout>,
}

impl LiveConn {
    pub fn open(lab: &Lab, target: &str) -> Self {
        let mut cmd = lab.probe_cmd(target, &["--as", CLIENT, "--stdin"]);
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let reader = BufReader::new(child.stdout.take().unwrap());
        Self { child, reader }
    }

    pub fn ask(&mut self) -> String {
        use std::io::Write as _;
        writeln!(self.child.stdin.as_mut().unwrap(), "still there?").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    pub fn close(mut self) {
        drop(self.child.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

/// A `toa run` started by a test; `Drop` ends it (by its PID) if the test did not. Its stderr
/// (the log) is collected as it comes, so that a test can wait for a line.
pub struct Service {
    child: Option<Child>,
    log: std::sync::Arc<(std::sync::Mutex<String>, std::sync::Condvar)>,
    collector: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    fn new(mut child: Child) -> Self {
        let stderr = child.stderr.take().expect("piped stderr");
        let log = std::sync::Arc::new((std::sync::Mutex::new(String::new()), std::sync::Condvar::new()));
        let shared = log.clone();
        let collector = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (text, changed) = &*shared;
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
                changed.notify_all();
            }
        });
        Service { child: Some(child), log, collector: Some(collector) }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits until the log has `n` lines containing `text` (bounded by `DEADLINE`).
    pub fn wait_for_log(&self, text: &str, n: usize) {
        let (log, changed) = &*self.log;
        let (log, timeout) =
            changed.wait_timeout_while(log.lock().unwrap(), DEADLINE, |log| log.matches(text).count() < n).unwrap();
        assert!(!timeout.timed_out(), "toa run did not log {text:?} {n} time(s):\n{log}");
    }

    /// SIGTERM, then waits for the exit; returns (success, stderr).
    pub fn stop(&mut self) -> (bool, String) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let status = child.wait().expect("wait for toa run");
        (status.success(), self.collected())
    }

    /// Everything it logged, once it has exited.
    fn collected(&mut self) -> String {
        if let Some(collector) = self.collector.take() {
            let _ = collector.join();
        }
        self.log.0.lock().unwrap().clone()
    }

    fn stderr(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.collected()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `f` in a thread that entered the network namespace at `ns`.
pub fn in_netns<T: Send + 'static>(ns: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let file = fs::File::open(&ns).unwrap();
        // SAFETY: a valid namespace fd; only this thread moves.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        f()
    })
    .join()
    .unwrap()
}

/// Makes `cmd` run in a network namespace and, optionally, a cgroup, from its first
/// instruction: sockets take their cgroup and namespace when they are created.
pub fn in_netns_and_cgroup(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) {
    let ns = fs::File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
    let procs =
        cgroup.map(|c| fs::OpenOptions::new().write(true).open(c.join("cgroup.procs")).expect("open cgroup.procs"));
    // SAFETY: between fork and exec only async-signal-safe calls (write, setns) on fds opened
    // before the fork, which the closure keeps alive.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Path of an example binary built by `cargo test` next to the test binaries, or in
/// `TOA_EXAMPLES_DIR` (the kernel matrix runs static test binaries with dynamically linked
/// examples: libtoa.so can only be preloaded into those).
pub fn example_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TOA_EXAMPLES_DIR") {
        Some(dir) => PathBuf::from(dir),
        // target/<profile>/deps/e2e-… → target/<profile>/examples/<name>
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent().and_then(Path::parent).expect("target dir").join("examples")
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} missing: build it first (`cargo build --examples`; `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Waits until `cond` holds, for at most `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Whether the kernel still has the program with this id.
pub fn program_exists(id: u64) -> bool {
    toa::program_name(id as u32).is_ok()
}

/// Whether `attached` (from `cgroup_attachments`) has the program `toa status` lists as `name`
/// on `hook`. By id: a kernel without the tracing that aya's probe for program names uses
/// (the shared test kernels) loads toa's programs without names.
pub fn has_program(attached: &str, status: &serde_json::Value, hook: &str, name: &str) -> bool {
    let id = status["programs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["id"].as_u64())
        .unwrap_or_else(|| panic!("toa status lists no {name}: {status}"));
    attached.lines().any(|l| l.starts_with(&format!("{hook} ")) && l.ends_with(&format!("(id {id})")))
}

/// The programs attached to a cgroup (its own attachments only), one per line as
/// `HOOK NAME (id ID)`. Asked of the kernel directly (BPF_PROG_QUERY), not of bpftool, whose
/// newer releases fail on older kernels.
pub fn cgroup_attachments(cgroup: &Path) -> String {
    let mut text = String::new();
    for hook in toa::hooks::HOOKS {
        let ids = match toa::cgroup_programs(cgroup, hook.attach_type) {
            Ok(ids) => ids,
            // A hook this kernel does not have (getpeername came in 5.8): nothing on it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Vec::new(),
            Err(e) => panic!("query {}: {e}", cgroup.display()),
        };
        for id in ids {
            let name = toa::program_name(id).unwrap_or_else(|e| format!("? ({e})"));
            text.push_str(&format!("{} {name} (id {id})\n", hook.label));
        }
    }
    text
}

/// A TCP client written by hand, for option areas the kernel's own stack would never send
/// (end-of-list, a length below 2, an option running past the area). It speaks from 198.18.0.3,
/// an address no namespace owns: the server namespace is told which MAC it lives at, and the
/// client namespace, not owning it, neither answers nor resets, while an AF_PACKET socket there
/// sees the server's segments.
pub mod raw_tcp {
    use std::{
        io,
        net::Ipv4Addr,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        time::Instant,
    };

    pub const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;
    const RST: u8 = 0x04;

    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// One IPv4 + TCP segment from SPOOFED:sport to dst:dport, built as the probe's own TCP
    /// builds its segments.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0, "the option area is whole 32-bit words");
        let to = std::net::SocketAddr::new(dst.into(), dport);
        let tcp = toa::probe::raw::tcp_segment(SPOOFED.into(), to, sport, seq, ack, flags, options, payload);
        toa::probe::raw::ipv4_packet(SPOOFED.octets(), dst.octets(), &tcp)
    }

    struct Seen {
        flags: u8,
        seq: u32,
        payload: Vec<u8>,
    }

    /// Connects with `options` on the handshake ACK, sends `line`, and returns what the server
    /// answered. Must run on a thread inside the client namespace.
    pub fn exchange(dst: Ipv4Addr, dport: u16, sport: u16, options: &[u8], line: &[u8]) -> io::Result<String> {
        // SAFETY: plain socket calls; the descriptors are owned at once.
        let (send, recv) = unsafe {
            let send = OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW))?);
            let proto = (libc::ETH_P_IP as u16).to_be() as libc::c_int;
            let recv = OwnedFd::from_raw_fd(check(libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto))?);
            (send, recv)
        };
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: setsockopt with a timeval we own.
        unsafe {
            check(libc::setsockopt(
                recv.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ))?;
        }
        let send_seg = |seg: Vec<u8>| -> io::Result<()> {
            let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            to.sin_family = libc::AF_INET as u16;
            to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
            // SAFETY: sendto with a buffer and address we own.
            check(unsafe {
                libc::sendto(
                    send.as_raw_fd(),
                    seg.as_ptr().cast(),
                    seg.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            } as libc::c_int)?;
            Ok(())
        };
        // The server's next segment to us that satisfies `want`.
        let wait = |want: &dyn Fn(&Seen) -> bool| -> io::Result<Seen> {
            let deadline = Instant::now() + super::DEADLINE;
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                // SAFETY: recv into our buffer.
                let n = unsafe { libc::recv(recv.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 40 {
                    continue;
                }
                let p = &buf[..n as usize];
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if p[9] != libc::IPPROTO_TCP as u8 || p[16..20] != SPOOFED.octets() || p.len() < ihl + 20 {
                    continue;
                }
                let t = &p[ihl..];
                if u16::from_be_bytes([t[2], t[3]]) != sport {
                    continue;
                }
                let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
                let doff = usize::from(t[12] >> 4) * 4;
                let seen = Seen {
                    flags: t[13],
                    seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                    payload: p[ihl + doff..total].to_vec(),
                };
                if want(&seen) {
                    return Ok(seen);
                }
            }
            Err(io::Error::new(io::ErrorKind::TimedOut, "no answer from the server"))
        };
        let isn = 0x1000_0000u32;
        send_seg(segment(dst, sport, dport, isn, 0, SYN, &[2, 4, 0x05, 0xb4], &[]))?;
        let synack = wait(&|s| s.flags & (SYN | ACK) == SYN | ACK)?;
        let (seq, ack) = (isn + 1, synack.seq.wrapping_add(1));
        send_seg(segment(dst, sport, dport, seq, ack, ACK, options, &[]))?;
        send_seg(segment(dst, sport, dport, seq, ack, PSH | ACK, &[], line))?;
        let answer = wait(&|s| !s.payload.is_empty())?;
        // Leave nothing behind on the server.
        send_seg(segment(dst, sport, dport, seq + line.len() as u32, 0, RST, &[], &[]))?;
        Ok(String::from_utf8_lossy(&answer.payload).into_owned())
    }
}
