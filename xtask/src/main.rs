//! Project tasks: `cargo xtask setup | build | install | test`.
//!
//! `setup` installs what building eBPF with stable Rust needs (rust-src, a bpf-linker linked
//! against rustc's own LLVM) and what the tests need (bpftool, iproute2, python3), reusing
//! whatever is already there. Every other task runs it first, so a fresh Debian 12 machine with
//! rustup's stable toolchain needs nothing else.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod cpio;
mod kernel_sources;
mod kernels;
mod package;
mod package_check;
mod systemd;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    Aarch64,
}

impl Arch {
    /// As release files name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// As Debian names it (a .deb's Architecture).
    pub(crate) fn deb_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    pub(crate) fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }
}

#[derive(Subcommand)]
enum Task {
    /// Install the build and test prerequisites (idempotent).
    Setup,
    /// Build the release binary (target/release/toa), or static ones with --static.
    Build {
        /// Static (musl) binaries with the programs embedded: one file to copy to any host.
        #[arg(long = "static")]
        static_: bool,
        /// Architectures for --static (repeatable).
        #[arg(long, value_enum, default_values = ["x86_64"], requires = "static_")]
        arch: Vec<Arch>,
    },
    /// Release packages (.deb, .rpm) and tarballs (static toa, libtoa.so, units, config, man
    /// pages, completions) and SHA256SUMS in target/package/.
    Package {
        /// Architectures (repeatable).
        #[arg(long, value_enum, default_values = ["x86_64", "aarch64"])]
        arch: Vec<Arch>,
        /// Cargo profile of the binaries: release, or matrix (no LTO; what CI tests with).
        #[arg(long, default_value = "release", value_parser = ["release", "matrix"])]
        profile: String,
        /// Then inspect the packages and install, upgrade and remove them (root; boots a
        /// Debian 12 guest under qemu).
        #[arg(long)]
        check: bool,
    },
    /// Build, install to /usr/local/bin/toa and load the agent on this host (root).
    Install {
        /// Where to install the binary.
        #[arg(long, default_value = "/usr/local/bin")]
        prefix: PathBuf,
    },
    /// Run every test: unit tests, the end-to-end suite, then the kernel matrix (root).
    Test {
        /// Skip the kernel matrix (quicker, for development).
        #[arg(long)]
        host_only: bool,
    },
    /// Fuzz the option parser against a plain reference parser (libFuzzer, via cargo-fuzz).
    Fuzz {
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Instead: the live path (root). Connections with random option areas through the
        /// kernel and the loaded agent, in both modes, checked against the reference parser.
        #[arg(long)]
        live: bool,
        /// With --live: connections per mode.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// With --live: the seed (a failure prints it; the same seed replays the same areas)
        /// [default: from the clock].
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Measure what toa costs (root): connection rate, getpeername(), PROXY v2, scaling, memory.
    Bench {
        /// A short smoke run (seconds; what CI runs), not numbers to quote.
        #[arg(long)]
        quick: bool,
    },
    /// Run the end-to-end suite on Debian's 6.1 and 6.12 kernels under qemu and on the host.
    Kernels {
        /// Also boot this vmlinuz (repeatable); from an unpacked linux-image package its veth
        /// module is found next to boot/.
        #[arg(long = "kernel", value_name = "VMLINUZ")]
        kernels: Vec<PathBuf>,
        /// Do not download and boot Debian's kernels.
        #[arg(long)]
        no_debian: bool,
        /// Do not rewrite the table in README.md.
        #[arg(long)]
        no_readme: bool,
        /// Boot only the kernels whose name contains one of these (repeatable; for development).
        #[arg(long, value_name = "NAME")]
        only: Vec<String>,
    },
}

/// bpf-linker must match the LLVM major version of rustc.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> std::process::ExitCode {
    match run_task(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(cli: Cli) -> Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup(),
        Task::Build { static_: false, .. } => {
            setup()?;
            cargo(&["build", "--release", "--package", "toa"])?;
            build_libtoa()
        }
        Task::Build { static_: true, arch } => {
            setup()?;
            for arch in arch {
                build_static(&root, arch)?;
                // libtoa.so asks nothing of the C library but errno: one build per architecture
                // serves every glibc.
                build_libtoa_for(arch)?;
            }
            Ok(())
        }
        Task::Package { arch, profile, check } => {
            if check {
                require_root("cargo xtask package --check")?;
            }
            setup()?;
            let packages = package::build(&root, &arch, &profile)?;
            if check {
                package_check::run_checks(&root, &packages)?;
            }
            Ok(())
        }
        Task::Install { prefix } => {
            require_root("cargo xtask install")?;
            setup()?;
            cargo(&["build", "--release", "--package", "toa"])?;
            std::fs::create_dir_all(&prefix)?;
            let dest = prefix.join("toa");
            // Copy to a temporary name and rename: replacing a running binary in place fails.
            let tmp = prefix.join(".toa.new");
            std::fs::copy(root.join("target/release/toa"), &tmp)
                .with_context(|| format!("copy to {}", tmp.display()))?;
            std::fs::rename(&tmp, &dest)?;
            println!("installed {}", dest.display());
            build_libtoa()?;
            let lib_dir = prefix.parent().unwrap_or(Path::new("/usr/local")).join("lib/toa");
            std::fs::create_dir_all(&lib_dir)?;
            let tmp = lib_dir.join(".libtoa.so.new");
            std::fs::copy(root.join("target/release/libtoa.so"), &tmp)?;
            // Renamed over, never written in place: running programs have the old one mapped.
            std::fs::rename(&tmp, lib_dir.join("libtoa.so"))?;
            println!(
                "installed {} (userspace mode: LD_PRELOAD it into applications)",
                lib_dir.join("libtoa.so").display()
            );
            run(Command::new(&dest).arg("load"))
        }
        Task::Test { host_only } => {
            require_root("cargo xtask test")?;
            setup()?;
            // The userspace mode's tests preload it into their servers.
            build_libtoa()?;
            if host_only {
                // The end-to-end tests start examples/peer_echo as a server.
                cargo(&["build", "--package", "toa", "--examples", "--bins"])?;
                return cargo(&[
                    "test",
                    "--package",
                    "toa-client",
                    "--package",
                    "toa-common",
                    "--package",
                    "toa-lab",
                    "--package",
                    "toa",
                    "--",
                    "--test-threads=2",
                ]);
            }
            // The unit tests, built as the matrix builds its static binaries (one build of the
            // dependencies serves both); the end-to-end suites run in the matrix, on the host
            // kernel too, in both modes.
            add_rust_target(Arch::X86_64.musl_target())?;
            cargo(&[
                "test",
                "--profile",
                "matrix",
                "--target",
                Arch::X86_64.musl_target(),
                "--package",
                "toa-client",
                "--package",
                "toa-common",
                "--package",
                "toa-lab",
                "--package",
                "toa",
                "--lib",
                "--bins",
                "--test",
                "deploy",
                "--test",
                "container",
                "--",
                "--test-threads=2",
            ])?;
            kernels::run_matrix(&root, &[], true, true, &[])?;
            // The packages, from the matrix's builds (the release profile adds only LTO):
            // inspected, installed with rpm --root, and the .deb under systemd.
            let packages = package::build(&root, &[Arch::X86_64, Arch::Aarch64], "matrix")?;
            package_check::run_checks(&root, &packages)?;
            fuzz(&root, 20)?;
            // Keeps the benchmark code from rotting; no thresholds.
            cargo(&["build", "--release", "--package", "toa", "--examples"])?;
            bench(true)
        }
        Task::Fuzz { live: true, connections, seed, .. } => {
            require_root("cargo xtask fuzz --live")?;
            setup()?;
            build_libtoa()?;
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
            });
            println!("xtask: live fuzzing, {connections} connections per mode, seed {seed}");
            let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run(Command::new(cargo)
                .args(["test", "--release", "--package", "toa", "--test", "e2e", "random_option_areas"])
                .args(["--", "--test-threads=2"])
                .env("TOA_LIVE_FUZZ", connections.to_string())
                .env("TOA_LIVE_FUZZ_SEED", seed.to_string()))
        }
        Task::Fuzz { seconds, .. } => fuzz(&root, seconds),
        Task::Bench { quick } => {
            require_root("cargo xtask bench")?;
            setup()?;
            build_libtoa()?;
            // The modes' benchmark runs examples/peer_echo as a server process.
            cargo(&["build", "--release", "--package", "toa", "--examples"])?;
            bench(quick)
        }
        Task::Kernels { kernels, no_debian, no_readme, only } => {
            require_root("cargo xtask kernels")?;
            setup()?;
            kernels::run_matrix(&root, &kernels, !no_debian, !no_readme, &only)
        }
    }
}

/// Runs the parser's fuzz target for `seconds`; installs cargo-fuzz when missing.
fn fuzz(root: &Path, seconds: u32) -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        println!("xtask: installing cargo-fuzz");
        cargo(&["install", "--locked", "cargo-fuzz"])?;
    }
    // No sanitizer: the parser is safe Rust; libFuzzer's coverage guidance is what is wanted,
    // and it runs on the stable toolchain (RUSTC_BOOTSTRAP from .cargo/config.toml).
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(["fuzz", "run", "find_toa", "--sanitizer", "none", "--"])
        .arg(format!("-max_total_time={seconds}"))
        .current_dir(root.join("fuzz")))
}

/// target/release/libtoa.so: its own workspace (a no_std cdylib must not see the std that
/// toa-common's `user` feature brings into the main one).
fn build_libtoa() -> Result<()> {
    cargo(&["build", "--release", "--manifest-path", "libtoa/Cargo.toml", "--target-dir", "target"])
}

/// Adds a rustup target when it is missing.
pub(crate) fn add_rust_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|t| t.trim() == target) {
        run(Command::new("rustup").args(["target", "add", target]))?;
    }
    Ok(())
}

/// libtoa.so for `arch` (glibc target; linked by rust-lld for arm64, see .cargo/config.toml).
pub(crate) fn build_libtoa_for(arch: Arch) -> Result<()> {
    if arch == Arch::X86_64 {
        build_libtoa()?;
        println!("built target/release/libtoa.so");
        return Ok(());
    }
    let target = "aarch64-unknown-linux-gnu";
    add_rust_target(target)?;
    cargo(&[
        "build",
        "--release",
        "--manifest-path",
        "libtoa/Cargo.toml",
        "--target-dir",
        "target",
        "--target",
        target,
    ])?;
    println!("built target/{target}/release/libtoa.so");
    Ok(())
}

fn bench(quick: bool) -> Result<()> {
    let mut args = vec!["bench", "--package", "toa", "--bench", "toa", "--"];
    if quick {
        args.push("--quick");
    }
    cargo(&args)
}

/// A static binary for `arch`; rust-lld links the musl targets, so no cross toolchain is needed.
pub(crate) fn build_static(root: &Path, arch: Arch) -> Result<()> {
    build_static_with(root, arch, "release")
}

/// `build_static` with a cargo profile: `matrix` reuses the kernel matrix's build in CI.
pub(crate) fn build_static_with(root: &Path, arch: Arch, profile: &str) -> Result<()> {
    let target = arch.musl_target();
    add_rust_target(target)?;
    let linker_var = format!("CARGO_TARGET_{}_LINKER", target.to_uppercase().replace('-', "_"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--profile", profile, "--package", "toa", "--bin", "toa", "--target", target]);
    if arch != Arch::X86_64 {
        cmd.env(linker_var, "rust-lld");
    }
    run(&mut cmd)?;
    let bin = root.join("target").join(target).join(profile).join("toa");
    let size = std::fs::metadata(&bin)?.len();
    println!("built {} ({:.1} MB)", bin.display(), size as f64 / 1e6);
    Ok(())
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn require_root(what: &str) -> Result<()> {
    // `id -u` avoids a libc dependency in xtask.
    let out = Command::new("id").arg("-u").output().context("run `id -u`")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("{what} must run as root (it loads eBPF programs and creates network namespaces): run it with sudo");
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).args(args))
}

pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program's path, searched in PATH (or the path itself when it has a slash).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The cgroup v2 mount point, from /proc/mounts.
pub(crate) fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 hierarchy is mounted")
}

/// Installs, with apt-get, the packages of the programs that are missing: (program, package).
pub(crate) fn apt_install_missing(needed: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = needed.iter().filter(|(bin, _)| which(bin).is_none()).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if which("apt-get").is_none() {
        bail!("missing {}: install them with your package manager", missing.join(", "));
    }
    println!("xtask: installing {}", missing.join(", "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn setup() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    test_tools()
}

/// `-Z build-std=core` needs the standard library's sources.
fn rust_src() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"])).context("rustc --print sysroot")?;
    if Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    println!("xtask: installing rust-src");
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

/// rustc's LLVM major version, e.g. 22.
fn rustc_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustc").arg("-vV")).context("rustc -vV")?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV does not name its LLVM version")?;
    Ok(version.split('.').next().unwrap_or_default().parse()?)
}

/// A bpf-linker built against rustc's own libLLVM (no system LLVM needed). If rustup later
/// replaces the toolchain, the linker no longer starts and is rebuilt here.
fn bpf_linker() -> Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    let major = rustc_llvm_major()?;
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"])).context("rustc --print sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib_dir.display()))?;
    // A stable home for the symlinks: the linker keeps an rpath to it.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join("toa-llvm");
    let link_dir = prefix.join("lib");
    std::fs::create_dir_all(&link_dir)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = link_dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)?;
    }
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {major} (about a minute)");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(["install", "--locked", "--force", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))
}

/// bpftool, ip, python3, podman and the rest, from Debian's packages when missing.
fn test_tools() -> Result<()> {
    apt_install_missing(&[
        ("bpftool", "bpftool"),
        ("ip", "iproute2"),
        ("tc", "iproute2"),
        ("python3", "python3"),
        ("objdump", "binutils"),
        ("dpkg-deb", "dpkg"),
        // toa/tests/container.rs builds and runs the image (runc: crun refuses hybrid cgroups).
        ("podman", "podman"),
        ("runc", "runc"),
        ("file", "file"),
        // The benchmark's real-application arm loads nginx with it (`cargo xtask bench`).
        ("wrk", "wrk"),
    ])?;
    nginx()
}

/// nginx for the userspace mode's tests, unpacked from Debian's package into target/test-tools
/// rather than installed: installing it would start a web server on this host.
fn nginx() -> Result<()> {
    let dir = workspace_root().join("target/test-tools");
    if Path::new("/usr/sbin/nginx").exists() || dir.join("nginx/usr/sbin/nginx").exists() {
        return Ok(());
    }
    // Its libraries are plain packages without services.
    let missing: Vec<&str> = ["libcrypt1", "libpcre2-8-0", "libssl3", "zlib1g"]
        .into_iter()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        println!("xtask: installing {}", missing.join(", "));
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    println!("xtask: unpacking nginx into {}", dir.display());
    // apt-get download would drop privileges to _apt, which cannot write into target/.
    let download = || {
        run(Command::new("apt-get")
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", "nginx"])
            .current_dir(&debs))
    };
    if download().is_err() {
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        download()?;
    }
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("nginx_")))
        .context("apt-get download nginx left no .deb")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.join("nginx")))
}
