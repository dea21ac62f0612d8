//! Gradient clipping by global norm, PyTorch's `clip_grad_norm_` (L2, `foreach` off).
use tch::Tensor;

use crate::WorkerError;

/// Scales the gradients of `params` in place so that their joint L2 norm is at most `max_norm`,
/// and returns the norm before clipping. As in PyTorch the scale is
/// `max_norm / (norm + 1e-6)`, applied only when it is below 1; parameters without a gradient
/// are skipped.
pub(crate) fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64, WorkerError> {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let norms = grads.iter().map(|g| g.f_norm()).collect::<Result<Vec<_>, _>>()?;
    let total_norm = Tensor::f_stack(&norms, 0)?.f_norm()?;
    let clip_coef = (max_norm / (total_norm.f_double_value(&[])? + 1e-6)).min(1.0);
    if clip_coef < 1.0 {
        for mut g in grads {
            let _ = g.f_mul_scalar_(clip_coef)?;
        }
    }
    Ok(total_norm.f_double_value(&[])?)
}
