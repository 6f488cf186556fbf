//! What the CUDA kernels of the trainer and of the inference role share on the Rust side
//! (their `.cu` files share `cuda/common.cuh`, their build scripts `cuda/ptx_build.rs`).

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaStorage, Layout, Result};

/// The elements of a contiguous tensor's CUDA storage, as the kernel argument; `what` names
/// the input in the error when it is not contiguous.
pub fn contiguous<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{what} must be contiguous"),
    }
}
