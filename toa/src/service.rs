//! `toa run`: the agent as a service. Loads (or adopts what is already loaded), serves metrics
//! and health over HTTP, reloads its configuration on SIGHUP, and on SIGTERM unloads, or with
//! `keep_loaded` leaves the programs attached so that a restart loses no client address.

use std::{
    path::PathBuf,
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
    logging, metrics,
    userspace::Mode,
    Agent, Error, LoadOptions, Userspace,
};

/// Runs until SIGTERM or SIGINT.
pub fn run(config: Option<PathBuf>, flags: Overrides) -> Result<(), Error> {
    let path = config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    let mut settings = Settings::merge(&ConfigFile::read(&path, config.is_some())?, &flags);
    logging::init(settings.log_format);

    // Bind first: a taken or invalid address fails before anything is attached.
    let server = tiny_http::Server::http(settings.metrics)
        .map_err(|e| Error::Metrics { addr: settings.metrics, detail: e.to_string() })?;
    let server = Arc::new(server);
    let signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    if settings.mode.resolve() == Mode::Userspace {
        return run_userspace(settings, server, signals, &path, config.is_some(), &flags);
    }

    let agent = Agent::new(&settings.pin_dir);
    let options = LoadOptions {
        cgroup: settings.cgroup.clone(),
        pin_dir: settings.pin_dir.clone(),
        policy: settings.policy.clone(),
    };
    let loaded = agent.load(&options)?;
    if loaded.status.spoofable {
        warn!("no trust list: any client that reaches this host can claim any address (set trust)");
    }
    let cgroup = loaded.status.cgroup.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let loaded = if loaded.load_time_ms.is_some() {
        info!(cgroup, load_time_ms = loaded.load_time_ms, "toa loaded");
        loaded
    } else {
        // Already pinned (a restart, an upgrade): run this binary's programs on the same maps,
        // so open connections keep their client and the new code takes over.
        let upgraded = agent.upgrade()?;
        info!(cgroup, load_time_ms = upgraded.load_time_ms, "toa loaded (programs replaced in place, maps kept)");
        upgraded
    };
    if !loaded.status.programs.is_empty() {
        let ids: Vec<u32> = loaded.status.programs.iter().map(|p| p.id).collect();
        info!(?ids, metrics = %settings.metrics, "serving metrics on http://{}/metrics", settings.metrics);
    }

    let ready = Arc::new(AtomicBool::new(true));
    let http = spawn_http(&server, metrics::Source::Ebpf(settings.pin_dir.clone()), &ready);

    let mut signals = signals;
    for signal in signals.forever() {
        if signal == SIGHUP {
            match reload(&agent, &path, config.is_some(), &flags, &settings) {
                Ok(new) => settings = new,
                Err(e) => error!("configuration not reloaded, keeping the previous one: {e}"),
            }
            continue;
        }
        ready.store(false, Ordering::SeqCst);
        if settings.keep_loaded {
            info!("stopping; the programs stay attached (keep_loaded)");
        } else {
            agent.unload()?;
            info!("toa unloaded");
        }
        break;
    }
    server.unblock();
    let _ = http.join();
    Ok(())
}

fn reload(
    agent: &Agent,
    path: &std::path::Path,
    required: bool,
    flags: &Overrides,
    old: &Settings,
) -> Result<Settings, Error> {
    let new = Settings::merge(&ConfigFile::read(path, required)?, flags);
    if new.pin_dir != old.pin_dir || new.metrics != old.metrics || new.log_format != old.log_format {
        warn!("pin_dir, metrics and log_format take effect at the next start");
    }
    new.policy.validate().map_err(|detail| Error::Policy { detail })?;
    if new.cgroup != old.cgroup {
        let moved = agent.relocate(new.cgroup.as_deref())?;
        let cgroup = moved.status.cgroup.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        info!(cgroup, "moved to another cgroup; open connections keep their client");
    }
    if new.policy != old.policy {
        agent.apply_policy(&new.policy)?;
        info!(policy = ?new.policy, "new policy applies to new connections; open ones keep their client");
    }
    info!(keep_loaded = new.keep_loaded, "configuration reloaded");
    Ok(Settings { pin_dir: old.pin_dir.clone(), metrics: old.metrics, log_format: old.log_format, ..new })
}

/// The userspace mode as a service: the capture reader runs on a thread of this process.
fn run_userspace(
    mut settings: Settings,
    server: Arc<tiny_http::Server>,
    mut signals: Signals,
    path: &std::path::Path,
    required: bool,
    flags: &Overrides,
) -> Result<(), Error> {
    if settings.cgroup.is_some() {
        warn!("cgroup applies to the eBPF mode only; in userspace mode the preloaded applications are served");
    }
    if settings.keep_loaded {
        warn!("keep_loaded has no effect in userspace mode: the capture reader is this process");
    }
    let userspace = Userspace::new(&settings.table);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = userspace.start_in_process(&settings.policy, &settings.tuning, Arc::clone(&stop))?;
    if settings.policy.trust.is_empty() {
        warn!("no trust list: any client that reaches this host can claim any address (set trust)");
    }
    info!(
        table = %settings.table.display(),
        metrics = %settings.metrics,
        "toa loaded (userspace mode); start applications with LD_PRELOAD=libtoa.so"
    );
    let ready = Arc::new(AtomicBool::new(true));
    let http = spawn_http(&server, metrics::Source::Userspace(settings.table.clone()), &ready);
    for signal in signals.forever() {
        if signal == SIGHUP {
            let reloaded = (|| {
                let new = Settings::merge(&ConfigFile::read(path, required)?, flags);
                if new.mode != settings.mode || new.table != settings.table || new.metrics != settings.metrics {
                    warn!("mode, table and metrics take effect at the next start");
                }
                userspace.reconfigure(&new.policy, &new.tuning)?;
                info!(policy = ?new.policy, "configuration reloaded; new policy applies to new connections");
                Ok::<_, Error>(Settings {
                    mode: settings.mode,
                    table: settings.table.clone(),
                    metrics: settings.metrics,
                    ..new
                })
            })();
            match reloaded {
                Ok(new) => settings = new,
                Err(e) => error!("configuration not reloaded, keeping the previous one: {e}"),
            }
            continue;
        }
        ready.store(false, Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        match reader.join() {
            Ok(Ok(())) => info!("toa unloaded"),
            Ok(Err(e)) => error!("the capture reader failed: {e}"),
            Err(_) => error!("the capture reader panicked"),
        }
        break;
    }
    server.unblock();
    let _ = http.join();
    Ok(())
}

/// The HTTP endpoint's thread.
fn spawn_http(
    server: &Arc<tiny_http::Server>,
    source: metrics::Source,
    ready: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (server, ready) = (Arc::clone(server), Arc::clone(ready));
    std::thread::spawn(move || serve(&server, source, &ready))
}

/// `/metrics`, `/healthz` (programs attached), `/readyz` (loaded and not stopping).
fn serve(server: &tiny_http::Server, source: metrics::Source, ready: &AtomicBool) {
    let registry = metrics::registry(source.clone());
    for request in server.incoming_requests() {
        let (code, body, content_type) = match request.url() {
            "/metrics" => {
                (200, metrics::render(&registry), "application/openmetrics-text; version=1.0.0; charset=utf-8")
            }
            "/healthz" if source.is_up() => (200, "ok\n".to_owned(), "text/plain"),
            "/healthz" => (503, "programs not attached\n".to_owned(), "text/plain"),
            "/readyz" if ready.load(Ordering::SeqCst) && source.is_up() => (200, "ok\n".to_owned(), "text/plain"),
            "/readyz" => (503, "not ready\n".to_owned(), "text/plain"),
            _ => (404, "try /metrics, /healthz or /readyz\n".to_owned(), "text/plain"),
        };
        let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid literal header");
        let _ = request.respond(tiny_http::Response::from_string(body).with_status_code(code).with_header(header));
    }
}
