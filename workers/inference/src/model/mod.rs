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

/// The attention input projections: separate, or one matmul over the three dense weights
/// stacked (`[q; k; v]`, bias kept apart so the CUDA decode step adds it in its fused
/// RoPE + KV-write kernel).
#[derive(Debug, Clone)]
enum Qkv {
    Split { q: Proj, k: Proj, v: Proj },
    Fused { w: QMatMul, bias: Option<Tensor> },
}

/// The MLP's gate and up projections: separate, or one matmul over both stacked
/// (`[gate; up]`).
#[derive(Debug, Clone)]
enum GateUp {
    Split { gate: Proj, up: Proj },
    Fused(QMatMul),
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    qkv: Qkv,
    o: Proj,
    ffn_norm: Tensor,
    gate_up: GateUp,
    down: Proj,
}

impl Layer {
    /// Stacks dense weights without adapters into one matmul each for q/k/v and gate/up:
    /// two launches instead of five per layer.
    fn fuse(self) -> candle_core::Result<Self> {
        fn dense(p: &Proj) -> Option<&Tensor> {
            match (&p.w, &p.lora) {
                (QMatMul::Tensor(t), None) => Some(t),
                _ => None,
            }
        }
        let qkv = match &self.qkv {
            Qkv::Split { q, k, v } => match (dense(q), dense(k), dense(v)) {
                (Some(a), Some(b), Some(c)) => {
                    let w = QMatMul::Tensor(Tensor::cat(&[a, b, c], 0)?);
                    let bias = match (&q.b, &k.b, &v.b) {
                        (Some(x), Some(y), Some(z)) => Some(Tensor::cat(&[x, y, z], 0)?),
                        (None, None, None) => None,
                        _ => return Ok(self),
                    };
                    Qkv::Fused { w, bias }
                }
                _ => self.qkv.clone(),
            },
            f => f.clone(),
        };
        let gate_up = match &self.gate_up {
            GateUp::Split { gate, up } if gate.b.is_none() && up.b.is_none() => {
                match (dense(gate), dense(up)) {
                    (Some(g), Some(u)) => GateUp::Fused(QMatMul::Tensor(Tensor::cat(&[g, u], 0)?)),
                    _ => self.gate_up.clone(),
                }
            }
            f => f.clone(),
        };
        Ok(Self {
            qkv,
            gate_up,
            ..self
        })
    }
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
