//! Inference-batch jobs: read a row range of a JSONL of chat requests, generate with
//! continuous batching, write `generations.jsonl` (one row per request, in the shape the
//! judge reads) and `summary.json`.

use bytes::Bytes;
use dagfleet_protocol::jobs::InferBatch;
use dagfleet_protocol::{ArtifactRef, Envelope, Job, Role};
use dagfleet_runtime::{Handler, JobContext, JobError, JobOutput};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::engine::{collect, GenParams};
use crate::{ChatMessage, Engine};

pub use dagfleet_runtime::config::InferenceSettings;

/// Device and model-path resolution of [`InferenceSettings`].
pub trait SettingsExt {
    /// The device named by `device`.
    fn device(&self) -> Result<candle_core::Device, dagfleet_models::ModelError>;
    /// The file or directory a model name refers to.
    fn resolve(&self, model: &str) -> PathBuf;
    /// Load options from the settings.
    fn load_options(&self) -> crate::model::LoadOptions;
}

impl SettingsExt for InferenceSettings {
    fn device(&self) -> Result<candle_core::Device, dagfleet_models::ModelError> {
        dagfleet_models::device_named(&self.device, "inference.device")
    }

    fn load_options(&self) -> crate::model::LoadOptions {
        crate::model::LoadOptions {
            quantize: self.quantize.clone(),
            ..Default::default()
        }
    }

    fn resolve(&self, model: &str) -> PathBuf {
        let p = Path::new(model);
        if p.is_absolute() || p.exists() {
            p.to_path_buf()
        } else {
            Path::new(&self.models_dir).join(model)
        }
    }
}

/// Handler of the `inference` role. Keeps one engine per model it has loaded.
#[derive(Clone)]
pub struct InferHandler {
    settings: InferenceSettings,
    engines: Arc<Mutex<HashMap<PathBuf, Engine>>>,
}

impl std::fmt::Debug for InferHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferHandler")
            .field("settings", &self.settings)
            .finish()
    }
}

/// One request row: `{"id", "messages"}` or a ChatML dataset row (its assistant turn is the
/// reference answer and is not sent).
#[derive(Deserialize)]
struct RequestRow {
    #[serde(default)]
    id: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    meta: Option<Value>,
    #[serde(default)]
    max_tokens: Option<u32>,
}

impl InferHandler {
    /// A handler with these settings; loads `preload` now when set.
    pub fn new(settings: InferenceSettings) -> Result<Self, JobError> {
        let h = Self {
            settings,
            engines: Arc::default(),
        };
        if let Some(m) = h.settings.preload.clone() {
            h.engine(&m)?;
        }
        Ok(h)
    }

    /// The engine of `model`, loading it on first use.
    pub fn engine(&self, model: &str) -> Result<Engine, JobError> {
        self.engine_at(self.settings.resolve(model), None, model)
    }

    /// The engine of the model at `path` (with `adapter` applied), loading it on first use.
    fn engine_at(
        &self,
        path: PathBuf,
        adapter: Option<PathBuf>,
        model: &str,
    ) -> Result<Engine, JobError> {
        let key = match &adapter {
            Some(a) => PathBuf::from(format!("{}+{}", path.display(), a.display())),
            None => path.clone(),
        };
        if let Some(e) = self
            .engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(e.clone());
        }
        let device = self
            .settings
            .device()
            .map_err(|e| JobError::fatal(e.to_string()))?;
        let mut opts = self.settings.load_options();
        opts.adapter = adapter;
        let (m, codec) =
            crate::load_with(&path, &device, &opts).map_err(|e| JobError::fatal(e.to_string()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| model.to_string());
        let engine = Engine::start(m, codec, self.settings.engine.clone(), name);
        self.engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, engine.clone());
        Ok(engine)
    }

    /// Copies artifacts from the store into the local model cache
    /// (`models_dir/.store/<sha256 prefix>/`), once; returns the directory.
    async fn fetch(
        &self,
        ctx: &JobContext,
        files: &[(&ArtifactRef, &str)],
    ) -> Result<PathBuf, JobError> {
        let root = Path::new(&self.settings.models_dir).join(".store");
        ctx.local_files(&root, files).await
    }

    async fn run(&self, job: &InferBatch, ctx: &JobContext) -> Result<JobOutput, JobError> {
        // The name rows carry, so the judge tells a fine-tune from its base.
        let mut label = job.model.model.clone();
        let engine = match (&job.weights, &job.adapter) {
            (Some(w), _) => {
                let name = w.key.rsplit('/').next().unwrap_or("model.gguf").to_string();
                let dir = self.fetch(ctx, &[(w, &name)]).await?;
                self.engine_at(dir.join(&name), None, &job.model.model)?
            }
            (None, Some(a)) => {
                let (cfg_ref, _) = ctx
                    .read_beside(a, "adapter_config.json")
                    .await?
                    .ok_or_else(|| {
                        JobError::fatal(format!(
                            "the adapter's config `adapter_config.json` is missing beside {}",
                            a.key
                        ))
                    })?;
                let dir = self
                    .fetch(
                        ctx,
                        &[
                            (a, "adapter_model.safetensors"),
                            (&cfg_ref, "adapter_config.json"),
                        ],
                    )
                    .await?;
                // Named like the other fine-tune formats: the base's file name.
                let base = std::path::Path::new(&job.model.model)
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| job.model.model.clone());
                label = format!("{base} + LoRA (adapter)");
                self.engine_at(
                    self.settings.resolve(&job.model.model),
                    Some(dir),
                    &job.model.model,
                )?
            }
            (None, None) => self.engine(&job.model.model)?,
        };
        let data = ctx.read(&job.input).await?;
        let text = String::from_utf8_lossy(&data);
        let (start, end) = job.rows;
        let mut pending = Vec::new();
        let mut bad = Vec::new();
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let n = i as u64;
            if n < start || n >= end {
                continue;
            }
            let row: RequestRow = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(e) => {
                    bad.push(json!({"row": n, "error": format!("not a chat request: {e}")}));
                    continue;
                }
            };
            let mut messages = row.messages.clone();
            let reference = if messages.last().is_some_and(|m| m.role == "assistant") {
                messages.pop().map(|m| m.content)
            } else {
                None
            };
            let system = messages
                .iter()
                .find(|m| m.role == "system")
                .map(|m| m.content.clone());
            let instruction = messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default();
            let id = row
                .id
                .clone()
                .or_else(|| {
                    row.meta
                        .as_ref()
                        .and_then(|m| m["id"].as_str().map(String::from))
                })
                .unwrap_or_else(|| format!("row-{n}"));
            let params = GenParams {
                max_tokens: row.max_tokens.unwrap_or(job.spec.max_tokens),
                temperature: job.spec.temperature,
                seed: Some(job.spec.seed.wrapping_add(n)),
                ..Default::default()
            };
            let max_tokens = params.max_tokens;
            match engine.submit_chat(&messages, params) {
                Ok(rx) => pending.push((
                    n,
                    id,
                    system,
                    instruction,
                    reference,
                    messages,
                    max_tokens,
                    rx,
                )),
                Err(e) => bad.push(json!({"row": n, "id": id, "error": e.to_string()})),
            }
        }
        let total = pending.len() as u64;
        let mut out = Vec::new();
        let (mut tokens, mut length, mut done) = (0u64, 0u64, 0u64);
        let mut ttfts = Vec::new();
        let mut repairs = Vec::new();
        for (n, id, system, instruction, reference, messages, max_tokens, mut rx) in pending {
            let res = tokio::select! {
                r = collect(&mut rx) => r,
                _ = ctx.cancelled().cancelled() => {
                    return Err(JobError::retry("worker stopping; the batch is handed back"));
                }
            };
            match res {
                Ok((output, st)) => {
                    tokens += st.generated_tokens as u64;
                    if st.finish_reason == crate::FinishReason::Length {
                        length += 1;
                    }
                    ttfts.push(st.ttft_ms);
                    let row = json!({
                        "id": id,
                        "model": label,
                        "system_prompt": system.clone().unwrap_or_default(),
                        "instruction": instruction,
                        "reference": reference,
                        "output": output,
                        "finish_reason": st.finish_reason,
                        "prompt_tokens": st.prompt_tokens,
                        "generated_tokens": st.generated_tokens,
                        "ttft_ms": st.ttft_ms,
                        "decode_tok_s": st.decode_tok_s,
                    });
                    out.extend_from_slice(row.to_string().as_bytes());
                    out.push(b'\n');
                    if job.spec.repair > 0 {
                        let first = dagfleet_agent::Generated {
                            text: output,
                            prompt_tokens: st.prompt_tokens as u64,
                            completion_tokens: st.generated_tokens as u64,
                            finish_reason: match st.finish_reason {
                                crate::FinishReason::Stop => "stop".into(),
                                crate::FinishReason::Length => "length".into(),
                            },
                        };
                        let task = self.repair(
                            &engine,
                            job,
                            n,
                            &instruction,
                            system.as_deref(),
                            &messages,
                            max_tokens,
                            first,
                        );
                        repairs.push((id, system, instruction, reference, task));
                    }
                }
                Err(e) => bad.push(json!({"row": n, "id": id, "error": e.to_string()})),
            }
            done += 1;
            if done.is_multiple_of(16) || done == total {
                ctx.progress(done, total, "generations").await;
            }
        }
        let mut rows = done - bad.iter().filter(|b| b.get("id").is_some()).count() as u64;
        // The repair loops ran beside the single-shot generations; their rows follow.
        let repair_label = format!("{label} + repair ({})", job.spec.repair);
        let (mut repaired, mut repair_tokens) = (0u64, 0u64);
        let n_repairs = repairs.len() as u64;
        let mut aborts: Vec<_> = repairs.iter().map(|r| r.4.abort_handle()).collect();
        for (i, (id, system, instruction, reference, task)) in repairs.into_iter().enumerate() {
            let res = tokio::select! {
                r = task => r,
                _ = ctx.cancelled().cancelled() => {
                    aborts.iter_mut().for_each(|a| a.abort());
                    return Err(JobError::retry("worker stopping; the batch is handed back"));
                }
            };
            match res {
                Ok(Ok(r)) => {
                    let best = &r.attempts[(r.best - 1) as usize];
                    let gen: u64 = r.attempts.iter().map(|a| a.completion_tokens).sum();
                    let turns = r.attempts.len().saturating_sub(1) as u64;
                    repair_tokens += r.attempts.iter().skip(1).map(|a| a.prompt_tokens + a.completion_tokens).sum::<u64>();
                    tokens += r.attempts.iter().skip(1).map(|a| a.completion_tokens).sum::<u64>();
                    if r.valid && !r.attempts[0].valid {
                        repaired += 1;
                    }
                    let row = json!({
                        "id": id,
                        "model": repair_label,
                        "system_prompt": system.unwrap_or_default(),
                        "instruction": instruction,
                        "reference": reference,
                        "output": best.answer,
                        "finish_reason": if best.truncated { "length" } else { "stop" },
                        "prompt_tokens": r.attempts.iter().map(|a| a.prompt_tokens).sum::<u64>(),
                        "generated_tokens": gen,
                        "attempts": r.attempts.len(),
                        "repair_turns": turns,
                        "best_attempt": r.best,
                        "attempts_valid": r.attempts.iter().map(|a| a.valid).collect::<Vec<_>>(),
                        "agent_seconds": r.seconds,
                    });
                    out.extend_from_slice(row.to_string().as_bytes());
                    out.push(b'\n');
                    rows += 1;
                }
                Ok(Err(e)) => bad.push(json!({"id": id, "model": repair_label, "error": e.to_string()})),
                Err(e) => bad.push(json!({"id": id, "model": repair_label, "error": format!("the repair loop failed: {e}")})),
            }
            if (i as u64 + 1).is_multiple_of(16) || i as u64 + 1 == n_repairs {
                ctx.progress(i as u64 + 1, n_repairs, "repair loops").await;
            }
        }
        ctx.put("generations.jsonl", Bytes::from(out)).await?;
        ttfts.sort_by(|a, b| a.total_cmp(b));
        let p50 = ttfts.get(ttfts.len() / 2).copied().unwrap_or(0.0);
        let summary = json!({
            "model": label,
            "rows": rows,
            "failed_rows": bad,
            "generated_tokens": tokens,
            "finish_length": length,
            "ttft_ms_p50": p50,
            "repair": job.spec.repair,
            "repaired": repaired,
            "repair_tokens": repair_tokens,
        });
        ctx.put(
            "summary.json",
            Bytes::from(serde_json::to_vec_pretty(&summary).unwrap_or_default()),
        )
        .await?;
        Ok(JobOutput::default()
            .metric("rows", rows as f64)
            .metric("generated_tokens", tokens as f64)
            .metric("finish_length", length as f64)
            .metric("repaired", repaired as f64)
            .metric(
                "failed_rows",
                summary["failed_rows"].as_array().map_or(0, Vec::len) as f64,
            ))
    }
}

impl InferHandler {
    /// Starts the repair loop for row `n`, whose single-shot answer is `first`: the static
    /// judge's findings go back to the same engine as repair turns, up to `infer.repair`.
    #[allow(clippy::too_many_arguments)]
    fn repair(
        &self,
        engine: &Engine,
        job: &InferBatch,
        n: u64,
        instruction: &str,
        system: Option<&str>,
        messages: &[ChatMessage],
        max_tokens: u32,
        first: dagfleet_agent::Generated,
    ) -> tokio::task::JoinHandle<Result<dagfleet_agent::AgentResult, dagfleet_agent::AgentError>>
    {
        let gen = crate::agent::EngineGenerator {
            engine: engine.clone(),
            temperature: job.spec.temperature,
            seed: Some(job.spec.seed.wrapping_add(n)),
        };
        let cfg = dagfleet_agent::AgentConfig {
            max_attempts: job.spec.repair + 1,
            max_tokens,
            airflow_version: dagfleet_agent::airflow_version_in(instruction).unwrap_or((2, 10)),
            system: system.unwrap_or_default().to_string(),
        };
        let turns: Vec<dagfleet_providers::Message> = messages
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| dagfleet_providers::Message {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let instruction = instruction.to_string();
        tokio::spawn(async move {
            dagfleet_agent::run_turns(&gen, &instruction, turns, Some(first), &cfg, None, |_| {})
                .await
        })
    }
}

impl Handler for InferHandler {
    fn role(&self) -> Role {
        Role::Inference
    }

    fn capacity(&self) -> Option<Value> {
        let engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        Some(json!({
            "models": engines.values().map(|e| e.model_name.clone()).collect::<Vec<_>>(),
            "device": self.settings.device,
            "max_batch": self.settings.engine.max_batch,
            "kv_budget_tokens": self.settings.engine.kv_budget_tokens,
        }))
    }

    async fn handle(&self, env: &Envelope, ctx: &JobContext) -> Result<JobOutput, JobError> {
        match &env.job {
            Job::Infer(job) => self.run(job, ctx).await,
            other => Err(JobError::fatal(format!(
                "the inference role got a `{}` job, which it does not run",
                other.stage()
            ))),
        }
    }
}
