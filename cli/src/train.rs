//! `dagfleet train SPEC`: the train stage on this machine, without a cluster; and
//! `dagfleet bench train`: training throughput and memory on random weights of a real
//! shape.

use anyhow::{Context, Result};
use bytes::Bytes;
use candle_core::DType;
use dagfleet_inference::model::{Arch, ModelConfig};
use dagfleet_trainer::lora::{Lora, LoraConfig, Module};
use dagfleet_trainer::model::{DropoutSeed, HostBatch, TrainModel};
use dagfleet_trainer::optim::{AdamW, AdamWConfig};
use dagfleet_trainer::run::{fingerprint, hash_model, run, DirSink, RunInputs, Stop};
use dagfleet_trainer::weights::BaseWeights;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

fn shape(name: &str) -> Result<(ModelConfig, bool)> {
    let qwen = |hidden, layers, heads, inter| ModelConfig {
        arch: Arch::Qwen2,
        hidden,
        layers,
        heads,
        kv_heads: 2,
        head_dim: hidden / heads,
        vocab: 151_936,
        eps: 1e-6,
        rope_theta: 1_000_000.0,
        context: 32_768,
        rope_neox: true,
        intermediate: inter,
    };
    Ok(match name {
        "qwen2.5-0.5b" => (qwen(896, 24, 14, 4864), true),
        "qwen2.5-1.5b" => (qwen(1536, 28, 12, 8960), true),
        "smollm2-135m" => (
            ModelConfig {
                arch: Arch::Llama,
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                head_dim: 64,
                vocab: 49_152,
                eps: 1e-5,
                rope_theta: 100_000.0,
                context: 8192,
                rope_neox: true,
                intermediate: 1536,
            },
            true,
        ),
        other => {
            anyhow::bail!("--shape `{other}` must be qwen2.5-0.5b, qwen2.5-1.5b or smollm2-135m")
        }
    })
}

/// Runs the benchmark and prints the figures.
pub fn bench(a: TrainArgs, cfg: &Config) -> Result<()> {
    let device = dagfleet_inference::device_named(&device_name(cfg), "trainer.device")
        .map_err(anyhow::Error::msg)?;
    let dtype = dagfleet_trainer::compute_dtype(&device);
    let t0 = Instant::now();
    let (base, label) = match &a.model {
        Some(p) => (
            BaseWeights::load(p, &device, dtype)?,
            p.display().to_string(),
        ),
        None => {
            let (c, tied) = shape(&a.shape)?;
            (
                BaseWeights::random(c, tied, 1, &device, dtype)?,
                format!("{} (random weights)", a.shape),
            )
        }
    };
    let c = base.cfg.clone();
    let model = TrainModel::new(base, a.seq)?;
    eprintln!(
        "loaded {label} in {:.1}s on {device:?} ({dtype:?})",
        t0.elapsed().as_secs_f64()
    );
    let mut lora = Lora::init(
        &c,
        LoraConfig {
            r: a.r,
            alpha: a.r as f64,
            dropout: 0.0,
            targets: Module::ALL.to_vec(),
        },
        3,
        &device,
    )?;
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &lora.params,
    )?;
    if a.check {
        return check_fused(&model, &mut lora, a.seq);
    }
    // Full sequences of random tokens, every position a label (as a causal-LM benchmark
    // with labels = input ids).
    let (b, t) = (a.micro_batch, a.seq);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let ids: Vec<u32> = (0..b * t)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % c.vocab as u64) as u32
        })
        .collect();
    let mut hb = HostBatch {
        b,
        t,
        ids: ids.clone(),
        pos: (0..b).flat_map(|_| 0..t as u32).collect(),
        seg: vec![0; b * t],
        target_pos: Vec::new(),
        targets: Vec::new(),
        real_tokens: b * t,
    };
    for s in 0..b {
        for i in 0..t - 1 {
            hb.target_pos.push((s * t + i) as u32);
            hb.targets.push(ids[s * t + i + 1]);
        }
    }
    let scale = 1.0 / hb.targets.len() as f64;
    let mut times = Vec::new();
    let mut peak = 0u64;
    let mut last_loss = 0.0;
    for step in 0..a.warmup + a.steps {
        let st = Instant::now();
        let db = model.upload(&hb, a.loss_chunk)?;
        let lc = model.lora_compute(&lora)?;
        let mut grads = model.zero_grads(&lora)?;
        let loss = model.forward_backward(
            &db,
            &lora,
            &lc,
            &mut grads,
            scale,
            DropoutSeed(step as u64),
            !a.no_checkpointing,
        )?;
        peak = peak.max(model.peak_memory());
        let to = Instant::now();
        opt.step(&mut lora.params, &AdamW::flatten(&grads)?, 1e-4)?;
        if std::env::var_os("DAGFLEET_TRAIN_PROFILE").is_some() {
            device.synchronize()?;
            eprintln!(
                "  optimizer step: {:.1} ms",
                to.elapsed().as_secs_f64() * 1e3
            );
        }
        last_loss = dagfleet_trainer::model::scalar(&loss)? * scale;
        // The loss read is a device sync: the step is finished.
        let _ = lora.params[0]
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        let dt = st.elapsed().as_secs_f64();
        if step >= a.warmup {
            times.push(dt);
        }
        eprintln!("step {step}: {:.1} ms, loss {last_loss:.4}", dt * 1e3);
    }
    if let Some(p) = model.profile() {
        println!("{p}");
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let tokens = (b * t) as f64;
    println!(
        "| model | seq | micro-batch | r | checkpointing | tok/s (median) | tok/s (mean) | ms/step | peak device memory |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {label} | {t} | {b} | {} | {} | {:.0} | {:.0} | {:.1} | {} |",
        a.r,
        !a.no_checkpointing,
        tokens / median,
        tokens / mean,
        median * 1e3,
        if peak > 0 {
            format!("{:.2} GiB", peak as f64 / (1u64 << 30) as f64)
        } else {
            "n/a".into()
        }
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": label, "seq": t, "micro_batch": b, "r": a.r,
                "checkpointing": !a.no_checkpointing, "loss_chunk": a.loss_chunk,
                "tokens_per_s_median": tokens / median, "tokens_per_s_mean": tokens / mean,
                "ms_per_step_median": median * 1e3, "peak_bytes": peak,
                "trainable_params": lora.trainable(), "last_loss": last_loss,
                "device": format!("{device:?}"),
            })
        );
    }
    Ok(())
}

/// Loss and adapter gradients of the bf16 step with the fused kernels and with candle's
/// ops, each against the same model in f32 (candle's ops): two sequences, two rows packed
/// into the first, one row and padding in the second. The fused path must be at least as
/// close to f32 as the unfused one.
fn check_fused(model: &TrainModel, lora: &mut Lora, t: usize) -> Result<()> {
    use dagfleet_trainer::data::{host_batch, Example};
    let dev = model.device().clone();
    anyhow::ensure!(model.fused(), "the fused kernels are not in use on {dev:?}");
    // Non-zero B, so every gradient is exercised.
    for i in (1..lora.params.len()).step_by(2) {
        let p = &lora.params[i];
        lora.params[i] = (candle_core::Tensor::randn(0f32, 1f32, p.dims(), &dev)? * 0.02)?;
    }
    let cfg = model.base.cfg.clone();
    let tied = model.base.lm_head.is_none();
    let reference = TrainModel::new(
        BaseWeights::random(cfg.clone(), tied, 1, &dev, DType::F32)?,
        t,
    )?;
    reference.set_fused(false);
    let vocab = cfg.vocab as u32;
    let row = |n: usize, seed: u32| Example {
        ids: (0..n as u32)
            .map(|i| (i * 7919 + seed * 104_729) % vocab)
            .collect(),
        label: (0..n).map(|i| i >= n / 4).collect(),
    };
    let exs = vec![row(t * 3 / 5, 1), row(t - t * 3 / 5, 2), row(t * 3 / 4, 3)];
    let hb = host_batch(&exs, &[vec![0, 1], vec![2]], 0);
    let scale = 1.0 / hb.targets.len() as f64;
    let run = |m: &TrainModel, fused: bool| -> Result<(f64, Vec<candle_core::Tensor>)> {
        m.set_fused(fused);
        let db = m.upload(&hb, 512)?;
        let lc = m.lora_compute(lora)?;
        let mut g = m.zero_grads(lora)?;
        let l = m.forward_backward(&db, lora, &lc, &mut g, scale, DropoutSeed(1), true)?;
        Ok((dagfleet_trainer::model::scalar(&l)? * scale, g))
    };
    let (lr, gr) = run(&reference, false)?;
    let (lf, gf) = run(model, true)?;
    let (lu, gu) = run(model, false)?;
    model.set_fused(true);
    let err = |g: &[candle_core::Tensor]| -> Result<f64> {
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in g.iter().zip(&gr) {
            num += (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            den += b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok((num / den.max(1e-30)).sqrt())
    };
    let (ef, eu) = (err(&gf)?, err(&gu)?);
    println!(
        "{:?} {}x{} on {dev:?}, against f32: loss fused {:.2e}, unfused {:.2e} (relative); adapter gradients (relative L2 over {} tensors) fused {ef:.2e}, unfused {eu:.2e}",
        cfg.arch,
        cfg.layers,
        cfg.hidden,
        ((lf - lr) / lr).abs(),
        ((lu - lr) / lr).abs(),
        gf.len()
    );
    anyhow::ensure!(((lf - lr) / lr).abs() < 1e-2, "the fused loss is off");
    anyhow::ensure!(
        ef <= 1.5 * eu + 1e-3,
        "the fused gradients are further from f32 than the unfused ones"
    );
    Ok(())
}
