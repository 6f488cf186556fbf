//! `dagfleet bench infer`: the engine's throughput and latency over a concurrency sweep,
//! with synthetic prompts of a fixed token length and exactly `max_tokens` new tokens.

use anyhow::Result;
use dagfleet_inference::engine::collect;
use dagfleet_inference::{Engine, GenParams, SettingsExt};
use std::time::Instant;

use crate::config::Config;

/// Settings of `dagfleet bench infer`.
#[derive(clap::Args, Debug)]
pub struct InferArgs {
    /// A `.gguf` file or a safetensors model directory.
    #[arg(long)]
    model: String,
    /// Concurrent requests per measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,256")]
    concurrency: Vec<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Price of the machine, for $ per million tokens.
    #[arg(long, default_value_t = 2.5)]
    dollars_per_hour: f64,
    /// Tokens at the start of every prompt that are the same for all (a shared system
    /// prompt: the prefix cache computes them once).
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// Also print one JSON object per measurement.
    #[arg(long)]
    json: bool,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs the sweep and prints a Markdown table.
pub async fn run(a: InferArgs, cfg: &Config) -> Result<()> {
    let s = &cfg.inference;
    let device = s.device().map_err(anyhow::Error::msg)?;
    let path = s.resolve(&a.model);
    let (model, codec) = dagfleet_inference::load_with(&path, &device, &s.load_options())?;
    let vocab = model.cfg.vocab as u32;
    let mut ecfg = s.engine.clone();
    let top = a.concurrency.iter().copied().max().unwrap_or(1);
    ecfg.max_batch = ecfg.max_batch.max(top);
    ecfg.max_queue = ecfg.max_queue.max(top);
    ecfg.kv_budget_tokens = ecfg
        .kv_budget_tokens
        .max(top * (a.prompt_tokens + a.max_tokens as usize));
    let engine = Engine::start(model, codec, ecfg, "bench".into());
    println!(
        "model `{}` on {device:?}; prompts of {} tokens ({} shared), {} new tokens each\n",
        path.display(),
        a.prompt_tokens,
        a.shared_prefix.min(a.prompt_tokens),
        a.max_tokens
    );
    println!("| concurrency | TTFT p50 ms | TTFT p99 ms | decode tok/s per stream | aggregate tok/s | wall s | $ / M tokens |");
    println!("|---|---|---|---|---|---|---|");
    // Warm-up: kernels, allocations.
    one_round(&engine, 1, 16, 8, vocab, (0, 0)).await?;
    for &c in &a.concurrency {
        let t0 = Instant::now();
        let salt = (c as u64, a.shared_prefix);
        let stats = one_round(&engine, c, a.prompt_tokens, a.max_tokens, vocab, salt).await?;
        let wall = t0.elapsed().as_secs_f64();
        let mut ttft: Vec<f64> = stats.iter().map(|s| s.ttft_ms).collect();
        let per: f64 = stats.iter().map(|s| s.decode_tok_s).sum::<f64>() / stats.len() as f64;
        let tokens: usize = stats.iter().map(|s| s.generated_tokens).sum();
        let agg = tokens as f64 / wall;
        let usd = a.dollars_per_hour / (agg * 3600.0) * 1e6;
        let (p50, p99) = (pct(&mut ttft, 0.5), pct(&mut ttft, 0.99));
        println!("| {c} | {p50:.1} | {p99:.1} | {per:.1} | {agg:.0} | {wall:.2} | {usd:.3} |");
        if a.json {
            println!(
                "{}",
                serde_json::json!({"concurrency": c, "ttft_p50_ms": p50, "ttft_p99_ms": p99,
                    "decode_tok_s_per_stream": per, "aggregate_tok_s": agg, "wall_s": wall,
                    "usd_per_mtok": usd, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
                    "shared_prefix": a.shared_prefix})
            );
        }
    }
    Ok(())
}

async fn one_round(
    engine: &Engine,
    n: usize,
    prompt_tokens: usize,
    max_tokens: u32,
    vocab: u32,
    (salt, shared): (u64, usize),
) -> Result<Vec<dagfleet_inference::GenStats>> {
    let mut rxs = Vec::with_capacity(n);
    for i in 0..n {
        // Ordinary (non-special) token ids, different per request after the first `shared`.
        let ids: Vec<u32> = (0..prompt_tokens)
            .map(|j| {
                let who = if j < shared {
                    0
                } else {
                    i as u64 * 7919 + salt
                };
                1000 + ((who + j as u64 * 104_729) % (vocab as u64 / 2)) as u32
            })
            .collect();
        let p = GenParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        rxs.push(engine.submit(ids, p)?);
    }
    let mut out = Vec::with_capacity(n);
    for mut rx in rxs {
        out.push(collect(&mut rx).await?.1);
    }
    Ok(out)
}

/// `dagfleet bench logits`: last-position logits of `tokens`, prefilled then decoded one
/// token at a time for the last 4 (so both paths are checked), as little-endian f32.
pub fn logits(model: &str, tokens: &[u32], out: &std::path::Path, cfg: &Config) -> Result<()> {
    let s = &cfg.inference;
    let device = s.device().map_err(anyhow::Error::msg)?;
    let path = s.resolve(model);
    let (m, _codec) = dagfleet_inference::load_with(&path, &device, &s.load_options())?;
    anyhow::ensure!(tokens.len() > 4, "give more than 4 tokens");
    let mut kv = m.new_kv(tokens.len())?;
    let seq = kv.alloc()?;
    let split = tokens.len() - 4;
    let mut last = m.prefill(&mut kv, seq, &tokens[..split])?;
    for t in &tokens[split..] {
        last = m.decode(&mut kv, &[seq], &[*t])?.squeeze(0)?;
    }
    let v: Vec<f32> = last.to_vec1()?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    println!("wrote {} logits to {}", v.len(), out.display());
    Ok(())
}

/// Settings of `dagfleet bench paged`.
#[derive(clap::Args, Debug)]
pub struct PagedArgs {
    /// A `.gguf` file or a safetensors model directory.
    #[arg(long)]
    model: String,
    /// Prompt lengths of the sequences decoded together (different lengths on purpose).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "17,64,200,333,512,700,1024,1500"
    )]
    lengths: Vec<usize>,
    /// Greedy decode steps compared.
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Batch sizes of the step-time measurement (prompts of `--time-length` tokens).
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    time_batches: Vec<usize>,
    /// Prompt length of the step-time measurement.
    #[arg(long, default_value_t = 512)]
    time_length: usize,
}

/// `dagfleet bench paged`: the same sequences decoded with the device's paged attention and
/// with the reference path; prints one JSON line per comparison and per timing.
pub fn paged(a: PagedArgs, cfg: &Config) -> Result<()> {
    use dagfleet_inference::model::PagedKv;
    let s = &cfg.inference;
    let device = s.device().map_err(anyhow::Error::msg)?;
    let path = s.resolve(&a.model);
    let (m, _codec) = dagfleet_inference::load_with(&path, &device, &s.load_options())?;
    let vocab = m.cfg.vocab as u64;
    let prompt = |i: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|j| 1000 + ((i as u64 * 7919 + j as u64 * 104_729) % (vocab / 2)) as u32)
            .collect()
    };
    let top = |l: &candle_core::Tensor| -> Result<Vec<u32>> {
        Ok(l.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
    };
    // Prefills every sequence (one at a time) and returns the cache, ids and first tokens.
    let start = |lengths: &[usize], reference: bool| -> Result<(PagedKv, Vec<usize>, Vec<u32>)> {
        let budget: usize = lengths.iter().map(|l| l + a.steps + 64).sum();
        let mut kv = m.new_kv(budget.max(a.time_length * 2))?;
        kv.set_reference(reference);
        let (mut ids, mut next) = (Vec::new(), Vec::new());
        for (i, n) in lengths.iter().enumerate() {
            let id = kv.alloc()?;
            let l = m.prefill(&mut kv, id, &prompt(i, *n))?;
            next.push(l.argmax(0)?.to_scalar::<u32>()?);
            ids.push(id);
        }
        Ok((kv, ids, next))
    };
    let (mut kp, ip, mut np) = start(&a.lengths, false)?;
    let (mut kr, ir, mut nr) = start(&a.lengths, true)?;
    let (mut worst, mut same) = (0f32, 0usize);
    for _ in 0..a.steps {
        let lp = m.decode(&mut kp, &ip, &np)?;
        let lr = m.decode(&mut kr, &ir, &nr)?;
        let d = (&lp - &lr)?.abs()?.max_all()?.to_scalar::<f32>()?;
        worst = worst.max(d);
        np = top(&lp)?;
        nr = top(&lr)?;
        same += np.iter().zip(&nr).filter(|(x, y)| x == y).count();
        // Both continue from the reference's tokens, so one early tie does not make every
        // later step differ.
        np.clone_from(&nr);
    }
    let total = a.steps * a.lengths.len();
    println!(
        "{}",
        serde_json::json!({"check": "paged_vs_reference", "device": format!("{device:?}"),
            "lengths": a.lengths, "steps": a.steps, "max_logit_diff": worst,
            "greedy_agree": same, "greedy_total": total})
    );
    for &b in &a.time_batches {
        for reference in [false, true] {
            let lengths = vec![a.time_length; b];
            let (mut kv, ids, mut next) = start(&lengths, reference)?;
            let steps = 8;
            m.decode(&mut kv, &ids, &next)?.to_vec2::<f32>()?;
            let t0 = std::time::Instant::now();
            for _ in 0..steps {
                next = top(&m.decode(&mut kv, &ids, &next)?)?;
            }
            let ms = t0.elapsed().as_secs_f64() * 1000.0 / steps as f64;
            println!(
                "{}",
                serde_json::json!({"timing": if reference { "reference" } else { "paged" },
                    "batch": b, "context": a.time_length, "step_ms": ms,
                    "tok_s": b as f64 * 1000.0 / ms})
            );
        }
    }
    Ok(())
}
