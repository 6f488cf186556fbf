//! Computations of different shapes that must agree, over SmolLM2-135M's real weights
//! dequantized to f32 (`CANDLE_DEQUANTIZE_ALL`, which candle reads once per process: hence a
//! test binary of its own): chunked prefill against one prefill, several prompts in one pass
//! against each alone, prefix sharing and copy-on-write in the paged KV cache, preemption,
//! and continuous batching against sequential runs. With the Q4_1 weights as they are,
//! candle's quantized CPU kernels round differently for different numbers of rows (a
//! one-token decode after a prefill differs from one longer prefill by up to ~0.7 in a
//! logit), which would hide a real error in any of these.

#![allow(clippy::unwrap_used)]

use dagfleet_inference::engine::collect;
use dagfleet_inference::*;
use dagfleet_tests::smollm2 as model_path;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn greedy(max_tokens: u32) -> GenParams {
    GenParams {
        max_tokens,
        ..Default::default()
    }
}

/// Largest absolute difference between two logit vectors.
fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }]
}

#[test]
fn a_prompt_prefilled_in_chunks_gives_the_logits_of_one_prefill() {
    use candle_core::Device;
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (model, codec) = load(&model_path(), &Device::Cpu).unwrap();
    let text = codec
        .render(&user("Write an Airflow DAG with two BashOperator tasks."))
        .unwrap();
    let ids = codec.encode(&text).unwrap();
    assert!(ids.len() > 20, "{}", ids.len());
    let mut kv = model.new_kv(128).unwrap();
    let (a, b) = (kv.alloc().unwrap(), kv.alloc().unwrap());
    let whole = model.prefill(&mut kv, a, &ids).unwrap();
    // Chunks of 7 tokens, then 1, so the last one is ragged; only the last gives logits.
    let mut pos = 0;
    let mut last = None;
    for n in std::iter::repeat_n(7, ids.len() / 7).chain([ids.len() % 7]) {
        if n == 0 {
            continue;
        }
        let end = pos + n;
        last = model
            .prefill_chunk(&mut kv, b, &ids[pos..end], end == ids.len())
            .unwrap();
        assert_eq!(last.is_some(), end == ids.len());
        pos = end;
    }
    assert_eq!(kv.len(a), kv.len(b));
    let chunked = last.unwrap();
    let d = max_diff(&whole, &chunked);
    assert!(d < 1e-3, "max logit difference {d}");
    // Both slots then decode the same greedy continuation in one batch.
    let mut next = [
        whole.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
        chunked.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
    ];
    for _ in 0..4 {
        let l = model.decode(&mut kv, &[a, b], &next).unwrap();
        let t = l.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(t[0], t[1]);
        next = [t[0], t[1]];
    }
}

/// Greedy continuation of `n` tokens from `first`, for the sequences `seqs` decoding in one
/// batch; returns each sequence's tokens.
fn decode_together(
    model: &model::Model,
    kv: &mut model::PagedKv,
    seqs: &[usize],
    first: &[u32],
    n: usize,
) -> Vec<Vec<u32>> {
    let mut next = first.to_vec();
    let mut out = vec![Vec::new(); seqs.len()];
    for _ in 0..n {
        let l = model.decode(kv, seqs, &next).unwrap();
        next = l.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        for (o, t) in out.iter_mut().zip(&next) {
            o.push(*t);
        }
    }
    out
}

fn argmax(l: &candle_core::Tensor) -> u32 {
    l.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

#[test]
fn a_cached_prefix_is_shared_and_a_write_into_a_shared_block_copies_it() {
    use candle_core::Device;
    use model::BLOCK;
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (model, codec) = load(&model_path(), &Device::Cpu).unwrap();
    let text = codec
        .render(&user(
            "Write an Airflow DAG that extracts orders from Postgres and loads them into S3.",
        ))
        .unwrap();
    let ids = codec.encode(&text).unwrap();
    assert!(ids.len() > 2 * BLOCK + 3, "{}", ids.len());
    let mut kv = model.new_kv(4096).unwrap();
    let a = kv.alloc().unwrap();
    let whole = model.prefill(&mut kv, a, &ids).unwrap();
    let used = kv.used_blocks();
    assert_eq!(used, ids.len().div_ceil(BLOCK));

    // A second sequence with the same prompt takes the full blocks and computes the rest.
    let (b, held) = kv.alloc_prefix(&ids);
    assert_eq!(held, ids.len() / BLOCK * BLOCK);
    assert_eq!(
        kv.used_blocks(),
        used,
        "the full blocks are shared, not copied"
    );
    let l = model
        .prefill_chunk(&mut kv, b, &ids[held..], true)
        .unwrap()
        .unwrap();
    let d = max_diff(&whole, &l);
    assert!(d < 1e-3, "max logit difference {d}");
    assert_eq!(
        kv.used_blocks(),
        used + 1,
        "one block of its own for the tail"
    );
    let both = decode_together(&model, &mut kv, &[a, b], &[argmax(&whole), argmax(&l)], 6);
    assert_eq!(both[0], both[1]);

    // A prompt of whole blocks, found whole: its last token is computed again, into a copy
    // of the last block (the cached one is never written).
    let exact = &ids[..2 * BLOCK];
    let c = kv.alloc().unwrap();
    let lc = model.prefill(&mut kv, c, exact).unwrap();
    let (e, held) = kv.alloc_prefix(exact);
    assert_eq!(held, 2 * BLOCK - 1);
    assert_eq!(
        kv.blocks_needed(e, 1),
        1,
        "copy-on-write of the shared block"
    );
    let before = kv.used_blocks();
    let le = model
        .prefill_chunk(&mut kv, e, &exact[held..], true)
        .unwrap()
        .unwrap();
    assert_eq!(kv.used_blocks(), before + 1);
    let d = max_diff(&lc, &le);
    assert!(d < 1e-3, "max logit difference {d}");
    // The original block still holds what it held: c and e decode the same tokens, and a
    // third sequence still finds both blocks cached.
    let both = decode_together(&model, &mut kv, &[c, e], &[argmax(&lc), argmax(&le)], 6);
    assert_eq!(both[0], both[1]);
    let (f, held) = kv.alloc_prefix(exact);
    assert_eq!(held, 2 * BLOCK - 1);
    // Released sequences leave their registered blocks cached, and new ones reuse them.
    for s in [a, b, c, e, f] {
        kv.release(s);
    }
    assert_eq!(kv.used_blocks(), 0);
    let (g, held) = kv.alloc_prefix(&ids);
    assert_eq!(held, ids.len() / BLOCK * BLOCK);
    kv.release(g);
}

fn engine(cfg: EngineConfig) -> Engine {
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (model, codec) = load(&model_path(), &candle_core::Device::Cpu).unwrap();
    Engine::start(model, codec, cfg, "smollm2".into())
}

/// The greedy answers of `engine` to `prompts`, all submitted at once.
async fn answers(engine: &Engine, prompts: &[String], max_tokens: u32) -> Vec<String> {
    let params = GenParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut rxs = Vec::new();
    for p in prompts {
        rxs.push(engine.submit_chat(&user(p), params.clone()).unwrap());
    }
    let mut out = Vec::new();
    for mut rx in rxs {
        out.push(collect(&mut rx).await.unwrap().0);
    }
    out
}

fn prompts() -> Vec<String> {
    [
        "Write an Airflow DAG with two BashOperator tasks.",
        "What does a sensor do in Airflow?",
        "Name three Airflow operators.",
        "Write a DAG that runs daily at 6am.",
        "Explain XComs in one sentence.",
        "How do I retry a failed task?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test]
async fn preemption_chunked_prefill_and_the_prefix_cache_give_the_greedy_tokens_of_a_lone_run() {
    let prompts = prompts();
    // Each alone, with room to spare: the reference.
    let roomy = engine(EngineConfig {
        max_batch: 1,
        ..Default::default()
    });
    let mut want = Vec::new();
    for p in &prompts {
        want.extend(answers(&roomy, std::slice::from_ref(p), 24).await);
    }
    // All at once in a cache of 10 blocks (160 tokens), prefilled 5 tokens a step: each
    // request needs about 60, so sequences are preempted and recomputed, and the repeated
    // chat header is found in the prefix cache.
    let tight = engine(EngineConfig {
        max_batch: 8,
        kv_budget_tokens: 160,
        prefill_chunk: 5,
        ..Default::default()
    });
    let got = answers(&tight, &prompts, 24).await;
    assert_eq!(got, want);
    let s = &tight.stats;
    assert!(
        s.preempted.load(Ordering::Relaxed) > 0,
        "nothing was preempted"
    );
    assert!(s.prefill_chunks.load(Ordering::Relaxed) > 2 * prompts.len() as u64);
    // The second round finds every prompt's full blocks cached.
    let hits = s.prefix_hit_tokens.load(Ordering::Relaxed);
    let again = answers(&tight, &prompts[..1], 24).await;
    assert_eq!(again[0], want[0]);
    assert!(
        s.prefix_hit_tokens.load(Ordering::Relaxed) >= hits + 16,
        "the repeated prompt was computed again"
    );
}

#[test]
fn several_prompts_prefilled_in_one_pass_give_the_logits_of_each_alone() {
    use candle_core::Device;
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (model, codec) = load(&model_path(), &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = prompts()[..3]
        .iter()
        .map(|p| codec.encode(&codec.render(&user(p)).unwrap()).unwrap())
        .collect();
    // Each alone.
    let alone: Vec<candle_core::Tensor> = ids
        .iter()
        .map(|p| {
            let mut kv = model.new_kv(4096).unwrap();
            let s = kv.alloc().unwrap();
            model.prefill(&mut kv, s, p).unwrap()
        })
        .collect();
    // Together: the first two fresh, the third continuing after its first 9 tokens, and a
    // fourth (the first prompt again, fresh) that wants no logits.
    let mut kv = model.new_kv(4096).unwrap();
    let seqs: Vec<usize> = (0..4).map(|_| kv.alloc().unwrap()).collect();
    model
        .prefill_chunk(&mut kv, seqs[2], &ids[2][..9], false)
        .unwrap();
    let items = [
        (seqs[0], &ids[0][..], true),
        (seqs[1], &ids[1][..], true),
        (seqs[2], &ids[2][9..], true),
        (seqs[3], &ids[0][..], false),
    ];
    let out = model.prefill_batch(&mut kv, &items).unwrap();
    assert!(out[3].is_none());
    for (a, b) in alone.iter().zip(&out) {
        let d = max_diff(a, b.as_ref().unwrap());
        assert!(d < 1e-3, "max logit difference {d}");
    }
    assert_eq!(kv.len(seqs[2]), ids[2].len());
    // And they decode on from there as they would alone.
    let first: Vec<u32> = alone.iter().map(argmax).collect();
    let together = decode_together(&model, &mut kv, &seqs[..3], &first, 4);
    for (i, p) in ids.iter().enumerate() {
        let mut kv1 = model.new_kv(4096).unwrap();
        let s = kv1.alloc().unwrap();
        model.prefill(&mut kv1, s, p).unwrap();
        let one = decode_together(&model, &mut kv1, &[s], &first[i..i + 1], 4);
        assert_eq!(one[0], together[i]);
    }
}

#[tokio::test]
async fn staggered_continuous_batching_matches_sequential_greedy_runs() {
    let prompts = [
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "What does an Airflow DAG do?",
        "Name a color of the rainbow.",
        "Say hello in Spanish.",
        "Explain what a Python list is.",
    ];
    let e = engine(EngineConfig::default());
    let mut sequential = Vec::new();
    for p in prompts {
        sequential.push(e.generate(&user(p), greedy(40)).await.unwrap().0);
    }
    let steps_before = e.stats.steps.load(Ordering::Relaxed);
    let mut rxs = Vec::new();
    for p in prompts {
        rxs.push(e.submit_chat(&user(p), greedy(40)).unwrap());
        // Arrivals while others are mid-generation join at the next token boundary.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut batched = Vec::new();
    let mut tokens = 0;
    for mut rx in rxs {
        let (t, st) = collect(&mut rx).await.unwrap();
        tokens += st.generated_tokens as u64;
        batched.push(t);
    }
    assert_eq!(batched, sequential, "same greedy outputs batched and alone");
    let steps = e.stats.steps.load(Ordering::Relaxed) - steps_before;
    assert!(
        steps < tokens,
        "sequences shared decode steps: {steps} steps for {tokens} tokens"
    );
}
