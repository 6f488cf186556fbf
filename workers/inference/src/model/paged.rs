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

/// Implements candle's `CustomOp3` for an op that runs on CUDA only: the CPU refuses with
/// `$cpu`, and CUDA calls the op's `run::<T>` for a bf16 or f32 first input.
macro_rules! cuda_op3 {
    ($ty:ty, $name:literal, $cpu:literal) => {
        impl CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
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
                bail!($cpu)
            }

            fn cuda_fwd(
                &self,
                a: &CudaStorage,
                la: &Layout,
                b: &CudaStorage,
                lb: &Layout,
                c: &CudaStorage,
                lc: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                match a.dtype() {
                    DType::BF16 => self.run::<half::bf16>(a, la, b, lb, c, lc),
                    DType::F32 => self.run::<f32>(a, la, b, lb, c, lc),
                    other => bail!("{} takes bf16 or f32, not {other:?}", $name),
                }
            }
        }
    };
}

use dagfleet_models::cuda::contiguous as view;

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

cuda_op3!(
    PagedAttention,
    "dagfleet-paged-attention",
    "paged attention runs on CUDA only; the CPU path gathers the rows"
);

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

/// The device pointer view of a contiguous CUDA tensor of element type `T`, and a guard
/// that keeps its storage alive and unchanged on the host side while a kernel uses it.
fn cuda_of<'a, T: candle_core::cuda_backend::CudaDType>(
    guard: &'a Storage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Storage::Cuda(s) = guard else {
        bail!("{what} is not on the GPU");
    };
    view::<T>(s, l, what)
}

/// One decode step's QKV epilogue in one kernel: from the fused projection `qkv`
/// `[n, (heads + 2 kv_heads) d]` (no bias yet), adds `bias`, applies RoPE with the per-row
/// tables (f32 `[n, d/2]`), writes each row's key and value into pool row `rows[i]` of
/// `pools` in place and returns the queries `[n, heads, d]`.
pub(super) fn qkv_rope_write(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    (cos, sin): (&Tensor, &Tensor),
    rows: &Tensor,
    (k, v): (&Tensor, &Tensor),
    (heads, kv_heads, d): (usize, usize, usize),
    neox: bool,
) -> Result<Tensor> {
    let (n, w) = qkv.dims2()?;
    let width = kv_heads * d;
    let ok = w == (heads + 2 * kv_heads) * d
        && d % 2 == 0
        && cos.dims() == [n, d / 2]
        && sin.dims() == [n, d / 2]
        && cos.dtype() == DType::F32
        && sin.dtype() == DType::F32
        && rows.dims() == [n]
        && rows.dtype() == DType::U32
        && k.dims().get(1) == Some(&width)
        && v.dims() == k.dims()
        && k.dtype() == qkv.dtype()
        && bias.is_none_or(|b| b.dims() == [w] && b.dtype() == qkv.dtype());
    if !ok {
        bail!(
            "qkv_rope_write: qkv {:?} {:?}, cos {:?}, rows {:?}, pools {:?}, heads {heads}/{kv_heads}, d {d}",
            qkv.dims(),
            qkv.dtype(),
            cos.dims(),
            rows.dims(),
            k.dims()
        );
    }
    let qkv = qkv.contiguous()?;
    qkv.apply_op3_no_bwd(
        cos,
        sin,
        &QkvRopeWrite {
            bias: bias.cloned(),
            rows: rows.clone(),
            k: k.clone(),
            v: v.clone(),
            heads,
            kv_heads,
            d,
            neox,
        },
    )
}

struct QkvRopeWrite {
    bias: Option<Tensor>,
    rows: Tensor,
    k: Tensor,
    v: Tensor,
    heads: usize,
    kv_heads: usize,
    d: usize,
    neox: bool,
}

cuda_op3!(
    QkvRopeWrite,
    "dagfleet-qkv-rope-write",
    "qkv_rope_write runs on CUDA only; the CPU path uses candle's ops"
);

impl QkvRopeWrite {
    #[allow(clippy::too_many_arguments)]
    fn run<T>(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        c: &CudaStorage,
        lc: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let (n, _) = lq.shape().dims2()?;
        let suffix = if q.dtype() == DType::BF16 {
            "bf16"
        } else {
            "f32"
        };
        let qkv = view::<T>(q, lq, "qkv")?;
        let cos = view::<f32>(c, lc, "cos")?;
        let sin = view::<f32>(s, ls, "sin")?;
        let (rg, rl) = self.rows.storage_and_layout();
        let rows = cuda_of::<u32>(&rg, rl, "the KV rows")?;
        let (kg, kl) = self.k.storage_and_layout();
        let kp = cuda_of::<T>(&kg, kl, "the K pool")?;
        let (vg, vl) = self.v.storage_and_layout();
        let vp = cuda_of::<T>(&vg, vl, "the V pool")?;
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((g, l)) => Some(cuda_of::<T>(g, l, "the qkv bias")?),
            None => None,
        };
        let dev = q.device().clone();
        let (h, kvh, d) = (self.heads, self.kv_heads, self.d);
        // SAFETY: the kernel writes every element of out: block (i, head) for head < heads
        // writes row i's d query values.
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n * h * d)? };
        let func = dev.get_or_load_custom_func(&format!("qkv_rope_write_{suffix}"), MODULE, PTX)?;
        let (hu, kvhu, du) = (h as u32, kvh as u32, d as u32);
        let has_bias = u32::from(bias.is_some());
        let neox = u32::from(self.neox);
        let mut b = func.builder();
        b.arg(&qkv);
        // Without a bias the kernel never reads it; qkv stands in as a valid pointer.
        match &bias {
            Some(x) => b.arg(x),
            None => b.arg(&qkv),
        };
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&rows);
        b.arg(&out);
        b.arg(&kp);
        b.arg(&vp);
        b.arg(&hu);
        b.arg(&kvhu);
        b.arg(&du);
        b.arg(&has_bias);
        b.arg(&neox);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, (h + 2 * kvh) as u32, 1),
            block_dim: ((d / 2) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: qkv holds n * (h + 2 kvh) * d elements, cos and sin n * d/2, rows n pool
        // rows that PagedKv prepared for this step (within the pools, which hold kvh * d per
        // row), the bias (h + 2 kvh) * d; out holds n * h * d. The pools are written in
        // place at those rows only: the scheduler thread that owns them is the caller and
        // does not touch them until the step's later kernels, on the same stream, are done.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((n, h, d)),
        ))
    }
}

/// `silu(gate) · up` from the fused gate/up projection `gu` `[.., 2 inter]` (gate first),
/// `[.., inter]`, in one elementwise kernel.
pub(super) fn swiglu(gu: &Tensor) -> Result<Tensor> {
    let gu = gu.contiguous()?;
    gu.apply_op1_no_bwd(&Swiglu)
}

struct Swiglu;

impl candle_core::CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "dagfleet-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("swiglu runs on CUDA only; the CPU path uses candle's ops")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::BF16 => swiglu_run::<half::bf16>(s, l, "bf16"),
            DType::F32 => swiglu_run::<f32>(s, l, "f32"),
            other => bail!("swiglu takes bf16 or f32, not {other:?}"),
        }
    }
}

fn swiglu_run<T>(s: &CudaStorage, l: &Layout, suffix: &str) -> Result<(CudaStorage, Shape)>
where
    T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
{
    let dims = l.shape().dims();
    let Some((&two, lead)) = dims.split_last() else {
        bail!("swiglu of a scalar");
    };
    if two % 2 != 0 {
        bail!("swiglu: the last dimension {two} is odd");
    }
    let inter = two / 2;
    let total = l.shape().elem_count() / 2;
    let x = view::<T>(s, l, "gate/up")?;
    let dev = s.device().clone();
    // SAFETY: the grid-stride loop writes every one of the `total` outputs.
    let out: CudaSlice<T> = unsafe { dev.alloc::<T>(total)? };
    let func = dev.get_or_load_custom_func(&format!("swiglu_{suffix}"), MODULE, PTX)?;
    let (iu, tu) = (inter as u32, total);
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&out);
    b.arg(&iu);
    b.arg(&tu);
    let blocks = total.div_ceil(256).min(65_535) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds 2 * total elements, out total; the kernel reads row r's gate and up
    // halves and writes out[r * inter + j] only.
    unsafe { b.launch(cfg) }.w()?;
    let mut shape = lead.to_vec();
    shape.push(inter);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shape)))
}
