//! The agent's pinned state: one type that loads and pins it, opens what is pinned, reports on
//! it and removes it. Every CLI command is a thin layer over [`Agent`].
//!
//! Layout under the pin directory (default `/sys/fs/bpf/toa`), from the tables in [`crate::hooks`]:
//! one `link_*` per cgroup attachment and the maps `socks`, `stats`, `config`, `trust`. The
//! pinned links keep the programs attached after `toa load` exits; removing the pins detaches
//! them. Rewriting `config` and `trust` reconfigures the running programs without detaching
//! anything.

use std::{
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{lpm_trie::Key, Array, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockopt, SockOps,
    },
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use toa_common::{
    udp::{UdpConfig, UdpCounter, UDP_FLOWS},
    AgentConfig, Counter,
};

use super::{udp_opp, Loaded, Status};
use crate::{
    backend::Mode,
    cgroup,
    error::{chain, Error},
    hooks::{self, hooks_for, tcp_hooks, HookKind, HOOKS, MAPS, UDP_OPP_PROGRAM, UDP_SIZED_MAPS},
    link_info,
    lock::DirLock,
    policy::{trust_key, trust_net, Policy},
    programs, system,
};

/// A link not pinned yet, with the pin file it goes to.
pub(crate) type NamedLink = (&'static str, Attached);

/// A link not pinned yet; dropping it detaches the program.
pub(crate) enum Attached {
    Aya(FdLink),
    Raw(std::os::fd::OwnedFd),
}

/// One attached program.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: String,
    pub id: u32,
    /// Instructions the verifier walked (kernel ≥ 5.16 reports it).
    pub verified_insns: Option<u32>,
}

/// The suffix under which a relocation pins its new links before renaming them over the old
/// (no dot: bpffs refuses names with dots).
const REPLACING: &str = "_new";

/// The agent, identified by its pin directory.
#[derive(Clone, Debug)]
pub struct Agent {
    pin_dir: PathBuf,
}

impl Agent {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self { pin_dir: pin_dir.into() }
    }

    /// Whether every link pin of the TCP path is there (what `Backend::live` asks).
    pub fn has_pins(&self) -> bool {
        tcp_hooks().all(|h| self.pin_dir.join(h.pin).exists())
    }

    /// Whether the loaded agent has its UDP path on (false when nothing is loaded).
    fn udp_on(&self) -> bool {
        read_udp_config(&self.pin_dir).is_ok_and(|c| c.enabled != 0)
    }

    /// Loads the programs, attaches them to the cgroup and pins everything. Idempotent: when the
    /// agent is already attached to the same cgroup nothing changes. On any error nothing stays
    /// attached or pinned.
    pub fn load(&self, cgroup: Option<&Path>, policy: &Policy) -> Result<Loaded, Error> {
        system::require_root("toa load")?;
        system::require_kernel()?;
        policy.validate().map_err(|detail| Error::Policy { detail })?;
        udp_opp::check(&policy.udp_opp_ifaces)?;
        let cgroup = cgroup::resolve(cgroup)?;
        system::ensure_bpffs(&self.pin_dir)?;
        system::raise_memlock();
        let _lock = DirLock::acquire(&self.pin_dir, true)?.expect("created");

        if self.has_pins() {
            let status = self.status()?;
            if status.cgroup.as_deref() == Some(cgroup.as_path()) {
                // Same place: only the settings may change, in place, for new connections.
                let started = Instant::now();
                let reloads = policy.udp != self.udp_on();
                let changed = self.reconfigure(&cgroup, status.policy.as_ref(), policy)?;
                let load_time_ms = reloads.then(|| ms(started.elapsed()));
                return Ok(Loaded { changed, status: self.status()?, load_time_ms });
            }
            if let Some(attached) = status.cgroup {
                return Err(Error::LoadedElsewhere { attached, requested: cgroup });
            }
        }
        // Leftovers of an interrupted load or unload: start clean (the directory stays: it is
        // what the lock is on).
        self.remove_pins()?;

        let started = Instant::now();
        let before = attached_ids(&cgroup);
        let result = attach(&cgroup, &self.pin_dir, Some(policy))
            .and_then(|(_ebpf, links)| self.pin_links(links, ""))
            .and_then(|()| udp_opp::sync(&self.pin_dir, &policy.normalized().udp_opp_ifaces, false));
        if let Err(e) = result {
            // The maps were pinned while loading; the unpinned links detach when dropped, which
            // the kernel completes a little later: return once it has.
            let _ = self.remove_pins().and_then(|()| self.remove_dir());
            wait_released(&cgroup, |id| !before.contains(id));
            return Err(e);
        }
        let elapsed = started.elapsed();
        system::kernel_log("TOA: toa loaded");
        Ok(Loaded { changed: true, status: self.status()?, load_time_ms: Some(ms(elapsed)) })
    }

    /// Moves a loaded agent to another cgroup without losing what it knows: new programs are
    /// loaded on the pinned maps and attached first, then pinned beside the old links and
    /// renamed over them (which detaches the old ones). At no point is nothing attached, and a
    /// reader of the pins (`toa status`, the health check) never finds one missing.
    pub fn relocate(&self, cgroup: Option<&Path>) -> Result<Loaded, Error> {
        self.replace_links(cgroup, false)
    }

    /// Replaces the running programs with this binary's, where they are, keeping the maps (an
    /// upgrade: `toa run` does it at start when it finds an agent already pinned).
    pub fn upgrade(&self) -> Result<Loaded, Error> {
        let cgroup = self.status()?.cgroup.ok_or_else(|| Error::NotLoaded { pin_dir: self.pin_dir.clone() })?;
        self.replace_links(Some(&cgroup), true)
    }

    fn replace_links(&self, cgroup: Option<&Path>, same_place: bool) -> Result<Loaded, Error> {
        system::require_root("toa")?;
        system::raise_memlock();
        let cgroup = cgroup::resolve(cgroup)?;
        let not_loaded = || Error::NotLoaded { pin_dir: self.pin_dir.clone() };
        let _lock = DirLock::acquire(&self.pin_dir, false)?.ok_or_else(not_loaded)?;
        if !self.has_pins() {
            return Err(not_loaded());
        }
        if !same_place && self.status()?.cgroup.as_deref() == Some(cgroup.as_path()) {
            return Ok(Loaded { changed: false, status: self.status()?, load_time_ms: None });
        }
        let started = Instant::now();
        let (_ebpf, links) = attach(&cgroup, &self.pin_dir, None)?;
        self.swap_in(links)?;
        // An upgrade puts this binary's converter on the same interfaces.
        udp_opp::sync(&self.pin_dir, &udp_opp::attached(&self.pin_dir), same_place)?;
        Ok(Loaded { changed: true, status: self.status()?, load_time_ms: Some(ms(started.elapsed())) })
    }

    /// Pins `links` beside the current ones and renames them over them (which detaches the old
    /// programs), then removes the pins of hooks that are no longer attached. The TCP path is
    /// attached throughout.
    fn swap_in(&self, links: Vec<NamedLink>) -> Result<(), Error> {
        let pins: Vec<&'static str> = links.iter().map(|(pin, _)| *pin).collect();
        self.pin_links(links, REPLACING)?;
        for pin in &pins {
            fs::rename(self.pin_dir.join(format!("{pin}{REPLACING}")), self.pin_dir.join(pin))?;
        }
        for hook in HOOKS.iter().filter(|h| !pins.contains(&h.pin)) {
            match fs::remove_file(self.pin_dir.join(hook.pin)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Turns the UDP path on or off as `policy` says, keeping the TCP path and what it knows:
    /// the UDP maps are made anew at their size (one entry while off), the programs replaced.
    fn switch_udp(&self, cgroup: &Path, policy: &Policy) -> Result<(), Error> {
        for map in UDP_SIZED_MAPS {
            match fs::remove_file(self.pin_dir.join(map.pin)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        let (_ebpf, links) = attach(cgroup, &self.pin_dir, Some(policy))?;
        self.swap_in(links)
    }

    /// Rewrites what the running programs honour; connections already established keep the
    /// address they have.
    pub fn apply_policy(&self, policy: &Policy) -> Result<(), Error> {
        policy.validate().map_err(|detail| Error::Policy { detail })?;
        udp_opp::check(&policy.udp_opp_ifaces)?;
        let _lock = DirLock::acquire(&self.pin_dir, false)?
            .ok_or_else(|| Error::NotLoaded { pin_dir: self.pin_dir.clone() })?;
        let old = read_policy(&self.pin_dir)?;
        let cgroup = self.status()?.cgroup.ok_or_else(|| Error::NotLoaded { pin_dir: self.pin_dir.clone() })?;
        self.reconfigure(&cgroup, Some(&old), policy).map(drop)
    }

    /// Gives the agent running on `cgroup` the settings of `new`: the converter's interfaces
    /// first (it does nothing while the UDP path is off), then the UDP path on or off (its
    /// programs replaced), or else the settings the programs read. On failure the old settings
    /// are written back, since the old programs still run. Returns whether anything changed.
    fn reconfigure(&self, cgroup: &Path, old: Option<&Policy>, new: &Policy) -> Result<bool, Error> {
        let new = new.normalized();
        let result = udp_opp::sync(&self.pin_dir, &new.udp_opp_ifaces, false).and_then(|()| {
            if new.udp != self.udp_on() {
                self.switch_udp(cgroup, &new).map(|()| true)
            } else if old != Some(&new) {
                write_policy(&self.pin_dir, &new).map(|()| true)
            } else {
                Ok(false)
            }
        });
        result.inspect_err(|_| {
            if let Some(old) = old {
                let _ = write_policy(&self.pin_dir, old);
                let _ = udp_opp::sync(&self.pin_dir, &old.udp_opp_ifaces, false);
            }
        })
    }

    /// Pins each link at its file name followed by `suffix`.
    fn pin_links(&self, links: Vec<NamedLink>, suffix: &str) -> Result<(), Error> {
        for (file, link) in links {
            let path = self.pin_dir.join(format!("{file}{suffix}"));
            let pinned = match link {
                Attached::Aya(link) => link.pin(&path).map(drop).map_err(|e| chain(&e)),
                Attached::Raw(fd) => link_info::pin(fd.as_fd(), &path).map_err(|e| e.to_string()),
            };
            pinned.map_err(|detail| Error::Pin { path: path.clone(), detail })?;
        }
        Ok(())
    }

    /// True while every link pin the policy needs is there and still names a program (for
    /// health checks).
    pub fn is_attached(&self) -> bool {
        hooks_for(self.udp_on()).all(|h| link_info::pinned_link(&self.pin_dir.join(h.pin)).is_ok())
    }

    /// Detaches everything by removing the pins, and returns once the kernel no longer runs the
    /// programs (it releases links asynchronously, a few milliseconds later). Returns false when
    /// nothing was loaded.
    pub fn unload(&self) -> Result<bool, Error> {
        system::require_root("toa unload")?;
        let Some(_lock) = DirLock::acquire(&self.pin_dir, false)? else {
            return Ok(false);
        };
        let before = self.status().ok();
        self.remove_pins()?;
        // Last, still under the lock: a command waiting for it then finds its directory gone and
        // takes the lock of the next one.
        self.remove_dir()?;
        if let Some(Status { cgroup: Some(cgroup), programs, .. }) = before {
            let ours: Vec<u32> = programs.iter().map(|p| p.id).collect();
            wait_released(&cgroup, |id| ours.contains(id));
        }
        system::kernel_log("TOA: toa unloaded");
        Ok(true)
    }

    /// Removes every pin the agent makes; the directory stays (see [`DirLock`]).
    fn remove_pins(&self) -> Result<(), Error> {
        if !self.pin_dir.exists() {
            return Ok(());
        }
        // The converter's tc filters first (no pin holds them; its map records them).
        udp_opp::detach_all(&self.pin_dir)?;
        // Links first, so the programs stop running before their maps go; then what an
        // interrupted relocation may have left beside them.
        let replacing = HOOKS.iter().map(|h| format!("{}{REPLACING}", h.pin));
        let files =
            HOOKS.iter().map(|h| h.pin.to_owned()).chain(replacing).chain(MAPS.iter().map(|m| m.pin.to_owned()));
        for file in files {
            match fs::remove_file(self.pin_dir.join(file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn remove_dir(&self) -> Result<(), Error> {
        match fs::remove_dir(&self.pin_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// What is loaded, read back from the kernel through the pins.
    pub fn status(&self) -> Result<Status, Error> {
        let mut status = Status::not_loaded(&self.pin_dir);
        if !self.has_pins() {
            return Ok(status);
        }
        let infos: Vec<_> = aya::programs::loaded_programs().filter_map(Result::ok).collect();
        let program = |name: &str, id: u32| ProgramStatus {
            name: name.to_owned(),
            id,
            verified_insns: infos.iter().find(|i| i.id() == id).and_then(|i| i.verified_instruction_count()),
        };
        for hook in hooks_for(self.udp_on()) {
            let path = self.pin_dir.join(hook.pin);
            let facts = link_info::pinned_link(&path)
                .map_err(|e| Error::Read { what: path.display().to_string(), detail: e.to_string() })?;
            if status.cgroup.is_none() {
                status.cgroup = facts.cgroup_id.and_then(cgroup::path_of_id);
            }
            status.programs.push(program(hook.program, facts.program_id));
        }
        // The converter runs on interfaces, not the cgroup: tc filters, which the record names.
        status.programs.extend(udp_opp::programs(&self.pin_dir).into_iter().map(|id| program(UDP_OPP_PROGRAM, id)));
        let policy = read_policy(&self.pin_dir)?;
        status.spoofable = policy.trust.is_empty();
        status.policy = Some(policy);
        status.loaded = true;
        status.mode = Some(Mode::Ebpf);
        Ok(status)
    }

    /// The counters this mode keeps ([`Counter::ebpf`]), summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Counter, u64)>, Error> {
        let path = self.pin_dir.join(hooks::STATS.pin);
        if !path.exists() {
            return Err(Error::NotLoaded { pin_dir: self.pin_dir.clone() });
        }
        per_cpu_sums(&path, Counter::ebpf(), |c| c as u32)
    }

    /// The UDP path's counters, summed over CPUs; none while the UDP path is off.
    pub fn udp_stats(&self) -> Result<Vec<(UdpCounter, u64)>, Error> {
        if !self.udp_on() {
            return Ok(Vec::new());
        }
        per_cpu_sums(&self.pin_dir.join(hooks::UDP_STATS.pin), &UdpCounter::ALL, |c| c as u32)
    }
}

/// Each of `counters` (its slot: `slot(counter)`) in the per-CPU array pinned at `path`, summed
/// over CPUs.
fn per_cpu_sums<C: Copy>(path: &Path, counters: &[C], slot: fn(C) -> u32) -> Result<Vec<(C, u64)>, Error> {
    let err = map_err(path);
    let map = open_pinned(path)?;
    let array = PerCpuArray::<_, u64>::try_from(map).map_err(|e| err(&e))?;
    counters
        .iter()
        .map(|c| {
            let per_cpu = array.get(&slot(*c), 0).map_err(|e| err(&e))?;
            Ok((*c, per_cpu.iter().sum()))
        })
        .collect()
}

/// Loads the agent object on the maps pinned in `pin_dir` (created and pinned there if absent),
/// writes `policy` (if given) before anything runs, and attaches its programs; the links are not
/// pinned yet, so dropping them (on any error) detaches them.
pub(crate) fn attach(cgroup: &Path, pin_dir: &Path, policy: Option<&Policy>) -> Result<(Ebpf, Vec<NamedLink>), Error> {
    let load_err = |e: &dyn std::error::Error| Error::Load { detail: chain(e) };
    // Upgrades and relocations keep the UDP path as it is.
    let udp = match policy {
        Some(policy) => policy.udp,
        None => read_udp_config(pin_dir).is_ok_and(|c| c.enabled != 0),
    };
    let mut ebpf = load_on_pins(pin_dir, udp)?;
    if let Some(policy) = policy {
        write_policy(pin_dir, policy)?;
    }
    let cgroup_dir = fs::File::open(cgroup)?;
    let mut links = Vec::new();
    for hook in hooks_for(udp) {
        let name = hook.program;
        let attach_err =
            |e: &dyn std::error::Error| Error::Attach { program: name, cgroup: cgroup.to_owned(), detail: chain(e) };
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Load { detail: format!("program {name} missing from the object") })?;
        // aya attaches through a bpf_link on ≥ 5.7 kernels: cgroup links always coexist with
        // other programs on the same hook (the kernel rejects the ALLOW_MULTI flag on links).
        let link: FdLink = match hook.kind {
            HookKind::SockOps => {
                let program: &mut SockOps = program.try_into().map_err(|e| load_err(&e))?;
                program.load().map_err(|e| load_err(&e))?;
                let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
                program.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e| attach_err(&e))?
            }
            HookKind::Sockopt => {
                let program: &mut CgroupSockopt = program.try_into().map_err(|e| load_err(&e))?;
                program.load().map_err(|e| load_err(&e))?;
                let prog_fd = program.fd().map_err(|e| load_err(&e))?;
                let link = link_info::cgroup_link_create(prog_fd.as_fd(), cgroup_dir.as_fd(), hook.attach_type)
                    .map_err(|e| attach_err(&e))?;
                links.push((hook.pin, Attached::Raw(link)));
                continue;
            }
            HookKind::SockAddr => {
                let program: &mut CgroupSockAddr = program.try_into().map_err(|e| load_err(&e))?;
                program.load().map_err(|e| load_err(&e))?;
                let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(|e| attach_err(&e))?;
                program.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e| attach_err(&e))?
            }
            HookKind::SkbIngress => {
                let program: &mut CgroupSkb = program.try_into().map_err(|e| load_err(&e))?;
                program.load().map_err(|e| load_err(&e))?;
                let id = program
                    .attach(&cgroup_dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                    .map_err(|e| attach_err(&e))?;
                program.take_link(id).map_err(|e| attach_err(&e))?.try_into().map_err(|e| attach_err(&e))?
            }
        };
        links.push((hook.pin, Attached::Aya(link)));
    }
    Ok((ebpf, links))
}

/// Loads the agent object on the maps pinned in `pin_dir`; those absent are made and pinned
/// there, the UDP flow maps at their full size when `udp` is on and at one entry otherwise (a
/// map already pinned keeps its size). No program is loaded into the kernel yet.
pub(crate) fn load_on_pins(pin_dir: &Path, udp: bool) -> Result<Ebpf, Error> {
    programs::require_embedded()?;
    let mut loader = EbpfLoader::new();
    for map in MAPS {
        loader.map_pin_path(map.name, pin_dir.join(map.pin));
    }
    for map in UDP_SIZED_MAPS {
        loader.map_max_entries(map.name, if udp { UDP_FLOWS } else { 1 });
    }
    loader.load(programs::AGENT).map_err(|e| Error::Load { detail: chain(&e) })
}

/// The programs on `cgroup` at any of the agent's hooks.
fn attached_ids(cgroup: &Path) -> Vec<u32> {
    HOOKS.iter().flat_map(|h| link_info::cgroup_programs(cgroup, h.attach_type).unwrap_or_default()).collect()
}

/// Waits until no program that `is_ours` picks runs on `cgroup` (the kernel releases dropped
/// or unpinned links asynchronously, a few milliseconds later), for at most two seconds.
fn wait_released(cgroup: &Path, is_ours: impl Fn(&u32) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && attached_ids(cgroup).iter().any(&is_ours) {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The map pinned at `path`.
pub(crate) fn open_pinned(path: &Path) -> Result<Map, Error> {
    let err = map_err(path);
    Map::from_map_data(MapData::from_pin(path).map_err(|e| err(&e))?).map_err(|e| err(&e))
}

fn map_err(path: &Path) -> impl Fn(&dyn std::error::Error) -> Error + '_ {
    move |e| Error::Read { what: path.display().to_string(), detail: chain(e) }
}

/// Writes the config slot and makes the trust trie hold exactly the policy's networks.
fn write_policy(pin_dir: &Path, policy: &Policy) -> Result<(), Error> {
    let path = pin_dir.join(hooks::CONFIG.pin);
    let err = map_err(&path);
    let map = open_pinned(&path)?;
    let mut config = Array::<_, AgentConfig>::try_from(map).map_err(|e| err(&e))?;

    let path = pin_dir.join(hooks::TRUST.pin);
    let err = map_err(&path);
    let map = open_pinned(&path)?;
    let mut trust = LpmTrie::<_, [u8; 16], u8>::try_from(map).map_err(|e| err(&e))?;
    let wanted: Vec<(u32, [u8; 16])> = policy.trust.iter().map(trust_key).collect();
    // New entries before the config that may start requiring them.
    for (len, addr) in &wanted {
        trust.insert(&Key::new(*len, *addr), 1, 0).map_err(|e| err(&e))?;
    }
    config.set(0, policy.to_config(), 0).map_err(|e| err(&e))?;
    let path = pin_dir.join(hooks::UDP_CONFIG.pin);
    let err = map_err(&path);
    let map = open_pinned(&path)?;
    let mut udp = Array::<_, UdpConfig>::try_from(map).map_err(|e| err(&e))?;
    udp.set(0, policy.to_udp_config(), 0).map_err(|e| err(&e))?;
    let stale: Vec<Key<[u8; 16]>> =
        trust.keys().filter_map(Result::ok).filter(|k| !wanted.contains(&(k.prefix_len(), k.data()))).collect();
    for key in stale {
        trust.remove(&key).map_err(|e| err(&e))?;
    }
    Ok(())
}

fn read_policy(pin_dir: &Path) -> Result<Policy, Error> {
    let path = pin_dir.join(hooks::CONFIG.pin);
    let err = map_err(&path);
    let map = open_pinned(&path)?;
    let config = Array::<_, AgentConfig>::try_from(map).map_err(|e| err(&e))?;
    let cfg = config.get(&0, 0).map_err(|e| err(&e))?;
    let path = pin_dir.join(hooks::TRUST.pin);
    let err = map_err(&path);
    let map = open_pinned(&path)?;
    let trust = LpmTrie::<_, [u8; 16], u8>::try_from(map).map_err(|e| err(&e))?;
    let mut nets: Vec<_> =
        trust.keys().filter_map(Result::ok).filter_map(|k| trust_net(k.prefix_len(), k.data())).collect();
    nets.sort();
    let udp = read_udp_config(pin_dir).unwrap_or_default();
    let policy = Policy::from_kernel(&cfg, nets).with_udp(&udp);
    let udp_opp_ifaces = if policy.udp { udp_opp::attached(pin_dir) } else { Vec::new() };
    Ok(Policy { udp_opp_ifaces, ..policy })
}

/// The UDP settings slot (an error when it is not pinned: nothing loaded, or an agent from
/// before the UDP path).
fn read_udp_config(pin_dir: &Path) -> Result<UdpConfig, Error> {
    let path = pin_dir.join(hooks::UDP_CONFIG.pin);
    let err = map_err(&path);
    let map = open_pinned(&path)?;
    let config = Array::<_, UdpConfig>::try_from(map).map_err(|e| err(&e))?;
    config.get(&0, 0).map_err(|e| err(&e))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}
