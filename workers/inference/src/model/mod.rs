//! Llama-family and Qwen2-family decoders over candle over a paged KV cache, so sequences
//! at different positions decode together in one batch.
//!
//! - [`load`]: weights from GGUF (quantized matmuls stay quantized: Q4_K_M, Q4_1, Q8_0, ...)
//!   or a Hugging Face safetensors directory, read by `dagfleet-models`;
//! - [`adapter`]: PEFT LoRA adapters, merged into dense weights or run unmerged beside
//!   quantized ones;
//! - [`kv`]: the paged KV cache (block pool, block tables, prefix sharing, copy-on-write);
//! - `paged` (with `cuda`): the decode attention kernel over the block tables;
//! - [`forward`]: prefill (whole or chunked) and batched decode.
//!
//! Projections and the MLP run batched over all sequences of a step; attention reads each
//! sequence's blocks through its block table.

mod adapter;
mod forward;
mod kv;
mod load;
#[cfg(feature = "cuda")]
mod paged;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

pub use dagfleet_models::{gguf_config, open_gguf, read_hf_dir, Arch, ModelConfig};
pub use kv::{PagedKv, BLOCK};
pub use load::LoadOptions;

/// A weight that multiplies: quantized or dense, with an optional bias, and an unmerged
/// LoRA adapter `(A, scale · B)` beside quantized weights.
#[derive(Debug, Clone)]
struct Proj {
    w: QMatMul,
    b: Option<Tensor>,
    lora: Option<(Tensor, Tensor)>,
}

impl Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = self.w.forward(x)?;
        if let Some((a, sb)) = &self.lora {
            let z = x.broadcast_matmul(&a.t()?)?;
            y = (y + z.broadcast_matmul(&sb.t()?)?)?;
        }
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    ffn_norm: Tensor,
    gate: Proj,
    up: Proj,
    down: Proj,
}

/// The token embedding table.
#[derive(Debug, Clone)]
enum Embed {
    Q(Arc<QTensor>),
    D(Tensor),
}

impl Embed {
    fn lookup(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Embed::Q(q) => q.embedding(ids)?.to_dtype(dtype),
            Embed::D(t) => t.index_select(ids, 0),
        }
    }
}

/// A loaded model.
#[derive(Debug)]
pub struct Model {
    /// Its configuration.
    pub cfg: ModelConfig,
    embed: Embed,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}
