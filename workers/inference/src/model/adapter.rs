//! PEFT LoRA adapters (`adapter_config.json`, `adapter_model.safetensors`).

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use dagfleet_models::ModelError;

fn bad(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::invalid(path, msg)
}

/// A PEFT LoRA adapter: per module (HF name without `.weight`), `(A [r, in], B [out, r])`.
pub(super) struct Adapter {
    pub(super) scale: f64,
    pub(super) deltas: HashMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    pub(super) fn load(dir: &Path) -> Result<Self, ModelError> {
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
