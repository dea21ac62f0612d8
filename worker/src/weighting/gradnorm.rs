//! GradNorm (Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing").
//!
//! Each step the model's gradient is that of `Σ w_i·L_i` with the current weights `w_i`
//! (initially 1). Then, at a shared layer's weight `W` that every task's loss reaches
//! ([`crate::model::MultiTaskModel::gradnorm_layer`]): `G_i = ‖∇_W w_i·L_i‖₂ = w_i·n_i`,
//! `Ḡ = mean_i G_i`, `L̃_i = L_i/L_i(0)` (loss relative to the task's first step),
//! `r_i = L̃_i / mean_j L̃_j`, and the target `Ḡ·r_i^α` is a constant. The weights take one
//! gradient step of size `gradnorm_lr` on `L_grad = Σ_i |G_i − Ḡ·r_i^α|`, whose gradient is
//! exactly `sign(G_i − target_i)·n_i` (so no second-order graph is needed), are kept above
//! `MIN_WEIGHT`, and are renormalised to sum to the number of present tasks.
//!
//! Per-task gradients at `W` and the loss values are reduced across ranks before any of this,
//! so every rank computes the same weights.
use tch::{Kind, Tensor};

use super::grads::task_grads;
use super::{values_from, values_tensor, weighted_backward, Reducer, WeightReport};
use crate::optim::load_entries;
use crate::task::{Task, TaskValues};
use crate::WorkerError;

/// Weights are clamped to at least this before renormalising, so a task is never switched off
/// or given a negative weight by one large step.
const MIN_WEIGHT: f64 = 1e-3;
const WEIGHTS: &str = "weighting.gradnorm.weights";
const INITIAL_LOSSES: &str = "weighting.gradnorm.initial_losses";

#[derive(Debug)]
pub(super) struct GradNorm {
    alpha: f64,
    lr: f64,
    weights: [f64; 3],
    /// `L_i(0)`, NaN until the task's first step.
    initial_losses: [f64; 3],
}

impl GradNorm {
    pub(super) fn new(alpha: f64, lr: f64) -> Self {
        Self { alpha, lr, weights: [1.0; 3], initial_losses: [f64::NAN; 3] }
    }

    pub(super) fn backward(
        &mut self,
        present: &[(Task, &Tensor)],
        layer: &Tensor,
        reducer: &mut dyn Reducer,
    ) -> Result<WeightReport, WorkerError> {
        let layer = std::slice::from_ref(layer);
        // Per-task gradients at W, then the loss values, reduced together.
        let mut reduced = Vec::with_capacity(present.len() + 1);
        for &(_, loss) in present {
            reduced.push(task_grads(loss, layer, true)?.remove(0));
        }
        let loss_values = present
            .iter()
            .map(|(_, l)| l.f_detach()?.f_to_kind(Kind::Double))
            .collect::<Result<Vec<_>, _>>()?;
        reduced.push(Tensor::f_stack(&loss_values, 0)?);
        reducer.all_reduce_mean(&mut reduced)?;
        let losses = Vec::<f64>::try_from(reduced.pop().expect("pushed above"))?;
        let norms = reduced.iter().map(|g| g.f_norm()?.f_double_value(&[])).collect::<Result<Vec<_>, _>>()?;

        // The model's gradient with the weights of this step, then the weights' own update.
        let mut report = weighted_backward(present, |t| self.weights[t.index()])?;
        self.update_weights(present, &losses, &norms);
        let mut grad_norms = TaskValues::default();
        for (&(task, _), &n) in present.iter().zip(&norms) {
            grad_norms.set(task, n);
        }
        report.grad_norms = super::host_tensors(&grad_norms);
        Ok(report)
    }

    /// One step on `L_grad` given the reduced loss values and gradient norms `n_i` of the
    /// present tasks.
    fn update_weights(&mut self, present: &[(Task, &Tensor)], losses: &[f64], norms: &[f64]) {
        let k = present.len() as f64;
        let idx: Vec<usize> = present.iter().map(|(t, _)| t.index()).collect();
        for (&i, &l) in idx.iter().zip(losses) {
            if self.initial_losses[i].is_nan() {
                self.initial_losses[i] = l;
            }
        }
        let g: Vec<f64> = idx.iter().zip(norms).map(|(&i, n)| self.weights[i] * n).collect();
        let g_mean = g.iter().sum::<f64>() / k;
        let relative: Vec<f64> =
            idx.iter().zip(losses).map(|(&i, l)| l / self.initial_losses[i].max(f64::MIN_POSITIVE)).collect();
        let relative_mean = relative.iter().sum::<f64>() / k;
        for (j, &i) in idx.iter().enumerate() {
            let target = g_mean * (relative[j] / relative_mean).powf(self.alpha);
            let diff = g[j] - target;
            let sign = if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else {
                0.0
            };
            self.weights[i] = (self.weights[i] - self.lr * sign * norms[j]).max(MIN_WEIGHT);
        }
        let sum: f64 = idx.iter().map(|&i| self.weights[i]).sum();
        for &i in &idx {
            self.weights[i] *= k / sum;
        }
    }

    pub(super) fn state_dict(&self) -> Vec<(String, Tensor)> {
        vec![
            (WEIGHTS.into(), values_tensor(&self.weights)),
            (INITIAL_LOSSES.into(), values_tensor(&self.initial_losses)),
        ]
    }

    pub(super) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        let (mut w, mut l0) = (values_tensor(&self.weights), values_tensor(&self.initial_losses));
        load_entries("weighting", &mut [(WEIGHTS.into(), &mut w), (INITIAL_LOSSES.into(), &mut l0)], state)?;
        self.weights = values_from(&w)?;
        self.initial_losses = values_from(&l0)?;
        Ok(())
    }
}
