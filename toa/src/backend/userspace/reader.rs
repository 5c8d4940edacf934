//! What the capture reader does with each segment: the same parser and policy as the eBPF
//! sock_ops program, with the connection's 4-tuple as the key instead of the socket.

use toa_common::{
    config::{v4_mapped, FLAG_READ_SYN},
    decide, find_toa,
    table::{trusted, Entry, Key, Table, TrustEntry, ENTRY_HAS_PORT, FOUND, FOUND_ON_SYN, PENDING},
    AgentConfig, ClientAddr, Counter, OptionArea, Parsed, Verdict, CLIENT_HAS_PORT,
};

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The parts of an IP + TCP header the reader uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Segment<'p> {
    pub key: Key,
    pub flags: u8,
    /// The sequence number.
    pub seq: u32,
    pub options: &'p [u8],
    /// Bytes of data after the TCP header (from the IP length, not the captured length).
    pub payload: usize,
}

/// Parses a packet that starts at its IP header; `None` unless it is a whole-enough TCP header.
pub fn segment(pkt: &[u8]) -> Option<Segment<'_>> {
    let version = pkt.first()? >> 4;
    let (src, dst, tcp, ip_end) = match version {
        4 => {
            let ihl = (pkt[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]) as usize;
            if ihl < 20 || *pkt.get(9)? != 6 {
                return None;
            }
            let a = |o: usize| -> Option<[u8; 4]> { pkt.get(o..o + 4)?.try_into().ok() };
            (v4_mapped(a(12)?), v4_mapped(a(16)?), ihl, total)
        }
        6 => {
            if *pkt.get(6)? != 6 {
                return None;
            }
            let payload = u16::from_be_bytes([*pkt.get(4)?, *pkt.get(5)?]) as usize;
            let a = |o: usize| -> Option<[u8; 16]> { pkt.get(o..o + 16)?.try_into().ok() };
            (a(8)?, a(24)?, 40, 40 + payload)
        }
        _ => return None,
    };
    let th = pkt.get(tcp..tcp + 20)?;
    let doff = (th[12] >> 4) as usize * 4;
    if doff < 20 {
        return None;
    }
    // The options may be cut by the snap length only past 40 bytes, which cannot happen: a
    // short capture means a short packet.
    let options = pkt.get(tcp + 20..tcp + doff)?;
    let key = Key {
        local: dst,
        remote: src,
        local_port: u16::from_be_bytes([th[2], th[3]]),
        remote_port: u16::from_be_bytes([th[0], th[1]]),
    };
    let seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
    Some(Segment { key, flags: th[13], seq, options, payload: ip_end.saturating_sub(tcp + doff) })
}

/// The policy as the reader holds it between packets.
pub struct Policy {
    pub config: AgentConfig,
    pub trust: Box<[TrustEntry; toa_common::table::TRUST_MAX]>,
    pub trust_len: usize,
}

impl Policy {
    fn trusted(&self, source: &[u8; 16]) -> bool {
        self.config.trusts(|| trusted(&self.trust[..self.trust_len], source))
    }
}

fn entry(key: Key, state: u8, client: &ClientAddr, now: u32, isn: u32) -> Entry {
    let flags = if client.flags & CLIENT_HAS_PORT != 0 { ENTRY_HAS_PORT } else { 0 };
    Entry { key, state, family: client.family as u8, flags, port: client.port, addr: client.addr, stamp: now, isn }
}

/// Updates the table from one captured segment at `now` (monotonic seconds). What the option
/// means is [`decide`]'s (the eBPF mode's rule); the search window ends by age, when the table's
/// sweep drops a pending entry, so the window is never over here.
pub fn handle(table: &Table<'_>, policy: &Policy, seg: &Segment<'_>, now: u32) {
    let cfg = &policy.config;
    if !cfg.port_allowed(seg.key.local_port) || seg.flags & TCP_RST != 0 {
        return;
    }
    if seg.flags & TCP_SYN != 0 && seg.flags & TCP_ACK != 0 {
        // A SYN-ACK answers one of our own connects.
        return;
    }
    let trusted = policy.trusted(&seg.key.remote);
    let syn = seg.flags & TCP_SYN != 0;
    // A SYN's options are read with FLAG_READ_SYN only.
    let parsed = if !syn || cfg.has(FLAG_READ_SYN) {
        find_toa(&mut OptionArea::from_slice(seg.options), cfg)
    } else {
        Parsed::Absent
    };
    if parsed == Parsed::Malformed {
        table.count(Counter::OptionMalformed, 1);
    }
    match (decide(parsed.outcome(), trusted, false), parsed) {
        (Verdict::Remember, Parsed::Found(client)) if syn => {
            // A new connection on this 4-tuple: whatever was known of an older one is gone.
            table.count(Counter::SynRecvSockToa, 1);
            table.store(&entry(seg.key, FOUND_ON_SYN, &client, now, seg.seq));
        }
        (Verdict::Remember, Parsed::Found(client)) => {
            let known = table.lookup(&seg.key);
            // The ISN comes from the SYN the entry was made at; without one (the reader started
            // after it), the option's segment is taken for the first after the SYN (it is, with
            // balancers). A wrong guess only costs libtoa.so its fast path.
            let isn = known.map_or(0, |e| e.isn);
            let isn = if isn != 0 { isn } else { seg.seq.wrapping_sub(1) };
            let known = known.map(|e| e.state);
            if known == Some(FOUND) {
                // The first segment's option stands, as in the eBPF mode (which stops looking).
                return;
            }
            if known != Some(FOUND_ON_SYN) {
                let counter = if seg.payload == 0 { Counter::SynRecvSockToa } else { Counter::DataSegmentToa };
                table.count(counter, 1);
            }
            table.store(&entry(seg.key, FOUND, &client, now, isn));
        }
        (Verdict::Untrusted, _) => table.count(Counter::UntrustedOption, 1),
        (Verdict::KeepLooking, _) if syn => {
            // In scope, no client yet: accept() may wait for the option of a later segment. A new
            // connection on this 4-tuple: whatever was known of an older one is gone.
            table.store(&Entry { key: seg.key, state: PENDING, stamp: now, isn: seg.seq, ..Entry::default() });
        }
        // GiveUp on a SYN: an untrusted source gets no entry, so its connections never wait in
        // accept(). Later segments without a client change nothing.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use toa_common::table::{buckets_for, table_size, TRUST_MAX};

    use super::*;

    fn v4(flags: u8, options: &[u8], payload: usize) -> Vec<u8> {
        let doff = (20 + options.len()) / 4;
        let total = (20 + doff * 4 + payload) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&80u16.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p.push((doff as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(options);
        p.extend(std::iter::repeat_n(0u8, payload.min(8)));
        p
    }

    const TOA: [u8; 8] = [254, 8, 0x10, 0x92, 203, 0, 113, 7];

    fn with_table(f: impl FnOnce(&Table<'_>, &mut Policy)) {
        let buckets = buckets_for(64);
        let mut mem = vec![0u64; table_size(buckets) / 8];
        // SAFETY: zeroed, aligned, exclusively ours.
        let table = unsafe { Table::init(mem.as_mut_ptr().cast(), buckets, (0, 0)) };
        let mut policy = Policy {
            config: AgentConfig::classic(),
            trust: Box::new([TrustEntry::default(); TRUST_MAX]),
            trust_len: 0,
        };
        f(&table, &mut policy);
    }

    fn key() -> Key {
        Key {
            local: v4_mapped([198, 18, 0, 1]),
            remote: v4_mapped([198, 18, 0, 2]),
            local_port: 80,
            remote_port: 40000,
        }
    }

    #[test]
    fn parses_v4_and_counts_payload() {
        let p = v4(TCP_ACK, &TOA, 100);
        let s = segment(&p).unwrap();
        assert_eq!(s.key, key());
        assert_eq!((s.options, s.payload), (&TOA[..], 100));
        assert_eq!(segment(&p[..30]), None, "truncated header");
    }

    #[test]
    fn syn_then_ack_with_toa() {
        with_table(|t, pol| {
            handle(t, pol, &segment(&v4(TCP_SYN, &[2, 4, 5, 0xb4], 0)).unwrap(), 10);
            assert_eq!(t.lookup(&key()).unwrap().state, PENDING);
            handle(t, pol, &segment(&v4(TCP_ACK, &TOA, 0)).unwrap(), 10);
            let e = t.lookup(&key()).unwrap();
            assert_eq!((e.state, e.port, &e.addr[..4]), (FOUND, [0x10, 0x92], &[203, 0, 113, 7][..]));
            assert_eq!(t.counter(Counter::SynRecvSockToa), 1);
            // A later option does not replace the first.
            handle(t, pol, &segment(&v4(TCP_ACK, &[254, 8, 0, 1, 1, 1, 1, 1], 10)).unwrap(), 11);
            assert_eq!(t.lookup(&key()).unwrap().port, [0x10, 0x92]);
            // A new SYN on the same 4-tuple forgets the old connection.
            handle(t, pol, &segment(&v4(TCP_SYN, &[2, 4, 5, 0xb4], 0)).unwrap(), 20);
            assert_eq!(t.lookup(&key()).unwrap().state, PENDING);
        });
    }

    /// `v4` with sequence number `seq`.
    fn v4_seq(flags: u8, options: &[u8], payload: usize, seq: u32) -> Vec<u8> {
        let mut p = v4(flags, options, payload);
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p
    }

    #[test]
    fn entries_carry_the_connections_isn() {
        with_table(|t, pol| {
            handle(t, pol, &segment(&v4_seq(TCP_SYN, &[2, 4, 5, 0xb4], 0, 1000)).unwrap(), 10);
            assert_eq!(t.lookup(&key()).unwrap().isn, 1000, "from the SYN");
            handle(t, pol, &segment(&v4_seq(TCP_ACK, &TOA, 0, 1001)).unwrap(), 10);
            assert_eq!(t.lookup(&key()).unwrap().isn, 1000, "kept from the pending entry");
            // A new connection on the same 4-tuple: its own ISN.
            handle(t, pol, &segment(&v4_seq(TCP_SYN, &[2, 4, 5, 0xb4], 0, 7_000_000)).unwrap(), 20);
            handle(t, pol, &segment(&v4_seq(TCP_ACK, &TOA, 0, 7_000_001)).unwrap(), 20);
            assert_eq!(t.lookup(&key()).unwrap().isn, 7_000_000);
        });
        with_table(|t, pol| {
            // No SYN seen: the option's segment is taken for the first after it.
            handle(t, pol, &segment(&v4_seq(TCP_ACK, &TOA, 0, 0)).unwrap(), 10);
            assert_eq!(t.lookup(&key()).unwrap().isn, u32::MAX);
        });
    }

    #[test]
    fn untrusted_malformed_and_out_of_scope() {
        with_table(|t, pol| {
            pol.config.flags |= toa_common::config::FLAG_TRUST_REQUIRED;
            pol.trust[0] = TrustEntry { prefix_len: 128, addr: v4_mapped([198, 18, 0, 9]) };
            pol.trust_len = 1;
            handle(t, pol, &segment(&v4(TCP_SYN, &[], 0)).unwrap(), 1);
            assert_eq!(t.lookup(&key()), None, "no pending entry for an untrusted source");
            handle(t, pol, &segment(&v4(TCP_ACK, &TOA, 0)).unwrap(), 1);
            assert_eq!(t.lookup(&key()), None);
            assert_eq!(t.counter(Counter::UntrustedOption), 1);
            pol.trust_len = 0;
            pol.config.flags = 0;
            handle(t, pol, &segment(&v4(TCP_ACK, &[254, 6, 1, 2, 3, 4], 0)).unwrap(), 1);
            assert_eq!(t.lookup(&key()), None);
            assert_eq!(t.counter(Counter::OptionMalformed), 1);
            pol.config.flags = toa_common::config::FLAG_PORTS;
            handle(t, pol, &segment(&v4(TCP_ACK, &TOA, 0)).unwrap(), 1);
            assert_eq!(t.lookup(&key()), None, "port 80 is not in the (empty) port list");
        });
    }

    #[test]
    fn option_on_the_syn() {
        with_table(|t, pol| {
            pol.config.flags |= FLAG_READ_SYN;
            handle(t, pol, &segment(&v4(TCP_SYN, &TOA, 0)).unwrap(), 1);
            assert_eq!(t.lookup(&key()).unwrap().state, FOUND_ON_SYN);
            assert_eq!(t.counter(Counter::SynRecvSockToa), 1);
            // The handshake ACK without an option keeps it, and is not counted again.
            handle(t, pol, &segment(&v4(TCP_ACK, &[], 0)).unwrap(), 1);
            assert_eq!(t.lookup(&key()).unwrap().port, [0x10, 0x92]);
            assert_eq!(t.counter(Counter::SynRecvSockToa), 1);

            // From an untrusted source: counted as the eBPF mode counts it, and no entry.
            t.clear_all();
            pol.config.flags |= toa_common::config::FLAG_TRUST_REQUIRED;
            handle(t, pol, &segment(&v4(TCP_SYN, &TOA, 0)).unwrap(), 2);
            assert_eq!(t.lookup(&key()), None);
            assert_eq!(t.counter(Counter::UntrustedOption), 1);

            // Without FLAG_READ_SYN the SYN's options are not read.
            pol.config.flags = toa_common::config::FLAG_TRUST_REQUIRED;
            handle(t, pol, &segment(&v4(TCP_SYN, &TOA, 0)).unwrap(), 3);
            assert_eq!(t.counter(Counter::UntrustedOption), 1);
        });
    }

    #[test]
    fn data_segment_option() {
        with_table(|t, pol| {
            handle(t, pol, &segment(&v4(TCP_ACK, &TOA, 20)).unwrap(), 1);
            assert_eq!(t.lookup(&key()).unwrap().state, FOUND);
            assert_eq!(t.counter(Counter::DataSegmentToa), 1);
        });
    }
}
