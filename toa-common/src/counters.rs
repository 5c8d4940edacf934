//! Counters kept by the eBPF programs in a per-CPU array; userspace sums the CPUs.

/// Index of each counter in the `TOA_STATS` map. The first six keep the names and meaning of
/// the classic module's `/proc/net/toa_stats`.
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
    /// Stopped looking: the first `SEARCH_SEGMENTS_IN` segments carried no TOA.
    SearchGaveUp,
    /// A malformed TOA or broken option list was seen (the real address is kept).
    OptionMalformed,
    /// Socket storage could not be allocated (memory pressure): the real address is kept.
    StorageFailed,
    /// A valid option from a source outside the trust list: ignored.
    UntrustedOption,
    /// The NAT64 getsockopt (`TOA_SO_GET_LOOKUP`) answered with a client address.
    Nat64Lookup,
}

/// Number of counters (size of the `TOA_STATS` map).
pub const COUNTERS: u32 = 12;

impl Counter {
    /// Every counter, in map order.
    pub const ALL: [Counter; COUNTERS as usize] = [
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
    ];

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
            Counter::SearchGaveUp => "connections whose first segments carried no TOA (stopped looking)",
            Counter::OptionMalformed => "malformed TOA or option list seen (real address kept)",
            Counter::StorageFailed => "socket storage allocation failures (real address kept)",
            Counter::UntrustedOption => "valid options from sources outside the trust list (ignored)",
            Counter::Nat64Lookup => "getsockopt(TOA_SO_GET_LOOKUP) answers with a client address",
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_map_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
