//! The `toa` command: load, inspect and unload the TOA agent, and probe a backend. The command
//! line is in `cli/`, one file per command; everything it does is in the `toa` library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
