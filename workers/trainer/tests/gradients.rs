//! The hand-written backward pass against central finite differences, in f64 on a toy
//! model: every adapter (A and B of the seven linear layers, in every layer) of a Qwen2-
//! shaped model (biases, untied head) and a Llama-shaped one (tied head), with grouped-query
//! attention, two rows packed into one sequence, padding, a chunked loss, and dropout on and
//! off; with and without activation checkpointing.

#![allow(clippy::unwrap_used, clippy::needless_range_loop)]

use candle_core::{DType, Device, Tensor};
use dagfleet_models::{Arch, ModelConfig};
use dagfleet_trainer::data::{host_batch, Example};
use dagfleet_trainer::lora::{Lora, LoraConfig, Module};
use dagfleet_trainer::model::{DropoutSeed, TrainModel};
use dagfleet_trainer::weights::BaseWeights;
use rand::{Rng, SeedableRng};

fn cfg(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        hidden: 16,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        vocab: 40,
        eps: 1e-5,
        rope_theta: 10_000.0,
        context: 64,
        rope_neox: true,
        intermediate: 24,
    }
}

fn examples() -> Vec<Example> {
    let ex = |ids: &[u32], from: usize| Example {
        ids: ids.to_vec(),
        label: (0..ids.len()).map(|i| i >= from).collect(),
    };
    vec![
        ex(&[1, 7, 9, 12, 30], 2),
        ex(&[3, 5, 38], 1),
        ex(&[2, 4, 6, 8, 10, 39], 3),
    ]
}

fn set(t: &Tensor, i: usize, delta: f64) -> Tensor {
    let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    v[i] += delta;
    Tensor::from_vec(v, t.dims(), t.device()).unwrap()
}

fn get(t: &Tensor, i: usize) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()[i]
}

#[test]
fn lora_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    for (arch, tied) in [(Arch::Qwen2, false), (Arch::Llama, true)] {
        for dropout in [0.0, 0.3] {
            let c = cfg(arch);
            let base = BaseWeights::random(c.clone(), tied, 11, &dev, DType::F64).unwrap();
            let model = TrainModel::new(base, 64).unwrap();
            let mut lora = Lora::init(
                &c,
                LoraConfig {
                    r: 3,
                    alpha: 6.0,
                    dropout,
                    targets: Module::ALL.to_vec(),
                },
                5,
                &dev,
            )
            .unwrap();
            // Non-zero B, so the gradients of A are not trivially zero.
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            for (i, p) in lora.params.iter_mut().enumerate() {
                let p64 = p.to_dtype(DType::F64).unwrap();
                *p = if i % 2 == 1 {
                    let v: Vec<f64> = (0..p64.elem_count())
                        .map(|_| rng.random_range(-0.3..0.3))
                        .collect();
                    Tensor::from_vec(v, p64.dims(), &dev).unwrap()
                } else {
                    p64
                };
            }
            let exs = examples();
            // Rows 0 and 1 packed into one sequence, row 2 alone with padding.
            let hb = host_batch(&exs, &[vec![0, 1], vec![2]], 0);
            assert_eq!(hb.b, 2);
            let db = model.upload(&hb, 3).unwrap();
            let seed = DropoutSeed(17);
            let lc = model.lora_compute(&lora).unwrap();
            let mut grads = model.zero_grads(&lora).unwrap();
            let loss = model
                .forward_backward(&db, &lora, &lc, &mut grads, 1.0, seed, true)
                .unwrap();
            let loss = dagfleet_trainer::model::scalar(&loss).unwrap();
            let again = model.loss(&db, &lora, &lc, Some(seed)).unwrap();
            assert!((loss - again).abs() < 1e-10, "{loss} vs {again}");
            // Without checkpointing: the same gradients.
            let mut g2 = model.zero_grads(&lora).unwrap();
            model
                .forward_backward(&db, &lora, &lc, &mut g2, 1.0, seed, false)
                .unwrap();
            for (a, b) in grads.iter().zip(&g2) {
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
            }
            let h = 1e-5;
            let mut checked = 0;
            let mut pick = rand_chacha::ChaCha8Rng::seed_from_u64(99);
            for pi in 0..lora.params.len() {
                let n = lora.params[pi].elem_count();
                for _ in 0..2 {
                    let e = pick.random_range(0..n);
                    let eval = |delta: f64| {
                        let mut l2 = lora.clone();
                        l2.params[pi] = set(&lora.params[pi], e, delta);
                        let lc2 = model.lora_compute(&l2).unwrap();
                        model.loss(&db, &l2, &lc2, Some(seed)).unwrap()
                    };
                    let fd = (eval(h) - eval(-h)) / (2.0 * h);
                    let an = get(&grads[pi], e);
                    assert!(
                        (fd - an).abs() <= 1e-6 * fd.abs().max(1.0),
                        "{arch:?} dropout {dropout}: {} [{e}]: analytic {an}, finite difference {fd}",
                        lora.peft_name(pi)
                    );
                    checked += 1;
                }
            }
            assert_eq!(checked, lora.params.len() * 2);
            // And some gradients are far from zero: the check is not vacuous.
            let big = grads
                .iter()
                .filter(|g| {
                    g.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                        > 1e-4
                })
                .count();
            assert!(big > grads.len() / 2, "{big} of {}", grads.len());
        }
    }
}

#[test]
fn only_label_positions_carry_loss() {
    // The batch's summed loss equals the cross-entropy of the full logits at label positions
    // only; the prompt positions' cross-entropy is not in it.
    let dev = Device::Cpu;
    let c = cfg(Arch::Qwen2);
    let base = BaseWeights::random(c.clone(), false, 4, &dev, DType::F64).unwrap();
    let model = TrainModel::new(base, 64).unwrap();
    let lora = Lora::init(
        &c,
        LoraConfig {
            r: 2,
            alpha: 2.0,
            dropout: 0.0,
            targets: vec![Module::Q, Module::V],
        },
        1,
        &dev,
    )
    .unwrap();
    let exs = vec![Example {
        ids: vec![1, 2, 3, 4, 5, 6, 7, 8],
        label: vec![false, false, false, false, true, true, true, true],
    }];
    let hb = host_batch(&exs, &[vec![0]], 0);
    assert_eq!(hb.target_pos, vec![3, 4, 5, 6]);
    let db = model.upload(&hb, 2).unwrap();
    let lc = model.lora_compute(&lora).unwrap();
    let loss = model.loss(&db, &lora, &lc, None).unwrap();
    let logits = model.logits(&exs[0].ids, &lora).unwrap();
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64).unwrap(), 1).unwrap();
    let lp = lp.to_vec2::<f64>().unwrap();
    let ce = |i: usize| -lp[i][exs[0].ids[i + 1] as usize];
    let labels: f64 = (3..7).map(ce).sum();
    let all: f64 = (0..7).map(ce).sum();
    assert!((loss - labels).abs() < 1e-3 * labels, "{loss} vs {labels}");
    assert!((loss - all).abs() > 1e-2, "prompt positions must not count");
}
