//! Chunked prefill against one prefill, over SmolLM2-135M's real weights dequantized to f32
//! (`CANDLE_DEQUANTIZE_ALL`, which candle reads once per process: hence a test binary of its
//! own). With the Q4_1 weights as they are, candle's quantized CPU kernels round differently
//! for different numbers of rows (a one-token decode after a prefill differs from one longer
//! prefill by up to ~0.7 in a logit), which would hide a real error in the chunking.

#![allow(clippy::unwrap_used)]

use dagfleet_inference::*;
use dagfleet_tests::smollm2 as model_path;

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
    let mut kv = model.new_kv(2, 64).unwrap();
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
