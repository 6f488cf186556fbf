//! The paged KV cache: per layer one pool of fixed-size blocks, a block table per sequence,
//! prefix sharing by block hash with copy-on-write, and admission by free blocks.
//!
//! A sequence's token at position `p` lives in row `table[p / BLOCK] * BLOCK + p % BLOCK` of
//! every layer's pool (`[blocks, BLOCK, kv_heads * head_dim]`). A step writes the new rows in
//! place and attends through the block table: the CUDA kernel reads the pool directly, the
//! reference path (CPU, Metal) gathers the rows it needs. Nothing is copied when a sequence
//! grows, and sequences of any lengths share one pool without padding to the longest.
//!
//! Full blocks are registered under the hash of their tokens and of the blocks before them.
//! A new sequence whose prompt starts with registered blocks takes them (reference counted)
//! instead of computing them; a block that is shared or registered is never written: a write
//! into one copies it first (copy-on-write). A registered block nobody holds stays cached
//! until its room is needed (least recently released first).

use candle_core::{DType, Device, Tensor};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Tokens per block.
pub const BLOCK: usize = 16;

/// Identifies a block's content: the hash of the blocks before it and its own tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    parent: u64,
    tokens: Vec<u32>,
}

impl BlockKey {
    fn hash(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.parent.hash(&mut h);
        self.tokens.hash(&mut h);
        h.finish()
    }
}

/// One sequence's block table and the tokens it holds.
#[derive(Debug, Clone, Default)]
pub(super) struct SeqKv {
    /// Block ids, in position order.
    pub(super) blocks: Vec<u32>,
    /// Tokens whose K/V are in the blocks.
    pub(super) len: usize,
    /// The tokens themselves (for registering full blocks).
    tokens: Vec<u32>,
    /// The key hash of each full block, in order.
    hashes: Vec<u64>,
}

/// The paged KV cache of every running sequence.
#[derive(Debug)]
pub struct PagedKv {
    pub(super) k: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
    pub(super) width: usize,
    dtype: DType,
    device: Device,
    /// Blocks allocated in each pool now, and the most the budget allows.
    blocks: usize,
    max_blocks: usize,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Blocks nobody holds and no key names.
    free: Vec<u32>,
    /// The key of each registered block.
    keys: Vec<Option<BlockKey>>,
    /// Registered blocks by key hash.
    cached: HashMap<u64, u32>,
    /// Registered blocks nobody holds, least recently released first (entries may be stale).
    evictable: VecDeque<u32>,
    /// How many registered blocks nobody holds.
    idle_cached: usize,
    seqs: Vec<Option<SeqKv>>,
    /// Attend by the reference path (gather and masked softmax) on every device.
    pub(super) reference: bool,
}

impl PagedKv {
    /// A cache of at most `budget_tokens` tokens (rounded up to whole blocks) per layer.
    /// On CUDA the pools are allocated at once; elsewhere they grow as needed, up to it.
    pub(super) fn new(
        layers: usize,
        width: usize,
        budget_tokens: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let max_blocks = budget_tokens.div_ceil(BLOCK).max(1);
        let blocks = if device.is_cuda() {
            max_blocks
        } else {
            max_blocks.min(64)
        };
        let mk = || Tensor::zeros((blocks, BLOCK, width), dtype, device);
        let k = (0..layers)
            .map(|_| mk())
            .collect::<candle_core::Result<_>>()?;
        let v = (0..layers)
            .map(|_| mk())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            k,
            v,
            width,
            dtype,
            device: device.clone(),
            blocks,
            max_blocks,
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
            keys: vec![None; blocks],
            cached: HashMap::new(),
            evictable: VecDeque::new(),
            idle_cached: 0,
            seqs: Vec::new(),
            reference: false,
        })
    }

    /// Makes decode steps attend by the reference path (gather the rows, masked softmax)
    /// even where a kernel reads the blocks in place: for checking the kernel against it.
    pub fn set_reference(&mut self, on: bool) {
        self.reference = on;
    }

    /// A new, empty sequence.
    pub fn alloc(&mut self) -> candle_core::Result<usize> {
        Ok(self.insert(SeqKv::default()))
    }

    /// A new sequence for `prompt`, holding the longest run of its full blocks that are
    /// cached; returns it and how many of the prompt's tokens it already holds. At least the
    /// last prompt token is left to compute, so its logits come out of the prefill.
    pub fn alloc_prefix(&mut self, prompt: &[u32]) -> (usize, usize) {
        let mut seq = SeqKv::default();
        let mut parent = 0u64;
        for chunk in prompt.chunks_exact(BLOCK) {
            let key = BlockKey {
                parent,
                tokens: chunk.to_vec(),
            };
            let h = key.hash();
            let Some(&b) = self.cached.get(&h) else { break };
            if self.keys[b as usize].as_ref() != Some(&key) {
                break;
            }
            self.hold(b);
            seq.blocks.push(b);
            seq.hashes.push(h);
            seq.tokens.extend_from_slice(chunk);
            parent = h;
        }
        // A whole prompt found: its last token is computed again, into a copy of its block.
        let held = seq.tokens.len().min(prompt.len().saturating_sub(1));
        seq.len = held;
        seq.tokens.truncate(held);
        seq.hashes.truncate(held / BLOCK);
        (self.insert(seq), held)
    }

    fn insert(&mut self, seq: SeqKv) -> usize {
        match self.seqs.iter().position(Option::is_none) {
            Some(i) => {
                self.seqs[i] = Some(seq);
                i
            }
            None => {
                self.seqs.push(Some(seq));
                self.seqs.len() - 1
            }
        }
    }

    /// Ends sequence `id`: its blocks go back to the pool (registered ones stay cached).
    pub fn release(&mut self, id: usize) {
        let Some(seq) = self.seqs.get_mut(id).and_then(Option::take) else {
            return;
        };
        for b in seq.blocks {
            self.drop_ref(b);
        }
    }

    /// Tokens cached for sequence `id`.
    pub fn len(&self, id: usize) -> usize {
        self.seq(id).map(|s| s.len).unwrap_or(0)
    }

    /// Whether no sequence holds tokens.
    pub fn is_empty(&self) -> bool {
        self.seqs.iter().flatten().all(|s| s.len == 0)
    }

    /// Blocks that can still be given to sequences (free, cached but idle, or not yet
    /// allocated within the budget).
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.idle_cached + (self.max_blocks - self.blocks)
    }

    /// Blocks in the budget.
    pub fn total_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.refs.iter().filter(|r| **r > 0).count()
    }

    /// New blocks sequence `id` needs to append `n` tokens (a copy of a shared block
    /// included).
    pub fn blocks_needed(&self, id: usize, n: usize) -> usize {
        let Some(s) = self.seq(id) else {
            return n.div_ceil(BLOCK);
        };
        let have = s.blocks.len();
        let want = (s.len + n).div_ceil(BLOCK);
        let cow =
            usize::from(n > 0 && s.len / BLOCK < have && !self.writable(s.blocks[s.len / BLOCK]));
        want.saturating_sub(have) + cow
    }

    /// Bytes of K and V per cached token, every layer counted.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.k.len() * self.width * self.dtype.size_in_bytes()
    }

    pub(super) fn seq(&self, id: usize) -> Option<&SeqKv> {
        self.seqs.get(id).and_then(Option::as_ref)
    }

    fn writable(&self, b: u32) -> bool {
        self.refs[b as usize] == 1 && self.keys[b as usize].is_none()
    }

    fn hold(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 && self.keys[i].is_some() {
            self.idle_cached -= 1;
        }
        self.refs[i] += 1;
    }

    fn drop_ref(&mut self, b: u32) {
        let i = b as usize;
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] == 0 {
            if self.keys[i].is_some() {
                self.idle_cached += 1;
                self.evictable.push_back(b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// A block for one holder: a free one, else the least recently released cached one,
    /// else a new one within the budget.
    fn take_block(&mut self) -> candle_core::Result<u32> {
        if let Some(b) = self.free.pop() {
            self.refs[b as usize] = 1;
            return Ok(b);
        }
        while let Some(b) = self.evictable.pop_front() {
            let i = b as usize;
            if self.refs[i] != 0 {
                continue;
            }
            let Some(key) = self.keys[i].take() else {
                continue;
            };
            self.cached.remove(&key.hash());
            self.idle_cached -= 1;
            self.refs[i] = 1;
            return Ok(b);
        }
        if self.blocks < self.max_blocks {
            self.grow()?;
            return self.take_block();
        }
        candle_core::bail!(
            "the KV cache has no free block (all {} blocks of {BLOCK} tokens are held; inference.engine.kv_budget_tokens)",
            self.max_blocks
        )
    }

    /// Doubles the pools (within the budget).
    fn grow(&mut self) -> candle_core::Result<()> {
        let more = self.blocks.min(self.max_blocks - self.blocks).max(1);
        let pad = Tensor::zeros((more, BLOCK, self.width), self.dtype, &self.device)?;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = Tensor::cat(&[&*t, &pad], 0)?;
        }
        let old = self.blocks;
        self.blocks += more;
        self.refs.resize(self.blocks, 0);
        self.keys.resize(self.blocks, None);
        self.free.extend((old as u32..self.blocks as u32).rev());
        Ok(())
    }

    /// Gives sequence `id` room for `n` more tokens and returns the pool row of each:
    /// new blocks as needed, and a copy of the block it continues when that one is shared.
    pub(super) fn prepare(&mut self, id: usize, n: usize) -> candle_core::Result<Vec<u32>> {
        let Some(mut seq) = self.seqs.get_mut(id).and_then(Option::take) else {
            candle_core::bail!("KV sequence {id} does not exist");
        };
        let r = self.prepare_seq(&mut seq, n);
        self.seqs[id] = Some(seq);
        r
    }

    fn prepare_seq(&mut self, seq: &mut SeqKv, n: usize) -> candle_core::Result<Vec<u32>> {
        let first = seq.len / BLOCK;
        if n > 0 && first < seq.blocks.len() && !self.writable(seq.blocks[first]) {
            let old = seq.blocks[first];
            let new = self.take_block()?;
            for t in self.k.iter().chain(self.v.iter()) {
                t.slice_set(&t.narrow(0, old as usize, 1)?.copy()?, 0, new as usize)?;
            }
            seq.blocks[first] = new;
            self.drop_ref(old);
        }
        while seq.blocks.len() < (seq.len + n).div_ceil(BLOCK) {
            let b = self.take_block()?;
            seq.blocks.push(b);
        }
        Ok((seq.len..seq.len + n)
            .map(|p| seq.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
            .collect())
    }

    /// Records that `tokens` were written to sequence `id` (after [`Self::prepare`]) and
    /// registers the blocks they filled.
    pub(super) fn commit(&mut self, id: usize, tokens: &[u32]) {
        let Some(mut seq) = self.seqs.get_mut(id).and_then(Option::take) else {
            return;
        };
        seq.tokens.extend_from_slice(tokens);
        seq.len += tokens.len();
        while seq.hashes.len() < seq.len / BLOCK {
            let i = seq.hashes.len();
            let key = BlockKey {
                parent: seq.hashes.last().copied().unwrap_or(0),
                tokens: seq.tokens[i * BLOCK..(i + 1) * BLOCK].to_vec(),
            };
            let h = key.hash();
            let b = seq.blocks[i];
            if !self.cached.contains_key(&h) && self.keys[b as usize].is_none() {
                self.cached.insert(h, b);
                self.keys[b as usize] = Some(key);
            }
            seq.hashes.push(h);
        }
        self.seqs[id] = Some(seq);
    }

    /// The pool rows of sequence `id`'s first `len` tokens.
    pub(super) fn rows(&self, id: usize, len: usize) -> Vec<u32> {
        let Some(s) = self.seq(id) else {
            return Vec::new();
        };
        (0..len)
            .map(|p| s.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
            .collect()
    }
}
