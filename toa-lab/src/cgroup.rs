//! cgroup v2: the mount point and what is attached to a cgroup (asked of the kernel).

use super::*;

/// The cgroup v2 mount point, from /proc/mounts. Privileged tests fail loudly without it.
pub fn cgroup2_mount() -> PathBuf {
    cgroup2_mount_if_any().expect("these tests need a cgroup v2 hierarchy mounted")
}

/// The cgroup v2 mount point, if there is one (there is none before Linux 4.5).
pub fn cgroup2_mount_if_any() -> Option<PathBuf> {
    toa::cgroup::v2_mount().ok()
}

/// Whether the kernel still has the program with this id.
pub fn program_exists(id: u64) -> bool {
    toa::program_name(id as u32).is_ok()
}

/// Whether `attached` (from `cgroup_attachments`) has the program `toa status` lists as `name`
/// on `hook`. By id: a kernel without the tracing that aya's probe for program names uses
/// (the shared test kernels) loads toa's programs without names.
pub fn has_program(attached: &str, status: &serde_json::Value, hook: &str, name: &str) -> bool {
    let id = status["programs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["id"].as_u64())
        .unwrap_or_else(|| panic!("toa status lists no {name}: {status}"));
    attached.lines().any(|l| l.starts_with(&format!("{hook} ")) && l.ends_with(&format!("(id {id})")))
}

/// The programs attached to a cgroup (its own attachments only), one per line as
/// `HOOK NAME (id ID)`. Asked of the kernel directly (BPF_PROG_QUERY), not of bpftool, whose
/// newer releases fail on older kernels.
pub fn cgroup_attachments(cgroup: &Path) -> String {
    let mut text = String::new();
    for hook in toa::hooks::HOOKS {
        let ids = match toa::cgroup_programs(cgroup, hook.attach_type) {
            Ok(ids) => ids,
            // A hook this kernel does not have (getpeername came in 5.8): nothing on it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Vec::new(),
            Err(e) => panic!("query {}: {e}", cgroup.display()),
        };
        for id in ids {
            let name = toa::program_name(id).unwrap_or_else(|e| format!("? ({e})"));
            text.push_str(&format!("{} {name} (id {id})\n", hook.label));
        }
    }
    text
}
