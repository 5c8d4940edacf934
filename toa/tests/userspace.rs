//! The userspace mode's own cases (the shared ones run in e2e.rs and policy.rs): an unmodified
//! nginx, a thousand connections at once, the bounded wait, the table's bounds and expiry, bad
//! input, and what libtoa.so asks of the C library. Run as root.

use toa_lab as support;

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use support::*;

/// Lets this process and its children (probe, servers) hold thousands of sockets.
fn raise_nofile() {
    toa::system::raise_nofile(65536);
}

/// `(announced, reply)` per connection of a `--parallel` probe, in the order it printed them.
fn parallel_probe(lab: &Lab, target: &str, n: u32, message: &str) -> Vec<(String, String)> {
    let out = run(&mut lab.probe_cmd(
        target,
        &["--as", "203.0.113.7:1", "--count", &n.to_string(), "--parallel", "--message", message, "--timeout", "30"],
    ));
    let announced: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.split(" announcing ").nth(1).map(str::to_owned))
        .collect();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let replies: Vec<String> = stdout.lines().filter(|l| l.contains("peer=")).map(str::to_owned).collect();
    assert_eq!(announced.len(), n as usize, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(replies.len(), n as usize, "{stdout}");
    announced.into_iter().zip(replies).collect()
}

#[test]
fn a_thousand_parallel_connections_each_get_their_own_client() {
    raise_nofile();
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let n = 1000;
    let got = parallel_probe(&lab, "198.18.0.1:8080", n, "hello");
    let mut ports = std::collections::HashSet::new();
    for (announced, reply) in &got {
        assert_eq!(format!("{reply}\n"), answer(announced, announced));
        assert!(ports.insert(announced.clone()), "{announced} twice");
    }
    assert_eq!(lab.stats()["syn_recv_sock_toa"], u64::from(n));
}

/// nginx, preloaded: its workers (running as nobody) see the client in `$remote_addr`.
struct Nginx {
    child: Child,
    prefix: PathBuf,
}

impl Nginx {
    fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("TOA_NGINX") {
            return p.into();
        }
        let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/nginx/usr/sbin/nginx");
        [PathBuf::from("/usr/sbin/nginx"), unpacked]
            .into_iter()
            .find(|p| p.exists())
            .expect("nginx is needed by this test: `cargo xtask setup` unpacks it into target/test-tools")
    }

    fn start(lab: &Lab) -> Self {
        let prefix = PathBuf::from(format!("/tmp/{}-nginx", lab.name));
        std::fs::create_dir_all(prefix.join("tmp")).unwrap();
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; pid {p}/nginx.pid; error_log stderr warn;
             events {{ worker_connections 4096; }}
             http {{
               access_log off;
               client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp;
               uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;
               server {{
                 listen 198.18.0.1:8080 backlog=4096; listen [fd00::1]:8080;
                 location / {{ default_type text/plain; return 200 \"peer=$remote_addr:$remote_port\\n\"; }}
               }}
             }}",
            p = prefix.display()
        );
        std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new(Self::binary());
        cmd.arg("-p").arg(&prefix).arg("-c").arg(prefix.join("nginx.conf")).args(["-e", "stderr"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        lab.server_env(&mut cmd);
        in_netns_and_cgroup(&mut cmd, &lab.netns_path(&lab.server_ns), lab.server_cgroup());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let nginx = Nginx { child, prefix };
        let up = eventually(DEADLINE, || lab.in_server_ns(|| std::net::TcpStream::connect("198.18.0.1:8080").is_ok()));
        assert!(up, "nginx did not start listening");
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers before it exits.
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}

#[test]
fn unmodified_nginx_reports_the_client() {
    raise_nofile();
    let lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    let _nginx = Nginx::start(&lab);
    let request = "GET / HTTP/1.0\r\n\r";
    // The table is root's alone by default: the workers (nobody) cannot read it, and see the
    // connection's real address.
    let meta = std::fs::metadata(&lab.table).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid(), meta.gid()), (0o600, 0, 0));
    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT, "--message", request]);
    assert!(out.ends_with(&format!("\r\n\r\npeer={}\n", probe_source(&err))), "{out}");
    // Given the workers' group (nogroup), they read it: the next lookup maps it.
    lab.load_with(&["--table-group", "65534"]);
    let meta = std::fs::metadata(&lab.table).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid(), meta.gid()), (0o640, 0, 65534));
    assert_eq!(lab.status_json()["userspace"]["tuning"]["table_group"]["group"], 65534);
    let client_seen = || {
        let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT, "--message", request]);
        out.ends_with(&format!("\r\n\r\npeer={CLIENT}\n"))
    };
    assert!(eventually(DEADLINE, client_seen), "nginx's workers never read the table");
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT, "--message", request]);
    assert!(out.ends_with(&format!("\r\n\r\npeer={CLIENT}\n")), "{out}");
    let (out, _) = lab.probe("[fd00::1]:8080", &["--as", CLIENT6, "--message", request]);
    assert!(out.ends_with(&format!("\r\n\r\npeer={}\n", CLIENT6.replace(['[', ']'], ""))), "{out}");
    // A thousand at once, each its own.
    let got = parallel_probe(&lab, "198.18.0.1:8080", 1000, request);
    for (announced, reply) in got {
        assert_eq!(reply, format!("peer={announced}"));
    }
}

/// The preloaded Python server, writing its libtoa counters to a file after each connection.
struct CountedServer {
    file: PathBuf,
    connections: u64,
}

impl CountedServer {
    fn start(lab: &mut Lab) -> Self {
        let file = PathBuf::from(format!("/run/toa-tests/{}/libtoa-counters", lab.name));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        lab.script_server("peer_echo.py", SERVER_V4, 8080, &["--libtoa-counters", file.to_str().unwrap()]);
        CountedServer { file, connections: 0 }
    }

    /// The counters once the server has closed `n` more connections (waits for that, bounded).
    fn after(&mut self, n: u64) -> std::collections::HashMap<String, u64> {
        self.connections += n;
        let mut counters = std::collections::HashMap::new();
        let done = eventually(DEADLINE, || {
            let text = std::fs::read_to_string(&self.file).unwrap_or_default();
            counters = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim().parse().unwrap()))
                .collect();
            counters.get("connections") == Some(&self.connections)
        });
        assert!(done, "the server did not close {} connections: {counters:?}", self.connections);
        counters
    }
}

/// A connection in scope without an option keeps its real address, and its wait ends because
/// the reader has caught up (counted by libtoa), not at its bound; one from outside the trust
/// list is never waited for. (The wait running to its bound:
/// `stalled_or_dead_reader_keeps_real_addresses`.)
#[test]
fn missing_entry_gives_the_real_address_once_the_reader_caught_up() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    // The longest wait allowed: only the reader catching up can end it early.
    lab.load_with(&["--accept-wait-us", "1000000"]);
    let mut server = CountedServer::start(&mut lab);
    let (local, reply) = lab.plain_exchange("198.18.0.1:8080");
    assert_eq!(reply, answer(&local, &local));
    let c = server.after(1);
    // accept() and getpeername(): two lookups, each waited and was ended by the caught-up reader.
    assert_eq!((c["lookups"], c["found"], c["no_table"]), (2, 0, 0), "{c:?}");
    assert_eq!((c["waits"], c["waits_caught_up"], c["waits_timed_out"]), (2, 2, 0), "{c:?}");

    // Only the balancer's range is in scope: other clients never wait.
    lab.load_with(&["--accept-wait-us", "1000000", "--trust", "100.125.0.0/16"]);
    let (local, reply) = lab.plain_exchange("198.18.0.1:8080");
    assert_eq!(reply, answer(&local, &local));
    let c = server.after(1);
    assert_eq!((c["lookups"], c["waits"], c["waits_timed_out"]), (4, 2, 0), "{c:?}");
}

/// A stopped reader: accept() waits its bounded time, then gives the real address; once the
/// heartbeat is stale, nothing waits at all. Resumed, it serves again. Waits are counted by
/// libtoa in the server, never timed.
#[test]
fn stalled_or_dead_reader_keeps_real_addresses() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load_with(&["--accept-wait-us", "200000"]);
    let mut server = CountedServer::start(&mut lab);
    let pid = lab.reader_pid();
    // SAFETY: signals to the reader this test started (its PID from toa status).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    let real = probe_source(&err);
    assert_eq!(out, answer(&real, &real), "no entry was ever written");
    let c = server.after(1);
    // accept() and getpeername() each found no entry. A stopped reader never catches up: each
    // wait ran to its bound, unless the heartbeat went stale first (a slow machine), in which
    // case the lookup found no live table and did not wait at all.
    assert_eq!((c["lookups"], c["found"], c["waits_caught_up"]), (2, 0, 0), "{c:?}");
    assert_eq!(c["waits"], c["waits_timed_out"], "{c:?}");
    assert_eq!(c["waits"] + c["no_table"], 2, "{c:?}");

    // Once the heartbeat is stale, `toa status` and libtoa both take the reader for dead.
    assert!(eventually(DEADLINE, || lab.status_json()["loaded"] == false), "the stopped reader still counts as live");
    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    let real = probe_source(&err);
    assert_eq!(out, answer(&real, &real));
    let after = server.after(1);
    assert_eq!(after["lookups"] - c["lookups"], 2, "{after:?}");
    assert_eq!(after["no_table"] - c["no_table"], 2, "a dead reader costs no wait: {after:?}");
    assert_eq!(after["waits"], c["waits"], "a dead reader costs no wait: {after:?}");

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(eventually(DEADLINE, || lab.status_json()["loaded"] == true));
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
    // A reader stopped again is still ended by toa unload, once its heartbeat is stale.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert!(eventually(DEADLINE, || lab.status_json()["loaded"] == false));
    lab.unload();
    let gone = || !Path::new(&format!("/proc/{pid}")).exists();
    assert!(eventually(DEADLINE, gone), "reader {pid} left behind");
    assert!(!lab.table.exists());
}

/// A source port reused before the reader has seen the new connection's SYN: the older
/// connection's client must not be given to the new one. Two connections from the same port,
/// each with a client of its own, the reader stopped in between: the second keeps its real
/// address (its waits run to their bound, or the reader counts as dead), and once the reader runs
/// again the next one from that port gets its own client.
#[test]
fn reused_port_never_gets_the_older_connections_client() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load_with(&["--accept-wait-us", "200000"]);
    let mut server = CountedServer::start(&mut lab);
    let toa = |ip: [u8; 4], port: u16| {
        let p = port.to_be_bytes();
        [254, 8, p[0], p[1], ip[0], ip[1], ip[2], ip[3]]
    };
    let (first, second) = (toa([203, 0, 113, 7], 4242), toa([198, 51, 100, 9], 80));
    let (_, out) = lab.raw_exchange(8080, 42000, &first);
    assert_eq!(out, answer(CLIENT, CLIENT));
    server.after(1);
    let pid = lab.reader_pid();
    // SAFETY: signals to the reader this test started (its PID from toa status).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (real, out) = lab.raw_exchange(8080, 42000, &second);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(out, answer(&real, &real), "the older connection's client was given to the new one");
    let c = server.after(1);
    // accept() and getpeername() of the first connection found its client once the reader had
    // caught up; the second's ran to their bound (or found the stopped reader dead).
    assert_eq!((c["lookups"], c["found"], c["waits_caught_up"]), (4, 2, 2), "{c:?}");
    assert_eq!(c["waits_timed_out"] + c["no_table"], 2, "{c:?}");
    assert!(eventually(DEADLINE, || lab.status_json()["loaded"] == true));
    let (_, out) = lab.raw_exchange(8080, 42000, &second);
    assert_eq!(out, answer("198.51.100.9:80", "198.51.100.9:80"));
}

/// A table file that someone other than root could have written is not believed: the server
/// keeps the real address and nothing waits. Made root's alone again, it is used.
fn table_others_could_write_is_ignored(mode: u32, uid: u32) {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    std::fs::set_permissions(&lab.table, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(&lab.table, Some(uid), None).unwrap();
    let mut server = CountedServer::start(&mut lab);
    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    let real = probe_source(&err);
    assert_eq!(out, answer(&real, &real));
    let c = server.after(1);
    assert_eq!((c["lookups"], c["no_table"], c["found"], c["waits"]), (2, 2, 0, 0), "{c:?}");

    std::fs::set_permissions(&lab.table, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&lab.table, Some(0), None).unwrap();
    // libtoa tries the table again a second after a failure.
    let client_seen = || lab.probe("198.18.0.1:8080", &["--as", CLIENT]).0 == answer(CLIENT, CLIENT);
    assert!(eventually(DEADLINE, client_seen), "the table was not used once root's alone");
}

#[test]
fn group_writable_table_is_ignored() {
    table_others_could_write_is_ignored(0o620, 0);
}

#[test]
fn table_owned_by_another_user_is_ignored() {
    table_others_could_write_is_ignored(0o600, 65534);
}

/// A program in secure execution (setgid here; setuid and file capabilities alike: AT_SECURE)
/// takes no table path from its caller's environment: libtoa.so, preloaded the one way glibc
/// preloads into such a program (/etc/ld.so.preload, in a mount namespace of the server's own),
/// ignores TOA_TABLE there and keeps the real address. The same program without the setgid bit,
/// started the same way, uses the table TOA_TABLE names.
#[test]
fn secure_execution_ignores_toa_table() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    let work = lab.table.parent().unwrap().join("secure");
    let bin_dir = work.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let mut pids = Vec::new();
    for (port, setgid) in [(8080, false), (8081, true)] {
        let bin = bin_dir.join(format!("peer_echo_{port}"));
        std::fs::copy(example_bin("peer_echo"), &bin).unwrap();
        std::os::unix::fs::chown(&bin, Some(0), Some(if setgid { 65534 } else { 0 })).unwrap();
        let mode = if setgid { 0o2755 } else { 0o755 };
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("{SERVER_V4}:{port}"));
        with_etc_preload(&mut cmd, &work, &libtoa(), &bin_dir);
        // start_server gives it TOA_TABLE (and LD_PRELOAD, which glibc ignores when secure).
        pids.push(lab.start_server(cmd));
    }
    let mapped = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().contains("libtoa.so");
    assert_eq!(pids.iter().map(|&p| (at_secure(p), mapped(p))).collect::<Vec<_>>(), [(Some(0), true), (Some(1), true)]);

    let (out, _) = lab.probe(&format!("{SERVER_V4}:8080"), &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT), "the plain program uses the table TOA_TABLE names");
    let (out, err) = lab.probe(&format!("{SERVER_V4}:8081"), &["--as", CLIENT]);
    let real = probe_source(&err);
    assert_eq!(out, answer(&real, &real), "the setgid program must not take the table from its environment");
}

/// The reader parses what anyone on the network sends: once its socket and table are open it
/// holds no capability at all (bounding set included), can gain none, and may make only its
/// loop's system calls; it still serves, takes a new policy (and port filter), and stops at
/// unload, which removes its table.
#[test]
fn reader_runs_without_privileges() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    let pid = lab.reader_pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim).unwrap_or_default()
    };
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(set), "0000000000000000", "{set} of reader {pid}:\n{status}");
    }
    // /proc shows the flag from 4.10 on (the kernel has had it since 3.5).
    if status.contains("NoNewPrivs:") {
        assert_eq!(field("NoNewPrivs"), "1", "{status}");
    }
    // 2: a seccomp filter (its loop's calls only; what it refuses: toa's unit test).
    assert_eq!(field("Seccomp"), "2", "{status}");

    lab.python_server(SERVER_V4, 8080);
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
    lab.load_with(&["--port", "8080", "--trust", "198.18.0.0/15"]);
    assert_eq!(lab.reader_pid(), pid, "reconfigured in place");
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
    lab.unload();
    let gone = || !Path::new(&format!("/proc/{pid}")).exists();
    assert!(eventually(DEADLINE, gone), "reader {pid} left behind");
    assert!(!lab.table.exists(), "table left behind");
}

/// A reader killed outright (SIGKILL) leaves a heartbeat that still looks fresh: `toa load`
/// sees that its process is gone and starts a new one at once, which serves.
#[test]
fn killed_reader_is_replaced_by_the_next_load() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let pid = lab.reader_pid();
    // SAFETY: SIGKILL to the reader this test started (its PID from toa status).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Gone (or a zombie, where nothing reaps orphans): not loaded, well before its heartbeat
    // goes stale.
    assert!(eventually(DEADLINE, || lab.status_json()["loaded"] == false), "a dead reader still counts as live");
    lab.load();
    assert_ne!(lab.reader_pid(), pid);
    assert_eq!(lab.probe("198.18.0.1:8080", &["--as", CLIENT]).0, answer(CLIENT, CLIENT));
}

/// The readers serving this lab's table (`toa userspace-reader --table PATH`), by PID.
fn readers_of(lab: &Lab) -> Vec<u32> {
    let table = lab.table.to_str().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&&b"userspace-reader"[..]) && args.contains(&table.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Loads started together take turns on the table's lock: all succeed and one reader serves;
/// a load and an unload started together leave one of the two states, never a table without
/// its reader or a reader without its table.
#[test]
fn concurrent_loads_and_unloads_leave_one_state() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    let together = |cmds: Vec<Command>| {
        let children: Vec<_> =
            cmds.into_iter().map(|mut c| c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()).collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    };
    together((0..4).map(|_| lab.load_cmd(&[])).collect());
    assert_eq!(readers_of(&lab).len(), 1, "{:?}", readers_of(&lab));
    lab.python_server(SERVER_V4, 8080);
    assert_eq!(lab.probe("198.18.0.1:8080", &["--as", CLIENT]).0, answer(CLIENT, CLIENT));

    for _ in 0..3 {
        let mut unload = lab.toa();
        unload.arg("unload");
        together(vec![lab.load_cmd(&[]), unload]);
        let loaded = lab.status_json()["loaded"] == true;
        if loaded {
            assert_eq!(readers_of(&lab).len(), 1, "loaded, so one reader");
        } else {
            assert!(!lab.table.exists(), "not loaded, yet a table is left");
            // The reader goes once it has seen its table go.
            assert!(eventually(DEADLINE, || readers_of(&lab).is_empty()), "{:?}", readers_of(&lab));
        }
    }
}

/// The table has a fixed size: more connections than slots evict the oldest, and entries go
/// when their time is up.
#[test]
fn table_is_bounded_and_entries_expire() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load_with(&["--table-entries", "64", "--entry-ttl", "2", "--search-secs", "1"]);
    assert_eq!(lab.status_json()["userspace"]["capacity"], 64);
    let size = std::fs::metadata(&lab.table).unwrap().len();
    lab.python_server(SERVER_V4, 8080);
    let n = 300;
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", "203.0.113.7:10000", "--count", &n.to_string()]);
    // Each connection was answered with its own client while it was open.
    for (i, line) in out.lines().enumerate() {
        let client = format!("203.0.113.7:{}", 10000 + i);
        assert_eq!(format!("{line}\n"), answer(&client, &client), "connection {i}");
    }
    let stats = lab.stats();
    assert!(stats["table_evicted"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(std::fs::metadata(&lab.table).unwrap().len(), size, "the file never grows");
    assert!(eventually(DEADLINE, || lab.stats()["table_entries"] == 0), "entries did not expire: {}", lab.stats());
}

#[test]
fn bad_input_fails_clearly_and_starts_nothing() {
    let lab = Lab::with_mode(Mode::Userspace);
    // --cgroup is the eBPF mode's.
    let out = lab.load_cmd(&["--cgroup", "/sys/fs/cgroup"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cgroup applies to the eBPF mode only"));
    assert!(!lab.table.exists());
    // UDP is the eBPF mode's.
    let out = lab.load_cmd(&["--udp"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--udp needs the eBPF mode") && err.contains("drop --udp"), "{err}");
    assert!(!lab.table.exists());
    // Values out of range.
    for args in [["--table-entries", "0"], ["--accept-wait-us", "5000000"], ["--entry-ttl", "0"]] {
        let out = lab.load_cmd(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(args[0]), "{args:?}");
        assert!(!lab.table.exists());
    }
    // A file in the way that is not a table.
    std::fs::create_dir_all(lab.table.parent().unwrap()).unwrap();
    std::fs::write(&lab.table, b"not a table").unwrap();
    let out = lab.load_cmd(&[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a toa table of this version: remove it"), "{err}");
    std::fs::remove_file(&lab.table).unwrap();
    // Not root.
    let out = lab.toa_as_nobody(&["load", "--mode", "userspace"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as root"));
    assert!(!lab.table.exists());
}

/// A process in another network namespace never uses the table: the same 4-tuple there is
/// another connection.
#[test]
fn another_namespace_does_not_use_the_table() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    // The reader runs in the client namespace; the server (preloaded) in the server namespace.
    let mut cmd = lab.toa();
    cmd.args(["load", "--mode", "userspace"]);
    in_netns_and_cgroup(&mut cmd, &lab.netns_path(&lab.client_ns), None);
    run(&mut cmd);
    lab.python_server(SERVER_V4, 8080);
    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    let real = probe_source(&err);
    assert_eq!(out, answer(&real, &real));
}

/// libtoa.so loads into processes linked against any glibc: its only C library symbol is
/// `__errno_location` (plus the weak ones every shared object's start files reference).
#[test]
fn libtoa_asks_the_c_library_for_errno_only() {
    let out = run(Command::new("objdump").arg("-T").arg(libtoa()));
    let text = String::from_utf8_lossy(&out.stdout);
    let undefined: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("*UND*") && !l.contains(" w "))
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(undefined, ["__errno_location"], "{text}");
    let mut exported: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" g ") && l.contains(".text"))
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    exported.sort();
    assert_eq!(exported, ["accept", "accept4", "getpeername", "toa_libtoa_counter"], "{text}");
    assert!(!text.contains("GLIBC_"), "no versioned symbol: {text}");
}

/// Whether process `pid` holds no capability and runs under a seccomp filter.
fn confined(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim);
    field("CapEff") == Some("0000000000000000")
        && field("CapPrm") == Some("0000000000000000")
        && field("Seccomp") == Some("2")
}

/// `toa run --mode userspace`: the reader is a confined process of its own, as `toa load`
/// starts it; metrics from the table, SIGHUP takes a new policy, SIGTERM removes the table.
#[test]
fn run_as_a_service_in_userspace_mode() {
    const PORT: u16 = 9431;
    let mut lab = Lab::with_mode(Mode::Userspace);
    let dir = std::env::temp_dir().join(format!("{}-config", lab.name));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("toa.toml");
    std::fs::write(&config, "mode = \"userspace\"\naccept_wait_us = 20000\n").unwrap();
    let mut service = lab.start_service(PORT, &["--config", config.to_str().unwrap()]);
    lab.python_server(SERVER_V4, 8080);
    let status = lab.status_json();
    assert_eq!(status["mode"], "userspace");
    assert_eq!(status["userspace"]["tuning"]["accept_wait_us"], 20000);
    let reader = lab.reader_pid();
    assert_ne!(reader, service.pid());
    assert!(confined(reader), "the service's reader {reader} is not confined");

    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT, "--count", "3"]);
    assert_eq!(out.lines().count(), 3);
    assert!(out.lines().all(|l| l.starts_with("accept=203.0.113.7:")), "{out}");
    let (code, body) = lab.http_get(PORT, "/metrics").unwrap();
    assert_eq!(code, 200);
    let metric =
        |name: &str| body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<u64>().ok());
    assert_eq!(metric("toa_loaded"), Some(1), "{body}");
    assert_eq!(metric("toa_syn_recv_sock_toa_total"), Some(3), "{body}");
    assert!(metric("toa_table_packets_total").unwrap() >= 6, "{body}");
    // A level, not a count: the table's live entries are a gauge.
    assert!(body.contains("# TYPE toa_table_entries gauge\n"), "{body}");

    // SIGHUP: only the balancer's range is trusted now.
    std::fs::write(&config, "mode = \"userspace\"\ntrust = [\"100.125.0.0/16\"]\n").unwrap();
    service.signal(libc::SIGHUP);
    assert!(eventually(DEADLINE, || lab.status_json()["spoofable"] == false));
    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    let real = probe_source(&err);
    assert_eq!(out, answer(&real, &real));

    let (ok, stderr) = service.stop();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("toa loaded (userspace mode)"), "{stderr}");
    assert!(stderr.contains("toa unloaded"), "{stderr}");
    assert!(!lab.table.exists(), "SIGTERM must remove the table");
    assert!(eventually(DEADLINE, || !Path::new(&format!("/proc/{reader}")).exists()), "reader {reader} left behind");
    let _ = std::fs::remove_dir_all(dir);
}

/// `toa run --keep-loaded` in userspace mode: stopped, it leaves its reader serving (an open
/// connection and new ones keep their client while no service runs), and the next start adopts
/// that reader, table and entries; stopped without keep_loaded, it removes both.
#[test]
fn keep_loaded_restart_keeps_the_userspace_reader() {
    const PORT: u16 = 9432;
    let mut lab = Lab::with_mode(Mode::Userspace);
    let mut first = lab.start_service(PORT, &["--mode", "userspace", "--keep-loaded"]);
    lab.python_server(SERVER_V4, 8080);
    let reader = lab.reader_pid();
    let mut conn = LiveConn::open(&lab, "198.18.0.1:8080");
    let expected = answer(CLIENT, CLIENT);
    assert_eq!(conn.ask(), expected);

    let (ok, stderr) = first.stop();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("toa stays loaded"), "{stderr}");
    assert_eq!(lab.reader_pid(), reader, "keep_loaded must leave the reader");
    assert_eq!(conn.ask(), expected, "while no service runs");
    assert_eq!(lab.probe("198.18.0.1:8080", &["--as", CLIENT]).0, expected, "a new connection, no service");

    let mut second = lab.start_service(PORT, &["--mode", "userspace"]);
    assert_eq!(lab.reader_pid(), reader, "the restart adopts the reader");
    assert_eq!(conn.ask(), expected, "after the restart");
    conn.close();
    let (ok, stderr) = second.stop();
    assert!(ok, "{stderr}");
    assert!(!lab.table.exists(), "SIGTERM without keep_loaded must remove the table");
    assert!(eventually(DEADLINE, || !Path::new(&format!("/proc/{reader}")).exists()), "reader {reader} left behind");
}

/// Where the kernel's writer is missing (before 5.10), the probe speaks TCP itself from the
/// balancer's address: the same answers, on every kernel, for both families and every segment.
#[test]
fn probe_speaks_tcp_itself_from_the_balancer_address() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    lab.python_server("::", 8080);
    for (target, from, client) in [("198.18.0.1:8080", BALANCER_V4, CLIENT), ("[fd00::1]:8080", BALANCER_V6, CLIENT6)] {
        for on in ["ack", "data"] {
            let (out, err) = lab.probe(target, &["--from", from, "--as", client, "--on", on, "--count", "3"]);
            let sources: Vec<&str> = err.lines().filter_map(|l| l.strip_prefix("toa probe: from ")).collect();
            assert_eq!(sources.len(), 3, "{err}");
            assert!(sources.iter().all(|s| s.starts_with(&from.replace("fd00::3", "[fd00::3]"))), "{err}");
            let (ip, port) = client.rsplit_once(':').unwrap();
            let port: u16 = port.parse().unwrap();
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 3, "{out}");
            for (i, (line, source)) in lines.iter().zip(&sources).enumerate() {
                // An IPv4 client on the dual-stack listener is IPv4-mapped.
                let mapped = |a: &str| match a.rsplit_once(':') {
                    Some((h, p)) if !h.starts_with('[') => format!("[::ffff:{h}]:{p}"),
                    _ => a.to_owned(),
                };
                let c = mapped(&format!("{ip}:{}", port + i as u16));
                let real = mapped(source.split_whitespace().next().unwrap());
                let (accepted, peer) = line.strip_prefix("accept=").unwrap().split_once(" peer=").unwrap();
                assert_eq!(peer, c, "on {on}: {out}");
                // An option on the data segment may come after accept() returned (as with the
                // kernel's writer): accept() then shows the balancer.
                assert!(accepted == c || (on == "data" && accepted == real), "on {on}: {out}");
            }
        }
    }
}

/// `toa conns` in userspace mode: the open connection, its client, and the preloaded process.
#[test]
fn conns_lists_the_connections_the_table_knows() {
    let mut lab = Lab::with_mode(Mode::Userspace);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let mut conn = LiveConn::open(&lab, "198.18.0.1:8080");
    assert_eq!(conn.ask(), answer(CLIENT, CLIENT));
    let conns = lab.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["client"], CLIENT);
    assert_eq!(conns[0]["local"], "198.18.0.1:8080");
    assert!(conns[0]["balancer"].as_str().unwrap().starts_with(&format!("{}:", probe_sources().0)));
    assert_eq!(conns[0]["state"], "ESTAB");
    assert!(conns[0]["process"].as_str().unwrap().starts_with("python"), "{conns:?}");
    conn.close();
}
