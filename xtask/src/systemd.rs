//! The systemd unit, run for real: a Debian 12 system (debootstrap, minbase + systemd) boots
//! under qemu with Debian's own kernel, `deploy/systemd/toa.service` enabled as the README says
//! to install it, and a checker unit that reports what an operator would look at:
//! `systemctl status toa`, the metrics endpoint, `systemctl reload toa`; once as installed, once
//! with the userspace mode's drop-in.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::run;

const CHECK_UNIT: &str = r#"[Unit]
Description=Checks the toa service (cargo xtask systemd)
After=toa.service
Wants=toa.service

[Service]
Type=oneshot
# Waits for events, bounded only against a hang: /readyz answering, then the reload's journal line.
ExecStart=/bin/sh -c 'for i in $(seq 1200); do wget -qO- http://127.0.0.1:9431/readyz >/dev/null 2>&1 && break; sleep 0.1; done; echo TOA-CHECK-BEGIN; systemctl status toa --no-pager -l; echo TOA-READER; for d in /proc/[0-9]*; do grep -q userspace-reade[r] $d/cmdline 2>/dev/null && grep -E "^(CapEff|Seccomp):" $d/status; done; echo TOA-METRICS; wget -qO- http://127.0.0.1:9431/metrics | grep -E "^toa_(loaded|build_info)"; systemctl reload toa; for i in $(seq 1200); do journalctl -u toa --no-pager -o cat | grep -q "configuration reloaded" && break; sleep 0.1; done; echo TOA-JOURNAL; journalctl -u toa --no-pager -o cat; echo TOA-CHECK-END; systemctl poweroff --force'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
"#;

/// Boots `vmlinuz` with a Debian 12 userland running toa under systemd; fails unless the
/// service is active, logged "toa loaded", serves metrics and reloads. `userspace`: with
/// `deploy/systemd/userspace.conf` installed as its comment says, and the capture reader
/// (a process of the unit) confined: no capability, a seccomp filter.
pub fn check(root: &Path, work: &Path, vmlinuz: &Path, toa: &Path, userspace: bool) -> Result<()> {
    let overlay = Overlay::new(work, "systemd-overlay")?;
    // Installed as the README says: binary, unit, config, enabled.
    overlay.copy(toa, "usr/local/bin/toa")?;
    overlay.copy(&root.join("deploy/systemd/toa.service"), "etc/systemd/system/toa.service")?;
    overlay.copy(&root.join("deploy/systemd/toa.toml"), "etc/toa/toa.toml")?;
    overlay.write("etc/systemd/system/toa-check.service", CHECK_UNIT)?;
    if userspace {
        overlay.copy(&root.join("deploy/systemd/userspace.conf"), "etc/systemd/system/toa.service.d/userspace.conf")?;
    }
    overlay.enable(&["toa.service", "toa-check.service"])?;
    let mode = if userspace { "userspace" } else { "ebpf" };
    let log = boot(work, vmlinuz, &overlay, &format!("systemd-{mode}"))?;
    verdict(&log, userspace)
        .with_context(|| format!("toa under systemd (log: {})", work.join(format!("systemd-{mode}.log")).display()))
}

/// Files laid over the Debian 12 base: packed as a second cpio archive after the base's, which
/// the kernel unpacks over it (the base stays as debootstrap left it).
pub struct Overlay {
    pub dir: PathBuf,
}

impl Overlay {
    pub fn new(work: &Path, name: &str) -> Result<Self> {
        let dir = work.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn place(&self, to: &str) -> Result<PathBuf> {
        let to = self.dir.join(to);
        fs::create_dir_all(to.parent().context("a parent")?)?;
        Ok(to)
    }

    pub fn copy(&self, from: &Path, to: &str) -> Result<()> {
        fs::copy(from, self.place(to)?).with_context(|| format!("copy {}", from.display()))?;
        Ok(())
    }

    pub fn write(&self, to: &str, text: &str) -> Result<()> {
        Ok(fs::write(self.place(to)?, text)?)
    }

    pub fn mode(&self, path: &str, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        Ok(fs::set_permissions(self.dir.join(path), fs::Permissions::from_mode(mode))?)
    }

    /// `systemctl enable` for units of /etc/systemd/system wanted by multi-user.target.
    pub fn enable(&self, units: &[&str]) -> Result<()> {
        for unit in units {
            symlink(format!("../{unit}"), self.place(&format!("etc/systemd/system/multi-user.target.wants/{unit}"))?)?;
        }
        Ok(())
    }
}

/// A minimal Debian 12 with systemd (debootstrap, minbase), made once in `work`. man-db and
/// bash-completion: the packages' check reads a manual page and completes a word.
pub fn base_rootfs(work: &Path) -> Result<PathBuf> {
    crate::apt_install_missing(&[("debootstrap", "debootstrap"), ("cpio", "cpio")])?;
    let rootfs = work.join("systemd-rootfs");
    if !rootfs.join("usr/bin/man").exists() || !rootfs.join("init").exists() {
        println!("xtask: debootstrap of a minimal Debian 12 with systemd (about a minute)");
        let _ = fs::remove_dir_all(&rootfs);
        let _ = fs::remove_file(work.join("systemd-rootfs.cpio"));
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "--include=systemd,systemd-sysv,wget,man-db,bash-completion", "bookworm"])
            .arg(&rootfs)
            .stdout(Stdio::null()))?;
        fs::write(rootfs.join("etc/machine-id"), "")?;
        symlink("/lib/systemd/systemd", rootfs.join("init"))?;
    }
    Ok(rootfs)
}

/// The base, packed once as a cpio archive.
fn base_cpio(work: &Path) -> Result<PathBuf> {
    let rootfs = base_rootfs(work)?;
    let cpio = work.join("systemd-rootfs.cpio");
    if !cpio.exists() {
        // Renamed into place: an interrupted run leaves no truncated archive to reuse.
        let partial = work.join("systemd-rootfs.cpio.partial");
        pack(&rootfs, &partial)?;
        fs::rename(&partial, &cpio)?;
    }
    Ok(cpio)
}

fn pack(dir: &Path, cpio: &Path) -> Result<()> {
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!("find . | cpio -o -H newc --quiet > '{}'", cpio.display()))
        .current_dir(dir)
        .status()?;
    if !archive.success() {
        bail!("packing {} with cpio failed", dir.display());
    }
    Ok(())
}

/// Boots the base with `overlay` over it; returns the console log without terminal colours
/// (also written to `work/NAME.log`).
pub fn boot(work: &Path, vmlinuz: &Path, overlay: &Overlay, name: &str) -> Result<String> {
    let base = base_cpio(work)?;
    let initrd = work.join(format!("{name}.cpio"));
    let top = work.join(format!("{name}-overlay.cpio"));
    pack(&overlay.dir, &top)?;
    let both = Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' '{}' > '{}'", base.display(), top.display(), initrd.display()))
        .status()?;
    if !both.success() {
        bail!("joining the archives failed");
    }
    println!("xtask: booting Debian 12 with systemd under qemu ({}, {name})", vmlinuz.display());
    let (log, _) = crate::kernels::qemu_boot(crate::Arch::X86_64, vmlinuz, &initrd, "systemd.show_status=0")?;
    let _ = fs::remove_file(&initrd);
    let _ = fs::remove_file(&top);
    let _ = fs::remove_dir_all(&overlay.dir);
    let log = plain(&log);
    fs::write(work.join(format!("{name}.log")), &log)?;
    Ok(log)
}

/// The console log without terminal escape sequences and carriage returns.
fn plain(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip an escape sequence up to its final letter (or the OSC 8 link terminator).
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() || n == '\u{7}' || n == '\\' {
                    break;
                }
            }
            continue;
        }
        if c != '\r' {
            plain.push(c);
        }
    }
    plain
}

/// The checker's report.
fn verdict(plain: &str, userspace: bool) -> Result<()> {
    let report = plain
        .split_once("TOA-CHECK-BEGIN")
        .and_then(|(_, rest)| rest.split_once("TOA-CHECK-END"))
        .map(|(report, _)| report)
        .context("the checker unit reported nothing: the guest did not reach multi-user.target")?;
    let (status, rest) = report.split_once("TOA-READER").unwrap_or((report, ""));
    let (reader, rest) = rest.split_once("TOA-METRICS").unwrap_or((rest, ""));
    let (metrics, journal) = rest.split_once("TOA-JOURNAL").unwrap_or((rest, ""));
    // The reader's lines only: the pattern `userspace-reade[r]` does not match the checker's own
    // command line.
    let field = |name: &str| reader.lines().find_map(|l| l.trim().strip_prefix(name)).map(str::trim);
    let reader_confined = field("CapEff:") == Some("0000000000000000") && field("Seccomp:") == Some("2");
    let mut checks = vec![
        ("systemctl status toa: active (running)", status.contains("Active: active (running)")),
        ("systemctl status toa shows \"toa loaded\"", status.contains("toa loaded")),
        ("metrics answer toa_loaded 1", metrics.lines().any(|l| l.trim() == "toa_loaded 1")),
        ("systemctl reload toa rereads the config", journal.contains("configuration reloaded")),
        ("no failure in the unit's journal", !journal.contains("Failed") && !journal.contains("failed")),
    ];
    if userspace {
        checks.push(("the journal says userspace mode", journal.contains("toa loaded (userspace mode)")));
        checks.push(("the capture reader has no capability and a seccomp filter", reader_confined));
    }
    for (what, ok) in &checks {
        println!("  systemd: {} {what}", if *ok { "ok  " } else { "FAIL" });
    }
    if checks.iter().any(|(_, ok)| !ok) {
        bail!("the systemd check failed:\n{report}");
    }
    Ok(())
}
