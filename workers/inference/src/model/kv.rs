//! The KV slot store: one preallocated cache row block per running sequence.

use candle_core::{DType, Device, Tensor};

/// The KV cache of every running sequence, one slot per sequence: per layer, K and V of shape
/// `[slots, cap, kv_heads * head_dim]`. A decode step writes each sequence's new row with one
/// scatter, gathers the batch's slots with one index-select and attends with padding masked,
/// so a step costs the same number of kernel launches at any batch size.
#[derive(Debug)]
pub struct BatchKv {
    pub(super) k: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
    pub(super) slots: usize,
    pub(super) cap: usize,
    pub(super) width: usize,
    pub(super) lens: Vec<usize>,
    pub(super) free: Vec<usize>,
    pub(super) dtype: DType,
    pub(super) device: Device,
}

impl BatchKv {
    pub(super) fn zeros(
        layers: usize,
        slots: usize,
        cap: usize,
        width: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Vec<Tensor>, Vec<Tensor>)> {
        let mk = || Tensor::zeros((slots, cap, width), dtype, device);
        let k = (0..layers)
            .map(|_| mk())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = (0..layers)
            .map(|_| mk())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((k, v))
    }

    /// Tokens cached for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// Whether no slot holds tokens.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|l| *l == 0)
    }

    /// Tokens each slot can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// A free slot, growing the store when all are taken.
    pub fn alloc(&mut self) -> candle_core::Result<usize> {
        if let Some(s) = self.free.pop() {
            self.lens[s] = 0;
            return Ok(s);
        }
        let more = self.slots.max(4);
        self.resize(self.slots + more, self.cap)?;
        self.alloc()
    }

    /// Returns `slot` to the pool.
    pub fn release(&mut self, slot: usize) {
        if slot < self.slots && !self.free.contains(&slot) {
            self.lens[slot] = 0;
            self.free.push(slot);
        }
    }

    /// Makes every slot hold at least `tokens` tokens.
    pub fn reserve(&mut self, tokens: usize) -> candle_core::Result<()> {
        if tokens > self.cap {
            let cap = tokens.max(self.cap * 2).div_ceil(64) * 64;
            self.resize(self.slots, cap)?;
        }
        Ok(())
    }

    fn resize(&mut self, slots: usize, cap: usize) -> candle_core::Result<()> {
        let (k, v) = Self::zeros(
            self.k.len(),
            slots,
            cap,
            self.width,
            self.dtype,
            &self.device,
        )?;
        if self.slots > 0 && self.cap > 0 {
            for (new, old) in k.iter().zip(&self.k).chain(v.iter().zip(&self.v)) {
                // old [s0, c0, w] into new [s1, c1, w]: per old slot row block.
                let padded = if cap > self.cap {
                    Tensor::cat(
                        &[
                            old,
                            &Tensor::zeros(
                                (self.slots, cap - self.cap, self.width),
                                self.dtype,
                                &self.device,
                            )?,
                        ],
                        1,
                    )?
                } else {
                    old.clone()
                };
                new.slice_set(&padded, 0, 0)?;
            }
        }
        let old_slots = self.slots;
        self.k = k;
        self.v = v;
        self.free.extend((old_slots..slots).rev());
        self.lens.resize(slots, 0);
        self.slots = slots;
        self.cap = cap;
        Ok(())
    }
}
