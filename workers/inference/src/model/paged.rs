//! The CUDA decode attention kernel over the paged KV cache (`kernels/paged_attention.cu`,
//! compiled to PTX by `build.rs` with the `cuda` feature) as a candle custom op. It reads
//! each sequence's K/V rows through its block table where they lie in the pool: no gather,
//! no padding to the longest sequence, no mask tensor. The reference path (gather, masked
//! softmax) runs elsewhere; `dagfleet bench attention` checks the two against each other.
//!
//! # Unsafe
//! Two calls, each marked: allocating the output that the kernel then writes in full, and
//! launching the kernel (an FFI call whose arguments are checked here: contiguous inputs of
//! the shapes the kernel indexes, block ids within the pool, an output of its size).
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "dagfleet_paged_attention";

/// Whether the kernel takes this head size and dtype (64 or 128, bf16 or f32).
pub(super) fn supports(head_dim: usize, dtype: DType) -> bool {
    matches!(head_dim, 64 | 128) && matches!(dtype, DType::BF16 | DType::F32)
}

/// Attention of `q` `[n, heads, d]` over the rows the block tables in `meta` (u32
/// `[n, 1 + blocks]`: length, then block ids) name in the pools `k`, `v`
/// `[rows, kv_heads * d]`; returns `[n, heads, d]` in `q`'s dtype.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    meta: &Tensor,
    kv_heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (n, heads, d) = q.dims3()?;
    let (rows, width) = k.dims2()?;
    let ok = v.dims() == [rows, width]
        && width == kv_heads * d
        && heads % kv_heads == 0
        && meta.dtype() == DType::U32
        && meta.rank() == 2
        && meta.dim(0)? == n
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    if !ok {
        bail!(
            "paged attention: q {:?} {:?}, k {:?}, v {:?}, meta {:?} {:?}, kv_heads {kv_heads}",
            q.dims(),
            q.dtype(),
            k.dims(),
            v.dims(),
            meta.dims(),
            meta.dtype()
        );
    }
    let q = q.contiguous()?;
    q.apply_op3_no_bwd(
        k,
        v,
        &PagedAttention {
            meta: meta.contiguous()?,
            kv_heads,
            scale,
            rows,
        },
    )
}

struct PagedAttention {
    meta: Tensor,
    kv_heads: usize,
    scale: f32,
    rows: usize,
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "dagfleet-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("paged attention runs on CUDA only; the CPU path gathers the rows")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::BF16 => self.run::<half::bf16>(q, lq, k, lk, v, lv),
            DType::F32 => self.run::<f32>(q, lq, k, lk, v, lv),
            other => bail!("paged attention takes bf16 or f32, not {other:?}"),
        }
    }
}

fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("paged attention: {what} must be contiguous"),
    }
}

impl PagedAttention {
    #[allow(clippy::too_many_arguments)]
    fn run<T>(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let (n, heads, d) = lq.shape().dims3()?;
        let suffix = if q.dtype() == DType::BF16 {
            "bf16"
        } else {
            "f32"
        };
        let name = format!("paged_attention_{d}_{suffix}");
        let qv = view::<T>(q, lq, "q")?;
        let kv = view::<T>(k, lk, "the K pool")?;
        let vv = view::<T>(v, lv, "the V pool")?;
        let (ms, ml) = self.meta.storage_and_layout();
        let Storage::Cuda(ms) = &*ms else {
            bail!("paged attention: the block tables are not on the GPU");
        };
        let meta_w = ml.shape().dims2()?.1;
        // Block ids are checked on the host copy the caller built; here the device copy's
        // size must match what the kernel indexes.
        let mv = view::<u32>(ms, ml, "the block tables")?;
        if mv.len() != n * meta_w || (meta_w - 1) * super::BLOCK > self.rows + super::BLOCK {
            bail!(
                "paged attention: block tables {:?} for a pool of {} rows",
                ml.dims(),
                self.rows
            );
        }
        let dev = q.device().clone();
        // SAFETY: the kernel writes every element of out: one block per (sequence, head),
        // each writing its d values.
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n * heads * d)? };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let (h, kvh, mw) = (heads as u32, self.kv_heads as u32, meta_w as u32);
        let mut b = func.builder();
        b.arg(&qv);
        b.arg(&kv);
        b.arg(&vv);
        b.arg(&mv);
        b.arg(&out);
        b.arg(&h);
        b.arg(&kvh);
        b.arg(&mw);
        b.arg(&self.scale);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: q holds n * heads * d elements, the pools rows * kv_heads * d, meta
        // n * meta_w ids; each sequence's length is at most (meta_w - 1) * 16 and its block
        // ids lie within the pool (both written by PagedKv, which hands out only its own
        // blocks); out holds n * heads * d.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((n, heads, d)),
        ))
    }
}
