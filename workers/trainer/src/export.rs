//! What a fine-tune produces:
//! - the adapter in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors` with
//!   PEFT's tensor names), loadable with `PeftModel.from_pretrained`;
//! - the merged model (`W + alpha/r · B A`) as a Hugging Face directory: safetensors,
//!   `config.json`, tokenizer files;
//! - GGUF files (q8_0, and q4_k_m with llama.cpp's mix of Q4_K and Q6_K) that the inference
//!   role, llama.cpp and Ollama load;
//! - the adapter as a llama.cpp LoRA GGUF, the exact fine-tune over a quantized base;
//! - Ollama `Modelfile`s with the chat template (the q4_k_m merge; the base plus adapter).

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use dagfleet_models::names::{hf_to_gguf, permute_qk};
use dagfleet_models::TextCodec;
use dagfleet_models::{open_gguf, Arch, ModelConfig};
use serde_json::{json, Value};
use std::path::Path;

use crate::lora::Lora;
use crate::model::TrainModel;
use crate::weights::BaseFormat;
use crate::TrainError;

fn ex(msg: impl std::fmt::Display) -> TrainError {
    TrainError::Export(msg.to_string())
}

/// The adapter in PEFT layout: `adapter_config.json` and `adapter_model.safetensors`.
pub fn peft_adapter(lora: &Lora, base_model: &str) -> Result<(Vec<u8>, Vec<u8>), TrainError> {
    let mut targets: Vec<&str> = lora.cfg.targets.iter().map(|m| m.short()).collect();
    targets.sort_unstable();
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.cfg.r,
        "lora_alpha": lora.cfg.alpha,
        "lora_dropout": lora.cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let names = lora.names();
    let cpu = lora.to_cpu()?;
    let tensors: Vec<(String, Tensor)> = names.into_iter().zip(cpu.params).collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(ex)?;
    Ok((serde_json::to_vec_pretty(&cfg).map_err(ex)?, st))
}

/// Every weight of the merged model, Hugging Face names, f32 on the CPU:
/// `W + (alpha / r) · B A` where an adapter exists.
pub fn merged_tensors(
    model: &TrainModel,
    lora: &Lora,
) -> Result<Vec<(String, Tensor)>, TrainError> {
    let scale = lora.cfg.scale();
    let mut out = Vec::new();
    for (name, t) in model.base.named() {
        let mut w = t.to_dtype(DType::F32)?;
        if let Some(rest) = name.strip_prefix("model.layers.") {
            if let Some((layer, module)) = rest.split_once('.') {
                let layer: usize = layer.parse().map_err(ex)?;
                if let Some(m) = crate::lora::Module::ALL
                    .into_iter()
                    .find(|m| module == format!("{}.weight", m.path()))
                {
                    if let Some((a, b)) = lora.get(layer, m) {
                        w = (w + (b.matmul(a)? * scale)?)?;
                    }
                }
            }
        }
        out.push((name, w.to_device(&Device::Cpu)?));
    }
    Ok(out)
}

fn hf_config(cfg: &ModelConfig, tied: bool, dtype: DType, codec: &TextCodec) -> Value {
    let id = |t: Option<&str>| t.and_then(|t| codec.tokenizer().token_to_id(t));
    let (bos, eos) = codec.bos_eos();
    let (arch, ty) = match cfg.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut c = json!({
        "architectures": [arch],
        "model_type": ty,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.context,
        "vocab_size": cfg.vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
        "bos_token_id": id(bos),
        "eos_token_id": id(eos),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
    });
    if cfg.arch == Arch::Qwen2 {
        c["use_sliding_window"] = json!(false);
        c["sliding_window"] = json!(cfg.context);
        c["max_window_layers"] = json!(cfg.layers);
    } else {
        c["attention_bias"] = json!(false);
        c["mlp_bias"] = json!(false);
    }
    c
}

/// The merged model as a Hugging Face directory, files named relative to it. Weights are
/// written in `dtype` (bf16 after GPU training, f32 after CPU training).
pub fn merged_dir(
    merged: &[(String, Tensor)],
    model: &TrainModel,
    codec: &TextCodec,
    dtype: DType,
) -> Result<Vec<(String, Vec<u8>)>, TrainError> {
    let tensors: Vec<(String, Tensor)> = merged
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<_, TrainError>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(ex)?;
    drop(tensors);
    let mut files = vec![("model.safetensors".to_string(), st)];
    let tied = model.base.lm_head.is_none();
    match &model.base.format {
        BaseFormat::Dir(dir) if dir.join("tokenizer.json").exists() => {
            let mut c: Value = std::fs::read_to_string(dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_else(|| hf_config(&model.base.cfg, tied, dtype, codec));
            c["torch_dtype"] = json!(if dtype == DType::BF16 {
                "bfloat16"
            } else {
                "float32"
            });
            files.push((
                "config.json".into(),
                serde_json::to_vec_pretty(&c).map_err(ex)?,
            ));
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "generation_config.json",
                "vocab.json",
                "merges.txt",
            ] {
                if let Ok(b) = std::fs::read(dir.join(f)) {
                    files.push((f.to_string(), b));
                }
            }
        }
        _ => {
            let c = hf_config(&model.base.cfg, tied, dtype, codec);
            files.push((
                "config.json".into(),
                serde_json::to_vec_pretty(&c).map_err(ex)?,
            ));
            let tj = codec.tokenizer().to_string(false).map_err(ex)?;
            files.push(("tokenizer.json".into(), tj.into_bytes()));
            let (bos, eos) = codec.bos_eos();
            let tc = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": eos,
                "chat_template": codec.chat_template(),
                "model_max_length": model.base.cfg.context,
                "clean_up_tokenization_spaces": false,
            });
            files.push((
                "tokenizer_config.json".into(),
                serde_json::to_vec_pretty(&tc).map_err(ex)?,
            ));
            let gc = json!({
                "bos_token_id": c["bos_token_id"],
                "eos_token_id": codec.stop_ids.iter().copied().collect::<Vec<_>>(),
            });
            files.push((
                "generation_config.json".into(),
                serde_json::to_vec_pretty(&gc).map_err(ex)?,
            ));
        }
    }
    Ok(files)
}

/// A GGUF quantization of the merged model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufKind {
    /// Every matrix Q8_0.
    Q8_0,
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K for the output and for attn_v and ffn_down in
    /// about a third of the layers (the first and last eighth and every third between).
    Q4KM,
}

impl GgufKind {
    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            GgufKind::Q8_0 => 7,
            GgufKind::Q4KM => 15,
        }
    }

    /// File-name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            GgufKind::Q8_0 => "q8_0",
            GgufKind::Q4KM => "q4_k_m",
        }
    }
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The GGUF type of tensor `gguf_name` (`[out, in]`) in a `kind` file; like llama.cpp, a
/// K-quant whose row length is not a multiple of 256 falls back (Q4_K → Q5_0, Q6_K → Q8_0).
pub fn gguf_type(
    kind: GgufKind,
    gguf_name: &str,
    dims: &[usize],
    layers: usize,
    tied: bool,
) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let want = match kind {
        GgufKind::Q8_0 => GgmlDType::Q8_0,
        GgufKind::Q4KM => {
            let layer = gguf_name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            let output = gguf_name == "output.weight" || (tied && gguf_name == "token_embd.weight");
            let more = (gguf_name.contains(".attn_v.") || gguf_name.contains(".ffn_down."))
                && layer.is_some_and(|i| use_more_bits(i, layers));
            if output || more {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    let cols = dims[dims.len() - 1];
    match want {
        GgmlDType::Q4K if !cols.is_multiple_of(256) => GgmlDType::Q5_0,
        GgmlDType::Q6K if !cols.is_multiple_of(256) => GgmlDType::Q8_0,
        other => other,
    }
}

/// `general.architecture` of an architecture.
fn gguf_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
    }
}

/// GGUF metadata for the merged model: the base GGUF's own (architecture, tokenizer, chat
/// template), or, for a safetensors base, built from its config and `tokenizer.json`.
fn gguf_metadata(
    model: &TrainModel,
    codec: &TextCodec,
    kind: GgufKind,
    name: &str,
) -> Result<Vec<(String, gguf_file::Value)>, TrainError> {
    use gguf_file::Value as V;
    let mut md: Vec<(String, V)> = Vec::new();
    match &model.base.format {
        BaseFormat::Gguf(path) => {
            let (_, content) = open_gguf(path).map_err(ex)?;
            let mut keys: Vec<_> = content.metadata.into_iter().collect();
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, v) in keys {
                if matches!(
                    k.as_str(),
                    "general.file_type"
                        | "general.alignment"
                        | "general.name"
                        | "general.quantization_version"
                ) {
                    continue;
                }
                md.push((k, v));
            }
        }
        BaseFormat::Dir(dir) => {
            let cfg = &model.base.cfg;
            let arch = gguf_arch(cfg.arch);
            md.push(("general.architecture".into(), V::String(arch.into())));
            let u = |v: usize| V::U32(v as u32);
            md.push((format!("{arch}.context_length"), u(cfg.context)));
            md.push((format!("{arch}.embedding_length"), u(cfg.hidden)));
            md.push((format!("{arch}.block_count"), u(cfg.layers)));
            md.push((format!("{arch}.feed_forward_length"), u(cfg.intermediate)));
            md.push((format!("{arch}.attention.head_count"), u(cfg.heads)));
            md.push((format!("{arch}.attention.head_count_kv"), u(cfg.kv_heads)));
            md.push((format!("{arch}.rope.dimension_count"), u(cfg.head_dim)));
            md.push((format!("{arch}.rope.freq_base"), V::F32(cfg.rope_theta)));
            md.push((
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                V::F32(cfg.eps as f32),
            ));
            md.push((format!("{arch}.vocab_size"), u(cfg.vocab)));
            md.extend(tokenizer_metadata(dir, codec, cfg)?);
        }
    }
    md.push(("general.name".into(), V::String(name.into())));
    md.push(("general.file_type".into(), V::U32(kind.file_type())));
    md.push(("general.quantization_version".into(), V::U32(2)));
    Ok(md)
}

/// `tokenizer.ggml.*` from a Hugging Face `tokenizer.json` (byte-level BPE).
fn tokenizer_metadata(
    dir: &Path,
    codec: &TextCodec,
    cfg: &ModelConfig,
) -> Result<Vec<(String, gguf_file::Value)>, TrainError> {
    use gguf_file::Value as V;
    let path = dir.join("tokenizer.json");
    let tj: Value = serde_json::from_slice(
        &std::fs::read(&path).map_err(|e| ex(format!("{}: {e}", path.display())))?,
    )
    .map_err(|e| ex(format!("{}: {e}", path.display())))?;
    if tj["model"]["type"].as_str() != Some("BPE") {
        return Err(ex(format!(
            "{}: only byte-level BPE tokenizers can be written to GGUF",
            path.display()
        )));
    }
    let vocab = codec.tokenizer().get_vocab(true);
    let n = cfg
        .vocab
        .max(vocab.values().map(|v| *v as usize + 1).max().unwrap_or(0));
    let mut tokens = vec![String::new(); n];
    for (t, i) in &vocab {
        tokens[*i as usize] = t.clone();
    }
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
        }
    }
    let mut types = vec![1i32; n];
    if let Some(added) = tj["added_tokens"].as_array() {
        for a in added {
            if let Some(id) = a["id"].as_u64().filter(|i| (*i as usize) < n) {
                types[id as usize] = if a["special"].as_bool().unwrap_or(false) {
                    3
                } else {
                    4
                };
            }
        }
    }
    let merges: Vec<String> = tj["model"]["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(p) if p.len() == 2 => Some(format!(
                        "{} {}",
                        p[0].as_str().unwrap_or(""),
                        p[1].as_str().unwrap_or("")
                    )),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let pre = match cfg.arch {
        Arch::Qwen2 => "qwen2",
        Arch::Llama if n <= 65_536 => "smollm",
        Arch::Llama => "llama-bpe",
    };
    let (bos, eos) = codec.bos_eos();
    let id = |t: Option<&str>| t.and_then(|t| codec.tokenizer().token_to_id(t));
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), V::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            V::Array(merges.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.add_bos_token".to_string(), V::Bool(false)),
    ];
    if let Some(b) = id(bos) {
        md.push(("tokenizer.ggml.bos_token_id".into(), V::U32(b)));
    }
    if let Some(e) = id(eos) {
        md.push(("tokenizer.ggml.eos_token_id".into(), V::U32(e)));
        md.push(("tokenizer.ggml.padding_token_id".into(), V::U32(e)));
    }
    if let Some(t) = codec.chat_template() {
        md.push(("tokenizer.chat_template".into(), V::String(t.into())));
    }
    Ok(md)
}

/// The merged model as a GGUF file.
pub fn gguf(
    merged: &[(String, Tensor)],
    model: &TrainModel,
    codec: &TextCodec,
    kind: GgufKind,
    name: &str,
) -> Result<Vec<u8>, TrainError> {
    let cfg = &model.base.cfg;
    let tied = model.base.lm_head.is_none();
    let md = gguf_metadata(model, codec, kind, name)?;
    let mut qts: Vec<(String, QTensor)> = Vec::with_capacity(merged.len());
    for (hf, t) in merged {
        let g = hf_to_gguf(hf).ok_or_else(|| ex(format!("no GGUF name for `{hf}`")))?;
        let mut t = t.to_dtype(DType::F32)?;
        if cfg.arch == Arch::Llama {
            if g.starts_with("blk.") && g.contains(".attn_q.") {
                t = permute_qk(&t, cfg.heads, true)?;
            } else if g.starts_with("blk.") && g.contains(".attn_k.") {
                t = permute_qk(&t, cfg.kv_heads, true)?;
            }
        }
        let ty = gguf_type(kind, &g, t.dims(), cfg.layers, tied);
        let q = QTensor::quantize(&t, ty)
            .map_err(|e| ex(format!("quantizing `{g}` to {ty:?}: {e}")))?;
        qts.push((g, q));
    }
    let mut cur = std::io::Cursor::new(Vec::new());
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut cur, &md_refs, &t_refs).map_err(ex)?;
    Ok(cur.into_inner())
}

/// The adapter as a llama.cpp LoRA GGUF (`general.type = adapter`), for `llama-cli --lora`
/// and Ollama's `ADAPTER` on top of the very base it was trained on. Where that base is
/// quantized (QLoRA), this keeps the fine-tune exact: a merged model re-quantized to the
/// base's grid rounds most small updates back to the base's values. Tensors are named as
/// llama.cpp's `convert_lora_to_gguf.py` names them (`blk.N.attn_q.weight.lora_a`, A as
/// `[r, in]` and B as `[out, r]`, f32), with Llama's q/k rows of B in GGUF order.
pub fn gguf_lora(lora: &Lora, model: &TrainModel, name: &str) -> Result<Vec<u8>, TrainError> {
    use gguf_file::Value as V;
    let cfg = &model.base.cfg;
    let md: Vec<(&str, V)> = vec![
        (
            "general.architecture",
            V::String(gguf_arch(cfg.arch).into()),
        ),
        ("general.type", V::String("adapter".into())),
        ("general.name", V::String(name.into())),
        ("adapter.type", V::String("lora".into())),
        ("adapter.lora.alpha", V::F32(lora.cfg.alpha as f32)),
    ];
    let cpu = lora.to_cpu()?;
    let mut qts: Vec<(String, QTensor)> = Vec::with_capacity(cpu.params.len());
    for (peft, t) in lora.names().into_iter().zip(cpu.params) {
        // base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight
        let (module, ab) = peft
            .strip_prefix("base_model.model.")
            .and_then(|r| r.strip_suffix(".weight"))
            .and_then(|r| r.rsplit_once(".lora_"))
            .ok_or_else(|| ex(format!("unexpected adapter tensor name `{peft}`")))?;
        let g = hf_to_gguf(&format!("{module}.weight"))
            .ok_or_else(|| ex(format!("no GGUF name for `{module}`")))?;
        // An owned copy: the adapters are views into one flat buffer, and quantizing reads
        // a tensor's whole storage.
        let mut t = Tensor::from_vec(
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            t.dims(),
            &Device::Cpu,
        )?;
        if ab == "B" && cfg.arch == Arch::Llama {
            if g.contains(".attn_q.") {
                t = permute_qk(&t, cfg.heads, true)?;
            } else if g.contains(".attn_k.") {
                t = permute_qk(&t, cfg.kv_heads, true)?;
            }
        }
        let q = QTensor::quantize(&t, GgmlDType::F32)?;
        qts.push((format!("{g}.lora_{}", ab.to_lowercase()), q));
    }
    let mut cur = std::io::Cursor::new(Vec::new());
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut cur, &md_refs, &t_refs).map_err(ex)?;
    Ok(cur.into_inner())
}

/// An Ollama `Modelfile` for `gguf_file` (a path relative to the Modelfile) with the chat
/// template of ChatML models, the stop tokens and, when given, the training system prompt.
pub fn modelfile(
    gguf_file: &str,
    adapter: Option<&str>,
    codec: &TextCodec,
    system: Option<&str>,
) -> String {
    let chatml = codec
        .chat_template()
        .is_none_or(|t| t.contains("<|im_start|>"));
    let mut s = format!("FROM ./{gguf_file}\n");
    if let Some(a) = adapter {
        s.push_str(&format!("ADAPTER ./{a}\n"));
    }
    s.push('\n');
    if chatml {
        s.push_str(
            "TEMPLATE \"\"\"{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\
{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"\n",
        );
    }
    let mut stops: Vec<String> = codec
        .stop_ids
        .iter()
        .filter_map(|i| codec.tokenizer().id_to_token(*i))
        .collect();
    stops.sort();
    stops.dedup();
    for st in stops {
        s.push_str(&format!("PARAMETER stop \"{st}\"\n"));
    }
    s.push_str("PARAMETER temperature 0.2\n");
    if let Some(sys) = system.filter(|s| !s.is_empty()) {
        s.push_str(&format!(
            "SYSTEM \"\"\"{}\"\"\"\n",
            sys.replace("\"\"\"", "\"")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpps_mix() {
        // Qwen2.5-0.5B: 24 layers, hidden 896 (not a multiple of 256), untied.
        let t = |n: &str, d: &[usize]| gguf_type(GgufKind::Q4KM, n, d, 24, false);
        assert_eq!(t("blk.0.ffn_down.weight", &[896, 4864]), GgmlDType::Q6K);
        assert_eq!(t("blk.3.ffn_down.weight", &[896, 4864]), GgmlDType::Q4K);
        assert_eq!(t("blk.5.ffn_down.weight", &[896, 4864]), GgmlDType::Q6K);
        assert_eq!(t("blk.23.ffn_down.weight", &[896, 4864]), GgmlDType::Q6K);
        // attn_v wants Q6_K in the same layers, but 896 columns fall back to Q8_0.
        assert_eq!(t("blk.0.attn_v.weight", &[128, 896]), GgmlDType::Q8_0);
        assert_eq!(t("blk.4.attn_v.weight", &[128, 896]), GgmlDType::Q5_0);
        assert_eq!(t("output.weight", &[151936, 896]), GgmlDType::Q8_0);
        assert_eq!(t("token_embd.weight", &[151936, 896]), GgmlDType::Q5_0);
        assert_eq!(t("blk.0.attn_norm.weight", &[896]), GgmlDType::F32);
        // 1536 columns (Qwen2.5-1.5B) take Q4_K and Q6_K as they are.
        assert_eq!(
            gguf_type(
                GgufKind::Q4KM,
                "blk.7.attn_q.weight",
                &[1536, 1536],
                28,
                true
            ),
            GgmlDType::Q4K
        );
        assert_eq!(
            gguf_type(
                GgufKind::Q4KM,
                "token_embd.weight",
                &[151936, 1536],
                28,
                true
            ),
            GgmlDType::Q6K
        );
        assert_eq!(
            gguf_type(
                GgufKind::Q8_0,
                "blk.1.ffn_up.weight",
                &[4864, 896],
                24,
                false
            ),
            GgmlDType::Q8_0
        );
    }
}
