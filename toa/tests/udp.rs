//! The UDP path, end to end (eBPF mode): a hand-written balancer in the client namespace sends
//! datagrams carrying DPVS's UOA in their IPv4 options to an unmodified Python UDP server; the
//! server answers whoever recvfrom() names, and the balancer must get every answer back. Run as
//! root.

use std::{
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    process::Command,
};

use toa_lab as support;

use support::{
    raw_udp::{self, balancer_addr, uoa4, uoa6, Balancer, Balancer6},
    *,
};

const PORT: u16 = 5353;

fn server() -> SocketAddrV4 {
    SocketAddrV4::new(SERVER_V4.parse().unwrap(), PORT)
}

fn client() -> SocketAddrV4 {
    CLIENT.parse().unwrap()
}

fn from_server() -> SocketAddr {
    SocketAddr::V4(server())
}

/// Runs `f` with a balancer bound on the client namespace's address and `port`.
fn with_balancer<T: Send + 'static>(lab: &Lab, port: u16, f: impl FnOnce(&Balancer) -> T + Send + 'static) -> T {
    lab.in_client_ns(move || f(&Balancer::bind(balancer_addr(port)).expect("bind the balancer")))
}

fn udp_server(lab: &mut Lab) {
    lab.script_server("udp_echo.py", SERVER_V4, PORT, &[]);
}

#[test]
fn server_sees_the_client_and_replies_reach_the_balancer() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    udp_server(&mut lab);
    let replies = with_balancer(&lab, 40000, |b| {
        [
            b.ask(server(), &uoa4(client()), "first"),
            // Later datagrams of the flow carry no option (DPVS sends it on the first ones).
            b.ask(server(), &[], "second"),
        ]
    });
    for (reply, data) in replies.iter().zip(["first", "second"]) {
        assert_eq!(reply, &(from_server(), format!("from={CLIENT} data={data}")));
    }
    // Another flow of the same balancer, without an option, keeps its address.
    let other = with_balancer(&lab, 40001, |b| b.ask(server(), &[], "other"));
    assert_eq!(other, (from_server(), format!("from={CLIENT_V4}:40001 data=other")));

    // `toa conns` lists the flow, with the server's process (where the kernel has UDP socket
    // diagnostics: the matrix's own 5.15 build leaves them out).
    if lab.in_server_ns(toa::conns::udp_diag_available) {
        let udp: Vec<_> = lab.conns().into_iter().filter(|c| c["proto"] == "udp").collect();
        assert_eq!(udp.len(), 1, "{udp:?}");
        assert_eq!(udp[0]["client"], CLIENT);
        assert_eq!(udp[0]["balancer"], format!("{CLIENT_V4}:40000"));
        assert_eq!(udp[0]["local"], format!("{SERVER_V4}:{PORT}"));
        assert_eq!(udp[0]["process"], "python3", "{:?}", udp[0]);
    }
    let stats = lab.stats();
    assert_eq!(stats["udp_option"], 1, "{stats}");
    assert_eq!(stats["udp_recv_client"], 2, "{stats}");
    assert_eq!(stats["udp_reply_redirected"], 2, "{stats}");
    let status = lab.status_json();
    assert_eq!(status["policy"]["udp"], true, "{status}");
    assert_eq!(status["programs"].as_array().unwrap().len(), 13, "{status}");

    // Unloading removes the UDP path too: no pin, no program on the cgroup.
    let out = lab.unload();
    assert!(out.status.success());
    assert!(!lab.pin_dir.exists(), "pins left behind");
    let attached = cgroup_attachments(&lab.cgroup);
    assert!(attached.is_empty(), "still attached: {attached}");
}

/// A dual-stack server (bound to `::`) sees an IPv4 client as `::ffff:a.b.c.d`, as the TCP path
/// shows it. An IPv6 client behind an IPv4 balancer is never shown (the reply could not be sent
/// back to the balancer: see toa-ebpf/src/udp.rs), on either kind of socket: the balancer is
/// kept and counted. Replies reach the balancer in every case.
#[test]
fn dual_stack_sockets_and_ipv6_clients() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    lab.script_server("udp_echo.py", "::", PORT, &[]);
    lab.script_server("udp_echo.py", SERVER_V4, PORT + 1, &[]);
    let v4_only = SocketAddrV4::new(SERVER_V4.parse().unwrap(), PORT + 1);
    let client6: std::net::SocketAddrV6 = CLIENT6.parse().unwrap();
    let replies = with_balancer(&lab, 40000, move |b| {
        [
            b.ask(server(), &uoa4(client()), "v4 client"),
            b.another(40001).unwrap().ask(server(), &uoa6(client6), "v6 client"),
            b.another(40002).unwrap().ask(v4_only, &uoa6(client6), "v6 client, v4 socket"),
        ]
    });
    assert_eq!(replies[0], (from_server(), "from=[::ffff:203.0.113.7]:4242 data=v4 client".to_owned()));
    assert_eq!(replies[1], (from_server(), format!("from=[::ffff:{CLIENT_V4}]:40001 data=v6 client")));
    assert_eq!(replies[2], (SocketAddr::V4(v4_only), format!("from={CLIENT_V4}:40002 data=v6 client, v4 socket")));
    let stats = lab.stats();
    assert_eq!(stats["udp_option"], 3, "{stats}");
    assert_eq!(stats["udp_recv_client"], 1, "{stats}");
    assert_eq!(stats["udp_recv_mismatch"], 2, "{stats}");
    assert_eq!(stats["udp_reply_redirected"], 1, "{stats}");
}

/// ByteDance's UOA layouts: types 31 and 30 (client, then the virtual address), and type 29 (with
/// a VNI), each recorded and shown; the IPv6-inside variant is recorded and, its client being
/// IPv6 behind an IPv4 balancer, not shown.
#[test]
fn bytedance_layouts() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    udp_server(&mut lab);
    // Client 203.0.113.7:4242, virtual address 198.51.100.9:53.
    let (p, a, vip) = ([0x10, 0x92], [203, 0, 113, 7], [198, 51, 100, 9]);
    let v1 = move |kind: u8| [&[kind, 16, 0, 0][..], &p, &[0, 53], &a, &vip].concat();
    let v2 = [&[29, 16, 0, 0][..], &[0, 0, 0, 42], &p, &[0, 0], &a].concat();
    let v6_inside = [&[31, 40, 1, 0][..], &p, &[0, 53], &[0x20, 1, 0xd, 0xb8], &[0; 11], &[7], &[0xfd; 16]].concat();
    let replies = with_balancer(&lab, 40000, move |b| {
        let mut replies = Vec::new();
        let cases = [("type 31", v1(31)), ("type 30", v1(30)), ("type 29", v2), ("IPv6 inside", v6_inside)];
        for (i, (what, option)) in cases.into_iter().enumerate() {
            replies.push((what, b.another(40001 + i as u16).unwrap().ask(server(), &option, what)));
        }
        replies
    });
    for (i, (what, reply)) in replies.iter().enumerate() {
        let shown = if *what == "IPv6 inside" { format!("{CLIENT_V4}:{}", 40001 + i) } else { CLIENT.to_owned() };
        assert_eq!(reply, &(from_server(), format!("from={shown} data={what}")), "{what}");
    }
    let stats = lab.stats();
    assert_eq!(stats["udp_option"], 4, "{stats}");
    assert_eq!(stats["udp_recv_client"], 3, "{stats}");
    assert_eq!(stats["udp_recv_mismatch"], 1, "{stats}");
}

/// A server that connects a socket of its own to each client it is shown (IPv4 and dual-stack):
/// the socket is connected to the client's balancer instead, its `send()` reaches the balancer,
/// and `getpeername()` and `recv()` on it show the client.
#[test]
fn sockets_connected_to_a_client() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    lab.script_server("udp_echo.py", SERVER_V4, PORT, &["--connect"]);
    lab.script_server("udp_echo.py", "::", PORT + 1, &["--connect"]);
    let dual = SocketAddrV4::new(SERVER_V4.parse().unwrap(), PORT + 1);
    let replies = with_balancer(&lab, 40000, move |b| {
        let other = b.another(40001).unwrap();
        [
            b.ask(server(), &uoa4(client()), "first"),
            // Arrives on the server's connected socket.
            b.ask(server(), &[], "second"),
            other.ask(dual, &uoa4(client()), "first"),
            other.ask(dual, &[], "second"),
        ]
    });
    let mapped = "[::ffff:203.0.113.7]:4242";
    assert_eq!(replies[0], (from_server(), format!("from={CLIENT} peer={CLIENT} data=first")));
    assert_eq!(replies[1], (from_server(), format!("from={CLIENT} peer={CLIENT} data=second")));
    assert_eq!(replies[2], (SocketAddr::V4(dual), format!("from={mapped} peer={mapped} data=first")));
    assert_eq!(replies[3], (SocketAddr::V4(dual), format!("from={mapped} peer={mapped} data=second")));
    // `toa conns` lists each flow once per socket that holds it (listener and connected), at the
    // server's address: a flow copied at connect() takes the connected socket's own.
    if lab.in_server_ns(toa::conns::udp_diag_available) {
        let mut udp: Vec<_> = lab
            .conns()
            .into_iter()
            .filter(|c| c["proto"] == "udp")
            .map(|c| format!("{} {} {}", c["local"], c["balancer"], c["client"]).replace('"', ""))
            .collect();
        udp.sort();
        let (v4, dual) = (from_server(), SocketAddr::V4(dual));
        let (b1, b2) = (format!("{CLIENT_V4}:40000"), format!("{CLIENT_V4}:40001"));
        let expected = [
            format!("{v4} {b1} {CLIENT}"),
            format!("{v4} {b1} {CLIENT}"),
            format!("{dual} {b2} {CLIENT}"),
            format!("{dual} {b2} {CLIENT}"),
        ];
        assert_eq!(udp, expected);
    }
    let stats = lab.stats();
    assert_eq!(stats["udp_connected"], 2, "{stats}");
    assert_eq!(stats["udp_peername"], 4, "{stats}");
}

#[test]
fn without_udp_nothing_changes() {
    let mut lab = Lab::new();
    lab.load();
    udp_server(&mut lab);
    let reply = with_balancer(&lab, 40000, |b| b.ask(server(), &uoa4(client()), "hi"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT_V4}:40000 data=hi")));
    let stats = lab.stats();
    assert!(stats.get("udp_option").is_none(), "no UDP counters while UDP is off: {stats}");
    assert_eq!(lab.status_json()["programs"].as_array().unwrap().len(), 6, "the TCP path's programs only");
    assert!(!lab.pin_dir.join("link_udp_ingress").exists());
}

/// `toa load --udp` on a loaded agent attaches the UDP path, and without it detaches it again;
/// the TCP path keeps its connections' clients throughout.
#[test]
fn udp_is_switched_on_and_off_in_place() {
    let mut lab = Lab::new();
    lab.load();
    lab.python_server(SERVER_V4, 8080);
    udp_server(&mut lab);
    let mut conn = LiveConn::open(&lab, "198.18.0.1:8080");
    assert_eq!(conn.ask(), answer(CLIENT, CLIENT));

    lab.load_with(&["--udp"]);
    assert!(lab.pin_dir.join("link_udp_ingress").exists());
    let reply = with_balancer(&lab, 40000, |b| b.ask(server(), &uoa4(client()), "on"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT} data=on")));
    assert_eq!(conn.ask(), answer(CLIENT, CLIENT), "the open connection keeps its client");

    lab.load();
    assert!(!lab.pin_dir.join("link_udp_ingress").exists());
    let reply = with_balancer(&lab, 40001, |b| b.ask(server(), &uoa4(client()), "off"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT_V4}:40001 data=off")));
    assert_eq!(conn.ask(), answer(CLIENT, CLIENT), "the open connection keeps its client");
    conn.close();
    assert!(lab.stats().get("udp_option").is_none());
}

/// A UOA of the wrong length: nothing is recorded, the balancer's address is kept, and the
/// datagram is still delivered. A broken IPv4 option list the kernel itself drops (with an ICMP
/// parameter problem) before any hook: the server never sees it and the next datagram is served
/// as usual.
#[test]
fn malformed_uoas_keep_the_real_address() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    udp_server(&mut lab);
    let wrong_lengths: Vec<(&str, Vec<u8>)> = vec![
        ("length 6", vec![31, 6, 0x10, 0x92, 203, 0]),
        ("length 12", vec![31, 12, 0x10, 0x92, 203, 0, 113, 7, 0, 0, 0, 0]),
        ("length 16", vec![31, 16, 0x10, 0x92, 203, 0, 113, 7, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("length 8 after a wrong one", vec![31, 6, 0, 0, 0, 0, 1, 1, 31, 7, 0x10, 0x92, 203, 0, 113, 1]),
        (
            "ByteDance's length 16 with an unknown operation",
            vec![31, 16, 2, 0, 0x10, 0x92, 0, 53, 203, 0, 113, 7, 0, 0, 0, 0],
        ),
        ("type 30 of a length of no layout", vec![30, 8, 0, 0, 0x10, 0x92, 0, 0]),
    ];
    let broken_lists: Vec<(&str, Vec<u8>)> = vec![
        ("length running past the options", vec![1, 1, 1, 1, 31, 12, 0x10, 0x92]),
        ("length below 2", vec![31, 1, 0x10, 0x92, 203, 0, 113, 7]),
        ("length byte missing", vec![1, 1, 1, 31]),
    ];
    let n = wrong_lengths.len() as u64;
    let (kept, after) = with_balancer(&lab, 40000, move |b| {
        let kept: Vec<_> = wrong_lengths.into_iter().map(|(what, o)| (what, b.ask(server(), &o, what))).collect();
        let after: Vec<_> = broken_lists
            .into_iter()
            .map(|(what, o)| {
                b.send(server(), &o, b"dropped").expect("send");
                (what, b.ask(server(), &[], "after"))
            })
            .collect();
        (kept, after)
    });
    for (what, reply) in kept {
        assert_eq!(reply, (from_server(), format!("from={CLIENT_V4}:40000 data={what}")), "{what}");
    }
    for (what, reply) in after {
        assert_eq!(reply, (from_server(), format!("from={CLIENT_V4}:40000 data=after")), "{what}");
    }
    let stats = lab.stats();
    assert_eq!(stats["udp_option_malformed"], n, "{stats}");
    assert_eq!(stats["udp_option"], 0, "{stats}");
    // Other IPv4 options, and the TCP kind 254, are not a UOA.
    let others = with_balancer(&lab, 40001, |b| {
        [
            b.ask(server(), &[7, 7, 4, 0, 0, 0, 0], "record route"),
            b.ask(server(), &[254, 8, 0x10, 0x92, 203, 0, 113, 7], "kind 254"),
        ]
    });
    for (reply, what) in others.iter().zip(["record route", "kind 254"]) {
        assert_eq!(reply, &(from_server(), format!("from={CLIENT_V4}:40001 data={what}")));
    }
    assert_eq!(lab.stats()["udp_option"], 0);
}

#[test]
fn trust_list_and_port_scope() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp", "--trust", "100.125.0.0/16"]);
    udp_server(&mut lab);
    let reply = with_balancer(&lab, 40000, |b| b.ask(server(), &uoa4(client()), "untrusted"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT_V4}:40000 data=untrusted")));
    assert_eq!(lab.stats()["udp_untrusted_option"], 1);

    lab.load_with(&["--udp", "--trust", &format!("{CLIENT_V4}/32"), "--port", "53"]);
    let reply = with_balancer(&lab, 40001, |b| b.ask(server(), &uoa4(client()), "out of scope"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT_V4}:40001 data=out of scope")));
    lab.load_with(&["--udp", "--trust", &format!("{CLIENT_V4}/32"), "--port", &PORT.to_string()]);
    let reply = with_balancer(&lab, 40002, |b| b.ask(server(), &uoa4(client()), "trusted"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT} data=trusted")));
}

/// A flow's client is honoured for `--udp-ttl` seconds after its last use. The test waits for
/// the event itself: the kernel's monotonic clock (the one flows are stamped with) passing the
/// flow's last use plus the TTL, read from the flow map; then it looks.
#[test]
fn flows_expire() {
    // Well above what a slow guest takes from a datagram's arrival to the server's recvfrom().
    const TTL_SECS: u64 = 5;
    let mut lab = Lab::new();
    lab.load_with(&["--udp", "--udp-ttl", &TTL_SECS.to_string()]);
    udp_server(&mut lab);
    let flows = lab.pin_dir.join(toa::hooks::UDP_FLOWS.pin);
    let (first, later) = with_balancer(&lab, 40000, move |b| {
        let first = b.ask(server(), &uoa4(client()), "first");
        // The server has used the flow (recvfrom, then the reply): its last use is recorded.
        let expires = last_use_ns(&flows) + TTL_SECS * 1_000_000_000;
        let waited = eventually(DEADLINE + std::time::Duration::from_secs(TTL_SECS), || monotonic_ns() > expires);
        assert!(waited, "the monotonic clock never passed {expires}");
        (first, b.ask(server(), &[], "later"))
    });
    assert_eq!(first.1, format!("from={CLIENT} data=first"));
    assert_eq!(later.1, format!("from={CLIENT_V4}:40000 data=later"));
    assert_eq!(lab.stats()["udp_expired"], 1);
}

/// The latest last use of the flows in the map pinned at `path` (`bpf_ktime_get_ns()`).
fn last_use_ns(path: &std::path::Path) -> u64 {
    use toa_common::udp::{Flow, FlowKey};
    let data = aya::maps::MapData::from_pin(path).expect("open the pinned flow map");
    let map = aya::maps::Map::from_map_data(data).expect("a map");
    let flows = aya::maps::HashMap::<_, FlowKey, Flow>::try_from(map).expect("the flow map");
    flows.iter().filter_map(Result::ok).map(|(_, flow)| flow.seen_ns).max().expect("a flow")
}

/// The clock `bpf_ktime_get_ns()` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Lets this process hold `n` descriptors (a balancer port each), within the hard limit.
fn raise_open_files_limit(n: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < n {
            assert!(limit.rlim_max >= n, "the hard limit on open files ({}) is below {n}", limit.rlim_max);
            limit.rlim_cur = n;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

/// 1,000 flows, each from its own balancer port with its own client, 100 datagrams each
/// (100,000 in all): every reply comes back to its flow's port and names its flow's client.
#[test]
fn many_flows_each_get_their_own_client() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    udp_server(&mut lab);
    raise_open_files_limit(2100);
    let wrong = with_balancer(&lab, 41000, |first| {
        let mut wrong = Vec::new();
        let flows: Vec<(Balancer, SocketAddrV4)> = (0..1000u16)
            .map(|i| {
                let b = first.another(42000 + i).expect("bind a balancer port");
                let c = SocketAddrV4::new(std::net::Ipv4Addr::new(203, 0, (i >> 8) as u8, i as u8), 10000 + i);
                (b, c)
            })
            .collect();
        for round in 0..100 {
            // In windows of 50 flows, so that the server's receive queue never overflows (UDP
            // would drop, and the lost reply would look like a hang).
            for window in flows.chunks(50) {
                for (b, c) in window {
                    let options = if round == 0 { uoa4(*c) } else { Vec::new() };
                    b.send(server(), &options, format!("{round}").as_bytes()).expect("send");
                }
                for (b, c) in window {
                    let (from, said) = b.recv().expect("a reply within the deadline");
                    if from != from_server() || said != format!("from={c} data={round}") {
                        wrong.push(format!("{} → {c}: {from} {said}", b.addr));
                    }
                }
            }
        }
        wrong
    });
    assert!(wrong.is_empty(), "{} wrong, first: {:?}", wrong.len(), &wrong[..wrong.len().min(5)]);
    let stats = lab.stats();
    assert_eq!(stats["udp_option"], 1000, "{stats}");
    assert_eq!(stats["udp_recv_client"], 100_000, "{stats}");
    assert_eq!(stats["udp_reply_redirected"], 100_000, "{stats}");
}

#[test]
fn bad_udp_flags_fail_clearly_and_attach_nothing() {
    let lab = Lab::new();
    for (args, says) in [
        (&["--udp-ttl", "5"][..], "--udp-ttl is given without --udp: add --udp"),
        (&["--udp", "--udp-ttl", "0"][..], "--udp-ttl 0: give 1 to 86400 seconds"),
        (&["--udp", "--udp-ttl", "86401"][..], "--udp-ttl 86401: give 1 to 86400 seconds"),
    ] {
        let out = lab.load_cmd(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(cgroup_attachments(&lab.cgroup).is_empty(), "{args:?} left programs attached");
        assert!(!lab.pin_dir.join("link_sock_ops").exists());
    }
}

/// Two balancer ports forwarding the same client address and port to one service: the replies
/// follow the flow the client last arrived through, and the overlap is counted.
#[test]
fn the_same_client_through_two_balancers_is_counted() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    udp_server(&mut lab);
    let (first, second) = with_balancer(&lab, 40000, |b| {
        let other = b.another(40001).unwrap();
        (b.ask(server(), &uoa4(client()), "through 40000"), other.ask(server(), &uoa4(client()), "through 40001"))
    });
    assert_eq!(first, (from_server(), format!("from={CLIENT} data=through 40000")));
    // Received on port 40001's socket: the reply went to the second balancer port.
    assert_eq!(second, (from_server(), format!("from={CLIENT} data=through 40001")));
    assert_eq!(lab.stats()["udp_reply_conflict"], 1);
}

/// `toa run` with `udp = true` in its config: the UDP path attached, its counters on /metrics;
/// SIGHUP with `udp` gone turns it off in place.
#[test]
fn toa_run_serves_udp_and_sighup_turns_it_off() {
    const METRICS: u16 = 9481;
    let mut lab = Lab::new();
    let dir = ScratchDir::new(&format!("{}-config", lab.name));
    let config = dir.0.join("toa.toml");
    std::fs::write(&config, format!("cgroup = {:?}\nudp = true\n", lab.cgroup)).unwrap();
    let mut service = lab.start_service(METRICS, &["--config", config.to_str().unwrap()]);
    udp_server(&mut lab);
    assert_eq!(lab.status_json()["programs"].as_array().unwrap().len(), 13);
    let reply = with_balancer(&lab, 40000, |b| b.ask(server(), &uoa4(client()), "on"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT} data=on")));
    let (code, body) = lab.http_get(METRICS, "/metrics").expect("metrics answer");
    assert_eq!(code, 200);
    assert!(body.lines().any(|l| l == "toa_udp_recv_client_total 1"), "{body}");

    std::fs::write(&config, format!("cgroup = {:?}\n", lab.cgroup)).unwrap();
    service.signal(libc::SIGHUP);
    assert!(
        eventually(DEADLINE, || lab.status_json()["programs"].as_array().is_some_and(|p| p.len() == 6)),
        "SIGHUP did not turn UDP off: {}",
        lab.status_json()
    );
    let reply = with_balancer(&lab, 40001, |b| b.ask(server(), &uoa4(client()), "off"));
    assert_eq!(reply, (from_server(), format!("from={CLIENT_V4}:40001 data=off")));
    let (ok, stderr) = service.stop();
    assert!(ok, "{stderr}");
    assert!(!lab.pin_dir.exists(), "SIGTERM without keep_loaded must unload");
}

/// A directory under the temporary directory, removed on drop (also when the test fails).
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `toa load` run in the server namespace (where `eth0` is), with `args`.
fn load_in_server_ns(lab: &Lab, args: &[&str]) -> std::process::Output {
    let mut cmd = lab.load_cmd(args);
    in_netns_and_cgroup(&mut cmd, &lab.netns_path(&lab.server_ns), None);
    cmd.output().unwrap()
}

/// The tc ingress filters on the server namespace's `eth0`, as `tc` lists them.
fn ingress_filters(lab: &Lab) -> String {
    let out = run(Command::new("tc").args(["-n", &lab.server_ns, "filter", "show", "dev", "eth0", "ingress"]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a BPF filter (the converter: the test's namespace has no other) is on the server
/// namespace's `eth0`. Not by name: some kernels report none for it.
fn converter_attached(lab: &Lab) -> bool {
    ingress_filters(lab).contains("direct-action")
}

/// The ids `toa status` lists for the converter.
fn converter_ids(lab: &Lab) -> Vec<u64> {
    let status = lab.status_json();
    let programs = status["programs"].as_array().cloned().unwrap_or_default();
    programs.iter().filter(|p| p["name"] == "toa_udp_opp").filter_map(|p| p["id"].as_u64()).collect()
}

/// DPVS's "option protocol" mode (IP protocol 248 in front of the UDP header): on the interface
/// given to `--udp-opp-iface` each such datagram is turned into UDP and its client shown, the
/// reply still goes to the balancer. Malformed ones are left as they came (the kernel drops
/// them, as without the agent; counted) and the next datagram is served; a malformed UOA inside
/// a good header keeps the real address.
#[test]
fn option_protocol_datagrams_on_the_named_interface() {
    let mut lab = Lab::new();
    let out = load_in_server_ns(&lab, &["--udp", "--udp-opp-iface", "eth0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(converter_attached(&lab), "{}", ingress_filters(&lab));
    assert_eq!(lab.status_json()["policy"]["udp_opp_ifaces"], serde_json::json!(["eth0"]));
    // `toa status` lists the converter: the program the filter runs.
    let ids = converter_ids(&lab);
    assert_eq!(ids.len(), 1, "{}", lab.status_json());
    assert!(ingress_filters(&lab).contains(&format!(" id {} ", ids[0])), "{}", ingress_filters(&lab));
    udp_server(&mut lab);
    let bad_uoa = vec![31, 6, 0x10, 0x92, 203, 0, 1, 1];
    let replies = with_balancer(&lab, 40000, move |b| {
        let first = b.ask_opp(server(), &uoa4(client()), "first");
        // Later datagrams of the flow are plain UDP.
        let second = b.ask(server(), &[], "second");
        let other = b.another(40001).unwrap();
        let kept = other.ask_opp(server(), &bad_uoa, "bad uoa");
        let to = server();
        for (version, protocol, options) in [
            (2, 17, uoa4(client())), // IPv6's version on an IPv4 packet
            (1, 6, uoa4(client())),  // not UDP inside
            (1, 17, vec![1, 1, 1]),  // not whole words
            (1, 17, vec![1; 40]),    // no room in the IPv4 header
        ] {
            let packet = raw_udp::opp_datagram(other.addr, to, &options, b"dropped", version, protocol);
            other.send_packet(to, &packet).expect("send");
        }
        let after = other.ask(server(), &[], "after");
        [first, second, kept, after]
    });
    assert_eq!(replies[0], (from_server(), format!("from={CLIENT} data=first")));
    assert_eq!(replies[1], (from_server(), format!("from={CLIENT} data=second")));
    assert_eq!(replies[2], (from_server(), format!("from={CLIENT_V4}:40001 data=bad uoa")));
    assert_eq!(replies[3], (from_server(), format!("from={CLIENT_V4}:40001 data=after")));
    let stats = lab.stats();
    assert_eq!(stats["udp_opp_converted"], 2, "{stats}");
    assert_eq!(stats["udp_opp_unconverted"], 4, "{stats}");
    assert_eq!(stats["udp_option"], 1, "{stats}");
    assert_eq!(stats["udp_option_malformed"], 1, "{stats}");

    // Loaded again without the flag: the filter goes, the rest stays.
    let out = load_in_server_ns(&lab, &["--udp"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!converter_attached(&lab), "{}", ingress_filters(&lab));
    assert_eq!(lab.status_json()["policy"].get("udp_opp_ifaces"), None);
    assert_eq!(converter_ids(&lab), Vec::<u64>::new());
    // And with it again; then unloaded from another network namespace (the host's): the filter
    // is found where it was attached and goes with everything else.
    assert!(load_in_server_ns(&lab, &["--udp", "--udp-opp-iface", "eth0"]).status.success());
    assert!(converter_attached(&lab), "{}", ingress_filters(&lab));
    lab.unload();
    assert!(!converter_attached(&lab), "{}", ingress_filters(&lab));
    assert!(!lab.pin_dir.exists());
}

#[test]
fn bad_option_protocol_interfaces_fail_clearly_and_attach_nothing() {
    let lab = Lab::new();
    for (args, says) in [
        (&["--udp-opp-iface", "eth0"][..], "--udp-opp-iface is given without --udp: add --udp"),
        (&["--udp", "--udp-opp-iface", "nosuch0"][..], "--udp-opp-iface nosuch0: no such interface"),
        (&["--udp", "--udp-opp-iface", "lo"][..], "--udp-opp-iface lo: not an Ethernet interface"),
        (&["--udp", "--udp-opp-iface", "eth0", "--udp-opp-iface", "lo"][..], "--udp-opp-iface lo: not an Ethernet"),
    ] {
        let out = load_in_server_ns(&lab, args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(cgroup_attachments(&lab.cgroup).is_empty(), "{args:?} left programs attached");
        assert!(!lab.pin_dir.exists(), "{args:?} left pins");
        assert!(!converter_attached(&lab), "{args:?}: {}", ingress_filters(&lab));
    }
}

/// Balancers that reach the server over IPv6 (where IPv6 has no IPv4 options): ByteDance's UOA
/// in a Destination Options header, and DPVS's option protocol over IPv6, which the converter
/// on `--udp-opp-iface` turns into such a header (an IPv6 client's in place, an IPv4 client's
/// grown by a pad). IPv6 clients are shown on IPv6-only and dual-stack sockets and the replies
/// reach the balancer; an IPv4 client of an IPv6 balancer is recorded, not shown (its reply
/// would take the IPv4 path); a malformed UOA, or another first option, keeps the real address.
#[test]
fn ipv6_balancers() {
    let mut lab = Lab::new();
    let out = load_in_server_ns(&lab, &["--udp", "--udp-opp-iface", "eth0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.script_server("udp_echo.py", SERVER_V6, PORT, &[]);
    lab.script_server("udp_echo.py", "::", PORT + 1, &[]);
    let server6 = SocketAddrV6::new(SERVER_V6.parse().unwrap(), PORT, 0, 0);
    let dual = SocketAddrV6::new(SERVER_V6.parse().unwrap(), PORT + 1, 0, 0);
    let client6: SocketAddrV6 = CLIENT6.parse().unwrap();
    let other6 = SocketAddrV6::new(*client6.ip(), 4243, 0, 0);
    let vip = SocketAddr::V6(server6);
    // A wrapped list whose UOA has a length of no layout (6), then two no-ops; a trailing PadN.
    let wrapped_bad_uoa = vec![17, 1, 0x3e, 8, 31, 6, 0x10, 0x92, 203, 0, 1, 1, 1, 2, 0, 0];
    let not_a_uoa = vec![17, 0, 0x3e, 4, 1, 2, 3, 4];
    let replies = lab.in_client_ns(move || {
        let balancer = |port| Balancer6::bind(SocketAddrV6::new(CLIENT_V6.parse().unwrap(), port, 0, 0)).unwrap();
        let (b0, b1, b2, b3, b4, b5) =
            (balancer(40000), balancer(40001), balancer(40002), balancer(40003), balancer(40004), balancer(40005));
        [
            b0.ask(server6, 60, &raw_udp::bytedance_dstopts(SocketAddr::V6(client6), vip), "bytedance"),
            b0.ask(server6, 17, &[], "later"),
            // Another client port: the same client through two balancers is another case.
            b1.ask(server6, 248, &raw_udp::opp6(&uoa6(other6)), "dpvs opp"),
            b2.ask(server6, 248, &raw_udp::opp6(&uoa4(client())), "dpvs opp, ipv4 client"),
            b3.ask(dual, 60, &raw_udp::bytedance_dstopts(SocketAddr::V6(client6), vip), "dual-stack"),
            b4.ask(server6, 60, &wrapped_bad_uoa, "malformed"),
            b5.ask(server6, 60, &not_a_uoa, "no uoa"),
        ]
    });
    let from = |port| SocketAddr::V6(SocketAddrV6::new(SERVER_V6.parse().unwrap(), port, 0, 0));
    assert_eq!(replies[0], (from(PORT), format!("from={CLIENT6} data=bytedance")));
    assert_eq!(replies[1], (from(PORT), format!("from={CLIENT6} data=later")));
    assert_eq!(replies[2], (from(PORT), format!("from={other6} data=dpvs opp")));
    assert_eq!(replies[3], (from(PORT), format!("from=[{CLIENT_V6}]:40002 data=dpvs opp, ipv4 client")));
    assert_eq!(replies[4], (from(PORT + 1), format!("from={CLIENT6} data=dual-stack")));
    assert_eq!(replies[5], (from(PORT), format!("from=[{CLIENT_V6}]:40004 data=malformed")));
    assert_eq!(replies[6], (from(PORT), format!("from=[{CLIENT_V6}]:40005 data=no uoa")));
    let stats = lab.stats();
    assert_eq!(stats["udp_opp_converted"], 2, "{stats}");
    assert_eq!(stats["udp_option"], 4, "{stats}");
    assert_eq!(stats["udp_option_malformed"], 1, "{stats}");
    assert_eq!(stats["udp_recv_mismatch"], 1, "{stats}");
    assert_eq!(stats["udp_recv_client"], 4, "{stats}");
    assert_eq!(stats["udp_reply_redirected"], 4, "{stats}");
    assert_eq!(stats["udp_reply_conflict"], 0, "{stats}");
}

/// A server that connects a socket of its own to an IPv6 client it was shown: connected to the
/// client's IPv6 balancer instead; `send()` reaches it, `getpeername()` and `recv()` show the
/// client.
#[test]
fn ipv6_sockets_connected_to_a_client() {
    let mut lab = Lab::new();
    lab.load_with(&["--udp"]);
    lab.script_server("udp_echo.py", SERVER_V6, PORT, &["--connect"]);
    let server6 = SocketAddrV6::new(SERVER_V6.parse().unwrap(), PORT, 0, 0);
    let client6: SocketAddrV6 = CLIENT6.parse().unwrap();
    let uoa = raw_udp::bytedance_dstopts(SocketAddr::V6(client6), SocketAddr::V6(server6));
    let replies = lab.in_client_ns(move || {
        let b = Balancer6::bind(SocketAddrV6::new(CLIENT_V6.parse().unwrap(), 40000, 0, 0)).unwrap();
        [b.ask(server6, 60, &uoa, "first"), b.ask(server6, 17, &[], "second")]
    });
    for (reply, data) in replies.iter().zip(["first", "second"]) {
        assert_eq!(reply, &(SocketAddr::V6(server6), format!("from={CLIENT6} peer={CLIENT6} data={data}")));
    }
    let stats = lab.stats();
    assert_eq!(stats["udp_connected"], 1, "{stats}");
    assert_eq!(stats["udp_peername"], 2, "{stats}");
}
