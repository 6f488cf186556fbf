//! Fused CUDA kernels of the training step (`cuda/kernels.cu`, compiled to PTX by
//! `build.rs` with the `cuda` feature) as candle custom ops. Each replaces a chain of
//! candle's generic elementwise and broadcast kernels over an attention or vocabulary
//! matrix with one kernel that reads its input once or twice and writes once:
//!
//! - [`masked_softmax`]: attention probabilities with the causal-and-segment mask computed
//!   from segment ids (no mask tensor);
//! - [`softmax_bwd`]: the softmax backward pass per row;
//! - [`row_lse`] and [`ce_grad`]: the cross-entropy's log-sum-exp, and its gradient
//!   `(softmax - onehot) · scale`, written once in the compute dtype;
//! - [`rms_norm_bwd`]: RMSNorm's input gradient in one pass per row;
//! - [`swiglu_bwd`]: both input gradients of `silu(g) · u` in one elementwise pass.
//!
//! The CPU path computes the same functions with candle's ops; a GPU check compares them
//! (`dagfleet bench train --check`).
//!
//! # Unsafe
//! This module is the crate's only `unsafe` code, in two kinds of calls, each marked:
//! allocating an output buffer that the kernel then writes in full (`CudaDevice::alloc`),
//! and launching a kernel (an FFI call whose arguments are checked here: contiguous inputs
//! of the sizes the kernel indexes, outputs allocated to those sizes).
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Tensor,
};

use dagfleet_models::cuda::contiguous;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "dagfleet_trainer_kernels";

fn suffix(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        other => bail!("dagfleet's fused kernels take bf16 or f32, not {other:?}"),
    })
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} runs on CUDA only; the CPU path uses candle's ops")
}

/// Fails with each input's shape and dtype unless `ok`.
fn expect(ok: bool, op: &str, inputs: &[(&str, &Tensor)]) -> Result<()> {
    if ok {
        return Ok(());
    }
    let what: Vec<String> = inputs
        .iter()
        .map(|(n, t)| format!("{n} {:?} {:?}", t.dims(), t.dtype()))
        .collect();
    bail!("{op}: {}", what.join(", "))
}

/// One kernel launch: allocates the output `out` of `n` elements of `T`, loads the
/// [`Kernel`], pushes `args` in the kernel's order (they may name `out`), launches it on `cfg`
/// and returns `out` as candle storage. Every call site states, as its SAFETY note, why
/// the kernel writes all `n` elements and reads only within its inputs.
macro_rules! launch {
    ($k:expr, $out:ident: $t:ty = [$n:expr], $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        // SAFETY: see the call site: the kernel writes every element before it is read.
        let $out: CudaSlice<$t> = unsafe { $k.dev.alloc::<$t>($n)? };
        let func = $k.dev.get_or_load_custom_func(&$k.name, MODULE, PTX)?;
        let mut bld = func.builder();
        $(bld.arg($arg);)*
        // SAFETY: see the call site: inputs and output hold what the kernel indexes.
        unsafe { bld.launch($cfg) }.w()?;
        CudaStorage::wrap_cuda_slice($out, $k.dev.clone())
    }};
}

/// An element type the kernels come in (bf16, f32).
trait Elem: candle_core::cuda_backend::CudaDType + DeviceRepr {}
impl<T: candle_core::cuda_backend::CudaDType + DeviceRepr> Elem for T {}

/// One input of an op: its storage and layout.
type In<'a> = (&'a CudaStorage, &'a Layout);

/// What an op's kernel returns: the output storage and its shape.
type Out = Result<(CudaStorage, Shape)>;

/// The kernel an op launches (`<kernel>_<bf16|f32>`) on its device.
struct Kernel {
    dev: CudaDevice,
    name: String,
}

/// Implements candle's `CustomOp1/2/3` for an op that runs on CUDA only (the CPU path uses
/// candle's ops): the kernel `<kernel>_<bf16|f32>` is chosen by the first input's dtype and
/// the op's `run::<T>` gets its inputs as (storage, layout) pairs.
macro_rules! cuda_only_op {
    (@cuda $self:ident, $kernel:literal, $first:ident, [$($s:ident, $l:ident),+]) => {{
        let k = Kernel {
            dev: $first.device().clone(),
            name: format!("{}_{}", $kernel, suffix($first.dtype())?),
        };
        match $first.dtype() {
            DType::BF16 => $self.run::<half::bf16>(&k, [$(($s, $l)),+]),
            _ => $self.run::<f32>(&k, [$(($s, $l)),+]),
        }
    }};
    // One arm per arity of candle's trait; each method on one line.
    ($ty:ty, $name:literal, $kernel:literal, 1) => {
        impl CustomOp1 for $ty {
            fn name(&self) -> &'static str { $name }
            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> { cpu_only($name) }
            fn cuda_fwd(&self, a: &CudaStorage, la: &Layout) -> Out { cuda_only_op!(@cuda self, $kernel, a, [a, la]) }
        }
    };
    ($ty:ty, $name:literal, $kernel:literal, 2) => {
        impl CustomOp2 for $ty {
            fn name(&self) -> &'static str { $name }
            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> { cpu_only($name) }
            fn cuda_fwd(&self, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Out { cuda_only_op!(@cuda self, $kernel, a, [a, la, b, lb]) }
        }
    };
    ($ty:ty, $name:literal, $kernel:literal, 3) => {
        impl CustomOp3 for $ty {
            fn name(&self) -> &'static str { $name }
            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> { cpu_only($name) }
            #[allow(clippy::too_many_arguments)]
            fn cuda_fwd(&self, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout, c: &CudaStorage, lc: &Layout) -> Out { cuda_only_op!(@cuda self, $kernel, a, [a, la, b, lb, c, lc]) }
        }
    };
}

/// A kernel with one block per row of `x` `[rows, cols]` that takes `(x, a, b, out, cols,
/// scalar)` and writes `out` `[rows, cols]` in `x`'s type; `names` name the inputs in errors.
fn per_row<T: Elem, A: Elem, B: Elem>(
    k: &Kernel,
    [(x, lx), (a, la), (b, lb)]: [In<'_>; 3],
    names: [&str; 3],
    threads: u32,
    scalar: f32,
) -> Out {
    let v = contiguous::<T>(x, lx, names[0])?;
    let a = contiguous::<A>(a, la, names[1])?;
    let b = contiguous::<B>(b, lb, names[2])?;
    let (rows, cols) = lx.shape().dims2()?;
    let c = cols as u32;
    // SAFETY: v and out hold rows * cols elements; a and b hold what the kernel reads for
    // each row, as the public function's shape check ensured; one block per row writes its
    // row of out.
    let out = launch!(k, out: T = [rows * cols], rows_cfg(rows, threads), [&v, &a, &b, &out, &c, &scalar]);
    Ok((out, lx.shape().clone()))
}

/// Attention probabilities of raw scores `s` `[b, heads, t, t]` (already scaled), where
/// query `i` of batch row `bi` sees key `j` when `j <= i` and `seg[bi, j] == seg[bi, i]`.
pub fn masked_softmax(s: &Tensor, seg: &Tensor) -> Result<Tensor> {
    let (b, heads, t, t2) = s.dims4()?;
    let ok = t == t2 && seg.dims() == [b, t] && seg.dtype() == DType::U32;
    expect(ok, "masked_softmax", &[("scores", s), ("segments", seg)])?;
    s.apply_op2_no_bwd(seg, &MaskedSoftmax { t, heads })
}

struct MaskedSoftmax {
    t: usize,
    heads: usize,
}

cuda_only_op!(
    MaskedSoftmax,
    "dagfleet-masked-softmax",
    "masked_softmax",
    2
);

impl MaskedSoftmax {
    fn run<T: Elem>(&self, k: &Kernel, [(s, ls), (seg, lg)]: [In<'_>; 2]) -> Out {
        let x = contiguous::<T>(s, ls, "attention scores")?;
        let g = contiguous::<u32>(seg, lg, "segment ids")?;
        let n = ls.shape().elem_count();
        let (t, h) = (self.t as u32, self.heads as u32);
        // SAFETY: x and out hold rows * t elements, g holds b * t ids; the kernel reads
        // those and writes every element of out, one block per row.
        let out = launch!(k, out: T = [n], rows_cfg(n / self.t, 256), [&x, &out, &g, &t, &h]);
        Ok((out, ls.shape().clone()))
    }
}

/// `p · (dp - Σ_j p · dp)` per row of the last dimension.
pub fn softmax_bwd(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    let ok = p.dims() == dp.dims() && p.dtype() == dp.dtype();
    expect(ok, "softmax_bwd", &[("p", p), ("dp", dp)])?;
    p.apply_op2_no_bwd(dp, &SoftmaxBwd)
}

struct SoftmaxBwd;

cuda_only_op!(SoftmaxBwd, "dagfleet-softmax-bwd", "softmax_bwd", 2);

impl SoftmaxBwd {
    fn run<T: Elem>(&self, k: &Kernel, [(p, lp), (dp, ld)]: [In<'_>; 2]) -> Out {
        let a = contiguous::<T>(p, lp, "probabilities")?;
        let g = contiguous::<T>(dp, ld, "their gradient")?;
        let n = lp.shape().elem_count();
        let t = *lp.shape().dims().last().unwrap_or(&1);
        let tt = t as u32;
        // SAFETY: a, g and out hold rows * t elements; one block per row writes its row.
        let out = launch!(k, out: T = [n], rows_cfg(n / t.max(1), 256), [&a, &g, &out, &tt]);
        Ok((out, lp.shape().clone()))
    }
}

/// `log Σ_j exp(x[r, j])` of each row of a 2-D tensor, f32 `[rows]`.
pub fn row_lse(x: &Tensor) -> Result<Tensor> {
    x.dims2()?;
    x.apply_op1_no_bwd(&RowLse)
}

struct RowLse;

cuda_only_op!(RowLse, "dagfleet-row-lse", "row_lse", 1);

impl RowLse {
    fn run<T: Elem>(&self, k: &Kernel, [(x, l)]: [In<'_>; 1]) -> Out {
        let v = contiguous::<T>(x, l, "logits")?;
        let (rows, cols) = l.shape().dims2()?;
        let c = cols as u32;
        // SAFETY: v holds rows * cols elements, out rows; one block per row writes one value.
        let out = launch!(k, out: f32 = [rows], rows_cfg(rows, 1024), [&v, &out, &c]);
        Ok((out, Shape::from(rows)))
    }
}

/// `(exp(x - lse) - onehot(target)) · scale`, in `x`'s dtype: the cross-entropy gradient
/// with respect to logits `x` `[rows, cols]`, from their log-sum-exp `lse` (f32 `[rows]`)
/// and the labels `target` (u32 `[rows]`).
pub fn ce_grad(x: &Tensor, target: &Tensor, lse: &Tensor, scale: f64) -> Result<Tensor> {
    let (rows, _) = x.dims2()?;
    let ok = target.dims() == [rows] && lse.dims() == [rows] && lse.dtype() == DType::F32;
    expect(
        ok,
        "ce_grad",
        &[("logits", x), ("targets", target), ("lse", lse)],
    )?;
    x.apply_op3_no_bwd(target, lse, &CeGrad(scale as f32))
}

struct CeGrad(f32);

cuda_only_op!(CeGrad, "dagfleet-ce-grad", "ce_grad", 3);

impl CeGrad {
    fn run<T: Elem>(&self, k: &Kernel, ins: [In<'_>; 3]) -> Out {
        // One label and one log-sum-exp per row beside the logits.
        per_row::<T, u32, f32>(k, ins, ["logits", "labels", "log-sum-exp"], 1024, self.0)
    }
}

/// RMSNorm's input gradient: `x`, `dy` `[rows, h]`, `w` `[h]`, all one dtype.
pub fn rms_norm_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let (_, h) = x.dims2()?;
    let ok = w.dims() == [h] && dy.dims() == x.dims();
    let ok = ok && w.dtype() == x.dtype() && dy.dtype() == x.dtype();
    expect(ok, "rms_norm_bwd", &[("x", x), ("w", w), ("dy", dy)])?;
    x.apply_op3_no_bwd(w, dy, &RmsNormBwd(eps as f32))
}

struct RmsNormBwd(f32);

cuda_only_op!(RmsNormBwd, "dagfleet-rms-norm-bwd", "rms_norm_bwd", 3);

impl RmsNormBwd {
    fn run<T: Elem>(&self, k: &Kernel, ins: [In<'_>; 3]) -> Out {
        // The weight `[cols]` and the output gradient `[rows, cols]` beside the input.
        let names = ["norm input", "norm weight", "output gradient"];
        per_row::<T, T, T>(k, ins, names, 256, self.0)
    }
}

/// The gradients `(dg, du)` of `h = silu(g) · u` given `dh`, all of one shape and dtype.
pub fn swiglu_bwd(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let ok = g.dims() == u.dims() && g.dims() == dh.dims();
    let ok = ok && g.dtype() == u.dtype() && g.dtype() == dh.dtype();
    expect(ok, "swiglu_bwd", &[("g", g), ("u", u), ("dh", dh)])?;
    let both = g.apply_op3_no_bwd(u, dh, &SwigluBwd)?;
    Ok((both.get(0)?, both.get(1)?))
}

struct SwigluBwd;

cuda_only_op!(SwigluBwd, "dagfleet-swiglu-bwd", "swiglu_bwd", 3);

impl SwigluBwd {
    fn run<T: Elem>(&self, k: &Kernel, [(g, lg), (u, lu), (dh, ld)]: [In<'_>; 3]) -> Out {
        let a = contiguous::<T>(g, lg, "gate")?;
        let b = contiguous::<T>(u, lu, "up")?;
        let d = contiguous::<T>(dh, ld, "output gradient")?;
        let n = lg.shape().elem_count();
        let nn = n as u64;
        let blocks = n.div_ceil(256).min(65_535 * 8) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: a, b, d hold n elements and out 2n; the grid-stride loop writes both
        // gradients of every element and stays below n.
        let out = launch!(k, out: T = [2 * n], cfg, [&a, &b, &d, &out, &nn]);
        let mut dims = vec![2];
        dims.extend_from_slice(lg.shape().dims());
        Ok((out, Shape::from(dims)))
    }
}

/// This process's device memory as its stream-ordered allocator (candle allocates through
/// the device's default memory pool) counts it: bytes allocated now and their high-water
/// mark since the last [`reset_peak_memory`]; like PyTorch's `memory_allocated` and
/// `max_memory_allocated`, and unlike `nvidia-smi`, other processes are not counted.
pub fn pool_memory(dev: &CudaDevice) -> Option<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let cu = dev.cuda_stream().context().cu_device();
    let attr = |a: sys::CUmemPool_attribute| -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: `cu` is the device of a live context; the pool handle comes from the
        // driver; both attributes are 64-bit values written into `v`.
        unsafe {
            let pool = result::device::get_default_mem_pool(cu).ok()?;
            result::mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()).ok()?;
        }
        Some(v)
    };
    Some((
        attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
    ))
}

/// Resets the high-water mark of [`pool_memory`].
pub fn reset_peak_memory(dev: &CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let cu = dev.cuda_stream().context().cu_device();
    let mut zero: u64 = 0;
    // SAFETY: as in `pool_memory`; the driver resets the mark when 0 is written.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(cu) {
            let _ = result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            );
        }
    }
}
