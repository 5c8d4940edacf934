//! The agent's counters, in both modes: the eBPF programs keep the first [`COUNTERS`] in a
//! per-CPU array (userspace sums the CPUs); the userspace mode keeps all of them in its table's
//! header, the last four being its own.

/// Index of each counter in the `TOA_STATS` map and in the table header. The first six keep the
/// names and meaning of the classic module's `/proc/net/toa_stats`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Incoming connection established with a TOA on the handshake ACK.
    SynRecvSockToa = 0,
    /// Incoming connection established without a TOA on the handshake ACK.
    SynRecvSockNoToa,
    /// `getpeername()`/`accept()` answered with the client address.
    GetnameToaOk,
    /// The socket has a client address its family cannot hold (IPv6 client, IPv4 socket).
    GetnameToaMismatch,
    /// `getpeername()` on a socket that is not TCP: left alone.
    GetnameToaBypass,
    /// `getpeername()` on a TCP socket without a client address.
    GetnameToaEmpty,
    /// TOA found on a segment after the handshake ACK.
    DataSegmentToa,
    /// Neither the handshake ACK nor the next segment carried a TOA: from then on only segments
    /// with an option the kernel does not know are read (up to `SEARCH_SEGMENTS_IN` segments).
    SearchGaveUp,
    /// A malformed TOA or broken option list was seen (the real address is kept).
    OptionMalformed,
    /// Socket storage could not be allocated (memory pressure): the real address is kept.
    StorageFailed,
    /// A valid option from a source outside the trust list: ignored.
    UntrustedOption,
    /// The NAT64 getsockopt (`TOA_SO_GET_LOOKUP`) answered with a client address.
    Nat64Lookup,
    // The userspace mode's own, after the ones both modes keep.
    /// Segments the capture filter passed to the reader.
    TablePackets,
    /// Entries given up while still in use because their bucket was full.
    TableEvicted,
    /// Entries holding a client address, as of the reader's last sweep (a gauge).
    TableEntries,
    /// Segments the capture socket dropped because the reader fell behind.
    CaptureDrops,
}

/// Counters both modes keep (the size of the eBPF mode's `TOA_STATS` map).
pub const COUNTERS: u32 = 12;
/// Every counter, the userspace mode's own included (the table header's slots).
pub const ALL_COUNTERS: usize = 16;

/// How a metrics exporter should present a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (until the agent restarts).
    Counter,
    /// A level that goes up and down.
    Gauge,
}

impl Counter {
    /// Every counter, in slot order: the ones both modes keep, then the userspace mode's own.
    pub const ALL: [Counter; ALL_COUNTERS] = [
        Counter::SynRecvSockToa,
        Counter::SynRecvSockNoToa,
        Counter::GetnameToaOk,
        Counter::GetnameToaMismatch,
        Counter::GetnameToaBypass,
        Counter::GetnameToaEmpty,
        Counter::DataSegmentToa,
        Counter::SearchGaveUp,
        Counter::OptionMalformed,
        Counter::StorageFailed,
        Counter::UntrustedOption,
        Counter::Nat64Lookup,
        Counter::TablePackets,
        Counter::TableEvicted,
        Counter::TableEntries,
        Counter::CaptureDrops,
    ];

    /// The counters the eBPF mode keeps (in its `TOA_STATS` map).
    pub fn ebpf() -> &'static [Counter] {
        &Self::ALL[..COUNTERS as usize]
    }

    pub const fn kind(self) -> Kind {
        match self {
            Counter::TableEntries => Kind::Gauge,
            _ => Kind::Counter,
        }
    }

    /// One line on what the counter counts (metrics help text).
    pub const fn help(self) -> &'static str {
        match self {
            Counter::SynRecvSockToa => "incoming connections established with a TOA on the handshake ACK",
            Counter::SynRecvSockNoToa => "incoming connections established without a TOA on the handshake ACK",
            Counter::GetnameToaOk => "accept()/getpeername() answered with the client address",
            Counter::GetnameToaMismatch => "client address that the socket's family cannot hold (real address kept)",
            Counter::GetnameToaBypass => "getpeername() on a socket that is not TCP (left alone)",
            Counter::GetnameToaEmpty => "getpeername() on a TCP socket without a client address",
            Counter::DataSegmentToa => "TOA found on a segment after the handshake ACK",
            Counter::SearchGaveUp => "connections whose handshake ACK and next segment carried no TOA",
            Counter::OptionMalformed => "malformed TOA or option list seen (real address kept)",
            Counter::StorageFailed => "socket storage allocation failures (real address kept)",
            Counter::UntrustedOption => "valid options from sources outside the trust list (ignored)",
            Counter::Nat64Lookup => "getsockopt(TOA_SO_GET_LOOKUP) answers with a client address",
            Counter::TablePackets => "segments the capture filter passed to the reader",
            Counter::TableEvicted => "entries given up early because their bucket was full (raise --table-entries)",
            Counter::TableEntries => "table entries holding a client address",
            Counter::CaptureDrops => "segments the kernel dropped because the reader fell behind",
        }
    }

    /// The name shown by `toa stats` (classic names first).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::SynRecvSockToa => "syn_recv_sock_toa",
            Counter::SynRecvSockNoToa => "syn_recv_sock_no_toa",
            Counter::GetnameToaOk => "getname_toa_ok",
            Counter::GetnameToaMismatch => "getname_toa_mismatch",
            Counter::GetnameToaBypass => "getname_toa_bypass",
            Counter::GetnameToaEmpty => "getname_toa_empty",
            Counter::DataSegmentToa => "data_segment_toa",
            Counter::SearchGaveUp => "search_gave_up",
            Counter::OptionMalformed => "option_malformed",
            Counter::StorageFailed => "storage_failed",
            Counter::UntrustedOption => "untrusted_option",
            Counter::Nat64Lookup => "nat64_lookup",
            Counter::TablePackets => "table_packets",
            Counter::TableEvicted => "table_evicted",
            Counter::TableEntries => "table_entries",
            Counter::CaptureDrops => "capture_drops",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_slot_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert!(Counter::ebpf().iter().all(|c| (*c as u32) < COUNTERS));
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in Counter::ALL.iter().enumerate() {
            assert!(Counter::ALL[i + 1..].iter().all(|b| a.name() != b.name()), "{}", a.name());
        }
    }
}
