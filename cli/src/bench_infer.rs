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
        "model `{}` on {device:?}; prompts of {} tokens, {} new tokens each\n",
        path.display(),
        a.prompt_tokens,
        a.max_tokens
    );
    println!("| concurrency | TTFT p50 ms | TTFT p99 ms | decode tok/s per stream | aggregate tok/s | wall s | $ / M tokens |");
    println!("|---|---|---|---|---|---|---|");
    // Warm-up: kernels, allocations.
    one_round(&engine, 1, 16, 8, vocab, 0).await?;
    for &c in &a.concurrency {
        let t0 = Instant::now();
        let stats = one_round(&engine, c, a.prompt_tokens, a.max_tokens, vocab, c as u64).await?;
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
                    "usd_per_mtok": usd, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens})
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
    salt: u64,
) -> Result<Vec<dagfleet_inference::GenStats>> {
    let mut rxs = Vec::with_capacity(n);
    for i in 0..n {
        // Ordinary (non-special) token ids, different per request so nothing is shared.
        let ids: Vec<u32> = (0..prompt_tokens)
            .map(|j| {
                1000 + ((i as u64 * 7919 + j as u64 * 104_729 + salt) % (vocab as u64 / 2)) as u32
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
    let mut kv = m.new_kv(1, tokens.len())?;
    let split = tokens.len() - 4;
    let mut last = m.prefill(&mut kv, 0, &tokens[..split])?;
    for t in &tokens[split..] {
        last = m.decode(&mut kv, &[0], &[*t])?.squeeze(0)?;
    }
    let v: Vec<f32> = last.to_vec1()?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    println!("wrote {} logits to {}", v.len(), out.display());
    Ok(())
}
