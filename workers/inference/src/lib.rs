//! The inference role: continuous-batching generation with candle on CUDA, Metal or CPU.
//!
//! - [`model`]: Llama- and Qwen2-family decoders loaded from GGUF or safetensors, one KV
//!   cache per sequence;
//! - [`tokenizer`]: tokenizer and chat template from GGUF metadata or `tokenizer.json`;
//! - [`engine`]: the scheduler thread (continuous batching within a KV token budget,
//!   sampling, stop strings, finish reasons, timings);
//! - [`server`]: the OpenAI-compatible HTTP server;
//! - [`role`]: inference-batch jobs on the queue.

pub mod agent;
pub mod engine;
pub mod model;
pub mod role;
pub mod server;
pub mod tokenizer;

use std::path::Path;

pub use engine::{Engine, EngineConfig, FinishReason, GenEvent, GenParams, GenStats};
pub use model::Model;
pub use role::{device_named, InferHandler, InferenceSettings, SettingsExt};
pub use tokenizer::{ChatMessage, TextCodec};

/// Why inference failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// The model cannot be loaded or run.
    #[error("model: {0}")]
    Model(String),
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

/// The device to run on: CUDA or Metal when built with the feature and present, else CPU.
pub fn default_device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = candle_core::Device::new_cuda(0) {
        return d;
    }
    #[cfg(feature = "metal")]
    if let Ok(d) = candle_core::Device::new_metal(0) {
        return d;
    }
    candle_core::Device::Cpu
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
