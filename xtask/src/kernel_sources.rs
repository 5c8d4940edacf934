//! Kernels and guest userlands from Debian suites this machine does not use itself: Debian 11's
//! 5.10 cloud kernel for x86_64, and Debian 12's arm64 cloud kernel with an arm64 userland
//! (busybox, glibc, python3, nginx, iproute2) for an arm64 guest.
//!
//! Everything comes from the Debian registry this machine's own apt sources name, through a
//! *private* apt: its own sources list, package lists, cache and an empty dpkg status, all under
//! the work directory, and the architecture given on the command line. The machine's apt
//! configuration, its package lists and its dpkg architectures are never changed (no
//! `dpkg --add-architecture`). What is downloaded or unpacked once is reused: a second call
//! touches no network.
//!
//! Layout under `work`:
//! - `apt-<suite>-<arch>/`: the private apt (sources.list, lists/, cache/, status, debs/).
//! - `<linux-image package>/`: an unpacked kernel package (boot/vmlinuz-*, lib/modules/*).
//! - `sysroot-arm64/`: the arm64 userland, every package unpacked into this one directory;
//!   `sysroot-arm64.packages` lists them (package and .deb), `sysroot-arm64.libraries-ok` says
//!   the programs' libraries were all found.
//!
//! What the end-to-end tests need from these kernels that they build as modules (all three
//! kernels build af_packet, ipv6, cgroup BPF, BTF in; only these are modules), in load order:
//! `kernel/drivers/net/veth`, `kernel/net/ipv4/inet_diag`, `kernel/net/ipv4/tcp_diag`,
//! `kernel/net/ipv4/udp_diag` (tcp_diag and udp_diag depend on inet_diag; veth on nothing). The packages ship no modules.dep (depmod writes it on
//! install): the order comes from each module's `depends=` field. Debian 11's 5.10 and Debian
//! 12's arm64 6.1 ship them as plain `.ko`, the arm64 6.12 as `.ko.xz` (its kernel could load
//! those itself, CONFIG_MODULE_DECOMPRESS, but 6.1 could not: decompress them on the host, as
//! kernels.rs does).
//!
//! Booting the arm64 kernel (software emulation, no KVM):
//! `qemu-system-aarch64` with [`AARCH64_QEMU_ARGS`], `-kernel` [`arm64_image`],
//! `-initrd <cpio>` and `-append 'console=ttyAMA0 …'` (virt's PL011 serial port). Debian's arm64 `vmlinuz` is not gzipped:
//! it is the plain arm64 `Image` (with the EFI stub, signed), which qemu boots as it is.
//!
//! What an arm64 guest built from [`arm64_sysroot`] has to mind:
//! - Debian's busybox-static runs its own applets before PATH in `sh` (FEATURE_SH_STANDALONE):
//!   an init script calls iproute2 as `/bin/ip` (busybox's `ip` knows neither netns nor veth).
//!   Programs started with exec (Rust's Command) find `/bin/ip` through PATH as usual.
//! - `ip netns exec` mounts a fresh /sys in its own mount namespace: cgroup2 and bpffs under
//!   /sys/fs are not there for the command it runs (`toa probe` needs cgroup2).
//! - nginx's workers run as nobody: the guest needs /etc/passwd and /etc/group naming
//!   nobody and nogroup.
//! - No LD_LIBRARY_PATH or ld.so.cache is needed: glibc's loader searches the multiarch
//!   directories by default.

use std::{
    collections::{BTreeSet, VecDeque},
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{output, run};

/// qemu-system-aarch64's machine for the arm64 kernel. `pauth-impdef=on` makes the emulated
/// pointer authentication cheap (QEMU's default, the architected QARMA, is slow under TCG): a
/// guest that boots, loads toa and runs a probe took 25 s with it and 61 s without.
pub const AARCH64_QEMU_ARGS: [&str; 10] =
    ["-M", "virt", "-cpu", "max,pauth-impdef=on", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"];

/// What an arm64 guest needs to run `ip`, `ss`, nginx and python3 (`socket`, `select`,
/// `threading`, `selectors`, `json`, `struct`, `os`), and busybox for everything else; the
/// libraries come along ([`arm64_sysroot`]). `python3-minimal` brings the `/usr/bin/python3`
/// link; `libpython3.11-stdlib` the modules beyond the minimal set (json among them), which
/// python3.11-minimal does not depend on.
pub const ARM64_GUEST_PACKAGES: &[&str] =
    &["busybox-static", "python3-minimal", "python3.11-minimal", "libpython3.11-stdlib", "nginx", "iproute2"];

/// Debian 11: the release and the security suite (security is its own archive, not a suite of
/// the main one: `<main>/dists/bullseye-security` does not exist).
const BULLSEYE_SUITES: [&str; 2] = ["bullseye", "bullseye-security"];
/// Debian 12, as this machine uses it.
const BOOKWORM_SUITES: [&str; 3] = ["bookworm", "bookworm-updates", "bookworm-security"];
/// Debian's code names, to tell Debian's entries in the machine's sources from others'.
const DEBIAN_CODENAMES: [&str; 12] = [
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "stable",
    "oldstable",
    "testing",
    "unstable",
    "oldoldstable",
];
const DEFAULT_URI: &str = "http://deb.debian.org/debian";
const DEFAULT_SECURITY_URI: &str = "http://deb.debian.org/debian-security";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The newest Debian 11 5.10 cloud kernel for x86_64 that downloads
/// (`linux-image-5.10.0-NN-cloud-amd64`, from bullseye or bullseye-security), unpacked; returns
/// the package root (`boot/vmlinuz-*`, `lib/modules/<version>/`). A kernel already unpacked
/// under `work` is reused as it is, without looking for a newer one.
pub fn bullseye_kernel(work: &Path) -> Result<PathBuf> {
    let matches = |name: &str| {
        name.strip_prefix("linux-image-5.10.0-")
            .and_then(|rest| rest.strip_suffix("-cloud-amd64"))
            .is_some_and(|abi| !abi.is_empty() && abi.bytes().all(|b| b.is_ascii_digit()))
    };
    let apt = PrivateApt::new(work, &BULLSEYE_SUITES, "amd64")?;
    kernel(work, &apt, r"^linux-image-5\.10\.0-[0-9]+-cloud-amd64$", &matches)
}

/// The newest Debian 12 arm64 cloud kernel that downloads, of the 6.1 and 6.12 series
/// (`linux-image-6.1.0-NN-cloud-arm64`, `linux-image-6.12.NN+deb12-cloud-arm64`; 6.12 sorts
/// first), unpacked; returns the package root. Reused like [`bullseye_kernel`].
///
/// Boot [`arm64_image`] of it. Should a package ever ship a gzipped `vmlinuz` (qemu takes
/// only a plain `Image` for arm64), the decompressed kernel is written next to it as
/// `boot/Image-<version>`; Debian 12's packages ship the plain `Image` as `vmlinuz`, so there is
/// none.
pub fn arm64_kernel(work: &Path) -> Result<PathBuf> {
    let matches = |name: &str| {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let Some(rest) = name.strip_prefix("linux-image-6.").and_then(|r| r.strip_suffix("-cloud-arm64")) else {
            return false;
        };
        rest.strip_prefix("1.0-").is_some_and(digits)
            || rest.strip_prefix("12.").and_then(|r| r.strip_suffix("+deb12")).is_some_and(digits)
    };
    let apt = PrivateApt::new(work, &BOOKWORM_SUITES, "arm64")?;
    let root = kernel(work, &apt, r"^linux-image-6\.(1\.0-[0-9]+|12\.[0-9]+\+deb12)-cloud-arm64$", &matches)?;
    gunzip_vmlinuz(&root)?;
    Ok(root)
}

/// The file to give qemu-system-aarch64's `-kernel` from an unpacked arm64 kernel package:
/// `boot/Image-*` when [`arm64_kernel`] had to decompress the `vmlinuz`, else `boot/vmlinuz-*`.
pub fn arm64_image(package_root: &Path) -> Result<PathBuf> {
    let vmlinuz = boot_file(package_root, "vmlinuz-")?;
    let image = image_path(&vmlinuz);
    Ok(if image.is_file() { image } else { vmlinuz })
}

/// `boot/Image-<version>` beside `boot/vmlinuz-<version>`.
fn image_path(vmlinuz: &Path) -> PathBuf {
    let name = vmlinuz.file_name().unwrap_or_default().to_string_lossy().replacen("vmlinuz-", "Image-", 1);
    vmlinuz.with_file_name(name)
}

/// Debian 12's arm64 `packages` (e.g. [`ARM64_GUEST_PACKAGES`]) and the libraries they need,
/// downloaded and unpacked into `work/sysroot-arm64`, which is returned.
///
/// The libraries are the packages' `Depends` and `Pre-Depends` that are library packages
/// (`lib*`, `zlib1g`), transitively: for `iproute2`, `nginx` and `python3.11-minimal` that is
/// libc6, libbpf1, libelf1, libmnl0, libbsd0, libmd0, libcap2, libselinux1, libtirpc3 (and
/// Kerberos), libxtables12, libdb5.3, libcrypt1, libpcre2-8-0, libssl3, zlib1g, libexpat1,
/// libpython3.11-minimal and so on. Other dependencies (debconf, nginx-common) are left out:
/// name them when wanted. The call fails when a program in bin/, sbin/, usr/bin/ or usr/sbin/
/// still needs a library (ELF `NEEDED`) that no unpacked package has.
///
/// Only packages not unpacked there yet are fetched; the directory keeps what earlier calls
/// unpacked too. The packages are unpacked with `dpkg-deb -x` and nothing of theirs runs:
/// `/usr/bin/python3`, `/sbin/ip` and the like are the packages' own links, and the busybox
/// applet links are for the guest to make (`busybox --install -s /bin`).
pub fn arm64_sysroot(work: &Path, packages: &[&str]) -> Result<PathBuf> {
    let sysroot = work.join("sysroot-arm64");
    let stamp = work.join("sysroot-arm64.packages");
    fs::create_dir_all(&sysroot)?;
    let unpacked: BTreeSet<String> = fs::read_to_string(&stamp)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    // Written once the programs' libraries are all there, removed before anything is added.
    let checked = work.join("sysroot-arm64.libraries-ok");
    if packages.iter().all(|p| unpacked.contains(*p)) && checked.exists() {
        return Ok(sysroot);
    }
    let _ = fs::remove_file(&checked);
    let apt = PrivateApt::new(work, &BOOKWORM_SUITES, "arm64")?;
    let wanted = apt.download_with_libraries(packages)?;
    let mut record = fs::read_to_string(&stamp).unwrap_or_default();
    for package in wanted.iter().filter(|p| !unpacked.contains(*p)) {
        let deb = apt.deb(package).with_context(|| format!("apt-get download {package} left no .deb"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&sysroot))?;
        // Recorded after each unpack: an interrupted run unpacks the rest next time.
        record.push_str(&format!("{package} {}\n", deb.file_name().unwrap().to_string_lossy()));
        fs::write(&stamp, &record)?;
    }
    let unresolved = unresolved_libraries(&sysroot, "aarch64-linux-gnu")?;
    if !unresolved.is_empty() {
        bail!(
            "{}: programs need libraries that no unpacked package has (add their packages): {}",
            sysroot.display(),
            unresolved.join(", ")
        );
    }
    fs::write(&checked, "")?;
    Ok(sysroot)
}

/// The apt-get (and apt-cache) options of a private apt in `dir` for Debian's `suites` of
/// `arch`: it writes `dir/sources.list` (one line per suite, the `*-security` suites from the
/// security archive, the URIs those of the machine's own Debian sources) and makes the lists,
/// cache and empty dpkg status it points to. The machine's apt.conf.d (proxies, say) still
/// applies; its sources, pins, lists, cache, dpkg status and architectures do not.
pub fn apt_options(dir: &Path, suites: &[&str], arch: &str) -> Result<Vec<String>> {
    let empty = dir.join("empty");
    for d in [empty.clone(), dir.join("lists/partial"), dir.join("cache/archives/partial")] {
        fs::create_dir_all(&d)?;
    }
    let status = dir.join("status");
    if !status.exists() {
        fs::write(&status, "")?;
    }
    let (uri, security_uri, signed_by) = machine_debian_uris();
    let mut list = String::new();
    for suite in suites {
        let uri = if suite.ends_with("-security") { &security_uri } else { &uri };
        let signed = signed_by.as_ref().map(|k| format!("[signed-by={k}] ")).unwrap_or_default();
        list.push_str(&format!("deb {signed}{uri} {suite} main\n"));
    }
    let sources = dir.join("sources.list");
    if fs::read_to_string(&sources).ok().as_deref() != Some(list.as_str()) {
        fs::write(&sources, &list)?;
    }
    let d = |p: &Path| p.display().to_string();
    let options = [
        format!("Dir::Etc::SourceList={}", d(&sources)),
        format!("Dir::Etc::SourceParts={}", d(&empty)),
        format!("Dir::Etc::PreferencesParts={}", d(&empty)),
        format!("Dir::Etc::Preferences={}", d(&empty.join("preferences"))),
        format!("Dir::State::Lists={}", d(&dir.join("lists"))),
        format!("Dir::Cache={}", d(&dir.join("cache"))),
        format!("Dir::State::status={}", d(&status)),
        format!("APT::Architecture={arch}"),
        // `::=` makes a list: this architecture alone, whatever dpkg has.
        format!("APT::Architectures::={arch}"),
        // apt-get download would otherwise drop to _apt, which cannot write into the work dir.
        "APT::Sandbox::User=root".to_owned(),
        "Acquire::Languages=none".to_owned(),
        // appstream's metadata (50appstream, where installed) is of no use here.
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
    ];
    Ok(options.into_iter().flat_map(|o| ["-o".to_owned(), o]).collect())
}

/// A private apt under `work/apt-<first suite>-<arch>`.
struct PrivateApt {
    dir: PathBuf,
    options: Vec<String>,
}

impl PrivateApt {
    fn new(work: &Path, suites: &[&str], arch: &str) -> Result<Self> {
        if crate::which("apt-get").is_none() {
            bail!("apt-get is needed to fetch Debian's {arch} packages ({})", suites.join(", "));
        }
        let dir = work.join(format!("apt-{}-{arch}", suites[0]));
        let options = apt_options(&dir, suites, arch)?;
        fs::create_dir_all(dir.join("debs"))?;
        Ok(PrivateApt { dir, options })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(&self.options);
        cmd
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists"))
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("_Packages")))
            .unwrap_or(false)
    }

    fn update(&self) -> Result<()> {
        println!("xtask: updating the package lists of {}", self.dir.display());
        run(self.command("apt-get").args(["update", "-qq"]))
    }

    fn ensure_lists(&self) -> Result<()> {
        if self.has_lists() {
            return Ok(());
        }
        self.update()
    }

    /// Package names matching `pattern` (apt-cache's regular expression), newest first.
    fn search(&self, pattern: &str) -> Vec<String> {
        let found = output(self.command("apt-cache").args(["search", "--names-only", pattern])).unwrap_or_default();
        let mut names: Vec<String> =
            found.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
        names.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
        names
    }

    /// Downloads `packages` into debs/ with one apt-get; false (apt has said why) when one of
    /// them did not download.
    fn download(&self, packages: &[&str]) -> bool {
        let debs = self.dir.join("debs");
        for package in packages {
            println!("xtask: downloading {package} into {}", debs.display());
        }
        self.command("apt-get")
            .args(["download", "-qq"])
            .args(packages)
            .current_dir(&debs)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Downloads every package of `packages`, refreshing the lists once when one does not
    /// download (an index older than the registry names versions it no longer has).
    fn download_all(&self, packages: &[&str]) -> Result<()> {
        let refreshed = !self.has_lists();
        self.ensure_lists()?;
        if self.download(packages) {
            return Ok(());
        }
        let missing: Vec<&str> = packages.iter().copied().filter(|p| self.deb(p).is_none()).collect();
        if !refreshed && !missing.is_empty() {
            self.update()?;
            if self.download(&missing) {
                return Ok(());
            }
        }
        let missing: Vec<&str> = packages.iter().copied().filter(|p| self.deb(p).is_none()).collect();
        if !missing.is_empty() {
            bail!("could not download {} with the private apt in {}", missing.join(", "), self.dir.display());
        }
        Ok(())
    }

    /// `packages` and the library packages they depend on, transitively, downloaded into debs/
    /// (what is there already is reused); returns all their names.
    fn download_with_libraries(&self, packages: &[&str]) -> Result<Vec<String>> {
        let mut wanted: Vec<String> = Vec::new();
        for p in packages {
            if !wanted.iter().any(|w| w == p) {
                wanted.push((*p).to_owned());
            }
        }
        let mut done = 0;
        while done < wanted.len() {
            let batch: Vec<&str> =
                wanted[done..].iter().map(String::as_str).filter(|p| self.deb(p).is_none()).collect();
            if !batch.is_empty() {
                self.download_all(&batch)?;
            }
            let end = wanted.len();
            for i in done..end {
                let deb =
                    self.deb(&wanted[i]).with_context(|| format!("apt-get download {} left no .deb", wanted[i]))?;
                for dep in library_depends(&deb)? {
                    if !wanted.contains(&dep) {
                        wanted.push(dep);
                    }
                }
            }
            done = end;
        }
        Ok(wanted)
    }

    /// The newest .deb of `package` in debs/.
    fn deb(&self, package: &str) -> Option<PathBuf> {
        let prefix = format!("{package}_");
        fs::read_dir(self.dir.join("debs"))
            .ok()?
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&prefix) && n.ends_with(".deb")
            })
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
    }
}

/// The library packages (`lib*`, `zlib1g`) a .deb's `Depends` and `Pre-Depends` name; of
/// alternatives, the first.
fn library_depends(deb: &Path) -> Result<Vec<String>> {
    let fields = output(Command::new("dpkg-deb").arg("-f").arg(deb).args(["Depends", "Pre-Depends"]))
        .with_context(|| format!("dpkg-deb -f {}", deb.display()))?;
    Ok(parse_library_depends(&fields))
}

/// See [`library_depends`]: `fields` as `dpkg-deb -f DEB Depends Pre-Depends` prints them.
fn parse_library_depends(fields: &str) -> Vec<String> {
    let unfolded = fields.replace("\n ", " ");
    let mut libs = Vec::new();
    for line in unfolded.lines() {
        let Some((_, value)) = line.split_once(": ") else { continue };
        for group in value.split(',') {
            let first = group.split('|').next().unwrap_or_default();
            let name = first.split(['(', ' ', ':']).find(|w| !w.is_empty()).unwrap_or_default();
            if (name.starts_with("lib") || name == "zlib1g") && !libs.iter().any(|l| l == name) {
                libs.push(name.to_owned());
            }
        }
    }
    libs
}

/// A kernel package from `apt`: one already unpacked under `work` (newest first), else the
/// newest in the index that downloads (refreshing the index once when none does).
fn kernel(work: &Path, apt: &PrivateApt, pattern: &str, matches: &dyn Fn(&str) -> bool) -> Result<PathBuf> {
    let mut unpacked: Vec<String> = fs::read_dir(work)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| matches(n) && work.join(n).join("boot").is_dir())
        .collect();
    unpacked.sort_by_key(|n| version_key(n));
    if let Some(package) = unpacked.pop() {
        return Ok(work.join(package));
    }
    let mut updated = !apt.has_lists();
    apt.ensure_lists()?;
    loop {
        let candidates: Vec<String> = apt.search(pattern).into_iter().filter(|n| matches(n)).collect();
        for package in &candidates {
            if apt.deb(package).is_some() || apt.download(&[package.as_str()]) {
                let deb = apt.deb(package).with_context(|| format!("apt-get download {package} left no .deb"))?;
                return unpack(work, package, &deb);
            }
            println!("xtask: {package} did not download; trying the next older one");
        }
        if updated {
            bail!("no package matching {pattern} downloads (private apt in {})", apt.dir.display());
        }
        updated = true;
        apt.update()?;
    }
}

/// Unpacks `deb` into `work/<package>`, whole or not at all.
fn unpack(work: &Path, package: &str, deb: &Path) -> Result<PathBuf> {
    let root = work.join(package);
    let partial = work.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&partial))?;
    fs::rename(&partial, &root).with_context(|| format!("rename {} to {}", partial.display(), root.display()))?;
    Ok(root)
}

/// `boot/<prefix>*` of an unpacked kernel package.
fn boot_file(package_root: &Path, prefix: &str) -> Result<PathBuf> {
    fs::read_dir(package_root.join("boot"))
        .with_context(|| format!("{} has no boot/", package_root.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .with_context(|| format!("no boot/{prefix}* in {}", package_root.display()))
}

/// Writes `boot/Image-<version>` from a gzipped `boot/vmlinuz-<version>`; nothing for a plain one.
fn gunzip_vmlinuz(package_root: &Path) -> Result<()> {
    let vmlinuz = boot_file(package_root, "vmlinuz-")?;
    let mut magic = [0u8; 2];
    fs::File::open(&vmlinuz)?.read_exact(&mut magic)?;
    if magic != [0x1f, 0x8b] {
        return Ok(());
    }
    let image = image_path(&vmlinuz);
    if image.is_file() {
        return Ok(()); // decompressed before
    }
    let out = Command::new("gzip").arg("-dc").arg(&vmlinuz).output().context("run gzip")?;
    if !out.status.success() {
        bail!("gzip -dc {} failed", vmlinuz.display());
    }
    let partial = image.with_extension("partial");
    fs::write(&partial, out.stdout)?;
    fs::rename(&partial, &image)?;
    Ok(())
}

/// The URIs of the machine's Debian sources: (archive, security archive, keyring). Read from
/// /etc/apt/sources.list and sources.list.d (one-line `.list` and deb822 `.sources` files);
/// deb.debian.org when the machine names none.
fn machine_debian_uris() -> (String, String, Option<String>) {
    let mut entries = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else { continue };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(deb822_entries(&text)),
            Some("list") => entries.extend(one_line_entries(&text)),
            _ => {}
        }
    }
    let debian = |suite: &str| {
        let base = suite.split(['-', '/']).next().unwrap_or_default();
        DEBIAN_CODENAMES.contains(&base)
    };
    let security = |suite: &str| suite.ends_with("-security") || suite.ends_with("/updates");
    let main = entries.iter().find(|e| e.suites.iter().any(|s| debian(s) && !security(s)));
    let sec = entries.iter().find(|e| e.suites.iter().any(|s| debian(s) && security(s)));
    let uri = main.map_or(DEFAULT_URI.to_owned(), |e| e.uri.clone());
    let security_uri = match sec {
        Some(e) => e.uri.clone(),
        None if uri.ends_with("/debian") => format!("{uri}-security"),
        None => DEFAULT_SECURITY_URI.to_owned(),
    };
    // Debian's keyring holds every supported release's keys (a machine's entry may name one that
    // holds only its own release's).
    let signed_by = Path::new(DEBIAN_KEYRING)
        .is_file()
        .then(|| DEBIAN_KEYRING.to_owned())
        .or_else(|| main.and_then(|e| e.signed_by.clone()));
    (uri.trim_end_matches('/').to_owned(), security_uri.trim_end_matches('/').to_owned(), signed_by)
}

/// One `deb` source of the machine's (the first URI of an entry).
struct SourceEntry {
    uri: String,
    suites: Vec<String>,
    /// A keyring file (inline keys are not carried over).
    signed_by: Option<String>,
}

fn one_line_entries(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else { continue };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else { continue };
            signed_by = opts.split_whitespace().find_map(|o| o.strip_prefix("signed-by=")).map(str::to_owned);
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            entries.push(SourceEntry { uri: uri.to_owned(), suites: vec![suite.to_owned()], signed_by });
        }
    }
    entries
}

fn deb822_entries(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for paragraph in text.split("\n\n") {
        let field = |name: &str| {
            let mut value: Option<String> = None;
            for line in paragraph.lines().filter(|l| !l.starts_with('#')) {
                if line.starts_with([' ', '\t']) {
                    continue; // a continuation line (an inline key)
                }
                if let Some((key, v)) = line.split_once(':') {
                    if key.trim().eq_ignore_ascii_case(name) {
                        value = Some(v.trim().to_owned());
                    }
                }
            }
            value
        };
        let types = field("Types").unwrap_or_default();
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else { continue };
        if !enabled || !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let Some(uri) = uris.split_whitespace().next() else { continue };
        // A keyring path, not an inline key (whose first line is empty or "-----BEGIN").
        let signed_by = field("Signed-By").filter(|k| k.starts_with('/'));
        entries.push(SourceEntry {
            uri: uri.to_owned(),
            suites: suites.split_whitespace().map(str::to_owned).collect(),
            signed_by,
        });
    }
    entries
}

/// Libraries the ELF programs in the sysroot's bin/, sbin/, usr/bin/ and usr/sbin/ need,
/// directly or through other libraries, that the sysroot does not have: "lib (for program)".
fn unresolved_libraries(sysroot: &Path, triplet: &str) -> Result<Vec<String>> {
    let lib_dirs = [format!("lib/{triplet}"), format!("usr/lib/{triplet}"), "lib".to_owned(), "usr/lib".to_owned()];
    let find =
        |name: &str| lib_dirs.iter().map(|d| sysroot.join(d).join(name)).find(|p| in_sysroot(sysroot, p).is_some());
    let mut queue: VecDeque<(PathBuf, String)> = VecDeque::new();
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin"] {
        for entry in fs::read_dir(sysroot.join(dir)).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_file()) && is_elf(&path) {
                let name = format!("/{}", path.strip_prefix(sysroot).unwrap_or(&path).display());
                queue.push_back((path, name));
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    while let Some((path, program)) = queue.pop_front() {
        for lib in needed(&path)? {
            if !seen.insert(lib.clone()) {
                continue;
            }
            match find(&lib).and_then(|p| in_sysroot(sysroot, &p)) {
                Some(real) => queue.push_back((real, program.clone())),
                None => missing.push(format!("{lib} (for {program})")),
            }
        }
    }
    Ok(missing)
}

/// The regular file `path` leads to, following symbolic links inside the sysroot (an absolute
/// link target is taken relative to it, as the guest will see it).
fn in_sysroot(sysroot: &Path, path: &Path) -> Option<PathBuf> {
    let mut path = path.to_owned();
    for _ in 0..16 {
        let meta = fs::symlink_metadata(&path).ok()?;
        if meta.is_file() {
            return Some(path);
        }
        if !meta.file_type().is_symlink() {
            return None;
        }
        let target = fs::read_link(&path).ok()?;
        path = match target.strip_prefix("/") {
            Ok(relative) => sysroot.join(relative),
            Err(_) => path.parent()?.join(target),
        };
    }
    None
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"\x7fELF"
}

/// An ELF file's `NEEDED` entries, from `readelf -d` (binutils reads every architecture's ELF).
fn needed(path: &Path) -> Result<Vec<String>> {
    let dynamic = output(Command::new("readelf").arg("-d").arg(path))
        .with_context(|| format!("readelf -d {}", path.display()))?;
    Ok(dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .collect())
}

/// Numeric parts of a package name, so that 6.12.117 sorts after 6.12.99 and 6.1.0-57.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_source_formats() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let e = deb822_entries(deb822);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].uri, "http://deb.debian.org/debian");
        assert_eq!(e[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(e[0].signed_by.as_deref(), Some("/usr/share/keyrings/debian-archive-keyring.gpg"));
        assert_eq!(e[1].suites, ["bookworm-security"]);
        let list =
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror/debian bookworm main\ndeb-src http://x y z\n";
        let e = one_line_entries(list);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].uri.as_str(), e[0].suites[0].as_str()), ("http://mirror/debian", "bookworm"));
        assert_eq!(e[0].signed_by.as_deref(), Some("/k.gpg"));
    }

    #[test]
    fn library_depends_of_a_control_file() {
        let fields = "Depends: debconf (>= 0.5) | debconf-2.0, libbpf1 (>= 1:0.6.0), libc6 (>= 2.34),\n libcap2-bin, zlib1g (>= 1:1.1.4), nginx-common (>= 1.22), libssl3 | libssl1.1, libc6:any\nPre-Depends: libc6 (>= 2.36)\n";
        assert_eq!(parse_library_depends(fields), ["libbpf1", "libc6", "libcap2-bin", "zlib1g", "libssl3"]);
    }

    #[test]
    fn newest_kernel_sorts_first() {
        let mut names = [
            "linux-image-6.1.0-57-cloud-arm64",
            "linux-image-6.12.99+deb12-cloud-arm64",
            "linux-image-6.12.117+deb12-cloud-arm64",
        ];
        names.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
        assert_eq!(names[0], "linux-image-6.12.117+deb12-cloud-arm64");
        assert_eq!(names[2], "linux-image-6.1.0-57-cloud-arm64");
    }

    #[test]
    fn gzipped_vmlinuz_gets_an_image_beside_it() {
        let root = std::env::temp_dir().join(format!("toa-xtask-gunzip-{}", std::process::id()));
        let boot = root.join("boot");
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join("vmlinuz-9.9"), b"ARMd image").unwrap();
        run(Command::new("gzip").arg("-n").arg(boot.join("vmlinuz-9.9"))).unwrap();
        fs::rename(boot.join("vmlinuz-9.9.gz"), boot.join("vmlinuz-9.9")).unwrap();
        gunzip_vmlinuz(&root).unwrap();
        assert_eq!(arm64_image(&root).unwrap(), boot.join("Image-9.9"));
        assert_eq!(fs::read(boot.join("Image-9.9")).unwrap(), b"ARMd image");
        gunzip_vmlinuz(&root).unwrap(); // again: nothing to do
        fs::remove_dir_all(&root).unwrap();
    }
}
