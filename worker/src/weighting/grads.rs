//! Gradient plumbing shared by the gradient-manipulating strategies: per-task gradients
//! without touching `.grad()`, flattening, and writing a computed gradient into `.grad()`.
use tch::{Kind, Tensor};

use crate::WorkerError;

/// `∂loss/∂input` for each input, without accumulating into `.grad()`. Inputs the loss does not
/// reach (or a loss without a graph, e.g. a constant zero) get zeros.
pub(super) fn task_grads(
    loss: &Tensor,
    inputs: &[Tensor],
    keep_graph: bool,
) -> Result<Vec<Tensor>, WorkerError> {
    let grads = if loss.requires_grad() {
        Tensor::f_run_backward(&[loss], inputs, keep_graph, false)?
    } else {
        inputs.iter().map(|_| Tensor::new()).collect()
    };
    grads
        .into_iter()
        .zip(inputs)
        .map(|(g, input)| Ok(if g.defined() { g } else { input.f_zeros_like()? }))
        .collect()
}

/// The tensors as one flat vector.
pub(super) fn flatten(tensors: &[Tensor]) -> Result<Tensor, WorkerError> {
    let flat = tensors.iter().map(|t| t.f_reshape([-1])).collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&flat, 0)?)
}

/// Splits a flat vector back into tensors shaped like `like`.
pub(super) fn unflatten(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>, WorkerError> {
    let mut offset = 0;
    like.iter()
        .map(|t| {
            let n = t.numel() as i64;
            let part = flat.f_narrow(0, offset, n)?.f_reshape(t.size())?;
            offset += n;
            Ok(part)
        })
        .collect()
}

/// Adds `grads[i]` to `params[i].grad()` as `backward` would (creating `.grad()` if needed),
/// through one backward pass of `Σ_i sum(params[i] · grads[i])`.
pub(super) fn accumulate_grads(params: &[Tensor], grads: &[Tensor]) -> Result<(), WorkerError> {
    let mut surrogate: Option<Tensor> = None;
    for (p, g) in params.iter().zip(grads) {
        let term = p.f_mul(&g.f_detach()?)?.f_sum(Kind::Float)?;
        surrogate = Some(match surrogate {
            Some(s) => s.f_add(&term)?,
            None => term,
        });
    }
    if let Some(s) = surrogate {
        s.f_backward()?;
    }
    Ok(())
}
