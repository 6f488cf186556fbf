//! The forward pass: prefill of a fresh or continued sequence, and one batched decode step.

use candle_core::{DType, Device, IndexOp, Module, Tensor};

use super::{BatchKv, Layer, Model};

impl Model {
    /// An empty KV store with room for `slots` sequences of `cap` tokens (both grow).
    pub fn new_kv(&self, slots: usize, cap: usize) -> candle_core::Result<BatchKv> {
        let width = self.cfg.kv_heads * self.cfg.head_dim;
        let (k, v) = BatchKv::zeros(self.cfg.layers, slots, cap, width, self.dtype, &self.device)?;
        Ok(BatchKv {
            k,
            v,
            slots,
            cap,
            width,
            lens: vec![0; slots],
            free: (0..slots).rev().collect(),
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if self.cfg.rope_neox {
            candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
        }
    }

    /// Softmax attention of `q` `[b, kvh, rep * t, d]` over `k`, `v` `[b, kvh, l, d]`, with
    /// an additive `mask` broadcastable to `[b, kvh, rep * t, l]`; grouped-query heads share
    /// their K/V without copies.
    fn sdpa(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let scale = 1.0 / (self.cfg.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = att.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(v.dtype())?;
        att.matmul(v)
    }

    /// Runs the prompt of a fresh sequence in `slot` and returns the logits of its last
    /// position, `[vocab]` in f32.
    pub fn prefill(
        &self,
        kv: &mut BatchKv,
        slot: usize,
        tokens: &[u32],
    ) -> candle_core::Result<Tensor> {
        if kv.len(slot) != 0 {
            candle_core::bail!("slot {slot} is not empty");
        }
        match self.prefill_chunk(kv, slot, tokens, true)? {
            Some(l) => Ok(l),
            None => candle_core::bail!("prefill of slot {slot} returned no logits"),
        }
    }

    /// Appends `tokens` to what `slot` already holds (positions `kv.len(slot)..`), attending
    /// over the slot's cached prefix and causally within the chunk, so a long prompt can be
    /// prefilled a chunk at a time: the attention scores are `[heads, chunk, prefix + chunk]`,
    /// never `[heads, prompt, prompt]`. With `logits`, returns those of the chunk's last
    /// position, `[vocab]` in f32.
    pub fn prefill_chunk(
        &self,
        kv: &mut BatchKv,
        slot: usize,
        tokens: &[u32],
        logits: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let t = tokens.len();
        if t == 0 {
            candle_core::bail!("an empty prefill chunk for slot {slot}");
        }
        let start = kv.len(slot);
        let total = start + t;
        if total > self.cos.dim(0)? {
            candle_core::bail!(
                "slot {slot} would hold {total} tokens; the model's positions end at {}",
                self.cos.dim(0)?
            );
        }
        kv.reserve(total)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.lookup(&ids, self.dtype)?.unsqueeze(0)?; // [1, t, hidden]
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let (h, kvh, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let rep = h / kvh;
        // Row i of the chunk (position start + i) sees keys 0..=start + i.
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(causal, (1, 1, 1, t, total), &self.device)?;
        let mask = mask
            .broadcast_as((1, kvh, rep, t, total))?
            .reshape((1, kvh, rep * t, total))?;
        for (l, layer) in self.layers.iter().enumerate() {
            let r = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.eps as f32)?;
            let q = layer
                .q
                .forward(&xn)?
                .reshape((1, t, h, d))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward(&xn)?
                .reshape((1, t, kvh, d))?
                .transpose(1, 2)?;
            let v = layer
                .v
                .forward(&xn)?
                .reshape((1, t, kvh, d))?
                .transpose(1, 2)?;
            let q = self.rope(&q, &cos, &sin)?; // [1, h, t, d]
            let k = self.rope(&k, &cos, &sin)?; // [1, kvh, t, d]
            let v = v.contiguous()?;
            // Into the slot's rows: [t, kvh * d] at row slot * cap + start.
            let rows = |x: &Tensor| x.transpose(1, 2)?.contiguous()?.reshape((t, kvh * d));
            let flat = |c: &Tensor| c.reshape((kv.slots * kv.cap, kv.width));
            flat(&kv.k[l])?.slice_set(&rows(&k)?, 0, slot * kv.cap + start)?;
            flat(&kv.v[l])?.slice_set(&rows(&v)?, 0, slot * kv.cap + start)?;
            // A fresh slot attends over the chunk itself; a continued one over its cache.
            let (kk, vv) = if start == 0 {
                (k, v)
            } else {
                let past = |c: &Tensor| -> candle_core::Result<Tensor> {
                    c.i((slot, 0..total, ..))?
                        .reshape((1, total, kvh, d))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                (past(&kv.k[l])?, past(&kv.v[l])?)
            };
            let q = q.reshape((1, kvh, rep * t, d))?;
            let att = self.sdpa(&q, &kk, &vv, &mask)?;
            let y = att
                .reshape((1, h, t, d))?
                .transpose(1, 2)?
                .reshape((1, t, h * d))?;
            x = (layer.o.forward(&y)? + r)?;
            x = (self.mlp(layer, &x)? + x)?;
        }
        kv.lens[slot] = total;
        if !logits {
            return Ok(None);
        }
        let last = x.i((.., t - 1..t, ..))?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.cfg.eps as f32)?;
        Ok(Some(
            self.lm_head
                .forward(&last)?
                .flatten_all()?
                .to_dtype(DType::F32)?,
        ))
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let xn = candle_nn::ops::rms_norm(x, &layer.ffn_norm, self.cfg.eps as f32)?;
        let g = candle_nn::ops::silu(&layer.gate.forward(&xn)?)?;
        layer.down.forward(&(g * layer.up.forward(&xn)?)?)
    }

    /// One decode step for several sequences at once: `tokens[i]` is the next input of the
    /// sequence in `slots[i]`. Returns logits `[n, vocab]` in f32.
    pub fn decode(
        &self,
        kv: &mut BatchKv,
        slots: &[usize],
        tokens: &[u32],
    ) -> candle_core::Result<Tensor> {
        let n = tokens.len();
        let (h, kvh, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let rep = h / kvh;
        let lens: Vec<usize> = slots.iter().map(|s| kv.len(*s)).collect();
        let max_len = lens.iter().copied().max().unwrap_or(0) + 1;
        kv.reserve(max_len)?;
        let (cap, width) = (kv.cap, kv.width);
        let ids = Tensor::new(tokens, &self.device)?;
        // 2-D activations: a dense matmul over [n, hidden] is one GEMM that reads the weight
        // once; a 3-D [n, 1, hidden] input would broadcast the weight into n GEMVs.
        let mut x = self.embed.lookup(&ids, self.dtype)?; // [n, hidden]
        let pos: Vec<u32> = lens.iter().map(|l| *l as u32).collect();
        let pos_t = Tensor::new(pos.as_slice(), &self.device)?;
        let cos = self
            .cos
            .index_select(&pos_t, 0)?
            .unsqueeze(1)?
            .contiguous()?; // [n, 1, d/2]
        let sin = self
            .sin
            .index_select(&pos_t, 0)?
            .unsqueeze(1)?
            .contiguous()?;
        // Rows the new K/V go to, the slots to gather, and the padding mask.
        let rows: Vec<u32> = slots
            .iter()
            .zip(&lens)
            .flat_map(|(s, l)| std::iter::repeat_n((s * cap + l) as u32, width))
            .collect();
        let rows = Tensor::from_vec(rows, (n, width), &self.device)?;
        let slot_ids: Vec<u32> = slots.iter().map(|s| *s as u32).collect();
        let slot_ids = Tensor::new(slot_ids.as_slice(), &self.device)?;
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|l| (0..max_len).map(move |j| if j > *l { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (n, 1, 1, max_len), &self.device)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let r = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.eps as f32)?;
            let q = layer
                .q
                .forward(&xn)?
                .reshape((n, 1, h, d))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward(&xn)?
                .reshape((n, 1, kvh, d))?
                .transpose(1, 2)?;
            let v = layer.v.forward(&xn)?.reshape((n, 1, kvh, d))?;
            let q = self.rope(&q, &cos, &sin)?; // [n, h, 1, d]
            let k = self.rope(&k, &cos, &sin)?; // [n, kvh, 1, d]
            let flat_k = kv.k[l].reshape((kv.slots * cap, width))?;
            let flat_v = kv.v[l].reshape((kv.slots * cap, width))?;
            flat_k.scatter_set(&rows, &k.reshape((n, width))?.contiguous()?, 0)?;
            flat_v.scatter_set(&rows, &v.reshape((n, width))?.contiguous()?, 0)?;
            let gather = |c: &Tensor| -> candle_core::Result<Tensor> {
                c.index_select(&slot_ids, 0)? // [n, cap, w]
                    .narrow(1, 0, max_len)?
                    .reshape((n, max_len, kvh, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (kk, vv) = (gather(&kv.k[l])?, gather(&kv.v[l])?);
            let q = q.reshape((n, kvh, rep, d))?;
            let y = self.sdpa(&q, &kk, &vv, &mask)?; // [n, kvh, rep, d]
            let y = y.reshape((n, h * d))?;
            x = (layer.o.forward(&y)? + r)?;
            x = (self.mlp(layer, &x)? + x)?;
        }
        for s in slots {
            kv.lens[*s] += 1;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.eps as f32)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// The activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
