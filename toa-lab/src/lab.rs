//! The lab: two network namespaces joined by a veth pair, a cgroup, a pin directory, the agent and
//! the servers; all of it removed by `Drop`, which reports what it could not undo.

use super::*;

pub(crate) static NEXT: AtomicU32 = AtomicU32::new(0);

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
    /// Creates namespaces, a cgroup and a pin directory: too much for a `Default`.
    #[allow(clippy::new_without_default)]
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
        self.toa_from(&toa_bin())
    }

    /// [`Lab::toa`] from another `toa` binary.
    pub fn toa_from(&self, bin: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.env("TOA_PIN_DIR", &self.pin_dir).env("TOA_TABLE", &self.table);
        cmd
    }

    /// `toa ARGS` run as nobody (uid 65534), for the "not root" cases: its output. It runs a copy
    /// of the binary in the lab's directory under /run (removed with the lab): the checkout it was
    /// built in may not be readable by others (a clone in a `mktemp -d` directory is 0700).
    pub fn toa_as_nobody(&self, args: &[&str]) -> Output {
        let mut cmd = self.toa_as_nobody_cmd();
        cmd.args(args);
        // A child another test forks while the copy is being written inherits its descriptor
        // until that child execs: exec fails with ETXTBSY meanwhile. Try again until it is gone.
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            match cmd.output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                result => return result.unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
            }
        }
    }

    fn toa_as_nobody_cmd(&self) -> Command {
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

    /// `toa unload --config FILE` as a package's removal runs it: the places come from a config
    /// file (written here, removed after), not from the environment.
    pub fn unload_by_config(&self) -> Output {
        let config = std::env::temp_dir().join(format!("{}.toml", self.name));
        let text = format!("pin_dir = {:?}\ntable = {:?}\n", self.pin_dir, self.table);
        std::fs::write(&config, text).expect("write the unload's config");
        let out = run(self
            .toa()
            .env_remove("TOA_PIN_DIR")
            .env_remove("TOA_TABLE")
            .arg("unload")
            .arg("--config")
            .arg(&config));
        let _ = std::fs::remove_file(&config);
        out
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
        // No `..` in the path: the kernel matrix's guests hold toa/tests but no toa-lab/.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
        let path = root.join("toa/tests").join(script);
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

    /// Starts `cmd`, a server that prints "listening on …" once it listens, in the server
    /// namespace and the lab's cgroup (preloaded in userspace mode); returns its PID once it
    /// listens. It is killed with the lab.
    pub fn start_server(&mut self, mut cmd: Command) -> u32 {
        self.server_env(&mut cmd);
        in_netns_and_cgroup(&mut cmd, &self.netns_path(&self.server_ns), self.server_cgroup());
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let pid = child.id();
        self.servers.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the server's first line");
        assert!(line.starts_with("listening on"), "server did not start: {line:?}");
        pid
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
        self.start_service_from(&toa_bin(), port, args)
    }

    /// [`Lab::start_service`] from another `toa` binary (an upgrade to another build).
    pub fn start_service_from(&self, bin: &Path, port: u16, args: &[&str]) -> Service {
        let mut cmd = self.toa_from(bin);
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

    /// Many [`Lab::raw_exchange`]s from one thread in the client namespace, each
    /// `(source port, option areas of the SYN, the handshake ACK and the data segment)`: the
    /// server's answers, in order.
    pub fn raw_exchanges(&self, port: u16, cases: Vec<(u16, raw_tcp::Areas)>) -> Vec<String> {
        self.in_client_ns(move || {
            let server = "198.18.0.1".parse().unwrap();
            cases
                .iter()
                .map(|(sport, areas)| {
                    raw_tcp::exchange_with(server, port, *sport, areas, b"raw\n")
                        .unwrap_or_else(|e| panic!("raw exchange from port {sport}: {e}; {areas:02x?}"))
                })
                .collect()
        })
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
            // Already exited is fine: kill fails then, wait reaps it.
            let _ = child.kill();
            report_cleanup(format!("reap server {}", child.id()), child.wait());
        }
        if self.pin_dir.exists() || self.table.exists() {
            report_cleanup("toa unload", succeeded(self.toa().arg("unload")));
        }
        if let Some(dir) = self.table.parent() {
            report_cleanup(format!("remove {}", dir.display()), removed(fs::remove_dir_all(dir)));
            // Shared by the labs running in parallel: only the last one removes it.
            let _ = fs::remove_dir("/run/toa-tests");
        }
        if self.mode == Mode::Ebpf {
            if let Ok(subs) = fs::read_dir(&self.cgroup) {
                for sub in subs.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                    report_cleanup(format!("remove {}", sub.path().display()), removed(fs::remove_dir(sub.path())));
                }
            }
            report_cleanup(format!("remove {}", self.cgroup.display()), removed(fs::remove_dir(&self.cgroup)));
        }
        for ns in [&self.server_ns, &self.client_ns] {
            report_cleanup(format!("ip netns del {ns}"), succeeded(Command::new("ip").args(["netns", "del", ns])));
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
        Self::open_with(lab, target, &[])
    }

    /// [`LiveConn::open`] with more `toa probe` arguments (e.g. `--raw-option HEX`).
    pub fn open_with(lab: &Lab, target: &str, args: &[&str]) -> Self {
        let mut all = vec!["--as", CLIENT, "--stdin"];
        all.extend(args);
        let mut cmd = lab.probe_cmd(target, &all);
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
