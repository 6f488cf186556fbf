//! Checkpoints: a run stopped after step k and resumed from its checkpoint in a fresh
//! trainer gives the same losses as the run that was never stopped; a non-finite loss stops
//! training with a clear error and leaves the last good checkpoint usable.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use dagfleet_models::{Arch, ModelConfig};
use dagfleet_protocol::spec::{Batching, TrainSpec};
use dagfleet_trainer::data::Example;
use dagfleet_trainer::model::TrainModel;
use dagfleet_trainer::weights::BaseWeights;
use dagfleet_trainer::{TrainError, Trainer};

fn cfg() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        hidden: 32,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        vocab: 64,
        eps: 1e-5,
        rope_theta: 10_000.0,
        context: 128,
        rope_neox: true,
        intermediate: 48,
    }
}

fn rows() -> Vec<Example> {
    (0..12u32)
        .map(|i| {
            let n = 6 + (i as usize % 5);
            Example {
                ids: (0..n as u32).map(|j| (i * 7 + j * 3) % 64).collect(),
                label: (0..n).map(|j| j >= 3).collect(),
            }
        })
        .collect()
}

fn spec(dropout: f64, batching: Batching) -> TrainSpec {
    TrainSpec {
        r: 4,
        alpha: 8.0,
        dropout,
        lr: 5e-3,
        warmup_steps: 2,
        micro_batch: 2,
        grad_accum: 1,
        max_seq_len: 16,
        batching,
        epochs: 2,
        eval_every: 3,
        seed: 21,
        loss_chunk: 7,
        ..TrainSpec::default()
    }
}

fn trainer(spec: TrainSpec) -> Trainer {
    let base = BaseWeights::random(cfg(), true, 2, &Device::Cpu, DType::F32).unwrap();
    let model = TrainModel::new(base, 24).unwrap();
    let all = rows();
    let (train, valid) = (all[..10].to_vec(), all[10..].to_vec());
    Trainer::new(model, spec, train, valid, 0, "fp".into()).unwrap()
}

#[test]
fn a_resumed_run_gives_the_same_losses_as_an_uninterrupted_one() {
    for (dropout, batching) in [(0.0, Batching::Pack), (0.2, Batching::Bucket)] {
        let mut full = trainer(spec(dropout, batching));
        let total = full.total_steps();
        assert!(total >= 6, "{total}");
        let mut want = Vec::new();
        while !full.done() {
            want.push(full.step().unwrap());
        }
        // Stop after step k; a new process (new trainer) picks the checkpoint up.
        let k = 4;
        let mut first = trainer(spec(dropout, batching));
        for _ in 0..k {
            first.step().unwrap();
        }
        let ck = first.checkpoint().unwrap();
        assert_eq!(ck.step, k as u64);
        drop(first);
        let mut resumed = trainer(spec(dropout, batching));
        resumed.restore(&ck).unwrap();
        assert_eq!(resumed.state.step, k as u64);
        while !resumed.done() {
            resumed.step().unwrap();
        }
        let got = &resumed.state.history;
        assert_eq!(
            got.len(),
            want.len(),
            "the history travels with the checkpoint"
        );
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.step, w.step);
            assert!(
                (g.loss - w.loss).abs() <= 1e-6 * w.loss.abs().max(1.0),
                "step {}: {} vs {}",
                w.step,
                g.loss,
                w.loss
            );
            assert_eq!(g.valid_loss.is_some(), w.valid_loss.is_some());
            if let (Some(a), Some(b)) = (g.valid_loss, w.valid_loss) {
                assert!((a - b).abs() <= 1e-6 * b.max(1.0));
            }
        }
        // And training did something: B starts at zero and has moved.
        let moved = full.lora.params[1].abs().unwrap().max_all().unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 1e-4);
        for (a, b) in resumed.lora.params.iter().zip(&full.lora.params) {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}

#[test]
fn checkpoints_of_another_run_are_refused() {
    let mut a = trainer(spec(0.0, Batching::Pack));
    a.step().unwrap();
    let ck = a.checkpoint().unwrap();
    let base = BaseWeights::random(cfg(), true, 2, &Device::Cpu, DType::F32).unwrap();
    let model = TrainModel::new(base, 24).unwrap();
    let mut other = Trainer::new(
        model,
        spec(0.0, Batching::Pack),
        rows(),
        vec![],
        0,
        "another".into(),
    )
    .unwrap();
    let e = other.restore(&ck).unwrap_err();
    assert!(e.to_string().contains("another spec"), "{e}");
}

#[test]
fn a_non_finite_loss_stops_training_and_the_last_checkpoint_stays_good() {
    let mut t = trainer(spec(0.0, Batching::Pack));
    t.step().unwrap();
    t.step().unwrap();
    let good = t.checkpoint().unwrap();
    // Poison an adapter: the next step's loss is NaN.
    let p = &t.lora.params[1];
    t.lora.params[1] = Tensor::full(f32::NAN, p.dims(), p.device()).unwrap();
    let e = t.step().unwrap_err();
    assert!(matches!(e, TrainError::NonFinite { step: 3, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("last good checkpoint"), "{msg}");
    assert_eq!(t.state.step, 2, "the failed step is not counted");
    let mut r = trainer(spec(0.0, Batching::Pack));
    r.restore(&good).unwrap();
    let m = r.step().unwrap();
    assert!(m.loss.is_finite());
    assert_eq!(m.step, 3);
}

#[test]
fn empty_data_is_refused() {
    let base = BaseWeights::random(cfg(), true, 2, &Device::Cpu, DType::F32).unwrap();
    let model = TrainModel::new(base, 24).unwrap();
    let e = Trainer::new(
        model,
        spec(0.0, Batching::Pack),
        vec![],
        vec![],
        0,
        "x".into(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no training rows"), "{e}");
}
