//! Gradient clipping by global norm, PyTorch's `clip_grad_norm_` (L2, foreach): computed on the
//! device, without reading the norm on the host.
use tch::{Kind, Tensor};

use super::fused;
use crate::WorkerError;

/// Scales the gradients of `params` in place so that their joint L2 norm is at most `max_norm`,
/// and returns the norm before clipping as a 0-dim f32 tensor on the parameters' device. As in
/// PyTorch the scale is `max_norm / (norm + 1e-6)` clamped to at most 1 and always applied (no
/// host branch); parameters without a gradient are skipped. One `_foreach_norm`, one
/// `_foreach_mul_` and a few scalar ops, whatever the number of parameters.
pub(crate) fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<Tensor, WorkerError> {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
    if grads.is_empty() {
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        return Ok(Tensor::f_zeros([], (Kind::Float, device))?);
    }
    let norms = fused::foreach_norm(&grads)?;
    let mut total_norm = Tensor::f_stack(&norms, 0)?.f_norm()?;
    if total_norm.kind() != Kind::Float {
        total_norm = total_norm.f_to_kind(Kind::Float)?;
    }
    fused::foreach_mul_(&grads, &clip_coefficient(&total_norm, max_norm)?)?;
    Ok(total_norm)
}

/// [`clip_grad_norm`] for gradients that are one flat tensor (views of it): its norm, and the
/// same clamped coefficient applied to it in place. Returns the norm before clipping.
pub(crate) fn clip_flat_grad_norm(flat: &Tensor, max_norm: f64) -> Result<Tensor, WorkerError> {
    let _guard = tch::no_grad_guard();
    let mut total_norm = flat.f_norm()?;
    if total_norm.kind() != Kind::Float {
        total_norm = total_norm.f_to_kind(Kind::Float)?;
    }
    let _ = flat.shallow_clone().f_mul_(&clip_coefficient(&total_norm, max_norm)?)?;
    Ok(total_norm)
}

/// PyTorch's `max_norm / (norm + 1e-6)`, clamped to at most 1.
fn clip_coefficient(total_norm: &Tensor, max_norm: f64) -> Result<Tensor, tch::TchError> {
    total_norm.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)
}
