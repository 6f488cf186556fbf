//! The trainer role: LoRA fine-tuning of Llama- and Qwen2-family models with candle, on
//! CUDA (bf16) or the CPU (f32), resumable from checkpoints in the artifact store.
//!
//! # Layout
//! - [`weights`]: the frozen base, from safetensors or dequantized GGUF, in Hugging Face
//!   layout (GGUF names mapped, llama.cpp's q/k permutation undone);
//! - [`lora`]: adapters on any of the seven linear layers of a block;
//! - [`model`]: the forward and hand-written backward pass, activation checkpointing and the
//!   chunked cross-entropy;
//! - [`data`]: ChatML rows → tokens with assistant-only labels → packed or bucketed
//!   micro-batches;
//! - [`optim`]: AdamW, gradient clipping, warm-up schedules;
//! - [`trainer`]: the loop, validation, early stopping, checkpoints;
//! - [`export`]: the PEFT adapter, the merged model (safetensors), GGUF (q8_0, q4_k_m) and an
//!   Ollama Modelfile;
//! - [`report`]: `metrics.csv`, the loss curve (PNG) and `report.md`;
//! - [`run`]: one run from rows to exports, writing through a [`run::Sink`] (the store for
//!   jobs, a directory for `dagfleet train`);
//! - [`role`]: train jobs on the queue.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod export;
pub mod lora;
pub mod model;
pub mod optim;
pub mod report;
pub mod role;
pub mod run;
pub mod trainer;
pub mod weights;

pub use role::{TrainHandler, TrainerSettings};
pub use trainer::{Checkpoint, StepMetrics, Trainer};

/// Why training failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The base model cannot be run as asked.
    #[error("model: {0}")]
    Model(String),
    /// The base model's files, tokenizer or device cannot be used.
    #[error("model: {0}")]
    Files(#[from] dagfleet_models::ModelError),
    /// The rows cannot be used.
    #[error("data: {0}")]
    Data(String),
    /// The loss or the gradients stopped being finite numbers.
    #[error("step {step}: {what}; training stopped and the last good checkpoint is kept (lower train.lr, or check the data)")]
    NonFinite {
        /// The step that went wrong.
        step: u64,
        /// What was not finite.
        what: String,
    },
    /// The device ran out of memory.
    #[error("out of GPU memory ({0}); lower train.micro_batch or train.max_seq_len, or train.loss_chunk, or turn train.activation_checkpointing on")]
    OutOfMemory(String),
    /// A checkpoint cannot be used.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// An export failed.
    #[error("export: {0}")]
    Export(String),
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[source] candle_core::Error),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        let s = e.to_string();
        if s.contains("OUT_OF_MEMORY") || s.to_ascii_lowercase().contains("out of memory") {
            TrainError::OutOfMemory(s)
        } else {
            TrainError::Tensor(e)
        }
    }
}

/// The device to train on: CUDA or Metal when built with the feature and present, else the
/// CPU.
pub fn default_device() -> candle_core::Device {
    dagfleet_models::default_device()
}

/// The compute dtype for `device`: bf16 on GPUs, f32 on the CPU.
pub fn compute_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    }
}

/// This process's device memory: (allocated now, highest allocated since the last
/// [`reset_peak_memory`]), in bytes, where the device reports it (CUDA).
pub fn device_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        return cuda::pool_memory(d);
    }
    let _ = device;
    None
}

/// Resets the high-water mark [`device_memory`] reports.
pub fn reset_peak_memory(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        cuda::reset_peak_memory(d);
    }
    let _ = device;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_says_what_to_lower() {
        let e: TrainError = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        )
        .into();
        let msg = e.to_string();
        assert!(matches!(e, TrainError::OutOfMemory(_)));
        assert!(
            msg.contains("train.micro_batch") && msg.contains("train.max_seq_len"),
            "{msg}"
        );
        let other: TrainError = candle_core::Error::Msg("shape mismatch".into()).into();
        assert!(matches!(other, TrainError::Tensor(_)));
    }
}
