//! One training run from rows to exports, shared by train jobs ([`crate::role`]) and
//! `dagfleet train` (a [`DirSink`] on the local disk): what differs is only where
//! checkpoints, artifacts and progress go ([`Sink`]).

use bytes::Bytes;
use dagfleet_protocol::spec::TrainSpec;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::data::read_rows;
use crate::export::{self, GgufKind};
use crate::model::TrainModel;
use crate::report;
use crate::trainer::{Checkpoint, StepMetrics, Trainer};
use crate::weights::{BaseFormat, BaseWeights};
use crate::TrainError;

/// Identifies a run by what decides its result: the spec, the rows and the base model. A
/// checkpoint with another fingerprint is not resumed from.
pub fn fingerprint(
    spec: &TrainSpec,
    train_sha: &str,
    valid_sha: Option<&str>,
    base_sha: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    h.update(train_sha.as_bytes());
    if let Some(v) = valid_sha {
        h.update(v.as_bytes());
    }
    h.update(base_sha.as_bytes());
    hex::encode(h.finalize())
}

/// SHA-256 (hex) and size of a model file or directory (its files in name order).
pub fn hash_model(path: &Path) -> Result<(String, u64), TrainError> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| dagfleet_models::ModelError::io(path, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut hasher = Sha256::new();
    let mut bytes = 0;
    for f in &files {
        let io = |e| dagfleet_models::ModelError::io(f, e);
        let mut r = std::fs::File::open(f).map_err(io)?;
        bytes += std::io::copy(&mut r, &mut hasher).map_err(io)?;
    }
    Ok((hex::encode(hasher.finalize()), bytes))
}

/// Writes a run's outputs under a directory: artifacts by name, checkpoints under
/// `checkpoints/step-NNNNNNNN/` (the newest `keep` kept), progress on stderr.
#[derive(Debug)]
pub struct DirSink {
    /// The output directory.
    pub dir: PathBuf,
    /// Checkpoints kept.
    pub keep: usize,
}

impl DirSink {
    fn ck_dirs(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(self.dir.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                let step = n.strip_prefix("step-")?.parse::<u64>().ok()?;
                e.path()
                    .join("state.json")
                    .exists()
                    .then(|| (step, e.path()))
            })
            .collect();
        v.sort();
        v.reverse();
        v
    }

    /// The newest complete checkpoint in the directory.
    pub fn latest(&self) -> Option<Checkpoint> {
        self.ck_dirs().into_iter().find_map(|(step, d)| {
            let meta = std::fs::read(d.join("state.json")).ok()?;
            let tensors = std::fs::read(d.join("state.safetensors")).ok()?;
            Some(Checkpoint {
                tensors: Bytes::from(tensors),
                meta: Bytes::from(meta),
                step,
            })
        })
    }
}

impl Sink for DirSink {
    fn step(&mut self, m: &StepMetrics, total: u64) {
        eprintln!(
            "step {}/{total}  loss {:.4}{}  lr {:.2e}  grad-norm {:.3}  {:.0} tok/s{}",
            m.step,
            m.loss,
            m.valid_loss
                .map(|v| format!("  valid {v:.4}"))
                .unwrap_or_default(),
            m.lr,
            m.grad_norm,
            m.tokens_per_s,
            m.gpu_mem_bytes
                .map(|b| format!("  {:.2} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_default()
        );
    }

    fn note(&mut self, msg: &str) {
        eprintln!("{msg}");
    }

    fn checkpoint(&mut self, ck: Checkpoint) -> Result<(), TrainError> {
        let d = self.dir.join(format!("checkpoints/step-{:08}", ck.step));
        let io = |e: std::io::Error| TrainError::Checkpoint(format!("{}: {e}", d.display()));
        std::fs::create_dir_all(&d).map_err(io)?;
        std::fs::write(d.join("state.safetensors"), &ck.tensors).map_err(io)?;
        std::fs::write(d.join("state.json"), &ck.meta).map_err(io)?;
        for (_, old) in self.ck_dirs().into_iter().skip(self.keep.max(1)) {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(())
    }

    fn artifact(&mut self, name: &str, data: Vec<u8>) -> Result<(), TrainError> {
        let p = self.dir.join(name);
        let io = |e: std::io::Error| TrainError::Export(format!("{}: {e}", p.display()));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&p, data).map_err(io)
    }
}

/// What a training run needs.
pub struct RunInputs {
    /// The base model file or directory.
    pub base_path: PathBuf,
    /// The base model's name as the spec gives it.
    pub base_name: String,
    /// `auto`, `cpu`, `cuda` or `metal`.
    pub device_name: String,
    /// Hyper-parameters.
    pub spec: TrainSpec,
    /// ChatML JSONL training rows.
    pub train_text: Bytes,
    /// ChatML JSONL validation rows.
    pub valid_text: Option<Bytes>,
    /// Identifies (spec, data, base); see [`fingerprint`].
    pub fingerprint: String,
    /// A checkpoint to continue from.
    pub resume: Option<Checkpoint>,
    /// Set when the run must stop (it checkpoints first).
    pub cancel: Option<CancellationToken>,
}

/// Why a run ended early.
#[derive(Debug)]
pub enum Stop {
    /// Asked to stop; a checkpoint at this step was written.
    Cancelled(u64),
    /// Failed.
    Failed(TrainError),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Cancelled(s) => write!(f, "stopped at step {s} (checkpoint written)"),
            Stop::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Where a run's checkpoints, artifacts and progress go.
pub trait Sink {
    /// An optimizer step finished.
    fn step(&mut self, m: &StepMetrics, total: u64);
    /// Something worth telling whoever watches.
    fn note(&mut self, msg: &str);
    /// Store a checkpoint (and prune old ones).
    fn checkpoint(&mut self, ck: Checkpoint) -> Result<(), TrainError>;
    /// Store an output, `name` relative to the run's output root.
    fn artifact(&mut self, name: &str, data: Vec<u8>) -> Result<(), TrainError>;
}

impl From<TrainError> for Stop {
    fn from(e: TrainError) -> Self {
        Stop::Failed(e)
    }
}

impl From<dagfleet_models::ModelError> for Stop {
    fn from(e: dagfleet_models::ModelError) -> Self {
        Stop::Failed(e.into())
    }
}

/// Trains from rows to exports, on the calling thread: reads and tokenizes the rows, loads
/// the base, continues from `resume` when it belongs to this run, steps until done (with a
/// checkpoint every `checkpoint_every` steps and when `cancel` fires), then writes the
/// exports and the report through `sink`. Returns the job's metrics.
pub fn run(inp: RunInputs, sink: &mut dyn Sink) -> Result<Vec<(String, f64)>, Stop> {
    let RunInputs {
        base_path,
        base_name,
        device_name,
        spec,
        train_text,
        valid_text,
        fingerprint,
        resume,
        cancel,
    } = inp;
    let t0 = std::time::Instant::now();
    let device = dagfleet_models::device_named(&device_name, "trainer.device")?;
    let dtype = crate::compute_dtype(&device);
    let codec = if base_path.is_dir() {
        dagfleet_models::TextCodec::from_dir(&base_path)
    } else {
        dagfleet_models::TextCodec::from_gguf(&base_path)
    }?;
    let text = String::from_utf8_lossy(&train_text);
    let (train, tstats) = read_rows(&codec, &text, spec.max_seq_len, spec.long_rows, None);
    if train.is_empty() {
        let why = if tstats.rows == 0 {
            "the training file has no rows".to_string()
        } else {
            format!(
                "none of its {} rows can be used: {}",
                tstats.rows,
                tstats.reasons().join("; ")
            )
        };
        return Err(TrainError::Data(format!("no training rows: {why}")).into());
    }
    let (valid, vstats) = match &valid_text {
        Some(v) => {
            let t = String::from_utf8_lossy(v);
            read_rows(
                &codec,
                &t,
                spec.max_seq_len,
                spec.long_rows,
                Some(spec.eval_rows),
            )
        }
        None => (Vec::new(), Default::default()),
    };
    info!(
        rows = tstats.rows,
        kept = tstats.kept,
        skipped = tstats.skipped_rows(),
        truncated = tstats.truncated,
        valid = valid.len(),
        "training rows read"
    );
    for r in tstats.reasons() {
        warn!("skipped training rows: {r}");
    }
    let base = BaseWeights::load(&base_path, &device, dtype)?;
    let pad_id = codec.stop_ids.iter().next().copied().unwrap_or(0);
    let model = TrainModel::new(base, spec.max_seq_len)?;
    let mut tr = Trainer::new(model, spec.clone(), train, valid, pad_id, fingerprint)?;
    let mut resumed_from = 0u64;
    if let Some(ck) = &resume {
        match tr.restore(ck) {
            Ok(()) => {
                resumed_from = tr.state.step;
                info!(step = resumed_from, "resumed from checkpoint");
                sink.note(&format!("resumed from step {resumed_from}"));
            }
            Err(e) => warn!(error = %e, "checkpoint not used; training from the start"),
        }
    }
    let total = tr.total_steps();
    let mut peak_mem = 0u64;
    while !tr.done() {
        if cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            sink.checkpoint(tr.checkpoint()?)?;
            return Err(Stop::Cancelled(tr.state.step));
        }
        let m = tr.step()?;
        peak_mem = peak_mem.max(m.gpu_mem_bytes.unwrap_or(0));
        sink.step(&m, total);
        if tr.state.step.is_multiple_of(spec.checkpoint_every) && !tr.done() {
            sink.checkpoint(tr.checkpoint()?)?;
        }
    }
    // A job stopped during the exports continues from here, not from the last periodic
    // checkpoint.
    if resumed_from < tr.state.step {
        sink.checkpoint(tr.checkpoint()?)?;
    }
    // Exports.
    let history = tr.state.history.clone();
    let last = history.last().cloned();
    let mut exports = Vec::new();
    let want = |e: &str| spec.export.iter().any(|x| x == e);
    let stem = Path::new(&base_name)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    if want("peft") {
        let (cfg, st) = export::peft_adapter(&tr.lora, &base_name)?;
        sink.artifact("adapter/adapter_config.json", cfg)?;
        sink.artifact("adapter/adapter_model.safetensors", st)?;
        exports.push("adapter/");
    }
    let needs_merge = ["merged", "q8_0", "q4_k_m"].iter().any(|e| want(e));
    if needs_merge {
        let merged = export::merged_tensors(&tr.model, &tr.lora)?;
        if want("merged") {
            for (name, data) in export::merged_dir(&merged, &tr.model, &codec, tr.model.dtype)? {
                sink.artifact(&format!("merged/{name}"), data)?;
            }
            exports.push("merged/");
        }
        for (kind, key) in [(GgufKind::Q8_0, "q8_0"), (GgufKind::Q4KM, "q4_k_m")] {
            if want(key) {
                let name = format!("{stem}-lora-{}", kind.suffix());
                let data = export::gguf(&merged, &tr.model, &codec, kind, &name)?;
                sink.artifact(&format!("gguf/{name}.gguf"), data)?;
                exports.push(if key == "q8_0" {
                    "gguf/q8_0"
                } else {
                    "gguf/q4_k_m"
                });
            }
        }
    }
    // The exact fine-tune for llama.cpp and Ollama: the adapter over the base it was trained on.
    let lora_name = format!("{stem}-lora-adapter.gguf");
    if want("gguf_lora") {
        let data = export::gguf_lora(&tr.lora, &tr.model, &lora_name)?;
        sink.artifact(&format!("gguf/{lora_name}"), data)?;
        exports.push("gguf/lora");
    }
    if want("modelfile") {
        if want("q4_k_m") {
            let name = format!("{stem}-lora-{}.gguf", GgufKind::Q4KM.suffix());
            let mf = export::modelfile(&name, None, &codec, None);
            sink.artifact("gguf/Modelfile", mf.into_bytes())?;
        }
        if let (true, BaseFormat::Gguf(base)) = (want("gguf_lora"), &tr.model.base.format) {
            let base_file = base
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| base_name.clone());
            let mf = format!(
                "# The base model file must sit beside this Modelfile: {}\n{}",
                base.display(),
                export::modelfile(&base_file, Some(&lora_name), &codec, None)
            );
            sink.artifact("gguf/Modelfile.adapter", mf.into_bytes())?;
        }
    }
    let csv = report::metrics_csv(&history);
    sink.artifact("metrics.csv", csv.into_bytes())?;
    let png = report::loss_png(&history, &format!("LoRA fine-tune of {base_name}"))?;
    sink.artifact("loss.png", png)?;
    let tokens: u64 = history.iter().map(|m| m.tokens).sum();
    let train_s: f64 = last.as_ref().map(|m| m.elapsed_s).unwrap_or(0.0);
    let summary = json!({
        "base": {"model": base_name, "path": base_path.display().to_string()},
        "device": device_label(tr.model.device()),
        "dtype": tr.model.dtype.as_str(),
        "spec": spec,
        "trainable_params": tr.lora.trainable(),
        "steps": tr.state.step,
        "total_steps": total,
        "stopped_early": tr.state.stopped_early,
        "resumed_from_step": resumed_from,
        "final_loss": last.as_ref().map(|m| m.loss),
        "best_valid_loss": tr.state.best_valid,
        "tokens": tokens,
        "train_seconds": train_s,
        "tokens_per_s": if train_s > 0.0 { tokens as f64 / train_s } else { 0.0 },
        "peak_gpu_mem_bytes": (peak_mem > 0).then_some(peak_mem),
        "train_rows": tstats,
        "valid_rows": vstats,
        "exports": exports,
        "wall_seconds": t0.elapsed().as_secs_f64(),
    });
    sink.artifact(
        "train.json",
        serde_json::to_vec_pretty(&summary).unwrap_or_default(),
    )?;
    let md = report_md(&summary, &history);
    sink.artifact("report.md", md.into_bytes())?;
    let mut metrics = vec![
        ("steps".to_string(), tr.state.step as f64),
        ("rows".to_string(), tstats.kept as f64),
        ("skipped_rows".to_string(), tstats.skipped_rows() as f64),
        ("truncated_rows".to_string(), tstats.truncated as f64),
        ("train_tokens".to_string(), tokens as f64),
        ("resumed_from_step".to_string(), resumed_from as f64),
    ];
    if let Some(m) = &last {
        metrics.push(("final_loss".into(), m.loss));
    }
    if let Some(v) = tr.state.best_valid {
        metrics.push(("best_valid_loss".into(), v));
    }
    if train_s > 0.0 {
        metrics.push(("train_tokens_per_s".into(), tokens as f64 / train_s));
    }
    Ok(metrics)
}

/// `cpu`, `cuda:0`, `metal` for reports and the summary.
fn device_label(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn report_md(s: &serde_json::Value, history: &[StepMetrics]) -> String {
    let first = history.first();
    let last = history.last();
    let f = |v: &serde_json::Value| match v.as_f64() {
        Some(x) => format!("{x:.4}"),
        None => "n/a".into(),
    };
    let mut md = String::new();
    md.push_str(&format!(
        "# LoRA fine-tune of {}\n\n![loss curve](loss.png)\n\n",
        s["base"]["model"].as_str().unwrap_or("?")
    ));
    md.push_str("| | |\n|---|---|\n");
    md.push_str(&format!(
        "| steps | {} of {}{} |\n",
        s["steps"],
        s["total_steps"],
        if s["stopped_early"].as_bool() == Some(true) {
            " (early stopping)"
        } else {
            ""
        }
    ));
    md.push_str(&format!(
        "| training loss | {} → {} |\n",
        first.map(|m| format!("{:.4}", m.loss)).unwrap_or_default(),
        last.map(|m| format!("{:.4}", m.loss)).unwrap_or_default()
    ));
    md.push_str(&format!(
        "| best validation loss | {} |\n",
        f(&s["best_valid_loss"])
    ));
    md.push_str(&format!(
        "| rows | {} kept of {}, {} truncated, {} skipped |\n",
        s["train_rows"]["kept"],
        s["train_rows"]["rows"],
        s["train_rows"]["truncated"],
        s["train_rows"]["skipped"]
            .as_object()
            .map(|o| o.values().filter_map(|v| v[0].as_u64()).sum::<u64>())
            .unwrap_or(0)
    ));
    md.push_str(&format!(
        "| tokens | {} at {:.0} tok/s |\n",
        s["tokens"],
        s["tokens_per_s"].as_f64().unwrap_or(0.0)
    ));
    if let Some(p) = s["peak_gpu_mem_bytes"].as_u64() {
        md.push_str(&format!(
            "| device memory (highest seen) | {:.2} GiB |\n",
            p as f64 / (1u64 << 30) as f64
        ));
    }
    md.push_str(&format!(
        "| device | {} ({}) |\n| trainable parameters | {} |\n| resumed from step | {} |\n",
        s["device"].as_str().unwrap_or("?"),
        s["dtype"].as_str().unwrap_or("?"),
        s["trainable_params"],
        s["resumed_from_step"]
    ));
    let sp = &s["spec"];
    md.push_str(&format!(
        "\nLoRA r = {}, alpha = {}, dropout = {} on {}; lr {} ({} schedule, {} warm-up steps), micro-batch {} × grad-accum {}, max_seq_len {}, {} epoch(s), seed {}.\n",
        sp["r"], sp["alpha"], sp["dropout"],
        sp["target_modules"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        sp["lr"], sp["schedule"].as_str().unwrap_or("?"), sp["warmup_steps"], sp["micro_batch"], sp["grad_accum"],
        sp["max_seq_len"], sp["epochs"], sp["seed"]
    ));
    if let Some(o) = s["train_rows"]["skipped"]
        .as_object()
        .filter(|o| !o.is_empty())
    {
        md.push_str("\nSkipped rows:\n");
        for (reason, v) in o {
            md.push_str(&format!(
                "- {} rows: {reason} (first at line {})\n",
                v[0], v[1]
            ));
        }
    }
    md.push_str("\nFiles: `metrics.csv` (every step), `train.json`");
    for e in s["exports"].as_array().into_iter().flatten() {
        md.push_str(&format!(", `{}`", e.as_str().unwrap_or("")));
    }
    md.push_str(".\n");
    md
}
