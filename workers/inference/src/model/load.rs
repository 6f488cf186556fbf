//! Building a [`Model`] from a GGUF file or a safetensors directory, with an optional
//! PEFT adapter.

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use dagfleet_models::{
    ggml_dtype, gguf_config, open_gguf, read_hf_dir, Arch, ModelConfig, ModelError,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::adapter::Adapter;
use super::{Embed, GateUp, Layer, Model, Proj, Qkv};

fn bad(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::invalid(path, msg)
}

/// Weight source: a GGUF file or a safetensors directory.
enum Source {
    Gguf {
        content: gguf_file::Content,
        file: std::fs::File,
    },
    St {
        map: HashMap<String, Tensor>,
        quantize: Option<GgmlDType>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SrcKind {
    Gguf,
    St,
}

/// A weight as loaded: quantized (GGUF, or quantized on load) or dense.
#[derive(Clone)]
enum W {
    Q(Arc<QTensor>),
    D(Tensor),
}

impl Source {
    /// Loads the weight `gguf_name` (GGUF) / `hf_name` (safetensors); `matmul` weights are
    /// quantized on load when asked.
    fn get(
        &mut self,
        gguf_name: &str,
        hf_name: &str,
        dev: &Device,
        matmul: bool,
    ) -> Result<Option<W>, String> {
        match self {
            Source::Gguf { content, file } => {
                if !content.tensor_infos.contains_key(gguf_name) {
                    return Ok(None);
                }
                content
                    .tensor(file, gguf_name, dev)
                    .map(|t| Some(W::Q(Arc::new(t))))
                    .map_err(|e| format!("tensor `{gguf_name}`: {e}"))
            }
            Source::St { map, quantize } => match map.get(hf_name) {
                None => Ok(None),
                Some(t) => {
                    let err = |e: candle_core::Error| format!("tensor `{hf_name}`: {e}");
                    match quantize {
                        Some(q) if matmul => {
                            let f = t.to_dtype(DType::F32).map_err(err)?;
                            QTensor::quantize_onto(&f, *q, dev)
                                .map(|q| Some(W::Q(Arc::new(q))))
                                .map_err(err)
                        }
                        _ => t.to_device(dev).map(|t| Some(W::D(t))).map_err(err),
                    }
                }
            },
        }
    }
}

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Quantize a safetensors model's matmul weights on load: `q4k`, `q8_0`, `q4_0`.
    pub quantize: Option<String>,
    /// A LoRA adapter in PEFT layout (`adapter_config.json`, `adapter_model.safetensors`):
    /// merged into dense weights on load, run beside quantized ones (a 4-bit grid would
    /// round the update away).
    pub adapter: Option<std::path::PathBuf>,
}

impl Model {
    /// Loads a model from a `.gguf` file or a safetensors directory (config.json plus
    /// `*.safetensors`). Pickle checkpoints (`.bin`, `.pt`, `.pth`) are refused: loading them
    /// can run code.
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(path, device, &LoadOptions::default())
    }

    /// [`Model::load`] with options.
    pub fn load_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(bad(path, "no such model file or directory"));
        }
        if path.is_dir() {
            let quantize = match &opts.quantize {
                None => None,
                Some(q) => Some(ggml_dtype(q).ok_or_else(|| {
                    bad(
                        path,
                        format!("quantize `{q}` must be one of q4k, q6k, q8_0, q4_0, q4_1"),
                    )
                })?),
            };
            return Self::load_safetensors(path, device, quantize, opts);
        }
        let (file, content) = open_gguf(path)?;
        let cfg = gguf_config(path, &file, &content)?;
        Self::build(path, cfg, Source::Gguf { content, file }, device, opts)
    }

    fn load_safetensors(
        dir: &Path,
        device: &Device,
        quantize: Option<GgmlDType>,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let (cfg, map) = read_hf_dir(dir)?;
        Self::build(dir, cfg, Source::St { map, quantize }, device, opts)
    }

    fn build(
        path: &Path,
        cfg: ModelConfig,
        mut src: Source,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let mut adapter = match &opts.adapter {
            Some(dir) => Some(Adapter::load(dir)?),
            None => None,
        };
        let src_kind = match &src {
            Source::Gguf { .. } => SrcKind::Gguf,
            Source::St { .. } => SrcKind::St,
        };
        // Quantized matmuls take f32 activations; dense GPU weights run in bf16.
        let dtype = match &src {
            Source::St { quantize: None, .. } if !device.is_cpu() => DType::BF16,
            _ => DType::F32,
        };
        let mut need = |g: &str, h: &str, matmul: bool| -> Result<W, ModelError> {
            src.get(g, h, device, matmul)
                .map_err(|e| bad(path, e))?
                .ok_or_else(|| bad(path, format!("weight `{g}` (`{h}`) is missing")))
        };
        let dense = |w: W| -> Result<Tensor, ModelError> {
            match w {
                W::Q(q) => q.dequantize(device),
                W::D(t) => Ok(t),
            }
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| bad(path, e))
        };
        let qm = |w: W| -> Result<QMatMul, ModelError> {
            match w {
                W::Q(q) => QMatMul::from_arc(q),
                W::D(t) => t.to_dtype(dtype).map(QMatMul::Tensor),
            }
            .map_err(|e| bad(path, e))
        };
        let embed_w = need("token_embd.weight", "model.embed_tokens.weight", false)?;
        let embed = match &embed_w {
            W::Q(q) => Embed::Q(q.clone()),
            W::D(t) => Embed::D(t.to_dtype(dtype).map_err(|e| bad(path, e))?),
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let g = |n: &str| format!("blk.{i}.{n}");
            let h = |n: &str| format!("model.layers.{i}.{n}");
            let mut proj = |gn: &str, hn: &str, bias: bool| -> Result<Proj, ModelError> {
                let mut w = need(
                    &g(&format!("{gn}.weight")),
                    &h(&format!("{hn}.weight")),
                    true,
                )?;
                let mut lora = None;
                if let Some(ad) = adapter.as_mut() {
                    if let Some((a, b)) = ad.deltas.remove(&h(hn)) {
                        let err = |e: candle_core::Error| {
                            bad(path, format!("adapter for `{}`: {e}", h(hn)))
                        };
                        let (out, inp) = match &w {
                            W::Q(q) => q.shape().dims2(),
                            W::D(t) => t.dims2(),
                        }
                        .map_err(|e| bad(path, e))?;
                        if b.dims() != [out, a.dims()[0]] || a.dims()[1..] != [inp] {
                            return Err(bad(
                                path,
                                format!(
                                    "adapter for `{}` has shapes A {:?}, B {:?}; the weight is [{out}, {inp}]",
                                    h(hn),
                                    a.dims(),
                                    b.dims()
                                ),
                            ));
                        }
                        // llama.cpp's converter permutes Llama q/k rows for interleaved RoPE;
                        // the rows of an HF-layout delta B·A are B's rows, permuted the same way.
                        let sb = (b.to_dtype(DType::F32).map_err(err)? * ad.scale).map_err(err)?;
                        let sb = match (&src_kind, gn) {
                            (SrcKind::Gguf, "attn_q" | "attn_k") if cfg.arch == Arch::Llama => {
                                let heads = if gn == "attn_q" {
                                    cfg.heads
                                } else {
                                    cfg.kv_heads
                                };
                                let r = sb.dims()[1];
                                sb.reshape((heads, 2, out / heads / 2, r))
                                    .and_then(|d| d.transpose(1, 2))
                                    .and_then(|d| d.contiguous())
                                    .and_then(|d| d.reshape((out, r)))
                                    .map_err(err)?
                            }
                            _ => sb,
                        };
                        match &w {
                            // A 4-bit grid would round a LoRA update away: beside quantized
                            // weights the adapter runs unmerged, y = Wx + (sB)(Ax), exactly.
                            W::Q(q)
                                if !matches!(
                                    q.dtype(),
                                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                                ) =>
                            {
                                let a = a
                                    .to_dtype(DType::F32)
                                    .and_then(|a| a.to_device(device))
                                    .map_err(err)?;
                                let sb = sb.to_device(device).map_err(err)?;
                                lora = Some((a, sb));
                            }
                            // Dense weights take the update merged: W' = W + sB·A.
                            _ => {
                                let base = match &w {
                                    W::Q(q) => q.dequantize(device),
                                    W::D(t) => t.to_dtype(DType::F32),
                                }
                                .map_err(|e| bad(path, e))?;
                                let delta = sb
                                    .matmul(&a.to_dtype(DType::F32).map_err(err)?)
                                    .and_then(|d| d.to_device(device))
                                    .map_err(err)?;
                                w = W::D((base + delta).map_err(|e| bad(path, e))?);
                            }
                        }
                    }
                }
                let w = qm(w)?;
                let b = if bias {
                    Some(dense(need(
                        &g(&format!("{gn}.bias")),
                        &h(&format!("{hn}.bias")),
                        false,
                    )?)?)
                } else {
                    None
                };
                Ok(Proj { w, b, lora })
            };
            let qwen = cfg.arch == Arch::Qwen2;
            let q = proj("attn_q", "self_attn.q_proj", qwen)?;
            let k = proj("attn_k", "self_attn.k_proj", qwen)?;
            let v = proj("attn_v", "self_attn.v_proj", qwen)?;
            let o = proj("attn_output", "self_attn.o_proj", false)?;
            let gate = proj("ffn_gate", "mlp.gate_proj", false)?;
            let up = proj("ffn_up", "mlp.up_proj", false)?;
            let down = proj("ffn_down", "mlp.down_proj", false)?;
            let attn_norm = dense(need(
                &g("attn_norm.weight"),
                &h("input_layernorm.weight"),
                false,
            )?)?;
            let ffn_norm = dense(need(
                &g("ffn_norm.weight"),
                &h("post_attention_layernorm.weight"),
                false,
            )?)?;
            let layer = Layer {
                attn_norm,
                qkv: Qkv::Split { q, k, v },
                o,
                ffn_norm,
                gate_up: GateUp::Split { gate, up },
                down,
            };
            layers.push(layer.fuse().map_err(|e| ModelError::tensor(path, e))?);
        }
        if let Some(ad) = &adapter {
            if let Some(m) = ad.deltas.keys().next() {
                return Err(bad(
                    path,
                    format!("the adapter targets `{m}`, which this model does not have"),
                ));
            }
        }
        let norm = dense(need("output_norm.weight", "model.norm.weight", false)?)?;
        let lm_head = match src
            .get("output.weight", "lm_head.weight", device, true)
            .map_err(|e| bad(path, e))?
        {
            Some(w) => qm(w)?,
            None => qm(embed_w)?, // tied embeddings
        };
        let (cos, sin) = dagfleet_models::rope::tables(&cfg, cfg.context, device, dtype)
            .map_err(|e| ModelError::tensor(path, e))?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            dtype,
        })
    }
}
