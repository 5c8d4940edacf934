//! `toa man DIR` (hidden): writes the manual pages, `toa(8)` and one per command
//! (`toa-load(8)`, …), as the packages install them. Generated from the command line itself
//! (clap_mangen), so they cannot drift from `--help`.

use std::path::{Path, PathBuf};

/// Write the manual pages into a directory.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write toa.8, toa-load.8, …
    dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for page in write(&args.dir)? {
        println!("{}", page.display());
    }
    Ok(())
}

/// Section 8: system administration commands (it runs as root and loads into the kernel).
fn write(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cli = super::visible_command().disable_help_subcommand(true);
    cli.build();
    let mut written = Vec::new();
    for command in std::iter::once(cli.clone()).chain(cli.get_subcommands().cloned()) {
        let page = clap_mangen::Man::new(command).section("8").manual("toa");
        written.push(page.generate_to(dir)?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_page_per_command_in_section_8() {
        let dir = std::env::temp_dir().join(format!("toa-man-test-{}", std::process::id()));
        let pages = super::write(&dir).unwrap();
        let names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for name in ["toa.8", "toa-load.8", "toa-run.8", "toa-unload.8", "toa-doctor.8", "toa-completions.8"] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("reader") || n.contains("toa-man")), "{names:?}");
        let load = std::fs::read_to_string(dir.join("toa-load.8")).unwrap();
        assert!(load.starts_with(".ie") || load.contains(".TH toa-load 8"), "{load}");
        assert!(load.contains("table\\-group"), "{load}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
