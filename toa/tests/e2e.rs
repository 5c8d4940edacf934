//! End to end: the real agent in the kernel, real servers that know nothing of TOA, and
//! `toa probe` playing the load balancer from another network namespace. Run as root.

use toa_lab as support;

use support::*;

// The cases every mode must pass.
in_both_modes!(
    ipv4_client_reaches_python_and_rust_servers,
    ipv6_client_reaches_ipv6_listeners,
    ipv4_client_on_dual_stack_listener_is_v4_mapped,
    option_on_first_data_segment,
    option_after_the_next_segment,
    connection_without_option_keeps_its_address,
    port_63881_is_read_as_a_port,
    malformed_options_keep_the_real_address,
    malformed_option_lists_from_a_raw_client,
    several_options_first_valid_wins,
    full_forty_byte_option_area,
    many_connections_each_get_their_own_client,
    unload_restores_addresses_and_leaves_nothing,
    load_twice_is_harmless,
    second_writer_waits_then_names_the_holder,
    random_option_areas_match_the_reference,
);

/// The same address as an IPv6 socket shows it.
fn mapped(v4: &str) -> String {
    let (ip, port) = v4.rsplit_once(':').unwrap();
    format!("[::ffff:{ip}]:{port}")
}

fn toa4(ip: [u8; 4], port: u16) -> Vec<u8> {
    let p = port.to_be_bytes();
    vec![254, 8, p[0], p[1], ip[0], ip[1], ip[2], ip[3]]
}

fn ipv4_client_reaches_python_and_rust_servers(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    lab.rust_server("198.18.0.1:8081");
    for port in [8080, 8081] {
        let (out, _) = lab.probe(&format!("{SERVER_V4}:{port}"), &["--as", CLIENT]);
        assert_eq!(out, answer(CLIENT, CLIENT), "server on port {port}");
    }
}

fn ipv6_client_reaches_ipv6_listeners(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V6, 8080);
    lab.rust_server("[fd00::1]:8081");
    for port in [8080, 8081] {
        let (out, _) = lab.probe(&format!("[{SERVER_V6}]:{port}"), &["--as", CLIENT6]);
        assert_eq!(out, answer(CLIENT6, CLIENT6), "server on port {port}");
    }
}

fn ipv4_client_on_dual_stack_listener_is_v4_mapped(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server("::", 8080);
    lab.rust_server("[::]:8081");
    let expected = mapped(CLIENT);
    for port in [8080, 8081] {
        let (out, _) = lab.probe(&format!("{SERVER_V4}:{port}"), &["--as", CLIENT]);
        assert_eq!(out, answer(&expected, &expected), "server on port {port}");
    }
}

fn option_on_first_data_segment(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT, "--on", "data"]);
    // accept() shows the balancer if it returned before the data segment arrived, the client if
    // the server was slower than the network (a race in the kernel, not in toa). After the first
    // read, getpeername() always shows the client.
    let real = probe_source(&err);
    assert!(out == answer(&real, CLIENT) || out == answer(CLIENT, CLIENT), "{out:?} (real address {real})");
    assert_eq!(lab.stats()["data_segment_toa"], 1);
}

/// The search after the handshake ACK: the next segment is read whatever it carries (a TOA for
/// port 63881 too, which the kernel takes for Fast Open); after it, the kernel hands over only
/// segments with options it does not know, and a TOA is one.
fn option_after_the_next_segment(mode: Mode) {
    use toa_lab::raw_tcp::{Areas, MSS_ONLY};
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let nops = vec![1, 1, 1, 1];
    let cases = [
        ("TOA for port 63881 on the data segment", vec![], "203.0.113.7:63881"),
        ("TOA on the data segment after a pure ACK with options", vec![nops.clone()], CLIENT),
        ("TOA after two pure ACKs with options", vec![nops.clone(), nops], CLIENT),
    ];
    for (i, (what, between, client)) in cases.iter().enumerate() {
        let port: u16 = client.rsplit(':').next().unwrap().parse().unwrap();
        let data = [vec![1, 1, 1, 1], toa4([203, 0, 113, 7], port)].concat();
        let areas = Areas { syn: MSS_ONLY.to_vec(), ack: vec![], between: between.clone(), data };
        let sport = 41000 + i as u16;
        let real = format!("{}:{sport}", toa_lab::raw_tcp::SPOOFED);
        let reply = lab.raw_exchanges(8080, vec![(sport, areas)]).remove(0);
        // accept() may return before the data segment is in (see option_on_first_data_segment).
        assert!(reply == answer(&real, client) || reply == answer(client, client), "{what}: {reply:?}");
    }
    let stats = lab.stats();
    assert_eq!(stats["data_segment_toa"], 3, "{stats}");
    if mode == Mode::Ebpf {
        // Two connections had a segment without a TOA after the handshake ACK.
        assert_eq!(stats["search_gave_up"], 2, "{stats}");
    }
}

fn connection_without_option_keeps_its_address(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    // The userspace reader counts a connection without an option when its search ends.
    if mode == Mode::Userspace {
        lab.load_with(&["--search-secs", "1"]);
    } else {
        lab.load();
    }
    lab.python_server(SERVER_V4, 8080);
    let (local, reply) = lab.plain_exchange("198.18.0.1:8080");
    assert_eq!(reply, answer(&local, &local));
    assert!(eventually(DEADLINE, || lab.stats()["syn_recv_sock_no_toa"] == 1), "{}", lab.stats());
    let stats = lab.stats();
    assert_eq!(stats["syn_recv_sock_toa"], 0);
    assert_eq!(stats["getname_toa_ok"], 0);
}

fn port_63881_is_read_as_a_port(mode: Mode) {
    // 0xF989 is what the kernel takes for a Fast Open option in kind 254; a TOA parser must not.
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let client = "203.0.113.7:63881";
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", client]);
    assert_eq!(out, answer(client, client));
}

/// Each malformed shape the kernel lets a sender write: the real address must stay. (The
/// kernel's writer refuses EOL, lengths below 2 and lengths past the area: the hand-written client
/// of `malformed_option_lists_from_a_raw_client` sends those.)
fn malformed_options_keep_the_real_address(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let ip = [203, 0, 113, 7];
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("TOA of length 6", vec![vec![254, 6, 0x10, 0x92, 203, 0]]),
        ("TOA of length 10", vec![vec![254, 10, 0x10, 0x92, 203, 0, 113, 7, 0, 0]]),
        ("TOA of length 4", vec![vec![254, 4, 0x10, 0x92]]),
        ("TOA inside another option", vec![[vec![30, 10], toa4(ip, 4242)].concat()]),
        ("IPv4 TOA under kind 253", vec![[vec![253, 8], toa4(ip, 4242)[2..].to_vec()].concat()]),
    ];
    for (what, options) in cases {
        let mut args = vec![];
        for o in &options {
            args.push("--raw-option".to_owned());
            args.push(hex(o));
        }
        args.extend(["--as".to_owned(), CLIENT.to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, err) = lab.probe("198.18.0.1:8080", &args);
        let real = probe_source(&err);
        assert_eq!(out, answer(&real, &real), "{what}");
    }
    let stats = lab.stats();
    assert_eq!(stats["syn_recv_sock_toa"], 0);
    assert_eq!(stats["getname_toa_ok"], 0);
    // Only the three wrong lengths are malformed TOAs; a TOA hidden inside another option and
    // kind 253 are well-formed lists without a (classic) TOA. The reader's filter passes only
    // option areas that can hold a TOA (8 bytes or more): the 4-byte one reaches it only beside
    // the timestamps the kernel's writer adds, not from the probe's own TCP (before 5.10).
    let expected = if mode == Mode::Userspace && !kernel_has_writer() { 2 } else { 3 };
    assert_eq!(stats["option_malformed"], expected);
}

/// The shapes the kernel's option writer refuses to send, from a hand-written client: the real
/// address must stay, and the same client with a well-formed TOA shows it is really read.
fn malformed_option_lists_from_a_raw_client(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let toa = [254, 8, 0x10, 0x92, 203, 0, 113, 7];
    // Control: a well-formed TOA from the same hand-written client.
    let (_, out) = lab.raw_exchange(8080, 40000, &toa);
    assert_eq!(out, answer(CLIENT, CLIENT));
    let cases: [(&str, Vec<u8>); 4] = [
        ("length below 2", vec![254, 1, 0x10, 0x92]),
        ("length 0", vec![254, 0, 0x10, 0x92]),
        ("length running past the area", vec![1, 1, 254, 8]),
        ("TOA after end-of-list", [&[0u8, 1, 1, 1][..], &toa].concat()),
    ];
    for (i, (what, options)) in cases.into_iter().enumerate() {
        let (real, out) = lab.raw_exchange(8080, 40001 + i as u16, &options);
        assert_eq!(out, answer(&real, &real), "{what}");
    }
    let stats = lab.stats();
    assert_eq!(stats["syn_recv_sock_toa"], 1, "only the control");
    // Three broken lists (EOL ends a list properly: not malformed). The userspace reader's
    // capture filter never lets through the three 4-byte areas (no TOA fits in them).
    assert_eq!(stats["option_malformed"], if mode == Mode::Ebpf { 3 } else { 0 });
}

fn several_options_first_valid_wins(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let first = toa4([203, 0, 113, 7], 4242);
    let second = toa4([198, 51, 100, 9], 80);
    let (out, _) =
        lab.probe("198.18.0.1:8080", &["--raw-option", &hex(&first), "--raw-option", &hex(&second), "--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
    // A TOA of a wrong length is skipped; the valid one after it counts.
    let bad = vec![254, 6, 0x01, 0xbb, 10, 0];
    let (out, _) =
        lab.probe("198.18.0.1:8080", &["--raw-option", &hex(&bad), "--raw-option", &hex(&first), "--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
}

fn full_forty_byte_option_area(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    // Without timestamps the ACK carries only our options: 20 bytes of another option and an
    // IPv6 TOA fill the 40-byte area exactly, the TOA in its last 20 bytes.
    // (The probe's own TCP, before 5.10, sends no timestamps; nor has the knob a namespace there.)
    if kernel_has_writer() {
        lab.in_client_ns(|| std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", "0").unwrap());
    }
    lab.load();
    lab.python_server("::", 8080);
    let mut filler = vec![30, 20];
    filler.resize(20, 0xaa);
    let toa6 = {
        let mut o = vec![254, 20, 0x10, 0x92];
        o.extend("2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        o
    };
    let (out, _) =
        lab.probe("[fd00::1]:8080", &["--raw-option", &hex(&filler), "--raw-option", &hex(&toa6), "--as", CLIENT6]);
    assert_eq!(out, answer(CLIENT6, CLIENT6));
}

fn many_connections_each_get_their_own_client(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.rust_server("198.18.0.1:8080");
    let n = 200u16;
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", "203.0.113.7:10000", "--count", &n.to_string()]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), n as usize);
    for (i, line) in lines.iter().enumerate() {
        let client = format!("203.0.113.7:{}", 10000 + i);
        assert_eq!(format!("{line}\n"), answer(&client, &client), "connection {i}");
    }
    let stats = lab.stats();
    assert_eq!(stats["syn_recv_sock_toa"], u64::from(n));
    if mode == Mode::Ebpf {
        // libtoa.so cannot count (it maps the table read-only).
        assert_eq!(stats["getname_toa_ok"], 2 * u64::from(n));
    }
}

fn unload_restores_addresses_and_leaves_nothing(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
    // A config file that is not there: a clear error, and nothing unloaded.
    let out = lab.toa().args(["unload", "--config", "/nonexistent/toa.toml"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/toa.toml") && err.contains("fix --config"), "{err}");
    assert_eq!(lab.status_json()["loaded"], true);

    if mode == Mode::Ebpf {
        let status = lab.status_json();
        let ids: Vec<u64> = status["programs"].as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
        assert_eq!(ids.len(), 6);
        let attached = cgroup_attachments(&lab.cgroup);
        assert!(has_program(&attached, &status, "sock_ops", "toa_sock_ops"), "{attached}");

        let out = lab.unload_by_config();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "toa unloaded\n");
        assert!(!lab.pin_dir.exists(), "pins left behind");
        assert!(eventually(DEADLINE, || ids.iter().all(|id| !program_exists(*id))), "programs still loaded: {ids:?}");
        // The lab's cgroup only ever holds toa's programs.
        let attached = cgroup_attachments(&lab.cgroup);
        assert!(attached.is_empty(), "still attached: {attached}");
    } else {
        let pid = lab.reader_pid();
        let out = lab.unload_by_config();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "toa unloaded (userspace mode)\n");
        assert!(!lab.table.exists(), "table left behind");
        // Gone once its new parent (init) has reaped it.
        let gone = || !std::path::Path::new(&format!("/proc/{pid}")).exists();
        assert!(eventually(DEADLINE, gone), "reader {pid} still there");
    }
    assert_eq!(lab.status_json()["loaded"], false);

    let (out, err) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    let real = probe_source(&err);
    assert_eq!(out, answer(&real, &real));
    // Unloading again is harmless.
    assert_eq!(String::from_utf8_lossy(&lab.unload().stdout), "toa was not loaded; nothing to do\n");
}

fn load_twice_is_harmless(mode: Mode) {
    let mut lab = Lab::with_mode(mode);
    lab.load();
    let before = lab.status_json();
    let out = lab.load();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(lab.status_json(), before);
    match mode {
        Mode::Ebpf => {
            assert!(said.starts_with("toa was already loaded; nothing changed"), "{said}");
            let attached = cgroup_attachments(&lab.cgroup);
            assert_eq!(attached.lines().filter(|l| l.starts_with("sock_ops ")).count(), 1, "{attached}");
        }
        Mode::Userspace => {
            // The same reader goes on (its PID is in the status compared above).
            assert!(said.starts_with("toa was already loaded in userspace mode; policy updated"), "{said}");
        }
    }
    lab.python_server(SERVER_V4, 8080);
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
}

#[test]
fn status_names_the_cgroup_and_programs() {
    let lab = Lab::new();
    assert_eq!(lab.status_json()["loaded"], false);
    lab.load();
    let status = lab.status_json();
    assert_eq!(status["loaded"], true);
    assert_eq!(status["cgroup"], lab.cgroup.to_str().unwrap());
    let names: Vec<&str> = status["programs"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["toa_sock_ops", "toa_getpeer4", "toa_getpeer6", "toa_getsock4", "toa_getsock6", "toa_getsockopt"]
    );
    // Without --trust, status says plainly that anyone may claim any address.
    assert_eq!(status["spoofable"], true);
    assert_eq!(status["policy"]["kinds"], serde_json::json!([254]));
}

/// Live-path fuzzing: connections whose SYN, handshake ACK and first data segment carry random
/// option areas (`toa_lab::option_areas`), through the kernel and the verified programs (or the
/// reader and libtoa.so). Each answer must be what the reference parser predicts: its client,
/// or the real address where it finds none. The policy reads the ACK and the data segment, so
/// whatever the SYN carries (TOAs, broken lists) must change nothing. The counters must add up, and the kernel log must
/// stay free of warnings. `TOA_LIVE_FUZZ` connections (200; `cargo xtask fuzz --live` runs
/// 100 000), from seed `TOA_LIVE_FUZZ_SEED` (1), printed with any failure to replay it.
fn random_option_areas_match_the_reference(mode: Mode) {
    use toa_common::Parsed;
    use toa_lab::option_areas::{area, expected, syn_area, Rng};
    use toa_lab::raw_tcp::Areas;
    let env = |name: &str, default: u64| std::env::var(name).map_or(default, |v| v.parse().expect(name));
    let (n, seed) = (env("TOA_LIVE_FUZZ", 200), env("TOA_LIVE_FUZZ_SEED", 1));
    let mut lab = Lab::with_mode(mode);
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let mut log = KernelLog::from_now();
    let cfg = toa_common::AgentConfig::classic();
    let mut rng = Rng::new(seed);
    let (mut on_ack, mut on_data, mut malformed) = (0u64, 0u64, 0u64);
    let mut done = 0;
    while done < n {
        // In batches: one thread in the client namespace each; source ports cycle through
        // 20000-59999 (each connection ends with a reset, so a port is free again).
        let batch: Vec<(u16, Areas)> = (done..n.min(done + 1000))
            .map(|i| {
                let areas =
                    Areas { syn: syn_area(&mut rng), ack: area(&mut rng), between: Vec::new(), data: area(&mut rng) };
                (20_000 + (i % 40_000) as u16, areas)
            })
            .collect();
        let replies = lab.raw_exchanges(8080, batch.clone());
        for (k, ((sport, areas), reply)) in batch.iter().zip(replies).enumerate() {
            let Areas { syn, ack, data, .. } = areas;
            let real = format!("198.18.0.3:{sport}");
            let ((ack_client, ack_parsed), (data_client, data_parsed)) = (expected(ack, &cfg), expected(data, &cfg));
            let ack_found = matches!(ack_parsed, Parsed::Found(_));
            let ok = if ack_found {
                let shown = ack_client.clone().unwrap_or_else(|| real.clone());
                reply == answer(&shown, &shown)
            } else if matches!(data_parsed, Parsed::Found(_)) {
                // accept() may return before the data segment is in (see option_on_first_data_segment).
                let shown = data_client.clone().unwrap_or_else(|| real.clone());
                reply == answer(&real, &shown) || reply == answer(&shown, &shown)
            } else {
                reply == answer(&real, &real)
            };
            assert!(
                ok,
                "seed {seed}, connection {}: SYN options {syn:02x?}, ACK options {ack:02x?} ({ack_parsed:?}), \
                 data options {data:02x?} ({data_parsed:?}): the server answered {reply:?}",
                done + k as u64
            );
            on_ack += u64::from(ack_found);
            on_data += u64::from(!ack_found && matches!(data_parsed, Parsed::Found(_)));
            malformed +=
                u64::from(ack_parsed == Parsed::Malformed) + u64::from(!ack_found && data_parsed == Parsed::Malformed);
        }
        done += batch.len() as u64;
    }
    let stats = lab.stats();
    assert_eq!(stats["syn_recv_sock_toa"], on_ack, "seed {seed}: {stats}");
    assert_eq!(stats["data_segment_toa"], on_data, "seed {seed}: {stats}");
    if mode == Mode::Ebpf {
        // Every connection is counted once at the handshake, and each malformed area the
        // program parsed once. (The reader counts connections without a client when their
        // search time is up, and sees only the areas its capture filter passes.)
        assert_eq!(stats["syn_recv_sock_no_toa"], n - on_ack, "seed {seed}: {stats}");
        assert_eq!(stats["option_malformed"], malformed, "seed {seed}: {stats}");
    }
    assert!(on_ack > 0 && on_data > 0 && malformed > 0, "seed {seed}: too few cases of each kind");
    let warnings = log.warnings();
    assert!(warnings.is_empty(), "the kernel warned: {warnings:?}");
}

/// A command that finds another one changing toa (here: this test, holding the lock) waits,
/// says whom it waits for, and gives up after `TOA_LOCK_WAIT` naming it, having changed nothing.
/// Once the lock is free, a waiting command goes on.
fn second_writer_waits_then_names_the_holder(mode: Mode) {
    use std::{io::BufRead as _, os::fd::AsRawFd as _, process::Stdio};
    let lab = Lab::with_mode(mode);
    lab.load();
    let dir = match mode {
        Mode::Ebpf => lab.pin_dir.clone(),
        Mode::Userspace => lab.table.parent().unwrap().to_owned(),
    };
    let held = std::fs::File::open(&dir).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let me = format!("pid {} (", std::process::id());

    let out = lab.toa().env("TOA_LOCK_WAIT", "1").arg("unload").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&me) && stderr.contains("TOA_LOCK_WAIT"), "{stderr}");
    assert_eq!(lab.status_json()["loaded"], true, "nothing changed");
    let out = lab.toa().env("TOA_LOCK_WAIT", "soon").arg("unload").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOA_LOCK_WAIT=\"soon\": not a number"));

    let mut unload = lab.toa().arg("unload").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = std::io::BufReader::new(unload.stderr.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    let waiting = rx.recv_timeout(DEADLINE).expect("no word from the waiting unload");
    assert!(waiting.contains(&format!("waiting for {me}")) && waiting.contains(dir.to_str().unwrap()), "{waiting}");
    drop(held);
    let out = unload.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("toa unloaded"));
    assert_eq!(lab.status_json()["loaded"], false);
}

/// Loads and unloads started together take turns (the pin directory's lock): one load attaches,
/// the others find it loaded, one program sits on each hook, and one unload removes everything.
#[test]
fn concurrent_loads_and_unloads_take_turns() {
    let mut lab = Lab::new();
    let run_together = |cmds: Vec<std::process::Command>| -> Vec<String> {
        let children: Vec<_> = cmds
            .into_iter()
            .map(|mut c| c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap())
            .collect();
        children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
                text
            })
            .collect()
    };
    let said = run_together((0..4).map(|_| lab.load_cmd(&[])).collect());
    // Each output holds stdout and stderr: a load that waited says so first, whom it waited for.
    let says = |s: &String, what: &str| s.lines().any(|l| l.starts_with(what));
    let loaded = said.iter().filter(|s| says(s, "toa loaded in ")).count();
    let already = said.iter().filter(|s| says(s, "toa was already loaded; nothing changed")).count();
    assert_eq!((loaded, already), (1, 3), "{said:?}");
    let attached = cgroup_attachments(&lab.cgroup);
    // One program on each hook of the TCP path, none on the UDP path's (off without --udp).
    for hook in toa::hooks::HOOKS {
        let expected = usize::from(hook.path == toa::hooks::Path::Tcp);
        let on_hook = attached.lines().filter(|l| l.starts_with(&format!("{} ", hook.label))).count();
        assert_eq!(on_hook, expected, "{}: {attached}", hook.label);
    }
    lab.python_server(SERVER_V4, 8080);
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));

    let unload = || {
        let mut cmd = lab.toa();
        cmd.arg("unload");
        cmd
    };
    let said = run_together(vec![unload(), unload()]);
    let mut said: Vec<&str> = said.iter().map(|s| s.trim_end()).collect();
    said.sort();
    assert_eq!(said, ["toa unloaded", "toa was not loaded; nothing to do"]);
    assert!(!lab.pin_dir.exists());
    assert_eq!(cgroup_attachments(&lab.cgroup), "", "nothing attached");
}

/// On a host where nothing is mounted at /sys/fs/bpf, toa commands started together mount one
/// bpffs, not one each: stacked instances would each hold their own pins and locks (what the
/// guests, which mount no bpffs, showed). Run in a private mount namespace whose /sys/fs/bpf is
/// a fresh tmpfs, so the host's bpffs is never touched.
#[test]
fn concurrent_loads_mount_one_bpffs() {
    let lab = Lab::new();
    assert_eq!(lab.pin_dir.parent(), Some(std::path::Path::new("/sys/fs/bpf")));
    let script = r#"
        bpffs() { grep -c '^[^ ]* /sys/fs/bpf bpf ' /proc/self/mounts; }
        before=$(bpffs)
        mount -t tmpfs toa-test /sys/fs/bpf || exit 9
        for i in 1 2 3 4; do "$0" load --cgroup "$1" > "$2.$i" 2>&1 & done
        wait
        echo $(( $(bpffs) - before ))
        "$0" unload > /dev/null
    "#;
    let dir = lab.table.parent().expect("the lab's directory");
    std::fs::create_dir_all(dir).unwrap();
    let prefix = dir.join("load");
    let mut cmd = std::process::Command::new("unshare");
    cmd.env("TOA_PIN_DIR", &lab.pin_dir)
        .env("TOA_TABLE", &lab.table)
        .args(["-m", "--propagation", "private", "sh", "-c", script])
        .arg(toa_bin())
        .arg(&lab.cgroup)
        .arg(&prefix);
    let out = run(&mut cmd);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "bpffs instances the loads mounted");
    let said: Vec<String> =
        (1..=4).map(|i| std::fs::read_to_string(format!("{}.{i}", prefix.display())).unwrap()).collect();
    // Each output holds stdout and stderr: a load that waited says so first, whom it waited for.
    let says = |s: &String, what: &str| s.lines().any(|l| l.starts_with(what));
    let loaded = said.iter().filter(|s| says(s, "toa loaded in ")).count();
    let already = said.iter().filter(|s| says(s, "toa was already loaded; nothing changed")).count();
    assert_eq!((loaded, already), (1, 3), "{said:?}");
}

#[test]
fn bad_input_fails_clearly_and_attaches_nothing() {
    let lab = Lab::new();
    // A cgroup that does not exist.
    let out = lab.toa().args(["load", "--cgroup", "/sys/fs/cgroup/no-such-toa-cgroup"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cgroup /sys/fs/cgroup/no-such-toa-cgroup: not a cgroup v2 directory"), "{err}");
    assert!(!lab.pin_dir.exists());

    // A pin directory outside bpffs.
    let out = lab
        .toa()
        .args(["load", "--cgroup"])
        .arg(&lab.cgroup)
        .args(["--pin-dir", "/tmp/toa-not-bpffs/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not on a bpffs mount"), "{err}");
    assert_eq!(cgroup_attachments(&lab.cgroup), "", "nothing attached");

    // Not root.
    let out = lab.toa_as_nobody(&["load", "--cgroup", lab.cgroup.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        "toa: error: toa load must run as root (it loads eBPF programs into the kernel): run it with sudo\n"
    );
    assert!(!lab.pin_dir.exists());
    assert_eq!(cgroup_attachments(&lab.cgroup), "", "nothing attached");

    // A probe option whose length byte lies.
    let out = lab.probe_cmd("198.18.0.1:8080", &["--as", CLIENT, "--raw-option", "fe0800"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("its second byte must be its length"));
}

#[test]
fn probe_leaves_nothing_behind() {
    let mut lab = Lab::new();
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    let child =
        lab.probe_cmd("198.18.0.1:8080", &["--as", CLIENT]).stdout(std::process::Stdio::null()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    // Its cgroup (named after its PID) is gone, and with it the writer attached there.
    assert!(!cgroup2_mount().join(format!("toa-probe-{pid}")).exists());
}
