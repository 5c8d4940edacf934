//! `toa`: real client addresses for TCP sockets behind FULLNAT load balancers, with eBPF.
//!
//! The load balancer writes the client's address into a TCP option (TOA). The eBPF programs
//! embedded in this crate read it on incoming connections and make `getpeername()` and
//! `accept()` return it. [`Agent`] owns the pinned state (load, open, unload, status, stats);
//! [`probe`] plays the load balancer for tests and for operators checking a backend.

pub mod backend;
pub mod cgroup;
pub mod config;
pub mod conns;
pub mod doctor;
pub mod error;
pub mod hooks;
mod link_info;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod programs;
pub mod service;
pub mod system;

pub use backend::{ebpf::Agent, userspace::Userspace, Backend, LoadRequest, Loaded, Mode, Places, Serving, Status};
pub use error::Error;
pub use link_info::{cgroup_programs, program_name};

/// Default bpffs directory holding the agent's pinned links and maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/toa";

#[cfg(test)]
mod tests {
    /// The number applications ask (`toa-client`) is the one the getsockopt hook answers.
    #[test]
    fn client_crate_asks_the_hooks_option() {
        assert_eq!(toa_client::TOA_SO_GET_LOOKUP, toa_common::TOA_SO_GET_LOOKUP);
    }
}
