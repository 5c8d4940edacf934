//! `toa run`: the agent as a service, in either mode. Loads (or adopts what is already loaded),
//! serves metrics and health over HTTP, reloads its configuration on SIGHUP, and on SIGTERM
//! unloads, or with `keep_loaded` leaves the eBPF programs attached (or the userspace reader
//! running) so that a restart loses no client address. The mode's differences live in [`Backend`]; this loop is the same for both.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::{error, info, warn};

use crate::{
    config::{ConfigFile, Overrides, Settings, DEFAULT_CONFIG},
    logging, metrics, Backend, Error,
};

/// Written by the packages' maintainer scripts around the restart of an upgrade: while it
/// exists, a stop leaves toa loaded whatever `keep_loaded` says, so that the new version takes
/// over the attached programs (or the reader) and no open connection loses its client. The
/// script removes it once the restart is done.
pub const KEEP_LOADED_MARKER: &str = "/run/toa/keep-loaded";

/// Whether a stop leaves toa loaded: `keep_loaded`, or an upgrade in progress.
fn keep_loaded_at_stop(settings: &Settings, marker: &Path) -> Option<&'static str> {
    if settings.keep_loaded {
        Some("keep_loaded")
    } else if marker.exists() {
        Some("a package upgrade is restarting toa")
    } else {
        None
    }
}

/// Runs until SIGTERM or SIGINT.
pub fn run(config: Option<PathBuf>, flags: Overrides) -> Result<(), Error> {
    let path = config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    let required = config.is_some();
    let mut settings = Settings::merge(&ConfigFile::read(&path, required)?, &flags);
    logging::init(settings.log_format);

    // Bind first: a taken or invalid address fails before anything is attached.
    let server = tiny_http::Server::http(settings.metrics)
        .map_err(|e| Error::Metrics { addr: settings.metrics, detail: e.to_string() })?;
    let server = Arc::new(server);
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;

    let backend = Backend::new(settings.mode, &settings.places());
    let serving = backend.serve(&settings.request())?;
    announce(&serving, &settings);

    let ready = Arc::new(AtomicBool::new(true));
    let http = spawn_http(&server, backend.clone(), &ready);
    for signal in signals.forever() {
        if signal == SIGHUP {
            match reload(&backend, &path, required, &flags, &settings) {
                Ok(new) => settings = new,
                Err(e) => error!("configuration not reloaded, keeping the previous one: {e}"),
            }
            continue;
        }
        ready.store(false, Ordering::SeqCst);
        let keep = keep_loaded_at_stop(&settings, Path::new(KEEP_LOADED_MARKER));
        if let Some(why) = keep {
            info!("stopping; toa stays loaded for the next start ({why})");
        }
        let stopped = serving.stop(keep.is_some());
        server.unblock();
        let _ = http.join();
        if stopped? {
            info!("toa unloaded");
        }
        return Ok(());
    }
    server.unblock();
    let _ = http.join();
    Ok(())
}

/// The log lines operators look for once it serves.
fn announce(serving: &crate::Serving, settings: &Settings) {
    let status = &serving.loaded.status;
    if status.spoofable {
        warn!("no trust list: any client that reaches this host can claim any address (set trust)");
    }
    let load_time_ms = serving.loaded.load_time_ms;
    match &status.userspace {
        Some(_) => info!(
            table = %settings.table.display(),
            metrics = %settings.metrics,
            "toa loaded (userspace mode); start applications with LD_PRELOAD=libtoa.so"
        ),
        None => {
            let cgroup = status.cgroup.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            if serving.upgraded {
                info!(cgroup, load_time_ms, "toa loaded (programs replaced in place, maps kept)");
            } else {
                info!(cgroup, load_time_ms, "toa loaded");
            }
            let ids: Vec<u32> = status.programs.iter().map(|p| p.id).collect();
            info!(?ids, metrics = %settings.metrics, "serving metrics on http://{}/metrics", settings.metrics);
        }
    }
}

/// Re-reads the configuration and applies what can change while running.
fn reload(
    backend: &Backend,
    path: &std::path::Path,
    required: bool,
    flags: &Overrides,
    old: &Settings,
) -> Result<Settings, Error> {
    let new = Settings::merge(&ConfigFile::read(path, required)?, flags);
    if new.mode != old.mode
        || new.pin_dir != old.pin_dir
        || new.table != old.table
        || new.metrics != old.metrics
        || new.log_format != old.log_format
    {
        warn!("mode, pin_dir, table, metrics and log_format take effect at the next start");
    }
    new.tuning.validate().map_err(|detail| Error::Policy { detail })?;
    if let Some(moved) = backend.reconfigure(&old.request(), &new.request())? {
        let cgroup = moved.cgroup.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        info!(cgroup, "moved to another cgroup; open connections keep their client");
    }
    if new.policy != old.policy {
        info!(policy = ?new.policy, "new policy applies to new connections; open ones keep their client");
    }
    info!(keep_loaded = new.keep_loaded, "configuration reloaded");
    Ok(Settings {
        mode: old.mode,
        pin_dir: old.pin_dir.clone(),
        table: old.table.clone(),
        metrics: old.metrics,
        log_format: old.log_format,
        ..new
    })
}

/// The HTTP endpoint's thread.
fn spawn_http(
    server: &Arc<tiny_http::Server>,
    backend: Backend,
    ready: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (server, ready) = (Arc::clone(server), Arc::clone(ready));
    std::thread::spawn(move || serve(&server, backend, &ready))
}

/// `/metrics`, `/healthz` (programs attached, or the reader alive), `/readyz` (that, and not
/// stopping).
fn serve(server: &tiny_http::Server, backend: Backend, ready: &AtomicBool) {
    let registry = metrics::registry(backend.clone());
    for request in server.incoming_requests() {
        let (code, body, content_type) = match request.url() {
            "/metrics" => {
                (200, metrics::render(&registry), "application/openmetrics-text; version=1.0.0; charset=utf-8")
            }
            "/healthz" if backend.is_up() => (200, "ok\n".to_owned(), "text/plain"),
            "/healthz" => (503, "programs not attached\n".to_owned(), "text/plain"),
            "/readyz" if ready.load(Ordering::SeqCst) && backend.is_up() => (200, "ok\n".to_owned(), "text/plain"),
            "/readyz" => (503, "not ready\n".to_owned(), "text/plain"),
            _ => (404, "try /metrics, /healthz or /readyz\n".to_owned(), "text/plain"),
        };
        let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid literal header");
        let _ = request.respond(tiny_http::Response::from_string(body).with_status_code(code).with_header(header));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_keeps_toa_loaded_when_asked_or_during_an_upgrade() {
        let dir = std::env::temp_dir().join(format!("toa-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("keep-loaded");
        let unloads = Settings::merge(&ConfigFile::default(), &Overrides::default());
        let keeps =
            Settings::merge(&ConfigFile { keep_loaded: Some(true), ..Default::default() }, &Overrides::default());
        assert_eq!(keep_loaded_at_stop(&unloads, &marker), None);
        assert_eq!(keep_loaded_at_stop(&keeps, &marker), Some("keep_loaded"));
        std::fs::write(&marker, "").unwrap();
        assert_eq!(keep_loaded_at_stop(&unloads, &marker), Some("a package upgrade is restarting toa"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
