//! Rotary position embedding tables.

use candle_core::{DType, Device, Tensor};

use crate::ModelConfig;

/// The RoPE `(cos, sin)` tables of `cfg` for positions `0..positions`, `[positions,
/// head_dim / 2]` each, computed in f32 and stored in `dtype`.
pub fn tables(
    cfg: &ModelConfig,
    positions: usize,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1f32 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?;
    let freqs = pos.matmul(&inv)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}
