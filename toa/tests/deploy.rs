//! The deployment files under `deploy/`: each is parsed and checked for what it promises (the
//! systemd unit also by `systemd-analyze`), and each check is shown to reject a broken copy.
//! No network, no root, nothing outside a temporary directory is touched.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use serde::Deserialize as _;
use serde_yaml::Value as Yaml;

/// Every series the agent exports (`toa run`'s /metrics), from the counter enum itself: a
/// counter added there is known here.
fn metrics() -> Vec<String> {
    use toa_common::counters::Kind;
    toa_common::Counter::ALL
        .iter()
        .map(|c| match c.kind() {
            Kind::Counter => format!("toa_{}_total", c.name()),
            Kind::Gauge => format!("toa_{}", c.name()),
        })
        .chain(toa_common::udp::UdpCounter::ALL.iter().map(|c| format!("toa_{}_total", c.name())))
        .chain(["toa_loaded".to_owned(), "toa_build_info".to_owned()])
        .collect()
}

/// What the agent uses, and nothing more (systemd spells them CAP_*, Kubernetes without).
const CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"];

const METRICS_PORT: i64 = 9431;

type Checked = Result<(), Vec<String>>;

fn deploy_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(rel)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn assert_ok(what: &Path, result: Checked) {
    if let Err(errors) = result {
        panic!("{}:\n  {}", what.display(), errors.join("\n  "));
    }
}

/// A temporary directory of its own per test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("toa-deploy-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `text` with the first `from` replaced; `from` must be there, or the broken copy is not broken.
fn break_text(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the file no longer contains {from:?}: update this test");
    text.replacen(from, to, 1)
}

/// Writes each broken copy (name, from, to, an error that must mention this) to a temporary
/// directory and requires `check` to reject it for that reason.
fn rejects_broken_copies(file: &str, check: fn(&Path) -> Checked, cases: &[(&str, &str, &str, &str)]) {
    let original = read(&deploy_file(file));
    let file_name = Path::new(file).file_name().unwrap().to_str().unwrap();
    for (name, from, to, expected) in cases {
        let scratch = Scratch::new(name);
        let path = scratch.write(file_name, &break_text(&original, from, to));
        match check(&path) {
            Ok(()) => panic!("{file}: broken copy {name:?} was accepted"),
            Err(errors) => assert!(
                errors.iter().any(|e| e.contains(expected)),
                "{file}: broken copy {name:?} was rejected, but not for {expected:?}: {errors:#?}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: a minimal structural schema, then what the DaemonSet must do.

/// Types of a YAML node; mappings are closed, so a misspelled key is an error.
enum S {
    Str,
    Bool,
    Int,
    IntOrStr,
    StrList,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// A mapping of arbitrary string keys to values of one type (labels, resources).
    Dict(&'static S),
    List(&'static S),
    Map(&'static [F]),
    Any,
}

/// A key of a mapping: name, required, type.
struct F(&'static str, bool, S);

const fn req(key: &'static str, s: S) -> F {
    F(key, true, s)
}

const fn opt(key: &'static str, s: S) -> F {
    F(key, false, s)
}

const STR_DICT: S = S::Dict(&S::Str);
const METADATA: S =
    S::Map(&[req("name", S::Str), opt("namespace", S::Str), opt("labels", STR_DICT), opt("annotations", STR_DICT)]);
const HTTP_GET: S = S::Map(&[
    req("path", S::Str),
    req("port", S::IntOrStr),
    opt("host", S::Str),
    opt("scheme", S::Enum(&["HTTP", "HTTPS"])),
]);
const HTTP_PROBE: S = S::Map(&[
    req("httpGet", HTTP_GET),
    opt("initialDelaySeconds", S::Int),
    opt("periodSeconds", S::Int),
    opt("timeoutSeconds", S::Int),
    opt("failureThreshold", S::Int),
    opt("successThreshold", S::Int),
]);
const ENV: S = S::Map(&[req("name", S::Str), opt("value", S::Str), opt("valueFrom", S::Any)]);
const PORT: S = S::Map(&[
    opt("name", S::Str),
    req("containerPort", S::Int),
    opt("hostPort", S::Int),
    opt("protocol", S::Enum(&["TCP", "UDP", "SCTP"])),
]);
const RESOURCES: S = S::Map(&[opt("requests", S::Dict(&S::IntOrStr)), opt("limits", S::Dict(&S::IntOrStr))]);
const PROFILE: S =
    S::Map(&[req("type", S::Enum(&["RuntimeDefault", "Unconfined", "Localhost"])), opt("localhostProfile", S::Str)]);
const SE_LINUX: S = S::Map(&[opt("type", S::Str), opt("level", S::Str), opt("role", S::Str), opt("user", S::Str)]);
const SECURITY_CONTEXT: S = S::Map(&[
    opt("privileged", S::Bool),
    opt("allowPrivilegeEscalation", S::Bool),
    opt("readOnlyRootFilesystem", S::Bool),
    opt("runAsUser", S::Int),
    opt("runAsGroup", S::Int),
    opt("runAsNonRoot", S::Bool),
    opt("capabilities", S::Map(&[opt("add", S::StrList), opt("drop", S::StrList)])),
    opt("seccompProfile", PROFILE),
    opt("appArmorProfile", PROFILE),
    opt("seLinuxOptions", SE_LINUX),
]);
const MOUNT: S = S::Map(&[
    req("name", S::Str),
    req("mountPath", S::Str),
    opt("readOnly", S::Bool),
    opt("mountPropagation", S::Enum(&["None", "HostToContainer", "Bidirectional"])),
    opt("subPath", S::Str),
]);
const CONTAINER: S = S::Map(&[
    req("name", S::Str),
    req("image", S::Str),
    opt("imagePullPolicy", S::Enum(&["Always", "IfNotPresent", "Never"])),
    opt("command", S::StrList),
    opt("args", S::StrList),
    opt("env", S::List(&ENV)),
    opt("ports", S::List(&PORT)),
    opt("livenessProbe", HTTP_PROBE),
    opt("readinessProbe", HTTP_PROBE),
    opt("startupProbe", HTTP_PROBE),
    opt("resources", RESOURCES),
    opt("securityContext", SECURITY_CONTEXT),
    opt("volumeMounts", S::List(&MOUNT)),
]);
const HOST_PATH_TYPES: &[&str] =
    &["", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"];
const VOLUME: S = S::Map(&[
    req("name", S::Str),
    opt("hostPath", S::Map(&[req("path", S::Str), opt("type", S::Enum(HOST_PATH_TYPES))])),
    opt("configMap", S::Map(&[req("name", S::Str), opt("items", S::Any), opt("defaultMode", S::Int)])),
    opt("emptyDir", S::Any),
]);
const TOLERATION: S = S::Map(&[
    opt("key", S::Str),
    opt("operator", S::Enum(&["Exists", "Equal"])),
    opt("value", S::Str),
    opt("effect", S::Enum(&["NoSchedule", "PreferNoSchedule", "NoExecute"])),
    opt("tolerationSeconds", S::Int),
]);
const POD_SPEC: S = S::Map(&[
    opt("serviceAccountName", S::Str),
    opt("automountServiceAccountToken", S::Bool),
    opt("hostNetwork", S::Bool),
    opt("hostPID", S::Bool),
    opt("hostIPC", S::Bool),
    opt("dnsPolicy", S::Enum(&["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"])),
    opt("priorityClassName", S::Str),
    opt("tolerations", S::List(&TOLERATION)),
    opt("nodeSelector", STR_DICT),
    opt("terminationGracePeriodSeconds", S::Int),
    opt("initContainers", S::List(&CONTAINER)),
    req("containers", S::List(&CONTAINER)),
    opt("volumes", S::List(&VOLUME)),
]);
const UPDATE_STRATEGY: S = S::Map(&[
    req("type", S::Enum(&["RollingUpdate", "OnDelete"])),
    opt("rollingUpdate", S::Map(&[opt("maxUnavailable", S::IntOrStr), opt("maxSurge", S::IntOrStr)])),
]);
const TEMPLATE: S =
    S::Map(&[req("metadata", S::Map(&[req("labels", STR_DICT), opt("annotations", STR_DICT)])), req("spec", POD_SPEC)]);
const DAEMONSET: S = S::Map(&[
    req("apiVersion", S::Str),
    req("kind", S::Str),
    req("metadata", METADATA),
    req(
        "spec",
        S::Map(&[
            req("selector", S::Map(&[req("matchLabels", STR_DICT)])),
            opt("updateStrategy", UPDATE_STRATEGY),
            opt("minReadySeconds", S::Int),
            opt("revisionHistoryLimit", S::Int),
            req("template", TEMPLATE),
        ]),
    ),
]);
const NAMESPACE: S = S::Map(&[req("apiVersion", S::Str), req("kind", S::Str), req("metadata", METADATA)]);
const SERVICE_ACCOUNT: S = S::Map(&[
    req("apiVersion", S::Str),
    req("kind", S::Str),
    req("metadata", METADATA),
    opt("automountServiceAccountToken", S::Bool),
]);

fn validate(v: &Yaml, schema: &S, at: &str, errors: &mut Vec<String>) {
    let mut fail = |what: &str| errors.push(format!("{at}: {what}, found {}", describe(v)));
    match schema {
        S::Any => {}
        S::Str if v.is_string() => {}
        S::Bool if v.is_bool() => {}
        S::Int if v.is_i64() => {}
        S::IntOrStr if v.is_i64() || v.is_string() => {}
        S::StrList if v.as_sequence().is_some_and(|s| s.iter().all(Yaml::is_string)) => {}
        S::Enum(allowed) => match v.as_str() {
            Some(s) if allowed.contains(&s) => {}
            _ => fail(&format!("expected one of {allowed:?}")),
        },
        S::List(item) => match v.as_sequence() {
            Some(items) => {
                for (i, item_value) in items.iter().enumerate() {
                    validate(item_value, item, &format!("{at}[{i}]"), errors);
                }
            }
            None => fail("expected a list"),
        },
        S::Dict(value) => match v.as_mapping() {
            Some(m) => {
                for (k, val) in m {
                    match k.as_str() {
                        Some(k) => validate(val, value, &format!("{at}.{k}"), errors),
                        None => errors.push(format!("{at}: key {} is not a string", describe(k))),
                    }
                }
            }
            None => fail("expected a mapping"),
        },
        S::Map(fields) => match v.as_mapping() {
            Some(m) => {
                for F(key, required, _) in fields.iter() {
                    if *required && !m.contains_key(*key) {
                        errors.push(format!("{at}: missing required key {key:?}"));
                    }
                }
                for (k, val) in m {
                    match fields.iter().find(|F(key, _, _)| k.as_str() == Some(key)) {
                        Some(F(key, _, s)) => validate(val, s, &format!("{at}.{key}"), errors),
                        None => errors.push(format!("{at}: unknown key {}", describe(k))),
                    }
                }
            }
            None => fail("expected a mapping"),
        },
        S::Str => fail("expected a string"),
        S::Bool => fail("expected a boolean"),
        S::Int => fail("expected an integer"),
        S::IntOrStr => fail("expected an integer or a string"),
        S::StrList => fail("expected a list of strings"),
    }
}

fn describe(v: &Yaml) -> String {
    match v {
        Yaml::Null => "nothing".into(),
        Yaml::Mapping(_) => "a mapping".into(),
        Yaml::Sequence(_) => "a list".into(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_owned(),
    }
}

/// Every document of a multi-document YAML stream (empty ones dropped).
fn yaml_documents(text: &str) -> Result<Vec<Yaml>, String> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Yaml::deserialize(doc).map_err(|e| format!("YAML does not parse: {e}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn strings(v: &Yaml) -> Vec<&str> {
    v.as_sequence().map(|s| s.iter().filter_map(Yaml::as_str).collect()).unwrap_or_default()
}

/// The value of `--flag VALUE` or `--flag=VALUE`.
fn flag_value<'a>(argv: &[&'a str], flag: &str) -> Option<&'a str> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            argv.get(i + 1).copied()
        } else {
            a.strip_prefix(flag).and_then(|rest| rest.strip_prefix('='))
        }
    })
}

/// The container port a probe's `port` (number or port name) refers to.
fn probe_port(probe: &Yaml, container: &Yaml) -> Option<i64> {
    let port = &probe["httpGet"]["port"];
    port.as_i64().or_else(|| {
        let name = port.as_str()?;
        container["ports"].as_sequence()?.iter().find(|p| p["name"].as_str() == Some(name))?["containerPort"].as_i64()
    })
}

fn check_daemonset(path: &Path) -> Checked {
    let docs = yaml_documents(&read(path)).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let (mut namespaces, mut accounts, mut daemonsets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, doc) in docs.iter().enumerate() {
        let (kind, api) = (doc["kind"].as_str().unwrap_or(""), doc["apiVersion"].as_str().unwrap_or(""));
        let at = format!("document {i} ({kind})");
        let (schema, want_api) = match kind {
            "Namespace" => (&NAMESPACE, "v1"),
            "ServiceAccount" => (&SERVICE_ACCOUNT, "v1"),
            "DaemonSet" => (&DAEMONSET, "apps/v1"),
            _ => {
                errors.push(format!("{at}: unexpected kind {kind:?}"));
                continue;
            }
        };
        if api != want_api {
            errors.push(format!("{at}: apiVersion {api:?}, expected {want_api:?}"));
        }
        validate(doc, schema, &at, &mut errors);
        match kind {
            "Namespace" => namespaces.push(doc),
            "ServiceAccount" => accounts.push(doc),
            _ => daemonsets.push(doc),
        }
        if kind != "Namespace" && doc["metadata"]["namespace"].as_str() != Some("toa-system") {
            errors.push(format!("{at}: not in namespace toa-system"));
        }
    }
    if namespaces.len() != 1 || namespaces[0]["metadata"]["name"].as_str() != Some("toa-system") {
        errors.push("expected one Namespace, toa-system".into());
    }
    let [ds] = daemonsets[..] else {
        errors.push(format!("expected one DaemonSet, found {}", daemonsets.len()));
        return Err(errors);
    };
    if !errors.is_empty() {
        // The checks below assume the structure is right.
        return Err(errors);
    }
    let mut err = |e: String| errors.push(e);

    if ds["metadata"]["name"].as_str() != Some("toa") {
        err("the DaemonSet is not named toa".into());
    }
    let spec = &ds["spec"];
    let selector = spec["selector"]["matchLabels"].as_mapping().unwrap();
    let labels = &spec["template"]["metadata"]["labels"];
    if selector.is_empty() {
        err("selector.matchLabels is empty".into());
    }
    for (k, v) in selector {
        if labels.get(k) != Some(v) {
            err(format!("selector label {} does not match the template's labels", describe(k)));
        }
    }
    if spec["updateStrategy"]["type"].as_str() != Some("RollingUpdate") {
        err("updateStrategy is not RollingUpdate".into());
    }

    let pod = &spec["template"]["spec"];
    let account = pod["serviceAccountName"].as_str().unwrap_or("default");
    if !accounts.iter().any(|a| a["metadata"]["name"].as_str() == Some(account)) {
        err(format!("serviceAccountName {account:?} is not a ServiceAccount of this file"));
    }
    if pod["hostNetwork"].as_bool() != Some(true) {
        err("hostNetwork is not true (probes and Prometheus reach the node's port)".into());
    }
    if pod["hostPID"].as_bool() == Some(true) {
        err("hostPID is true".into());
    }
    if pod["priorityClassName"].as_str() != Some("system-node-critical") {
        err("priorityClassName is not system-node-critical".into());
    }
    let tolerates_all = pod["tolerations"].as_sequence().is_some_and(|ts| {
        ts.iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t.get("key").is_none() && t.get("effect").is_none())
    });
    if !tolerates_all {
        err("no toleration with operator Exists (and no key or effect): tainted nodes get no agent".into());
    }

    let containers = pod["containers"].as_sequence().unwrap();
    let Some(c) = containers.iter().find(|c| c["name"].as_str() == Some("toa")) else {
        err("no container named toa".into());
        return Err(errors);
    };
    if c["image"].as_str() != Some(format!("ghcr.io/toa-rs/toa:{}", env!("CARGO_PKG_VERSION")).as_str()) {
        err(format!("image {:?} is not ghcr.io/toa-rs/toa:{}", c["image"], env!("CARGO_PKG_VERSION")));
    }
    // Without `command`, the image's ENTRYPOINT (/toa) runs the args.
    let mut argv = strings(&c["command"]);
    if argv.is_empty() {
        argv.push("/toa");
    }
    argv.extend(strings(&c["args"]));
    if argv.first().map(|a| Path::new(a).file_name() == Some("toa".as_ref())) != Some(true)
        || argv.get(1) != Some(&"run")
    {
        err(format!("the container does not run `toa run`: {argv:?}"));
    }
    if !argv.contains(&"--keep-loaded") {
        err("`toa run` lacks --keep-loaded: a pod restart would drop every client address".into());
    }
    if flag_value(&argv, "--log-format") != Some("json") {
        err("`toa run` lacks --log-format json".into());
    }
    let metrics = flag_value(&argv, "--metrics");
    if metrics != Some(format!("0.0.0.0:{METRICS_PORT}").as_str()) {
        err(format!("--metrics is {metrics:?}, expected 0.0.0.0:{METRICS_PORT}"));
    }
    let declared =
        c["ports"].as_sequence().is_some_and(|ps| ps.iter().any(|p| p["containerPort"].as_i64() == Some(METRICS_PORT)));
    if !declared {
        err(format!("containerPort {METRICS_PORT} is not declared"));
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let p = &c[probe];
        if p.is_null() {
            err(format!("no {probe}"));
            continue;
        }
        if p["httpGet"]["path"].as_str() != Some(path) {
            err(format!("{probe} does not get {path}"));
        }
        let port = probe_port(p, c);
        if port != Some(METRICS_PORT) {
            err(format!("{probe} port is {port:?}, not the metrics port {METRICS_PORT}"));
        }
    }

    let sc = &c["securityContext"];
    if sc["privileged"].as_bool() != Some(false) {
        err("securityContext.privileged is not false".into());
    }
    let add = strings(&sc["capabilities"]["add"]);
    let add_set: BTreeSet<&str> = add.iter().copied().collect();
    if add_set != CAPABILITIES.iter().copied().collect() || add.len() != CAPABILITIES.len() {
        err(format!("capabilities.add is {add:?}, expected exactly {CAPABILITIES:?}"));
    }
    if strings(&sc["capabilities"]["drop"]) != ["ALL"] {
        err("capabilities.drop is not [ALL]".into());
    }

    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    for v in &volumes {
        let sources = ["hostPath", "configMap", "emptyDir"].iter().filter(|s| v.get(**s).is_some()).count();
        if sources != 1 {
            err(format!("volume {:?} has {sources} sources", v["name"]));
        }
    }
    let mounts = c["volumeMounts"].as_sequence().cloned().unwrap_or_default();
    for m in &mounts {
        if !volumes.iter().any(|v| v["name"] == m["name"]) {
            err(format!("volumeMount {:?} names no volume", m["name"]));
        }
        // The API server refuses Bidirectional propagation in unprivileged containers.
        if m["mountPropagation"].as_str() == Some("Bidirectional") {
            err(format!("volumeMount {:?} is Bidirectional in an unprivileged container", m["name"]));
        }
    }
    for host_path in ["/sys/fs/bpf", "/sys/fs/cgroup"] {
        let mounted = volumes
            .iter()
            .filter(|v| v["hostPath"]["path"].as_str() == Some(host_path))
            .any(|v| mounts.iter().any(|m| m["name"] == v["name"] && m["mountPath"].as_str() == Some(host_path)));
        if !mounted {
            err(format!("hostPath {host_path} is not mounted at {host_path}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[test]
fn daemonset_is_valid_and_runs_the_agent_as_intended() {
    let path = deploy_file("kubernetes/daemonset.yaml");
    assert_ok(&path, check_daemonset(&path));
}

#[test]
fn daemonset_check_rejects_broken_copies() {
    rejects_broken_copies(
        "kubernetes/daemonset.yaml",
        check_daemonset,
        &[
            ("yaml-syntax", "  selector:\n", "  selector:\n\tbad: 1\n", "does not parse"),
            ("kind", "kind: DaemonSet", "kind: Deployment", "unexpected kind"),
            ("api-version", "apiVersion: apps/v1", "apiVersion: apps/v1beta2", "apiVersion"),
            ("misspelled-key", "      tolerations:", "      toleration:", "unknown key toleration"),
            (
                "unquoted-annotation",
                "prometheus.io/scrape: \"true\"",
                "prometheus.io/scrape: true",
                "expected a string",
            ),
            ("port-as-string", "containerPort: 9431", "containerPort: \"9431\"", "expected an integer"),
            ("no-containers", "      containers:", "      kontainers:", "missing required key \"containers\""),
            (
                "selector",
                "matchLabels:\n      app.kubernetes.io/name: toa",
                "matchLabels:\n      app.kubernetes.io/name: tao",
                "does not match the template",
            ),
            ("not-run", "args: [\"run\",", "args: [\"load\",", "does not run `toa run`"),
            ("keep-loaded", "\"--keep-loaded\", ", "", "--keep-loaded"),
            ("metrics-loopback", "\"0.0.0.0:9431\"", "\"127.0.0.1:9431\"", "--metrics"),
            ("probe-port", "port: 9431", "port: 8080", "livenessProbe port"),
            ("privileged", "privileged: false", "privileged: true", "privileged is not false"),
            ("extra-capability", "DAC_READ_SEARCH]", "DAC_READ_SEARCH, SYS_MODULE]", "capabilities.add"),
            ("missing-capability", "SYS_ADMIN, ", "", "capabilities.add"),
            ("bidirectional", "mountPropagation: HostToContainer", "mountPropagation: Bidirectional", "Bidirectional"),
            ("cgroup-volume", "path: /sys/fs/cgroup\n", "path: /sys/fs/cgroupx\n", "hostPath /sys/fs/cgroup"),
            ("bpffs-mount", "mountPath: /sys/fs/bpf", "mountPath: /bpf", "hostPath /sys/fs/bpf"),
            ("tolerations", "operator: Exists", "operator: Equal", "operator Exists"),
            ("image", "ghcr.io/toa-rs/toa:0.1.0", "ghcr.io/toa-rs/toa:latest", "image"),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Containerfile.

/// Instructions (keyword, arguments) of a Containerfile, continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                out.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

fn check_containerfile(path: &Path) -> Checked {
    let all = instructions(&read(path));
    let mut errors = Vec::new();
    let froms: Vec<&String> = all.iter().filter(|(k, _)| k == "FROM").map(|(_, a)| a).collect();
    if froms != [&"scratch".to_owned()] {
        errors.push(format!("expected one stage, FROM scratch (the build pulls nothing), found {froms:?}"));
    }
    if !all.iter().any(|(k, a)| k == "COPY" && a == "toa /toa") {
        errors.push("it does not COPY toa /toa (the release tarball's static binary)".into());
    }
    if !all.iter().all(|(k, _)| ["FROM", "COPY", "ENTRYPOINT", "CMD", "LABEL", "USER"].contains(&k.as_str())) {
        errors.push("the image holds more than the binary".into());
    }
    // Exec form: with a shell form, scratch has no /bin/sh to run it.
    let entrypoint = all.iter().rev().find(|(k, _)| k == "ENTRYPOINT").map(|(_, a)| a.as_str());
    let parsed: Option<Vec<String>> = entrypoint.and_then(|e| serde_json::from_str(e).ok());
    if parsed.as_deref() != Some(&["/toa".to_owned()][..]) {
        errors.push(format!("ENTRYPOINT is {entrypoint:?}, expected [\"/toa\"]"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[test]
fn containerfile_puts_the_static_binary_on_scratch() {
    let path = deploy_file("kubernetes/Containerfile");
    assert_ok(&path, check_containerfile(&path));
}

#[test]
fn containerfile_check_rejects_broken_copies() {
    rejects_broken_copies(
        "kubernetes/Containerfile",
        check_containerfile,
        &[
            ("shell-entrypoint", "ENTRYPOINT [\"/toa\"]", "ENTRYPOINT /toa", "ENTRYPOINT"),
            ("not-the-binary", "COPY toa /toa", "COPY . /toa", "COPY toa /toa"),
            ("not-scratch", "FROM scratch", "FROM debian:12", "scratch"),
            ("a-build-stage", "FROM scratch", "FROM rust:1 AS build\nRUN cargo build\nFROM scratch", "one stage"),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Grafana: every query names only the agent's metrics, filtered on the node variable.

const PROMQL_FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "count_values",
    "delta",
    "deriv",
    "floor",
    "group",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "predict_linear",
    "quantile",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "stddev",
    "stdvar",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
];
/// Keywords followed by a list of label names in parentheses.
const PROMQL_GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
const PROMQL_KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];

/// The metric selectors of a PromQL expression: (metric name, label matchers).
fn promql_selectors(expr: &str) -> Result<Vec<(String, String)>, String> {
    let b = expr.as_bytes();
    // Index just past the string literal that starts at `i`.
    let skip_string = |mut i: usize| {
        let quote = b[i];
        i += 1;
        while i < b.len() && b[i] != quote {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        (i + 1).min(b.len())
    };
    // Index just past the bracket that closes the one at `i`.
    let close = |mut i: usize, open: u8, shut: u8| -> Result<usize, String> {
        let mut depth = 0;
        while i < b.len() {
            match b[i] {
                b'"' | b'\'' | b'`' => {
                    i = skip_string(i);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == shut => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(i + 1);
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Err(format!("unbalanced {:?} in {expr:?}", open as char))
    };
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = Vec::new();
    let mut parens = 0i32;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && is_word(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let after = i + b[i..].iter().take_while(|c| c.is_ascii_whitespace()).count();
            // `sum by (…) (…)`: the aggregation comes before its parenthesis.
            let call = b.get(after) == Some(&b'(')
                || (PROMQL_FUNCTIONS.contains(&word) && ["by", "without"].iter().any(|k| expr[after..].starts_with(k)));
            if PROMQL_GROUPING.contains(&word) {
                // by (label, …): label names, not metrics.
                if call {
                    i = close(after, b'(', b')')?;
                }
            } else if PROMQL_KEYWORDS.contains(&word) {
            } else if call {
                if !PROMQL_FUNCTIONS.contains(&word) {
                    return Err(format!("unknown function {word}() in {expr:?}"));
                }
            } else {
                let mut matchers = String::new();
                if b.get(i) == Some(&b'{') {
                    let end = close(i, b'{', b'}')?;
                    matchers = expr[i + 1..end - 1].to_owned();
                    i = end;
                }
                out.push((word.to_owned(), matchers));
            }
            continue;
        }
        match c {
            b'{' => return Err(format!("a selector without a metric name in {expr:?}")),
            b'[' => i = close(i, b'[', b']')?,
            b'"' | b'\'' | b'`' => i = skip_string(i),
            b'(' | b')' => {
                parens += if c == b'(' { 1 } else { -1 };
                if parens < 0 {
                    return Err(format!("unbalanced ')' in {expr:?}"));
                }
                i += 1;
            }
            // A Grafana variable: $name or ${name}.
            b'$' if b.get(i + 1) == Some(&b'{') => i = close(i + 1, b'{', b'}')?,
            b'$' => i += 1 + b[i + 1..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'_').count(),
            // Numbers and durations: 0.5, 1e3, 5m.
            b'0'..=b'9' | b'.' => i += b[i..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'.').count(),
            _ => i += 1,
        }
    }
    if parens != 0 {
        return Err(format!("unbalanced '(' in {expr:?}"));
    }
    Ok(out)
}

fn all_panels(panels: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in panels.as_array().into_iter().flatten() {
        out.push(p);
        out.extend(all_panels(&p["panels"]));
    }
    out
}

fn check_dashboard(path: &Path) -> Checked {
    let d: serde_json::Value =
        serde_json::from_str(&read(path)).map_err(|e| vec![format!("JSON does not parse: {e}")])?;
    let mut errors = Vec::new();
    let mut err = |e: String| errors.push(e);
    for key in ["uid", "title"] {
        if d[key].as_str().is_none_or(str::is_empty) {
            err(format!("no {key}"));
        }
    }
    if !d["schemaVersion"].as_u64().is_some_and(|v| (36..=41).contains(&v)) {
        err(format!("schemaVersion {} is not a recent one (36–41)", d["schemaVersion"]));
    }
    let vars = d["templating"]["list"].as_array().cloned().unwrap_or_default();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    if !var("datasource").is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus") {
        err("no `datasource` variable of type datasource (prometheus)".into());
    }
    let node_query = "label_values(toa_build_info, instance)";
    let node_var = var("instance").is_some_and(|v| {
        v["type"] == "query"
            && (v["query"] == node_query || v["query"]["query"] == node_query)
            && (v["definition"].is_null() || v["definition"] == node_query)
            && v["datasource"]["uid"] == "${datasource}"
    });
    if !node_var {
        err(format!("no `instance` variable from {node_query} on ${{datasource}}"));
    }

    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in all_panels(&d["panels"]) {
        let title = p["title"].as_str().unwrap_or("?");
        if !p["id"].as_u64().is_some_and(|id| ids.insert(id)) {
            err(format!("panel {title:?}: missing or duplicate id"));
        }
        let g = &p["gridPos"];
        let fits = ["h", "w", "x", "y"].iter().all(|k| g[*k].is_u64())
            && g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24;
        if !fits {
            err(format!("panel {title:?}: gridPos missing or wider than 24"));
        }
        if p["type"] == "row" {
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            err(format!("panel {title:?}: datasource is not ${{datasource}}"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            err(format!("panel {title:?}: no queries"));
        }
        for t in &targets {
            if t["datasource"]["uid"] != "${datasource}" {
                err(format!("panel {title:?}: a query's datasource is not ${{datasource}}"));
            }
            let Some(expr) = t["expr"].as_str() else {
                err(format!("panel {title:?}: a query without expr"));
                continue;
            };
            match promql_selectors(expr) {
                Err(e) => err(format!("panel {title:?}: {e}")),
                Ok(selectors) if selectors.is_empty() => err(format!("panel {title:?}: no metric in {expr:?}")),
                Ok(selectors) => {
                    for (metric, matchers) in selectors {
                        if !metrics().contains(&metric) {
                            err(format!("panel {title:?}: unknown metric {metric}"));
                        }
                        if !matchers.contains("instance=~\"$instance\"") {
                            err(format!("panel {title:?}: {metric} is not filtered on instance=~\"$instance\""));
                        }
                        used.insert(metric);
                    }
                }
            }
        }
    }
    // What the dashboard is for: connections with and without an address, bad options, and
    // what getpeername() answered.
    for m in [
        "toa_syn_recv_sock_toa_total",
        "toa_syn_recv_sock_no_toa_total",
        "toa_data_segment_toa_total",
        "toa_option_malformed_total",
        "toa_untrusted_option_total",
        "toa_getname_toa_ok_total",
        "toa_getname_toa_mismatch_total",
        "toa_getname_toa_bypass_total",
        "toa_getname_toa_empty_total",
    ] {
        if !used.contains(m) {
            err(format!("no panel shows {m}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[test]
fn dashboard_queries_only_the_agents_metrics() {
    let path = deploy_file("grafana/toa-dashboard.json");
    assert_ok(&path, check_dashboard(&path));
}

#[test]
fn promql_selectors_are_found() {
    let s = promql_selectors(
        r#"sum by (instance) (rate(a_total{x="}"}[5m])) / on(instance) group_left(version) b offset 1h > bool 0.5 or vector(0) * $v"#,
    )
    .unwrap();
    assert_eq!(s, [("a_total".to_owned(), "x=\"}\"".to_owned()), ("b".to_owned(), String::new())]);
    assert!(promql_selectors("rate(x[5m]").is_err());
    assert!(promql_selectors("{__name__=\"x\"}").is_err());
    assert!(promql_selectors("ratee(x[5m])").is_err());
}

#[test]
fn dashboard_check_rejects_broken_copies() {
    rejects_broken_copies(
        "grafana/toa-dashboard.json",
        check_dashboard,
        &[
            ("json-syntax", "\"panels\": [", "\"panels\": [[", "does not parse"),
            (
                "foreign-metric",
                "toa_option_malformed_total{",
                "node_option_malformed_total{",
                "unknown metric node_option",
            ),
            (
                "misspelled-metric",
                "toa_getname_toa_ok_total{",
                "toa_getname_ok_total{",
                "unknown metric toa_getname_ok_total",
            ),
            ("unknown-function", "clamp_min(", "clamp_minimum(", "unknown function"),
            (
                "no-node-filter",
                "toa_storage_failed_total{instance=~\\\"$instance\\\"}",
                "toa_storage_failed_total",
                "not filtered",
            ),
            ("fixed-datasource", "\"uid\": \"${datasource}\"", "\"uid\": \"prometheus-prod\"", "datasource"),
            (
                "node-variable",
                "label_values(toa_build_info, instance)",
                "label_values(up, instance)",
                "`instance` variable",
            ),
            (
                "missing-panel",
                "toa_untrusted_option_total",
                "toa_option_malformed_total",
                "no panel shows toa_untrusted_option_total",
            ),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// systemd: the unit's contents, then systemd-analyze's verdict on it.

/// (section, key, value) of a unit file, in order; malformed lines are errors.
fn unit_entries(text: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            section = name.strip_suffix(']').ok_or(format!("line {}: bad section header {line:?}", n + 1))?.to_owned();
            continue;
        }
        let (k, v) = line.split_once('=').ok_or(format!("line {}: not key=value: {line:?}", n + 1))?;
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

fn unit_values<'a>(entries: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    entries.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str()).collect()
}

/// The space-separated words of every `key=` line of [Service].
fn unit_words<'a>(entries: &'a [(String, String, String)], key: &str) -> BTreeSet<&'a str> {
    unit_values(entries, "Service", key).into_iter().flat_map(str::split_whitespace).collect()
}

fn is_true(v: &str) -> bool {
    ["yes", "true", "on", "1"].contains(&v.to_ascii_lowercase().as_str())
}

/// `systemd-analyze verify` on a copy whose ExecStart is /bin/true (toa is not installed here):
/// a failure, or any complaint about the unit (unknown keys and bad values are only warnings).
fn systemd_verify(unit: &Path) -> Result<(), String> {
    let text = read(unit);
    let scratch = Scratch::new("verify");
    let copy = scratch.write("toa.service", &text.replace("ExecStart=/usr/local/bin/toa ", "ExecStart=/bin/true "));
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .map_err(|e| format!("cannot run systemd-analyze ({e}): install systemd to run this test"))?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let complaints: Vec<&str> = said.lines().filter(|l| l.contains("toa.service")).collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(format!("systemd-analyze verify: {} {said}", out.status));
    }
    Ok(())
}

/// The exposure score of `systemd-analyze security`, at most 4.0 ("OK").
fn systemd_exposure(unit: &Path) -> Result<(), String> {
    let scratch = Scratch::new("security");
    let copy = scratch.write("toa.service", &read(unit));
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=40", "--no-pager"])
        .arg(&copy)
        .output()
        .map_err(|e| format!("cannot run systemd-analyze ({e})"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout);
        let verdict = said.lines().find(|l| l.contains("Overall exposure")).unwrap_or("no verdict");
        return Err(format!(
            "systemd-analyze security: exposure above 4.0: {verdict} {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn check_unit(path: &Path) -> Checked {
    let entries = unit_entries(&read(path)).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let get = |section: &str, key: &str| unit_values(&entries, section, key);
    let one = |key: &str| unit_values(&entries, "Service", key).last().copied().unwrap_or("");
    let words = |key: &str| unit_words(&entries, key);
    let mut err = |e: String| errors.push(e);

    if one("ExecStart") != "/usr/local/bin/toa run --config /etc/toa/toa.toml" {
        err(format!("ExecStart is {:?}", one("ExecStart")));
    }
    if !["simple", "exec"].contains(&one("Type")) {
        err(format!("Type is {:?}, expected simple or exec", one("Type")));
    }
    if !(one("ExecReload").contains("kill") && one("ExecReload").contains("-HUP $MAINPID")) {
        err("ExecReload does not send SIGHUP to $MAINPID".into());
    }
    let caps: BTreeSet<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let got: BTreeSet<String> = words(key).into_iter().map(str::to_owned).collect();
        if got != caps {
            err(format!("{key} is {got:?}, expected {caps:?}"));
        }
    }
    for (key, want) in [
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("SystemCallArchitectures", "native"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LimitMEMLOCK", "infinity"),
    ] {
        if one(key) != want {
            err(format!("{key} is {:?}, expected {want}", one(key)));
        }
    }
    if !words("ReadWritePaths").contains("/sys/fs/bpf") {
        err("ReadWritePaths lacks /sys/fs/bpf: pinning would fail on the read-only /sys".into());
    }
    if !words("ReadOnlyPaths").contains("/sys") {
        err("ReadOnlyPaths lacks /sys (in place of ProtectKernelTunables=)".into());
    }
    let families = words("RestrictAddressFamilies");
    if families != BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]) {
        err(format!("RestrictAddressFamilies is {families:?}"));
    }
    // Hardening that would break the agent.
    for (key, why) in [
        ("PrivateUsers", "capabilities in a user namespace cannot load BPF programs"),
        ("ProtectKernelTunables", "it makes /sys/fs/bpf read-only, whatever ReadWritePaths= says"),
        ("PrivateDevices", "it hides /dev/kmsg"),
        ("ProtectKernelLogs", "it hides /dev/kmsg"),
        ("PrivateNetwork", "the metrics endpoint would be unreachable"),
        ("DynamicUser", "toa must run as root"),
    ] {
        if is_true(one(key)) {
            err(format!("{key}= is on, but {why}"));
        }
    }
    if one("ProcSubset") == "pid" {
        err("ProcSubset=pid hides /proc/sys/kernel/osrelease".into());
    }
    if !["", "root", "0"].contains(&one("User")) {
        err("User= is not root: toa requires euid 0".into());
    }
    let filter = words("SystemCallFilter");
    if !filter.is_empty() && !filter.contains("bpf") && !filter.contains("@privileged") {
        err("SystemCallFilter does not allow bpf()".into());
    }
    if ["closed", "strict"].contains(&one("DevicePolicy"))
        && !get("Service", "DeviceAllow").iter().any(|d| d.starts_with("/dev/kmsg"))
    {
        err("DevicePolicy closes /dev/kmsg".into());
    }
    if !get("Install", "WantedBy").iter().any(|v| v.split_whitespace().any(|t| t == "multi-user.target")) {
        err("not WantedBy=multi-user.target".into());
    }
    if let Err(e) = systemd_verify(path) {
        err(e);
    }
    if let Err(e) = systemd_exposure(path) {
        err(e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let path = deploy_file("systemd/toa.service");
    assert_ok(&path, check_unit(&path));
}

/// The userspace drop-in on top of the unit: what systemd makes of both verifies, and adds
/// exactly what the capture reader needs.
#[test]
fn systemd_userspace_drop_in_verifies_and_adds_what_the_reader_needs() {
    let unit = read(&deploy_file("systemd/toa.service"));
    let drop_in = read(&deploy_file("systemd/userspace.conf"));
    let scratch = Scratch::new("drop-in");
    // A drop-in is read after the unit: the same as its sections appended to it.
    let merged = scratch.write("toa.service", &format!("{unit}\n{drop_in}"));
    systemd_verify(&merged).unwrap();
    let entries = unit_entries(&drop_in).unwrap();
    let words = |key| unit_words(&entries, key).into_iter().collect::<Vec<_>>();
    assert_eq!(words("CapabilityBoundingSet"), ["CAP_CHOWN", "CAP_NET_RAW", "CAP_SYS_NICE"]);
    assert_eq!(words("AmbientCapabilities"), ["CAP_CHOWN", "CAP_NET_RAW", "CAP_SYS_NICE"]);
    assert_eq!(words("RestrictAddressFamilies"), ["AF_PACKET"]);
    // The reader's own filter; a reader left running for the next start (keep_loaded), and
    // its table's directory with it.
    assert_eq!(words("SystemCallFilter"), ["seccomp"]);
    assert_eq!(unit_values(&entries, "Service", "KillMode"), ["process"]);
    assert_eq!(unit_values(&entries, "Service", "RuntimeDirectoryMode"), ["0755"]);
    assert_eq!(unit_values(&entries, "Service", "RuntimeDirectoryPreserve"), ["yes"]);
    let exec = unit_values(&entries, "Service", "ExecStart");
    assert_eq!(exec, ["", "/usr/local/bin/toa run --config /etc/toa/toa.toml --mode userspace"]);
}

#[test]
fn systemd_verify_rejects_broken_units() {
    // systemd-analyze alone, so that its own verdict is shown to be able to fail.
    let original = read(&deploy_file("systemd/toa.service"));
    for (name, from, to) in [
        ("section-header", "[Service]", "[Service"),
        ("unknown-key", "ProtectSystem=strict", "ProtectSysstem=strict"),
        ("bad-value", "Restart=on-failure", "Restart=sometimes"),
        ("missing-binary", "ExecReload=/bin/sh", "ExecReload=/no/such/sh"),
    ] {
        let scratch = Scratch::new(name);
        let path = scratch.write("toa.service", &break_text(&original, from, to));
        assert!(systemd_verify(&path).is_err(), "systemd-analyze verify accepted broken copy {name:?}");
    }
    let bare: String = original
        .lines()
        .filter(|l| {
            !["Protect", "Private", "Restrict", "CapabilityBoundingSet", "SystemCallFilter", "NoNewPrivileges"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let scratch = Scratch::new("bare");
    assert!(
        systemd_exposure(&scratch.write("toa.service", &bare)).is_err(),
        "an unhardened unit passed the exposure threshold"
    );
}

#[test]
fn systemd_unit_check_rejects_broken_copies() {
    rejects_broken_copies(
        "systemd/toa.service",
        check_unit,
        &[
            ("header", "[Install]", "[Install", "bad section header"),
            ("exec-start", "--config /etc/toa/toa.toml", "--config /etc/toa.toml", "ExecStart"),
            ("reload", "-HUP $MAINPID", "-TERM $MAINPID", "SIGHUP"),
            ("no-bpffs", "ReadWritePaths=/sys/fs/bpf", "ReadWritePaths=/run/toa", "ReadWritePaths lacks /sys/fs/bpf"),
            (
                "extra-capability",
                "CapabilityBoundingSet=CAP_BPF",
                "CapabilityBoundingSet=CAP_SYS_MODULE CAP_BPF",
                "CapabilityBoundingSet",
            ),
            ("private-users", "ProtectHome=yes", "ProtectHome=yes\nPrivateUsers=yes", "PrivateUsers"),
            ("kernel-logs", "ProtectHome=yes", "ProtectHome=yes\nProtectKernelLogs=yes", "ProtectKernelLogs"),
            (
                "kernel-tunables",
                "ProtectHome=yes",
                "ProtectHome=yes\nProtectKernelTunables=yes",
                "ProtectKernelTunables",
            ),
            ("writable-sys", "ReadOnlyPaths=/proc/sys /sys", "ReadOnlyPaths=/proc/sys", "ReadOnlyPaths lacks /sys"),
            ("no-bpf-syscall", "SystemCallFilter=@system-service bpf", "SystemCallFilter=@system-service", "bpf()"),
            ("memlock", "LimitMEMLOCK=infinity", "LimitMEMLOCK=64K", "LimitMEMLOCK"),
            ("unknown-key", "LockPersonality=yes", "LockPersonality=yes\nLockPersonalty=yes", "systemd-analyze verify"),
            ("install", "WantedBy=multi-user.target", "WantedBy=graphical.target", "multi-user.target"),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// The example /etc/toa/toa.toml: every key documented, and each documented value accepted by
// the agent's own parser.

const CONFIG_KEYS: &[&str] = &[
    "cgroup",
    "pin_dir",
    "metrics",
    "keep_loaded",
    "log_format",
    "mode",
    "table",
    "table_entries",
    "accept_wait_us",
    "entry_ttl",
    "search_secs",
    "table_group",
    "udp",
    "udp_ttl",
    "udp_opp_interfaces",
];

fn check_config_example(path: &Path) -> Checked {
    let text = read(path);
    let mut errors = Vec::new();
    if let Err(e) = toa::config::ConfigFile::parse(&text) {
        errors.push(format!("the file as shipped does not parse: {e}"));
    }
    // The commented settings, uncommented.
    let mut settings = Vec::new();
    for line in text.lines() {
        let Some(body) = line.strip_prefix('#').map(str::trim) else { continue };
        if let Some((key, value)) = body.split_once('=') {
            if CONFIG_KEYS.contains(&key.trim()) {
                settings.push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
    }
    for key in CONFIG_KEYS {
        let n = settings.iter().filter(|(k, _)| k == key).count();
        if n != 1 {
            errors.push(format!("key {key} is documented {n} times, expected once"));
        }
    }
    let document: String = settings.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    match toa::config::ConfigFile::parse(&document) {
        Err(e) => errors.push(format!("the documented settings do not parse: {e}")),
        Ok(c) => {
            // The values shown as defaults are the defaults.
            if c.metrics != Some(toa::config::DEFAULT_METRICS.parse().unwrap()) {
                errors.push(format!(
                    "metrics shown as {:?}, the default is {}",
                    c.metrics,
                    toa::config::DEFAULT_METRICS
                ));
            }
            if c.pin_dir.as_deref() != Some(Path::new(toa::DEFAULT_PIN_DIR)) {
                errors.push(format!("pin_dir shown as {:?}, the default is {}", c.pin_dir, toa::DEFAULT_PIN_DIR));
            }
            if c.keep_loaded != Some(false) {
                errors.push(format!("keep_loaded shown as {:?}, the default is false", c.keep_loaded));
            }
            let tuning = toa::backend::userspace::Tuning::default();
            let shown = (c.table_entries, c.accept_wait_us, c.entry_ttl, c.search_secs, c.table_group);
            let defaults = (
                Some(tuning.table_entries),
                Some(tuning.accept_wait_us),
                Some(tuning.entry_ttl),
                Some(tuning.search_secs),
                Some(tuning.table_group),
            );
            if shown != defaults {
                errors.push(format!("userspace settings shown as {shown:?}, the defaults are {defaults:?}"));
            }
            if (c.udp, c.udp_ttl, c.udp_opp_interfaces.is_empty())
                != (Some(false), Some(toa_common::udp::UDP_TTL_DEFAULT_SECS), true)
            {
                errors.push(format!("udp/udp_ttl shown as {:?}/{:?}, not the defaults", c.udp, c.udp_ttl));
            }
            if c.table.as_deref() != Some(Path::new(toa::backend::userspace::DEFAULT_TABLE))
                || c.mode != Some(Default::default())
            {
                errors.push(format!("table/mode shown as {:?}/{:?}, not the defaults", c.table, c.mode));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[test]
fn config_example_documents_every_key() {
    let path = deploy_file("systemd/toa.toml");
    assert_ok(&path, check_config_example(&path));
}

#[test]
fn config_example_check_rejects_broken_copies() {
    rejects_broken_copies(
        "systemd/toa.toml",
        check_config_example,
        &[
            ("bad-address", "# metrics = \"127.0.0.1:9431\"", "# metrics = \"localhost:9431\"", "do not parse"),
            ("bad-format", "# log_format = \"text\"", "# log_format = \"xml\"", "do not parse"),
            ("undocumented", "# keep_loaded = false", "", "keep_loaded is documented 0 times"),
            ("wrong-default", "# pin_dir = \"/sys/fs/bpf/toa\"", "# pin_dir = \"/sys/fs/bpf/other\"", "pin_dir shown"),
            ("live-typo", "# cgroup = ", "cgrup = \"/x\"\n# cgroup = ", "as shipped does not parse"),
        ],
    );
}
