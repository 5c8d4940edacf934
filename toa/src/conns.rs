//! `toa conns`: the live TCP connections that carry a client address, and the UDP flows whose
//! client the agent shows.
//!
//! The kernel's socket diagnostics (`NETLINK_SOCK_DIAG`, what `ss` uses) can return the content
//! of BPF socket storage with each socket (`INET_DIAG_REQ_SK_BPF_STORAGES`, Linux ≥ 5.2): one
//! dump per address family gives every socket of this network namespace together with what the
//! agent stored for it, with no extra program and no per-socket lookup. The owning process is
//! found by matching socket inodes in /proc/*/fd. In the userspace mode each socket is looked up
//! in the shared table by its 4-tuple instead. UDP flows are the agent's flow map, joined to the
//! sockets of this namespace by socket cookie (which the same dump reports).

use std::{
    collections::HashMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use serde::Serialize;
use toa_common::{
    table::{Entry, Key, ENTRY_HAS_PORT},
    udp::{Flow, FlowKey, UdpConfig},
    ClientAddr, SockState, AF_INET, AF_INET6, CLIENT_HAS_VIP, CLIENT_HAS_VPC, STATE_FOUND,
};

use crate::{backend::userspace::TableFile, error::chain, Error};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
/// sizeof(struct inet_diag_msg).
const DIAG_MSG_LEN: usize = 72;

/// One connection (or UDP flow) with a client address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conn {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// Our end.
    pub local: SocketAddr,
    /// The other end as the network sees it: the load balancer.
    pub balancer: SocketAddr,
    /// The client the balancer announced.
    pub client: SocketAddr,
    /// The virtual address the client connected to, where the option carried it (ByteDance's,
    /// Tencent's and Alibaba's VTOA layouts).
    pub vip: Option<SocketAddr>,
    /// The client's VPC id, where the option carried it (Tencent's and Alibaba's VTOA): its
    /// four bytes read as a big-endian number.
    pub vpc_id: Option<u32>,
    /// TCP state, as `ss` names it (`UDP` for a UDP flow).
    pub state: &'static str,
    /// Owning process, when one holds the socket open.
    pub pid: Option<u32>,
    pub process: Option<String>,
}

/// The connections of the current network namespace that have a client address.
pub fn list(pin_dir: &Path) -> Result<Vec<Conn>, Error> {
    let socks = pin_dir.join(crate::hooks::SOCKS.pin);
    if !socks.exists() {
        return Err(Error::NotLoaded { pin_dir: pin_dir.to_owned() });
    }
    let map =
        MapData::from_pin(&socks).map_err(|e| Error::Read { what: socks.display().to_string(), detail: chain(&e) })?;
    let map_fd = map.fd().as_fd().as_raw_fd();
    let owners = socket_owners();
    let mut conns = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, libc::IPPROTO_TCP as u8, Some(map_fd), |msg, storage| {
            let Some(state) = storage else { return };
            if state.state != STATE_FOUND {
                return;
            }
            let Some(client) = client_addr(&state.client) else { return };
            conns.push(Conn::of(msg, client, &owners).with_parts(&state.client));
        })
        .map_err(diag_error)?;
    }
    conns.extend(udp_flows(pin_dir, &owners)?);
    conns.sort_by_key(|c| (c.proto, c.local, c.balancer));
    Ok(conns)
}

/// The UDP flows of sockets of this namespace whose client is still honoured (none while the
/// UDP path is off).
fn udp_flows(pin_dir: &Path, owners: &HashMap<u32, (u32, String)>) -> Result<Vec<Conn>, Error> {
    let (config, flows) = (pin_dir.join(crate::hooks::UDP_CONFIG.pin), pin_dir.join(crate::hooks::UDP_FLOWS.pin));
    if !config.exists() || !flows.exists() {
        return Ok(Vec::new());
    }
    let read = crate::backend::ebpf::open_pinned;
    let config = aya::maps::Array::<_, UdpConfig>::try_from(read(&config)?)
        .and_then(|a| a.get(&0, 0))
        .map_err(|e| Error::Read { what: "the UDP settings".into(), detail: chain(&e) })?;
    if config.enabled == 0 {
        return Ok(Vec::new());
    }
    let map = BpfHashMap::<_, FlowKey, Flow>::try_from(read(&flows)?)
        .map_err(|e| Error::Read { what: "the UDP flows".into(), detail: chain(&e) })?;
    let Some(sockets) = udp_sockets().map_err(diag_error)? else {
        tracing::warn!("UDP flows not listed: this kernel has no UDP socket diagnostics (modprobe udp_diag)");
        return Ok(Vec::new());
    };
    let now = monotonic_ns();
    let mut conns = Vec::new();
    for (key, flow) in map.iter().filter_map(Result::ok) {
        let (Some(socket), Some(client)) = (sockets.get(&key.socket), client_addr(&flow.client)) else { continue };
        if !config.fresh(flow.seen_ns, now) {
            continue;
        }
        let balancer = SocketAddr::new(unmapped(key.peer_addr), u16::from_be_bytes(key.peer_port));
        // A flow copied to a socket at connect() has no datagram's local address: the socket's own.
        let local = if flow.local_addr == [0; 16] {
            SocketAddr::new(socket.local.ip().to_canonical(), socket.local.port())
        } else {
            SocketAddr::new(unmapped(flow.local_addr), socket.local.port())
        };
        let conn = Conn { proto: "udp", local, balancer, state: "UDP", ..Conn::of(socket, client, owners) };
        conns.push(conn.with_parts(&flow.client));
    }
    Ok(conns)
}

/// The UDP sockets of this namespace by cookie; `None` when the kernel has no UDP socket
/// diagnostics (CONFIG_INET_UDP_DIAG, the `udp_diag` module).
fn udp_sockets() -> io::Result<Option<HashMap<u64, DiagMsg>>> {
    let mut sockets = HashMap::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        match dump(family, libc::IPPROTO_UDP as u8, None, |msg, _| {
            sockets.insert(msg.cookie, msg.clone());
        }) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            other => other?,
        }
    }
    Ok(Some(sockets))
}

/// Whether `toa conns` can list UDP flows on this kernel.
pub fn udp_diag_available() -> bool {
    matches!(udp_sockets(), Ok(Some(_)))
}

/// `::ffff:a.b.c.d` as the IPv4 address, other addresses as they are.
fn unmapped(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The clock `bpf_ktime_get_ns()` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The same list in the userspace mode: each TCP socket of this namespace looked up in the
/// table by its 4-tuple (what libtoa.so does for the application).
pub fn list_userspace(table: &Path) -> Result<Vec<Conn>, Error> {
    let file = TableFile::open(table, false)?
        .ok_or_else(|| Error::Userspace { detail: format!("no table at {}: toa is not loaded", table.display()) })?;
    let table = file.table();
    let owners = socket_owners();
    let mut conns = Vec::new();
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, libc::IPPROTO_TCP as u8, None, |msg, _| {
            let key = Key {
                local: mapped(msg.local),
                remote: mapped(msg.remote),
                local_port: msg.local.port(),
                remote_port: msg.remote.port(),
            };
            let Some(entry) = table.lookup(&key).filter(Entry::has_client) else { return };
            let port =
                if entry.flags & ENTRY_HAS_PORT != 0 { u16::from_be_bytes(entry.port) } else { msg.remote.port() };
            let a = entry.addr;
            let ip: IpAddr = if u16::from(entry.family) == AF_INET {
                Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()
            } else {
                Ipv6Addr::from(a).into()
            };
            conns.push(Conn::of(msg, SocketAddr::new(ip, port), &owners));
        })
        .map_err(diag_error)?;
    }
    conns.sort_by_key(|c| (c.local, c.balancer));
    Ok(conns)
}

impl Conn {
    /// The socket `msg` with its `client`, and its owner if a process holds it.
    fn of(msg: &DiagMsg, client: SocketAddr, owners: &HashMap<u32, (u32, String)>) -> Self {
        let (pid, process) = owners.get(&msg.inode).cloned().map_or((None, None), |(p, c)| (Some(p), Some(c)));
        Conn {
            proto: "tcp",
            local: msg.local,
            balancer: msg.remote,
            client,
            vip: None,
            vpc_id: None,
            state: tcp_state(msg.state),
            pid,
            process,
        }
    }

    /// With the virtual address and VPC id `client` carries, if any.
    fn with_parts(self, client: &ClientAddr) -> Self {
        let has = |flag: u8| client.flags & flag != 0;
        let vip = has(CLIENT_HAS_VIP)
            .then(|| SocketAddr::new(Ipv4Addr::from(client.vip_addr).into(), u16::from_be_bytes(client.vip_port)));
        let vpc_id = has(CLIENT_HAS_VPC).then(|| u32::from_be_bytes(client.vpc_id));
        Conn { vip, vpc_id, ..self }
    }
}

fn diag_error(e: io::Error) -> Error {
    let detail = if e.raw_os_error() == Some(libc::ENOENT) {
        "this kernel has no TCP socket diagnostics loaded: modprobe tcp_diag".to_owned()
    } else {
        e.to_string()
    };
    Error::Read { what: "socket diagnostics (NETLINK_SOCK_DIAG)".into(), detail }
}

fn client_addr(client: &ClientAddr) -> Option<SocketAddr> {
    let port = u16::from_be_bytes(client.port);
    let a = client.addr;
    match client.family {
        AF_INET => Some(SocketAddr::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(), port)),
        AF_INET6 => Some(SocketAddr::new(Ipv6Addr::from(a).into(), port)),
        _ => None,
    }
}

#[derive(Clone)]
struct DiagMsg {
    state: u8,
    local: SocketAddr,
    remote: SocketAddr,
    inode: u32,
    cookie: u64,
}

/// Dumps every socket of `family` and `protocol`, asking for the storage of map `map_fd` with
/// each (none: the request old kernels also understand).
fn dump(
    family: u8,
    protocol: u8,
    map_fd: Option<i32>,
    mut each: impl FnMut(&DiagMsg, Option<SockState>),
) -> io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // struct inet_diag_req_v2: family, protocol, ext, pad, states (u32), then the zeroed id (48).
    let mut req = vec![family, protocol, 0, 0];
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]);
    if let Some(map_fd) = map_fd {
        // Nested attribute: which storage map to report.
        let inner = attr(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, &(map_fd as u32).to_ne_bytes());
        req.extend_from_slice(&attr(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, &inner));
    }

    let mut msg = Vec::with_capacity(16 + req.len());
    msg.extend_from_slice(&((16 + req.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    msg.extend_from_slice(&req);
    // SAFETY: sending a buffer we own on our socket.
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
            if len < 16 || len > rest.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
            }
            let body = &rest[16..len];
            match kind {
                // A dump that failed says so here (the kernel puts its error in the DONE message):
                // no diagnostics module for this protocol gives ENOENT.
                NLMSG_DONE => {
                    let errno = i32::from_ne_bytes(body.get(0..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                    return if errno < 0 { Err(io::Error::from_raw_os_error(-errno)) } else { Ok(()) };
                }
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(body.get(0..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(m) = parse_diag(body) {
                        each(&m, find_storage(&body[DIAG_MSG_LEN..]));
                    }
                }
                _ => {}
            }
            rest = &rest[align4(len).min(rest.len())..];
        }
    }
}

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(align4(len));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align4(len), 0);
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn parse_diag(b: &[u8]) -> Option<DiagMsg> {
    if b.len() < DIAG_MSG_LEN {
        return None;
    }
    let family = b[0];
    // inet_diag_sockid at offset 4: sport, dport (big endian), src[16], dst[16], if, cookie.
    let sport = u16::from_be_bytes([b[4], b[5]]);
    let dport = u16::from_be_bytes([b[6], b[7]]);
    let ip = |off: usize| -> IpAddr {
        if family == libc::AF_INET as u8 {
            Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3]).into()
        } else {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[off..off + 16]);
            Ipv6Addr::from(a).into()
        }
    };
    let inode = u32::from_ne_bytes(b[68..72].try_into().ok()?);
    // The cookie: two u32 halves, low first.
    let half = |off: usize| u64::from(u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes")));
    let cookie = half(44) | half(48) << 32;
    let (local, remote) = (SocketAddr::new(ip(8), sport), SocketAddr::new(ip(24), dport));
    Some(DiagMsg { state: b[1], local, remote, inode, cookie })
}

/// Walks the reply's attributes down to the storage value of our map.
fn find_storage(mut attrs: &[u8]) -> Option<SockState> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        if len < 4 || len > attrs.len() {
            return None;
        }
        let payload = &attrs[4..len];
        match kind {
            INET_DIAG_SK_BPF_STORAGES | SK_DIAG_BPF_STORAGE => {
                if let Some(found) = find_storage(payload) {
                    return Some(found);
                }
            }
            SK_DIAG_BPF_STORAGE_MAP_VALUE if payload.len() >= std::mem::size_of::<SockState>() => {
                // SAFETY: SockState is plain repr(C) data; the kernel wrote exactly the map value.
                return Some(unsafe { std::ptr::read_unaligned(payload.as_ptr().cast::<SockState>()) });
            }
            _ => {}
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

fn tcp_state(state: u8) -> &'static str {
    match state {
        1 => "ESTAB",
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "UNCONN",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// Socket inode → (pid, command), from /proc/*/fd (what `ss -p` does).
fn socket_owners() -> HashMap<u32, (u32, String)> {
    let mut owners = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else { return owners };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else { continue };
        let comm = fs::read_to_string(entry.path().join("comm")).map(|c| c.trim().to_owned()).unwrap_or_default();
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    if let Ok(inode) = inode.parse() {
                        owners.entry(inode).or_insert((pid, comm.clone()));
                    }
                }
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded() {
        assert_eq!(attr(1, &[1, 2, 3, 4]), [8, 0, 1, 0, 1, 2, 3, 4]);
        assert_eq!(attr(2, &[9]).len(), 8);
    }

    #[test]
    fn storage_is_found_through_the_nesting() {
        let mut value = vec![0u8; std::mem::size_of::<SockState>()];
        value[0] = 2; // AF_INET
        value[2..4].copy_from_slice(&4242u16.to_be_bytes());
        value[4..8].copy_from_slice(&[203, 0, 113, 7]);
        value[32] = STATE_FOUND;
        let inner = [attr(2, &7u32.to_ne_bytes()), attr(SK_DIAG_BPF_STORAGE_MAP_VALUE, &value)].concat();
        let nested = attr(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &inner);
        let attrs = [attr(5, &[0; 4]), attr(INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED, &nested)].concat();
        let state = find_storage(&attrs).expect("found");
        assert_eq!(client_addr(&state.client), Some("203.0.113.7:4242".parse().unwrap()));
        assert_eq!(find_storage(&attr(5, &[0; 4])), None);
    }
}
