//! `toa unload`: remove what either mode left loaded.

use toa::{Backend, Places};

/// Detach the agent and remove everything it pinned (or stop the userspace reader).
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, places: &Places) -> anyhow::Result<()> {
    let [ebpf, user] = Backend::both(places);
    println!("{}", said(ebpf.unload()?, user.unload()?));
    Ok(())
}

/// What to say, from what each mode had loaded (eBPF, userspace).
fn said(ebpf: bool, userspace: bool) -> &'static str {
    match (ebpf, userspace) {
        (false, false) => "toa was not loaded; nothing to do",
        (true, _) => "toa unloaded",
        (false, true) => "toa unloaded (userspace mode)",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn says_which_mode_it_unloaded() {
        assert_eq!(super::said(false, false), "toa was not loaded; nothing to do");
        assert_eq!(super::said(true, false), "toa unloaded");
        assert_eq!(super::said(false, true), "toa unloaded (userspace mode)");
    }
}
