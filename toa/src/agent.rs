//! The agent's pinned state: one type that loads and pins it, opens what is pinned, reports on
//! it and removes it. Every CLI command is a thin layer over [`Agent`].
//!
//! Layout under the pin directory (default `/sys/fs/bpf/toa`):
//! `link_sock_ops`, `link_getpeername4`, `link_getpeername6` (the cgroup attachments) and
//! `socks`, `stats` (the maps). The pinned links keep the programs attached after `toa load`
//! exits; removing the pins detaches them.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use toa_common::Counter;

use crate::{
    cgroup,
    error::{chain, Error},
    link_info, programs, system,
};

/// The pinned links, with the program each one attaches.
const LINKS: [(&str, &str); 3] = [
    ("link_sock_ops", programs::SOCK_OPS),
    ("link_getpeername4", programs::GETPEERNAME4),
    ("link_getpeername6", programs::GETPEERNAME6),
];
const MAP_SOCKS: (&str, &str) = ("socks", "TOA_SOCKS");
const MAP_STATS: (&str, &str) = ("stats", "TOA_STATS");

/// What `toa load` is asked to do.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// cgroup v2 directory to attach to; `None` for the root of the hierarchy (every process).
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
}

/// How a load went.
#[derive(Clone, Debug, Serialize)]
pub struct Loaded {
    /// False when the agent was already loaded there and nothing changed.
    pub changed: bool,
    pub status: Status,
    /// Time spent loading (verifying) and attaching, when this call did it.
    pub load_time_ms: Option<f64>,
}

/// One attached program.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: String,
    pub id: u32,
    /// Instructions the verifier walked (kernel ≥ 5.16 reports it).
    pub verified_insns: Option<u32>,
}

/// What `toa status` reports.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    pub loaded: bool,
    pub pin_dir: PathBuf,
    /// The cgroup the programs are attached to.
    pub cgroup: Option<PathBuf>,
    pub programs: Vec<ProgramStatus>,
    pub kernel: String,
    pub version: String,
}

/// The agent, identified by its pin directory.
pub struct Agent {
    pin_dir: PathBuf,
}

impl Agent {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self { pin_dir: pin_dir.into() }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn is_pinned(&self) -> bool {
        LINKS.iter().all(|(file, _)| self.pin_dir.join(file).exists())
    }

    /// Loads the programs, attaches them to the cgroup and pins everything. Idempotent: when the
    /// agent is already attached to the same cgroup nothing changes. On any error nothing stays
    /// attached or pinned.
    pub fn load(&self, options: &LoadOptions) -> Result<Loaded, Error> {
        system::require_root("toa load")?;
        system::require_kernel()?;
        let cgroup = cgroup::resolve(options.cgroup.as_deref())?;
        system::ensure_bpffs(&self.pin_dir)?;

        if self.is_pinned() {
            let status = self.status()?;
            if status.cgroup.as_deref() == Some(cgroup.as_path()) {
                return Ok(Loaded { changed: false, status, load_time_ms: None });
            }
            if let Some(attached) = status.cgroup {
                return Err(Error::LoadedElsewhere { attached, requested: cgroup });
            }
        }
        // Leftovers of an interrupted load or unload: start clean.
        self.remove_pins()?;

        let started = Instant::now();
        fs::create_dir_all(&self.pin_dir)?;
        let result = attach(&cgroup, &self.pin_dir).and_then(|(_ebpf, links)| self.pin_links(links));
        if let Err(e) = result {
            // The maps were pinned while loading; the unpinned links detach when dropped.
            let _ = self.remove_pins();
            return Err(e);
        }
        let elapsed = started.elapsed();
        system::kernel_log("TOA: toa loaded");
        Ok(Loaded { changed: true, status: self.status()?, load_time_ms: Some(ms(elapsed)) })
    }

    /// Moves a loaded agent to another cgroup without losing what it knows: new programs are
    /// loaded on the pinned maps and attached first, then the old links are unpinned (which
    /// detaches them), then the new ones are pinned. At no point is nothing attached.
    pub fn relocate(&self, cgroup: Option<&Path>) -> Result<Loaded, Error> {
        system::require_root("toa")?;
        let cgroup = cgroup::resolve(cgroup)?;
        if !self.is_pinned() {
            return Err(Error::NotLoaded { pin_dir: self.pin_dir.clone() });
        }
        if self.status()?.cgroup.as_deref() == Some(cgroup.as_path()) {
            return Ok(Loaded { changed: false, status: self.status()?, load_time_ms: None });
        }
        let started = Instant::now();
        let (_ebpf, links) = attach(&cgroup, &self.pin_dir)?;
        for (file, _) in LINKS {
            fs::remove_file(self.pin_dir.join(file))?;
        }
        self.pin_links(links)?;
        Ok(Loaded { changed: true, status: self.status()?, load_time_ms: Some(ms(started.elapsed())) })
    }

    fn pin_links(&self, links: Vec<(&'static str, FdLink)>) -> Result<(), Error> {
        for (file, link) in links {
            let path = self.pin_dir.join(file);
            link.pin(&path).map_err(|e| Error::Pin { path: path.clone(), detail: chain(&e) })?;
        }
        Ok(())
    }

    /// True while every link pin is there and still names a program (for health checks).
    pub fn is_attached(&self) -> bool {
        LINKS.iter().all(|(file, _)| link_info::pinned_link(&self.pin_dir.join(file)).is_ok())
    }

    /// Detaches everything by removing the pins. Returns false when nothing was loaded.
    pub fn unload(&self) -> Result<bool, Error> {
        system::require_root("toa unload")?;
        if !self.pin_dir.exists() {
            return Ok(false);
        }
        self.remove_pins()?;
        system::kernel_log("TOA: toa unloaded");
        Ok(true)
    }

    fn remove_pins(&self) -> Result<(), Error> {
        if !self.pin_dir.exists() {
            return Ok(());
        }
        // Links first, so the programs stop running before their maps go.
        let files = LINKS.iter().map(|(f, _)| *f).chain([MAP_SOCKS.0, MAP_STATS.0]);
        for file in files {
            match fs::remove_file(self.pin_dir.join(file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        fs::remove_dir(&self.pin_dir)?;
        Ok(())
    }

    /// What is loaded, read back from the kernel through the pins.
    pub fn status(&self) -> Result<Status, Error> {
        let mut status = Status {
            loaded: false,
            pin_dir: self.pin_dir.clone(),
            cgroup: None,
            programs: Vec::new(),
            kernel: system::kernel_release(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        if !self.is_pinned() {
            return Ok(status);
        }
        let infos: Vec<_> = aya::programs::loaded_programs().filter_map(Result::ok).collect();
        for (file, name) in LINKS {
            let path = self.pin_dir.join(file);
            let facts = link_info::pinned_link(&path)
                .map_err(|e| Error::Read { what: path.display().to_string(), detail: e.to_string() })?;
            if status.cgroup.is_none() {
                status.cgroup = facts.cgroup_id.and_then(cgroup::path_of_id);
            }
            let info = infos.iter().find(|i| i.id() == facts.program_id);
            status.programs.push(ProgramStatus {
                name: name.to_owned(),
                id: facts.program_id,
                verified_insns: info.and_then(|i| i.verified_instruction_count()),
            });
        }
        status.loaded = true;
        Ok(status)
    }

    /// The counters, summed over CPUs, in [`Counter::ALL`] order.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, Error> {
        let path = self.pin_dir.join(MAP_STATS.0);
        if !path.exists() {
            return Err(Error::NotLoaded { pin_dir: self.pin_dir.clone() });
        }
        let read_err = |e: &dyn std::error::Error| Error::Read { what: path.display().to_string(), detail: chain(e) };
        let data = MapData::from_pin(&path).map_err(|e| read_err(&e))?;
        let map = Map::from_map_data(data).map_err(|e| read_err(&e))?;
        let array = PerCpuArray::<_, u64>::try_from(map).map_err(|e| read_err(&e))?;
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = array.get(&(*c as u32), 0).map_err(|e| read_err(&e))?;
                Ok((c.name(), per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// Loads the agent object on the maps pinned in `pin_dir` (created and pinned there if absent)
/// and attaches its three programs; the links are not pinned yet, so dropping them (on any
/// error) detaches them.
fn attach(cgroup: &Path, pin_dir: &Path) -> Result<(Ebpf, Vec<(&'static str, FdLink)>), Error> {
    programs::require_embedded()?;
    let load_err = |e: &dyn std::error::Error| Error::Load { detail: chain(e) };
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(MAP_SOCKS.1, pin_dir.join(MAP_SOCKS.0))
        .map_pin_path(MAP_STATS.1, pin_dir.join(MAP_STATS.0))
        .load(programs::AGENT)
        .map_err(|e| load_err(&e))?;
    let cgroup_dir = fs::File::open(cgroup)?;
    let mut links = Vec::new();
    for (file, name) in LINKS {
        let attach_err =
            |e: &dyn std::error::Error| Error::Attach { program: name, cgroup: cgroup.to_owned(), detail: chain(e) };
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Load { detail: format!("program {name} missing from the object") })?;
        // aya attaches through a bpf_link on ≥ 5.7 kernels: cgroup links always coexist with
        // other programs on the same hook (the kernel rejects the ALLOW_MULTI flag on links).
        let link: FdLink = if name == programs::SOCK_OPS {
            let program: &mut SockOps = program.try_into().map_err(|e| load_err(&e))?;
            program.load().map_err(|e| load_err(&e))?;
            let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
            program.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e| attach_err(&e))?
        } else {
            let program: &mut CgroupSockAddr = program.try_into().map_err(|e| load_err(&e))?;
            program.load().map_err(|e| load_err(&e))?;
            let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
            program.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e| attach_err(&e))?
        };
        links.push((file, link));
    }
    Ok((ebpf, links))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}
