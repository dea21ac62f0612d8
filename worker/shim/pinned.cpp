// Page-locked ("pinned") host tensors, which tch 0.24 cannot allocate directly: its
// `pin_memory` copies an existing tensor, and that copy is a parallel ATen op, which the loader
// threads must not run (they would start OpenMP teams of their own, see data/batch.rs). This
// is one allocation from LibTorch's caching host allocator, memory left uninitialised; the
// caller fills it. Errors never cross the C boundary: 0 on success, 1 with a message otherwise.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "guard.h"

extern "C" {

// An uninitialised pinned CPU tensor of `ndim` sizes and the dtype of `like` in `*out` (a new
// handle the caller owns); on failure a NUL-terminated message of at most `err_len` bytes.
int mtl_empty_pinned(const at::Tensor* like, const int64_t* sizes, size_t ndim, at::Tensor** out, char* err,
                     size_t err_len) {
  return mtl_shim::guarded("empty_pinned", err, err_len, [&] {
    auto options = at::TensorOptions().dtype(like->scalar_type()).pinned_memory(true);
    *out = new at::Tensor(at::empty(at::IntArrayRef(sizes, ndim), options));
  });
}

}  // extern "C"
