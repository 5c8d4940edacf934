//! `cargo xtask package`: what an operator downloads. For each architecture a tarball of the
//! static `toa`, `libtoa.so`, the systemd unit and its userspace drop-in, the example config,
//! the manual pages, the shell completions, the licences and the README; and `SHA256SUMS` for
//! them all, in `target/package/`. Each tarball is listed back and checked before it is kept.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{run, Arch};

/// What every tarball holds, below its top directory.
const CONTENTS: &[&str] = &[
    "toa",
    "libtoa.so",
    "toa.toml",
    "systemd/toa.service",
    "systemd/userspace.conf",
    "man/toa.8",
    "man/toa-load.8",
    "man/toa-run.8",
    "man/toa-unload.8",
    "man/toa-status.8",
    "man/toa-stats.8",
    "man/toa-conns.8",
    "man/toa-doctor.8",
    "man/toa-probe.8",
    "man/toa-completions.8",
    "completions/toa.bash",
    "completions/_toa",
    "completions/toa.fish",
    "LICENSE-APACHE",
    "LICENSE-MIT",
    "README.md",
];

pub fn tarballs(root: &Path, arches: &[Arch]) -> Result<()> {
    let version = version(root)?;
    let out = root.join("target/package");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    // Manual pages and completions come from the x86_64 binary (this machine runs it); they
    // are the same for every architecture.
    crate::build_static(root, Arch::X86_64)?;
    let host_toa = static_toa(root, Arch::X86_64);
    let generated = out.join("generated");
    generate(&host_toa, &generated)?;
    let mut names = Vec::new();
    for &arch in arches {
        if arch != Arch::X86_64 {
            crate::build_static(root, arch)?;
        }
        crate::build_libtoa_for(arch)?;
        let name = format!("toa-{version}-{}", arch.name());
        let stage = out.join("stage").join(&name);
        stage_files(root, arch, &generated, &stage)?;
        let tarball = format!("{name}.tar.gz");
        pack(&stage, &out.join(&tarball))?;
        check(&out.join(&tarball), &name)?;
        names.push(tarball);
    }
    fs::remove_dir_all(out.join("stage"))?;
    fs::remove_dir_all(&generated)?;
    let sums = Command::new("sha256sum").args(&names).current_dir(&out).output().context("run sha256sum")?;
    if !sums.status.success() {
        bail!("sha256sum failed: {}", String::from_utf8_lossy(&sums.stderr));
    }
    fs::write(out.join("SHA256SUMS"), &sums.stdout)?;
    for name in names.iter().chain(std::iter::once(&"SHA256SUMS".to_owned())) {
        let size = fs::metadata(out.join(name))?.len();
        println!("packaged target/package/{name} ({:.1} MB)", size as f64 / 1e6);
    }
    Ok(())
}

/// The workspace version (`[workspace.package] version`).
fn version(root: &Path) -> Result<String> {
    let manifest = fs::read_to_string(root.join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = \"")?.strip_suffix('"').map(str::to_owned))
        .context("no version in the workspace Cargo.toml")
}

fn static_toa(root: &Path, arch: Arch) -> PathBuf {
    root.join("target").join(arch.musl_target()).join("release/toa")
}

/// `toa man DIR` and `toa completions SHELL`, from the binary itself.
fn generate(toa: &Path, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("completions"))?;
    run(Command::new(toa).arg("man").arg(dir.join("man")).stdout(Stdio::null()))?;
    for (shell, file) in [("bash", "toa.bash"), ("zsh", "_toa"), ("fish", "toa.fish")] {
        let out = Command::new(toa).args(["completions", shell]).output()?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("toa completions {shell} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        fs::write(dir.join("completions").join(file), out.stdout)?;
    }
    Ok(())
}

fn stage_files(root: &Path, arch: Arch, generated: &Path, stage: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(stage);
    fs::create_dir_all(stage.join("systemd"))?;
    let libtoa = match arch {
        Arch::X86_64 => root.join("target/release/libtoa.so"),
        Arch::Aarch64 => root.join("target/aarch64-unknown-linux-gnu/release/libtoa.so"),
    };
    let copies = [
        (static_toa(root, arch), "toa"),
        (libtoa, "libtoa.so"),
        (root.join("deploy/systemd/toa.toml"), "toa.toml"),
        (root.join("deploy/systemd/toa.service"), "systemd/toa.service"),
        (root.join("deploy/systemd/userspace.conf"), "systemd/userspace.conf"),
        (root.join("LICENSE-APACHE"), "LICENSE-APACHE"),
        (root.join("LICENSE-MIT"), "LICENSE-MIT"),
        (root.join("README.md"), "README.md"),
    ];
    for (from, to) in copies {
        fs::copy(&from, stage.join(to)).with_context(|| format!("copy {}", from.display()))?;
    }
    for sub in ["man", "completions"] {
        fs::create_dir_all(stage.join(sub))?;
        for entry in fs::read_dir(generated.join(sub))? {
            let entry = entry?;
            fs::copy(entry.path(), stage.join(sub).join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A reproducible tarball: sorted names, root's ownership, one modification time (the last
/// commit's), and gzip without its own timestamp.
fn pack(stage: &Path, tarball: &Path) -> Result<()> {
    let root = crate::workspace_root();
    let stamp = Command::new("git").args(["log", "-1", "--format=%ct"]).current_dir(&root).output()?;
    let stamp = String::from_utf8_lossy(&stamp.stdout).trim().to_owned();
    let stamp = if stamp.is_empty() { "0".to_owned() } else { stamp };
    let dir = stage.parent().context("a stage directory")?;
    let name = stage.file_name().context("a stage name")?.to_string_lossy();
    let script = format!(
        "tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@{stamp} -cf - '{name}' | gzip -9 -n > '{}'",
        tarball.display()
    );
    run(Command::new("sh").arg("-c").arg(script).current_dir(dir))
}

/// Lists the tarball back: exactly the expected files under `top/`, and its `toa` executable.
fn check(tarball: &Path, top: &str) -> Result<()> {
    let list = Command::new("tar").arg("-tvzf").arg(tarball).output()?;
    if !list.status.success() {
        bail!("tar -tzf {} failed", tarball.display());
    }
    let text = String::from_utf8_lossy(&list.stdout);
    let mut files: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last()?.strip_prefix(&format!("{top}/")).map(str::to_owned))
        .collect();
    files.sort();
    let mut want: Vec<String> = CONTENTS.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    if files != want {
        bail!("{} holds {files:?}, not {want:?}", tarball.display());
    }
    let toa = text.lines().find(|l| l.ends_with(&format!("{top}/toa"))).unwrap_or_default();
    if !toa.starts_with("-rwxr-xr-x 0/0") {
        bail!("{}: toa is not an executable of root's: {toa}", tarball.display());
    }
    Ok(())
}
