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
use tch::{Device, Kind, Tensor};

use super::grads::task_grads;
use super::{values_from, values_tensor, Reducer, TaskTensors, WeightReport};
use crate::optim::load_entries;
use crate::task::Task;
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
    /// `w_t`, a `[3]` f64 tensor on the device, in [`Task::ALL`] order.
    weights: Tensor,
    /// `L_t(0)`, a `[3]` f64 tensor on the device: NaN until the task's first step.
    initial_losses: Tensor,
}

impl GradNorm {
    pub(super) fn new(alpha: f64, lr: f64, device: Device) -> Self {
        let on_device = |v: &[f64; 3]| values_tensor(v).to_device(device);
        Self { alpha, lr, weights: on_device(&[1.0; 3]), initial_losses: on_device(&[f64::NAN; 3]) }
    }

    /// Everything is computed on the device (nothing is read): the norms, the weights' update
    /// (a branch-free `sign`), the renormalisation.
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
        let losses = reduced.pop().expect("pushed above");
        let norms =
            reduced.iter().map(|g| g.f_norm()?.f_to_kind(Kind::Double)).collect::<Result<Vec<_>, _>>()?;
        let norms = Tensor::f_stack(&norms, 0)?;

        // The present tasks' entries of the per-task state.
        let index: Vec<i64> = present.iter().map(|(t, _)| t.index() as i64).collect();
        let index = crate::train::upload(&Tensor::from_slice(&index), self.weights.device())?;
        let weights = self.weights.f_index_select(0, &index)?;

        // The model's gradient with the weights of this step, then the weights' own update.
        let mut total: Option<Tensor> = None;
        let mut report_weights = TaskTensors::default();
        let mut grad_norms = TaskTensors::default();
        for (j, &(task, loss)) in present.iter().enumerate() {
            let w = weights.f_get(j as i64)?;
            // As a scalar factor would be: in the loss's dtype.
            let term = loss.f_mul(&w.f_to_kind(loss.kind())?)?;
            total = Some(match total {
                Some(t) => t.f_add(&term)?,
                None => term,
            });
            report_weights.set(task, w);
            grad_norms.set(task, norms.f_get(j as i64)?);
        }
        let total = total.expect("present is not empty");
        if total.requires_grad() {
            total.f_backward()?;
        }
        self.update_weights(&index, &weights, &losses, &norms)?;
        Ok(WeightReport { weights: report_weights, total_loss: total.f_detach()?, grad_norms })
    }

    /// One step on `L_grad` for the present tasks (`index`), given their current `weights`, the
    /// reduced loss values and gradient norms `n_i`.
    fn update_weights(
        &mut self,
        index: &Tensor,
        weights: &Tensor,
        losses: &Tensor,
        norms: &Tensor,
    ) -> Result<(), WorkerError> {
        let k = index.numel() as f64;
        // A task's first step sets its initial loss.
        let initial = self.initial_losses.f_index_select(0, index)?;
        let initial = losses.f_where_self(&initial.f_isnan()?, &initial)?;
        let _ = self.initial_losses.f_index_copy_(0, index, &initial)?;
        let g = weights.f_mul(norms)?;
        let g_mean = g.f_sum(Kind::Double)?.f_div_scalar(k)?;
        let relative = losses.f_div(&initial.f_clamp_min(f64::MIN_POSITIVE)?)?;
        let relative_mean = relative.f_sum(Kind::Double)?.f_div_scalar(k)?;
        let target = g_mean.f_mul(&relative.f_div(&relative_mean)?.f_pow_tensor_scalar(self.alpha)?)?;
        let sign = g.f_sub(&target)?.f_sign()?;
        let updated = weights.f_sub(&sign.f_mul(norms)?.f_mul_scalar(self.lr)?)?.f_clamp_min(MIN_WEIGHT)?;
        let sum = updated.f_sum(Kind::Double)?;
        let renormalised = updated.f_mul(&sum.f_full_like(k)?.f_div(&sum)?)?;
        let _ = self.weights.f_index_copy_(0, index, &renormalised)?;
        Ok(())
    }

    pub(super) fn state_dict(&self) -> Result<Vec<(String, Tensor)>, WorkerError> {
        let on_host = |t: &Tensor| -> Result<Tensor, WorkerError> { Ok(values_tensor(&values_from(t)?)) };
        Ok(vec![
            (WEIGHTS.into(), on_host(&self.weights)?),
            (INITIAL_LOSSES.into(), on_host(&self.initial_losses)?),
        ])
    }

    pub(super) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        let device = self.weights.device();
        let (mut w, mut l0) = (values_tensor(&[1.0; 3]), values_tensor(&[f64::NAN; 3]));
        load_entries("weighting", &mut [(WEIGHTS.into(), &mut w), (INITIAL_LOSSES.into(), &mut l0)], state)?;
        let on_device = |t: &Tensor| -> Result<Tensor, WorkerError> {
            Ok(values_tensor(&values_from(t)?).f_to_device(device)?)
        };
        self.weights = on_device(&w)?;
        self.initial_losses = on_device(&l0)?;
        Ok(())
    }
}
