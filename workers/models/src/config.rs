//! A model's shape and numerics, read from GGUF metadata or a Hugging Face `config.json`.

use candle_core::quantized::gguf_file;
use std::path::Path;

use crate::{bad, ModelError};

/// Architecture of a loaded model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM2, Mistral-style.
    Llama,
    /// Qwen2 and Qwen2.5 (biases on q, k, v).
    Qwen2,
}

/// Shape and numerics of a model.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Hidden size.
    pub hidden: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base.
    pub rope_theta: f32,
    /// Longest context.
    pub context: usize,
    /// Whether RoPE rotates halves (NeoX) rather than adjacent pairs.
    pub rope_neox: bool,
    /// MLP width.
    pub intermediate: usize,
}

/// The shape of the model in a GGUF file, from its metadata; also checks that the file
/// holds every byte its tensor table promises.
pub fn gguf_config(
    path: &Path,
    file: &std::fs::File,
    content: &gguf_file::Content,
) -> Result<ModelConfig, ModelError> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(bad(
                path,
                format!("unsupported architecture `{other}`; supported: llama, qwen2"),
            ))
        }
    };
    let get = |k: &str| -> Result<&gguf_file::Value, ModelError> {
        md.get(&format!("{arch_name}.{k}"))
            .ok_or_else(|| bad(path, format!("metadata `{arch_name}.{k}` is missing")))
    };
    let u = |k: &str| -> Result<usize, ModelError> {
        let v = get(k)?;
        v.to_u32()
            .map(|v| v as usize)
            .or_else(|_| v.to_u64().map(|v| v as usize))
            .map_err(|e| bad(path, format!("{k}: {e}")))
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
    let head_dim = u("rope.dimension_count").unwrap_or(hidden / heads);
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let needed = content
        .tensor_infos
        .values()
        .map(|t| {
            t.offset
                + (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size())
                    as u64
        })
        .max()
        .unwrap_or(0)
        + content.tensor_data_offset;
    if file_len < needed {
        return Err(bad(
            path,
            format!("truncated GGUF: the tensors need {needed} bytes, the file has {file_len}"),
        ));
    }
    Ok(ModelConfig {
        arch,
        hidden,
        layers: u("block_count")?,
        heads,
        kv_heads,
        head_dim,
        vocab: content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| bad(path, "tensor `token_embd.weight` is missing"))?,
        eps: get("attention.layer_norm_rms_epsilon")?
            .to_f32()
            .map_err(|e| bad(path, e))? as f64,
        rope_theta: get("rope.freq_base")
            .and_then(|v| v.to_f32().map_err(|e| bad(path, e)))
            .unwrap_or(10_000.0),
        context: u("context_length").unwrap_or(4096),
        // llama.cpp's converter permutes Llama q/k for interleaved RoPE; Qwen2 is NeoX.
        rope_neox: arch == Arch::Qwen2,
        intermediate: u("feed_forward_length")?,
    })
}

/// The shape of a Hugging Face model from its `config.json` (read from `path`).
pub fn hf_config(path: &Path, c: &serde_json::Value) -> Result<ModelConfig, ModelError> {
    let arch = match c["model_type"].as_str().unwrap_or("") {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(bad(
                path,
                format!("unsupported model_type `{other}`; supported: llama, qwen2"),
            ))
        }
    };
    let n = |k: &str| -> Result<usize, ModelError> {
        c[k].as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(path, format!("`{k}` is missing")))
    };
    let hidden = n("hidden_size")?;
    let heads = n("num_attention_heads")?;
    let rope_theta = c["rope_theta"]
        .as_f64()
        .or_else(|| c["rope_parameters"]["rope_theta"].as_f64())
        .unwrap_or(10_000.0) as f32;
    let cfg = ModelConfig {
        arch,
        hidden,
        layers: n("num_hidden_layers")?,
        heads,
        kv_heads: n("num_key_value_heads").unwrap_or(heads),
        head_dim: c["head_dim"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(hidden / heads),
        vocab: n("vocab_size")?,
        eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        rope_theta,
        context: n("max_position_embeddings").unwrap_or(4096),
        rope_neox: true,
        intermediate: n("intermediate_size")?,
    };
    Ok(cfg)
}
