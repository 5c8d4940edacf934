//! `cargo xtask package --check` (and `cargo xtask test`): the packages as operators meet them.
//! Inspects every `.deb` and `.rpm` (contents, control data, scripts, compression that old
//! dpkg and rpm read, lintian), installs and erases the `.rpm` with `rpm --root` in a scratch
//! root, and installs, upgrades with an open connection and purges the `.deb` under a real
//! systemd (Debian 12 under qemu).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    package::{self, Packages},
    run,
    systemd::{self, Overlay},
    Arch,
};

/// Files of the `.deb`, besides the directories.
const DEB_FILES: &[&str] = &[
    "/etc/toa/toa.toml",
    "/lib/systemd/system/toa.service",
    "/usr/bin/toa",
    "/usr/lib/toa/libtoa.so",
    "/usr/share/bash-completion/completions/toa",
    "/usr/share/doc/toa/README.md",
    "/usr/share/doc/toa/changelog.Debian.gz",
    "/usr/share/doc/toa/copyright",
    "/usr/share/fish/vendor_completions.d/toa.fish",
    "/usr/share/lintian/overrides/toa",
    "/usr/share/toa/userspace.conf",
    "/usr/share/zsh/vendor-completions/_toa",
];

/// Files of the `.rpm`.
const RPM_FILES: &[&str] = &[
    "/etc/toa/toa.toml",
    "/usr/bin/toa",
    "/usr/lib/systemd/system/toa.service",
    "/usr/lib/toa/libtoa.so",
    "/usr/share/bash-completion/completions/toa",
    "/usr/share/doc/toa/README.md",
    "/usr/share/fish/vendor_completions.d/toa.fish",
    "/usr/share/licenses/toa/LICENSE-APACHE",
    "/usr/share/licenses/toa/LICENSE-MIT",
    "/usr/share/toa/userspace.conf",
    "/usr/share/zsh/site-functions/_toa",
];

/// The manual pages both packages hold, in /usr/share/man/man8.
const MAN_PAGES: &[&str] = &[
    "toa",
    "toa-completions",
    "toa-conns",
    "toa-doctor",
    "toa-load",
    "toa-probe",
    "toa-run",
    "toa-stats",
    "toa-status",
    "toa-unload",
];

/// What CentOS 7's rpm 4.11 can provide for `rpmlib(...)` requirements (`rpm --showrc`, "Features
/// supported by rpmlib"): a package that requires anything else (PayloadIsZstd, RichDependencies)
/// does not install there.
const RPM_4_11_FEATURES: &[&str] = &[
    "BuiltinLuaScripts",
    "CompressedFileNames",
    "ConcurrentAccess",
    "ExplicitPackageProvide",
    "FileCaps",
    "FileDigests",
    "HeaderLoadSortsTags",
    "PartialHardlinkSets",
    "PayloadFilesHavePrefix",
    "PayloadIsBzip2",
    "PayloadIsLzma",
    "PayloadIsXz",
    "ScriptletExpansion",
    "ScriptletInterpreterArgs",
    "TildeInVersions",
    "VersionedDependencies",
];

pub fn run_checks(root: &Path, packages: &Packages) -> Result<()> {
    crate::apt_install_missing(&[
        ("rpm", "rpm"),
        ("lintian", "lintian"),
        ("ar", "binutils"),
        ("zsh", "zsh"),
        ("fish", "fish"),
    ])?;
    for (arch, deb) in &packages.debs {
        inspect_deb(deb, *arch, &packages.version)?;
        println!("  package: ok   {} (dpkg-deb -I/-c, xz members, lintian)", package::file_name(deb));
    }
    // This machine's architecture: the one its shells and qemu's fast guest run.
    let (_, host_deb) = packages.debs.iter().find(|(a, _)| *a == Arch::X86_64).context("no x86_64 .deb")?;
    zsh_and_fish_complete(root, host_deb)?;
    println!("  package: ok   zsh and fish complete `toa unl` from the package's files (bash: in the guest)");
    for (arch, rpm) in &packages.rpms {
        inspect_rpm(root, rpm, *arch)?;
        println!(
            "  package: ok   {} (rpm -qp --info/--list/--scripts/--requires, xz payload)",
            package::file_name(rpm)
        );
    }
    let work = root.join("target/kernels");
    fs::create_dir_all(&work)?;
    let (_, rpm) = packages.rpms.iter().find(|(a, _)| *a == Arch::X86_64).context("no x86_64 .rpm")?;
    rpm_root(&work, rpm)?;
    println!("  package: ok   rpm --root install and erase in a scratch root");
    let vmlinuz = crate::kernels::systemd_kernel(&work)?;
    deb_under_systemd(root, &work, &vmlinuz, host_deb)
}

/// `files` and the manual pages, sorted: what a package must list.
fn expected(files: &[&str]) -> Vec<String> {
    let mut want: Vec<String> = files.iter().map(|f| (*f).to_owned()).collect();
    want.extend(MAN_PAGES.iter().map(|p| format!("/usr/share/man/man8/{p}.8.gz")));
    want.sort();
    want
}

fn text(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn inspect_deb(deb: &Path, arch: Arch, version: &str) -> Result<()> {
    // dpkg 1.18 (Ubuntu 16.04) reads gzip and xz members, not zstd.
    let members = text(Command::new("ar").arg("t").arg(deb))?;
    let members: Vec<&str> = members.lines().collect();
    let old_dpkg_reads = |m: &str, name: &str| m == format!("{name}.tar.xz") || m == format!("{name}.tar.gz");
    if members.len() != 3
        || members[0] != "debian-binary"
        || !old_dpkg_reads(members[1], "control")
        || !old_dpkg_reads(members[2], "data")
    {
        bail!(
            "{}: members {members:?}: dpkg 1.18 needs debian-binary, control.tar.{{xz,gz}}, data.tar.{{xz,gz}}",
            deb.display()
        );
    }
    let info = text(Command::new("dpkg-deb").arg("-I").arg(deb))?;
    for field in [
        "Package: toa",
        &format!("Version: {version}-1"),
        &format!("Architecture: {}", arch.deb_name()),
        "Depends: libc6",
    ] {
        if !info.lines().any(|l| l.trim() == field) {
            bail!("{}: dpkg-deb -I has no \"{field}\":\n{info}", deb.display());
        }
    }
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        if !info.lines().any(|l| l.contains(" bytes, ") && l.split_whitespace().any(|w| w == script)) {
            bail!("{}: no {script} in the control archive:\n{info}", deb.display());
        }
    }
    let listing = text(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let mut files: Vec<String> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last()?.strip_prefix('.').map(str::to_owned))
        .collect();
    files.sort();
    let want = expected(DEB_FILES);
    if files != want {
        bail!("{}: dpkg-deb -c lists {files:?}, not {want:?}", deb.display());
    }
    let toa = listing.lines().find(|l| l.ends_with("./usr/bin/toa")).unwrap_or_default();
    if !toa.starts_with("-rwxr-xr-x 0/0") {
        bail!("{}: /usr/bin/toa is not root's executable: {toa}", deb.display());
    }
    let conffiles = text(
        Command::new("sh")
            .arg("-c")
            .arg(format!("dpkg-deb --ctrl-tarfile '{}' | tar -xOf - ./conffiles", deb.display())),
    )?;
    if conffiles.trim() != "/etc/toa/toa.toml" {
        bail!("{}: conffiles is {conffiles:?}, not /etc/toa/toa.toml", deb.display());
    }
    // Every error and warning is fixed or justified in deploy/package/debian/lintian-overrides.
    let lintian = Command::new("lintian").args(["--fail-on", "error,warning"]).arg(deb).output()?;
    if !lintian.status.success() {
        bail!("lintian {}:\n{}", deb.display(), String::from_utf8_lossy(&lintian.stdout));
    }
    Ok(())
}

fn inspect_rpm(root: &Path, rpm: &Path, arch: Arch) -> Result<()> {
    let query = |args: &[&str]| text(Command::new("rpm").arg("-qp").args(args).arg(rpm));
    let header = query(&["--qf", "%{NAME} %{ARCH} %{PAYLOADCOMPRESSOR} %{PAYLOADFORMAT}"])?;
    // rpm 4.11 (CentOS 7) decompresses gzip and xz payloads, not zstd.
    let want = format!("toa {} xz cpio", arch.name());
    if header.trim() != want {
        bail!("{}: {header:?}, not {want:?}", rpm.display());
    }
    let info = query(&["--info"])?;
    if !info.contains("License     : MIT OR Apache-2.0") {
        bail!("{}: rpm -qp --info:\n{info}", rpm.display());
    }
    let mut files: Vec<String> = query(&["--list"])?.lines().map(str::to_owned).collect();
    files.sort();
    let want = expected(RPM_FILES);
    if files != want {
        bail!("{}: rpm -qp --list gives {files:?}, not {want:?}", rpm.display());
    }
    if query(&["--configfiles"])?.trim() != "/etc/toa/toa.toml" {
        bail!("{}: /etc/toa/toa.toml is not its only config file", rpm.display());
    }
    for line in query(&["--requires"])?.lines() {
        if line.starts_with('(') {
            bail!("{}: a rich dependency, which rpm 4.11 cannot read: {line}", rpm.display());
        }
        if let Some(feature) = line.strip_prefix("rpmlib(").and_then(|l| l.split(')').next()) {
            if !RPM_4_11_FEATURES.contains(&feature) {
                bail!("{}: requires rpmlib({feature}), which rpm 4.11 does not provide", rpm.display());
            }
        }
    }
    let scripts = query(&["--scripts"])?;
    for (heading, file) in [
        ("postinstall scriptlet", "post.sh"),
        ("preuninstall scriptlet", "preun.sh"),
        ("postuninstall scriptlet", "postun.sh"),
    ] {
        let body = fs::read_to_string(root.join("deploy/package/rpm").join(file))?;
        if !scripts.contains(heading) || !scripts.contains(body.trim()) {
            bail!("{}: its {heading} is not deploy/package/rpm/{file}:\n{scripts}", rpm.display());
        }
    }
    Ok(())
}

/// The package's zsh and fish completions, unpacked, loaded the way each shell finds them in
/// its vendor directory (the guest checks bash's from an installed package).
fn zsh_and_fish_complete(root: &Path, deb: &Path) -> Result<()> {
    let dir = root.join("target/package-shells");
    let _ = fs::remove_dir_all(&dir);
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir))?;
    let result = (|| -> Result<()> {
        let path = format!("{}:{}", dir.join("usr/bin").display(), std::env::var("PATH").unwrap_or_default());
        let fish = text(
            Command::new("fish")
                .arg("--no-config")
                .arg("-c")
                .arg(format!(
                    "set -p fish_complete_path {}; complete -C 'toa unl'",
                    dir.join("usr/share/fish/vendor_completions.d").display()
                ))
                .env("PATH", &path),
        )?;
        if !fish.starts_with("unload\t") {
            bail!("fish completes `toa unl` with {fish:?}, not unload");
        }
        let zsh = text(Command::new("zsh").arg("-fc").arg(format!(
            "fpath=({} $fpath); autoload -Uz compinit; compinit -u -D; print -r -- $_comps[toa]",
            dir.join("usr/share/zsh/vendor-completions").display()
        )))?;
        if zsh.trim() != "_toa" {
            bail!("zsh's compinit binds toa to {zsh:?}, not _toa");
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

/// Installs the `.rpm` into a scratch root with a shell (a copy of the Debian base, no systemd
/// running there), so that its scriptlets run; checks rpm's database and the files, that a
/// reinstall runs cleanly, and that an erase runs its scriptlets and removes every file.
fn rpm_root(work: &Path, rpm: &Path) -> Result<()> {
    let scratch = work.join("rpm-root");
    let _ = fs::remove_dir_all(&scratch);
    run(Command::new("cp").arg("-a").arg(systemd::base_rootfs(work)?).arg(&scratch))?;
    let result = rpm_root_in(&scratch, rpm);
    let _ = fs::remove_dir_all(&scratch);
    result
}

fn rpm_root_in(scratch: &Path, rpm: &Path) -> Result<()> {
    let rpm_in = |args: &[&str]| text(Command::new("rpm").arg("--root").arg(scratch).args(args));
    let rpm_file = rpm.to_string_lossy();
    rpm_in(&["--initdb"])?;
    // --nodeps: the scratch root's rpm database is empty (no /bin/sh package to satisfy).
    let installed = rpm_in(&["-i", "--nodeps", &rpm_file])?;
    if !installed.contains("toa: installed, nothing attached") {
        bail!("rpm -i: %post did not run (it says what to do next): {installed:?}");
    }
    // Twice: the scripts are safe to run again.
    rpm_in(&["-i", "--nodeps", "--replacepkgs", &rpm_file])?;
    let mut files: Vec<String> = rpm_in(&["-ql", "toa"])?.lines().map(str::to_owned).collect();
    files.sort();
    let want = expected(RPM_FILES);
    if files != want {
        bail!("rpm -ql toa gives {files:?}, not {want:?}");
    }
    // Sizes, digests, modes and owners of every installed file, as the package says.
    let verify = rpm_in(&["-V", "--nodeps", "toa"])?;
    if !verify.trim().is_empty() {
        bail!("rpm -V toa: {verify}");
    }
    // The erase's %preun unloads (nothing is loaded in a scratch root, which it says).
    let erased = rpm_in(&["-e", "toa"])?;
    if !erased.contains("toa was not loaded; nothing to do") {
        bail!("rpm -e: %preun did not run toa unload: {erased:?}");
    }
    let left: Vec<&String> = files.iter().filter(|f| scratch.join(f.trim_start_matches('/')).exists()).collect();
    if !left.is_empty() || rpm_in(&["-q", "toa"]).is_ok() {
        bail!("rpm -e left {left:?} or its database entry");
    }
    Ok(())
}

/// What the guest does with the `.deb`, as an operator would, saying what it saw in
/// "TOA-FACT name value" lines that `deb_facts` judges. Every wait is for an event, bounded
/// only against a hang.
const GUEST_SCRIPT: &str = include_str!("package_guest.sh");

const GUEST_UNIT: &str = "[Unit]
Description=Installs, upgrades and purges the toa package (cargo xtask package --check)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/bin/toa-package-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

/// A second build of the package for the upgrade: the same files as version `-2`.
fn second_build(deb: &Path, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("second");
    let _ = fs::remove_dir_all(&tree);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree))?;
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control)?;
    let version = text.lines().find_map(|l| l.strip_prefix("Version: ")).context("no Version")?.to_owned();
    let second_version = version.replace("-1", "-2");
    fs::write(&control, text.replace(&format!("Version: {version}"), &format!("Version: {second_version}")))?;
    let second = dir.join("toa-second.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "-b"])
        .arg(&tree)
        .arg(&second)
        .stdout(std::process::Stdio::null()))?;
    fs::remove_dir_all(&tree)?;
    Ok(second)
}

fn deb_under_systemd(root: &Path, work: &Path, vmlinuz: &Path, deb: &Path) -> Result<()> {
    crate::cargo(&["build", "--release", "--package", "toa", "--example", "peer_echo"])?;
    let overlay = Overlay::new(work, "package-overlay")?;
    overlay.copy(deb, "root/toa-first.deb")?;
    let second = second_build(deb, work)?;
    overlay.copy(&second, "root/toa-second.deb")?;
    fs::remove_file(&second)?;
    overlay.copy(&root.join("target/release/examples/peer_echo"), "usr/local/bin/peer_echo")?;
    overlay.write("usr/local/bin/toa-package-check", GUEST_SCRIPT)?;
    overlay.mode("usr/local/bin/toa-package-check", 0o755)?;
    overlay.write("etc/systemd/system/toa-package-check.service", GUEST_UNIT)?;
    overlay.enable(&["toa-package-check.service"])?;
    let log = systemd::boot(work, vmlinuz, &overlay, "systemd-package")?;
    deb_facts(&log)
        .with_context(|| format!("the .deb under systemd (log: {})", work.join("systemd-package.log").display()))
}

/// Judges the guest's facts; every one must be there and as expected.
fn deb_facts(log: &str) -> Result<()> {
    let facts: Vec<(&str, &str)> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TOA-FACT "))
        .map(|l| l.split_once(' ').unwrap_or((l, "")))
        .collect();
    let fact = |name: &str| facts.iter().rev().find(|(n, _)| *n == name).map(|(_, v)| v.trim()).unwrap_or("(missing)");
    let client = "accept=198.18.0.7:4321 peer=198.18.0.7:4321";
    let checks: Vec<(&str, &str, bool)> = vec![
        ("dpkg -i succeeds", "install_rc", fact("install_rc") == "0"),
        ("installing starts nothing", "installed_active", fact("installed_active") == "inactive"),
        ("installing enables nothing", "installed_enabled", fact("installed_enabled") == "disabled"),
        ("installing attaches nothing", "installed_pinned", fact("installed_pinned") == "no"),
        ("man toa", "man_toa", fact("man_toa").parse::<u32>().is_ok_and(|n| n >= 1)),
        ("man -w toa-load", "man_toa_load", fact("man_toa_load") == "/usr/share/man/man8/toa-load.8.gz"),
        ("man toa-load", "man_toa_load_name", fact("man_toa_load_name") == "toa-load"),
        ("bash completes `toa unl`", "bash_completion", fact("bash_completion") == "unload"),
        ("systemctl enable --now toa", "enable_rc", fact("enable_rc") == "0"),
        ("/readyz answers", "ready_rc", fact("ready_rc") == "0"),
        ("systemctl is-active toa", "active", fact("active") == "active"),
        ("metrics: toa_loaded 1", "metrics", fact("metrics") == "toa_loaded 1"),
        ("an open connection has its client", "before_upgrade", fact("before_upgrade") == client),
        ("dpkg -i of the second build", "upgrade_rc", fact("upgrade_rc") == "0"),
        ("the second build is installed", "upgrade_version", fact("upgrade_version").ends_with("-2")),
        ("the service runs after the upgrade", "upgrade_active", fact("upgrade_active") == "active"),
        ("the upgrade restarted it", "upgrade_restarted", fact("upgrade_restarted") == "yes"),
        ("the upgrade's stop kept toa loaded", "upgrade_kept_loaded", fact("upgrade_kept_loaded") == "1"),
        ("the upgrade's marker is gone", "upgrade_marker", fact("upgrade_marker") == "absent"),
        ("the upgrade kept the edited conffile", "conffile_kept", fact("conffile_kept") == "1"),
        ("the open connection kept its client", "after_upgrade", fact("after_upgrade") == client),
        ("reinstalling the same build", "reinstall_rc", fact("reinstall_rc") == "0"),
        ("... keeps the client too", "after_reinstall", fact("after_reinstall") == client),
        ("the userspace drop-in, linked, switches the mode", "userspace_mode", fact("userspace_mode") == "1"),
        ("... and the reader fills its table", "userspace_table", fact("userspace_table") == "present"),
        ("dpkg --purge (keep_loaded = true)", "purge_rc", fact("purge_rc") == "0"),
        (
            "the purge's stop kept toa loaded, as configured",
            "purge_stop_kept_loaded",
            fact("purge_stop_kept_loaded") == "1",
        ),
        ("... and the purge still unloaded: nothing pinned", "purged_pinned", fact("purged_pinned") == "no"),
        ("the service is gone", "purged_active", fact("purged_active") == "inactive"),
        ("no file is left, nor the drop-in's link", "purged_files", fact("purged_files") == "0"),
        ("no capture reader is left", "purged_reader", fact("purged_reader") == "0"),
        (
            "the open connection shows its real peer again",
            "after_purge",
            fact("after_purge").starts_with("accept=198.18.0.7:4321 peer=127.0.0.1:"),
        ),
        ("purging again is harmless", "purge_again_rc", fact("purge_again_rc") == "0"),
    ];
    for (what, name, ok) in &checks {
        println!("  package: {} {what} ({name} = {})", if *ok { "ok  " } else { "FAIL" }, fact(name));
    }
    if checks.iter().any(|(_, _, ok)| !ok) {
        bail!("the .deb check failed");
    }
    Ok(())
}
