//! `toa run`, `toa conns`, `toa doctor` and `toa --version`, end to end, as root.

use toa_lab as support;

use std::process::Command;

use support::*;

const PORT: u16 = 9431;

/// A counter's value in a /metrics body.
fn metric(body: &str, name: &str) -> Option<u64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn scrape(lab: &Lab) -> String {
    let (code, body) = lab.http_get(PORT, "/metrics").expect("scrape /metrics");
    assert_eq!(code, 200);
    body
}

#[test]
fn run_serves_metrics_that_follow_the_traffic() {
    let mut lab = Lab::new();
    let cgroup = lab.cgroup.to_string_lossy().into_owned();
    let mut service = lab.start_service(PORT, &["--cgroup", &cgroup]);
    lab.python_server(SERVER_V4, 8080);

    let body = scrape(&lab);
    assert_eq!(metric(&body, "toa_loaded"), Some(1));
    assert_eq!(metric(&body, "toa_syn_recv_sock_toa_total"), Some(0));
    assert!(body.contains("toa_build_info{version=\"0.1.0\""), "{body}");
    assert_eq!(lab.http_get(PORT, "/healthz").unwrap().0, 200);

    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT, "--count", "3"]);
    assert_eq!(out.lines().count(), 3);
    let (local, _) = lab.plain_exchange("198.18.0.1:8080");
    assert!(local.starts_with(CLIENT_V4));
    let body = scrape(&lab);
    assert_eq!(metric(&body, "toa_syn_recv_sock_toa_total"), Some(3));
    assert_eq!(metric(&body, "toa_syn_recv_sock_no_toa_total"), Some(1));
    assert_eq!(metric(&body, "toa_getname_toa_ok_total"), Some(6));

    // Every metric the Grafana dashboard queries is one this endpoint serves.
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/toa-dashboard.json")).unwrap();
    let mut queried: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("toa_") && w.len() > 4)
        .collect();
    queried.sort_unstable();
    queried.dedup();
    assert!(queried.len() >= 5, "{queried:?}");
    for name in queried {
        assert!(
            body.lines().any(|l| l.starts_with(name)),
            "the dashboard queries {name}, which /metrics does not serve"
        );
    }

    let (ok, stderr) = service.stop();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("toa loaded"), "{stderr}");
    assert!(stderr.contains("toa unloaded"), "{stderr}");
    assert!(!lab.pin_dir.exists(), "SIGTERM without keep_loaded must unload");
}

#[test]
fn sighup_reloads_the_config_and_keeps_the_old_one_when_broken() {
    let lab = Lab::new();
    let moved = lab.sub_cgroup("moved");
    let dir = std::env::temp_dir().join(format!("{}-config", lab.name));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("toa.toml");
    std::fs::write(&config, format!("cgroup = {:?}\nlog_format = \"json\"\n", lab.cgroup)).unwrap();
    let mut service = lab.start_service(PORT, &["--config", config.to_str().unwrap()]);
    assert_eq!(lab.status_json()["cgroup"], lab.cgroup.to_str().unwrap());
    let ids_before = lab.status_json()["programs"].clone();

    std::fs::write(&config, format!("cgroup = {moved:?}\nlog_format = \"json\"\n")).unwrap();
    service.signal(libc::SIGHUP);
    assert!(
        eventually(DEADLINE, || lab.status_json()["cgroup"] == moved.to_str().unwrap()),
        "SIGHUP did not move the agent: {}",
        lab.status_json()
    );
    assert_ne!(lab.status_json()["programs"], ids_before, "new links replace the old ones");
    assert_eq!(cgroup_attachments(&lab.cgroup), "", "old cgroup still has the programs");
    let attached = cgroup_attachments(&moved);
    assert!(has_program(&attached, &lab.status_json(), "sock_ops", "toa_sock_ops"), "{attached}");

    // A broken file: logged, the running configuration stays.
    std::fs::write(&config, "cgroup = 42\n").unwrap();
    service.signal(libc::SIGHUP);
    service.wait_for_log("configuration not reloaded", 1);
    assert!(service.running(), "a bad config must not stop the service");
    assert_eq!(lab.status_json()["cgroup"], moved.to_str().unwrap());

    let (ok, stderr) = service.stop();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ok, "{stderr}");
    // JSON logs: one object per line, the reload and the refusal both reported.
    assert!(stderr.lines().all(|l| l.starts_with('{')), "{stderr}");
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
    assert!(stderr.contains("configuration not reloaded"), "{stderr}");
}

#[test]
fn keep_loaded_restart_loses_no_client_and_conns_shows_it() {
    let mut lab = Lab::new();
    let cgroup = lab.cgroup.to_string_lossy().into_owned();
    let mut first = lab.start_service(PORT, &["--cgroup", &cgroup, "--keep-loaded"]);
    lab.rust_server("198.18.0.1:8080");
    let expected = format!("accept={CLIENT} peer={CLIENT}\n");

    let mut conn = LiveConn::open(&lab, "198.18.0.1:8080");
    assert_eq!(conn.ask(), expected);

    let ids_before = lab.status_json()["programs"].clone();
    let (ok, stderr) = first.stop();
    assert!(ok, "{stderr}");
    assert!(lab.pin_dir.exists(), "keep_loaded must leave the pins");
    assert_eq!(conn.ask(), expected, "while no service runs");

    // The restart adopts what is pinned: the open connection keeps its client.
    let mut second = lab.start_service(PORT, &["--cgroup", &cgroup]);
    assert_eq!(conn.ask(), expected, "after the restart");
    // The restart put this binary's programs in place of the old ones (an upgrade path).
    assert_ne!(lab.status_json()["programs"], ids_before);

    // toa conns, in the server's namespace, shows exactly this connection.
    let conns = lab.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["client"], CLIENT);
    assert_eq!(conns[0]["local"], "198.18.0.1:8080");
    assert!(conns[0]["balancer"].as_str().unwrap().starts_with("198.18.0.2:"));
    assert_eq!(conns[0]["process"], "peer_echo");
    assert_eq!(conns[0]["state"], "ESTAB");

    conn.close();
    let (ok, stderr) = second.stop();
    assert!(ok, "{stderr}");
    assert!(!lab.pin_dir.exists());
}

#[test]
fn conns_lists_nothing_without_client_addresses() {
    let mut lab = Lab::new();
    lab.load();
    lab.rust_server("198.18.0.1:8080");
    lab.plain_exchange("198.18.0.1:8080");
    let out = run(lab.toa().args(["conns", "--json", "--netns"]).arg(lab.netns_path(&lab.server_ns)));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

#[test]
fn run_fails_cleanly_on_bad_settings() {
    let lab = Lab::new();
    // An unknown key in the config file: named, and nothing attached.
    let config = std::env::temp_dir().join(format!("{}.toml", lab.name));
    std::fs::write(&config, "cgroupp = \"/x\"\n").unwrap();
    let out = lab.toa().args(["run", "--config"]).arg(&config).output().unwrap();
    std::fs::remove_file(&config).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `cgroupp`"), "{err}");
    assert!(!lab.pin_dir.exists());

    // A --config that does not exist.
    let out = lab.toa().args(["run", "--config", "/nonexistent/toa.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config /nonexistent/toa.toml"));
    assert!(!lab.pin_dir.exists());
}

#[test]
fn doctor_passes_here_and_names_what_fails() {
    let lab = Lab::new();
    let out = run(lab.toa().arg("doctor"));
    let text = String::from_utf8_lossy(&out.stdout);
    for check in ["kernel", "privileges", "cgroup v2", "bpffs", "BPF programs", "cgroup attach"] {
        assert!(text.lines().any(|l| l.starts_with("ok") && l.contains(check)), "{check}: {text}");
    }
    // Without privileges the same command fails and says why and what to do.
    let out = lab.toa_as_nobody(&["doctor"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL  privileges      missing CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"), "{text}");
    assert!(text.contains("fix: run as root"), "{text}");
    // A pin directory outside bpffs fails the bpffs check.
    let out = lab.toa().args(["doctor", "--pin-dir", "/tmp/not-bpffs/toa"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL  bpffs"));
    // Doctor's scratch cgroup is gone.
    let left: Vec<_> = std::fs::read_dir(cgroup2_mount())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("toa-doctor-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn version_names_the_embedded_programs() {
    let out = run(Command::new(toa_bin()).arg("--version"));
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text.trim().strip_prefix("toa 0.1.0 (programs ").and_then(|s| s.strip_suffix(')')).expect(&text);
    assert_eq!(hash.len(), 16);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
}
