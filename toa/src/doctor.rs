//! `toa doctor`: can `toa load` work here, and if not, what to do about it. Each BPF feature
//! is checked by using it (load the programs, attach them to a scratch cgroup the way `toa load`
//! does), not by comparing version numbers.

use std::{fs, path::Path};

use aya::{programs::Program, EbpfLoader};
use serde::Serialize;

use crate::{
    backend,
    backend::ebpf::attach,
    cgroup,
    error::chain,
    hooks::{HOOKS, UDP_OPP_PROGRAM},
    link_info,
    policy::Policy,
    programs, system, Agent,
};

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, ok: true, detail: detail.into(), fix: None }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, ok: false, detail: detail.into(), fix: Some(fix.into()) }
}

const CAP_NET_RAW: u32 = 13;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Runs every check; `toa load` would work when all pass.
pub fn run(pin_dir: &Path) -> Vec<Check> {
    // The checks of the mode `toa load` picks here: the eBPF ones cannot pass below 5.10 (no
    // CAP_BPF before 5.8, no cgroup v2 before 4.5), and the userspace mode needs none of them.
    let userspace = backend::detect().is_userspace();
    let mut checks = vec![kernel(), privileges(userspace)];
    let privileged = checks[1].ok;
    if userspace {
        checks.push(if privileged {
            capture()
        } else {
            fail("capture", "not checked without privileges", "run toa doctor as root")
        });
        return checks;
    }
    let v2 = cgroup::v2_mount();
    checks.push(match &v2 {
        Ok(m) => pass("cgroup v2", format!("mounted at {}", m.display())),
        Err(e) => fail("cgroup v2", e.to_string(), "mount it: mount -t cgroup2 none /sys/fs/cgroup"),
    });
    checks.push(bpffs(pin_dir));
    if !privileged {
        let why = "not checked without privileges";
        for name in ["BPF programs", "cgroup attach"] {
            checks.push(fail(name, why, "run toa doctor as root"));
        }
        return checks;
    }
    checks.push(programs_load());
    if let Ok(mount) = &v2 {
        checks.push(attach_scratch(mount));
        checks.push(neighbours(mount));
    }
    let status = Agent::new(pin_dir).status();
    checks.push(match status {
        Ok(s) if s.loaded => pass(
            "toa",
            format!("loaded on {}", s.cgroup.map(|p| p.display().to_string()).unwrap_or_else(|| "?".into())),
        ),
        _ => pass("toa", format!("not loaded (nothing pinned under {})", pin_dir.display())),
    });
    checks
}

fn kernel() -> Check {
    let release = system::kernel_release();
    match system::parse_release(&release) {
        Some(v) if v >= backend::EBPF_MIN_KERNEL => pass("kernel", format!("{release} (5.10 or newer)")),
        Some(_) => {
            pass("kernel", format!("{release} is older than 5.10: toa load runs the userspace mode (eBPF needs 5.10)"))
        }
        None => pass("kernel", format!("{release} (version not recognised; the checks below decide)")),
    }
}

/// Below 5.10: whether the userspace mode's capture socket (AF_PACKET + classic BPF) opens.
fn capture() -> Check {
    match backend::userspace::capture::Capture::open(&[]) {
        Ok(_) => pass("capture", "AF_PACKET socket with its classic BPF filter opens: toa load --mode userspace works"),
        Err(e) => fail("capture", format!("AF_PACKET capture socket: {e}"), "run as root (CAP_NET_RAW is needed)"),
    }
}

/// The capabilities the mode needs: the eBPF mode loads and attaches programs; the userspace
/// mode opens a packet socket and writes its table under /run (root's).
fn privileges(userspace: bool) -> Check {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    let needed: &[(u32, &str)] = if userspace {
        &[(CAP_NET_RAW, "CAP_NET_RAW")]
    } else {
        &[(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
    };
    let missing: Vec<&str> = needed.iter().filter(|(c, _)| !has(*c)).map(|(_, n)| *n).collect();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if missing.is_empty() && (root || !userspace) {
        let names: Vec<&str> = needed.iter().map(|(_, n)| *n).collect();
        pass("privileges", names.join(", "))
    } else if missing.is_empty() {
        fail("privileges", "not root: the table lives under /run/toa", "run as root (sudo)")
    } else {
        fail("privileges", format!("missing {}", missing.join(", ")), "run as root (sudo), or grant those capabilities")
    }
}

fn bpffs(pin_dir: &Path) -> Check {
    match system::is_bpffs(pin_dir.parent().unwrap_or(Path::new("/"))) {
        true => pass("bpffs", format!("{} is on bpffs", pin_dir.parent().unwrap_or(pin_dir).display())),
        false if pin_dir.parent() == Some(Path::new("/sys/fs/bpf")) => {
            pass("bpffs", "not mounted at /sys/fs/bpf; toa load mounts it")
        }
        false => fail(
            "bpffs",
            format!("{} is not on bpffs", pin_dir.display()),
            "pass a --pin-dir under /sys/fs/bpf, or mount bpffs: mount -t bpf bpf DIR",
        ),
    }
}

fn programs_load() -> Check {
    if let Err(e) = programs::require_embedded() {
        return fail("BPF programs", e.to_string(), "rebuild toa without AYA_BUILD_SKIP");
    }
    let result = (|| -> Result<String, String> {
        let mut ebpf = EbpfLoader::new().load(programs::AGENT).map_err(|e| chain(&e))?;
        let mut counts = Vec::new();
        // The cgroup programs and the option-protocol converter (`--udp-opp-iface`).
        for name in HOOKS.iter().map(|h| h.program).chain([UDP_OPP_PROGRAM]) {
            let program = ebpf.program_mut(name).ok_or(format!("{name} missing"))?;
            let info = match program {
                Program::SockOps(p) => p.load().and_then(|()| p.info()),
                Program::CgroupSockAddr(p) => p.load().and_then(|()| p.info()),
                Program::CgroupSockopt(p) => p.load().and_then(|()| p.info()),
                Program::CgroupSkb(p) => p.load().and_then(|()| p.info()),
                Program::SchedClassifier(p) => p.load().and_then(|()| p.info()),
                _ => return Err(format!("{name}: unexpected program type")),
            }
            .map_err(|e| chain(&e))?;
            let insns = info.verified_instruction_count().map(|n| format!(" ({n} insns)"));
            counts.push(format!("{name}{}", insns.unwrap_or_default()));
        }
        Ok(format!("the verifier accepts all {}: {}", counts.len(), counts.join(", ")))
    })();
    match result {
        Ok(detail) => pass("BPF programs", detail),
        Err(e) => fail(
            "BPF programs",
            e,
            "this kernel lacks a BPF feature toa needs (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, socket storage, 5.10 sock_ops header options)",
        ),
    }
}

/// Loads, pins and attaches exactly as `toa load` does, into a scratch cgroup and pin directory,
/// then removes both.
fn attach_scratch(mount: &Path) -> Check {
    let name = format!("toa-doctor-{}", std::process::id());
    let dir = mount.join(&name);
    let pins = Path::new("/sys/fs/bpf").join(&name);
    let result = (|| -> Result<usize, String> {
        fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        fs::create_dir_all(&pins).map_err(|e| format!("create {}: {e}", pins.display()))?;
        let (_ebpf, links) =
            attach(&dir, &pins, Some(&Policy { udp: true, ..Policy::default() })).map_err(|e| e.to_string())?;
        Ok(links.len())
        // Dropping the links detaches them.
    })();
    let _ = fs::remove_dir_all(&pins);
    let _ = fs::remove_dir(&dir);
    match result {
        Ok(n) => {
            pass("cgroup attach", format!("all {n} programs attach to a cgroup (scratch cgroup and pins, removed)"))
        }
        Err(e) => fail(
            "cgroup attach",
            e,
            "the kernel refused cgroup BPF links: check CONFIG_CGROUP_BPF and that no policy forbids BPF",
        ),
    }
}

/// Other programs on the hooks toa uses, at the cgroup root: they keep running next to toa.
fn neighbours(mount: &Path) -> Check {
    let names: Vec<(u32, String)> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_owned()))
        .collect();
    let mut others = Vec::new();
    for hook in HOOKS {
        let hook_label = hook.label;
        for id in link_info::cgroup_programs(mount, hook.attach_type).unwrap_or_default() {
            let name = names.iter().find(|(i, _)| *i == id).map(|(_, n)| n.as_str()).unwrap_or("?");
            if !name.starts_with("toa_") {
                others.push(format!("{hook_label}: {name} (id {id})"));
            }
        }
    }
    if others.is_empty() {
        pass("other programs", "no other program on toa's hooks at the cgroup root")
    } else {
        // Not a failure: cgroup links run side by side. Worth knowing when debugging.
        pass("other programs", format!("also attached at the root, running next to toa: {}", others.join("; ")))
    }
}
