//! The cgroup v2 hierarchy: where it is mounted, which directory a link is attached to, and
//! short-lived cgroups for `toa probe`.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::Error;

/// Mount point of the cgroup v2 hierarchy (first `cgroup2` entry of /proc/mounts).
pub fn v2_mount() -> Result<PathBuf, Error> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape(dir)))
        })
        .next()
        .ok_or(Error::NoCgroup2)
}

/// /proc/mounts escapes spaces and a few other bytes as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&digits, 8) {
                out.push(b as char);
                continue;
            }
            out.push('\\');
            out.push_str(&digits);
        } else {
            out.push(c);
        }
    }
    out
}

/// Resolves the cgroup to attach to: the v2 root by default, else `requested`, which must be a
/// directory inside the v2 hierarchy.
pub fn resolve(requested: Option<&Path>) -> Result<PathBuf, Error> {
    let mount = v2_mount()?;
    let Some(path) = requested else {
        return Ok(mount);
    };
    let not_a_cgroup = || Error::NotACgroup { path: path.to_owned(), mount: mount.clone() };
    let canonical = fs::canonicalize(path).map_err(|_| not_a_cgroup())?;
    if !canonical.starts_with(&mount) || !canonical.join("cgroup.procs").is_file() {
        return Err(not_a_cgroup());
    }
    Ok(canonical)
}

/// The directory of the cgroup with this id (on cgroup v2 the id is the directory's inode).
pub fn path_of_id(id: u64) -> Option<PathBuf> {
    let mount = v2_mount().ok()?;
    let mut stack = vec![mount];
    while let Some(dir) = stack.pop() {
        if fs::metadata(&dir).map(|m| m.ino()).ok() == Some(id) {
            return Some(dir);
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    None
}

/// The cgroup v2 directory of the current process.
pub fn current() -> Result<PathBuf, Error> {
    let mount = v2_mount()?;
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Read { what: "/proc/self/cgroup".into(), detail: "no cgroup v2 entry".into() })?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// A cgroup created for the lifetime of this value, with this process moved into it; `Drop`
/// moves the process back and removes the directory.
pub struct TempCgroup {
    path: PathBuf,
    home: PathBuf,
}

impl TempCgroup {
    pub fn enter(name: &str) -> Result<Self, Error> {
        let home = current()?;
        let path = v2_mount()?.join(name);
        fs::create_dir(&path)?;
        let guard = Self { path, home };
        fs::write(guard.path.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        let _ = fs::remove_dir(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
    }
}
