//! Cleanup that reports instead of swallowing: what a guard could not undo goes to stderr.

use super::*;

/// Says on stderr what a guard could not undo (a panic in `drop` would hide the test's own
/// failure, or abort while unwinding); the before-stop check and the next run see the rest.
pub fn report_cleanup<T, E: std::fmt::Display>(what: impl std::fmt::Display, result: Result<T, E>) {
    if let Err(e) = result {
        eprintln!("test cleanup: {what}: {e}");
    }
}

/// Whether a command ran and exited 0 (its stderr otherwise).
pub fn succeeded(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(e.to_string()),
    }
}

/// A directory that is already gone is not a failure.
pub fn removed(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
