// LibTorch's fused optimiser kernels and foreach ops, which tch 0.24 does not expose: one call
// updates a whole list of tensors (on CUDA a few multi-tensor kernels instead of several kernels
// per tensor; on the CPU one call instead of a Rust→C→dispatcher round trip per tensor and op).
//
// Tensor lists come as arrays of tensor pointers (tch's `C_tensor` is an `at::Tensor`). The
// in-place entry points run under NoGradGuard (they update parameters and gradients, never
// something autograd should record); `mtl_foreach_norm` follows the caller's grad mode.
// Exceptions never cross the C boundary: entry points return 0 on success and 1 with a message
// otherwise.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include "guard.h"

#include <cstddef>
#include <string>
#include <vector>

namespace {

using mtl_shim::guarded;

std::vector<at::Tensor> list(const at::Tensor* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}

}  // namespace

extern "C" {

// `torch.optim.SGD(fused=True)`'s update of `n` parameters with dampening 0: `n_buffers` is `n`
// (momentum buffers) or 0 (momentum 0). Buffers are used as they are (never `is_first_step`): a
// zero buffer gives PyTorch's first step exactly. The learning rate is `lr`, or the 0-dim tensor
// `lr_tensor` when that is not null (read on its device, so a CUDA graph can replay the call
// with a new value).
int mtl_fused_sgd_(const at::Tensor* const* params, const at::Tensor* const* grads,
                   const at::Tensor* const* momentum_buffers, size_t n, size_t n_buffers,
                   double weight_decay, double momentum, double lr, const at::Tensor* lr_tensor,
                   int nesterov, char* err, size_t err_len) {
  return guarded("_fused_sgd_", err, err_len, [&] {
    c10::NoGradGuard no_grad;
    if (lr_tensor != nullptr) {
      at::_fused_sgd_(list(params, n), list(grads, n), list(momentum_buffers, n_buffers),
                      weight_decay, momentum, *lr_tensor, /*dampening=*/0.0, nesterov != 0,
                      /*maximize=*/false, /*is_first_step=*/false);
    } else {
      at::_fused_sgd_(list(params, n), list(grads, n), list(momentum_buffers, n_buffers),
                      weight_decay, momentum, lr, /*dampening=*/0.0, nesterov != 0,
                      /*maximize=*/false, /*is_first_step=*/false);
    }
  });
}

// `torch.optim.AdamW(fused=True)`'s update of `n` parameters (amsgrad off). `state_steps` are
// f32 scalars on the parameters' device holding the step number of this update (the caller
// increments them first, as PyTorch does). `lr_tensor` as in `mtl_fused_sgd_`.
int mtl_fused_adamw_(const at::Tensor* const* params, const at::Tensor* const* grads,
                     const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                     const at::Tensor* const* state_steps, size_t n, double lr,
                     const at::Tensor* lr_tensor, double beta1, double beta2, double weight_decay,
                     double eps, char* err, size_t err_len) {
  return guarded("_fused_adamw_", err, err_len, [&] {
    c10::NoGradGuard no_grad;
    if (lr_tensor != nullptr) {
      at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n),
                        /*max_exp_avg_sqs=*/{}, list(state_steps, n), *lr_tensor, beta1, beta2,
                        weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    } else {
      at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n),
                        /*max_exp_avg_sqs=*/{}, list(state_steps, n), lr, beta1, beta2,
                        weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    }
  });
}

// The L2 norm of each of `n` tensors, as new 0-dim tensors in `out[0..n]` (the tensors' dtype).
int mtl_foreach_norm(const at::Tensor* const* tensors, size_t n, at::Tensor** out, char* err,
                     size_t err_len) {
  return guarded("_foreach_norm", err, err_len, [&] {
    auto norms = at::_foreach_norm(list(tensors, n), 2);
    TORCH_CHECK(norms.size() == n, "returned ", norms.size(), " norms for ", n, " tensors");
    for (size_t i = 0; i < n; ++i) {
      out[i] = new at::Tensor(std::move(norms[i]));
    }
  });
}

// Multiplies each of `n` tensors in place by the 0-dim tensor `scalar` (read on its device).
int mtl_foreach_mul_tensor_(const at::Tensor* const* tensors, size_t n, const at::Tensor* scalar,
                            char* err, size_t err_len) {
  return guarded("_foreach_mul_", err, err_len, [&] {
    c10::NoGradGuard no_grad;
    at::_foreach_mul_(list(tensors, n), *scalar);
  });
}

// Adds `scalar` to each of `n` tensors in place.
int mtl_foreach_add_scalar_(const at::Tensor* const* tensors, size_t n, double scalar, char* err,
                            size_t err_len) {
  return guarded("_foreach_add_", err, err_len, [&] {
    c10::NoGradGuard no_grad;
    at::_foreach_add_(list(tensors, n), scalar);
  });
}

// Zeroes each of `n` tensors in place.
int mtl_foreach_zero_(const at::Tensor* const* tensors, size_t n, char* err, size_t err_len) {
  return guarded("_foreach_zero_", err, err_len, [&] {
    c10::NoGradGuard no_grad;
    at::_foreach_zero_(list(tensors, n));
  });
}

// Makes `grad` the gradient of `param` (autograd then accumulates into it in place): how the
// parameters' gradients become views of one flat buffer.
int mtl_set_grad(const at::Tensor* param, const at::Tensor* grad, char* err, size_t err_len) {
  return guarded("set_grad", err, err_len, [&] {
    at::Tensor p = *param;
    p.mutable_grad() = *grad;
  });
}
}
