//! Training rows: ChatML JSONL rendered with the model's own chat template, tokenized with
//! a mask that marks assistant tokens (the only ones the loss counts), then packed or
//! bucketed into micro-batches.
//!
//! Bad rows are skipped and counted by reason, never fatal; an empty result is an error that
//! says why every row went.

use dagfleet_models::{ChatMessage, TextCodec};
use dagfleet_protocol::spec::{Batching, LongRows};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

use crate::model::HostBatch;

/// One tokenized row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether token `i` is a label (an assistant token); `label[0]` is never used.
    pub label: Vec<bool>,
}

impl Example {
    /// Tokens that are labels.
    pub fn label_tokens(&self) -> usize {
        self.label.iter().skip(1).filter(|l| **l).count()
    }
}

/// What happened to the rows of a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataStats {
    /// Non-empty lines read.
    pub rows: usize,
    /// Rows kept.
    pub kept: usize,
    /// Rows skipped, by reason, with the first line number (1-based) of each.
    pub skipped: BTreeMap<String, (usize, usize)>,
    /// Rows cut to `max_seq_len`.
    pub truncated: usize,
    /// Rows dropped for being longer than `max_seq_len`.
    pub dropped_long: usize,
    /// Tokens kept.
    pub tokens: usize,
    /// Label tokens kept.
    pub label_tokens: usize,
}

impl DataStats {
    fn skip(&mut self, reason: impl Into<String>, line: usize) {
        let e = self.skipped.entry(reason.into()).or_insert((0, line));
        e.0 += 1;
    }

    /// Rows skipped for any reason (long rows dropped included).
    pub fn skipped_rows(&self) -> usize {
        self.skipped.values().map(|(n, _)| n).sum()
    }

    /// One line per reason, e.g. `3 rows: no assistant turn (first at line 7)`.
    pub fn reasons(&self) -> Vec<String> {
        self.skipped
            .iter()
            .map(|(r, (n, line))| format!("{n} rows: {r} (first at line {line})"))
            .collect()
    }
}

/// The stop strings that end an assistant turn in common chat formats.
const TURN_ENDS: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"];

fn parse_messages(line: &str) -> Result<Vec<ChatMessage>, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let msgs = v
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or("no `messages` list")?;
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let role = m
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or("a message without a string `role`")?;
        let content = m
            .get("content")
            .and_then(|r| r.as_str())
            .ok_or("a message without a string `content`")?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!("role `{role}` is not system, user or assistant"));
        }
        out.push(ChatMessage {
            role: role.into(),
            content: content.into(),
        });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("no assistant turn".into());
    }
    if out
        .iter()
        .any(|m| m.role == "assistant" && m.content.trim().is_empty())
    {
        return Err("an empty assistant turn".into());
    }
    Ok(out)
}

/// Why one training row cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RowError {
    /// The chat template cannot render it.
    #[error("{0}")]
    Text(#[source] dagfleet_models::ModelError),
    /// The tokenizer cannot encode it.
    #[error("tokenizing: {0}")]
    Tokenize(String),
    /// It renders, but cannot be labelled.
    #[error("{0}")]
    Unusable(&'static str),
}

impl From<&'static str> for RowError {
    fn from(s: &'static str) -> Self {
        RowError::Unusable(s)
    }
}

/// Tokenizes one conversation: every assistant turn (with its end-of-turn token) is
/// labelled, everything else is context.
pub fn tokenize(codec: &TextCodec, messages: &[ChatMessage]) -> Result<Example, RowError> {
    let err = RowError::Text;
    let full = codec.render_chat(messages, false).map_err(err)?;
    let mut spans = Vec::new();
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prefix = codec.render_chat(&messages[..k], true).map_err(err)?;
        let upto = codec.render_chat(&messages[..=k], false).map_err(err)?;
        if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
            return Err(
                "the chat template does not render earlier turns as a prefix of later ones".into(),
            );
        }
        let turn = &upto[prefix.len()..];
        // The label ends with the end-of-turn token; what the template adds after it (a
        // newline) is context.
        let end = TURN_ENDS
            .iter()
            .filter_map(|s| turn.rfind(s).map(|i| i + s.len()))
            .max()
            .unwrap_or(turn.len());
        spans.push((prefix.len(), prefix.len() + end));
    }
    let enc = codec
        .tokenizer()
        .encode(full.as_str(), false)
        .map_err(|e| RowError::Tokenize(e.to_string()))?;
    let mut ids = enc.get_ids().to_vec();
    let mut label: Vec<bool> = enc
        .get_offsets()
        .iter()
        .map(|(s, _)| spans.iter().any(|(a, b)| s >= a && s < b))
        .collect();
    // A BOS the tokenizer would add is context.
    let with_bos = codec.encode("").unwrap_or_default();
    if let Some(&bos) = with_bos.first() {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
            label.insert(0, false);
        }
    }
    let ex = Example { ids, label };
    if ex.label_tokens() == 0 {
        return Err("no assistant tokens after tokenizing".into());
    }
    Ok(ex)
}

/// Reads ChatML JSONL rows: tokenized examples that fit the policy, and what happened to
/// the others.
pub fn read_rows(
    codec: &TextCodec,
    text: &str,
    max_seq_len: usize,
    long: LongRows,
    limit: Option<usize>,
) -> (Vec<Example>, DataStats) {
    let mut st = DataStats::default();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        st.rows += 1;
        let lineno = i + 1;
        let msgs = match parse_messages(line) {
            Ok(m) => m,
            Err(e) => {
                st.skip(format!("not a ChatML row: {e}"), lineno);
                continue;
            }
        };
        let mut ex = match tokenize(codec, &msgs) {
            Ok(ex) => ex,
            Err(e) => {
                st.skip(e.to_string(), lineno);
                continue;
            }
        };
        if ex.ids.len() > max_seq_len {
            match long {
                LongRows::Drop => {
                    st.dropped_long += 1;
                    st.skip(format!("longer than max_seq_len = {max_seq_len}"), lineno);
                    continue;
                }
                LongRows::Truncate => {
                    ex.ids.truncate(max_seq_len);
                    ex.label.truncate(max_seq_len);
                    if ex.label_tokens() == 0 {
                        st.skip(
                            format!("no assistant tokens within max_seq_len = {max_seq_len}"),
                            lineno,
                        );
                        continue;
                    }
                    st.truncated += 1;
                }
            }
        }
        st.kept += 1;
        st.tokens += ex.ids.len();
        st.label_tokens += ex.label_tokens();
        out.push(ex);
    }
    (out, st)
}

/// How rows become micro-batches.
#[derive(Clone, Copy, Debug)]
pub struct Packing {
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Longest sequence.
    pub max_seq_len: usize,
    /// Packing or bucketing.
    pub batching: Batching,
}

/// Rows of each micro-batch, each inner list one sequence.
pub type Plan = Vec<Vec<Vec<usize>>>;

/// The micro-batches of one epoch over `examples` in the order `order`.
pub fn plan_epoch(examples: &[Example], order: &[usize], p: Packing, rng: &mut ChaCha8Rng) -> Plan {
    let mb = p.micro_batch.max(1);
    match p.batching {
        Batching::Pack => {
            let mut seqs: Vec<Vec<usize>> = Vec::new();
            let mut cur: Vec<usize> = Vec::new();
            let mut len = 0;
            for &i in order {
                let n = examples[i].ids.len();
                if len + n > p.max_seq_len && !cur.is_empty() {
                    seqs.push(std::mem::take(&mut cur));
                    len = 0;
                }
                cur.push(i);
                len += n;
            }
            if !cur.is_empty() {
                seqs.push(cur);
            }
            seqs.chunks(mb).map(|c| c.to_vec()).collect()
        }
        Batching::Bucket => {
            let mut batches: Plan = Vec::new();
            for group in order.chunks(mb * 64) {
                let mut g = group.to_vec();
                g.sort_by_key(|i| std::cmp::Reverse(examples[*i].ids.len()));
                for c in g.chunks(mb) {
                    batches.push(c.iter().map(|i| vec![*i]).collect());
                }
            }
            batches.shuffle(rng);
            batches
        }
    }
}

/// Every micro-batch of a run over `epochs` epochs: each epoch shuffled by `seed` and the
/// epoch number, so the plan of a resumed job is the uninterrupted job's plan.
pub fn plan_run(examples: &[Example], p: Packing, epochs: u32, seed: u64) -> Plan {
    let mut plan = Vec::new();
    for e in 0..epochs {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (u64::from(e) + 1).wrapping_mul(0x9E37_79B9));
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut rng);
        plan.extend(plan_epoch(examples, &order, p, &mut rng));
    }
    plan
}

/// Lays out one micro-batch: sequences padded to a common length (a multiple of 8), each
/// row its own segment with positions from 0, and the next-token labels.
pub fn host_batch(examples: &[Example], seqs: &[Vec<usize>], pad_id: u32) -> HostBatch {
    let b = seqs.len();
    let longest = seqs
        .iter()
        .map(|s| s.iter().map(|i| examples[*i].ids.len()).sum::<usize>())
        .max()
        .unwrap_or(1);
    let t = longest.div_ceil(8) * 8;
    let n = b * t;
    let mut hb = HostBatch {
        b,
        t,
        ids: vec![pad_id; n],
        pos: vec![0; n],
        seg: (0..n as u32).map(|i| (1 << 24) + i).collect(),
        target_pos: Vec::new(),
        targets: Vec::new(),
        real_tokens: 0,
    };
    for (bi, seq) in seqs.iter().enumerate() {
        let mut off = bi * t;
        for (si, &r) in seq.iter().enumerate() {
            let ex = &examples[r];
            for (j, &id) in ex.ids.iter().enumerate() {
                hb.ids[off + j] = id;
                hb.pos[off + j] = j as u32;
                hb.seg[off + j] = si as u32;
                if j + 1 < ex.ids.len() && ex.label[j + 1] {
                    hb.target_pos.push((off + j) as u32);
                    hb.targets.push(ex.ids[j + 1]);
                }
            }
            off += ex.ids.len();
            hb.real_tokens += ex.ids.len();
        }
    }
    hb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, labels_from: usize) -> Example {
        Example {
            ids: (0..n as u32).map(|i| 100 + i).collect(),
            label: (0..n).map(|i| i >= labels_from).collect(),
        }
    }

    #[test]
    fn packing_never_crosses_rows_and_fills_sequences() {
        let exs = vec![ex(5, 2), ex(3, 1), ex(6, 4), ex(2, 1)];
        let p = Packing {
            micro_batch: 2,
            max_seq_len: 8,
            batching: Batching::Pack,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let plan = plan_epoch(&exs, &[0, 1, 2, 3], p, &mut rng);
        // [0, 1] (8 tokens), [2, 3] (8 tokens): one micro-batch of two sequences.
        assert_eq!(plan, vec![vec![vec![0, 1], vec![2, 3]]]);
        let hb = host_batch(&exs, &plan[0], 0);
        assert_eq!((hb.b, hb.t), (2, 8));
        assert_eq!(&hb.pos[..8], &[0, 1, 2, 3, 4, 0, 1, 2]);
        assert_eq!(&hb.seg[..8], &[0, 0, 0, 0, 0, 1, 1, 1]);
        // Labels: row 0 tokens 2..5 are predicted from positions 1..4; row 1 tokens 1..3
        // from positions 5, 6. No label crosses from row 0 into row 1.
        assert_eq!(&hb.target_pos[..6], &[1, 2, 3, 5, 6, 8 + 3]);
        assert_eq!(hb.targets[0], exs[0].ids[2]);
        assert_eq!(hb.real_tokens, 16);
        let total: usize = exs.iter().map(|e| e.label_tokens()).sum();
        assert_eq!(hb.targets.len(), total);
    }

    #[test]
    fn bucketing_pads_and_gives_padding_its_own_segments() {
        let exs = vec![ex(5, 2), ex(3, 1)];
        let p = Packing {
            micro_batch: 2,
            max_seq_len: 8,
            batching: Batching::Bucket,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let plan = plan_epoch(&exs, &[1, 0], p, &mut rng);
        assert_eq!(plan, vec![vec![vec![0], vec![1]]]);
        let hb = host_batch(&exs, &plan[0], 7);
        assert_eq!(hb.t, 8);
        assert_eq!(hb.ids[8 + 3], 7);
        let pads: Vec<u32> = hb.seg[8 + 3..16].to_vec();
        let mut uniq = pads.clone();
        uniq.dedup();
        assert_eq!(uniq.len(), pads.len());
        assert!(pads.iter().all(|s| *s >= 1 << 24));
    }

    #[test]
    fn run_plans_are_seeded() {
        let exs: Vec<Example> = (0..20).map(|i| ex(3 + i % 5, 1)).collect();
        let p = Packing {
            micro_batch: 2,
            max_seq_len: 16,
            batching: Batching::Pack,
        };
        assert_eq!(plan_run(&exs, p, 2, 5), plan_run(&exs, p, 2, 5));
        assert_ne!(plan_run(&exs, p, 1, 5), plan_run(&exs, p, 1, 6));
        let rows: usize = plan_run(&exs, p, 2, 5)
            .iter()
            .flatten()
            .map(|s| s.len())
            .sum();
        assert_eq!(rows, 40);
    }
}
