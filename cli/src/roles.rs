//! The worker roles built into this binary. Each role is a cargo feature, so a CPU image
//! never compiles the GPU roles' dependencies.

use anyhow::Result;
use dagfleet_protocol::Role;
use dagfleet_runtime::{ArtifactStore, Bus, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Roles this binary can run.
pub fn built_in() -> Vec<Role> {
    [
        #[cfg(feature = "miner")]
        Role::Miner,
        #[cfg(feature = "judge")]
        Role::Judge,
        #[cfg(feature = "synth")]
        Role::Synthesizer,
        #[cfg(feature = "inference")]
        Role::Inference,
        #[cfg(feature = "trainer")]
        Role::Trainer,
        #[cfg(feature = "noop")]
        Role::Noop,
    ]
    .into_iter()
    .collect()
}

/// The worker settings for `role` from the config.
pub fn worker_config(role: Role, cfg: &Config) -> WorkerConfig {
    let mut w = WorkerConfig::new(role);
    if let Some(id) = &cfg.worker.id {
        w.worker_id = format!("{id}-{role}");
    }
    w.concurrency = cfg.worker.concurrency;
    if role == Role::Trainer {
        // A training job takes a whole GPU (or every core): one at a time per worker.
        w.concurrency = 1;
    }
    w.shutdown_grace = cfg.worker.shutdown_grace;
    w.heartbeat_every = cfg.worker.heartbeat_every;
    w
}

/// Runs one worker of `role` until `shutdown`.
pub async fn run_worker(
    role: Role,
    cfg: &Config,
    bus: Bus,
    store: ArtifactStore,
    shutdown: CancellationToken,
) -> Result<()> {
    let wc = worker_config(role, cfg);
    match role {
        #[cfg(feature = "noop")]
        Role::Noop => {
            dagfleet_runtime::Worker::new(
                bus,
                store,
                dagfleet_noop::NoopHandler::new(cfg.caps.clone()),
                wc,
            )
            .run(shutdown)
            .await?
        }
        #[cfg(feature = "miner")]
        Role::Miner => {
            dagfleet_runtime::Worker::new(bus, store, dagfleet_miner::MinerHandler, wc)
                .run(shutdown)
                .await?
        }
        #[cfg(feature = "judge")]
        Role::Judge => {
            dagfleet_runtime::Worker::new(
                bus,
                store,
                dagfleet_judge::JudgeHandler::new(&cfg.judge).with_providers(cfg.providers.clone()),
                wc,
            )
            .run(shutdown)
            .await?
        }
        #[cfg(feature = "synth")]
        Role::Synthesizer => {
            let h = dagfleet_synth::SynthHandler::new(cfg.providers.clone());
            dagfleet_runtime::Worker::new(bus, store, h, wc)
                .run(shutdown)
                .await?
        }
        #[cfg(feature = "inference")]
        Role::Inference => {
            let h = dagfleet_inference::InferHandler::new(cfg.inference.clone())
                .map_err(anyhow::Error::msg)?;
            dagfleet_runtime::Worker::new(bus, store, h, wc)
                .run(shutdown)
                .await?
        }
        #[cfg(feature = "trainer")]
        Role::Trainer => {
            let h = dagfleet_trainer::TrainHandler::new(
                &cfg.trainer,
                &cfg.inference.models_dir,
                &cfg.inference.device,
            );
            dagfleet_runtime::Worker::new(bus, store, h, wc)
                .run(shutdown)
                .await?
        }
        // Reachable in builds that leave a role out.
        #[allow(unreachable_patterns)]
        other => {
            let _ = (bus, store, wc, shutdown);
            anyhow::bail!(
                "role `{other}` is not built into this binary; built-in roles: {}",
                built_in()
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
    Ok(())
}
