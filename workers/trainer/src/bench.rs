//! `dagfleet bench train`: training throughput and peak memory of LoRA steps on random
//! weights of a real shape (or on real weights), and a check of the fused CUDA kernels
//! against candle's ops.

use candle_core::{DType, Device, Tensor};
use dagfleet_models::{Arch, ModelConfig};
use std::path::PathBuf;
use std::time::Instant;

use crate::lora::{Lora, LoraConfig, Module};
use crate::model::{DropoutSeed, HostBatch, TrainModel};
use crate::optim::{AdamW, AdamWConfig};
use crate::weights::BaseWeights;
use crate::TrainError;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Model shape with random weights (see [`shape`]).
    pub shape: String,
    /// Real weights instead (a `.gguf` file or a safetensors directory).
    pub model: Option<PathBuf>,
    /// Tokens per sequence.
    pub seq: usize,
    /// Sequences per step.
    pub micro_batch: usize,
    /// LoRA rank (alpha = rank), on all seven linear layers.
    pub r: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Keep every layer's activations instead of recomputing them.
    pub no_checkpointing: bool,
    /// Positions per cross-entropy chunk.
    pub loss_chunk: usize,
    /// Instead of timing: compare the fused CUDA kernels with candle's unfused ops.
    pub check: bool,
}

/// The figures of a timed run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchFigures {
    /// The model: a path, or a shape with "(random weights)".
    #[serde(rename = "model")]
    pub label: String,
    /// Tokens per sequence.
    pub seq: usize,
    /// Sequences per step.
    pub micro_batch: usize,
    /// LoRA rank.
    pub r: usize,
    /// Whether activations were recomputed.
    pub checkpointing: bool,
    /// Positions per cross-entropy chunk.
    pub loss_chunk: usize,
    /// Tokens per second over the median step.
    pub tokens_per_s_median: f64,
    /// Tokens per second over the mean step.
    pub tokens_per_s_mean: f64,
    /// The median step.
    pub ms_per_step_median: f64,
    /// Peak device memory (0 where the device does not report it).
    pub peak_bytes: u64,
    /// Adapter parameters.
    pub trainable_params: usize,
    /// The last step's mean loss.
    pub last_loss: f64,
    /// The device, as candle names it.
    pub device: String,
    /// Per-op times, with `DAGFLEET_TRAIN_PROFILE` set.
    #[serde(skip)]
    pub profile: Option<String>,
}

/// What [`run`] found.
#[derive(Debug, Clone)]
pub enum BenchOutcome {
    /// A timed run.
    Speed(BenchFigures),
    /// The fused-kernel check passed; the line says by how much each path is off f32.
    Check(String),
}

/// The shape (and whether the embeddings are tied) a `--shape` name stands for:
/// `qwen2.5-0.5b`, `qwen2.5-1.5b`, `smollm2-135m`.
pub fn shape(name: &str) -> Result<(ModelConfig, bool), TrainError> {
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
            return Err(TrainError::Model(format!(
                "--shape `{other}` must be qwen2.5-0.5b, qwen2.5-1.5b or smollm2-135m"
            )))
        }
    })
}

/// Runs the benchmark on `device` (steps go to stderr as they finish).
pub fn run(a: &BenchOptions, device: &Device) -> Result<BenchOutcome, TrainError> {
    let dtype = crate::compute_dtype(device);
    let t0 = Instant::now();
    let (base, label) = match &a.model {
        Some(p) => (
            BaseWeights::load(p, device, dtype)?,
            p.display().to_string(),
        ),
        None => {
            let (c, tied) = shape(&a.shape)?;
            (
                BaseWeights::random(c, tied, 1, device, dtype)?,
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
        device,
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
        return check_fused(&model, &mut lora, a.seq).map(BenchOutcome::Check);
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
        last_loss = crate::model::scalar(&loss)? * scale;
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
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(BenchOutcome::Speed(BenchFigures {
        label,
        seq: t,
        micro_batch: b,
        r: a.r,
        checkpointing: !a.no_checkpointing,
        loss_chunk: a.loss_chunk,
        tokens_per_s_median: (b * t) as f64 / median,
        tokens_per_s_mean: (b * t) as f64 / mean,
        ms_per_step_median: median * 1e3,
        peak_bytes: peak,
        trainable_params: lora.trainable(),
        last_loss,
        device: format!("{device:?}"),
        profile: model.profile(),
    }))
}

/// Loss and adapter gradients of the bf16 step with the fused kernels and with candle's
/// ops, each against the same model in f32 (candle's ops): two sequences, two rows packed
/// into the first, one row and padding in the second. The fused path must be at least as
/// close to f32 as the unfused one.
fn check_fused(model: &TrainModel, lora: &mut Lora, t: usize) -> Result<String, TrainError> {
    use crate::data::{host_batch, Example};
    let dev = model.device().clone();
    if !model.fused() {
        return Err(TrainError::Model(format!(
            "the fused kernels are not in use on {dev:?}"
        )));
    }
    // Non-zero B, so every gradient is exercised.
    for i in (1..lora.params.len()).step_by(2) {
        let p = &lora.params[i];
        lora.params[i] = (Tensor::randn(0f32, 1f32, p.dims(), &dev)? * 0.02)?;
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
    let run = |m: &TrainModel, fused: bool| -> Result<(f64, Vec<Tensor>), TrainError> {
        m.set_fused(fused);
        let db = m.upload(&hb, 512)?;
        let lc = m.lora_compute(lora)?;
        let mut g = m.zero_grads(lora)?;
        let l = m.forward_backward(&db, lora, &lc, &mut g, scale, DropoutSeed(1), true)?;
        Ok((crate::model::scalar(&l)? * scale, g))
    };
    let (lr, gr) = run(&reference, false)?;
    let (lf, gf) = run(model, true)?;
    let (lu, gu) = run(model, false)?;
    model.set_fused(true);
    let err = |g: &[Tensor]| -> Result<f64, TrainError> {
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in g.iter().zip(&gr) {
            num += (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            den += b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok((num / den.max(1e-30)).sqrt())
    };
    let (ef, eu) = (err(&gf)?, err(&gu)?);
    let line = format!(
        "{:?} {}x{} on {dev:?}, against f32: loss fused {:.2e}, unfused {:.2e} (relative); adapter gradients (relative L2 over {} tensors) fused {ef:.2e}, unfused {eu:.2e}",
        cfg.arch,
        cfg.layers,
        cfg.hidden,
        ((lf - lr) / lr).abs(),
        ((lu - lr) / lr).abs(),
        gf.len()
    );
    if ((lf - lr) / lr).abs() >= 1e-2 {
        return Err(TrainError::Model(format!("the fused loss is off: {line}")));
    }
    if ef > 1.5 * eu + 1e-3 {
        return Err(TrainError::Model(format!(
            "the fused gradients are further from f32 than the unfused ones: {line}"
        )));
    }
    Ok(line)
}
