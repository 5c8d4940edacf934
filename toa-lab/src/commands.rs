//! The binaries the tests run: toa, the examples, libtoa.so, and which balancer a kernel gets.

use super::*;

/// The addresses the probe's connections come from: the client namespace's own, or the
/// balancer's where the probe speaks TCP itself.
pub fn probe_sources() -> (&'static str, &'static str) {
    if kernel_has_writer() {
        (CLIENT_V4, CLIENT_V6)
    } else {
        (BALANCER_V4, BALANCER_V6)
    }
}

/// Whether this kernel can run the probe's eBPF writer (sock_ops header options, 5.10).
/// `TOA_TEST_RAW_PROBE=1` takes the older kernels' path on any kernel.
pub fn kernel_has_writer() -> bool {
    if std::env::var_os("TOA_TEST_RAW_PROBE").is_some_and(|v| v == "1") {
        return false;
    }
    toa::system::parse_release(&toa::system::kernel_release()).is_some_and(|v| v >= (5, 10))
}

/// The `toa` binary cargo built beside the test (or benchmark) binary that runs: the path of
/// `CARGO_BIN_EXE_toa`, which cargo gives only the test crates themselves
/// (target/<profile>/deps/e2e-… → target/<profile>/toa; the kernel matrix keeps that layout).
pub fn toa_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let path = exe.parent().and_then(Path::parent).expect("target dir").join("toa");
    assert!(path.exists(), "{} missing: build it first (`cargo build --bins`; `cargo test` does)", path.display());
    path
}

/// libtoa.so, built by `cargo xtask test` (`TOA_LIBTOA` may name another).
pub fn libtoa() -> PathBuf {
    if let Some(path) = std::env::var_os("TOA_LIBTOA") {
        return PathBuf::from(path);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let path = root.join("target/release/libtoa.so");
    assert!(
        path.exists(),
        "{} missing: build it first (`cargo build --release --manifest-path libtoa/Cargo.toml --target-dir target`; \
         `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Path of an example binary built by `cargo test` next to the test binaries, or in
/// `TOA_EXAMPLES_DIR` (the kernel matrix runs static test binaries with dynamically linked
/// examples: libtoa.so can only be preloaded into those).
pub fn example_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TOA_EXAMPLES_DIR") {
        Some(dir) => PathBuf::from(dir),
        // target/<profile>/deps/e2e-… → target/<profile>/examples/<name>
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent().and_then(Path::parent).expect("target dir").join("examples")
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} missing: build it first (`cargo build --examples`; `cargo xtask test` does)",
        path.display()
    );
    path
}
