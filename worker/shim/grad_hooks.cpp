// Post-accumulate-grad hooks (`Tensor.register_post_accumulate_grad_hook` in Python), which tch
// 0.24 does not expose: autograd calls the hook on a leaf parameter right after it has
// accumulated that parameter's gradient of the current backward pass (once per pass; never for
// a parameter the pass gives no gradient). The hook calls a C function with a context pointer
// and the index it was registered with; the data-parallel step uses it to start a bucket's
// all-reduce while backward goes on (worker/src/train/overlap.rs).
//
// A parameter holds at most one such hook (LibTorch keeps one per tensor). The hook owns one
// reference to its context: its destructor calls `release(ctx)`, so the context lives as long
// as any hook that can call with it, whether the hook is cleared or its parameter freed.
// Exceptions never cross the C boundary: entry points return 0 on success and 1 with a message
// otherwise.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "guard.h"

#include <cstddef>
#include <memory>
#include <string>

namespace {

using Callback = void (*)(void* ctx, size_t index);
using Release = void (*)(void* ctx);

struct CallBack final : torch::autograd::PostAccumulateGradHook {
  CallBack(Callback call, Release release, void* ctx, size_t index)
      : call_(call), release_(release), ctx_(ctx), index_(index) {}
  ~CallBack() override { release_(ctx_); }
  CallBack(const CallBack&) = delete;
  CallBack& operator=(const CallBack&) = delete;

  void operator()(const torch::autograd::Variable& /*tensor*/) override { call_(ctx_, index_); }

 private:
  Callback call_;
  Release release_;
  void* ctx_;
  size_t index_;
};

using mtl_shim::guarded;

}  // namespace

extern "C" {

// Registers on the leaf `param` a hook that calls `call(ctx, index)` after each accumulation of
// its gradient. The hook takes over one reference to `ctx`, given back with `release(ctx)` when
// the hook is destroyed; on failure `release(ctx)` is called before returning. Fails when
// `param` is not a leaf that requires grad, or already has such a hook.
int mtl_set_post_acc_grad_hook(const at::Tensor* param, Callback call, Release release, void* ctx, size_t index,
                               char* err, size_t err_len) {
  int status = guarded("set_post_acc_grad_hook", err, err_len, [&] {
    TORCH_CHECK(param->requires_grad() && param->is_leaf(), "the tensor is not a leaf that requires grad");
    TORCH_CHECK(torch::autograd::impl::post_acc_grad_hooks(*param) == nullptr,
                "the tensor has a post-accumulate-grad hook already");
    // From here on the hook owns the reference, also if setting it throws.
    auto hook = std::make_unique<CallBack>(call, release, ctx, index);
    ctx = nullptr;
    torch::autograd::impl::set_post_acc_grad_hooks(*param, std::move(hook));
  });
  if (ctx != nullptr) {
    release(ctx);
  }
  return status;
}

// Removes `param`'s post-accumulate-grad hook (destroying it, which releases its context);
// nothing when it has none.
int mtl_clear_post_acc_grad_hook(const at::Tensor* param, char* err, size_t err_len) {
  return guarded("clear_post_acc_grad_hook", err, err_len,
                 [&] { torch::autograd::impl::set_post_acc_grad_hooks(*param, nullptr); });
}

}  // extern "C"
