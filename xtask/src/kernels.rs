//! The kernel matrix: the end-to-end suite on the kernels backend servers run, under qemu, and
//! on the host kernel natively, with the verifier's instruction count per program.
//!
//! | kernels | from | modes |
//! |---|---|---|
//! | every version below 5.10 in `../shared/kernels` | shared | userspace (`toa load` picks it) |
//! | 5.15 (with and without BTF) from `../shared/kernels` | shared | eBPF and userspace |
//! | 5.10 (Debian 11) | bullseye | eBPF and userspace |
//! | 6.1, 6.12 (Debian 12) | bookworm | eBPF and userspace |
//! | 6.1 or 6.12 arm64 (Debian 12) | bookworm arm64 | eBPF and userspace |
//! | the host's | - | eBPF and userspace |
//!
//! Each guest boots from an initramfs holding the static (musl) `toa`, the end-to-end test
//! binaries, `libtoa.so`, the servers they start (the Rust examples, dynamically linked so that
//! libtoa.so can be preloaded, Python with just the modules the scripts import, nginx), `ip`
//! with its libraries, busybox, and the kernel's modules the tests need. Files keep the
//! absolute paths they have on the host, so the test binaries find `toa` and the servers where
//! they were built to find them. The arm64 guest takes its userland from Debian's arm64
//! packages instead.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cpio::Archive, kernel_sources, output, run, Arch};

/// Debian 12's cloud kernels to test: (label, apt-cache pattern).
const DEBIAN_SERIES: [(&str, &str); 2] =
    [("6.1", r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$"), ("6.12", r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$")];
/// Bounds a hung guest only; a guest normally takes well under a minute.
const VM_TIMEOUT: Duration = Duration::from_secs(1200);
const MARK: &str = "TOA-MATRIX";
/// Kernels users run that `../shared/kernels` may not hold: reported as skipped, never passed.
const WANTED_SHARED: [(&str, &str); 1] = [("3.10", "CentOS 7")];

/// What one kernel did.
pub struct Row {
    pub kernel: String,
    pub place: &'static str,
    /// "eBPF + userspace", "userspace (auto)", …
    pub modes: String,
    /// (case, passed)
    pub cases: Vec<(String, bool)>,
    /// (program, verified instructions)
    pub insns: Vec<(String, u64)>,
    pub problem: Option<String>,
    /// Why this kernel was not run (it is then neither passed nor failed).
    pub skipped: Option<String>,
}

impl Row {
    fn skipped(kernel: &str, modes: &str, why: String) -> Row {
        Row {
            kernel: kernel.to_owned(),
            place: "-",
            modes: modes.to_owned(),
            cases: Vec::new(),
            insns: Vec::new(),
            problem: None,
            skipped: Some(why),
        }
    }

    fn ok(&self) -> bool {
        self.skipped.is_some()
            || (self.problem.is_none() && !self.cases.is_empty() && self.cases.iter().all(|(_, ok)| *ok))
    }

    fn line(&self) -> String {
        if let Some(why) = &self.skipped {
            return format!("{:<28} {:<5} SKIPPED: {why}", self.kernel, self.place);
        }
        let passed = self.cases.iter().filter(|(_, ok)| *ok).count();
        let insns: Vec<String> = self.insns.iter().map(|(p, n)| format!("{p} {n}")).collect();
        let mut line = format!(
            "{:<28} {:<5} {}: {}/{} cases passed; verified insns: {}",
            self.kernel,
            self.place,
            self.modes,
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

/// Which modes a kernel runs.
#[derive(Clone, Copy)]
struct Modes {
    ebpf: bool,
    userspace: bool,
}

impl Modes {
    const BOTH: Modes = Modes { ebpf: true, userspace: true };
    const USERSPACE: Modes = Modes { ebpf: false, userspace: true };

    fn label(self) -> &'static str {
        match (self.ebpf, self.userspace) {
            (true, true) => "eBPF + userspace",
            (false, true) => "userspace (auto)",
            _ => "eBPF",
        }
    }
}

struct Kernel {
    name: String,
    vmlinuz: PathBuf,
    /// Modules the tests need that this kernel builds as modules, in load order.
    modules: Vec<PathBuf>,
    modes: Modes,
    arch: Arch,
}

/// What the tests need when a kernel does not build it in: veth pairs, the TCP and UDP socket
/// diagnostics `toa conns` uses (tcp_diag and udp_diag need inet_diag), and the clsact qdisc and
/// BPF classifier the option-protocol converter is attached with.
const MODULES: [&str; 6] = [
    "drivers/net/veth",
    "net/ipv4/inet_diag",
    "net/ipv4/tcp_diag",
    "net/ipv4/udp_diag",
    "net/sched/sch_ingress",
    "net/sched/cls_bpf",
];

/// The binaries of one architecture.
struct Built {
    arch: Arch,
    toa: PathBuf,
    /// The end-to-end test binaries, by name.
    tests: Vec<(&'static str, PathBuf)>,
    /// Where the examples the tests start live, and the examples.
    examples_dir: PathBuf,
    examples: Vec<PathBuf>,
    libtoa: PathBuf,
}

/// Test binaries run in each guest, and the examples they start.
const TESTS: [&str; 5] = ["e2e", "policy", "service", "udp", "userspace"];
const EXAMPLES: [&str; 2] = ["peer_echo", "client_addr"];

/// Runs the matrix; fails unless every case passes on every kernel that ran.
pub fn run_matrix(root: &Path, extra_kernels: &[PathBuf], debian: bool, readme: bool, only: &[String]) -> Result<()> {
    tools(debian)?;
    let work = root.join("target/kernels");
    fs::create_dir_all(&work)?;

    let mut rows = Vec::new();
    let mut kernels = Vec::new();
    let (shared, skipped) = shared_kernels(root)?;
    rows.extend(skipped);
    kernels.extend(shared);
    if debian {
        kernels.push(bullseye_kernel(&work)?);
        for (label, pattern) in DEBIAN_SERIES {
            kernels.push(debian_kernel(&work, label, pattern)?);
        }
        kernels.push(arm64_kernel(&work)?);
    }
    for path in extra_kernels {
        kernels.push(user_kernel(path)?);
    }
    if !only.is_empty() {
        kernels.retain(|k| only.iter().any(|o| k.name.contains(o.as_str())));
        rows.clear();
    }

    let x86 = build(root, Arch::X86_64)?;
    let mut bases = vec![(Arch::X86_64, initramfs_base(root, &x86, None)?)];
    let arm = if kernels.iter().any(|k| k.arch == Arch::Aarch64) {
        let built = build(root, Arch::Aarch64)?;
        let sysroot = kernel_sources::arm64_sysroot(&work, kernel_sources::ARM64_GUEST_PACKAGES)?;
        bases.push((Arch::Aarch64, initramfs_base(root, &built, Some(&sysroot))?));
        Some(built)
    } else {
        None
    };
    for kernel in &kernels {
        println!("xtask: booting {} ({}) under qemu", kernel.name, kernel.modes.label());
        let base = &bases.iter().find(|(a, _)| *a == kernel.arch).expect("a base per architecture").1;
        let built = if kernel.arch == Arch::Aarch64 { arm.as_ref().expect("built") } else { &x86 };
        let started = Instant::now();
        let row = boot(&work, kernel, base, built)?;
        println!("{} ({} s)", row.line(), started.elapsed().as_secs());
        rows.push(row);
    }
    if only.is_empty() {
        println!("xtask: running the same binaries on the host kernel");
        rows.push(host_row(root, &x86)?);
    }

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
    if let Some(kernel) = kernels.iter().find(|k| k.name.starts_with("6.1.0")).filter(|_| debian) {
        for userspace in [false, true] {
            crate::systemd::check(root, &work, &kernel.vmlinuz, &x86.toa, userspace)?;
        }
    }
    Ok(())
}

/// qemu, busybox, xz and Debian's own python3 (the host's `python3` may be another build).
fn tools(arm64: bool) -> Result<()> {
    let mut needed = vec![
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("xz", "xz-utils"),
        ("/usr/bin/python3", "python3"),
    ];
    if arm64 {
        needed.push(("qemu-system-aarch64", "qemu-system-arm"));
    }
    crate::apt_install_missing(&needed)
}

fn build(root: &Path, arch: Arch) -> Result<Built> {
    let musl = arch.musl_target();
    crate::add_rust_target(musl)?;
    let linker = (arch != Arch::X86_64)
        .then(|| (format!("CARGO_TARGET_{}_LINKER", musl.to_uppercase().replace('-', "_")), "rust-lld"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--profile", "matrix", "--target", musl, "--package", "toa", "--bins", "--examples"]);
    cmd.envs(linker.clone());
    run(&mut cmd)?;
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "test",
        "--profile",
        "matrix",
        "--target",
        musl,
        "--package",
        "toa",
        "--no-run",
        "--message-format=json",
    ]);
    cmd.envs(linker);
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
        tests.push((test, exe));
    }
    let out_dir = root.join("target").join(musl).join("matrix");
    // libtoa.so is preloaded only into dynamically linked programs: on x86_64 the examples the
    // tests start are the host's (glibc) build. The arm64 guest has no such build (no arm64 C
    // toolchain here), so its userspace cases that start a Rust server are skipped.
    let examples_dir = match arch {
        Arch::X86_64 => {
            crate::cargo(&["build", "--release", "--package", "toa", "--examples"])?;
            root.join("target/release/examples")
        }
        Arch::Aarch64 => out_dir.join("examples"),
    };
    let examples = EXAMPLES.iter().map(|e| examples_dir.join(e)).collect();
    crate::build_libtoa_for(arch)?;
    let libtoa = match arch {
        Arch::X86_64 => root.join("target/release/libtoa.so"),
        Arch::Aarch64 => root.join("target/aarch64-unknown-linux-gnu/release/libtoa.so"),
    };
    Ok(Built { arch, toa: out_dir.join("toa"), tests, examples_dir, examples, libtoa })
}

/// The kernels in `../shared/kernels` (or `TOA_SHARED_KERNELS`): the userspace mode below 5.10,
/// both modes from 5.10. Wanted kernels it does not hold come back as skipped rows.
fn shared_kernels(root: &Path) -> Result<(Vec<Kernel>, Vec<Row>)> {
    let dir =
        std::env::var_os("TOA_SHARED_KERNELS").map(PathBuf::from).unwrap_or_else(|| root.join("../shared/kernels"));
    let mut kernels = Vec::new();
    let mut skipped = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) => {
            println!("xtask: SKIPPED the shared kernels: {} ({e})", dir.display());
            skipped.push(Row::skipped("shared kernels", "-", format!("{} not found", dir.display())));
            return Ok((kernels, skipped));
        }
    };
    for path in entries {
        let vmlinuz = path.join("vmlinuz");
        if !vmlinuz.is_file() {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let modes = if version_key(&name) < vec![5, 10] { Modes::USERSPACE } else { Modes::BOTH };
        kernels.push(Kernel { name, vmlinuz, modules: Vec::new(), modes, arch: Arch::X86_64 });
    }
    kernels.sort_by_key(|k| version_key(&k.name));
    for (version, distribution) in WANTED_SHARED {
        if !kernels.iter().any(|k| k.name.starts_with(version)) {
            let why = format!("{version} ({distribution}) is not in {}", dir.display());
            println!("xtask: SKIPPED {why}");
            skipped.push(Row::skipped(version, "userspace (auto)", why));
        }
    }
    Ok((kernels, skipped))
}

/// Debian 12's default kernel (6.1), which the systemd checks boot.
pub fn systemd_kernel(work: &Path) -> Result<PathBuf> {
    let (label, pattern) = DEBIAN_SERIES[0];
    Ok(debian_kernel(work, label, pattern)?.vmlinuz)
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
    packaged_kernel(&dir, Modes::BOTH, Arch::X86_64)
}

/// Debian 11's 5.10 cloud kernel (Amazon Linux 2, Alibaba Cloud Linux 3 and EulerOS run 5.10 too).
fn bullseye_kernel(work: &Path) -> Result<Kernel> {
    packaged_kernel(&kernel_sources::bullseye_kernel(work)?, Modes::BOTH, Arch::X86_64)
}

fn arm64_kernel(work: &Path) -> Result<Kernel> {
    let dir = kernel_sources::arm64_kernel(work)?;
    let mut kernel = packaged_kernel(&dir, Modes::BOTH, Arch::Aarch64)?;
    // qemu boots the uncompressed Image that kernel_sources writes next to the package's vmlinuz.
    kernel.vmlinuz = kernel_sources::arm64_image(&dir)?;
    kernel.name.push_str(" arm64");
    Ok(kernel)
}

/// A kernel unpacked from a Debian package: `boot/vmlinuz-*` and the modules it needs.
fn packaged_kernel(dir: &Path, modes: Modes, arch: Arch) -> Result<Kernel> {
    let vmlinuz = fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("no vmlinuz in {}", dir.display()))?;
    let name = vmlinuz.file_name().unwrap_or_default().to_string_lossy().trim_start_matches("vmlinuz-").to_owned();
    Ok(Kernel { name, modules: find_modules(dir), vmlinuz, modes, arch })
}

/// Numeric parts of a name, so that 6.12.117 sorts after 6.12.99.
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
    let modes = if version_key(&name) < vec![5, 10] { Modes::USERSPACE } else { Modes::BOTH };
    Ok(Kernel { name, vmlinuz: vmlinuz.to_owned(), modules, modes, arch: Arch::X86_64 })
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

/// Everything but the kernel's own modules and /init: binaries, tools, libraries, Python,
/// nginx. With `sysroot` (arm64), the userland comes from there instead of the host.
fn initramfs_base(root: &Path, built: &Built, sysroot: Option<&Path>) -> Result<Archive> {
    let mut a = Archive::default();
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/etc"] {
        a.dir(dir);
    }
    a.symlink("/var/run", "/run");
    // nginx's workers run as nobody.
    a.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n".to_vec(),
        0o644,
    );
    a.file("/etc/group", b"root:x:0:\nnogroup:x:65534:\n".to_vec(), 0o644);
    for path in std::iter::once(&built.toa).chain(built.tests.iter().map(|(_, p)| p)) {
        add_file(&mut a, path, 0o755)?;
    }
    add_file(&mut a, &built.libtoa, 0o755)?;
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

    match sysroot {
        None => {
            for example in &built.examples {
                add_with_libs(&mut a, example, &example.to_string_lossy())?;
            }
            let busybox = crate::which("busybox").context("busybox not found")?;
            add_with_libs(&mut a, &busybox, "/bin/busybox")?;
            for tool in ["ip", "tc"] {
                let path = crate::which(tool).with_context(|| format!("{tool} not found"))?;
                add_with_libs(&mut a, &path, &path.to_string_lossy())?;
            }
            let nginx = nginx_binary(root)?;
            add_with_libs(&mut a, &nginx, "/usr/sbin/nginx")?;
            python(&mut a, &scripts)?;
        }
        Some(sysroot) => {
            for example in &built.examples {
                add_file(&mut a, example, 0o755)?;
            }
            add_tree(&mut a, sysroot, sysroot)?;
            a.file("/bin/busybox", fs::read(sysroot.join("bin/busybox"))?, 0o755);
            a.symlink("/usr/bin/python3", "python3.11");
        }
    }
    Ok(a)
}

/// nginx as `cargo xtask setup` unpacked it (or the host's).
fn nginx_binary(root: &Path) -> Result<PathBuf> {
    [PathBuf::from("/usr/sbin/nginx"), root.join("target/test-tools/nginx/usr/sbin/nginx")]
        .into_iter()
        .find(|p| p.exists())
        .context("nginx not found: `cargo xtask setup` unpacks it into target/test-tools")
}

/// Debian's python3 and exactly the modules the test servers import (found by importing what
/// the scripts' import lines name), with the libraries of its extension modules.
fn python(a: &mut Archive, scripts: &[PathBuf]) -> Result<()> {
    let python = fs::canonicalize("/usr/bin/python3")?;
    add_with_libs(a, &python, &python.to_string_lossy())?;
    a.symlink("/usr/bin/python3", &python.to_string_lossy());
    let list = "import ast, sys\n\
                for path in sys.argv[1:]:\n\
                \x20 for node in ast.walk(ast.parse(open(path).read())):\n\
                \x20   if isinstance(node, ast.Import):\n\
                \x20       for n in node.names: __import__(n.name)\n\
                for m in list(sys.modules.values()):\n\
                \x20   f = getattr(m, '__file__', None)\n\
                \x20   if f: print(f)";
    let modules = output(Command::new(&python).env_clear().args(["-c", list]).args(scripts))
        .context("list the Python modules the test server needs")?;
    for module in modules.lines() {
        let path = Path::new(module);
        if path.extension().is_some_and(|e| e == "so") {
            add_with_libs(a, path, module)?;
        } else {
            add_file(a, path, 0o644)?;
        }
    }
    Ok(())
}

/// Adds every file under `dir` at its path relative to `sysroot` (documentation left out).
fn add_tree(a: &mut Archive, sysroot: &Path, dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let rel = Path::new("/").join(path.strip_prefix(sysroot)?);
        let rel_str = rel.to_string_lossy().into_owned();
        if ["/usr/share/doc", "/usr/share/man", "/usr/share/locale", "/usr/share/info"]
            .iter()
            .any(|d| rel_str.starts_with(d))
        {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            a.symlink(&rel_str, &fs::read_link(&path)?.to_string_lossy());
        } else if kind.is_dir() {
            a.dir(&rel_str);
            add_tree(a, sysroot, &path)?;
        } else {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = entry.metadata()?.permissions().mode() & 0o7777;
            a.file(&rel_str, fs::read(&path)?, mode);
        }
    }
    Ok(())
}

/// The guest's /init: mounts, modules, then the test binaries of each mode the kernel runs,
/// the mode `toa load` picks by itself and `toa doctor`, then the verifier's counts.
fn init_script(root: &Path, kernel: &Kernel, built: &Built) -> String {
    let test = |name: &str| {
        built.tests.iter().find(|(n, _)| *n == name).map(|(_, p)| p.display().to_string()).expect("a test binary")
    };
    let triple = match built.arch {
        Arch::X86_64 => "x86_64-linux-gnu",
        Arch::Aarch64 => "aarch64-linux-gnu",
    };
    let mut runs = String::new();
    if kernel.modes.ebpf {
        for t in ["e2e", "policy", "service", "udp"] {
            runs.push_str(&format!("{} --test-threads=2 --skip userspace:: 2>&1 || status=$?\n", test(t)));
        }
    }
    if kernel.modes.userspace {
        // libtoa's symbols are a property of the file, checked on the host (objdump).
        let mut skip = String::from("--skip libtoa_asks_the_c_library");
        if built.arch == Arch::Aarch64 {
            // Static Rust servers cannot be preloaded (see `build`).
            skip.push_str(
                " --skip ipv4_client_reaches_python_and_rust_servers --skip ipv4_client_on_dual_stack_listener_is_v4_mapped \
                 --skip ipv6_client_reaches_ipv6_listeners --skip many_connections_each_get_their_own_client \
                 --skip reconfiguring_keeps_open_connections --skip secure_execution_ignores_toa_table",
            );
        }
        for t in ["e2e", "policy"] {
            runs.push_str(&format!("{} --test-threads=2 userspace:: {skip} 2>&1 || status=$?\n", test(t)));
        }
        runs.push_str(&format!("{} --test-threads=2 {skip} 2>&1 || status=$?\n", test("userspace")));
    }
    // TOA_MATRIX_INSNS_ONLY=1: no test suites, only the load and the verifier's counts (a
    // minute a kernel, for working on the programs' size).
    if std::env::var_os("TOA_MATRIX_INSNS_ONLY").is_some() {
        runs.clear();
    }
    let expected_mode = if kernel.modes.ebpf { "ebpf" } else { "userspace" };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/{triple}:/usr/lib/{triple}
# The live fuzz case, shorter under emulation (the host runs 200 a mode).
export RUST_BACKTRACE=0 TOA_LIBTOA={libtoa} TOA_EXAMPLES_DIR={examples} TOA_NGINX=/usr/sbin/nginx TOA_LIVE_FUZZ=60
# No tmpfs over /run or /tmp: the files below may live there (a checkout in /tmp), and the
# initramfs is RAM already.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# cgroup v2 came in 4.5; the userspace mode needs none.
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
for m in $(cat /modules/order); do insmod /modules/$m.ko; done
ip link set lo up
# A clsact qdisc held for the whole run keeps the kernel's ingress static key on: each test's
# converter filter then adds and removes no key, which would patch the receive path's code while
# other tests' packets run through it. Under qemu's emulation that patching crashed 5.10 and
# 5.15 guests (a fatal int3 in __netif_receive_skb_core); real CPUs handle it.
tc qdisc add dev lo clsact 2>/dev/null
echo "{MARK} kernel $(uname -r)"
cd {root}
status=0
{runs}
# What an operator does: toa load with no mode, status, doctor (as root: it must pass), unload.
case_() {{ if [ "$2" = 0 ]; then echo "test guest::$1 ... ok"; else echo "test guest::$1 ... FAILED"; status=1; fi; }}
mkdir -p /sys/fs/cgroup/toa-auto 2>/dev/null
{toa} load $( [ {expected_mode} = ebpf ] && echo --cgroup /sys/fs/cgroup/toa-auto ) 2>&1; rc=$?
{toa} status --json > /tmp/auto.json 2>&1; cat /tmp/auto.json
grep -q '"mode": "{expected_mode}"' /tmp/auto.json; case_ toa_load_picks_{expected_mode} $(( rc + $? ))
{toa} doctor 2>&1; case_ doctor_passes $?
{toa} stats >/dev/null 2>&1; case_ stats_answers $?
{toa} unload 2>&1; case_ unload $?
echo "{MARK} tests-exit $status"
if [ {expected_mode} = ebpf ]; then
  mkdir /sys/fs/cgroup/toa-insns
  {toa} load --udp --cgroup /sys/fs/cgroup/toa-insns >/dev/null
  echo "{MARK} status-begin"; {toa} status --json; echo "{MARK} status-end"
  {toa} unload >/dev/null
fi
poweroff -f
"#,
        root = root.display(),
        toa = built.toa.display(),
        libtoa = built.libtoa.display(),
        examples = built.examples_dir.display(),
    )
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

fn boot(work: &Path, kernel: &Kernel, base: &Archive, built: &Built) -> Result<Row> {
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
    archive.file("/init", init_script(&crate::workspace_root(), kernel, built).into_bytes(), 0o755);
    let file_name = kernel.name.replace(' ', "-");
    let initrd = work.join(format!("{file_name}.cpio"));
    fs::write(&initrd, archive.into_bytes())?;
    let log_path = work.join(format!("{file_name}.log"));

    // A soft lockup panics the guest (its backtrace is on the console, and the run ends at once
    // instead of at VM_TIMEOUT); the console streams to the log as it comes, for a guest that
    // seems stuck.
    let (log, timed_out) =
        qemu_boot_logged(kernel.arch, &kernel.vmlinuz, &initrd, "quiet softlockup_panic=1", Some(&log_path))?;
    let problem = timed_out.then(|| format!("guest did not finish within {} s", VM_TIMEOUT.as_secs()));
    let log = log.replace('\r', "");
    fs::write(&log_path, &log)?;
    let _ = fs::remove_file(&initrd);
    let mut row = parse_run(&log, "qemu", &kernel.name, kernel.modes);
    // Named as the matrix knows it: two builds of one release (5.15 with and without BTF)
    // report the same `uname -r`.
    row.kernel = kernel.name.clone();
    row.problem = row.problem.or(problem);
    Ok(row)
}

/// Boots `vmlinuz` with `initrd` under qemu (software emulation: nested KVM is not usable here)
/// and returns its console output, and whether it had to be stopped after `VM_TIMEOUT`.
pub fn qemu_boot(arch: Arch, vmlinuz: &Path, initrd: &Path, append: &str) -> Result<(String, bool)> {
    qemu_boot_logged(arch, vmlinuz, initrd, append, None)
}

/// [`qemu_boot`], also writing the console to `live` as it comes.
fn qemu_boot_logged(
    arch: Arch,
    vmlinuz: &Path,
    initrd: &Path,
    append: &str,
    live: Option<&Path>,
) -> Result<(String, bool)> {
    let (qemu, machine, console): (&str, &[&str], &str) = match arch {
        Arch::X86_64 => {
            ("qemu-system-x86_64", &["-cpu", "max", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"], "ttyS0")
        }
        Arch::Aarch64 => ("qemu-system-aarch64", &kernel_sources::AARCH64_QEMU_ARGS, "ttyAMA0"),
    };
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg"])
        .args(machine)
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        // random.trust_cpu: early getrandom() would otherwise block for minutes in old guests.
        .arg(format!("console={console} panic=-1 random.trust_cpu=on {append}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {qemu}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut live = live.map(fs::File::create).transpose()?;
    let reader = std::thread::spawn(move || {
        let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            buf.extend_from_slice(&chunk[..n]);
            if let Some(file) = live.as_mut() {
                let _ = std::io::Write::write_all(file, &chunk[..n]);
            }
        }
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
fn parse_run(log: &str, place: &'static str, fallback_name: &str, modes: Modes) -> Row {
    let mut row = Row {
        kernel: fallback_name.to_owned(),
        place,
        modes: modes.label().to_owned(),
        cases: Vec::new(),
        insns: Vec::new(),
        problem: None,
        skipped: None,
    };
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
    if modes.ebpf && json.is_empty() && row.problem.is_none() {
        row.problem = Some("the agent did not load for the instruction count".to_owned());
    }
    row
}

/// The same binaries on the running kernel, in both modes.
fn host_row(root: &Path, built: &Built) -> Result<Row> {
    let mut log = format!("{MARK} kernel {}\n", output(Command::new("uname").arg("-r")).unwrap_or_default().trim());
    let mut status = 0;
    for (_, test) in &built.tests {
        let out = Command::new(test)
            .arg("--test-threads=2")
            .current_dir(root)
            .env("RUST_BACKTRACE", "0")
            .env("TOA_EXAMPLES_DIR", &built.examples_dir)
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
    Ok(parse_run(&log, "host", "host", Modes::BOTH))
}

/// Cases as rows, kernels as columns (with the modes each ran), then the verifier's counts.
fn markdown(rows: &[Row]) -> String {
    let mut t = String::from("| case |");
    for r in rows {
        t.push_str(&format!(" {} ({}) |", r.kernel, r.place));
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(rows.len()));
    t.push_str("\n| **mode(s)** |");
    for r in rows {
        t.push_str(&format!(" {} |", r.modes));
    }
    let mut cases: Vec<&String> = rows.iter().flat_map(|r| r.cases.iter().map(|(c, _)| c)).collect();
    cases.sort();
    cases.dedup();
    for case in cases {
        t.push_str(&format!("\n| {case} |"));
        for r in rows {
            let cell = match (r.cases.iter().find(|(c, _)| c == case), &r.skipped) {
                (_, Some(_)) => "skipped",
                (Some((_, true)), _) => "pass",
                (Some((_, false)), _) => "**FAIL**",
                (None, _) => "-",
            };
            t.push_str(&format!(" {cell} |"));
        }
    }
    let mut programs: Vec<&String> = rows.iter().flat_map(|r| r.insns.iter().map(|(p, _)| p)).collect();
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
    for r in rows.iter().filter(|r| r.skipped.is_some()) {
        t.push_str(&format!("\n{}: skipped, {}.\n", r.kernel, r.skipped.as_deref().unwrap_or_default()));
    }
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
