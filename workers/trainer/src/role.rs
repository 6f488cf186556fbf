//! Train jobs: fine-tune the base model on the job's rows, checkpointing into the store so a
//! redelivered job (after a crash, a pre-empted box or a SIGTERM) resumes where the last
//! checkpoint left it; then export the adapter, the merged model, GGUF files and the report.
//!
//! # Where things go (`runs/<run>/train/<job>/...`)
//! - `checkpoints/step-NNNNNNNN/{state.safetensors,state.json}`: the last
//!   `keep_checkpoints` checkpoints (`state.json` is written last and marks one complete);
//! - `adapter/`, `merged/`, `gguf/`: the exports, recorded in the job record and manifest;
//! - `metrics.csv`, `loss.png`, `report.md`, `train.json`.
//!
//! Training runs on a blocking thread; this side writes what it sends (checkpoints,
//! artifacts, metrics events) and the runtime keeps the job alive with in-progress acks.

use bytes::Bytes;
use dagfleet_protocol::jobs::TrainJob;
use dagfleet_protocol::{ArtifactRef, Envelope, EventKind, Job, Role};
use dagfleet_runtime::{Handler, JobContext, JobError, JobOutput};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

pub use dagfleet_runtime::config::TrainerSettings;

use crate::run::{run, RunInputs, Sink, Stop};
use crate::trainer::{Checkpoint, StepMetrics};
use crate::TrainError;

/// Settings the handler runs with, resolved against the inference settings.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Where model names are looked up.
    pub models_dir: PathBuf,
    /// `auto`, `cpu`, `cuda` or `metal`.
    pub device: String,
}

/// A model's (size-and-mtime stamp, SHA-256, bytes), cached per worker.
type ModelHash = (u64, String, u64);

/// Handler of the `trainer` role.
#[derive(Clone, Debug)]
pub struct TrainHandler {
    cfg: Resolved,
    hashes: Arc<Mutex<HashMap<PathBuf, ModelHash>>>,
}

enum Msg {
    Step(StepMetrics, u64),
    Checkpoint(Checkpoint, oneshot::Sender<()>),
    Artifact(String, Bytes, oneshot::Sender<Result<ArtifactRef, String>>),
    Note(String),
}

impl TrainHandler {
    /// A handler: `settings` where set, else the inference role's models directory and
    /// device.
    pub fn new(
        settings: &TrainerSettings,
        inference_models_dir: &str,
        inference_device: &str,
    ) -> Self {
        Self {
            cfg: Resolved {
                models_dir: PathBuf::from(
                    settings
                        .models_dir
                        .clone()
                        .unwrap_or_else(|| inference_models_dir.to_string()),
                ),
                device: settings
                    .device
                    .clone()
                    .unwrap_or_else(|| inference_device.to_string()),
            },
            hashes: Arc::default(),
        }
    }

    fn resolve(&self, model: &str) -> PathBuf {
        let p = Path::new(model);
        if p.is_absolute() || p.exists() {
            p.to_path_buf()
        } else {
            self.cfg.models_dir.join(model)
        }
    }

    /// SHA-256 and size of a model file or directory, cached per worker by path, size and
    /// modification time (hashing a 3 GB base takes seconds).
    fn hash_model(&self, path: &Path) -> Result<ArtifactRef, JobError> {
        let mut stamp = 0u64;
        let files: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)
                .map_err(|e| JobError::fatal(format!("{}: {e}", path.display())))?
                .flatten()
                .map(|e| e.path())
                .collect()
        } else {
            vec![path.to_path_buf()]
        };
        for f in &files {
            if let Ok(m) = std::fs::metadata(f) {
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                stamp = stamp.wrapping_mul(31).wrapping_add(t ^ m.len());
            }
        }
        let key = format!("model:{}", path.display());
        let cached = self
            .hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .cloned();
        let (sha256, bytes) = match cached {
            Some((s, h, b)) if s == stamp => (h, b),
            _ => {
                let (h, b) =
                    crate::run::hash_model(path).map_err(|e| JobError::fatal(e.to_string()))?;
                self.hashes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path.to_path_buf(), (stamp, h.clone(), b));
                (h, b)
            }
        };
        Ok(ArtifactRef { key, sha256, bytes })
    }

    /// The job's checkpoints, newest first: (step, folder relative to the job's state).
    async fn latest_checkpoint(
        &self,
        ctx: &JobContext,
        prefix: &str,
    ) -> Result<Vec<(u64, String)>, JobError> {
        let keys = ctx.state().list(prefix).await?;
        let mut steps: Vec<(u64, String)> = keys
            .iter()
            .filter_map(|k| {
                let rest = k.strip_prefix(prefix)?;
                let (dir, file) = rest.split_once('/')?;
                let step = dir.strip_prefix("step-")?.parse::<u64>().ok()?;
                (file == "state.json").then(|| (step, format!("{prefix}{dir}/")))
            })
            .collect();
        steps.sort();
        steps.reverse();
        Ok(steps)
    }

    async fn run(
        &self,
        env: &Envelope,
        job: &TrainJob,
        ctx: &JobContext,
    ) -> Result<JobOutput, JobError> {
        let base_path = self.resolve(&job.base.model);
        if !base_path.exists() {
            return Err(JobError::fatal(format!(
                "base model `{}` not found at {} (set trainer.models_dir or inference.models_dir)",
                job.base.model,
                base_path.display()
            )));
        }
        let base_ref = {
            let this = self.clone();
            let p = base_path.clone();
            tokio::task::spawn_blocking(move || this.hash_model(&p))
                .await
                .map_err(|e| JobError::retry(format!("hashing the base model: {e}")))??
        };
        ctx.note_input(base_ref.clone());
        let train_text = ctx.read(&job.train).await?;
        let valid_text = match &job.valid {
            Some(v) => Some(ctx.read(v).await?),
            None => None,
        };
        let ck_prefix = "checkpoints/";
        let mut resume = None;
        let state = ctx.state();
        for (step, dir) in self.latest_checkpoint(ctx, ck_prefix).await? {
            let meta = state.get(&format!("{dir}state.json")).await?;
            let tensors = state.get(&format!("{dir}state.safetensors")).await?;
            if let (Some(meta), Some(tensors)) = (meta, tensors) {
                resume = Some(Checkpoint {
                    tensors,
                    meta,
                    step,
                });
                break;
            }
        }
        let fingerprint = crate::run::fingerprint(
            &job.spec,
            &job.train.sha256,
            job.valid.as_ref().map(|v| v.sha256.as_str()),
            &base_ref.sha256,
        );
        let (tx, mut rx) = mpsc::channel::<Msg>(4);
        let cancel = ctx.stopping().clone();
        let device_name = self.cfg.device.clone();
        let spec = job.spec.clone();
        let base_name = job.base.model.clone();
        let worker = std::thread::Builder::new()
            .name("dagfleet-train".into())
            .spawn(move || {
                run(
                    RunInputs {
                        base_path,
                        base_name,
                        device_name,
                        spec,
                        train_text,
                        valid_text,
                        fingerprint,
                        resume,
                        cancel: Some(cancel),
                    },
                    &mut ChannelSink(tx),
                )
            })
            .map_err(|e| JobError::retry(format!("cannot start the training thread: {e}")))?;
        let mut step_event_total = 0u64;
        let mut kept: Vec<String> = Vec::new();
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Step(m, total) => {
                    step_event_total = total;
                    ctx.event(EventKind::TrainStep {
                        job_id: env.job_id.clone(),
                        step: m.step,
                        total_steps: total,
                        loss: m.loss,
                        lr: m.lr,
                        grad_norm: m.grad_norm,
                        tokens_per_s: m.tokens_per_s,
                        gpu_mem_bytes: m.gpu_mem_bytes,
                        valid_loss: m.valid_loss,
                    })
                    .await;
                    ctx.progress(m.step, total, &format!("loss {:.4}", m.loss))
                        .await;
                }
                Msg::Checkpoint(ck, ack) => {
                    let dir = format!("{ck_prefix}step-{:08}/", ck.step);
                    state
                        .set(&format!("{dir}state.safetensors"), ck.tensors)
                        .await?;
                    state.set(&format!("{dir}state.json"), ck.meta).await?;
                    kept.push(dir);
                    let all = self.latest_checkpoint(ctx, ck_prefix).await?;
                    for (_, old) in all.iter().skip(job.spec.keep_checkpoints) {
                        for f in ["state.json", "state.safetensors"] {
                            state.delete(&format!("{old}{f}")).await?;
                        }
                    }
                    let _ = ack.send(());
                }
                Msg::Artifact(name, data, ack) => {
                    let r = ctx.put(&name, data).await.map_err(|e| e.to_string());
                    let _ = ack.send(r);
                }
                Msg::Note(s) => ctx.progress(0, step_event_total, &s).await,
            }
        }
        let result = worker
            .join()
            .map_err(|_| JobError::fatal("the training thread panicked"))?;
        match result {
            Ok(summary) => {
                let mut out = JobOutput::default();
                for (k, v) in summary {
                    out = out.metric(k, v);
                }
                Ok(out)
            }
            Err(Stop::Cancelled(step)) => Err(JobError::retry(format!(
                "worker stopping; checkpoint at step {step} written, the job resumes from it"
            ))),
            Err(Stop::Failed(e)) => Err(match e {
                TrainError::Tensor(_) => JobError::retry(e.to_string()),
                other => JobError::fatal(other.to_string()),
            }),
        }
    }
}

/// Forwards what the training thread produces to the async side, which writes it.
struct ChannelSink(mpsc::Sender<Msg>);

impl Sink for ChannelSink {
    fn step(&mut self, m: &StepMetrics, total: u64) {
        let _ = self.0.blocking_send(Msg::Step(m.clone(), total));
    }

    fn note(&mut self, msg: &str) {
        let _ = self.0.blocking_send(Msg::Note(msg.to_string()));
    }

    fn checkpoint(&mut self, ck: Checkpoint) -> Result<(), TrainError> {
        let (ack, done) = oneshot::channel();
        self.0
            .blocking_send(Msg::Checkpoint(ck, ack))
            .map_err(|_| TrainError::Checkpoint("the job was abandoned".into()))?;
        done.blocking_recv()
            .map_err(|_| TrainError::Checkpoint("writing the checkpoint failed".into()))
    }

    fn artifact(&mut self, name: &str, data: Vec<u8>) -> Result<(), TrainError> {
        let (ack, done) = oneshot::channel();
        self.0
            .blocking_send(Msg::Artifact(name.to_string(), Bytes::from(data), ack))
            .map_err(|_| TrainError::Export("the job was abandoned".into()))?;
        done.blocking_recv()
            .map_err(|_| TrainError::Export("the job was abandoned".into()))?
            .map(|_| ())
            .map_err(|e| TrainError::Export(format!("writing {name}: {e}")))
    }
}

impl Handler for TrainHandler {
    fn role(&self) -> Role {
        Role::Trainer
    }

    fn capacity(&self) -> Option<serde_json::Value> {
        Some(json!({ "device": self.cfg.device }))
    }

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        match &env.job {
            Job::Train(job) => self.run(env, job, ctx).await,
            other => Err(JobError::fatal(format!(
                "the trainer role got a `{}` job, which it does not run",
                other.stage()
            ))),
        }
    }
}
