//! The option-protocol converter (`toa_udp_opp`) on the interfaces of `--udp-opp-iface`.
//!
//! Unlike the cgroup programs it sits on network interfaces, as a tc ingress filter (netlink, a
//! `clsact` qdisc: every kernel from 5.10 has it). A filter has no pin, so the pinned map
//! `udp_opp` records each one (network namespace, interface, priority, handle) and `toa` detaches
//! exactly those. Interfaces are named in the network namespace `toa` runs in.

use std::{fs, io, os::unix::fs::MetadataExt as _, path::Path};

use aya::{
    maps::Array,
    programs::{
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
        Link as _, SchedClassifier, TcAttachType,
    },
};
use toa_common::udp::{OppAttachment, OPP_IFACES_MAX};

use super::ebpf::{self, open_pinned};
use crate::{
    error::{chain, Error},
    hooks::{UDP_OPP, UDP_OPP_PROGRAM},
};

/// The ids of the programs the recorded converters run (one each, unless one was attached by
/// another load of `toa`; unknown in records of older agents, which are left out).
pub(crate) fn programs(pin_dir: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = read(pin_dir).unwrap_or_default().iter().map(|a| a.program).filter(|&id| id != 0).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The interfaces the converter is attached to (none when the map is not pinned).
pub(crate) fn attached(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = read(pin_dir).unwrap_or_default().iter().map(name).collect();
    names.sort();
    names
}

/// Makes the converter run on exactly `wanted`: attaches it where it is missing (all of them
/// anew with `replace`, e.g. after an upgrade), records the new set, then detaches what is no
/// longer wanted. On error nothing new stays attached and the old set is untouched.
pub(crate) fn sync(pin_dir: &Path, wanted: &[String], replace: bool) -> Result<(), Error> {
    let path = pin_dir.join(UDP_OPP.pin);
    if wanted.is_empty() && !path.exists() {
        return Ok(());
    }
    let old = read(pin_dir)?;
    let here = netns()?;
    let (keep, drop): (Vec<_>, Vec<_>) = old.into_iter().partition(|a| {
        !replace && a.netns == here && wanted.contains(&name(a)) && ifindex(&name(a)) == Some(a.ifindex)
    });
    let missing: Vec<&String> = wanted.iter().filter(|w| !keep.iter().any(|a| name(a) == **w)).collect();
    let mut new_links = Vec::new();
    if !missing.is_empty() {
        // The object on the pinned maps (counters, settings); only this program is loaded. The
        // converter runs only beside the UDP path, whose maps are pinned already.
        let mut ebpf = ebpf::load_on_pins(pin_dir, true)?;
        let load_err = |e: &dyn std::error::Error| Error::Load { detail: chain(e) };
        let program: &mut SchedClassifier = ebpf
            .program_mut(UDP_OPP_PROGRAM)
            .ok_or_else(|| Error::Load { detail: format!("program {UDP_OPP_PROGRAM} missing from the object") })?
            .try_into()
            .map_err(|e| load_err(&e))?;
        program.load().map_err(|e| load_err(&e))?;
        for iface in missing {
            // Dropping `new_links` on an error detaches what this call attached.
            new_links.push(attach(program, iface, here)?);
        }
    }
    let records: Vec<OppAttachment> = keep.iter().copied().chain(new_links.iter().map(|(a, _)| *a)).collect();
    write(pin_dir, &records)?;
    for (_, link) in new_links {
        // Attached for good: the record is what detaches it.
        std::mem::forget(link);
    }
    for old in drop {
        detach(&old, here);
    }
    Ok(())
}

/// Fails, naming the interface and the fix, unless each of `ifaces` is an Ethernet interface
/// of this network namespace (checked before anything is attached).
pub(crate) fn check(ifaces: &[String]) -> Result<(), Error> {
    for iface in ifaces {
        let err = |detail: &str| Error::Interface { iface: iface.clone(), detail: detail.to_owned() };
        if ifindex(iface).is_none() {
            return Err(err("no such interface in this network namespace (see `ip link`)"));
        }
        if !is_ethernet(iface) {
            return Err(err("not an Ethernet interface: the converter reads Ethernet frames only"));
        }
    }
    Ok(())
}

/// Detaches every recorded converter (at unload).
pub(crate) fn detach_all(pin_dir: &Path) -> Result<(), Error> {
    sync(pin_dir, &[], false)
}

fn attach(
    program: &mut SchedClassifier,
    iface: &str,
    netns: u64,
) -> Result<(OppAttachment, SchedClassifierLink), Error> {
    let err = |detail: String| Error::Interface { iface: iface.to_owned(), detail };
    check(&[iface.to_owned()])?;
    let index = ifindex(iface).ok_or_else(|| err("the interface went away".into()))?;
    match tc::qdisc_add_clsact(iface) {
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(err(format!("adding the clsact qdisc failed: {}", chain(&e)))),
        Ok(()) => {}
    }
    let options = TcAttachOptions::Netlink(NlOptions::default());
    let id = program
        .attach_with_options(iface, TcAttachType::Ingress, options)
        .map_err(|e| err(format!("attaching {UDP_OPP_PROGRAM} failed: {}", chain(&e))))?;
    let link = program.take_link(id).map_err(|e| err(chain(&e)))?;
    let (priority, handle) = (link.priority().map_err(|e| err(chain(&e)))?, link.handle().map_err(|e| err(chain(&e)))?);
    let program = program.info().map(|i| i.id()).unwrap_or(0);
    let mut record = OppAttachment {
        netns,
        ifindex: index,
        priority: priority.into(),
        handle: handle.into(),
        program,
        ..Default::default()
    };
    record.name[..iface.len()].copy_from_slice(iface.as_bytes());
    Ok((record, link))
}

/// Detaches one recorded converter, from the network namespace it was attached in (found by
/// its inode among the named namespaces and the processes'); one whose namespace or interface
/// is gone went with it.
fn detach(record: &OppAttachment, here: u64) {
    if record.netns == here {
        return detach_here(record);
    }
    let Some(ns) = find_netns(record.netns) else { return };
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only (CLONE_NEWNET), with a namespace descriptor.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } == 0 {
                detach_here(record);
            } else {
                let e = io::Error::last_os_error();
                tracing::warn!(
                    "detaching {UDP_OPP_PROGRAM} from {}: entering net:[{}]: {e}",
                    name(record),
                    record.netns
                );
            }
        });
    });
}

/// A descriptor of the network namespace with inode `ino`, if one is still named or in use.
fn find_netns(ino: u64) -> Option<fs::File> {
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten().map(|e| e.path());
    let used = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .map(|e| e.path().join("ns/net"));
    named.chain(used).find(|p| fs::metadata(p).is_ok_and(|m| m.ino() == ino)).and_then(|p| fs::File::open(p).ok())
}

fn detach_here(record: &OppAttachment) {
    let iface = name(record);
    if ifindex(&iface) != Some(record.ifindex) {
        return;
    }
    let detached = SchedClassifierLink::attached(
        &iface,
        TcAttachType::Ingress,
        record.priority as u16,
        record.handle.into(),
        None,
    )
    .map_err(|e| e.to_string())
    .and_then(|link| link.detach().map_err(|e| chain(&e)));
    if let Err(detail) = detached {
        tracing::warn!("detaching {UDP_OPP_PROGRAM} from {iface}: {detail}");
    }
}

fn read(pin_dir: &Path) -> Result<Vec<OppAttachment>, Error> {
    let path = pin_dir.join(UDP_OPP.pin);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let map = Array::<_, OppAttachment>::try_from(open_pinned(&path)?)
        .map_err(|e| Error::Read { what: path.display().to_string(), detail: chain(&e) })?;
    Ok((0..OPP_IFACES_MAX).filter_map(|i| map.get(&i, 0).ok()).filter(|a| a.netns != 0).collect())
}

fn write(pin_dir: &Path, records: &[OppAttachment]) -> Result<(), Error> {
    let path = pin_dir.join(UDP_OPP.pin);
    let err = |e: &dyn std::error::Error| Error::Read { what: path.display().to_string(), detail: chain(e) };
    let mut map = Array::<_, OppAttachment>::try_from(open_pinned(&path)?).map_err(|e| err(&e))?;
    for i in 0..OPP_IFACES_MAX {
        let record = records.get(i as usize).copied().unwrap_or_default();
        map.set(i, record, 0).map_err(|e| err(&e))?;
    }
    Ok(())
}

fn name(record: &OppAttachment) -> String {
    let end = record.name.iter().position(|b| *b == 0).unwrap_or(record.name.len());
    String::from_utf8_lossy(&record.name[..end]).into_owned()
}

/// The network namespace of this thread (its inode).
fn netns() -> Result<u64, Error> {
    Ok(fs::metadata("/proc/thread-self/ns/net")?.ino())
}

fn ifindex(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Whether `iface` (in this network namespace) has Ethernet framing (ARPHRD_ETHER).
fn is_ethernet(iface: &str) -> bool {
    let hardware = || -> io::Result<u16> {
        // SAFETY: a datagram socket only for the ioctl; closed by OwnedFd.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: ifreq is plain data; the name fits (validated ≤ 15 bytes).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of `req`.
        if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SIOCGIFHWADDR as _, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the union member the ioctl wrote.
        Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
    };
    hardware().is_ok_and(|family| family == libc::ARPHRD_ETHER)
}
