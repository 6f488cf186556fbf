//! `dagfleet train SPEC`: the train stage on this machine, without a cluster; and
//! `dagfleet bench train`: training throughput and memory on random weights of a real
//! shape.

use anyhow::{Context, Result};
use bytes::Bytes;
use dagfleet_trainer::bench::{BenchOptions, BenchOutcome};
use dagfleet_trainer::run::{fingerprint, hash_model, run, DirSink, RunInputs, Stop};
use std::path::{Path, PathBuf};

use crate::config::Config;

fn models_dir(cfg: &Config) -> PathBuf {
    PathBuf::from(
        cfg.trainer
            .models_dir
            .clone()
            .unwrap_or_else(|| cfg.inference.models_dir.clone()),
    )
}

fn device_name(cfg: &Config) -> String {
    cfg.trainer
        .device
        .clone()
        .unwrap_or_else(|| cfg.inference.device.clone())
}

/// Trains as the spec's `[train]` section says, on `train.dataset` (and `train.valid`),
/// writing everything a train job writes under `out`; an interrupted run continues from
/// its last checkpoint there.
pub async fn train_local(
    spec_path: &Path,
    out: Option<PathBuf>,
    cfg: &Config,
) -> Result<std::process::ExitCode> {
    let text = std::fs::read_to_string(spec_path)
        .with_context(|| format!("reading run spec {}", spec_path.display()))?;
    let spec = dagfleet_protocol::RunSpec::from_toml(&text)?;
    let base = spec
        .models
        .base
        .clone()
        .context("run spec key `models.base`: training needs a base model")?;
    let t = spec.train.clone();
    t.validate("train")?;
    let dataset = t
        .dataset
        .clone()
        .context("run spec key `train.dataset`: `dagfleet train` needs a ChatML JSONL file")?;
    let train_text = Bytes::from(
        std::fs::read(&dataset).with_context(|| format!("train.dataset: reading {dataset}"))?,
    );
    let valid_text = match &t.valid {
        Some(v) => Some(Bytes::from(
            std::fs::read(v).with_context(|| format!("train.valid: reading {v}"))?,
        )),
        None => None,
    };
    let p = Path::new(&base.model);
    let base_path = if p.is_absolute() || p.exists() {
        p.to_path_buf()
    } else {
        models_dir(cfg).join(p)
    };
    anyhow::ensure!(
        base_path.exists(),
        "base model `{}` not found at {} (set trainer.models_dir or inference.models_dir)",
        base.model,
        base_path.display()
    );
    let out = out.unwrap_or_else(|| PathBuf::from(format!(".dagfleet/train/{}", spec.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bp = base_path.clone();
    let (base_sha, _) = tokio::task::spawn_blocking(move || hash_model(&bp)).await??;
    let sha = |b: &Bytes| dagfleet_runtime::sha256_hex(b);
    let fp = fingerprint(
        &t,
        &sha(&train_text),
        valid_text.as_ref().map(sha).as_deref(),
        &base_sha,
    );
    let mut sink = DirSink {
        dir: out.clone(),
        keep: t.keep_checkpoints,
    };
    let resume = sink.latest();
    if let Some(ck) = &resume {
        eprintln!(
            "found a checkpoint at step {} in {}",
            ck.step,
            out.display()
        );
    }
    let cancel = crate::shutdown_signal();
    let inputs = RunInputs {
        base_path,
        base_name: base.model.clone(),
        device_name: device_name(cfg),
        spec: t,
        train_text,
        valid_text,
        fingerprint: fp,
        resume,
        cancel: Some(cancel),
    };
    let res = tokio::task::spawn_blocking(move || run(inputs, &mut sink)).await?;
    match res {
        Ok(metrics) => {
            for (k, v) in metrics {
                eprintln!("{k}: {v}");
            }
            println!(
                "outputs in {} (report.md, loss.png, adapter/, merged/, gguf/)",
                out.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(Stop::Cancelled(step)) => {
            println!(
                "stopped at step {step}; the checkpoint is in {}; run the same command to continue",
                out.display()
            );
            Ok(std::process::ExitCode::from(3))
        }
        Err(Stop::Failed(e)) => Err(anyhow::anyhow!(e)),
    }
}

/// Settings of `dagfleet bench train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Model shape with random weights: qwen2.5-0.5b, qwen2.5-1.5b, smollm2-135m.
    #[arg(long, default_value = "qwen2.5-0.5b")]
    shape: String,
    /// Real weights instead (a `.gguf` file or a safetensors directory).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 2)]
    micro_batch: usize,
    /// LoRA rank (alpha = rank), on all seven linear layers.
    #[arg(long, default_value_t = 16)]
    r: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Keep every layer's activations instead of recomputing them.
    #[arg(long)]
    no_checkpointing: bool,
    /// Positions per cross-entropy chunk.
    #[arg(long, default_value_t = 1024)]
    loss_chunk: usize,
    /// Also print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Instead of timing: compare the loss and adapter gradients of the fused CUDA kernels
    /// with candle's unfused ops on a batch with packed rows and padding.
    #[arg(long)]
    check: bool,
}

impl From<TrainArgs> for BenchOptions {
    fn from(a: TrainArgs) -> Self {
        BenchOptions {
            shape: a.shape,
            model: a.model,
            seq: a.seq,
            micro_batch: a.micro_batch,
            r: a.r,
            steps: a.steps,
            warmup: a.warmup,
            no_checkpointing: a.no_checkpointing,
            loss_chunk: a.loss_chunk,
            check: a.check,
        }
    }
}

/// Runs the benchmark and prints the figures.
pub fn bench(a: TrainArgs, cfg: &Config) -> Result<()> {
    let device = dagfleet_models::device_named(&device_name(cfg), "trainer.device")?;
    let json = a.json;
    let f = match dagfleet_trainer::bench::run(&a.into(), &device)? {
        BenchOutcome::Check(line) => {
            println!("{line}");
            return Ok(());
        }
        BenchOutcome::Speed(f) => f,
    };
    if let Some(p) = &f.profile {
        println!("{p}");
    }
    println!(
        "| model | seq | micro-batch | r | checkpointing | tok/s (median) | tok/s (mean) | ms/step | peak device memory |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {} |",
        f.label,
        f.seq,
        f.micro_batch,
        f.r,
        f.checkpointing,
        f.tokens_per_s_median,
        f.tokens_per_s_mean,
        f.ms_per_step_median,
        if f.peak_bytes > 0 {
            format!("{:.2} GiB", f.peak_bytes as f64 / (1u64 << 30) as f64)
        } else {
            "n/a".into()
        }
    );
    if json {
        println!("{}", serde_json::to_string(&f)?);
    }
    Ok(())
}
