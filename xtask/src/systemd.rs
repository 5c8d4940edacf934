//! The systemd unit, run for real: a Debian 12 system (debootstrap, minbase + systemd) boots
//! under qemu with Debian's own kernel, `deploy/systemd/toa.service` enabled as the README says
//! to install it, and a checker unit that reports what an operator would look at:
//! `systemctl status toa`, the metrics endpoint, `systemctl reload toa`; once as installed, once
//! with the userspace mode's drop-in.

use std::{
    fs,
    os::unix::fs::symlink,
    path::Path,
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
    crate::apt_install_missing(&[("debootstrap", "debootstrap"), ("cpio", "cpio")])?;
    let rootfs = work.join("systemd-rootfs");
    if !rootfs.join("lib/systemd/systemd").exists() {
        println!("xtask: debootstrap of a minimal Debian 12 with systemd (about half a minute)");
        let _ = fs::remove_dir_all(&rootfs);
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "--include=systemd,systemd-sysv,wget", "bookworm"])
            .arg(&rootfs)
            .stdout(Stdio::null()))?;
    }
    // Installed as the README says: binary, unit, config, enabled.
    fs::create_dir_all(rootfs.join("usr/local/bin"))?;
    fs::copy(toa, rootfs.join("usr/local/bin/toa"))?;
    let units = rootfs.join("etc/systemd/system");
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    fs::create_dir_all(rootfs.join("etc/toa"))?;
    fs::copy(root.join("deploy/systemd/toa.service"), units.join("toa.service"))?;
    fs::copy(root.join("deploy/systemd/toa.toml"), rootfs.join("etc/toa/toa.toml"))?;
    fs::write(units.join("toa-check.service"), CHECK_UNIT)?;
    let drop_in = units.join("toa.service.d");
    let _ = fs::remove_dir_all(&drop_in);
    if userspace {
        fs::create_dir_all(&drop_in)?;
        fs::copy(root.join("deploy/systemd/userspace.conf"), drop_in.join("userspace.conf"))?;
    }
    for unit in ["toa.service", "toa-check.service"] {
        let link = wants.join(unit);
        let _ = fs::remove_file(&link);
        symlink(format!("../{unit}"), &link)?;
    }
    let init = rootfs.join("init");
    let _ = fs::remove_file(&init);
    symlink("/lib/systemd/systemd", &init)?;
    fs::write(rootfs.join("etc/machine-id"), "")?;

    let cpio = work.join("systemd-rootfs.cpio");
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!("find . | cpio -o -H newc --quiet > {}", cpio.display()))
        .current_dir(&rootfs)
        .status()?;
    if !archive.success() {
        bail!("packing {} with cpio failed", rootfs.display());
    }
    let mode = if userspace { "userspace" } else { "ebpf" };
    println!("xtask: booting Debian 12 with systemd under qemu ({}, {mode} mode)", vmlinuz.display());
    let (log, _) = crate::kernels::qemu_boot(crate::Arch::X86_64, vmlinuz, &cpio, "systemd.show_status=0")?;
    let _ = fs::remove_file(&cpio);
    let log_file = work.join(format!("systemd-{mode}.log"));
    fs::write(&log_file, &log)?;
    verdict(&log, userspace).with_context(|| format!("toa under systemd (log: {})", log_file.display()))
}

/// The checker's report, without terminal colours.
fn verdict(log: &str, userspace: bool) -> Result<()> {
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
