//! AdamW, `torch.optim.AdamW` semantics (amsgrad off): `p ← p·(1 − lr·wd)`;
//! `m ← β1·m + (1−β1)·g`; `v ← β2·v + (1−β2)·g²`; with per-parameter step `t`,
//! `p ← p − lr/(1−β1^t) · m / (√v / √(1−β2^t) + eps)`. Each step is one `_foreach_add_` on
//! the step counts of the parameters that have a gradient and one `_fused_adamw_` call per
//! parameter group ([`super::groups`]).
use tch::{Kind, Tensor};

use super::fused::{self, AdamWHyper, Lr};
use super::{groups, load_entries, params, step_tensor, zero_grads, Param};
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
    /// Updates this parameter received (PyTorch counts per parameter): an f32 scalar on the
    /// parameter's device, as the fused kernel reads it there (exact up to 2^24 steps). The
    /// checkpoint keeps it as an i64 scalar on the CPU.
    step: Tensor,
}

/// Adam with decoupled weight decay over a fixed list of parameters.
#[derive(Debug)]
pub(crate) struct AdamW {
    params: Vec<Param>,
    moments: Vec<Moments>,
    /// Indices of the parameters of each fused call.
    groups: Vec<Vec<usize>>,
    cfg: AdamWConfig,
    pub(super) steps: u64,
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
                    step: Tensor::f_zeros([], (Kind::Float, p.tensor.device()))?,
                })
            })
            .collect::<Result<_, WorkerError>>()?;
        let groups = groups(&params);
        Ok(Self { params, moments, groups, cfg, steps: 0 })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone (also
    /// their step counts). No value is read back from the device.
    pub(crate) fn step(&mut self, lr: Lr<'_>) -> Result<(), WorkerError> {
        let AdamWConfig { betas, eps, weight_decay } = self.cfg;
        // Per group, the indices of the parameters that have a gradient, and those gradients.
        let mut taken: Vec<(Vec<usize>, Vec<Tensor>)> = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let (mut indices, mut grads) = (Vec::new(), Vec::new());
            for &i in group {
                let grad = self.params[i].tensor.grad();
                if grad.defined() {
                    indices.push(i);
                    grads.push(grad);
                }
            }
            taken.push((indices, grads));
        }
        let steps: Vec<&Tensor> =
            taken.iter().flat_map(|(ix, _)| ix).map(|&i| &self.moments[i].step).collect();
        fused::foreach_add_(&steps, 1.0)?;
        for (indices, grads) in &taken {
            let Some(&first) = indices.first() else { continue };
            let moments = indices.iter().map(|&i| &self.moments[i]);
            let params: Vec<&Tensor> = indices.iter().map(|&i| &self.params[i].tensor).collect();
            let exp_avgs: Vec<&Tensor> = moments.clone().map(|m| &m.exp_avg).collect();
            let exp_avg_sqs: Vec<&Tensor> = moments.clone().map(|m| &m.exp_avg_sq).collect();
            let steps: Vec<&Tensor> = moments.map(|m| &m.step).collect();
            let weight_decay = if self.params[first].decay { weight_decay } else { 0.0 };
            let h = AdamWHyper { lr, betas, eps, weight_decay };
            fused::adamw_(&params, grads, &exp_avgs, &exp_avg_sqs, &steps, h)?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Zeroes all gradients.
    pub(crate) fn zero_grad(&mut self) -> Result<(), WorkerError> {
        zero_grads(&self.params)
    }

    /// Steps taken so far.
    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    /// `{param}.exp_avg`, `{param}.exp_avg_sq`, `{param}.step` (an i64 scalar on the CPU) per
    /// parameter, and `step`.
    pub(crate) fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::with_capacity(3 * self.params.len() + 1);
        for (p, m) in self.params.iter().zip(&self.moments) {
            state.push((format!("{}.exp_avg", p.name), m.exp_avg.copy()));
            state.push((format!("{}.exp_avg_sq", p.name), m.exp_avg_sq.copy()));
            state.push((format!("{}.step", p.name), m.step.to_kind(Kind::Int64).to_device(tch::Device::Cpu)));
        }
        state.push(("step".into(), step_tensor(self.steps)));
        state
    }

    /// Restores [`Self::state_dict`]'s entries (step counts of any numeric dtype are converted);
    /// errors name the missing or mismatched entry.
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
