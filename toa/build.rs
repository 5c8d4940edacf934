//! Builds the eBPF programs (crate `toa-ebpf`) for the bpf target and leaves the objects in
//! OUT_DIR, where `src/programs.rs` embeds them.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../toa-ebpf");
    println!("cargo:rerun-if-changed=../toa-common/src");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        // Host-only builds (e.g. clippy of the CLI): embed empty objects.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        for name in ["toa", "toa-probe"] {
            std::fs::write(out.join(name), [])?;
        }
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: "toa-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom("stable"),
    )
}
