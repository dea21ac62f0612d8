//! Optimisers over plain tensors, so that every piece of their state can be exported with
//! [`Optimizer::state_dict`] and restored from a checkpoint. `sgd` and `adamw` are PyTorch's
//! `torch.optim.SGD` / `torch.optim.AdamW` with `fused=True`: LibTorch's fused kernels through
//! the shim (`fused`), one call per parameter group and step (their tests compare against
//! PyTorch); `schedule` is the warmup + cosine learning rate and `clip` is `clip_grad_norm_`
//! with the foreach ops. The caller drives them: `step(lr)` takes the learning rate of this step
//! from [`Schedule::lr`], so the schedule's position is just the step counter.
//!
//! Weight decay is applied to a parameter only when [`decays`] says so: never to biases or to
//! 1-D tensors (normalisation weights), as is standard for both SGD and AdamW training.
mod adamw;
mod clip;
mod fused;
mod schedule;
mod sgd;
#[cfg(test)]
mod tests;

pub(crate) use adamw::{AdamW, AdamWConfig};
pub(crate) use clip::{clip_flat_grad_norm, clip_grad_norm};
pub(crate) use fused::{set_grad, Lr};
pub(crate) use schedule::Schedule;
pub(crate) use sgd::{Sgd, SgdConfig};

use mtl_job::{OptimizerKind, TrainSection};
use tch::Tensor;

use crate::WorkerError;

/// Whether weight decay applies to the parameter `name` of this shape: only to tensors with at
/// least two dimensions whose name does not end in `bias` (so not to biases, BatchNorm/GroupNorm
/// weights or other 1-D scales).
pub(crate) fn decays(name: &str, tensor: &Tensor) -> bool {
    tensor.dim() >= 2 && !name.ends_with("bias")
}

/// One parameter an optimiser updates.
#[derive(Debug)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) tensor: Tensor,
    pub(crate) decay: bool,
}

pub(crate) fn params(named: Vec<(String, Tensor)>) -> Vec<Param> {
    named
        .into_iter()
        .map(|(name, tensor)| {
            let decay = decays(&name, &tensor);
            Param { name, tensor, decay }
        })
        .collect()
}

/// The optimiser selected by `train.optimizer`.
#[derive(Debug)]
pub(crate) enum Optimizer {
    /// `train.optimizer = "sgd"`.
    Sgd(Sgd),
    /// `train.optimizer = "adamw"`.
    AdamW(AdamW),
}

impl Optimizer {
    /// Builds the configured optimiser over named parameters (e.g. `VarStore::variables()`,
    /// plus learnable task weights).
    pub(crate) fn from_config(
        train: &TrainSection,
        named: Vec<(String, Tensor)>,
    ) -> Result<Self, WorkerError> {
        Ok(match train.optimizer {
            OptimizerKind::Sgd => Self::Sgd(Sgd::new(
                named,
                SgdConfig {
                    momentum: train.momentum,
                    nesterov: train.nesterov,
                    weight_decay: train.weight_decay,
                },
            )?),
            OptimizerKind::Adamw => Self::AdamW(AdamW::new(
                named,
                AdamWConfig { betas: train.betas, eps: train.eps, weight_decay: train.weight_decay },
            )?),
        })
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient.
    pub(crate) fn step<'a>(&mut self, lr: impl Into<Lr<'a>>) -> Result<(), WorkerError> {
        match self {
            Self::Sgd(o) => o.step(lr.into()),
            Self::AdamW(o) => o.step(lr.into()),
        }
    }

    /// Counts a step whose update the device ran without a call to [`Self::step`]: a replay
    /// of a CUDA graph that captured one (its per-parameter state lives on the device).
    pub(crate) fn count_replayed_step(&mut self) {
        match self {
            Self::Sgd(o) => o.steps += 1,
            Self::AdamW(o) => o.steps += 1,
        }
    }

    /// Zeroes the gradients of all parameters.
    pub(crate) fn zero_grad(&mut self) -> Result<(), WorkerError> {
        match self {
            Self::Sgd(o) => o.zero_grad(),
            Self::AdamW(o) => o.zero_grad(),
        }
    }

    /// Optimiser steps taken so far.
    pub(crate) fn steps(&self) -> u64 {
        match self {
            Self::Sgd(o) => o.steps(),
            Self::AdamW(o) => o.steps(),
        }
    }

    /// All state (buffers and step counters) as named tensors, for a checkpoint.
    pub(crate) fn state_dict(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::Sgd(o) => o.state_dict(),
            Self::AdamW(o) => o.state_dict(),
        }
    }

    /// Restores what [`Self::state_dict`] exported; every entry must be present with its shape.
    pub(crate) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        match self {
            Self::Sgd(o) => o.load_state_dict(state),
            Self::AdamW(o) => o.load_state_dict(state),
        }
    }
}

/// The parameters one fused call updates together, as indices into `params`: those with the
/// same weight decay flag, device and dtype (the fused kernels take one weight decay, and their
/// fast path one device and dtype). For a model on one device: two groups, decay and no decay.
pub(crate) fn groups(params: &[Param]) -> Vec<Vec<usize>> {
    let mut keys: Vec<(bool, tch::Device, tch::Kind)> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let key = (p.decay, p.tensor.device(), p.tensor.kind());
        match keys.iter().position(|k| *k == key) {
            Some(g) => groups[g].push(i),
            None => {
                keys.push(key);
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// Zeroes the gradients that are defined, in one `_foreach_zero_`. A gradient that is part of a
/// graph (from `create_graph`) is detached first, as PyTorch's `zero_grad` does.
pub(crate) fn zero_grads(params: &[Param]) -> Result<(), WorkerError> {
    let mut grads: Vec<Tensor> = params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect();
    for g in &mut grads {
        if g.requires_grad() {
            let _ = g.f_detach_()?;
        }
    }
    fused::foreach_zero_(&grads)
}

/// The step counter as a state tensor (i64 scalar on the CPU).
pub(crate) fn step_tensor(step: u64) -> Tensor {
    Tensor::from(step as i64)
}

/// Copies `given` entries into the live state `live` (name → tensor): every live entry must be
/// given with the same shape, and nothing else may be given.
pub(crate) fn load_entries(
    owner: &'static str,
    live: &mut [(String, &mut Tensor)],
    given: &[(String, Tensor)],
) -> Result<(), WorkerError> {
    let err = |key: &str, message: String| WorkerError::State { owner, key: key.to_string(), message };
    for (name, _) in given {
        if !live.iter().any(|(n, _)| n == name) {
            return Err(err(name, "not an entry of the live state (different parameters?)".into()));
        }
    }
    for (name, target) in live.iter_mut() {
        let source = given
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| err(name, "missing from the saved state".into()))?;
        if source.size() != target.size() {
            return Err(err(name, format!("saved shape {:?}, expected {:?}", source.size(), target.size())));
        }
        tch::no_grad(|| target.f_copy_(source))?;
    }
    Ok(())
}
