//! The kernel matrix: the end-to-end suite on Debian's 6.1 and 6.12 cloud kernels under qemu,
//! and on the host kernel natively, with the verifier's instruction count per program.
//!
//! Each guest boots from an initramfs holding the static (musl) `toa`, the end-to-end test
//! binaries, the servers they start (the Rust examples and the Python scripts, with just the
//! Python modules they import), `ip` and `bpftool` with their libraries, busybox, and the
//! kernel's veth and TCP socket-diagnostics modules. Files keep the absolute paths they have on
//! the host, so the test binaries find `toa` and the servers where they were built to find them.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cpio::Archive, output, run};

const MUSL: &str = "x86_64-unknown-linux-musl";
/// Debian's cloud kernels to test: (label, apt-cache pattern).
const DEBIAN_SERIES: [(&str, &str); 2] =
    [("6.1", r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$"), ("6.12", r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$")];
const VM_TIMEOUT: Duration = Duration::from_secs(900);
const MARK: &str = "TOA-MATRIX";

/// What one kernel did.
pub struct Row {
    pub kernel: String,
    pub place: &'static str,
    /// (case, passed)
    pub cases: Vec<(String, bool)>,
    /// (program, verified instructions)
    pub insns: Vec<(String, u64)>,
    pub problem: Option<String>,
}

impl Row {
    fn ok(&self) -> bool {
        self.problem.is_none() && !self.cases.is_empty() && self.cases.iter().all(|(_, ok)| *ok)
    }

    fn line(&self) -> String {
        let passed = self.cases.iter().filter(|(_, ok)| *ok).count();
        let insns: Vec<String> = self.insns.iter().map(|(p, n)| format!("{p} {n}")).collect();
        let mut line = format!(
            "{:<28} {:<5} {}/{} cases passed; verified insns: {}",
            self.kernel,
            self.place,
            passed,
            self.cases.len(),
            if insns.is_empty() { "-".to_owned() } else { insns.join(", ") }
        );
        let failed: Vec<&str> = self.cases.iter().filter(|(_, ok)| !*ok).map(|(c, _)| c.as_str()).collect();
        if !failed.is_empty() {
            line.push_str(&format!("; FAILED: {}", failed.join(", ")));
        }
        if let Some(p) = &self.problem {
            line.push_str(&format!("; {p}"));
        }
        line
    }
}

struct Kernel {
    name: String,
    vmlinuz: PathBuf,
    /// Modules the tests need that this kernel builds as modules, in load order.
    modules: Vec<PathBuf>,
}

/// What the tests need when a kernel does not build it in: veth pairs, and the TCP socket
/// diagnostics `toa conns` uses (tcp_diag needs inet_diag).
const MODULES: [&str; 3] = ["drivers/net/veth", "net/ipv4/inet_diag", "net/ipv4/tcp_diag"];

struct Built {
    toa: PathBuf,
    /// The end-to-end test binaries (e2e, service, policy).
    tests: Vec<PathBuf>,
    /// The example servers the tests start.
    examples: Vec<PathBuf>,
}

/// Test binaries run in each guest, and the examples they start.
const TESTS: [&str; 3] = ["e2e", "policy", "service"];
const EXAMPLES: [&str; 2] = ["peer_echo", "client_addr"];

/// Runs the matrix; fails unless every case passes on every kernel.
pub fn run_matrix(root: &Path, extra_kernels: &[PathBuf], debian: bool, readme: bool) -> Result<()> {
    tools()?;
    let built = build(root)?;
    let work = root.join("target/kernels");
    fs::create_dir_all(&work)?;

    let mut kernels = Vec::new();
    if debian {
        for (label, pattern) in DEBIAN_SERIES {
            kernels.push(debian_kernel(&work, label, pattern)?);
        }
    }
    for path in extra_kernels {
        kernels.push(user_kernel(path)?);
    }

    let mut rows = Vec::new();
    let initrd_base = initramfs_base(root, &built)?;
    for kernel in &kernels {
        println!("xtask: booting {} under qemu", kernel.name);
        rows.push(boot(&work, kernel, &initrd_base)?);
    }
    println!("xtask: running the same binaries on the host kernel");
    rows.push(host_row(root, &built)?);

    println!("\nkernel matrix:");
    for row in &rows {
        println!("{}", row.line());
    }
    let table = markdown(&rows);
    fs::write(work.join("matrix.md"), &table)?;
    if readme {
        update_readme(&root.join("README.md"), &table)?;
    }
    if !rows.iter().all(Row::ok) {
        bail!("the kernel matrix failed (details above; guest logs in {})", work.display());
    }
    // The unit as operators install it, under a real systemd, on Debian 12's default kernel.
    if let Some(kernel) = kernels.first().filter(|_| debian) {
        crate::systemd::check(root, &work, &kernel.vmlinuz, &built.toa)?;
    }
    Ok(())
}

/// qemu, busybox, xz and Debian's own python3 (the host's `python3` may be another build).
fn tools() -> Result<()> {
    let needed = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("xz", "xz-utils"),
        ("/usr/bin/python3", "python3"),
    ];
    crate::apt_install_missing(&needed)?;
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !targets.lines().any(|t| t.trim() == MUSL) {
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    Ok(())
}

fn build(root: &Path) -> Result<Built> {
    crate::cargo(&["build", "--release", "--target", MUSL, "--package", "toa", "--bins", "--examples"])?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--release", "--target", MUSL, "--package", "toa", "--no-run", "--message-format=json"]);
    for test in TESTS {
        cmd.args(["--test", test]);
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the end-to-end test binaries failed");
    }
    let messages: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut tests = Vec::new();
    for test in TESTS {
        let exe = messages
            .iter()
            .filter(|m| m["target"]["name"] == test && m["profile"]["test"] == true)
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo did not report the {test} test executable"))?;
        tests.push(exe);
    }
    let release = root.join("target").join(MUSL).join("release");
    let examples = EXAMPLES.iter().map(|e| release.join("examples").join(e)).collect();
    Ok(Built { toa: release.join("toa"), tests, examples })
}

fn debian_kernel(work: &Path, label: &str, pattern: &str) -> Result<Kernel> {
    let search = || output(Command::new("apt-cache").args(["search", "--names-only", pattern])).unwrap_or_default();
    let mut found = search();
    if found.trim().is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        found = search();
    }
    let mut packages: Vec<String> =
        found.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
    packages.sort_by_key(|p| version_key(p));
    let package = packages.pop().with_context(|| format!("apt offers no Debian {label} cloud kernel ({pattern})"))?;
    let dir = work.join(&package);
    if !dir.join("boot").is_dir() {
        let debs = work.join("debs");
        fs::create_dir_all(&debs)?;
        // apt-get download would drop privileges to _apt, which cannot write into target/.
        run(Command::new("apt-get")
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", &package])
            .current_dir(&debs))?;
        let deb = fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    }
    let vmlinuz = fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("no vmlinuz in {}", dir.display()))?;
    Ok(Kernel { name: package.trim_start_matches("linux-image-").to_owned(), modules: find_modules(&dir), vmlinuz })
}

/// Numeric parts of a package name, so that 6.12.117 sorts after 6.12.99.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect()
}

fn user_kernel(vmlinuz: &Path) -> Result<Kernel> {
    if !vmlinuz.is_file() {
        bail!("--kernel {}: no such file (pass the path of a vmlinuz)", vmlinuz.display());
    }
    // A kernel unpacked from a package: its modules sit next to boot/.
    let modules = vmlinuz.parent().and_then(Path::parent).map(find_modules).unwrap_or_default();
    let name =
        vmlinuz.file_name().map(|n| n.to_string_lossy().trim_start_matches("vmlinuz-").to_owned()).unwrap_or_default();
    Ok(Kernel { name, vmlinuz: vmlinuz.to_owned(), modules })
}

/// The `MODULES` this package ships (those it builds in are simply absent).
fn find_modules(package_root: &Path) -> Vec<PathBuf> {
    let Some(version) =
        fs::read_dir(package_root.join("lib/modules")).ok().and_then(|mut d| d.next()).and_then(Result::ok)
    else {
        return Vec::new();
    };
    MODULES
        .iter()
        .filter_map(|m| {
            ["ko", "ko.xz"].iter().map(|ext| version.path().join(format!("kernel/{m}.{ext}"))).find(|p| p.is_file())
        })
        .collect()
}

/// Everything but the kernel's own module: binaries, tools, libraries, Python, init.
fn initramfs_base(root: &Path, built: &Built) -> Result<Archive> {
    let mut a = Archive::default();
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/etc"] {
        a.dir(dir);
    }
    a.symlink("/var/run", "/run");
    for path in std::iter::once(&built.toa).chain(&built.tests).chain(&built.examples) {
        add_file(&mut a, path, 0o755)?;
    }
    let scripts: Vec<PathBuf> = fs::read_dir(root.join("toa/tests"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "py"))
        .collect();
    for script in &scripts {
        add_file(&mut a, script, 0o644)?;
    }
    // The service test checks the dashboard's metric names against a live scrape.
    add_file(&mut a, &root.join("deploy/grafana/toa-dashboard.json"), 0o644)?;

    let busybox = crate::which("busybox").context("busybox not found")?;
    add_with_libs(&mut a, &busybox, "/bin/busybox")?;
    for tool in ["ip", "bpftool"] {
        let path = crate::which(tool).with_context(|| format!("{tool} not found"))?;
        add_with_libs(&mut a, &path, &path.to_string_lossy())?;
    }
    // Debian's python3 and exactly the modules the test servers import (found by importing what
    // the scripts' import lines name).
    let python = fs::canonicalize("/usr/bin/python3")?;
    add_with_libs(&mut a, &python, &python.to_string_lossy())?;
    a.symlink("/usr/bin/python3", &python.to_string_lossy());
    let list = "import ast, sys\n\
                for path in sys.argv[1:]:\n\
                \x20 for node in ast.walk(ast.parse(open(path).read())):\n\
                \x20   if isinstance(node, ast.Import):\n\
                \x20       for n in node.names: __import__(n.name)\n\
                for m in list(sys.modules.values()):\n\
                \x20   f = getattr(m, '__file__', None)\n\
                \x20   if f: print(f)";
    let modules = output(Command::new(&python).env_clear().args(["-c", list]).args(&scripts))
        .context("list the Python modules the test server needs")?;
    for module in modules.lines() {
        add_file(&mut a, Path::new(module), 0o644)?;
    }

    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export RUST_BACKTRACE=0
# No tmpfs over /run or /tmp: the files below may live there (a checkout in /tmp), and the
# initramfs is RAM already.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
for m in $(cat /modules/order); do insmod /modules/$m.ko; done
ip link set lo up
echo "{MARK} kernel $(uname -r)"
cd {root}
status=0
# The userspace mode's cases run on the host (cargo xtask test): they need libtoa.so and
# dynamically linked servers, and these kernels have the eBPF hooks.
for t in {tests}; do $t --test-threads=2 --skip userspace:: 2>&1 || status=$?; done
echo "{MARK} tests-exit $status"
mkdir /sys/fs/cgroup/toa-insns
{toa} load --cgroup /sys/fs/cgroup/toa-insns >/dev/null
echo "{MARK} status-begin"; {toa} status --json; echo "{MARK} status-end"
{toa} unload >/dev/null
poweroff -f
"#,
        root = root.display(),
        tests = built.tests.iter().map(|t| t.display().to_string()).collect::<Vec<_>>().join(" "),
        toa = built.toa.display(),
    );
    a.file("/init", init.into_bytes(), 0o755);
    Ok(a)
}

fn add_file(a: &mut Archive, path: &Path, mode: u32) -> Result<()> {
    let data = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    a.file(&path.to_string_lossy(), data, mode);
    Ok(())
}

/// Adds a dynamically linked program at `dest` and the libraries `ldd` names.
fn add_with_libs(a: &mut Archive, program: &Path, dest: &str) -> Result<()> {
    a.file(dest, fs::read(program)?, 0o755);
    let Some(ldd) = output(Command::new("ldd").arg(program)) else {
        return Ok(()); // static
    };
    for line in ldd.lines() {
        let lib = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            if !a.contains(lib) {
                add_file(a, Path::new(lib), 0o755)?;
            }
        }
    }
    Ok(())
}

fn boot(work: &Path, kernel: &Kernel, base: &Archive) -> Result<Row> {
    let mut archive = base.clone();
    let mut order = String::new();
    for (i, module) in kernel.modules.iter().enumerate() {
        let data = if module.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz").arg("-dc").arg(module).output()?;
            if !out.status.success() {
                bail!("xz -dc {} failed", module.display());
            }
            out.stdout
        } else {
            fs::read(module)?
        };
        archive.file(&format!("/modules/{i}.ko"), data, 0o644);
        order.push_str(&format!("{i}\n"));
    }
    archive.file("/modules/order", order.into_bytes(), 0o644);
    let initrd = work.join(format!("{}.cpio", kernel.name));
    fs::write(&initrd, archive.into_bytes())?;
    let log_path = work.join(format!("{}.log", kernel.name));

    let (log, timed_out) = qemu_boot(&kernel.vmlinuz, &initrd, "quiet")?;
    let problem = timed_out.then(|| format!("guest did not finish within {} s", VM_TIMEOUT.as_secs()));
    let log = log.replace('\r', "");
    fs::write(&log_path, &log)?;
    let _ = fs::remove_file(&initrd);
    let mut row = parse_run(&log, "qemu", &kernel.name);
    row.problem = row.problem.or(problem);
    Ok(row)
}

/// Boots `vmlinuz` with `initrd` under qemu (software emulation: nested KVM is not usable here)
/// and returns its console output, and whether it had to be stopped after `VM_TIMEOUT`.
pub fn qemu_boot(vmlinuz: &Path, initrd: &Path, append: &str) -> Result<(String, bool)> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {append}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-system-x86_64")?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let mut timed_out = false;
    while child.try_wait()?.is_none() {
        if started.elapsed() > VM_TIMEOUT {
            // Ours, by PID: kill the guest we started.
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned(), timed_out))
}

/// Reads the test harness's lines and the status JSON out of a run's output.
fn parse_run(log: &str, place: &'static str, fallback_name: &str) -> Row {
    let mut row = Row { kernel: fallback_name.to_owned(), place, cases: Vec::new(), insns: Vec::new(), problem: None };
    let mut json = String::new();
    let mut in_json = false;
    let mut exit = None;
    for line in log.lines() {
        // The guest's console may put escape sequences before our first line.
        let line = line.find(MARK).map_or(line, |i| &line[i..]);
        if let Some(k) = line.strip_prefix(&format!("{MARK} kernel ")) {
            row.kernel = k.trim().to_owned();
        } else if let Some(code) = line.strip_prefix(&format!("{MARK} tests-exit ")) {
            exit = code.trim().parse::<i32>().ok();
        } else if line.starts_with(&format!("{MARK} status-begin")) {
            in_json = true;
        } else if line.starts_with(&format!("{MARK} status-end")) {
            in_json = false;
        } else if in_json {
            json.push_str(line);
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, verdict)) = rest.rsplit_once(" ... ") {
                row.cases.push((name.to_owned(), verdict.trim() == "ok"));
            }
        }
    }
    row.cases.sort();
    if let Ok(status) = serde_json::from_str::<serde_json::Value>(&json) {
        for p in status["programs"].as_array().into_iter().flatten() {
            if let (Some(name), Some(n)) = (p["name"].as_str(), p["verified_insns"].as_u64()) {
                row.insns.push((name.to_owned(), n));
            }
        }
    }
    match exit {
        Some(0) => {}
        Some(code) => row.problem = Some(format!("test binary exited with {code}")),
        None => row.problem = Some("the guest reported no test result (see its log)".to_owned()),
    }
    if row.insns.is_empty() && row.problem.is_none() {
        row.problem = Some("the agent did not load for the instruction count".to_owned());
    }
    row
}

/// The same binaries on the running kernel.
fn host_row(root: &Path, built: &Built) -> Result<Row> {
    let mut log = format!("{MARK} kernel {}\n", output(Command::new("uname").arg("-r")).unwrap_or_default().trim());
    let mut status = 0;
    for test in &built.tests {
        let out = Command::new(test)
            .args(["--test-threads=2", "--skip", "userspace::"])
            .current_dir(root)
            .env("RUST_BACKTRACE", "0")
            .output()?;
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            status = out.status.code().unwrap_or(-1);
        }
    }
    log.push_str(&format!("{MARK} tests-exit {status}\n"));

    // A scratch cgroup and pin directory of our own for the instruction counts.
    let cgroup = crate::cgroup2_mount()?.join(format!("toa-matrix-{}", std::process::id()));
    let pins = PathBuf::from(format!("/sys/fs/bpf/toa-matrix-{}", std::process::id()));
    fs::create_dir_all(&cgroup)?;
    let toa = |args: &[&str]| Command::new(&built.toa).args(args).arg("--pin-dir").arg(&pins).output();
    let loaded = toa(&["load", "--cgroup", &cgroup.to_string_lossy()])?;
    let status = toa(&["status", "--json"])?;
    let _ = toa(&["unload"]);
    let _ = fs::remove_dir(&cgroup);
    if loaded.status.success() {
        log.push_str(&format!("{MARK} status-begin\n{}\n{MARK} status-end\n", String::from_utf8_lossy(&status.stdout)));
    }
    fs::write(root.join("target/kernels/host.log"), &log)?;
    Ok(parse_run(&log, "host", "host"))
}

/// Cases as rows, kernels as columns, then the verifier's instruction counts.
fn markdown(rows: &[Row]) -> String {
    let mut t = String::from("| case |");
    for r in rows {
        t.push_str(&format!(" {} ({}) |", r.kernel, r.place));
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(rows.len()));
    let mut cases: Vec<&String> = rows.iter().flat_map(|r| r.cases.iter().map(|(c, _)| c)).collect();
    cases.sort();
    cases.dedup();
    for case in cases {
        t.push_str(&format!("\n| {case} |"));
        for r in rows {
            let cell = match r.cases.iter().find(|(c, _)| c == case) {
                Some((_, true)) => "pass",
                Some((_, false)) => "**FAIL**",
                None => "-",
            };
            t.push_str(&format!(" {cell} |"));
        }
    }
    let mut programs: Vec<&String> = rows.iter().flat_map(|r| r.insns.iter().map(|(p, _)| p)).collect();
    programs.dedup();
    programs.sort();
    programs.dedup();
    for p in programs {
        t.push_str(&format!("\n| verifier: {p} (insns) |"));
        for r in rows {
            let n = r.insns.iter().find(|(q, _)| q == p).map(|(_, n)| n.to_string()).unwrap_or_else(|| "-".into());
            t.push_str(&format!(" {n} |"));
        }
    }
    t.push('\n');
    t
}

const README_BEGIN: &str = "<!-- kernel-matrix:begin (generated by `cargo xtask kernels`) -->";
const README_END: &str = "<!-- kernel-matrix:end -->";

fn update_readme(readme: &Path, table: &str) -> Result<()> {
    let text = fs::read_to_string(readme)?;
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!("README.md has no kernel-matrix markers");
    };
    let new = format!("{}{README_BEGIN}\n{table}{}", &text[..b], &text[e..]);
    if new != text {
        fs::write(readme, new)?;
        println!("xtask: README.md kernel table updated");
    }
    Ok(())
}
