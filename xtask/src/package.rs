//! `cargo xtask package`: what an operator downloads. For each architecture a `.deb` (cargo-deb),
//! an `.rpm` (cargo-generate-rpm) and a tarball of the static `toa`, `libtoa.so`, the systemd
//! unit and its userspace drop-in, the example config, the manual pages, the shell completions,
//! the licences and the README; and `SHA256SUMS` for them all, in `target/package/`. Each
//! tarball is listed back and checked before it is kept; `package_check` inspects and installs
//! the packages.

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

/// The versions of the packaging tools, installed with `cargo install --locked` when missing.
const CARGO_DEB: &str = "3.8.0";
const CARGO_GENERATE_RPM: &str = "0.21.1";

/// The files `build` wrote, by architecture.
pub struct Packages {
    pub version: String,
    pub debs: Vec<(Arch, PathBuf)>,
    pub rpms: Vec<(Arch, PathBuf)>,
}

/// Builds everything for `arches` with the cargo `profile` (`release`; CI packages the kernel
/// matrix's `matrix` build, which differs only in link-time optimisation).
pub fn build(root: &Path, arches: &[Arch], profile: &str) -> Result<Packages> {
    tools()?;
    let version = version(root)?;
    let out = root.join("target/package");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    // Manual pages and completions come from the x86_64 binary (this machine runs it); they
    // are the same for every architecture.
    crate::build_static_with(root, Arch::X86_64, profile)?;
    let host_toa = static_toa(root, Arch::X86_64, profile);
    let generated = out.join("generated");
    generate(&host_toa, &generated)?;
    let mut names = Vec::new();
    let mut packages = Packages { version: version.clone(), debs: Vec::new(), rpms: Vec::new() };
    for &arch in arches {
        if arch != Arch::X86_64 {
            crate::build_static_with(root, arch, profile)?;
        }
        crate::build_libtoa_for(arch)?;
        let name = format!("toa-{version}-{}", arch.name());
        let stage = out.join("stage").join(&name);
        stage_files(root, arch, profile, &generated, &stage)?;
        let tarball = format!("{name}.tar.gz");
        pack(&stage, &out.join(&tarball))?;
        check(&out.join(&tarball), &name)?;
        names.push(tarball);

        stage_root(&stage, &out.join("root"))?;
        let deb = deb(root, arch, &out, "1")?;
        let rpm = rpm(root, arch, &out)?;
        names.push(file_name(&deb));
        names.push(file_name(&rpm));
        packages.debs.push((arch, deb));
        packages.rpms.push((arch, rpm));
    }
    fs::remove_dir_all(out.join("stage"))?;
    fs::remove_dir_all(out.join("root"))?;
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
    Ok(packages)
}

pub fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// cargo-deb and cargo-generate-rpm at the pinned versions.
fn tools() -> Result<()> {
    for (tool, subcommand, version) in
        [("cargo-deb", "deb", CARGO_DEB), ("cargo-generate-rpm", "generate-rpm", CARGO_GENERATE_RPM)]
    {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let have = crate::output(Command::new(&cargo).args([subcommand, "--version"])).unwrap_or_default();
        if have.split_whitespace().nth(1) == Some(version) {
            continue;
        }
        println!("xtask: installing {tool} {version}");
        run(Command::new(&cargo).args(["install", "--locked", "--force", tool, "--version", version]))?;
    }
    Ok(())
}

/// The packages' file system, from a tarball's stage: `target/package/root`, which the
/// `[package.metadata.deb]` and `[package.metadata.generate-rpm]` tables of toa/Cargo.toml
/// list. The unit, drop-in and config name the packages' paths (/usr/bin, /usr/lib/toa).
fn stage_root(stage: &Path, dest: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dest);
    let to_usr = [("/usr/local/bin/toa", "/usr/bin/toa"), ("/usr/local/lib/toa/", "/usr/lib/toa/")];
    let place = |from: &str, to: &str, rewrites: &[(&str, &str)]| -> Result<()> {
        let to = dest.join(to);
        fs::create_dir_all(to.parent().context("a parent")?)?;
        let mut text = fs::read_to_string(stage.join(from)).with_context(|| format!("read {from}"))?;
        for (old, new) in rewrites {
            if !text.contains(old) {
                bail!("{from} no longer holds {old:?}: update the packages' rewrite in xtask/src/package.rs");
            }
            text = text.replace(old, new);
        }
        Ok(fs::write(to, text)?)
    };
    let unit_install = "#   install -m 0755 target/x86_64-unknown-linux-musl/release/toa /usr/local/bin/toa\n\
                        #   install -D -m 0644 deploy/systemd/toa.toml /etc/toa/toa.toml\n\
                        #   install -m 0644 deploy/systemd/toa.service /etc/systemd/system/toa.service\n";
    let unit_rewrites = [(unit_install, "#   (installed by the toa package; nothing runs until enabled)\n"), to_usr[0]];
    place("systemd/toa.service", "lib/systemd/system/toa.service", &unit_rewrites)?;
    let drop_in_install =
        "#   install -D -m 0644 deploy/systemd/userspace.conf /etc/systemd/system/toa.service.d/userspace.conf\n";
    let drop_in_link = "#   mkdir -p /etc/systemd/system/toa.service.d\n\
                        #   ln -s /usr/share/toa/userspace.conf /etc/systemd/system/toa.service.d/\n";
    let mut drop_in_rewrites = vec![(drop_in_install, drop_in_link)];
    drop_in_rewrites.extend(to_usr);
    place("systemd/userspace.conf", "usr/share/toa/userspace.conf", &drop_in_rewrites)?;
    place("toa.toml", "etc/toa/toa.toml", &to_usr[1..])?;
    let copy = |from: &str, to: &str| -> Result<()> {
        let to = dest.join(to);
        fs::create_dir_all(to.parent().context("a parent")?)?;
        fs::copy(stage.join(from), &to).with_context(|| format!("copy {from}"))?;
        Ok(())
    };
    copy("toa", "usr/bin/toa")?;
    copy("libtoa.so", "usr/lib/toa/libtoa.so")?;
    copy("completions/toa.bash", "usr/share/bash-completion/completions/toa")?;
    copy("completions/_toa", "usr/share/zsh/vendor-completions/_toa")?;
    copy("completions/toa.fish", "usr/share/fish/vendor_completions.d/toa.fish")?;
    let man = dest.join("usr/share/man/man8");
    fs::create_dir_all(&man)?;
    for entry in fs::read_dir(stage.join("man"))? {
        let page = entry?.path();
        let gz = man.join(format!("{}.gz", file_name(&page)));
        run(Command::new("sh").arg("-c").arg(format!("gzip -9 -n -c '{}' > '{}'", page.display(), gz.display())))?;
    }
    Ok(())
}

/// The last commit's time: every file's and package's timestamp (reproducible builds).
fn source_date(root: &Path) -> String {
    let stamp =
        crate::output(Command::new("git").args(["log", "-1", "--format=%ct"]).current_dir(root)).unwrap_or_default();
    let stamp = stamp.trim();
    if stamp.is_empty() {
        "0".to_owned()
    } else {
        stamp.to_owned()
    }
}

/// `toa_VERSION-REVISION_ARCH.deb` from target/package/root; xz members, which dpkg ≥ 1.15.6
/// (Ubuntu 16.04 has 1.18) reads.
pub fn deb(root: &Path, arch: Arch, out: &Path, revision: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let file = out.join(format!("toa_{}-{revision}_{}.deb", version(root)?, arch.deb_name()));
    run(Command::new(cargo)
        .args(["deb", "--package", "toa", "--no-build", "--no-strip", "--compress-type", "xz", "--quiet"])
        .args(["--target", arch.musl_target(), "--deb-revision", revision, "--output"])
        .arg(&file)
        .env("SOURCE_DATE_EPOCH", source_date(root))
        .current_dir(root))?;
    Ok(file)
}

/// `toa-VERSION-1.ARCH.rpm` from target/package/root: an xz payload and no rich dependencies,
/// which CentOS 7's rpm 4.11 reads.
fn rpm(root: &Path, arch: Arch, out: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let file = out.join(format!("toa-{}-1.{}.rpm", version(root)?, arch.name()));
    run(Command::new(cargo)
        .args(["generate-rpm", "--package", "toa", "--payload-compress", "xz", "--auto-req", "disabled"])
        .args(["--arch", arch.name(), "--source-date", &source_date(root), "--output"])
        .arg(&file)
        .current_dir(root))?;
    Ok(file)
}

/// The workspace version (`[workspace.package] version`).
fn version(root: &Path) -> Result<String> {
    let manifest = fs::read_to_string(root.join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = \"")?.strip_suffix('"').map(str::to_owned))
        .context("no version in the workspace Cargo.toml")
}

fn static_toa(root: &Path, arch: Arch, profile: &str) -> PathBuf {
    root.join("target").join(arch.musl_target()).join(profile).join("toa")
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

fn stage_files(root: &Path, arch: Arch, profile: &str, generated: &Path, stage: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(stage);
    fs::create_dir_all(stage.join("systemd"))?;
    let libtoa = match arch {
        Arch::X86_64 => root.join("target/release/libtoa.so"),
        Arch::Aarch64 => root.join("target/aarch64-unknown-linux-gnu/release/libtoa.so"),
    };
    let copies = [
        (static_toa(root, arch, profile), "toa"),
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
    let stamp = source_date(&crate::workspace_root());
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
