//! `toa completions SHELL`: the shell completion script, on stdout (packages install it; by
//! hand: `toa completions bash > /etc/bash_completion.d/toa`).

/// Print the completion script for a shell.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    std::io::Write::write_all(&mut std::io::stdout(), &script(args.shell))?;
    Ok(())
}

fn script(shell: Shell) -> Vec<u8> {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut super::visible_command(), "toa", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_completes_the_commands_but_not_the_hidden_ones() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).unwrap();
            for command in ["load", "run", "unload", "status", "stats", "conns", "doctor", "probe", "completions"] {
                assert!(text.contains(command), "{shell:?} lacks {command}");
            }
            assert!(text.contains("table-group"), "{shell:?} lacks the flags");
            assert!(!text.contains("userspace-reader"), "{shell:?} offers the hidden reader");
        }
    }
}
