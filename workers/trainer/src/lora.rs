//! LoRA adapters: `W x + (alpha / r) · B A dropout(x)` on the chosen linear layers, with A
//! `[r, in]` initialised like PEFT (Kaiming-uniform, bound `1/sqrt(in)`) and B `[out, r]`
//! zero, so training starts from the base model exactly.
//!
//! Parameters are f32 master copies; the forward pass uses copies in the compute dtype.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

use crate::TrainError;
use dagfleet_models::ModelConfig;

/// A linear layer of a decoder block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Module {
    /// Every module, in layer order.
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The PEFT target name, e.g. `q_proj`.
    pub fn short(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn path(self) -> &'static str {
        match self {
            Module::Q => "self_attn.q_proj",
            Module::K => "self_attn.k_proj",
            Module::V => "self_attn.v_proj",
            Module::O => "self_attn.o_proj",
            Module::Gate => "mlp.gate_proj",
            Module::Up => "mlp.up_proj",
            Module::Down => "mlp.down_proj",
        }
    }

    /// From a PEFT target name.
    pub fn from_short(s: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.short() == s)
    }

    /// `(out, in)` of this module in a model of shape `cfg`.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, i) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.intermediate,
        );
        match self {
            Module::Q => (q, h),
            Module::K | Module::V => (kv, h),
            Module::O => (h, q),
            Module::Gate | Module::Up => (i, h),
            Module::Down => (h, i),
        }
    }
}

/// Shape of the adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Alpha; the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout probability on the adapter input.
    pub dropout: f64,
    /// Modules that get adapters.
    pub targets: Vec<Module>,
}

impl LoraConfig {
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// The adapters of every targeted module: `params[2k]` is A and `params[2k + 1]` is B of
/// the `k`-th `(layer, module)` in `index`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// Shape.
    pub cfg: LoraConfig,
    /// `(layer, module)` → k.
    pub index: BTreeMap<(usize, Module), usize>,
    /// A and B of each adapter, f32.
    pub params: Vec<Tensor>,
}

impl Lora {
    /// Fresh adapters: A Kaiming-uniform from `seed`, B zero.
    pub fn init(
        model: &ModelConfig,
        cfg: LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut index = BTreeMap::new();
        let mut params = Vec::new();
        for layer in 0..model.layers {
            for &m in &cfg.targets {
                let (out, inp) = m.dims(model);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..cfg.r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                index.insert((layer, m), params.len() / 2);
                params.push(Tensor::from_vec(a, (cfg.r, inp), device)?);
                params.push(Tensor::zeros((out, cfg.r), DType::F32, device)?);
            }
        }
        Ok(Self { cfg, index, params })
    }

    /// A and B of `(layer, module)`, if it has an adapter.
    pub fn get(&self, layer: usize, m: Module) -> Option<(&Tensor, &Tensor)> {
        self.index
            .get(&(layer, m))
            .map(|k| (&self.params[2 * k], &self.params[2 * k + 1]))
    }

    /// The PEFT name of parameter `i`, e.g.
    /// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub fn peft_name(&self, i: usize) -> String {
        let k = i / 2;
        let (layer, m) = self
            .index
            .iter()
            .find(|(_, v)| **v == k)
            .map(|(k, _)| *k)
            .unwrap_or((0, Module::Q));
        format!(
            "base_model.model.model.layers.{layer}.{}.lora_{}.weight",
            m.path(),
            if i.is_multiple_of(2) { "A" } else { "B" }
        )
    }

    /// Names of every parameter, in `params` order.
    pub fn names(&self) -> Vec<String> {
        let mut by_k: Vec<(usize, Module)> = vec![(0, Module::Q); self.index.len()];
        for (key, k) in &self.index {
            by_k[*k] = *key;
        }
        by_k.iter()
            .flat_map(|(layer, m)| {
                ["A", "B"].map(|ab| {
                    format!(
                        "base_model.model.model.layers.{layer}.{}.lora_{ab}.weight",
                        m.path()
                    )
                })
            })
            .collect()
    }

    /// Number of trainable values.
    pub fn trainable(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }

    /// The adapters on the CPU in f32, moved with one copy. (After an optimizer step the
    /// parameters are views of one flat vector, and copying a view off a GPU copies its
    /// whole buffer: one copy per parameter would move the vector hundreds of times.)
    pub fn to_cpu(&self) -> Result<Lora, TrainError> {
        let flat = crate::optim::AdamW::flatten(&self.params)?.to_device(&Device::Cpu)?;
        Ok(Lora {
            cfg: self.cfg.clone(),
            index: self.index.clone(),
            params: self.split(&flat)?,
        })
    }

    /// Views of `flat` (all parameters in order) shaped like the parameters.
    pub fn split(&self, flat: &Tensor) -> Result<Vec<Tensor>, TrainError> {
        let mut off = 0;
        let mut out = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let n = p.elem_count();
            out.push(flat.narrow(0, off, n)?.reshape(p.dims())?);
            off += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagfleet_models::Arch;

    fn cfg() -> ModelConfig {
        ModelConfig {
            arch: Arch::Qwen2,
            hidden: 8,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            vocab: 16,
            eps: 1e-6,
            rope_theta: 10_000.0,
            context: 32,
            rope_neox: true,
            intermediate: 12,
        }
    }

    #[test]
    fn init_is_seeded_and_starts_from_the_base() {
        let lc = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: Module::ALL.to_vec(),
        };
        let a = Lora::init(&cfg(), lc.clone(), 7, &Device::Cpu).unwrap();
        let b = Lora::init(&cfg(), lc, 7, &Device::Cpu).unwrap();
        assert_eq!(a.params.len(), 2 * 7 * 2);
        for (x, y) in a.params.iter().zip(&b.params) {
            assert_eq!(
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let (qa, qb) = a.get(1, Module::K).unwrap();
        assert_eq!(qa.dims(), [2, 8]);
        assert_eq!(qb.dims(), [4, 2]);
        assert_eq!(qb.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let bound = 1.0 / 8f32.sqrt();
        assert!(qa
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.abs() <= bound));
        let names = a.names();
        assert_eq!(
            names[0],
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(names[3], a.peft_name(3));
        assert_eq!(
            names.last().unwrap(),
            "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
        );
    }
}
