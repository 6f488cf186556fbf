//! Model files: GGUF headers and tensors, Hugging Face safetensors directories, and the
//! GGML types a safetensors model can be quantized to on load. Pickle checkpoints are
//! refused everywhere: loading one can execute code.

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use crate::config::{hf_config, ModelConfig};
use crate::{bad, ModelError};

/// Opens a GGUF file and reads its header. Pickle checkpoints are refused.
pub fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content), ModelError> {
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
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        bad(
            path,
            format!("not a readable GGUF file ({e}); expected a GGUF v2/v3 model"),
        )
    })?;
    Ok((file, content))
}

/// Reads a Hugging Face model directory: the shape from `config.json` and every tensor of
/// its `*.safetensors` files, on the CPU. Pickle-only directories are refused.
pub fn read_hf_dir(dir: &Path) -> Result<(ModelConfig, HashMap<String, Tensor>), ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        bad(
            &cfg_path,
            format!("cannot read ({e}); a model directory needs config.json"),
        )
    })?;
    let c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::json(&cfg_path, e))?;
    let cfg = hf_config(&cfg_path, &c)?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        let pickles = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
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
        map.extend(
            candle_core::safetensors::load(f, &Device::Cpu)
                .map_err(|e| ModelError::tensor(f, e))?,
        );
    }
    Ok((cfg, map))
}

/// The GGML type a `quantize` setting names: `q4k` (`q4_k_m`), `q6k`, `q8_0`, `q4_0`, `q4_1`.
pub fn ggml_dtype(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q4k" | "q4_k" | "q4_k_m" => GgmlDType::Q4K,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q6k" | "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}
