//! `toa doctor`: what the mode `toa load` would pick needs, and how to fix what is missing.

use toa::{doctor::Check, Places};

use super::flags::Output;

/// Check whether `toa load` can work on this host, and say how to fix what is missing.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
}

pub fn run(args: Args, places: &Places) -> anyhow::Result<()> {
    let checks = toa::doctor::run(&places.pin_dir);
    args.output.print(&checks, |checks| print!("{}", render(checks)))?;
    if checks.iter().any(|c| !c.ok) {
        anyhow::bail!("some checks failed: toa load would not work here (fixes above)");
    }
    Ok(())
}

/// A check a line, then its fix under it when it failed.
fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!("{:<5} {:<15} {}\n", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<21} fix: {fix}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_prints_its_fix_under_it() {
        let checks = [
            Check { name: "kernel", ok: true, detail: "6.1".into(), fix: None },
            Check { name: "privileges", ok: false, detail: "missing CAP_BPF".into(), fix: Some("run as root".into()) },
        ];
        assert_eq!(
            render(&checks),
            "ok    kernel          6.1\nFAIL  privileges      missing CAP_BPF\n                      fix: run as root\n"
        );
    }
}
