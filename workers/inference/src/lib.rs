//! The inference role: continuous-batching generation with candle on CUDA, Metal or CPU.
//!
//! - [`model`]: Llama- and Qwen2-family decoders loaded from GGUF or safetensors (read by
//!   `dagfleet-models`), one KV cache per sequence;
//! - [`engine`]: the scheduler thread (continuous batching within a KV token budget,
//!   sampling, stop strings, finish reasons, timings);
//! - [`server`] (feature `server`): the OpenAI-compatible HTTP server and `dagfleet serve`;
//! - [`role`]: inference-batch jobs on the queue.
//!
//! The tokenizer and chat template ([`TextCodec`]) and device selection come from
//! `dagfleet-models`, shared with the trainer.

pub mod agent;
pub mod engine;
pub mod model;
pub mod role;
#[cfg(feature = "server")]
pub mod server;

use std::path::Path;

pub use dagfleet_models::{default_device, device_named, ChatMessage, ModelError, TextCodec};
pub use engine::{Engine, EngineConfig, FinishReason, GenEvent, GenParams, GenStats};
pub use model::Model;
pub use role::{InferHandler, InferenceSettings, SettingsExt};

/// Why inference failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// The model cannot be loaded.
    #[error("model: {0}")]
    Model(#[source] ModelError),
    /// A tensor operation of the forward pass failed.
    #[error("model: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The engine cannot run the request (its thread stopped, a step failed).
    #[error("model: {0}")]
    Engine(String),
    /// The request cannot be served as asked.
    #[error("bad request: {0}")]
    Request(String),
    /// Too much work queued; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The request ran past the engine's deadline (`inference.engine.deadline`).
    #[error("deadline: {0}")]
    Deadline(String),
}

impl From<ModelError> for InferError {
    /// Text the tokenizer or chat template cannot take is the request's fault; the rest is
    /// the model's.
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Text(m) => InferError::Request(m),
            other => InferError::Model(other),
        }
    }
}

/// Loads a model and its tokenizer from a `.gguf` file or a safetensors directory.
pub fn load(path: &Path, device: &candle_core::Device) -> Result<(Model, TextCodec), InferError> {
    load_with(path, device, &model::LoadOptions::default())
}

/// [`load`] with options (e.g. quantizing a safetensors model on load).
pub fn load_with(
    path: &Path,
    device: &candle_core::Device,
    opts: &model::LoadOptions,
) -> Result<(Model, TextCodec), InferError> {
    let model = Model::load_with(path, device, opts)?;
    let codec = if path.is_dir() {
        TextCodec::from_dir(path)?
    } else {
        TextCodec::from_gguf(path)?
    };
    Ok((model, codec))
}
