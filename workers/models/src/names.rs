//! The tensor names of the Llama/Qwen2 families in GGUF and in Hugging Face layout, and
//! llama.cpp's q/k row permutation between them.

use candle_core::Tensor;

/// Whole-model tensors: (GGUF, Hugging Face).
const TOP: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer modules: (GGUF, Hugging Face), under `blk.N.` and `model.layers.N.`.
const LAYER: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// `name` mapped through the tables from side `from` (0: GGUF, 1: HF) to the other.
fn map(name: &str, from: usize) -> Option<String> {
    let pick = |p: &(&'static str, &'static str), i: usize| if i == 0 { p.0 } else { p.1 };
    if let Some(p) = TOP.iter().find(|p| pick(p, from) == name) {
        return Some(pick(p, 1 - from).to_string());
    }
    let prefixes = ["blk.", "model.layers."];
    let rest = name.strip_prefix(prefixes[from])?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let p = LAYER.iter().find(|p| pick(p, from) == module)?;
    Some(format!(
        "{}{layer}.{}.{suffix}",
        prefixes[1 - from],
        pick(p, 1 - from)
    ))
}

/// The Hugging Face name of a GGUF tensor of the Llama/Qwen2 families, e.g.
/// `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    map(name, 0)
}

/// The GGUF name of a Hugging Face tensor; the inverse of [`gguf_to_hf`].
pub fn hf_to_gguf(name: &str) -> Option<String> {
    map(name, 1)
}

/// llama.cpp's converter reorders the rows of Llama q/k weights (and biases) so that RoPE
/// rotates adjacent pairs: `reshape(heads, 2, d/2, ..).swap(1, 2)`. `to_gguf` applies that
/// order; otherwise it is undone.
pub fn permute_qk(t: &Tensor, heads: usize, to_gguf: bool) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let inner: usize = dims[1..].iter().product::<usize>().max(1);
    let half = out / heads / 2;
    let x = if to_gguf {
        t.reshape((heads, 2, half, inner))?
    } else {
        t.reshape((heads, half, 2, inner))?
    };
    x.transpose(1, 2)?.contiguous()?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
        ] {
            assert_eq!(gguf_to_hf(g).as_deref(), Some(h));
            assert_eq!(hf_to_gguf(h).as_deref(), Some(g));
        }
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
        assert_eq!(gguf_to_hf("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn qk_permutation_is_llama_cpps_and_undoes() {
        // 2 heads of dim 4, 3 inputs: rows h*4 + j. llama.cpp's order for one head is
        // [0, 2, 1, 3] (first half and second half interleaved).
        let rows: Vec<f32> = (0..8).flat_map(|r| [r as f32; 3]).collect();
        let t = Tensor::from_vec(rows, (8, 3), &Device::Cpu).unwrap();
        let g = permute_qk(&t, 2, true).unwrap();
        let col: Vec<f32> = g
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = permute_qk(&g, 2, false).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        // Biases too.
        let b = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        let gb = permute_qk(&b, 2, true).unwrap();
        assert_eq!(
            gb.to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
    }
}
