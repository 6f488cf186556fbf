//! What the inference and trainer roles share about a model, so neither links the other:
//!
//! - [`config`]: architecture and shape ([`ModelConfig`]) from GGUF metadata or
//!   `config.json`;
//! - [`formats`]: GGUF files and Hugging Face safetensors directories (pickles refused);
//! - [`names`]: GGUF ↔ Hugging Face tensor names and llama.cpp's q/k permutation;
//! - [`rope`]: RoPE tables;
//! - [`tokenizer`]: tokenizer and chat template ([`TextCodec`]);
//! - [`device`]: device selection.

pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod formats;
pub mod names;
pub mod rope;
pub mod tokenizer;

use std::path::{Path, PathBuf};

pub use config::{gguf_config, hf_config, Arch, ModelConfig};
pub use device::{default_device, device_named};
pub use formats::{ggml_dtype, open_gguf, read_hf_dir};
pub use tokenizer::{ChatMessage, TextCodec};

/// Why a model, its tokenizer or a device cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A model file or directory is not what it must be (missing weight, bad shape,
    /// unsupported architecture, truncated file, pickle checkpoint, ...).
    #[error("{}: {msg}", path.display())]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong, and what would do instead.
        msg: String,
    },
    /// A file cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A tensor cannot be read or built.
    #[error("{}: {source}", path.display())]
    Tensor {
        /// The file the tensor came from.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// Text cannot be rendered with the chat template, tokenized or detokenized.
    #[error("{0}")]
    Text(String),
    /// The device a setting names is not available in this build or on this machine.
    #[error("{setting}: {source} ({hint})")]
    Device {
        /// The setting and its value.
        setting: String,
        /// What would make it available.
        hint: String,
        /// The cause.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// A setting's value is not one of those allowed.
    #[error("{0}")]
    Setting(String),
}

impl ModelError {
    /// [`ModelError::Invalid`] for `path`.
    pub fn invalid(path: &Path, msg: impl std::fmt::Display) -> Self {
        ModelError::Invalid {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }

    /// [`ModelError::Io`] for `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// [`ModelError::Json`] for `path`.
    pub fn json(path: &Path, source: serde_json::Error) -> Self {
        ModelError::Json {
            path: path.to_path_buf(),
            source,
        }
    }

    /// [`ModelError::Tensor`] for `path`.
    pub fn tensor(path: &Path, source: candle_core::Error) -> Self {
        ModelError::Tensor {
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    }
}

pub(crate) fn bad(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::invalid(path, msg)
}
