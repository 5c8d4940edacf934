//! The two ways client addresses reach applications, behind one interface.
//!
//! - [`ebpf`]: programs on a cgroup (Linux ≥ 5.10). Every process is served; the state is pinned
//!   in bpffs and outlives the command that loaded it.
//! - [`userspace`]: a capture reader fills a shared table that `libtoa.so`, preloaded into
//!   applications, reads (any kernel). The state is the table file and the reader.
//!
//! Every command and the service go through [`Backend`]: [`detect`] is the one rule that picks a
//! mode for a kernel, and [`Backend::live`] the one rule that says which mode is loaded here.
//! Nothing outside this module probes pins or table files to find out.

pub mod ebpf;
mod udp_opp;
pub mod userspace;

use std::path::{Path, PathBuf};

use serde::Serialize;
use toa_common::{udp::UdpCounter, Counter};

use self::{
    ebpf::{Agent, ProgramStatus},
    userspace::{Tuning, Userspace, UserspaceStatus},
};
use crate::{conns::Conn, policy::Policy, system, Error};

/// The oldest kernel with everything the eBPF mode needs: sock_ops header-option callbacks
/// (5.10), cgroup getpeername hooks (5.8), socket storage and bpf_links.
pub const EBPF_MIN_KERNEL: (u32, u32) = (5, 10);

/// How `toa load` gets client addresses to applications.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF on Linux ≥ 5.10, userspace below.
    #[default]
    Auto,
    /// sock_ops + cgroup getpeername programs: every process, nothing to preload.
    Ebpf,
    /// A capture reader and libtoa.so preloaded into applications (any kernel).
    Userspace,
}

impl Mode {
    /// The mechanism `Auto` stands for on this kernel ([`detect`]).
    pub fn resolve(self) -> Mode {
        match self {
            Mode::Auto => detect(),
            m => m,
        }
    }

    /// Whether this is (or `Auto` picks) the userspace mode.
    pub fn is_userspace(self) -> bool {
        self.resolve() == Mode::Userspace
    }
}

/// The mode this kernel gets when none is asked for: eBPF from [`EBPF_MIN_KERNEL`] on (and when
/// the release cannot be read: the load then says what is missing), userspace below.
pub fn detect() -> Mode {
    match system::parse_release(&system::kernel_release()) {
        Some(v) if v < EBPF_MIN_KERNEL => Mode::Userspace,
        _ => Mode::Ebpf,
    }
}

/// Where each mode keeps its state.
#[derive(Clone, Debug)]
pub struct Places {
    /// bpffs directory of the eBPF mode's pins.
    pub pin_dir: PathBuf,
    /// The userspace mode's shared table.
    pub table: PathBuf,
}

/// What a load is asked to do.
#[derive(Clone, Debug, Default)]
pub struct LoadRequest {
    /// eBPF mode: the cgroup v2 directory to attach to (`None`: the root, every process).
    pub cgroup: Option<PathBuf>,
    pub policy: Policy,
    /// Userspace mode: the reader's and the table's settings.
    pub tuning: Tuning,
}

/// How a load went, in either mode.
#[derive(Clone, Debug, Serialize)]
pub struct Loaded {
    /// False when it was already loaded and nothing changed.
    pub changed: bool,
    pub status: Status,
    /// Time spent loading and attaching (eBPF: verification), or starting the reader, when this
    /// call did it; `None` when it found it loaded.
    pub load_time_ms: Option<f64>,
}

/// What `toa status` reports, in either mode.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    pub loaded: bool,
    pub pin_dir: PathBuf,
    /// The cgroup the programs are attached to.
    pub cgroup: Option<PathBuf>,
    pub programs: Vec<ProgramStatus>,
    /// What the running programs (or reader) honour, read back from their maps (or table).
    pub policy: Option<Policy>,
    /// True when no trust list is set: any client that reaches the host can claim any address.
    pub spoofable: bool,
    pub kernel: String,
    pub version: String,
    /// `ebpf` or `userspace` when loaded.
    pub mode: Option<Mode>,
    /// The userspace mode's reader and table.
    pub userspace: Option<UserspaceStatus>,
}

impl Status {
    /// Nothing loaded (yet): the kernel and this binary's version.
    pub fn not_loaded(pin_dir: &Path) -> Self {
        Status {
            loaded: false,
            pin_dir: pin_dir.to_owned(),
            cgroup: None,
            programs: Vec::new(),
            policy: None,
            spoofable: false,
            kernel: system::kernel_release(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: None,
            userspace: None,
        }
    }
}

/// One of the two modes, with the places the state of each lives.
#[derive(Clone, Debug)]
pub struct Backend {
    places: Places,
    active: Active,
}

#[derive(Clone, Debug)]
enum Active {
    Ebpf(Agent),
    Userspace(Userspace),
}

impl Backend {
    /// The backend of `mode` (`Auto` resolved by [`detect`]).
    pub fn new(mode: Mode, places: &Places) -> Self {
        let active = match mode.resolve() {
            Mode::Userspace => Active::Userspace(Userspace::new(places)),
            _ => Active::Ebpf(Agent::new(&places.pin_dir)),
        };
        Backend { places: places.clone(), active }
    }

    /// The backend whose state is on this host: eBPF when its pins are there, else userspace when
    /// its table is (a live reader, or one left by a reader that died); `None` when neither.
    pub fn live(places: &Places) -> Option<Self> {
        if Agent::new(&places.pin_dir).has_pins() {
            return Some(Self::new(Mode::Ebpf, places));
        }
        Userspace::new(places).has_table().then(|| Self::new(Mode::Userspace, places))
    }

    /// The backend that answers status, stats and conns: the live one, else the one this kernel
    /// would load (which then says it is not loaded).
    pub fn live_or_default(places: &Places) -> Self {
        Self::live(places).unwrap_or_else(|| Self::new(Mode::Auto, places))
    }

    /// Both modes, eBPF first: `toa unload` leaves nothing of either.
    pub fn both(places: &Places) -> [Self; 2] {
        [Self::new(Mode::Ebpf, places), Self::new(Mode::Userspace, places)]
    }

    /// Loads (eBPF: attaches and pins; userspace: starts the reader as a process of its own),
    /// or applies the policy to what is loaded. On error nothing is left attached or running.
    pub fn load(&self, request: &LoadRequest) -> Result<Loaded, Error> {
        match &self.active {
            Active::Ebpf(agent) => agent.load(request.cgroup.as_deref(), &request.policy),
            Active::Userspace(userspace) => {
                if request.cgroup.is_some() {
                    return Err(Error::CgroupInUserspace);
                }
                userspace.load(&request.policy, &request.tuning)
            }
        }
    }

    /// Gives what is loaded a new policy (and the userspace mode new tuning), for new connections.
    pub fn apply(&self, policy: &Policy, tuning: &Tuning) -> Result<(), Error> {
        match &self.active {
            Active::Ebpf(agent) => agent.apply_policy(policy),
            Active::Userspace(userspace) => userspace.reconfigure(policy, tuning),
        }
    }

    pub fn status(&self) -> Result<Status, Error> {
        match &self.active {
            Active::Ebpf(agent) => agent.status(),
            Active::Userspace(userspace) => userspace.status(),
        }
    }

    /// The counters the mode keeps, in `Counter::ALL` order.
    pub fn stats(&self) -> Result<Vec<(Counter, u64)>, Error> {
        match &self.active {
            Active::Ebpf(agent) => agent.stats(),
            Active::Userspace(userspace) => userspace.stats(),
        }
    }

    /// The UDP path's counters, in `UdpCounter::ALL` order; none while it is off (and in the
    /// userspace mode, which has no UDP path).
    pub fn udp_stats(&self) -> Result<Vec<(UdpCounter, u64)>, Error> {
        match &self.active {
            Active::Ebpf(agent) => agent.udp_stats(),
            Active::Userspace(_) => Ok(Vec::new()),
        }
    }

    /// The live connections that carry a client address, in this network namespace.
    pub fn conns(&self) -> Result<Vec<Conn>, Error> {
        match &self.active {
            Active::Ebpf(_) => crate::conns::list(&self.places.pin_dir),
            Active::Userspace(_) => crate::conns::list_userspace(&self.places.table),
        }
    }

    /// Detaches (removes the pins) or stops the reader; false when nothing was loaded.
    pub fn unload(&self) -> Result<bool, Error> {
        match &self.active {
            Active::Ebpf(agent) => agent.unload(),
            Active::Userspace(userspace) => userspace.unload(),
        }
    }

    /// Whether it serves now (programs attached, or the reader alive): the health check.
    pub fn is_up(&self) -> bool {
        match &self.active {
            Active::Ebpf(agent) => agent.is_attached(),
            Active::Userspace(userspace) => userspace.is_running(),
        }
    }

    /// For `toa run`: loads, or takes over what is loaded, and returns what the service stops
    /// at the end. eBPF: loads, or replaces the pinned programs with this binary's on the same
    /// maps (an upgrade; open connections keep their client). Userspace: starts the capture
    /// reader as `toa load` does (a confined process of its own), or adopts a live one with the
    /// new policy (its table and entries kept); it has no cgroup.
    pub fn serve(&self, request: &LoadRequest) -> Result<Serving, Error> {
        match &self.active {
            Active::Ebpf(agent) => {
                let loaded = agent.load(request.cgroup.as_deref(), &request.policy)?;
                let (loaded, upgraded) = match loaded.load_time_ms {
                    Some(_) => (loaded, false),
                    None => (agent.upgrade()?, true),
                };
                Ok(Serving { backend: self.clone(), loaded, upgraded })
            }
            Active::Userspace(userspace) => {
                if request.cgroup.is_some() {
                    tracing::warn!(
                        "cgroup applies to the eBPF mode only; in userspace mode the preloaded applications are served"
                    );
                }
                let loaded = userspace.load(&request.policy, &request.tuning)?;
                Ok(Serving { backend: self.clone(), loaded, upgraded: false })
            }
        }
    }

    /// For `toa run`'s SIGHUP: moves the eBPF programs when the cgroup changed (the userspace
    /// mode has none), then applies the policy and tuning. Returns the new status when it moved.
    pub fn reconfigure(&self, old: &LoadRequest, new: &LoadRequest) -> Result<Option<Status>, Error> {
        new.policy.validate().map_err(|detail| Error::Policy { detail })?;
        let moved = match &self.active {
            Active::Ebpf(agent) if new.cgroup != old.cgroup => Some(agent.relocate(new.cgroup.as_deref())?.status),
            _ => None,
        };
        if new.policy != old.policy || new.tuning != old.tuning {
            self.apply(&new.policy, &new.tuning)?;
        }
        Ok(moved)
    }
}

/// What `toa run` keeps while it serves.
pub struct Serving {
    /// What it serves from.
    backend: Backend,
    pub loaded: Loaded,
    /// The eBPF programs were already pinned and were replaced in place.
    pub upgraded: bool,
}

impl Serving {
    /// Ends the service: unloads (eBPF programs, or the userspace reader and its table) unless
    /// `keep_loaded`, which leaves them serving for the next start. Returns whether it unloaded.
    pub fn stop(self, keep_loaded: bool) -> Result<bool, Error> {
        if keep_loaded {
            Ok(false)
        } else {
            self.backend.unload()
        }
    }
}
