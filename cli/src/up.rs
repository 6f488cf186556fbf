//! `dagfleet up`: the whole stack on one machine.

use anyhow::{Context, Result};
use dagfleet_coordinator::{Coordinator, CoordinatorConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::{Child, Command};
use tracing::info;

use crate::config::Config;
use crate::{connect, progress, roles, shutdown_signal};

/// Coordinator settings from the config.
pub fn coordinator_config(cfg: &Config) -> CoordinatorConfig {
    CoordinatorConfig {
        reconcile_every: cfg.coordinator.reconcile_every,
        dispatch_lease: cfg.coordinator.dispatch_lease,
        lane_wait: cfg.coordinator.lane_wait,
        resync_after: cfg.coordinator.resync_after,
        sweep_every: cfg.coordinator.sweep_every,
        caps: cfg.caps.clone(),
        ..Default::default()
    }
}

/// Host and port of a `nats://host:port` URL when the host is this machine.
fn local_port(url: &str) -> Option<u16> {
    let first = url.split(',').next()?.trim();
    let rest = first.strip_prefix("nats://").unwrap_or(first);
    let rest = rest.rsplit('@').next()?;
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "4222"));
    let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0");
    local
        .then(|| port.trim_end_matches('/').parse().ok())
        .flatten()
}

/// Starts `nats-server -js` with its store under `dir` when nothing answers at the configured
/// URL. Returns the child, killed on drop.
pub async fn ensure_nats(cfg: &Config, dir: &Path) -> Result<Option<Child>> {
    let mut probe = cfg.nats.clone();
    probe.connect_timeout = Duration::from_secs(1);
    let why = match dagfleet_runtime::bus::connect(&probe, "dagfleet-probe").await {
        Ok(_) => {
            info!(url = %dagfleet_runtime::bus::redact_url(&cfg.nats.url), "using the NATS server already running");
            return Ok(None);
        }
        Err(e) => e,
    };
    let Some(port) = local_port(&cfg.nats.url) else {
        anyhow::bail!(
            "no NATS server answers at {} ({why}) and it is not on this machine, so `dagfleet up` cannot start one",
            dagfleet_runtime::bus::redact_url(&cfg.nats.url)
        );
    };
    let store_dir = dir.join("nats");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("creating {}", store_dir.display()))?;
    let child = Command::new(&cfg.up.nats_server)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting `{}` (install it: `apt-get install nats-server` on Debian/Ubuntu, `brew install nats-server` on a Mac, or set up.nats_server)",
                cfg.up.nats_server
            )
        })?;
    let mut wait = cfg.nats.clone();
    wait.connect_timeout = Duration::from_secs(1);
    for _ in 0..50 {
        if dagfleet_runtime::bus::connect(&wait, "dagfleet-probe")
            .await
            .is_ok()
        {
            info!(port, store = %store_dir.display(), "started nats-server");
            return Ok(Some(child));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("started nats-server on port {port}, but it did not answer within 10s")
}

/// Runs the stack until Ctrl-C, or until the run given with `--run` ends.
pub async fn up(mut cfg: Config, run: Option<PathBuf>) -> Result<std::process::ExitCode> {
    // A spec that would be refused is refused before anything starts.
    let text = run
        .as_deref()
        .map(|spec| crate::read_spec(spec, &cfg))
        .transpose()?;
    let dir = PathBuf::from(&cfg.up.data_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating up.data_dir {}", dir.display()))?;
    if cfg.store.url == dagfleet_runtime::StoreConfig::default().url {
        cfg.store.url = dir.join("artifacts").to_string_lossy().into_owned();
    }
    let _nats = ensure_nats(&cfg, &dir).await?;
    let bus = connect(&cfg, "dagfleet-up").await?;
    let store = cfg.open_store()?;
    let shutdown = shutdown_signal();

    let mut tasks = tokio::task::JoinSet::new();
    {
        let c = Coordinator::new(bus.clone(), store.clone(), coordinator_config(&cfg));
        let s = shutdown.clone();
        tasks.spawn(async move { c.run(s).await.map_err(anyhow::Error::from) });
    }
    let wanted = if cfg.up.roles.is_empty() {
        roles::built_in()
    } else {
        cfg.up.roles.clone()
    };
    let names = wanted
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    for role in wanted {
        let (cfg, bus, store, s) = (cfg.clone(), bus.clone(), store.clone(), shutdown.clone());
        tasks.spawn(async move { roles::run_worker(role, &cfg, bus, store, s).await });
    }
    eprintln!(
        "dagfleet is up: NATS at {}, artifacts in {}, roles: {}",
        dagfleet_runtime::bus::redact_url(&cfg.nats.url),
        store.url(),
        names
    );

    let code = match text {
        Some(text) => {
            let run = dagfleet_coordinator::submit(&bus, &store, &text, &cfg.caps).await?;
            println!("submitted run {run}");
            let code = progress::follow(&bus, &run, &shutdown).await?;
            progress::print_outputs(&store, &run).await;
            println!("manifest: {}/runs/{run}/manifest.json", store.url());
            shutdown.cancel();
            code
        }
        None => {
            eprintln!("submit a run with `dagfleet run SPEC.toml`; Ctrl-C stops the stack");
            shutdown.cancelled().await;
            std::process::ExitCode::SUCCESS
        }
    };
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "component stopped with an error");
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ports() {
        assert_eq!(local_port("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(local_port("nats://u:p@localhost:5000"), Some(5000));
        assert_eq!(local_port("nats://nats.prod:4222"), None);
    }
}
