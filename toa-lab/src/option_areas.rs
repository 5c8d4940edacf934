//! Random TCP option areas for the live fuzz case: seeded and reproducible, shaped to reach the
//! parser's edges (NOP runs, end-of-list, TOAs of both lengths and of wrong ones, options cut
//! by the end of the area, other kinds), and free of what makes the kernel drop a segment before
//! any hook sees it. What the agent should make of each comes from the reference parser.

use toa_common::{reference::reference, AgentConfig, Parsed, AF_INET};

/// A small seeded generator (xorshift64*): the same seed gives the same areas on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// Kinds the kernel acts on before the agent sees the segment: an unexpected MD5 (19) or AO
/// (29) signature drops it, and a timestamp (8) on the handshake ACK can fail its PAWS check.
const KERNEL_DROPS: [u8; 4] = [8, 19, 29, 30];

/// Kinds that change the connection when a SYN carries them (MSS, window scale, Fast Open
/// cookie): left out of SYN areas, so that what differs is only what the agent reads.
const SYN_NEGOTIATES: [u8; 3] = [2, 3, 34];

/// One option area of 0 to 40 bytes (whole 32-bit words, as TCP carries them), of those the
/// kernel delivers.
pub fn area(rng: &mut Rng) -> Vec<u8> {
    loop {
        let a = any_area(rng, 40, &[]);
        if kernel_delivers(&a) {
            return a;
        }
    }
}

/// A SYN's option area: the usual MSS, then up to 36 random bytes as [`area`] makes them
/// (without the kinds a SYN negotiates).
pub fn syn_area(rng: &mut Rng) -> Vec<u8> {
    loop {
        let mut a = crate::raw_tcp::MSS_ONLY.to_vec();
        a.extend(any_area(rng, 36, &SYN_NEGOTIATES));
        if kernel_delivers(&a) {
            return a;
        }
    }
}

/// Whether the kernel's TCP-MD5/AO signature search lets the segment through. From 6.7 on
/// (`tcp_do_parse_auth_options`) it walks the options while 5 bytes remain (18 without TCP-AO)
/// and drops the segment at a broken list (a length below 2, or past the area): such a
/// connection fails with or without toa. Breaks nearer the end reach the agent.
pub fn kernel_delivers(area: &[u8]) -> bool {
    let mut off = 0;
    while area.len() - off >= 5 {
        match area[off] {
            0 => return true,
            1 => off += 1,
            _ => match area.get(off + 1).map(|l| usize::from(*l)) {
                Some(len) if len >= 2 && off + len <= area.len() => off += len,
                _ => return false,
            },
        }
    }
    true
}

fn any_area(rng: &mut Rng, max: usize, avoid: &[u8]) -> Vec<u8> {
    let target = 4 * rng.below(max as u64 / 4 + 1) as usize;
    let mut a = Vec::with_capacity(64);
    while a.len() < target {
        match rng.below(12) {
            0 | 1 => a.extend(std::iter::repeat_n(1, 1 + rng.below(3) as usize)),
            2 => a.push(0),
            3..=5 => {
                // A TOA: port, then an address of TEST-NET-3.
                a.extend([254, 8, rng.byte(), rng.byte(), 203, 0, 113, rng.byte()]);
            }
            6 => {
                // An IPv6 TOA: port, then 2001:db8::x.
                a.extend([254, 20, rng.byte(), rng.byte(), 0x20, 0x01, 0x0d, 0xb8]);
                a.extend(std::iter::repeat_n(0, 11));
                a.push(rng.byte());
            }
            7 | 8 => {
                // A TOA of a length no layout has (0 and 1 break the list).
                const WRONG: [u8; 12] = [0, 1, 2, 3, 6, 7, 9, 12, 16, 19, 21, 40];
                let len = WRONG[rng.below(WRONG.len() as u64) as usize];
                a.extend([254, len]);
                a.extend((2..len).map(|_| rng.byte()));
            }
            _ => {
                // Another kind, of any length that fits an area.
                let kind = loop {
                    let k = 2 + rng.below(252) as u8;
                    if !KERNEL_DROPS.contains(&k) && !avoid.contains(&k) && k != 254 {
                        break k;
                    }
                };
                let len = 2 + rng.below(11) as u8;
                a.push(kind);
                a.push(len);
                a.extend((2..len).map(|_| rng.byte()));
            }
        }
    }
    // What does not fit is cut off: an option may run past the area's end.
    a.truncate(target);
    a
}

/// What the agent should take from an area, by the reference parser: `Some(client)` as the
/// server shows it (`a.b.c.d:port`), `None` for no client. An IPv6 client does not fit the
/// tests' IPv4 sockets, so the real address stays (and so `None`).
pub fn expected(area: &[u8], cfg: &AgentConfig) -> (Option<String>, Parsed) {
    let parsed = reference(area, cfg);
    let shown = match &parsed {
        Parsed::Found(c) if c.family == AF_INET => {
            let a = &c.addr;
            Some(format!("{}.{}.{}.{}:{}", a[0], a[1], a[2], a[3], u16::from_be_bytes(c.port)))
        }
        _ => None,
    };
    (shown, parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_areas_and_every_shape_occurs() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let areas: Vec<Vec<u8>> = (0..2000).map(|_| area(&mut a)).collect();
        assert!(areas.iter().all(|x| *x == area(&mut b) && x.len() <= 40 && x.len() % 4 == 0));
        let cfg = AgentConfig::classic();
        let outcomes: Vec<Parsed> = areas.iter().map(|x| expected(x, &cfg).1).collect();
        assert!(outcomes.iter().any(|p| matches!(p, Parsed::Found(c) if c.family == AF_INET)));
        assert!(outcomes.iter().any(|p| matches!(p, Parsed::Found(c) if c.family != AF_INET)));
        assert!(outcomes.contains(&Parsed::Malformed));
        // None the kernel would drop.
        assert!(areas.iter().all(|x| kernel_delivers(x)));
        // SYN areas: the MSS first, whole words, at most 40 bytes, some with a TOA.
        let syns: Vec<Vec<u8>> = (0..2000).map(|_| syn_area(&mut a)).collect();
        assert!(syns.iter().all(|x| x.starts_with(&crate::raw_tcp::MSS_ONLY) && x.len() <= 40 && x.len() % 4 == 0));
        assert!(syns.iter().any(|x| matches!(expected(&x[4..], &cfg).1, Parsed::Found(_))));
        assert!(!kernel_delivers(&[1, 1, 1, 254, 0, 1, 1, 1, 1, 1, 1, 1]));
        assert!(kernel_delivers(&[1, 1, 1, 1, 1, 1, 1, 1, 254, 0, 1, 1]));
        assert!(outcomes.contains(&Parsed::Absent));
    }
}
