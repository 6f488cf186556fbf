//! Tokenizer and chat template, read from GGUF metadata or from a model directory
//! (`tokenizer.json`, `tokenizer_config.json`).

use candle_core::quantized::gguf_file;
use minijinja::{context, Environment};
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::{bad, ModelError};

/// The pre-tokenizer regex of Qwen2 (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Llama 3 pre-tokenizer regex (`llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

/// A model's text side: tokenizer, chat template and stop tokens.
pub struct TextCodec {
    tok: Tokenizer,
    template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    add_bos: bool,
    bos_id: Option<u32>,
    /// Token ids that end generation.
    pub stop_ids: BTreeSet<u32>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("vocab", &self.tok.get_vocab_size(true))
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn strings(v: &gguf_file::Value) -> Option<Vec<String>> {
    match v {
        gguf_file::Value::Array(a) => a.iter().map(|x| x.to_string().ok().cloned()).collect(),
        _ => None,
    }
}

fn ints(v: &gguf_file::Value) -> Option<Vec<i64>> {
    match v {
        gguf_file::Value::Array(a) => a
            .iter()
            .map(|x| {
                x.to_i32()
                    .map(i64::from)
                    .or_else(|_| x.to_u32().map(i64::from))
                    .ok()
            })
            .collect(),
        _ => None,
    }
}

impl TextCodec {
    /// Reads the tokenizer and chat template of a GGUF file.
    pub fn from_gguf(path: &Path) -> Result<Self, ModelError> {
        let mut f = std::fs::File::open(path).map_err(|e| bad(path, e))?;
        let c = gguf_file::Content::read(&mut f).map_err(|e| bad(path, e))?;
        let md = &c.metadata;
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(bad(
                path,
                format!(
                    "tokenizer model `{model}` is not supported; supported: gpt2 (byte-level BPE)"
                ),
            ));
        }
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .and_then(strings)
            .ok_or_else(|| bad(path, "tokenizer.ggml.tokens is missing"))?;
        let merges: Vec<(String, String)> = md
            .get("tokenizer.ggml.merges")
            .and_then(strings)
            .ok_or_else(|| bad(path, "tokenizer.ggml.merges is missing"))?
            .into_iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let types = md
            .get("tokenizer.ggml.token_type")
            .and_then(ints)
            .unwrap_or_default();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(path, format!("BPE: {e}")))?;
        let mut tok = Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());
        let split = |re: &str| -> Result<PreTokenizerWrapper, ModelError> {
            Ok(Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| bad(path, e))?
            .into())
        };
        let seq: Vec<PreTokenizerWrapper> = match pre.as_str() {
            "qwen2" | "deepseek-coder" => vec![
                split(QWEN2_SPLIT)?,
                ByteLevel::new(false, false, false).into(),
            ],
            "llama-bpe" | "llama3" => vec![
                split(LLAMA3_SPLIT)?,
                ByteLevel::new(false, false, false).into(),
            ],
            // SmolLM2 and StarCoder: single digits, then GPT-2's byte-level regex.
            "smollm" | "starcoder" | "refact" => vec![
                Digits::new(true).into(),
                ByteLevel::new(false, false, true).into(),
            ],
            _ => vec![ByteLevel::new(false, false, true).into()],
        };
        tok.with_pre_tokenizer(Some(Sequence::new(seq)));
        tok.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        tok.add_special_tokens(special)
            .map_err(|e| bad(path, format!("special tokens: {e}")))?;
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let name = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let mut codec = Self {
            bos: name(bos_id),
            eos: name(eos_id),
            tok,
            template,
            add_bos,
            bos_id,
            stop_ids: eos_id.into_iter().collect(),
        };
        codec.add_chat_stops();
        Ok(codec)
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let tj = dir.join("tokenizer.json");
        let tok = Tokenizer::from_file(&tj).map_err(|e| bad(&tj, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let tokstr = |k: &str| -> Option<String> {
            match &cfg[k] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            }
        };
        let bos = tokstr("bos_token");
        let eos = tokstr("eos_token");
        let bos_id = bos.as_deref().and_then(|b| tok.token_to_id(b));
        let mut codec = Self {
            stop_ids: eos
                .as_deref()
                .and_then(|e| tok.token_to_id(e))
                .into_iter()
                .collect(),
            template: cfg["chat_template"].as_str().map(String::from),
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            bos,
            eos,
            bos_id,
            tok,
        };
        codec.add_chat_stops();
        Ok(codec)
    }

    /// End-of-turn tokens of common chat formats also stop generation.
    fn add_chat_stops(&mut self) {
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = self.tok.token_to_id(t) {
                self.stop_ids.insert(id);
            }
        }
    }

    /// Renders `messages` with the model's chat template (ChatML when it has none), ending
    /// with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        self.render_chat(messages, true)
    }

    /// Renders `messages` with the model's chat template; with `add_generation_prompt` the
    /// text ends with the assistant's turn opened, without it the conversation ends as
    /// written (what a training row looks like).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let Some(t) = &self.template else {
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                ));
            }
            if add_generation_prompt {
                s.push_str("<|im_start|>assistant\n");
            }
            return Ok(s);
        };
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", t).map_err(|e| {
            ModelError::Text(format!("the model's chat template does not parse: {e}"))
        })?;
        let tpl = env
            .get_template("chat")
            .map_err(|e| ModelError::Text(e.to_string()))?;
        tpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        })
        .map_err(|e| ModelError::Text(format!("chat template: {e}")))
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// The model's own chat template, if it has one (ChatML is used when it has none).
    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_deref()
    }

    /// Beginning- and end-of-sequence tokens, as text.
    pub fn bos_eos(&self) -> (Option<&str>, Option<&str>) {
        (self.bos.as_deref(), self.eos.as_deref())
    }

    /// Token ids of `text`; special tokens in it (e.g. `<|im_start|>`) are matched.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| ModelError::Text(format!("tokenizing: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tok
            .decode(ids, true)
            .map_err(|e| ModelError::Text(format!("detokenizing: {e}")))
    }
}
