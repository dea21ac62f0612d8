//! AdamW, `torch.optim.AdamW` semantics (amsgrad off): `p ← p·(1 − lr·wd)`;
//! `m ← β1·m + (1−β1)·g`; `v ← β2·v + (1−β2)·g²`; with per-parameter step `t`,
//! `p ← p − lr/(1−β1^t) · m / (√v / √(1−β2^t) + eps)`.
use tch::Tensor;

use super::{load_entries, params, step_tensor, zero_grads, Param};
use crate::WorkerError;

/// AdamW hyper-parameters other than the learning rate, which each step receives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AdamWConfig {
    /// `(β1, β2)`: decay rates of the first and second moment estimates.
    pub betas: [f64; 2],
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay of decaying parameters.
    pub weight_decay: f64,
}

/// First and second moments and the step count of one parameter.
#[derive(Debug)]
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates this parameter received (PyTorch counts per parameter).
    step: Tensor,
}

/// Adam with decoupled weight decay over a fixed list of parameters.
#[derive(Debug)]
pub(crate) struct AdamW {
    params: Vec<Param>,
    moments: Vec<Moments>,
    cfg: AdamWConfig,
    steps: u64,
}

impl AdamW {
    /// An optimiser over named parameters; weight decay follows [`super::decays`].
    pub(crate) fn new(named: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self, WorkerError> {
        let params = params(named);
        let moments = params
            .iter()
            .map(|p| {
                Ok(Moments {
                    exp_avg: p.tensor.f_zeros_like()?,
                    exp_avg_sq: p.tensor.f_zeros_like()?,
                    step: step_tensor(0),
                })
            })
            .collect::<Result<_, WorkerError>>()?;
        Ok(Self { params, moments, cfg, steps: 0 })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub(crate) fn step(&mut self, lr: f64) -> Result<(), WorkerError> {
        let _guard = tch::no_grad_guard();
        let AdamWConfig { betas: [beta1, beta2], eps, weight_decay } = self.cfg;
        for (p, m) in self.params.iter_mut().zip(&mut self.moments) {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            let _ = m.step.f_add_scalar_(1)?;
            let t = m.step.int64_value(&[]) as i32;
            if p.decay && weight_decay != 0.0 {
                let _ = p.tensor.f_mul_scalar_(1.0 - lr * weight_decay)?;
            }
            let _ = m.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
            let _ = m.exp_avg_sq.f_mul_scalar_(beta2)?.f_addcmul_(&(&grad * (1.0 - beta2)), &grad)?;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = (m.exp_avg_sq.f_sqrt()? / bias_correction2_sqrt).f_add_scalar(eps)?;
            let _ = p.tensor.f_sub_(&(m.exp_avg.f_div(&denom)? * step_size))?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Zeroes all gradients.
    pub(crate) fn zero_grad(&mut self) {
        zero_grads(&self.params);
    }

    /// Steps taken so far.
    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    /// `{param}.exp_avg`, `{param}.exp_avg_sq`, `{param}.step` per parameter, and `step`.
    pub(crate) fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::with_capacity(3 * self.params.len() + 1);
        for (p, m) in self.params.iter().zip(&self.moments) {
            state.push((format!("{}.exp_avg", p.name), m.exp_avg.copy()));
            state.push((format!("{}.exp_avg_sq", p.name), m.exp_avg_sq.copy()));
            state.push((format!("{}.step", p.name), m.step.copy()));
        }
        state.push(("step".into(), step_tensor(self.steps)));
        state
    }

    /// Restores [`Self::state_dict`]'s entries; errors name the missing or mismatched entry.
    pub(crate) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        let mut step = step_tensor(0);
        let mut live: Vec<(String, &mut Tensor)> = Vec::with_capacity(3 * self.params.len() + 1);
        for (p, m) in self.params.iter().zip(self.moments.iter_mut()) {
            live.push((format!("{}.exp_avg", p.name), &mut m.exp_avg));
            live.push((format!("{}.exp_avg_sq", p.name), &mut m.exp_avg_sq));
            live.push((format!("{}.step", p.name), &mut m.step));
        }
        live.push(("step".into(), &mut step));
        load_entries("adamw", &mut live, state)?;
        self.steps = step.int64_value(&[]) as u64;
        Ok(())
    }
}
