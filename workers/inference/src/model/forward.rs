//! The forward pass: prefill of a fresh or continued sequence, and one batched decode step.

use candle_core::{DType, Device, Module, Tensor};

use super::{GateUp, Layer, Model, PagedKv, Qkv};

impl Model {
    /// An empty paged KV cache of at most `budget_tokens` tokens (every sequence together).
    pub fn new_kv(&self, budget_tokens: usize) -> candle_core::Result<PagedKv> {
        let width = self.cfg.kv_heads * self.cfg.head_dim;
        PagedKv::new(
            self.cfg.layers,
            width,
            budget_tokens,
            self.dtype,
            &self.device,
        )
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

    /// Runs the prompt of a fresh sequence `seq` and returns the logits of its last
    /// position, `[vocab]` in f32.
    pub fn prefill(
        &self,
        kv: &mut PagedKv,
        seq: usize,
        tokens: &[u32],
    ) -> candle_core::Result<Tensor> {
        if kv.len(seq) != 0 {
            candle_core::bail!("KV sequence {seq} is not empty");
        }
        match self.prefill_chunk(kv, seq, tokens, true)? {
            Some(l) => Ok(l),
            None => candle_core::bail!("prefill of KV sequence {seq} returned no logits"),
        }
    }

    /// Appends `tokens` to what sequence `seq` already holds (positions `kv.len(seq)..`),
    /// attending over its cached prefix and causally within the chunk, so a long prompt can
    /// be prefilled a chunk at a time: the attention scores are `[heads, chunk, prefix +
    /// chunk]`, never `[heads, prompt, prompt]`. With `logits`, returns those of the chunk's
    /// last position, `[vocab]` in f32.
    pub fn prefill_chunk(
        &self,
        kv: &mut PagedKv,
        seq: usize,
        tokens: &[u32],
        logits: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut out = self.prefill_batch(kv, &[(seq, tokens, logits)])?;
        Ok(out.pop().flatten())
    }

    /// Prefills chunks of several sequences in one forward pass: `items[i]` appends its
    /// tokens to sequence `items[i].0` (as [`Self::prefill_chunk`] does) and, when its flag is
    /// set, gets the logits of its last position (`[vocab]`, f32). The projections and the
    /// MLP run once over every item's tokens; attention runs once over all of them, each
    /// token seeing its own sequence's cached rows and the chunk's up to itself.
    pub fn prefill_batch(
        &self,
        kv: &mut PagedKv,
        items: &[(usize, &[u32], bool)],
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let positions = self.cos.dim(0)?;
        let mut starts = Vec::with_capacity(items.len());
        for (seq, tokens, _) in items {
            if tokens.is_empty() {
                candle_core::bail!("an empty prefill chunk for KV sequence {seq}");
            }
            let start = kv.len(*seq);
            if start + tokens.len() > positions {
                candle_core::bail!(
                    "KV sequence {seq} would hold {} tokens; the model's positions end at {positions}",
                    start + tokens.len()
                );
            }
            starts.push(start);
        }
        let mut write = Vec::new();
        for (seq, tokens, _) in items {
            write.extend(kv.prepare(*seq, tokens.len())?);
        }
        let width = kv.width;
        let t: usize = items.iter().map(|i| i.1.len()).sum();
        let write = scatter_rows(&write, width, &self.device)?;
        // Keys: every item's rows from position 0 through its chunk, item after item. When
        // every item starts fresh they are exactly the chunk's own K/V, in order.
        let fresh = starts.iter().all(|s| *s == 0);
        let mut key_rows = Vec::new();
        let mut pos = Vec::with_capacity(t);
        let mut last = Vec::new();
        for ((seq, tokens, want), start) in items.iter().zip(&starts) {
            key_rows.extend(kv.rows(*seq, start + tokens.len()));
            pos.extend((*start..start + tokens.len()).map(|p| p as u32));
            if *want {
                last.push((pos.len() - 1) as u32);
            }
        }
        let keys = key_rows.len();
        // Token j of item i (position start_i + j) sees the keys of item i up to
        // start_i + j; no key of another item.
        let mut mask = vec![f32::NEG_INFINITY; t * keys];
        let (mut row, mut col) = (0, 0);
        for ((_, tokens, _), start) in items.iter().zip(&starts) {
            for j in 0..tokens.len() {
                mask[(row + j) * keys + col..(row + j) * keys + col + start + j + 1].fill(0.0);
            }
            row += tokens.len();
            col += start + tokens.len();
        }
        let key_rows = Tensor::new(key_rows.as_slice(), &self.device)?;
        let pos = Tensor::new(pos.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let all: Vec<u32> = items.iter().flat_map(|i| i.1.iter().copied()).collect();
        let ids = Tensor::new(all.as_slice(), &self.device)?;
        let mut x = self.embed.lookup(&ids, self.dtype)?.unsqueeze(0)?; // [1, t, hidden]
        let (h, kvh, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let rep = h / kvh;
        let mask = Tensor::from_vec(mask, (1, 1, 1, t, keys), &self.device)?
            .broadcast_as((1, kvh, rep, t, keys))?
            .reshape((1, kvh, rep * t, keys))?;
        for (l, layer) in self.layers.iter().enumerate() {
            let r = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.eps as f32)?;
            let (q, k, v) = self.qkv(layer, &xn)?;
            let q = q.reshape((1, t, h, d))?.transpose(1, 2)?;
            let k = k.reshape((1, t, kvh, d))?.transpose(1, 2)?;
            let v = v.reshape((1, t, kvh, d))?.transpose(1, 2)?;
            let q = self.rope(&q, &cos, &sin)?; // [1, h, t, d]
            let k = self.rope(&k, &cos, &sin)?; // [1, kvh, t, d]
            let v = v.contiguous()?;
            // Into the sequences' pool rows, [t, kvh * d].
            let as_rows = |x: &Tensor| x.transpose(1, 2)?.contiguous()?.reshape((t, width));
            let (pk, pv) = (flat(&kv.k[l], width)?, flat(&kv.v[l], width)?);
            pk.scatter_set(&write, &as_rows(&k)?, 0)?;
            pv.scatter_set(&write, &as_rows(&v)?, 0)?;
            let (kk, vv) = if fresh {
                (k, v)
            } else {
                let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
                    pool.index_select(&key_rows, 0)?
                        .reshape((1, keys, kvh, d))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                (gather(&pk)?, gather(&pv)?)
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
        for (seq, tokens, _) in items {
            kv.commit(*seq, tokens);
        }
        let mut out: Vec<Option<Tensor>> = vec![None; items.len()];
        if last.is_empty() {
            return Ok(out);
        }
        let picked = x
            .squeeze(0)?
            .index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let picked = candle_nn::ops::rms_norm(&picked, &self.norm, self.cfg.eps as f32)?;
        let logits = self.lm_head.forward(&picked)?.to_dtype(DType::F32)?;
        let mut k = 0;
        for (o, (_, _, want)) in out.iter_mut().zip(items) {
            if *want {
                *o = Some(logits.get(k)?);
                k += 1;
            }
        }
        Ok(out)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let xn = candle_nn::ops::rms_norm(x, &layer.ffn_norm, self.cfg.eps as f32)?;
        let act = match &layer.gate_up {
            GateUp::Split { gate, up } => {
                (candle_nn::ops::silu(&gate.forward(&xn)?)? * up.forward(&xn)?)?
            }
            GateUp::Fused(w) => {
                let gu = w.forward(&xn)?;
                #[cfg(feature = "cuda")]
                if self.device.is_cuda() && super::paged::supports(self.cfg.head_dim, self.dtype) {
                    return layer.down.forward(&super::paged::swiglu(&gu)?);
                }
                let last = gu.rank() - 1;
                let inter = gu.dim(last)? / 2;
                (candle_nn::ops::silu(&gu.narrow(last, 0, inter)?)?
                    * gu.narrow(last, inter, inter)?)?
            }
        };
        layer.down.forward(&act)
    }

    /// The query, key and value projections of `xn` `[.., hidden]` (biases added), each
    /// `[.., out]`.
    fn qkv(&self, layer: &Layer, xn: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        match &layer.qkv {
            Qkv::Split { q, k, v } => Ok((q.forward(xn)?, k.forward(xn)?, v.forward(xn)?)),
            Qkv::Fused { w, bias } => {
                let mut y = w.forward(xn)?;
                if let Some(b) = bias {
                    y = y.broadcast_add(b)?;
                }
                let (h, kvh, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
                let last = y.rank() - 1;
                Ok((
                    y.narrow(last, 0, h * d)?,
                    y.narrow(last, h * d, kvh * d)?,
                    y.narrow(last, (h + kvh) * d, kvh * d)?,
                ))
            }
        }
    }

    /// One decode step for several sequences at once: `tokens[i]` is the next input of
    /// sequence `seqs[i]`. Returns logits `[n, vocab]` in f32.
    pub fn decode(
        &self,
        kv: &mut PagedKv,
        seqs: &[usize],
        tokens: &[u32],
    ) -> candle_core::Result<Tensor> {
        let n = tokens.len();
        if seqs.len() != n {
            candle_core::bail!("decode of {} sequences with {n} tokens", seqs.len());
        }
        let (h, kvh, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let rep = h / kvh;
        let width = kv.width;
        let lens: Vec<usize> = seqs.iter().map(|s| kv.len(*s)).collect();
        let mut rows = Vec::with_capacity(n);
        for s in seqs {
            rows.extend(kv.prepare(*s, 1)?);
        }
        let write = scatter_rows(&rows, width, &self.device)?;
        let attend = Attend::new(kv, seqs, &lens, (d, self.dtype), &self.device)?;
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
        // The CUDA step's fused RoPE + KV write takes f32 tables `[n, d/2]` and the rows.
        #[cfg(feature = "cuda")]
        let fused = if self.device.is_cuda() && super::paged::supports(d, self.dtype) {
            Some((
                cos.squeeze(1)?.to_dtype(DType::F32)?.contiguous()?,
                sin.squeeze(1)?.to_dtype(DType::F32)?.contiguous()?,
                Tensor::new(rows.as_slice(), &self.device)?,
            ))
        } else {
            None
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let r = x.clone();
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.eps as f32)?;
            let (pk, pv) = (flat(&kv.k[l], width)?, flat(&kv.v[l], width)?);
            #[cfg(feature = "cuda")]
            let q_fused = match (&layer.qkv, &fused) {
                (Qkv::Fused { w, bias }, Some((c, s, rows))) => Some(super::paged::qkv_rope_write(
                    &w.forward(&xn)?,
                    bias.as_ref(),
                    (c, s),
                    rows,
                    (&pk, &pv),
                    (h, kvh, d),
                    self.cfg.rope_neox,
                )?),
                _ => None,
            };
            #[cfg(not(feature = "cuda"))]
            let q_fused: Option<Tensor> = None;
            // [n, h, d], with this step's K/V in the pools.
            let q = match q_fused {
                Some(q) => q,
                None => {
                    let (q, k, v) = self.qkv(layer, &xn)?;
                    let q = q.reshape((n, 1, h, d))?.transpose(1, 2)?;
                    let k = k.reshape((n, 1, kvh, d))?.transpose(1, 2)?;
                    let v = v.reshape((n, width))?;
                    let q = self.rope(&q, &cos, &sin)?; // [n, h, 1, d]
                    let k = self.rope(&k, &cos, &sin)?; // [n, kvh, 1, d]
                    pk.scatter_set(&write, &k.reshape((n, width))?.contiguous()?, 0)?;
                    pv.scatter_set(&write, &v.contiguous()?, 0)?;
                    q.reshape((n, h, d))?
                }
            };
            let y = match &attend {
                #[cfg(feature = "cuda")]
                Attend::Paged(meta) => super::paged::attention(
                    &q,
                    &pk,
                    &pv,
                    meta,
                    kvh,
                    (1.0 / (d as f64).sqrt()) as f32,
                )?,
                Attend::Gather { rows, mask, len } => {
                    let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
                        pool.index_select(rows, 0)? // [n * len, w]
                            .reshape((n, *len, kvh, d))?
                            .transpose(1, 2)?
                            .contiguous()
                    };
                    let (kk, vv) = (gather(&pk)?, gather(&pv)?);
                    let q = q.reshape((n, kvh, rep, d))?;
                    self.sdpa(&q, &kk, &vv, mask)? // [n, kvh, rep, d]
                }
            };
            let y = y.reshape((n, h * d))?;
            x = (layer.o.forward(&y)? + r)?;
            x = (self.mlp(layer, &x)? + x)?;
        }
        for (s, t) in seqs.iter().zip(tokens) {
            kv.commit(*s, std::slice::from_ref(t));
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.eps as f32)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// The activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A layer's pool `[blocks, BLOCK, width]` as rows `[blocks * BLOCK, width]` (same storage).
fn flat(pool: &Tensor, width: usize) -> candle_core::Result<Tensor> {
    pool.reshape(((), width))
}

/// The scatter index that writes row `i` of a `[rows.len(), width]` source into pool row
/// `rows[i]`.
fn scatter_rows(rows: &[u32], width: usize, device: &Device) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = rows
        .iter()
        .flat_map(|r| std::iter::repeat_n(*r, width))
        .collect();
    Tensor::from_vec(idx, (rows.len(), width), device)
}

/// How a decode step attends over the sequences' blocks.
enum Attend {
    /// The CUDA kernel reads the pools through the block tables: u32 `[n, 1 + blocks]`,
    /// each row the sequence's length (the new token included), then its block ids.
    #[cfg(feature = "cuda")]
    Paged(Tensor),
    /// The reference path gathers each sequence's rows, padded to the longest (`len`),
    /// and masks the padding.
    Gather {
        rows: Tensor,
        mask: Tensor,
        len: usize,
    },
}

impl Attend {
    /// `lens` are the sequences' lengths before this step's token.
    fn new(
        kv: &PagedKv,
        seqs: &[usize],
        lens: &[usize],
        (head_dim, dtype): (usize, DType),
        device: &Device,
    ) -> candle_core::Result<Self> {
        let n = seqs.len();
        #[cfg(not(feature = "cuda"))]
        let _ = (head_dim, dtype);
        let longest = lens.iter().copied().max().unwrap_or(0) + 1;
        #[cfg(feature = "cuda")]
        if device.is_cuda() && !kv.reference && super::paged::supports(head_dim, dtype) {
            let width = 1 + longest.div_ceil(super::kv::BLOCK);
            let mut meta = vec![0u32; n * width];
            for (i, (s, l)) in seqs.iter().zip(lens).enumerate() {
                let row = &mut meta[i * width..(i + 1) * width];
                row[0] = (*l + 1) as u32;
                if let Some(q) = kv.seq(*s) {
                    for (m, b) in row[1..].iter_mut().zip(&q.blocks) {
                        *m = *b;
                    }
                }
            }
            return Ok(Attend::Paged(Tensor::from_vec(meta, (n, width), device)?));
        }
        let mut rows = Vec::with_capacity(n * longest);
        let mut mask = Vec::with_capacity(n * longest);
        for (s, l) in seqs.iter().zip(lens) {
            let mine = kv.rows(*s, l + 1);
            rows.extend(
                mine.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, longest - mine.len())),
            );
            mask.extend((0..longest).map(|j| if j > *l { f32::NEG_INFINITY } else { 0.0 }));
        }
        Ok(Attend::Gather {
            rows: Tensor::from_vec(rows, n * longest, device)?,
            mask: Tensor::from_vec(mask, (n, 1, 1, longest), device)?,
            len: longest,
        })
    }
}
