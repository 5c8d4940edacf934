//! What a pinned link is attached to, read from the kernel: aya's `LinkInfo` exposes neither
//! the link's fd nor its cgroup, so this is the two bpf(2) calls it takes.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The facts `toa status` shows about one attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub program_id: u32,
    /// Set for cgroup links.
    pub cgroup_id: Option<u64>,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a properly laid out bpf_attr prefix for `cmd`; its pointers (if any)
    // reference buffers the caller keeps alive across the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens a pinned object read-only.
fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reads the program and cgroup of the link pinned at `path`.
pub fn pinned_link(path: &Path) -> io::Result<LinkFacts> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = open_pin(path)?;
    // struct bpf_link_info: type, id, prog_id (u32 each), padding, then the union whose cgroup
    // member is { u64 cgroup_id; u32 attach_type; }.
    let mut info = [0u64; 16];
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = info[0] as u32;
    Ok(LinkFacts { program_id: info[1] as u32, cgroup_id: (link_type == BPF_LINK_TYPE_CGROUP).then_some(info[2]) })
}

/// Ids of the programs attached to a cgroup for one attach type (`BPF_PROG_QUERY`).
pub fn cgroup_programs(cgroup: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let dir = std::fs::File::open(cgroup)?;
    let mut ids = [0u32; 64];
    let mut attr = Query {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(ids[..(attr.prog_cnt as usize).min(ids.len())].to_vec())
}

/// The name of the loaded program with this id (`BPF_PROG_GET_FD_BY_ID`, then its
/// `bpf_prog_info`: the same layout since 4.15).
pub fn program_name(id: u32) -> io::Result<String> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut GetFdById { id, next_id: 0, open_flags: 0 })?;
    // SAFETY: the kernel just returned this new descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // bpf_prog_info up to and including `name` (offset 64, 16 bytes).
    let mut info = [0u8; 80];
    let mut attr =
        InfoByFd { bpf_fd: fd.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let name = &info[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// A cgroup bpf_link made with `BPF_LINK_CREATE` directly: aya 0.14 cannot turn a
/// `CgroupSockoptLink` into a pinnable `FdLink`.
pub fn cgroup_link_create(
    program: std::os::fd::BorrowedFd<'_>,
    cgroup: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    const BPF_LINK_CREATE: libc::c_long = 28;
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 4],
    }
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        _rest: [0; 4],
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a bpf object (`BPF_OBJ_PIN`).
pub fn pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const BPF_OBJ_PIN: libc::c_long = 6;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjPin { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}
