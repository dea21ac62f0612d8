// SyncBatchNorm in training mode: BatchNorm whose batch statistics are those of the batches of
// all data-parallel ranks together, as torch.nn.SyncBatchNorm computes them. tch 0.24 has no
// custom autograd functions, so this is a torch::autograd::Function whose forward and backward
// sum their per-channel statistics across ranks through a callback into Rust.
//
// Forward sums [Σ(x−s), Σ(x−s)², count] over all ranks (s = the running mean, a shift that keeps
// the variance free of cancellation; any s gives the same result in exact arithmetic), normalises
// with the global mean and biased variance, and updates the running statistics as PyTorch does
// (unbiased variance). Backward sums [Σdy, Σdy·x̂] over all ranks and finishes the input gradient;
// the weight and bias gradients stay local (the gradient all-reduce combines them, as in DDP).
// Nothing reads a value back to the host. Statistics are computed in f32 (f64 for f64 inputs),
// the output has the input's dtype (bf16 under autocast).
//
// The callback may run on another thread (autograd's device threads on CUDA) and is given a
// context the shim holds a reference to (released through `release`) for as long as the graph
// may call it. Exceptions never cross the C boundary: entry points return 0 on success and 1 with
// a message otherwise; a failed callback becomes an exception inside autograd, which tch's
// backward reports as an error.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "guard.h"

extern "C" {
// Sums `t` (a new handle the callee owns and frees) in place across ranks; returns 0 on success,
// otherwise writes a NUL-terminated message of at most `err_len` bytes into `err`.
typedef int (*mtl_sum_fn)(const void* ctx, at::Tensor* t, char* err, size_t err_len);
// Drops the shim's reference to `ctx`.
typedef void (*mtl_release_fn)(const void* ctx);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

using mtl_shim::write_message;

// The Rust side of the reduction. Saved in the graph node so that backward can reach it; the
// shared_ptr keeps the Rust context alive until the node is freed.
struct Reducer : torch::CustomClassHolder {
  Reducer(std::shared_ptr<const void> ctx, mtl_sum_fn sum) : ctx(std::move(ctx)), sum(sum) {}
  std::shared_ptr<const void> ctx;
  mtl_sum_fn sum;

  void sum_across_ranks(const at::Tensor& t, const char* where) const {
    char err[1024] = {0};
    if (sum(ctx.get(), new at::Tensor(t), err, sizeof(err)) != 0) {
      throw std::runtime_error(std::string(where) + ": " + err);
    }
  }
};

// Dimensions reduced per channel (all but 1) and the shape that broadcasts a [C] vector over x.
std::vector<int64_t> reduced_dims(const at::Tensor& x) {
  std::vector<int64_t> dims = {0};
  for (int64_t d = 2; d < x.dim(); ++d) {
    dims.push_back(d);
  }
  return dims;
}

std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

struct SyncBatchNormFn : public torch::autograd::Function<SyncBatchNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_var, double momentum, double eps,
                            const c10::intrusive_ptr<Reducer>& reducer) {
    TORCH_CHECK(x.dim() >= 2, "SyncBatchNorm expects [N,C,...] input, got ", x.sizes());
    const int64_t c = x.size(1);
    TORCH_CHECK(weight.numel() == c && bias.numel() == c && running_mean.numel() == c &&
                    running_var.numel() == c,
                "SyncBatchNorm of ", weight.numel(), " channels got input ", x.sizes());
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto dims = reduced_dims(x);
    const auto shape = channel_shape(x);
    const auto xf = x.to(acc);
    const auto shift = running_mean.detach().to(acc);
    const auto centred = xf - shift.view(shape);
    const double local_count = c > 0 ? static_cast<double>(x.numel() / c) : 0.0;
    auto stats = at::cat({centred.sum(dims), centred.square().sum(dims),
                          at::full({1}, local_count, xf.options())});
    reducer->sum_across_ranks(stats, "SyncBatchNorm forward");

    const auto count = stats.narrow(0, 2 * c, 1);
    const auto n = count.clamp_min(1.0);
    const auto mean_shifted = stats.narrow(0, 0, c) / n;
    const auto var = (stats.narrow(0, c, c) / n - mean_shifted.square()).clamp_min(0.0);
    const auto mean = mean_shifted + shift;
    const auto invstd = (var + eps).rsqrt();
    const auto scale = invstd * weight.to(acc);
    auto y = ((xf - mean.view(shape)) * scale.view(shape) + bias.to(acc).view(shape)).to(x.scalar_type());

    // PyTorch's update: unbiased variance; nothing to learn from a global batch without values.
    const auto unbiased = var * count / (count - 1.0).clamp_min(1.0);
    const auto seen = count > 0;
    auto rm = running_mean;
    auto rv = running_var;
    rm.copy_(at::where(seen, rm * (1.0 - momentum) + mean.to(rm.scalar_type()) * momentum, rm));
    rv.copy_(at::where(seen, rv * (1.0 - momentum) + unbiased.to(rv.scalar_type()) * momentum, rv));

    ctx->save_for_backward({x, weight, mean, invstd, count});
    // A capsule is the one IValue that holds an arbitrary C++ object.
    ctx->saved_data["reducer"] = at::IValue::make_capsule(reducer);
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const auto& mean = saved[2];
    const auto& invstd = saved[3];
    const auto& count = saved[4];
    const auto reducer = c10::static_intrusive_pointer_cast<Reducer>(ctx->saved_data["reducer"].toCapsule());
    const int64_t c = x.size(1);
    const auto acc = mean.scalar_type();
    const auto dims = reduced_dims(x);
    const auto shape = channel_shape(x);
    const auto dy = grads[0].to(acc);
    const auto xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape);
    const auto sum_dy = dy.sum(dims);
    const auto sum_dy_xhat = (dy * xhat).sum(dims);

    at::Tensor grad_x, grad_weight, grad_bias;
    // The same on every rank (it depends on the model, not the data), so every rank makes the
    // same collective calls.
    if (ctx->needs_input_grad(0)) {
      auto global = at::cat({sum_dy, sum_dy_xhat});
      reducer->sum_across_ranks(global, "SyncBatchNorm backward");
      const auto n = count.clamp_min(1.0);
      const auto mean_dy = global.narrow(0, 0, c) / n;
      const auto mean_dy_xhat = global.narrow(0, c, c) / n;
      const auto scale = invstd * weight.to(acc);
      grad_x = ((dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape))
                   .to(x.scalar_type());
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = sum_dy_xhat.to(weight.scalar_type());
    }
    if (ctx->needs_input_grad(2)) {
      grad_bias = sum_dy.to(weight.scalar_type());
    }
    // One entry per forward argument; running statistics and the scalars have none.
    return {grad_x, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// SyncBatchNorm of `x` in training mode (see the top of this file); the result is a new tensor
// in `*out`. `ctx` is released through `release` once nothing can call `sum` with it any more,
// also when this call fails.
int mtl_sync_batch_norm(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                        const at::Tensor* running_mean, const at::Tensor* running_var,
                        double momentum, double eps, const void* ctx, mtl_sum_fn sum,
                        mtl_release_fn release, at::Tensor** out, char* err, size_t err_len) {
  std::shared_ptr<const void> owned;
  try {
    // On failure the constructor itself calls `release`.
    owned = std::shared_ptr<const void>(ctx, release);
  } catch (...) {
    write_message("SyncBatchNorm: out of memory", err, err_len);
    return 1;
  }
  return mtl_shim::guarded("sync_batch_norm", err, err_len, [&] {
    auto reducer = c10::make_intrusive<Reducer>(std::move(owned), sum);
    auto y = SyncBatchNormFn::apply(*x, *weight, *bias, *running_mean, *running_var, momentum, eps,
                                    reducer);
    *out = new at::Tensor(std::move(y));
  });
}
}
