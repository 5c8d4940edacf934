//! The image, run for real: `deploy/kubernetes/Containerfile` built with podman from the static
//! binary, and run the way `deploy/kubernetes/daemonset.yaml` runs it: its arguments, its
//! capabilities (all others dropped), not privileged, a read-only root, the bpffs and cgroup
//! mounts, and the node's network, which here is the lab's server namespace. Scoped to the lab's
//! cgroup and pin directory; as root.
//!
//! `podman kube play` cannot play the manifest itself: podman 4.3 (Debian 12) plays Pods and
//! Deployments, not DaemonSets ("YAML document does not contain any supported kube kind"), so
//! the test reads the manifest and says the same to `podman run`.

use toa_lab as support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml::Value as Yaml;
use support::*;

const PORT: u16 = 9431;

/// What the DaemonSet's container says about how it runs.
struct Pod {
    args: Vec<String>,
    capabilities: Vec<String>,
    read_only_root: bool,
    privileged: bool,
    /// (host path, container path, read-only, HostToContainer propagation)
    mounts: Vec<(String, String, bool, bool)>,
    host_network: bool,
}

fn daemonset() -> Pod {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let docs: Vec<Yaml> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let strings = |v: &Yaml| -> Vec<String> {
        v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let security = &container["securityContext"];
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let volumes = spec["volumes"].as_sequence().unwrap();
    let mounts = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            let volume = volumes.iter().find(|v| v["name"] == m["name"]).expect("the mount's volume");
            (
                volume["hostPath"]["path"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
                m["readOnly"].as_bool().unwrap_or(false),
                m["mountPropagation"].as_str() == Some("HostToContainer"),
            )
        })
        .collect();
    assert_eq!(strings(&container["command"]), ["/toa"]);
    Pod {
        args: strings(&container["args"]),
        capabilities: strings(&security["capabilities"]["add"]),
        read_only_root: security["readOnlyRootFilesystem"].as_bool() == Some(true),
        privileged: security["privileged"].as_bool() == Some(true),
        mounts,
        host_network: spec["hostNetwork"].as_bool() == Some(true),
    }
}

/// Whether `path` is a static executable (no program interpreter): the image has no libc.
fn is_static(path: &Path) -> bool {
    let out = Command::new("file").arg("-L").arg(path).output().expect("run file");
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("statically linked") || text.contains("static-pie linked")
}

/// The image, the container and the cgroups podman made for it, removed on drop (also when
/// the test fails).
struct Podman {
    image: String,
    container: String,
    context: PathBuf,
    /// The container's --cgroup-parent: podman creates it, and `conmon` below it, in every
    /// hierarchy and leaves both behind.
    cgroup_parent: String,
}

impl Podman {
    fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        // crun refuses hosts with cgroup v1 controllers beside v2 (this machine's); runc does not.
        cmd.args(["--runtime", "runc"]);
        cmd
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        report_cleanup(
            format!("podman rm {}", self.container),
            succeeded(self.podman().args(["rm", "-f", "-t", "15", &self.container])),
        );
        report_cleanup(format!("podman rmi {}", self.image), succeeded(self.podman().args(["rmi", "-f", &self.image])));
        report_cleanup(format!("remove {}", self.context.display()), removed(fs::remove_dir_all(&self.context)));
        for hierarchy in fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            let parent = hierarchy.path().join(&self.cgroup_parent);
            for dir in [parent.join("conmon"), parent] {
                if dir.is_dir() {
                    report_cleanup(format!("remove {}", dir.display()), removed(fs::remove_dir(&dir)));
                }
            }
        }
    }
}

#[test]
fn image_runs_as_the_daemonset_and_serves_the_client() {
    let toa = toa_bin();
    if !is_static(&toa) {
        // `cargo xtask test` runs this file with the static (musl) build.
        eprintln!("skipped: {} is not static; the scratch image needs the musl build", toa.display());
        return;
    }
    assert!(
        Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success()),
        "podman is missing: cargo xtask setup installs it"
    );
    let pod = daemonset();
    assert!(pod.host_network && !pod.privileged && pod.read_only_root);

    let mut lab = Lab::new();
    let id = format!("toa-test-{}", std::process::id());
    let context = std::env::temp_dir().join(&id);
    let _ = fs::remove_dir_all(&context);
    fs::create_dir_all(&context).unwrap();
    let podman =
        Podman { image: format!("localhost/{id}:test"), container: id.clone(), context, cgroup_parent: id.clone() };
    fs::copy(&toa, podman.context.join("toa")).unwrap();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    run(podman
        .podman()
        .args(["build", "--quiet", "--pull=never", "--layers=false", "-f"])
        .arg(deploy.join("Containerfile"))
        .arg("--ignorefile")
        .arg(deploy.join("Containerfile.dockerignore"))
        .args(["-t", &podman.image])
        .arg(&podman.context));

    let mut cmd = podman.podman();
    cmd.args(["run", "--detach", "--name", &id, "--pull=never", "--user", "0:0"]);
    cmd.arg(format!("--cgroup-parent=/{}", podman.cgroup_parent));
    // hostNetwork: the node's network namespace, here the lab's server (the metrics' 0.0.0.0
    // stays inside it).
    cmd.arg(format!("--network=ns:{}", lab.netns_path(&lab.server_ns).display()));
    cmd.args(["--cap-drop", "ALL"]);
    for cap in &pod.capabilities {
        cmd.args(["--cap-add", &format!("CAP_{cap}")]);
    }
    if pod.read_only_root {
        cmd.arg("--read-only");
    }
    for (host, inside, read_only, host_to_container) in &pod.mounts {
        let mut options = vec![if *read_only { "ro" } else { "rw" }];
        if *host_to_container {
            options.push("rslave");
        }
        cmd.args(["--volume", &format!("{host}:{inside}:{}", options.join(","))]);
    }
    // This machine's hard limits are below podman's defaults, which the runtime then cannot set.
    cmd.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]);
    cmd.arg(&podman.image);
    cmd.args(&pod.args);
    // Scoped to the lab: its cgroup and pin directory, not the host's root.
    cmd.arg("--cgroup").arg(&lab.cgroup).arg("--pin-dir").arg(&lab.pin_dir);
    run(&mut cmd);

    let ready = || lab.http_get(PORT, "/readyz").is_some_and(|(code, _)| code == 200);
    assert!(eventually(DEADLINE, ready), "the container never answered /readyz on {PORT}");
    assert_eq!(lab.http_get(PORT, "/healthz").map(|(code, _)| code), Some(200));
    let (code, metrics) = lab.http_get(PORT, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.lines().any(|l| l == "toa_loaded 1"), "{metrics}");

    lab.python_server(SERVER_V4, 8080);
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
    let logs = run(podman.podman().args(["logs", &id]));
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned() + &String::from_utf8_lossy(&logs.stdout);
    assert!(logs.lines().any(|l| l.starts_with('{') && l.contains("toa loaded")), "JSON log lines: {logs}");

    // The DaemonSet runs with --keep-loaded: a stopped pod leaves the programs attached for the
    // next one (the lab unloads them when it drops).
    run(podman.podman().args(["stop", "-t", "15", &id]));
    assert_eq!(lab.status_json()["loaded"], true);
    let (out, _) = lab.probe("198.18.0.1:8080", &["--as", CLIENT]);
    assert_eq!(out, answer(CLIENT, CLIENT));
}
