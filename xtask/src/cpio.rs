//! A minimal writer of the `newc` cpio format, which the kernel unpacks as an initramfs.

use std::collections::BTreeMap;

#[derive(Clone)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// Files to pack, by absolute path; parent directories are added as needed.
#[derive(Clone, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    fn parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at + 1..].find('/') {
            at += i + 1;
            self.entries.entry(path[..at].to_owned()).or_insert(Entry::Dir);
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.parents(path);
        self.entries.insert(path.to_owned(), Entry::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parents(path);
        self.entries.insert(path.to_owned(), Entry::File { data, mode });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entries.insert(path.to_owned(), Entry::Symlink(target.to_owned()));
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir => (0o040755, &[]),
                Entry::File { data, mode } => (0o100000 | mode, data),
                Entry::Symlink(target) => (0o120777, target.as_bytes()),
            };
            header(&mut out, ino as u32 + 1, mode, data.len() as u32, path.trim_start_matches('/'));
            out.extend_from_slice(data);
            pad4(&mut out);
        }
        header(&mut out, 0, 0, 0, "TRAILER!!!");
        out
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: u32, name: &str) {
    let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
    let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}
