//! Llama-family and Qwen2-family decoders over candle, with one KV cache per sequence so
//! sequences at different positions decode together in one batch.
//!
//! Weights load from GGUF (quantized matmuls stay quantized: Q4_K_M, Q4_1, Q8_0, ...) or
//! from a Hugging Face safetensors directory. Projections and the MLP run batched over all
//! sequences of a step; attention runs per sequence against its own cache.

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::InferError;

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

/// The KV cache of every running sequence, one slot per sequence: per layer, K and V of shape
/// `[slots, cap, kv_heads * head_dim]`. A decode step writes each sequence's new row with one
/// scatter, gathers the batch's slots with one index-select and attends with padding masked,
/// so a step costs the same number of kernel launches at any batch size.
#[derive(Debug)]
pub struct BatchKv {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    slots: usize,
    cap: usize,
    width: usize,
    lens: Vec<usize>,
    free: Vec<usize>,
    dtype: DType,
    device: Device,
}

impl BatchKv {
    fn zeros(
        layers: usize,
        slots: usize,
        cap: usize,
        width: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Vec<Tensor>, Vec<Tensor>)> {
        let mk = || Tensor::zeros((slots, cap, width), dtype, device);
        let k = (0..layers)
            .map(|_| mk())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = (0..layers)
            .map(|_| mk())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((k, v))
    }

    /// Tokens cached for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// Whether no slot holds tokens.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|l| *l == 0)
    }

    /// Tokens each slot can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// A free slot, growing the store when all are taken.
    pub fn alloc(&mut self) -> candle_core::Result<usize> {
        if let Some(s) = self.free.pop() {
            self.lens[s] = 0;
            return Ok(s);
        }
        let more = self.slots.max(4);
        self.resize(self.slots + more, self.cap)?;
        self.alloc()
    }

    /// Returns `slot` to the pool.
    pub fn release(&mut self, slot: usize) {
        if slot < self.slots && !self.free.contains(&slot) {
            self.lens[slot] = 0;
            self.free.push(slot);
        }
    }

    /// Makes every slot hold at least `tokens` tokens.
    pub fn reserve(&mut self, tokens: usize) -> candle_core::Result<()> {
        if tokens > self.cap {
            let cap = tokens.max(self.cap * 2).div_ceil(64) * 64;
            self.resize(self.slots, cap)?;
        }
        Ok(())
    }

    fn resize(&mut self, slots: usize, cap: usize) -> candle_core::Result<()> {
        let (k, v) = Self::zeros(
            self.k.len(),
            slots,
            cap,
            self.width,
            self.dtype,
            &self.device,
        )?;
        if self.slots > 0 && self.cap > 0 {
            for (new, old) in k.iter().zip(&self.k).chain(v.iter().zip(&self.v)) {
                // old [s0, c0, w] into new [s1, c1, w]: per old slot row block.
                let padded = if cap > self.cap {
                    Tensor::cat(
                        &[
                            old,
                            &Tensor::zeros(
                                (self.slots, cap - self.cap, self.width),
                                self.dtype,
                                &self.device,
                            )?,
                        ],
                        1,
                    )?
                } else {
                    old.clone()
                };
                new.slice_set(&padded, 0, 0)?;
            }
        }
        let old_slots = self.slots;
        self.k = k;
        self.v = v;
        self.free.extend((old_slots..slots).rev());
        self.lens.resize(slots, 0);
        self.slots = slots;
        self.cap = cap;
        Ok(())
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> InferError {
    InferError::Model(format!("{}: {msg}", path.display()))
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

/// A PEFT LoRA adapter: per module (HF name without `.weight`), `(A [r, in], B [out, r])`.
struct Adapter {
    scale: f64,
    deltas: HashMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    fn load(dir: &Path) -> Result<Self, InferError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            bad(
                &cfg_path,
                format!("cannot read ({e}); a PEFT adapter needs adapter_config.json"),
            )
        })?;
        let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&cfg_path, e))?;
        let r = c["r"]
            .as_f64()
            .ok_or_else(|| bad(&cfg_path, "`r` is missing"))?;
        let alpha = c["lora_alpha"].as_f64().unwrap_or(r);
        let scale = if c["use_rslora"].as_bool().unwrap_or(false) {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        let st = dir.join("adapter_model.safetensors");
        if !st.exists() && dir.join("adapter_model.bin").exists() {
            return Err(bad(
                dir,
                "adapter_model.bin is a pickle checkpoint and is refused (loading one can execute code); save the adapter with safe_serialization=True",
            ));
        }
        let tensors = candle_core::safetensors::load(&st, &Device::Cpu).map_err(|e| bad(&st, e))?;
        let mut a: HashMap<String, Tensor> = HashMap::new();
        let mut b: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in tensors {
            // base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
            let k = k
                .strip_prefix("base_model.model.")
                .unwrap_or(&k)
                .to_string();
            if let Some(m) = k.strip_suffix(".lora_A.weight") {
                a.insert(m.to_string(), t);
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                b.insert(m.to_string(), t);
            }
        }
        let mut deltas = HashMap::new();
        for (m, ta) in a {
            let tb = b
                .remove(&m)
                .ok_or_else(|| bad(&st, format!("`{m}` has lora_A but no lora_B")))?;
            deltas.insert(m, (ta, tb));
        }
        if deltas.is_empty() {
            return Err(bad(&st, "no lora_A/lora_B tensors"));
        }
        Ok(Self { scale, deltas })
    }
}

/// Opens a GGUF file and reads its header. Pickle checkpoints are refused.
pub fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content), InferError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "bin" | "pt" | "pth" | "pkl" | "ckpt") {
        return Err(bad(
            path,
            "pickle checkpoints are refused (loading one can execute code); convert it to safetensors or GGUF",
        ));
    }
    let mut file = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        bad(
            path,
            format!("not a readable GGUF file ({e}); expected a GGUF v2/v3 model"),
        )
    })?;
    Ok((file, content))
}

/// The shape of the model in a GGUF file, from its metadata; also checks that the file
/// holds every byte its tensor table promises.
pub fn gguf_config(
    path: &Path,
    file: &std::fs::File,
    content: &gguf_file::Content,
) -> Result<ModelConfig, InferError> {
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
    let get = |k: &str| -> Result<&gguf_file::Value, InferError> {
        md.get(&format!("{arch_name}.{k}"))
            .ok_or_else(|| bad(path, format!("metadata `{arch_name}.{k}` is missing")))
    };
    let u = |k: &str| -> Result<usize, InferError> {
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

/// Reads a Hugging Face model directory: the shape from `config.json` and every tensor of
/// its `*.safetensors` files, on the CPU. Pickle-only directories are refused.
pub fn read_hf_dir(dir: &Path) -> Result<(ModelConfig, HashMap<String, Tensor>), InferError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        bad(
            &cfg_path,
            format!("cannot read ({e}); a model directory needs config.json"),
        )
    })?;
    let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&cfg_path, e))?;
    let arch = match c["model_type"].as_str().unwrap_or("") {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(bad(
                &cfg_path,
                format!("unsupported model_type `{other}`; supported: llama, qwen2"),
            ))
        }
    };
    let n = |k: &str| -> Result<usize, InferError> {
        c[k].as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(&cfg_path, format!("`{k}` is missing")))
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
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| bad(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        let pickles = std::fs::read_dir(dir)
            .map_err(|e| bad(dir, e))?
            .flatten()
            .any(|e| {
                e.path()
                    .extension()
                    .is_some_and(|x| x == "bin" || x == "pt")
            });
        return Err(bad(
            dir,
            if pickles {
                "only pickle checkpoints here, which are refused (loading one can execute code); convert them to safetensors"
            } else {
                "no *.safetensors files"
            },
        ));
    }
    let mut map = HashMap::new();
    for f in &files {
        map.extend(candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| bad(f, e))?);
    }
    Ok((cfg, map))
}

fn ggml_dtype(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q4k" | "q4_k" | "q4_k_m" => GgmlDType::Q4K,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q6k" | "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}

impl Model {
    /// Loads a model from a `.gguf` file or a safetensors directory (config.json plus
    /// `*.safetensors`). Pickle checkpoints (`.bin`, `.pt`, `.pth`) are refused: loading them
    /// can run code.
    pub fn load(path: &Path, device: &Device) -> Result<Self, InferError> {
        Self::load_with(path, device, &LoadOptions::default())
    }

    /// [`Model::load`] with options.
    pub fn load_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Self, InferError> {
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
    ) -> Result<Self, InferError> {
        let (cfg, map) = read_hf_dir(dir)?;
        Self::build(dir, cfg, Source::St { map, quantize }, device, opts)
    }

    fn build(
        path: &Path,
        cfg: ModelConfig,
        mut src: Source,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<Self, InferError> {
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
        let mut need = |g: &str, h: &str, matmul: bool| -> Result<W, InferError> {
            src.get(g, h, device, matmul)
                .map_err(|e| bad(path, e))?
                .ok_or_else(|| bad(path, format!("weight `{g}` (`{h}`) is missing")))
        };
        let dense = |w: W| -> Result<Tensor, InferError> {
            match w {
                W::Q(q) => q.dequantize(device),
                W::D(t) => Ok(t),
            }
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| bad(path, e))
        };
        let qm = |w: W| -> Result<QMatMul, InferError> {
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
            let mut proj = |gn: &str, hn: &str, bias: bool| -> Result<Proj, InferError> {
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
            layers.push(Layer {
                attn_norm,
                q,
                k,
                v,
                o,
                ffn_norm,
                gate,
                up,
                down,
            });
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
        // RoPE tables.
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1f32 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), device).map_err(|e| bad(path, e))?;
        let pos = Tensor::arange(0u32, cfg.context as u32, device)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.reshape((cfg.context, 1)))
            .map_err(|e| bad(path, e))?;
        let freqs = pos.matmul(&inv).map_err(|e| bad(path, e))?;
        let cos = freqs
            .cos()
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| bad(path, e))?;
        let sin = freqs
            .sin()
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| bad(path, e))?;
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

    /// An empty KV store with room for `slots` sequences of `cap` tokens (both grow).
    pub fn new_kv(&self, slots: usize, cap: usize) -> candle_core::Result<BatchKv> {
        let width = self.cfg.kv_heads * self.cfg.head_dim;
        let (k, v) = BatchKv::zeros(self.cfg.layers, slots, cap, width, self.dtype, &self.device)?;
        Ok(BatchKv {
            k,
            v,
            slots,
            cap,
            width,
            lens: vec![0; slots],
            free: (0..slots).rev().collect(),
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if self.cfg.rope_neox {
            candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
        }
    }

    /// Softmax attention of `q` `[b, kvh, rep * t, d]` over `k`, `v` `[b, kvh, l, d]`, with
    /// an additive `mask` broadcastable to `[b, kvh, rep * t, l]`; grouped-query heads share
    /// their K/V without copies.
    fn sdpa(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let scale = 1.0 / (self.cfg.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = att.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(v.dtype())?;
        att.matmul(v)
    }

    /// Runs the prompt of a fresh sequence in `slot` and returns the logits of its last
    /// position, `[vocab]` in f32.
    pub fn prefill(
        &self,
        kv: &mut BatchKv,
        slot: usize,
        tokens: &[u32],
    ) -> candle_core::Result<Tensor> {
        if kv.len(slot) != 0 {
            candle_core::bail!("slot {slot} is not empty");
        }
        match self.prefill_chunk(kv, slot, tokens, true)? {
            Some(l) => Ok(l),
            None => candle_core::bail!("prefill of slot {slot} returned no logits"),
        }
    }

    /// Appends `tokens` to what `slot` already holds (positions `kv.len(slot)..`), attending
    /// over the slot's cached prefix and causally within the chunk, so a long prompt can be
    /// prefilled a chunk at a time: the attention scores are `[heads, chunk, prefix + chunk]`,
    /// never `[heads, prompt, prompt]`. With `logits`, returns those of the chunk's last
    /// position, `[vocab]` in f32.
    pub fn prefill_chunk(
        &self,
        kv: &mut BatchKv,
        slot: usize,
        tokens: &[u32],
        logits: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let t = tokens.len();
        if t == 0 {
            candle_core::bail!("an empty prefill chunk for slot {slot}");
        }
        let start = kv.len(slot);
        let total = start + t;
        if total > self.cos.dim(0)? {
            candle_core::bail!(
                "slot {slot} would hold {total} tokens; the model's positions end at {}",
                self.cos.dim(0)?
            );
        }
        kv.reserve(total)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.lookup(&ids, self.dtype)?.unsqueeze(0)?; // [1, t, hidden]
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let (h, kvh, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let rep = h / kvh;
        // Row i of the chunk (position start + i) sees keys 0..=start + i.
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(causal, (1, 1, 1, t, total), &self.device)?;
        let mask = mask
            .broadcast_as((1, kvh, rep, t, total))?
            .reshape((1, kvh, rep * t, total))?;
        for (l, layer) in self.layers.iter().enumerate() {
            let r = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.eps as f32)?;
            let q = layer
                .q
                .forward(&xn)?
                .reshape((1, t, h, d))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward(&xn)?
                .reshape((1, t, kvh, d))?
                .transpose(1, 2)?;
            let v = layer
                .v
                .forward(&xn)?
                .reshape((1, t, kvh, d))?
                .transpose(1, 2)?;
            let q = self.rope(&q, &cos, &sin)?; // [1, h, t, d]
            let k = self.rope(&k, &cos, &sin)?; // [1, kvh, t, d]
            let v = v.contiguous()?;
            // Into the slot's rows: [t, kvh * d] at row slot * cap + start.
            let rows = |x: &Tensor| x.transpose(1, 2)?.contiguous()?.reshape((t, kvh * d));
            let flat = |c: &Tensor| c.reshape((kv.slots * kv.cap, kv.width));
            flat(&kv.k[l])?.slice_set(&rows(&k)?, 0, slot * kv.cap + start)?;
            flat(&kv.v[l])?.slice_set(&rows(&v)?, 0, slot * kv.cap + start)?;
            // A fresh slot attends over the chunk itself; a continued one over its cache.
            let (kk, vv) = if start == 0 {
                (k, v)
            } else {
                let past = |c: &Tensor| -> candle_core::Result<Tensor> {
                    c.i((slot, 0..total, ..))?
                        .reshape((1, total, kvh, d))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                (past(&kv.k[l])?, past(&kv.v[l])?)
            };
            let q = q.reshape((1, kvh, rep * t, d))?;
            let att = self.sdpa(&q, &kk, &vv, &mask)?;
            let y = att
                .reshape((1, h, t, d))?
                .transpose(1, 2)?
                .reshape((1, t, h * d))?;
            x = (layer.o.forward(&y)? + r)?;
            x = (self.mlp(layer, &x)? + x)?;
        }
        kv.lens[slot] = total;
        if !logits {
            return Ok(None);
        }
        let last = x.i((.., t - 1..t, ..))?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.cfg.eps as f32)?;
        Ok(Some(
            self.lm_head
                .forward(&last)?
                .flatten_all()?
                .to_dtype(DType::F32)?,
        ))
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let xn = candle_nn::ops::rms_norm(x, &layer.ffn_norm, self.cfg.eps as f32)?;
        let g = candle_nn::ops::silu(&layer.gate.forward(&xn)?)?;
        layer.down.forward(&(g * layer.up.forward(&xn)?)?)
    }

    /// One decode step for several sequences at once: `tokens[i]` is the next input of the
    /// sequence in `slots[i]`. Returns logits `[n, vocab]` in f32.
    pub fn decode(
        &self,
        kv: &mut BatchKv,
        slots: &[usize],
        tokens: &[u32],
    ) -> candle_core::Result<Tensor> {
        let n = tokens.len();
        let (h, kvh, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let rep = h / kvh;
        let lens: Vec<usize> = slots.iter().map(|s| kv.len(*s)).collect();
        let max_len = lens.iter().copied().max().unwrap_or(0) + 1;
        kv.reserve(max_len)?;
        let (cap, width) = (kv.cap, kv.width);
        let ids = Tensor::new(tokens, &self.device)?;
        // 2-D activations: a dense matmul over [n, hidden] is one GEMM that reads the weight
        // once; a 3-D [n, 1, hidden] input would broadcast the weight into n GEMVs.
        let mut x = self.embed.lookup(&ids, self.dtype)?; // [n, hidden]
        let pos: Vec<u32> = lens.iter().map(|l| *l as u32).collect();
        let pos_t = Tensor::new(pos.as_slice(), &self.device)?;
        let cos = self
            .cos
            .index_select(&pos_t, 0)?
            .unsqueeze(1)?
            .contiguous()?; // [n, 1, d/2]
        let sin = self
            .sin
            .index_select(&pos_t, 0)?
            .unsqueeze(1)?
            .contiguous()?;
        // Rows the new K/V go to, the slots to gather, and the padding mask.
        let rows: Vec<u32> = slots
            .iter()
            .zip(&lens)
            .flat_map(|(s, l)| std::iter::repeat_n((s * cap + l) as u32, width))
            .collect();
        let rows = Tensor::from_vec(rows, (n, width), &self.device)?;
        let slot_ids: Vec<u32> = slots.iter().map(|s| *s as u32).collect();
        let slot_ids = Tensor::new(slot_ids.as_slice(), &self.device)?;
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|l| (0..max_len).map(move |j| if j > *l { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (n, 1, 1, max_len), &self.device)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let r = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.eps as f32)?;
            let q = layer
                .q
                .forward(&xn)?
                .reshape((n, 1, h, d))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward(&xn)?
                .reshape((n, 1, kvh, d))?
                .transpose(1, 2)?;
            let v = layer.v.forward(&xn)?.reshape((n, 1, kvh, d))?;
            let q = self.rope(&q, &cos, &sin)?; // [n, h, 1, d]
            let k = self.rope(&k, &cos, &sin)?; // [n, kvh, 1, d]
            let flat_k = kv.k[l].reshape((kv.slots * cap, width))?;
            let flat_v = kv.v[l].reshape((kv.slots * cap, width))?;
            flat_k.scatter_set(&rows, &k.reshape((n, width))?.contiguous()?, 0)?;
            flat_v.scatter_set(&rows, &v.reshape((n, width))?.contiguous()?, 0)?;
            let gather = |c: &Tensor| -> candle_core::Result<Tensor> {
                c.index_select(&slot_ids, 0)? // [n, cap, w]
                    .narrow(1, 0, max_len)?
                    .reshape((n, max_len, kvh, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (kk, vv) = (gather(&kv.k[l])?, gather(&kv.v[l])?);
            let q = q.reshape((n, kvh, rep, d))?;
            let y = self.sdpa(&q, &kk, &vv, &mask)?; // [n, kvh, rep, d]
            let y = y.reshape((n, h * d))?;
            x = (layer.o.forward(&y)? + r)?;
            x = (self.mlp(layer, &x)? + x)?;
        }
        for s in slots {
            kv.lens[*s] += 1;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.eps as f32)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// The activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
