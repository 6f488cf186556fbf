//! The frozen base model in Hugging Face layout: read from a safetensors directory, or
//! dequantized from GGUF (Q4_K_M, Q4_1, Q8_0, ...) with GGUF names mapped to Hugging Face
//! names and llama.cpp's q/k row permutation undone.
//!
//! Training, the PEFT adapter and the merged export all use the Hugging Face layout, so an
//! adapter trained on a GGUF base loads in `peft` on top of the original checkpoint.

use candle_core::{DType, Device, Tensor};
use dagfleet_models::names::{gguf_to_hf, permute_qk};
use dagfleet_models::{gguf_config, open_gguf, read_hf_dir, Arch, ModelConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::TrainError;

/// The frozen weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `input_layernorm.weight`.
    pub attn_norm: Tensor,
    /// `self_attn.{q,k,v,o}_proj.weight`, `[out, in]`.
    pub q: Tensor,
    /// See `q`.
    pub k: Tensor,
    /// See `q`.
    pub v: Tensor,
    /// See `q`.
    pub o: Tensor,
    /// q/k/v biases (Qwen2).
    pub q_b: Option<Tensor>,
    /// See `q_b`.
    pub k_b: Option<Tensor>,
    /// See `q_b`.
    pub v_b: Option<Tensor>,
    /// `post_attention_layernorm.weight`.
    pub ffn_norm: Tensor,
    /// `mlp.{gate,up,down}_proj.weight`.
    pub gate: Tensor,
    /// See `gate`.
    pub up: Tensor,
    /// See `gate`.
    pub down: Tensor,
}

/// Where the base came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseFormat {
    /// A GGUF file, dequantized on load.
    Gguf(PathBuf),
    /// A Hugging Face safetensors directory.
    Dir(PathBuf),
}

/// A frozen base model, dense, in the compute dtype, on the training device.
#[derive(Debug)]
pub struct BaseWeights {
    /// Shape.
    pub cfg: ModelConfig,
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// `model.norm.weight`.
    pub norm: Tensor,
    /// `lm_head.weight`; `None` when tied to the embeddings.
    pub lm_head: Option<Tensor>,
    /// Where the weights came from.
    pub format: BaseFormat,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::Files(dagfleet_models::ModelError::invalid(path, msg))
}

impl BaseWeights {
    /// Loads a base model from a `.gguf` file or a safetensors directory, dense in `dtype`
    /// on `device`.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self, TrainError> {
        if !path.exists() {
            return Err(bad(path, "no such model file or directory"));
        }
        if path.is_dir() {
            let (cfg, map) = read_hf_dir(path)?;
            return Self::from_map(path, cfg, map, device, dtype, BaseFormat::Dir(path.into()));
        }
        let (mut file, content) = open_gguf(path)?;
        let cfg = gguf_config(path, &file, &content)?;
        let mut map = HashMap::new();
        for name in content.tensor_infos.keys() {
            let Some(hf) = gguf_to_hf(name) else {
                // e.g. rope_freqs: derived from the config, not trained.
                continue;
            };
            let q = content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| bad(path, format!("tensor `{name}`: {e}")))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| bad(path, format!("dequantizing `{name}`: {e}")))?;
            if cfg.arch == Arch::Llama {
                if name.contains(".attn_q.") {
                    t = permute_qk(&t, cfg.heads, false).map_err(|e| bad(path, e))?;
                } else if name.contains(".attn_k.") {
                    t = permute_qk(&t, cfg.kv_heads, false).map_err(|e| bad(path, e))?;
                }
            }
            map.insert(hf, t);
        }
        let mut cfg = cfg;
        // Training runs HF layout everywhere: NeoX RoPE.
        cfg.rope_neox = true;
        Self::from_map(path, cfg, map, device, dtype, BaseFormat::Gguf(path.into()))
    }

    /// Builds from Hugging Face-named tensors.
    pub fn from_map(
        path: &Path,
        cfg: ModelConfig,
        mut map: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
        format: BaseFormat,
    ) -> Result<Self, TrainError> {
        let mut take = |name: &str| -> Result<Option<Tensor>, TrainError> {
            match map.remove(name) {
                None => Ok(None),
                Some(t) => t
                    .to_dtype(dtype)
                    .and_then(|t| t.to_device(device))
                    .map(Some)
                    .map_err(|e| bad(path, format!("`{name}`: {e}"))),
            }
        };
        let mut need = |name: &str| -> Result<Tensor, TrainError> {
            take(name)?.ok_or_else(|| bad(path, format!("weight `{name}` is missing")))
        };
        let embed = need("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            let l = LayerWeights {
                attn_norm: need(&n("input_layernorm.weight"))?,
                q: need(&n("self_attn.q_proj.weight"))?,
                k: need(&n("self_attn.k_proj.weight"))?,
                v: need(&n("self_attn.v_proj.weight"))?,
                o: need(&n("self_attn.o_proj.weight"))?,
                q_b: None,
                k_b: None,
                v_b: None,
                ffn_norm: need(&n("post_attention_layernorm.weight"))?,
                gate: need(&n("mlp.gate_proj.weight"))?,
                up: need(&n("mlp.up_proj.weight"))?,
                down: need(&n("mlp.down_proj.weight"))?,
            };
            layers.push(l);
        }
        let norm = need("model.norm.weight")?;
        for (i, l) in layers.iter_mut().enumerate() {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            l.q_b = take(&n("self_attn.q_proj.bias"))?;
            l.k_b = take(&n("self_attn.k_proj.bias"))?;
            l.v_b = take(&n("self_attn.v_proj.bias"))?;
        }
        let lm_head = take("lm_head.weight")?;
        for (i, l) in layers.iter().enumerate() {
            let want = [
                (&l.q, cfg.heads * cfg.head_dim, cfg.hidden, "q_proj"),
                (&l.k, cfg.kv_heads * cfg.head_dim, cfg.hidden, "k_proj"),
                (&l.v, cfg.kv_heads * cfg.head_dim, cfg.hidden, "v_proj"),
                (&l.o, cfg.hidden, cfg.heads * cfg.head_dim, "o_proj"),
                (&l.gate, cfg.intermediate, cfg.hidden, "gate_proj"),
                (&l.up, cfg.intermediate, cfg.hidden, "up_proj"),
                (&l.down, cfg.hidden, cfg.intermediate, "down_proj"),
            ];
            for (t, o, inp, name) in want {
                if t.dims() != [o, inp] {
                    return Err(bad(
                        path,
                        format!(
                            "layer {i} {name} has shape {:?}; the config says [{o}, {inp}]",
                            t.dims()
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            format,
        })
    }

    /// A model of shape `cfg` with seeded random weights (N(0, 0.02) matrices, norms near
    /// 1, small biases for Qwen2): the real shapes for speed benchmarks, and small models
    /// for tests. Generated on `device` in f32, then cast to `dtype`.
    pub fn random(
        cfg: ModelConfig,
        tied: bool,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, TrainError> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut seeds = move || rng.random::<u64>();
        let mut normal = |shape: (usize, usize), std: f64| -> Result<Tensor, TrainError> {
            if device.is_cpu() {
                let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seeds());
                // Irwin–Hall: the sum of 12 uniforms minus 6 is close to N(0, 1).
                let v: Vec<f32> = (0..shape.0 * shape.1)
                    .map(|_| {
                        let s: f64 = (0..12).map(|_| r.random::<f64>()).sum::<f64>() - 6.0;
                        (s * std) as f32
                    })
                    .collect();
                Ok(Tensor::from_vec(v, shape, device)?)
            } else {
                device.set_seed(seeds())?;
                Ok(Tensor::randn(0f32, std as f32, shape, device)?)
            }
        };
        let mut map = HashMap::new();
        let (h, q, kv, i) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.intermediate,
        );
        map.insert(
            "model.embed_tokens.weight".to_string(),
            normal((cfg.vocab, h), 0.02)?,
        );
        for l in 0..cfg.layers {
            let n = |s: &str| format!("model.layers.{l}.{s}");
            let mut put = |name: String, t: Tensor| {
                map.insert(name, t);
            };
            put(
                n("input_layernorm.weight"),
                (normal((1, h), 0.05)? + 1.0)?.flatten_all()?,
            );
            put(
                n("post_attention_layernorm.weight"),
                (normal((1, h), 0.05)? + 1.0)?.flatten_all()?,
            );
            put(n("self_attn.q_proj.weight"), normal((q, h), 0.02)?);
            put(n("self_attn.k_proj.weight"), normal((kv, h), 0.02)?);
            put(n("self_attn.v_proj.weight"), normal((kv, h), 0.02)?);
            put(n("self_attn.o_proj.weight"), normal((h, q), 0.02)?);
            put(n("mlp.gate_proj.weight"), normal((i, h), 0.02)?);
            put(n("mlp.up_proj.weight"), normal((i, h), 0.02)?);
            put(n("mlp.down_proj.weight"), normal((h, i), 0.02)?);
            if cfg.arch == Arch::Qwen2 {
                put(
                    n("self_attn.q_proj.bias"),
                    normal((1, q), 0.02)?.flatten_all()?,
                );
                put(
                    n("self_attn.k_proj.bias"),
                    normal((1, kv), 0.02)?.flatten_all()?,
                );
                put(
                    n("self_attn.v_proj.bias"),
                    normal((1, kv), 0.02)?.flatten_all()?,
                );
            }
        }
        map.insert(
            "model.norm.weight".to_string(),
            (normal((1, h), 0.05)? + 1.0)?.flatten_all()?,
        );
        if !tied {
            map.insert("lm_head.weight".to_string(), normal((cfg.vocab, h), 0.02)?);
        }
        Self::from_map(
            Path::new("<random>"),
            cfg,
            map,
            device,
            dtype,
            BaseFormat::Dir(PathBuf::from("<random>")),
        )
    }

    /// The output projection: `lm_head`, or the embeddings when tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every weight with its Hugging Face name, in a stable order.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            out.push((n("input_layernorm.weight"), &l.attn_norm));
            out.push((n("self_attn.q_proj.weight"), &l.q));
            out.push((n("self_attn.k_proj.weight"), &l.k));
            out.push((n("self_attn.v_proj.weight"), &l.v));
            out.push((n("self_attn.o_proj.weight"), &l.o));
            for (b, s) in [(&l.q_b, "q"), (&l.k_b, "k"), (&l.v_b, "v")] {
                if let Some(b) = b {
                    out.push((n(&format!("self_attn.{s}_proj.bias")), b));
                }
            }
            out.push((n("post_attention_layernorm.weight"), &l.ffn_norm));
            out.push((n("mlp.gate_proj.weight"), &l.gate));
            out.push((n("mlp.up_proj.weight"), &l.up));
            out.push((n("mlp.down_proj.weight"), &l.down));
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// The frozen weight of `module` in `layer`.
    pub fn linear(&self, layer: usize, module: crate::lora::Module) -> &Tensor {
        use crate::lora::Module as M;
        let l = &self.layers[layer];
        match module {
            M::Q => &l.q,
            M::K => &l.k,
            M::V => &l.v,
            M::O => &l.o,
            M::Gate => &l.gate,
            M::Up => &l.up,
            M::Down => &l.down,
        }
    }
}
