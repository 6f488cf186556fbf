//! The training forward and backward passes of a Llama/Qwen2 decoder with LoRA adapters,
//! written out by hand rather than through candle's autograd.
//!
//! # Why by hand
//! - The base is frozen, so the backward pass needs only input gradients through the base
//!   weights and the small LoRA gradients: no weight gradients of the base are formed.
//! - candle's fused kernels (RMSNorm, RoPE, softmax) have no backward; written out, the
//!   backward uses them too (RoPE's backward is RoPE with `-sin`).
//! - Activation checkpointing is a loop: keep each layer's input, and in the backward pass
//!   run the layer forward again with its intermediates kept, then backward through it.
//! - The cross-entropy over the vocabulary is computed with its gradient in chunks of
//!   positions, so `[tokens, vocab]` logits never exist at once, and only positions that
//!   carry a label (assistant tokens) are scored at all.
//!
//! The gradients are checked against finite differences in f64 (see the tests).
//!
//! # Layout
//! Activations are 2-D `[N, hidden]` (N = batch × sequence) through the projections, so each
//! projection is one GEMM; attention works on `[batch, kv_heads, rep × seq, head_dim]`, so
//! grouped-query heads share K/V without copies.

use candle_core::{DType, Device, Tensor, D};

use crate::lora::{Lora, Module};
use crate::weights::BaseWeights;
use crate::TrainError;

/// A device scalar as f64.
pub fn scalar(t: &Tensor) -> Result<f64, TrainError> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// A micro-batch on the device.
#[derive(Debug)]
pub struct DeviceBatch {
    /// Sequences.
    pub b: usize,
    /// Positions per sequence.
    pub t: usize,
    ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    neg_sin: Tensor,
    /// Additive attention mask `[b, 1, 1, t, t]` (the unfused path).
    mask: Option<Tensor>,
    /// Segment ids `[b, t]` (the fused path builds the mask from them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    seg: Tensor,
    /// Flat positions that predict a label, and the labels, in chunks of `loss_chunk`.
    targets: Vec<(Tensor, Tensor)>,
    /// Positions with a label.
    pub n_targets: usize,
}

/// A micro-batch on the host: token ids, RoPE positions, segments (attention stays within
/// a segment) and next-token labels, each `[b * t]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBatch {
    /// Sequences.
    pub b: usize,
    /// Positions per sequence.
    pub t: usize,
    /// Token ids.
    pub ids: Vec<u32>,
    /// Position of each token within its row.
    pub pos: Vec<u32>,
    /// Segment of each token; padding has a segment of its own per position.
    pub seg: Vec<u32>,
    /// Flat positions `i` whose next token `ids[i + 1]` is a label.
    pub target_pos: Vec<u32>,
    /// The labels, `ids[i + 1]` for each `target_pos`.
    pub targets: Vec<u32>,
    /// Tokens that are not padding.
    pub real_tokens: usize,
}

/// LoRA weights for one optimizer step, in the compute dtype: A and `scale · B`.
#[derive(Debug)]
pub struct LoraCompute {
    a: Vec<Tensor>,
    sb: Vec<Tensor>,
    scale: f64,
    dropout: f64,
}

#[derive(Debug)]
struct LinCache {
    /// The adapter's input after dropout, when dropout is on.
    xd: Option<Tensor>,
    mask: Option<Tensor>,
    /// `A · xd`, `[N, r]`.
    z: Tensor,
}

#[derive(Debug)]
struct LayerCache {
    xn1: Tensor,
    q: Option<LinCache>,
    k: Option<LinCache>,
    v: Option<LinCache>,
    qs: Tensor,
    kr: Tensor,
    v4: Tensor,
    p: Tensor,
    o2: Tensor,
    o: Option<LinCache>,
    x2: Tensor,
    xn2: Tensor,
    g: Tensor,
    u: Tensor,
    h: Tensor,
    gate: Option<LinCache>,
    up: Option<LinCache>,
    down: Option<LinCache>,
}

/// Seeds of the dropout masks of one micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct DropoutSeed(pub u64);

impl DropoutSeed {
    fn for_module(self, layer: usize, m: Module) -> u64 {
        // SplitMix64 of (seed, layer, module): distinct, stable streams.
        let mut z = self
            .0
            .wrapping_add((layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add((m as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A base model ready for training: frozen weights, RoPE tables, compute dtype and device.
#[derive(Debug)]
pub struct TrainModel {
    /// The frozen weights.
    pub base: BaseWeights,
    /// Activation dtype: bf16 on GPUs, f32 on the CPU.
    pub dtype: DType,
    device: Device,
    cos: Tensor,
    sin: Tensor,
    /// Attention scores, softmax and its backward in f32 (else in the compute dtype, with
    /// f32 accumulation inside the fused softmax).
    attn_f32: bool,
    /// Use the fused CUDA kernels (see `cuda.rs`); off on other devices.
    fused: std::sync::atomic::AtomicBool,
    /// Phase timings, when `DAGFLEET_TRAIN_PROFILE` is set (the device is synchronised
    /// around each phase, which slows training down).
    prof: Option<std::sync::Mutex<std::collections::BTreeMap<&'static str, (f64, u64)>>>,
}

/// The dtype softmax, norms and the loss accumulate in: f32, or f64 for f64 models (the
/// gradient checks).
fn acc_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm: candle's fused kernel, or the composed version for f64 (which the kernel lacks).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F64 {
        candle_nn::ops::rms_norm_slow(x, w, eps as f32)
    } else {
        candle_nn::ops::rms_norm(x, w, eps as f32)
    }
}

fn rms_norm_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let acc = acc_dtype(dt);
    let xf = x.to_dtype(acc)?;
    let rstd = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let xhat = xf.broadcast_mul(&rstd)?;
    let g = dy.to_dtype(acc)?.broadcast_mul(&w.to_dtype(acc)?)?;
    let c = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    (g - xhat.broadcast_mul(&c)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(dt)
}

impl TrainModel {
    /// Wraps `base` (already in `dtype` on `device`), with RoPE tables for `max_len`
    /// positions.
    pub fn new(base: BaseWeights, max_len: usize) -> Result<Self, TrainError> {
        let device = base.embed.device().clone();
        let dtype = base.embed.dtype();
        let cfg = &base.cfg;
        let len = max_len.max(cfg.context).max(1);
        let (cos, sin) = dagfleet_models::rope::tables(cfg, len, &device, dtype)?;
        Ok(Self {
            cos,
            sin,
            attn_f32: match std::env::var("DAGFLEET_TRAIN_ATTN_F32").ok().as_deref() {
                Some("1") | Some("true") => true,
                Some("0") | Some("false") => false,
                _ => acc_dtype(dtype) == dtype,
            },
            prof: std::env::var_os("DAGFLEET_TRAIN_PROFILE").map(|_| Default::default()),
            fused: std::sync::atomic::AtomicBool::new(
                cfg!(feature = "cuda")
                    && device.is_cuda()
                    && std::env::var("DAGFLEET_TRAIN_FUSED").as_deref() != Ok("0"),
            ),
            base,
            dtype,
            device,
        })
    }

    /// Whether the fused CUDA kernels are in use.
    pub fn fused(&self) -> bool {
        self.fused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the fused CUDA kernels on or off (on only where built in and on CUDA); for
    /// comparing the two paths.
    pub fn set_fused(&self, on: bool) {
        self.fused.store(
            on && cfg!(feature = "cuda") && self.device.is_cuda(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn tick(&self) -> Option<std::time::Instant> {
        self.prof.as_ref().map(|_| {
            let _ = self.device.synchronize();
            std::time::Instant::now()
        })
    }

    fn tock(&self, name: &'static str, t: Option<std::time::Instant>) {
        if let (Some(p), Some(t)) = (&self.prof, t) {
            let _ = self.device.synchronize();
            let mut m = p.lock().unwrap_or_else(|e| e.into_inner());
            let e = m.entry(name).or_default();
            e.0 += t.elapsed().as_secs_f64();
            e.1 += 1;
        }
    }

    /// The phase timings so far (`DAGFLEET_TRAIN_PROFILE`), milliseconds per call and in
    /// all, slowest first; resets them.
    pub fn profile(&self) -> Option<String> {
        let p = self.prof.as_ref()?;
        let mut m = p.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, (s, n))| (*k, *s, *n)).collect();
        m.clear();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = v.iter().map(|x| x.1).sum();
        let mut out = String::from(
            "| phase | calls | ms in all | ms per call | share |\n|---|---|---|---|---|\n",
        );
        for (k, s, n) in v {
            out.push_str(&format!(
                "| {k} | {n} | {:.1} | {:.3} | {:.1}% |\n",
                s * 1e3,
                s * 1e3 / n.max(1) as f64,
                100.0 * s / total.max(1e-12)
            ));
        }
        Some(out)
    }

    /// The most device memory this process had allocated since the last call (0 where the
    /// device does not say): the CUDA allocator's high-water mark, then reset.
    pub fn peak_memory(&self) -> u64 {
        let high = crate::device_memory(&self.device).map_or(0, |(_, h)| h);
        crate::reset_peak_memory(&self.device);
        high
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest position the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Copies the adapters into the compute dtype for a step.
    pub fn lora_compute(&self, lora: &Lora) -> Result<LoraCompute, TrainError> {
        let scale = lora.cfg.scale();
        let mut a = Vec::with_capacity(lora.params.len() / 2);
        let mut sb = Vec::with_capacity(lora.params.len() / 2);
        for pair in lora.params.chunks(2) {
            a.push(pair[0].to_dtype(self.dtype)?);
            sb.push((&pair[1] * scale)?.to_dtype(self.dtype)?);
        }
        Ok(LoraCompute {
            a,
            sb,
            scale,
            dropout: lora.cfg.dropout,
        })
    }

    /// Moves a host batch to the device, with its attention mask and RoPE rows.
    pub fn upload(&self, hb: &HostBatch, loss_chunk: usize) -> Result<DeviceBatch, TrainError> {
        let (b, t) = (hb.b, hb.t);
        let n = b * t;
        if hb.ids.len() != n || hb.pos.len() != n || hb.seg.len() != n {
            return Err(TrainError::Data(format!(
                "a micro-batch of {b} x {t} has {} ids, {} positions, {} segments",
                hb.ids.len(),
                hb.pos.len(),
                hb.seg.len()
            )));
        }
        if let Some(p) = hb.pos.iter().find(|p| **p as usize >= self.max_positions()) {
            return Err(TrainError::Data(format!(
                "position {p} is beyond the {} positions the model covers",
                self.max_positions()
            )));
        }
        let dev = &self.device;
        let half = self.base.cfg.head_dim / 2;
        let ids = Tensor::new(hb.ids.as_slice(), dev)?;
        let pos = Tensor::new(hb.pos.as_slice(), dev)?;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, t, half))?;
        let neg_sin = sin.neg()?;
        // Attention is allowed where the key is in the query's segment and not after it.
        let seg = Tensor::new(hb.seg.as_slice(), dev)?.reshape((b, t))?;
        let mask = if self.fused() {
            None
        } else {
            let same = seg
                .unsqueeze(2)?
                .broadcast_eq(&seg.unsqueeze(1)?)?
                .to_dtype(DType::U8)?;
            let causal: Vec<u8> = (0..t)
                .flat_map(|i| (0..t).map(move |j| u8::from(j <= i)))
                .collect();
            let causal = Tensor::from_vec(causal, (1, t, t), dev)?;
            let allowed = same.broadcast_mul(&causal)?;
            let acc = acc_dtype(self.dtype);
            let zeros = Tensor::zeros((b, t, t), acc, dev)?;
            let ninf = Tensor::full(f32::NEG_INFINITY, (b, t, t), dev)?.to_dtype(acc)?;
            Some(
                allowed
                    .where_cond(&zeros, &ninf)?
                    .reshape((b, 1, 1, t, t))?,
            )
        };
        let mut targets = Vec::new();
        for (p, l) in hb
            .target_pos
            .chunks(loss_chunk.max(1))
            .zip(hb.targets.chunks(loss_chunk.max(1)))
        {
            targets.push((Tensor::new(p, dev)?, Tensor::new(l, dev)?));
        }
        Ok(DeviceBatch {
            b,
            t,
            ids,
            cos,
            sin,
            neg_sin,
            mask,
            seg,
            targets,
            n_targets: hb.targets.len(),
        })
    }

    fn dropout_mask(&self, shape: (usize, usize), p: f64, seed: u64) -> Result<Tensor, TrainError> {
        let keep = 1.0 / (1.0 - p);
        let m = if self.device.is_cpu() {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| {
                    if rng.random::<f64>() >= p {
                        keep as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_vec(v, shape, &self.device)?
        } else {
            // A fresh generator per mask from the derived seed: the recomputed forward pass
            // and a resumed job draw the same masks.
            self.device.set_seed(seed)?;
            let u = Tensor::rand(0f32, 1f32, shape, &self.device)?;
            (u.ge(p)?.to_dtype(DType::F32)? * keep)?
        };
        Ok(m.to_dtype(self.dtype)?)
    }

    /// `x Wᵀ + b + scale · B A dropout(x)`.
    #[allow(clippy::too_many_arguments)]
    fn lin_fwd(
        &self,
        x: &Tensor,
        layer: usize,
        m: Module,
        bias: Option<&Tensor>,
        lora: &Lora,
        lc: &LoraCompute,
        seed: Option<DropoutSeed>,
    ) -> Result<(Tensor, Option<LinCache>), TrainError> {
        let w = self.base.linear(layer, m);
        let mut y = x.matmul(&w.t()?)?;
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        let Some(&k) = lora.index.get(&(layer, m)) else {
            return Ok((y, None));
        };
        let (xd, mask) = match seed {
            Some(s) if lc.dropout > 0.0 => {
                let mask = self.dropout_mask(x.dims2()?, lc.dropout, s.for_module(layer, m))?;
                ((x * &mask)?, Some(mask))
            }
            _ => (x.clone(), None),
        };
        let z = xd.matmul(&lc.a[k].t()?)?;
        let y = (y + z.matmul(&lc.sb[k].t()?)?)?;
        let xd = mask.as_ref().map(|_| xd);
        Ok((y, Some(LinCache { xd, mask, z })))
    }

    /// Gradient of `lin_fwd` with respect to its input; adds the adapter's gradients to
    /// `grads`.
    #[allow(clippy::too_many_arguments)]
    fn lin_bwd(
        &self,
        dy: &Tensor,
        x: &Tensor,
        layer: usize,
        m: Module,
        cache: &Option<LinCache>,
        lora: &Lora,
        lc: &LoraCompute,
        grads: &mut [Tensor],
    ) -> Result<Tensor, TrainError> {
        let w = self.base.linear(layer, m);
        let dx = dy.matmul(w)?;
        let (Some(c), Some(&k)) = (cache, lora.index.get(&(layer, m))) else {
            return Ok(dx);
        };
        let xd = c.xd.as_ref().unwrap_or(x);
        // y += z (s B)ᵀ, z = xd Aᵀ.
        let dz = dy.matmul(&lc.sb[k])?; // [N, r]
        let db = (dy.t()?.matmul(&c.z)? * lc.scale)?; // [out, r]
        let da = dz.t()?.matmul(xd)?; // [r, in]
        let gt = grads[2 * k].dtype();
        grads[2 * k] = (&grads[2 * k] + da.to_dtype(gt)?)?;
        grads[2 * k + 1] = (&grads[2 * k + 1] + db.to_dtype(gt)?)?;
        let mut dxl = dz.matmul(&lc.a[k])?;
        if let Some(mask) = &c.mask {
            dxl = (dxl * mask)?;
        }
        Ok((dx + dxl)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_fwd(
        &self,
        l: usize,
        x: &Tensor,
        batch: &DeviceBatch,
        lora: &Lora,
        lc: &LoraCompute,
        seed: Option<DropoutSeed>,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerCache>), TrainError> {
        let cfg = &self.base.cfg;
        let w = &self.base.layers[l];
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        let (nh, nkv, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let rep = nh / nkv;
        let eps = cfg.eps;
        let acc = acc_dtype(self.dtype);
        let xn1 = rms_norm(x, &w.attn_norm, eps)?;
        let (q, cq) = self.lin_fwd(&xn1, l, Module::Q, w.q_b.as_ref(), lora, lc, seed)?;
        let (k, ck) = self.lin_fwd(&xn1, l, Module::K, w.k_b.as_ref(), lora, lc, seed)?;
        let (v, cv) = self.lin_fwd(&xn1, l, Module::V, w.v_b.as_ref(), lora, lc, seed)?;
        let heads = |x: Tensor, h: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
        };
        let q4 = heads(q, nh)?;
        let k4 = heads(k, nkv)?;
        let v4 = heads(v, nkv)?;
        let scale = 1.0 / (d as f64).sqrt();
        let qr = candle_nn::rotary_emb::rope(&q4, &batch.cos, &batch.sin)?;
        let kr = candle_nn::rotary_emb::rope(&k4, &batch.cos, &batch.sin)?;
        let qs = (qr * scale)?.reshape((b, nkv, rep * t, d))?;
        let ta = self.tick();
        let sdt = if self.attn_f32 { acc } else { self.dtype };
        let s = qs.matmul(&kr.t()?)?.to_dtype(sdt)?;
        let p = match &batch.mask {
            #[cfg(feature = "cuda")]
            None => crate::cuda::masked_softmax(&s.reshape((b, nh, t, t))?, &batch.seg)?
                .reshape((b, nkv, rep * t, t))?,
            #[cfg(not(feature = "cuda"))]
            None => {
                return Err(TrainError::Model(
                    "no attention mask and no fused kernels".into(),
                ))
            }
            Some(mask) => {
                let s = s
                    .reshape((b, nkv, rep, t, t))?
                    .broadcast_add(&mask.to_dtype(sdt)?)?;
                candle_nn::ops::softmax_last_dim(&s)?.reshape((b, nkv, rep * t, t))?
            }
        };
        let o = p.to_dtype(self.dtype)?.matmul(&v4)?;
        self.tock("attention core fwd", ta);
        let o2 = o
            .reshape((b, nh, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, nh * d))?;
        let (a, co) = self.lin_fwd(&o2, l, Module::O, None, lora, lc, seed)?;
        let x2 = (x + a)?;
        let xn2 = rms_norm(&x2, &w.ffn_norm, eps)?;
        let (g, cg) = self.lin_fwd(&xn2, l, Module::Gate, None, lora, lc, seed)?;
        let (u, cu) = self.lin_fwd(&xn2, l, Module::Up, None, lora, lc, seed)?;
        let h = (candle_nn::ops::silu(&g)? * &u)?;
        let (m, cd) = self.lin_fwd(&h, l, Module::Down, None, lora, lc, seed)?;
        let y = (&x2 + m)?;
        if !keep {
            return Ok((y, None));
        }
        Ok((
            y,
            Some(LayerCache {
                xn1,
                q: cq,
                k: ck,
                v: cv,
                qs,
                kr,
                v4,
                p,
                o2,
                o: co,
                x2,
                xn2,
                g,
                u,
                h,
                gate: cg,
                up: cu,
                down: cd,
            }),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_bwd(
        &self,
        l: usize,
        x: &Tensor,
        dy: &Tensor,
        c: &LayerCache,
        batch: &DeviceBatch,
        lora: &Lora,
        lc: &LoraCompute,
        grads: &mut [Tensor],
    ) -> Result<Tensor, TrainError> {
        let cfg = &self.base.cfg;
        let w = &self.base.layers[l];
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        let (nh, nkv, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let rep = nh / nkv;
        let eps = cfg.eps;
        // MLP: y = x2 + down(silu(gate(xn2)) * up(xn2)).
        let tm = self.tick();
        let dh = self.lin_bwd(dy, &c.h, l, Module::Down, &c.down, lora, lc, grads)?;
        let (dg, du) = self.swiglu_bwd(&c.g, &c.u, &dh)?;
        let dxn2 = (self.lin_bwd(&dg, &c.xn2, l, Module::Gate, &c.gate, lora, lc, grads)?
            + self.lin_bwd(&du, &c.xn2, l, Module::Up, &c.up, lora, lc, grads)?)?;
        let dx2 = (dy + self.rms_norm_bwd(&c.x2, &w.ffn_norm, &dxn2, eps)?)?;
        self.tock("mlp bwd (with norm)", tm);
        // Attention.
        let to = self.tick();
        let do2 = self.lin_bwd(&dx2, &c.o2, l, Module::O, &c.o, lora, lc, grads)?;
        let do4 = do2
            .reshape((b, t, nh, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, nkv, rep * t, d))?;
        self.tock("o_proj bwd", to);
        let ta = self.tick();
        let p_dt = c.p.to_dtype(self.dtype)?;
        let dv = p_dt.t()?.matmul(&do4)?; // [b, nkv, t, d], summed over rep
        let dp = do4.matmul(&c.v4.t()?)?.to_dtype(c.p.dtype())?;
        let ds = if batch.mask.is_none() {
            #[cfg(feature = "cuda")]
            {
                crate::cuda::softmax_bwd(&c.p, &dp)?.to_dtype(self.dtype)?
            }
            #[cfg(not(feature = "cuda"))]
            return Err(TrainError::Model("no fused kernels in this build".into()));
        } else {
            (&c.p * dp.broadcast_sub(&(&dp * &c.p)?.sum_keepdim(D::Minus1)?)?)?
                .to_dtype(self.dtype)?
        };
        let scale = 1.0 / (d as f64).sqrt();
        let dqs = ds.matmul(&c.kr)?;
        let dkr = ds.t()?.matmul(&c.qs)?;
        self.tock("attention core bwd", ta);
        let tq = self.tick();
        let dq4 = (dqs * scale)?.reshape((b, nh, t, d))?.contiguous()?;
        let dq4 = candle_nn::rotary_emb::rope(&dq4, &batch.cos, &batch.neg_sin)?;
        let dk4 = candle_nn::rotary_emb::rope(&dkr.contiguous()?, &batch.cos, &batch.neg_sin)?;
        let flat = |x: &Tensor, h: usize| -> candle_core::Result<Tensor> {
            x.transpose(1, 2)?.contiguous()?.reshape((n, h * d))
        };
        let dq = flat(&dq4, nh)?;
        let dk = flat(&dk4, nkv)?;
        let dv = flat(&dv, nkv)?;
        let dxn1 = ((self.lin_bwd(&dq, &c.xn1, l, Module::Q, &c.q, lora, lc, grads)?
            + self.lin_bwd(&dk, &c.xn1, l, Module::K, &c.k, lora, lc, grads)?)?
            + self.lin_bwd(&dv, &c.xn1, l, Module::V, &c.v, lora, lc, grads)?)?;
        let dx = (dx2 + self.rms_norm_bwd(x, &w.attn_norm, &dxn1, eps)?)?;
        self.tock("rope + qkv bwd (with norm)", tq);
        Ok(dx)
    }

    /// RMSNorm's input gradient: the fused kernel, or candle's ops.
    fn rms_norm_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
    ) -> Result<Tensor, TrainError> {
        #[cfg(feature = "cuda")]
        if self.fused() {
            return Ok(crate::cuda::rms_norm_bwd(x, w, dy, eps)?);
        }
        Ok(rms_norm_bwd(x, w, dy, eps)?)
    }

    /// `(dg, du)` of `h = silu(g) u`: the fused kernel, or candle's ops.
    fn swiglu_bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        dh: &Tensor,
    ) -> Result<(Tensor, Tensor), TrainError> {
        #[cfg(feature = "cuda")]
        if self.fused() {
            return Ok(crate::cuda::swiglu_bwd(g, u, dh)?);
        }
        let sg = candle_nn::ops::sigmoid(g)?;
        let du = (dh * (g * &sg)?)?;
        // silu'(g) = sg (1 + g (1 - sg))
        let dsilu = (&sg * ((g * (1.0 - &sg)?)? + 1.0)?)?;
        let dg = ((dh * u)? * dsilu)?;
        Ok((dg, du))
    }

    fn embed(&self, batch: &DeviceBatch) -> Result<Tensor, TrainError> {
        Ok(self.base.embed.index_select(&batch.ids, 0)?)
    }

    /// The summed cross-entropy of the batch's labels and, with `grad_scale`, its gradient
    /// (times `grad_scale`) with respect to the last layer's output.
    fn head(
        &self,
        xl: &Tensor,
        batch: &DeviceBatch,
        grad_scale: Option<f64>,
    ) -> Result<(Tensor, Option<Tensor>), TrainError> {
        let eps = self.base.cfg.eps;
        let norm = &self.base.norm;
        let hf = rms_norm(xl, norm, eps)?;
        let w = self.base.head();
        let acc = acc_dtype(self.dtype);
        let mut loss = Tensor::zeros((), acc, &self.device)?;
        let mut dhf = match grad_scale {
            Some(_) => Some(hf.zeros_like()?),
            None => None,
        };
        for (pos, tgt) in &batch.targets {
            let hc = hf.index_select(pos, 0)?;
            #[cfg(feature = "cuda")]
            if self.fused() {
                // Logits in the compute dtype, their log-sum-exp in one pass, the loss from
                // the label logits, and (softmax - onehot) · scale written once.
                let logits = hc.matmul(&w.t()?)?;
                let lse = crate::cuda::row_lse(&logits)?;
                let picked = logits
                    .gather(&tgt.unsqueeze(1)?, 1)?
                    .squeeze(1)?
                    .to_dtype(DType::F32)?;
                loss = (loss + (&lse - picked)?.sum_all()?.to_dtype(acc)?)?;
                if let (Some(gs), Some(dsum)) = (grad_scale, dhf.as_mut()) {
                    let dl = crate::cuda::ce_grad(&logits, tgt, &lse, gs)?;
                    *dsum = dsum.index_add(pos, &dl.matmul(w)?, 0)?;
                }
                continue;
            }
            // One fused softmax over the vocabulary; the loss is -log p(label), and the
            // gradient p - onehot is made in place (in f32: p(label) - 1 must not be rounded
            // to bf16 first), so only the softmax, one cast and the matmul touch the
            // [chunk, vocab] matrix.
            let p = candle_nn::ops::softmax_last_dim(&hc.matmul(&w.t()?)?.to_dtype(acc)?)?;
            let tgt2 = tgt.unsqueeze(1)?;
            let pt = p.gather(&tgt2, 1)?;
            // p(label) underflows only past a loss of ~87 nats; such a position counts 69.
            loss = (loss - pt.clamp(1e-30, 1.0)?.log()?.sum_all()?)?;
            if let (Some(gs), Some(dsum)) = (grad_scale, dhf.as_mut()) {
                p.scatter_set(&tgt2, &(pt - 1.0)?, 1)?;
                let dhc = (p.to_dtype(self.dtype)?.matmul(w)? * gs)?;
                *dsum = dsum.index_add(pos, &dhc, 0)?;
            }
        }
        let dxl = match dhf {
            Some(dhf) => Some(self.rms_norm_bwd(xl, norm, &dhf, eps)?),
            None => None,
        };
        Ok((loss, dxl))
    }

    /// Runs the forward and backward pass of one micro-batch: adds the adapter gradients of
    /// `grad_scale` × the summed label cross-entropy to `grads` and returns that sum
    /// (unscaled), as a device scalar.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        batch: &DeviceBatch,
        lora: &Lora,
        lc: &LoraCompute,
        grads: &mut [Tensor],
        grad_scale: f64,
        seed: DropoutSeed,
        checkpointing: bool,
    ) -> Result<Tensor, TrainError> {
        let layers = self.base.cfg.layers;
        let mut x = self.embed(batch)?;
        let mut inputs = Vec::with_capacity(layers);
        let mut caches = Vec::new();
        for l in 0..layers {
            let t = self.tick();
            let (y, c) = self.layer_fwd(l, &x, batch, lora, lc, Some(seed), !checkpointing)?;
            self.tock("layer fwd", t);
            inputs.push(x);
            if let Some(c) = c {
                caches.push(c);
            }
            x = y;
        }
        let t = self.tick();
        let (loss, dx) = self.head(&x, batch, Some(grad_scale))?;
        self.tock("head (loss and its gradient)", t);
        drop(x);
        let mut dx = dx.ok_or_else(|| TrainError::Model("no head gradient".into()))?;
        for l in (0..layers).rev() {
            let input = inputs
                .pop()
                .ok_or_else(|| TrainError::Model("layer input missing".into()))?;
            let t = self.tick();
            let cache = match caches.pop() {
                Some(c) => c,
                None => self
                    .layer_fwd(l, &input, batch, lora, lc, Some(seed), true)?
                    .1
                    .ok_or_else(|| TrainError::Model("layer cache missing".into()))?,
            };
            self.tock("layer recompute (checkpointing)", t);
            dx = self.layer_bwd(l, &input, &dx, &cache, batch, lora, lc, grads)?;
        }
        Ok(loss)
    }

    /// The summed label cross-entropy of a micro-batch, without gradients; dropout as
    /// `seed` draws it, or none.
    pub fn loss(
        &self,
        batch: &DeviceBatch,
        lora: &Lora,
        lc: &LoraCompute,
        seed: Option<DropoutSeed>,
    ) -> Result<f64, TrainError> {
        let mut x = self.embed(batch)?;
        for l in 0..self.base.cfg.layers {
            x = self.layer_fwd(l, &x, batch, lora, lc, seed, false)?.0;
        }
        let (loss, _) = self.head(&x, batch, None)?;
        scalar(&loss)
    }

    /// Logits of every position of one unpadded sequence, `[t, vocab]` in f32 (for checks
    /// against the merged model; training never forms them).
    pub fn logits(&self, ids: &[u32], lora: &Lora) -> Result<Tensor, TrainError> {
        let t = ids.len();
        let hb = HostBatch {
            b: 1,
            t,
            ids: ids.to_vec(),
            pos: (0..t as u32).collect(),
            seg: vec![0; t],
            target_pos: vec![],
            targets: vec![],
            real_tokens: t,
        };
        let batch = self.upload(&hb, 1)?;
        let lc = self.lora_compute(lora)?;
        let mut x = self.embed(&batch)?;
        for l in 0..self.base.cfg.layers {
            x = self.layer_fwd(l, &x, &batch, lora, &lc, None, false)?.0;
        }
        let hf = rms_norm(&x, &self.base.norm, self.base.cfg.eps)?;
        Ok(hf.matmul(&self.base.head().t()?)?.to_dtype(DType::F32)?)
    }

    /// Zeroed gradient buffers shaped like the adapters.
    pub fn zero_grads(&self, lora: &Lora) -> Result<Vec<Tensor>, TrainError> {
        Ok(lora
            .params
            .iter()
            .map(|p| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?)
    }
}
