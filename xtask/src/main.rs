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

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the build and test prerequisites (idempotent).
    Setup,
    /// Build the release binary (target/release/toa).
    Build,
    /// Build, install to /usr/local/bin/toa and load the agent on this host (root).
    Install {
        /// Where to install the binary.
        #[arg(long, default_value = "/usr/local/bin")]
        prefix: PathBuf,
    },
    /// Run every test: unit tests, then the end-to-end suite (root).
    Test,
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
        Task::Build => {
            setup()?;
            cargo(&["build", "--release", "--package", "toa"])
        }
        Task::Install { prefix } => {
            require_root("cargo xtask install")?;
            setup()?;
            cargo(&["build", "--release", "--package", "toa"])?;
            std::fs::create_dir_all(&prefix)?;
            let dest = prefix.join("toa");
            // Copy to a temporary name and rename: replacing a running binary in place fails.
            let tmp = prefix.join(".toa.new");
            std::fs::copy(root.join("target/release/toa"), &tmp).with_context(|| format!("copy to {}", tmp.display()))?;
            std::fs::rename(&tmp, &dest)?;
            println!("installed {}", dest.display());
            run(Command::new(&dest).arg("load"))
        }
        Task::Test => {
            require_root("cargo xtask test")?;
            setup()?;
            // The end-to-end tests start examples/peer_echo as a server.
            cargo(&["build", "--package", "toa", "--examples", "--bins"])?;
            cargo(&["test", "--package", "toa-common", "--package", "toa", "--", "--test-threads=2"])
        }
    }
}

fn workspace_root() -> PathBuf {
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

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).args(args))
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
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

/// bpftool, ip and python3, from Debian's packages when missing.
fn test_tools() -> Result<()> {
    let missing: Vec<&str> = [("bpftool", "bpftool"), ("ip", "iproute2"), ("python3", "python3")]
        .into_iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing {}: install them with your package manager", missing.join(", "));
    }
    println!("xtask: installing {}", missing.join(", "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get").args(["install", "-y", "-qq", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
}
