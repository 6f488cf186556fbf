//! The training loop: optimizer steps over a fixed, seeded plan of micro-batches, with
//! validation, early stopping, and checkpoints that hold everything a resumed job needs to
//! continue exactly where the killed one stopped.
//!
//! # What a checkpoint holds
//! - the adapters and both AdamW moments (`state.safetensors`, f32, exact);
//! - the step and optimizer step count, the metrics so far, the early-stopping state and a
//!   fingerprint of the spec, data and base model (`state.json`).
//!
//! The data cursor is the step: the plan of micro-batches is a pure function of the seed
//! and the data, and dropout masks are drawn from seeds derived from (seed, micro-batch,
//! layer, module), so nothing random is carried as opaque state.

use bytes::Bytes;
use candle_core::Tensor;
use dagfleet_protocol::spec::TrainSpec;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

use crate::data::{host_batch, plan_epoch, plan_run, Example, Packing, Plan};
use crate::lora::Lora;
use crate::model::{DropoutSeed, TrainModel};
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::TrainError;

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done after this one.
    pub step: u64,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Mean cross-entropy per label token.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding excluded).
    pub tokens: u64,
    /// Label tokens.
    pub label_tokens: u64,
    /// Tokens per second of wall time.
    pub tokens_per_s: f64,
    /// Device memory in use, where the device says.
    pub gpu_mem_bytes: Option<u64>,
    /// Validation loss, when measured after this step.
    pub valid_loss: Option<f64>,
    /// Seconds since training started (summed over attempts).
    pub elapsed_s: f64,
}

/// Progress that a checkpoint carries besides tensors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Every step's metrics.
    pub history: Vec<StepMetrics>,
    /// Best validation loss so far.
    pub best_valid: Option<f64>,
    /// Evaluations since the best.
    pub bad_evals: u32,
    /// Stopped by early stopping.
    pub stopped_early: bool,
    /// Training seconds before this attempt.
    pub elapsed_s: f64,
}

impl TrainState {
    /// Records a validation loss: the best so far resets the count of evaluations without
    /// improvement; `patience` (> 0) of those in a row stop training.
    pub fn note_validation(&mut self, v: f64, patience: u32) {
        match self.best_valid {
            Some(b) if v >= b => self.bad_evals += 1,
            _ => {
                self.best_valid = Some(v);
                self.bad_evals = 0;
            }
        }
        if patience > 0 && self.bad_evals >= patience {
            self.stopped_early = true;
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    version: u32,
    fingerprint: String,
    opt_t: u64,
    state: TrainState,
    /// How the rest of a run is reproduced: for readers, not for the loader.
    rng: serde_json::Value,
}

/// A checkpoint as stored: tensors and metadata.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Adapters and AdamW moments, safetensors.
    pub tensors: Bytes,
    /// `state.json`.
    pub meta: Bytes,
    /// Optimizer steps done.
    pub step: u64,
}

/// A training run in progress.
pub struct Trainer {
    /// The model with its frozen base.
    pub model: TrainModel,
    /// The adapters being trained.
    pub lora: Lora,
    /// Optimizer state.
    pub opt: AdamW,
    /// Settings.
    pub spec: TrainSpec,
    /// Progress.
    pub state: TrainState,
    train: Vec<Example>,
    valid: Vec<Example>,
    plan: Plan,
    valid_plan: Plan,
    pad_id: u32,
    fingerprint: String,
    started: Instant,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.state.step)
            .field("total_steps", &self.total_steps())
            .finish()
    }
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Trainer {
    /// A fresh run: adapters initialised from `spec.seed`, zero optimizer state, the plan of
    /// every micro-batch made. `fingerprint` identifies (spec, data, base); a checkpoint with
    /// another fingerprint is refused.
    pub fn new(
        model: TrainModel,
        spec: TrainSpec,
        train: Vec<Example>,
        valid: Vec<Example>,
        pad_id: u32,
        fingerprint: String,
    ) -> Result<Self, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Data("no training rows".into()));
        }
        let targets = spec
            .target_modules
            .iter()
            .filter_map(|m| crate::lora::Module::from_short(m))
            .collect();
        let lora = Lora::init(
            &model.base.cfg,
            crate::lora::LoraConfig {
                r: spec.r,
                alpha: spec.alpha,
                dropout: spec.dropout,
                targets,
            },
            spec.seed,
            model.device(),
        )?;
        let opt = AdamW::new(
            AdamWConfig {
                lr: spec.lr,
                betas: spec.betas,
                eps: spec.adam_eps,
                weight_decay: spec.weight_decay,
            },
            &lora.params,
        )?;
        let packing = Packing {
            micro_batch: spec.micro_batch,
            max_seq_len: spec.max_seq_len,
            batching: spec.batching,
        };
        let plan = plan_run(&train, packing, spec.epochs, spec.seed);
        let order: Vec<usize> = (0..valid.len()).collect();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(spec.seed);
        let valid_plan = plan_epoch(&valid, &order, packing, &mut rng);
        Ok(Self {
            model,
            lora,
            opt,
            spec,
            state: TrainState::default(),
            train,
            valid,
            plan,
            valid_plan,
            pad_id,
            fingerprint,
            started: Instant::now(),
        })
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> u64 {
        let all = self.plan.len().div_ceil(self.spec.grad_accum) as u64;
        match self.spec.max_steps {
            0 => all,
            n => n.min(all),
        }
    }

    /// Micro-batches per epoch (averaged over epochs).
    fn micro_per_epoch(&self) -> f64 {
        self.plan.len() as f64 / f64::from(self.spec.epochs.max(1))
    }

    /// Whether training is over.
    pub fn done(&self) -> bool {
        self.state.step >= self.total_steps() || self.state.stopped_early
    }

    /// Whether validation rows exist.
    pub fn has_valid(&self) -> bool {
        !self.valid.is_empty()
    }

    /// One optimizer step over `grad_accum` micro-batches; validates when due.
    pub fn step(&mut self) -> Result<StepMetrics, TrainError> {
        let t0 = Instant::now();
        let step = self.state.step;
        let ga = self.spec.grad_accum;
        let start = step as usize * ga;
        let end = (start + ga).min(self.plan.len());
        if start >= end {
            return Err(TrainError::Model(format!(
                "step {step} is past the end of the plan"
            )));
        }
        let batches: Vec<_> = self.plan[start..end]
            .iter()
            .map(|seqs| host_batch(&self.train, seqs, self.pad_id))
            .collect();
        let label_tokens: usize = batches.iter().map(|b| b.targets.len()).sum();
        let tokens: usize = batches.iter().map(|b| b.real_tokens).sum();
        let scale = 1.0 / label_tokens.max(1) as f64;
        let lc = self.model.lora_compute(&self.lora)?;
        let mut grads = self.model.zero_grads(&self.lora)?;
        let mut loss_sum: Option<Tensor> = None;
        for (i, hb) in batches.iter().enumerate() {
            if hb.targets.is_empty() {
                continue;
            }
            let db = self.model.upload(hb, self.spec.loss_chunk)?;
            let seed = DropoutSeed(mix(self.spec.seed, (start + i) as u64));
            let l = self.model.forward_backward(
                &db,
                &self.lora,
                &lc,
                &mut grads,
                scale,
                seed,
                self.spec.activation_checkpointing,
            )?;
            loss_sum = Some(match loss_sum {
                None => l,
                Some(s) => (s + l)?,
            });
        }
        let loss = match &loss_sum {
            Some(s) => crate::model::scalar(s)? * scale,
            None => 0.0,
        };
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                what: format!("training loss is {loss}"),
            });
        }
        let mut grads = [AdamW::flatten(&grads)?];
        let grad_norm = clip_grad_norm(&mut grads, self.spec.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                what: format!("gradient norm is {grad_norm}"),
            });
        }
        let total = self.total_steps();
        let lr = lr_at(
            self.spec.schedule,
            self.spec.lr,
            self.spec.warmup_steps,
            total,
            step,
        );
        self.opt.step(&mut self.lora.params, &grads[0], lr)?;
        self.state.step += 1;
        let elapsed = t0.elapsed().as_secs_f64();
        let mut m = StepMetrics {
            step: self.state.step,
            epoch: end as f64 / self.micro_per_epoch().max(1.0),
            loss,
            lr,
            grad_norm,
            tokens: tokens as u64,
            label_tokens: label_tokens as u64,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            gpu_mem_bytes: Some(self.model.peak_memory()).filter(|b| *b > 0),
            valid_loss: None,
            elapsed_s: self.state.elapsed_s + self.started.elapsed().as_secs_f64(),
        };
        let every = self.spec.eval_every;
        let last = self.state.step >= total;
        if self.has_valid() && (last || (every > 0 && self.state.step.is_multiple_of(every))) {
            let v = self.evaluate()?;
            m.valid_loss = v;
            if let Some(v) = v {
                if !v.is_finite() {
                    return Err(TrainError::NonFinite {
                        step: self.state.step,
                        what: format!("validation loss is {v}"),
                    });
                }
                self.state
                    .note_validation(v, self.spec.early_stopping_patience);
            }
        }
        self.state.history.push(m.clone());
        Ok(m)
    }

    /// Mean validation cross-entropy per label token, without dropout; `None` without
    /// validation rows.
    pub fn evaluate(&self) -> Result<Option<f64>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let lc = self.model.lora_compute(&self.lora)?;
        let (mut sum, mut n) = (0.0, 0usize);
        for seqs in &self.valid_plan {
            let hb = host_batch(&self.valid, seqs, self.pad_id);
            if hb.targets.is_empty() {
                continue;
            }
            let db = self.model.upload(&hb, self.spec.loss_chunk)?;
            sum += self.model.loss(&db, &self.lora, &lc, None)?;
            n += hb.targets.len();
        }
        Ok((n > 0).then(|| sum / n as f64))
    }

    /// Logits `[t, vocab]` of one sequence with the current adapters.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor, TrainError> {
        self.model.logits(ids, &self.lora)
    }

    /// Everything needed to continue later.
    pub fn checkpoint(&self) -> Result<Checkpoint, TrainError> {
        // Three flat vectors, each moved off the device with one copy.
        let named: Vec<(String, Tensor)> = vec![
            (
                "lora".into(),
                AdamW::flatten(&self.lora.params)?.to_device(&candle_core::Device::Cpu)?,
            ),
            (
                "adamw.m".into(),
                self.opt.m.to_device(&candle_core::Device::Cpu)?,
            ),
            (
                "adamw.v".into(),
                self.opt.v.to_device(&candle_core::Device::Cpu)?,
            ),
        ];
        let tensors = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| TrainError::Model(format!("serializing a checkpoint: {e}")))?;
        let mut state = self.state.clone();
        state.elapsed_s += self.started.elapsed().as_secs_f64();
        let meta = CheckpointMeta {
            version: 1,
            fingerprint: self.fingerprint.clone(),
            opt_t: self.opt.t,
            state,
            rng: serde_json::json!({
                "seed": self.spec.seed,
                "data_order": "ChaCha8 per epoch from (seed, epoch); the cursor is the step",
                "dropout": "per (seed, micro-batch, layer, module)",
                "next_micro_batch": self.state.step as usize * self.spec.grad_accum,
            }),
        };
        Ok(Checkpoint {
            tensors: Bytes::from(tensors),
            meta: Bytes::from(serde_json::to_vec_pretty(&meta).unwrap_or_default()),
            step: self.state.step,
        })
    }

    /// Continues from `ck`, which must come from this same run (spec, data and base).
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<(), TrainError> {
        let meta: CheckpointMeta = serde_json::from_slice(&ck.meta)
            .map_err(|e| TrainError::Checkpoint(format!("state.json: {e}")))?;
        if meta.fingerprint != self.fingerprint {
            return Err(TrainError::Checkpoint(
                "it belongs to another spec, dataset or base model".into(),
            ));
        }
        let dev = self.model.device().clone();
        let map: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(&ck.tensors, &dev)
            .map_err(|e| TrainError::Checkpoint(format!("state.safetensors: {e}")))?;
        let get = |n: &str, like: &Tensor| -> Result<Tensor, TrainError> {
            let t = map
                .get(n)
                .ok_or_else(|| TrainError::Checkpoint(format!("tensor `{n}` is missing")))?;
            if t.dims() != like.dims() {
                return Err(TrainError::Checkpoint(format!(
                    "tensor `{n}` has shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.clone())
        };
        let flat = get("lora", &self.opt.m)?;
        self.lora.params = self.lora.split(&flat)?;
        let m = get("adamw.m", &self.opt.m)?;
        let v = get("adamw.v", &self.opt.v)?;
        self.opt.set_moments(m, v)?;
        self.opt.t = meta.opt_t;
        self.state = meta.state;
        self.started = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_counts_evaluations_without_improvement() {
        let mut st = TrainState::default();
        for v in [1.0, 0.9, 0.95, 0.85] {
            st.note_validation(v, 2);
            assert!(!st.stopped_early);
        }
        assert_eq!((st.best_valid, st.bad_evals), (Some(0.85), 0));
        let mut st = TrainState::default();
        for v in [1.0, 0.9, 0.95, 0.9] {
            st.note_validation(v, 2);
        }
        assert!(
            st.stopped_early,
            "two evaluations in a row not below the best"
        );
        let mut off = TrainState::default();
        for v in [1.0, 2.0, 3.0, 4.0] {
            off.note_validation(v, 0);
        }
        assert!(!off.stopped_early, "patience 0 never stops");
    }
}
