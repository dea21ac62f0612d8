// GPU kernel choices tch 0.24 does not expose: cuDNN's autotuner (`torch.backends.cudnn.benchmark`)
// and the channels_last memory format. Errors never cross the C boundary: every function returns
// 0 on success, 1 on an exception.
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "guard.h"

extern "C" {

// Turns cuDNN's benchmark mode on (on != 0) or off for the process: convolutions time their
// algorithms on the first call of each shape and keep the fastest.
int mtl_set_cudnn_benchmark(int on) {
  return mtl_shim::guarded([&] {
    at::globalContext().setBenchmarkCuDNN(on != 0);
  });
}

// Whether cuDNN's benchmark mode is on.
int mtl_cudnn_benchmark(int* on) {
  return mtl_shim::guarded([&] {
    *on = at::globalContext().benchmarkCuDNN() ? 1 : 0;
  });
}

// `*out` = `t` in channels_last memory format (NHWC strides; a new handle the caller frees; `t`
// itself when it already is). `t` must be 4-D.
int mtl_channels_last(const at::Tensor* t, at::Tensor** out) {
  return mtl_shim::guarded([&] {
    *out = new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
  });
}

// Whether `t` is laid out channels_last.
int mtl_is_channels_last(const at::Tensor* t, int* yes) {
  return mtl_shim::guarded([&] {
    *yes = t->is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
  });
}
}

extern "C" {
// Turns LibTorch's oneDNN (mkldnn) CPU kernels on (on != 0) or off for the process.
int mtl_set_mkldnn(int on) {
  return mtl_shim::guarded([&] {
    at::globalContext().setUserEnabledMkldnn(on != 0);
  });
}
}
