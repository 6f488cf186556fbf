//! Continuous batching: one scheduler thread owns the model; requests join the running batch
//! at token boundaries, each sequence with its own KV cache, within a token budget.

use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::model::{Model, PagedKv};
use crate::InferError;
use dagfleet_models::{ChatMessage, TextCodec};

/// How to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenParams {
    /// Most new tokens.
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k sampling.
    pub top_k: Option<usize>,
    /// Sampling seed; random when absent.
    pub seed: Option<u64>,
    /// Strings that end generation; they are not part of the output.
    pub stop: Vec<String>,
    /// Keep generating through end-of-turn tokens (benchmarks: exactly `max_tokens`).
    pub ignore_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

/// Numbers of one finished generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenStats {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Submission to first token, milliseconds (queueing included).
    pub ttft_ms: f64,
    /// Tokens per second after the first.
    pub decode_tok_s: f64,
}

/// What a request's channel carries.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    /// New text.
    Delta(String),
    /// The end, with the full text.
    Done(String, GenStats),
    /// It failed.
    Error(String),
    /// It ran past the engine's deadline; the text so far was streamed as deltas.
    Deadline(String),
}

pub use dagfleet_runtime::config::EngineConfig;

/// Live counters, for `/metrics` and the worker's capacity.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests accepted.
    pub requests: AtomicU64,
    /// Requests refused (overload, too long).
    pub rejected: AtomicU64,
    /// Requests whose client went away.
    pub disconnected: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Sequences decoding now.
    pub running: AtomicUsize,
    /// Requests waiting now.
    pub waiting: AtomicUsize,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Sequences whose prompt is being prefilled now.
    pub prefilling: AtomicUsize,
    /// Prefill chunks run.
    pub prefill_chunks: AtomicU64,
    /// Requests ended by the deadline.
    pub expired: AtomicU64,
    /// Sequences preempted for room in the KV cache (recomputed when they come back).
    pub preempted: AtomicU64,
    /// Prompt tokens found in the prefix cache instead of computed.
    pub prefix_hit_tokens: AtomicU64,
    /// When the scheduler last finished a step (prefill chunk or decode), milliseconds
    /// since the engine started; `/health` compares it with the clock.
    pub last_step_ms: AtomicU64,
    /// When the engine started.
    pub started: std::sync::OnceLock<Instant>,
}

impl EngineStats {
    /// Milliseconds since the last finished step, when the engine has work (sequences
    /// running or prefilling, requests waiting); `None` when it is idle.
    pub fn busy_for_ms(&self) -> Option<u64> {
        let work = self.running.load(Ordering::Relaxed)
            + self.prefilling.load(Ordering::Relaxed)
            + self.waiting.load(Ordering::Relaxed);
        if work == 0 {
            return None;
        }
        let now = self.started.get()?.elapsed().as_millis() as u64;
        Some(now.saturating_sub(self.last_step_ms.load(Ordering::Relaxed)))
    }

    fn stepped(&self) {
        if let Some(t) = self.started.get() {
            self.last_step_ms
                .store(t.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

struct Job {
    prompt: Vec<u32>,
    params: GenParams,
    events: mpsc::UnboundedSender<GenEvent>,
    submitted: Instant,
}

struct Seq {
    job: Job,
    /// Its sequence in the KV cache.
    kv: usize,
    /// What must be in the KV cache before it decodes: the prompt, and after a preemption
    /// also the tokens generated before it (all but the newest, which is `next`).
    ctx: Vec<u32>,
    /// Tokens of `ctx` in the cache so far (computed or found cached).
    pos: usize,
    /// When it was admitted (the latest admitted is preempted first).
    admitted: u64,
    sampler: LogitsProcessor,
    out: Vec<u32>,
    next: u32,
    emitted: usize,
    first_at: Option<Instant>,
    last_at: Instant,
    max_new: usize,
    text: String,
    prefix_offset: usize,
    read_offset: usize,
    searched: usize,
}

/// A running engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Job>,
    codec: Arc<TextCodec>,
    /// Counters.
    pub stats: Arc<EngineStats>,
    cfg: EngineConfig,
    context: usize,
    /// Name the model is served under.
    pub model_name: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model_name)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Engine {
    /// Starts the scheduler thread.
    pub fn start(model: Model, codec: TextCodec, cfg: EngineConfig, model_name: String) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let stats = Arc::new(EngineStats::default());
        let _ = stats.started.set(Instant::now());
        let codec = Arc::new(codec);
        let context = model.cfg.context;
        let (s, c, k) = (stats.clone(), codec.clone(), cfg.clone());
        std::thread::Builder::new()
            .name("dagfleet-engine".into())
            .spawn(move || schedule(model, c, k, rx, s))
            .ok();
        Self {
            tx,
            codec,
            stats,
            cfg,
            context,
            model_name,
        }
    }

    /// The model's context length.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The tokenizer and chat template.
    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    /// Queues a tokenized prompt; events arrive on the returned channel. Dropping the
    /// receiver cancels the request and frees its slot.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenParams,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, InferError> {
        if prompt.is_empty() {
            return Err(InferError::Request("the prompt is empty".into()));
        }
        if prompt.len() >= self.context {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(InferError::Request(format!(
                "the prompt has {} tokens; the model's context is {} tokens, and at least one must be left to generate",
                prompt.len(),
                self.context
            )));
        }
        let need = (prompt.len() + params.max_tokens as usize).min(self.context);
        if need > self.cfg.kv_budget_tokens {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(InferError::Request(format!(
                "the request needs {need} tokens of KV cache (prompt {} + max_tokens {}); the budget is {} tokens",
                prompt.len(),
                params.max_tokens,
                self.cfg.kv_budget_tokens
            )));
        }
        if self.stats.waiting.load(Ordering::Relaxed) >= self.cfg.max_queue {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(InferError::Overloaded(format!(
                "{} requests are waiting (max_queue)",
                self.cfg.max_queue
            )));
        }
        let (etx, erx) = mpsc::unbounded_channel();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Job {
                prompt,
                params,
                events: etx,
                submitted: Instant::now(),
            })
            .map_err(|_| InferError::Engine("the engine thread has stopped".into()))?;
        Ok(erx)
    }

    /// Renders, tokenizes and queues a chat.
    pub fn submit_chat(
        &self,
        messages: &[ChatMessage],
        params: GenParams,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, InferError> {
        let text = self.codec.render(messages)?;
        let ids = self.codec.encode(&text)?;
        self.submit(ids, params)
    }

    /// Generates to the end and returns the text and its numbers.
    pub async fn generate(
        &self,
        messages: &[ChatMessage],
        params: GenParams,
    ) -> Result<(String, GenStats), InferError> {
        let mut rx = self.submit_chat(messages, params)?;
        collect(&mut rx).await
    }
}

/// Waits for the end of a request.
pub async fn collect(
    rx: &mut mpsc::UnboundedReceiver<GenEvent>,
) -> Result<(String, GenStats), InferError> {
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Delta(_) => {}
            GenEvent::Done(text, stats) => return Ok((text, stats)),
            GenEvent::Error(e) => return Err(InferError::Engine(e)),
            GenEvent::Deadline(e) => return Err(InferError::Deadline(e)),
        }
    }
    Err(InferError::Engine("the engine dropped the request".into()))
}

fn sampler(p: &GenParams) -> LogitsProcessor {
    let seed = p.seed.unwrap_or_else(rand_seed);
    let t = p.temperature;
    let s = if t <= 0.0 {
        Sampling::ArgMax
    } else {
        match (p.top_k, p.top_p) {
            (Some(k), Some(pp)) => Sampling::TopKThenTopP {
                k,
                p: pp,
                temperature: t,
            },
            (Some(k), None) => Sampling::TopK { k, temperature: t },
            (None, Some(pp)) => Sampling::TopP {
                p: pp,
                temperature: t,
            },
            (None, None) => Sampling::All { temperature: t },
        }
    };
    LogitsProcessor::from_sampling(seed, s)
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn schedule(
    model: Model,
    codec: Arc<TextCodec>,
    cfg: EngineConfig,
    rx: std::sync::mpsc::Receiver<Job>,
    stats: Arc<EngineStats>,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    // Admitted sequences: prefilling (pos < prompt) and decoding.
    let mut running: Vec<Seq> = Vec::new();
    let context = model.cfg.context;
    let chunk = cfg.prefill_chunk.max(1);
    let deadline = (!cfg.deadline.is_zero()).then_some(cfg.deadline);
    let expired = |submitted: Instant| deadline.is_some_and(|d| submitted.elapsed() > d);
    let expire_msg = || {
        format!(
            "the request ran past the engine's deadline of {:?} (inference.engine.deadline)",
            cfg.deadline
        )
    };
    let mut kv: PagedKv = match model.new_kv(cfg.kv_budget_tokens) {
        Ok(kv) => kv,
        Err(e) => {
            warn!(error = %e, "cannot allocate the KV cache; the engine stops");
            return;
        }
    };
    // Sequences preempted for room in the KV cache; they come back before new requests.
    let mut preempted: VecDeque<Seq> = VecDeque::new();
    let mut admissions = 0u64;
    // Blocks kept free at admission, so running sequences can grow a while before the
    // cache forces a preemption.
    let watermark = kv.total_blocks() / 100;
    let gauges = |running: &[Seq]| {
        let pre = running.iter().filter(|s| s.pos < s.ctx.len()).count();
        stats.prefilling.store(pre, Ordering::Relaxed);
        stats.running.store(running.len() - pre, Ordering::Relaxed);
    };
    loop {
        if running.is_empty() && waiting.is_empty() && preempted.is_empty() {
            stats.stepped();
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            waiting.push_back(j);
        }
        // Requests that left or expired while they waited.
        let gone_or_late = |j: &Job| {
            let gone = j.events.is_closed();
            let late = !gone && expired(j.submitted);
            if gone || late {
                stats.waiting.fetch_sub(1, Ordering::Relaxed);
                if gone {
                    stats.disconnected.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.expired.fetch_add(1, Ordering::Relaxed);
                    let _ = j.events.send(GenEvent::Deadline(expire_msg()));
                }
            }
            gone || late
        };
        waiting.retain(|j| !gone_or_late(j));
        preempted.retain(|s| !gone_or_late(&s.job));
        // Admit at this token boundary, by free blocks; the prompt is prefilled in the
        // steps that follow. A prompt whose first blocks are cached starts after them.
        while running.len() < cfg.max_batch {
            let resumed = !preempted.is_empty();
            let ctx: &[u32] = match preempted.front() {
                Some(s) => &s.ctx,
                None => match waiting.front() {
                    Some(j) => &j.prompt,
                    None => break,
                },
            };
            let (id, held) = kv.alloc_prefix(ctx);
            let need = kv.blocks_needed(id, ctx.len() - held);
            if !running.is_empty() && kv.available_blocks() < need + watermark {
                kv.release(id);
                break;
            }
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            stats
                .prefix_hit_tokens
                .fetch_add(held as u64, Ordering::Relaxed);
            admissions += 1;
            if resumed {
                if let Some(mut s) = preempted.pop_front() {
                    s.kv = id;
                    s.pos = held;
                    s.admitted = admissions;
                    running.push(s);
                }
                continue;
            }
            let Some(job) = waiting.pop_front() else {
                kv.release(id);
                break;
            };
            let max_new = (job.params.max_tokens as usize).min(context - job.prompt.len());
            let now = Instant::now();
            running.push(Seq {
                sampler: sampler(&job.params),
                ctx: job.prompt.clone(),
                job,
                kv: id,
                pos: held,
                admitted: admissions,
                out: Vec::new(),
                next: 0,
                emitted: 0,
                first_at: None,
                last_at: now,
                max_new,
                text: String::new(),
                prefix_offset: 0,
                read_offset: 0,
                searched: 0,
            });
        }
        // Drop sequences whose client went away or whose deadline passed.
        let mut late_clients = Vec::new();
        running.retain(|s| {
            let gone = s.job.events.is_closed();
            let late = !gone && expired(s.job.submitted);
            if gone {
                stats.disconnected.fetch_add(1, Ordering::Relaxed);
            } else if late {
                stats.expired.fetch_add(1, Ordering::Relaxed);
                late_clients.push(s.job.events.clone());
            }
            if gone || late {
                kv.release(s.kv);
            }
            !(gone || late)
        });
        // The gauges follow at once (with nobody left, the loop next blocks for a request),
        // before the expired clients hear of it, so what they see next agrees with /health.
        gauges(&running);
        for c in late_clients {
            let _ = c.send(GenEvent::Deadline(expire_msg()));
        }
        if running.is_empty() {
            continue;
        }
        // Prefill: up to `chunk` prompt tokens this step, in one forward pass over several
        // sequences, shortest remaining prompt first, so a short request is not held behind
        // a long one and decoding goes on between a long prompt's chunks. The keys the pass
        // attends over (each sequence's cached rows and its chunk) are capped too, which
        // bounds its attention scores.
        let mut order: Vec<usize> = (0..running.len())
            .filter(|&i| running[i].pos < running[i].ctx.len())
            .collect();
        order.sort_by_key(|&i| running[i].ctx.len() - running[i].pos);
        let mut budget = chunk;
        let max_keys = (4 * chunk).max(8192);
        let mut keys = 0;
        let mut finished = Vec::new();
        let mut evicted: Vec<usize> = Vec::new();
        // (index in running, tokens this step)
        let mut picked: Vec<(usize, usize)> = Vec::new();
        let mut blocks = 0;
        for i in order {
            if budget == 0 {
                break;
            }
            if evicted.contains(&i) {
                continue;
            }
            let n = (running[i].ctx.len() - running[i].pos).min(budget);
            let k = running[i].pos + n;
            if !picked.is_empty() && keys + k > max_keys {
                break;
            }
            // Room for the chunk: preempt the latest admitted others until it fits.
            let need = kv.blocks_needed(running[i].kv, n);
            while kv.available_blocks() < blocks + need {
                let mut taken: Vec<usize> = picked.iter().map(|p| p.0).collect();
                taken.extend(&evicted);
                match victim(&running, &taken, Some(i)) {
                    Some(v) => {
                        kv.release(running[v].kv);
                        evicted.push(v);
                    }
                    None => break,
                }
            }
            picked.push((i, n));
            blocks += need;
            keys += k;
            budget -= n;
        }
        if !picked.is_empty() {
            let items: Vec<(usize, &[u32], bool)> = picked
                .iter()
                .map(|&(i, n)| {
                    let s = &running[i];
                    // A preempted sequence that comes back already has its next token.
                    let want = s.pos + n == s.ctx.len() && s.out.is_empty();
                    (s.kv, &s.ctx[s.pos..s.pos + n], want)
                })
                .collect();
            let result = model.prefill_batch(&mut kv, &items);
            drop(items);
            stats
                .prefill_chunks
                .fetch_add(picked.len() as u64, Ordering::Relaxed);
            stats.stepped();
            match result {
                Err(e) => {
                    for &(i, _) in &picked {
                        let _ = running[i]
                            .job
                            .events
                            .send(GenEvent::Error(format!("prefill failed: {e}")));
                        finished.push(i);
                    }
                }
                Ok(logits) => {
                    for (&(i, n), logits) in picked.iter().zip(logits) {
                        let s = &mut running[i];
                        s.pos += n;
                        stats.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
                        let Some(logits) = logits else { continue };
                        match s.sampler.sample(&logits) {
                            Ok(t) => s.next = t,
                            Err(e) => {
                                let _ = s
                                    .job
                                    .events
                                    .send(GenEvent::Error(format!("sampling failed: {e}")));
                                finished.push(i);
                                continue;
                            }
                        }
                        if accept(&codec, s, &stats) {
                            finished.push(i);
                        }
                    }
                }
            }
        }
        preempt(
            &mut running,
            &mut preempted,
            &mut evicted,
            &mut finished,
            &stats,
        );
        for i in finished.into_iter().rev() {
            let s = running.swap_remove(i);
            kv.release(s.kv);
        }
        // One decode step for every sequence whose prompt is in, with room for its token:
        // the latest admitted are preempted until every other one has a block.
        let mut evicted = Vec::new();
        loop {
            let need: usize = (0..running.len())
                .filter(|&i| running[i].pos == running[i].ctx.len() && !evicted.contains(&i))
                .map(|i| kv.blocks_needed(running[i].kv, 1))
                .sum();
            if need <= kv.available_blocks() {
                break;
            }
            match victim(&running, &evicted, None) {
                Some(v) => {
                    kv.release(running[v].kv);
                    evicted.push(v);
                }
                None => break,
            }
        }
        preempt(
            &mut running,
            &mut preempted,
            &mut evicted,
            &mut Vec::new(),
            &stats,
        );
        gauges(&running);
        let ready: Vec<usize> = (0..running.len())
            .filter(|&i| running[i].pos == running[i].ctx.len())
            .collect();
        if ready.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = ready.iter().map(|&i| running[i].next).collect();
        let seqs: Vec<usize> = ready.iter().map(|&i| running[i].kv).collect();
        let result = model.decode(&mut kv, &seqs, &tokens);
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.stepped();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "decode step failed; failing its sequences");
                for &i in ready.iter().rev() {
                    let s = running.swap_remove(i);
                    kv.release(s.kv);
                    let _ = s
                        .job
                        .events
                        .send(GenEvent::Error(format!("decode failed: {e}")));
                }
                gauges(&running);
                continue;
            }
        };
        let mut finished = Vec::new();
        // Greedy rows take one batched argmax on the device and one small copy, instead of
        // copying every row's full vocabulary to the host.
        let argmax: Option<Vec<u32>> = if ready
            .iter()
            .any(|&i| running[i].job.params.temperature <= 0.0)
        {
            logits
                .argmax(candle_core::D::Minus1)
                .and_then(|a| a.to_vec1::<u32>())
                .ok()
        } else {
            None
        };
        for (row, &i) in ready.iter().enumerate() {
            let s = &mut running[i];
            if s.job.params.temperature <= 0.0 {
                if let Some(t) = argmax.as_ref().and_then(|a| a.get(row)) {
                    s.next = *t;
                    if accept(&codec, s, &stats) {
                        finished.push(i);
                    }
                    continue;
                }
            }
            let logits_row = match logits.get(row) {
                Ok(r) => r,
                Err(e) => {
                    let _ = s.job.events.send(GenEvent::Error(e.to_string()));
                    finished.push(i);
                    continue;
                }
            };
            match s.sampler.sample(&logits_row) {
                Ok(t) => s.next = t,
                Err(e) => {
                    let _ = s.job.events.send(GenEvent::Error(e.to_string()));
                    finished.push(i);
                    continue;
                }
            }
            if accept(&codec, s, &stats) {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let s = running.swap_remove(i);
            kv.release(s.kv);
        }
        gauges(&running);
    }
}

/// The running sequence to preempt next: the latest admitted one not already chosen and
/// not `keep`.
fn victim(running: &[Seq], chosen: &[usize], keep: Option<usize>) -> Option<usize> {
    (0..running.len())
        .filter(|i| Some(*i) != keep && !chosen.contains(i))
        .max_by_key(|&i| running[i].admitted)
}

/// Moves the `evicted` sequences (their KV already released) from `running` to the front
/// of `preempted`, to be recomputed from their prompt and output when there is room; the
/// indices in `finished` are kept valid.
fn preempt(
    running: &mut Vec<Seq>,
    preempted: &mut VecDeque<Seq>,
    evicted: &mut Vec<usize>,
    finished: &mut Vec<usize>,
    stats: &EngineStats,
) {
    finished.retain(|i| !evicted.contains(i));
    finished.sort_unstable();
    evicted.sort_unstable();
    for &i in evicted.iter().rev() {
        let mut s = running.remove(i);
        for f in finished.iter_mut() {
            if *f > i {
                *f -= 1;
            }
        }
        // The cache held the prompt and every output token but the newest.
        let fed = s.out.len().saturating_sub(1);
        s.ctx = s.job.prompt.iter().chain(&s.out[..fed]).copied().collect();
        s.pos = 0;
        stats.preempted.fetch_add(1, Ordering::Relaxed);
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        preempted.push_front(s);
    }
    evicted.clear();
}

/// Takes `s.next` as the sequence's newest token; streams new text; returns whether the
/// sequence is finished (and then has sent its `Done`).
fn accept(codec: &TextCodec, s: &mut Seq, stats: &EngineStats) -> bool {
    let now = Instant::now();
    if s.first_at.is_none() {
        s.first_at = Some(now);
    }
    s.last_at = now;
    let mut finish = None;
    if !s.job.params.ignore_eos && codec.stop_ids.contains(&s.next) {
        finish = Some(FinishReason::Stop);
    } else {
        s.out.push(s.next);
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    }
    // Incremental detokenization over a short window (the approach of HF's
    // text-generation-inference): decoding the whole output at every step would cost
    // O(length) per sequence per step.
    if finish.is_none() {
        let prefix = codec
            .decode(&s.out[s.prefix_offset..s.read_offset])
            .unwrap_or_default();
        let window = codec.decode(&s.out[s.prefix_offset..]).unwrap_or_default();
        if window.len() > prefix.len()
            && !window.ends_with('\u{FFFD}')
            && window.is_char_boundary(prefix.len())
        {
            s.text.push_str(&window[prefix.len()..]);
            s.prefix_offset = s.read_offset;
            s.read_offset = s.out.len();
        }
    }
    let mut text = std::mem::take(&mut s.text);
    let mut cut_by_stop = false;
    if finish.is_none() {
        // Only the tail can hold a stop string that was not there a step ago.
        let longest = s.job.params.stop.iter().map(|x| x.len()).max().unwrap_or(0);
        let mut from = s.searched.saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        s.searched = text.len();
        if let Some(cut) = s
            .job
            .params
            .stop
            .iter()
            .filter(|x| !x.is_empty())
            .filter_map(|x| text[from..].find(x.as_str()).map(|i| i + from))
            .min()
        {
            text.truncate(cut);
            cut_by_stop = true;
            finish = Some(FinishReason::Stop);
        } else if s.out.len() >= s.max_new {
            finish = Some(FinishReason::Length);
        }
    }
    if finish.is_some() && !cut_by_stop {
        // Flush what the window still held back (an unfinished character at the very end
        // stays out).
        let rest = codec.decode(&s.out[s.prefix_offset..]).unwrap_or_default();
        let prefix = codec
            .decode(&s.out[s.prefix_offset..s.read_offset])
            .unwrap_or_default();
        if rest.len() > prefix.len() && rest.is_char_boundary(prefix.len()) {
            text.push_str(rest[prefix.len()..].trim_end_matches('\u{FFFD}'));
        }
    }
    // Stream what is safe: not a partial UTF-8 character, not a possible stop-string prefix.
    let mut safe = text.len();
    if finish.is_none() {
        if text.ends_with('\u{FFFD}') {
            safe = text.len() - '\u{FFFD}'.len_utf8();
        }
        for st in &s.job.params.stop {
            for k in (1..st.len()).rev() {
                if st.is_char_boundary(k) && text[..safe].ends_with(&st[..k]) {
                    safe = safe.min(text.len() - k);
                    break;
                }
            }
        }
    }
    while !text.is_char_boundary(safe) {
        safe -= 1;
    }
    if safe > s.emitted && text.is_char_boundary(s.emitted) {
        let _ = s
            .job
            .events
            .send(GenEvent::Delta(text[s.emitted..safe].to_string()));
        s.emitted = safe;
    }
    let Some(reason) = finish else {
        s.text = text;
        return false;
    };
    let first = s.first_at.unwrap_or(now);
    let ttft = first.duration_since(s.job.submitted).as_secs_f64() * 1000.0;
    let span = s.last_at.duration_since(first).as_secs_f64();
    let stats_out = GenStats {
        finish_reason: reason,
        prompt_tokens: s.job.prompt.len(),
        generated_tokens: s.out.len(),
        ttft_ms: ttft,
        decode_tok_s: if span > 0.0 && s.out.len() > 1 {
            (s.out.len() - 1) as f64 / span
        } else {
            0.0
        },
    };
    debug!(tokens = s.out.len(), ?reason, "sequence finished");
    let _ = s.job.events.send(GenEvent::Done(text, stats_out));
    true
}
