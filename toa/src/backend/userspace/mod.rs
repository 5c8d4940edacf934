//! The userspace mode, for kernels without the eBPF hooks (< 5.10): a capture reader (a
//! process of its own) fills a shared table that `libtoa.so`, preloaded into applications,
//! reads. `toa load --mode userspace` starts the reader; `toa unload` stops it.

pub mod capture;
mod reader;
mod seccomp;

use std::{
    fs,
    io::Read as _,
    os::{
        fd::AsRawFd as _,
        unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::Serialize;
use toa_common::{
    table::{buckets_for, table_size, Header, Table, TrustEntry, MAGIC, RUNNING, STOPPED, TRUST_MAX, VERSION},
    Counter,
};

use super::{Loaded, Mode, Places, Status};
use crate::{
    lock::DirLock,
    policy::{trust_key, trust_net, Policy},
    system, Error,
};

/// Where the table lives unless `--table`/`TOA_TABLE` says otherwise (libtoa.so's default too).
pub use toa_common::table::DEFAULT_TABLE;

/// The userspace mode's settings as given (flags of `toa load` and `toa run`, or the config
/// file's keys); what is not given takes its default in [`TuningOverrides::tuning`].
#[derive(Clone, Debug, Default)]
pub struct TuningOverrides {
    /// Entries the shared table holds; it never grows (72 bytes each).
    pub table_entries: Option<u32>,
    /// At most this many microseconds accept()/getpeername() wait for the reader.
    pub accept_wait_us: Option<u32>,
    /// Seconds a client address stays in the table for getpeername().
    pub entry_ttl: Option<u32>,
    /// Seconds to look for an option on the segments after the handshake.
    pub search_secs: Option<u32>,
    /// Who may read the table besides root.
    pub table_group: Option<TableReaders>,
}

/// Who may read the table (and so every connection's client address and the policy): the
/// preloaded applications must. Root always can; nobody else can write it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum TableReaders {
    /// Root only (mode 0600): applications that run as another user get no lookup.
    #[default]
    Root,
    /// Root and this group (mode 0640, the file's group): give it to the services that preload
    /// libtoa.so (systemd: `SupplementaryGroups=`).
    Group(u32),
    /// Every user (mode 0644), only when the operator asks for it by name (`all`).
    All,
}

impl TableReaders {
    /// A group name, a numeric GID, or `all`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "all" => return Ok(TableReaders::All),
            "root" => return Ok(TableReaders::Root),
            _ => {}
        }
        if let Ok(gid) = value.parse::<u32>() {
            return Ok(if gid == 0 { TableReaders::Root } else { TableReaders::Group(gid) });
        }
        match system::group_id(value) {
            Some(0) => Ok(TableReaders::Root),
            Some(gid) => Ok(TableReaders::Group(gid)),
            None => Err(format!(
                "no group named {value:?} on this host: create it (groupadd {value}), or give a GID, or `all`"
            )),
        }
    }

    /// The table file's (mode, group).
    pub fn file_mode(self) -> (u32, u32) {
        match self {
            TableReaders::Root => (0o600, 0),
            TableReaders::Group(gid) => (0o640, gid),
            TableReaders::All => (0o644, 0),
        }
    }

    /// What a table file's mode and group say.
    fn of_file(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        if meta.mode() & 0o004 != 0 {
            TableReaders::All
        } else if meta.mode() & 0o040 != 0 && meta.gid() != 0 {
            TableReaders::Group(meta.gid())
        } else {
            TableReaders::Root
        }
    }

    /// Gives the open table file this mode and group.
    fn apply(self, file: &fs::File) -> std::io::Result<()> {
        let (mode, gid) = self.file_mode();
        // SAFETY: a descriptor we own; -1 leaves the owner (root: the agent runs as root).
        if unsafe { libc::fchown(file.as_raw_fd(), u32::MAX, gid) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
    }
}

/// The config file's `table_group` key.
impl TryFrom<String> for TableReaders {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::parse(&value)
    }
}

/// The settings in effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tuning {
    pub table_entries: u32,
    pub accept_wait_us: u32,
    pub entry_ttl: u32,
    pub search_secs: u32,
    pub table_group: TableReaders,
}

impl Tuning {
    /// The same bounds as the flags (the config file's keys go through here too).
    pub fn validate(&self) -> Result<(), String> {
        let bad = |key: &str, range: &str| Err(format!("{key}: out of range ({range})"));
        if !(8..=16_777_216).contains(&self.table_entries) {
            return bad("table_entries", "8 to 16777216");
        }
        if self.accept_wait_us > 1_000_000 {
            return bad("accept_wait_us", "0 to 1000000");
        }
        if self.entry_ttl == 0 {
            return bad("entry_ttl", "at least 1");
        }
        if self.search_secs == 0 {
            return bad("search_secs", "at least 1");
        }
        Ok(())
    }
}

impl Default for Tuning {
    /// The flags' defaults.
    fn default() -> Self {
        TuningOverrides::default().tuning()
    }
}

impl TuningOverrides {
    pub fn tuning(&self) -> Tuning {
        Tuning {
            table_entries: self.table_entries.unwrap_or(65536),
            accept_wait_us: self.accept_wait_us.unwrap_or(5000),
            entry_ttl: self.entry_ttl.unwrap_or(300),
            search_secs: self.search_secs.unwrap_or(10),
            table_group: self.table_group.unwrap_or_default(),
        }
    }
}

/// What `toa status` says of the userspace mode.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct UserspaceStatus {
    pub table: PathBuf,
    pub reader_pid: u32,
    pub running: bool,
    /// Entries holding a client address.
    pub entries: u64,
    /// Entries the table can hold.
    pub capacity: u64,
    pub tuning: Tuning,
}

/// `CLOCK_MONOTONIC` seconds (what libtoa.so compares heartbeats with).
pub fn monotonic_secs() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

/// (device, inode) of this process's network namespace.
fn netns_id() -> Result<(u64, u64), Error> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata("/proc/self/ns/net")?;
    Ok((m.dev(), m.ino()))
}

/// A mapped table file.
pub struct TableFile {
    base: *mut u8,
    len: usize,
    file: fs::File,
    ino: u64,
}

impl Drop for TableFile {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl TableFile {
    /// Creates a table at `path` (atomically: written aside, then renamed over).
    fn create(path: &Path, tuning: &Tuning) -> Result<Self, Error> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let tmp = dir.join(format!(
            ".{}.{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("table"),
            std::process::id()
        ));
        let buckets = buckets_for(tuning.table_entries);
        let len = table_size(buckets);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::Userspace { detail: format!("creating {}: {e}", tmp.display()) })?;
        let made = (|| {
            // Set explicitly, before anything is written: a umask must neither hide the table
            // from its group nor widen it.
            tuning.table_group.apply(&file)?;
            file.set_len(len as u64)?;
            let mut t = Self::map(file, len, true)?;
            // SAFETY: a fresh, zero-filled, writable mapping of the right size.
            unsafe { Table::init(t.base, buckets, netns_id()?) };
            t.set_tuning(tuning);
            fs::rename(&tmp, path)?;
            t.ino = std::os::unix::fs::MetadataExt::ino(&t.file.metadata()?);
            Ok::<_, Error>(t)
        })();
        if made.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        made
    }

    /// Opens the table at `path`; `None` if there is no file.
    pub fn open(path: &Path, writable: bool) -> Result<Option<Self>, Error> {
        let file = match fs::OpenOptions::new().read(true).write(writable).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Userspace { detail: format!("opening {}: {e}", path.display()) }),
        };
        let meta = file.metadata()?;
        let mut t = Self::map(file, meta.len() as usize, writable)?;
        t.ino = std::os::unix::fs::MetadataExt::ino(&meta);
        if t.table_opt().is_none() {
            return Err(Error::Userspace {
                detail: format!(
                    "{} is not a toa table of this version: remove it, or pass another --table",
                    path.display()
                ),
            });
        }
        Ok(Some(t))
    }

    fn map(file: fs::File, len: usize, writable: bool) -> Result<Self, Error> {
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a shared mapping of our open file; checked for failure.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len.max(1), prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Self { base: base.cast(), len: len.max(1), file, ino: 0 })
    }

    fn table_opt(&self) -> Option<Table<'_>> {
        // SAFETY: `len` mapped bytes, page aligned, for the life of `self`.
        unsafe { Table::from_raw(self.base, self.len) }
    }

    pub fn table(&self) -> Table<'_> {
        self.table_opt().expect("checked when opened")
    }

    fn set_tuning(&mut self, tuning: &Tuning) {
        let h = self.table().header;
        h.wait_us.store(tuning.accept_wait_us, Ordering::Relaxed);
        h.ttl_secs.store(tuning.entry_ttl, Ordering::Relaxed);
        h.pending_secs.store(tuning.search_secs, Ordering::Relaxed);
    }

    /// Writes the policy, serialized with other writers by a lock on the file.
    fn set_policy(&mut self, policy: &Policy) -> Result<(), Error> {
        let trust: Vec<TrustEntry> = policy
            .trust
            .iter()
            .map(|net| {
                let (prefix_len, addr) = trust_key(net);
                TrustEntry { prefix_len, addr }
            })
            .collect();
        if trust.len() > TRUST_MAX {
            return Err(Error::Policy { detail: format!("at most {TRUST_MAX} --trust entries") });
        }
        system::lock_exclusive(&self.file)?;
        // SAFETY: the mapping is writable (callers open it so).
        unsafe { self.table().write_config(&policy.to_config(), &trust) };
        system::unlock(&self.file);
        Ok(())
    }

    fn policy(&self) -> Policy {
        let mut trust = Box::new([TrustEntry::default(); TRUST_MAX]);
        let (cfg, n) = self.table().read_config(&mut trust);
        Policy::from_kernel(&cfg, trust[..n].iter().filter_map(|t| trust_net(t.prefix_len, t.addr)).collect())
    }

    fn tuning(&self) -> Tuning {
        let h = self.table().header;
        Tuning {
            table_entries: (h.buckets as usize * toa_common::table::WAYS) as u32,
            accept_wait_us: h.wait_us.load(Ordering::Relaxed),
            entry_ttl: h.ttl_secs.load(Ordering::Relaxed),
            search_secs: h.pending_secs.load(Ordering::Relaxed),
            table_group: self.file.metadata().map(|m| TableReaders::of_file(&m)).unwrap_or_default(),
        }
    }

    /// A reader serves it: its heartbeat is fresh and its process is there (one killed outright
    /// leaves a heartbeat that looks fresh for a few seconds).
    fn live(&self) -> bool {
        let pid = self.table().header.reader_pid.load(Ordering::Relaxed);
        self.table().live(monotonic_secs()) && pid > 0 && system::process_alive(pid)
    }
}

/// The userspace mode's state, identified by its table's path.
#[derive(Clone, Debug)]
pub struct Userspace {
    path: PathBuf,
    /// Reported in its status, so that both modes' `Status` name the same places.
    pin_dir: PathBuf,
}

impl Userspace {
    pub fn new(places: &Places) -> Self {
        Self { path: places.table.clone(), pin_dir: places.pin_dir.clone() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a table is there (what `Backend::live` asks): a live reader's, or one left by a
    /// reader that died.
    pub fn has_table(&self) -> bool {
        self.path.exists()
    }

    /// The lock every change to this mode's state holds ([`DirLock`] on the table's directory,
    /// which it creates: applications running as any user must reach the table in it).
    fn lock(&self) -> Result<DirLock, Error> {
        let dir = crate::lock::dir_of(&self.path);
        if !dir.exists() {
            fs::create_dir_all(&dir)
                .and_then(|()| fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)))
                .map_err(|e| Error::Userspace { detail: format!("creating {}: {e}", dir.display()) })?;
        }
        Ok(DirLock::acquire(&dir, true)?.expect("created"))
    }

    /// Starts the reader as a process of its own (or reconfigures the running one): for
    /// `toa load` and `toa run` alike. On error nothing is left running.
    pub fn load(&self, policy: &Policy, tuning: &Tuning) -> Result<Loaded, Error> {
        system::require_root("toa load --mode userspace")?;
        let _lock = self.lock()?;
        let started = Instant::now();
        let t = match self.prepare(policy, tuning)? {
            Prepared::Reconfigured(loaded) => return Ok(*loaded),
            Prepared::Fresh(t) => t,
        };
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("userspace-reader").arg("--table").arg(&self.path);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: setsid is async-signal-safe: the reader leaves this session and terminal.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
        let mut child = cmd.spawn()?;
        let failure = wait_live(&t, || {
            Ok(match child.try_wait()? {
                Some(status) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    Some(format!("the capture reader exited ({status}): {}", err.trim()))
                }
                None => None,
            })
        })?;
        if let Some(detail) = failure {
            let _ = child.kill();
            let _ = child.wait();
            let _ = fs::remove_file(&self.path);
            return Err(Error::Userspace { detail });
        }
        // Reaped when it ends, should this process (`toa run`) still be there.
        drop(child.stderr.take());
        std::thread::spawn(move || child.wait());
        Ok(Loaded {
            changed: true,
            status: self.status_of(&t),
            load_time_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
        })
    }

    /// Reconfigures a live reader, or creates a fresh table for a new one.
    fn prepare(&self, policy: &Policy, tuning: &Tuning) -> Result<Prepared, Error> {
        policy.validate().map_err(|detail| Error::Policy { detail })?;
        if policy.udp {
            return Err(Error::Policy {
                detail: "--udp needs the eBPF mode (Linux >= 5.10); the userspace mode reads TCP only: drop --udp \
                         (and `udp` from toa.toml) or run on a newer kernel"
                    .into(),
            });
        }
        tuning.validate().map_err(|detail| Error::Policy { detail })?;
        retire_older_table(&self.path)?;
        if let Some(mut t) = TableFile::open(&self.path, true)? {
            if t.live() {
                t.set_policy(policy)?;
                let mut tuning = *tuning;
                tuning.table_entries = t.tuning().table_entries;
                t.set_tuning(&tuning);
                tuning.table_group.apply(&t.file)?;
                // Return once the reader applies it: the next connection is judged by it.
                let header = t.table().header;
                let wanted = header.config_seq.load(Ordering::Acquire);
                let deadline = Instant::now() + Duration::from_secs(2);
                while header.config_applied.load(Ordering::Acquire) != wanted {
                    if Instant::now() > deadline {
                        return Err(Error::Userspace {
                            detail: "the capture reader did not take the new policy within 2 s (is it stopped?)".into(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let loaded = Loaded { changed: true, status: self.status_of(&t), load_time_ms: None };
                return Ok(Prepared::Reconfigured(Box::new(loaded)));
            }
            // A table left by a reader that died: start afresh. Marked stopped first, so that the
            // applications that map it stop waiting on it now, not when its heartbeat goes stale
            // (a reader killed outright left it fresh), and map the new one.
            t.table().header.state.store(STOPPED, Ordering::Release);
            drop(t);
            fs::remove_file(&self.path)?;
        }
        let mut t = TableFile::create(&self.path, tuning)?;
        t.set_policy(policy)?;
        Ok(Prepared::Fresh(t))
    }

    fn describe(&self, t: &TableFile) -> UserspaceStatus {
        let table = t.table();
        let tuning = t.tuning();
        UserspaceStatus {
            table: self.path.clone(),
            reader_pid: table.header.reader_pid.load(Ordering::Relaxed),
            running: t.live(),
            entries: table.counter(Counter::TableEntries),
            capacity: tuning.table_entries as u64,
            tuning,
        }
    }

    /// What `toa status` says: loaded while a live reader serves the table. A table left by a
    /// reader that died is reported (not loaded) so that the operator is told to unload.
    pub fn status(&self) -> Result<Status, Error> {
        Ok(match TableFile::open(&self.path, false)? {
            Some(t) => self.status_of(&t),
            None => Status::not_loaded(&self.pin_dir),
        })
    }

    /// The table's status.
    fn status_of(&self, t: &TableFile) -> Status {
        let user = self.describe(t);
        let policy = t.policy();
        Status {
            loaded: user.running,
            mode: Some(Mode::Userspace),
            spoofable: policy.trust.is_empty(),
            policy: Some(policy),
            userspace: Some(user),
            ..Status::not_loaded(&self.pin_dir)
        }
    }

    /// Gives a live reader a new policy and tuning (`toa run`'s SIGHUP).
    pub fn reconfigure(&self, policy: &Policy, tuning: &Tuning) -> Result<(), Error> {
        let _lock = self.lock()?;
        match self.prepare(policy, tuning)? {
            Prepared::Reconfigured(_) => Ok(()),
            Prepared::Fresh(_) => {
                let _ = fs::remove_file(&self.path);
                Err(Error::Userspace { detail: "the capture reader is gone".into() })
            }
        }
    }

    /// Whether a live reader owns the table.
    pub fn is_running(&self) -> bool {
        matches!(TableFile::open(&self.path, false), Ok(Some(t)) if t.live())
    }

    /// Every counter (the table's own too), in `Counter::ALL` order.
    pub fn stats(&self) -> Result<Vec<(Counter, u64)>, Error> {
        let t = TableFile::open(&self.path, false)?.ok_or_else(|| Error::Userspace {
            detail: format!("no table at {}: toa is not loaded in userspace mode", self.path.display()),
        })?;
        let table = t.table();
        Ok(Counter::ALL.iter().map(|c| (*c, table.counter(*c))).collect())
    }

    /// Stops the reader and removes the table; false when there was none.
    pub fn unload(&self) -> Result<bool, Error> {
        system::require_root("toa unload")?;
        let Some(_lock) = DirLock::acquire(&crate::lock::dir_of(&self.path), false)? else {
            return Ok(false);
        };
        self.unload_locked()
    }

    fn unload_locked(&self) -> Result<bool, Error> {
        if retire_older_table(&self.path)? {
            system::kernel_log("TOA: toa unloaded (userspace mode, a table of an older version)");
            return Ok(true);
        }
        let Some(t) = TableFile::open(&self.path, false)? else {
            return Ok(false);
        };
        // Live or not: a reader that was stopped (SIGSTOP) has a stale heartbeat but must go too.
        stop_reader(t.table().header.reader_pid.load(Ordering::Relaxed));
        // The reader removes its table; if it was dead, mark and remove it here. Mapped copies in
        // applications see STOPPED and stop answering.
        drop(t);
        if let Some(t) = TableFile::open(&self.path, true)? {
            t.table().header.state.store(STOPPED, Ordering::Release);
            fs::remove_file(&self.path)?;
        }
        system::kernel_log("TOA: toa unloaded (userspace mode)");
        Ok(true)
    }

    /// The capture reader, a process of its own (`toa load` and `toa run` start it): runs until
    /// `stop`; `on_running` is called once it serves. It gives up every privilege once its
    /// socket and table are open, and then makes only the system calls of its loop (see
    /// `seccomp`). It leaves its table to `toa unload`, which stopped it.
    pub fn run_reader(&self, stop: &AtomicBool, on_running: impl FnOnce()) -> Result<(), Error> {
        let t = TableFile::open(&self.path, true)?
            .ok_or_else(|| Error::Userspace { detail: format!("no table at {}", self.path.display()) })?;
        let table = t.table();
        let mut trust = Box::new([TrustEntry::default(); TRUST_MAX]);
        let (config, trust_len) = table.read_config(&mut trust);
        let mut policy = reader::Policy { config, trust, trust_len };
        let mut seq = table.header.config_seq.load(Ordering::Acquire);
        table.header.config_applied.store(seq, Ordering::Release);
        let capture = capture::Capture::open(&port_ranges(&policy.config))
            .map_err(|e| Error::Userspace { detail: format!("opening the capture socket (AF_PACKET): {e}") })?;
        // Applications wait for us in accept(): run before ordinary work when woken.
        // SAFETY: setpriority on this process; failure only leaves the default priority.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
        // It parses what anyone on the network sends: from here on, with nothing to spare (no
        // capability, then no system call outside its loop's).
        system::drop_privileges()?;
        system::kernel_log("TOA: toa loaded (userspace mode)");
        seccomp::confine_reader()?;
        let pid = std::process::id();
        table.header.reader_pid.store(pid, Ordering::Relaxed);
        table.header.capture_ino.store(capture.inode(), Ordering::Relaxed);
        table.header.heartbeat.store(monotonic_secs(), Ordering::Release);
        table.header.state.store(RUNNING, Ordering::Release);
        on_running();
        let mut buf = [0u8; capture::SNAP_LEN as usize];
        let mut last_second = 0;
        while !stop.load(Ordering::Relaxed) {
            let now = monotonic_secs();
            if now != last_second {
                last_second = now;
                table.header.heartbeat.store(now, Ordering::Release);
                let (_, gave_up) = table.sweep(now as u32);
                table.count(Counter::SynRecvSockNoToa, gave_up);
                table.count(Counter::CaptureDrops, capture.drops());
                if !self.owns(t.ino) {
                    // Removed or replaced (`toa unload` found us dead, or a new table): stop.
                    break;
                }
            }
            capture.wait(100);
            // After the wait, before the packets: a policy written while we slept applies to them.
            let current = table.header.config_seq.load(Ordering::Acquire);
            if current != seq {
                seq = current;
                let (config, n) = table.read_config(&mut policy.trust);
                if port_ranges(&config) != port_ranges(&policy.config) {
                    capture.set_filter(&port_ranges(&config))?;
                }
                policy.config = config;
                policy.trust_len = n;
                table.header.config_applied.store(seq, Ordering::Release);
            }
            // Busy from before the first packet leaves the socket until the socket is empty
            // again and all it said is stored (libtoa.so reads this with the queue length).
            table.header.reader_busy.store(1, Ordering::SeqCst);
            while let Some(pkt) = capture.recv(&mut buf)? {
                table.count(Counter::TablePackets, 1);
                if let Some(seg) = reader::segment(pkt) {
                    reader::handle(&table, &policy, &seg, now as u32);
                }
            }
            table.header.reader_busy.store(0, Ordering::SeqCst);
        }
        table.header.state.store(STOPPED, Ordering::Release);
        table.clear_all();
        Ok(())
    }

    fn owns(&self, ino: u64) -> bool {
        fs::metadata(&self.path).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
    }
}

enum Prepared {
    /// A live reader took the new policy.
    Reconfigured(Box<Loaded>),
    /// A new table, waiting for its reader.
    Fresh(TableFile),
}

/// Waits up to 5 s for the table's reader to serve; `failed` says why it never will.
fn wait_live(
    t: &TableFile,
    mut failed: impl FnMut() -> Result<Option<String>, Error>,
) -> Result<Option<String>, Error> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if t.live() {
            return Ok(None);
        }
        if let Some(why) = failed()? {
            return Ok(Some(why));
        }
        if Instant::now() > deadline {
            return Ok(Some("the capture reader did not start within 5 s".to_owned()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The port ranges the capture filter lets through (empty: all).
fn port_ranges(cfg: &toa_common::AgentConfig) -> Vec<[u16; 2]> {
    if !cfg.has(toa_common::config::FLAG_PORTS) {
        return Vec::new();
    }
    let n = (cfg.port_ranges as usize).min(cfg.ports.len());
    if n == 0 {
        // Ports restricted to an empty list: nothing is in scope.
        return vec![[0, 0]];
    }
    cfg.ports[..n].to_vec()
}

/// Whether `pid` is a running toa capture reader.
/// Stops the reader of a table an older toa wrote, and removes the table (an upgrade: from
/// version 2, whose slots had no ISN). Versions 2 and 3 share the header, so its reader's PID
/// and state are where this version's are. Applications that map it see it stopped and keep
/// their real addresses until they map the new one, which their libtoa.so must be of this
/// version to read (they need a restart). Returns whether there was one.
fn retire_older_table(path: &Path) -> Result<bool, Error> {
    use std::os::unix::fs::FileExt as _;
    let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(path) else {
        return Ok(false);
    };
    let mut head = [0u8; 12];
    if file.read_exact_at(&mut head, 0).is_err() {
        return Ok(false);
    }
    let magic = u64::from_ne_bytes(head[..8].try_into().expect("8 bytes"));
    let version = u32::from_ne_bytes(head[8..].try_into().expect("4 bytes"));
    if magic != MAGIC || !(2..VERSION).contains(&version) {
        return Ok(false);
    }
    let mut pid = [0u8; 4];
    file.read_exact_at(&mut pid, core::mem::offset_of!(Header, reader_pid) as u64)?;
    let pid = u32::from_ne_bytes(pid);
    file.write_all_at(&STOPPED.to_ne_bytes(), core::mem::offset_of!(Header, state) as u64)?;
    stop_reader(pid);
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    Ok(true)
}

/// Ends the reader `pid` a table names, if it is one, and returns once it is gone (5 s at most).
fn stop_reader(pid: u32) {
    if pid == 0 || !is_reader(pid) {
        return;
    }
    // SAFETY: signalling the reader whose PID its table holds (checked to be a reader); SIGCONT
    // too, or a stopped reader would never see the SIGTERM.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
        libc::kill(pid as i32, libc::SIGCONT);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && is_reader(pid) {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn is_reader(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"userspace-reader"))
        && system::process_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::TableReaders;

    /// An older version's table (here version 2, whose reader is gone) is marked stopped and
    /// removed; this version's and other files are left alone.
    #[test]
    fn an_older_tables_reader_is_retired() {
        use toa_common::table::{Header, MAGIC, STOPPED, VERSION};
        let dir = std::env::temp_dir().join(format!("toa-retire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table");
        let mut old = vec![0u8; 64];
        old[..8].copy_from_slice(&MAGIC.to_ne_bytes());
        old[8..12].copy_from_slice(&2u32.to_ne_bytes());
        let pid_at = core::mem::offset_of!(Header, reader_pid);
        old[pid_at..pid_at + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        std::fs::write(&path, &old).unwrap();
        let mapped = std::fs::File::open(&path).unwrap();
        assert!(super::retire_older_table(&path).unwrap());
        assert!(!path.exists());
        // A process that mapped it sees it stopped.
        let mut state = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&mapped, &mut state, core::mem::offset_of!(Header, state) as u64)
            .unwrap();
        assert_eq!(u32::from_ne_bytes(state), STOPPED);
        let mut current = old.clone();
        current[8..12].copy_from_slice(&VERSION.to_ne_bytes());
        std::fs::write(&path, &current).unwrap();
        assert!(!super::retire_older_table(&path).unwrap());
        std::fs::write(&path, b"not a table").unwrap();
        assert!(!super::retire_older_table(&path).unwrap());
        assert!(path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn table_group_names_gids_and_all() {
        assert_eq!(TableReaders::parse("root"), Ok(TableReaders::Root));
        assert_eq!(TableReaders::parse("0"), Ok(TableReaders::Root));
        assert_eq!(TableReaders::parse("all"), Ok(TableReaders::All));
        assert_eq!(TableReaders::parse("65534"), Ok(TableReaders::Group(65534)));
        let err = TableReaders::parse("no-such-group-toa").unwrap_err();
        assert!(err.contains("groupadd no-such-group-toa"), "{err}");
        // Nobody but root can write, whoever may read.
        for readers in [TableReaders::Root, TableReaders::Group(7), TableReaders::All] {
            assert_eq!(readers.file_mode().0 & 0o222, 0o200, "{readers:?}");
        }
    }
}
