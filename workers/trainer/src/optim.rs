//! AdamW with decoupled weight decay (as `torch.optim.AdamW`), global gradient-norm
//! clipping (as `torch.nn.utils.clip_grad_norm_`) and the warm-up schedules of Hugging
//! Face's `get_{linear,cosine,constant}_schedule_with_warmup`, so a run here and a PEFT run
//! with the same settings follow the same learning rates.

use candle_core::Tensor;
use dagfleet_protocol::spec::Schedule;

use crate::TrainError;

/// Optimizer settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// beta1, beta2.
    pub betas: [f64; 2],
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW state: first and second moments of every parameter, and the step count. The
/// moments are two flat f32 vectors over all parameters in order, so an update is a handful
/// of kernels over one vector rather than a dozen per parameter.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Settings.
    pub cfg: AdamWConfig,
    /// First moments, flat.
    pub m: Tensor,
    /// Second moments, flat.
    pub v: Tensor,
    /// Updates applied.
    pub t: u64,
    /// Offset and shape of each parameter in the flat vectors.
    layout: Vec<(usize, Vec<usize>)>,
}

impl AdamW {
    /// Zero state for `params`.
    pub fn new(cfg: AdamWConfig, params: &[Tensor]) -> Result<Self, TrainError> {
        let mut layout = Vec::with_capacity(params.len());
        let mut n = 0;
        for p in params {
            layout.push((n, p.dims().to_vec()));
            n += p.elem_count();
        }
        let dev = params
            .first()
            .map(|p| p.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let z = Tensor::zeros(n, candle_core::DType::F32, &dev)?;
        Ok(Self {
            cfg,
            m: z.clone(),
            v: z,
            t: 0,
            layout,
        })
    }

    /// All of `ts` as one flat f32 vector, in order.
    pub fn flatten(ts: &[Tensor]) -> Result<Tensor, TrainError> {
        let flat = ts
            .iter()
            .map(|t| t.to_dtype(candle_core::DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&flat, 0)?)
    }

    /// Values in the flat vectors.
    pub fn len(&self) -> usize {
        self.m.elem_count()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the moments (from a checkpoint), checking their size.
    pub fn set_moments(&mut self, m: Tensor, v: Tensor) -> Result<(), TrainError> {
        if m.dims() != self.m.dims() || v.dims() != self.v.dims() {
            return Err(TrainError::Checkpoint(format!(
                "optimizer moments of {:?} and {:?} values; the adapters have {}",
                m.dims(),
                v.dims(),
                self.len()
            )));
        }
        self.m = m.to_dtype(candle_core::DType::F32)?;
        self.v = v.to_dtype(candle_core::DType::F32)?;
        Ok(())
    }

    /// One update of `params` with the flat gradient `grads` (see [`AdamW::flatten`]) at
    /// learning rate `lr`; the parameters become views of the updated flat vector.
    pub fn step(
        &mut self,
        params: &mut [Tensor],
        grads: &Tensor,
        lr: f64,
    ) -> Result<(), TrainError> {
        self.t += 1;
        let [b1, b2] = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let p = Self::flatten(params)?;
        self.m = ((&self.m * b1)? + (grads * (1.0 - b1))?)?;
        self.v = ((&self.v * b2)? + (grads.sqr()? * (1.0 - b2))?)?;
        let denom = ((&self.v / bc2)?.sqrt()? + self.cfg.eps)?;
        let upd = ((&self.m / bc1)? / denom)?;
        let p = ((p * (1.0 - lr * self.cfg.weight_decay))? - (upd * lr)?)?;
        for (i, (off, shape)) in self.layout.iter().enumerate() {
            let n: usize = shape.iter().product();
            params[i] = p.narrow(0, *off, n)?.reshape(shape.as_slice())?;
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`; when it is above `max_norm` (> 0) the gradients are
/// scaled down to it. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainError> {
    let mut sq: Option<Tensor> = None;
    for g in grads.iter() {
        let s = g.sqr()?.sum_all()?;
        sq = Some(match sq {
            None => s,
            Some(a) => (a + s)?,
        });
    }
    let norm = match sq {
        None => 0.0,
        Some(s) => crate::model::scalar(&s)?.sqrt(),
    };
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// The learning rate of optimizer step `step` (0-based) of `total`.
pub fn lr_at(schedule: Schedule, peak: f64, warmup: u64, total: u64, step: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let rest = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / rest;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (total.saturating_sub(step) as f64 / rest).max(0.0),
        Schedule::Cosine => peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_match_hugging_face() {
        // get_linear_schedule_with_warmup(warmup=2, total=10) multipliers.
        let lin: Vec<f64> = (0..10)
            .map(|s| lr_at(Schedule::Linear, 1.0, 2, 10, s))
            .collect();
        assert_eq!(lin[0], 0.0);
        assert_eq!(lin[1], 0.5);
        assert_eq!(lin[2], 1.0);
        assert!((lin[6] - 0.5).abs() < 1e-12);
        assert!((lin[9] - 0.125).abs() < 1e-12);
        let cos = lr_at(Schedule::Cosine, 1.0, 0, 10, 5);
        assert!((cos - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 0.3, 0, 10, 9), 0.3);
    }

    #[test]
    fn adamw_matches_the_formula() {
        // One parameter, two steps, against the update written out in f64.
        let dev = Device::Cpu;
        let mut p = vec![Tensor::new(&[1.0f32, -2.0], &dev).unwrap()];
        let cfg = AdamWConfig {
            lr: 0.1,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(cfg, &p).unwrap();
        let gs = [[0.5f64, -1.0], [0.25, 2.0]];
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in gs.iter().enumerate() {
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32], &dev).unwrap();
            opt.step(&mut p, &gt, 0.1).unwrap();
            for j in 0..2 {
                m[j] = 0.9 * m[j] + 0.1 * g[j];
                v[j] = 0.999 * v[j] + 0.001 * g[j] * g[j];
                let mh = m[j] / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v[j] / (1.0 - 0.999f64.powi(t as i32 + 1));
                want[j] = want[j] * (1.0 - 0.1 * 0.01) - 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = p[0].to_vec1::<f32>().unwrap();
        for j in 0..2 {
            assert!((got[j] as f64 - want[j]).abs() < 1e-5, "{got:?} {want:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5);
        let mut g2 = vec![Tensor::new(&[0.3f32], &dev).unwrap()];
        clip_grad_norm(&mut g2, 1.0).unwrap();
        assert_eq!(g2[0].to_vec1::<f32>().unwrap()[0], 0.3);
    }
}
