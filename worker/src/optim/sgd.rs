//! SGD with momentum and Nesterov momentum, `torch.optim.SGD` semantics (dampening 0):
//! `g ← grad + wd·p`; `buf ← momentum·buf + g` (the first step gives `buf = g`, which a zero
//! buffer reproduces exactly); `g ← g + momentum·buf` with Nesterov, else `g ← buf`;
//! `p ← p − lr·g`. Each step is one `_fused_sgd_` call per parameter group ([`super::groups`]).
use tch::Tensor;

use super::fused::{self, Lr, SgdHyper};
use super::{groups, load_entries, params, step_tensor, zero_grads, Param};
use crate::WorkerError;

/// SGD hyper-parameters other than the learning rate, which each step receives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SgdConfig {
    /// Momentum factor; 0 disables the momentum buffers.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient of decaying parameters.
    pub weight_decay: f64,
}

/// Stochastic gradient descent over a fixed list of parameters.
#[derive(Debug)]
pub(crate) struct Sgd {
    params: Vec<Param>,
    /// One zero-initialised buffer per parameter; empty when momentum is 0.
    momentum_buffers: Vec<Tensor>,
    /// Indices of the parameters of each fused call.
    groups: Vec<Vec<usize>>,
    cfg: SgdConfig,
    pub(super) steps: u64,
}

impl Sgd {
    /// An optimiser over named parameters; weight decay follows [`super::decays`].
    pub(crate) fn new(named: Vec<(String, Tensor)>, cfg: SgdConfig) -> Result<Self, WorkerError> {
        let params = params(named);
        let momentum_buffers = if cfg.momentum == 0.0 {
            Vec::new()
        } else {
            params.iter().map(|p| p.tensor.f_zeros_like()).collect::<Result<_, _>>()?
        };
        let groups = groups(&params);
        Ok(Self { params, momentum_buffers, groups, cfg, steps: 0 })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone. No
    /// value is read back from the device.
    pub(crate) fn step(&mut self, lr: Lr<'_>) -> Result<(), WorkerError> {
        let SgdConfig { momentum, nesterov, weight_decay } = self.cfg;
        for group in &self.groups {
            let (mut params, mut grads, mut buffers) = (Vec::new(), Vec::new(), Vec::new());
            for &i in group {
                let grad = self.params[i].tensor.grad();
                if !grad.defined() {
                    continue;
                }
                params.push(&self.params[i].tensor);
                grads.push(grad);
                if momentum != 0.0 {
                    buffers.push(&self.momentum_buffers[i]);
                }
            }
            let weight_decay = if self.params[group[0]].decay { weight_decay } else { 0.0 };
            fused::sgd_(&params, &grads, &buffers, SgdHyper { lr, momentum, nesterov, weight_decay })?;
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

    /// `{param}.momentum_buffer` per parameter (when momentum is on) and `step`.
    pub(crate) fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut state: Vec<(String, Tensor)> = self
            .params
            .iter()
            .zip(&self.momentum_buffers)
            .map(|(p, buf)| (format!("{}.momentum_buffer", p.name), buf.copy()))
            .collect();
        state.push(("step".into(), step_tensor(self.steps)));
        state
    }

    /// Restores [`Self::state_dict`]'s entries; errors name the missing or mismatched entry.
    pub(crate) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        let mut step = step_tensor(0);
        let mut live: Vec<(String, &mut Tensor)> = self
            .params
            .iter()
            .zip(self.momentum_buffers.iter_mut())
            .map(|(p, buf)| (format!("{}.momentum_buffer", p.name), buf))
            .collect();
        live.push(("step".into(), &mut step));
        load_entries("sgd", &mut live, state)?;
        self.steps = step.int64_value(&[]) as u64;
        Ok(())
    }
}
