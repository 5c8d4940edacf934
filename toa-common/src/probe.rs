//! Configuration of the test writer (`toa probe`): the options it puts on one outgoing segment.

/// Up to this many options are written, each in its own slot.
pub const PROBE_OPTIONS: usize = 4;
/// A slot holds one option of up to this many bytes.
pub const PROBE_OPTION_MAX: usize = 40;

/// Put the options on the ACK that completes the handshake.
pub const PROBE_ON_ACK: u8 = 1;
/// Put the options on the first segment that carries data.
pub const PROBE_ON_DATA: u8 = 2;
/// Put the options on the SYN.
pub const PROBE_ON_SYN: u8 = 3;
/// The `PROBE_ON_*` part of `ProbeConfig::on`.
pub const PROBE_ON_MASK: u8 = 0x0f;
/// With `on`: the first option is a classic IPv4 TOA whose port is replaced by each
/// connection's own source port, so that parallel connections announce distinct clients.
pub const PROBE_PORT_FROM_SOURCE: u8 = 0x80;
/// With `PROBE_PORT_FROM_SOURCE`: the last three bytes of the address are a count of the
/// connections written so far (`serial`), so that each of millions of connections announces a
/// client of its own (benchmarks check every one).
pub const PROBE_CLIENT_FROM_SERIAL: u8 = 0x40;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    /// `PROBE_ON_ACK`, `PROBE_ON_DATA` or `PROBE_ON_SYN`, maybe with `PROBE_PORT_FROM_SOURCE`.
    pub on: u8,
    /// Number of slots in use.
    pub count: u8,
    /// Length of each option (its own length byte must say the same: the kernel checks).
    pub lens: [u8; PROBE_OPTIONS],
    /// Set by the writer: options the kernel wrote, and options it refused.
    pub written: u8,
    pub refused: u8,
    pub options: [[u8; PROBE_OPTION_MAX]; PROBE_OPTIONS],
    /// With `PROBE_CLIENT_FROM_SERIAL`: connections written so far (not atomic: two CPUs may
    /// give the same value to two connections, which then differ by source port).
    pub serial: u32,
}

const _: () = assert!(core::mem::size_of::<ProbeConfig>() == 8 + 4 * 40 + 4);

impl ProbeConfig {
    /// Total bytes to reserve in the header.
    pub fn total_len(&self) -> usize {
        let mut total = 0;
        let mut i = 0;
        while i < PROBE_OPTIONS {
            if i < self.count as usize {
                total += self.lens[i] as usize;
            }
            i += 1;
        }
        total
    }
}
